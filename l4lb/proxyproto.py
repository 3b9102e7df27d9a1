"""PROXY protocol v1 (text) and v2 (binary): a sans-IO parser and two encoders.

Theory of operation
-------------------
The PROXY protocol (haproxy's doc/proxy-protocol.txt, "The PROXY protocol, Versions 1 & 2")
prepends one header to a TCP stream that carries the original client's addresses. l4lb
reads it from an upstream balancer (``accept_proxy``) and writes it to backends and health
probes (``send_proxy``). This module holds no socket: the relay feeds it the bytes read so
far and gets back one of three answers.

``parse_proxy_header(data)`` looks at the start of a connection and returns

* ``None``: every byte so far is a valid prefix of some header; read more. The caller owns
  the header timeout (spec §2: "at least 3 seconds to cover a TCP retransmit").
* ``(header, consumed)``: a complete, valid header; ``data[consumed:]`` is the client's
  first payload and must be relayed untouched.
* ``ProxyHeaderError``: these bytes can never become a valid header, whatever follows. The
  decision is made as early as possible (spec §2.1: "abort the connection as soon as
  possible"), so a garbage first byte fails at once, not after a timeout. The parser is
  monotonic: once a prefix is an error, every extension of it is an error too.

The version is told apart by the first byte (spec §2.2, end: "Identifying the protocol
version"): ``\\r`` starts the 12-byte v2 signature, ``P`` starts v1's ``"PROXY "``. Anything
else is not a PROXY header. There is no guessing whether a header is present at all: a
listener either requires one or never looks (spec §5).

Version 1 (spec §2.1) is one US-ASCII line of at most ``MAX_V1`` = 107 bytes, CRLF
included::

    PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\\r\\n
    PROXY TCP6 <ipv6> <ipv6> <port> <port>\\r\\n
    PROXY UNKNOWN[ <anything>]\\r\\n

Exactly one space between fields; IPv4 in dotted quad without leading zeros; ports in
0..65535 without leading zeros; a lone CR or LF is not a line end. The line is checked field
by field while it arrives: each finished field fully, the field being received by asking
for its shortest valid completion (none: error; too long to end within ``MAX_V1``: error).
So ``"PROXY TCP4 1.2.3.400"`` fails before its CRLF shows up, and a line ending in CR is
judged as finished, since only LF may follow. For ``UNKNOWN`` the rest of the line is
ignored, as the spec requires.

Version 2 (spec §2.2) is a 16-byte fixed part — signature, version/command byte,
family/protocol byte, big-endian length — followed by ``length`` bytes of addresses and
TLVs (spec §2.2.1-2.2.8). Each fixed byte is checked the moment it arrives. ``length`` is
bounded by ``MAX_V2_LENGTH`` (our policy, not the spec's, which allows 65535: with TLVs a
real header stays well under 1 KiB and an unbounded one is a memory lever for a hostile
peer). TLVs are walked to check that they tile the remaining space exactly (as haproxy
does) and are otherwise skipped; the CRC32C TLV is not verified.

What the header means (spec §2.1 "UNKNOWN", §2.2 "LOCAL" and "UNSPEC"): a ``LOCAL`` command
or an address family we do not relay (UNSPEC, UDP, AF_UNIX) yields ``family="UNKNOWN"`` and
``src = dst = None``; the caller then uses the real connection's endpoints. Only TCP over
IPv4 and IPv6 yields addresses.

Encoders (``encode_v1``, ``encode_v2``) produce exactly one header from ``(ip, port)``
pairs and refuse mixed families, bad addresses and ports out of range.
"""
from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "MAX_V1",
    "MAX_V2_LENGTH",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "encode_v1",
    "encode_v2",
    "parse_proxy_header",
]

# Spec §2.1: the worst case "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n".
MAX_V1 = 107
V1_PREFIX = b"PROXY "

# Spec §2.2: twelve bytes chosen to make HTTP, TLS, SMTP, FTP and POP servers abort.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_SIZE = 16  # signature + ver_cmd + fam + 16-bit length
# Our bound on the v2 length field (addresses + TLVs). AF_UNIX addresses take 216 bytes;
# the rest leaves room for ALPN, authority, unique-id (<= 128) and SSL TLVs.
MAX_V2_LENGTH = 1024

_V2_VERSION = 0x2  # high nibble of byte 13; the spec says receivers accept only this value

# Low nibble of byte 13 -> command (spec §2.2). Any other value must be rejected.
_V2_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
_COMMAND_CODES = {name: code for code, name in _V2_COMMANDS.items()}

# Byte 14 (family << 4 | transport) -> (family reported, address block size, address size).
# Family nibbles 0..3 (UNSPEC, INET, INET6, UNIX) with transport nibbles 0..2 (UNSPEC,
# STREAM, DGRAM) are the only valid values; everything else is rejected (spec §2.2).
# Only TCP over IPv4/IPv6 is relayed; the other valid combinations fall back to UNKNOWN
# ("falls back to the UNSPEC mode for the valid combinations ... it does not support"),
# but their declared length must still hold their address block, and TLVs follow it.
# A block size of None marks an UNSPEC family or transport: the block's layout is unknown
# ("the receiver should ignore address information"), so all ``length`` bytes are skipped
# unchecked.
_V2_FAMILIES = {
    0x00: ("UNKNOWN", None, 0),
    0x01: ("UNKNOWN", None, 0),
    0x02: ("UNKNOWN", None, 0),
    0x10: ("UNKNOWN", None, 0),
    0x11: ("TCP4", 12, 4),     # 2 * 4-byte address + 2 * 2-byte port
    0x12: ("UNKNOWN", 12, 0),  # UDP over IPv4
    0x20: ("UNKNOWN", None, 0),
    0x21: ("TCP6", 36, 16),    # 2 * 16-byte address + 2 * 2-byte port
    0x22: ("UNKNOWN", 36, 0),  # UDP over IPv6
    0x30: ("UNKNOWN", None, 0),
    0x31: ("UNKNOWN", 216, 0),  # AF_UNIX stream: 2 * 108-byte path
    0x32: ("UNKNOWN", 216, 0),  # AF_UNIX datagram
}
_FAMILY_CODES = {"TCP4": 0x11, "TCP6": 0x21}
_TLV_HEADER_SIZE = 3  # type, length_hi, length_lo (spec §2.2, struct pp2_tlv)

_V1_FAMILIES = ("TCP4", "TCP6", "UNKNOWN")
_V1_MAX_PORT_DIGITS = 5
_DEC_DIGITS = frozenset("0123456789")
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")
_IPV4_CHARS = _DEC_DIGITS | {"."}


class ProxyHeaderError(Exception):
    """The bytes are not, and can never become, a valid PROXY protocol header.

    The only exception ``parse_proxy_header`` raises; the encoders raise it too when given
    addresses they cannot encode. The connection that sent such a header is to be closed.
    """


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed PROXY header.

    ``family`` is ``"TCP4"`` or ``"TCP6"`` with ``src``/``dst`` as ``(ip, port)`` (ip in
    ipaddress's canonical text form), or ``"UNKNOWN"`` with both ``None``: use the real
    connection endpoints. ``command`` is ``"LOCAL"`` only for v2 health checks of the
    upstream proxy itself (always with family ``"UNKNOWN"``).
    """

    version: int
    command: str
    family: str
    src: tuple[str, int] | None
    dst: tuple[str, int] | None


# ---------------------------------------------------------------------------------------
# Parsing


def parse_proxy_header(data: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    """Parse the PROXY header at the start of ``data``.

    Returns ``None`` when ``data`` is a valid but incomplete prefix (read more and call
    again with everything read so far), or ``(header, consumed)`` once the header is
    complete; bytes past ``consumed`` belong to the client's stream. Raises
    ``ProxyHeaderError`` as soon as ``data`` cannot be the start of a valid header: bad
    first bytes, v2 signature mismatch, unsupported version/command/family, a length over
    ``MAX_V2_LENGTH``, malformed TLVs, a v1 field out of range, or a v1 line that cannot
    end within ``MAX_V1`` bytes. Never raises anything else, whatever the input.
    """
    if not data:
        return None
    first = data[0]
    if first == V2_SIGNATURE[0]:
        return _parse_v2(data)
    if first == V1_PREFIX[0]:
        return _parse_v1(bytes(data[:MAX_V1]))
    raise ProxyHeaderError(f"not a PROXY protocol header (first byte {first:#04x})")


def _parse_v2(data: bytes | bytearray | memoryview) -> tuple[ProxyHeader, int] | None:
    """Spec §2.2: check each fixed byte as it arrives, then wait for 16 + length bytes."""
    have = len(data)
    signature = bytes(data[:12])
    if signature != V2_SIGNATURE[: len(signature)]:
        raise ProxyHeaderError("PROXY v2 signature mismatch")
    if have < 13:
        return None
    ver_cmd = data[12]
    if ver_cmd >> 4 != _V2_VERSION:
        raise ProxyHeaderError(f"PROXY v2: unsupported version {ver_cmd >> 4} (want 2)")
    command = _V2_COMMANDS.get(ver_cmd & 0x0F)
    if command is None:
        raise ProxyHeaderError(f"PROXY v2: unknown command {ver_cmd & 0x0F:#x}")
    if have < 14:
        return None
    fam = data[13]
    family_info = _V2_FAMILIES.get(fam)
    if family_info is None:
        raise ProxyHeaderError(f"PROXY v2: unknown address family/protocol {fam:#04x}")
    if have < V2_FIXED_SIZE:
        return None
    length = (data[14] << 8) | data[15]
    if length > MAX_V2_LENGTH:
        raise ProxyHeaderError(f"PROXY v2: length {length} over the limit of {MAX_V2_LENGTH}")
    family, block_size, address_size = family_info
    if command == "LOCAL":
        # Spec §2.2: for LOCAL the receiver discards the whole block, family included.
        family, block_size, address_size = "UNKNOWN", None, 0
    total = V2_FIXED_SIZE + length
    if block_size is not None:
        if length < block_size:
            raise ProxyHeaderError(
                f"PROXY v2: length {length} too short for a {block_size}-byte address block"
            )
        _check_tlvs(data, V2_FIXED_SIZE + block_size, total)
    if have < total:
        return None
    if address_size == 0:
        return ProxyHeader(2, command, "UNKNOWN", None, None), total
    start = V2_FIXED_SIZE
    src_ip = _ip_text(bytes(data[start : start + address_size]))
    dst_ip = _ip_text(bytes(data[start + address_size : start + 2 * address_size]))
    ports = start + 2 * address_size
    src_port, dst_port = struct.unpack_from("!HH", data, ports)
    return ProxyHeader(2, command, family, (src_ip, src_port), (dst_ip, dst_port)), total


def _check_tlvs(data: bytes | bytearray | memoryview, offset: int, end: int) -> None:
    """Walk the TLVs in data[offset:end] that have arrived; each must fit before ``end``.

    Raises ProxyHeaderError for a TLV header cut by ``end`` or a value running past it,
    as soon as the offending TLV header is visible, so a doomed header fails early.
    """
    have = min(len(data), end)
    while offset < end:
        if end - offset < _TLV_HEADER_SIZE:
            raise ProxyHeaderError("PROXY v2: truncated TLV at the end of the header")
        if offset + _TLV_HEADER_SIZE > have:
            return
        value_length = (data[offset + 1] << 8) | data[offset + 2]
        offset += _TLV_HEADER_SIZE + value_length
        if offset > end:
            raise ProxyHeaderError("PROXY v2: TLV runs past the end of the header")


def _ip_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def _parse_v1(head: bytes) -> tuple[ProxyHeader, int] | None:
    """Spec §2.1: validate the line field by field; decode it once its CRLF is in."""
    if head[: len(V1_PREFIX)] != V1_PREFIX[: len(head)]:
        raise ProxyHeaderError("not a PROXY protocol header (bad v1 prefix)")
    end = head.find(b"\r\n")
    complete = end != -1
    line = head[:end] if complete else head
    # A lone CR or LF is never a line end (spec §2.1); a trailing CR may be half a CRLF.
    body = line if complete or not line.endswith(b"\r") else line[:-1]
    if b"\r" in body or b"\n" in body:
        raise ProxyHeaderError("PROXY v1: stray CR or LF inside the header line")
    if not body.isascii():
        raise ProxyHeaderError("PROXY v1: non-ASCII byte in the header line")
    fields = body.decode("ascii").split(" ")
    if complete:
        return _decode_v1(fields), end + 2
    if body is not line:
        # Ends in CR: only LF can follow, so the line is as good as finished.
        _decode_v1(fields)
    if _shortest_completion(fields) > MAX_V1:
        raise ProxyHeaderError(f"PROXY v1: no CRLF within {MAX_V1} bytes")
    return None


def _shortest_completion(fields: list[str]) -> int:
    """Length of the shortest valid line (CRLF included) that starts with these fields.

    ``fields`` is a partial line split on spaces: every field but the last is finished,
    the last may still grow. Raises ProxyHeaderError when no valid line starts this way.
    """
    # fields[0] is "PROXY" or a prefix of it (the prefix test vouched for it).
    if len(fields) == 1:
        return len(V1_PREFIX) + len("UNKNOWN\r\n")
    family = fields[1]
    if len(fields) == 2:
        matches = [name for name in _V1_FAMILIES if name.startswith(family)]
        if not matches:
            raise ProxyHeaderError(f"PROXY v1: unknown family {family!r}")
        return min(len(V1_PREFIX) + len(name) + _shortest_rest(name) + 2 for name in matches)
    if family == "UNKNOWN":
        return len(" ".join(fields)) + 2  # the rest of an UNKNOWN line is ignored
    specs = _V1_FIELDS.get(family)
    if specs is None:
        raise ProxyHeaderError(f"PROXY v1: unknown family {family!r}")
    values = fields[2:]
    if len(values) > len(specs):
        raise ProxyHeaderError("PROXY v1: too many fields")
    *finished, last = values
    for spec, value in zip(specs, finished):
        spec.check(value)
    spec = specs[len(finished)]
    completed = spec.complete(last)
    if completed is None:
        raise ProxyHeaderError(f"PROXY v1: bad {spec.what} {last!r}")
    missing = specs[len(values) :]
    length = len(" ".join(fields[:-1])) + 1 + len(completed)
    return length + sum(1 + len(spec.shortest) for spec in missing) + 2


def _shortest_rest(family: str) -> int:
    """Length of the shortest valid fields after ``family``, their spaces included."""
    return sum(1 + len(spec.shortest) for spec in _V1_FIELDS.get(family, ()))


def _decode_v1(fields: list[str]) -> ProxyHeader:
    """Decode a complete v1 line (split on spaces, CRLF removed); raise if it is invalid."""
    family = fields[1] if len(fields) > 1 else ""
    if family == "UNKNOWN":
        return ProxyHeader(1, "PROXY", "UNKNOWN", None, None)
    specs = _V1_FIELDS.get(family)
    if specs is None:
        raise ProxyHeaderError(f"PROXY v1: unknown family {family!r}")
    values = fields[2:]
    if len(values) != len(specs):
        raise ProxyHeaderError(
            f"PROXY v1: {family} needs {len(specs)} fields after it, got {len(values)}"
        )
    for spec, value in zip(specs, values):
        spec.check(value)
    src_ip, dst_ip, src_port, dst_port = values
    return ProxyHeader(
        1,
        "PROXY",
        family,
        (str(ipaddress.ip_address(src_ip)), int(src_port)),
        (str(ipaddress.ip_address(dst_ip)), int(dst_port)),
    )


# --- v1 fields. Each one knows how to finish a partial value with the fewest characters,
# which answers both "can more bytes still make this valid?" and "will it fit in MAX_V1?".


def _complete_port(text: str) -> str | None:
    """The shortest valid port starting with ``text``, or None if there is none.

    Decimal, 0..65535, no leading zero (spec §2.1: "Heading zeroes are not permitted").
    Every prefix of such a number is itself such a number, or empty.
    """
    if text == "":
        return "0"
    if len(text) > _V1_MAX_PORT_DIGITS or not _DEC_DIGITS.issuperset(text):
        return None
    if text[0] == "0" and text != "0":
        return None
    return text if int(text) <= 65535 else None


def _is_ipv4(text: str) -> bool:
    if not _IPV4_CHARS.issuperset(text):
        return False
    try:
        ipaddress.IPv4Address(text)  # rejects leading zeros, as the spec does
    except ValueError:
        return False
    return True


def _complete_ipv4(text: str) -> str | None:
    """The shortest valid IPv4 address starting with ``text``, or None if there is none."""
    if not _IPV4_CHARS.issuperset(text):
        return None
    parts = text.split(".")
    if len(parts) > 4:
        return None
    # Every prefix of a valid octet is a valid octet or empty: finish the last one and add
    # the missing ones as zeros.
    candidate = text + ("0" if parts[-1] == "" else "") + ".0" * (4 - len(parts))
    return candidate if _is_ipv4(candidate) else None


def _is_ipv6(text: str) -> bool:
    # The character check also keeps out ipaddress's "%scope" suffix, not part of the spec.
    if not text or not _IPV6_CHARS.issuperset(text):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


# Ways to finish an IPv6 address that has no dot yet, shortest first: at most one "0"
# (finishing a started group) or ":" (finishing a "::"), then the missing groups as zeros,
# spelled out or as "::".
_IPV6_FILLS = ("", "::", *(":0" * k for k in range(1, 8)))
_IPV6_SUFFIXES = sorted(
    {base + fill for base in ("", "0", ":") for fill in _IPV6_FILLS},
    key=lambda suffix: (len(suffix), suffix),
)
_IPV6_MAX_TEXT = 45  # "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255"


def _complete_ipv6(text: str) -> str | None:
    """The shortest valid IPv6 address starting with ``text``, or None if there is none.

    With a dot, the text is in the embedded IPv4 tail (``::ffff:1.2.``), which only an
    IPv4 completion can finish.
    """
    if not _IPV6_CHARS.issuperset(text) or len(text) > _IPV6_MAX_TEXT:
        return None
    if "." in text:
        head, colon, tail = text.rpartition(":")
        tail = _complete_ipv4(tail) if colon else None
        if tail is None:
            return None
        candidate = head + ":" + tail
        return candidate if _is_ipv6(candidate) else None
    for suffix in _IPV6_SUFFIXES:
        if _is_ipv6(text + suffix):
            return text + suffix
    return None


@dataclass(frozen=True, slots=True)
class _V1Field:
    what: str  # for error messages
    complete: Callable[[str], str | None]  # shortest valid value starting with the text
    shortest: str  # the shortest valid value of all

    def check(self, text: str) -> None:
        """Raise ProxyHeaderError unless ``text`` is a finished, valid value."""
        if self.complete(text) != text:
            raise ProxyHeaderError(f"PROXY v1: bad {self.what} {text!r}")


_V1_IPV4 = _V1Field("IPv4 address", _complete_ipv4, "0.0.0.0")
_V1_IPV6 = _V1Field("IPv6 address", _complete_ipv6, "::")
_V1_PORT = _V1Field("port", _complete_port, "0")
# The fields after "PROXY <family>" (spec §2.1): source, destination, their ports.
_V1_FIELDS = {
    "TCP4": (_V1_IPV4, _V1_IPV4, _V1_PORT, _V1_PORT),
    "TCP6": (_V1_IPV6, _V1_IPV6, _V1_PORT, _V1_PORT),
}


# ---------------------------------------------------------------------------------------
# Encoding


def encode_v1(src: tuple[str, int] | None, dst: tuple[str, int] | None) -> bytes:
    """The v1 line for a TCP connection from ``src`` to ``dst`` (each ``(ip, port)``).

    Both ``None`` gives ``b"PROXY UNKNOWN\\r\\n"`` (spec §2.1 discourages it for real
    traffic: some receivers refuse it). Raises ProxyHeaderError for a bad IP, a port
    outside 0..65535, only one of the two given, or IPv4 mixed with IPv6.
    """
    if src is None and dst is None:
        return b"PROXY UNKNOWN\r\n"
    family, (src_ip, src_port), (dst_ip, dst_port) = _check_endpoints(src, dst)
    return (
        f"PROXY {family} {src_ip.compressed} {dst_ip.compressed} {src_port} {dst_port}\r\n"
    ).encode("ascii")


def encode_v2(
    src: tuple[str, int] | None, dst: tuple[str, int] | None, command: str = "PROXY"
) -> bytes:
    """The v2 binary header (no TLVs) for a TCP connection from ``src`` to ``dst``.

    ``command="LOCAL"`` (the sender's own connection, e.g. a health probe) ignores the
    addresses and sends family UNSPEC with length 0 (spec §2.2). Raises ProxyHeaderError
    for an unknown command and, for PROXY, for the same faults as ``encode_v1``.
    """
    code = _COMMAND_CODES.get(command)
    if code is None:
        raise ProxyHeaderError(f"unknown PROXY v2 command {command!r} (LOCAL or PROXY)")
    ver_cmd = (_V2_VERSION << 4) | code
    if command == "LOCAL":
        return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, 0x00, 0)
    family, (src_ip, src_port), (dst_ip, dst_port) = _check_endpoints(src, dst)
    addresses = src_ip.packed + dst_ip.packed + struct.pack("!HH", src_port, dst_port)
    return (
        V2_SIGNATURE
        + struct.pack("!BBH", ver_cmd, _FAMILY_CODES[family], len(addresses))
        + addresses
    )


def _check_endpoints(src, dst):
    """(family, (src_ip, src_port), (dst_ip, dst_port)) with ipaddress objects; or raise."""
    if src is None or dst is None:
        raise ProxyHeaderError("both source and destination are needed")
    src_ip, src_port = _check_endpoint(src)
    dst_ip, dst_port = _check_endpoint(dst)
    if src_ip.version != dst_ip.version:
        raise ProxyHeaderError(f"mixed address families: {src_ip} and {dst_ip}")
    family = "TCP4" if src_ip.version == 4 else "TCP6"
    return family, (src_ip, src_port), (dst_ip, dst_port)


def _check_endpoint(endpoint):
    try:
        ip, port = endpoint
        address = ipaddress.ip_address(ip)
    except (TypeError, ValueError) as exc:
        raise ProxyHeaderError(f"bad endpoint {endpoint!r}: want (ip, port)") from exc
    if getattr(address, "scope_id", None):
        raise ProxyHeaderError(f"scoped IPv6 address {ip!r} cannot be sent")
    if type(port) is not int or not 0 <= port <= 65535:
        raise ProxyHeaderError(f"bad port {port!r}: want an int in 0..65535")
    return address, port
