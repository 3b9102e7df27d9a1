"""rr reference twin: scan forward from the slot after the last pick (ext/l4lb/rr.pxi)."""
from .algorithm import Algorithm


class RoundRobin(Algorithm):
    name = "rr"
    needs_key = False

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        self.next = 0

    def pick_c(self, key, avoid):
        n = self.n
        for k in range(n):
            i = (self.next + k) % n
            if self.eligible(i) and i not in avoid:
                self.next = (i + 1) % n
                return i
        return -1
