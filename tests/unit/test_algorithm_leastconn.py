"""leastconn: weighted least connections with a rotating tie-break."""
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .algo_ops import add_up, make

pytestmark = pytest.mark.timeout(60)
BOTH = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "twin"])


@BOTH
@settings(max_examples=60, deadline=None)
@given(backends=st.lists(st.tuples(st.integers(1, 10000), st.integers(0, 20), st.booleans()),
                         min_size=1, max_size=12),
       avoid=st.lists(st.integers(0, 11), max_size=4))
def test_picks_a_minimum_of_active_over_weight(compiled, backends, avoid):
    algo = make("leastconn", compiled)
    add_up(algo, [w for w, _, _ in backends])
    for i, (_, active, up) in enumerate(backends):
        for _ in range(active):
            algo.conn_opened(i)
        algo.set_up(i, up)
    usable = [i for i, (_, _, up) in enumerate(backends) if up and i not in avoid]
    i = algo.pick(avoid=avoid)
    if not usable:
        assert i == -1
        return
    load = {j: Fraction(backends[j][1], backends[j][0]) for j in usable}
    assert i in usable and load[i] == min(load.values())
    if compiled:
        algo.check_heap()


@BOTH
def test_equal_backends_share_ties_evenly_instead_of_the_first_taking_all(compiled):
    algo = make("leastconn", compiled)
    add_up(algo, [1, 1, 1, 1])
    counts = [0] * 4
    for _ in range(100):       # short connections: pick, open, close, all at load 0
        i = algo.pick()
        algo.conn_opened(i)
        algo.conn_closed(i)
        counts[i] += 1
    assert counts == [25, 25, 25, 25]


@BOTH
def test_held_connections_spread_in_proportion_to_weight(compiled):
    algo = make("leastconn", compiled)
    add_up(algo, [1, 2, 3])
    for _ in range(60):
        algo.conn_opened(algo.pick())
    assert [algo.active_count(i) for i in range(3)] == [10, 20, 30]


@BOTH
def test_nine_held_connections_over_three_backends_are_three_each(compiled):
    algo = make("leastconn", compiled)
    add_up(algo, [100, 100, 100])
    for _ in range(9):
        algo.conn_opened(algo.pick())
    assert [algo.active_count(i) for i in range(3)] == [3, 3, 3]


@BOTH
def test_a_backend_at_max_connections_leaves_and_rejoins_the_heap(compiled):
    algo = make("leastconn", compiled)
    add_up(algo, [1, 1])
    algo.set_max_connections(0, 1)
    algo.conn_opened(0)
    assert {algo.pick() for _ in range(5)} == {1}
    algo.set_max_connections(1, 1)
    algo.conn_opened(1)
    assert algo.pick() == -1
    algo.conn_closed(0)
    assert algo.pick() == 0
    if compiled:
        algo.check_heap()


@BOTH
def test_avoid_walks_the_heap_best_first_past_many_avoided_backends(compiled):
    algo = make("leastconn", compiled)
    add_up(algo, [1] * 100)
    for i in range(100):
        for _ in range(i % 7):
            algo.conn_opened(i)
    # Every idle backend (i % 7 == 0) and the three oldest with one connection avoided:
    # the next oldest with one connection is 22.
    avoid = [i for i in range(100) if i % 7 == 0] + [1, 8, 15]
    assert algo.pick(avoid=avoid) == 22
    if compiled:
        algo.check_heap()
