"""`backup = true` (HAProxy `backup`): Pool.push shows a backup to the algorithm as up only
while no non-backup backend of its pool is up, and follows every state change."""
import pytest

from l4lb.algorithms import ALGORITHMS
from l4lb.config import Address, BackendConfig, ConfigError, PoolConfig, parse_config
from l4lb.model import BackendState, Pool

UP, DOWN, MAINT, DRAINING = (BackendState.UP, BackendState.DOWN, BackendState.MAINT,
                             BackendState.DRAINING)


def backup_pool(algorithm="rr"):
    return Pool(PoolConfig(name="p", algorithm=algorithm, backends=[
        BackendConfig(name="a", address=Address("127.0.0.1", 9001)),
        BackendConfig(name="b", address=Address("127.0.0.1", 9002)),
        BackendConfig(name="spare", address=Address("127.0.0.1", 9003), backup=True),
    ]))


def picked(pool) -> set[str]:
    """The backends the algorithm may pick (and, for rr, does pick)."""
    eligible = {b.name for b in pool if pool.algo.is_eligible(b.slot)}
    if pool.config.algorithm == "rr":
        names = {b.slot: b.name for b in pool}
        assert {names[s] for s in (pool.algo.pick(k) for k in range(64)) if s >= 0} == eligible
    return eligible


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_a_backup_takes_connections_only_while_no_other_backend_is_up(algorithm):
    pool = backup_pool(algorithm)
    a, b = pool.backends["a"], pool.backends["b"]
    assert picked(pool) == {"a", "b"}
    pool.set_state(a, DOWN, "test")
    assert picked(pool) == {"b"}
    pool.set_state(b, MAINT, "test")
    assert picked(pool) == {"spare"}
    pool.set_state(a, UP, "test")
    assert picked(pool) == {"a"}


def test_draining_the_last_primary_hands_new_connections_to_the_backup():
    pool = backup_pool()
    pool.set_state(pool.backends["a"], DRAINING, "test")
    pool.set_state(pool.backends["b"], DRAINING, "test")
    assert picked(pool) == {"spare"}


def test_removing_the_last_up_primary_brings_the_backup_in():
    pool = backup_pool()
    pool.set_state(pool.backends["a"], DOWN, "test")
    pool.remove_backend("b")
    assert picked(pool) == {"spare"}


def test_a_reload_that_clears_backup_puts_the_backend_in_rotation():
    pool = backup_pool()
    pool.update_backend(BackendConfig(name="spare", address=Address("127.0.0.1", 9003)))
    assert picked(pool) == {"a", "b", "spare"}


def test_backup_is_a_boolean_in_the_config():
    base = ('[control]\nsocket = "s"\n[listeners.w]\nbind = ["127.0.0.1:0"]\npool = "p"\n'
            '[pools.p]\nbackends = [ {{ name = "a", address = "127.0.0.1:1", backup = {} }} ]\n')
    assert parse_config(base.format("true"), "x.toml").pools["p"].backends[0].backup is True
    with pytest.raises(ConfigError, match="backup"):
        parse_config(base.format('"yes"'), "x.toml")
