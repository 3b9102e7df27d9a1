"""TCP endpoints as operators write them: the one parser every entry point calls.

The config file (backends, listener binds, metrics.listen), the control socket's
`add POOL BACKEND HOST:PORT`, the state file's added backends and `l4lb deploy` all turn
text into an Address here, so a backend address one of them takes, the others take too.

The rule:
- `HOST:PORT`. HOST is an IPv4 literal in dotted-quad form (no leading zeros, which some
  resolvers read as octal), an IPv6 literal in brackets (`[::1]:9001`, a zone id such as
  `[fe80::1%eth0]:22` allowed: interface names are letters, digits, '_', '.', '-'), or a
  hostname: RFC 1123 labels of 1-63 letters, digits and '-' not at either end, plus '_'
  (not RFC 1123, but container and service names use it: `my_svc:80`), 253 characters at
  most, one trailing dot allowed (a fully qualified name).
- PORT is decimal ASCII. A backend needs 1..65535 (nothing listens on port 0); a listening
  address may say 0 (`port_zero=True`): the kernel picks a free port at bind time, which
  tests and ephemeral setups rely on.

IP literals come back normalized (`[0::1]` -> `::1`) and hostnames lower-cased, so equal
endpoints compare equal and `parse_address(str(a)) == a`. Failure is a ValueError whose
message quotes (a short piece of) the text and says what is wrong with it.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

__all__ = ["Address", "EXAMPLE_ADDRESSES", "parse_address"]

# A hostname label; '_' is not RFC 1123 but container and service names use it.
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_ZONE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MAX_HOSTNAME = 253          # RFC 1035 §2.3.4, without the trailing dot
_QUOTE_MAX = 40              # characters of the input echoed in a message (a 64 KiB token is not)
EXAMPLE_ADDRESSES = "'127.0.0.1:8000' or '[::1]:8000'"


@dataclass(frozen=True)
class Address:
    """A TCP endpoint. `host` is an IP literal (IPv6 without brackets) or a hostname."""
    host: str
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        """AF_INET6 for an IPv6 literal, AF_INET for an IPv4 literal, AF_UNSPEC for a
        hostname (it may resolve to either; let getaddrinfo decide)."""
        if ":" in self.host:
            return socket.AF_INET6
        try:
            ipaddress.IPv4Address(self.host)
        except ValueError:
            return socket.AF_UNSPEC
        return socket.AF_INET

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _quote(text: str) -> str:
    return repr(text) if len(text) <= _QUOTE_MAX else repr(text[:_QUOTE_MAX]) + "..."


def parse_address(text, *, port_zero: bool = False) -> Address:
    """Parse "host:port" ("[v6]:port" for IPv6) into an Address, by the rule above.

    `port_zero` admits port 0 (a listening address: any free port); without it the port
    must be 1..65535 (an address to connect to). Raises ValueError saying what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"bad address {text!r}: expected a string such as {EXAMPLE_ADDRESSES}")

    def bad(reason: str) -> ValueError:
        return ValueError(f"bad address {_quote(text)}: {reason}")

    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise bad("no ']' closes the IPv6 address")
        host, rest = text[1:end], text[end + 1:]
        if not rest.startswith(":"):
            raise bad("expected ':port' after ']'")
        port_text = rest[1:]
        host = _normalize_ipv6(host, bad)
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            raise bad(f"expected host:port, such as {EXAMPLE_ADDRESSES}")
        if ":" in host:
            raise bad("an IPv6 address needs brackets, as in '[::1]:8000'")
        if not host:
            raise bad("the host is empty (use '0.0.0.0' or '[::]' for every address)")
        host = _normalize_host(host, bad)
    low = 0 if port_zero else 1
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
            and low <= int(port_text) <= 65535):
        raise bad(f"the port must be a number from {low} to 65535, got {_quote(port_text)}")
    return Address(host, int(port_text))


def _normalize_ipv6(host: str, bad) -> str:
    literal, percent, zone = host.partition("%")
    if percent and not _ZONE_ID.fullmatch(zone):
        raise bad(f"{_quote(zone)} is not an interface name (zone id)")
    try:
        address = ipaddress.IPv6Address(literal)
    except ValueError:
        raise bad(f"{_quote(host)} is not an IPv6 address") from None
    return f"{address.compressed}%{zone}" if percent else address.compressed


def _normalize_host(host: str, bad) -> str:
    """An IPv4 literal in canonical form, or a valid hostname lower-cased."""
    if all(c.isdigit() or c == "." for c in host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise bad(f"{_quote(host)} is not an IPv4 address") from None
    labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
    if (len(host.rstrip(".")) > _MAX_HOSTNAME
            or not all(_HOST_LABEL.fullmatch(label) for label in labels)):
        raise bad(f"{_quote(host)} is neither an IP address nor a hostname")
    return host.lower()
