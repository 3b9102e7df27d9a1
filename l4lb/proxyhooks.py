"""PROXY protocol glue between the sans-IO codec (l4lb/proxyproto.py) and its users: the
relay's ``accept_proxy`` header hook and ``send_proxy`` encoder. (The header a health
probe sends is the health checker's own: l4lb.health.proxy_header.)

Contracts (ext/l4lb/relay.pxi):

* ``read_client_header(relay, data)`` is ``ListenerRuntime.header_hook``: called with
  every byte the client sent so far; returns None (need more), ``(consumed, (ip, port))``
  for a header with addresses, ``(consumed, None)`` for ``LOCAL`` / ``UNKNOWN`` (the
  socket's own address stays the client's), or ``(-1, None)`` for bytes that can never be
  a header. The parser bounds the header (107 bytes for v1, 16 + 1024 for v2) and fails
  as soon as a prefix cannot become valid, so a client cannot make the relay hold more
  than one read past that bound. With addresses, the header's destination becomes the
  relay's ``local_addr``, so a chained ``send_proxy`` passes on the original destination.
* ``encode_backend_header(version, src, dst)`` is ``ListenerRuntime.proxy_encoder``:
  never raises. Mixed families (an IPv6 client on an IPv4 listener, or the reverse) are
  sent as IPv6 with the IPv4 side v4-mapped, as haproxy does; an endpoint that cannot be
  encoded at all (no address) gives ``PROXY UNKNOWN`` (v1) or a ``LOCAL`` header (v2), on
  which the backend uses the connection's own addresses.
"""
from __future__ import annotations

import ipaddress

from .proxyproto import ProxyHeaderError, encode_v1, encode_v2, parse_proxy_header

__all__ = ["encode_backend_header", "read_client_header"]

_V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
_V2_LOCAL = encode_v2(None, None, "LOCAL")


def read_client_header(relay, data: bytes):
    """The accept_proxy header hook (see the module doc)."""
    try:
        result = parse_proxy_header(data)
    except ProxyHeaderError:
        return -1, None
    if result is None:
        return None
    header, consumed = result
    if header.src is None:
        return consumed, None
    relay.local_addr = header.dst
    return consumed, header.src


def encode_backend_header(version: int, src, dst) -> bytes:
    """The send_proxy header for a connection from `src` to `dst` (``(host, port, ...)``
    as sockets report them); never raises (see the module doc)."""
    encode = encode_v1 if version == 1 else encode_v2
    try:
        return encode(src[:2], dst[:2])
    except (ProxyHeaderError, TypeError, ValueError):
        pass
    try:
        src = _as_ipv6(src)
        dst = _as_ipv6(dst)
        return encode(src, dst)
    except (ProxyHeaderError, TypeError, ValueError):
        return _V1_UNKNOWN if version == 1 else _V2_LOCAL


def _as_ipv6(endpoint) -> tuple[str, int]:
    """(ip, port) with a scope suffix dropped and an IPv4 address v4-mapped."""
    host, port = endpoint[0], endpoint[1]
    address = ipaddress.ip_address(host.partition("%")[0])
    if address.version == 4:
        address = ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + address.packed)
    return str(address), port
