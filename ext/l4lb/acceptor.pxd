# The acceptor (acceptor.pxi): one per listening socket.
cimport cython
from libc.stdint cimport int64_t


@cython.final
cdef class Acceptor:
    # A listening socket whose connections become Relays; accepts with accept4 from the
    # loop's readiness callback. Looks like an asyncio.Server to the balancer
    # (`sockets`, `close()`).
    cdef readonly ListenerRuntime listener   # None until attach()
    cdef Poller poller                # the hub's poller its relays register in
    cdef readonly list sockets        # [the listening socket]
    cdef object sock                  # the listening socket (closed by close())
    cdef int fd                       # its descriptor
    cdef bint reading                 # the loop watches fd
    cdef bint paused                  # accept paused after EMFILE/ENFILE; resumes on a timer
    cdef bint closed                  # close() was called
    cdef object on_readable           # self._readable, bound once
    cdef object on_resume             # self._resume, bound once
    cdef void accept_batch(self)
    cdef void accept_failed(self)
