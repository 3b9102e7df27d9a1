"""`l4lb deploy` end to end: real backend processes, the balancer and the deploy as
subprocesses, and clients on real sockets that must never notice a rollout."""
from __future__ import annotations

import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from l4lb.control.client import call

from ..support import (REPO, connect, echo_handler, free_port_refused,
                       recv_exactly, simple_config, two_pool_config, wait_until)

ECHO_BACKEND = REPO / "tests" / "echo_backend.py"


# --- backend processes -------------------------------------------------------------------

class EchoProcesses:
    """tests/echo_backend.py processes, each writing its pid to DIR/NAME.pid once it
    listens. stop() kills every process started here and every pid a pid file names
    (the replacements a deploy command started)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.procs: list[subprocess.Popen] = []

    def pidfile(self, name: str) -> Path:
        return self.dir / f"{name}.pid"

    def start(self, name: str, version: str, port: int | None = None) -> str:
        port = port or free_port_refused()
        proc = subprocess.Popen(
            [sys.executable, str(ECHO_BACKEND), "--port", str(port), "--version", version,
             "--pidfile", str(self.pidfile(name))], stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while not self.pidfile(name).exists():
            assert proc.poll() is None and time.monotonic() < deadline, f"{name} did not start"
            time.sleep(0.02)
        return f"127.0.0.1:{port}"

    def replace_command(self, version: str) -> str:
        """The `--exec` of a rolling deploy: kill the backend named by L4LB_BACKEND and
        start `version` on the port of L4LB_ADDRESS; it returns once the new version
        listens (the new process binds only after the old one has let go of the port)."""
        pidfile = shlex.quote(str(self.dir)) + '/"$L4LB_BACKEND".pid'
        return (f'kill "$(cat {pidfile})" && '
                f'{shlex.quote(sys.executable)} {shlex.quote(str(ECHO_BACKEND))} '
                f'--port "${{L4LB_ADDRESS##*:}}" --version {version} --pidfile {pidfile} '
                f'--daemon')

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(5)
        for pidfile in self.dir.glob("*.pid"):
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (ValueError, OSError):
                pass


@pytest.fixture
def echo_procs(tmp_path):
    procs = EchoProcesses(tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


# --- client load ---------------------------------------------------------------------

class Load:
    """Clients of the balancer until stop(): `concurrency` threads of short
    request/response connections and `streams` threads each running one stream after
    another, `stream_seconds` long, checking every echoed line. Every connection error
    or wrong byte is a failure; `shorts` holds (start time, version) per short connection."""

    def __init__(self, port: int, concurrency: int = 10, streams: int = 3,
                 stream_seconds: float = 2.0):
        self.port = port
        self.stream_seconds = stream_seconds
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.shorts: list[tuple[float, str]] = []
        self.streams: list[tuple[str, int]] = []        # (version, lines) per finished stream
        self.streams_begun = 0                           # streams that had a line echoed
        self.concurrency, self.stream_count = concurrency, streams
        self.threads = [threading.Thread(target=self.short_loop, args=(i,), daemon=True)
                        for i in range(concurrency)]
        self.threads += [threading.Thread(target=self.stream_loop, args=(i,), daemon=True)
                         for i in range(streams)]
        for t in self.threads:
            t.start()

    def fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def short_loop(self, i: int) -> None:
        n = 0
        while not self.stop_event.is_set():
            n += 1
            started = time.monotonic()
            request = f"ping {i} {n}"
            try:
                with connect(self.port, timeout=10) as s:
                    s.sendall(request.encode() + b"\n")
                    reply = s.makefile("rb").readline().decode()
            except OSError as exc:
                self.fail(f"short {request}: {exc!r}")
                continue
            version, _, echoed = reply.rstrip("\n").partition(" ")
            if echoed != request:
                self.fail(f"short {request}: got {reply!r}")
                continue
            with self.lock:
                self.shorts.append((started, version))

    def stream_loop(self, i: int) -> None:
        rng = random.Random(i)
        while not self.stop_event.is_set():
            try:
                self.stream_once(rng)
            except OSError as exc:
                self.fail(f"stream {i}: {exc!r}")

    def stream_once(self, rng: random.Random) -> None:
        """One connection carrying lines for stream_seconds; every reply must be its line,
        tagged with the same version throughout."""
        with connect(self.port, timeout=10) as s:
            reader = s.makefile("rb")
            version = None
            lines = 0
            end = time.monotonic() + self.stream_seconds
            while time.monotonic() < end:
                payload = rng.randbytes(rng.randint(1, 2048)).hex()
                s.sendall(payload.encode() + b"\n")
                reply = reader.readline().decode().rstrip("\n")
                tag, _, echoed = reply.partition(" ")
                version = version or tag
                if echoed != payload or tag != version:
                    self.fail(f"stream on {version}: line {lines} corrupted: {reply[:60]!r}")
                    return
                lines += 1
                if lines == 1:
                    with self.lock:
                        self.streams_begun += 1
                time.sleep(0.01)
        with self.lock:
            self.streams.append((version, lines))

    def wait_running(self, timeout: float = 20) -> None:
        """Return once every stream thread has a stream going through the balancer and
        as many short connections were answered as there are short threads."""
        wait_until(lambda: (self.streams_begun >= self.stream_count
                            and len(self.shorts) >= self.concurrency),
                   timeout, what="the load running")
        assert self.failures == [], self.failures

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=self.stream_seconds + 15)
        assert not any(t.is_alive() for t in self.threads), "a client thread hung"


@pytest.fixture
def load():
    started = []

    def start(port, **kw):
        lo = Load(port, **kw)
        started.append(lo)
        return lo

    try:
        yield start
    finally:
        for lo in started:
            lo.stop_event.set()
        for lo in started:
            for t in lo.threads:
                t.join(timeout=15)


def versions_of_new_connections(port: int, n: int = 30) -> Counter:
    seen = Counter()
    for i in range(n):
        with connect(port) as s:
            s.sendall(b"after\n")
            seen[s.makefile("rb").readline().decode().split(" ")[0]] += 1
    return seen


# --- the deploy CLI --------------------------------------------------------------------

def run_deploy(*args, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "l4lb", "deploy", *map(str, args)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


class DeployWatcher:
    """`l4lb deploy ...` as a subprocess whose stdout lines are stamped with the
    monotonic time they were read."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "l4lb", "deploy", *map(str, args)],
                                     cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float = 60) -> int:
        try:
            rc = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
        self.reader.join(5)
        self.stderr = self.proc.stderr.read()
        self.proc.stderr.close()
        return rc

    def seen_at(self, prefix: str) -> float:
        return next(t for t, line in self.lines if line.startswith(prefix))

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


@pytest.fixture
def deploy_watcher():
    """deploy_watcher(*args) starts a DeployWatcher; any still running is killed after."""
    started = []

    def start(*args):
        watcher = DeployWatcher(*args)
        started.append(watcher)
        return watcher

    try:
        yield start
    finally:
        for watcher in started:
            if watcher.proc.poll() is None:
                watcher.proc.kill()
            watcher.proc.wait(5)


NON_STICKY = 'pool = "blue"\nsticky_split = false'



# --- tests -----------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_rolling_deploy_under_load_drops_no_connection_and_ends_on_the_new_version(
        echo_procs, l4lb, load, tmp_path):
    backends = [(name, echo_procs.start(name, "v1")) for name in ("app1", "app2", "app3")]
    lb = l4lb(simple_config(backends, access=False, listener_extra="retries = 2"))
    clients = load(lb.port())
    clients.wait_running()
    result = run_deploy("rolling", "main", "-c", lb.path, "--exec",
                        echo_procs.replace_command("v2"), "--drain-timeout", 15,
                        "--ready-timeout", 10)
    clients.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert clients.failures == []
    out = result.stdout
    for name in ("app1", "app2", "app3"):
        assert f"/{name} (" in out and f"{name}: back in rotation" in out
    # The drains watched real connections end (whether one had to wait long enough for a
    # progress line depends on where the streams were; tests/unit/test_deploy.py covers it).
    assert re.search(r"connections drained [1-9]", out), out
    assert "done: 3/3 backends of main replaced" in out and "killed 0" in out
    assert len(clients.shorts) > 100 and len(clients.streams) >= 3
    assert {v for _, v in clients.shorts} == {"v1", "v2"}
    assert versions_of_new_connections(lb.port()) == Counter(v2=30)
    rows = call(tmp_path / "l4lb.sock", "show backends main")["backends"]
    assert [r["state"] for r in rows] == ["up", "up", "up"]


@pytest.mark.timeout(90)
def test_blue_green_under_load_switches_new_connections_and_lets_blue_streams_finish(
        echo_procs, l4lb, load, deploy_watcher, tmp_path):
    blue = [(n, echo_procs.start(n, "blue")) for n in ("b1", "b2")]
    green = [(n, echo_procs.start(n, "green")) for n in ("g1", "g2")]
    lb = l4lb(two_pool_config(blue, green, access=False))
    clients = load(lb.port())
    clients.wait_running()                        # streams on blue are running
    deploy = deploy_watcher("blue-green", "web", "--to", "green",
                           "-s", tmp_path / "l4lb.sock", "--drain-timeout", 15)
    rc = deploy.wait()
    clients.stop()
    assert rc == 0, deploy.text + deploy.stderr
    switched_at = deploy.seen_at("switched web: pool blue -> pool green")
    assert "killed after the drain timeout: 0" in deploy.text
    assert clients.failures == []
    after = [v for started, v in clients.shorts if started > switched_at]
    assert after and set(after) == {"green"}
    assert any(v == "blue" for v, _ in clients.streams)    # blue streams ended intact
    assert versions_of_new_connections(lb.port()) == Counter(green=30)
    routes = call(tmp_path / "l4lb.sock", "show listeners")["listeners"]
    assert routes[0]["pool"] == "green"


@pytest.mark.timeout(90)
def test_canary_onto_a_dead_pool_rolls_back_to_the_original_route(echo_procs, l4lb, load,
                                                                   tmp_path):
    blue = [("b1", echo_procs.start("b1", "blue"))]
    green = [("g1", f"127.0.0.1:{free_port_refused()}")]       # nothing listens there
    # Every test client comes from 127.0.0.1: a sticky split would put them all on one
    # side, so the canary steps are checked with per-connection splitting.
    lb = l4lb(two_pool_config(blue, green, NON_STICKY, access=False))
    clients = load(lb.port(), concurrency=4, streams=0)
    result = run_deploy("canary", "web", "--to", "green", "--steps", "50,100",
                        "--interval", 1, "-c", lb.path)
    clients.stop()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "step 50%" in result.stderr and "rolled back to pool blue" in result.stderr
    routes = call(tmp_path / "l4lb.sock", "show listeners")["listeners"]
    assert (routes[0]["pool"], routes[0]["split"]) == ("blue", None)
    assert versions_of_new_connections(lb.port()) == Counter(blue=30)


@pytest.mark.timeout(90)
def test_healthy_canary_under_load_ends_switched_to_the_new_pool(echo_procs, l4lb, load,
                                                                  tmp_path):
    blue = [("b1", echo_procs.start("b1", "blue"))]
    green = [("g1", echo_procs.start("g1", "green"))]
    # Every test client comes from 127.0.0.1: a sticky split would put them all on one
    # side, so the canary steps are checked with per-connection splitting.
    lb = l4lb(two_pool_config(blue, green, NON_STICKY, access=False))
    clients = load(lb.port(), concurrency=4, streams=0)
    result = run_deploy("canary", "web", "--to", "green", "--steps", "50,100",
                        "--interval", 1, "-c", lb.path)
    clients.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [s.split(":")[0] for s in steps] == ["step 50%", "step 100%"]
    assert "0 failed" in steps[0]
    assert clients.failures == []
    assert {v for _, v in clients.shorts} == {"blue", "green"}
    routes = call(tmp_path / "l4lb.sock", "show listeners")["listeners"]
    assert (routes[0]["pool"], routes[0]["split"]) == ("green", None)


@pytest.mark.timeout(60)
def test_rolling_deploy_with_a_failing_command_leaves_that_backend_in_maint(backends, l4lb,
                                                                             tmp_path):
    bs = [backends(echo_handler, name=f"app{i}") for i in (1, 2, 3)]
    lb = l4lb(simple_config([(b.name, b.address) for b in bs], access=False))
    result = run_deploy("rolling", "main", "-c", lb.path, "--exec", "exit 1")
    assert result.returncode == 1
    assert "main/app1: the command exited with status 1" in result.stderr
    assert "main/app1 left in maint" in result.stderr
    rows = call(tmp_path / "l4lb.sock", "show backends main")["backends"]
    assert [(r["name"], r["state"]) for r in rows] == [
        ("app1", "maint"), ("app2", "up"), ("app3", "up")]
    with connect(lb.port()) as s:                 # the others still serve
        s.sendall(b"x")
        assert s.recv(10) == b"x"


def wait_for_line(deploy: DeployWatcher, prefix: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not any(line.startswith(prefix) for _, line in deploy.lines):
        assert deploy.proc.poll() is None, deploy.text
        assert time.monotonic() < deadline, f"no {prefix!r} line; got:\n{deploy.text}"
        time.sleep(0.02)


@pytest.mark.timeout(60)
def test_ctrl_c_during_a_rolling_drain_puts_that_backend_back_up(backends, l4lb,
                                                                deploy_watcher, tmp_path):
    bs = [backends(echo_handler, name=f"app{i}") for i in (1, 2)]
    lb = l4lb(simple_config([(b.name, b.address) for b in bs], access=False))
    with connect(lb.port()) as held:              # rr: app1 gets it, and its drain waits
        held.sendall(b"x")
        assert held.recv(10) == b"x"
        deploy = deploy_watcher("rolling", "main", "-c", lb.path, "--exec", "true")
        wait_for_line(deploy, "  app1: 1 connection left")
        deploy.proc.send_signal(signal.SIGINT)
        assert deploy.wait() == 130
        assert ("interrupted while draining main/app1; main/app1 was not replaced and is "
                "back to up") in deploy.stderr
        held.sendall(b"still here")               # the drain did not cut the connection
        assert recv_exactly(held, 10) == b"still here"
    rows = call(tmp_path / "l4lb.sock", "show backends main")["backends"]
    assert [r["state"] for r in rows] == ["up", "up"]


@pytest.mark.timeout(60)
def test_ctrl_c_during_a_canary_step_restores_the_starting_route(echo_procs, l4lb,
                                                                 deploy_watcher, tmp_path):
    blue = [("b1", echo_procs.start("b1", "blue"))]
    green = [("g1", echo_procs.start("g1", "green"))]
    lb = l4lb(two_pool_config(blue, green, route="split = { blue = 90, green = 10 }", access=False))
    deploy = deploy_watcher("canary", "web", "--to", "green", "--steps", "50,100",
                           "--interval", 30, "-c", lb.path)
    wait_for_line(deploy, "canary web -> green")
    sock = tmp_path / "l4lb.sock"
    deadline = time.monotonic() + 10
    while call(sock, "show listeners")["listeners"][0]["split"] != {"blue": 50, "green": 50}:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    deploy.proc.send_signal(signal.SIGINT)
    assert deploy.wait() == 130
    assert "interrupted at step 50%; rolled back to split blue=90 green=10" in deploy.stderr
    listener = call(sock, "show listeners")["listeners"][0]
    assert (listener["pool"], listener["split"]) == (None, {"blue": 90, "green": 10})
