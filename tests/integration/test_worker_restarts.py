"""loadtests/worker_restarts.py cannot rot: a small run as a subprocess (2 workers, 300
short connections, 2 kills). Only what it counts is checked, never a time (STYLE.md):
every connection is answered and accepted by some worker, and each killed worker is back."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ..support import REPO

SCRIPT = REPO / "loadtests" / "worker_restarts.py"


@pytest.mark.timeout(120)
def test_worker_restarts_script_counts_accepts_and_restarts(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workers", "2", "--conns", "300",
                           "--concurrency", "4", "--kills", "2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=110)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    m = re.search(r"300 short connections in [\d.]+ s \((\d+) failed\), "
                  r"accepted per worker 0: (\d+), 1: (\d+)", proc.stdout)
    assert m, out[-3000:]
    assert int(m.group(1)) == 0
    assert int(m.group(2)) + int(m.group(3)) == 300
    assert "worker_exited -> worker_started, ms: median" in proc.stdout
    assert "(n = 2)" in proc.stdout
    assert "worker 0 restarts 1 live True, worker 1 restarts 1 live True" in proc.stdout
