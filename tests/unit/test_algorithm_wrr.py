"""wrr: nginx's smooth weighted round robin, compiled class and reference twin alike."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from .algo_ops import add_up, make

pytestmark = pytest.mark.timeout(60)
BOTH = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "twin"])


def windows(seq, size):
    return (seq[s:s + size] for s in range(len(seq) - size + 1))


@BOTH
def test_weights_5_1_1_interleave_like_nginx(compiled):
    algo = make("wrr", compiled)
    add_up(algo, [5, 1, 1])
    assert "".join("abc"[algo.pick()] for _ in range(14)) == "aabacaa" * 2


@BOTH
@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(1, 30), min_size=1, max_size=6),
       scale=st.sampled_from([1, 100]))
def test_any_window_of_total_weight_picks_holds_each_backend_exactly_its_weight(
        compiled, weights, scale):
    algo = make("wrr", compiled)
    add_up(algo, [w * scale for w in weights])
    total = sum(weights)
    seq = [algo.pick() for _ in range(3 * total)]
    for window in windows(seq, total):
        assert [window.count(i) for i in range(len(weights))] == weights


@BOTH
@settings(max_examples=40, deadline=None)
@given(old=st.lists(st.sampled_from([1, 2, 5, 100, 10000, 1000000]), min_size=2, max_size=5),
       warmup=st.integers(0, 400), data=st.data())
def test_a_weight_change_at_runtime_causes_no_burst(compiled, old, warmup, data):
    # Credits earned under the old weights are clamped to the new total, so no backend
    # gets more than about one pick beyond its new share in any window.
    new = data.draw(st.lists(st.integers(1, 20), min_size=len(old), max_size=len(old)))
    algo = make("wrr", compiled)
    add_up(algo, old)
    for _ in range(warmup):
        algo.pick()
    for i, w in enumerate(new):
        algo.set_weight(i, w)
    total = sum(new)
    seq = [algo.pick() for _ in range(3 * total)]
    for window in windows(seq, total):
        for i, w in enumerate(new):
            assert abs(window.count(i) - w) <= 2, (i, window.count(i), w)


@BOTH
def test_weight_cut_from_a_million_to_one_does_not_hand_the_other_backend_a_burst(compiled):
    algo = make("wrr", compiled)
    add_up(algo, [1000000, 1])
    for _ in range(1000):
        algo.pick()
    algo.set_weight(0, 1)
    seq = [algo.pick() for _ in range(20)]
    assert 8 <= seq.count(1) <= 12


@BOTH
def test_avoided_and_full_backends_are_skipped_and_earn_no_credit(compiled):
    algo = make("wrr", compiled)
    add_up(algo, [5, 1, 1])
    assert {algo.pick(avoid=[0]) for _ in range(10)} == {1, 2}
    assert algo.credit(0) == 0
    algo.set_max_connections(1, 1)
    algo.conn_opened(1)
    assert {algo.pick(avoid=[0]) for _ in range(10)} == {2}
    assert algo.pick(avoid=[0, 2]) == -1


@BOTH
def test_a_backend_back_from_down_starts_neutral(compiled):
    algo = make("wrr", compiled)
    add_up(algo, [1, 1, 1])
    algo.pick()
    algo.pick()
    algo.set_up(1, False)
    assert algo.credit(1) == 0
    algo.set_up(1, True)
    seq = [algo.pick() for _ in range(30)]
    assert [seq.count(i) for i in range(3)] == [10, 10, 10]


@BOTH
def test_weight_zero_and_down_backends_are_never_picked(compiled):
    algo = make("wrr", compiled)
    add_up(algo, [3, 0, 2, 4])
    algo.set_up(3, False)
    assert sorted({algo.pick() for _ in range(50)}) == [0, 2]
    algo.remove(0)
    algo.set_weight(2, 0)
    assert algo.pick() == -1
