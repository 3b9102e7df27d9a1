# The pump's state (pump.pxi): one splice_dir per direction of a relay, one pipe_pool
# per Poller.
from libc.stdint cimport int64_t

cdef enum:
    PIPE_POOL_KEEP = 64               # empty pipes a poller keeps for reuse

ctypedef struct pipe_pool:
    # A poller's pipes: empty ones kept for reuse, and a cap on all it has open (in use
    # or kept), like HAProxy's maxpipes. A direction holds a pipe only while bytes wait
    # in it (see pipe_acquire / pipe_release in pump.pxi).
    int free_r[PIPE_POOL_KEEP]        # read ends of the kept pipes
    int free_w[PIPE_POOL_KEEP]        # their write ends
    int nfree                         # kept pipes in free_r / free_w
    Py_ssize_t open                   # pipes open: in use + kept
    Py_ssize_t cap                    # most pipes open at once; 0 = no cap
    int64_t created                   # pipes ever created (pipe2), for tests and tuning
    bint starved                      # pipe2 failed (out of descriptors or pipe memory);
                                      # cleared when a pipe or a relay closes


ctypedef struct splice_dir:
    # One direction of a relay: src socket -> (copy buffer | pipe) -> dst socket.
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
