# The splice(2) relay (splice.pxi): raw sockets, one pipe per direction, one epoll per Hub.
from libc.stdint cimport int64_t, uint32_t, uint64_t

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data


cdef enum:
    PIPE_POOL_KEEP = 64               # empty pipes a poller keeps for reuse

ctypedef struct pipe_pool:
    # A poller's pipes: empty ones kept for reuse, and a cap on all it has open (in use
    # or kept), like HAProxy's maxpipes. A direction holds a pipe only while bytes wait
    # in it (see _acquire_pipe / _release_pipe in splice.pxi).
    int free_r[PIPE_POOL_KEEP]        # read ends of the kept pipes
    int free_w[PIPE_POOL_KEEP]        # their write ends
    int nfree
    Py_ssize_t open                   # pipes open: in use + kept
    Py_ssize_t cap                    # most pipes open at once; 0 = no cap
    int64_t created                   # pipes ever created (pipe2), for tests and tuning
    bint starved                      # pipe2 failed (out of descriptors or pipe memory);
                                      # cleared when a pipe or a relay closes


ctypedef struct splice_dir:
    # One direction of a splice relay: src socket -> pipe -> dst socket.
    int src                           # socket read from
    int dst                           # socket written to
    int pr                            # the pipe's read end (spliced into dst); -1 until needed
    int pw                            # the pipe's write end (spliced from src); -1 until needed
    bint bulk                         # splicing: the last reads were large (see the pump)
    int small_reads                   # splice reads under COPY_SMALL in a row
    Py_ssize_t held                   # bytes in the pipe not yet written to dst
    char* spill                       # bytes a short send left when no pipe could be had
    Py_ssize_t spill_len              # (pipe2 failed: out of descriptors), written to dst
    Py_ssize_t spill_off              # before anything else; NULL / 0 almost always
    bint eof                          # src returned end of file
    bint done                         # eof passed on: dst was shut down for writing
    bint src_hup                      # src reported EPOLLRDHUP/HUP/ERR: read it to the end
    bint src_fin                      # src reported EPOLLRDHUP without EPOLLERR: its FIN
                                      # is in, so a read that drains it is the last one
    bint src_urg                      # src reported EPOLLPRI (TCP urgent data): reads
                                      # stop short at the urgent mark, so no short read
                                      # is taken to mean "drained" any more
    int err                           # errno of the failure that ended it
    pipe_pool* pool                   # where the pipe comes from and goes back to


cdef class SpliceRelay


@cython.final
cdef class SplicePoller:
    # One per Hub: an edge-triggered epoll instance holding every splice socket, itself
    # watched by the loop (one add_reader for all splice connections).
    cdef int epfd                     # the epoll instance
    cdef Hub hub
    cdef object loop
    cdef object on_readable           # self._readable, bound once
    cdef object on_again              # self._run_again, bound once
    cdef list again                   # relays that stopped on their budget with bytes left
    cdef bint again_scheduled         # a call_soon(_run_again) is pending
    cdef epoll_event events[64]       # the batch epoll_wait fills
    cdef pipe_pool pipes              # the pipes of this poller's relays
    cdef void defer(self, SpliceRelay r)
    cdef int watch(self, int fd, SpliceRelay r, bint backend) noexcept


@cython.final
cdef class SpliceServer:
    # A listening socket whose connections become SpliceRelays; accepts with accept4 from
    # the loop's readiness callback. Looks like an asyncio.Server to the balancer
    # (`sockets`, `close()`).
    cdef readonly ListenerRuntime listener   # None until attach()
    cdef SplicePoller poller
    cdef readonly list sockets        # [the listening socket]
    cdef object sock
    cdef int fd
    cdef bint reading                 # the loop watches fd
    cdef bint paused                  # accept paused after EMFILE/ENFILE; resumes on a timer
    cdef bint closed
    cdef object on_readable           # self._readable, bound once
    cdef object on_resume             # self._resume, bound once
    cdef readonly int64_t pauses      # times accept was paused for lack of descriptors
    cdef void accept_batch(self)
    cdef void accept_failed(self)


cdef class SpliceRelay(Relay):
    # A relay whose bytes never enter user space: client and backend are raw nonblocking
    # sockets registered in the Hub's SplicePoller; each direction moves through a pipe.
    cdef SplicePoller poller
    cdef int cfd                      # client socket (owned), -1 once closed
    cdef int bfd                      # backend socket (owned), -1 until connecting / once closed
    cdef bint c_readable              # edge seen and not yet read to EAGAIN
    cdef bint c_writable              # no EAGAIN on write since the last EPOLLOUT edge
    cdef bint b_readable
    cdef bint b_writable
    cdef bint deferred                # queued in poller.again
    cdef double connect_started       # _now() when the backend connect began
    cdef splice_dir up                # client -> backend
    cdef splice_dir down              # backend -> client
    cdef void reject(self, str reason)
    cdef void open_backend_connection(self, Target t)
    cdef void close_both(self, str reason, bint abort)
    cdef void sweep_one(self, double now)
    cdef void on_event(self, bint backend, uint32_t ev)
    cdef void read_proxy_header_raw(self, bint client_eof)
    cdef void pump_both(self)
    cdef void connect_address(self, int family, object host, int port)
    cdef void check_connect(self, uint32_t ev)
    cdef void splice_connected(self, uint32_t ev)
    cdef void close_fds(self, bint reset)
