# The balancer interface (STYLE.md "The balancer interface"), after HAProxy's lb ops table.
#
# Every algorithm keeps its per-backend facts in flat C arrays indexed by slot, and is told
# about every change so that it can update whatever structure makes its pick cheap:
#   changed(i)       add / remove / set_up / set_weight: rotation membership or weight.
#                    May allocate (hence `except *`); an algorithm whose structure is
#                    expensive (Maglev) only marks it stale here and rebuilds once, on the
#                    next pick, so adding 1000 backends costs one rebuild, not 1000.
#   load_changed(i)  conn_opened / conn_closed / observe_rt / set_max_connections: the
#                    load facts that least-load orderings key on. noexcept, O(log n) at most.
# A slot is never reused: backend i stays i for the pool's lifetime, which keeps the
# Cython classes and their reference twins (l4lb/reference/) in lock-step under any
# sequence of operations.
#
# Eligible = present, up, weight > 0, below its max_connections, and not in `avoid`.
#
# Weights are integers in 0..ALGO_WEIGHT_MAX (2^24, algorithm.pxd). The control plane
# multiplies the operator's weights (0..10000) by 100 to express slow start, and every
# algorithm is invariant to scaling all weights by one constant factor (each states how),
# so that scaling changes nothing.
from cpython.mem cimport PyMem_Realloc, PyMem_Free
from libc.string cimport memset

cdef extern from *:
    """
    /* Exact load comparisons for the least-load algorithms. Cross-multiplying instead of
       dividing keeps them exact, so scaling every weight by one factor changes no
       decision; 128-bit products cannot overflow for weights <= ALGO_WEIGHT_MAX. */
    static inline int l4lb_cmp_ratio(int64_t a, int64_t b, int64_t c, int64_t d) {
        /* sign of a/b - c/d, for b, d > 0 */
        __int128 l = (__int128)a * d, r = (__int128)c * b;
        return (l > r) - (l < r);
    }
    static inline int l4lb_cmp_ratio3(int64_t a, int64_t x, int64_t b,
                                      int64_t c, int64_t y, int64_t d) {
        /* sign of a*x/b - c*y/d, for b, d > 0 and 0 <= a, c, x, y < 2^50 */
        __int128 l = (__int128)a * x * d, r = (__int128)c * y * b;
        return (l > r) - (l < r);
    }
    """
    int cmp_ratio "l4lb_cmp_ratio" (int64_t a, int64_t b, int64_t c, int64_t d) noexcept nogil
    int cmp_ratio3 "l4lb_cmp_ratio3" (int64_t a, int64_t x, int64_t b,
                                      int64_t c, int64_t y, int64_t d) noexcept nogil

# Smoothing factor of the response-time EWMA: each sample moves the average by 1/5.
cdef double EWMA_ALPHA = 0.2


cdef class Algorithm:
    """Base class: bookkeeping shared by every algorithm; picks nothing itself.

    Each subclass states its config word (`name`, also the name of its .pxi and of its
    twin's module) and whether its picks read the client's routing key (`needs_key`):
    the relay computes the key only for a pool whose algorithm says so.
    """
    name = ""
    needs_key = False

    def __cinit__(self, uint64_t seed=0, *args, **kwargs):
        # *args/**kwargs: subclasses take more constructor arguments (Maglev's table size),
        # and Cython hands every __cinit__ in the chain the same ones.
        self.n = 0
        self.cap = 0
        self.rng = seed

    def __dealloc__(self):
        PyMem_Free(self.weight)
        PyMem_Free(self.active)
        PyMem_Free(self.max_conns)
        PyMem_Free(self.ewma)
        PyMem_Free(self.ident)
        PyMem_Free(self.up)
        PyMem_Free(self.present)

    cdef void grow(self) except *:
        cdef int cap = self.cap * 2 if self.cap else 8
        # Realloc each array; on failure the old pointer stays valid and owned by us.
        self.weight = <int64_t*>_realloc(self.weight, cap * sizeof(int64_t))
        self.active = <int64_t*>_realloc(self.active, cap * sizeof(int64_t))
        self.max_conns = <int64_t*>_realloc(self.max_conns, cap * sizeof(int64_t))
        self.ewma = <double*>_realloc(self.ewma, cap * sizeof(double))
        self.ident = <uint64_t*>_realloc(self.ident, cap * sizeof(uint64_t))
        self.up = <uint8_t*>_realloc(self.up, cap * sizeof(uint8_t))
        self.present = <uint8_t*>_realloc(self.present, cap * sizeof(uint8_t))
        self.cap = cap

    cdef void check_index(self, int i) except *:
        if i < 0 or i >= self.n:
            raise IndexError(f"no backend slot {i}")

    cpdef int add(self, str name, int64_t weight=1) except -1:
        """Add a backend (not yet up) in a new slot and return the slot's index."""
        _check_weight(weight)
        if self.n == self.cap:
            self.grow()
        cdef int i = self.n
        cdef bytes raw = name.encode("utf-8")
        self.weight[i] = weight
        self.active[i] = 0
        self.max_conns[i] = 0
        self.ewma[i] = -1.0
        self.ident[i] = hash64_c(<const unsigned char*>raw, len(raw))
        self.up[i] = 0
        self.present[i] = 1
        self.n += 1
        self.changed(i)
        return i

    cpdef void remove(self, int i) except *:
        """Take slot i out for good; its open connections may still call conn_closed."""
        self.check_index(i)
        self.present[i] = 0
        self.up[i] = 0
        self.changed(i)

    cpdef void set_up(self, int i, bint up) except *:
        self.check_index(i)
        if not self.present[i]:
            return
        up = 1 if up else 0
        if self.up[i] != up:
            self.up[i] = up
            self.changed(i)

    cpdef void set_weight(self, int i, int64_t weight) except *:
        self.check_index(i)
        _check_weight(weight)
        if self.weight[i] != weight:
            self.weight[i] = weight
            self.changed(i)

    cpdef void set_max_connections(self, int i, int64_t limit) except *:
        self.check_index(i)
        self.max_conns[i] = limit if limit > 0 else 0
        self.load_changed(i)

    cpdef void conn_opened(self, int i) except *:
        """A connection was assigned to slot i (counted from the pick, not the connect)."""
        self.check_index(i)
        self.active[i] += 1
        self.load_changed(i)

    cpdef void conn_closed(self, int i) except *:
        self.check_index(i)
        if self.active[i] > 0:
            self.active[i] -= 1
        self.load_changed(i)

    cpdef void observe_rt(self, int i, double seconds) except *:
        """Feed one response-time sample (the backend's connect time) into its EWMA."""
        self.check_index(i)
        if not seconds >= 0.0:      # negative or NaN: a clock step, not a measurement
            seconds = 0.0
        if self.ewma[i] < 0:
            self.ewma[i] = seconds
        else:
            self.ewma[i] += EWMA_ALPHA * (seconds - self.ewma[i])
        self.load_changed(i)

    cdef inline uint64_t draw(self) noexcept:
        """The next splitmix64 draw from this instance's seeded stream."""
        return splitmix64_next(&self.rng)

    cdef int pick_c(self, uint64_t key, const int* avoid, int navoid) noexcept:
        return -1

    cdef void changed(self, int i) except *:
        pass

    cdef void load_changed(self, int i) noexcept:
        pass

    def pick(self, uint64_t key=0, avoid=()):
        """The slot for a new connection with routing key `key`, or -1 when none is eligible."""
        cdef int buf[ALGO_MAX_AVOID]
        cdef int navoid = 0
        for a in avoid:
            if navoid == ALGO_MAX_AVOID:
                raise ValueError(f"at most {ALGO_MAX_AVOID} backends can be avoided")
            buf[navoid] = a
            navoid += 1
        return self.pick_c(key, buf, navoid)

    def bench_pick(self, long long n, uint64_t key_start=0, bint churn=False):
        """Benchmark hook: n picks in a C loop with keys key_start, key_start+1, ...

        With `churn`, each picked slot also gets conn_opened + conn_closed, the cycle a real
        connection drives. Returns the number of picks that found no backend.
        """
        cdef long long k, misses = 0
        cdef int i
        for k in range(n):
            i = self.pick_c(key_start + <uint64_t>k, NULL, 0)
            if i < 0:
                misses += 1
            elif churn:
                self.active[i] += 1
                self.load_changed(i)
                self.active[i] -= 1
                self.load_changed(i)
        return misses

    # Read-only views for the control plane and the tests.
    def active_count(self, int i):
        self.check_index(i)
        return self.active[i]

    def rt_ewma(self, int i):
        """The response-time EWMA of slot i in seconds, or None before the first sample."""
        self.check_index(i)
        return None if self.ewma[i] < 0 else self.ewma[i]

    def is_eligible(self, int i):
        self.check_index(i)
        return bool(self.eligible(i))

    def __len__(self):
        return self.n


cdef inline void _check_weight(int64_t weight) except *:
    if weight < 0 or weight > ALGO_WEIGHT_MAX:
        raise ValueError(f"weight must be in 0..{ALGO_WEIGHT_MAX}")


cdef void* _realloc(void* p, size_t size) except NULL:
    cdef void* q = PyMem_Realloc(p, size)
    if q == NULL:
        raise MemoryError()
    return q
