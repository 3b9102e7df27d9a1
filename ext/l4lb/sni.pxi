# sni: a sans-IO scan of the TLS ClientHello at the start of a TCP stream, for routing by
# server name without terminating TLS (HAProxy req.ssl_sni, nginx ssl_preread).
# Reference twin and full contract: l4lb/reference/sni.py (the executable spec; its
# docstring lists every check). Sources: RFC 8446 §5.1 (records; a handshake message may
# span records), §4.1.2 (ClientHello), RFC 6066 §3 (server_name), RFC 7301 §3.1 (ALPN).
#
# The caller peeks (MSG_PEEK) and calls once per peek with every byte seen so far; nothing
# is kept between calls, so a hello cut by TCP or spread over records is simply scanned
# again from offset 0 with more bytes. The answer can only change when the first byte, a
# whole record header, the whole handshake header or the whole hello arrives; NEED_MORE
# reports the next of those offsets (`needed`, fit for SO_RCVLOWAT). TOO_LARGE is decided
# as soon as the handshake length shows the hello cannot end within the cap; bytes past
# the cap are never read, and with the cap full the answer is never NEED_MORE.
#
# Cost: one pass over the record headers, then one over the hello's fields. A hello in one
# record (the usual case: a record holds 2^14 bytes, several times a post-quantum hello)
# is read in place; one that spans records is gathered into a scratch buffer once
# (malloc'd, at most the cap) that sni_scan_release frees. No Python object is made until
# sni_scan_result, and that only for FOUND: one str for the name, one per ALPN protocol.
# About 0.2 us per hello here (loadtests/bench_sni_parse.py).
#
# Use from the relay: peek up to the cap into a buffer, then
#     status = sni_scan_hello(buf, peeked, cap, &scan)
#     NEED_MORE: wait for readability (or SO_RCVLOWAT = scan.needed) and peek again;
#     FOUND: route by sni_scan_result(status, &scan); anything else: the default route;
#     -1: out of memory, treat as MemoryError;
#     and sni_scan_release(&scan) in every case.
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.unicode cimport PyUnicode_New, PyUnicode_1BYTE_DATA, PyUnicode_DecodeLatin1
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

cdef enum:
    SNI_RECORD_HEADER = 5             # type(1), version(2), length(2)
    SNI_RECORD_HANDSHAKE = 22
    SNI_RECORD_MAX = 16384 + 2048     # largest record body any TLS version allows (RFC 8446 §5.2)
    SNI_HANDSHAKE_HEADER = 4          # msg_type(1), length(3)
    SNI_CLIENT_HELLO = 1
    SNI_EXT_SERVER_NAME = 0
    SNI_EXT_ALPN = 16
    SNI_SESSION_ID_MAX = 32
    SNI_ASCII_DOT = 0x2e
    SNI_ASCII_UPPER_A = 0x41
    SNI_ASCII_UPPER_Z = 0x5a


cdef inline Py_ssize_t _sni_be16(const unsigned char* p) noexcept nogil:
    return (<Py_ssize_t>p[0] << 8) | p[1]


cdef inline int _sni_need(sni_scan* scan, Py_ssize_t needed, Py_ssize_t fewest_total,
                          Py_ssize_t cap) noexcept nogil:
    """NEED_MORE at `needed`, unless even the shortest completion passes the cap."""
    if fewest_total > cap:
        return SNI_TOO_LARGE
    scan.needed = needed
    return SNI_NEED_MORE


cdef int sni_scan_hello(const unsigned char* data, Py_ssize_t n, Py_ssize_t cap,
                        sni_scan* scan) noexcept nogil:
    """Scan the first `n` bytes of a stream (only the first `cap` of them are read).

    Returns an SNI_* status and fills `scan` (see sni.pxd); -1 when the scratch buffer
    for a hello spread over records cannot be allocated. Call sni_scan_release(scan)
    afterwards whatever the answer. `cap` must be 1..SNI_MAX_CLIENT_HELLO_LIMIT.
    """
    cdef unsigned char header[SNI_HANDSHAKE_HEADER]  # the handshake header, gathered
    cdef Py_ssize_t got = 0             # payload bytes gathered so far
    cdef Py_ssize_t target = SNI_HANDSHAKE_HEADER  # payload wanted: the header, then the hello
    cdef bint header_done = False
    cdef Py_ssize_t pieces = 0          # earlier records that hold part of the hello's body
    cdef Py_ssize_t pos = 0             # stream offset of the current record's header
    cdef Py_ssize_t want, body, rlen, have, taken, k
    scan.needed = 0
    scan.hello = NULL
    scan.hello_len = 0
    scan.scratch = NULL
    scan.name_off = scan.name_len = scan.alpn_off = scan.alpn_len = 0
    if n > cap:
        n = cap
    if n >= 1 and data[0] != SNI_RECORD_HANDSHAKE:
        return SNI_NOT_TLS
    if n == 0:
        return _sni_need(scan, 1, SNI_RECORD_HEADER + SNI_HANDSHAKE_HEADER, cap)
    while True:
        want = target - got
        if pos + SNI_RECORD_HEADER > n:
            return _sni_need(scan, pos + SNI_RECORD_HEADER, pos + SNI_RECORD_HEADER + want, cap)
        if not (data[pos + 1] == 3 and data[pos + 2] <= 4):
            return SNI_NOT_TLS if pos == 0 else SNI_MALFORMED
        rlen = _sni_be16(data + pos + 3)
        if data[pos] != SNI_RECORD_HANDSHAKE or rlen < 1 or rlen > SNI_RECORD_MAX:
            return SNI_MALFORMED
        body = pos + SNI_RECORD_HEADER
        have = rlen if rlen <= n - body else n - body
        taken = 0
        while want <= rlen - taken:     # the target ends inside this record
            if want > have - taken:
                return _sni_need(scan, body + taken + want, body + taken + want, cap)
            if header_done:
                scan.hello_len = target - SNI_HANDSHAKE_HEADER
                if pieces == 0:
                    scan.hello = data + body + taken
                elif _sni_gather(data, scan) < 0:
                    return -1
                return _sni_judge_hello(scan)
            for k in range(want):       # want <= 4: the header's missing bytes
                header[got + k] = data[body + taken + k]
            got += want
            taken += want
            if header[0] != SNI_CLIENT_HELLO:
                return SNI_MALFORMED
            header_done = True
            target = SNI_HANDSHAKE_HEADER + ((<Py_ssize_t>header[1] << 16)
                                             | (<Py_ssize_t>header[2] << 8) | header[3])
            want = target - got
        # The target lies past this record: all of the rest of its body is payload.
        if have < rlen:
            return _sni_need(scan, body + rlen + SNI_RECORD_HEADER,
                             body + rlen + SNI_RECORD_HEADER + want - (rlen - taken), cap)
        if header_done:
            pieces += 1
        else:                           # fewer than `want` <= 4 bytes: part of the header
            for k in range(rlen - taken):
                header[got + k] = data[body + taken + k]
        got += rlen - taken
        pos = body + rlen


cdef int _sni_gather(const unsigned char* data, sni_scan* scan) noexcept nogil:
    """Copy the hello's body out of the records that hold it (already validated)."""
    cdef Py_ssize_t pos = 0, off = 0, done = 0, rlen, lo, hi
    cdef Py_ssize_t end = SNI_HANDSHAKE_HEADER + scan.hello_len   # payload offset past the hello
    scan.scratch = <unsigned char*>malloc(scan.hello_len)
    if scan.scratch == NULL:
        return -1
    while done < scan.hello_len:
        rlen = _sni_be16(data + pos + 3)
        lo = off if off > SNI_HANDSHAKE_HEADER else SNI_HANDSHAKE_HEADER
        hi = off + rlen if off + rlen < end else end
        if hi > lo:
            memcpy(scan.scratch + lo - SNI_HANDSHAKE_HEADER,
                   data + pos + SNI_RECORD_HEADER + lo - off, hi - lo)
            done += hi - lo
        off += rlen
        pos += SNI_RECORD_HEADER + rlen
    scan.hello = scan.scratch
    return 0


cdef void sni_scan_release(sni_scan* scan) noexcept nogil:
    """Free what sni_scan_hello allocated; the scan's spans are invalid afterwards."""
    free(scan.scratch)
    scan.scratch = NULL
    scan.hello = NULL


cdef int _sni_judge_hello(sni_scan* scan) noexcept nogil:
    """The hello's fields (RFC 8446 §4.1.2): FOUND with the name and ALPN spans, or MALFORMED."""
    cdef const unsigned char* h = scan.hello
    cdef Py_ssize_t n = scan.hello_len
    cdef Py_ssize_t p, k, etype, elen
    cdef bint seen_name = False, seen_alpn = False
    # legacy_version (major 3), random, then the session id's length byte.
    if n < 35 or h[0] != 3:
        return SNI_MALFORMED
    k = h[34]
    p = 35
    if k > SNI_SESSION_ID_MAX or p + k > n:
        return SNI_MALFORMED
    p += k
    if p + 2 > n:
        return SNI_MALFORMED
    k = _sni_be16(h + p)                # cipher_suites: 2 bytes each, at least one
    p += 2
    if k == 0 or k & 1 or p + k > n:
        return SNI_MALFORMED
    p += k
    if p + 1 > n:
        return SNI_MALFORMED
    k = h[p]                            # legacy_compression_methods: at least one
    p += 1
    if k == 0 or p + k > n:
        return SNI_MALFORMED
    p += k
    if p == n:                          # no extensions block (a TLS 1.0-era hello)
        return SNI_FOUND
    if p + 2 > n or p + 2 + _sni_be16(h + p) != n:
        return SNI_MALFORMED
    p += 2
    while p < n:
        if p + 4 > n:
            return SNI_MALFORMED
        etype = _sni_be16(h + p)
        elen = _sni_be16(h + p + 2)
        p += 4
        if p + elen > n:
            return SNI_MALFORMED
        if etype == SNI_EXT_SERVER_NAME:
            if seen_name or _sni_read_server_name(scan, p, elen) < 0:
                return SNI_MALFORMED
            seen_name = True
        elif etype == SNI_EXT_ALPN:
            if seen_alpn or _sni_read_alpn(scan, p, elen) < 0:
                return SNI_MALFORMED
            seen_alpn = True
        p += elen
    return SNI_FOUND


cdef int _sni_read_server_name(sni_scan* scan, Py_ssize_t p, Py_ssize_t elen) noexcept nogil:
    """ServerNameList (RFC 6066 §3): at most one host_name, of printable ASCII; -1 if malformed."""
    cdef const unsigned char* h = scan.hello
    cdef Py_ssize_t end = p + elen, k, i, name_type
    cdef bint seen_host = False
    if elen < 2 or _sni_be16(h + p) + 2 != elen or elen == 2:
        return -1
    p += 2
    while p < end:
        if p + 3 > end:
            return -1
        name_type = h[p]
        k = _sni_be16(h + p + 1)
        p += 3
        if p + k > end:
            return -1
        if name_type == 0:              # host_name; other types are skipped
            if seen_host or k == 0:
                return -1
            for i in range(k):
                if h[p + i] < 0x21 or h[p + i] > 0x7e:
                    return -1
            seen_host = True
            scan.name_off = p
            scan.name_len = k - 1 if h[p + k - 1] == SNI_ASCII_DOT else k
            if scan.name_len == 0:
                return -1
        p += k
    return 0


cdef int _sni_read_alpn(sni_scan* scan, Py_ssize_t p, Py_ssize_t elen) noexcept nogil:
    """ProtocolNameList (RFC 7301 §3.1): at least 2 bytes of non-empty names; -1 if malformed."""
    cdef const unsigned char* h = scan.hello
    cdef Py_ssize_t end = p + elen, k
    if elen < 4 or _sni_be16(h + p) + 2 != elen:
        return -1
    p += 2
    scan.alpn_off = p
    scan.alpn_len = elen - 2
    while p < end:
        k = h[p]
        p += 1
        if k == 0 or p + k > end:
            return -1
        p += k
    return 0


cdef tuple sni_scan_result(int status, const sni_scan* scan):
    """(status, needed, server_name, alpn) as parse_client_hello returns it."""
    cdef str name = None
    cdef unsigned char* chars
    cdef unsigned char c
    cdef Py_ssize_t i, k, p, end
    cdef list protocols
    if status != SNI_FOUND:
        return (status, scan.needed, None, ())
    if scan.name_len:
        name = PyUnicode_New(scan.name_len, 127)
        chars = <unsigned char*>PyUnicode_1BYTE_DATA(name)
        for i in range(scan.name_len):
            c = scan.hello[scan.name_off + i]
            chars[i] = c + 32 if SNI_ASCII_UPPER_A <= c <= SNI_ASCII_UPPER_Z else c
    if not scan.alpn_len:
        return (status, 0, name, ())
    protocols = []
    p = scan.alpn_off
    end = p + scan.alpn_len
    while p < end:
        k = scan.hello[p]
        protocols.append(PyUnicode_DecodeLatin1(<char*>scan.hello + p + 1, k, NULL))
        p += 1 + k
    return (status, 0, name, tuple(protocols))


def parse_client_hello(data, Py_ssize_t max_len=SNI_MAX_CLIENT_HELLO):
    """Judge the bytes at the start of a TCP stream: (status, needed, server_name, alpn).

    `data` is any contiguous buffer (bytes, bytearray, memoryview); only its first
    `max_len` bytes are read. Contract: l4lb/reference/sni.py. Raises ValueError for a
    `max_len` outside 1..65536 and MemoryError when a hello spread over records cannot
    be gathered.
    """
    cdef Py_buffer view
    cdef sni_scan scan
    cdef int status
    if max_len < 1 or max_len > SNI_MAX_CLIENT_HELLO_LIMIT:
        raise ValueError(f"max_len must be 1..{SNI_MAX_CLIENT_HELLO_LIMIT}, not {max_len}")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        status = sni_scan_hello(<const unsigned char*>view.buf, view.len, max_len, &scan)
        try:
            if status < 0:
                raise MemoryError("no memory to gather a ClientHello spread over records")
            return sni_scan_result(status, &scan)
        finally:
            sni_scan_release(&scan)
    finally:
        PyBuffer_Release(&view)


def bench_sni_scan(data, Py_ssize_t max_len, Py_ssize_t count):
    """loadtests/bench_sni_parse.py only: sni_scan_hello + sni_scan_result `count` times
    over `data` in a C loop, what the relay pays per peek without the Python call."""
    cdef Py_buffer view
    cdef sni_scan scan
    cdef int status = 0
    cdef Py_ssize_t i
    if max_len < 1 or max_len > SNI_MAX_CLIENT_HELLO_LIMIT:
        raise ValueError(f"max_len must be 1..{SNI_MAX_CLIENT_HELLO_LIMIT}, not {max_len}")
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        for i in range(count):
            status = sni_scan_hello(<const unsigned char*>view.buf, view.len, max_len, &scan)
            if status >= 0:
                sni_scan_result(status, &scan)
            sni_scan_release(&scan)
    finally:
        PyBuffer_Release(&view)
    return status
