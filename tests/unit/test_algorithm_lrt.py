"""lrt: least response time, (active + 1) x EWMA(connect time) / weight."""
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .algo_ops import add_up, make

pytestmark = pytest.mark.timeout(60)
BOTH = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "twin"])


@BOTH
def test_backends_without_a_sample_are_tried_first(compiled):
    algo = make("lrt", compiled)
    add_up(algo, [1, 1, 1])
    algo.observe_rt(0, 0.0001)
    algo.observe_rt(2, 0.0001)
    algo.conn_opened(1)
    algo.conn_opened(1)          # busier, yet unmeasured: still first
    assert algo.pick() == 1
    algo.observe_rt(1, 0.5)
    assert algo.pick() in (0, 2)


@BOTH
def test_a_slow_backend_gets_fewer_connections(compiled):
    algo = make("lrt", compiled)
    add_up(algo, [1, 1])
    algo.observe_rt(0, 0.001)
    algo.observe_rt(1, 0.004)
    for _ in range(50):
        algo.conn_opened(algo.pick())
    # (a0 + 1) x 1 ms ~ (a1 + 1) x 4 ms  ->  a0 + 1 ~ 4 (a1 + 1)
    assert (algo.active_count(0), algo.active_count(1)) == (40, 10)


@BOTH
@settings(max_examples=60, deadline=None)
@given(backends=st.lists(
    st.tuples(st.integers(1, 1000000), st.integers(0, 9),
              st.one_of(st.none(), st.floats(0.0, 3.0))),
    min_size=1, max_size=10),
    avoid=st.lists(st.integers(0, 9), max_size=3))
def test_picks_a_minimum_of_the_response_time_load(compiled, backends, avoid):
    algo = make("lrt", compiled)
    add_up(algo, [w for w, _, _ in backends])
    for i, (_, active, rt) in enumerate(backends):
        for _ in range(active):
            algo.conn_opened(i)
        if rt is not None:
            algo.observe_rt(i, rt)

    def load(i):
        w, active, rt = backends[i]
        if rt is None:
            return (0, Fraction(active, w))
        return (1, Fraction((active + 1) * int(rt * 1e9), w))

    usable = [i for i in range(len(backends)) if i not in avoid]
    i = algo.pick(avoid=avoid)
    if not usable:
        assert i == -1
    else:
        assert load(i) == min(load(j) for j in usable)
    if compiled:
        algo.check_heap()


@BOTH
def test_the_ewma_moves_a_fifth_of_the_way_to_each_sample(compiled):
    algo = make("lrt", compiled)
    add_up(algo, [1])
    assert algo.rt_ewma(0) is None
    algo.observe_rt(0, 1.0)
    algo.observe_rt(0, 2.0)
    assert algo.rt_ewma(0) == pytest.approx(1.2)
