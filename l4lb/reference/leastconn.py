"""leastconn reference twin: weighted least connections (ext/l4lb/leastconn.pxi).

The spec the compiled heap must match: among eligible, non-avoided backends, the smallest
active/weight (exact fractions), ties to the oldest stamp. Every change of a backend
re-stamps it, so the backend just used queues behind its equals and ties rotate.
"""
from fractions import Fraction

from .algorithm import Algorithm


class LeastConn(Algorithm):
    name = "leastconn"
    needs_key = False

    def __init__(self, seed: int = 0, **kwargs):
        self.stamp: list[int] = []
        self.clock = 0
        super().__init__(seed, **kwargs)

    def add(self, name, weight=1):
        self.stamp.append(0)
        return super().add(name, weight)

    def refresh(self, i):
        self.clock += 1
        self.stamp[i] = self.clock

    def changed(self, i):
        self.refresh(i)

    def load_changed(self, i):
        self.refresh(i)

    def load(self, i):
        """The sort key of slot i; smaller is picked first."""
        return (Fraction(self.active[i], self.weight[i]), self.stamp[i])

    def pick_c(self, key, avoid):
        usable = [i for i in range(self.n) if self.eligible(i) and i not in avoid]
        return min(usable, key=self.load, default=-1)
