"""The compiled module is really compiled, and every registered class works from Python."""
import os

import pytest

import l4lb._native
from .algo_ops import add_up, make
from l4lb.algorithms import ALGORITHMS, REFERENCES, create_algorithm

pytestmark = pytest.mark.timeout(30)


def test_the_native_module_is_a_compiled_shared_object():
    # A pure-Python fallback would keep every other test green while running slow code.
    assert l4lb._native.__file__.endswith(".so")


@pytest.mark.parametrize("word", sorted(ALGORITHMS))
def test_each_class_is_named_by_its_config_word_and_picks(word):
    compiled, twin = ALGORITHMS[word], REFERENCES[word]
    assert compiled.name == twin.name == word
    algo = create_algorithm(word, seed=1)
    assert isinstance(algo, compiled)
    assert algo.pick(5) == -1
    add_up(algo, [1, 2])
    assert algo.pick(5) in (0, 1)
    assert algo.pick(5, avoid=[0]) == 1
    assert algo.bench_pick(1000, 0) == 0            # the C loop finds a backend every time
    assert algo.bench_pick(1000, 0, True) == 0


@pytest.mark.parametrize("word", sorted(ALGORITHMS))
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "twin"])
def test_bad_arguments_raise_instead_of_corrupting_state(word, compiled):
    algo = make(word, compiled)
    add_up(algo, [1])
    for call in (lambda: algo.set_weight(1, 1), lambda: algo.conn_opened(-1),
                 lambda: algo.set_weight(0, -1), lambda: algo.add("x", 1 << 25),
                 lambda: algo.pick(0, avoid=range(33))):
        with pytest.raises((IndexError, ValueError)):
            call()
    assert len(algo) == 1 and algo.pick() == 0


def test_relay_runtime_classes_construct():
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        hub = l4lb._native.Hub(loop)
        pool = l4lb._native.PoolRuntime("p", l4lb._native.RoundRobin())
        pool.add_target(l4lb._native.Target("p", "a", "127.0.0.1", 1, 0))
        listener = l4lb._native.ListenerRuntime("l", hub)
        listener.route.pool = pool
        listener.route.set_split([pool], [100])
        assert hub.relays() == []
        hub.sweep()
    finally:
        loop.close()


def test_address_key_is_stable_and_port_sensitive():
    n = l4lb._native
    k = n.address_key("10.1.2.3")
    assert k == n.address_key("10.1.2.3")
    assert k != n.address_key("10.1.2.4")
    assert (n.address_key("10.1.2.3", 1, n.HASH_KEY_SRC_IP_PORT)
            != n.address_key("10.1.2.3", 2, n.HASH_KEY_SRC_IP_PORT))


def test_the_relay_moves_along_its_transition_table():
    walk = l4lb._native._relay_walk
    assert walk(["header", "connecting", "queued", "connecting", "open", "closed"]) == "closed"
    assert walk(["closed"]) == "closed"                 # rejected before admission
    assert walk(["header", "inspect", "connecting", "open", "closed"]) == "closed"
    assert walk(["inspect", "connecting", "queued", "connecting", "open"]) == "open"


BAD_PATHS = [["open"], ["queued"], ["connecting", "header"],
             ["connecting", "closed", "connecting"], ["connecting", "open", "queued"],
             ["inspect", "open"], ["inspect", "header"], ["connecting", "inspect"]]


@pytest.fixture(scope="module")
def debug_build(tmp_path_factory):
    """A copy of the package with _native built as `L4LB_DEBUG=1 pip install -e .` would
    build it (its own folder: the C file cythonize writes must not replace the release
    one). Returns the folder to put on sys.path."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    root = tmp_path_factory.mktemp("debug-build")
    shutil.copy(repo / "setup.py", root)
    shutil.copytree(repo / "ext", root / "ext", ignore=shutil.ignore_patterns("*.c", "*.html"))
    shutil.copytree(repo / "l4lb", root / "l4lb",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                          cwd=root, env={**os.environ, "L4LB_DEBUG": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


@pytest.mark.timeout(600)
def test_a_debug_build_refuses_a_relay_transition_outside_the_table(debug_build):
    import json
    import subprocess
    import sys

    script = """
import json, sys
import l4lb._native as n
assert n.DEBUG_BUILD and n.__file__.startswith(sys.argv[1]), n.__file__
out = [n._relay_walk(["header", "connecting", "queued", "connecting", "open", "closed"])]
for path in json.loads(sys.argv[2]):
    try:
        n._relay_walk(path)
        out.append("allowed")
    except AssertionError as exc:
        out.append(str(exc))
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(debug_build), json.dumps(BAD_PATHS)],
                          cwd=debug_build, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    good, *bad = json.loads(proc.stdout)
    assert good == "closed"
    assert len(bad) == len(BAD_PATHS) and all("is not in RELAY_NEXT" in m for m in bad), bad


def test_a_release_build_has_no_transition_checks():
    # The setter is a plain assignment there (the asserts cost nothing in production).
    assert not l4lb._native.DEBUG_BUILD
    assert l4lb._native._relay_walk(["open"]) == "open"


def test_one_overload_errno_set_and_one_accept_pause_are_exported():
    import errno

    n = l4lb._native
    assert n.OVERLOAD_ERRNOS == {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
    assert 0 < n.ACCEPT_PAUSE < 1


def test_the_acceptor_and_poller_construct_and_close():
    import asyncio
    import socket

    loop = asyncio.new_event_loop()
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setblocking(False)
    try:
        hub = l4lb._native.Hub(loop)
        acceptor = l4lb._native.Acceptor(sock, l4lb._native.ListenerRuntime("l", hub))
        assert acceptor.sockets == [sock]
        assert hub.splice_poller.pipe_stats["used"] == 0
        assert acceptor.pause(0.01) is True
        acceptor.close()
        acceptor.close()                                # idempotent
        assert sock.fileno() == -1
    finally:
        sock.close()
        loop.close()


@pytest.mark.parametrize("word", sorted(ALGORITHMS))
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "twin"])
def test_class_and_twin_accept_weights_up_to_the_exported_algo_bound_and_no_further(
        word, compiled):
    bound = l4lb._native.ALGO_WEIGHT_MAX
    algo = make(word, compiled)
    i = algo.add("top", bound)
    algo.set_weight(i, bound)
    with pytest.raises(ValueError, match=str(bound)):
        algo.add("over", bound + 1)
    with pytest.raises(ValueError, match=str(bound)):
        algo.set_weight(i, bound + 1)
    assert len(algo) == 1


def test_the_algo_weight_bound_holds_the_largest_operator_weight_at_slow_start_scale():
    # Two bounds with two meanings: the operator's weight (control/config) and what the
    # algorithms accept after the control plane scales it for slow start.
    from l4lb.control.protocol import WEIGHT_MAX as OPERATOR_WEIGHT_MAX
    from l4lb.model import WEIGHT_SCALE
    assert l4lb._native.ALGO_WEIGHT_MAX == 1 << 24
    assert OPERATOR_WEIGHT_MAX * WEIGHT_SCALE <= l4lb._native.ALGO_WEIGHT_MAX
    assert not hasattr(l4lb._native, "WEIGHT_MAX")
    assert l4lb._native.ALGO_MAX_AVOID == 32
