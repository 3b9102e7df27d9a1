"""Restarting l4lb under load (issue 16): what a client sees while the balancer on its port
is replaced.

The load is tests/churn.py in its own process (support.Churn): short connections at 500 a
second and 50 long echo streams, through l4lb (`workers = 2`) to a churn echo backend.

This module holds, for now, the negative control only: a naive stop-and-start, which the
zero-refusal restarts must beat. The positive tests (reload and upgrade under load, with no
refusal, reset, SYN retransmit or cut stream) are added by the main integrator.
"""
from __future__ import annotations

import pytest

from ..support import Churn, ChurnEcho, free_port, nstat_counters, simple_config

RATE, STREAMS = 500, 50
# Long enough for the stop (up to shutdown_timeout for the streams) and the start; the
# test stops the load itself once the new balancer has served.
DURATION = 30.0


@pytest.fixture
def echo():
    with ChurnEcho() as backend:
        yield backend


def restart_config(echo: ChurnEcho, port: int) -> str:
    """One listener on the fixed `port` (so a second balancer binds the same one) over the
    echo backend. No access log: 500 lines a second would load the machine the test
    measures on."""
    return simple_config([("echo", echo.address)], bind=f"127.0.0.1:{port}", access=False)


@pytest.mark.timeout(120)
def test_naive_stop_and_start_under_load_refuses_or_cuts_connections(tmp_path, l4lb, echo):
    port = free_port()
    config = restart_config(echo, port)
    first = l4lb(config)
    before = nstat_counters()
    with Churn(port, tmp_path / "churn.json", rate=RATE, streams=STREAMS,
               duration=DURATION) as churn:
        churn.wait_running()
        warm = churn.wait_ok(RATE)          # a second of load through the first one
        # The instrument: a running balancer fails nothing (else the failures below
        # would prove nothing about the restart).
        assert warm["failures"] == warm["stream_failures"] == 0, churn.lines[-5:]
        # The naive restart: SIGTERM, wait for the exit, start a fresh one. Between the
        # listener's close and the new bind nothing listens: connects are refused there,
        # and the streams are cut when the old one's shutdown_timeout ends them.
        first.stop()
        assert first.proc.returncode == 0, "".join(first.raw[-20:])
        l4lb(config)
        served = churn.progress.get("ok", 0)
        churn.wait_ok(served + RATE, timeout=20)     # the new balancer serves the load
        result = churn.stop()
    after = nstat_counters()
    drops = {k: after[k] - before[k] for k in after}
    print("churn result:", result, "listen drops:", drops)

    assert result["ok"] > 0 and result["rate_achieved"] > 0.8 * RATE, result
    failures = result["refused"] + result["reset"] + result["stream_failures"]
    assert failures > 0, (result, drops)
