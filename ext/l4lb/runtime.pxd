# The relay's runtime objects (runtime.pxi). The control plane (l4lb/model.py) owns one
# Target per backend, one PoolRuntime per pool and one ListenerRuntime per listener, and
# changes them in place; the relay only reads them and bumps their counters.
from libc.stdint cimport int64_t, uint64_t

cpdef enum:
    HASH_KEY_SRC_IP = 0
    HASH_KEY_SRC_IP_PORT = 1


cdef class Relay
cdef class Poller


cdef class Target:
    cdef readonly str pool            # pool name (for logs and show conns)
    cdef readonly str name            # backend name
    cdef public object host           # where to connect: IP literal or hostname
    cdef public object port           # the backend's TCP port
    cdef public object resolved       # a hostname's last DNS answer, [(family, ip, port)] in
                                      # the order to try, or None; written by l4lb.resolver
    cdef public int slot              # the backend's slot in its pool's Algorithm
    cdef public int64_t active        # relays assigned to this backend and not yet closed
    cdef public int64_t total         # connections that reached the backend
    cdef public int64_t failed        # connect failures and connect timeouts
    cdef public int64_t bytes_in      # client -> backend bytes
    cdef public int64_t bytes_out     # backend -> client bytes
    cdef double resp_ewma             # response-time EWMA in seconds; -1 before the first
    cdef readonly int64_t responses   # connections that gave a response time (the relay's
                                      # only writer: target_observe_response)
    cdef public object on_connect_failed   # callable(Target, reason) or None: passive health
    cdef public object on_idle        # callable(Target) or None: called when active drops to 0


cdef class PoolRuntime:
    cdef readonly str name            # pool name
    cdef public Algorithm algo        # the pool's selection algorithm
    cdef public list targets          # slot -> Target (None once removed)
    cdef public int hash_key          # HASH_KEY_*: what the routing key hashes
    cdef public bint needs_key        # the algorithm reads the routing key (hash)
    cdef public object queue          # collections.deque of Relays waiting for a slot
    cdef public int64_t retried       # connects tried again on another backend after a failure
    cdef public int64_t queue_timeouts  # queued clients closed by their queue_timeout


# Outcomes of a ClientHello inspection, counted per listener: the parser's SNI_FOUND,
# SNI_NOT_TLS, SNI_TOO_LARGE, SNI_MALFORMED by their own numbers (sni.pxd), and these.
cdef enum:
    INSPECT_TIMEOUT = 5       # nothing decisive arrived within inspect_timeout
    INSPECT_SNI_FOUND = 6     # SNI_FOUND with a server name in it (also counted as found)
    INSPECT_OUTCOMES = 7      # size of ListenerRuntime.inspected


cdef class RouteRuntime:
    # Where new connections of one route go: a listener's default route, or one of its
    # sni patterns. Written by the control plane (switch, split, reload).
    cdef readonly str pattern         # the sni pattern (normalized), or None: the default
    cdef public PoolRuntime pool      # the active pool, when there is no split
    cdef public list split_pools      # PoolRuntime per split side, or None
    cdef public list split_bounds     # cumulative percentages matching split_pools


cdef class ListenerRuntime:
    cdef readonly str name            # listener name
    cdef public Hub hub               # the loop's data-path state
    cdef readonly RouteRuntime route  # the default route: no sni, no match, not TLS
    cdef public object sni_routes     # l4lb.sni.SniRoutes of RouteRuntime, or None: no inspection
    cdef public double inspect_timeout  # seconds to wait for a decisive ClientHello
    cdef public int max_client_hello  # bytes of the stream the ClientHello must fit in
    cdef int64_t inspected[INSPECT_OUTCOMES]  # inspections ended, by outcome (SNI_*, INSPECT_*)
    cdef public bint sticky_split     # a client IP always lands on the same side
    cdef public double connect_timeout  # seconds for one backend connect (all its addresses)
    cdef public double idle_timeout   # seconds without a byte either way before a close
    cdef public double queue_timeout  # seconds a client of this listener may wait queued
    cdef public int retries           # other backends tried after a failed connect
    cdef public int64_t max_connections  # relays of this listener open at once; 0 = unlimited
    cdef public int64_t active        # relays of this listener not yet closed
    cdef public int64_t accepted      # connections accepted and admitted
    cdef public object rejected       # dict reason -> count (rare path, Python is fine)
    cdef public object gate           # optional admission object (ACL, per-source limits)
    cdef public int send_proxy        # 0 off, 1 v1, 2 v2
    cdef public bint accept_proxy     # expect a PROXY header first
    cdef public double proxy_timeout  # seconds to receive that header
    cdef public int rcvbuf            # SO_RCVBUF for backend sockets; 0 = kernel autotuning
    cdef public int sndbuf            # SO_SNDBUF for backend sockets; 0 = kernel autotuning
    cdef public object header_hook    # callable(relay, bytes) -> (consumed, src) | None, for accept_proxy
    cdef public object proxy_encoder  # callable(version, src, dst) -> bytes, for send_proxy


cdef class Hub:
    cdef public object loop           # the event loop every relay of this hub runs on
    cdef public double now            # loop.time() as of the last sweep: coarse clock for stamps
    cdef public int64_t active        # relays not yet closed, all listeners
    cdef public int64_t total         # relays ever admitted
    cdef public int64_t max_connections  # relays open at once, all listeners; 0 = unlimited
    cdef public object access_log     # callable(Relay, reason) or None
    cdef public object on_overload    # callable() when a connect finds no free descriptor
    cdef public object splice_poller  # the Poller of this hub's relays, made on first use
    cdef Relay head                   # intrusive doubly linked list of live relays
    cdef public uint64_t next_id      # the id the next admitted relay gets
    cdef uint64_t rng                 # splitmix64 state for non-sticky splits
    cdef void link(self, Relay r) noexcept
    cdef void unlink(self, Relay r) noexcept
