"""`l4lb demo`, the README's first command, end to end: three apps in turn, a clean
Ctrl-C, and no descriptor warning on an ordinary open-file limit."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ..support import REPO, free_port_refused


def free_port_run(n: int) -> int:
    """A port p with p..p+n-1 all free on loopback (the demo's backends take a run).
    Free as the demo sees it: it binds with SO_REUSEADDR (asyncio's default), so a port
    that only TIME_WAIT connections use counts as free — after a full suite, runs of
    ports without any are rare."""
    for _ in range(50):
        base = free_port_refused()
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    pytest.skip("no run of free ports")


@pytest.mark.timeout(60)
def test_demo_serves_each_app_in_turn_and_stops_on_ctrl_c():
    port, backend_port = free_port_refused(), free_port_run(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "l4lb", "demo", "--port", str(port),
         "--backend-port", str(backend_port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        replies = []
        while len(replies) < 3:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"hello\n")
                    replies.append(s.makefile("rb").readline().decode())
            except OSError:
                assert time.monotonic() < deadline, "the demo never listened"
                time.sleep(0.1)
        assert sorted(replies) == ["app1: hello\n", "app2: hello\n", "app3: hello\n"]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert "fd_limit_low" not in out
    assert f"127.0.0.1:{port}" in out
