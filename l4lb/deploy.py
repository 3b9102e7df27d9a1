"""`l4lb deploy`: rolling, blue-green and canary rollouts driven over the control socket.

Theory of operation
-------------------
A deploy is a client of the control socket (DESIGN.md §6) and nothing more: it works
against any running balancer, and every step it takes an operator could take by hand with
`l4lb ctl`. It polls `show backends` / `show listeners` every POLL_INTERVAL instead of
holding a `wait` open, so it can print progress (connections left, elapsed) meanwhile.
Because the control socket is a Unix socket, a deploy runs on the balancer's host and sees
the backends' addresses as the balancer does; that is what makes a plain TCP connect from
here a fair readiness test.

Each strategy has one safe state it leaves behind when anything fails (a command refused,
a timeout, the balancer gone) or the operator presses Ctrl-C, and says so:

* rolling: the backend being replaced is left in `maint` (no new connections, health
  checks paused, its connections untouched), marked as the deploy's (`disable ... by
  deploy`, kept in the state file), so a rerun replaces it and puts it back while a maint
  an operator set stays; backends already replaced stay in rotation, the rest were never
  touched. Stopped while draining (before the command ran), the backend is put back in the
  state it had. The deploy stops at the first failure.
* blue-green: before the switch nothing has changed. After it the new route stays (the
  new pool was checked up before switching); on Ctrl-C the old pool's connections are left
  to finish on their own rather than killed.
* canary: the listener's route is restored exactly as it was when the deploy started
  (its pool, or its split with the same percentages). A canary that reaches 100 % ends
  as blue-green does: the old pools are drained (and killed after the drain timeout).

In a fleet (the balancer has [cluster], DESIGN.md §10) a deploy run against any one node
deploys the fleet: every change it sends carries `--fleet`, so its reply (and the next
step) comes only once every live node applied it, and the connections it waits to end
are the fleet's (`show cluster`: every live node's count), not one node's.

Not guaranteed: a deploy holds no lock, so an operator changing the same pool or listener
at the same time can confuse it; and a balancer that dies mid-deploy keeps whatever its
state file recorded (DESIGN.md §6), which is the state at that moment.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

from .address import parse_address
from .control.client import ControlClient, ControlClientError

# Seconds between two looks at the balancer while waiting (drain, readiness, canary
# step): often enough that a deploy reacts within a blink, rare enough to cost the
# balancer's loop nothing (one `show backends` is a few µs per backend).
POLL_INTERVAL = 0.25
# Seconds between two progress lines while draining or waiting for readiness.
PROGRESS_INTERVAL = 1.0
# Seconds one readiness TCP connect may take before it counts as "not yet".
CONNECT_PROBE_TIMEOUT = 1.0

DEFAULT_DRAIN_TIMEOUT = 30.0
DEFAULT_READY_TIMEOUT = 30.0
DEFAULT_MAX_FAILURE_RATE = 0.05

# Appended to the drain and disable a deploy sends, so the balancer (and its state file)
# knows that admin state is the deploy's (vocab.SET_BY_WORDS).
BY_DEPLOY = "by deploy"
# Phases of a rolling deploy before the backend is touched for good: stopped there, it is
# put back where it was rather than left in maint.
PHASES_BEFORE_MAINT = ("draining", "killing the connections of")
# The commands a deploy sends that change state: in a fleet they carry `--fleet`.
FLEET_WRITES = ("drain", "disable", "enable", "switch", "split", "weight")


class DeployError(Exception):
    """The deploy stopped. The message says why and in what state it left things."""

    exit_code = 1


class DeployInterrupted(DeployError):
    """Ctrl-C: the deploy restored its safe state and stopped."""

    exit_code = 130


class Control:
    """The control socket as a deploy uses it: one connection for the whole deploy,
    dropped and reopened after an interrupt (a reply to a command cut short by Ctrl-C
    would otherwise be read as the reply to the next one)."""

    def __init__(self, path, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout
        self.client: ControlClient | None = None

    def call(self, line: str) -> dict:
        """The reply to `line`; ControlClientError if the balancer cannot be reached."""
        if self.client is None:
            self.client = ControlClient(self.path, self.timeout)
        return self.client.call(line)

    def reconnect(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    close = reconnect


# --- small pure helpers ---------------------------------------------------------------

def split_host_port(address: str) -> tuple[str, int]:
    """"127.0.0.1:9001" / "[::1]:9001" / "app.local:9001" -> (host, port), by the one
    address rule the balancer applies to backends (l4lb.address); ValueError if malformed."""
    parsed = parse_address(address)
    return parsed.host, parsed.port


def accepts_connections(address: str, timeout: float = CONNECT_PROBE_TIMEOUT) -> bool:
    """True when a TCP connect to `address` succeeds (the connection is closed at once)."""
    try:
        with socket.create_connection(split_host_port(address), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def run_shell(command: str, env: dict[str, str]) -> int:
    """Run `command` through the shell with `env`; its output goes to ours. Returns the
    exit status (negative: killed by that signal)."""
    return subprocess.run(command, shell=True, env=env).returncode


def route_of(listener_row: dict) -> dict:
    """A `show listeners` row's route: {"pool": NAME} or {"split": {NAME: PCT, ...}}."""
    if listener_row.get("split"):
        return {"split": dict(listener_row["split"])}
    return {"pool": listener_row["pool"]}


def connections(n: int) -> str:
    return f"{n} connection{'' if n == 1 else 's'}"


def describe_route(route: dict) -> str:
    if "split" in route:
        return "split " + " ".join(f"{p}={pct}" for p, pct in route["split"].items())
    return f"pool {route['pool']}"


def route_pools(route: dict) -> list[str]:
    """The pools a route sends new connections to (a 0 % share sends none)."""
    if "split" in route:
        return [p for p, pct in route["split"].items() if pct > 0]
    return [route["pool"]]


def canary_split(start: dict, new_pool: str, pct: int) -> dict[str, int]:
    """The split giving `new_pool` `pct` percent and the starting route's other pools the
    rest, in their starting proportions (largest remainders, so the sum is exactly 100).
    ValueError when the starting route sends nothing elsewhere."""
    others = ({start["pool"]: 100} if "pool" in start else dict(start["split"]))
    others.pop(new_pool, None)
    total = sum(others.values())
    if total <= 0:
        raise ValueError(f"the route sends no connections to any pool but {new_pool}")
    rest = 100 - pct
    exact = {p: share * rest / total for p, share in others.items()}
    shares = {p: int(v) for p, v in exact.items()}
    by_remainder = sorted(others, key=lambda p: exact[p] - shares[p], reverse=True)
    for p in by_remainder[:rest - sum(shares.values())]:
        shares[p] += 1
    shares[new_pool] = pct
    return shares


def parse_steps(text: str) -> list[int]:
    """"5,25,50,100" -> [5, 25, 50, 100]: whole percentages 1..100, strictly rising
    (argparse type: ArgumentTypeError otherwise)."""
    try:
        steps = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad steps {text!r}: want e.g. 5,25,50,100") from None
    if not all(1 <= s <= 100 for s in steps):
        raise argparse.ArgumentTypeError("each step is a percentage from 1 to 100")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise argparse.ArgumentTypeError("steps must rise, e.g. 5,25,50,100")
    return steps


def seconds(text: str) -> float:
    """argparse type: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad seconds {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be 0 or more, got {text}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1 (0.05 = 5 %)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad fraction {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"want a fraction from 0 to 1 (0.05 = 5%), got {text}")
    return value


@contextlib.contextmanager
def sigint_deferred():
    """Ignore Ctrl-C while the safe state is being restored: a second Ctrl-C must not
    leave a rollback half done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# --- what every strategy shares ------------------------------------------------------

class Deploy:
    """Control-socket plumbing, waiting and printing shared by the strategies.

    `control` has `call(line) -> reply dict` (and optionally `reconnect()`); `out`
    prints one progress line; `sleep` and `clock` are injectable for tests.
    """

    def __init__(self, control, *, out: Callable[[str], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, fleet: bool = False):
        self.control = control
        self.fleet = fleet              # the balancer is a fleet's node (is_fleet_node)
        self.out = out or functools.partial(print, flush=True)
        self.sleep = sleep
        self.clock = clock
        self.started = clock()

    def elapsed(self, since: float | None = None) -> float:
        return self.clock() - (self.started if since is None else since)

    def ctl(self, line: str) -> dict:
        """Send one command. DeployError when the balancer refuses it or is unreachable."""
        if self.fleet and line.split(" ", 1)[0] in FLEET_WRITES:
            line += " --fleet"
        try:
            reply = self.control.call(line)
        except ControlClientError as exc:
            raise DeployError(str(exc)) from None
        if not reply.get("ok"):
            raise DeployError(f"`{line}` was refused: {reply.get('error')}")
        return reply

    def try_ctl(self, line: str) -> str | None:
        """Send a command on the way out of a failure; returns the error text instead of
        raising, so the caller can still report the original failure."""
        try:
            self.ctl(line)
            return None
        except DeployError as exc:
            return str(exc)

    def reconnect(self) -> None:
        reconnect = getattr(self.control, "reconnect", None)
        if reconnect is not None:
            reconnect()

    def backends(self, pool: str) -> dict[str, dict]:
        """`show backends POOL` rows by backend name, in the balancer's order; in a fleet
        `active` is the fleet's (every live node's connections)."""
        rows = {row["name"]: row for row in self.ctl(f"show backends {pool}")["backends"]}
        if self.fleet:
            nodes = self.ctl("show cluster")["nodes"]
            for name, row in rows.items():
                row["active"] = sum(n["backends"].get(f"{pool}/{name}", 0) for n in nodes)
        return rows

    def listeners(self) -> dict[str, dict]:
        return {row["name"]: row for row in self.ctl("show listeners")["listeners"]}

    def listener(self, name: str) -> dict:
        try:
            return self.listeners()[name]
        except KeyError:
            raise DeployError(f"unknown listener '{name}'") from None

    def set_route(self, listener: str, route: dict) -> None:
        """Route `listener` exactly as `route` says (`switch` or `split`)."""
        if "split" in route:
            shares = " ".join(f"{p}={pct}" for p, pct in route["split"].items())
            self.ctl(f"split {listener} {shares}")
        else:
            self.ctl(f"switch {listener} {route['pool']}")

    def check_pool_ready(self, pool: str) -> None:
        """Refuse (DeployError, nothing changed) unless `pool` has backends and every one
        of them is `up` with a health check that is not failing."""
        rows = self.backends(pool)
        if not rows:
            raise DeployError(f"refused: pool {pool} has no backends; nothing changed")
        unready = [f"{name} ({row['state']}, health {row['health']})"
                   for name, row in rows.items()
                   if row["state"] != "up" or row["health"] == "failing"]
        if unready:
            raise DeployError(f"refused: not every backend of pool {pool} is up: "
                              f"{', '.join(unready)}; nothing changed")

    def drain_old_pools(self, listener: str, start: dict, to: str,
                        drain_timeout: float) -> int:
        """After `listener` was moved from route `start` to pool `to`: wait for the old
        pools' connections to end, kill what is left after `drain_timeout`; returns how
        many were killed. Blue-green and a canary that reached 100 % end alike."""
        old = self.old_pools_to_drain(listener, start, to)
        left = self.wait_until_idle(
            ", ".join(old) or "old pool", lambda: self.active_in(old), drain_timeout)
        return self.kill_remaining(old) if left else 0

    def old_pools_to_drain(self, listener: str, start: dict, to: str) -> list[str]:
        """The starting route's pools, minus the new one and minus any pool another
        listener still routes to (its connections are not ours to wait for or kill)."""
        in_use = {p for name, row in self.listeners().items() if name != listener
                  for p in route_pools(route_of(row))}
        old = []
        for pool in route_pools(start):
            if pool == to:
                continue
            if pool in in_use:
                self.out(f"  pool {pool} is still routed by another listener: not waiting "
                         f"for it to drain")
                continue
            old.append(pool)
        return old

    def active_in(self, pools: list[str]) -> int:
        return sum(row["active"] for pool in pools for row in self.backends(pool).values())

    def kill_remaining(self, pools: list[str]) -> int:
        killed = 0
        for pool in pools:
            for name, row in self.backends(pool).items():
                if row["active"]:
                    killed += self.ctl(f"kill {pool}/{name}").get("closed", 0)
        self.out(f"  killed {connections(killed)} left on {', '.join(pools)}")
        return killed

    def wait_until_idle(self, label: str, count_active: Callable[[], int],
                        timeout: float) -> int:
        """Poll `count_active()` until it is 0 or `timeout` seconds passed, printing a
        progress line every PROGRESS_INTERVAL. Returns the connections still active at
        the timeout (0 when drained). Raises only what count_active raises."""
        start = self.clock()
        last_line = None
        while True:
            left = count_active()
            waited = self.elapsed(start)
            if left == 0:
                self.out(f"  {label}: drained in {waited:.1f} s")
                return 0
            if waited >= timeout:
                self.out(f"  {label}: {connections(left)} left after the drain timeout "
                         f"({timeout:g} s)")
                return left
            if last_line is None or self.clock() - last_line >= PROGRESS_INTERVAL:
                self.out(f"  {label}: {connections(left)} left, {waited:.1f} s")
                last_line = self.clock()
            self.sleep(min(POLL_INTERVAL, max(0.0, timeout - waited)))


# --- rolling ---------------------------------------------------------------------------

class RollingDeploy(Deploy):
    """Replace a pool's backends one at a time: drain, run the command, back in rotation.

    Per backend (in `show backends` order):
      1. `drain`, then wait until it has no connections; after `drain_timeout` the rest
         are closed with `kill` and counted;
      2. `disable` (maint): its safe state while the command runs;
      3. run `command` via the shell with L4LB_POOL, L4LB_BACKEND, L4LB_ADDRESS set;
      4. wait until the address accepts a TCP connection — before `enable`, so no client
         is ever routed to a port that is still closed;
      5. `enable`; when the pool has health checks, wait until a probe made after the
         enable passes (`health` "passing" with a newer `last_check`).
    Steps 4-5 share one `ready_timeout`. The drain and the maint are sent `by deploy`.
    A backend an operator put in maint before the deploy gets the new version but stays
    in maint (we don't put it back); one a failed earlier deploy left in maint (set_by
    deploy) is replaced and enabled, so a rerun finishes the work.

    On failure (non-zero exit, not ready in time, a refused command) or Ctrl-C the
    backend being replaced is left in maint, the deploy stops and DeployError says
    which backend, why, and which are done; backends not reached are untouched. Stopped
    while it drained (the command never ran), the backend is put back as it was.
    """

    def __init__(self, control, pool: str, command: str, *,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                 ready_timeout: float = DEFAULT_READY_TIMEOUT,
                 run_command: Callable[[str, dict], int] = run_shell,
                 probe: Callable[[str], bool] = accepts_connections, **kw):
        super().__init__(control, **kw)
        self.pool = pool
        self.command = command
        self.drain_timeout = drain_timeout
        self.ready_timeout = ready_timeout
        self.run_command = run_command
        self.probe = probe
        self.done: list[str] = []
        self.kept_in_maint: list[str] = []   # replaced, left in the operator's maint
        self.by = f" {BY_DEPLOY}"            # the marker of the backend being replaced
        self.drained = 0
        self.killed = 0
        self.phase = "starting"

    def run(self) -> None:
        rows = self.backends(self.pool)
        if not rows:
            raise DeployError(f"pool {self.pool} has no backends; nothing to deploy")
        # `checked` (whether the pool has health checks) is in every show backends row;
        # a balancer without it is guessed from the health column.
        checked = any(row.get("checked", row["health"] != "unchecked")
                      for row in rows.values())
        self.out(f"rolling deploy of pool {self.pool}: {len(rows)} backends, one at a time; "
                 f"ready = {'health check passes' if checked else 'TCP connect succeeds'}")
        for i, (name, row) in enumerate(rows.items(), 1):
            self.out(f"[{i}/{len(rows)}] {self.pool}/{name} ({row['address']})")
            self.replace_one(row, checked, not_started=list(rows)[i:])
        kept = (f"; left in maint as the operator set it: {', '.join(self.kept_in_maint)}"
                if self.kept_in_maint else "")
        self.out(f"done: {len(self.done)}/{len(rows)} backends of {self.pool} replaced in "
                 f"{self.elapsed():.1f} s; connections drained {self.drained}, "
                 f"killed {self.killed}{kept}")

    def replace_one(self, row: dict, checked: bool, not_started: list[str]) -> None:
        """replace_backend, turning any failure or Ctrl-C into 'this backend in maint,
        deploy stopped' and a DeployError saying so."""
        ref = f"{self.pool}/{row['name']}"
        where = (f"done: {', '.join(self.done) or 'none'}; "
                 f"not started: {', '.join(not_started) or 'none'}")
        try:
            self.replace_backend(row, checked)
        except KeyboardInterrupt:
            self.reconnect()
            with sigint_deferred():
                safe = self.make_safe(ref, row)
            raise DeployInterrupted(f"interrupted while {self.phase} {ref}; {safe}; {where}")
        except DeployError as exc:
            with sigint_deferred():
                safe = self.make_safe(ref, row)
            raise DeployError(f"{ref}: {exc}; {safe}; {where}") from None
        self.done.append(row["name"])

    def make_safe(self, ref: str, row: dict) -> str:
        """The safe state after a failure or Ctrl-C: back where it was while it was only
        being drained, else in the deploy's maint. Returns what was done, for the error."""
        if self.phase in PHASES_BEFORE_MAINT:
            return self.put_back(ref, row)
        return self.leave_in_maint(ref)

    def leave_in_maint(self, ref: str) -> str:
        problem = self.try_ctl(f"disable {ref}{self.by}")
        return (f"{ref} left in maint" if problem is None
                else f"could not put {ref} in maint ({problem}): check it by hand")

    def put_back(self, ref: str, row: dict) -> str:
        """Restore the state `row` (its `show backends` row before the deploy) had."""
        state = row["state"]
        by = f" {BY_DEPLOY}" if row.get("set_by") == "deploy" else ""
        line = {"maint": f"disable {ref}{by}",
                "draining": f"drain {ref}{by}"}.get(state, f"enable {ref}")
        problem = self.try_ctl(line)
        return (f"{ref} was not replaced and is back to {state}" if problem is None
                else f"could not put {ref} back to {state} ({problem}): check it by hand")

    def replace_backend(self, row: dict, checked: bool) -> None:
        ref = f"{self.pool}/{row['name']}"
        # An operator's maint is kept, and stays the operator's even if we fail here; a
        # deploy's (an earlier run that failed) is ours to finish.
        was_maint = row["state"] == "maint" and row.get("set_by") != "deploy"
        self.by = "" if was_maint else f" {BY_DEPLOY}"
        self.drain_backend(ref)
        self.phase = "putting in maint"
        self.ctl(f"disable {ref}{self.by}")
        self.run_deploy_command(row)
        ready_by = self.clock() + self.ready_timeout
        self.wait_until_accepting(row, ready_by)
        if was_maint:
            self.out(f"  {row['name']}: was in maint before the deploy, left in maint")
            self.kept_in_maint.append(row["name"])
            return
        baseline = self.backends(self.pool)[row["name"]].get("last_check")
        self.phase = "enabling"
        self.ctl(f"enable {ref}")
        if checked:
            self.wait_until_healthy(row, baseline, ready_by)
        self.out(f"  {row['name']}: back in rotation ({self.elapsed():.1f} s)")

    def drain_backend(self, ref: str) -> None:
        """Drain, wait for the connections to end, kill what is left after the drain
        timeout; counts both for the summary."""
        self.phase = "draining"
        name = ref.split("/", 1)[1]
        self.ctl(f"drain {ref}{self.by}")
        active = lambda: self.backends(self.pool)[name]["active"]
        before = active()
        left = self.wait_until_idle(name, active, self.drain_timeout)
        killed = 0
        if left:
            self.phase = "killing the connections of"
            killed = self.ctl(f"kill {ref}").get("closed", left)
            self.out(f"  {name}: killed {connections(killed)}")
        self.killed += killed
        self.drained += max(0, before - killed)

    def run_deploy_command(self, row: dict) -> None:
        """DeployError when the command exits non-zero."""
        self.phase = "running the command for"
        env = dict(os.environ, L4LB_POOL=self.pool, L4LB_BACKEND=row["name"],
                   L4LB_ADDRESS=row["address"])
        self.out(f"  {row['name']}: running {self.command}")
        status = self.run_command(self.command, env)
        if status != 0:
            how = f"killed by signal {-status}" if status < 0 else f"exited with status {status}"
            raise DeployError(f"the command {how}")

    def wait_until_accepting(self, row: dict, ready_by: float) -> None:
        """DeployError when the address refuses TCP connections until `ready_by`."""
        self.phase = "waiting for connections on"
        start = self.clock()
        last_line = start
        while not self.probe(row["address"]):
            if self.clock() >= ready_by:
                raise DeployError(f"{row['address']} did not accept connections within "
                                  f"{self.ready_timeout:g} s")
            if self.clock() - last_line >= PROGRESS_INTERVAL:
                self.out(f"  {row['name']}: not accepting connections yet, "
                         f"{self.elapsed(start):.1f} s")
                last_line = self.clock()
            self.sleep(POLL_INTERVAL)
        self.out(f"  {row['name']}: accepting connections after {self.elapsed(start):.1f} s")

    def wait_until_healthy(self, row: dict, baseline, ready_by: float) -> None:
        """Wait for a health probe made after the enable to pass. DeployError otherwise
        (the caller puts the backend back in maint)."""
        self.phase = "waiting for the health check of"
        start = self.clock()
        last_line = start
        while True:
            now = self.backends(self.pool)[row["name"]]
            if (now["health"] == "passing" and now["state"] == "up"
                    and now.get("last_check") != baseline):
                self.out(f"  {row['name']}: health check passing after "
                         f"{self.elapsed(start):.1f} s")
                return
            if self.clock() >= ready_by:
                error = f" (last error: {now['last_error']})" if now.get("last_error") else ""
                raise DeployError(f"health check not passing within {self.ready_timeout:g} s: "
                                  f"state {now['state']}, health {now['health']}{error}")
            if self.clock() - last_line >= PROGRESS_INTERVAL:
                self.out(f"  {row['name']}: {now['state']}, health {now['health']}, "
                         f"{self.elapsed(start):.1f} s")
                last_line = self.clock()
            self.sleep(POLL_INTERVAL)


# --- blue-green ----------------------------------------------------------------------

class BlueGreenDeploy(Deploy):
    """Switch a listener to another pool at once, then wait for the old pool(s) to drain.

    Refused (nothing changed) unless the new pool has backends and every one is up and
    not failing its health check. After the switch, the old pools' connections get
    `drain_timeout` seconds to end; the rest are closed with `kill` and counted. An old
    pool still routed by another listener is neither waited for nor killed.
    Ctrl-C before the switch changes nothing; after it the switch stays and old
    connections are left running.
    """

    def __init__(self, control, listener: str, to: str, *,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT, **kw):
        super().__init__(control, **kw)
        self.listener_name = listener
        self.to = to
        self.drain_timeout = drain_timeout
        self.switched = False

    def run(self) -> None:
        try:
            self.switch_and_drain()
        except KeyboardInterrupt:
            self.reconnect()
            if not self.switched_really():
                raise DeployInterrupted("interrupted before the switch; nothing changed")
            raise DeployInterrupted(
                f"interrupted while the old pool drained; {self.listener_name} routes to "
                f"{self.to}; old connections are left to finish on their own")

    def switched_really(self) -> bool:
        """After Ctrl-C: did the switch happen (the reply may have been cut short)?"""
        if self.switched:
            return True
        try:
            return route_of(self.listener(self.listener_name)) == {"pool": self.to}
        except DeployError:
            return False

    def switch_and_drain(self) -> None:
        start = route_of(self.listener(self.listener_name))
        if start == {"pool": self.to}:
            self.out(f"{self.listener_name} already routes to pool {self.to}; nothing to do")
            return
        self.check_pool_ready(self.to)
        self.ctl(f"switch {self.listener_name} {self.to}")
        self.switched = True
        self.out(f"switched {self.listener_name}: {describe_route(start)} -> pool {self.to}")
        killed = self.drain_old_pools(self.listener_name, start, self.to, self.drain_timeout)
        self.out(f"done: {self.listener_name} -> {self.to} in {self.elapsed():.1f} s; "
                 f"old connections killed after the drain timeout: {killed}")


# --- canary --------------------------------------------------------------------------

class CanaryDeploy(Deploy):
    """Shift a listener's new connections to a pool step by step, watching it.

    Refused (nothing changed) unless the new pool's backends are all up. At each step
    the new pool gets that percentage (`split`; 100 = `switch`), and for `interval`
    seconds, looking every POLL_INTERVAL, the step must keep: every backend of the new
    pool neither down nor failing its health check, at least one up, and connect
    failures / connect attempts (deltas of `failed` and `total` + `failed` since the
    step began) at most `max_failure_rate`. A step without connect attempts passes.
    On a breach, an error or Ctrl-C the route is restored exactly as it started and
    DeployError says why. After the last step the route stays; when it is 100 (a
    switch) the old pools are drained as blue-green drains them (`drain_timeout`, then
    `kill`), so both strategies leave the same end state. Ctrl-C during that drain keeps
    the switch and leaves the old connections to finish.
    """

    def __init__(self, control, listener: str, to: str, steps: list[int], interval: float,
                 *, max_failure_rate: float = DEFAULT_MAX_FAILURE_RATE,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT, **kw):
        super().__init__(control, **kw)
        self.drain_timeout = drain_timeout
        self.listener_name = listener
        self.to = to
        self.steps = steps
        self.interval = interval
        self.max_failure_rate = max_failure_rate
        self.step = 0

    def run(self) -> None:
        start = route_of(self.listener(self.listener_name))
        if route_pools(start) == [self.to]:
            self.out(f"{self.listener_name} already routes to pool {self.to}; nothing to do")
            return
        self.check_pool_ready(self.to)
        self.out(f"canary {self.listener_name} -> {self.to}: steps "
                 f"{','.join(map(str, self.steps))}%, {self.interval:g} s each, "
                 f"max failure rate {self.max_failure_rate:.1%}; "
                 f"starting route: {describe_route(start)}")
        try:
            for step in self.steps:
                self.step = step
                self.shift_to(start, step)
                self.watch_step(step)
        except KeyboardInterrupt:
            self.reconnect()
            with sigint_deferred():
                safe = self.roll_back(start)
            raise DeployInterrupted(f"interrupted at step {self.step}%; {safe}")
        except DeployError as exc:
            with sigint_deferred():
                safe = self.roll_back(start)
            raise DeployError(f"step {self.step}%: {exc}; {safe}") from None
        killed = None
        if self.steps[-1] == 100:
            try:
                killed = self.drain_old_pools(self.listener_name, start, self.to,
                                              self.drain_timeout)
            except KeyboardInterrupt:
                self.reconnect()
                raise DeployInterrupted(
                    f"interrupted while the old pool drained; {self.listener_name} routes "
                    f"to {self.to}; old connections are left to finish on their own")
        final = describe_route(route_of(self.listener(self.listener_name)))
        drained = ("" if killed is None
                   else f"; old connections killed after the drain timeout: {killed}")
        self.out(f"done: {self.listener_name} now routes by {final} "
                 f"({self.elapsed():.1f} s){drained}")

    def shift_to(self, start: dict, pct: int) -> None:
        if pct == 100:
            self.ctl(f"switch {self.listener_name} {self.to}")
        else:
            try:
                shares = canary_split(start, self.to, pct)
            except ValueError as exc:
                raise DeployError(str(exc)) from None
            self.set_route(self.listener_name, {"split": shares})

    def counters(self) -> tuple[int, int, dict[str, dict]]:
        rows = self.backends(self.to)
        return (sum(r["total"] for r in rows.values()),
                sum(r["failed"] for r in rows.values()), rows)

    def watch_step(self, step: int) -> None:
        """Watch the new pool for `interval` seconds; DeployError on a breach."""
        total0, failed0, _ = self.counters()
        start = self.clock()
        attempts = failed = 0
        while True:
            waited = self.elapsed(start)
            if waited >= self.interval:
                break
            self.sleep(min(POLL_INTERVAL, self.interval - waited))
            total, failures, rows = self.counters()
            failed = failures - failed0
            attempts = (total - total0) + failed
            self.check_health(rows)
            if attempts and failed / attempts > self.max_failure_rate:
                raise DeployError(f"connect failure rate {failed}/{attempts} "
                                  f"({failed / attempts:.1%}) over {self.max_failure_rate:.1%}")
        rate = f"{failed / attempts:.1%}" if attempts else "n/a"
        self.out(f"step {step}%: {attempts} connects to {self.to}, {failed} failed ({rate}), "
                 f"healthy; {self.elapsed():.1f} s")
        if not attempts and step < 100:
            # A step that sent nothing proved nothing: with sticky_split every client of
            # one address (a NAT, a proxy, a test box) stays on the old side.
            self.out(f"warning: step {step}% sent no connection to {self.to}; its health "
                     "is unproven (few client addresses with sticky_split? a longer "
                     "--interval?)")

    def check_health(self, rows: dict[str, dict]) -> None:
        sick = [f"{name} ({row['state']}, health {row['health']})"
                for name, row in rows.items()
                if row["state"] == "down" or row["health"] == "failing"]
        if sick:
            raise DeployError(f"pool {self.to} unhealthy: {', '.join(sick)}")
        if not any(row["state"] == "up" for row in rows.values()):
            raise DeployError(f"pool {self.to} has no backend up")

    def roll_back(self, start: dict) -> str:
        problem = None
        try:
            self.set_route(self.listener_name, start)
        except DeployError as exc:
            problem = str(exc)
        if problem is None:
            self.out(f"rolled back: {self.listener_name} routes by {describe_route(start)}")
            return f"rolled back to {describe_route(start)}"
        return (f"could not roll back to {describe_route(start)} ({problem}): "
                f"restore it by hand")


# --- the CLI's entry point -----------------------------------------------------------

def is_fleet_node(control) -> bool:
    """True when the balancer is a node of a fleet (`show cluster` answers ok)."""
    try:
        return bool(control.call("show cluster").get("ok"))
    except ControlClientError as exc:
        raise DeployError(str(exc)) from None


def run_deploy(args, socket_path) -> int:
    """`l4lb deploy STRATEGY ...`: run it, print the failure on stderr; the exit status
    (0 ok, 1 failed, 130 interrupted)."""
    control = Control(socket_path)
    try:
        fleet = is_fleet_node(control)
        if args.strategy == "rolling":
            deploy = RollingDeploy(control, args.pool, args.command,
                                   drain_timeout=args.drain_timeout,
                                   ready_timeout=args.ready_timeout, fleet=fleet)
        elif args.strategy == "blue-green":
            deploy = BlueGreenDeploy(control, args.listener, args.to,
                                     drain_timeout=args.drain_timeout, fleet=fleet)
        else:
            deploy = CanaryDeploy(control, args.listener, args.to, args.steps, args.interval,
                                  max_failure_rate=args.max_failure_rate,
                                  drain_timeout=args.drain_timeout, fleet=fleet)
        deploy.run()
        return 0
    except DeployError as exc:
        print(f"l4lb deploy {args.strategy}: failed: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:           # before the deploy touched anything
        print(f"l4lb deploy {args.strategy}: interrupted; nothing changed", file=sys.stderr)
        return 130
    finally:
        control.close()
