# The relay: one client connection, one backend connection, bytes both ways.
#
# Theory of operation (DESIGN.md §8):
# - A Relay owns two raw nonblocking sockets: the client's, from the Acceptor, and the
#   backend's, connected here. Both sit in the Hub's Poller; their edges come back to
#   on_event, which runs the pump (pump.pxi) for both directions. Bytes never become
#   Python objects; an idle relay holds no buffer and no pipe.
# - Its life is a small state machine (RELAY_*, the diagram in relay.pxd): admission
#   (global and listener limits, then the listener's gate: ACL and per-source limits),
#   an optional PROXY header, the choice of pool (a split draws one) and of backend,
#   the connect, the open pair, the close. Every state write goes through
#   relay_set_state, which checks it against the table in debug builds.
# - Backend choice: the pool's algorithm picks a slot never in `avoid`, the slots that
#   already failed this client; a failed connect avoids that backend, reports it to
#   passive health and tries another while `retries` last. When every backend is full
#   (max_connections), the client waits in the pool's queue (its listener's queue_timeout). When no
#   backend is left, the close names why: the last connect failure's reason if backends
#   were tried and failed, else `no_backend`.
# - Connect: an IP literal is connected to at once; a hostname uses the addresses the
#   control plane's resolver last pushed into its Target (l4lb/resolver.py), and only
#   before a first answer is it resolved off the loop (loop.getaddrinfo, per connection
#   as loop.create_connection does); each address is tried in order until one connects,
#   all within connect_timeout (a name
#   whose first address is dead still connects). Out of descriptors is no backend's
#   fault: the client is refused as `fd_exhausted`, no backend is blamed.
# - Before the backend is connected the client is not read at all: its bytes wait in
#   its kernel socket buffer. A client that resets or vanishes meanwhile is noticed by
#   EPOLLERR/EPOLLHUP; a mere FIN (a request sent whole) waits for the backend.
# - accept_proxy: the header is peeked at, parsed by the listener's hook and taken off
#   the socket exactly; what follows stays in the kernel for the pump. send_proxy: the
#   header is written with send() before the first byte of the client's.
# - sni (a listener with an sni table): after the gate (and any PROXY header) the relay
#   peeks at the stream's first max_client_hello bytes on each client edge (RELAY_INSPECT)
#   and lets the ClientHello scan (sni.pxi) judge them, as HAProxy's req.ssl_sni with
#   tcp-request inspect-delay and nginx's ssl_preread do. A server name picks its route
#   (l4lb/sni.py: exact, then longest wildcard), which has its own pool or split; every
#   other outcome (no name, no match, not TLS, malformed, truncated by an EOF, too large,
#   nothing decisive within inspect_timeout) takes the listener's default route. Each
#   outcome is counted per listener. Nothing is taken off the socket: the backend gets
#   the hello byte for byte, and the TLS session stays end to end.
# - Half close: one direction's EOF becomes shutdown(SHUT_WR) on the other socket; both
#   done -> close. A reset either way closes both with SO_LINGER 0, so the other side
#   sees the reset too; timeouts and kills close plainly.
# - Response time (HAProxy's Tr, at L4): from the client's first bytes passed on to the
#   backend to the backend's first bytes back; per backend an EWMA and a count
#   (target_observe_response). The clock is read before each pump until the client's
#   first bytes have gone (a pump or two: the one at connect, the client's first edge),
#   so the figure never undercounts, and once more at the backend's first bytes; after
#   that a flag test per pump that moved bytes is all it costs. A backend
#   whose bytes (or FIN) were readable before any of the client's went out spoke first
#   (a banner: SMTP, FTP, MySQL, SSH), and such a connection has no response time, as
#   HAProxy counts from the request; neither has one closed before its backend answered.
#   Later exchanges on the connection are not timed: L4 sees no request boundaries.
# - No timers per connection: Hub.sweep calls sweep_one on every live relay a few times
#   a second and applies connect, queue, header and idle deadlines from coarse stamps.
from libc.errno cimport (errno, EAGAIN, EINTR, EINPROGRESS, ECONNREFUSED, ECONNRESET,
                         ETIMEDOUT)
from libc.string cimport memset, memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize
from l4lb.includes.system cimport (
    sockaddr, sockaddr_storage, sockaddr_in, sockaddr_in6, socklen_t, linger, c_socket,
    c_connect, c_getsockopt, c_setsockopt, c_getsockname, c_recv, c_send, c_close,
    inet_pton, inet_ntop, htons, ntohs, AF_INET, AF_INET6, SOCK_STREAM, SOCK_NONBLOCK,
    SOCK_CLOEXEC, SOL_SOCKET, SO_ERROR, SO_LINGER, SO_RCVBUF, SO_SNDBUF, MSG_NOSIGNAL,
    MSG_PEEK, IPPROTO_TCP, TCP_NODELAY, EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLRDHUP)

import asyncio
import socket as _socket

cdef enum:
    # Bytes peeked for a PROXY header: the longest one the parser accepts is a v2 header
    # of 16 + MAX_V2_LENGTH (1024) bytes, so a peek this long always decides.
    HEADER_PEEK = 1088

SPLICE_HEADER_PEEK = HEADER_PEEK

# RELAY_* by number, as show conns and the access log name them.
RELAY_STATE_NAMES = ("new", "header", "connecting", "queued", "open", "closed", "inspect")

# RELAY_NEXT_* by state (relay.pxd): the transition table relay_set_state checks.
cdef int RELAY_NEXT[RELAY_STATES]
RELAY_NEXT[:] = [RELAY_NEXT_NEW, RELAY_NEXT_HEADER, RELAY_NEXT_CONNECTING,
                 RELAY_NEXT_QUEUED, RELAY_NEXT_OPEN, RELAY_NEXT_CLOSED,
                 RELAY_NEXT_INSPECT]


cdef inline int relay_set_state(Relay r, int state) except -1:
    """The one writer of Relay.state. Debug builds check the move against RELAY_NEXT
    and raise AssertionError on one the diagram does not allow; in release builds
    L4LB_DEBUG is the constant 0 and this is a plain assignment."""
    if L4LB_DEBUG:
        if state < 0 or state >= RELAY_STATES or not (RELAY_NEXT[r.state] >> state) & 1:
            raise AssertionError(
                f"relay {r.id}: state {RELAY_STATE_NAMES[r.state]} -> "
                f"{RELAY_STATE_NAMES[state] if 0 <= state < RELAY_STATES else state} "
                "is not in RELAY_NEXT")
    r.state = state
    return 0


def _relay_walk(states):
    """For tests: move a fresh relay (not connected to anything) from `new` through the
    named states with relay_set_state; returns the name of the state it ends in. A
    debug build raises AssertionError at the first move outside the table."""
    cdef Relay r = Relay.__new__(Relay)
    for name in states:
        relay_set_state(r, RELAY_STATE_NAMES.index(name))
    return RELAY_STATE_NAMES[r.state]


# --- sockets --------------------------------------------------------------------------

cdef inline void close_fd(int fd, bint reset) noexcept nogil:
    """Close a socket; with `reset`, SO_LINGER 0 first so the peer gets an RST."""
    cdef linger lg
    if fd < 0:
        return
    if reset:
        lg.l_onoff = 1
        lg.l_linger = 0
        c_setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
    c_close(fd)


cdef inline void set_nodelay(int fd) noexcept nogil:
    # As uvloop does for TCP transports: a small write is sent at once, not held by Nagle.
    cdef int one = 1
    c_setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))


cdef inline void set_buffers(int fd, int rcvbuf, int sndbuf) noexcept nogil:
    """SO_RCVBUF / SO_SNDBUF of a new backend socket, before connect so that the window
    scale it offers fits them (0: leave the kernel's autotuning)."""
    if rcvbuf > 0:
        c_setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(int))
    if sndbuf > 0:
        c_setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(int))


cdef object sockaddr_host_port(sockaddr_storage* ss):
    """(host, port) of an IPv4/IPv6 socket address, or (None, None)."""
    cdef char buf[64]
    cdef sockaddr_in* sin
    cdef sockaddr_in6* sin6
    if ss.ss_family == AF_INET:
        sin = <sockaddr_in*>ss
        inet_ntop(AF_INET, &sin.sin_addr, buf, sizeof(buf))
        return buf.decode("ascii"), ntohs(sin.sin_port)
    if ss.ss_family == AF_INET6:
        sin6 = <sockaddr_in6*>ss
        inet_ntop(AF_INET6, &sin6.sin6_addr, buf, sizeof(buf))
        return buf.decode("ascii"), ntohs(sin6.sin6_port)
    return None, None


cdef socklen_t fill_sockaddr(int family, object host, int port, sockaddr_storage* ss) except? 0:
    """Write host:port (an IP literal) into ss; returns its length, 0 if host is no IP
    literal of `family` (0 = either family)."""
    cdef bytes raw = str(host).split("%", 1)[0].encode("ascii", "replace")
    cdef sockaddr_in* sin = <sockaddr_in*>ss
    cdef sockaddr_in6* sin6 = <sockaddr_in6*>ss
    memset(ss, 0, sizeof(sockaddr_storage))
    if family != AF_INET6 and inet_pton(AF_INET, raw, &sin.sin_addr) == 1:
        sin.sin_family = AF_INET
        sin.sin_port = htons(<unsigned short>port)
        return sizeof(sockaddr_in)
    if family != AF_INET and inet_pton(AF_INET6, raw, &sin6.sin6_addr) == 1:
        sin6.sin6_family = AF_INET6
        sin6.sin6_port = htons(<unsigned short>port)
        return sizeof(sockaddr_in6)
    return 0


cdef str connect_errno_reason(int e):
    """The close reason of a backend connect that failed with errno `e`."""
    if e == ECONNREFUSED:
        return "connect_refused"
    if e == ETIMEDOUT:
        return "connect_timeout"
    if e == ECONNRESET:
        return "backend_reset"           # accepted by the backend's kernel, then reset
    return "connect_error"


# --- the pool's queue -----------------------------------------------------------------

cdef int relay_serve_queue(PoolRuntime pool) except -1:
    """Hand freed slots to queued clients in arrival order; called when a slot frees."""
    cdef Relay r
    while pool.queue:
        r = <Relay>pool.queue[0]
        if r.state != RELAY_QUEUED:
            pool.queue.popleft()
            continue
        if not any_eligible(pool.algo, r):
            break
        pool.queue.popleft()
        pool_note_queue(pool)
        relay_set_state(r, RELAY_CONNECTING)
        r.start_connect()
    pool_note_queue(pool)
    return 0


cdef bint any_eligible(Algorithm algo, Relay r) except -1:
    cdef int i
    for i in range(algo.n):
        if algo.eligible(i) and not algo.avoided(i, r.avoid, r.navoid):
            return True
    return False


cdef bint any_full(Algorithm algo, Relay r) except -1:
    """True when some backend would be eligible but for its max_connections."""
    cdef int i
    for i in range(algo.n):
        if (algo.present[i] and algo.up[i] and algo.weight[i] > 0
                and algo.max_conns[i] > 0 and algo.active[i] >= algo.max_conns[i]
                and not algo.avoided(i, r.avoid, r.navoid)):
            return True
    return False


cdef int pick_after_race(Relay r, Algorithm algo, int slot) except? -2:
    """The pick chose `slot` but another worker took its last free slot meanwhile: load
    that backend's global count into the view, avoid it and pick again (bounded by
    ALGO_MAX_AVOID); the new slot, taken, or -1 (queue or close as for no pick)."""
    cdef int avoid[ALGO_MAX_AVOID]
    cdef int navoid = r.navoid
    cdef Target t
    cdef int64_t a
    memcpy(avoid, r.avoid, navoid * sizeof(int))
    while slot >= 0:
        t = <Target>r.pool.targets[slot]
        a = shared_ld(&t.g.active)
        if algo.active[slot] != a:
            algo.active[slot] = a
            algo.load_changed(slot)
        if navoid >= ALGO_MAX_AVOID:
            return -1
        avoid[navoid] = slot
        navoid += 1
        slot = algo.pick_c(r.key, avoid, navoid)
        if slot >= 0 and target_take(<Target>r.pool.targets[slot], algo.max_conns[slot]):
            return slot
    return -1


cdef void drop_closed_queue_heads(PoolRuntime pool):
    """Pop relays that left the queue (timed out, gone) off its head. Without this a
    pool whose backends stay full keeps every timed-out client in its deque until a slot
    frees: queued clients time out in arrival order, so trimming the head is enough."""
    q = pool.queue
    while q and (<Relay>q[0]).state != RELAY_QUEUED:
        q.popleft()
    pool_note_queue(pool)


# --- the relay ------------------------------------------------------------------------

@cython.final
@cython.freelist(128)
cdef class Relay:
    """One client and its backend (see the top of relay.pxi). Linked in the Hub's list
    while live: show conns, kill, drain, shutdown and the sweep's timeouts reach it."""

    def __cinit__(self):
        self.cfd = -1
        self.bfd = -1
        self.up.pr = self.up.pw = self.down.pr = self.down.pw = -1

    def __dealloc__(self):
        # Only reached with open descriptors if a relay was dropped without close_both.
        self.close_fds(True)

    def __repr__(self):
        return (f"<Relay {self.id} {self.client_host}:{self.client_port} "
                f"state={RELAY_STATE_NAMES[self.state]}>")

    # --- admission --------------------------------------------------------------------

    cdef void accepted(self, ListenerRuntime lst, Poller poller, int fd,
                       sockaddr_storage* ss):
        """Take over the accepted socket `fd`: the limits, then the header or admit."""
        cdef Hub hub = lst.hub
        self.listener = lst
        self.hub = hub
        self.poller = poller
        self.cfd = fd
        self.up.pool = self.down.pool = &poller.pipes
        poller.pipes.cap = pipe_cap_for(hub.max_connections)     # follows a reload
        self.started = _now()
        self.last_active = self.started
        self.client_host, self.client_port = sockaddr_host_port(ss)
        # Both limits are taken atomically (exact across workers); 0 = unlimited.
        if not hub_take(hub):
            self.reject("global_max_connections")
            return
        if not listener_take(lst):
            hub_give(hub)
            self.reject("max_connections")
            return
        self.id = hub.next_id
        hub.next_id += 1
        shared_bump(&hub.r.total, 1)
        hub.link(self)
        # Readable and writable until a read or write says EAGAIN: whatever arrived
        # before the registration is then read without waiting for an edge.
        self.c_readable = True
        self.c_writable = True
        if poller.watch(fd, self, False) < 0:
            lst.count_rejected("fd_exhausted")
            self.close_both("fd_exhausted", True)
            return
        if lst.accept_proxy:
            # The header is read by read_proxy_header on the client's first edge (a
            # registration reports bytes that arrived before it).
            relay_set_state(self, RELAY_HEADER)
            self.deadline = self.started + lst.proxy_timeout
            return
        self.admit()

    cdef void reject(self, str reason):
        """Refuse a client before it is counted or linked (a limit was reached). It
        still gets its access-log line (every refused client does); with access logs off
        this costs one None test."""
        relay_set_state(self, RELAY_CLOSED)
        self.listener.count_rejected(reason)
        close_fd(self.cfd, False)
        self.cfd = -1
        self.close_reason = reason
        if self.hub.access_log is not None:
            self.hub.access_log(self, reason)

    cdef void admit(self):
        """Check the gate, then read the ClientHello (an sni listener) or choose the pool
        and start connecting (after any PROXY header)."""
        cdef ListenerRuntime lst = self.listener
        if lst.gate is not None:
            reason = lst.gate.admit(self)
            if reason is not None:
                lst.count_rejected(reason)
                self.close_both(reason, True)
                return
            self.gate = lst.gate             # so finish() releases to the gate that admitted
        shared_bump(&lst.r.accepted, 1)
        if lst.sni_routes is not None:
            relay_set_state(self, RELAY_INSPECT)
            self.deadline = _now() + lst.inspect_timeout
            if lst.accept_proxy:
                # Bytes after the PROXY header may be all there is: no edge will come.
                self.inspect_hello(False)
            # Otherwise the registration's first edge reports what arrived.
            return
        self.route_client(lst.route)

    cdef void route_client(self, RouteRuntime route):
        """Choose the pool of `route` (a split draws one) and start connecting."""
        self.pool = self.choose_pool(route)
        if self.pool is None:
            self.close_both("no_pool", True)
            return
        if self.pool.needs_key:
            self.key = _address_key(self.client_host, self.client_port, self.pool.hash_key)
        relay_set_state(self, RELAY_CONNECTING)
        self.start_connect()

    cdef PoolRuntime choose_pool(self, RouteRuntime route):
        cdef ListenerRuntime lst = self.listener
        cdef uint64_t draw
        cdef int i
        if route.split_pools is None:
            return route.pool
        if lst.sticky_split:
            draw = _address_key(self.client_host, 0, HASH_KEY_SRC_IP) % 100
        else:
            draw = splitmix64_next(&self.hub.rng) % 100
        bounds = route.split_bounds
        for i in range(len(bounds)):
            if draw < <uint64_t>bounds[i]:
                return route.split_pools[i]
        return route.split_pools[len(bounds) - 1]

    cdef void inspect_hello(self, bint client_eof):
        """An sni listener: peek at the stream's first max_client_hello bytes and let the
        parser (sni.pxi) judge them; one peek per edge while inspecting, none after.
        The bytes stay in the kernel and reach the backend untouched. A hello naming
        a server takes that name's route; no name, no match, not TLS, malformed, too
        large, or an EOF before a whole hello: the listener's default route. Not yet
        decided: wait for the next edge (the sweep ends the wait at inspect_timeout)."""
        cdef ListenerRuntime lst = self.listener
        cdef unsigned char buf[SNI_MAX_CLIENT_HELLO_LIMIT]
        cdef Py_ssize_t cap = lst.max_client_hello
        cdef ssize_t n
        cdef sni_scan scan
        cdef int status
        if cap < 1 or cap > SNI_MAX_CLIENT_HELLO_LIMIT:
            cap = SNI_MAX_CLIENT_HELLO
        n = c_recv(self.cfd, buf, <size_t>cap, MSG_PEEK)
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                return
            self.close_both("client_gone", True)
            return
        if n == 0:
            # EOF before any byte: nothing to judge; the backend sees the FIN.
            self.end_inspection(SNI_NOT_TLS, None)
            return
        self.last_active = self.hub.now
        status = sni_scan_hello(buf, n, cap, &scan)
        if status < 0:
            # No memory to gather a hello spread over records: it cannot be held, as
            # one past the cap cannot.
            sni_scan_release(&scan)
            self.end_inspection(SNI_TOO_LARGE, None)
            return
        if status == SNI_NEED_MORE:
            sni_scan_release(&scan)
            if client_eof:
                self.end_inspection(SNI_MALFORMED, None)   # truncated: no more will come
            return
        if status != SNI_FOUND:
            sni_scan_release(&scan)
            self.end_inspection(status, None)
            return
        try:
            _, _, self.sni, self.alpn = sni_scan_result(status, &scan)
        finally:
            sni_scan_release(&scan)
        if self.sni is not None:
            shared_bump(&lst.r.inspected[INSPECT_SNI_FOUND], 1)
        routes = lst.sni_routes          # None if a reload dropped the table meanwhile
        self.end_inspection(SNI_FOUND, None if routes is None else routes.route(self.sni))

    cdef void end_inspection(self, int outcome, object route):
        """Count the inspection's `outcome` and route the client: by `route`, the
        RouteRuntime its name matched, or the listener's default route when None."""
        cdef ListenerRuntime lst = self.listener
        shared_bump(&lst.r.inspected[outcome], 1)
        self.c_readable = True           # the peeked bytes wait for the pump
        if route is None:
            self.route_client(lst.route)
            return
        self.route = (<RouteRuntime>route).pattern
        self.route_client(<RouteRuntime>route)

    cdef void read_proxy_header(self, bint client_eof):
        """accept_proxy: peek at what the client sent, let the listener's header hook
        parse it, and take exactly the header off the socket; the bytes after it stay
        in the kernel for the pump. Incomplete: wait for the next edge (the sweep
        enforces proxy_timeout). Invalid, or an EOF before a whole header: the
        connection is refused as `bad_proxy_header`."""
        cdef ListenerRuntime lst = self.listener
        cdef char buf[HEADER_PEEK]
        cdef ssize_t n = c_recv(self.cfd, buf, HEADER_PEEK, MSG_PEEK)
        cdef Py_ssize_t consumed
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                return
            self.close_both("client_gone", True)
            return
        result = None
        if n > 0:
            self.last_active = self.hub.now
            result = lst.header_hook(self, PyBytes_FromStringAndSize(buf, n))
            if result is None and not client_eof:
                return                   # need more bytes
        if result is None or result[0] < 0:
            lst.count_rejected("bad_proxy_header")
            self.close_both("bad_proxy_header", True)
            return
        consumed, src = result
        # The peeked bytes are in the socket: this recv takes exactly the header.
        if c_recv(self.cfd, buf, <size_t>consumed, 0) != consumed:
            self.close_both("client_gone", True)
            return
        if src is not None:
            self.client_host, self.client_port = src
        self.c_readable = True           # bytes after the header are read by the pump
        self.admit()

    # --- connecting to a backend ------------------------------------------------------

    cdef void start_connect(self):
        """Pick a backend (never one in `avoid`) and start connecting to it, or queue
        the client when every eligible backend is full, or close it when none is left:
        with the last connect failure's reason when backends were tried, else
        `no_backend`."""
        cdef PoolRuntime pool = self.pool
        cdef Algorithm algo = pool.algo
        cdef int slot
        cdef Target t
        if self.hub.follow:
            self.hub.follow_pool(pool)
        slot = algo.pick_c(self.key, self.avoid, self.navoid)
        if slot >= 0:
            t = <Target>pool.targets[slot]
            if not target_take(t, algo.max_conns[slot]):
                slot = pick_after_race(self, algo, slot)
                if slot >= 0:
                    t = <Target>pool.targets[slot]
        if slot < 0:
            if any_full(algo, self):
                relay_set_state(self, RELAY_QUEUED)
                self.deadline = _now() + self.listener.queue_timeout
                pool.queue.append(self)
                pool_note_queue(pool)
                return
            self.close_both(self.last_failure or "no_backend", True)
            return
        self.target = t
        algo.conn_opened(slot)
        self.open_backend_connection(t)

    cdef void open_backend_connection(self, Target t):
        """Start connecting to `t`, already counted as this relay's backend; success ends
        in backend_connected, failure in connect_failed."""
        cdef sockaddr_storage ss
        self.connect_started = _now()
        self.deadline = self.connect_started + self.listener.connect_timeout
        self.addresses = None
        if fill_sockaddr(0, t.host, t.port, &ss):
            self.connect_address(0, t.host, t.port)
            return
        resolved = t.resolved
        if resolved:
            # A hostname the control plane's resolver has an answer for: its addresses in
            # order, no DNS on this path (a list only when there is a second to fall back on).
            if len(resolved) > 1:
                self.addresses = resolved[1:]
            family, host, port = resolved[0]
            self.connect_address(family, host, port)
            return
        # A hostname with no answer yet: resolve it off the loop (per connection, as
        # loop.create_connection does), then try its addresses in order.
        fut = asyncio.ensure_future(
            self.hub.loop.getaddrinfo(t.host, t.port, type=_socket.SOCK_STREAM))
        self.resolving = fut
        fut.add_done_callback(self._resolved)

    def _resolved(self, fut):
        if self.resolving is not fut or self.state != RELAY_CONNECTING:
            return
        self.resolving = None
        if fut.cancelled() or fut.exception() is not None or not fut.result():
            self.connect_failed("connect_error")
            return
        self.addresses = [(family, addr[0], addr[1])
                          for family, _, _, _, addr in fut.result()]
        self.connect_next_or_fail("connect_error")

    cdef void connect_next_or_fail(self, str reason):
        """The connect to one address of the target failed with `reason`: try the
        target's next address (a hostname's), or count the target as failed."""
        if self.addresses:
            family, host, port = self.addresses.pop(0)
            self.connect_address(family, host, port)
            return
        self.connect_failed(reason)

    cdef void connect_address(self, int family, object host, int port):
        """Start a nonblocking connect to host:port (an IP literal); completion is the
        backend socket's first edge (check_connect)."""
        cdef sockaddr_storage ss
        cdef socklen_t slen = fill_sockaddr(family, host, port, &ss)
        cdef int fd, e
        if slen == 0:
            self.connect_next_or_fail("connect_error")
            return
        fd = c_socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            if overload_errno(errno):
                self.refuse_overloaded()
            else:
                self.connect_next_or_fail("connect_error")
            return
        set_nodelay(fd)
        set_buffers(fd, self.listener.rcvbuf, self.listener.sndbuf)
        if c_connect(fd, <sockaddr*>&ss, slen) < 0 and errno != EINPROGRESS:
            e = errno
            c_close(fd)
            if overload_errno(e):
                self.refuse_overloaded()
            else:
                self.connect_next_or_fail(connect_errno_reason(e))
            return
        self.bfd = fd
        self.b_readable = False
        self.b_writable = False
        if self.poller.watch(fd, self, True) < 0:
            self.bfd = -1
            c_close(fd)
            self.refuse_overloaded()
        # The first edge (EPOLLOUT, or EPOLLERR on failure) arrives even when the connect
        # completed at once: registration reports a socket that is already writable.

    cdef void check_connect(self, uint32_t ev):
        cdef int err = 0
        cdef socklen_t elen = sizeof(err)
        if ev & EPOLLOUT and not ev & (EPOLLERR | EPOLLHUP):
            self.backend_connected(ev)   # writable without an error: connected
            return
        if c_getsockopt(self.bfd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0:
            err = errno
        if err == 0:
            if ev & EPOLLOUT:
                self.backend_connected(ev)
            return
        c_close(self.bfd)
        self.bfd = -1
        if overload_errno(err):
            self.refuse_overloaded()
        else:
            self.connect_next_or_fail(connect_errno_reason(err))

    cdef void connect_failed(self, str reason):
        """The connect to self.target failed: count it, avoid that backend, try another
        while retries last, else close the client with `reason`."""
        cdef Target t = self.target
        cdef ListenerRuntime lst = self.listener
        self.resolving = None
        self.addresses = None
        if self.state == RELAY_CLOSED:
            return
        self.release_target()
        target_count_failure(t, reason)
        if self.navoid < ALGO_MAX_AVOID:
            self.avoid[self.navoid] = t.slot
            self.navoid += 1
        self.last_failure = reason
        if t.on_connect_failed is not None:
            t.on_connect_failed(t, reason)
        if self.state == RELAY_CLOSED:   # passive health closed it (on_down = "close")
            return
        if self.navoid > lst.retries:
            self.close_both(reason, True)
            return
        shared_bump(&self.pool.r.retried, 1)
        self.start_connect()

    cdef void refuse_overloaded(self):
        """No descriptor for the backend socket: refuse this client, blame nobody."""
        self.resolving = None
        self.addresses = None
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
        if target_give(t) == 0 and t.on_idle is not None:
            t.on_idle(t)
        if pool.queue:
            relay_serve_queue(pool)

    cdef void backend_connected(self, uint32_t ev):
        cdef Target t = self.target
        cdef ListenerRuntime lst = self.listener
        cdef double now = _now()
        cdef bytes header
        cdef sockaddr_storage ss
        cdef socklen_t slen = sizeof(ss)
        cdef ssize_t n
        # The pipes come later, when a direction first carries bulk (see the pump).
        relay_set_state(self, RELAY_OPEN)
        self.addresses = None
        self.last_active = self.hub.now
        self.b_writable = True
        self.b_readable = (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP)) != 0
        pump_note_src_events(&self.down, ev)
        self.up.src = self.cfd
        self.up.dst = self.bfd
        self.down.src = self.bfd
        self.down.dst = self.cfd
        shared_bump(&t.r.total, 1)
        self.pool.algo.observe_rt(t.slot, now - self.connect_started)
        target_observe_connect(t, now - self.connect_started)
        if lst.send_proxy:
            if self.local_addr is None:
                if c_getsockname(self.cfd, <sockaddr*>&ss, &slen) == 0:
                    self.local_addr = sockaddr_host_port(&ss)
            header = lst.proxy_encoder(lst.send_proxy, (self.client_host, self.client_port),
                                       self.local_addr)
            # A fresh socket's send buffer takes a header of at most a few hundred bytes.
            n = c_send(self.bfd, <const char*>header, len(header), MSG_NOSIGNAL)
            if n != len(header):
                self.close_both("backend_reset", True)
                return
        self.pump_both()

    # --- events and the pump ----------------------------------------------------------

    cdef void on_event(self, bint backend, uint32_t ev):
        if backend:
            if self.state == RELAY_CONNECTING:
                if self.bfd >= 0:
                    self.check_connect(ev)
                return
            pump_note_src_events(&self.down, ev)
            if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                self.b_readable = True
            if ev & (EPOLLOUT | EPOLLHUP | EPOLLERR):
                self.b_writable = True
        else:
            pump_note_src_events(&self.up, ev)
            if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                self.c_readable = True
            if ev & (EPOLLOUT | EPOLLHUP | EPOLLERR):
                self.c_writable = True
            if self.state != RELAY_OPEN:
                if self.state == RELAY_HEADER:
                    self.read_proxy_header((ev & (EPOLLRDHUP | EPOLLHUP)) != 0)
                    return
                if self.state == RELAY_INSPECT:
                    if ev & EPOLLERR:
                        self.close_both("client_gone", True)
                    else:
                        self.inspect_hello((ev & (EPOLLRDHUP | EPOLLHUP)) != 0)
                    return
                # Connecting or queued: a client that reset or vanished is let go now;
                # a mere FIN (a request sent whole) waits in the socket for the backend.
                if ev & (EPOLLERR | EPOLLHUP):
                    self.close_both("client_gone", True)
                return
        self.pump_both()
        if ev & EPOLLERR and self.state == RELAY_OPEN:
            # The pump moved what was readable; the error itself may sit on a side no
            # direction touches any more (half closed): a reset either way ends the pair.
            self.close_both("backend_reset" if backend else "client_reset", True)

    cdef void pump_both(self):
        cdef int64_t nin = 0, nout = 0
        cdef int rc_up = PUMP_WAIT
        cdef int rc_down = PUMP_WAIT
        cdef Target t = self.target
        if self.resp_phase == RESP_AWAIT_REQUEST:
            if self.b_readable:
                # The backend has bytes (or its FIN) before any of the client's went
                # out: it spoke first, so this connection has no response time.
                self.resp_phase = RESP_NONE
            else:
                self.request_at = _now()     # before the client's bytes may go out
        if not self.up.done:
            rc_up = pump_direction(&self.up, &self.c_readable, &self.b_writable, &nin,
                                   self.down.done)
        if rc_up < PUMP_SRC_FAILED and not self.down.done:
            rc_down = pump_direction(&self.down, &self.b_readable, &self.c_writable, &nout,
                                     self.up.done)
        # A pipe is held only while bytes wait in it: an idle connection holds none.
        if self.up.pr >= 0 and self.up.held == 0:
            pipe_release(&self.up)
        if self.down.pr >= 0 and self.down.held == 0:
            pipe_release(&self.down)
        if nin or nout:
            self.bytes_in += nin
            self.bytes_out += nout
            shared_bump(&t.r.bytes_in, nin)
            shared_bump(&t.r.bytes_out, nout)
            self.last_active = self.hub.now
            if self.resp_phase < RESP_MEASURED:
                self.note_first_bytes(nin, nout)
        if rc_up == PUMP_SRC_FAILED or rc_down == PUMP_DST_FAILED:
            self.close_both("client_reset", True)
        elif rc_up == PUMP_DST_FAILED or rc_down == PUMP_SRC_FAILED:
            self.close_both("backend_reset", True)
        elif self.up.done and self.down.done:
            self.close_both("closed", False)
        elif rc_up == PUMP_MORE or rc_down == PUMP_MORE:
            self.poller.defer(self)

    cdef void note_first_bytes(self, int64_t nin, int64_t nout):
        """A pump moved bytes before the response time was settled: stamp the client's
        first bytes, or time the backend's first bytes after them (see the top of this
        file): request_at was stamped before this pump."""
        if self.resp_phase == RESP_AWAIT_REQUEST:
            if nin == 0:
                self.resp_phase = RESP_NONE      # the backend's bytes came first
                return
            self.resp_phase = RESP_AWAIT_REPLY
            if nout == 0:
                return
            # Else the backend answered within this very pump: its bytes were not
            # readable before the client's went out (pump_both checked).
        elif nout == 0:
            return                               # more of the request, no answer yet
        self.resp_time = _now() - self.request_at
        self.resp_phase = RESP_MEASURED
        target_observe_response(self.target, self.resp_time)

    # --- closing ----------------------------------------------------------------------

    cdef void close_both(self, str reason, bint abort):
        """Close both sockets and the pipes and settle the counters.
        Idempotent: only the first call counts."""
        if self.state == RELAY_CLOSED:
            return
        cdef bint was_queued = self.state == RELAY_QUEUED
        if self.resolving is not None:           # a hostname lookup in flight
            self.resolving.cancel()
            self.resolving = None
        self.addresses = None
        relay_set_state(self, RELAY_CLOSED)
        # A reset on one side is passed on as a reset (SO_LINGER 0); every other close,
        # aborts included, is a plain close(), as uvloop's transport.abort() does (the
        # kernel still resets a socket that holds unread bytes).
        self.close_fds(abort and (reason == "client_reset" or reason == "backend_reset"))
        self.finish(reason)
        if was_queued:
            drop_closed_queue_heads(self.pool)

    cdef void finish(self, str reason):
        """Settle a closed relay: unlink it, log it (while it still knows its backend),
        then release its backend slot and its gate, its listener's and the hub's counts.
        Narrowest first: a reader in another process (the master) that sees the hub's
        count at 0 finds every backend's and listener's at 0 too."""
        cdef Hub hub = self.hub
        self.close_reason = reason
        hub.unlink(self)
        if hub.access_log is not None:
            hub.access_log(self, reason)
        self.release_target()
        if self.gate is not None:
            gate = self.gate
            self.gate = None
            gate.release(self)
        listener_give(self.listener)
        hub_give(hub)

    cdef void close_fds(self, bint reset):
        # Closing a socket also removes it from the epoll (nothing else holds a dup).
        close_fd(self.cfd, reset)
        close_fd(self.bfd, reset)
        self.cfd = self.bfd = -1
        pipe_release(&self.up)
        pipe_release(&self.down)
        pump_free_spill(&self.up)
        pump_free_spill(&self.down)
        if self.poller is not None:
            self.poller.pipes.starved = False    # descriptors were freed

    cdef void sweep_one(self, double now):
        cdef ListenerRuntime lst = self.listener
        if self.state == RELAY_OPEN:
            if now - self.last_active >= lst.idle_timeout:
                self.close_both("idle_timeout", True)
        elif self.state == RELAY_CONNECTING:
            # connect_timeout covers the whole target: its lookup and all its addresses.
            if now >= self.deadline and (self.bfd >= 0 or self.resolving is not None):
                if self.resolving is not None:
                    self.resolving.cancel()
                    self.resolving = None
                close_fd(self.bfd, False)
                self.bfd = -1
                self.connect_failed("connect_timeout")
        elif self.state == RELAY_QUEUED:
            if now >= self.deadline:
                lst.count_rejected("queue_timeout")
                shared_bump(&self.pool.r.queue_timeouts, 1)
                self.close_both("queue_timeout", True)
        elif self.state == RELAY_HEADER:
            if now >= self.deadline:
                lst.count_rejected("proxy_timeout")
                self.close_both("proxy_timeout", True)
        elif self.state == RELAY_INSPECT:
            if now >= self.deadline:
                # As HAProxy's inspect-delay: the wait ends, the default route applies,
                # and whatever the client did send is relayed as it is.
                self.end_inspection(INSPECT_TIMEOUT, None)

    # --- read-only facts for the control plane ----------------------------------------

    @property
    def backend_name(self):
        return None if self.target is None else self.target.name

    @property
    def pool_name(self):
        return None if self.pool is None else self.pool.name

    @property
    def response_time(self):
        """Seconds from the client's first bytes passed on to the backend's first bytes
        back, or None: the backend spoke first, or the relay closed before it answered."""
        return self.resp_time if self.resp_phase == RESP_MEASURED else None

    @property
    def state_name(self):
        return RELAY_STATE_NAMES[self.state]

    def close(self, str reason="killed"):
        """Abort both sides now (control plane: kill, shutdown)."""
        self.close_both(reason, True)
