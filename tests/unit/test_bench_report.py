"""loadtests/bench.py's report from harness results: ratios, the targets, and where the CPU
of a bulk run goes on each core (`--chart-only`, no proxy is run)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

from ..support import REPO

SCRIPT = REPO / "loadtests" / "bench.py"


def bulk8(proxy, rep, gbps, proxy_cpu_s, load_busy_pct, wall=5.0):
    gb = gbps * wall / 8
    return {"mode": "pinned", "proxy": proxy, "rep": rep, "workload": "bulk8", "noisy": False,
            "gbps": gbps, "bytes": int(gb * 1e9), "wall_s": wall, "proxy_cpu_s": proxy_cpu_s,
            "cpu_s_per_gb": proxy_cpu_s / gb, "cpu_busy_pct": {"0": 50.0, "1": load_busy_pct}}


def test_chart_only_reports_the_cpu_per_gb_of_both_cores(tmp_path):
    records = [
        bulk8("haproxy", 1, 8.0, 4.0, 100.0),          # 5 GB: 0.8 proxy, 1.0 load per GB
        bulk8("haproxy-tuned", 1, 16.0, 4.0, 100.0),   # 10 GB: 0.4 and 0.5
        bulk8("haproxy-splice", 1, 16.0, 2.5, 100.0),  # 0.25 and 0.5
        bulk8("l4lb", 1, 16.0, 2.0, 100.0),            # 0.2 and 0.5
        bulk8("l4lb", 2, 8.0, 1.0, 50.0),              # 0.2 and 0.5 again (load half idle)
        dict(bulk8("l4lb", 3, 1.0, 9.0, 100.0), error="proxy died"),   # left out
    ]
    results = tmp_path / "bench-x.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--chart-only", str(results)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "| haproxy | 8.00 | 0.800 | 1.000 | 1.800 |" in out
    assert "| haproxy-tuned | 16.00 | 0.400 | 0.500 | 0.900 |" in out
    assert "| l4lb | 12.00 | 0.200 | 0.500 | 0.700 |" in out
    # and the targets: 16/16 = 1.0x haproxy-tuned's Gbit/s (median of 16 and 8 = 12: 0.75)
    assert "| bulk8 Gbit/s >= 1.0x haproxy-tuned | 0.75 | **no** |" in out
    assert "| bulk8 CPU per GB <= 0.7x haproxy-splice | 0.80 | **no** |" in out
    # rep 1: 1.0x the Gbit/s but 0.8x the CPU; rep 2 has no reference rep: not counted
    assert "| both bulk8 targets in the same rep | 1 | 0 | - | - | - |" in out
    assert (tmp_path / "bench-x.png").stat().st_size > 10_000
    assert (tmp_path / "bench-x-bulk8.png").stat().st_size > 10_000


def close(proxy, rep, rps):
    return {"mode": "pinned", "proxy": proxy, "rep": rep, "workload": "close", "noisy": False,
            "rps": rps, "cpu_s_per_100k": 7.0}


def test_rep_by_rep_ratios_pair_reps_within_a_run_only(tmp_path):
    first = tmp_path / "bench-a.jsonl"
    second = tmp_path / "bench-b.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in [
        close("haproxy", 1, 100.0), close("l4lb", 1, 110.0),          # 1.10
        close("haproxy", 2, 100.0), dict(close("l4lb", 2, 300.0), noisy=True)]))  # left out
    second.write_text("".join(json.dumps(r) + "\n" for r in [
        close("haproxy", 1, 200.0), close("l4lb", 1, 180.0)]))        # 0.90
    proc = subprocess.run([sys.executable, str(SCRIPT), "--chart-only", str(first), str(second)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| new connections/s >= 1.0x haproxy | 2 | 1 | 0.90 | 1.00 | 1.10 |" in proc.stdout


def test_both_bulk8_targets_are_counted_only_when_one_rep_meets_both(tmp_path):
    records = []
    # (Gbit/s, CPU-s) of l4lb against haproxy-tuned at 16 Gbit/s and haproxy-splice at
    # 0.25 CPU-s/GB: rep 1 meets both, rep 2 only the Gbit/s, rep 3 only the CPU.
    for rep, gbps, cpu in ((1, 16.0, 1.5), (2, 17.0, 3.0), (3, 12.0, 1.0)):
        records += [bulk8("haproxy", rep, 8.0, 4.0, 100.0),
                    bulk8("haproxy-tuned", rep, 16.0, 4.0, 100.0),
                    bulk8("haproxy-splice", rep, 16.0, 2.5, 100.0),
                    bulk8("l4lb", rep, gbps, cpu, 100.0)]
    results = tmp_path / "bench-y.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--chart-only", str(results)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| bulk8 Gbit/s >= 1.0x haproxy-tuned | 3 | 2 |" in proc.stdout
    assert "| bulk8 CPU per GB <= 0.7x haproxy-splice | 3 | 2 |" in proc.stdout
    assert "| both bulk8 targets in the same rep | 3 | 1 | - | - | - |" in proc.stdout


def unpinned(proxy, rep, wl, rps, cpu_s_per_100k, noisy=False):
    return {"mode": "unpinned", "proxy": proxy, "rep": rep, "workload": wl, "noisy": noisy,
            "rps": rps, "cpu_s_per_100k": cpu_s_per_100k, "proxy_cpu_pct": 150.0}


def test_workers_report_checks_l4lb_against_haproxy_and_against_one_worker(tmp_path):
    records = []
    # (conn/s, CPU-s/100k conn, ka req/s, CPU-s/100k ka) per proxy, the same in both reps
    figures = {"haproxy": (10000.0, 8.0, 50000.0, 2.0), "nginx": (11000.0, 7.0, 45000.0, 2.2),
               "l4lb-2w": (12000.0, 6.0, 55000.0, 2.1), "l4lb-1w": (9000.0, 5.0, 60000.0, 1.9)}
    for rep in (1, 2):
        for proxy, (conn, conn_cpu, ka, ka_cpu) in figures.items():
            records += [unpinned(proxy, rep, "close", conn, conn_cpu),
                        unpinned(proxy, rep, "ka", ka, ka_cpu)]
    records.append(unpinned("l4lb-2w", 3, "close", 1.0, 99.0, noisy=True))   # left out
    results = tmp_path / "bench-w.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--chart-only", str(results)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert ("| l4lb-2w | 12000 | 55000 | 6.00 | 2.10 | 150 | 150 | 1.20 | 1.10 | 0.75 | 1.05 |"
            in out)
    assert "| conn/s >= 1.0x haproxy | 1.20 | yes |" in out
    assert "| CPU per ka request <= 1.0x haproxy | 1.05 | **no** |" in out
    # 6.0 / 5.0 per connection and 2.1 / 1.9 per request: sharing cost more than 5 %
    assert "| CPU per new connection <= 1.05x l4lb-1w | 1.20 | **no** |" in out
    assert "| CPU per ka request <= 1.05x l4lb-1w | 1.11 | **no** |" in out
    assert "| ka req/s >= 1.0x haproxy | 2 | 2 | 1.10 | 1.10 | 1.10 |" in out
    # l4lb-1w is checked against HAProxy only
    assert "| CPU per new connection <= 1.0x haproxy | 0.62 | yes |" in out
    assert "1.05x l4lb-1w" not in out.split("l4lb-1w against")[1]
    assert (tmp_path / "bench-w-workers.png").stat().st_size > 10_000


def test_workers_run_gives_the_harness_both_worker_counts_and_the_references():
    spec = importlib.util.spec_from_file_location("loadtests_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = argparse.Namespace(workers=2, skip=[], tuned=False, also=[["old", "old.sh {listen}"]])
    proxies = bench.harness_proxies(args)
    assert proxies[:2] == ["haproxy", "nginx"]
    assert proxies[2] == "cmd:l4lb-2w" and proxies[3].endswith("run-l4lb.sh {listen} {backend} 2")
    assert proxies[4] == "cmd:l4lb-1w" and proxies[5].endswith("run-l4lb.sh {listen} {backend} 1")
    assert proxies[6:] == ["cmd:old", "old.sh {listen}"]
    # pinned: one l4lb with the harness's {workers} (1 there)
    pinned = bench.harness_proxies(argparse.Namespace(workers=0, skip=[], tuned=False, also=None))
    assert pinned[-2] == "cmd:l4lb" and pinned[-1].endswith("{listen} {backend} {workers}")
