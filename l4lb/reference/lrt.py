"""lrt reference twin: least response time (ext/l4lb/lrt.pxi).

Leastconn's machinery with another load: backends without a response-time sample first
(by active/weight), then the smallest (active + 1) x ewma / weight, the EWMA taken in
whole nanoseconds (capped at 1e6 s) so the comparison is exact.
"""
from fractions import Fraction

from .leastconn import LeastConn

LRT_EWMA_CAP = 1e6


def ewma_ns(seconds: float) -> int:
    return int(min(seconds, LRT_EWMA_CAP) * 1e9)


class LeastResponseTime(LeastConn):
    name = "lrt"
    needs_key = False

    def load(self, i):
        if self.ewma[i] < 0:
            return (0, Fraction(self.active[i], self.weight[i]), self.stamp[i])
        rt = Fraction((self.active[i] + 1) * ewma_ns(self.ewma[i]), self.weight[i])
        return (1, rt, self.stamp[i])
