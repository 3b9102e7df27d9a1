# The balancer interface every selection algorithm implements (see algorithm.pxi).
from libc.stdint cimport int64_t, uint64_t, uint8_t

# cpdef: exported to Python as l4lb._native.ALGO_*, so that the reference twins (and any
# Python check of the same bound) read them from here instead of keeping a copy.
cpdef enum:
    ALGO_MAX_AVOID = 32     # retries are capped at this by the config, so avoid fits a C array
    # Largest weight an algorithm accepts (2^24). Not the operator's bound: config and
    # control weights are 0..10000 and the control plane scales them by model.WEIGHT_SCALE
    # (100) to express slow start; 2^24 leaves 16x headroom over 10000 x 100, and bounds
    # the load comparisons (active x weight; lrt's triple products in 128 bits) so that
    # they cannot overflow.
    ALGO_WEIGHT_MAX = 16777216


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

    # Defined here, inline, so that they are plain C calls: a method declared without a
    # body is reached through the vtable, one indirect call per backend in every scan.
    cdef inline bint eligible(self, int i) noexcept:
        """Present, up, weight > 0 and below its max_connections."""
        return (self.present[i] and self.up[i] and self.weight[i] > 0
                and (self.max_conns[i] == 0 or self.active[i] < self.max_conns[i]))

    cdef inline bint avoided(self, int i, const int* avoid, int navoid) noexcept:
        cdef int k
        for k in range(navoid):
            if avoid[k] == i:
                return True
        return False

    cdef uint64_t draw(self) noexcept
    # The slot for a new connection, or -1. Contract: navoid <= ALGO_MAX_AVOID (pick()
    # enforces it for Python callers; C callers must); a pick never allocates.
    cdef int pick_c(self, uint64_t key, const int* avoid, int navoid) noexcept
    cdef void changed(self, int i) except *
    cdef void load_changed(self, int i) noexcept
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


cdef class WeightedRoundRobin(Algorithm):
    cdef int64_t* current       # nginx's current_weight per slot: credit owed, in weight units


cdef class LeastConn(Algorithm):
    cdef int* heap              # eligible slots as a binary min-heap on (load, stamp)
    cdef int* pos               # slot -> its index in `heap`, -1 while not eligible
    cdef uint64_t* stamp        # `clock` at the slot's last change: ties go to the oldest
    cdef uint64_t clock         # counts changes; source of unique stamps
    cdef int hn                 # entries in `heap`

    cdef bint before(self, int i, int j) noexcept
    cdef void refresh(self, int i) noexcept
    cdef void sift_up(self, int h) noexcept
    cdef void sift_down(self, int h) noexcept


cdef class LeastResponseTime(LeastConn):
    pass


cdef class MaglevHash(Algorithm):
    cdef int* table             # the lookup table: entry -> slot; -1 only while empty
    cdef readonly int64_t table_size   # M: a prime >= 100 x present backends; never shrinks
    cdef int64_t min_table_size # M with few backends (65537 unless a test asks for less)
    cdef bint stale             # rotation changed since the table was built
    cdef readonly int64_t builds       # tables built so far (tests check the laziness)
    cdef int nlive              # slots in the table (present, up, weight > 0)
    cdef int* live              # those slots, ascending
    cdef int64_t* entries       # table entries each slot owns (0 out of rotation)
    cdef int64_t* next_entry    # build scratch: the slot's next preferred entry
    cdef int64_t* skip          # build scratch: the slot's permutation step
    cdef int64_t* target        # build scratch: weight credit needed for its next turn

    cdef void rebuild(self) noexcept
    cdef int first_usable(self, bint with_entries, const int* avoid, int navoid) noexcept


cdef class PowerOfTwo(Algorithm):
    cdef int* live              # slots in rotation (present, up, weight > 0), ascending
    cdef int nlive              # entries in `live`
    cdef bint stale             # rotation changed since `live` was built

    cdef int usable_from(self, int p, const int* avoid, int navoid) noexcept
