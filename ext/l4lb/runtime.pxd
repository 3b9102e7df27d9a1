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
    # The counters live in a record (shared.pxd backend_glob + rows): a private one of
    # one row until attach() points them into a SharedTable. Python reads sum the rows.
    cdef SharedTable table            # the table holding the record; None: private
    cdef void* own                    # the private record (malloc), NULL once attached
    cdef backend_glob* g              # the record's global part (active: atomic)
    cdef backend_row* rows            # its first row
    cdef backend_row* r               # the row this process writes
    cdef int nrows                    # rows summed by readers (1 private; rows + 1 shared)
    cdef public object on_connect_failed   # callable(Target, reason) or None: passive health
    cdef public object on_idle        # callable(Target) or None: called when active drops to 0


cdef class PoolRuntime:
    cdef readonly str name            # pool name
    cdef public Algorithm algo        # the pool's selection algorithm
    cdef public list targets          # slot -> Target (None once removed)
    cdef public int hash_key          # HASH_KEY_*: what the routing key hashes
    cdef public bint needs_key        # the algorithm reads the routing key (hash)
    cdef public object queue          # collections.deque of Relays waiting for a slot
    cdef SharedTable table            # counters' record (retried, queue_timeouts, queued)
    cdef void* own                    # the private record (malloc), NULL once attached
    cdef pool_row* rows               # its first row (a private one before attach)
    cdef pool_row* r                  # the row this process writes
    cdef int nrows                    # rows summed by readers

    cdef int64_t row_sum(self, Py_ssize_t field) noexcept


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
    cdef public bint sticky_split     # a client IP always lands on the same side
    cdef public double connect_timeout  # seconds for one backend connect (all its addresses)
    cdef public double idle_timeout   # seconds without a byte either way before a close
    cdef public double queue_timeout  # seconds a client of this listener may wait queued
    cdef public int retries           # other backends tried after a failed connect
    cdef public int64_t max_connections  # relays of this listener open at once; 0 = unlimited
    cdef SharedTable table            # counters' record (active, accepted, rejected,
                                      # inspected by outcome SNI_*/INSPECT_*); None: private
    cdef void* own                    # the private record (malloc), NULL once attached
    cdef listener_glob* g             # its global part (active: atomic)
    cdef listener_row* rows           # its first row
    cdef listener_row* r              # the row this process writes
    cdef int nrows                    # rows summed by readers
    cdef object rejected_other        # dict reason -> count for words without a slot
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
    cdef SharedTable table            # counters' record (active, total); None: private
    cdef void* own                    # the private record (malloc), NULL once attached
    cdef hub_glob* g                  # its global part (active: atomic)
    cdef hub_row* rows                # its first row
    cdef hub_row* r                   # the row this process writes
    cdef int nrows                    # rows summed by readers
    cdef public bint follow           # a worker: resync pools from the table before picks
    cdef int64_t seen_epoch           # the table epoch the pools were last resynced at
    cdef list pools                   # PoolRuntimes resynced on a new epoch (register_pool)
    cdef public int64_t max_connections  # relays open at once, all listeners; 0 = unlimited
    cdef public object access_log     # callable(Relay, reason) or None
    cdef public object on_overload    # callable() when a connect finds no free descriptor
    cdef public object splice_poller  # the Poller of this hub's relays, made on first use
    cdef Relay head                   # intrusive doubly linked list of live relays
    cdef public uint64_t next_id      # the id the next admitted relay gets
    cdef uint64_t rng                 # splitmix64 state for non-sticky splits
    cdef void link(self, Relay r) noexcept
    cdef void unlink(self, Relay r) noexcept
    cdef int follow_pool(self, PoolRuntime pool) except -1
