# hash: Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software
# Network Load Balancer", NSDI 2016, §3.4), with weights as in Envoy's maglev_lb.cc.
# Reference twin: l4lb/reference/hash.py.
#
# Table: M entries, M prime. Each backend in rotation (present, up, weight > 0) has a
# permutation of the entries, offset = ident mod M and skip = mix64(ident ^ SALT) mod
# (M - 1) + 1, where ident = hash64(name): a backend's preferences depend on its name
# only, never on its slot or on the other backends. Backends take turns (in slot order)
# claiming their next preferred free entry until the table is full (Pseudocode 1).
# Weights: in round r a backend takes a turn only when r x weight >= its credit target,
# which then grows by the largest weight, so after r rounds it has taken
# floor(r x weight / max_weight) turns: entries are shared in proportion to weight
# (within one entry each), and scaling all weights by a constant changes nothing.
#
# Size: M is a prime >= 100 x the present backends (the paper's rule of thumb for
# evenness), 65537 by default. Growing M remaps nearly every key, so M climbs a ladder
# (65537, then the next prime >= twice the previous) and never shrinks: a removal never
# changes M, and M changes at most once per doubling of the pool.
#
# Lookup: entry = mix64(key) mod M (mix64 first, so a raw IPv4 address spreads as well as
# a hash64 output does). If the entry's backend is at its max_connections or in `avoid`,
# walk forward entry by entry to the first usable one: deterministic, and the walk lands
# on backends in proportion to their weights. When no entry is usable, the first usable
# backend in rotation in slot order (one whose weight is too small against the others'
# to own an entry); -1 when there is none.
#
# Changes: changed() only marks the table stale (and grows it when M must grow); the
# first pick after any number of changes rebuilds it once, so 1000 adds cost one build.
# A backend leaving rotation loses its entries to the others; the paper's §3.4 shows
# (and tests/unit/test_algorithm_hash.py checks) that the other backends' entries move
# very little. Build cost is O(M log M) probes plus, with very skewed weights, up to
# M x (backends) turn checks: the rounds where only heavy backends take a turn.
#
# Keys: the balancer routes on hash64 of the client's source address (hash_key = "src_ip")
# or address and port ("src_ip_port"): l4lb.algorithms.routing_key, whose twin is
# l4lb/reference/routing.py.

# The paper's default table size: prime, and >= 100 x 655 backends.
MAGLEV_TABLE_SIZE = 65537
# Salt that derives a backend's skip from the same identity hash as its offset.
cdef uint64_t MAGLEV_SKIP_SALT = 0x5bd1e9955bd1e995ULL


def next_prime(int64_t n):
    """The smallest prime >= n (trial division: n is at most a few million)."""
    cdef int64_t d
    if n <= 2:
        return 2
    if n % 2 == 0:
        n += 1
    while True:
        d = 3
        while d * d <= n and n % d:
            d += 2
        if d * d > n:
            return n
        n += 2


def maglev_table_size(int64_t current, int64_t present):
    """M for `present` backends, never below the current M (see the ladder above)."""
    while current < 100 * present:
        current = next_prime(2 * current)
    return current


cdef class MaglevHash(Algorithm):
    name = "hash"
    needs_key = True

    def __cinit__(self, uint64_t seed=0, int64_t min_table_size=MAGLEV_TABLE_SIZE):
        if min_table_size < 3:
            raise ValueError("min_table_size must be >= 3")
        self.min_table_size = next_prime(min_table_size)
        self.table_size = self.min_table_size
        self.table = <int*>_realloc(NULL, self.table_size * sizeof(int))
        self.nlive = 0
        self.stale = True
        self.builds = 0

    def __dealloc__(self):
        PyMem_Free(self.table)
        PyMem_Free(self.live)
        PyMem_Free(self.entries)
        PyMem_Free(self.next_entry)
        PyMem_Free(self.skip)
        PyMem_Free(self.target)

    cdef void grow(self) except *:
        Algorithm.grow(self)
        self.live = <int*>_realloc(self.live, self.cap * sizeof(int))
        self.entries = <int64_t*>_realloc(self.entries, self.cap * sizeof(int64_t))
        self.next_entry = <int64_t*>_realloc(self.next_entry, self.cap * sizeof(int64_t))
        self.skip = <int64_t*>_realloc(self.skip, self.cap * sizeof(int64_t))
        self.target = <int64_t*>_realloc(self.target, self.cap * sizeof(int64_t))

    cdef void changed(self, int i) except *:
        cdef int j
        cdef int64_t present = 0, size
        for j in range(self.n):
            present += self.present[j]
        size = maglev_table_size(self.table_size, present)
        if size != self.table_size:
            self.table = <int*>_realloc(self.table, size * sizeof(int))
            self.table_size = size
        self.stale = True

    cdef void rebuild(self) noexcept:
        """Fill the table from the backends in rotation (Maglev Pseudocode 1, weighted)."""
        cdef int64_t m = self.table_size
        cdef int64_t filled = 0, rnd = 0, max_w = 0, c
        cdef int i, k
        self.stale = False
        self.builds += 1
        self.nlive = 0
        for i in range(self.n):
            self.entries[i] = 0
            if self.present[i] and self.up[i] and self.weight[i] > 0:
                self.live[self.nlive] = i
                self.nlive += 1
                if self.weight[i] > max_w:
                    max_w = self.weight[i]
        for c in range(m):
            self.table[c] = -1
        if self.nlive == 0:
            return
        for k in range(self.nlive):
            i = self.live[k]
            self.next_entry[i] = <int64_t>(self.ident[i] % <uint64_t>m)
            self.skip[i] = <int64_t>(mix64(self.ident[i] ^ MAGLEV_SKIP_SALT) % <uint64_t>(m - 1)) + 1
            self.target[i] = max_w
        while True:
            rnd += 1
            for k in range(self.nlive):
                i = self.live[k]
                if rnd * self.weight[i] < self.target[i]:
                    continue
                self.target[i] += max_w
                c = self.next_entry[i]
                while self.table[c] >= 0:
                    c += self.skip[i]
                    if c >= m:
                        c -= m
                self.table[c] = i
                self.entries[i] += 1
                c += self.skip[i]
                if c >= m:
                    c -= m
                self.next_entry[i] = c
                filled += 1
                if filled == m:
                    return

    cdef int first_usable(self, bint with_entries, const int* avoid, int navoid) noexcept:
        """The first usable slot in rotation (owning table entries if asked), or -1."""
        cdef int k, i
        for k in range(self.nlive):
            i = self.live[k]
            if with_entries and self.entries[i] == 0:
                continue
            if self.eligible(i) and not self.avoided(i, avoid, navoid):
                return i
        return -1

    cdef int pick_c(self, uint64_t key, const int* avoid, int navoid) noexcept:
        cdef int64_t m, e, step
        cdef int i
        if self.stale:
            self.rebuild()
        if self.nlive == 0:
            return -1
        m = self.table_size
        e = <int64_t>(mix64(key) % <uint64_t>m)
        for step in range(m):
            i = self.table[e]
            if self.eligible(i) and not (navoid and self.avoided(i, avoid, navoid)):
                return i
            # A long walk means most of the table is unusable: stop if all of it is.
            if step == 64 and self.first_usable(True, avoid, navoid) < 0:
                break
            e += 1
            if e == m:
                e = 0
        return self.first_usable(False, avoid, navoid)

    def lookup_table(self):
        """The table as a list (entry -> slot), rebuilt first if stale (tests, debugging)."""
        if self.stale:
            self.rebuild()
        return [self.table[c] for c in range(self.table_size)] if self.nlive else []
