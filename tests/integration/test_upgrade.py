"""Restarting l4lb under load (issue 16): what a client sees while the balancer on its port
is replaced.

The load is tests/churn.py in its own process (support.Churn): short connections at 500 a
second and 50 long echo streams, through l4lb (`workers = 2`) to a churn echo backend.

The torture test takes l4lb through 10 reloads (two of them change `workers` 2 -> 1 -> 2)
and 2 binary upgrades under that load and sees nothing fail: no connection refused or
reset, no SYN retransmitted (a dropped SYN is retransmitted after 1 s: the timing-free
form of "no connect slower than 1 s"), every stream byte-exact, the kernel's listen
drop counters unchanged, and no old process left once the load ends. The negative
control beside it, a naive stop-and-start under the same load, shows the failures the
test would see if the sockets were not handed over.
"""
from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from ..support import (Churn, ChurnEcho, ask, free_port, free_port_refused, hello,
                       nstat_counters,
                       simple_config, wait_until)

RATE, STREAMS = 500, 50
# Long enough for the stop (up to shutdown_timeout for the streams) and the start; the
# test stops the load itself once the new balancer has served.
DURATION = 30.0


@pytest.fixture
def echo():
    with ChurnEcho() as backend:
        yield backend


def restart_config(echo: ChurnEcho, port: int) -> str:
    """One listener on the fixed `port` (so a second balancer binds the same one) over the
    echo backend. No access log: 500 lines a second would load the machine the test
    measures on."""
    return simple_config([("echo", echo.address)], bind=f"127.0.0.1:{port}", access=False)


@pytest.mark.timeout(120)
def test_naive_stop_and_start_under_load_refuses_or_cuts_connections(tmp_path, l4lb, echo):
    port = free_port()
    config = restart_config(echo, port)
    first = l4lb(config)
    before = nstat_counters()
    with Churn(port, tmp_path / "churn.json", rate=RATE, streams=STREAMS,
               duration=DURATION) as churn:
        churn.wait_running()
        warm = churn.wait_ok(RATE)          # a second of load through the first one
        # The instrument: a running balancer fails nothing (else the failures below
        # would prove nothing about the restart).
        assert warm["failures"] == warm["stream_failures"] == 0, churn.lines[-5:]
        # The naive restart: SIGTERM, wait for the exit, start a fresh one. Between the
        # listener's close and the new bind nothing listens: connects are refused there,
        # and the streams are cut when the old one's shutdown_timeout ends them.
        first.stop()
        assert first.proc.returncode == 0, "".join(first.raw[-20:])
        l4lb(config)
        served = churn.progress.get("ok", 0)
        churn.wait_ok(served + RATE, timeout=20)     # the new balancer serves the load
        result = churn.stop()
    after = nstat_counters()
    drops = {k: after[k] - before[k] for k in after}
    print("churn result:", result, "listen drops:", drops)

    assert result["ok"] > 0 and result["rate_achieved"] > 0.8 * RATE, result
    failures = result["refused"] + result["reset"] + result["stream_failures"]
    assert failures > 0, (result, drops)


# --- zero refusals ------------------------------------------------------------------------

def long_config(echo: ChurnEcho, port: int, workers: int = 2, weight: int = 1) -> str:
    """restart_config, with a shutdown_timeout longer than the load: an old generation
    keeps relaying its streams until the client ends them (a shorter one would cut them,
    which is the timeout's job, not a failure of the hand-over)."""
    text = simple_config([("echo", echo.address, {"weight": weight})],
                         bind=f"127.0.0.1:{port}", access=False,
                         global_extra=f"workers = {workers}")
    return text.replace("shutdown_timeout = 5.0", "shutdown_timeout = 90.0")


class Lineage:
    """Every l4lb process a test saw (masters across upgrades, their workers and fork
    servers): the test's cleanup ends them all, and `left` says which still run."""

    def __init__(self, lb):
        self.lb = lb
        self.pids: set[int] = set()
        self.look()

    def master(self) -> int:
        return ask(self.lb, "show info")["pid"]

    def look(self) -> int:
        pid = self.master()
        for proc in [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True):
            self.pids.add(proc.pid)
        return pid

    def current(self) -> set[int]:
        pid = self.master()
        return {pid} | {p.pid for p in psutil.Process(pid).children(recursive=True)}

    def left(self) -> set[int]:
        alive = set()
        for pid in self.pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.add(pid)
            except psutil.NoSuchProcess:
                pass
        return alive

    def end(self) -> None:
        try:
            os.kill(self.master(), signal.SIGTERM)
        except Exception:
            pass
        deadline = time.monotonic() + 20
        while self.left() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.left():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def lineage():
    made = []

    def track(lb):
        made.append(Lineage(lb))
        return made[-1]

    yield track
    for one in made:
        one.end()


def upgrade(lb, lineage: Lineage) -> dict:
    old = lineage.master()
    reply = ask(lb, "upgrade")
    assert reply["ok"], reply
    assert reply["pid"] != old
    lineage.look()
    return reply


@pytest.mark.timeout(240)
def test_ten_reloads_two_upgrades_and_workers_2_1_2_under_load_refuse_nothing(
        tmp_path, l4lb, echo, lineage):
    port = free_port()
    lb = l4lb(long_config(echo, port))
    family = lineage(lb)
    before = nstat_counters()
    steps = ([("reload", 2, w) for w in (2, 3, 1)] + [("upgrade", 2, 1)]
             + [("reload", 1, 1), ("reload", 1, 2), ("reload", 1, 3)] + [("upgrade", 1, 1)]
             + [("reload", 2, 1), ("reload", 2, 2), ("reload", 2, 3), ("reload", 2, 1)])
    assert sum(kind == "reload" for kind, _, _ in steps) == 10
    generations = []
    with Churn(port, tmp_path / "churn.json", rate=RATE, streams=STREAMS,
               duration=DURATION) as churn:
        churn.wait_running()
        churn.wait_ok(RATE)
        for kind, workers, weight in steps:
            # spread the steps over the run: each after another ~2 s of connections
            churn.wait_ok(churn.progress.get("ok", 0) + 2 * RATE // 2, timeout=30)
            if kind == "upgrade":
                lb.path.write_text(long_config(echo, port, workers, weight))
                generations.append(upgrade(lb, family)["generation"])
            else:
                lb.path.write_text(long_config(echo, port, workers, weight))
                reply = ask(lb, "reload")
                assert reply["ok"], reply
                family.look()
            accepting = [w for w in ask(lb, "show workers")["workers"] if w["accepting"]]
            assert len(accepting) == workers, accepting
        result = churn.wait()
    after = nstat_counters()
    drops = {k: after[k] - before[k] for k in after}
    print("churn result:", result, "listen drops:", drops)

    assert generations == [2, 3]
    assert result["rate_achieved"] > 0.8 * RATE, result
    assert result["failures"] == 0, result                # refused, reset, wrong, timeout
    assert result["refused"] == result["reset"] == 0, result
    assert result["syn_retransmits"] == 0, result         # no SYN dropped anywhere
    assert result["stream_failures"] == 0, result         # every stream sha256-exact
    assert drops["TcpExtListenDrops"] == drops["TcpExtListenOverflows"] == 0, drops
    # once the load ended, every old master and old worker finishes and exits
    wait_until(lambda: family.left() <= family.current(), timeout=60,
               what="no old l4lb process left")
    assert ask(lb, "show info")["generation"] == 3
    assert ask(lb, "show backends")["backends"][0]["weight"] == 1


@pytest.mark.timeout(120)
def test_a_failed_upgrade_leaves_the_old_master_serving_and_says_why(
        tmp_path, l4lb, echo, lineage):
    port = free_port()
    good = long_config(echo, port)
    lb = l4lb(good)
    family = lineage(lb)
    master = family.master()
    assert ask(lb, "weight main/echo 5")["ok"]
    with Churn(port, tmp_path / "churn.json", rate=RATE, streams=10,
               duration=DURATION) as churn:
        churn.wait_running()
        churn.wait_ok(RATE)
        # a broken config: the new master refuses it, the old one serves on
        lb.path.write_text(good + "\n[listeners.web]\nbind = 5\n")
        reply = ask(lb, "upgrade")
        assert not reply["ok"]
        assert "config rejected" in reply["error"] and "keeps serving" in reply["error"]
        assert f"this one (pid {master})" in reply["error"]
        # a new master that cannot bind a new listener's address
        taken = free_port()
        blocker = __import__("socket").socket()
        blocker.bind(("127.0.0.1", taken))
        blocker.listen(1)
        try:
            lb.path.write_text(good + f'\n[listeners.more]\nbind = ["127.0.0.1:{taken}"]\n'
                               'pool = "main"\n')
            reply = ask(lb, "upgrade")
        finally:
            blocker.close()
        assert not reply["ok"]
        assert f"127.0.0.1:{taken}" in reply["error"], reply
        served = churn.progress.get("ok", 0)
        churn.wait_ok(served + RATE)
        result = churn.stop()
    assert result["failures"] == result["stream_failures"] == 0, result
    assert result["syn_retransmits"] == 0, result
    assert family.master() == master
    info = ask(lb, "show info")
    assert info["generation"] == 1 and info["upgraded_from"] is None
    assert ask(lb, "show backends")["backends"][0]["weight"] == 5   # nothing changed
    assert [e["error"] for e in lb.events_named("upgrade_failed")][0] == \
        reply_error_first(lb)
    # the new masters that failed are gone, and took nothing with them
    wait_until(lambda: family.left() <= family.current(), what="failed masters gone")
    assert hello(port)


def reply_error_first(lb) -> str:
    return lb.events_named("upgrade_failed")[0]["error"]


@pytest.mark.timeout(60)
def test_sigusr2_upgrades_and_the_state_comes_along(tmp_path, l4lb, echo, lineage):
    port = free_port()
    lb = l4lb(long_config(echo, port))
    family = lineage(lb)
    old = family.master()
    assert ask(lb, "drain main/echo")["ok"]
    assert ask(lb, "enable main/echo")["ok"]
    assert ask(lb, "weight main/echo 7")["ok"]
    assert ask(lb, "add main extra 127.0.0.1:1 weight 0")["ok"]
    os.kill(old, signal.SIGUSR2)
    wait_until(lambda: family.master() != old, what="the new master answering")
    family.look()
    info = ask(lb, "show info")
    assert info["generation"] == 2 and info["upgraded_from"] == old
    rows = {b["name"]: b for b in ask(lb, "show backends")["backends"]}
    assert rows["echo"]["weight"] == 7 and rows["echo"]["state"] == "up"
    assert rows["extra"]["weight"] == 0
    assert hello(port)
    assert [w["generation"] for w in ask(lb, "show workers")["workers"]] == [2, 2]
    wait_until(lambda: not psutil.pid_exists(old) or
               psutil.Process(old).status() == psutil.STATUS_ZOMBIE, what="old master gone")
    # the socket file stayed: the new master answers on it (ask above), and SIGHUP
    # reaches the new master
    lb.path.write_text(long_config(echo, port, workers=1))
    os.kill(family.master(), signal.SIGHUP)
    wait_until(lambda: [w["generation"] for w in ask(lb, "show workers")["workers"]
                        if w["accepting"]] == [3], what="the reload in the new master")


@pytest.mark.timeout(60)
def test_a_backend_the_old_masters_checks_had_down_stays_down_in_the_new_one(
        tmp_path, l4lb, echo, lineage):
    dead = free_port_refused()
    # Probes an hour apart: only passive detection (a refused relay connect, fall 1)
    # takes `dead` down, and the new master probes nothing before the test looks.
    config = simple_config([("echo", echo.address), ("dead", f"127.0.0.1:{dead}")],
                           access=False) + """
[pools.main.health]
interval = 3600.0
timeout = 1.0
rise = 2
fall = 1
"""
    lb = l4lb(config)
    family = lineage(lb)
    wait_until(lambda: hello_ok(lb) and backend(lb, "dead")["state"] == "down",
               what="dead down by passive detection")
    reply = ask(lb, "upgrade")
    assert reply["ok"], reply
    family.look()
    dead_row = backend(lb, "dead")
    assert dead_row["state"] == "down" and dead_row["health"] == "failing", dead_row
    assert backend(lb, "echo")["state"] == "up"
    assert [(e["backend"], e["old"], e["new"]) for e in lb.events_named("backend_state_changed")
            if e["cause"] == "upgrade"] == [("dead", "up", "down")]
    for _ in range(20):                  # nothing is sent to it
        assert hello(lb.port())
    assert backend(lb, "dead")["total"] == 0


def backend(lb, name: str) -> dict:
    return {b["name"]: b for b in ask(lb, "show backends")["backends"]}[name]


def hello_ok(lb) -> bool:
    try:
        return bool(hello(lb.port()))
    except OSError:
        return False


@pytest.mark.timeout(60)
def test_a_new_master_whose_code_does_not_import_changes_nothing(tmp_path, l4lb, echo,
                                                                 lineage):
    """The code installed now is broken: the new master dies importing it (a
    sitecustomize, seen only by the new master, makes `import l4lb` fail there)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if 'L4LB_UPGRADE_FD' in os.environ:\n"
        "    sys.modules['l4lb'] = None      # import l4lb: ImportError\n")
    port = free_port()
    lb = l4lb(long_config(echo, port), env={"PYTHONPATH": str(site)})
    family = lineage(lb)
    master = family.master()
    reply = ask(lb, "upgrade")
    assert not reply["ok"]
    assert "exited (exit 1) before it was ready" in reply["error"], reply
    assert f"this one (pid {master}) keeps serving" in reply["error"]
    assert family.master() == master and hello(port)
    assert ask(lb, "show info")["generation"] == 1
