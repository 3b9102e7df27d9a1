"""p2c: power of two random choices on active/weight, seeded splitmix64."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .algo_ops import add_up, make

pytestmark = pytest.mark.timeout(60)
BOTH = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "twin"])


def run(algo, n):
    picks = []
    for _ in range(n):
        i = algo.pick()
        algo.conn_opened(i)
        picks.append(i)
        if len(picks) % 3 == 0:
            algo.conn_closed(picks[-2])
    return picks


@BOTH
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**64 - 1))
def test_a_seeded_run_is_reproducible(compiled, seed):
    first, second = make("p2c", compiled, seed), make("p2c", compiled, seed)
    add_up(first, [1, 2, 3, 4, 5])
    add_up(second, [1, 2, 3, 4, 5])
    assert run(first, 200) == run(second, 200)


@BOTH
def test_different_seeds_make_different_runs(compiled):
    runs = set()
    for seed in range(5):
        algo = make("p2c", compiled, seed)
        add_up(algo, [1] * 8)
        runs.add(tuple(algo.pick() for _ in range(50)))
    assert len(runs) == 5


@BOTH
def test_picks_the_less_loaded_of_two_so_no_backend_runs_far_ahead(compiled):
    algo = make("p2c", compiled, 42)
    add_up(algo, [1] * 10)
    for _ in range(1000):
        algo.conn_opened(algo.pick())
    counts = [algo.active_count(i) for i in range(10)]
    assert max(counts) - min(counts) <= 4, counts


@BOTH
def test_held_connections_follow_the_weights(compiled):
    algo = make("p2c", compiled, 7)
    add_up(algo, [1, 3])
    for _ in range(400):
        algo.conn_opened(algo.pick())
    assert 90 <= algo.active_count(0) <= 110


@BOTH
def test_a_lone_usable_backend_behind_avoided_ones_is_found(compiled):
    algo = make("p2c", compiled, 3)
    add_up(algo, [1] * 6)
    assert {algo.pick(avoid=[0, 1, 2, 4, 5]) for _ in range(20)} == {3}
    assert algo.pick(avoid=range(6)) == -1
