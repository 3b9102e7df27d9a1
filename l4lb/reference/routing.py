"""Reference twin of the relay's routing key, `l4lb._native.address_key`.

The key a `hash` pool picks with is hash64 (hashing.py) over explicit bytes, so that one
client maps to one backend in every worker and after every restart (Python's hash() is
salted per process):

- the host's text up to its first `%` (an IPv6 zone such as `fe80::1%eth0` names the
  local interface, not the client, so it is dropped), non-ASCII characters read as `?`;
- if that text is an IPv4 address: its 4 packed bytes; if IPv6: its 16 packed bytes,
  except an IPv4-mapped one (`::ffff:a.b.c.d`), which counts as the 4 bytes of a.b.c.d,
  because a dual-stack listener reports IPv4 clients that way;
- for HASH_KEY_SRC_IP_PORT, the port (0 when None) follows as two big-endian bytes;
- text that is no address is hashed as itself, port or not (a Unix socket peer, a test).

The compiled function parses with the C library's inet_pton; this twin parses with
`ipaddress`, an independent reading of the same grammar, so the hypothesis test in
tests/unit/test_routing_key.py checks the byte layout and the parse both. One C detail is
kept on purpose: inet_pton reads a C string, so text after a NUL is not parsed (it is
still hashed when the text is no address). Never used on the data path.
"""
import ipaddress

from .._native import HASH_KEY_SRC_IP, HASH_KEY_SRC_IP_PORT
from .hashing import hash64


def pack_address(text: bytes) -> bytes | None:
    """The packed IP of `text` (4 bytes for IPv4 and IPv4-mapped IPv6, else 16), or None."""
    try:
        ip = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.packed
    return ip.packed


def address_key(host: str | None, port: int | None = None, kind: int = HASH_KEY_SRC_IP) -> int:
    """The routing key of a client address; identical to `l4lb._native.address_key`."""
    raw = (host or "").split("%", 1)[0].encode("ascii", "replace")
    packed = pack_address(raw.split(b"\0", 1)[0])
    if packed is None:
        return hash64(raw)
    if kind == HASH_KEY_SRC_IP_PORT:
        p = int(port or 0)
        packed += bytes(((p >> 8) & 0xFF, p & 0xFF))
    return hash64(packed)
