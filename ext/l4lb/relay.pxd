# The relay (relay.pxi): one client connection and its backend connection.
cimport cython
from libc.stdint cimport int64_t, uint32_t, uint64_t
from l4lb.includes.system cimport sockaddr_storage

# A relay's states. Every write goes through relay_set_state (relay.pxi), which checks
# it against RELAY_NEXT under L4LB_DEBUG. The diagram:
#
#   NEW ──> [HEADER] ──> [INSPECT] ──> CONNECTING <──┬──> QUEUED
#   (accepted) (accept_proxy) (sni)          │         └─── (a slot freed)
#                                            v
#                                          OPEN
#   A [state] is skipped when the listener does not need it (NEW -> INSPECT,
#   NEW -> CONNECTING and HEADER -> CONNECTING are moves too).
#   and every state but CLOSED ──> CLOSED (rejected, refused, reset, timed out, done)
#
# A retry after a failed connect stays in CONNECTING (no write).
cdef enum:
    RELAY_NEW = 0           # accepted, not yet admitted (limits, gate, pool)
    RELAY_HEADER = 1        # reading a PROXY protocol header from the client
    RELAY_CONNECTING = 2    # picking a backend, resolving its name or connecting to it
    RELAY_QUEUED = 3        # every eligible backend is at max_connections; waiting for a slot
    RELAY_OPEN = 4          # both sides connected; bytes flow
    RELAY_CLOSED = 5        # finished: counters settled, unlinked from the hub
    RELAY_INSPECT = 6       # an sni listener: peeking at the client's ClientHello
    RELAY_STATES = 7        # how many states there are

# RELAY_NEXT[state]: the bit set of the states it may move to (1 << RELAY_X each).
cdef enum:
    RELAY_NEXT_NEW = ((1 << RELAY_HEADER) | (1 << RELAY_INSPECT) | (1 << RELAY_CONNECTING)
                      | (1 << RELAY_CLOSED))
    RELAY_NEXT_HEADER = (1 << RELAY_INSPECT) | (1 << RELAY_CONNECTING) | (1 << RELAY_CLOSED)
    RELAY_NEXT_CONNECTING = (1 << RELAY_QUEUED) | (1 << RELAY_OPEN) | (1 << RELAY_CLOSED)
    RELAY_NEXT_QUEUED = (1 << RELAY_CONNECTING) | (1 << RELAY_CLOSED)
    RELAY_NEXT_OPEN = 1 << RELAY_CLOSED
    RELAY_NEXT_CLOSED = 0
    RELAY_NEXT_INSPECT = (1 << RELAY_CONNECTING) | (1 << RELAY_CLOSED)

# Where a relay is in measuring its response time (Relay.resp_phase; relay.pxi, "Response
# time"). Moves only forward: AWAIT_REQUEST -> AWAIT_REPLY -> MEASURED, or
# AWAIT_REQUEST -> NONE when the backend speaks first.
cdef enum:
    RESP_AWAIT_REQUEST = 0    # no byte either way yet
    RESP_AWAIT_REPLY = 1      # the client's first bytes went to the backend at request_at
    RESP_MEASURED = 2         # the backend's first bytes after them came: response_time set
    RESP_NONE = 3             # the backend spoke first (a banner): no response time


@cython.final
cdef class Relay:
    # One client and its backend: raw nonblocking sockets registered in the Hub's
    # Poller, bytes moved by the pump (one splice_dir per direction).
    cdef readonly uint64_t id         # the hub's number for it (show conns, kill, logs)
    cdef Hub hub                      # the loop's data-path state
    cdef Poller poller                # the epoll both sockets are registered in
    cdef readonly ListenerRuntime listener  # the listener that accepted it
    cdef readonly PoolRuntime pool    # the pool chosen at admission; None before
    cdef readonly Target target       # the backend it holds a slot of; None when none
    cdef int state                    # RELAY_*; written only by relay_set_state
    cdef readonly str client_host     # the client's IP (a PROXY header's source, if any)
    cdef readonly object client_port  # the client's port
    cdef uint64_t key                 # routing key (hash64 of the client address)
    cdef int avoid[ALGO_MAX_AVOID]    # slots that failed a connect for this client
    cdef int navoid                   # entries used in avoid
    cdef str last_failure             # the reason of the last failed connect, or None
    cdef readonly int64_t bytes_in    # client -> backend
    cdef readonly int64_t bytes_out   # backend -> client
    cdef readonly double started      # _now() at accept
    cdef double last_active           # hub.now at the last byte either way
    cdef double deadline              # connect / queue / header / inspect deadline, by state
    cdef double connect_started       # _now() when the connect to target began
    cdef int resp_phase               # RESP_*: the response-time measurement
    cdef double request_at            # _now() before the pump that passed the client's
                                      # first bytes on
    cdef double resp_time             # seconds from request_at to the backend's first bytes
                                      # back (RESP_MEASURED only)
    cdef public str close_reason      # why it closed (the access log's reason); None while live
    cdef Relay prev                   # the previous live relay in the hub's list
    cdef Relay next                   # the next live relay in the hub's list
    cdef readonly str sni             # the ClientHello's server name (sni listeners), or None
    cdef readonly tuple alpn          # its ALPN protocols, or None (no hello read)
    cdef readonly str route           # the sni pattern that routed it, or None (default route)
    cdef public object local_addr     # (host, port) the client connected to, when needed
                                      # (set from an accepted PROXY header's destination)
    cdef object gate                  # the gate that admitted this relay: gate.release(self)
                                      # on close; None when the listener has no gate
    cdef object resolving             # the getaddrinfo future of a hostname backend, or None
    cdef list addresses               # a hostname's (family, host, port) still to try, or None
    cdef int cfd                      # client socket (owned), -1 once closed
    cdef int bfd                      # backend socket (owned), -1 until connecting / once closed
    cdef bint c_readable              # edge seen and not yet read to EAGAIN
    cdef bint c_writable              # no EAGAIN on write since the last EPOLLOUT edge
    cdef bint b_readable              # c_readable, for the backend socket
    cdef bint b_writable              # c_writable, for the backend socket
    cdef bint deferred                # queued in poller.again
    cdef splice_dir up                # client -> backend
    cdef splice_dir down              # backend -> client

    cdef void accepted(self, ListenerRuntime lst, Poller poller, int fd,
                       sockaddr_storage* ss)
    cdef void reject(self, str reason)
    cdef void admit(self)
    cdef PoolRuntime choose_pool(self, RouteRuntime route)
    cdef void route_client(self, RouteRuntime route)
    cdef void inspect_hello(self, bint client_eof)
    cdef void end_inspection(self, int outcome, object route)
    cdef void start_connect(self)
    cdef void open_backend_connection(self, Target t)
    cdef void connect_address(self, int family, object host, int port)
    cdef void connect_next_or_fail(self, str reason)
    cdef void connect_failed(self, str reason)
    cdef void refuse_overloaded(self)
    cdef void release_target(self)
    cdef void check_connect(self, uint32_t ev)
    cdef void backend_connected(self, uint32_t ev)
    cdef void read_proxy_header(self, bint client_eof)
    cdef void on_event(self, bint backend, uint32_t ev)
    cdef void pump_both(self)
    cdef void note_first_bytes(self, int64_t nin, int64_t nout)
    cdef void close_both(self, str reason, bint abort)
    cdef void finish(self, str reason)
    cdef void close_fds(self, bint reset)
    cdef void sweep_one(self, double now)
