"""The compiled extension is what is imported, and each of its classes works."""
import importlib.machinery

import l4lb
from l4lb import _native
from l4lb.algorithms import ALGORITHMS


def test_compiled_extension_is_the_module_imported():
    assert _native.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))
    assert l4lb._native is _native


def test_every_registered_algorithm_is_compiled_and_picks():
    for word, (compiled, reference) in ALGORITHMS.items():
        assert compiled.__module__ == "l4lb._native", word
        algo = compiled(7)
        i = algo.add("a", 1)
        algo.set_up(i, True)
        assert algo.pick(1) == i
        assert compiled.name == reference.name == word


def test_relay_runtime_classes_construct():
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        hub = _native.Hub(loop)
        pool = _native.PoolRuntime("p", _native.RoundRobin())
        pool.add_target(_native.Target("p", "a", "127.0.0.1", 1, 0))
        listener = _native.ListenerRuntime("l", hub)
        listener.pool = pool
        listener.set_split([pool], [100])
        assert hub.relays() == []
        hub.sweep()
    finally:
        loop.close()


def test_address_key_is_stable_and_port_sensitive():
    k = _native.address_key("10.1.2.3")
    assert k == _native.address_key("10.1.2.3")
    assert k != _native.address_key("10.1.2.4")
    assert (_native.address_key("10.1.2.3", 1, _native.HASH_KEY_SRC_IP_PORT)
            != _native.address_key("10.1.2.3", 2, _native.HASH_KEY_SRC_IP_PORT))
