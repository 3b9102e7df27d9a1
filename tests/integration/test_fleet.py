"""A fleet (issue 17, DESIGN.md §10): two or three l4lb nodes sharing their runtime state
through a real etcd on a loopback port, its data in the test's temp folder."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from ..support import (L4LB, REPO, Etcd, ask, connect, echo_handler, hello, name_handler,
                       recv_exactly, simple_config, two_pool_config, wait_until)

pytestmark = pytest.mark.skipif(shutil.which("etcd") is None,
                                reason="needs etcd (apt-get install etcd-server)")

# Seconds a node's lease lives without a refresh in these tests: short, so a killed node
# leaves quickly; long enough for a node on a busy machine to keep it.
LEASE_TTL = 3.0
# Seconds etcd is down in the fail-static test (the figure).
ETCD_OUTAGE = 30.0


@pytest.fixture
def etcd(tmp_path):
    server = Etcd(tmp_path / "etcd").start()
    yield server
    server.close()


@pytest.fixture
def fleet(tmp_path, etcd):
    """fleet(name, config) runs `config` plus a [cluster] table on `etcd` as node `name`,
    in a folder of its own (config, control socket, state file): the same name starts
    the same node again. Every node is stopped afterwards."""
    started: list[L4LB] = []

    def start(name, config, wait=True, lease_ttl=LEASE_TTL):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        node = L4LB(folder, config + f"""
[cluster]
etcd = ["{etcd.endpoint}"]
node = "{name}"
lease_ttl = {lease_ttl}
""")
        started.append(node)
        if wait:
            node.wait_ready()
            node.wait_event("cluster_connected", 15)
        return node

    yield start
    for node in started:
        if node.proc.poll() is None:
            os.kill(node.proc.pid, signal.SIGCONT)       # one a test left stopped
        node.stop()


def backend_table(node) -> dict:
    """What a fleet shares about each backend: its state and weight."""
    return {b["name"]: (b["state"], b["weight"]) for b in ask(node, "show backends")["backends"]}


def cluster_rows(node) -> dict[str, dict]:
    return {row["node"]: row for row in ask(node, "show cluster")["nodes"]}


def all_see(nodes, names):
    wait_until(lambda: all(set(cluster_rows(n)) == names for n in nodes), 15,
               f"every node to see {sorted(names)}")


class Waiter(threading.Thread):
    """One control command that blocks (`wait`), sent from a thread."""

    def __init__(self, node, line):
        super().__init__(daemon=True)
        self.node, self.line, self.reply = node, line, None
        self.start()

    def run(self):
        self.reply = ask_long(self.node, self.line)


def ask_long(node, line, timeout=60.0):
    from l4lb.control.client import call

    return call(node.path.parent / "l4lb.sock", line, timeout=timeout)


def test_200_weight_and_drain_writes_on_a_are_each_applied_on_b_p99_under_500_ms(
        fleet, backends):
    b1, b2 = backends(echo_handler, "b1"), backends(echo_handler, "b2")
    config = simple_config([("b1", b1.address), ("b2", b2.address)])
    a, b = fleet("a", config), fleet("b", config)
    all_see([a, b], {"a", "b"})
    delays = []
    for i in range(200):
        if i % 2:
            line, want = f"weight main/b1 {i}", ("b1", ("up", i))
        else:
            state = "draining" if i % 4 == 0 else "up"
            line, want = (f"drain main/b2" if state == "draining" else "enable main/b2",
                          ("b2", (state, 1)))
        t0 = time.monotonic()
        assert ask(a, line)["ok"], line
        wait_until(lambda: backend_table(b)[want[0]] == want[1], 10,
                   f"{line} applied on b", interval=0.002)
        delays.append(time.monotonic() - t0)
    delays.sort()
    p99 = delays[int(len(delays) * 0.99) - 1]
    print(f"apply on b: median {delays[100] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 0.5, f"p99 {p99 * 1000:.0f} ms"
    assert backend_table(a) == backend_table(b)


def test_a_killed_node_leaves_within_lease_ttl_and_a_fleet_wait_stops_counting_it(
        fleet, backends):
    b1 = backends(echo_handler, "b1")
    config = simple_config([("b1", b1.address)])
    a, b = fleet("a", config), fleet("b", config)
    all_see([a, b], {"a", "b"})
    held = connect(b.port())
    held.sendall(b"x")
    recv_exactly(held, 1)
    assert ask(a, "drain main/b1 --fleet")["ok"]
    wait_until(lambda: cluster_rows(a)["b"]["backends"].get("main/b1") == 1, 10,
               "a to see b's connection")
    waiter = Waiter(a, "wait main/b1 30")
    time.sleep(0.3)
    assert waiter.reply is None, waiter.reply      # b's connection holds the fleet's wait
    os.kill(b.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: "b" not in cluster_rows(a), LEASE_TTL + 1.0, "b's entry to go")
    print(f"b gone from a's view {time.monotonic() - killed:.2f} s after kill -9")
    waiter.join(10)
    assert waiter.reply and waiter.reply["ok"], waiter.reply
    a.wait_event("cluster_node_left", 5, node="b")
    held.close()


def test_a_node_that_missed_500_changes_and_a_compaction_resyncs_to_the_same_table(
        fleet, etcd, backends):
    bs = [backends(echo_handler, f"b{i}") for i in range(3)]
    config = simple_config([(x.name, x.address) for x in bs])
    a, b = fleet("a", config), fleet("b", config)
    all_see([a, b], {"a", "b"})
    assert ask(a, "drain main/b0")["ok"]
    wait_until(lambda: backend_table(b)["b0"][0] == "draining", 10, "b to apply the drain")
    b.stop()
    for i in range(500):
        line = {0: f"weight main/b1 {i}", 1: "enable main/b0", 2: "drain main/b0",
                3: f"weight main/b2 {i + 1}"}[i % 4]
        assert ask(a, line)["ok"], line
    assert ask(a, f"add main b9 {bs[0].address} weight 7")["ok"]
    assert ask(a, "remove main/b2")["ok"]
    compacted = etcd.compact()
    b = fleet("b", config)
    connected = b.wait_event("cluster_connected", 15)
    assert connected["how"] == "compacted", connected
    assert b.wait_event("cluster_resynced", 5)["revision"] >= compacted
    wait_until(lambda: backend_table(b) == backend_table(a), 10, "the same table on b")
    assert set(backend_table(b)) == {"b0", "b1", "b9"}


def test_etcd_down_for_30_s_under_200_conns_per_s_through_both_nodes_fails_nothing(
        fleet, etcd, backends):
    b1, b2 = backends(name_handler, "b1"), backends(name_handler, "b2")
    config = simple_config([("b1", b1.address), ("b2", b2.address)], access=False)
    a, b = fleet("a", config), fleet("b", config)
    all_see([a, b], {"a", "b"})
    assert ask(a, "weight main/b1 3 --fleet")["ok"]
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}

    def load(port, rate=100.0):                   # one thread per node: 200 a second
        started, i = time.monotonic(), 0
        while not stop.is_set():
            try:
                assert hello(port) in ("b1", "b2")
                counts["ok"] += 1
            except (OSError, AssertionError):
                counts["failed"] += 1
            i += 1
            time.sleep(max(0.0, started + i / rate - time.monotonic()))

    loaders = [threading.Thread(target=load, args=(n.port(),), daemon=True) for n in (a, b)]
    for loader in loaders:
        loader.start()
    etcd.stop()
    down = time.monotonic()
    a.wait_event("cluster_disconnected", 10)
    b.wait_event("cluster_disconnected", 10)
    refused = ask(a, "drain main/b2")
    assert not refused["ok"] and "unreachable" in refused["error"], refused
    assert backend_table(a)["b2"][0] == "up"      # the refused change was not made
    while time.monotonic() - down < ETCD_OUTAGE:
        time.sleep(0.5)
    etcd.start()
    for node in (a, b):
        wait_until(lambda: len(node.events_named("cluster_connected")) >= 2, 20,
                   "the node back on etcd")
        assert node.events_named("cluster_connected")[-1]["how"] == "resumed"
    assert ask(a, "drain main/b2 --fleet")["ok"]
    assert backend_table(b)["b2"] == ("draining", 1)
    assert backend_table(b)["b1"] == ("up", 3)
    stop.set()
    for loader in loaders:
        loader.join(10)
    print(f"connections through both nodes: {counts}")
    assert counts["failed"] == 0 and counts["ok"] > 1000, counts


def test_a_canary_step_does_not_advance_while_one_node_lags(fleet, backends):
    blue, green = backends(name_handler, "blue1"), backends(name_handler, "green1")
    config = two_pool_config([("blue1", blue.address)], [("green1", green.address)])
    # A long lease: the stopped node must stay in the fleet (lagging), not leave it.
    a, b = fleet("a", config, lease_ttl=10.0), fleet("b", config, lease_ttl=10.0)
    all_see([a, b], {"a", "b"})
    os.kill(b.proc.pid, signal.SIGSTOP)           # b applies nothing until SIGCONT
    deploy = subprocess.Popen(
        [sys.executable, "-m", "l4lb", "deploy", "canary", "web", "--to", "green",
         "--steps", "50,100", "--interval", "0.2", "-s", str(a.path.parent / "l4lb.sock")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: ask(a, "show listeners")["listeners"][0]["split"], 10,
                   "the first step on a")
        time.sleep(1.5)                           # 7 intervals: the step would have ended
        assert deploy.poll() is None
        assert ask(a, "show listeners")["listeners"][0]["split"] == {"blue": 50, "green": 50}
        os.kill(b.proc.pid, signal.SIGCONT)
        out, _ = deploy.communicate(timeout=60)
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
    assert deploy.returncode == 0, out
    for node in (a, b):
        assert ask(node, "show listeners")["listeners"][0]["pool"] == "green"


def test_wait_on_b_returns_only_once_a_drained_backend_is_idle_on_a_and_b(fleet, backends):
    b1 = backends(echo_handler, "b1")
    config = simple_config([("b1", b1.address)])
    a, b = fleet("a", config), fleet("b", config)
    all_see([a, b], {"a", "b"})
    held = {}
    for name, node in (("a", a), ("b", b)):
        held[name] = connect(node.port())
        held[name].sendall(b"x")
        recv_exactly(held[name], 1)
    ctl = subprocess.run([sys.executable, "-m", "l4lb", "ctl", "-s",
                          str(a.path.parent / "l4lb.sock"), "--fleet", "drain", "main/b1"],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert ctl.returncode == 0 and "state: draining" in ctl.stdout, ctl
    assert backend_table(b)["b1"][0] == "draining"        # --fleet: b applied it already
    waiter = Waiter(b, "wait main/b1 30")
    held["b"].close()
    wait_until(lambda: cluster_rows(b)["b"]["backends"].get("main/b1", 0) == 0, 10,
               "b's own connection gone")
    time.sleep(0.5)
    assert waiter.reply is None, waiter.reply     # a still has one
    assert cluster_rows(b)["a"]["backends"].get("main/b1") == 1
    held["a"].close()
    waiter.join(15)
    assert waiter.reply and waiter.reply["ok"], waiter.reply


def test_hash_routes_200_sources_to_the_same_backend_through_either_node(fleet, backends):
    bs = [backends(name_handler, f"h{i}") for i in range(4)]
    config = simple_config([(x.name, x.address) for x in bs], algorithm="hash",
                           access=False)
    a, b = fleet("a", config), fleet("b", config)
    all_see([a, b], {"a", "b"})
    assert ask(a, "weight main/h1 3 --fleet")["ok"]      # shared inputs, same table
    sources = [f"127.1.{i // 200}.{i % 200 + 1}" for i in range(200)]
    via_a = [hello(a.port(), source=s) for s in sources]
    via_b = [hello(b.port(), source=s) for s in sources]
    assert via_a == via_b
    assert len(set(via_a)) == 4


def test_three_nodes_see_each_other_and_a_graceful_stop_leaves_at_once(fleet, backends):
    b1 = backends(echo_handler, "b1")
    config = simple_config([("b1", b1.address)])
    a, b, c = fleet("a", config), fleet("b", config), fleet("c", config, lease_ttl=30.0)
    all_see([a, b, c], {"a", "b", "c"})
    c.stop()                                      # revokes its lease: no 30 s wait
    wait_until(lambda: set(cluster_rows(a)) == {"a", "b"}, 10, "c to leave")


def test_without_cluster_show_cluster_and_fleet_are_refused(l4lb, backends):
    b1 = backends(echo_handler, "b1")
    lb = l4lb(simple_config([("b1", b1.address)]))
    reply = ask(lb, "show cluster")
    assert not reply["ok"] and "[cluster]" in reply["error"]
    reply = ask(lb, "drain main/b1 --fleet")
    assert not reply["ok"] and "[cluster]" in reply["error"]
    assert ask(lb, "show backends")["backends"][0]["state"] == "up"


def test_a_rolling_deploy_on_a_waits_for_the_connections_held_through_b(fleet, backends):
    b1, b2 = backends(echo_handler, "b1"), backends(echo_handler, "b2")
    config = simple_config([("b1", b1.address), ("b2", b2.address)])
    a, b = fleet("a", config), fleet("b", config)
    all_see([a, b], {"a", "b"})
    assert ask(a, "drain main/b2 --fleet")["ok"]          # every connection goes to b1
    held = connect(b.port())
    held.sendall(b"x")
    recv_exactly(held, 1)
    assert ask(a, "enable main/b2 --fleet")["ok"]
    wait_until(lambda: cluster_rows(a)["b"]["backends"].get("main/b1") == 1, 10,
               "a to see b's connection")
    deploy = subprocess.Popen(
        [sys.executable, "-m", "l4lb", "deploy", "rolling", "main", "--exec", "true",
         "--drain-timeout", "60", "-s", str(a.path.parent / "l4lb.sock")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: backend_table(b)["b1"][0] == "draining", 10, "b1 draining on b")
        time.sleep(0.5)
        assert deploy.poll() is None                      # b's connection holds the drain
        assert backend_table(a)["b2"][0] == "up"          # and b2 is not touched yet
        held.close()
        out, _ = deploy.communicate(timeout=60)
    finally:
        if deploy.poll() is None:
            deploy.kill()
            deploy.wait()
    assert deploy.returncode == 0, out
    assert "b1: drained" in out, out
    for node in (a, b):
        assert {s for s, _ in backend_table(node).values()} == {"up"}


def test_an_entry_for_a_pool_one_node_lacks_is_skipped_there_and_kept_for_the_fleet(
        fleet, backends):
    b1, x1 = backends(echo_handler, "b1"), backends(echo_handler, "x1")
    config = simple_config([("b1", b1.address)])
    a = fleet("a", config + f"""
[pools.extra]
backends = [{{ name = "x1", address = "{x1.address}" }}]
""")
    b = fleet("b", config)
    all_see([a, b], {"a", "b"})
    assert ask(a, "drain extra/x1 --fleet")["ok"]
    b.wait_event("cluster_entry_ignored", 10, key="extra/x1")
    assert ask(b, "reload")["ok"]                 # drops what its config cannot hold...
    assert ask(b, "weight main/b1 4 --fleet")["ok"]
    assert backend_table(a) == {"b1": ("up", 4), "x1": ("draining", 1)}   # ...for itself only
    b.stop()
    a.stop()
    a = fleet("a", config + f"""
[pools.extra]
backends = [{{ name = "x1", address = "{x1.address}" }}]
""")
    assert backend_table(a)["x1"] == ("draining", 1)


def test_two_nodes_racing_on_one_backend_end_alike_and_a_lost_race_says_so(fleet, backends):
    b1 = backends(echo_handler, "b1")
    config = simple_config([("b1", b1.address)])
    a, b = fleet("a", config), fleet("b", config)
    all_see([a, b], {"a", "b"})
    errors: list[str] = []

    def write(node, base):
        for i in range(50):
            reply = ask(node, f"weight main/b1 {base + i}")
            if not reply["ok"]:
                errors.append(reply["error"])

    writers = [threading.Thread(target=write, args=(n, base)) for n, base in ((a, 1000), (b, 2000))]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    assert all("another node changed backends/main/b1" in e for e in errors), errors
    wait_until(lambda: backend_table(a) == backend_table(b), 10, "both nodes alike")
    print(f"lost races: {len(errors)} of 100 writes")


def test_a_node_ahead_of_a_rebuilt_store_reads_it_whole(fleet, backends, tmp_path):
    b1 = backends(echo_handler, "b1")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "l4lb.state.toml").write_text(
        'version = 1\nrevision = 100000\n[backends."main/b1"]\nstate = "maint"\n')
    a = fleet("a", simple_config([("b1", b1.address)]))
    assert a.events_named("cluster_connected")[0]["how"] == "behind"
    assert backend_table(a)["b1"] == ("up", 1)           # the store's state, not the file's
