#!/usr/bin/env python3
"""Memory per idle connection held through l4lb (issue 6: at most 10 KiB of RSS each).

    python loadtests/idle_memory.py                 # N = 10000, or the most that fits
    python loadtests/idle_memory.py -n 5000 --steps 4

Starts, each as its own process (every one needs about N file descriptors):
  - a backend that accepts connections, answers the first bytes of each once and then
    holds it open, reading whatever comes;
  - l4lb from this checkout (access log off, level warning, leastconn; the production
    settings of loadtests/run-l4lb.sh) in front of it;
  - a client process that opens the connections through l4lb, sends "hello\\n" on each,
    reads the backend's reply (so both of l4lb's sockets are established and have relayed
    data both ways) and then leaves them idle.
The connections are opened in --steps equal batches. After each batch it waits until
`show info` says conns_active equals the connections open and l4lb's RSS (psutil) has
settled, and records it. The baseline is measured after a warm-up (a few connections
opened, relayed and closed, so one-time allocations such as the shared read buffer and
the first relay's code paths are not charged to the first batch).

It prints RSS at each step, KiB per connection over the whole run (RSS at N minus the
baseline, over N) and per batch (the slope, free of start-up effects), and RSS after all
connections are closed again.

File descriptors: l4lb needs 2 per connection plus a few dozen, and its hard
RLIMIT_NOFILE cannot be raised without CAP_SYS_RESOURCE. The script tries to raise the
hard limit of the processes it starts (`prlimit` semantics: setrlimit in the child before
exec, which works as root with that capability); when that fails, N is cut to what fits
under l4lb's hard limit and the output says so.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# l4lb's own descriptors besides the relayed sockets: listener, control socket, epoll,
# eventfd, signal pipe, std streams, log; 16 measured, 64 leaves a margin.
L4LB_SPARE_FDS = 64
KIB = 1024.0


# --- child roles ------------------------------------------------------------------------

def raise_nofile(want: int) -> tuple[int, int]:
    """Soft (and if allowed hard) RLIMIT_NOFILE up to `want`; returns the limits after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want, want
        except (ValueError, OSError):
            pass
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    except (ValueError, OSError):
        pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class HoldProtocol(asyncio.Protocol):
    """Backend side: reply "ok\\n" to the first data, then just hold the connection."""

    def connection_made(self, transport):
        self.transport = transport
        self.answered = False

    def data_received(self, data):
        if not self.answered:
            self.answered = True
            self.transport.write(b"ok\n")


def role_backend(args) -> int:
    raise_nofile(args.n + 64)

    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(HoldProtocol, "127.0.0.1", 0, backlog=4096)
        print("listening %d" % server.sockets[0].getsockname()[1], flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()

    import uvloop
    uvloop.run(main())
    return 0


def role_clients(args) -> int:
    """Open connections in batches on command: stdin "open K" -> opens K more, prints
    "opened TOTAL"; "close" -> closes all, prints "closed"; EOF -> exit."""
    raise_nofile(args.n + 64)
    socks: list[socket.socket] = []
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["open"]:
            batch = []
            for _ in range(int(words[1])):
                s = socket.create_connection(("127.0.0.1", args.port), timeout=30)
                s.sendall(b"hello\n")
                batch.append(s)
            for s in batch:             # the backend's reply came back through l4lb
                reply = b""
                while not reply.endswith(b"\n"):
                    data = s.recv(16)
                    if not data:
                        raise SystemExit("a connection closed before the reply")
                    reply += data
            socks.extend(batch)
            print("opened %d" % len(socks), flush=True)
        elif words[:1] == ["close"]:
            for s in socks:
                s.close()
            socks.clear()
            print("closed", flush=True)
    return 0


# --- the measurement ----------------------------------------------------------------------

def l4lb_config(backend_port: int, n: int) -> str:
    from l4lb.algorithms import ALGORITHMS
    algorithm = "leastconn" if "leastconn" in ALGORITHMS else "rr"
    return """# written by loadtests/idle_memory.py
[global]
max_connections = %d
shutdown_timeout = 2.0
workers = 1

[control]
socket = "l4lb.sock"

[log]
level = "warning"
format = "json"
access = false

[listeners.idle]
bind = ["127.0.0.1:0"]
pool = "hold"
max_connections = %d

[pools.hold]
algorithm = "%s"
backends = [
  { name = "b1", address = "127.0.0.1:%d" },
]
""" % (max(n + 100, 1000), max(n + 100, 1000), algorithm, backend_port)


def spawn(cmd, want_fds: int, **kw) -> subprocess.Popen:
    """Start `cmd` with RLIMIT_NOFILE raised to `want_fds` if the kernel lets us (as
    `prlimit --nofile` would); otherwise with the limits we have."""
    def preexec():
        raise_nofile(want_fds)
    return subprocess.Popen(cmd, preexec_fn=preexec, **kw)


def rss(pid: int) -> int:
    import psutil
    return psutil.Process(pid).memory_info().rss


def settled_rss(pid: int, tries: int = 20) -> int:
    """RSS once two readings 0.2 s apart agree within 16 KiB (the loop has gone idle)."""
    last = rss(pid)
    for _ in range(tries):
        time.sleep(0.2)
        now = rss(pid)
        if abs(now - last) <= 16 * 1024:
            return now
        last = now
    return last


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10000, help="idle connections (default 10000)")
    ap.add_argument("--steps", type=int, default=2, help="batches to open them in (default 2)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="open and close all N this many times (default 2): the later rounds "
                         "show whether memory kept after a close is reused or leaked")
    ap.add_argument("--role", choices=["backend", "clients"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "backend":
        return role_backend(args)
    if args.role == "clients":
        return role_clients(args)

    sys.path.insert(0, str(REPO))
    from l4lb.control.client import call

    want = 2 * args.n + L4LB_SPARE_FDS
    # What a child of ours can get: try raising the hard limit in a throwaway child.
    probe = subprocess.run([sys.executable, "-c", "import resource; print(resource.getrlimit("
                            "resource.RLIMIT_NOFILE)[1])"], preexec_fn=lambda: raise_nofile(want),
                           capture_output=True, text=True)
    hard = int(probe.stdout.strip())
    n = args.n
    if hard < want:
        n = (hard - L4LB_SPARE_FDS) // 2
        n -= n % args.steps
        print("note: l4lb's hard RLIMIT_NOFILE is %d and cannot be raised here (needs "
              "CAP_SYS_RESOURCE); %d connections need about %d descriptors, so measuring "
              "with N = %d" % (hard, args.n, want, n))
    work = Path(tempfile.mkdtemp(prefix="l4lb-idle-"))
    procs: list[subprocess.Popen] = []
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        backend = spawn([sys.executable, __file__, "--role", "backend", "-n", str(n)],
                        n + 64, stdout=subprocess.PIPE, text=True)
        procs.append(backend)
        backend_port = int(backend.stdout.readline().split()[1])

        (work / "l4lb.toml").write_text(l4lb_config(backend_port, n))
        lb = spawn([sys.executable, "-m", "l4lb", "run", "-c", str(work / "l4lb.toml")], want,
                   cwd=REPO, env=env, stdout=open(work / "l4lb.log", "wb"),
                   stderr=subprocess.STDOUT)
        procs.append(lb)
        sock = work / "l4lb.sock"
        deadline = time.monotonic() + 15
        while True:
            try:
                call(sock, "show listeners", timeout=2)
                break
            except Exception:
                if lb.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("l4lb did not start:\n" + (work / "l4lb.log").read_text())
                time.sleep(0.1)
        import psutil
        lb_proc = psutil.Process(lb.pid)
        port = next(c.laddr.port for c in lb_proc.net_connections("tcp")
                    if c.status == psutil.CONN_LISTEN)
        info = call(sock, "show info")
        # The connections live in the worker (one: `workers = 1`): measure its memory.
        worker_pid = call(sock, "show workers")["workers"][0]["pid"]
        print("l4lb master pid %d, worker pid %d, listening on %d; fd limit %s, fds needed "
              "for %d connections: %s" % (lb.pid, worker_pid, port, info.get("fd_limit"), n,
                                          info.get("fds_needed")))

        clients = spawn([sys.executable, __file__, "--role", "clients", "-n", str(n),
                         "--port", str(port)], n + 64, stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
        procs.append(clients)

        def clients_do(command: str) -> str:
            clients.stdin.write(command + "\n")
            clients.stdin.flush()
            line = clients.stdout.readline()
            if not line:
                raise SystemExit("the client process died (%s)" % clients.wait())
            return line.strip()

        def wait_active(expected: int) -> None:
            deadline = time.monotonic() + 60
            while call(sock, "show info")["conns_active"] != expected:
                if time.monotonic() > deadline:
                    raise SystemExit("conns_active stuck at %d, expected %d"
                                     % (call(sock, "show info")["conns_active"], expected))
                time.sleep(0.1)

        # warm-up: a few connections relayed and closed
        clients_do("open 20")
        wait_active(20)
        clients_do("close")
        wait_active(0)
        base = settled_rss(worker_pid)
        points = [(0, base)]
        print("\n%8s %10s %12s %14s" % ("conns", "RSS MiB", "KiB/conn", "batch KiB/conn"))
        print("%8d %10.1f %12s %14s" % (0, base / KIB / KIB, "-", "-"))
        batch = n // args.steps
        for _ in range(args.steps):
            opened = int(clients_do("open %d" % batch).split()[1])
            wait_active(opened)
            now = settled_rss(worker_pid)
            prev_n, prev_rss = points[-1]
            points.append((opened, now))
            print("%8d %10.1f %12.2f %14.2f" % (
                opened, now / KIB / KIB, (now - base) / KIB / opened,
                (now - prev_rss) / KIB / (opened - prev_n)), flush=True)
        info = call(sock, "show info")
        clients_do("close")
        wait_active(0)
        after = settled_rss(worker_pid)
        per_conn = (points[-1][1] - base) / KIB / n
        print("\nl4lb open fds at N: %s; RSS after closing them all: %.1f MiB (baseline %.1f)"
              % (info.get("open_fds"), after / KIB / KIB, base / KIB / KIB))
        for r in range(2, args.rounds + 1):
            clients_do("open %d" % n)
            wait_active(n)
            again = settled_rss(worker_pid)
            clients_do("close")
            wait_active(0)
            print("round %d: RSS with %d open %.1f MiB (round 1: %.1f), after closing %.1f MiB"
                  % (r, n, again / KIB / KIB, points[-1][1] / KIB / KIB,
                     settled_rss(worker_pid) / KIB / KIB))
        print("RESULT: %d idle connections through l4lb: %.2f KiB of RSS each "
              "(target: at most 10)" % (n, per_conn))
        return 0 if per_conn <= 10.0 else 1
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
