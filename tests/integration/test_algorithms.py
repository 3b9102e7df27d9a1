"""Selection algorithms through the running balancer (issue 3's integration tests)."""
import pytest

from ..support import L4LB, backends_toml, connect, name_handler, hello


def pool_config(algorithm, backends, extra=""):
    return f"""
[listeners.web]
bind = ["127.0.0.1:0"]
pool = "main"
[pools.main]
algorithm = "{algorithm}"
{extra}
backends = [
{backends_toml(backends)}
]
"""



SOURCES = [f"127.0.0.{i}" for i in range(2, 42)]


def mapping(port):
    out = {}
    for src in SOURCES:
        seen = {hello(port, source=src) for _ in range(10)}
        assert len(seen) == 1, (src, seen)           # every source always reaches one backend
        out[src] = seen.pop()
    return out


@pytest.mark.timeout(120)
def test_hash_pool_keeps_each_source_on_one_backend_across_restarts_and_removals(
        backends, tmp_path):
    names = ["a", "b", "c", "d"]
    bs = [backends(name_handler, name=n) for n in names]
    rows = [(n, b.address) for n, b in zip(names, bs)]
    lb = L4LB(tmp_path, pool_config("hash", rows)).wait_ready()
    try:
        first = mapping(lb.port())
    finally:
        lb.stop()
    assert len(set(first.values())) >= 3                  # 40 sources spread out
    lb = L4LB(tmp_path, pool_config("hash", rows)).wait_ready()
    try:
        assert mapping(lb.port()) == first                 # the same after a restart
    finally:
        lb.stop()
    lb = L4LB(tmp_path, pool_config("hash", rows[:3])).wait_ready()   # "d" removed
    try:
        after = mapping(lb.port())
    finally:
        lb.stop()
    stayed = [s for s in SOURCES if first[s] != "d"]
    kept = sum(after[s] == first[s] for s in stayed)
    assert kept >= 0.9 * len(stayed)


def test_leastconn_spreads_held_connections_evenly(backends, l4lb):
    bs = [backends(name_handler, name=n) for n in "abc"]
    lb = l4lb(pool_config("leastconn", [(n, b.address) for n, b in zip("abc", bs)]))
    held, seen = [], []
    for _ in range(9):
        s = connect(lb.port())
        s.sendall(b"hi\n")
        seen.append(s.recv(100).strip().decode())
        held.append(s)
    for s in held:
        s.close()
    assert sorted(seen.count(n) for n in "abc") == [3, 3, 3]


@pytest.mark.parametrize("algorithm", ["wrr", "lrt", "p2c"])
def test_weighted_algorithms_serve_through_the_relay(backends, l4lb, algorithm):
    a, b = backends(name_handler, name="a"), backends(name_handler, name="b")
    lb = l4lb(pool_config(algorithm, [("a", a.address, {"weight": 3}),
                                      ("b", b.address, {"weight": 1})]))
    seen = [hello(lb.port()) for _ in range(40)]
    assert len(seen) == 40 and set(seen) <= {"a", "b"}
    if algorithm == "wrr":
        # Smooth wrr turns in each worker: each gives a 3 of every 4 it takes, to within
        # one cycle, whatever share of the 40 the kernel handed it.
        assert abs(seen.count("a") - 30) <= 2 * 2, seen
    if algorithm == "p2c":                  # equal load: the heavier of the two wins
        assert seen.count("a") >= seen.count("b")
    # lrt follows measured connect times, which loopback noise decides: served is enough.
