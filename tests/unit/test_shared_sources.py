"""SharedSourceLimits (the per-source limits in the shared table) against its plain-Python
twin acl.SourceLimits: one random sequence of admits, releases and clock steps, the same
verdicts and table sizes; and the gate that configure_gate builds with a table."""
import random
from types import SimpleNamespace

import pytest

from l4lb import _native, acl

pytestmark = pytest.mark.timeout(120)


def twins(max_connections, rate, cap):
    table = _native.SharedTable(rows=2, backends=0, listeners=2, pools=0, sources=4096)
    index = table.alloc_listener()
    other = table.alloc_listener()                      # a neighbour must not interfere
    neighbour = _native.SharedSourceLimits(table, other, 1, 0.0)
    assert neighbour.admit(3, 0.0) is None
    shared = _native.SharedSourceLimits(table, index, max_connections, rate, cap=cap,
                                        prune_interval=acl.PRUNE_INTERVAL)
    return acl.SourceLimits(max_connections, rate, cap=cap), shared, neighbour


@pytest.mark.parametrize("seed", range(40))
def test_shared_source_limits_give_the_verdicts_of_the_python_twin(seed):
    rng = random.Random(seed)
    max_connections = rng.choice([0, 1, 2, 3])
    rate = rng.choice([0.0, 0.5, 2.0, 10.0]) if max_connections else rng.choice([0.5, 2.0])
    cap = rng.choice([2, 4, 8, 100])
    reference, shared, neighbour = twins(max_connections, rate, cap)
    held = {}
    now = 1000.0
    for step in range(400):
        op = rng.random()
        if op < 0.2:
            now += rng.choice([0.0, 0.01, 0.1, 0.5, 1.0, 3.0])
        elif op < 0.6 or not any(held.values()):
            key = rng.randrange(12)
            verdict = reference.admit(key, now)
            assert shared.admit(key, now) == verdict, (seed, step, key)
            if verdict is None:
                held[key] = held.get(key, 0) + 1
        else:
            key = rng.choice([k for k, n in held.items() if n])
            reference.release(key)
            shared.release(key)
            held[key] -= 1
        assert len(shared) == len(reference), (seed, step)
    assert shared.prune(now + 100) == reference.prune(now + 100)
    assert len(shared) == len(reference)
    assert len(neighbour) == 1


def test_configure_gate_with_a_table_makes_shared_limits_and_keys_every_spelling_alike():
    table = _native.SharedTable(rows=1, backends=0, listeners=1, pools=0, sources=128)
    index = table.alloc_listener()
    cfg = SimpleNamespace(allow=[], deny=[], per_source_max_connections=1,
                          per_source_rate=0.0)
    gate = acl.configure_gate(None, cfg, _native.monotonic, table=table, index=index)
    assert isinstance(gate.limits, _native.SharedSourceLimits)
    first = SimpleNamespace(client_host="10.0.0.1")
    assert gate.admit(first) is None
    mapped = SimpleNamespace(client_host="::ffff:10.0.0.1")
    assert gate.admit(mapped) == acl.PER_SOURCE_MAX_CONNECTIONS
    gate.release(first)
    assert gate.admit(mapped) is None
    gate.release(mapped)
    assert len(gate.limits) == 0
    # Without a table: the plain limits, as before.
    plain = acl.configure_gate(None, cfg, _native.monotonic)
    assert isinstance(plain.limits, acl.SourceLimits)
