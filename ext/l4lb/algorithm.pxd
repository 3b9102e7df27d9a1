# The balancer interface every selection algorithm implements (see algorithm.pxi).
from libc.stdint cimport int64_t, uint64_t, uint8_t

cdef enum:
    ALGO_MAX_AVOID = 32     # retries are capped at this by the config, so avoid fits a C array


cdef class Algorithm:
    cdef int n                  # slots in use: backend i lives in slot i for the pool's lifetime
    cdef int cap                # slots allocated in the arrays below
    cdef int64_t* weight        # effective weight (slow start applied); 0 = no new connections
    cdef int64_t* active        # connections assigned to the slot and not yet closed
    cdef int64_t* max_conns     # per-backend connection cap; 0 = unlimited
    cdef double* ewma           # response-time EWMA in seconds; < 0 = no sample yet
    cdef uint64_t* ident        # hash64 of the backend's name: its stable identity (Maglev)
    cdef uint8_t* up            # 1 while the backend's state is `up`
    cdef uint8_t* present       # 0 once the backend was removed; its slot is never reused
    cdef readonly uint64_t rng  # PRNG state (splitmix64) for algorithms that draw at random

    cdef bint eligible(self, int i) noexcept
    cdef bint avoided(self, int i, const int* avoid, int navoid) noexcept
    cdef int pick_c(self, uint64_t key, const int* avoid, int navoid) noexcept
    cdef void changed(self, int i) noexcept
    cdef void grow(self) except *
    cpdef int add(self, str name, int64_t weight=*) except -1
    cpdef void remove(self, int i) except *
    cpdef void set_up(self, int i, bint up) except *
    cpdef void set_weight(self, int i, int64_t weight) except *
    cpdef void set_max_connections(self, int i, int64_t limit) except *
    cpdef void conn_opened(self, int i) except *
    cpdef void conn_closed(self, int i) except *
    cpdef void observe_rt(self, int i, double seconds) except *
    cdef void check_index(self, int i) except *


cdef class RoundRobin(Algorithm):
    cdef int next               # slot the next scan starts from
