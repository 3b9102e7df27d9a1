# lrt: least response time, the seed's fifth algorithm (HAProxy has no twin; Envoy's
# least-request with active-request bias and NGINX Plus's least_time are the relatives).
# Reference twin: l4lb/reference/lrt.py.
#
# Load: (active + 1) x ewma / weight, where ewma is the exponentially weighted average of
# the backend's connect time (Algorithm.observe_rt, alpha 0.2). The +1 counts the
# connection being placed, so an idle fast backend still beats an idle slow one. Backends
# with no sample yet come first (ordered among themselves like leastconn, by
# active/weight), so a new or recovered backend is measured before it is judged.
#
# Everything else is leastconn's: the same heap of eligible slots, refreshed on every
# change (observe_rt included), the same rotating tie-break by stamp, the same
# best-first walk for `avoid`. The EWMA enters the comparison as whole nanoseconds
# (capped at 1e6 s) so that the products are exact integers: scaling all weights by a
# constant changes no pick, and the twin (Python ints) decides exactly alike.

# EWMAs above this many seconds compare as equal; it bounds the integer products.
cdef double LRT_EWMA_CAP = 1e6


cdef inline int64_t ewma_ns(double seconds) noexcept:
    if seconds > LRT_EWMA_CAP:
        seconds = LRT_EWMA_CAP
    return <int64_t>(seconds * 1e9)


cdef class LeastResponseTime(LeastConn):
    name = "lrt"
    needs_key = False

    cdef bint before(self, int i, int j) noexcept:
        cdef bint fresh_i = self.ewma[i] < 0
        cdef bint fresh_j = self.ewma[j] < 0
        cdef int c
        if fresh_i != fresh_j:
            return fresh_i
        if fresh_i:
            c = cmp_ratio(self.active[i], self.weight[i], self.active[j], self.weight[j])
        else:
            c = cmp_ratio3(self.active[i] + 1, ewma_ns(self.ewma[i]), self.weight[i],
                           self.active[j] + 1, ewma_ns(self.ewma[j]), self.weight[j])
        if c != 0:
            return c < 0
        return self.stamp[i] < self.stamp[j]
