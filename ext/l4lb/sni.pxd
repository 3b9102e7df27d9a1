# The TLS ClientHello scan (sni.pxi): its answers and what it reports beside them.

cpdef enum:
    SNI_NEED_MORE = 0         # consistent so far; the hello has not all arrived
    SNI_FOUND = 1             # a whole, well-formed hello: name and ALPN spans are set
    SNI_NOT_TLS = 2           # not a TLS handshake (first byte, first record's version)
    SNI_TOO_LARGE = 3         # the hello cannot end within the cap
    SNI_MALFORMED = 4         # TLS, but a length or field that does not fit

cpdef enum:
    SNI_MAX_CLIENT_HELLO = 16384          # default cap (the listener's max_client_hello)
    SNI_MAX_CLIENT_HELLO_LIMIT = 65536    # largest cap accepted

ctypedef struct sni_scan:
    Py_ssize_t needed                 # SNI_NEED_MORE: stream length at which the answer can next change
    const unsigned char* hello        # SNI_FOUND: the hello's body (after its 4-byte header)
    Py_ssize_t hello_len              # its length
    unsigned char* scratch            # the body gathered from several records (malloc'd), or NULL
    Py_ssize_t name_off               # host_name's offset in hello
    Py_ssize_t name_len               # its length, one trailing dot dropped; 0: no SNI
    Py_ssize_t alpn_off               # ALPN ProtocolNameList contents' offset in hello
    Py_ssize_t alpn_len               # their length (>= 2 when present); 0: no ALPN
