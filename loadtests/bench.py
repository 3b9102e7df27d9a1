#!/usr/bin/env python3
"""One command: l4lb side by side with HAProxy and nginx, ratios to HAProxy, and a chart.

    python loadtests/bench.py                       # 2 reps x 10 s per workload (about 15 min)
    python loadtests/bench.py --reps 1 --duration 5 # a quick look (about 5 min)
    python loadtests/bench.py --chart-only loadtests/results/bench-*.jsonl   # redraw
    python loadtests/bench.py --tuned               # + l4lb-tuned (rcvbuf = sndbuf = 1 MiB)
    python loadtests/bench.py --workers 2           # issue 15: 2 workers against 1, HAProxy
                                                    # nbthread 2, nginx worker_processes 2

It runs the shared harness (`../shared/bench/bench.sh`, found relative to the repo root;
`L4LB_SHARED_BENCH=DIR` overrides) with haproxy, haproxy-tuned, haproxy-splice, nginx and
`cmd:l4lb 'loadtests/run-l4lb.sh {listen} {backend} {workers}'` (l4lb's relay, one worker
when pinned; earlier results may also hold `l4lb-stream`, the uvloop stream relay retired
in 0.2), proxy pinned to CPU 0 and the load on CPU 1 (the harness's fair single-core
comparison). The harness prints medians and the ratio table against HAProxy; this script
then checks l4lb against the speed targets of issue 6 and draws the ratios per workload
into loadtests/results/bench-<time>.png, beside the raw JSON lines (bench-<time>.jsonl)
and the printed report (bench-<time>.md).

`--workers N` is issue 15's run instead: nothing pinned (`--mode unpinned`, the harness's
{workers} = N, so HAProxy runs `nbthread N` and nginx `worker_processes N` with
reuseport), l4lb with `workers = N` (`l4lb-Nw`) and `workers = 1` (`l4lb-1w`) in the same
run, on new connections and keep-alive requests by default; the report checks l4lb-Nw
against HAProxy and against l4lb-1w (the cost of sharing the table). The harness counts a
proxy's CPU over every process of the session it started the proxy in, which for l4lb is
the master, the fork server and every worker (none of them leaves the session).

Nothing here measures time itself: every figure comes from the harness, which bounds each
run (wrk -d, iperf3 -t, hard timeouts) and stops every process it started. This script
bounds the whole harness run as well and interrupts it (SIGINT, so it cleans up) on
timeout or Ctrl-C.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
REFERENCE_PROXIES = ["haproxy", "haproxy-tuned", "haproxy-splice", "nginx"]
WORKLOADS = ["ka", "close", "bulk1", "bulk8", "bulk1R", "bulk8R"]
# --workers N: the references of issue 15 (the harness gives each N threads or workers
# when unpinned) and the workloads its speed targets are about.
WORKER_REFERENCES = ["haproxy", "nginx"]
WORKER_WORKLOADS = "close,ka"

# Ratio panels of the chart: (label, workload, key). Throughput: higher is better.
THROUGHPUT = [("ka req/s", "ka", "rps"), ("conn/s", "close", "rps"),
              ("bulk1 Gbit/s", "bulk1", "gbps"), ("bulk8 Gbit/s", "bulk8", "gbps"),
              ("bulk1R Gbit/s", "bulk1R", "gbps"), ("bulk8R Gbit/s", "bulk8R", "gbps")]
# Cost: lower is better.
COST = [("CPU/req ka", "ka", "cpu_s_per_100k"), ("CPU/conn", "close", "cpu_s_per_100k"),
        ("CPU/GB bulk1", "bulk1", "cpu_s_per_gb"), ("CPU/GB bulk8", "bulk8", "cpu_s_per_gb"),
        ("p99 ka", "ka", "p99_ms"), ("p99 conn", "close", "p99_ms")]

# The speed targets of issue 6: (what, workload, key, reference proxy, bound, higher_is_better)
TARGETS = [
    ("new connections/s >= 1.0x haproxy", "close", "rps", "haproxy", 1.0, True),
    ("ka CPU per request <= 1.0x haproxy", "ka", "cpu_s_per_100k", "haproxy", 1.0, False),
    ("ka p99 <= 1.2x haproxy", "ka", "p99_ms", "haproxy", 1.2, False),
    ("bulk8 Gbit/s >= 1.0x haproxy-tuned", "bulk8", "gbps", "haproxy-tuned", 1.0, True),
    ("bulk8 CPU per GB <= 0.7x haproxy-splice", "bulk8", "cpu_s_per_gb", "haproxy-splice", 0.7, False),
]


# The speed targets of issue 15 for l4lb with N workers, unpinned: (what, workload, key,
# reference, bound, higher_is_better); "l4lb-1w" is l4lb with one worker in the same run.
WORKER_TARGETS = [
    ("conn/s >= 1.0x haproxy", "close", "rps", "haproxy", 1.0, True),
    ("ka req/s >= 1.0x haproxy", "ka", "rps", "haproxy", 1.0, True),
    ("CPU per new connection <= 1.0x haproxy", "close", "cpu_s_per_100k", "haproxy", 1.0, False),
    ("CPU per ka request <= 1.0x haproxy", "ka", "cpu_s_per_100k", "haproxy", 1.0, False),
    ("CPU per new connection <= 1.05x l4lb-1w", "close", "cpu_s_per_100k", "l4lb-1w", 1.05, False),
    ("CPU per ka request <= 1.05x l4lb-1w", "ka", "cpu_s_per_100k", "l4lb-1w", 1.05, False),
]


def worker_proxy(n: int) -> str:
    """The name l4lb with `workers = n` runs under in a --workers run."""
    return "l4lb-%dw" % n


def find_shared_bench() -> Path:
    """The shared harness folder: L4LB_SHARED_BENCH, else ../shared/bench from the repo root
    (or from any folder above it, for worktrees nested deeper). Exits with a message if absent."""
    env = os.environ.get("L4LB_SHARED_BENCH")
    candidates = [Path(env)] if env else []
    candidates += [p / "shared" / "bench" for p in REPO.parents]
    for c in candidates:
        if (c / "bench.sh").is_file():
            return c.resolve()
    sys.exit("bench: ../shared/bench/bench.sh not found relative to %s; set L4LB_SHARED_BENCH=DIR"
             % REPO)


# l4lb-tuned's socket buffers (rcvbuf and sndbuf): HAProxy's tune.rcvbuf/sndbuf, the
# one tuning that lowered l4lb's CPU per bulk GB here (loadtests/RESULTS-bench.md).
TUNED_BUFFERS = 1024 * 1024


def l4lb_command(workers: int | str = "{workers}") -> str:
    """The cmd: template the harness fills in (a shell command line); quoted so paths
    with spaces survive. `workers`: run-l4lb.sh's WORKERS, by default the harness's
    {workers} (1 pinned, N unpinned)."""
    return "%s {listen} {backend} %s" % (shlex.quote(str(HERE / "run-l4lb.sh")), workers)


def harness_proxies(args) -> list[str]:
    """The proxy arguments of bench.sh: built-ins by name, ours as `cmd:NAME COMMAND`."""
    if args.workers:
        proxies = [p for p in WORKER_REFERENCES if p not in args.skip]
        if "l4lb" not in args.skip:
            proxies += ["cmd:" + worker_proxy(args.workers), l4lb_command(args.workers)]
            if args.workers != 1:
                proxies += ["cmd:" + worker_proxy(1), l4lb_command(1)]
    else:
        proxies = [p for p in REFERENCE_PROXIES if p not in args.skip]
        if "l4lb" not in args.skip:
            proxies += ["cmd:l4lb", l4lb_command()]
        if args.tuned:
            proxies += ["cmd:l4lb-tuned", "L4LB_BUFFERS=%d %s" % (TUNED_BUFFERS, l4lb_command())]
    for name, command in args.also or ():
        proxies += ["cmd:" + name, command]
    return proxies


def estimated_seconds(reps: int, duration: int, n_proxies: int, n_workloads: int) -> int:
    # per run: the load itself plus about 8 s to start/stop the proxy and settle
    return reps * n_proxies * n_workloads * (duration + 8)


def run_harness(bench_dir: Path, args, out: Path, report: Path) -> int:
    """Run bench.sh; stream its output and keep stdout (the report) in `report`.

    On timeout or Ctrl-C the harness gets SIGINT (its finally-blocks stop the proxies and
    backends it started), then SIGKILL if it is still there 30 s later."""
    proxies = harness_proxies(args)
    workers = ["--workers", str(args.workers)] if args.workers else []
    cmd = [str(bench_dir / "bench.sh"), "--mode", args.mode, "--reps", str(args.reps),
           "--duration", str(args.duration), "--workloads", args.workloads, *workers,
           "--out", str(out), *args.bench_arg, *proxies]
    n_proxies = len(proxies) - sum(1 for p in proxies if p.startswith("cmd:"))  # cmd:NAME + COMMAND = 1
    limit = args.timeout or 3 * estimated_seconds(
        args.reps * (2 if args.mode == "both" else 1), args.duration, n_proxies,
        len(args.workloads.split(","))) + 120
    print("bench: %s" % " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    print("bench: about %d s (hard limit %d s)" % (
        estimated_seconds(args.reps, args.duration, n_proxies, len(args.workloads.split(","))),
        limit), file=sys.stderr, flush=True)
    env = dict(os.environ)
    # {python} in the harness is only used by its py-* baselines; point it at this interpreter
    env.setdefault("BENCH_PYTHON", sys.executable)
    env.setdefault("L4LB_PYTHON", sys.executable)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + limit
    lines = []

    def interrupt():
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()

    timer = threading.Timer(limit, interrupt)
    timer.daemon = True
    timer.start()
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            lines.append(line)
        rc = proc.wait()
    except KeyboardInterrupt:
        interrupt()
        raise
    finally:
        timer.cancel()
    if time.monotonic() > deadline:
        print("bench: harness stopped after the %d s limit" % limit, file=sys.stderr)
        rc = rc or 124
    report.write_text("".join(lines))
    return rc


# --- reading results (the harness's rules: errors out, non-noisy runs preferred, medians) ---

def load_records(paths) -> list[dict]:
    """The harness's records of every file, each tagged with its file's index (`_run`),
    so that reps of different runs are never paired."""
    records = []
    for i, p in enumerate(paths):
        with open(p) as f:
            records += [dict(json.loads(line), _run=i) for line in f if line.strip()]
    return records


def load_cpu_s_per_gb(r: dict) -> float | None:
    """CPU-seconds per GB spent on the load core (CPU 1 when pinned: iperf3's client and
    server, and the kernel work done in their context) during a pinned bulk run."""
    busy = (r.get("cpu_busy_pct") or {}).get("1")
    if r.get("mode") != "pinned" or busy is None or not r.get("bytes") or not r.get("wall_s"):
        return None
    return busy / 100.0 * r["wall_s"] / (r["bytes"] / 1e9)


def medians(records: list[dict], mode: str = "pinned") -> dict[str, dict[tuple[str, str], float]]:
    """{proxy: {(workload, key): median}} over runs without errors, non-noisy ones if any.
    Besides the harness's own keys: load_cpu_s_per_gb (see load_cpu_s_per_gb)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        if r.get("mode") == mode and not r.get("error"):
            groups.setdefault((r["proxy"], r["workload"]), []).append(r)
    out: dict[str, dict] = {}
    for (proxy, wl), runs in groups.items():
        clean = [r for r in runs if not r.get("noisy")] or runs
        for key in {"rps", "gbps", "p50_ms", "p99_ms", "cpu_s_per_100k", "cpu_s_per_gb",
                    "proxy_cpu_pct"}:
            vals = [r[key] for r in clean if r.get(key) is not None]
            if vals:
                out.setdefault(proxy, {})[(wl, key)] = statistics.median(vals)
        loads = [v for v in map(load_cpu_s_per_gb, clean) if v is not None]
        if loads:
            out.setdefault(proxy, {})[(wl, "load_cpu_s_per_gb")] = statistics.median(loads)
    return out


def bulk_split_table(meds, wl: str = "bulk8") -> str:
    """Markdown: where the CPU of a bulk workload goes, per proxy. On loopback the two
    cores share the work of every byte (a sender's context runs the receiver's TCP
    input), so a proxy that does less per GB leaves more to the load core; pinned, the
    load core is saturated, and its cost per GB sets the throughput."""
    rows = ["| proxy | %s Gbit/s | proxy CPU-s/GB | load core CPU-s/GB | both |" % wl,
            "|---|---|---|---|---|"]
    for proxy, m in meds.items():
        g, p, ld = m.get((wl, "gbps")), m.get((wl, "cpu_s_per_gb")), m.get((wl, "load_cpu_s_per_gb"))
        if g is None or p is None or ld is None:
            continue
        rows.append("| %s | %.2f | %.3f | %.3f | %.3f |" % (proxy, g, p, ld, p + ld))
    return "\n".join(rows)


def ratio(meds, proxy, ref, wl, key):
    a = meds.get(proxy, {}).get((wl, key))
    b = meds.get(ref, {}).get((wl, key))
    return a / b if a is not None and b else None


def target_met(ratio: float, bound: float, higher: bool) -> bool:
    return ratio >= bound if higher else ratio <= bound


def targets_table(meds, proxy: str = "l4lb", targets=TARGETS, issue: int = 6) -> str:
    """Markdown: `proxy` (l4lb or l4lb-stream) against each speed target of issue 6 (or
    `targets` of another issue)."""
    rows = ["| target (issue %d) | %s ratio | met |" % (issue, proxy), "|---|---|---|"]
    for what, wl, key, ref, bound, higher in targets:
        r = ratio(meds, proxy, ref, wl, key)
        if r is None:
            rows.append("| %s | - | not measured |" % what)
            continue
        rows.append("| %s | %.2f | %s |"
                    % (what, r, "yes" if target_met(r, bound, higher) else "**no**"))
    return "\n".join(rows)


def rep_ratio_map(records, proxy, ref, wl, key, mode: str = "pinned") -> dict:
    """{(run, rep): proxy / ref} for each rep that ran both (the harness alternates the
    proxies within a rep, so the two ran minutes apart on the same machine): errors left
    out, noisy runs too."""
    by_rep: dict[tuple, dict[str, float]] = {}
    for r in records:
        if (r.get("mode") == mode and r.get("workload") == wl and not r.get("error")
                and not r.get("noisy") and r.get(key) is not None
                and r.get("proxy") in (proxy, ref)):
            by_rep.setdefault((r.get("_run", 0), r.get("rep")), {})[r["proxy"]] = r[key]
    return {k: v[proxy] / v[ref] for k, v in by_rep.items() if proxy in v and v.get(ref)}


def rep_spread_table(records, proxy: str = "l4lb", targets=TARGETS, mode: str = "pinned",
                     issue: int = 6) -> str:
    """Markdown: each target of issue 6 (or `targets`) rep by rep — how many reps met it,
    and the range of the per-rep ratios — then how many reps met both bulk8 targets (they
    pull against each other on a loopback rig, see RESULTS-bench.md). A median over 2
    reps hides this VM's spread; this shows it."""
    rows = ["| target (issue %d) | %s reps | met in | min | median | max |" % (issue, proxy),
            "|---|---|---|---|---|---|"]
    bulk8 = []                           # (per-rep ratios, bound, higher) of each bulk8 target
    for what, wl, key, ref, bound, higher in targets:
        by_rep = rep_ratio_map(records, proxy, ref, wl, key, mode)
        if wl == "bulk8":
            bulk8.append((by_rep, bound, higher))
        rs = sorted(by_rep.values())
        if not rs:
            continue
        met = sum(1 for r in rs if target_met(r, bound, higher))
        rows.append("| %s | %d | %d | %.2f | %.2f | %.2f |"
                    % (what, len(rs), met, rs[0], statistics.median(rs), rs[-1]))
    both = set.intersection(*(set(m) for m, _, _ in bulk8)) if bulk8 else set()
    if both:
        met = sum(1 for k in both if all(target_met(m[k], b, h) for m, b, h in bulk8))
        rows.append("| both bulk8 targets in the same rep | %d | %d | - | - | - |"
                    % (len(both), met))
    return "\n".join(rows)


# Columns of the --workers table: (header, workload, key, format).
WORKER_COLUMNS = [("conn/s", "close", "rps", "%.0f"), ("ka req/s", "ka", "rps", "%.0f"),
                  ("CPU-s/100k conn", "close", "cpu_s_per_100k", "%.2f"),
                  ("CPU-s/100k ka", "ka", "cpu_s_per_100k", "%.2f"),
                  ("proxy CPU % conn", "close", "proxy_cpu_pct", "%.0f"),
                  ("proxy CPU % ka", "ka", "proxy_cpu_pct", "%.0f")]


def worker_table(meds, ref: str = "haproxy") -> str:
    """Markdown: each proxy of a --workers run, its medians and, for the first four
    columns, its ratio to `ref` (proxy CPU % is of one CPU: up to 200 on two cores)."""
    head = [c[0] for c in WORKER_COLUMNS] + ["%s / %s" % (c[0], ref) for c in WORKER_COLUMNS[:4]]
    rows = ["| proxy | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for proxy, m in meds.items():
        vals = [fmt % m[(wl, key)] if m.get((wl, key)) is not None else "-"
                for _, wl, key, fmt in WORKER_COLUMNS]
        for _, wl, key, _ in WORKER_COLUMNS[:4]:
            r = ratio(meds, proxy, ref, wl, key)
            vals.append("-" if r is None else "%.2f" % r)
        rows.append("| %s | %s |" % (proxy, " | ".join(vals)))
    return "\n".join(rows)


def draw_chart(meds, png: Path, title: str, ref: str = "haproxy") -> None:
    """Two panels of grouped bars, one bar per proxy: throughput ratios (higher is better)
    and cost ratios (CPU, p99: lower is better), each against `ref`, with 1.0 marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proxies = [p for p in REFERENCE_PROXIES + ["l4lb", "l4lb-tuned", "l4lb-stream"]
               if p in meds and p != ref]
    proxies += [p for p in meds if p not in proxies and p != ref and p != "direct"]
    colors = {"haproxy-tuned": "#9ecae1", "haproxy-splice": "#4292c6", "nginx": "#74c476",
              "l4lb": "#e6550d", "l4lb-tuned": "#a63603", "l4lb-stream": "#fdae6b",
              "l4lb-splice": "#a63603"}
    fig, axes = plt.subplots(2, 1, figsize=(12, 8.5))
    panels = [(axes[0], THROUGHPUT, "throughput / %s  (higher is better)" % ref),
              (axes[1], COST, "cost / %s  (lower is better)" % ref)]
    width = 0.8 / max(1, len(proxies))
    for ax, cols, ylabel in panels:
        for i, proxy in enumerate(proxies):
            xs, ys = [], []
            for j, (_, wl, key) in enumerate(cols):
                r = ratio(meds, proxy, ref, wl, key)
                if r is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(r)
            bars = ax.bar(xs, ys, width, label=proxy, color=colors.get(proxy, None),
                          edgecolor="black" if proxy.startswith("l4lb") else "none", linewidth=0.8)
            if proxy.startswith("l4lb"):
                for b, y in zip(bars, ys):
                    ax.annotate("%.2f" % y, (b.get_x() + b.get_width() / 2, y),
                                ha="center", va="bottom", fontsize=8, fontweight="bold")
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_xticks(range(len(cols)), [c[0] for c in cols])
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(ncol=len(proxies), loc="upper left", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def draw_bulk_tradeoff(records, png: Path, wl: str = "bulk8") -> bool:
    """One point per pinned `wl` run: proxy CPU-s/GB against load-core CPU-s/GB, with the
    corner where both bulk targets of issue 6 would hold: proxy at most 0.7x
    haproxy-splice's median, and load core at most 8 / haproxy-tuned's median Gbit/s —
    a saturated load core spending that much per GB moves haproxy-tuned's Gbit/s.
    Returns whether there was anything to draw."""
    runs = [r for r in records if r.get("mode") == "pinned" and r.get("workload") == wl
            and not r.get("error") and not r.get("noisy") and r.get("cpu_s_per_gb")]
    load = {id(r): load_cpu_s_per_gb(r) for r in runs}
    runs = [r for r in runs if load[id(r)] is not None]
    if not runs:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6.5))
    by_proxy: dict[str, list[dict]] = {}
    for r in runs:
        by_proxy.setdefault(r["proxy"], []).append(r)
    for proxy, rs in sorted(by_proxy.items()):
        ax.scatter([r["cpu_s_per_gb"] for r in rs], [load[id(r)] for r in rs],
                   label="%s (%d runs)" % (proxy, len(rs)), s=36,
                   marker="o" if proxy.startswith("l4lb") else "s",
                   edgecolors="black" if proxy.startswith("l4lb") else "none")
    xs = [r["cpu_s_per_gb"] for r in runs]
    ys = [load[id(r)] for r in runs]
    top = max(max(xs), max(ys)) * 1.05
    for total in (0.6, 0.8, 1.0, 1.2, 1.4):
        ax.plot([0, total], [total, 0], color="grey", linewidth=0.6, linestyle=":")
        if total < top:
            ax.annotate("both cores %.1f" % total, (total * 0.52, total * 0.48), fontsize=7,
                        color="grey", rotation=-35)
    meds = medians(runs)
    splice = meds.get("haproxy-splice", {}).get((wl, "cpu_s_per_gb"))
    tuned = meds.get("haproxy-tuned", {}).get((wl, "gbps"))
    if splice and tuned:
        ax.fill_between([0, 0.7 * splice], 0, 8.0 / tuned, color="green", alpha=0.12,
                        label="both %s targets of issue 6" % wl)
    ax.set_xlim(0, top)
    ax.set_ylim(0, max(ys) * 1.15)
    ax.set_xlabel("proxy CPU-s per GB (the proxy's core)")
    ax.set_ylabel("load CPU-s per GB (the core of iperf3 client and server)")
    ax.set_title("%s on loopback: the two cores share each byte's work (one point per run)" % wl)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def summarize(records, stem: Path, title: str, append_report: bool = True) -> None:
    def emit(heading: str, *tables: str) -> None:
        """Print a section, and append it to the run's report when there is one."""
        text = "\n" + "\n\n".join(tables)
        print("\n%s\n%s" % (heading, text))
        if append_report:
            with open(stem.with_suffix(".md"), "a") as f:
                f.write("\n%s\n%s\n" % (heading, text))

    summarize_workers(records, stem, emit)
    meds = medians(records)
    if "haproxy" not in meds:
        if not medians(records, "unpinned"):
            print("bench: no haproxy results, no ratios to chart", file=sys.stderr)
        return
    for proxy in ("l4lb", "l4lb-tuned", "l4lb-stream", "l4lb-splice"):
        if proxy not in meds:
            continue
        emit("%s against the targets of issue 6 (pinned, medians):" % proxy,
             targets_table(meds, proxy), "and rep by rep:", rep_spread_table(records, proxy))
    split = bulk_split_table(meds)
    if split.count("\n") > 1:
        emit("bulk8: CPU per GB on each core (pinned, medians):", split)
    png = stem.with_suffix(".png")
    draw_chart(meds, png, title)
    print("\nchart: %s" % png)
    bulk_png = stem.parent / (stem.name + "-bulk8.png")
    if draw_bulk_tradeoff(records, bulk_png):
        print("bulk8 per-run CPU split: %s" % bulk_png)


def worker_counts(meds) -> list[int]:
    """The N of every l4lb-Nw in `meds` but 1, in order (l4lb-1w is their reference)."""
    counts = []
    for proxy in meds:
        if proxy.startswith("l4lb-") and proxy.endswith("w") and proxy[5:-1].isdigit():
            counts.append(int(proxy[5:-1]))
    return sorted(n for n in counts if n != 1)


def summarize_workers(records, stem: Path, emit) -> None:
    """The report of a --workers run (unpinned): medians and ratios of every proxy, then
    each l4lb-Nw against the targets of issue 15, on the medians and rep by rep (l4lb-1w
    last, against HAProxy only), and the chart of the ratios to HAProxy
    (bench-<time>-workers.png)."""
    meds = medians(records, "unpinned")
    if "haproxy" not in meds:
        return
    emit("unpinned (--workers): medians and ratios to haproxy:", worker_table(meds))
    for n in worker_counts(meds) + ([1] if worker_proxy(1) in meds else []):
        proxy = worker_proxy(n)
        targets = [t for t in WORKER_TARGETS if t[3] != proxy]
        emit("%s against the targets of issue 15 (unpinned, medians):" % proxy,
             targets_table(meds, proxy, targets, issue=15), "and rep by rep:",
             rep_spread_table(records, proxy, targets, "unpinned", issue=15))
    png = stem.parent / (stem.name + "-workers.png")
    draw_chart(meds, png, "l4lb workers vs HAProxy and nginx, unpinned — %s" % stem.name)
    print("\nchart (unpinned): %s" % png)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions (default 2)")
    ap.add_argument("--duration", type=int, default=10, help="seconds per workload (default 10)")
    ap.add_argument("--workloads", default=None,
                    help="default: %s (with --workers: %s)" % (",".join(WORKLOADS), WORKER_WORKLOADS))
    ap.add_argument("--mode", choices=["pinned", "unpinned", "both"], default="pinned")
    ap.add_argument("--skip", action="append", default=[], choices=REFERENCE_PROXIES + ["l4lb"],
                    help="leave a proxy out (repeatable); haproxy is needed for ratios")
    ap.add_argument("--workers", type=int, default=0, metavar="N",
                    help="issue 15's run: unpinned, l4lb with N workers and with 1, HAProxy "
                         "nbthread N, nginx worker_processes N (workloads %s unless given)"
                    % WORKER_WORKLOADS)
    ap.add_argument("--tuned", action="store_true",
                    help="also run l4lb-tuned: rcvbuf = sndbuf = 1 MiB on its listener")
    ap.add_argument("--also", nargs=2, action="append", metavar=("NAME", "COMMAND"),
                    help="one more proxy in the same run, as the harness's cmd:NAME COMMAND "
                         "(e.g. another checkout's run-l4lb.sh); repeatable")
    ap.add_argument("--bench-arg", action="append", default=[],
                    help="extra option passed to bench.sh, e.g. --bench-arg=--max-noise=20")
    ap.add_argument("--timeout", type=int, default=0, help="hard limit for the whole run, s")
    ap.add_argument("--chart-only", nargs="+", metavar="JSONL",
                    help="do not run: redraw the chart and targets from earlier results")
    args = ap.parse_args(argv)
    if args.workers < 0:
        ap.error("--workers must be at least 1")
    if args.workers:
        if args.mode == "both" or args.tuned:
            ap.error("--workers runs unpinned only, without --tuned")
        args.mode = "unpinned"
    if args.workloads is None:
        args.workloads = WORKER_WORKLOADS if args.workers else ",".join(WORKLOADS)

    if args.chart_only:
        stem = Path(args.chart_only[0]).with_suffix("")
        summarize(load_records(args.chart_only), stem,
                  "l4lb vs HAProxy and nginx — %s" % ", ".join(Path(p).name for p in args.chart_only),
                  append_report=False)
        return 0

    bench_dir = find_shared_bench()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = RESULTS / ("bench-" + stamp)
    out = stem.with_suffix(".jsonl")
    rc = run_harness(bench_dir, args, out, stem.with_suffix(".md"))
    if out.exists():
        summarize(load_records([out]), stem,
                  "l4lb vs HAProxy and nginx, %s — %s, %d rep(s) x %d s"
                  % ("unpinned, %d workers" % args.workers if args.workers else "pinned to one core",
                     dt.date.today().isoformat(), args.reps, args.duration))
    print("raw results: %s\nreport: %s" % (out, stem.with_suffix(".md")))
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
