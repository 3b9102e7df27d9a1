"""What one `subscribe` viewer costs the balancer (issue 19: at 1 Hz, <= 1 % of the relay's
throughput).

    python loadtests/subscribe_cost.py [--backends 10] [--seconds 10] [--reps 3] [--interval 0.05]

Starts `l4lb run` with --backends backends in one pool (access log off), then, --reps
times in turn, measures the balancer's CPU-seconds over --seconds with no subscriber and
with one `subscribe --interval` client reading and parsing every frame. The difference
over the frames received is the CPU one frame costs the balancer (snapshot, JSON, write);
at 1 Hz that is the share of a core a viewer takes, which bounds the throughput a relay
saturating that core loses to it. A fast interval (20 Hz by default) makes the cost
measurable above the idle balancer's own noise. Quotes medians.

The end-to-end figure (the relay's req/s and CPU per request with and without a 1 Hz
subscriber) comes from the shared bench harness with loadtests/run-l4lb.sh's
L4LB_SUBSCRIBE=1 (see loadtests/README.md). Not a test: speed is measured here, never
asserted in tests/ (STYLE.md).
"""
from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def start_balancer(workdir: Path, backends: int) -> subprocess.Popen:
    rows = ",\n".join(f'  {{ name = "b{i}", address = "127.0.0.1:{10000 + i}" }}'
                      for i in range(backends))
    conf = workdir / "l4lb.toml"
    conf.write_text(f"""
[control]
socket = "l4lb.sock"
[log]
level = "warning"
access = false
[listeners.web]
bind = ["127.0.0.1:0"]
pool = "main"
[pools.main]
backends = [
{rows}
]
""")
    proc = subprocess.Popen([sys.executable, "-m", "l4lb", "run", "-c", str(conf)], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    sock = workdir / "l4lb.sock"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(sock))
            s.close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("l4lb did not start")


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def subscribe(path: Path, interval: float, stop: threading.Event, counter: list) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    s.settimeout(1.0)
    s.sendall(f"subscribe {interval}\n".encode())
    buf = b""
    while not stop.is_set():
        try:
            data = s.recv(1 << 20)
        except socket.timeout:
            continue
        if not data:
            break
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            json.loads(line)
            counter[0] += 1
    s.close()


def measure(proc: psutil.Process, path: Path, seconds: float, interval: float | None):
    """(CPU-seconds of the balancer, frames received) over `seconds`."""
    stop, counter, thread = threading.Event(), [0], None
    if interval is not None:
        thread = threading.Thread(target=subscribe, args=(path, interval, stop, counter))
        thread.start()
        time.sleep(0.5)                       # subscribed and streaming
        counter[0] = 0
    c0 = cpu(proc)
    time.sleep(seconds)
    used = cpu(proc) - c0
    frames = counter[0]
    stop.set()
    if thread is not None:
        thread.join()
    return used, frames


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--interval", type=float, default=0.05)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="l4lb-subcost-") as tmp:
        workdir = Path(tmp)
        lb = start_balancer(workdir, args.backends)
        try:
            proc = psutil.Process(lb.pid)
            path = workdir / "l4lb.sock"
            per_frame = []
            for rep in range(args.reps):
                idle, _ = measure(proc, path, args.seconds, None)
                busy, frames = measure(proc, path, args.seconds, args.interval)
                cost = max(0.0, busy - idle) / max(1, frames)
                per_frame.append(cost)
                print(f"rep {rep + 1}: idle {idle:.3f} CPU-s, with a subscriber {busy:.3f} "
                      f"CPU-s for {frames} frames: {cost * 1e6:.0f} µs per frame", flush=True)
            med = statistics.median(per_frame)
            print(f"median: {med * 1e6:.0f} µs of CPU per frame with {args.backends} backends; "
                  f"one subscriber at 1 Hz takes {med * 100:.3f} % of a core")
        finally:
            lb.terminate()
            lb.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
