"""Reference twin of ext/l4lb/algorithm.pxi: the per-backend bookkeeping every algorithm shares."""
# The bounds are the compiled module's own (algorithm.pxd): one source, so the twin
# cannot accept a weight the class refuses.
from .._native import ALGO_MAX_AVOID, ALGO_WEIGHT_MAX
from .hashing import MASK64, SPLITMIX64_GAMMA, hash64, mix64

EWMA_ALPHA = 0.2


def check_weight(weight: int) -> None:
    if not 0 <= weight <= ALGO_WEIGHT_MAX:
        raise ValueError(f"weight must be in 0..{ALGO_WEIGHT_MAX}")


class Algorithm:
    name = ""           # the config word: also this module's and the .pxi's name
    needs_key = False   # whether pick() reads the routing key (hash only)

    def __init__(self, seed: int = 0, **kwargs):
        self.weight: list[int] = []
        self.active: list[int] = []
        self.max_conns: list[int] = []
        self.ewma: list[float] = []
        self.ident: list[int] = []
        self.up: list[bool] = []
        self.present: list[bool] = []
        # The raw splitmix64 state, like the Cython class's readonly `rng`.
        self.rng = seed & MASK64

    @property
    def n(self) -> int:
        return len(self.weight)

    def __len__(self) -> int:
        return self.n

    def check_index(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(f"no backend slot {i}")

    def add(self, name: str, weight: int = 1) -> int:
        check_weight(weight)
        i = self.n
        self.weight.append(weight)
        self.active.append(0)
        self.max_conns.append(0)
        self.ewma.append(-1.0)
        self.ident.append(hash64(name.encode("utf-8")))
        self.up.append(False)
        self.present.append(True)
        self.changed(i)
        return i

    def remove(self, i: int) -> None:
        self.check_index(i)
        self.present[i] = False
        self.up[i] = False
        self.changed(i)

    def set_up(self, i: int, up: bool) -> None:
        self.check_index(i)
        if not self.present[i]:
            return
        if self.up[i] != bool(up):
            self.up[i] = bool(up)
            self.changed(i)

    def set_weight(self, i: int, weight: int) -> None:
        self.check_index(i)
        check_weight(weight)
        if self.weight[i] != weight:
            self.weight[i] = weight
            self.changed(i)

    def set_max_connections(self, i: int, limit: int) -> None:
        self.check_index(i)
        self.max_conns[i] = max(limit, 0)
        self.load_changed(i)

    def conn_opened(self, i: int) -> None:
        self.check_index(i)
        self.active[i] += 1
        self.load_changed(i)

    def conn_closed(self, i: int) -> None:
        self.check_index(i)
        if self.active[i] > 0:
            self.active[i] -= 1
        self.load_changed(i)

    def observe_rt(self, i: int, seconds: float) -> None:
        self.check_index(i)
        if not seconds >= 0.0:      # negative or NaN: a clock step, not a measurement
            seconds = 0.0
        if self.ewma[i] < 0:
            self.ewma[i] = seconds
        else:
            self.ewma[i] += EWMA_ALPHA * (seconds - self.ewma[i])
        self.load_changed(i)

    def eligible(self, i: int) -> bool:
        return (self.present[i] and self.up[i] and self.weight[i] > 0
                and (self.max_conns[i] == 0 or self.active[i] < self.max_conns[i]))

    def is_eligible(self, i: int) -> bool:
        self.check_index(i)
        return self.eligible(i)

    def active_count(self, i: int) -> int:
        self.check_index(i)
        return self.active[i]

    def rt_ewma(self, i: int):
        self.check_index(i)
        return None if self.ewma[i] < 0 else self.ewma[i]

    def draw(self) -> int:
        """The next splitmix64 draw (splitmix64_next in hashing.pxi)."""
        self.rng = (self.rng + SPLITMIX64_GAMMA) & MASK64
        return mix64(self.rng)

    def changed(self, i: int) -> None:
        """add / remove / set_up / set_weight touched slot i."""

    def load_changed(self, i: int) -> None:
        """conn_opened / conn_closed / observe_rt / set_max_connections touched slot i."""

    def pick(self, key: int = 0, avoid=()) -> int:
        avoid = tuple(avoid)
        if len(avoid) > ALGO_MAX_AVOID:
            raise ValueError(f"at most {ALGO_MAX_AVOID} backends can be avoided")
        return self.pick_c(key, avoid)

    def pick_c(self, key: int, avoid: tuple) -> int:
        return -1
