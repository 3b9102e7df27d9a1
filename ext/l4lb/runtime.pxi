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
    """One backend as the relay sees it: where to connect, and its C counters."""

    def __init__(self, str pool, str name, host, port, int slot):
        self.pool = pool
        self.name = name
        self.host = host
        self.port = port
        self.resolved = None
        self.slot = slot
        self.on_connect_failed = None
        self.on_idle = None
        self.resp_ewma = -1.0

    @property
    def response_time_average(self):
        """The EWMA (alpha EWMA_ALPHA, as the connect time's) of the response times of
        this backend's connections in seconds, or None before the first one (see
        Relay.response_time)."""
        return None if self.resp_ewma < 0 else self.resp_ewma

    def __repr__(self):
        return f"<Target {self.pool}/{self.name} {self.host}:{self.port} active={self.active}>"


cdef inline void target_observe_response(Target t, double seconds) noexcept:
    """Feed one connection's response time into its backend's EWMA and count it; the
    only writer of Target.resp_ewma and Target.responses."""
    if not seconds >= 0.0:          # negative or NaN: a clock step, not a measurement
        seconds = 0.0
    if t.resp_ewma < 0:
        t.resp_ewma = seconds
    else:
        t.resp_ewma += EWMA_ALPHA * (seconds - t.resp_ewma)
    t.responses += 1


cdef class PoolRuntime:
    """A pool on the data path: its algorithm and its targets by slot."""

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
        self.rejected = {}
        self.gate = None
        self.send_proxy = 0
        self.accept_proxy = False
        self.proxy_timeout = 5.0
        self.header_hook = None
        self.proxy_encoder = None

    def inspection_counts(self):
        """{outcome: count} of the ClientHello inspections ended (sni listeners):
        tls_found, sni_found, not_tls, too_large, malformed, inspect_timeout."""
        return {INSPECT_OUTCOME_NAMES[i]: self.inspected[i]
                for i in range(1, INSPECT_OUTCOMES)}

    def count_rejected(self, str reason):
        self.rejected[reason] = self.rejected.get(reason, 0) + 1


cdef class Hub:
    """Per-loop state of the data path: global counters, the list of live relays, and
    the sweep that applies every timeout."""

    def __cinit__(self, loop):
        self.loop = loop
        self.now = _now()
        self.max_connections = 20000
        self.access_log = None
        self.on_overload = None
        self.head = None
        self.next_id = 1
        self.rng = 0x5EED

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
