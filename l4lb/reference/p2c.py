"""p2c reference twin: power of two random choices (ext/l4lb/p2c.pxi).

Two distinct random positions in the in-rotation list (splitmix64 draws); an unusable
backend stands for the next usable one after it; the lower active/weight wins, then the
higher weight, then the first draw.
"""
from fractions import Fraction

from .algorithm import Algorithm


class PowerOfTwo(Algorithm):
    name = "p2c"
    needs_key = False

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(seed, **kwargs)
        self.live: list[int] = []
        self.stale = True

    def changed(self, i):
        self.stale = True

    def usable_from(self, p, avoid):
        for k in range(len(self.live)):
            i = self.live[(p + k) % len(self.live)]
            if self.eligible(i) and i not in avoid:
                return i
        return -1

    def pick_c(self, key, avoid):
        if self.stale:
            self.live = [i for i in range(self.n)
                         if self.present[i] and self.up[i] and self.weight[i] > 0]
            self.stale = False
        n = len(self.live)
        if n == 0:
            return -1
        p = self.draw() % n
        a = self.usable_from(p, avoid)
        if a < 0 or n == 1:
            return a
        p = (p + 1 + self.draw() % (n - 1)) % n
        b = self.usable_from(p, avoid)
        load_a = Fraction(self.active[a], self.weight[a])
        load_b = Fraction(self.active[b], self.weight[b])
        if load_b < load_a or (load_b == load_a and self.weight[b] > self.weight[a]):
            return b
        return a
