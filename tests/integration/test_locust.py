"""The Locust load tests cannot rot: a few-second headless run of each user class.

Locust runs as a subprocess (importing it here would monkeypatch this process with
gevent), against l4lb in front of two loadtests/echo_server.py backends tagged b1 and b2.
"""
from __future__ import annotations

import csv
import re
import json
import subprocess
import sys

import pytest

from ..support import REPO, simple_config

LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
ECHO_SERVER = REPO / "loadtests" / "echo_server.py"
RUN_SECONDS = 3


@pytest.fixture
def echo_servers():
    """echo_servers(*names) starts one tagged line-echo backend per name; returns their
    addresses. Every process is stopped after the test."""
    procs = []

    def start(*names):
        addresses = []
        for name in names:
            p = subprocess.Popen([sys.executable, str(ECHO_SERVER), "--port", "0", "--name", name],
                                 stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
            procs.append(p)
            line = p.stdout.readline()   # "listening 127.0.0.1:PORT", or "" if it died
            assert line.startswith("listening "), f"echo server {name} did not start: {line!r}"
            addresses.append(line.split()[1])
        return addresses

    yield start
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def run_locust(user_class: str, port: int, tmp_path) -> tuple[subprocess.CompletedProcess, dict, list]:
    """A headless Locust run; returns (process, aggregated CSV row, timeline rows)."""
    prefix = tmp_path / user_class
    timeline = tmp_path / f"{user_class}-timeline.jsonl"
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), user_class,
           "-H", f"127.0.0.1:{port}", "--headless", "-u", "4", "-r", "4",
           "-t", f"{RUN_SECONDS}s", "--only-summary", "--csv", str(prefix),
           "--exit-code-on-error", "1", "--timeline", str(timeline), "--tcp-timeout", "2"]
    # cwd = tmp_path: no locust.conf or other locustfile from the machine is picked up
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                          timeout=RUN_SECONDS + 25)
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    lines = [json.loads(line) for line in timeline.read_text().splitlines() if line.strip()]
    return proc, rows["Aggregated"], lines


@pytest.mark.timeout(60)
@pytest.mark.parametrize("user_class", ["PersistentUser", "ConnectionPerRequestUser"])
def test_locust_user_runs_through_l4lb_without_failures(user_class, l4lb, echo_servers, tmp_path):
    b1, b2 = echo_servers("b1", "b2")
    lb = l4lb(simple_config([("b1", b1), ("b2", b2)], access=False))

    proc, total, timeline = run_locust(user_class, lb.port(), tmp_path)

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0, proc.stderr[-2000:]
    # The CSV is rewritten once the run is over (Locust alone leaves out the last second:
    # locust issues #1806, #2299), so it, the summary and the timeline count the same
    # requests; and both tagged backends answered some.
    assert sum(s["requests"] for s in timeline) == int(total["Request Count"])
    summary = re.search(r"^\s+Aggregated\s+(\d+)\s", proc.stdout + proc.stderr, re.M)
    assert summary and int(summary.group(1)) == int(total["Request Count"])
    assert sum(s["failures"] for s in timeline) == 0
    served = {}
    for s in timeline:
        for version, n in s["versions"].items():
            served[version] = served.get(version, 0) + n
    assert set(served) == {"b1", "b2"}, served


@pytest.mark.timeout(60)
def test_locust_reports_loopback_latencies_in_microseconds(l4lb, echo_servers, tmp_path):
    """Locust keeps whole numbers: a 0.3 ms request was 0 ms in every table. The times are
    reported in µs by default, and the request names say so."""
    (b1,) = echo_servers("b1")
    lb = l4lb(simple_config([("b1", b1)], access=False))

    proc, total, _ = run_locust("PersistentUser", lb.port(), tmp_path)

    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(tmp_path / "PersistentUser_stats.csv", newline="") as f:
        names = [row["Name"] for row in csv.DictReader(f)]
    assert names == ["line [us]", "Aggregated"]
    assert float(total["Min Response Time"]) >= 1.0        # no loopback request takes < 1 µs
    assert int(total["50%"]) > 0


def test_locustfile_help_lists_its_own_options():
    """`locust -f FILE --help` prints before it imports FILE; running the locustfile as a
    script prints Locust's help with the l4lb options in it."""
    proc = subprocess.run([sys.executable, str(LOCUSTFILE), "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--tcp-timeout", "--tcp-reconnect-every", "--tcp-source-addresses",
                 "--timeline", "--tcp-time-unit", "--headless"):
        assert flag in proc.stdout, flag
