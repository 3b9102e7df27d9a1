# wrr: smooth weighted round robin, nginx's algorithm (ngx_http_upstream_round_robin.c,
# ngx_http_upstream_get_peer; Maxim Dounin's "smooth weighted round-robin balancing",
# nginx 1.3.1, 2012). Reference twin: l4lb/reference/wrr.py.
#
# Each eligible backend carries a credit `current`. A pick adds every eligible backend's
# weight to its credit, takes the backend with the largest credit (the first in slot
# order on a tie) and charges it the total weight handed out. Weights 5,1,1 give
# a a b a c a a, not a a a a a b c.
#
# Guarantees, with a fixed set of eligible backends from a fresh start: the sequence is
# periodic with period W = sum(weights), so any window of W consecutive picks holds each
# backend exactly its weight. Scaling all weights by a constant k scales every credit by
# k and changes no pick (the clamp below scales with them too).
#
# Runtime changes (changed): nothing is reset, so a weight change or a backend joining
# causes no burst and no restart of the cycle; a backend leaving rotation drops its credit
# to 0, so it comes back neutral, like a new one. Every credit is then clamped to
# [-W, W] for the new in-rotation W: in steady state credits already lie inside, but
# after a sharp weight cut (1e6 -> 1) a credit earned under the old weights would be
# worth a million picks in a row; clamped, it is worth at most about one.
#
# Cost: O(n) per pick (nginx does the same; the credits of all backends move on every
# pick, which no heap order captures). 1000 backends: see loadtests/RESULTS-picks.md.
# Backends skipped for max_connections or `avoid` earn no credit on that pick.


cdef class WeightedRoundRobin(Algorithm):
    name = "wrr"
    needs_key = False

    def __dealloc__(self):
        PyMem_Free(self.current)

    cdef void grow(self) except *:
        cdef int old = self.cap
        Algorithm.grow(self)
        self.current = <int64_t*>_realloc(self.current, self.cap * sizeof(int64_t))
        # Slots are never reused, so a new slot starts with zero credit from here.
        memset(self.current + old, 0, (self.cap - old) * sizeof(int64_t))

    cdef void changed(self, int i) except *:
        cdef int j
        cdef int64_t total = 0
        if not (self.present[i] and self.up[i] and self.weight[i] > 0):
            self.current[i] = 0
        for j in range(self.n):
            if self.present[j] and self.up[j]:
                total += self.weight[j]
        for j in range(self.n):
            if self.current[j] > total:
                self.current[j] = total
            elif self.current[j] < -total:
                self.current[j] = -total

    cdef int pick_c(self, uint64_t key, const int* avoid, int navoid) noexcept:
        cdef int i, best = -1
        cdef int64_t total = 0
        cdef int64_t* cur = self.current
        for i in range(self.n):
            if not self.eligible(i) or (navoid and self.avoided(i, avoid, navoid)):
                continue
            cur[i] += self.weight[i]
            total += self.weight[i]
            if best < 0 or cur[i] > cur[best]:
                best = i
        if best >= 0:
            cur[best] -= total
        return best

    def credit(self, int i):
        """Slot i's current credit (tests and `show backends` debugging)."""
        self.check_index(i)
        return self.current[i]
