"""Test helpers: real backends on loopback and l4lb run as a subprocess (the CLI a user runs).

Everything here binds 127.0.0.1 (or other 127.0.0.0/8 addresses) and port 0, and every
process or thread it starts is stopped by the fixture that started it.
"""
from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


# --- backends -------------------------------------------------------------------------

class Backend:
    """A threaded TCP server on 127.0.0.1:0. `handler(conn, backend)` serves one client."""

    def __init__(self, handler, name: str = "b", host: str = "127.0.0.1", backlog: int = 128):
        self.name = name
        self.handler = handler
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(backlog)
        self.host, self.port = self.sock.getsockname()
        self.accepted = 0
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.closed = False
        self.thread = threading.Thread(target=self.accept_loop, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def accept_loop(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.conns.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn):
        try:
            self.handler(conn, self)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.close()
                except OSError:
                    pass
        self.thread.join(timeout=2)


def echo_handler(conn, backend):
    """Echo everything; pass the client's EOF on once all was echoed."""
    while True:
        data = conn.recv(262144)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


def iter_lines(conn: socket.socket, bufsize: int = 4096):
    """The lines a client sends (without the newline), until it closes its side."""
    buf = b""
    while data := conn.recv(bufsize):
        buf += data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield line


def name_handler(conn, backend):
    """Answer each line with the backend's name (like `l4lb demo`'s backends)."""
    for _ in iter_lines(conn):
        conn.sendall(backend.name.encode() + b"\n")


def free_port_refused() -> int:
    """A loopback port with nothing listening (connect gets ECONNREFUSED)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- the balancer as a subprocess ------------------------------------------------------

class L4LB:
    """`l4lb run -c CONFIG` as a subprocess, with its JSON log lines collected."""

    def __init__(self, tmp_path: Path, config: str, name: str = "l4lb.toml", args=(),
                 env=None, preexec_fn=None):
        self.path = tmp_path / name
        self.path.write_text(config)
        self.lines: list[dict] = []
        self.raw: list[str] = []
        self.events: "queue.Queue[dict]" = queue.Queue()
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "l4lb", "run", "-c", str(self.path), *args],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=full_env, preexec_fn=preexec_fn, text=True)
        self.reader = threading.Thread(target=self.read_log, daemon=True)
        self.reader.start()
        self.ports: dict[str, list[int]] = {}

    def read_log(self):
        for line in self.proc.stdout:
            self.raw.append(line)
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            self.lines.append(ev)
            self.events.put(ev)

    def wait_event(self, event: str, timeout: float = 10.0, **match) -> dict:
        """The first logged event named `event` whose fields include `match`."""
        deadline = time.monotonic() + timeout
        for ev in list(self.lines):
            if ev.get("event") == event and all(ev.get(k) == v for k, v in match.items()):
                return ev
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {event} {match} within {timeout}s; log:\n"
                                   + "".join(self.raw[-40:]))
            try:
                ev = self.events.get(timeout=min(left, 0.2))
            except queue.Empty:
                if self.proc.poll() is not None and self.events.empty():
                    raise RuntimeError("l4lb exited with %s; log:\n%s"
                                       % (self.proc.returncode, "".join(self.raw[-40:])))
                continue
            if ev.get("event") == event and all(ev.get(k) == v for k, v in match.items()):
                return ev

    def events_named(self, event: str) -> list[dict]:
        return [ev for ev in self.lines if ev.get("event") == event]

    def wait_events(self, event: str, count: int, timeout: float = 10.0) -> list[dict]:
        """The events named `event` once there are at least `count` of them (a condition,
        not a pause: the suite runs on a busy machine too)."""
        deadline = time.monotonic() + timeout
        while len(found := self.events_named(event)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)} of {count} {event} within {timeout}s; log:\n"
                                   + "".join(self.raw[-40:]))
            if self.proc.poll() is not None:
                raise RuntimeError("l4lb exited with %s" % self.proc.returncode)
            time.sleep(0.05)
        return found

    def wait_ready(self, timeout: float = 15.0) -> "L4LB":
        self.wait_event("started", timeout)
        for ev in self.events_named("listener_started"):
            self.ports.setdefault(ev["listener"], []).append(ev["port"])
        return self

    def port(self, listener: str = "web") -> int:
        return self.ports[listener][0]

    @property
    def ps(self) -> psutil.Process:
        """The master process (control socket, health checks, metrics)."""
        return psutil.Process(self.proc.pid)

    @property
    def worker_ps(self) -> psutil.Process:
        """Worker 0, where the data path's descriptors and memory are (a test that
        measures one data-path process runs `workers = 1`)."""
        return psutil.Process(ask(self, "show workers")["workers"][0]["pid"])

    def processes(self) -> list[psutil.Process]:
        """The master and every process under it (the fork server, the workers)."""
        return [self.ps] + self.ps.children(recursive=True)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.reader.join(timeout=2)
        return self.proc.returncode


def backends_toml(backends, indent: str = "  ") -> str:
    """A TOML array body of inline backend tables from (name, address[, extra]) tuples."""
    rows = []
    for b in backends:
        name, address = b[0], b[1]
        extra = "".join(f", {k} = {v}" for k, v in (b[2] if len(b) > 2 else {}).items())
        rows.append(f'{indent}{{ name = "{name}", address = "{address}"{extra} }}')
    return ",\n".join(rows)


# Workers of the balancers the tests start (unless a test says otherwise): two, whatever
# the machine's CPU count, so every contract is checked across processes.
TEST_WORKERS = 2


def simple_config(backends, algorithm: str = "rr", listener_extra: str = "",
                  pool_extra: str = "", global_extra: str = "", access: bool = True,
                  socket_name: str = "l4lb.sock", bind: str = "127.0.0.1:0") -> str:
    if "workers" not in global_extra:
        global_extra = f"workers = {TEST_WORKERS}\n{global_extra}"
    return f"""
[global]
shutdown_timeout = 5.0
{global_extra}

[control]
socket = "{socket_name}"

[log]
level = "info"
format = "json"
access = {"true" if access else "false"}

[listeners.web]
bind = ["{bind}"]
pool = "main"
{listener_extra}

[pools.main]
algorithm = "{algorithm}"
{pool_extra}
backends = [
{backends_toml(backends)}
]
"""


def fds_in_use(lb) -> int:
    """The balancer's open descriptors (every process of it), less the empty pipes its
    workers keep for reuse (`show info` pipes.free, two descriptors each): what a leak
    would grow."""
    free = ask(lb, "show info")["pipes"]["free"]
    return sum(p.num_fds() for p in lb.processes()) - 2 * free


def two_pool_config(blue, green, route: str = 'pool = "blue"', access: bool = True,
                    mode: int = 0o600) -> str:
    """Listener `web` routed by `route` (a pool or a split) over pools blue and green
    (rr), with the control socket l4lb.sock beside the config."""
    return f"""
[control]
socket = "l4lb.sock"
mode = {oct(mode)}
[log]
access = {"true" if access else "false"}
[listeners.web]
bind = ["127.0.0.1:0"]
{route}
[pools.blue]
algorithm = "rr"
backends = [
{backends_toml(blue)}
]
[pools.green]
algorithm = "rr"
backends = [
{backends_toml(green)}
]
"""


def connect(port: int, host: str = "127.0.0.1", source: str | None = None,
            timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source:
        s.bind((source, 0))
    s.connect((host, port))
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        data = s.recv(min(n, 262144))
        if not data:
            break
        chunks.append(data)
        n -= len(data)
    return b"".join(chunks)


def recv_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        data = s.recv(262144)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def hello(port: int, source: str | None = None, host: str = "127.0.0.1") -> str:
    """One short connection: send a line, return the first reply line (a name_handler
    backend answers with its name)."""
    s = connect(port, host=host, source=source)
    s.sendall(b"hi\n")
    reply = s.recv(100).strip().decode()
    s.close()
    return reply


def ask(lb: "L4LB", line: str) -> dict:
    """One control command to `lb` (its socket is l4lb.sock beside its config)."""
    from l4lb.control.client import call

    return call(lb.path.parent / "l4lb.sock", line, timeout=10)


def wait_until(predicate, timeout: float = 10.0, what: str = "the condition",
               interval: float = 0.02):
    """Poll `predicate()` until it returns something true and return that; raise
    TimeoutError naming `what` (and the last value seen) after `timeout` seconds. A
    condition, not a pause: as fast as the machine, and no pass without the state."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout}s for {what} in vain (last: {value!r})")
        time.sleep(interval)


def wait_stalled(lb, count: int) -> None:
    """Return once `count` relays have each sent their client something and none sends
    more (`show conns` bytes_out steady): every stream is stuck on a client that does not
    read."""
    def sent():
        return sorted((c["id"], c["bytes_out"]) for c in ask(lb, "show conns")["conns"])

    wait_steady(sent, what=f"{count} stalled streams",
                accept=lambda rows: len(rows) == count and all(n for _, n in rows))


def wait_steady(sample, samples: int = 3, interval: float = 0.2, timeout: float = 20.0,
                what: str = "a steady value", accept=lambda value: True):
    """Return `sample()` once it gave the same value, one that `accept` takes, `samples`
    times in a row, `interval` seconds apart: the observable end of a burst of work (a
    flood taken in, streams stalled) where no event marks it."""
    seen: list = []

    def steady():
        seen.append(sample())
        return (len(seen) >= samples and accept(seen[-1])
                and seen[-samples:].count(seen[-1]) == samples)

    try:
        wait_until(steady, timeout, what, interval)
    except TimeoutError:
        raise TimeoutError(f"waited {timeout}s for {what} in vain; last samples: "
                           f"{seen[-samples:]!r}") from None
    return seen[-1]


# --- etcd, for the fleet tests ----------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` right now (for a program that takes a port, not port 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Etcd:
    """A one-member etcd (Debian's etcd-server) on loopback ports with its data in
    `data_dir`; stop() and start() again keep its data, ports and revisions."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.log = open(data_dir.parent / "etcd.log", "ab")

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "Etcd":
        url, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            ["etcd", "--name", "t", "--data-dir", str(self.data_dir),
             "--listen-client-urls", url, "--advertise-client-urls", url,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"t={peer}"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        wait_until(self.healthy, timeout, "etcd to answer", interval=0.1)
        return self

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"etcd exited with {self.proc.returncode}")
        try:
            return self.call("/v3/kv/range", {"key": "eA=="}) is not None
        except OSError:
            return False

    def call(self, path: str, body: dict) -> dict:
        """One request to etcd's JSON gateway (keys and values are base64 there)."""
        import urllib.request

        request = urllib.request.Request(f"http://{self.endpoint}{path}",
                                         data=json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=5) as reply:
            return json.loads(reply.read())

    def revision(self) -> int:
        return int(self.call("/v3/kv/range", {"key": "eA=="})["header"]["revision"])

    def compact(self) -> int:
        """Compact the history up to the current revision; returns it."""
        revision = self.revision()
        self.call("/v3/kv/compaction", {"revision": revision, "physical": True})
        return revision

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def close(self) -> None:
        self.stop()
        self.log.close()


# --- churn: the restart tests' load client (tests/churn.py) ------------------------------

CHURN = Path(__file__).resolve().parent / "churn.py"

# The kernel's counts of connections a listener did not take (/proc/net/netstat, TcpExt):
# accept queue full (ListenOverflows, each also in ListenDrops), SYN queue full
# (TCPReqQFullDrop, or answered with a cookie: TCPReqQFullDoCookies, SyncookiesSent).
LISTEN_DROP_COUNTERS = ("TcpExtListenDrops", "TcpExtListenOverflows", "TcpExtTCPReqQFullDrop",
                        "TcpExtTCPReqQFullDoCookies", "TcpExtSyncookiesSent")


def nstat_counters(names=LISTEN_DROP_COUNTERS) -> dict[str, int]:
    """The absolute values of `names` (nstat's spelling: TcpExtListenDrops) from
    /proc/net/netstat, this network namespace's; a counter the kernel lacks reads 0.
    Compare two readings: the counters are the namespace's, not one listener's."""
    values: dict[str, int] = {}
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for head, row in zip(lines[::2], lines[1::2]):     # a line of names, then one of values
        prefix, *keys = head.split()
        _, *numbers = row.split()
        for key, number in zip(keys, numbers):
            values[prefix.rstrip(":") + key] = int(number)
    return {name: values.get(name, 0) for name in names}


class ChurnEcho:
    """`churn.py echo` as a subprocess: the echo backend the churn load goes through l4lb
    to. Started on construction (returns once it listens); `close` ends it."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(CHURN), "echo"], cwd=REPO,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()   # the child prints it at once or dies
        if not line.startswith("listening "):
            self.close()
            raise RuntimeError(f"churn echo did not start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Churn:
    """`churn.py load` as a subprocess against 127.0.0.1:`port`: short connections at
    `rate` a second and `streams` long echo streams for up to `duration` s.

    wait_running() returns once the load runs (a short connection and every stream went
    through); wait_ok(n) once n short connections succeeded in all; stop() ends it early
    (SIGTERM: it finishes what is in flight) and wait() lets it run out; both return the
    result dict (churn.py's docstring lists the counts). close() kills it whatever its
    state: call it in a finally or use `with`.
    """

    def __init__(self, port: int, result_path: Path, rate: float = 500, streams: int = 50,
                 duration: float = 30.0):
        self.result_path = Path(result_path)
        self.duration = duration
        self.result: dict | None = None
        self.progress: dict = {}
        self.lines: list[str] = []
        self.running = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, str(CHURN), "load", "--port", str(port), "--rate", str(rate),
             "--streams", str(streams), "--duration", str(duration),
             "--result", str(self.result_path)],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(target=self.read_output, daemon=True)
        self.reader.start()

    def read_output(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("running"):
                self.running.set()
            elif line.startswith("progress "):
                self.progress = json.loads(line.split(" ", 1)[1])

    def wait_running(self, timeout: float = 15.0) -> "Churn":
        deadline = time.monotonic() + timeout
        while not self.running.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the churn load did not start running; its output:\n"
                                   + "".join(self.lines[-20:]))
        return self

    def wait_ok(self, count: int, timeout: float = 15.0) -> dict:
        """The progress counts once `count` short connections succeeded in all."""
        return wait_until(lambda: self.progress.get("ok", 0) >= count and self.progress,
                          timeout, f"{count} churn connections ok")

    def stop(self, timeout: float | None = None) -> dict:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> dict:
        """The result, once the load ended (after its duration, or a stop). The default
        timeout covers the duration and the end of what was in flight."""
        if timeout is None:
            timeout = self.duration + 40
        self.proc.wait(timeout)
        self.reader.join(timeout=5)
        if not self.result_path.exists():
            raise RuntimeError(f"churn exited with {self.proc.returncode} and no result; "
                               "its output:\n" + "".join(self.lines[-20:]))
        self.result = json.loads(self.result_path.read_text())
        return self.result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.reader.join(timeout=2)
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
