"""A log reader that stalls must not stall traffic (issue 20 item 2): l4lb writes its log
through a bounded non-blocking writer that drops, counts and reports what stderr did not
take."""
import json
import os
import select
import subprocess
import sys
import time

import pytest

from l4lb.control.client import call

from ..support import REPO, hello, name_handler, simple_config


def read_until(fd: int, buf: bytearray, marker: bytes, timeout: float) -> None:
    """Read `fd` into `buf` until `marker` appears in it."""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {marker!r} within {timeout}s; got:\n{bytes(buf[-2000:])!r}")
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            data = os.read(fd, 65536)
            if not data:
                raise RuntimeError(f"l4lb closed its log; got:\n{bytes(buf[-2000:])!r}")
            buf += data


@pytest.mark.timeout(120)
def test_connections_and_control_go_on_while_nobody_reads_the_log(tmp_path, backends):
    backend = backends(name_handler, name="b1")
    path = tmp_path / "l4lb.toml"
    # One worker: it writes the access lines, so one writer drops and reports.
    path.write_text(simple_config([("b1", backend.address)], access=True,
                                  global_extra="workers = 1"))
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "l4lb", "run", "-c", str(path)],
                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=write_fd,
                            stderr=write_fd)
    os.close(write_fd)
    try:
        log = bytearray()
        read_until(read_fd, log, b'"event": "started"', 15)
        port = next(json.loads(line)["port"] for line in log.splitlines()
                    if b'"listener_started"' in line)
        # From here on nobody reads the pipe: its 64 KiB fill up after a few hundred
        # access lines, and a blocking writer would stop the loop at about the 257th.
        for i in range(2000):
            assert hello(port) == "b1", f"connection {i} failed"
        info = call(tmp_path / "l4lb.sock", "show info", timeout=10)
        assert info["ok"] and info["conns_total"] == 2000
        assert info["log_lines_dropped"] > 0          # the worker's, summed by the master
        # Now read: the writer catches up and reports what it dropped, once.
        read_until(read_fd, log, b'"log_lines_dropped"', 30)
        events = [json.loads(line) for line in log.splitlines() if line.startswith(b"{")]
        [report] = [e for e in events if e["event"] == "log_lines_dropped"]
        closed = [e for e in events if e["event"] == "connection_closed"]
        assert report["count"] > 0 and report["count"] == report["total"]
        assert len(closed) + report["count"] >= 2000 - 50   # the last few may come later
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        os.close(read_fd)

