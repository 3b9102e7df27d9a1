"""rr: plain round robin, pinned down by one literal golden sequence."""
import pytest

from .algo_ops import add_up, make

pytestmark = pytest.mark.timeout(30)
BOTH = pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "twin"])


def picks(algo, count, avoid=()):
    return [algo.pick(0, avoid) for _ in range(count)]


@BOTH
def test_rr_scans_forward_from_the_last_pick_skipping_whatever_is_not_eligible(compiled):
    # Every expected list below is written out by hand from the rule "scan forward from
    # the slot after the last pick, take the first eligible one": a change of the rule
    # (restarting the scan, weighting, reusing removed slots) changes these lists.
    algo = make("rr", compiled)
    add_up(algo, [1, 5, 3, 1])          # weights are ignored except 0
    assert picks(algo, 6) == [0, 1, 2, 3, 0, 1]

    algo.set_up(2, False)               # down: skipped, the others keep their order
    assert picks(algo, 4) == [3, 0, 1, 3]

    algo.set_up(2, True)
    algo.remove(0)                      # removed: its slot stays empty for good
    assert picks(algo, 4) == [1, 2, 3, 1]

    assert algo.add("b4", 1) == 4       # a new backend takes a new slot, in turn order
    algo.set_up(4, True)
    assert picks(algo, 5) == [2, 3, 4, 1, 2]

    algo.set_weight(3, 0)               # weight 0: no new connections
    assert picks(algo, 4) == [4, 1, 2, 4]

    assert algo.pick(0, [1]) == 2       # avoided slots are skipped, the scan moves on
    assert algo.pick(0, [2, 4]) == 1

    algo.set_max_connections(2, 1)      # full: skipped while at its limit
    algo.conn_opened(2)
    assert picks(algo, 3) == [4, 1, 4]

    algo.set_up(1, False)
    algo.set_up(4, False)
    assert picks(algo, 2) == [-1, -1]   # nothing eligible: -1, and the turn is kept
    algo.conn_closed(2)
    algo.set_weight(3, 7)
    assert picks(algo, 4) == [2, 3, 2, 3]


@BOTH
def test_rr_gives_the_same_turns_whatever_the_key(compiled):
    algo = make("rr", compiled)
    add_up(algo, [1, 1, 1])
    assert [algo.pick(key) for key in (0, 7, 2**64 - 1, 7, 0)] == [0, 1, 2, 0, 1]
