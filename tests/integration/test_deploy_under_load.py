"""loadtests/deploy_under_load.py cannot rot: a short rolling deploy under Locust load.

The whole scenario runs as a subprocess (it starts the echo backends, l4lb, Locust and
`l4lb deploy rolling`), shortened to a few seconds: 2 backends, 4 persistent users that
reconnect every ~20 requests, 1 s of load before and after. It must report 0 failed
requests, end with every request served by v2, and draw its chart.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from ..support import REPO

SCRIPT = REPO / "loadtests" / "deploy_under_load.py"


@pytest.mark.timeout(90)
def test_rolling_deploy_under_load_fails_no_request(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "rolling", "--backends", "2", "--users", "4",
           "--reconnect-every", "20", "--warmup", "1", "--cooldown", "1", "--startup", "0",
           "--drain-timeout", "10", "--results", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=80)
    out = proc.stdout + proc.stderr

    assert proc.returncode == 0, out[-3000:]
    m = re.search(r"^requests: (\d+)\s+failed: (\d+)", proc.stdout, re.M)
    assert m, out[-3000:]
    assert int(m.group(1)) > 0 and int(m.group(2)) == 0, out[-3000:]
    assert "connections drained" in out and "killed 0" in out, out[-3000:]   # no drain timed out

    (timeline,) = tmp_path.glob("deploy-rolling-*.jsonl")
    rows = [json.loads(line) for line in timeline.read_text().splitlines() if line.strip()]
    served = {}
    for r in rows:
        for version, n in r["versions"].items():
            served[version] = served.get(version, 0) + n
    assert set(served) == {"v1", "v2"}, served
    assert set(rows[-1]["versions"]) == {"v2"}, rows[-3:]   # after the deploy: v2 only
    (png,) = tmp_path.glob("deploy-rolling-*.png")
    assert png.stat().st_size > 10_000
