"""Pool.reconfigure with a new algorithm (a reload's "pool X rebuilt"): the backends, their
Targets and states stay, and the new algorithm starts from what runs (issue 20 item 1)."""
import dataclasses

import pytest

from l4lb.algorithms import ALGORITHMS
from l4lb.config import Address, BackendConfig, PoolConfig
from l4lb.model import BackendState, Pool


def pool_config(algorithm, names=("a", "b", "c", "d")):
    return PoolConfig(name="p", algorithm=algorithm, backends=[
        BackendConfig(name=n, address=Address("127.0.0.1", 9000 + i), weight=i + 1,
                      max_connections=10 if n == "c" else 0)
        for i, n in enumerate(names)])


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_rebuild_keeps_targets_states_slots_and_active_counts(algorithm):
    other = "rr" if algorithm != "rr" else "leastconn"
    pool = Pool(pool_config(other))
    targets = {b.name: b.target for b in pool}
    pool.remove_backend("b")                         # a removed slot stays removed
    pool.set_state(pool.backends["d"], BackendState.DOWN, "test")
    pool.backends["a"].target.active = 3             # live connections, as the relay counts
    for _ in range(3):
        pool.algo.conn_opened(pool.backends["a"].slot)
    runtime = pool.runtime
    assert pool.reconfigure(pool_config(algorithm)) is True
    assert pool.runtime is runtime and runtime.algo is pool.algo
    assert type(pool.algo) is ALGORITHMS[algorithm]           # the compiled class
    assert {b.name: b.target for b in pool} == {n: targets[n] for n in ("a", "c", "d")}
    assert pool.algo.active_count(pool.backends["a"].slot) == 3
    assert pool.backends["d"].state is BackendState.DOWN
    assert not pool.algo.is_eligible(pool.backends["d"].slot)
    assert not pool.algo.is_eligible(targets["b"].slot)
    picks = {pool.algo.pick(key) for key in range(64)}
    assert picks <= {pool.backends["a"].slot, pool.backends["c"].slot} and picks
    added = pool.add_backend(BackendConfig(name="e", address=Address("127.0.0.1", 9100)))
    assert added.slot == len(runtime.targets) - 1    # slots still line up after a rebuild


def test_reconfigure_without_an_algorithm_change_keeps_the_algorithm():
    pool = Pool(pool_config("rr"))
    algo = pool.algo
    cfg = dataclasses.replace(pool_config("rr"), slow_start=5.0, on_down="close")
    assert pool.reconfigure(cfg) is False
    assert pool.algo is algo and pool.slow_start == 5.0 and pool.on_down == "close"
