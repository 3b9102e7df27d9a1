#!/usr/bin/env python3
"""Deploys under load: Locust drives l4lb in front of versioned backends while a deploy runs.

    python loadtests/deploy_under_load.py rolling | blue-green | canary   # must show 0 failed
    python loadtests/deploy_under_load.py restart-backends   # the baseline without draining
    python loadtests/deploy_under_load.py --list

A scenario starts line-echo backends (loadtests/echo_server.py) tagged with a version name
(v1, v2), l4lb in front of them (`python -m l4lb run -c`, a config written for the
scenario), and Locust as a subprocess (headless, --csv, plus a per-second timeline from
locustfile.py: requests, failures, error kinds and the version that served each request).
Once the load is steady it calls the scenario's deploy function, lets the load run on for a
few seconds, stops everything, prints the failed requests and draws one PNG:

  1. requests/s and failures/s over time,
  2. the share of requests served by each backend version,
  with every deploy step marked by a vertical line.

Deploy functions are pluggable: any callable `deploy(run: ScenarioRun) -> None`. It changes
things through `run` (replace a backend process, call `l4lb ctl` / `l4lb deploy`) and marks
its steps with `run.mark("label")`. The zero-downtime scenarios (rolling, blue-green, canary)
run `python -m l4lb deploy ...` from this checkout, echo its progress lines and mark the
chart from them; they exit 1 when a request failed. restart-backends is the baseline
without draining: it kills and restarts each backend process in turn on the same port, and
failures are expected.

What "0 failed" means with persistent connections: a drain waits for connections to END,
it never cuts one (until --drain-timeout, when l4lb kills what is left, and those requests
fail). A PersistentUser that kept one connection forever would hold a drain open until
then, so here each user closes its connection itself between two requests after about
--reconnect-every requests (100 by default, about a second at the default pace; 30 for
canary, whose split moves only new connections) and opens a new one, the way pooled
clients with keep-alive limits behave. A drained backend then empties within about a
second, and only then is it stopped. `--reconnect-every 0` shows the other case: each drain
runs into its timeout and the killed connections fail.

Clients connect from 200 loopback addresses (--source-addresses): a split is sticky by
client IP (sticky_split, on by default), so from one address every connection would land
on the same side and a canary would show nothing until 100 %. The rolling deploy's new
backends take --startup seconds (1) to listen, as a real service would.

Files go to loadtests/results/deploy-<scenario>-<time>{.png,.jsonl,_stats.csv,...} and a
scratch folder (config, backend pid files, logs) under $TMPDIR. Every process started here
is stopped at the end, on error and on Ctrl-C.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
ECHO_SERVER = HERE / "echo_server.py"
LOCUSTFILE = HERE / "locustfile.py"

# Seconds Locust runs before the deploy starts (users spawned, rates steady) and after it
# ends (the tail shows whether the new version carries everything); --warmup, --cooldown.
WARMUP_S = 4.0
COOLDOWN_S = 4.0
# Width of the timeline's buckets, seconds: fine enough to show a deploy step of a second.
TIMELINE_STEP = 0.25
# The deploy starts only once the old version has served this many requests, and the run
# ends only once a whole timeline bucket after the deploy has served requests: --warmup and
# --cooldown are minimums, so a busy machine (slow Locust start-up) still charts both sides.
WARMUP_REQUESTS = 20
# Seconds to wait for either condition before giving up (the run reports what it saw).
SETTLE_TIMEOUT = 60.0
# Hard ceiling on a whole scenario's Locust run; a deploy that hangs is cut off here.
MAX_RUN_S = 300


# --- processes -------------------------------------------------------------------------

def free_port() -> int:
    """A free loopback port (backends keep their port across restarts, so it is fixed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    """Return once 127.0.0.1:port accepts; RuntimeError on timeout or if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited with %s before listening on %d"
                               % (proc.returncode, port))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listening on 127.0.0.1:%d after %.0f s" % (port, timeout))


def stop_process(proc: subprocess.Popen, timeout: float = 5.0, sig=signal.SIGTERM) -> None:
    """Signal one process we started and reap it; SIGKILL if it ignores `sig`."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def toml_workers(value: str) -> str:
    """--workers as a TOML value: a count, or the string "auto"."""
    return value if value.isdigit() else '"%s"' % value


@dataclasses.dataclass
class BackendProcess:
    """One echo backend: `name` (its identity in the l4lb pool), fixed `port`, and the
    `version` its replies are tagged with. Restarting it keeps the name and port."""

    pool: str
    name: str
    port: int
    version: str
    log_dir: Path
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % self.port

    def start(self, version: str | None = None) -> None:
        """Start (or start again, as `version`); RuntimeError if it does not listen in 10 s."""
        self.version = version or self.version
        log = open(self.log_dir / ("%s.log" % self.name), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ECHO_SERVER), "--port", str(self.port), "--name", self.version],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_listening(self.port, proc=self.proc)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig=sig)
            self.proc = None


class L4LBProcess:
    """`python -m l4lb run -c CONFIG` from this checkout, its JSON log kept in a file."""

    def __init__(self, config_text: str, workdir: Path):
        self.config = workdir / "l4lb.toml"
        self.config.write_text(config_text)
        self.log_path = workdir / "l4lb.log"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "l4lb", "run", "-c", str(self.config)],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.port = self.wait_listener_port()

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_listener_port(self, timeout: float = 15.0) -> int:
        """The port of the first `listener_started` event (binds use port 0)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events():
                if ev.get("event") == "listener_started":
                    return int(ev["port"])
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError("l4lb did not start; log:\n" + self.log_path.read_text()[-3000:])

    def cli(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Run `l4lb ARGS... -c CONFIG` (ctl, deploy) from this checkout; raise on failure."""
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "l4lb", *args, "-c", str(self.config)]
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError("%s failed (%d): %s" % (" ".join(map(shlex.quote, cmd)),
                                                       res.returncode, res.stderr or res.stdout))
        return res

    def deploy(self, args: list[str], on_line: Callable[[str], None],
               timeout: float = MAX_RUN_S) -> None:
        """Run `l4lb deploy ARGS... -c CONFIG`, echoing each progress line as it comes and
        handing it to `on_line` (which marks the chart); RuntimeError with stderr when it
        exits non-zero, TimeoutError when it takes longer than `timeout`."""
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "l4lb", "deploy", *args, "-c", str(self.config)]
        print("  $ l4lb deploy %s" % " ".join(map(shlex.quote, args)), flush=True)
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                print("  %s  | %s" % (time.strftime("%H:%M:%S"), line), flush=True)
                on_line(line)
                if time.monotonic() > deadline:
                    raise TimeoutError("l4lb deploy took more than %.0f s" % timeout)
            proc.wait(max(1.0, deadline - time.monotonic()))
        finally:
            stop_process(proc, sig=signal.SIGINT)   # Ctrl-C: the deploy restores its safe state
        if proc.returncode != 0:
            raise RuntimeError("l4lb deploy exited with %d: %s"
                               % (proc.returncode, proc.stderr.read().strip()))

    def stop(self) -> None:
        stop_process(self.proc, timeout=10.0)


# --- a scenario run --------------------------------------------------------------------

@dataclasses.dataclass
class Scenario:
    """What a scenario sets up and which deploy it runs.

    pools: {pool: version of its backends at start}; the listener starts on `active_pool`.
    zero_failures: the deploy promises no failed request (exit 1 otherwise)."""

    name: str
    deploy: Callable[["ScenarioRun"], None]
    pools: dict[str, str]
    active_pool: str
    zero_failures: bool
    about: str
    # PersistentUser's --tcp-reconnect-every unless --reconnect-every says otherwise: a
    # canary moves only new connections, so there they turn over faster to show the split.
    reconnect_every: int = 100


class ScenarioRun:
    """The live state a deploy function works on: backends by pool, l4lb, step marks."""

    def __init__(self, scenario: Scenario, args, workdir: Path):
        self.scenario = scenario
        self.args = args
        self.workdir = workdir
        self.backends: dict[str, list[BackendProcess]] = {}
        self.l4lb: L4LBProcess | None = None
        self.locust: subprocess.Popen | None = None
        self.marks: list[tuple[float, str]] = []   # (unix time, label)
        # (unix time, % of new connections routed to the new version): drawn over the shares
        self.split: list[tuple[float, float]] = []

    # for deploy functions
    def mark(self, label: str, quiet: bool = False) -> None:
        """Record a deploy step; it becomes a labelled vertical line on the chart."""
        self.marks.append((time.time(), label))
        if not quiet:
            print("  %s  %s" % (time.strftime("%H:%M:%S"), label), flush=True)

    def replace_backend(self, backend: BackendProcess, version: str, down_s: float = 0.0,
                        sig=signal.SIGTERM) -> None:
        """Stop a backend process (SIGTERM: it closes its connections) and start `version`
        on the same port after `down_s` seconds."""
        backend.stop(sig)
        if down_s:
            time.sleep(down_s)
        backend.start(version)

    # setup and teardown
    def config_text(self) -> str:
        pools = []
        for pool, members in self.backends.items():
            rows = ",\n".join('  { name = "%s", address = "%s" }' % (b.name, b.address)
                              for b in members)
            pools.append('[pools.%s]\nalgorithm = "%s"\nbackends = [\n%s\n]\n'
                         % (pool, self.args.algorithm, rows))
        return """# written by deploy_under_load.py, scenario %s
[global]
shutdown_timeout = 2.0
workers = %s

[control]
socket = "l4lb.sock"

[log]
level = "info"
format = "json"
access = false

[listeners.app]
bind = ["127.0.0.1:0"]
pool = "%s"
connect_timeout = 1.0
retries = 2

%s""" % (self.scenario.name, toml_workers(self.args.workers), self.scenario.active_pool,
         "\n".join(pools))

    def start_backends(self) -> None:
        for pool, version in self.scenario.pools.items():
            self.backends[pool] = []
            for i in range(1, self.args.backends + 1):
                b = BackendProcess(pool, "%s%d" % (pool, i), free_port(), version, self.workdir)
                self.backends[pool].append(b)
                b.start()

    def start_locust(self, out_prefix: Path, timeline: Path) -> None:
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), self.args.user_class,
               "-H", "127.0.0.1:%d" % self.l4lb.port, "--headless",
               "-u", str(self.args.users), "-r", str(self.args.users), "-t", "%ds" % MAX_RUN_S,
               "--only-summary", "--csv", str(out_prefix), "--exit-code-on-error", "0",
               "--tcp-wait", str(self.args.wait), "--tcp-timeout", "2",
               "--tcp-reconnect-every", str(self.args.reconnect_every),
               "--tcp-source-addresses", str(self.args.source_addresses),
               "--tcp-time-unit", "us",
               "--timeline", str(timeline), "--timeline-step", str(TIMELINE_STEP),
               "--loglevel", "WARNING"]
        self.locust_log = open(self.workdir / "locust.log", "wb")
        # cwd = workdir: no stray locust.conf is picked up
        self.locust = subprocess.Popen(cmd, cwd=self.workdir, stdin=subprocess.DEVNULL,
                                       stdout=self.locust_log, stderr=subprocess.STDOUT)

    def stop_locust(self) -> None:
        """SIGINT: Locust stops the users, writes the CSV and the last timeline seconds."""
        if self.locust is not None:
            stop_process(self.locust, timeout=20.0, sig=signal.SIGINT)
            self.locust_log.close()

    def stop_all(self) -> None:
        self.stop_locust()
        if self.l4lb is not None:
            self.l4lb.stop()
        ours = set()
        for members in self.backends.values():
            for b in members:
                if b.proc:
                    ours.add(b.proc.pid)
                b.stop()
        # backends that `replace-backend` started for l4lb deploy (detached, pid written back)
        state = self.workdir / "backends.json"
        if state.exists():
            for entry in json.loads(state.read_text()).values():
                if entry["pid"] not in ours:
                    try:
                        os.kill(entry["pid"], signal.SIGTERM)
                    except ProcessLookupError:
                        pass


# --- deploy functions ------------------------------------------------------------------

def deploy_restart_backends(run: ScenarioRun) -> None:
    """Restart each backend of the active pool in turn as v2, on the same port, without
    telling l4lb: no drain, so requests on the killed connections fail (the baseline)."""
    for b in run.backends[run.scenario.active_pool]:
        run.mark("restart %s" % b.name)
        run.replace_backend(b, "v2", down_s=run.args.down_time)
        time.sleep(run.args.step_pause)
    run.mark("done")


def deploy_rolling(run: ScenarioRun) -> None:
    """`l4lb deploy rolling POOL --exec CMD`: per backend drain, wait, CMD, enable.

    CMD is this file's `replace-backend` subcommand, which l4lb calls with L4LB_BACKEND and
    L4LB_ADDRESS set; it stops that backend's process (pid file in the scenario's workdir)
    and starts v2 on the same port. Marks: drain, restart and enable of each backend."""
    pool = run.scenario.active_pool
    # l4lb deploy runs in the repo root: the script's relative path keeps its lines short
    exec_cmd = "%s loadtests/deploy_under_load.py replace-backend --workdir %s --version v2 " \
        "--startup %g" % (shlex.quote(sys.executable), shlex.quote(str(run.workdir)),
                          run.args.startup)
    write_pid_files(run)
    current = {"name": ""}

    def on_line(line: str) -> None:
        words = line.split()
        if line.startswith("[") and len(words) >= 2:          # [1/3] app/app1 (127.0.0.1:…)
            current["name"] = words[1].split("/", 1)[-1]
            run.mark("drain %s" % current["name"], quiet=True)
        elif current["name"] and line.strip().startswith(current["name"] + ": running"):
            run.mark("%s -> v2" % current["name"], quiet=True)
        elif current["name"] and "back in rotation" in line:
            run.mark("enable %s" % current["name"], quiet=True)

    run.l4lb.deploy(["rolling", pool, "--exec", exec_cmd,
                     "--drain-timeout", str(run.args.drain_timeout)], on_line)
    run.mark("done")


def deploy_blue_green(run: ScenarioRun) -> None:
    """`l4lb deploy blue-green app --to green`: switch once green is up, blue drains."""
    def on_line(line: str) -> None:
        if line.startswith("switched "):
            run.mark("switch to green", quiet=True)
        elif "drained in" in line:
            run.mark("blue drained", quiet=True)
        elif "left after the drain timeout" in line:
            run.mark("drain timeout: kill", quiet=True)

    run.l4lb.deploy(["blue-green", "app", "--to", "green",
                     "--drain-timeout", str(run.args.drain_timeout)], on_line)
    run.mark("done")


CANARY_STEPS = [10, 25, 50, 100]


def deploy_canary(run: ScenarioRun) -> None:
    """`l4lb deploy canary app --to green --steps 10,25,50,100`: the chart shows the green
    share stepping up; a step is marked when it starts (the command prints a line when
    the previous one has passed its watch)."""
    steps = iter(CANARY_STEPS)

    def on_line(line: str) -> None:
        if line.startswith("canary ") or line.startswith("step "):
            step = next(steps, None)
            if step is not None:
                run.mark("%d%% green" % step, quiet=True)
                run.split.append((time.time(), step))
        elif line.startswith("rolled back"):
            run.mark("rolled back", quiet=True)
            run.split.append((time.time(), 0))

    run.l4lb.deploy(["canary", "app", "--to", "green",
                     "--steps", ",".join(map(str, CANARY_STEPS)),
                     "--interval", str(run.args.step_pause)], on_line)
    run.mark("done")


SCENARIOS = {s.name: s for s in [
    Scenario("restart-backends", deploy_restart_backends, {"app": "v1"}, "app", False,
             "kill and restart each backend as v2 on its port, no drain (failures expected)"),
    Scenario("rolling", deploy_rolling, {"app": "v1"}, "app", True,
             "l4lb deploy rolling: drain, replace with v2, enable, one backend at a time"),
    Scenario("blue-green", deploy_blue_green, {"blue": "v1", "green": "v2"}, "blue", True,
             "l4lb deploy blue-green: switch the listener from pool blue (v1) to green (v2)"),
    Scenario("canary", deploy_canary, {"blue": "v1", "green": "v2"}, "blue", True,
             "l4lb deploy canary: shift 10/25/50/100 % from blue (v1) to green (v2)",
             reconnect_every=30),
]}


# --- `replace-backend`: the --exec command of a rolling deploy ---------------------------

def write_pid_files(run: ScenarioRun) -> None:
    """workdir/backends.json: name -> pid, port, for `replace-backend` run by l4lb deploy."""
    state = {b.name: {"pid": b.proc.pid, "port": b.port}
             for members in run.backends.values() for b in members if b.proc}
    (run.workdir / "backends.json").write_text(json.dumps(state))


def cmd_replace_backend(args) -> int:
    """Replace the backend named by $L4LB_BACKEND: SIGTERM its pid, start --version on its
    port, detached (the scenario runner stops it at the end by the pid written back)."""
    name = os.environ["L4LB_BACKEND"]
    path = Path(args.workdir) / "backends.json"
    state = json.loads(path.read_text())
    entry = state[name]
    try:
        os.kill(entry["pid"], signal.SIGTERM)
    except ProcessLookupError:
        pass
    # The old process must have let go of the port: started while it still listens, the
    # new one fails to bind and wait_listening would be answered by the old one.
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", entry["port"]), timeout=0.5).close()
        except OSError:
            break
        if time.monotonic() > deadline:
            print("replace-backend: pid %d still listens on %d" % (entry["pid"], entry["port"]),
                  file=sys.stderr)
            return 1
        time.sleep(0.02)
    time.sleep(args.startup)   # a real service takes a moment to start; the chart shows it
    log = open(Path(args.workdir) / ("%s.log" % name), "ab")
    proc = subprocess.Popen([sys.executable, str(ECHO_SERVER), "--port", str(entry["port"]),
                             "--name", args.version], stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    wait_listening(entry["port"], timeout=10, proc=proc)
    state[name] = {"pid": proc.pid, "port": entry["port"]}
    path.write_text(json.dumps(state))
    return 0


# --- results -----------------------------------------------------------------------------

def read_timeline(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    merged: dict[int, dict] = {}
    for r in rows:   # a second can appear twice (flushed, then more requests finished in it)
        m = merged.setdefault(r["t"], {"t": r["t"], "dt": r.get("dt", 1.0), "requests": 0,
                                       "failures": 0, "errors": {}, "versions": {}})
        m["requests"] += r["requests"]
        m["failures"] += r["failures"]
        for key in ("errors", "versions"):
            for k, v in r[key].items():
                m[key][k] = m[key].get(k, 0) + v
    return [merged[t] for t in sorted(merged)]


def read_totals(prefix: Path) -> dict:
    try:
        with open("%s_stats.csv" % prefix, newline="") as f:
            for row in csv.DictReader(f):
                if row["Name"] == "Aggregated":
                    return {"requests": int(row["Request Count"]),
                            "failures": int(row["Failure Count"]),
                            "rps": float(row["Requests/s"]),
                            "p50_us": row.get("50%"), "p99_us": row.get("99%")}
    except FileNotFoundError:
        pass
    return {}


def merge_marks(marks: list[tuple[float, str]], gap: float) -> list[tuple[float, str]]:
    """Marks closer than `gap` seconds to the previous one share its line and label
    ("enable app1, drain app2"), so labels don't print over each other."""
    out: list[tuple[float, str]] = []
    for x, label in sorted(marks):
        if out and x - out[-1][0] < gap:
            out[-1] = (out[-1][0], out[-1][1] + ", " + label)
        else:
            out.append((x, label))
    return out


def draw_timeline(timeline: list[dict], marks, png: Path, title: str,
                  names: dict[str, str] | None = None,
                  split: list[tuple[float, float]] | None = None) -> None:
    """Three panels on one time axis (0 s = load switched on): the deploy steps as labelled
    vertical lines, successful requests/s with failed requests/s as red bars, and the
    share of requests served by each backend version."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    t0 = marks[0][0] if marks else timeline[0]["t"]
    # A timeline row counts the requests that finished in [t, t+dt): drawn as a step from
    # t. The first and last buckets are cut short by the start and end of the load (their
    # rates would dip): not drawn.
    rows = timeline[1:-1] if len(timeline) > 3 else timeline
    xs = [r["t"] - t0 for r in rows]
    ok = [(r["requests"] - r["failures"]) / r["dt"] for r in rows]
    failed = [r["failures"] / r["dt"] for r in rows]
    dt = rows[0]["dt"]
    versions = sorted({v for r in timeline for v in r["versions"]})
    fig, (axm, ax1, ax2) = plt.subplots(3, 1, figsize=(11, 8), sharex=True,
                                        gridspec_kw={"height_ratios": [1.3, 3, 2]})
    ax1.plot(xs, ok, color="#2b8cbe", label="successful requests/s", drawstyle="steps-post")
    ax1.set_ylabel("requests/s")
    ax1.set_ylim(0, max(ok + [1]) * 1.15)
    axf = ax1.twinx()
    axf.bar(xs, failed, width=dt, align="edge", color="#de2d26", alpha=0.7,
            label="failed requests/s (%d failed in all)"
            % sum(r["failures"] for r in timeline))
    axf.set_ylabel("failed requests/s", color="#de2d26")
    axf.set_ylim(0, max(1, max(failed)) * 1.3)
    axf.yaxis.set_major_locator(MaxNLocator(integer=True))
    handles = ax1.get_legend_handles_labels()[0] + axf.get_legend_handles_labels()[0]
    ax1.legend(handles, [h.get_label() for h in handles], loc="lower left", fontsize=9,
               framealpha=0.9)
    ax1.grid(alpha=0.3)

    palette = {"v1": "#9ecae1", "v2": "#fd8d3c"}
    others = iter(["#74c476", "#9e9ac8", "#bdbdbd", "#fdd0a2"])
    shares = []
    for v in versions:
        shares.append([100.0 * r["versions"].get(v, 0) / max(1, sum(r["versions"].values()))
                       for r in rows])
    ax2.stackplot(xs, *shares, labels=[(names or {}).get(v, v) for v in versions],
                  colors=[palette.get(v) or next(others) for v in versions], step="post")
    if split:   # the configured share of the new version, as the boundary it should follow
        sx = [0.0] + [when - t0 for when, _ in split] + [xs[-1] + dt]
        sy = [100.0] + [100.0 - pct for _, pct in split]
        sy.append(sy[-1])
        ax2.step(sx, sy, where="post", color="black", linewidth=1.5,
                 label="split: new connections to %s" % (names or {}).get(versions[-1],
                                                                       versions[-1]))
    ax2.set_ylabel("% of requests\nserved by version")
    ax2.set_ylim(0, 100)
    ax2.set_xlabel("seconds since the load started")
    ax2.legend(loc="lower left", fontsize=9, framealpha=0.9)

    # The step strip: one rotated label per mark, written upwards from its line.
    axm.set_ylim(0, 1)
    axm.set_yticks([])
    for side in ("top", "left", "right"):
        axm.spines[side].set_visible(False)
    fig.suptitle(title, fontsize=11)
    span = max(1.0, (xs[-1] + dt) if xs else 1.0)
    for x, label in merge_marks([(when - t0, label) for when, label in marks], span / 80):
        for ax in (axm, ax1, ax2):
            ax.axvline(x, color="black", linestyle="--", linewidth=0.7, alpha=0.8)
        axm.text(x, 0.04, label, rotation=90, va="bottom", ha="right", fontsize=8)
    ax2.set_xlim(min(0.0, xs[0] if xs else 0.0), span)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def chart_path(timeline_path: Path) -> Path:
    return timeline_path.with_name(timeline_path.stem + "-chart.json")


def draw_chart(timeline_path: Path, png: Path) -> None:
    """Draw a run's PNG from its timeline and the -chart.json beside it."""
    chart = json.loads(chart_path(timeline_path).read_text())
    draw_timeline(read_timeline(timeline_path), [tuple(m) for m in chart["marks"]], png,
                  chart["title"], chart["names"], [tuple(x) for x in chart["split"]])


# --- main ----------------------------------------------------------------------------------

def wait_for_timeline(run: ScenarioRun, path: Path, done: Callable[[list[dict]], bool],
                      timeout: float = SETTLE_TIMEOUT) -> None:
    """Wait until `done(rows of the timeline so far)` holds (Locust flushes a bucket once
    it is over). RuntimeError when Locust exits first; after `timeout` s it goes on, and the
    result shows what the load saw."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run.locust.poll() is not None:
            raise RuntimeError("locust exited early; log:\n"
                               + (run.workdir / "locust.log").read_text()[-3000:])
        if done(read_timeline(path)):
            return
        time.sleep(TIMELINE_STEP)


def run_scenario(scenario: Scenario, args) -> int:
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / ("deploy-%s-%s" % (scenario.name, time.strftime("%Y%m%d-%H%M%S")))
    timeline_path = stem.with_suffix(".jsonl")
    workdir = Path(tempfile.mkdtemp(prefix="l4lb-deploy-"))
    run = ScenarioRun(scenario, args, workdir)
    print("scenario %s: %s" % (scenario.name, scenario.about))
    print("scratch: %s" % workdir)
    deploy_error = None
    try:
        run.start_backends()
        run.l4lb = L4LBProcess(run.config_text(), workdir)
        run.start_locust(stem, timeline_path)
        run.mark("load on")
        time.sleep(args.warmup)
        wait_for_timeline(run, timeline_path, lambda rows: sum(
            sum(r["versions"].values()) for r in rows) >= WARMUP_REQUESTS)
        try:
            scenario.deploy(run)
        except Exception as exc:   # a failed deploy is a result: stop, report, still chart
            deploy_error = exc
            run.mark("deploy failed")
        deployed_at = time.time()
        time.sleep(args.cooldown)
        wait_for_timeline(run, timeline_path, lambda rows: any(
            r["t"] >= deployed_at and sum(r["versions"].values()) > 0 for r in rows))
    finally:
        run.stop_all()
        if args.keep_workdir or deploy_error:
            print("scratch kept: %s" % workdir)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    timeline = read_timeline(timeline_path)
    totals = read_totals(stem)
    # Counts from the timeline: the same events as Locust's summary and its final CSV,
    # split by backend version.
    failures = sum(r["failures"] for r in timeline)
    requests = sum(r["requests"] for r in timeline)
    errors: dict[str, int] = {}
    served: dict[str, int] = {}
    for r in timeline:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
        for k, v in r["versions"].items():
            served[k] = served.get(k, 0) + v
    print("\nrequests: %d   failed: %d%s" % (
        requests, failures, "   (%s)" % ", ".join("%s %d" % kv for kv in sorted(errors.items()))
        if errors else ""))
    print("served by version: %s" % ", ".join("%s %d" % kv for kv in sorted(served.items())))
    if totals:
        print("requests/s: %.0f   p50: %s µs   p99: %s µs" % (
            totals["rps"], totals["p50_us"], totals["p99_us"]))
    load = "%s, %d users" % (args.user_class, args.users)
    if args.user_class == "PersistentUser":
        load += (", reconnect every %d requests" % args.reconnect_every
                 if args.reconnect_every else ", connections kept")
    # What the chart needs besides the timeline, so --chart-only can redraw it later.
    chart = {"title": "%s under load (%s): %d failed of %d requests"
                      % (scenario.name, load, failures, requests),
             "marks": run.marks, "split": run.split,
             "names": ({v: "%s (pool %s)" % (v, pool) for pool, v in scenario.pools.items()}
                       if len(scenario.pools) > 1 else None)}
    chart_path(timeline_path).write_text(json.dumps(chart))
    if timeline and not args.no_plot:
        png = stem.with_suffix(".png")
        draw_chart(timeline_path, png)
        print("chart: %s" % png)
    print("timeline: %s\nstats: %s_stats.csv" % (timeline_path, stem))
    if deploy_error:
        print("deploy failed: %s" % deploy_error)
        return 1
    if scenario.zero_failures and failures:
        print("FAIL: %s promises zero failed requests" % scenario.name)
        return 1
    if not scenario.zero_failures:
        print("(%s does not drain: failures are expected; the l4lb deploys must show 0)"
              % scenario.name)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["replace-backend"]:
        ap = argparse.ArgumentParser(prog="deploy_under_load.py replace-backend")
        ap.add_argument("--workdir", required=True)
        ap.add_argument("--version", required=True)
        ap.add_argument("--startup", type=float, default=0.0,
                        help="seconds the new version takes to start listening")
        return cmd_replace_backend(ap.parse_args(argv[1:]))

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("scenario", nargs="?", choices=sorted(SCENARIOS))
    ap.add_argument("--list", action="store_true", help="list the scenarios")
    ap.add_argument("--backends", type=int, default=3, help="backends per pool (default 3)")
    ap.add_argument("--users", type=int, default=20, help="Locust users (default 20)")
    ap.add_argument("--user-class", default="PersistentUser",
                    choices=["PersistentUser", "ConnectionPerRequestUser"])
    ap.add_argument("--wait", type=float, default=0.01,
                    help="pause between a user's requests, s (default 0.01)")
    ap.add_argument("--reconnect-every", type=int, default=None, metavar="N",
                    help="PersistentUser closes its connection after about N requests and "
                         "opens a new one (default 100, canary 30; 0 = keep it: drains "
                         "then run into --drain-timeout and the killed connections fail)")
    ap.add_argument("--source-addresses", type=int, default=200, metavar="N",
                    help="spread connections over N client addresses 127.0.0.2.. (default "
                         "200): a canary split is sticky by client IP, so from one address "
                         "every connection would land on the same side")
    ap.add_argument("--algorithm", default="rr", help="pool algorithm (default rr)")
    ap.add_argument("--workers", default="2",
                    help='l4lb worker processes, or "auto" (default 2: the deploy moves '
                         "connections spread over several workers)")
    ap.add_argument("--down-time", type=float, default=1.0,
                    help="restart-backends: seconds a backend stays down (default 1)")
    ap.add_argument("--step-pause", type=float, default=3.0,
                    help="seconds between restart-backends steps and per canary step "
                         "(default 3)")
    ap.add_argument("--startup", type=float, default=1.0,
                    help="rolling: seconds a new backend version takes to start (default 1)")
    ap.add_argument("--drain-timeout", type=float, default=30.0,
                    help="rolling, blue-green: l4lb deploy --drain-timeout (default 30)")
    ap.add_argument("--warmup", type=float, default=WARMUP_S,
                    help="seconds of load before the deploy, at least; it also waits for %d "
                         "requests served (default %g)" % (WARMUP_REQUESTS, WARMUP_S))
    ap.add_argument("--cooldown", type=float, default=COOLDOWN_S,
                    help="seconds of load after it, at least; it also waits for a timeline bucket "
                         "served wholly after the deploy (default %g)" % COOLDOWN_S)
    ap.add_argument("--results", default=str(RESULTS),
                    help="folder for the chart, timeline and CSVs (default loadtests/results)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--chart-only", metavar="TIMELINE.jsonl",
                    help="redraw the PNG of an earlier run (beside its timeline) and exit")
    ap.add_argument("--keep-workdir", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    if args.chart_only:
        timeline = Path(args.chart_only)
        png = timeline.with_suffix(".png")
        draw_chart(timeline, png)
        print("chart: %s" % png)
        return 0
    if args.list or not args.scenario:
        for s in SCENARIOS.values():
            print("%-17s %s" % (s.name, s.about))
        return 0
    scenario = SCENARIOS[args.scenario]
    if args.reconnect_every is None:
        args.reconnect_every = scenario.reconnect_every
    return run_scenario(scenario, args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
