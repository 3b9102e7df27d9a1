# p2c: the power of two random choices (Mitzenmacher, "The Power of Two Choices in
# Randomized Load Balancing", IEEE TPDS 2001; Envoy's least-request with choice_count 2).
# Reference twin: l4lb/reference/p2c.py.
#
# Draw two distinct positions in the list of backends in rotation with the instance's
# seeded splitmix64 stream, and take the less loaded of the two by active/weight (exact
# cross-multiplication, so scaling all weights changes nothing); on equal load the higher
# weight, then the first draw. Two choices bound the worst backend's excess load to
# O(log log n) instead of one random choice's O(log n / log log n), with no global scan.
#
# A drawn position whose backend is unusable right now (at max_connections, or avoided)
# stands for the next usable one after it in the list, so the draw count per pick is
# fixed (two, or one when nothing is usable) and the Cython class and its twin consume
# their streams identically. The list is rebuilt lazily, on the first pick after a
# rotation change. Same seed + same operations = same picks (reproducible runs).


cdef class PowerOfTwo(Algorithm):
    name = "p2c"
    needs_key = False

    def __cinit__(self, *args, **kwargs):
        self.nlive = 0
        self.stale = True

    def __dealloc__(self):
        PyMem_Free(self.live)

    cdef void grow(self) except *:
        Algorithm.grow(self)
        self.live = <int*>_realloc(self.live, self.cap * sizeof(int))

    cdef void changed(self, int i) except *:
        self.stale = True

    cdef int usable_from(self, int p, const int* avoid, int navoid) noexcept:
        """The first usable slot at or after position p of `live` (cyclic), or -1."""
        cdef int k, i
        for k in range(self.nlive):
            i = self.live[p]
            if self.eligible(i) and not (navoid and self.avoided(i, avoid, navoid)):
                return i
            p += 1
            if p == self.nlive:
                p = 0
        return -1

    cdef int pick_c(self, uint64_t key, const int* avoid, int navoid) noexcept:
        cdef int i, a, b, p, c
        if self.stale:
            self.nlive = 0
            for i in range(self.n):
                if self.present[i] and self.up[i] and self.weight[i] > 0:
                    self.live[self.nlive] = i
                    self.nlive += 1
            self.stale = False
        if self.nlive == 0:
            return -1
        p = <int>(self.draw() % <uint64_t>self.nlive)
        a = self.usable_from(p, avoid, navoid)
        if a < 0 or self.nlive == 1:
            return a
        # A second position distinct from the first.
        p += 1 + <int>(self.draw() % <uint64_t>(self.nlive - 1))
        if p >= self.nlive:
            p -= self.nlive
        b = self.usable_from(p, avoid, navoid)
        c = cmp_ratio(self.active[b], self.weight[b], self.active[a], self.weight[a])
        if c < 0 or (c == 0 and self.weight[b] > self.weight[a]):
            return b
        return a
