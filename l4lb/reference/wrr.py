"""wrr reference twin: nginx's smooth weighted round robin (ext/l4lb/wrr.pxi).

Each eligible backend earns its weight in credit per pick; the richest (first in slot
order on a tie) is picked and pays the total handed out. A backend leaving rotation
drops its credit; every change clamps the credits to [-W, W], W the in-rotation total.
"""
from .algorithm import Algorithm


class WeightedRoundRobin(Algorithm):
    name = "wrr"
    needs_key = False

    def __init__(self, seed: int = 0, **kwargs):
        self.current: list[int] = []
        super().__init__(seed, **kwargs)

    def add(self, name, weight=1):
        self.current.append(0)
        return super().add(name, weight)

    def changed(self, i):
        if not (self.present[i] and self.up[i] and self.weight[i] > 0):
            self.current[i] = 0
        total = sum(w for w, p, u in zip(self.weight, self.present, self.up) if p and u)
        self.current = [min(max(c, -total), total) for c in self.current]

    def pick_c(self, key, avoid):
        best, total = -1, 0
        for i in range(self.n):
            if not self.eligible(i) or i in avoid:
                continue
            self.current[i] += self.weight[i]
            total += self.weight[i]
            if best < 0 or self.current[i] > self.current[best]:
                best = i
        if best >= 0:
            self.current[best] -= total
        return best

    def credit(self, i):
        self.check_index(i)
        return self.current[i]
