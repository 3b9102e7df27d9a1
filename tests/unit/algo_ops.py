"""Shared pieces of the algorithm tests: building instances and replaying operations."""
from hypothesis import strategies as st

from l4lb.algorithms import ALGORITHMS, REFERENCES

WORDS = sorted(ALGORITHMS)
# A small Maglev table keeps the twin's rebuilds fast; the rule (prime, >= 100 x
# backends) still holds: the table grows past it as backends are added.
SMALL_TABLE = 101
MASK64 = (1 << 64) - 1


def make(word, compiled=True, seed=0, small_table=True):
    cls = (ALGORITHMS if compiled else REFERENCES)[word]
    if word == "hash" and small_table:
        return cls(seed, min_table_size=SMALL_TABLE)
    return cls(seed)


def pair(word, seed=0, small_table=True):
    """The compiled instance and its reference twin, ready for lock-step driving."""
    return make(word, True, seed, small_table), make(word, False, seed, small_table)


def add_up(algo, weights):
    """Add one backend per weight, named b0, b1, ..., all up; return their slots."""
    slots = []
    for k, w in enumerate(weights):
        i = algo.add(f"b{k}", w)
        algo.set_up(i, True)
        slots.append(i)
    return slots


# Weights mix small values (ties, rotation) with the slow-start scale (x100) and extremes.
weights = st.sampled_from([0, 1, 1, 2, 3, 5, 7, 100, 250, 10000, 1000000])
slot = st.integers(0, 40)
keys = st.integers(0, MASK64)

op = st.one_of(
    st.tuples(st.just("add"), weights),
    st.tuples(st.just("remove"), slot),
    st.tuples(st.just("set_up"), slot, st.booleans()),
    st.tuples(st.just("set_up"), slot, st.just(True)),
    st.tuples(st.just("set_weight"), slot, weights),
    st.tuples(st.just("set_max_connections"), slot, st.integers(0, 3)),
    st.tuples(st.just("conn_opened"), slot),
    st.tuples(st.just("conn_closed"), slot),
    st.tuples(st.just("observe_rt"), slot, st.sampled_from([0.0, 0.001, 0.002, 0.01, 0.5, -1.0])),
    st.tuples(st.just("pick"), keys, st.lists(slot, max_size=3)),
    st.tuples(st.just("pick_open"), keys, st.lists(slot, max_size=2)),
    st.tuples(st.just("pick_open_close"), keys),
)
pick = st.one_of(
    st.tuples(st.just("pick"), keys, st.lists(slot, max_size=3)),
    st.tuples(st.just("pick_open"), keys, st.lists(slot, max_size=2)),
    st.tuples(st.just("pick_open_close"), keys),
)
# Half picks, half changes; scenarios start from a few backends that are up.
ops = st.lists(st.one_of(op, pick, pick), max_size=80)
initial = st.lists(weights, min_size=1, max_size=8)


def apply(algo, step, scale=1):
    """Apply one operation to `algo`; return the pick it made (or None). Weights x scale."""
    name, *args = step
    n = len(algo)
    if name == "add":
        return ("added", algo.add(f"b{n}", args[0] * scale))
    if name in ("pick", "pick_open", "pick_open_close"):
        key = args[0]
        avoid = [a % n for a in args[1]] if n and len(args) > 1 else []
        i = algo.pick(key, avoid)
        if i >= 0 and name != "pick":
            algo.conn_opened(i)
            if name == "pick_open_close":
                algo.conn_closed(i)
        return ("picked", i, tuple(avoid))
    if n == 0:
        return None
    i = args[0] % n
    if name == "set_weight":
        algo.set_weight(i, args[1] * scale)
    else:
        getattr(algo, name)(i, *args[1:])
    return None


def usable(algo, avoid=()):
    """Slots a pick may return right now."""
    return {i for i in range(len(algo)) if algo.is_eligible(i) and i not in avoid}
