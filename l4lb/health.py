"""Health checks: active probes and passive failure detection.

Theory of operation
-------------------
Every backend of a pool that has a `[pools.X.health]` section gets one asyncio task
(`BackendCheck.run`). Its first probe fires at a deterministic offset inside the first
interval (hash64 of "pool/backend"), so a pool's checks do not fire together, and then
every `interval` seconds, start to start.

A probe (`probe`) is a TCP connect; then, when configured, an optional PROXY header
(`send_proxy`), the `send` payload, and a read that must contain `expect`. The whole probe
is bounded by `timeout`. Its semantics follow HAProxy's tcp-check:

| send | expect | passes when                                                    |
|------|--------|----------------------------------------------------------------|
|  -   |   -    | the connect succeeds                                           |
|  set |   -    | the connect succeeds and the payload is written (no reply read) |
|  -   |  set   | the backend's greeting contains `expect` (banner check)         |
|  set |  set   | the reply to the payload contains `expect`                      |

Results feed `HealthState`, a pure state machine counting consecutive passes and
failures: `fall` consecutive failures take an `up` backend `down`, `rise` consecutive
passes take a `down` backend `up`. Nothing else changes state, so a backend failing every
other probe never flaps while rise and fall are both above 1. The admin states win:
`maint` pauses probing, `draining` is probed (health and last_error stay current) but
never moved by a result.

Passive detection (HAProxy's `observe layer4`): the relay calls
`Target.on_connect_failed(target, reason)` on every refused or timed-out backend connect;
for a checked pool that counts as one failed check at once, so a dead backend under load
leaves rotation after `fall` failed connects, not after `fall` intervals. The client of
each failed connect is retried elsewhere by the relay. A pool without a health section
is never moved by passive failures: nothing would bring its backends back up (we record
last_error only). Relay successes are not counted as passes: only probes bring a backend
back.
"""
from __future__ import annotations

import asyncio
import functools
import socket
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from . import _native
from .address import Address
from .config import HealthConfig
from .log import get_logger
from .model import Backend, BackendState, Pool
from .proxyproto import encode_v1, encode_v2

# The most reply bytes a probe reads while looking for `expect`; a backend streaming more
# than this without the expected bytes fails the check rather than growing our memory.
MAX_EXPECT_READ = 64 * 1024
# Bytes of a wrong reply quoted in last_error.
ERROR_QUOTE_BYTES = 48
# connect() errors that mean "this process is out of descriptors or memory", not "the
# backend is broken": the relay's own set (runtime.pxi), so a probe and a client's connect
# judge an errno alike; such a probe counts for nothing.
PROBE_INCONCLUSIVE_ERRNOS = _native.OVERLOAD_ERRNOS

# Causes of backend_state_changed.
CAUSE_ACTIVE = "health_check"
CAUSE_PASSIVE = "passive_check"
CAUSE_UNCHECKED = "health_check_removed"   # a reload dropped the section; down -> up
CAUSE_UPGRADE = "upgrade"                  # the old master's checks had it down
# close_reason of connections closed because their backend went down (on_down = "close").
CLOSE_REASON_DOWN = "backend_down"


# --- the state machine ------------------------------------------------------------------

# (current state, probe passed) -> (counter that must reach its threshold, new state).
# Every pair not listed leaves the state alone: results never move draining or maint,
# a pass never takes a backend down and a failure never brings one up.
TRANSITIONS = {
    (BackendState.UP, False): ("fall", BackendState.DOWN),
    (BackendState.DOWN, True): ("rise", BackendState.UP),
}


class HealthState:
    """Consecutive pass/failure counters of one backend and the rise/fall rule.

    Pure: no clock, no I/O. `record` is told each result and the backend's current
    state and answers with the state to move to, or None.
    """

    __slots__ = ("rise", "fall", "passes", "fails")

    def __init__(self, rise: int, fall: int):
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be >= 1 (got rise={rise}, fall={fall})")
        self.rise = rise
        self.fall = fall
        self.passes = 0         # consecutive passes up to now
        self.fails = 0          # consecutive failures up to now

    def record(self, passed: bool, state: BackendState) -> BackendState | None:
        """Count one result; return the new state when it crosses a threshold."""
        if passed:
            self.passes += 1
            self.fails = 0
        else:
            self.fails += 1
            self.passes = 0
        rule = TRANSITIONS.get((state, passed))
        if rule is None:
            return None
        counter, new = rule
        reached = self.fails >= self.fall if counter == "fall" else self.passes >= self.rise
        return new if reached else None

    def reset(self) -> None:
        """Forget the streaks (checking paused: old results say nothing about later)."""
        self.passes = 0
        self.fails = 0

    @property
    def healthy(self) -> bool:
        """The last `rise` probes all passed: what brings a down backend up."""
        return self.passes >= self.rise


# --- one probe --------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ProbeResult:
    passed: bool | None      # None: inconclusive (we lacked descriptors), counts for nothing
    error: str | None        # why it failed: "<code>" or "<code>: <detail>"
    duration: float          # seconds from connect start to verdict


def proxy_header(version: str, sock: socket.socket | None) -> bytes:
    """The PROXY header a probe sends first, for backends that require one.

    v1 carries the probe connection's own endpoints (some receivers refuse
    `PROXY UNKNOWN`); v2 uses the LOCAL command, which the spec (§2.2) reserves for
    connections the proxy makes on its own, such as health checks.
    """
    if version == "off":
        return b""
    if version == "v2":
        return encode_v2(None, None, command="LOCAL")
    if version == "v1":
        return encode_v1(sock.getsockname()[:2], sock.getpeername()[:2])
    raise ValueError(f"unknown send_proxy {version!r}")


def _quote(data: bytes) -> str:
    text = repr(bytes(data[:ERROR_QUOTE_BYTES]))
    return text + ("..." if len(data) > ERROR_QUOTE_BYTES else "")


async def probe(host: str, port: int, cfg: HealthConfig) -> ProbeResult:
    """Run one health probe against host:port as `cfg` says (table in the module doc).

    Never raises for a backend's fault: every failure becomes a ProbeResult with an
    error code, `connect_refused`, `connect_timeout`, `connect_error`, `send_error`,
    `expect_timeout`, `expect_closed` (EOF first), `expect_overflow` (MAX_EXPECT_READ
    bytes without it) or `read_error`. Out of descriptors: passed=None (inconclusive).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    send = cfg.send.encode()
    expect = cfg.expect.encode()
    phase = "connect"
    writer = None
    buf = bytearray()

    def result(passed, error=None):
        return ProbeResult(passed, error, loop.time() - started)

    try:
        async with asyncio.timeout(cfg.timeout):
            reader, writer = await asyncio.open_connection(host, port)
            phase = "send"
            payload = proxy_header(cfg.send_proxy, writer.get_extra_info("socket")) + send
            if payload:
                writer.write(payload)
                await writer.drain()
            if not expect:
                return result(True)
            phase = "expect"
            while expect not in buf:
                if len(buf) >= MAX_EXPECT_READ:
                    return result(False, f"expect_overflow: {cfg.expect!r} not in the first "
                                         f"{MAX_EXPECT_READ} bytes")
                data = await reader.read(MAX_EXPECT_READ - len(buf))
                if not data:
                    return result(False, f"expect_closed: {cfg.expect!r} not in {_quote(buf)}")
                buf += data
            return result(True)
    except TimeoutError:
        if phase == "connect":
            return result(False, f"connect_timeout: no connection within {cfg.timeout}s")
        if phase == "expect":
            return result(False, f"expect_timeout: {cfg.expect!r} not in {_quote(buf)} "
                                 f"after {cfg.timeout}s")
        return result(False, f"send_error: not written within {cfg.timeout}s")
    except OSError as exc:
        if phase == "connect":
            if exc.errno in PROBE_INCONCLUSIVE_ERRNOS:
                return result(None, f"inconclusive: {exc.strerror}")
            if isinstance(exc, ConnectionRefusedError):
                return result(False, "connect_refused")
            return result(False, f"connect_error: {exc.strerror or exc}")
        code = "send_error" if phase == "send" else "read_error"
        return result(False, f"{code}: {exc.strerror or exc}")
    finally:
        if writer is not None:
            writer.close()


# --- one backend's checker ----------------------------------------------------------------

Sleep = Callable[[float], Awaitable[None]]
Prober = Callable[[str, int, HealthConfig], Awaitable[ProbeResult]]


def probe_address(backend: Backend, cfg: HealthConfig) -> Address:
    """Where `backend`'s probes connect: its health_address, else its address with the
    pool's health.port when set (checks served apart from the traffic), else its
    address."""
    if backend.health_address is not None:
        return backend.health_address
    if cfg.port:
        return Address(backend.address.host, cfg.port)
    return backend.address


def start_offset(backend: Backend, interval: float) -> float:
    """Where in the first interval this backend's first probe fires: deterministic (the
    routing hash of "pool/backend"), so restarts keep a pool's checks spread alike."""
    h = _native.hash64(f"{backend.pool.name}/{backend.name}".encode())
    return interval * (h / 2.0 ** 64)


class BackendCheck:
    """The active checker of one backend, and the sink of its passive failures."""

    def __init__(self, monitor: "HealthMonitor", backend: Backend, cfg: HealthConfig):
        self.monitor = monitor
        self.backend = backend
        self.cfg = cfg
        self.state = HealthState(cfg.rise, cfg.fall)
        self.task: asyncio.Task | None = None

    async def run(self) -> None:
        """Probe forever, every `interval` start to start. Cancel to stop."""
        m = self.monitor
        await m.sleep(start_offset(self.backend, self.cfg.interval))
        while True:
            started = m.clock()
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:            # our bug, not the backend's: keep checking
                m.log.exception("health_check_crashed", pool=self.backend.pool.name,
                                backend=self.backend.name)
            await m.sleep(max(0.0, started + self.cfg.interval - m.clock()))

    async def check_once(self) -> None:
        """One probe and its consequences; a maint backend is not probed."""
        b = self.backend
        if b.state is BackendState.MAINT:
            self.pause()
            return
        target = probe_address(b, self.cfg)
        host, port = target.host, target.port
        resolved = b.target.resolved
        if resolved and b.health_address is None:
            # A hostname backend: probe the first address its connections try now (the
            # resolver's answer, which may come from servers getaddrinfo does not ask).
            _, host, port = resolved[0]
            port = self.cfg.port or port
        res = await self.monitor.probe(host, port, self.cfg)
        if res.passed is None:
            return
        b.last_check = self.monitor.wallclock()
        b.check_duration = res.duration
        self.record(res.passed, res.error, CAUSE_ACTIVE)

    def pause(self) -> None:
        """Checking is paused (maint): what we knew is stale from now on."""
        self.state.reset()
        self.backend.health = "unchecked"
        self.backend.check_failures = 0

    def record(self, passed: bool, error: str | None, cause: str) -> BackendState | None:
        """Count one result (active or passive); move the backend when it crosses rise or
        fall. Returns the new state, or None."""
        b = self.backend
        b.health = "passing" if passed else "failing"
        b.last_error = None if passed else error
        new = self.state.record(passed, b.state)
        b.check_failures = self.state.fails
        if new is not None:
            b.pool.set_state(b, new, cause)
            if new is BackendState.DOWN and b.pool.on_down == "close":
                self.monitor.close_connections(b)
        return new

# --- all of a balancer's checks -------------------------------------------------------------

class HealthMonitor:
    """Every backend's health: active checkers and passive detection.

    The balancer calls `watch` for every backend it wires (construction, `add`, reload),
    `unwatch` when one is removed, `start` once listening and `stop` on shutdown. The
    control plane reads the backend's own fields (health, last_check, last_error);
    `l4lb deploy` judges readiness from `show backends`, not from here.
    """

    def __init__(self, closer: Closer | None = None, log=None, *,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time, sleep: Sleep = asyncio.sleep,
                 prober: Prober = probe):
        self.close_open = closer          # for on_down = "close"; None: nothing to close
        self.log = log or get_logger()
        self.clock = clock                # monotonic: probe cadence
        self.wallclock = wallclock        # last_check stamps shown to people
        self.sleep = sleep
        self.probe = prober
        self.checks: dict[Backend, BackendCheck] = {}
        self.running = False

    # --- lifecycle ----------------------------------------------------------------------

    def watch(self, backend: Backend) -> BackendCheck | None:
        """Hook `backend` up: passive detection always, an active checker when its pool
        has a health section (started at once if the monitor runs). Idempotent."""
        self.unwatch(backend)
        cfg = backend.pool.config.health
        backend.target.on_connect_failed = functools.partial(self.connect_failed, backend)
        if cfg is None:
            return None
        check = self.checks[backend] = BackendCheck(self, backend, cfg)
        if self.running:
            check.task = asyncio.get_running_loop().create_task(check.run())
        return check

    def unwatch(self, backend: Backend) -> None:
        """Stop checking `backend` (removed, or its pool's health section changed)."""
        backend.target.on_connect_failed = None
        check = self.checks.pop(backend, None)
        if check is not None:
            if check.task is not None:
                check.task.cancel()
            backend.health = "unchecked"
            backend.check_failures = 0

    def unwatch_pool(self, pool: Pool) -> None:
        """Stop checking every backend of `pool` (removed or rebuilt by a reload)."""
        for backend in pool:
            self.unwatch(backend)

    def rewatch_pool(self, pool: Pool) -> None:
        """After a reload changed `pool.config` in place: restart the checks of backends
        whose health settings changed (their streaks start over); leave the others
        running. A backend whose pool lost its health section is brought back up if it was
        down, since nothing would ever bring it up again."""
        cfg = pool.config.health
        for backend in pool:
            check = self.checks.get(backend)
            if check is not None and check.cfg == cfg:
                continue
            if check is None and cfg is None:
                continue
            self.watch(backend)
            if cfg is None and backend.state is BackendState.DOWN:
                pool.set_state(backend, BackendState.UP, CAUSE_UNCHECKED)

    # --- across an upgrade --------------------------------------------------------------

    def verdicts(self) -> dict[str, dict]:
        """What the checks concluded so far, by backend ref (an upgrade hands it to the
        new master): health, the streaks, the last error, and whether it is down."""
        return {b.ref: {"health": b.health, "passes": c.state.passes, "fails": c.state.fails,
                        "down": b.state is BackendState.DOWN, "last_error": b.last_error,
                        "last_check": b.last_check}
                for b, c in self.checks.items() if b.health != "unchecked"}

    def adopt(self, backends: dict, verdicts: dict) -> int:
        """An upgrade's new master carries on from the old one's `verdicts` for the
        backends it checks too (`backends`: ref -> Backend): a backend the old checks had
        down stays down until it passes `rise` probes, instead of being sent clients
        until it fails `fall` again. Returns how many were taken down."""
        down = 0
        for ref, v in verdicts.items():
            backend = backends.get(ref)
            check = self.checks.get(backend) if backend is not None else None
            if check is None or not isinstance(v, dict):
                continue
            if v.get("health") in ("passing", "failing"):
                backend.health = v["health"]
            for key in ("passes", "fails"):
                if isinstance(v.get(key), int) and v[key] >= 0:
                    setattr(check.state, key, v[key])
            backend.check_failures = check.state.fails
            backend.last_error = v.get("last_error") if isinstance(
                v.get("last_error"), str) else None
            if isinstance(v.get("last_check"), (int, float)):
                backend.last_check = float(v["last_check"])
            if v.get("down") is True and backend.state is BackendState.UP:
                backend.pool.set_state(backend, BackendState.DOWN, CAUSE_UPGRADE)
                down += 1
        return down

    def start(self) -> None:
        """Start one checker task per watched backend (call from the running loop)."""
        self.running = True
        loop = asyncio.get_running_loop()
        for check in self.checks.values():
            if check.task is None:
                check.task = loop.create_task(check.run())
        for pool in dict.fromkeys(b.pool for b in self.checks):
            cfg = pool.config.health
            self.log.info("health_checks_started", pool=pool.name, interval=cfg.interval,
                          timeout=cfg.timeout, rise=cfg.rise, fall=cfg.fall,
                          backends=sum(1 for b in self.checks if b.pool is pool))

    async def stop(self) -> None:
        """Cancel every checker and wait for them (an in-flight probe is closed)."""
        self.running = False
        tasks = [c.task for c in self.checks.values() if c.task is not None]
        for c in self.checks.values():
            c.task = None
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --- passive detection and on_down ----------------------------------------------------

    def connect_failed(self, backend: Backend, target, reason: str, count: int = 1) -> None:
        """`count` relay connects to `backend` failed with `reason` (connect_refused |
        connect_timeout | connect_error): Target.on_connect_failed in one process (bound
        to `backend`, called by the relay before it retries), or what the master read
        from the workers' shared counters. Each failure counts as a failed check; past
        `fall` of them in a row the rest change nothing."""
        backend.connect_failures[reason] = backend.connect_failures.get(reason, 0) + count
        check = self.checks.get(backend)
        if check is None:               # unchecked pool: remember why, never move it
            backend.last_error = reason
            return
        for _ in range(min(count, check.cfg.fall)):
            if backend.state is BackendState.MAINT:
                return
            check.record(False, reason, CAUSE_PASSIVE)

    def close_connections(self, backend: Backend) -> None:
        """on_down = "close": abort the backend's open connections (wherever they are:
        `closer`), and log how many."""
        if self.close_open is None:
            return
        result = self.close_open(backend, CLOSE_REASON_DOWN)
        if isinstance(result, int):
            self._closed(backend, result)
            return

        async def closed():
            self._closed(backend, await result)
        asyncio.get_running_loop().create_task(closed())

    def _closed(self, backend: Backend, n: int) -> None:
        self.log.info("backend_connections_closed", pool=backend.pool.name,
                      backend=backend.name, closed=n, reason=CLOSE_REASON_DOWN)


def close_open_relays(hub, target, reason: str) -> int:
    """Abort `target`'s open relays on `hub` (on_down = "close"). Those still connecting
    are left alone: their connect fails and the relay retries them elsewhere, which
    Hub.close_target (it aborts them too) would turn into failed clients."""
    n = 0
    for relay in hub.relays():
        if relay.target is target and relay.state_name == "open":
            relay.close(reason)
            n += 1
    return n


# on_down = "close": (backend, reason) -> how many connections were closed, now or later.
Closer = Callable[[Backend, str], "int | Awaitable[int]"]
