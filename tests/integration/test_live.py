"""The live view against a real balancer carrying a known load: `subscribe` on the control
socket, GET /status.json and the status page (in headless Chromium), and `l4lb top` in
tmux (send-keys, capture-pane), issue 19.

The load is a set of client connections held open through the balancer (echoing) plus
some that came and went, so every figure the views show has a count known to the client.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import jsonschema
import pytest

from ..support import (REPO, ask, connect, echo_handler, free_port_refused, recv_exactly,
                       simple_config, wait_until)

SCHEMA = json.loads((REPO / "docs" / "status.schema.json").read_text())
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Short connections that came and went, and connections held open, by the known load.
GONE = 5
HELD = 4


def live_config(backends) -> str:
    return simple_config(backends) + '\n[metrics]\nlisten = "127.0.0.1:0"\n'


class Load:
    """HELD echoing connections held open through the balancer, after GONE that closed."""

    def __init__(self, lb, gone: int = GONE, held: int = HELD):
        self.lb = lb
        for _ in range(gone):
            self.echo(connect(lb.port())).close()
        self.held = [self.echo(connect(lb.port())) for _ in range(held)]
        self.total = gone + held
        wait_until(lambda: ask(lb, "show info")["conns_active"] == held
                   and sum(b["total"] for b in ask(lb, "show backends")["backends"]) == self.total,
                   what="the balancer to count the load")

    @staticmethod
    def echo(s: socket.socket) -> socket.socket:
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
        return s

    def held_on(self, backend: str) -> list[socket.socket]:
        """The held client sockets whose connection went to `backend`."""
        ports = {int(c["client"].rsplit(":", 1)[1]) for c in ask(self.lb, "show conns")["conns"]
                 if c["backend"] == backend}
        return [s for s in self.held if s.getsockname()[1] in ports]

    def close(self):
        for s in self.held:
            s.close()


@pytest.fixture
def loaded(l4lb, backends):
    b1 = backends(echo_handler, "app1")
    b2 = backends(echo_handler, "app2")
    lb = l4lb(live_config([("app1", b1.address), ("app2", b2.address)]))
    load = Load(lb)
    yield lb, load, {"app1": b1, "app2": b2}
    load.close()


class Subscriber:
    """A raw `subscribe` connection read line by line."""

    def __init__(self, lb, line: str = "subscribe 0.2"):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(lb.path.parent / "l4lb.sock"))
        self.sock.sendall(line.encode() + b"\n")
        self.buf = b""

    def frame(self) -> dict:
        while b"\n" not in self.buf:
            data = self.sock.recv(65536)
            assert data, "the balancer closed the subscription"
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self):
        self.sock.close()


def totals(frame: dict) -> tuple[int, int]:
    return (sum(b["active"] for b in frame["backends"]),
            sum(b["total"] for b in frame["backends"]))


def test_subscribe_streams_frames_with_the_load_and_rates_and_other_clients_are_served(loaded):
    lb, load, servers = loaded
    sub = Subscriber(lb)
    try:
        first = sub.frame()
        assert first["ok"] is True and first["interval"] is None
        jsonschema.validate(first, SCHEMA)
        # another client is answered while the subscription streams
        assert ask(lb, "show info")["conns_active"] == HELD
        frames = [sub.frame() for _ in range(3)]
    finally:
        sub.close()
    for f in frames:
        jsonschema.validate(f, SCHEMA)
        assert f["interval"] is not None and f["interval"] > 0
        assert totals(f) == (HELD, load.total)
    assert [f["ts"] for f in frames] == sorted(f["ts"] for f in frames)
    last = frames[-1]
    shown = {b["name"]: b for b in ask(lb, "show backends")["backends"]}
    for b in last["backends"]:
        assert b["total"] == shown[b["name"]]["total"] == servers[b["name"]].accepted
        assert b["rates"]["new_s"] == 0.0                    # the load has stopped
    assert len(last["workers"]) == 2                              # support.TEST_WORKERS
    assert sum(w["active"] for w in last["workers"]) == HELD
    assert sum(w["accepted"] for w in last["workers"]) == load.total
    assert last["listeners"][0]["accepted"] == load.total
    assert last["pools"] == [{"name": "main", "algorithm": "rr", "backends": 2, "queue": 0,
                              "queue_timeouts": 0, "retries": 0}]


def test_subscribe_refuses_an_interval_below_the_minimum_and_the_connection_goes_on(loaded):
    lb, _, _ = loaded
    sub = Subscriber(lb, "subscribe 0.001")
    try:
        reply = sub.frame()
        assert reply == {"ok": False, "error": "INTERVAL must be at least 0.05 s, got 0.001"}
        sub.sock.sendall(b"show info\n")
        assert sub.frame()["ok"] is True
    finally:
        sub.close()


def test_a_subscriber_that_reads_nothing_is_dropped_and_the_balancer_serves_on(l4lb, backends):
    # Large frames (80 backends) fill the unread buffer within a few intervals.
    refused = f"127.0.0.1:{free_port_refused()}"
    lb = l4lb(simple_config([(f"b{i}", refused) for i in range(80)]))
    sub = Subscriber(lb, "subscribe 0.05")
    try:
        ev = lb.wait_event("subscriber_dropped", timeout=60)
        assert ev["skipped"] == 10 and ev["interval"] == 0.05
        assert ask(lb, "show info")["ok"] is True
        # the dropped client reads what was buffered, then the end of the connection
        sub.sock.settimeout(10)
        while sub.sock.recv(1 << 20):
            pass
    finally:
        sub.close()


def metrics_port(lb) -> int:
    return lb.wait_event("metrics_started")["port"]


def get(port: int, path: str, method: str = "GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read()


def test_status_json_validates_and_the_page_is_readable_without_javascript(loaded):
    lb, load, _ = loaded
    port = metrics_port(lb)
    status, ctype, body = get(port, "/status.json")
    assert status == 200 and ctype == "application/json"
    snap = json.loads(body)
    jsonschema.validate(snap, SCHEMA)
    assert totals(snap) == (HELD, load.total)
    status, ctype, page = get(port, "/")
    assert status == 200 and ctype == "text/html; charset=utf-8"
    html = page.decode()
    # the server-rendered first view holds each backend's row with its figures
    for b in ask(lb, "show backends")["backends"]:
        row = html.split(f'id="backend:main/{b["name"]}"', 1)[1].split("</tr>", 1)[0]
        assert f'<td class="c-active num">{b["active"]}</td>' in row
        assert f'<td class="c-total num">{b["total"]}</td>' in row
    assert get(port, "/", "HEAD")[2] == b""
    assert b"l4lb_backend_up" in get(port, "/metrics")[2]       # /metrics unchanged


# --- the status page in headless Chromium ------------------------------------------------

def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (apt-get install chromium)")
def test_status_page_in_headless_chromium_updates_from_status_json(loaded, tmp_path):
    lb, load, _ = loaded
    port = metrics_port(lb)
    url = f"http://127.0.0.1:{port}/"
    # Virtual time runs the page's polls within milliseconds, which reuse the rates of
    # the page's last sample (l4lb.live.MIN_RATE_INTERVAL): have one with rates first.
    wait_until(lambda: json.loads(get(port, "/status.json")[2])["backends"][0]["rates"],
               what="rates in /status.json")
    # --virtual-time-budget: the page's script runs (fetches /status.json, redraws) first
    dom = chromium(tmp_path, "--virtual-time-budget=4000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'id="updated">updated ' in html, html[:3000]    # redrawn by the script
    shown = ask(lb, "show backends")["backends"]
    assert sum(b["active"] for b in shown) == HELD
    for b in shown:
        row = html.split(f'id="backend:main/{b["name"]}"', 1)[1].split("</tr>", 1)[0]
        assert f'<td class="c-active num">{b["active"]}</td>' in row, row
        assert f'<td class="c-total num">{b["total"]}</td>' in row, row
        assert '<td class="c-new num">0</td>' in row, row         # rates came from the script
    shot = tmp_path / "status.png"
    run = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,720",
                   "--virtual-time-budget=3000", url)
    assert run.returncode == 0, run.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


# --- l4lb top in tmux ----------------------------------------------------------------------

class Tmux:
    """One tmux server of its own (-L) running `l4lb top` in a detached session."""

    def __init__(self, tmp_path, command: list[str], width: int, height: int):
        self.server = f"l4lb-top-{os.getpid()}-{time.monotonic_ns()}"
        self.env = dict(os.environ, TERM="xterm-256color")
        self.run("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height),
                 " ".join(command))

    def run(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.server, *args], capture_output=True,
                              text=True, timeout=20, env=self.env, check=check)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top", check=False).stdout

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "top", *keys)

    def alive(self) -> bool:
        return self.run("has-session", "-t", "top", check=False).returncode == 0

    def kill(self) -> None:
        self.run("kill-server", check=False)


def rows(screen: str) -> dict[str, dict[str, str]]:
    """The backend rows of a top screen: {backend: {HEADING: cell}}."""
    lines = screen.splitlines()
    head = next((line for line in lines if "BACKEND" in line and "ACTIVE" in line), None)
    if head is None:
        return {}
    names = head.split()
    out = {}
    for line in lines:
        if not line.startswith((">   ", "    ")):
            continue
        cells = line[1:].split()
        if len(cells) >= len(names) - 1:
            out[cells[0]] = dict(zip(names, cells))
    return out


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_top_in_tmux_shows_the_load_and_a_key_press_drains_the_selected_backend(loaded, tmp_path):
    lb, load, servers = loaded
    sock = lb.path.parent / "l4lb.sock"
    tmux = Tmux(tmp_path, [sys.executable, "-m", "l4lb", "top", "-s", str(sock)], 120, 30)
    try:
        # rows appear, and once the load has stopped its figures are the client's counts
        shown = wait_until(lambda: (r := rows(tmux.screen())) and len(r) == 2 and r,
                           timeout=20, what="both backend rows on the screen")
        assert set(shown) == {"app1", "app2"}
        screen = wait_until(
            lambda: (r := rows(tmux.screen())) and all(
                r[n]["ACTIVE"] == str(len(load.held_on(n)))
                and r[n]["TOTAL"] == str(servers[n].accepted) for n in ("app1", "app2")) and r,
            timeout=20, what="the load's counts on the screen")
        assert sum(int(r["ACTIVE"]) for r in screen.values()) == HELD
        assert sum(int(r["TOTAL"]) for r in screen.values()) == load.total
        # app1 is selected (first by name); d asks, y drains it
        assert ">   app1" in tmux.screen()
        tmux.keys("d")
        wait_until(lambda: "drain main/app1? [y/N]" in tmux.screen(), timeout=20,
                   what="the confirmation")
        assert ask(lb, "show backends main")["backends"][0]["state"] == "up"   # not yet
        tmux.keys("y")
        wait_until(lambda: ask(lb, "show backends main")["backends"][0]["state"] == "draining",
                   timeout=20, what="app1 draining")
        on_app1 = load.held_on("app1")
        assert on_app1, "rr spreads the held connections over both backends"
        wait_until(lambda: f"main/app1  remaining {len(on_app1)}" in tmux.screen(),
                   timeout=20, what="the drain pane")
        # the drain's remaining connections fall to 0 as the clients close
        for n, s in enumerate(on_app1, 1):
            s.close()
            load.held.remove(s)
            left = len(on_app1) - n
            wait_until(lambda: f"main/app1  remaining {left}" in tmux.screen(), timeout=20,
                       what=f"remaining {left}")
        assert "ETA done" in tmux.screen()
        # 80x24: still every row, nothing wider than the screen
        tmux.run("resize-window", "-t", "top", "-x", "80", "-y", "24")
        small = wait_until(lambda: (s := tmux.screen()) and len(s.splitlines()) <= 24
                           and max(map(len, s.splitlines())) <= 80
                           and {"app1", "app2"} <= set(rows(s)) and s,
                           timeout=20, what="the 80x24 screen")
        assert "draining" in rows(small)["app1"]["ADMIN"]
        tmux.keys("q")
        wait_until(lambda: not tmux.alive(), timeout=20, what="top to quit on q")
    finally:
        tmux.kill()


def test_top_once_prints_one_frame_for_scripts(loaded):
    lb, load, servers = loaded
    out = subprocess.run([sys.executable, "-m", "l4lb", "top", "--once", "-s",
                          str(lb.path.parent / "l4lb.sock")], capture_output=True, text=True,
                         timeout=30, cwd=REPO, env=dict(os.environ, COLUMNS="120"))
    assert out.returncode == 0, out.stderr
    shown = rows(out.stdout)
    assert set(shown) == {"app1", "app2"}
    for name, row in shown.items():
        assert row["TOTAL"] == str(servers[name].accepted)
        assert row["NEW/S"] == "-"                        # one frame: no rates
    assert sum(int(r["ACTIVE"]) for r in shown.values()) == HELD


def test_top_without_a_balancer_says_so_and_exits_1(tmp_path):
    out = subprocess.run([sys.executable, "-m", "l4lb", "top", "--once", "-s",
                          str(tmp_path / "none.sock")], capture_output=True, text=True,
                         timeout=30, cwd=REPO)
    assert out.returncode == 1
    assert "no control socket" in out.stderr
