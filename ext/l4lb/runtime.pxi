# The runtime: what the control plane configures and the relay reads.
#
# Theory of operation (DESIGN.md §8):
# - Target (one per backend), PoolRuntime (one per pool) and ListenerRuntime (one per
#   listener) are written by the control plane (l4lb/model.py) and read by the relay,
#   which only bumps their counters. A reload or an operator action changes them in
#   place; relays already open keep the objects they hold.
# - Hub is the per-loop state of the data path: global limits and counters, the intrusive
#   list of live relays (show conns, kill, shutdown) and the sweep, the only timer of the
#   data path: a few times a second it applies every connect, queue, header and idle
#   deadline from coarse stamps, so no connection ever owns a timer.
# - The clock, the routing key of a client address and the overload errno set live here
#   because every other part uses them.
import collections

from libc.errno cimport EMFILE, ENFILE, ENOBUFS, ENOMEM
from libc.string cimport memcpy
from libc.stdlib cimport calloc, free
from l4lb.includes.system cimport (timespec, clock_gettime, CLOCK_MONOTONIC, inet_pton,
                                   AF_INET, AF_INET6)

# Seconds between sweeps: the resolution of every timeout.
SWEEP_INTERVAL = 0.25
# Seconds accepting stays paused once the process ran out of descriptors: room for
# connections to close, while new clients wait in the kernel's backlog.
ACCEPT_PAUSE = 0.1

# Errors of socket(), connect(), accept4() and pipe2() that mean "this process or the
# system is out of descriptors or memory", not "the backend is broken" nor "that client
# is gone": a connect refuses the client and blames no backend (no passive health
# failure, no retry elsewhere that would fail the same way); an accept pauses the
# listener rather than spin on a socket that stays readable. One list, read by the C
# predicate below and exported to Python as OVERLOAD_ERRNOS.
cdef enum:
    OVERLOAD_ERRNO_COUNT = 4
cdef int OVERLOAD_ERRNO_LIST[OVERLOAD_ERRNO_COUNT]
OVERLOAD_ERRNO_LIST[:] = [EMFILE, ENFILE, ENOBUFS, ENOMEM]
OVERLOAD_ERRNOS = frozenset([OVERLOAD_ERRNO_LIST[i] for i in range(OVERLOAD_ERRNO_COUNT)])


cdef inline bint overload_errno(int e) noexcept nogil:
    """Whether errno `e` is one of OVERLOAD_ERRNOS (failure paths only)."""
    cdef int i
    for i in range(OVERLOAD_ERRNO_COUNT):
        if OVERLOAD_ERRNO_LIST[i] == e:
            return True
    return False


cdef inline double _now() noexcept nogil:
    # uvloop's loop.time() counts whole milliseconds (libuv's cached uv_now), too coarse
    # for loopback connect times; this is the same CLOCK_MONOTONIC, read precisely.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def monotonic():
    """The relay's clock (CLOCK_MONOTONIC, seconds): what Relay.started is measured on."""
    return _now()


cdef class Target:
    """One backend as the relay sees it: where to connect, and its C counters (a private
    record until attach() puts them in a SharedTable; reads sum the rows)."""

    def __cinit__(self, *args, **kwargs):
        cdef char* rec = <char*>calloc(1, SHARED_LINE + sizeof(backend_row))
        if rec == NULL:
            raise MemoryError()
        self.own = rec
        self.g = <backend_glob*>rec
        self.rows = self.r = <backend_row*>(rec + SHARED_LINE)
        self.r.resp_ewma = -1.0
        self.r.connect_ewma = -1.0
        self.nrows = 1

    def __dealloc__(self):
        free(self.own)

    def __init__(self, str pool, str name, host, port, int slot):
        self.pool = pool
        self.name = name
        self.host = host
        self.port = port
        self.resolved = None
        self.slot = slot
        self.on_connect_failed = None
        self.on_idle = None

    def attach(self, SharedTable table, int index):
        """Keep the counters in the table's backend record `index` from now on (right
        after creation: the private counts are not carried over), written to the row of
        table.set_row (the retired row for a reader)."""
        cdef char* rec
        if index >= table.hdr.n_backends:
            raise ValueError(f"shared table: backend record {index} is not allocated")
        rec = table.record(table.backend_off, table.backend_size, index,
                           table.hdr.backends, "backend")
        free(self.own)
        self.own = NULL
        self.table = table
        self.g = <backend_glob*>rec
        self.rows = <backend_row*>(rec + SHARED_LINE)
        self.r = self.rows + table.write_row()
        self.nrows = table.rows + 1

    def publish(self, bint up, int64_t weight, int64_t max_conns):
        """The master: write what a worker's pick reads (up, weight, max_connections)
        into the record and bump the table's epoch, so every following worker resyncs."""
        shared_st(&self.g.up, up)
        shared_st(&self.g.weight, weight)
        shared_st(&self.g.max_conns, max_conns)
        if self.table is not None:
            shared_add(&self.table.hdr.epoch, 1)

    @property
    def published(self):
        """(up, weight, max_conns) as last published."""
        return (bool(shared_ld(&self.g.up)), shared_ld(&self.g.weight),
                shared_ld(&self.g.max_conns))

    @property
    def active(self):
        """Relays holding a slot of this backend, in every process (the global atomic)."""
        return shared_ld(&self.g.active)

    @active.setter
    def active(self, int64_t value):            # tests, private record
        shared_st(&self.g.active, value)
        shared_st(&self.r.active, value)

    @property
    def total(self):
        """Connections that reached the backend (summed over rows)."""
        return target_sum(self, &self.rows.total)

    @total.setter
    def total(self, int64_t value):             # tests, private record
        shared_st(&self.r.total, value)

    @property
    def failed(self):
        """Connect failures and connect timeouts."""
        return target_sum(self, &self.rows.failed)

    @failed.setter
    def failed(self, int64_t value):
        shared_st(&self.r.failed, value)

    @property
    def bytes_in(self):
        """Client -> backend bytes."""
        return target_sum(self, &self.rows.bytes_in)

    @bytes_in.setter
    def bytes_in(self, int64_t value):
        shared_st(&self.r.bytes_in, value)

    @property
    def bytes_out(self):
        """Backend -> client bytes."""
        return target_sum(self, &self.rows.bytes_out)

    @bytes_out.setter
    def bytes_out(self, int64_t value):
        shared_st(&self.r.bytes_out, value)

    @property
    def responses(self):
        """Connections that gave a response time (the relay's only writer:
        target_observe_response)."""
        return target_sum(self, &self.rows.responses)

    def connect_failures(self):
        """{"connect_refused", "connect_timeout", "connect_error": n}, every process's
        (the master polls them for passive health)."""
        return {"connect_refused": target_sum(self, &self.rows.connect_refused),
                "connect_timeout": target_sum(self, &self.rows.connect_timeout),
                "connect_error": target_sum(self, &self.rows.connect_error)}

    @property
    def response_time_average(self):
        """The EWMA (alpha EWMA_ALPHA, as the connect time's) of the response times of
        this backend's connections in seconds, or None before the first one (see
        Relay.response_time); with several rows, their EWMAs weighted by responses."""
        cdef double acc = 0.0, e
        cdef int64_t n, weight = 0
        cdef int i
        for i in range(self.nrows):
            n = shared_ld(&self.rows[i].responses)
            e = shared_ldd(&self.rows[i].resp_ewma)
            if n > 0 and e >= 0:
                acc += e * n
                weight += n
        return None if weight == 0 else acc / weight

    @property
    def connect_time_average(self):
        """The EWMA (alpha EWMA_ALPHA) of this backend's connect times in seconds, or
        None before the first connect; with several rows, weighted by their connects.
        (lrt balances on its own algorithm's copy, per worker.)"""
        cdef double acc = 0.0, e
        cdef int64_t n, weight = 0
        cdef int i
        for i in range(self.nrows):
            n = shared_ld(&self.rows[i].connects)
            e = shared_ldd(&self.rows[i].connect_ewma)
            if n > 0 and e >= 0:
                acc += e * n
                weight += n
        return None if weight == 0 else acc / weight

    def try_acquire(self, int64_t max_conns):
        """Take one slot of this backend while its global active count is below
        `max_conns` (0 = unlimited), as the relay does after a pick; True when taken.
        For tests and tools: every True must be given back with release()."""
        return target_take(self, max_conns)

    def release(self):
        """Give back a slot taken by try_acquire; returns the global active count left."""
        return target_give(self)

    def __repr__(self):
        return f"<Target {self.pool}/{self.name} {self.host}:{self.port} active={self.active}>"


cdef inline int64_t target_sum(Target t, int64_t* first) noexcept:
    """The sum over t's rows of the counter at `first` (a field of t.rows[0])."""
    cdef int64_t acc = 0
    cdef int i
    for i in range(t.nrows):
        acc += shared_ld(<int64_t*>(<char*>first + i * sizeof(backend_row)))
    return acc


cdef inline bint target_take(Target t, int64_t max_conns) noexcept:
    """Take a slot of `t` while its global active count is below max_conns (0 =
    unlimited): exact across processes (a CAS loop); the row keeps its share."""
    if not shared_take(&t.g.active, max_conns):
        return False
    shared_bump(&t.r.active, 1)
    return True


cdef inline int64_t target_give(Target t) noexcept:
    """Give back a slot of `t`; returns the global active count left."""
    shared_bump(&t.r.active, -1)
    return shared_add(&t.g.active, -1)


cdef inline void target_observe_response(Target t, double seconds) noexcept:
    """Feed one connection's response time into its backend's EWMA (this row's) and
    count it; the only writer of the rows' resp_ewma and responses."""
    cdef backend_row* r = t.r
    cdef double e = r.resp_ewma
    if not seconds >= 0.0:          # negative or NaN: a clock step, not a measurement
        seconds = 0.0
    if e < 0:
        e = seconds
    else:
        e += EWMA_ALPHA * (seconds - e)
    shared_std(&r.resp_ewma, e)
    shared_bump(&r.responses, 1)


cdef inline void target_observe_connect(Target t, double seconds) noexcept:
    """Feed one connect time into this row's EWMA of them and count it (the only writer
    of the rows' connect_ewma and connects; shown as rt_ms)."""
    cdef backend_row* r = t.r
    cdef double e = r.connect_ewma
    if not seconds >= 0.0:
        seconds = 0.0
    if r.connects == 0 or e < 0:
        e = seconds
    else:
        e += EWMA_ALPHA * (seconds - e)
    shared_std(&r.connect_ewma, e)
    shared_bump(&r.connects, 1)


cdef inline void target_count_failure(Target t, str reason) noexcept:
    """A connect to `t` failed with `reason`: count it, by kind for passive health."""
    cdef backend_row* r = t.r
    shared_bump(&r.failed, 1)
    if reason == "connect_refused":
        shared_bump(&r.connect_refused, 1)
    elif reason == "connect_timeout":
        shared_bump(&r.connect_timeout, 1)
    else:
        shared_bump(&r.connect_error, 1)


cdef class PoolRuntime:
    """A pool on the data path: its algorithm and its targets by slot."""

    def __cinit__(self, *args, **kwargs):
        self.own = self.rows = self.r = <pool_row*>calloc(1, sizeof(pool_row))
        if self.rows == NULL:
            raise MemoryError()
        self.nrows = 1

    def __dealloc__(self):
        free(self.own)

    def __init__(self, str name, Algorithm algo, int hash_key=HASH_KEY_SRC_IP,
                 bint needs_key=False):
        self.name = name
        self.algo = algo
        self.targets = []
        self.hash_key = hash_key
        self.needs_key = needs_key
        self.queue = collections.deque()

    def add_target(self, Target target):
        """Append a target whose slot was just created in self.algo."""
        if target.slot != len(self.targets):
            raise ValueError(f"slot {target.slot} out of order (expected {len(self.targets)})")
        self.targets.append(target)

    def serve_queue(self):
        """Hand freed slots to queued clients in arrival order; called when a slot frees."""
        relay_serve_queue(self)

    def attach(self, SharedTable table, int index):
        """Keep the counters in the table's pool record `index` from now on (right after
        creation; see Target.attach)."""
        if index >= table.hdr.n_pools:
            raise ValueError(f"shared table: pool record {index} is not allocated")
        cdef char* rec = table.record(table.pool_off, table.pool_size, index,
                                      table.hdr.pools, "pool")
        free(self.own)
        self.own = NULL
        self.table = table
        self.rows = <pool_row*>(rec + SHARED_LINE)
        self.r = self.rows + table.write_row()
        self.nrows = table.rows + 1
        shared_st(&self.r.queued, len(self.queue))

    cdef int64_t row_sum(self, Py_ssize_t field) noexcept:
        cdef int64_t acc = 0
        cdef int i
        for i in range(self.nrows):
            acc += shared_ld(<int64_t*>(<char*>&self.rows[i] + field))
        return acc

    @property
    def retried(self):
        """Connects tried again on another backend after a failure."""
        return self.row_sum(0)

    @retried.setter
    def retried(self, int64_t value):           # tests, private record
        shared_st(&self.r.retried, value)

    @property
    def queue_timeouts(self):
        """Queued clients closed by their queue_timeout."""
        return self.row_sum(sizeof(int64_t))

    @queue_timeouts.setter
    def queue_timeouts(self, int64_t value):
        shared_st(&self.r.queue_timeouts, value)

    @property
    def queued(self):
        """Clients waiting in this pool's queues, every process's."""
        return self.row_sum(2 * sizeof(int64_t))


cdef inline void pool_note_queue(PoolRuntime pool):
    """The pool's queue changed length: this row's gauge follows it."""
    shared_st(&pool.r.queued, len(pool.queue))


cdef class RouteRuntime:
    """One route of a listener: its pool, or a split across pools."""

    def __init__(self, str pattern=None):
        self.pattern = pattern
        self.pool = None
        self.split_pools = None
        self.split_bounds = None

    def set_split(self, list pools, list percents):
        """Route new clients to `pools` by `percents` (summing to 100); None/None = no split."""
        if pools is None:
            self.split_pools = None
            self.split_bounds = None
            return
        bounds = []
        acc = 0
        for p in percents:
            acc += int(p)
            bounds.append(acc)
        if acc != 100:
            raise ValueError("split percentages must sum to 100")
        self.split_pools = list(pools)
        self.split_bounds = bounds

    def __repr__(self):
        return f"<RouteRuntime {self.pattern or '(default)'}>"


# ListenerRuntime.inspection_counts() keys by outcome number (None: not an outcome).
INSPECT_OUTCOME_NAMES = (None, "tls_found", "not_tls", "too_large", "malformed",
                         "inspect_timeout", "sni_found")


cdef class ListenerRuntime:
    """A listener on the data path: where its clients go and its limits and counters."""

    def __cinit__(self, *args, **kwargs):
        cdef char* rec = <char*>calloc(1, SHARED_LINE + sizeof(listener_row))
        if rec == NULL:
            raise MemoryError()
        self.own = rec
        self.g = <listener_glob*>rec
        self.rows = self.r = <listener_row*>(rec + SHARED_LINE)
        self.nrows = 1

    def __dealloc__(self):
        free(self.own)

    def __init__(self, str name, Hub hub):
        self.name = name
        self.hub = hub
        self.route = RouteRuntime()
        self.sni_routes = None
        self.inspect_timeout = 5.0
        self.max_client_hello = SNI_MAX_CLIENT_HELLO
        self.sticky_split = True
        self.connect_timeout = 2.0
        self.idle_timeout = 600.0
        self.queue_timeout = 5.0
        self.retries = 2
        self.max_connections = 10000
        self.rejected_other = {}
        self.gate = None
        self.send_proxy = 0
        self.accept_proxy = False
        self.proxy_timeout = 5.0
        self.header_hook = None
        self.proxy_encoder = None

    def attach(self, SharedTable table, int index):
        """Keep the counters in the table's listener record `index` from now on (right
        after creation; see Target.attach)."""
        if index >= table.hdr.n_listeners:
            raise ValueError(f"shared table: listener record {index} is not allocated")
        cdef char* rec = table.record(table.listener_off, table.listener_size, index,
                                      table.hdr.listeners, "listener")
        free(self.own)
        self.own = NULL
        self.table = table
        self.g = <listener_glob*>rec
        self.rows = <listener_row*>(rec + SHARED_LINE)
        self.r = self.rows + table.write_row()
        self.nrows = table.rows + 1

    @property
    def active(self):
        """Relays of this listener not yet closed, in every process (the global atomic)."""
        return shared_ld(&self.g.active)

    @property
    def accepted(self):
        """Connections accepted and admitted (summed over rows)."""
        cdef int64_t acc = 0
        cdef int i
        for i in range(self.nrows):
            acc += shared_ld(&self.rows[i].accepted)
        return acc

    @property
    def rejected(self):
        """{reason: count} of the clients refused, every reason seen at least once."""
        cdef int64_t n
        cdef int i, k
        out = {}
        for k in range(len(REJECT_WORDS)):
            n = 0
            for i in range(self.nrows):
                n += shared_ld(&self.rows[i].rejected[k])
            if n:
                out[REJECT_WORDS[k]] = n
        for word, n in self.rejected_other.items():
            out[word] = out.get(word, 0) + n
        return out

    def inspection_counts(self):
        """{outcome: count} of the ClientHello inspections ended (sni listeners):
        tls_found, sni_found, not_tls, too_large, malformed, inspect_timeout."""
        cdef int64_t n
        cdef int i, k
        out = {}
        for k in range(1, INSPECT_OUTCOMES):
            n = 0
            for i in range(self.nrows):
                n += shared_ld(&self.rows[i].inspected[k])
            out[INSPECT_OUTCOME_NAMES[k]] = n
        return out

    def count_rejected(self, str reason):
        slot = REJECT_SLOT.get(reason)
        if slot is None:
            self.rejected_other[reason] = self.rejected_other.get(reason, 0) + 1
        else:
            shared_bump(&self.r.rejected[<int>slot], 1)


cdef class Hub:
    """Per-loop state of the data path: global counters, the list of live relays, and
    the sweep that applies every timeout."""

    def __cinit__(self, loop):
        cdef char* rec = <char*>calloc(1, SHARED_LINE + sizeof(hub_row))
        if rec == NULL:
            raise MemoryError()
        self.own = rec
        self.g = <hub_glob*>rec
        self.rows = self.r = <hub_row*>(rec + SHARED_LINE)
        self.nrows = 1
        self.follow = False
        self.seen_epoch = 0
        self.pools = []
        self.loop = loop
        self.now = _now()
        self.max_connections = 20000
        self.access_log = None
        self.on_overload = None
        self.head = None
        self.next_id = 1
        self.rng = 0x5EED

    def __dealloc__(self):
        free(self.own)

    def attach(self, SharedTable table):
        """Keep the hub's counters in the table's hub record from now on (right after
        creation); a worker's relay ids start at its row's base (row << 40 | 1), so ids
        are unique across workers."""
        free(self.own)
        self.own = NULL
        self.table = table
        self.g = <hub_glob*>(table.base + table.hub_off)
        self.rows = <hub_row*>(table.base + table.hub_off + SHARED_LINE)
        self.r = self.rows + table.write_row()
        self.nrows = table.rows + 1
        if table.row >= 0:
            self.next_id = (<uint64_t>table.row << 40) | 1

    @property
    def active(self):
        """Relays not yet closed, all listeners, every process (the global atomic)."""
        return shared_ld(&self.g.active)

    @property
    def total(self):
        """Relays ever admitted (summed over rows)."""
        cdef int64_t acc = 0
        cdef int i
        for i in range(self.nrows):
            acc += shared_ld(&self.rows[i].total)
        return acc

    def register_pool(self, PoolRuntime pool):
        """With follow on, resync `pool` from the table when the epoch moves."""
        if pool not in self.pools:
            self.pools.append(pool)

    def unregister_pool(self, PoolRuntime pool):
        if pool in self.pools:
            self.pools.remove(pool)

    def resync(self, PoolRuntime pool):
        """What a following worker does before a pick in `pool` (follow_pool), callable
        from Python for tests and tools whatever `follow` says."""
        self.follow_pool(pool)

    cdef int follow_pool(self, PoolRuntime pool) except -1:
        """A worker, before a pick in `pool`: when the master published since the last
        look, resync every registered pool's (up, weight, max_connections) and serve
        their queues; then load the global active counts into `pool`'s algorithm."""
        cdef SharedTable table = self.table
        cdef int64_t epoch
        if table is None:
            return 0
        epoch = shared_ld_acq(&table.hdr.epoch)
        if epoch != self.seen_epoch:
            self.seen_epoch = epoch
            for p in list(self.pools):
                hub_resync_pool(<PoolRuntime>p)
            for p in list(self.pools):
                if (<PoolRuntime>p).queue:
                    hub_refresh_loads(<PoolRuntime>p)
                    relay_serve_queue(<PoolRuntime>p)
        hub_refresh_loads(pool)
        return 0

    cdef void link(self, Relay r) noexcept:
        r.prev = None
        r.next = self.head
        if self.head is not None:
            self.head.prev = r
        self.head = r

    cdef void unlink(self, Relay r) noexcept:
        if r.prev is not None:
            r.prev.next = r.next
        else:
            if self.head is r:
                self.head = r.next
        if r.next is not None:
            r.next.prev = r.prev
        r.prev = None
        r.next = None

    def sweep(self):
        """Apply connect, queue, header and idle deadlines; call a few times a second."""
        cdef double now = _now()
        cdef Relay r = self.head
        cdef Relay nxt
        self.now = now
        while r is not None:
            nxt = r.next
            r.sweep_one(now)
            r = nxt
        if self.follow:
            # Another worker may have freed capacity: a queue waits at most one sweep.
            for p in list(self.pools):
                if (<PoolRuntime>p).queue:
                    self.follow_pool(<PoolRuntime>p)
                    relay_serve_queue(<PoolRuntime>p)

    def relays(self):
        """A list of the live relays (for show conns, kill, shutdown)."""
        out = []
        cdef Relay r = self.head
        while r is not None:
            out.append(r)
            r = r.next
        return out

    def close_all(self, str reason="shutdown"):
        """Abort every live relay now."""
        for r in self.relays():
            (<Relay>r).close_both(reason, True)

    def close_target(self, Target target, str reason="killed"):
        """Abort every relay whose backend is `target`; returns how many."""
        cdef int n = 0
        for r in self.relays():
            if (<Relay>r).target is target:
                (<Relay>r).close_both(reason, True)
                n += 1
        return n


cdef int hub_resync_pool(PoolRuntime pool) except -1:
    """Bring `pool`'s algorithm to what the master published for each live target."""
    cdef Algorithm algo = pool.algo
    cdef Target t
    cdef int i
    cdef bint up
    cdef int64_t weight, limit
    targets = pool.targets
    for i in range(min(algo.n, len(targets))):
        if targets[i] is None or not algo.present[i]:
            continue
        t = <Target>targets[i]
        up = shared_ld(&t.g.up) != 0
        weight = shared_ld(&t.g.weight)
        limit = shared_ld(&t.g.max_conns)
        if <bint>algo.up[i] != up:
            algo.set_up(i, up)
        if algo.weight[i] != weight:
            algo.set_weight(i, weight)
        if algo.max_conns[i] != limit:
            algo.set_max_connections(i, limit)
    return 0


cdef int hub_refresh_loads(PoolRuntime pool) except -1:
    """Load each target's global active count into the algorithm's view, so that
    leastconn, lrt and p2c order by every worker's connections."""
    cdef Algorithm algo = pool.algo
    cdef Target t
    cdef int64_t a
    cdef int i
    targets = pool.targets
    for i in range(min(algo.n, len(targets))):
        if targets[i] is None:
            continue
        t = <Target>targets[i]
        a = shared_ld(&t.g.active)
        if algo.active[i] != a:
            algo.active[i] = a
            algo.load_changed(i)
    return 0


cdef inline bint hub_take(Hub hub) noexcept:
    """Count one relay in: False when global.max_connections are open (all workers)."""
    if not shared_take(&hub.g.active, hub.max_connections):
        return False
    shared_bump(&hub.r.active, 1)
    return True


cdef inline void hub_give(Hub hub) noexcept:
    shared_bump(&hub.r.active, -1)
    shared_add(&hub.g.active, -1)


cdef inline bint listener_take(ListenerRuntime lst) noexcept:
    """Count one relay in: False when the listener's max_connections are open."""
    if not shared_take(&lst.g.active, lst.max_connections):
        return False
    shared_bump(&lst.r.active, 1)
    return True


cdef inline void listener_give(ListenerRuntime lst) noexcept:
    shared_bump(&lst.r.active, -1)
    shared_add(&lst.g.active, -1)


cdef uint64_t _address_key(str host, object port, int kind) except? 0:
    """The routing key of a client address: hash64 of its packed IP (an IPv4-mapped IPv6
    address counts as the IPv4 one), followed by the port as two big-endian bytes for
    src_ip_port. Explicit bytes and hash: the same client maps the same way in every
    process and after every restart. An unparsable host hashes as its text."""
    cdef unsigned char buf[18]
    cdef Py_ssize_t n
    cdef int p
    cdef bytes raw = (host or "").split("%", 1)[0].encode("ascii", "replace")
    if inet_pton(AF_INET, raw, buf) == 1:
        n = 4
    elif inet_pton(AF_INET6, raw, buf) == 1:
        n = 16
        if (buf[0] | buf[1] | buf[2] | buf[3] | buf[4] | buf[5] | buf[6] | buf[7]
                | buf[8] | buf[9]) == 0 and buf[10] == 0xff and buf[11] == 0xff:
            memcpy(buf, buf + 12, 4)         # ::ffff:a.b.c.d routes like a.b.c.d
            n = 4
    else:
        return hash64_c(<const unsigned char*>raw, len(raw))
    if kind == HASH_KEY_SRC_IP_PORT:
        p = int(port or 0)
        buf[n] = (p >> 8) & 0xff
        buf[n + 1] = p & 0xff
        n += 2
    return hash64_c(buf, n)


def address_key(str host, port=None, int kind=HASH_KEY_SRC_IP):
    """The routing key the relay computes for a client address (for tests and tools)."""
    return _address_key(host, port, kind)
