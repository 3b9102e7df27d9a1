# rr: plain round robin. Each pick scans forward from the slot after the last pick and
# takes the first eligible one, so backends that leave rotation are skipped and the
# others keep their turn order. Weights are ignored except that 0 means "no new
# connections". Reference twin: l4lb/reference/rr.py.


cdef class RoundRobin(Algorithm):
    name = "rr"
    needs_key = False

    def __cinit__(self, uint64_t seed=0):
        self.next = 0

    cdef int pick_c(self, uint64_t key, const int* avoid, int navoid) noexcept:
        cdef int n = self.n
        cdef int k, i
        for k in range(n):
            i = self.next + k
            if i >= n:
                i -= n
            if self.eligible(i) and not self.avoided(i, avoid, navoid):
                self.next = i + 1 if i + 1 < n else 0
                return i
        return -1
