# The poller (poller.pxi): one edge-triggered epoll per Hub for every relay socket.
cimport cython
from l4lb.includes.system cimport epoll_event


@cython.final
cdef class Poller:
    # One per Hub: an edge-triggered epoll instance holding every relay socket, itself
    # watched by the loop (one add_reader for all connections).
    cdef int epfd                     # the epoll instance
    cdef Hub hub                      # whose relays it serves
    cdef object loop                  # the hub's loop (add_reader, call_soon)
    cdef object on_readable           # self._readable, bound once
    cdef object on_again              # self._run_again, bound once
    cdef list again                   # relays that stopped on their budget with bytes left
    cdef bint again_scheduled         # a call_soon(_run_again) is pending
    cdef epoll_event events[64]       # the batch epoll_wait fills (POLL_BATCH)
    cdef pipe_pool pipes              # the pipes of this poller's relays
    cdef void defer(self, Relay r)
    cdef int watch(self, int fd, Relay r, bint backend) noexcept
