"""A master and N workers that share one backend table (issue 15): every limit, every
pick that reads load and every figure is global across workers; a worker that dies is
replaced and the connections of the others carry on."""
from __future__ import annotations

import os
import selectors
import signal
import socket
import threading
import time

import urllib.request

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..support import (ask, connect, echo_handler, hello, name_handler, recv_exactly,
                       simple_config,
                       wait_until)


def workers_config(rows, workers: int = 2, algorithm: str = "rr", listener: str = "",
                   pool: str = "", access: bool = False) -> str:
    return simple_config(rows, algorithm, listener_extra=listener, pool_extra=pool,
                         global_extra=f"workers = {workers}", access=access)


class HoldBackend:
    """A backend that keeps every connection open until its client closes, on one
    selector thread (thousands of connections, no thread each); counts them."""

    def __init__(self, name: str):
        self.name = name
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4096)
        self.sock.setblocking(False)
        self.address = "%s:%d" % self.sock.getsockname()
        self.open = 0
        self.peak = 0
        self.accepted = 0
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.sock, selectors.EVENT_READ)
        self.stopped = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stopped:
            for key, _ in self.sel.select(0.1):
                if key.fileobj is self.sock:
                    try:
                        conn, _ = self.sock.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    self.sel.register(conn, selectors.EVENT_READ)
                    self.accepted += 1
                    self.open += 1
                    self.peak = max(self.peak, self.open)
                else:
                    try:
                        data = key.fileobj.recv(65536)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        try:
                            key.fileobj.sendall(data)
                        except OSError:
                            pass
                        continue
                    self.sel.unregister(key.fileobj)
                    key.fileobj.close()
                    self.open -= 1

    def close(self):
        self.stopped = True
        self.thread.join(timeout=5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()
        self.sel.close()


@pytest.fixture
def holders():
    made = []

    def make(name):
        b = HoldBackend(name)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def backend_rows(lb) -> dict[str, dict]:
    return {row["name"]: row for row in ask(lb, "show backends")["backends"]}


def worker_rows(lb) -> list[dict]:
    return ask(lb, "show workers")["workers"]


def close_all(socks):
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


# --- the process model ------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_two_workers_are_processes_of_the_master_each_accepting(backends, l4lb):
    b = backends(echo_handler)
    lb = l4lb(workers_config([("b1", b.address)], access=True))
    rows = worker_rows(lb)
    assert [r["worker"] for r in rows] == [0, 1]
    pids = {r["pid"] for r in rows}
    assert len(pids) == 2 and lb.proc.pid not in pids
    assert all(psutil.pid_exists(p) for p in pids)
    socks = []
    for i in range(40):
        s = connect(lb.port())
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
        socks.append(s)
    conns = wait_until(lambda: (c := ask(lb, "show conns")["conns"]) and len(c) == 40 and c,
                       what="40 conns listed")
    assert {c["worker"] for c in conns} == {0, 1}          # both workers hold some
    assert len({c["id"] for c in conns}) == 40              # ids unique across workers
    rows = worker_rows(lb)
    assert sum(r["active"] for r in rows) == 40
    info = ask(lb, "show info")
    assert info["conns_active"] == 40 and info["workers"] == 2
    close_all(socks)
    lines = lb.wait_events("connection_closed", 40)
    assert {line["worker"] for line in lines} == {0, 1}     # the access log says which


@pytest.mark.timeout(90)
def test_accepts_spread_evenly_over_the_workers(backends, l4lb):
    b = backends(echo_handler, backlog=1024)
    lb = l4lb(workers_config([("b1", b.address)]))
    for _ in range(10_000):
        s = connect(lb.port())
        s.close()
    wait_until(lambda: sum(r["accepted"] for r in worker_rows(lb)) == 10_000,
               timeout=30, what="10,000 accepted")
    accepted = [r["accepted"] for r in worker_rows(lb)]
    assert min(accepted) > 0 and max(accepted) / min(accepted) <= 1.3, accepted


# --- global limits and picks -----------------------------------------------------------

@pytest.mark.timeout(120)
def test_leastconn_over_2000_idle_connections_is_even_across_workers(holders, l4lb):
    hs = [holders(f"b{i}") for i in range(4)]
    lb = l4lb(workers_config([(h.name, h.address) for h in hs], algorithm="leastconn",
                             listener="max_connections = 5000"))
    socks = []
    try:
        for _ in range(2000):
            socks.append(connect(lb.port()))
        wait_until(lambda: sum(h.open for h in hs) == 2000, timeout=60,
                   what="2000 connections at the backends")
        rows = backend_rows(lb)
        actives = [rows[h.name]["active"] for h in hs]
        assert sum(actives) == 2000
        assert all(abs(a - 500) <= 2 for a in actives), actives
        assert [h.open for h in hs] == actives
        per_worker = [r["active"] for r in worker_rows(lb)]
        assert min(per_worker) > 0
    finally:
        close_all(socks)


@pytest.mark.timeout(120)
def test_a_backends_max_connections_holds_across_workers(holders, l4lb):
    h = holders("b1")
    lb = l4lb(workers_config([("b1", h.address, {"max_connections": 100})],
                             listener="queue_timeout = 60.0"))
    socks = []
    try:
        for _ in range(300):
            socks.append(connect(lb.port()))
        wait_until(lambda: h.open == 100 and backend_rows(lb)["b1"]["active"] == 100,
                   timeout=30, what="100 at the backend")
        assert {c["worker"] for c in ask(lb, "show conns")["conns"]
                if c["state"] == "open"} == {0, 1}
        # the other 200 wait, queued, in both workers; freeing 50 lets exactly 50 in
        close_all(socks[:50])
        wait_until(lambda: h.accepted >= 150, timeout=30, what="50 queued admitted")
        wait_until(lambda: backend_rows(lb)["b1"]["active"] == 100, what="100 again")
        assert h.peak == 100
    finally:
        close_all(socks)


@pytest.mark.timeout(60)
def test_per_source_max_connections_holds_across_workers(holders, l4lb):
    h = holders("b1")
    lb = l4lb(workers_config([("b1", h.address)], listener="per_source_max_connections = 10"))
    socks = []
    try:
        for port_try in range(40):                   # distinct source ports: both workers
            socks.append(connect(lb.port(), source="127.0.0.7"))
        wait_until(lambda: sum(r["rejected"].get("per_source_max_connections", 0)
                               for r in ask(lb, "show listeners")["listeners"]) == 30,
                   what="30 refused")
        wait_until(lambda: h.open == 10, what="10 at the backend")
        assert h.peak == 10
        assert backend_rows(lb)["b1"]["active"] == 10
    finally:
        close_all(socks)


# --- a worker that dies ---------------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_killed_worker_is_replaced_and_only_its_own_connections_fail(backends, l4lb):
    b = backends(echo_handler, backlog=1024)
    lb = l4lb(workers_config([("b1", b.address)]))
    port = lb.port()
    victim = worker_rows(lb)[1]
    results = {"ok": 0, "refused": 0, "reset": 0, "other": 0, "slow": 0}
    stop = threading.Event()

    def client():
        next_at = time.monotonic()
        while not stop.is_set():
            next_at += 1 / 300
            t0 = time.monotonic()
            try:
                s = connect(port, timeout=10)
                s.sendall(b"ping")
                data = recv_exactly(s, 4)
                s.close()
                results["ok" if data == b"ping" else "reset"] += 1
            except ConnectionRefusedError:
                results["refused"] += 1
            except (ConnectionResetError, BrokenPipeError):
                results["reset"] += 1
            except OSError:
                results["other"] += 1
            if time.monotonic() - t0 > 1.0:
                results["slow"] += 1
            time.sleep(max(0.0, next_at - time.monotonic()))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: results["ok"] > 300, timeout=30, what="load running")
        os.kill(victim["pid"], signal.SIGKILL)
        exited = lb.wait_event("worker_exited", timeout=20, worker=1)
        assert exited["pid"] == victim["pid"] and exited["status"] == "killed by SIGKILL"
        wait_until(lambda: (r := worker_rows(lb)[1])["pid"] != victim["pid"] and r["live"],
                   timeout=20, what="worker 1 replaced")
        ok_before = results["ok"]
        wait_until(lambda: results["ok"] > ok_before + 600, timeout=60, what="more load")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=20)
    row = worker_rows(lb)[1]
    assert row["restarts"] == 1
    started = [e for e in lb.events_named("worker_started") if e["worker"] == 1]
    assert started[-1]["restarts"] == 1
    # Only what the dead worker held could fail, and nothing was refused: its socket
    # stayed open (the master's), so new clients queued until the replacement accepted.
    assert results["refused"] == 0, results
    assert results["reset"] + results["other"] <= exited["lost"], (results, exited)
    # The counters are exact: every ok round trip was counted, the dead worker's too.
    wait_until(lambda: backend_rows(lb)["b1"]["active"] == 0, what="all closed")
    assert backend_rows(lb)["b1"]["total"] >= results["ok"]


@pytest.mark.timeout(60)
def test_counters_equal_the_clients_counts_after_the_load(backends, l4lb):
    b = backends(echo_handler)
    lb = l4lb(workers_config([("b1", b.address), ("b2", b.address)]))
    sent = 0
    for i in range(400):
        s = connect(lb.port())
        payload = os.urandom(100 + i)
        s.sendall(payload)
        assert recv_exactly(s, len(payload)) == payload
        s.close()
        sent += len(payload)
    wait_until(lambda: ask(lb, "show info")["conns_active"] == 0, what="all closed")
    rows = backend_rows(lb)
    wait_until(lambda: sum(r["bytes_out"] for r in backend_rows(lb).values()) == sent,
               what="bytes counted")
    rows = backend_rows(lb)
    assert sum(r["total"] for r in rows.values()) == 400
    assert sum(r["bytes_in"] for r in rows.values()) == sent
    assert ask(lb, "show listeners")["listeners"][0]["accepted"] == 400
    assert sum(r["accepted"] for r in worker_rows(lb)) == 400
    assert ask(lb, "show info")["conns_total"] == 400


# --- drains and deploys -----------------------------------------------------------------

@pytest.mark.timeout(60)
def test_drain_and_wait_cover_the_connections_of_every_worker(holders, l4lb):
    hs = [holders("b1"), holders("b2")]
    lb = l4lb(workers_config([(h.name, h.address) for h in hs]))
    socks = [connect(lb.port()) for _ in range(40)]
    try:
        wait_until(lambda: sum(h.open for h in hs) == 40, what="40 open")
        b1 = [c for c in ask(lb, "show conns")["conns"] if c["backend"] == "b1"]
        assert {c["worker"] for c in b1} == {0, 1}
        on_b1 = len(b1)
        assert ask(lb, "drain main/b1")["ok"]
        # new connections all go to b2, from both workers
        more = [connect(lb.port()) for _ in range(20)]
        socks += more
        wait_until(lambda: hs[1].open == 40 - on_b1 + 20 and hs[0].open == on_b1,
                   what="new connections on b2 only")
        reply = ask(lb, "wait main/b1 0.3")
        assert not reply["ok"] and f"{on_b1} active" in reply["error"]
        waiter = threading.Thread(target=lambda: results.append(ask(lb, "wait main/b1 30")))
        results: list = []
        waiter.start()
        # close b1's connections: 10 at a time; wait returns only after the last
        b1_socks = [s for s in socks if s.getsockname()[1] in {
            int(c["client"].rsplit(":", 1)[1]) for c in b1}]
        close_all(b1_socks[:-1])
        wait_until(lambda: hs[0].open == 1, what="one left on b1")
        assert results == []
        close_all(b1_socks[-1:])
        waiter.join(timeout=30)
        assert results and results[0]["ok"], results
    finally:
        close_all(socks)


@pytest.mark.timeout(120)
def test_kill_reaches_the_connections_of_every_worker(holders, l4lb):
    h = holders("b1")
    lb = l4lb(workers_config([("b1", h.address)]))
    socks = [connect(lb.port()) for _ in range(30)]
    try:
        wait_until(lambda: h.open == 30, what="30 open")
        assert {c["worker"] for c in ask(lb, "show conns")["conns"]} == {0, 1}
        assert ask(lb, "kill main/b1")["closed"] == 30
        wait_until(lambda: h.open == 0, what="all closed at the backend")
    finally:
        close_all(socks)


@pytest.mark.timeout(60)
def test_per_source_rate_holds_across_workers(holders, l4lb):
    h = holders("b1")
    lb = l4lb(workers_config([("b1", h.address)], listener="per_source_rate = 5.0"))
    socks = []
    try:
        t0 = time.monotonic()
        for _ in range(40):                       # a burst from one address, both workers
            socks.append(connect(lb.port(), source="127.0.0.8"))
        elapsed = time.monotonic() - t0
        refused = wait_until(
            lambda: (n := sum(r["rejected"].get("per_source_rate", 0)
                              for r in ask(lb, "show listeners")["listeners"]))
            and n + h.accepted == 40 and n, what="every attempt decided")
        # The bucket holds 5 tokens and refills at 5/s, shared by both workers: one
        # bucket's worth, not one per worker.
        admitted = 40 - refused
        assert 5 <= admitted <= 5 + 5 * elapsed + 1, (admitted, elapsed)
        assert {c["worker"] for c in ask(lb, "show conns")["conns"]} <= {0, 1}
    finally:
        close_all(socks)


@pytest.mark.timeout(60)
def test_passive_health_from_any_worker_takes_a_backend_out_of_every_worker(backends, l4lb):
    """Connect failures seen by the workers reach the master's health state through the
    shared table; once it marks the backend down, no worker picks it."""
    good = backends(echo_handler, name="good")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_address = "%s:%d" % dead.getsockname()
    dead.close()                                    # nothing listens: connects are refused
    lb = l4lb(workers_config([("dead", dead_address), ("good", good.address)],
                             listener="retries = 1")
              + "\n[pools.main.health]\ninterval = 3600.0\ntimeout = 1.0\nrise = 1\nfall = 3\n")
    for _ in range(40):                             # every client is served (retried)
        s = connect(lb.port())
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
        s.close()
    down = lb.wait_event("backend_state_changed", backend="dead", new="down")
    assert down["cause"] == "passive_check"
    failed = backend_rows(lb)["dead"]["failed"]
    for _ in range(40):                             # down in both workers: never tried
        s = connect(lb.port())
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
        s.close()
    assert backend_rows(lb)["dead"]["failed"] == failed


@pytest.mark.timeout(60)
def test_metrics_sum_the_workers_and_count_each(backends, l4lb):
    b = backends(echo_handler)
    lb = l4lb(workers_config([("b1", b.address)])
              + '\n[metrics]\nlisten = "127.0.0.1:0"\n')
    port = lb.wait_event("metrics_started")["port"]
    for _ in range(100):
        s = connect(lb.port())
        s.sendall(b"abc")
        assert recv_exactly(s, 3) == b"abc"
        s.close()
    wait_until(lambda: ask(lb, "show info")["conns_active"] == 0, what="all closed")

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text) for s in f.samples}

    figures = wait_until(lambda: (f := scrape())[(
        "l4lb_backend_bytes_total", (("backend", "b1"), ("direction", "out"),
                                     ("pool", "main")))] == 300 and f,
        what="the bytes counted")
    assert figures[("l4lb_connections_total", ())] == 100
    assert figures[("l4lb_backend_connections_total", (("backend", "b1"), ("pool", "main")))] == 100
    per_worker = {labels: v for (name, labels), v in figures.items()
                  if name == "l4lb_worker_accepted_total"}
    assert sorted(dict(k)["worker"] for k in per_worker) == ["0", "1"]
    assert sum(per_worker.values()) == 100
    assert all(v == 0 for (name, _), v in figures.items()
               if name == "l4lb_worker_active_connections")


@pytest.mark.timeout(90)
def test_changes_reach_every_worker_and_a_replaced_one_starts_with_them(backends, l4lb):
    """add, drain and a reload that opens a new bind apply in both workers, and
    a worker started after them (kill -9) builds its model with all of them."""
    a = backends(name_handler, name="a")
    b = backends(name_handler, name="b")
    lb = l4lb(workers_config([("a", a.address)]))

    def names(port, n=30):
        out = set()
        for _ in range(n):
            s = connect(port)
            s.sendall(b"hi\n")
            out.add(s.recv(100).strip().decode())
            s.close()
        return out

    assert ask(lb, f"add main b {b.address}")["ok"]
    assert names(lb.port()) == {"a", "b"}
    assert ask(lb, "drain main/a")["ok"]
    assert names(lb.port()) == {"b"}
    # a reload that adds a listener on a new bind: both workers accept on it
    lb.path.write_text(lb.path.read_text() + '\n[listeners.more]\nbind = ["127.0.0.1:0"]\n'
                       'pool = "main"\n')
    reply = ask(lb, "reload")
    assert reply["ok"], reply
    more = lb.wait_event("listener_started", listener="more")["port"]
    assert names(more) == {"b"}
    assert {c["worker"] for c in ask(lb, "show conns")["conns"]} <= {0, 1}
    served_by = set()
    for _ in range(2):                              # replace each worker in turn
        for row in worker_rows(lb):
            old = row["pid"]
            os.kill(old, signal.SIGKILL)
            wait_until(lambda: (r := worker_rows(lb)[row["worker"]])["pid"] != old
                       and r["live"], timeout=20, what="worker replaced")
        socks = []
        for _ in range(20):
            s = connect(more)
            s.sendall(b"hi\n")
            assert s.recv(100).strip() == b"b"
            socks.append(s)
        served_by |= {c["worker"] for c in ask(lb, "show conns")["conns"]}
        close_all(socks)
    assert served_by == {0, 1}
    assert backend_rows(lb)["a"]["state"] == "draining"


@pytest.mark.timeout(60)
def test_a_sigterm_to_the_whole_group_is_one_graceful_stop(backends, l4lb):
    """A SIGTERM to every process at once (a process group, systemd's
    KillMode=control-group): the workers leave it to the master, which stops them in
    order; none is restarted, nothing is logged as a crash."""
    b = backends(echo_handler)
    lb = l4lb(workers_config([("b1", b.address)]), preexec_fn=os.setsid)
    pids = {r["pid"] for r in worker_rows(lb)}
    s = connect(lb.port())
    s.sendall(b"x")
    assert recv_exactly(s, 1) == b"x"
    os.killpg(lb.proc.pid, signal.SIGTERM)
    s.close()
    assert lb.proc.wait(30) == 0
    assert not lb.events_named("worker_exited")
    assert len([e for e in lb.events_named("worker_started")]) == 2     # none restarted
    stopped = {e["pid"] for e in lb.events_named("worker_stopped")}
    assert stopped == pids
    wait_until(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status()
                               != psutil.STATUS_ZOMBIE for p in pids), what="workers gone")


def reload_with(lb, text: str) -> dict:
    lb.path.write_text(text)
    return ask(lb, "reload")


@pytest.mark.timeout(120)
def test_a_reload_that_changes_workers_starts_a_generation_and_the_old_one_finishes(
        backends, l4lb):
    b = backends(echo_handler, backlog=1024)
    rows2 = workers_config([("b1", b.address)], workers=2)
    lb = l4lb(rows2)
    held = [connect(lb.port()) for _ in range(20)]      # open through generation 1
    for i, s in enumerate(held):
        s.sendall(b"held %d\n" % i)
        assert recv_exactly(s, len(b"held %d\n" % i)) == b"held %d\n" % i
    old = {w["pid"] for w in worker_rows(lb)}

    reply = reload_with(lb, workers_config([("b1", b.address)], workers=1))
    assert reply["ok"], reply
    assert any("global workers 1: 1 new workers replace the 2" in c for c in reply["changes"])
    rows = worker_rows(lb)
    accepting = [r for r in rows if r["accepting"]]
    assert [(r["worker"], r["generation"]) for r in accepting] == [(0, 2)]
    assert accepting[0]["pid"] not in old
    # the old generation still carries its connections, byte for byte
    for i, s in enumerate(held):
        s.sendall(b"again %d\n" % i)
        assert recv_exactly(s, len(b"again %d\n" % i)) == b"again %d\n" % i
    # every new connection goes to the one new worker
    fresh = [connect(lb.port()) for _ in range(30)]
    for s in fresh:
        s.sendall(b"x\n")
        assert recv_exactly(s, 2) == b"x\n"
    wait_until(lambda: [r["accepted"] for r in worker_rows(lb) if r["accepting"]] == [30],
               what="30 accepted by the new worker")
    close_all(fresh)
    # the old workers exit once their connections are closed
    close_all(held)
    wait_until(lambda: all(r["generation"] == 2 for r in worker_rows(lb)),
               what="generation 1 gone")
    for pid in old:
        wait_until(lambda: not psutil.pid_exists(pid) or
                   psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, what="old pid gone")

    reply = reload_with(lb, rows2)                       # and back to two
    assert reply["ok"], reply
    assert [(r["worker"], r["generation"]) for r in worker_rows(lb)
            if r["accepting"]] == [(0, 3), (1, 3)]
    fresh = [connect(lb.port()) for _ in range(200)]
    for s in fresh:
        s.sendall(b"y\n")
        assert recv_exactly(s, 2) == b"y\n"
    # both sockets of the group are steered to again: both new workers get connections
    wait_until(lambda: all(r["accepted"] > 0 for r in worker_rows(lb) if r["accepting"]),
               what="both new workers accepting")
    close_all(fresh)
    assert not lb.events_named("worker_exited")
    assert ask(lb, "show info")["workers"] == 2


@pytest.mark.timeout(60)
def test_a_reload_asking_more_workers_than_the_table_has_rows_for_changes_nothing(
        backends, l4lb):
    b = backends(echo_handler)
    lb = l4lb(workers_config([("b1", b.address)], workers=2))
    before = worker_rows(lb)
    lb.path.write_text(workers_config([("b1", b.address)], workers=64))
    reply = ask(lb, "reload")
    assert not reply["ok"]
    assert "64 new workers need 64 rows of the shared table" in reply["error"]
    assert worker_rows(lb) == before
    assert hello(lb.port())
