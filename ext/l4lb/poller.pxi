# The poller: readiness of every relay socket through one edge-triggered epoll.
#
# Theory of operation (DESIGN.md §8):
# - One epoll instance per Hub holds both sockets of every relay, registered once for
#   IN|PRI|OUT|RDHUP, edge-triggered, and never modified; the loop watches that epoll fd
#   with one reader. So an event costs no Python object, no epoll_ctl and no uvloop
#   handle churn: per-fd add_reader/remove_reader toggling for backpressure would create
#   and destroy uvloop poll handles (about 6 syscalls each). uvloop refuses add_reader
#   on a transport's fd anyway, which is why relays own raw sockets.
# - Edge-triggered means a socket is known readable (writable) from its edge until a
#   read (write) on it returns EAGAIN: the relay keeps those two flags per socket.
# - An event's data is the relay's address with the low bit telling the backend socket
#   from the client's. The relay is not referenced by the epoll: it is kept alive by the
#   hub's list until it closes, and closing its sockets removes them from the epoll
#   (nothing else holds a dup). A batch holds a reference to each of its relays, so one
#   closed (and freed) by an earlier event of the batch is still safe to look at.
# - A relay that used its pump budget with bytes left is run again on the next loop
#   iteration (defer), after the others of the batch had their turn.
# - The poller also owns the pipe pool its relays borrow from (pump.pxi).
from cpython.ref cimport PyObject
from libc.errno cimport errno
from libc.stdint cimport uintptr_t
from l4lb.includes.system cimport (Py_IncRef, Py_DecRef, c_close, epoll_create1, epoll_ctl,
                                   epoll_wait, EPOLLIN, EPOLLPRI, EPOLLOUT, EPOLLRDHUP,
                                   EPOLLET, EPOLL_CTL_ADD, EPOLL_CLOEXEC)

cdef enum:
    # Events taken from the epoll per loop readiness (the rest stay ready for the next).
    POLL_BATCH = 64

cdef uint32_t POLL_EVENTS = <uint32_t>(EPOLLIN | EPOLLPRI | EPOLLOUT | EPOLLRDHUP) | <uint32_t>EPOLLET


cdef Poller poller_of(Hub hub):
    """The Hub's Poller, created (and watched by the loop) on first use."""
    if hub.splice_poller is None:
        hub.splice_poller = Poller(hub)
    return <Poller>hub.splice_poller


@cython.final
cdef class Poller:
    """The edge-triggered epoll of a Hub's relay sockets (see the top of poller.pxi)."""

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

    cdef void defer(self, Relay r):
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
        cdef Relay r
        if n <= 0:
            return
        # Hold every relay of the batch: closing one (and dropping its last reference)
        # must not free it under a later event of the same batch.
        for i in range(n):
            Py_IncRef(<PyObject*><void*><uintptr_t>(self.events[i].data.u64 & ~(<uint64_t>1)))
        try:
            for i in range(n):
                tag = self.events[i].data.u64
                r = <Relay><object><PyObject*><void*><uintptr_t>(tag & ~(<uint64_t>1))
                if r.state != RELAY_CLOSED:
                    r.on_event(<bint>(tag & 1), self.events[i].events)
        finally:
            r = None
            for i in range(n):
                Py_DecRef(<PyObject*><void*><uintptr_t>(self.events[i].data.u64 & ~(<uint64_t>1)))

    def _run_again(self):
        cdef Relay r
        batch = self.again
        self.again = []
        self.again_scheduled = False
        for obj in batch:
            r = <Relay>obj
            r.deferred = False
            if r.state == RELAY_OPEN:
                r.pump_both()

    cdef int watch(self, int fd, Relay r, bint backend) noexcept:
        cdef epoll_event ev
        ev.events = POLL_EVENTS
        ev.data.u64 = <uint64_t><uintptr_t><void*>r | <uint64_t>backend
        return epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev)
