# The relay's runtime objects (relay.pxi). The control plane (l4lb/model.py) owns one
# Target per backend, one PoolRuntime per pool and one ListenerRuntime per listener, and
# changes them in place; the relay only reads them and bumps their counters.
cimport cython
from libc.stdint cimport int64_t, uint64_t

cdef enum:
    RELAY_HEADER = 0        # reading a PROXY protocol header from the client
    RELAY_CONNECTING = 1    # backend connect in flight; client bytes are held in `pending`
    RELAY_QUEUED = 2        # every eligible backend is at max_connections; waiting for a slot
    RELAY_OPEN = 3          # both sides connected; bytes flow
    RELAY_CLOSED = 4        # finished: counters settled, unlinked from the hub

cpdef enum:
    HASH_KEY_SRC_IP = 0
    HASH_KEY_SRC_IP_PORT = 1


cdef class Target:
    cdef readonly str pool            # pool name (for logs and show conns)
    cdef readonly str name            # backend name
    cdef public object host           # where to connect: IP literal or hostname
    cdef public object port
    cdef public int slot              # the backend's slot in its pool's Algorithm
    cdef public int64_t active        # relays assigned to this backend and not yet closed
    cdef public int64_t total         # connections that reached the backend
    cdef public int64_t failed        # connect failures and connect timeouts
    cdef public int64_t bytes_in      # client -> backend bytes
    cdef public int64_t bytes_out     # backend -> client bytes
    cdef public object on_connect_failed   # callable(Target, reason) or None: passive health
    cdef public object on_idle        # callable(Target) or None: called when active drops to 0


cdef class PoolRuntime:
    cdef readonly str name
    cdef public Algorithm algo        # the pool's selection algorithm
    cdef public list targets          # slot -> Target (None once removed)
    cdef public int hash_key          # HASH_KEY_*: what the routing key hashes
    cdef public bint needs_key        # the algorithm reads the routing key (hash)
    cdef public object queue          # collections.deque of Relays waiting for a slot


cdef class ListenerRuntime:
    cdef readonly str name
    cdef public Hub hub
    cdef public PoolRuntime pool      # the active pool, when there is no split
    cdef public list split_pools      # PoolRuntime per split side, or None
    cdef public list split_bounds     # cumulative percentages matching split_pools
    cdef public bint sticky_split     # a client IP always lands on the same side
    cdef public double connect_timeout
    cdef public double idle_timeout
    cdef public double queue_timeout  # seconds a client of this listener may wait queued
    cdef public int retries           # other backends tried after a failed connect
    cdef public int64_t max_connections
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
    cdef char* rbuf                   # the loop's one shared read buffer (see relay.pxi)
    cdef Py_ssize_t rbuf_size
    cdef object rview                 # memoryview over rbuf handed to uvloop by get_buffer
    cdef public object loop
    cdef public double now            # loop.time() as of the last sweep: coarse clock for stamps
    cdef public int64_t active        # relays not yet closed, all listeners
    cdef public int64_t total         # relays ever admitted
    cdef public int64_t max_connections
    cdef public int64_t pending_limit # bytes held per client while its backend connects
    cdef public object access_log     # callable(Relay, reason) or None
    cdef public object on_overload    # callable() when a connect finds no free descriptor
    cdef public object splice_poller  # the SplicePoller of splice listeners, made on first use
    cdef Relay head                   # intrusive doubly linked list of live relays
    cdef public uint64_t next_id
    cdef uint64_t rng                 # splitmix64 state for non-sticky splits
    cdef void link(self, Relay r)
    cdef void unlink(self, Relay r)


cdef class BackendSide:
    cdef Relay relay                  # the pair this protocol belongs to
    cdef double started               # loop.time() when the connect began


cdef class Relay


@cython.final
cdef class Connector:
    # Drives one loop.create_connection coroutine without a Task (relay.pxi).
    cdef object coro                  # the create_connection coroutine
    cdef Relay relay                  # the relay it connects for; None once done
    cdef BackendSide bside            # the protocol the new transport gets
    cdef object fut                   # the future the coroutine waits on
    cdef object wakeup                # self._wakeup, bound once
    cdef bint done
    cdef void start(self, Relay relay, BackendSide bside, object coro)
    cdef void step(self, object exc)
    cdef Relay finish(self)


cdef class Relay:
    # One client connection and its backend connection: the client-side protocol.
    cdef readonly uint64_t id
    cdef Hub hub
    cdef readonly ListenerRuntime listener
    cdef readonly PoolRuntime pool
    cdef readonly Target target       # None until a backend is picked
    cdef int slot
    cdef int state                    # RELAY_*
    cdef object ctransport            # client transport
    cdef object btransport            # backend transport, once connected
    cdef object cwrite                # ctransport.write, bound once
    cdef object bwrite                # btransport.write, bound once
    cdef BackendSide bside
    cdef object connect_task
    cdef bytearray pending            # client bytes held until the backend is up (bounded)
    cdef bint client_eof              # EOF read from the client
    cdef bint backend_eof             # EOF read from the backend
    cdef bint client_paused           # client reading paused (backpressure or pending full)
    cdef bint backend_paused
    cdef readonly str client_host
    cdef readonly object client_port
    cdef uint64_t key                 # routing key (hash64 of the client address)
    cdef int avoid[ALGO_MAX_AVOID]    # slots that failed a connect for this client
    cdef int navoid
    cdef readonly int64_t bytes_in    # client -> backend
    cdef readonly int64_t bytes_out   # backend -> client
    cdef readonly double started      # loop.time() at accept
    cdef double last_active           # hub.now at the last byte either way
    cdef double deadline              # connect / queue / header deadline, by state
    cdef public str close_reason
    cdef Relay prev
    cdef Relay next
    cdef public object local_addr     # (host, port) the client connected to, when needed
                                      # (set from an accepted PROXY header's destination)
    cdef object gate                  # the gate that admitted this relay: gate.release(self)
                                      # on close; None when the listener has no gate

    cdef void admit(self)
    cdef void reject(self, str reason)
    cdef void read_proxy_header(self)
    cdef void release_target(self)
    cdef void refuse_overloaded(self)
    cdef void start_connect(self)
    cdef void open_backend_connection(self, Target t)
    cdef void connect_failed(self, str reason)
    cdef void backend_connected(self, object transport)
    cdef void finish(self, str reason)
    cdef void close_both(self, str reason, bint abort)
    cdef void sweep_one(self, double now)
    cdef PoolRuntime choose_pool(self)
