"""hash reference twin: weighted Maglev consistent hashing (ext/l4lb/hash.pxi, which
holds the theory of operation; Eisenbud et al., NSDI 2016, §3.4).
"""
from .algorithm import Algorithm
from .hashing import mix64

MAGLEV_TABLE_SIZE = 65537
MAGLEV_SKIP_SALT = 0x5BD1E9955BD1E995


def next_prime(n: int) -> int:
    """The smallest prime >= n."""
    if n <= 2:
        return 2
    n |= 1
    while any(n % d == 0 for d in range(3, int(n ** 0.5) + 1, 2)):
        n += 2
    return n


def maglev_table_size(current: int, present: int) -> int:
    """M for `present` backends: climbs 65537, then next_prime(2M), ...; never shrinks."""
    while current < 100 * present:
        current = next_prime(2 * current)
    return current


class MaglevHash(Algorithm):
    name = "hash"
    needs_key = True

    def __init__(self, seed: int = 0, min_table_size: int = MAGLEV_TABLE_SIZE):
        if min_table_size < 3:
            raise ValueError("min_table_size must be >= 3")
        super().__init__(seed)
        self.table_size = next_prime(min_table_size)
        self.table: list[int] = []
        self.stale = True
        self.builds = 0

    def changed(self, i):
        self.table_size = maglev_table_size(self.table_size, sum(self.present))
        self.stale = True

    def rebuild(self):
        """Maglev Pseudocode 1 with weighted turns."""
        m = self.table_size
        self.stale = False
        self.builds += 1
        live = [i for i in range(self.n) if self.present[i] and self.up[i] and self.weight[i] > 0]
        self.table = []
        if not live:
            return
        table = [-1] * m
        max_w = max(self.weight[i] for i in live)
        next_entry = {i: self.ident[i] % m for i in live}
        skip = {i: mix64(self.ident[i] ^ MAGLEV_SKIP_SALT) % (m - 1) + 1 for i in live}
        target = dict.fromkeys(live, max_w)
        filled, rnd = 0, 0
        while True:
            rnd += 1
            for i in live:
                # After r rounds, backend i has had floor(r * w_i / max_w) turns.
                if rnd * self.weight[i] < target[i]:
                    continue
                target[i] += max_w
                c = next_entry[i]
                while table[c] >= 0:
                    c = (c + skip[i]) % m
                table[c] = i
                next_entry[i] = (c + skip[i]) % m
                filled += 1
                if filled == m:
                    self.table = table
                    return

    def pick_c(self, key, avoid):
        if self.stale:
            self.rebuild()
        if not self.table:
            return -1
        m = self.table_size
        e = mix64(key) % m
        for step in range(m):
            i = self.table[(e + step) % m]
            if self.eligible(i) and i not in avoid:
                return i
        # No usable entry: a usable backend too light to own one, if any.
        for i in range(self.n):
            if self.eligible(i) and i not in avoid:
                return i
        return -1

    def lookup_table(self):
        if self.stale:
            self.rebuild()
        return list(self.table)
