# The splice(2) relay: bulk bytes move socket -> pipe -> socket inside the kernel.
#
# Theory of operation (DESIGN.md §8, NOTES "splice(2)"):
# - A listener with `splice = true` accepts on its own (SpliceServer: accept4 in a bounded
#   batch from one loop reader per listening socket) and relays with SpliceRelay, a Relay
#   subclass that owns raw nonblocking sockets. uvloop refuses add_reader on a
#   transport's fd, and a transport would copy every byte through user space anyway.
# - Admission, pool and backend choice, retries with `avoid`, queueing when every backend
#   is full, passive health, the access log and the Target counters are Relay's own code:
#   only the connect (open_backend_connection), the pump and the close differ.
# - Readiness: one edge-triggered epoll instance per Hub (SplicePoller) holds both sockets
#   of every splice relay, registered once for IN|OUT|RDHUP and never modified; the loop
#   watches that epoll fd with one reader. So an event costs no Python object, no
#   epoll_ctl and no uvloop handle churn: per-fd add_reader/remove_reader toggling for
#   backpressure would create and destroy uvloop poll handles (about 6 syscalls each).
#   Edge-triggered means a socket is known readable (writable) from its edge until a
#   splice on it returns EAGAIN; the relay keeps those two flags per socket.
# - Pump, per direction: while the pipe holds bytes, splice them into dst; once it is
#   empty, splice up to SPLICE_CHUNK from src into it. dst would block -> the bytes wait in
#   the pipe and src is not read (its flag stays set) until dst's EPOLLOUT edge: memory
#   per direction is bounded by the pipe. The pipe is filled only when empty, so EAGAIN
#   from src always means "no data" and never "pipe full".
# - Short reads: a read that returns less than it asked for took all there was, so the
#   read that would only say EAGAIN is skipped; once the peer's FIN is in (EPOLLRDHUP
#   without EPOLLERR), such a read is the last, and its bytes go out with MSG_MORE so
#   that the shutdown right after puts the FIN into their segment (one packet and one
#   recv less per closing exchange). TCP urgent data (EPOLLPRI) ends both rules for that
#   direction: a read stops short at the urgent mark.
# - Fairness: a pump moves at most SPLICE_BUDGET bytes per event; a relay that still has
#   bytes to read is run again on the next loop iteration (SplicePoller.again).
# - Half close: src EOF -> once the pipe is drained, shutdown(dst, SHUT_WR); the other
#   direction goes on; both done -> close. A reset (an error from splice, or EPOLLERR)
#   closes both with SO_LINGER 0, so the other side sees the reset too.
# - Before the backend is connected the client is not read at all: its bytes wait in its
#   kernel socket buffer (no `pending` copy). A client that leaves while its connect is
#   in flight or while it is queued is noticed by EPOLLERR/EPOLLHUP.
# - Not supported: accept_proxy (config validation refuses it with splice); send_proxy
#   is: the header is written with send() before the first splice.
from cpython.ref cimport PyObject
from libc.stdint cimport uintptr_t
from libc.errno cimport (errno, EAGAIN, EINTR, EINPROGRESS, EPIPE, ECONNREFUSED,
                         ECONNABORTED, ETIMEDOUT, EMFILE, ENFILE, ENOBUFS, ENOMEM, EPROTO)
from libc.string cimport memset, memcpy
from libc.stdlib cimport malloc, free

import socket as _socket

cdef extern from "Python.h":
    void Py_IncRef(PyObject*)
    void Py_DecRef(PyObject*)

cdef extern from "<fcntl.h>" nogil:
    ssize_t c_splice "splice" (int fd_in, void* off_in, int fd_out, void* off_out,
                               size_t length, unsigned int flags)
    int c_fcntl "fcntl" (int fd, int cmd, int arg)
    enum: SPLICE_F_MOVE
    enum: SPLICE_F_NONBLOCK
    enum: F_SETPIPE_SZ
    enum: O_NONBLOCK
    enum: O_CLOEXEC

cdef extern from "<unistd.h>" nogil:
    int c_close "close" (int fd)
    int c_pipe2 "pipe2" (int* fds, int flags)
    ssize_t c_write "write" (int fd, const void* buf, size_t length)

cdef extern from "<sys/epoll.h>" nogil:
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)
    enum: EPOLLIN
    enum: EPOLLPRI
    enum: EPOLLOUT
    enum: EPOLLERR
    enum: EPOLLHUP
    enum: EPOLLRDHUP
    enum: EPOLLET
    enum: EPOLL_CTL_ADD
    enum: EPOLL_CLOEXEC

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct sockaddr:
        unsigned short sa_family
    cdef struct sockaddr_storage:
        unsigned short ss_family
    cdef struct linger:
        int l_onoff
        int l_linger
    int c_socket "socket" (int domain, int type, int protocol)
    int c_connect "connect" (int fd, const sockaddr* addr, socklen_t length)
    int c_accept4 "accept4" (int fd, sockaddr* addr, socklen_t* length, int flags)
    int c_getsockopt "getsockopt" (int fd, int level, int optname, void* value, socklen_t* length)
    int c_setsockopt "setsockopt" (int fd, int level, int optname, const void* value, socklen_t length)
    int c_getsockname "getsockname" (int fd, sockaddr* addr, socklen_t* length)
    int c_shutdown "shutdown" (int fd, int how)
    ssize_t c_send "send" (int fd, const void* buf, size_t length, int flags)
    ssize_t c_recv "recv" (int fd, void* buf, size_t length, int flags)
    enum: SOCK_STREAM
    enum: SOCK_NONBLOCK
    enum: SOCK_CLOEXEC
    enum: SOL_SOCKET
    enum: SO_ERROR
    enum: SO_LINGER
    enum: SO_RCVBUF
    enum: SO_SNDBUF
    enum: SHUT_WR
    enum: MSG_NOSIGNAL
    enum: MSG_PEEK
    enum: MSG_MORE

cdef extern from "<netinet/in.h>" nogil:
    cdef struct in_addr:
        uint32_t s_addr
    cdef struct in6_addr:
        unsigned char s6_addr[16]
    cdef struct sockaddr_in:
        unsigned short sin_family
        unsigned short sin_port
        in_addr sin_addr
    cdef struct sockaddr_in6:
        unsigned short sin6_family
        unsigned short sin6_port
        in6_addr sin6_addr
    enum: IPPROTO_TCP
    unsigned short htons(unsigned short)
    unsigned short ntohs(unsigned short)

cdef extern from "<netinet/tcp.h>" nogil:
    enum: TCP_NODELAY

cdef extern from "<arpa/inet.h>" nogil:
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)


cdef enum:
    # 1 MiB per splice through a 1 MiB pipe: the cheapest per GB measured here (NOTES).
    SPLICE_CHUNK = 1024 * 1024
    # Bytes one relay may move per event before the others get their turn.
    SPLICE_BUDGET = 4 * 1024 * 1024
    # Connections taken per accept readiness: enough to drain a burst, bounded so a
    # flood cannot hold the loop.
    ACCEPT_BATCH = 64
    # Events taken from the epoll per loop readiness (the rest stay ready for the next).
    POLL_BATCH = 64
    # Each direction copies (recv + send through COPY_BUFFER) while what it reads is
    # small, and splices while it is large. Small exchanges (requests, replies,
    # keep-alive traffic) cost two plain syscalls, as in any proxy, and a connection that
    # never carries bulk data never creates its pipes (pipe2, fcntl and two closes each:
    # 8 syscalls per connection). A copy read that fills COPY_CHUNK means bulk is
    # waiting: the direction gets its pipe and splices; SMALL_READS_TO_COPY splice reads
    # in a row under COPY_SMALL turn it back to copying (one alone is often just the end
    # of a burst: flipping on it sent up to a fifth of a fast bulk flow's bytes through
    # the copy path). COPY_CHUNK is at most a default pipe's capacity (64 KiB), so what
    # a short send leaves always fits into the direction's pipe in one write.
    COPY_CHUNK = 64 * 1024
    COPY_SMALL = 16 * 1024
    SMALL_READS_TO_COPY = 4
    # Bytes peeked for a PROXY header: the longest one the parser accepts is a v2 header
    # of 16 + MAX_V2_LENGTH (1024) bytes, so a peek this long always decides.
    HEADER_PEEK = 1088

# The one copy buffer of the process: the pump never holds bytes in it across calls.
cdef char COPY_BUFFER[65536]

SPLICE_PIPE_SIZE = SPLICE_CHUNK
SPLICE_HEADER_PEEK = HEADER_PEEK
# Seconds accept stays paused after EMFILE/ENFILE: room for connections to close.
ACCEPT_PAUSE = 0.1
# accept4() errors that mean "this process or the system is out of descriptors or
# memory": pause accepting, never spin on a listener that stays readable.
ACCEPT_CAPACITY_ERRNOS = frozenset({_errno.EMFILE, _errno.ENFILE, _errno.ENOBUFS,
                                    _errno.ENOMEM})

cdef unsigned int SPLICE_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
cdef uint32_t SPLICE_EVENTS = <uint32_t>(EPOLLIN | EPOLLPRI | EPOLLOUT | EPOLLRDHUP) | <uint32_t>EPOLLET

cdef enum:
    SPLICE_WAIT = 0         # nothing more until the next edge
    SPLICE_MORE = 1         # budget used up while src is still readable: run again soon
    SPLICE_DONE = 2         # src ended and all was delivered: dst shut down for writing
    SPLICE_SRC_FAILED = 3   # reading src failed (d.err)
    SPLICE_DST_FAILED = 4   # writing dst failed (d.err)


cdef inline bint _overload_errno(int e) noexcept nogil:
    return e == EMFILE or e == ENFILE or e == ENOBUFS or e == ENOMEM


cdef inline void _close_fd(int fd, bint reset) noexcept nogil:
    """Close a socket; with `reset`, SO_LINGER 0 first so the peer gets an RST."""
    cdef linger lg
    if fd < 0:
        return
    if reset:
        lg.l_onoff = 1
        lg.l_linger = 0
        c_setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))
    c_close(fd)


cdef inline void _set_nodelay(int fd) noexcept nogil:
    # As uvloop does for TCP transports: a small write is sent at once, not held by Nagle.
    cdef int one = 1
    c_setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))


cdef inline Py_ssize_t _max_pipes(int64_t max_connections) noexcept nogil:
    return (max_connections + 3) // 4 if max_connections > 0 else 0


def max_pipes(int64_t max_connections):
    """The pipes the process keeps open at most (in use or kept for reuse): a quarter of
    global.max_connections, HAProxy's default maxpipes; 0 (unlimited connections) = no
    cap. The relay's cap and the descriptor arithmetic of l4lb.metrics both use it."""
    return _max_pipes(max_connections)


cdef inline bint _pipe_available(pipe_pool* pool) noexcept nogil:
    """Whether _acquire_pipe can hand out a pipe without passing the pool's cap."""
    return pool.nfree > 0 or (not pool.starved and (pool.cap <= 0 or pool.open < pool.cap))


cdef inline void _set_buffers(int fd, int rcvbuf, int sndbuf) noexcept nogil:
    """SO_RCVBUF / SO_SNDBUF of a new backend socket, before connect (0: leave the
    kernel's autotuning)."""
    if rcvbuf > 0:
        c_setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(int))
    if sndbuf > 0:
        c_setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(int))


cdef int _acquire_pipe(splice_dir* d) noexcept nogil:
    """Give the direction a pipe: a kept empty one, or a new nonblocking one sized
    SPLICE_CHUNK when the system allows it (refused past fs.pipe-max-size or the
    per-user pipe page budget, unprivileged: the pipe keeps the default 64 KiB, which
    still works). Returns 0, or an errno: EMFILE when the cap is reached or the pool is
    starved, pipe2's own when it fails (the pool is then starved until something
    closes)."""
    cdef pipe_pool* pool = d.pool
    cdef int fds[2]
    cdef int e
    if pool.nfree > 0:
        pool.nfree -= 1
        d.pr = pool.free_r[pool.nfree]
        d.pw = pool.free_w[pool.nfree]
        return 0
    if not _pipe_available(pool):       # at the cap, or starved
        return EMFILE
    if c_pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        e = errno
        pool.starved = True
        return e
    c_fcntl(fds[1], F_SETPIPE_SZ, SPLICE_CHUNK)
    pool.open += 1
    pool.created += 1
    d.pr = fds[0]
    d.pw = fds[1]
    return 0


cdef inline void _release_pipe(splice_dir* d) noexcept nogil:
    """Hand the direction's pipe back: an empty one is kept for reuse (up to
    PIPE_POOL_KEEP), one that still holds bytes (a relay closing mid-transfer) is
    closed, since its bytes belong to nobody now."""
    cdef pipe_pool* pool = d.pool
    if d.pr < 0:
        return
    if d.held == 0 and pool.nfree < PIPE_POOL_KEEP:
        pool.free_r[pool.nfree] = d.pr
        pool.free_w[pool.nfree] = d.pw
        pool.nfree += 1
    else:
        c_close(d.pr)
        c_close(d.pw)
        pool.open -= 1
        pool.starved = False
    d.pr = d.pw = -1
    d.held = 0


cdef inline void _note_src_events(splice_dir* d, uint32_t ev) noexcept nogil:
    """What an epoll event on d's source says about how its reads may be trusted (see
    the top of this file: short reads)."""
    if ev & EPOLLPRI:
        d.src_urg = True
    if ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        d.src_hup = True
        d.src_fin = (ev & (EPOLLRDHUP | EPOLLERR)) == EPOLLRDHUP


cdef inline void _free_spill(splice_dir* d) noexcept nogil:
    free(d.spill)
    d.spill = NULL
    d.spill_len = d.spill_off = 0


cdef int _copy_once(splice_dir* d, bint* readable, bint* writable, int64_t* nread) noexcept nogil:
    """One recv + send of up to COPY_CHUNK bytes; what the send leaves goes into the
    direction's pipe. When no pipe can be had (the pool's cap), the read is a MSG_PEEK
    and only what the send took is then taken off the socket: the rest stays in the
    kernel. Returns -1 to go on pumping, or a SPLICE_* code."""
    cdef bint peek = d.pr < 0 and not _pipe_available(d.pool)
    cdef ssize_t n = c_recv(d.src, COPY_BUFFER, COPY_CHUNK, MSG_PEEK if peek else 0)
    cdef ssize_t sent, w
    cdef int more = 0
    if n == 0:
        d.eof = True
        readable[0] = False
        return -1
    if n < 0:
        if errno == EINTR:
            return -1
        if errno == EAGAIN:
            readable[0] = False
            return SPLICE_WAIT
        d.err = errno
        return SPLICE_SRC_FAILED
    if n == COPY_CHUNK and not peek:
        d.bulk = True                    # more was waiting: splice from the next read on
    elif d.src_fin and not d.src_urg and not peek:
        # The peer's FIN came before this read, which took all there was: what follows
        # is end of file, so it is not read. The bytes go out with MSG_MORE and the
        # shutdown (or close) that follows at once puts the FIN in their segment.
        d.eof = True
        readable[0] = False
        more = MSG_MORE
    elif not d.src_hup and not d.src_urg and not peek:
        # A short read took all there was: a later arrival brings a new edge, so the
        # recv that would only say EAGAIN is skipped (two syscalls per request and
        # reply). Not once the peer has shut down: its FIN may have come with the
        # edge being handled, and only reading on finds it.
        readable[0] = False
    sent = c_send(d.dst, COPY_BUFFER, <size_t>n, MSG_NOSIGNAL | more) if writable[0] else 0
    if sent < 0:
        if errno != EAGAIN and errno != EINTR:
            d.err = errno
            return SPLICE_DST_FAILED
        sent = 0
    if peek:
        if sent > 0 and c_recv(d.src, COPY_BUFFER, <size_t>sent, 0) != sent:
            d.err = errno                # cannot happen: the bytes were peeked
            return SPLICE_SRC_FAILED
        nread[0] += sent
        if sent < n:
            writable[0] = False          # dst is full; its EPOLLOUT edge resumes this
            return SPLICE_WAIT
        return -1
    nread[0] += n
    if sent < n:
        if d.pr < 0 and _acquire_pipe(d) != 0:
            # pipe2 failed just now (out of descriptors) and the bytes are off the
            # socket: keep them on the heap (at most COPY_CHUNK, this once; the pool is
            # starved now, so the next reads peek) until dst takes them.
            d.spill = <char*>malloc(<size_t>(n - sent))
            if d.spill == NULL:
                d.err = ENOMEM
                return SPLICE_DST_FAILED
            memcpy(d.spill, COPY_BUFFER + sent, <size_t>(n - sent))
            d.spill_len = n - sent
            d.spill_off = 0
            return -1
        w = c_write(d.pw, COPY_BUFFER + sent, <size_t>(n - sent))
        if w != n - sent:                # cannot happen: the pipe is empty and big enough
            d.err = errno if w < 0 else EPIPE
            return SPLICE_DST_FAILED
        d.held = n - sent
    return -1


cdef int splice_pump(splice_dir* d, bint* readable, bint* writable, int64_t* nread,
                     bint peer_done) noexcept nogil:
    """Move bytes src -> pipe -> dst until an EAGAIN, EOF, error or the budget says stop.
    Returns SPLICE_*; adds the bytes read from src to nread[0]. Never blocks.
    `peer_done`: the other direction has ended, so the relay closes both sockets as soon
    as this one ends, and close() sends the FIN a shutdown would."""
    cdef ssize_t n
    cdef Py_ssize_t budget = SPLICE_BUDGET
    cdef int64_t before
    cdef int rc
    while True:
        if d.spill_len > 0 or d.held > 0:
            if not writable[0]:
                return SPLICE_WAIT
            if d.spill_len > 0:          # spilled bytes (pipe2 failed) go before the pipe's
                n = c_send(d.dst, d.spill + d.spill_off, <size_t>(d.spill_len - d.spill_off),
                           MSG_NOSIGNAL)
            else:
                n = c_splice(d.pr, NULL, d.dst, NULL, <size_t>d.held, SPLICE_FLAGS)
            if n > 0:
                if d.spill_len == 0:
                    d.held -= n
                else:
                    d.spill_off += n
                    if d.spill_off == d.spill_len:
                        _free_spill(d)
                continue                 # a short write is confirmed by the EAGAIN next
            if n < 0 and errno == EINTR:
                continue
            if n < 0 and errno == EAGAIN:
                writable[0] = False      # the EPOLLOUT edge sets it again
                return SPLICE_WAIT
            d.err = errno if n < 0 else EPIPE
            return SPLICE_DST_FAILED
        if d.eof:
            if not peer_done:
                c_shutdown(d.dst, SHUT_WR)   # an error here shows up on the other direction
            d.done = True
            return SPLICE_DONE
        if not readable[0]:
            return SPLICE_WAIT
        if budget <= 0:
            return SPLICE_MORE
        if not d.bulk:
            before = nread[0]
            rc = _copy_once(d, readable, writable, nread)
            budget -= nread[0] - before
            if rc >= 0:
                return rc
            continue
        if d.pr < 0 and _acquire_pipe(d) != 0:
            d.bulk = False               # no pipe to be had: copy (see _copy_once)
            continue
        n = c_splice(d.src, NULL, d.pw, NULL, SPLICE_CHUNK, SPLICE_FLAGS)
        if n > 0:
            d.held += n
            nread[0] += n
            budget -= n
            if n >= COPY_SMALL:
                d.small_reads = 0
            else:
                d.small_reads += 1
                if d.small_reads >= SMALL_READS_TO_COPY:
                    d.bulk = False       # the flow got thin: copy again
                    d.small_reads = 0
            continue
        if n == 0:
            d.eof = True
            readable[0] = False
            continue
        if errno == EINTR:
            continue
        if errno == EAGAIN:              # the pipe is empty here: EAGAIN means no data
            readable[0] = False
            return SPLICE_WAIT
        d.err = errno
        return SPLICE_SRC_FAILED


cdef object _sockaddr_host_port(sockaddr_storage* ss):
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


cdef socklen_t _fill_sockaddr(int family, object host, int port, sockaddr_storage* ss) except? 0:
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


cdef SplicePoller splice_poller_of(Hub hub):
    """The Hub's SplicePoller, created (and watched by the loop) on first use."""
    if hub.splice_poller is None:
        hub.splice_poller = SplicePoller(hub)
    return <SplicePoller>hub.splice_poller


@cython.final
cdef class SplicePoller:
    """The edge-triggered epoll of a Hub's splice sockets (see the top of splice.pxi)."""

    def __cinit__(self, Hub hub):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.hub = hub
        self.loop = hub.loop
        self.again = []
        self.on_readable = self._readable
        self.on_again = self._run_again
        self.loop.add_reader(self.epfd, self.on_readable)

    def __dealloc__(self):
        if self.epfd >= 0:
            c_close(self.epfd)
        while self.pipes.nfree > 0:
            self.pipes.nfree -= 1
            c_close(self.pipes.free_r[self.pipes.nfree])
            c_close(self.pipes.free_w[self.pipes.nfree])

    @property
    def pipe_stats(self):
        """The pool's pipes, as `show info` reports them: used (holding bytes of a
        relay), free (empty, kept for reuse), max (the cap; 0 = none) and created (pipe2
        calls so far)."""
        return {"used": self.pipes.open - self.pipes.nfree, "free": self.pipes.nfree,
                "max": self.pipes.cap, "created": self.pipes.created}

    cdef void defer(self, SpliceRelay r):
        if r.deferred:
            return
        r.deferred = True
        self.again.append(r)
        if not self.again_scheduled:
            self.again_scheduled = True
            self.loop.call_soon(self.on_again)

    def _readable(self):
        """The loop's callback: dispatch one batch of edges to their relays."""
        cdef int n = epoll_wait(self.epfd, self.events, POLL_BATCH, 0)
        cdef int i
        cdef uint64_t tag
        cdef SpliceRelay r
        if n <= 0:
            return
        # Hold every relay of the batch: closing one (and dropping its last reference)
        # must not free it under a later event of the same batch.
        for i in range(n):
            Py_IncRef(<PyObject*><void*><uintptr_t>(self.events[i].data.u64 & ~(<uint64_t>1)))
        try:
            for i in range(n):
                tag = self.events[i].data.u64
                r = <SpliceRelay><object><PyObject*><void*><uintptr_t>(tag & ~(<uint64_t>1))
                if r.state != RELAY_CLOSED:
                    r.on_event(<bint>(tag & 1), self.events[i].events)
        finally:
            r = None
            for i in range(n):
                Py_DecRef(<PyObject*><void*><uintptr_t>(self.events[i].data.u64 & ~(<uint64_t>1)))

    def _run_again(self):
        cdef SpliceRelay r
        batch = self.again
        self.again = []
        self.again_scheduled = False
        for obj in batch:
            r = <SpliceRelay>obj
            r.deferred = False
            if r.state == RELAY_OPEN:
                r.pump_both()

    cdef int watch(self, int fd, SpliceRelay r, bint backend) noexcept:
        cdef epoll_event ev
        ev.events = SPLICE_EVENTS
        ev.data.u64 = <uint64_t><uintptr_t><void*>r | <uint64_t>backend
        return epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev)


@cython.final
cdef class SpliceServer:
    """Accepts a splice listener's connections (accept4 in C) and hands each to a new
    SpliceRelay. EMFILE/ENFILE pause accepting for ACCEPT_PAUSE s (counted in
    `pauses` and as the listener's `accept_paused`; the balancer logs once per episode),
    so a listener that stays readable never spins the loop."""

    def __cinit__(self, sock, ListenerRuntime listener=None):
        self.sock = sock
        self.sockets = [sock]
        self.fd = sock.fileno()
        # Accepted sockets inherit TCP_NODELAY from the listening socket (Linux copies
        # the listener's TCP state into each child), so it is set once here, not once
        # per connection.
        _set_nodelay(self.fd)
        self.on_readable = self._readable
        self.on_resume = self._resume
        if listener is not None:
            self.attach(listener)

    def attach(self, ListenerRuntime listener):
        """Start accepting for `listener` (a reload opens the socket before the listener
        exists)."""
        if self.closed or self.listener is not None:
            return
        self.listener = listener
        self.poller = splice_poller_of(listener.hub)
        self.poller.loop.add_reader(self.fd, self.on_readable)
        self.reading = True

    def close(self):
        """Stop accepting and close the listening socket; live relays go on. Idempotent."""
        if self.closed:
            return
        self.closed = True
        if self.reading:
            self.reading = False
            self.poller.loop.remove_reader(self.fd)
        self.sock.close()

    def _readable(self):
        self.accept_batch()

    def _resume(self):
        if self.closed or not self.paused:
            return
        self.paused = False
        self.reading = True
        self.poller.loop.add_reader(self.fd, self.on_readable)

    cdef void accept_batch(self):
        cdef sockaddr_storage ss
        cdef socklen_t slen
        cdef int fd, e, i
        for i in range(ACCEPT_BATCH):
            slen = sizeof(ss)
            fd = c_accept4(self.fd, <sockaddr*>&ss, &slen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd >= 0:
                splice_accepted(self.listener, self.poller, fd, &ss)
                if self.closed:
                    return
                continue
            e = errno
            if e == EAGAIN:
                return
            if e == EINTR or e == ECONNABORTED or e == EPROTO:
                continue                 # that one client is gone; take the next
            self.accept_failed()         # EMFILE, ENFILE, ENOBUFS, ENOMEM or stranger
            return

    cdef void accept_failed(self):
        """accept4 found no descriptor (or memory): the balancer pauses every listener,
        this one included, and logs it once per episode; without a balancer (the hub has
        no on_overload), this listener pauses itself."""
        cdef Hub hub = self.listener.hub
        if hub.on_overload is not None:
            hub.on_overload()
        if not self.paused and self.pause():
            self.listener.count_rejected("accept_paused")

    def pause(self, double seconds=ACCEPT_PAUSE):
        """Stop accepting for `seconds`; False when already paused (or closed). The same
        contract as the balancer's PausableServer.pause."""
        if self.closed or self.paused or self.listener is None:
            return False
        self.pauses += 1
        if self.reading:
            self.reading = False
            self.poller.loop.remove_reader(self.fd)
        self.paused = True
        self.poller.loop.call_later(seconds, self.on_resume)
        return True


cdef void splice_accepted(ListenerRuntime lst, SplicePoller poller, int fd,
                          sockaddr_storage* ss):
    """What Relay.connection_made does, for an accepted raw socket."""
    cdef Hub hub = lst.hub
    cdef SpliceRelay r = SpliceRelay.__new__(SpliceRelay)
    r.listener = lst
    r.hub = hub
    r.poller = poller
    r.slot = -1
    r.cfd = fd
    r.bfd = -1
    r.up.pool = r.down.pool = &poller.pipes
    poller.pipes.cap = _max_pipes(hub.max_connections)     # follows a reload
    r.started = _now()
    r.last_active = r.started
    r.client_host, r.client_port = _sockaddr_host_port(ss)
    if hub.max_connections > 0 and hub.active >= hub.max_connections:   # 0 = unlimited
        r.reject("global_max_connections")
        return
    if lst.max_connections > 0 and lst.active >= lst.max_connections:
        r.reject("max_connections")
        return
    r.id = hub.next_id
    hub.next_id += 1
    hub.active += 1
    hub.total += 1
    lst.active += 1
    hub.link(r)
    # Readable and writable until a splice says EAGAIN: whatever arrived before the
    # registration is then read without waiting for an edge.
    r.c_readable = True
    r.c_writable = True
    if poller.watch(fd, r, False) < 0:
        lst.count_rejected("fd_exhausted")
        r.close_both("fd_exhausted", True)
        return
    if lst.accept_proxy:
        # The header is read by read_proxy_header_raw on the client's first edge (a
        # registration reports bytes that arrived before it).
        r.state = RELAY_HEADER
        r.deadline = r.started + lst.proxy_timeout
        return
    r.state = RELAY_CONNECTING
    r.admit()


cdef class SpliceRelay(Relay):
    """A Relay whose bytes stay in the kernel (see the top of splice.pxi). Linked in the
    Hub's list like every relay: show conns, kill, drain, shutdown and the sweep's
    timeouts treat it the same."""

    def __cinit__(self):
        self.cfd = -1
        self.bfd = -1
        self.up.pr = self.up.pw = self.down.pr = self.down.pw = -1

    def __dealloc__(self):
        # Only reached with open descriptors if a relay was dropped without close_both.
        self.close_fds(True)

    cdef void reject(self, str reason):
        self.state = RELAY_CLOSED
        self.listener.count_rejected(reason)
        _close_fd(self.cfd, False)
        self.cfd = -1

    # --- connecting ---------------------------------------------------------------------

    cdef void open_backend_connection(self, Target t):
        cdef sockaddr_storage ss
        self.connect_started = _now()
        self.deadline = self.connect_started + self.listener.connect_timeout
        if _fill_sockaddr(0, t.host, t.port, &ss):
            self.connect_address(0, t.host, t.port)
            return
        # A hostname: resolve it (per connection, as loop.create_connection does).
        fut = asyncio.ensure_future(
            self.hub.loop.getaddrinfo(t.host, t.port, type=_socket.SOCK_STREAM))
        self.connect_task = fut
        fut.add_done_callback(self._resolved)

    def _resolved(self, fut):
        if self.connect_task is not fut or self.state != RELAY_CONNECTING:
            return
        self.connect_task = None
        if fut.cancelled() or fut.exception() is not None or not fut.result():
            self.connect_failed("connect_error")
            return
        family, _, _, _, addr = fut.result()[0]
        self.connect_address(family, addr[0], addr[1])

    cdef void connect_address(self, int family, object host, int port):
        """Start a nonblocking connect to host:port (an IP literal); completion is the
        backend socket's first edge (check_connect)."""
        cdef sockaddr_storage ss
        cdef socklen_t slen = _fill_sockaddr(family, host, port, &ss)
        cdef int fd, e
        if slen == 0:
            self.connect_failed("connect_error")
            return
        fd = c_socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        if fd < 0:
            if _overload_errno(errno):
                self.refuse_overloaded()
            else:
                self.connect_failed("connect_error")
            return
        _set_nodelay(fd)
        _set_buffers(fd, self.listener.rcvbuf, self.listener.sndbuf)
        if c_connect(fd, <sockaddr*>&ss, slen) < 0 and errno != EINPROGRESS:
            e = errno
            c_close(fd)
            if _overload_errno(e):
                self.refuse_overloaded()
            else:
                self.connect_failed(_connect_errno_reason(e))
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
            self.splice_connected(ev)    # writable without an error: connected
            return
        if c_getsockopt(self.bfd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0:
            err = errno
        if err == 0:
            if ev & EPOLLOUT:
                self.splice_connected(ev)
            return
        c_close(self.bfd)
        self.bfd = -1
        if _overload_errno(err):
            self.refuse_overloaded()
        else:
            self.connect_failed(_connect_errno_reason(err))

    cdef void splice_connected(self, uint32_t ev):
        cdef Target t = self.target
        cdef ListenerRuntime lst = self.listener
        cdef double now = _now()
        cdef bytes header
        cdef sockaddr_storage ss
        cdef socklen_t slen = sizeof(ss)
        cdef ssize_t n
        # The pipes come later, when a direction first carries bulk (see the pump).
        self.state = RELAY_OPEN
        self.last_active = self.hub.now
        self.b_writable = True
        self.b_readable = (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP)) != 0
        _note_src_events(&self.down, ev)
        self.up.src = self.cfd
        self.up.dst = self.bfd
        self.down.src = self.bfd
        self.down.dst = self.cfd
        t.total += 1
        self.pool.algo.observe_rt(t.slot, now - self.connect_started)
        if lst.send_proxy:
            if self.local_addr is None:
                if c_getsockname(self.cfd, <sockaddr*>&ss, &slen) == 0:
                    self.local_addr = _sockaddr_host_port(&ss)
            header = lst.proxy_encoder(lst.send_proxy, (self.client_host, self.client_port),
                                       self.local_addr)
            # A fresh socket's send buffer takes a header of at most a few hundred bytes.
            n = c_send(self.bfd, <const char*>header, len(header), MSG_NOSIGNAL)
            if n != len(header):
                self.close_both("backend_reset", True)
                return
        self.pump_both()

    cdef void read_proxy_header_raw(self, bint client_eof):
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
        self.state = RELAY_CONNECTING
        self.admit()

    # --- the pump ---------------------------------------------------------------------

    cdef void on_event(self, bint backend, uint32_t ev):
        if backend:
            if self.state == RELAY_CONNECTING:
                if self.bfd >= 0:
                    self.check_connect(ev)
                return
            _note_src_events(&self.down, ev)
            if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                self.b_readable = True
            if ev & (EPOLLOUT | EPOLLHUP | EPOLLERR):
                self.b_writable = True
        else:
            _note_src_events(&self.up, ev)
            if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
                self.c_readable = True
            if ev & (EPOLLOUT | EPOLLHUP | EPOLLERR):
                self.c_writable = True
            if self.state != RELAY_OPEN:
                if self.state == RELAY_HEADER:
                    self.read_proxy_header_raw((ev & (EPOLLRDHUP | EPOLLHUP)) != 0)
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
        cdef int rc_up = SPLICE_WAIT
        cdef int rc_down = SPLICE_WAIT
        cdef Target t = self.target
        if not self.up.done:
            rc_up = splice_pump(&self.up, &self.c_readable, &self.b_writable, &nin,
                                self.down.done)
        if rc_up < SPLICE_SRC_FAILED and not self.down.done:
            rc_down = splice_pump(&self.down, &self.b_readable, &self.c_writable, &nout,
                                  self.up.done)
        # A pipe is held only while bytes wait in it: an idle connection holds none.
        if self.up.pr >= 0 and self.up.held == 0:
            _release_pipe(&self.up)
        if self.down.pr >= 0 and self.down.held == 0:
            _release_pipe(&self.down)
        if nin or nout:
            self.bytes_in += nin
            self.bytes_out += nout
            t.bytes_in += nin
            t.bytes_out += nout
            self.last_active = self.hub.now
        if rc_up == SPLICE_SRC_FAILED or rc_down == SPLICE_DST_FAILED:
            self.close_both("client_reset", True)
        elif rc_up == SPLICE_DST_FAILED or rc_down == SPLICE_SRC_FAILED:
            self.close_both("backend_reset", True)
        elif self.up.done and self.down.done:
            self.close_both("closed", False)
        elif rc_up == SPLICE_MORE or rc_down == SPLICE_MORE:
            self.poller.defer(self)

    # --- closing ----------------------------------------------------------------------

    cdef void close_both(self, str reason, bint abort):
        """Close both sockets and the pipes and settle the counters.
        Idempotent: only the first call counts."""
        if self.state == RELAY_CLOSED:
            return
        cdef bint was_queued = self.state == RELAY_QUEUED
        if self.connect_task is not None:        # a hostname lookup in flight
            self.connect_task.cancel()
            self.connect_task = None
        self.state = RELAY_CLOSED
        # A reset on one side is passed on as a reset (SO_LINGER 0); every other close,
        # aborts included, is a plain close(), as uvloop's transport.abort() does (the
        # kernel still resets a socket that holds unread bytes).
        self.close_fds(abort and (reason == "client_reset" or reason == "backend_reset"))
        self.finish(reason)
        if was_queued:
            _drop_closed_queue_heads(self.pool)

    cdef void close_fds(self, bint reset):
        # Closing a socket also removes it from the epoll (nothing else holds a dup).
        _close_fd(self.cfd, reset)
        _close_fd(self.bfd, reset)
        self.cfd = self.bfd = -1
        _release_pipe(&self.up)
        _release_pipe(&self.down)
        _free_spill(&self.up)
        _free_spill(&self.down)
        if self.poller is not None:
            self.poller.pipes.starved = False    # descriptors were freed

    cdef void sweep_one(self, double now):
        if self.state == RELAY_CONNECTING:
            if now >= self.deadline and (self.bfd >= 0 or self.connect_task is not None):
                if self.connect_task is not None:
                    self.connect_task.cancel()
                    self.connect_task = None
                _close_fd(self.bfd, False)
                self.bfd = -1
                self.connect_failed("connect_timeout")
            return
        Relay.sweep_one(self, now)

    @property
    def splice(self):
        return True


cdef str _connect_errno_reason(int e):
    if e == ECONNREFUSED:
        return "connect_refused"
    if e == ETIMEDOUT:
        return "connect_timeout"
    return "connect_error"
