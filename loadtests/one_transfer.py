#!/usr/bin/env python3
"""One bulk transfer through l4lb: N MiB (default 1024) from a client to a sink backend,
with the throughput and l4lb's CPU per GB. Not a benchmark suite (see bench.py), just
the figure a user asks first: "how fast does one big copy go through it?"

    python loadtests/one_transfer.py [--mib 1024]

Starts its own sink backend and `python -m l4lb run` (access log off) on 127.0.0.1 and
stops both at the end.
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    args = ap.parse_args()

    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(8)
    received = []

    def drain():
        conn, _ = sink.accept()
        n = 0
        while data := conn.recv(1 << 20):
            n += len(data)
        received.append(n)
        conn.close()

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    tmp = Path(tempfile.mkdtemp(prefix="l4lb-transfer-"))
    cfg = tmp / "l4lb.toml"
    cfg.write_text(f"""
[log]
level = "info"
access = false
[listeners.web]
bind = ["127.0.0.1:0"]
pool = "p"
[pools.p]
algorithm = "rr"
backends = [{{ name = "sink", address = "127.0.0.1:{sink.getsockname()[1]}" }}]
""")
    proc = subprocess.Popen([sys.executable, "-m", "l4lb", "run", "-c", str(cfg)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        port = None
        for line in proc.stderr:
            ev = json.loads(line) if line.startswith("{") else {}
            if ev.get("event") == "listener_started":
                port = ev["port"]
                break
        if port is None:
            raise SystemExit("l4lb did not start")
        threading.Thread(target=proc.stderr.read, daemon=True).start()   # keep the pipe drained
        ps = psutil.Process(proc.pid)
        chunk = os.urandom(1 << 20)
        c = socket.create_connection(("127.0.0.1", port))
        cpu0 = sum(ps.cpu_times()[:2])
        t0 = time.perf_counter()
        for _ in range(args.mib):
            c.sendall(chunk)
        c.shutdown(socket.SHUT_WR)
        t.join(120)
        elapsed = time.perf_counter() - t0
        cpu = sum(ps.cpu_times()[:2]) - cpu0
        c.close()
        total = args.mib << 20
        assert received == [total], (received, total)
        gb = total / 1e9
        print(f"{args.mib} MiB through l4lb: "
              f"{elapsed:.2f} s, {total * 8 / elapsed / 1e9:.2f} Gbit/s, "
              f"l4lb CPU {cpu:.2f} s = {cpu / gb:.3f} CPU-s per GB")
    finally:
        proc.terminate()
        proc.wait(10)
        sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
