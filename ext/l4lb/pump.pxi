# The pump: bytes of one direction move src socket -> dst socket, copied while small,
# spliced through a pipe while bulk.
#
# Theory of operation (DESIGN.md §8, NOTES "splice(2)"):
# - Per direction (splice_dir): while bytes wait (in the pipe, or spilled), write them
#   to dst first; once none wait, read src. dst would block -> the bytes wait and src is
#   not read (its readable flag stays set) until dst's EPOLLOUT edge: memory per
#   direction is bounded by one pipe. The pipe is filled only when empty, so EAGAIN from
#   src always means "no data" and never "pipe full".
# - Copy or splice: a direction copies (recv + send through COPY_BUFFER) while what it
#   reads is small, and splices while it is large. Small exchanges (requests, replies,
#   keep-alive traffic) cost two plain syscalls, as in any proxy, and a connection that
#   never carries bulk data never creates a pipe (pipe2, fcntl and two closes each).
#   A copy read that fills COPY_CHUNK means bulk is waiting: the direction takes a pipe
#   and splices; SMALL_READS_TO_COPY splice reads in a row under COPY_SMALL turn it back
#   to copying (one alone is often just the end of a burst).
# - Pipes come from the poller's pipe_pool and go back as soon as they are empty, so an
#   idle connection holds none; past the pool's cap (HAProxy's maxpipes) a direction
#   copies, and a copy read then peeks so that what dst does not take stays in src's
#   kernel buffer. When pipe2 itself fails (out of descriptors) the bytes a short send
#   left are kept on the heap (spill), this once.
# - Short reads: a read that returns less than it asked for took all there was, so the
#   read that would only say EAGAIN is skipped; once the peer's FIN is in (EPOLLRDHUP
#   without EPOLLERR), such a read is the last, and its bytes go out with MSG_MORE so
#   that the shutdown right after puts the FIN into their segment (one packet and one
#   recv less per closing exchange).
# - TCP urgent data (MSG_OOB, SO_OOBINLINE off): reads stop short at the urgent mark,
#   so after EPOLLPRI no short read means "drained". recv() steps over the urgent byte
#   (dropping it, as HAProxy does) and reads on; splice() does not: at the mark it
#   returns EAGAIN (or 0 once the FIN is in too) however much follows. So a splice read
#   that says "no data" after EPOLLPRI, or "end of file" at all, is checked by a copy
#   read, which steps over the mark (a real end of file costs one recv more per bulk
#   direction, once per connection).
# - Fairness: a pump moves at most SPLICE_BUDGET bytes per call; the relay asks its
#   poller to run it again on the next loop iteration when bytes are left (PUMP_MORE).
# - End of file: once everything read is delivered, shutdown(dst, SHUT_WR) (PUMP_DONE);
#   the other direction goes on. Errors are PUMP_SRC_FAILED / PUMP_DST_FAILED with the
#   errno in d.err: the relay decides whose reset it was.
# - Everything here is nogil C: no Python object and no allocation per chunk.
from libc.errno cimport errno, EAGAIN, EINTR, EPIPE, EMFILE, ENOMEM
from libc.stdint cimport int64_t, uint32_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from l4lb.includes.system cimport (c_splice, c_fcntl, SPLICE_F_MOVE, SPLICE_F_NONBLOCK,
                                   F_SETPIPE_SZ, O_NONBLOCK, O_CLOEXEC, c_close, c_pipe2,
                                   c_write, c_recv, c_send, c_shutdown, SHUT_WR,
                                   MSG_NOSIGNAL, MSG_PEEK, MSG_MORE, EPOLLPRI, EPOLLRDHUP,
                                   EPOLLHUP, EPOLLERR)

cdef enum:
    # 1 MiB per splice through a 1 MiB pipe: the cheapest per GB measured here (NOTES).
    SPLICE_CHUNK = 1024 * 1024
    # Bytes one relay may move per pump before the others get their turn.
    SPLICE_BUDGET = 4 * 1024 * 1024
    # COPY_CHUNK is at most a default pipe's capacity (64 KiB), so what a short send
    # leaves always fits into the direction's pipe in one write.
    COPY_CHUNK = 64 * 1024
    COPY_SMALL = 16 * 1024
    SMALL_READS_TO_COPY = 4

cdef enum:
    PUMP_WAIT = 0           # nothing more until the next edge
    PUMP_MORE = 1           # budget used up while src is still readable: run again soon
    PUMP_DONE = 2           # src ended and all was delivered: dst shut down for writing
    PUMP_SRC_FAILED = 3     # reading src failed (d.err)
    PUMP_DST_FAILED = 4     # writing dst failed (d.err)

# The one copy buffer of the process: the pump never holds bytes in it across calls.
cdef char COPY_BUFFER[65536]

cdef unsigned int SPLICE_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK


cdef inline Py_ssize_t pipe_cap_for(int64_t max_connections) noexcept nogil:
    return (max_connections + 3) // 4 if max_connections > 0 else 0


def max_pipes(int64_t max_connections):
    """The pipes the process keeps open at most (in use or kept for reuse): a quarter of
    global.max_connections, HAProxy's default maxpipes; 0 (unlimited connections) = no
    cap. The relay's cap and the descriptor arithmetic of l4lb.metrics both use it."""
    return pipe_cap_for(max_connections)


cdef inline bint pipe_available(pipe_pool* pool) noexcept nogil:
    """Whether pipe_acquire can hand out a pipe without passing the pool's cap."""
    return pool.nfree > 0 or (not pool.starved and (pool.cap <= 0 or pool.open < pool.cap))


cdef int pipe_acquire(splice_dir* d) noexcept nogil:
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
    if not pipe_available(pool):       # at the cap, or starved
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


cdef inline void pipe_release(splice_dir* d) noexcept nogil:
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


cdef inline void pump_note_src_events(splice_dir* d, uint32_t ev) noexcept nogil:
    """What an epoll event on d's source says about how its reads may be trusted (see
    the top of this file: short reads)."""
    if ev & EPOLLPRI:
        d.src_urg = True
    if ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        d.src_hup = True
        d.src_fin = (ev & (EPOLLRDHUP | EPOLLERR)) == EPOLLRDHUP


cdef inline void pump_free_spill(splice_dir* d) noexcept nogil:
    free(d.spill)
    d.spill = NULL
    d.spill_len = d.spill_off = 0


cdef int pump_copy_once(splice_dir* d, bint* readable, bint* writable, int64_t* nread) noexcept nogil:
    """One recv + send of up to COPY_CHUNK bytes; what the send leaves goes into the
    direction's pipe. When no pipe can be had (the pool's cap), the read is a MSG_PEEK
    and only what the send took is then taken off the socket: the rest stays in the
    kernel. Returns -1 to go on pumping, or a PUMP_* code."""
    cdef bint peek = d.pr < 0 and not pipe_available(d.pool)
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
            return PUMP_WAIT
        d.err = errno
        return PUMP_SRC_FAILED
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
            return PUMP_DST_FAILED
        sent = 0
    if peek:
        if sent > 0 and c_recv(d.src, COPY_BUFFER, <size_t>sent, 0) != sent:
            d.err = errno                # cannot happen: the bytes were peeked
            return PUMP_SRC_FAILED
        nread[0] += sent
        if sent < n:
            writable[0] = False          # dst is full; its EPOLLOUT edge resumes this
            return PUMP_WAIT
        return -1
    nread[0] += n
    if sent < n:
        if d.pr < 0 and pipe_acquire(d) != 0:
            # pipe2 failed just now (out of descriptors) and the bytes are off the
            # socket: keep them on the heap (at most COPY_CHUNK, this once; the pool is
            # starved now, so the next reads peek) until dst takes them.
            d.spill = <char*>malloc(<size_t>(n - sent))
            if d.spill == NULL:
                d.err = ENOMEM
                return PUMP_DST_FAILED
            memcpy(d.spill, COPY_BUFFER + sent, <size_t>(n - sent))
            d.spill_len = n - sent
            d.spill_off = 0
            return -1
        w = c_write(d.pw, COPY_BUFFER + sent, <size_t>(n - sent))
        if w != n - sent:                # cannot happen: the pipe is empty and big enough
            d.err = errno if w < 0 else EPIPE
            return PUMP_DST_FAILED
        d.held = n - sent
    return -1


cdef int pump_direction(splice_dir* d, bint* readable, bint* writable, int64_t* nread,
                     bint peer_done) noexcept nogil:
    """Move bytes src -> pipe -> dst until an EAGAIN, EOF, error or the budget says stop.
    Returns PUMP_*; adds the bytes read from src to nread[0]. Never blocks.
    `peer_done`: the other direction has ended, so the relay closes both sockets as soon
    as this one ends, and close() sends the FIN a shutdown would."""
    cdef ssize_t n
    cdef Py_ssize_t budget = SPLICE_BUDGET
    cdef int64_t before
    cdef int rc
    while True:
        if d.spill_len > 0 or d.held > 0:
            if not writable[0]:
                return PUMP_WAIT
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
                        pump_free_spill(d)
                continue                 # a short write is confirmed by the EAGAIN next
            if n < 0 and errno == EINTR:
                continue
            if n < 0 and errno == EAGAIN:
                writable[0] = False      # the EPOLLOUT edge sets it again
                return PUMP_WAIT
            d.err = errno if n < 0 else EPIPE
            return PUMP_DST_FAILED
        if d.eof:
            if not peer_done:
                c_shutdown(d.dst, SHUT_WR)   # an error here shows up on the other direction
            d.done = True
            return PUMP_DONE
        if not readable[0]:
            return PUMP_WAIT
        if budget <= 0:
            return PUMP_MORE
        if not d.bulk:
            before = nread[0]
            rc = pump_copy_once(d, readable, writable, nread)
            budget -= nread[0] - before
            if rc >= 0:
                return rc
            continue
        if d.pr < 0 and pipe_acquire(d) != 0:
            d.bulk = False               # no pipe to be had: copy (see pump_copy_once)
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
        if n == 0 or (errno == EAGAIN and d.src_urg):
            # End of file, or no data after EPOLLPRI: either may be splice() stopped at
            # the urgent mark (see the top of this file). A copy read decides, stepping
            # over the urgent byte: end of file, EAGAIN or bytes.
            d.bulk = False
            d.small_reads = 0
            continue
        if errno == EINTR:
            continue
        if errno == EAGAIN:              # the pipe is empty here: EAGAIN means no data
            readable[0] = False
            return PUMP_WAIT
        d.err = errno
        return PUMP_SRC_FAILED


