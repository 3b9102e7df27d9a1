"""Draw the README's two live-view pictures from a real balancer under load:
docs/img/live-top.png (`l4lb top` at 80x24 during a drain) and docs/img/live-status.png
(the status page in headless Chromium).

    python loadtests/live_screenshots.py [--out docs/img] [--seconds 8]

Starts three echo backends (threads) and `l4lb run` with [metrics] on, a load of short
connections and some held open, drains one backend while its held connections close one
by one, and meanwhile feeds `subscribe` frames to l4lb.top.TopView. The top picture is
rich's SVG export of that view rendered by Chromium; needs Debian's chromium.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from rich.console import Console

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from l4lb.control.client import call  # noqa: E402
from l4lb.top import Subscription, TopView  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def echo_backend() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)

    def serve(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    return srv


def chromium(profile: Path, *args: str) -> None:
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", *args],
                   check=True, capture_output=True, timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img")
    ap.add_argument("--seconds", type=float, default=12.0)
    args = ap.parse_args()
    backends = [echo_backend() for _ in range(5)]
    with tempfile.TemporaryDirectory(prefix="l4lb-shots-") as tmp:
        tmp = Path(tmp)
        rows = ",\n".join(f'  {{ name = "app{i + 1}", address = "127.0.0.1:{b.getsockname()[1]}" }}'
                          for i, b in enumerate(backends[:3]))
        api = ",\n".join(f'  {{ name = "api{i + 1}", address = "127.0.0.1:{b.getsockname()[1]}", '
                         f'weight = {10 * (i + 1)} }}' for i, b in enumerate(backends[3:]))
        (tmp / "l4lb.toml").write_text(f"""
[global]
shutdown_timeout = 1.0
[control]
socket = "l4lb.sock"
[log]
access = false
[metrics]
listen = "127.0.0.1:0"
[listeners.web]
bind = ["127.0.0.1:0"]
pool = "web"
[listeners.api]
bind = ["127.0.0.1:0"]
pool = "api"
[pools.web]
algorithm = "leastconn"
backends = [
{rows}
]
[pools.api]
backends = [
{api}
]
""")
        lb = subprocess.Popen([sys.executable, "-m", "l4lb", "run", "-c", str(tmp / "l4lb.toml")],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ports = {}
        for line in lb.stdout:
            ev = json.loads(line)
            if ev["event"] in ("listener_started", "metrics_started"):
                ports[ev.get("listener", "metrics")] = ev["port"]
            if ev["event"] == "started":
                break
        threading.Thread(target=lambda: [None for _ in lb.stdout], daemon=True).start()
        sock = tmp / "l4lb.sock"
        stop = threading.Event()

        def short_connections(listener, size):
            while not stop.is_set():
                s = socket.create_connection(("127.0.0.1", ports[listener]))
                s.sendall(random.randbytes(random.randint(1000, size)))
                s.shutdown(socket.SHUT_WR)
                while s.recv(1 << 20):
                    pass
                s.close()
                time.sleep(random.uniform(0.01, 0.05))
        held = []
        try:
            for _ in range(12):
                s = socket.create_connection(("127.0.0.1", ports["web"]))
                s.sendall(b"hello")
                s.recv(5)
                held.append(s)
            loaders = [threading.Thread(target=short_connections, args=load, daemon=True)
                       for load in (("web", 200_000), ("web", 200_000), ("api", 20_000))]
            for t in loaders:
                t.start()
            view = TopView()
            sub = Subscription(sock, 0.5)
            started = time.monotonic()
            drained = False
            on_app2 = []
            while time.monotonic() - started < args.seconds:
                for frame in sub.frames():
                    view.add_frame(frame)
                if not drained and time.monotonic() - started > args.seconds / 3:
                    conns = call(sock, "show conns web/app2")["conns"]
                    ports_app2 = {int(c["client"].rsplit(":", 1)[1]) for c in conns}
                    on_app2 = [s for s in held if s.getsockname()[1] in ports_app2]
                    call(sock, "drain web/app2")
                    drained = True
                    closed_at = time.monotonic()
                elif drained and len(on_app2) > 1 and time.monotonic() - closed_at > 1.5:
                    on_app2.pop().close()             # the drain goes on: one closes at a time
                    closed_at = time.monotonic()
                time.sleep(0.05)
            page = f"http://127.0.0.1:{ports['metrics']}/"
            for _ in range(2):                        # two samples: the page has rates
                urllib.request.urlopen(page + "status.json").read()
                time.sleep(0.6)
            args.out.mkdir(parents=True, exist_ok=True)
            chromium(tmp / "profile", f"--screenshot={args.out / 'live-status.png'}",
                     "--window-size=1280,640", "--virtual-time-budget=8000", page)
            console = Console(width=80, height=24, record=True, file=open("/dev/null", "w"),
                              color_system="truecolor", force_terminal=True)
            console.print(view.render(80, 24))
            svg = tmp / "top.svg"
            svg.write_text(console.export_svg(title="l4lb top"))
            html = tmp / "top.html"
            html.write_text("<html><body style='margin:0;background:#fff'>"
                            f"<img src='{svg.name}' style='width:980px'></body></html>")
            chromium(tmp / "profile", f"--screenshot={args.out / 'live-top.png'}",
                     "--window-size=980,430", html.as_uri())
            sub.close()
        finally:
            stop.set()
            for s in held:
                s.close()
            lb.terminate()
            lb.wait(10)
    print(f"wrote {args.out / 'live-top.png'} and {args.out / 'live-status.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
