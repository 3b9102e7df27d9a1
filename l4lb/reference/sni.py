"""ClientHello parser reference twin (ext/l4lb/sni.pxi): the executable spec, written for
clarity. Same contract, same answers, byte for byte; tests/unit/test_sni_parser.py runs
every test against both and hypothesis checks that they agree.

Theory of operation
-------------------
The balancer routes a TLS connection by the server name in its ClientHello without
terminating TLS: it peeks (MSG_PEEK) at the start of the stream, so the bytes stay in
the kernel and reach the backend untouched, and calls ``parse_client_hello`` once per
peek with everything peeked so far. The parser keeps no state between calls.

``parse_client_hello(data, max_len)`` returns ``(status, needed, server_name, alpn)``:

* ``SNI_NEED_MORE``: every byte so far is consistent with a ClientHello that has not
  fully arrived. ``needed`` is the stream length at which the answer can next change: no
  prefix shorter than that gives anything else, so a caller may set SO_RCVLOWAT to it.
  Never returned once ``len(data) >= max_len``.
* ``SNI_FOUND``: a whole, well-formed ClientHello. ``server_name`` is the host_name of
  the server_name extension (RFC 6066 §3), ASCII lower-cased with one trailing dot
  removed, or None when the hello has none; ``alpn`` is the tuple of protocol names of
  the ALPN extension (RFC 7301 §3.1), each decoded as latin-1 (lossless), or ``()``.
* ``SNI_NOT_TLS``: not a TLS handshake at all: the first byte is not 22 (handshake; this
  catches plain HTTP and SSLv2-style hellos, whose first byte has the top bit set), or the
  first record's version is not 3.0-3.4. Decided on the first byte where possible.
* ``SNI_TOO_LARGE``: the hello cannot be complete within ``max_len`` bytes of stream.
  Decided as soon as the handshake length is known, not when the cap fills.
* ``SNI_MALFORMED``: TLS, but a length or field that does not fit: see the checks below.

``needed`` is 0 unless the status is SNI_NEED_MORE.

The cap. ``max_len`` (1..65536; the listener's ``max_client_hello``) bounds the bytes of
stream the parser looks at, record headers included: it is the size of the caller's
peek buffer. Bytes past it are never read, so ``parse(data, cap) == parse(data[:cap],
cap)`` for any data.

Records (RFC 8446 §5.1). A handshake message may span records, and a record may be cut
anywhere by TCP. The parser walks the records from offset 0 and concatenates their
payloads until it holds the 4-byte handshake header, then the whole message. Each record
header is judged once all its 5 bytes are present: type 22, version 3.0-3.4, length
1..2^14 + 2048 (RFC 8446 forbids empty handshake fragments; 2^14 + 2048 is the largest
record any TLS version allows). The handshake header must be type 1 (client_hello). Bytes
after the hello, in its last record or beyond, are ignored.

The hello (RFC 8446 §4.1.2; RFC 5246 §7.4.1.2 for TLS 1.2) is judged once whole. Checked:
legacy_version major 3; session id at most 32 bytes; cipher suites an even, non-zero
length; at least one compression method; extensions either absent (a TLS 1.0 hello may
stop after compression methods) or a block that ends exactly where the hello ends, each
extension fitting inside it. server_name (0) and ALPN (16) may each appear once (RFC 8446
§4.2: no extension type twice), and their contents must tile exactly:

* server_name: a non-empty list of (name_type, 16-bit length, name); at most one
  host_name (type 0), non-empty and of printable ASCII (0x21-0x7e: RFC 6066 allows
  ASCII only, and a name with control bytes must not reach logs or routes); entries of
  other types are skipped; a host_name that is only "." is malformed. A list without a
  host_name means no SNI.
* ALPN: a list of at least 2 bytes of (8-bit length, name), each name non-empty.

Other extensions are skipped unread. Nothing here checks what the hello means (whether
the cipher suites exist, whether TLS 1.3 hellos carry supported_versions): the backend
does that, and a hello it would refuse still routes by its name.

Why ``needed`` is exact rather than a guess: the answer can only change when a new
record header is whole, when the handshake header is whole, or when the hello is whole
(the first byte alone is judged too). ``needed`` is the offset of the first of those
still ahead. TOO_LARGE compares the cap with the fewest bytes that could complete the
hello: the rest of the current record, then one more record header holding everything
else.
"""
from __future__ import annotations

SNI_NEED_MORE = 0
SNI_FOUND = 1
SNI_NOT_TLS = 2
SNI_TOO_LARGE = 3
SNI_MALFORMED = 4

# Default and upper bound of the cap (the listener's max_client_hello).
SNI_MAX_CLIENT_HELLO = 16384
SNI_MAX_CLIENT_HELLO_LIMIT = 65536

RECORD_HEADER = 5                 # type(1), version(2), length(2)
RECORD_TYPE_HANDSHAKE = 22
RECORD_MAX = 16384 + 2048         # largest TLSCiphertext body (RFC 8446 §5.2); plaintext is 2^14
HANDSHAKE_HEADER = 4              # msg_type(1), length(3)
HANDSHAKE_CLIENT_HELLO = 1
EXT_SERVER_NAME = 0
EXT_ALPN = 16
NAME_TYPE_HOST_NAME = 0
SESSION_ID_MAX = 32

Result = tuple[int, int, "str | None", tuple[str, ...]]


def parse_client_hello(data: bytes, max_len: int = SNI_MAX_CLIENT_HELLO) -> Result:
    """Judge the bytes at the start of a TCP stream (see the module docstring)."""
    if not 1 <= max_len <= SNI_MAX_CLIENT_HELLO_LIMIT:
        raise ValueError(f"max_len must be 1..{SNI_MAX_CLIENT_HELLO_LIMIT}, not {max_len}")
    data = bytes(data[:max_len])
    n = len(data)
    if n >= 1 and data[0] != RECORD_TYPE_HANDSHAKE:
        return SNI_NOT_TLS, 0, None, ()
    if n == 0:
        return _need(1, RECORD_HEADER + HANDSHAKE_HEADER, max_len)
    payload = bytearray()       # the handshake bytes gathered from the records so far
    target = HANDSHAKE_HEADER   # payload bytes wanted: the header, then the whole message
    header_done = False         # target is the whole message
    pos = 0                     # stream offset of the current record's header
    while True:
        want = target - len(payload)
        if pos + RECORD_HEADER > n:
            end = pos + RECORD_HEADER
            return _need(end, end + want, max_len)
        rtype, major, minor = data[pos], data[pos + 1], data[pos + 2]
        rlen = int.from_bytes(data[pos + 3:pos + 5], "big")
        if not (major == 3 and minor <= 4):
            return (SNI_NOT_TLS if pos == 0 else SNI_MALFORMED), 0, None, ()
        if rtype != RECORD_TYPE_HANDSHAKE or not 1 <= rlen <= RECORD_MAX:
            return SNI_MALFORMED, 0, None, ()
        body = pos + RECORD_HEADER
        have = min(rlen, n - body)      # bytes of this record's body present
        taken = 0                       # of those, already moved into payload
        while want <= rlen - taken:     # the target ends inside this record
            if want > have - taken:
                end = body + taken + want
                return _need(end, end, max_len)
            payload += data[body + taken:body + taken + want]
            taken += want
            if header_done:
                return _judge_hello(bytes(payload[HANDSHAKE_HEADER:]))
            if payload[0] != HANDSHAKE_CLIENT_HELLO:
                return SNI_MALFORMED, 0, None, ()
            header_done = True
            target = HANDSHAKE_HEADER + int.from_bytes(payload[1:4], "big")
            want = target - len(payload)
        # The target lies past this record: all of its body is payload.
        if have < rlen:
            end = body + rlen + RECORD_HEADER
            return _need(end, end + want - (rlen - taken), max_len)
        payload += data[body + taken:body + rlen]
        pos = body + rlen


def _need(needed: int, fewest_total: int, max_len: int) -> Result:
    """NEED_MORE at `needed`, unless even the shortest completion passes the cap."""
    if fewest_total > max_len:
        return SNI_TOO_LARGE, 0, None, ()
    return SNI_NEED_MORE, needed, None, ()


class _Malformed(Exception):
    """A length or field of the hello that does not fit."""


class _Reader:
    """Bounds-checked big-endian reads over one byte string."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, k: int) -> bytes:
        if k > self.left():
            raise _Malformed
        chunk = self.data[self.pos:self.pos + k]
        self.pos += k
        return chunk

    def uint(self, k: int) -> int:
        return int.from_bytes(self.take(k), "big")

    def vector(self, k: int) -> _Reader:
        """A `k`-byte length, then that many bytes, as a reader of their own."""
        return _Reader(self.take(self.uint(k)))


def _judge_hello(body: bytes) -> Result:
    try:
        server_name, alpn = _read_hello(_Reader(body))
    except _Malformed:
        return SNI_MALFORMED, 0, None, ()
    return SNI_FOUND, 0, server_name, alpn


def _read_hello(r: _Reader) -> tuple[str | None, tuple[str, ...]]:
    if r.uint(1) != 3:                          # legacy_version major
        raise _Malformed
    r.take(1 + 32)                              # legacy_version minor, random
    if len(r.vector(1).data) > SESSION_ID_MAX:  # legacy_session_id
        raise _Malformed
    suites = r.vector(2)
    if len(suites.data) == 0 or len(suites.data) % 2:
        raise _Malformed
    if len(r.vector(1).data) == 0:              # legacy_compression_methods
        raise _Malformed
    server_name, alpn = None, ()
    if r.left() == 0:                           # no extensions block at all
        return server_name, alpn
    exts = r.vector(2)
    if r.left():                                # bytes after the extensions block
        raise _Malformed
    seen = set()
    while exts.left():
        etype = exts.uint(2)
        edata = exts.vector(2)
        if etype in (EXT_SERVER_NAME, EXT_ALPN):
            if etype in seen:
                raise _Malformed
            seen.add(etype)
        if etype == EXT_SERVER_NAME:
            server_name = _read_server_name(edata)
        elif etype == EXT_ALPN:
            alpn = _read_alpn(edata)
    return server_name, alpn


def _read_server_name(edata: _Reader) -> str | None:
    names = edata.vector(2)
    if edata.left() or not names.left():
        raise _Malformed
    host = None
    while names.left():
        name_type = names.uint(1)
        name = names.vector(2).data
        if name_type != NAME_TYPE_HOST_NAME:
            continue
        if host is not None or not name or any(not 0x21 <= b <= 0x7E for b in name):
            raise _Malformed
        host = name.lower().decode("ascii")
        if host.endswith("."):
            host = host[:-1]
        if not host:
            raise _Malformed
    return host


def _read_alpn(edata: _Reader) -> tuple[str, ...]:
    protocols = edata.vector(2)
    if edata.left() or protocols.left() < 2:
        raise _Malformed
    names = []
    while protocols.left():
        name = protocols.vector(1).data
        if not name:
            raise _Malformed
        names.append(name.decode("latin-1"))
    return tuple(names)
