# leastconn: weighted least connections, after HAProxy's lb_fwlc.c. Reference twin:
# l4lb/reference/leastconn.py (a plain scan: the executable spec of the order below).
#
# Order: a backend's load is active / weight; the pick is the eligible, non-avoided
# backend of smallest load, ties going to the one whose load changed longest ago (its
# `stamp`). Every change of a backend (pick bookkeeping, close, weight, up/down) re-stamps
# it, so among equal backends the one just used goes to the back of the queue: ties
# rotate, like HAProxy requeueing a server behind its equals in the tree, instead of the
# first slot taking every tie. Loads are compared by cross-multiplying (a/w < b/v iff
# a*v < b*w, in 128 bits), exactly, so scaling all weights by a constant changes no pick.
#
# Structure: a binary min-heap of exactly the eligible slots, kept in order by
# refresh(i) on every change (changed / load_changed: O(log n)). A pick with nothing to
# avoid is the heap's root, O(1). With `avoid`, a best-first walk down the heap pops at
# most navoid + 1 entries (each avoided entry uncovers its two children), so a retry costs
# O(navoid^2), never a scan. Why a heap and not a scan: a scan is O(n) per pick (wrr's
# scan, with the same per-backend work, takes about 1.3 us at 1000 backends); the heap
# moves the cost to open/close, O(log n) each, so pick + open + close at 1000 backends
# costs ~0.1 us and a bare pick is the root at any pool size (loadtests/RESULTS-picks.md).


cdef class LeastConn(Algorithm):
    name = "leastconn"
    needs_key = False

    def __cinit__(self, *args, **kwargs):
        self.clock = 0
        self.hn = 0

    def __dealloc__(self):
        PyMem_Free(self.heap)
        PyMem_Free(self.pos)
        PyMem_Free(self.stamp)

    cdef void grow(self) except *:
        cdef int old = self.cap
        cdef int j
        Algorithm.grow(self)
        self.heap = <int*>_realloc(self.heap, self.cap * sizeof(int))
        self.pos = <int*>_realloc(self.pos, self.cap * sizeof(int))
        self.stamp = <uint64_t*>_realloc(self.stamp, self.cap * sizeof(uint64_t))
        for j in range(old, self.cap):
            self.pos[j] = -1

    cdef bint before(self, int i, int j) noexcept:
        """True when slot i is picked before slot j: smaller active/weight, then older stamp."""
        cdef int c = cmp_ratio(self.active[i], self.weight[i], self.active[j], self.weight[j])
        if c != 0:
            return c < 0
        return self.stamp[i] < self.stamp[j]

    cdef void sift_up(self, int h) noexcept:
        cdef int* heap = self.heap
        cdef int i = heap[h]
        cdef int parent
        while h > 0:
            parent = (h - 1) >> 1
            if not self.before(i, heap[parent]):
                break
            heap[h] = heap[parent]
            self.pos[heap[h]] = h
            h = parent
        heap[h] = i
        self.pos[i] = h

    cdef void sift_down(self, int h) noexcept:
        cdef int* heap = self.heap
        cdef int i = heap[h]
        cdef int child
        while True:
            child = 2 * h + 1
            if child >= self.hn:
                break
            if child + 1 < self.hn and self.before(heap[child + 1], heap[child]):
                child += 1
            if not self.before(heap[child], i):
                break
            heap[h] = heap[child]
            self.pos[heap[h]] = h
            h = child
        heap[h] = i
        self.pos[i] = h

    cdef void refresh(self, int i) noexcept:
        """Re-stamp slot i and put it where its new load and eligibility belong."""
        cdef int h = self.pos[i]
        cdef int last
        self.clock += 1
        self.stamp[i] = self.clock
        if self.eligible(i):
            if h < 0:
                h = self.hn
                self.hn += 1
                self.heap[h] = i
            self.sift_up(h)
            self.sift_down(self.pos[i])
        elif h >= 0:
            self.pos[i] = -1
            self.hn -= 1
            if h < self.hn:
                last = self.heap[self.hn]
                self.heap[h] = last
                self.pos[last] = h
                self.sift_up(h)
                self.sift_down(self.pos[last])

    cdef void changed(self, int i) except *:
        self.refresh(i)

    cdef void load_changed(self, int i) noexcept:
        self.refresh(i)

    cdef int pick_c(self, uint64_t key, const int* avoid, int navoid) noexcept:
        # front: heap indices whose parents were all avoided, the candidates for the best.
        cdef int front[2 * ALGO_MAX_AVOID + 2]
        cdef int nf, k, b, h
        if self.hn == 0:
            return -1
        if navoid == 0:
            return self.heap[0]
        if navoid > ALGO_MAX_AVOID:     # broken caller contract: refuse, never overrun `front`
            return -1
        front[0] = 0
        nf = 1
        while nf > 0:
            b = 0
            for k in range(1, nf):
                if self.before(self.heap[front[k]], self.heap[front[b]]):
                    b = k
            h = front[b]
            if not self.avoided(self.heap[h], avoid, navoid):
                return self.heap[h]
            nf -= 1
            front[b] = front[nf]
            if 2 * h + 1 < self.hn:
                front[nf] = 2 * h + 1
                nf += 1
            if 2 * h + 2 < self.hn:
                front[nf] = 2 * h + 2
                nf += 1
        return -1

    def check_heap(self):
        """Test hook: assert the heap holds exactly the eligible slots, in heap order."""
        cdef int h, i
        members = set()
        for h in range(self.hn):
            i = self.heap[h]
            assert self.pos[i] == h, (i, h, self.pos[i])
            if h:
                assert not self.before(i, self.heap[(h - 1) >> 1]), (h, i)
            members.add(i)
        assert members == {i for i in range(self.n) if self.eligible(i)}, members
