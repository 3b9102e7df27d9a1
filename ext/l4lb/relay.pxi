# The byte relay: one client connection, one backend connection, bytes both ways.
#
# Theory of operation (DESIGN.md §8):
# - The client side (Relay) and the backend side (BackendSide) are buffered protocols:
#   uvloop reads straight into the buffer get_buffer returns. Every protocol of the loop
#   gets the same buffer (Hub.rbuf), so an idle connection holds no read buffer at all.
# - buffer_updated(n) hands the n bytes to the peer transport as one bytes object. It
#   must be a copy: uvloop's write() queues what it is given until the end of the loop
#   iteration and keeps a reference rather than a copy, so handing it a view of the
#   shared buffer would let the next read (any connection's) overwrite queued bytes.
#   One bytes object per chunk is what uvloop's own data_received path allocates too.
# - Backpressure: when a peer transport's write buffer passes its high-water mark it
#   calls our pause_writing, and we stop reading the other side; resume_writing resumes
#   it. So each direction holds at most the high-water mark plus one chunk.
# - Until the backend is connected, client bytes go to `pending` (at most
#   Hub.pending_limit; past that the client is paused) and are written first.
# - Half close: EOF from one side becomes write_eof on the other while the other
#   direction keeps flowing; once both sides have sent EOF the pair is closed. A reset
#   (connection_lost with an error) on either side aborts the other.
# - No timers per connection: Hub.sweep walks the live relays a few times a second and
#   applies connect, queue, header and idle deadlines from coarse stamps.
cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from libc.string cimport memcpy

import asyncio
import collections

# 256 KiB: large enough that a bulk transfer costs few callbacks per MiB, small enough
# that the one buffer per process stays in cache-friendly territory.
DEF_READ_BUFFER = 256 * 1024
# Bytes a client may send before its backend connection is up; past it, reading pauses.
DEF_PENDING_LIMIT = 256 * 1024
# Seconds between sweeps: the resolution of every timeout.
SWEEP_INTERVAL = 0.25

cdef object _CancelledError = asyncio.CancelledError

cdef extern from "<time.h>" nogil:
    ctypedef int clockid_t
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(clockid_t clk, timespec* tp)
    enum: CLOCK_MONOTONIC


cdef inline double _now() noexcept nogil:
    # uvloop's loop.time() counts whole milliseconds (libuv's cached uv_now), too coarse
    # for loopback connect times; this is the same CLOCK_MONOTONIC, read precisely.
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def monotonic():
    """The relay's clock (CLOCK_MONOTONIC, seconds): what Relay.started is measured on."""
    return _now()

import errno as _errno
import socket as _socket
# connect() errors that mean "this process is out of descriptors or memory", not "the
# backend is broken": the client is refused, the backend is not blamed (no passive
# health failure, no retry elsewhere that would fail the same way).
OVERLOAD_ERRNOS = frozenset({_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS, _errno.ENOMEM})


cdef class Target:
    """One backend as the relay sees it: where to connect, and its C counters."""

    def __init__(self, str pool, str name, host, port, int slot):
        self.pool = pool
        self.name = name
        self.host = host
        self.port = port
        self.slot = slot
        self.on_connect_failed = None
        self.on_idle = None

    def __repr__(self):
        return f"<Target {self.pool}/{self.name} {self.host}:{self.port} active={self.active}>"


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
        cdef Relay r
        while self.queue:
            r = <Relay>self.queue[0]
            if r.state != RELAY_QUEUED:
                self.queue.popleft()
                continue
            if not _any_eligible(self.algo, r):
                return
            self.queue.popleft()
            r.state = RELAY_CONNECTING
            r.start_connect()


cdef bint _any_eligible(Algorithm algo, Relay r) except -1:
    cdef int i
    for i in range(algo.n):
        if algo.eligible(i) and not algo.avoided(i, r.avoid, r.navoid):
            return True
    return False


cdef class ListenerRuntime:
    """A listener on the data path: where its clients go and its limits and counters."""

    def __init__(self, str name, Hub hub):
        self.name = name
        self.hub = hub
        self.pool = None
        self.split_pools = None
        self.split_bounds = None
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

    def count_rejected(self, str reason):
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def __call__(self):
        """Protocol factory for loop.create_server: a new Relay per accepted connection."""
        cdef Relay r = Relay.__new__(Relay)
        r.listener = self
        r.hub = self.hub
        r.slot = -1
        r.state = RELAY_CONNECTING
        return r


cdef class Hub:
    """Per-loop state of the data path: the shared read buffer, global counters, the
    list of live relays, and the sweep that applies every timeout."""

    def __cinit__(self, loop, Py_ssize_t read_buffer=DEF_READ_BUFFER):
        self.rbuf = <char*>PyMem_Malloc(read_buffer)
        if self.rbuf == NULL:
            raise MemoryError()
        self.rbuf_size = read_buffer
        self.rview = memoryview(<char[:read_buffer]>self.rbuf)
        self.loop = loop
        self.now = _now()
        self.max_connections = 20000
        self.pending_limit = DEF_PENDING_LIMIT
        self.access_log = None
        self.on_overload = None
        self.head = None
        self.next_id = 1
        self.rng = 0x5EED

    def __dealloc__(self):
        # rview may outlive us only through uvloop holding a read in flight, which cannot
        # happen once every transport is closed; the Hub lives as long as the balancer.
        PyMem_Free(self.rbuf)

    cdef void link(self, Relay r):
        r.prev = None
        r.next = self.head
        if self.head is not None:
            self.head.prev = r
        self.head = r

    cdef void unlink(self, Relay r):
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


cdef object _spare_view = memoryview(bytearray(DEF_READ_BUFFER))


cdef inline object _shared_view(Relay r):
    # A closed pair may still get one read from uvloop: give it a scratch buffer whose
    # bytes are dropped by buffer_updated.
    return _spare_view if r is None else r.hub.rview


cdef class BackendSide:
    """The backend-side protocol of a relay: forwards everything to its Relay."""

    def __call__(self):
        # loop.create_connection wants a factory; the protocol object is its own factory,
        # which spares a closure per connection.
        return self

    def connection_made(self, transport):
        if self.relay is None or self.relay.state == RELAY_CLOSED:
            transport.abort()
            return
        self.relay.backend_connected(transport)

    def get_buffer(self, Py_ssize_t sizehint):
        return _shared_view(self.relay)

    def buffer_updated(self, Py_ssize_t n):
        cdef Relay r = self.relay
        if r is None or r.state != RELAY_OPEN:
            return      # the pair was closed while this read was in flight
        r.bytes_out += n
        r.target.bytes_out += n
        r.last_active = r.hub.now
        r.cwrite(PyBytes_FromStringAndSize(r.hub.rbuf, n))

    def eof_received(self):
        cdef Relay r = self.relay
        if r is None:
            return True
        r.backend_eof = True
        if r.client_eof:
            r.close_both("closed", False)
            return True
        if not r.ctransport.is_closing():
            r.ctransport.write_eof()
        return True

    def pause_writing(self):
        cdef Relay r = self.relay
        if r is None:
            return
        if not r.client_paused and not r.client_eof:
            r.client_paused = True
            r.ctransport.pause_reading()

    def resume_writing(self):
        cdef Relay r = self.relay
        if r is None:
            return
        if r.client_paused and not r.client_eof:
            r.client_paused = False
            r.ctransport.resume_reading()

    def connection_lost(self, exc):
        cdef Relay r = self.relay
        if r is None or r.state == RELAY_CLOSED:
            return
        if exc is not None:
            r.close_both("backend_reset", True)
        else:
            r.close_both("closed", False)


cdef class Relay:
    """The client-side protocol of a relay, and the relay's state."""

    def __repr__(self):
        return f"<Relay {self.id} {self.client_host}:{self.client_port} state={self.state}>"

    # --- the client side's protocol callbacks ----------------------------------------

    def connection_made(self, transport):
        cdef Hub hub = self.hub
        cdef ListenerRuntime lst = self.listener
        self.ctransport = transport
        self.cwrite = transport.write
        self.started = _now()
        self.last_active = self.started
        self.close_reason = None
        peer = transport.get_extra_info("peername")
        if peer is not None:
            self.client_host = peer[0]
            self.client_port = peer[1]
        if hub.max_connections > 0 and hub.active >= hub.max_connections:   # 0 = unlimited
            self.reject("global_max_connections")
            return
        if lst.max_connections > 0 and lst.active >= lst.max_connections:
            self.reject("max_connections")
            return
        self.id = hub.next_id
        hub.next_id += 1
        hub.active += 1
        hub.total += 1
        lst.active += 1
        hub.link(self)
        if lst.accept_proxy:
            self.state = RELAY_HEADER
            self.deadline = self.started + lst.proxy_timeout
            self.pending = bytearray()
            return
        self.admit()

    cdef void reject(self, str reason):
        self.state = RELAY_CLOSED
        self.listener.count_rejected(reason)
        self.ctransport.abort()

    cdef void admit(self):
        """Check the gate, choose the pool and start connecting (after any PROXY header)."""
        cdef ListenerRuntime lst = self.listener
        if lst.gate is not None:
            reason = lst.gate.admit(self)
            if reason is not None:
                lst.count_rejected(reason)
                self.close_both(reason, True)
                return
            self.gate = lst.gate             # so finish() releases to the gate that admitted
        lst.accepted += 1
        self.pool = self.choose_pool()
        if self.pool is None:
            self.close_both("no_pool", True)
            return
        if self.pool.needs_key:
            self.key = _address_key(self.client_host, self.client_port, self.pool.hash_key)
        self.state = RELAY_CONNECTING
        self.start_connect()

    cdef PoolRuntime choose_pool(self):
        cdef ListenerRuntime lst = self.listener
        cdef uint64_t draw
        cdef int i
        if lst.split_pools is None:
            return lst.pool
        if lst.sticky_split:
            draw = _address_key(self.client_host, 0, HASH_KEY_SRC_IP) % 100
        else:
            draw = splitmix64_next(&self.hub.rng) % 100
        bounds = lst.split_bounds
        for i in range(len(bounds)):
            if draw < <uint64_t>bounds[i]:
                return lst.split_pools[i]
        return lst.split_pools[len(bounds) - 1]

    def get_buffer(self, Py_ssize_t sizehint):
        return self.hub.rview

    def buffer_updated(self, Py_ssize_t n):
        cdef Hub hub = self.hub
        self.last_active = hub.now
        if self.state == RELAY_OPEN:
            self.bytes_in += n
            self.target.bytes_in += n
            self.bwrite(PyBytes_FromStringAndSize(hub.rbuf, n))
            return
        if self.state == RELAY_CLOSED:
            return
        # Not connected yet (or still reading a PROXY header): hold the bytes, bounded.
        if self.pending is None:
            self.pending = bytearray()
        self.pending += hub.rview[:n]
        if self.state == RELAY_HEADER:
            self.read_proxy_header()
            return
        self.bytes_in += n
        if len(self.pending) >= hub.pending_limit and not self.client_paused:
            self.client_paused = True
            self.ctransport.pause_reading()

    cdef void read_proxy_header(self):
        cdef ListenerRuntime lst = self.listener
        result = lst.header_hook(self, bytes(self.pending))
        if result is None:
            return                       # need more bytes
        consumed, src = result
        if consumed < 0:
            lst.count_rejected("bad_proxy_header")
            self.close_both("bad_proxy_header", True)
            return
        del self.pending[:consumed]
        self.bytes_in += len(self.pending)
        if src is not None:
            self.client_host, self.client_port = src
        self.admit()

    def eof_received(self):
        self.client_eof = True
        if self.state == RELAY_OPEN:
            if self.backend_eof:
                self.close_both("closed", False)
                return True
            if not self.btransport.is_closing():
                self.btransport.write_eof()
        elif self.state == RELAY_HEADER:
            self.listener.count_rejected("bad_proxy_header")
            self.close_both("bad_proxy_header", True)
        # CONNECTING / QUEUED: the EOF is passed on once the backend is up.
        return True

    def pause_writing(self):
        if self.btransport is not None and not self.backend_paused and not self.backend_eof:
            self.backend_paused = True
            self.btransport.pause_reading()

    def resume_writing(self):
        if self.btransport is not None and self.backend_paused and not self.backend_eof:
            self.backend_paused = False
            self.btransport.resume_reading()

    def connection_lost(self, exc):
        if self.state == RELAY_CLOSED:
            return
        if exc is not None:
            self.close_both("client_reset", True)
        elif self.state == RELAY_OPEN:
            self.close_both("closed", False)
        else:
            self.close_both("client_gone", True)

    # --- connecting to a backend ----------------------------------------------------

    cdef void start_connect(self):
        """Pick a backend (never one in `avoid`) and start connecting to it, or queue
        the client when every eligible backend is full, or close it when none is up."""
        cdef PoolRuntime pool = self.pool
        cdef Algorithm algo = pool.algo
        cdef int slot = algo.pick_c(self.key, self.avoid, self.navoid)
        cdef Target t
        if slot < 0:
            if _any_full(algo, self):
                self.state = RELAY_QUEUED
                self.deadline = _now() + self.listener.queue_timeout
                pool.queue.append(self)
                return
            self.close_both("no_backend", True)
            return
        t = <Target>pool.targets[slot]
        self.slot = slot
        self.target = t
        algo.conn_opened(slot)
        t.active += 1
        self.open_backend_connection(t)

    cdef void open_backend_connection(self, Target t):
        """Start connecting to `t`, already counted as this relay's backend; success ends
        in backend_connected, failure in connect_failed. (SpliceRelay overrides it with a
        raw nonblocking socket.)"""
        self.bside = BackendSide.__new__(BackendSide)
        self.bside.relay = self
        self.bside.started = _now()
        self.deadline = self.bside.started + self.listener.connect_timeout
        cdef Connector connector = Connector.__new__(Connector)
        self.connect_task = connector
        connector.start(self, self.bside,
                        self.hub.loop.create_connection(self.bside, t.host, t.port))

    cdef void connect_failed(self, str reason):
        """The connect to self.target failed: count it, avoid that backend, try another
        while retries last, else close the client."""
        cdef Target t = self.target
        cdef ListenerRuntime lst = self.listener
        self.connect_task = None
        if self.state == RELAY_CLOSED:
            return
        self.release_target()
        t.failed += 1
        if self.navoid < ALGO_MAX_AVOID:
            self.avoid[self.navoid] = t.slot
            self.navoid += 1
        if t.on_connect_failed is not None:
            t.on_connect_failed(t, reason)
        if self.navoid > lst.retries:
            self.close_both(reason, True)
            return
        self.start_connect()

    cdef void refuse_overloaded(self):
        """No descriptor for the backend socket: refuse this client, blame nobody."""
        self.connect_task = None
        self.listener.count_rejected("fd_exhausted")
        if self.hub.on_overload is not None:
            self.hub.on_overload()
        self.close_both("fd_exhausted", True)

    cdef void release_target(self):
        """Give back the slot this relay holds (its backend's active count)."""
        cdef Target t = self.target
        cdef PoolRuntime pool = self.pool
        if t is None:
            return
        self.target = None
        pool.algo.conn_closed(t.slot)
        t.active -= 1
        if t.active == 0 and t.on_idle is not None:
            t.on_idle(t)
        if pool.queue:
            pool.serve_queue()

    cdef void backend_connected(self, object transport):
        cdef Target t = self.target
        cdef ListenerRuntime lst = self.listener
        cdef double now = _now()
        self.state = RELAY_OPEN
        self.connect_task = None
        self.btransport = transport
        self.bwrite = transport.write
        self.last_active = now
        t.total += 1
        self.pool.algo.observe_rt(t.slot, now - self.bside.started)
        if lst.rcvbuf or lst.sndbuf:         # only when configured: a Python call or two
            sock = transport.get_extra_info("socket")
            if lst.rcvbuf:
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, lst.rcvbuf)
            if lst.sndbuf:
                sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDBUF, lst.sndbuf)
        if lst.send_proxy:
            if self.local_addr is None:
                self.local_addr = self.ctransport.get_extra_info("sockname")
            self.bwrite(lst.proxy_encoder(lst.send_proxy, (self.client_host, self.client_port),
                                          self.local_addr))
        if self.client_paused and not self.client_eof:
            self.client_paused = False
            self.ctransport.resume_reading()
        if self.pending is not None:
            if len(self.pending):
                self.target.bytes_in += len(self.pending)
                self.bwrite(bytes(self.pending))
            self.pending = None
        if self.client_eof:
            transport.write_eof()

    # --- closing ----------------------------------------------------------------------

    cdef void close_both(self, str reason, bint abort):
        """Close (or abort, for resets and timeouts) both sides and settle the counters.
        Idempotent: only the first call counts."""
        if self.state == RELAY_CLOSED:
            return
        if self.state == RELAY_CONNECTING and self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        cdef bint was_queued = self.state == RELAY_QUEUED
        self.state = RELAY_CLOSED
        if abort:
            self.ctransport.abort()
            if self.btransport is not None:
                self.btransport.abort()
        else:
            self.ctransport.close()
            if self.btransport is not None:
                self.btransport.close()
        self.finish(reason)
        if was_queued:
            _drop_closed_queue_heads(self.pool)

    cdef void finish(self, str reason):
        cdef Hub hub = self.hub
        self.close_reason = reason
        self.pending = None
        self.hub.unlink(self)
        hub.active -= 1
        self.listener.active -= 1
        if hub.access_log is not None:
            hub.access_log(self, reason)
        if self.gate is not None:
            gate = self.gate
            self.gate = None
            gate.release(self)
        self.release_target()
        # Break the cycles relay <-> protocols so the pair is freed by refcount alone.
        if self.bside is not None:
            self.bside.relay = None
            self.bside = None
        self.cwrite = None
        self.bwrite = None

    cdef void sweep_one(self, double now):
        cdef ListenerRuntime lst = self.listener
        if self.state == RELAY_OPEN:
            if now - self.last_active >= lst.idle_timeout:
                self.close_both("idle_timeout", True)
        elif self.state == RELAY_CONNECTING:
            if self.connect_task is not None and now >= self.deadline:
                self.connect_task.cancel()
                self.connect_task = None
                self.connect_failed("connect_timeout")
        elif self.state == RELAY_QUEUED:
            if now >= self.deadline:
                lst.count_rejected("queue_timeout")
                self.close_both("queue_timeout", True)
        elif self.state == RELAY_HEADER:
            if now >= self.deadline:
                lst.count_rejected("proxy_timeout")
                self.close_both("proxy_timeout", True)

    # --- read-only facts for the control plane -----------------------------------------

    @property
    def backend_name(self):
        return None if self.target is None else self.target.name

    @property
    def pool_name(self):
        return None if self.pool is None else self.pool.name

    @property
    def state_name(self):
        return ("header", "connecting", "queued", "open", "closed")[self.state]

    def close(self, str reason="killed"):
        """Abort both sides now (control plane: kill, shutdown)."""
        self.close_both(reason, True)


cdef void _drop_closed_queue_heads(PoolRuntime pool):
    """Pop relays that left the queue (timed out, gone) off its head. Without this a
    pool whose backends stay full keeps every timed-out client in its deque until a slot
    frees: queued clients time out in arrival order, so trimming the head is enough."""
    q = pool.queue
    while q and (<Relay>q[0]).state != RELAY_QUEUED:
        q.popleft()


cdef bint _any_full(Algorithm algo, Relay r) except -1:
    """True when some backend would be eligible but for its max_connections."""
    cdef int i
    for i in range(algo.n):
        if (algo.present[i] and algo.up[i] and algo.weight[i] > 0
                and algo.max_conns[i] > 0 and algo.active[i] >= algo.max_conns[i]
                and not algo.avoided(i, r.avoid, r.navoid)):
            return True
    return False


cdef extern from "arpa/inet.h" nogil:
    int inet_pton(int af, const char* src, void* dst)

cdef extern from "sys/socket.h":
    enum: AF_INET
    enum: AF_INET6


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


cdef class Connector:
    """Drives one `loop.create_connection` coroutine without an asyncio Task.

    A Task per connection costs a Task object, a context copy and one extra loop
    iteration before the connect even starts (create_task only schedules the first
    step). Here the coroutine's first step runs at once, and each future it awaits wakes
    it through a done callback, which is all a Task does for a coroutine that is never
    awaited by anyone. On success BackendSide.connection_made has already wired the
    pair; on failure the relay retries elsewhere or closes; `cancel` (connect timeout,
    client gone) throws CancelledError in, and uvloop closes the half-open socket."""

    cdef void start(self, Relay relay, BackendSide bside, object coro):
        self.relay = relay
        self.bside = bside
        self.coro = coro
        self.wakeup = self._wakeup
        self.step(None)

    def _wakeup(self, fut):
        if not self.done:
            self.fut = None
            self.step(None)

    def cancel(self):
        if self.done:
            return
        if self.fut is not None:
            self.fut.remove_done_callback(self.wakeup)
            self.fut = None
        self.step(_CancelledError())

    cdef void step(self, object exc):
        cdef Relay relay
        try:
            if exc is None:
                fut = self.coro.send(None)
            else:
                fut = self.coro.throw(exc)
        except StopIteration:
            self.finish()
        except _CancelledError:
            self.finish()                # timed out (the sweep retries) or the client left
        except OSError as e:
            relay = self.finish()
            if relay is not None:
                if e.errno in OVERLOAD_ERRNOS:
                    relay.refuse_overloaded()
                else:
                    relay.connect_failed(_connect_error_reason(e))
        except Exception:                # e.g. a resolver failure for a hostname backend
            relay = self.finish()
            if relay is not None:
                relay.connect_failed("connect_error")
        else:
            # What a Task does with a yielded future: clear the blocking flag, wait.
            fut._asyncio_future_blocking = False
            self.fut = fut
            fut.add_done_callback(self.wakeup)

    cdef Relay finish(self):
        """Mark done; the relay this connect still belongs to, or None if it moved on."""
        cdef Relay relay = self.relay
        self.done = True
        self.coro = None
        self.fut = None
        self.wakeup = None
        self.relay = None
        if relay is not None and relay.state == RELAY_CONNECTING and relay.bside is self.bside:
            return relay
        return None


cdef str _connect_error_reason(exc):
    import errno
    if exc.errno == errno.ECONNREFUSED:
        return "connect_refused"
    if exc.errno in (errno.ETIMEDOUT,):
        return "connect_timeout"
    return "connect_error"
