#!/usr/bin/env python3
"""A worker's restart time after `kill -9`, and how accepts spread over workers (issue 15).

    python loadtests/worker_restarts.py                    # 2 workers, 10,000 conns, 20 kills
    python loadtests/worker_restarts.py --workers 4 --conns 20000 --kills 40

Starts a line-echo backend (loadtests/echo_server.py) and l4lb from this checkout with
`workers = N` in front of it (log level info, JSON, access log off), each its own process
on loopback. Then:

1. Accept balance: --conns short connections (connect, one line each way, close), from
   --concurrency client threads, then `show workers`: each worker's `accepted`, and
   max/min over workers (issue 15's target: at most 1.3 over 10,000 connections).
2. Restarts: --kills times, a live worker (taken in turn) gets SIGKILL; the master logs
   `worker_exited` when its fork server reports the exit and `worker_started` (with
   `startup_ms`, from the spawn request to the worker's `ready`) once the new process
   accepts. The restart time is the gap between those two lines of the same worker, from
   their timestamps; kill to `worker_started` (this script's clock against the log's, the
   same wall clock) is printed beside it. The next kill waits until the worker is back.

Prints each figure's median and max. Not a test: time is measured here, never asserted in
tests/ (STYLE.md); tests/integration has the functional checks of the same paths.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from l4lb.control.client import call  # noqa: E402  (this checkout's client)

# Seconds any one step may take before the run gives up (a worker not back, a start).
STEP_TIMEOUT = 30.0


def log_time(event: dict) -> float:
    """The wall-clock time of a JSON log line (its ISO `timestamp`, UTC)."""
    stamp = event["timestamp"].replace("Z", "+00:00")
    return dt.datetime.fromisoformat(stamp).timestamp()


class Process:
    """A child process whose stdout lines are read by a thread into a queue."""

    def __init__(self, cmd: list[str], cwd: Path, parse_json: bool):
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines: "queue.Queue" = queue.Queue()
        self.parse_json = parse_json
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if self.parse_json:
                try:
                    self.lines.put(json.loads(line))
                except ValueError:
                    print(line, end="", file=sys.stderr)
            else:
                self.lines.put(line)
        self.lines.put(None)                # EOF

    def next(self, deadline: float):
        """The next line (a dict when parse_json) before `deadline` (monotonic); exits
        the run with a message if there is none."""
        try:
            item = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            sys.exit("worker_restarts: timed out waiting for %s" % self.proc.args[:4])
        if item is None:
            sys.exit("worker_restarts: %s exited (status %s)" % (self.proc.args[:4],
                                                                  self.proc.wait()))
        return item

    def wait_for(self, match, what: str):
        """The first line for which match(line) holds, within STEP_TIMEOUT s."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            item = self.next(deadline)
            if match(item):
                return item

    def stop(self) -> None:
        """SIGTERM to its process group (l4lb's master, fork server and workers), then
        SIGKILL to the group if it is still there after 10 s."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


def l4lb_config(backend_port: int, workers: int) -> str:
    return f"""# written by loadtests/worker_restarts.py
[global]
workers = {workers}
shutdown_timeout = 2.0

[control]
socket = "l4lb.sock"

[log]
level = "info"
format = "json"
access = false

[listeners.echo]
bind = ["127.0.0.1:0"]
pool = "echo"

[pools.echo]
backends = [
  {{ name = "e1", address = "127.0.0.1:{backend_port}" }},
]
"""


def short_connection(port: int) -> None:
    """Connect, one line each way, close; OSError if the reply does not come."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"x\n")
        reply = b""
        while not reply.endswith(b"\n"):
            data = s.recv(64)
            if not data:
                raise OSError("closed before the reply")
            reply += data


def accept_balance(port: int, control: Path, conns: int, concurrency: int) -> dict:
    """Open `conns` short connections; each worker's accepted count after them."""
    before = {w["worker"]: w["accepted"] for w in call(control, "show workers")["workers"]}
    failed = 0
    with ThreadPoolExecutor(concurrency) as pool:
        for fut in [pool.submit(short_connection, port) for _ in range(conns)]:
            try:
                fut.result()
            except OSError:
                failed += 1
    after = call(control, "show workers")["workers"]
    accepted = {w["worker"]: w["accepted"] - before.get(w["worker"], 0) for w in after}
    return {"accepted": accepted, "failed": failed}


def restarts(l4lb: Process, control: Path, kills: int) -> list[dict]:
    """Kill a worker `kills` times (each worker in turn); per kill the gaps in ms."""
    out = []
    for i in range(kills):
        rows = call(control, "show workers")["workers"]
        live = [w for w in rows if w["live"]]
        victim = live[i % len(live)]
        killed_at = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
        exited = l4lb.wait_for(lambda e: e.get("event") == "worker_exited"
                               and e.get("pid") == victim["pid"], "worker_exited")
        started = l4lb.wait_for(lambda e: e.get("event") == "worker_started"
                                and e.get("worker") == victim["worker"], "worker_started")
        out.append({"worker": victim["worker"],
                    "exited_to_started_ms": 1000.0 * (log_time(started) - log_time(exited)),
                    "kill_to_started_ms": 1000.0 * (log_time(started) - killed_at),
                    "startup_ms": started.get("startup_ms")})
        time.sleep(0.2)                 # below the master's restart-burst limit
    return out


def spread(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return "median %.1f, max %.1f (n = %d)" % (statistics.median(values), max(values),
                                               len(values))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="workers = N (default 2)")
    ap.add_argument("--conns", type=int, default=10000,
                    help="short connections for the accept balance (default 10000)")
    ap.add_argument("--concurrency", type=int, default=16,
                    help="client threads opening them (default 16)")
    ap.add_argument("--kills", type=int, default=20, help="kill -9 of a worker, times (default 20)")
    args = ap.parse_args(argv)
    if args.workers < 1:
        ap.error("--workers must be at least 1")

    workdir = Path(tempfile.mkdtemp(prefix="l4lb-restarts-"))
    backend = Process([sys.executable, str(HERE / "echo_server.py"), "--port", "0"], REPO,
                      parse_json=False)
    l4lb = None
    try:
        line = backend.wait_for(lambda s: s.startswith("listening "), "listening")
        backend_port = int(line.rsplit(":", 1)[1])
        conf = workdir / "l4lb.toml"
        conf.write_text(l4lb_config(backend_port, args.workers))
        l4lb = Process([sys.executable, "-m", "l4lb", "run", "-c", str(conf)], REPO,
                       parse_json=True)
        port = l4lb.wait_for(lambda e: e.get("event") == "listener_started", "listener")["port"]
        l4lb.wait_for(lambda e: e.get("event") == "started", "started")
        control = workdir / "l4lb.sock"
        print("l4lb: %d workers, listening on 127.0.0.1:%d, backend 127.0.0.1:%d"
              % (args.workers, port, backend_port), flush=True)

        t0 = time.monotonic()
        balance = accept_balance(port, control, args.conns, args.concurrency)
        counts = balance["accepted"]
        low, high = min(counts.values()), max(counts.values())
        print("accept balance: %d short connections in %.1f s (%d failed), accepted per worker %s,"
              " max/min %s" % (args.conns, time.monotonic() - t0, balance["failed"],
                               ", ".join("%s: %d" % kv for kv in sorted(counts.items())),
                               "%.3f" % (high / low) if low else "inf"), flush=True)

        kills = restarts(l4lb, control, args.kills)
        print("restarts after kill -9 (%d kills, workers in turn):" % len(kills))
        print("  worker_exited -> worker_started, ms: %s"
              % spread(k["exited_to_started_ms"] for k in kills))
        print("  startup_ms (spawn request -> ready): %s" % spread(k["startup_ms"] for k in kills))
        print("  kill -> worker_started, ms:          %s"
              % spread(k["kill_to_started_ms"] for k in kills))
        rows = call(control, "show workers")["workers"]
        print("show workers after: %s" % ", ".join(
            "worker %d restarts %d live %s" % (w["worker"], w["restarts"], w["live"]) for w in rows))
    finally:
        if l4lb is not None:
            l4lb.stop()
        backend.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
