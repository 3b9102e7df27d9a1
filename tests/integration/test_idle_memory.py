"""loadtests/idle_memory.py cannot rot, and idle connections stay cheap.

A small run (1,000 connections, one round) as a subprocess: every connection relays bytes
both ways and is then held idle; l4lb's RSS per connection must stay within issue 6's
10 KiB (measured about 3.3 KiB at 10,000; at 1,000 an allocator step of 1 MiB is 1 KiB).
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from ..support import REPO

SCRIPT = REPO / "loadtests" / "idle_memory.py"


@pytest.mark.timeout(90)
def test_idle_connections_cost_at_most_10_kib_each(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "-n", "1000", "--rounds", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=80)
    out = proc.stdout + proc.stderr
    m = re.search(r"RESULT: (\d+) idle connections through l4lb: ([\d.]+) KiB", proc.stdout)
    assert m, out[-3000:]
    assert int(m.group(1)) == 1000
    assert float(m.group(2)) <= 10.0, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
