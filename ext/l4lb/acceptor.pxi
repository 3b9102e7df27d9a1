# The acceptor: a listening socket whose connections become Relays.
#
# Theory of operation (DESIGN.md §8):
# - One loop reader per listening socket; on readiness accept4() takes up to
#   ACCEPT_BATCH connections (enough to drain a burst, bounded so that a flood cannot
#   hold the loop) as nonblocking raw sockets, each handed to a new Relay.
# - Accepted sockets inherit TCP_NODELAY and the buffer sizes from the listening socket
#   (Linux copies the listener's state into each child): they are set once on the
#   listening socket, never per connection.
# - Out of descriptors or memory (OVERLOAD_ERRNOS): the balancer pauses every listener
#   for ACCEPT_PAUSE s (this one alone when there is no balancer), so a listener that
#   stays readable never spins the loop; the clients wait in the kernel's backlog.
#   A client gone before its accept (ECONNABORTED, EPROTO) is skipped.
# - It looks like an asyncio.Server to the balancer (`sockets`, `close()`); a reload
#   may open the socket before its listener exists (attach() comes later).
from libc.errno cimport errno, EAGAIN, EINTR, ECONNABORTED, EPROTO
from l4lb.includes.system cimport (c_accept4, sockaddr, sockaddr_storage, socklen_t,
                                   SOCK_NONBLOCK, SOCK_CLOEXEC)

cdef enum:
    ACCEPT_BATCH = 64       # connections taken per accept readiness


@cython.final
cdef class Acceptor:
    """Accepts a listener's connections (accept4 in C) and hands each to a new Relay.
    EMFILE/ENFILE pause accepting for ACCEPT_PAUSE s (counted as the listener's
    `accept_paused`; the balancer logs once per episode)."""

    def __cinit__(self, sock, ListenerRuntime listener=None):
        self.sock = sock
        self.sockets = [sock]
        self.fd = sock.fileno()
        set_nodelay(self.fd)
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
        self.poller = poller_of(listener.hub)
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
        cdef Relay r
        for i in range(ACCEPT_BATCH):
            slen = sizeof(ss)
            fd = c_accept4(self.fd, <sockaddr*>&ss, &slen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if fd >= 0:
                r = Relay.__new__(Relay)
                r.accepted(self.listener, self.poller, fd, &ss)
                if self.closed:
                    return
                continue
            e = errno
            if e == EAGAIN:
                return
            if e == EINTR or e == ECONNABORTED or e == EPROTO:
                continue                 # that one client is gone; take the next
            self.accept_failed()         # OVERLOAD_ERRNOS or stranger
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
        """Stop accepting for `seconds`; False when already paused (or closed)."""
        if self.closed or self.paused or self.listener is None:
            return False
        if self.reading:
            self.reading = False
            self.poller.loop.remove_reader(self.fd)
        self.paused = True
        self.poller.loop.call_later(seconds, self.on_resume)
        return True
