"""What a GET /metrics costs while many idle connections are open (issue 8: under 50 ms at 10k).

    python loadtests/scrape_cost.py [--conns 10000] [--backends 4] [--scrapes 100]

Starts an idle backend (a uvloop server that accepts and holds connections) and
`l4lb run` with [metrics] on, scrapes an idle balancer as a baseline, opens --conns
client connections and scrapes again. Prints, for each phase, the client-side latency
of a whole HTTP scrape and the server-side figure the balancer reports about itself
(l4lb_metrics_scrape_duration_seconds: collect + render of the previous scrape).

Each relayed connection holds two descriptors in the balancer. When the hard
RLIMIT_NOFILE is too low for all of them to be relayed, the backends' max_connections
is set so the rest wait in the pools' queues (one descriptor each, still live
connections the balancer tracks); the printout says how many of each.

Not a test: speed is measured here, never asserted in tests/ (STYLE.md).
"""
from __future__ import annotations

import argparse
import json
import queue
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Descriptors the balancer needs besides its connections (listeners, control, epoll, ...).
HEADROOM = 300

BACKEND_SCRIPT = r"""
import asyncio, resource, socket, sys, uvloop
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
class Hold(asyncio.Protocol):
    def connection_made(self, t): held.append(t)
    def data_received(self, d): pass
async def main():
    srv = await asyncio.get_running_loop().create_server(Hold, "127.0.0.1", 0, backlog=4096)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
uvloop.run(main())
"""


def raise_own_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def start_balancer(workdir: Path, backend_port: int, backends: int, per_backend_max: int):
    rows = ",\n".join(
        f'  {{ name = "b{i}", address = "127.0.0.1:{backend_port}", '
        f'max_connections = {per_backend_max} }}' for i in range(backends))
    config = workdir / "l4lb.toml"
    config.write_text(f"""
[global]
max_connections = 100000
shutdown_timeout = 2.0
[control]
socket = "l4lb.sock"
[log]
access = false
[metrics]
listen = "127.0.0.1:0"
[listeners.web]
bind = ["127.0.0.1:0"]
pool = "main"
max_connections = 100000
queue_timeout = 3600.0
idle_timeout = 3600.0
[pools.main]
algorithm = "rr"
backends = [
{rows}
]
""")
    proc = subprocess.Popen([sys.executable, "-m", "l4lb", "run", "-c", str(config)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    events: "queue.Queue[dict]" = queue.Queue()

    def read():
        for line in proc.stdout:
            try:
                events.put(json.loads(line))
            except ValueError:
                print(line, end="", file=sys.stderr)
    threading.Thread(target=read, daemon=True).start()
    ports = {}
    deadline = time.monotonic() + 20
    while "started" not in ports:
        ev = events.get(timeout=max(0.1, deadline - time.monotonic()))
        if ev.get("event") == "listener_started":
            ports["web"] = ev["port"]
        elif ev.get("event") == "metrics_started":
            ports["metrics"] = ev["port"]
        elif ev.get("event") == "started":
            ports["started"] = True
    return proc, ports["web"], ports["metrics"]


def scrape(port: int) -> tuple[float, float, str]:
    """(client-side seconds, server-reported seconds of the previous scrape, body)."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        body = resp.read().decode()
    elapsed = time.perf_counter() - t0
    server = next(float(line.split()[1]) for line in body.splitlines()
                  if line.startswith("l4lb_metrics_scrape_duration_seconds "))
    return elapsed, server, body


def sample(body: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def measure(port: int, n: int) -> dict:
    scrape(port)                                  # warm up; primes the server figure
    client, server = [], []
    for _ in range(n):
        c, s, body = scrape(port)
        client.append(c)
        server.append(s)
    def ms(xs, q):
        xs = sorted(xs)
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 2)
    return {"client_ms_p50": ms(client, 0.5), "client_ms_p95": ms(client, 0.95),
            "client_ms_max": ms(client, 1.0), "server_ms_p50": ms(server, 0.5),
            "server_ms_p95": ms(server, 0.95), "server_ms_max": ms(server, 1.0),
            "bytes": len(body.encode()), "body": body}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--backends", type=int, default=4)
    ap.add_argument("--scrapes", type=int, default=100)
    args = ap.parse_args()

    hard = raise_own_limit()
    if hard < args.conns + HEADROOM:
        sys.exit(f"this process's RLIMIT_NOFILE hard limit {hard} cannot hold {args.conns} clients")
    # Balancer descriptors: 2 per relayed connection, 1 per queued one.
    relayed = max(0, min(args.conns, hard - HEADROOM - args.conns))
    per_backend = max(1, relayed // args.backends)
    relayed = per_backend * args.backends if relayed < args.conns else args.conns
    per_backend_max = per_backend if relayed < args.conns else 0

    backend = subprocess.Popen([sys.executable, "-c", BACKEND_SCRIPT], stdout=subprocess.PIPE,
                               text=True)
    clients: list[socket.socket] = []
    with tempfile.TemporaryDirectory() as tmp:
        lb = None
        try:
            backend_port = int(backend.stdout.readline())
            lb, web, metrics = start_balancer(Path(tmp), backend_port, args.backends,
                                              per_backend_max)
            idle = measure(metrics, args.scrapes)
            t0 = time.perf_counter()
            for _ in range(args.conns):
                s = socket.create_connection(("127.0.0.1", web))
                clients.append(s)
            opened_s = time.perf_counter() - t0
            # Wait until the balancer has them all (accepted, connected or queued).
            deadline = time.monotonic() + 60
            while True:
                _, _, body = scrape(metrics)
                active = sample(body, "l4lb_connections_active")
                if active >= args.conns or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            loaded = measure(metrics, args.scrapes)
            body = loaded.pop("body")
            idle.pop("body")
            report = {
                "conns_open": int(sample(body, "l4lb_connections_active")),
                "relayed_to_backends": int(sample(body, "l4lb_backend_active_connections")),
                "balancer_open_fds": int(sample(body, "process_open_fds")),
                "fd_hard_limit": hard,
                "backends": args.backends,
                "open_seconds": round(opened_s, 2),
                "idle_balancer": idle,
                "with_conns": loaded,
            }
            print(json.dumps(report, indent=2))
        finally:
            for s in clients:
                s.close()
            if lb is not None:
                lb.terminate()
                lb.wait(10)
            backend.kill()
            backend.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
