# Every C declaration l4lb._native takes from the system headers, in one place (the
# parts cimport what they use from here; only the algorithm files keep their own small
# C helpers). Grouped by header; a name that collides with a Python builtin or a method
# is renamed with a c_ prefix.
from cpython.ref cimport PyObject
from libc.stdint cimport uint32_t, uint64_t

cdef extern from *:
    """
    #ifndef L4LB_DEBUG
    #define L4LB_DEBUG 0
    #endif
    """
    # 1 in a debug build (setup.py: L4LB_DEBUG=1), else 0: `if L4LB_DEBUG:` blocks are
    # dead code that the C compiler drops from release builds.
    const bint L4LB_DEBUG

cdef extern from "Python.h":
    void Py_IncRef(PyObject*)
    void Py_DecRef(PyObject*)

cdef extern from "<time.h>" nogil:
    ctypedef int clockid_t
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    int clock_gettime(clockid_t clk, timespec* tp)
    enum: CLOCK_MONOTONIC

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
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
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
    enum: AF_INET
    enum: AF_INET6
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
    int inet_pton(int af, const char* src, void* dst)
    const char* inet_ntop(int af, const void* src, char* dst, socklen_t size)

cdef extern from "<sys/mman.h>" nogil:
    void* mmap(void* addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void* addr, size_t length)
    int memfd_create(const char* name, unsigned int flags)
    enum: PROT_READ
    enum: PROT_WRITE
    enum: MAP_SHARED
    void* MAP_FAILED

cdef extern from "<sys/stat.h>" nogil:
    cdef struct stat_t "stat":
        long st_size
    int c_fstat "fstat" (int fd, stat_t* st)

cdef extern from "<unistd.h>" nogil:
    int ftruncate(int fd, long length)
    int c_dup "dup" (int fd)

cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
