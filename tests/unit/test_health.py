"""Health checks without sockets or sleeps: the rise/fall state machine, exhaustively, and
the per-backend loop driven by an injected clock, sleep and prober."""
import asyncio
import itertools

import pytest

from l4lb.config import Address, BackendConfig, HealthConfig, PoolConfig
from l4lb.health import (CAUSE_ACTIVE, CAUSE_PASSIVE, HealthMonitor, HealthState,
                         ProbeResult, close_open_relays, start_offset)
from l4lb.model import BackendState, Pool

UP, DOWN, DRAINING, MAINT = (BackendState.UP, BackendState.DOWN, BackendState.DRAINING,
                             BackendState.MAINT)


# --- the state machine ----------------------------------------------------------------------

def expected_state(state, results, rise, fall):
    """The spec, written independently of HealthState: after each result, an up backend
    whose last `fall` results all failed goes down; a down one whose last `rise` results
    all passed comes up; draining and maint never move."""
    history = []
    for passed in results:
        history.append(passed)
        if state is UP and len(history) >= fall and not any(history[-fall:]):
            state = DOWN
        elif state is DOWN and len(history) >= rise and all(history[-rise:]):
            state = UP
    return state


@pytest.mark.parametrize("rise,fall", [(1, 1), (1, 3), (2, 2), (2, 3), (3, 1), (3, 4)])
@pytest.mark.parametrize("start", [UP, DOWN, DRAINING, MAINT])
def test_every_result_sequence_up_to_ten_probes_moves_the_state_as_specified(rise, fall,
                                                                             start):
    for n in range(11):
        for results in itertools.product((True, False), repeat=n):
            hs, state = HealthState(rise, fall), start
            for passed in results:
                new = hs.record(passed, state)
                if new is not None:
                    assert new is not state
                    state = new
            assert state is expected_state(start, results, rise, fall), results


def test_fall_consecutive_failures_take_an_up_backend_down_and_not_one_fewer():
    hs = HealthState(rise=2, fall=3)
    assert hs.record(False, UP) is None
    assert hs.record(False, UP) is None
    assert hs.record(False, UP) is DOWN


def test_a_pass_resets_the_failure_streak():
    hs = HealthState(rise=2, fall=3)
    for passed in (False, False, True, False, False):
        assert hs.record(passed, UP) is None
    assert hs.record(False, UP) is DOWN


def test_rise_consecutive_passes_bring_a_down_backend_up():
    hs = HealthState(rise=2, fall=3)
    assert hs.record(True, DOWN) is None
    assert hs.record(True, DOWN) is UP


@pytest.mark.parametrize("start", [UP, DOWN])
def test_failing_every_other_probe_never_flaps_with_rise_2_fall_2(start):
    hs = HealthState(rise=2, fall=2)
    for i in range(1000):
        assert hs.record(i % 2 == 0, start) is None


@pytest.mark.parametrize("state", [DRAINING, MAINT])
def test_results_never_move_a_backend_in_an_admin_state(state):
    hs = HealthState(rise=1, fall=1)
    for passed in (False, False, False, True, True, True):
        assert hs.record(passed, state) is None


def test_a_backend_enabled_while_failing_goes_down_on_its_next_failure():
    hs = HealthState(rise=2, fall=3)
    for _ in range(5):
        assert hs.record(False, DRAINING) is None     # checked while draining
    assert hs.record(False, UP) is DOWN               # enabled, still dead


def test_rise_or_fall_below_one_is_refused():
    with pytest.raises(ValueError):
        HealthState(0, 1)
    with pytest.raises(ValueError):
        HealthState(1, 0)


# --- the probe loop with an injected clock ---------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    async def sleep(self, seconds):
        assert seconds >= 0
        self.now += seconds
        await asyncio.sleep(0)


class ScriptedProber:
    """Answers probes per backend port from a script of bools; when a script runs out,
    the probe blocks (the test then stops the loop). Records the clock at each probe."""

    def __init__(self, clock, scripts, duration=0.01):
        self.clock = clock
        self.scripts = {port: list(s) for port, s in scripts.items()}
        self.duration = duration
        self.calls = []
        self.exhausted = asyncio.Event()

    async def __call__(self, host, port, cfg):
        script = self.scripts[port]
        if not script:
            if all(not s for s in self.scripts.values()):
                self.exhausted.set()
            await asyncio.Event().wait()
        self.calls.append((port, self.clock()))
        self.clock.now += self.duration
        passed = script.pop(0)
        return ProbeResult(passed, None if passed else "connect_refused", self.duration)


class FakeRelay:
    def __init__(self, target, state_name):
        self.target = target
        self.state_name = state_name
        self.closed = None

    def close(self, reason="killed"):
        self.closed = reason


class FakeHub:
    def __init__(self):
        self.live = []

    def relays(self):
        return [r for r in self.live if r.closed is None]


def make_pool(clock, health=None, n=2, on_down="keep"):
    changes = []
    cfg = PoolConfig(name="p", algorithm="rr", on_down=on_down, health=health,
                     backends=[BackendConfig(f"b{i}", Address("127.0.0.1", 1000 + i))
                               for i in range(n)])
    pool = Pool(cfg, on_state_change=lambda b, old, new, cause: changes.append(
        (b.name, str(old), str(new), cause, b.last_error)), clock=clock)
    return pool, changes


def closer_of(hub):
    """on_down = "close" over the relays of `hub`, as a worker does it."""
    if hub is None:
        return None
    return lambda backend, reason: close_open_relays(hub, backend.target, reason)


def run_loop(pool, scripts, *, hub=None, clock=None, until=None):
    """Run the monitor over `pool` until every script is spent; return (monitor, prober)."""
    clock = clock or FakeClock()
    prober = ScriptedProber(clock, scripts)

    async def main():
        mon = HealthMonitor(closer_of(hub), clock=clock, wallclock=lambda: 1.7e9 + clock(),
                            sleep=clock.sleep, prober=prober)
        for b in pool:
            mon.watch(b)
        mon.start()
        await asyncio.wait_for(prober.exhausted.wait(), 5)
        await mon.stop()
        return mon

    return asyncio.run(main()), prober


def test_probes_start_at_a_spread_offset_then_every_interval_start_to_start():
    clock = FakeClock()
    health = HealthConfig(interval=2.0, timeout=1.0, rise=2, fall=3)
    pool, _ = make_pool(clock, health, n=1)
    t0 = clock.now
    _, prober = run_loop(pool, {1000: [True] * 5}, clock=clock)
    times = [t for _, t in prober.calls]
    offset = start_offset(pool.backends["b0"], 2.0)
    assert times[0] - t0 == pytest.approx(offset)
    assert [b - a for a, b in zip(times, times[1:])] == pytest.approx([2.0] * 4)


def test_start_offsets_are_deterministic_distinct_and_inside_the_interval():
    clock = FakeClock()
    pool, _ = make_pool(clock, HealthConfig(interval=3.0), n=20)
    offsets = [start_offset(b, 3.0) for b in pool]
    assert offsets == [start_offset(b, 3.0) for b in pool]
    assert len(set(offsets)) == 20
    assert all(0.0 <= o < 3.0 for o in offsets)
    assert max(offsets) - min(offsets) > 1.5          # spread, not bunched


def test_only_transitions_change_state_and_are_reported_with_cause_and_error():
    clock = FakeClock()
    pool, changes = make_pool(clock, HealthConfig(interval=1.0, rise=2, fall=2), n=1)
    run_loop(pool, {1000: [True, False, False, False, False, True, True, True]},
             clock=clock)
    assert changes == [("b0", "up", "down", CAUSE_ACTIVE, "connect_refused"),
                       ("b0", "down", "up", CAUSE_ACTIVE, None)]
    b = pool.backends["b0"]
    assert b.state is UP and b.health == "passing" and b.last_error is None
    assert b.last_check == pytest.approx(1.7e9 + clock.now, abs=2.0)


def test_a_backend_failing_every_other_probe_never_flaps():
    clock = FakeClock()
    pool, changes = make_pool(clock, HealthConfig(interval=1.0, rise=2, fall=2), n=1)
    run_loop(pool, {1000: [False, True] * 50}, clock=clock)
    assert changes == []
    assert pool.backends["b0"].state is UP


def test_maint_pauses_checking_and_draining_is_checked_but_stays_out_of_rotation():
    clock = FakeClock()
    pool, changes = make_pool(clock, HealthConfig(interval=1.0, rise=1, fall=1), n=2)
    maint, draining = pool.backends["b0"], pool.backends["b1"]
    pool.set_state(maint, MAINT, "disable")
    pool.set_state(draining, DRAINING, "drain")
    changes.clear()

    async def main():
        prober = ScriptedProber(clock, {1000: [False] * 3, 1001: [False, False, True]})
        mon = HealthMonitor(None, clock=clock, sleep=clock.sleep, prober=prober)
        for b in pool:
            mon.watch(b)
        mon.start()
        for _ in range(200):
            await asyncio.sleep(0)
        await clock.sleep(10.0)                     # many intervals pass
        for _ in range(200):
            await asyncio.sleep(0)
        await mon.stop()
        return prober

    prober = asyncio.run(main())
    assert [p for p, _ in prober.calls if p == 1000] == []          # maint: never probed
    assert len([p for p, _ in prober.calls if p == 1001]) == 3       # draining: probed
    assert changes == []
    assert maint.state is MAINT and maint.health == "unchecked"
    assert draining.state is DRAINING and draining.health == "passing"
    assert not pool.algo.is_eligible(draining.slot)


def test_passive_failures_count_as_failed_checks_and_take_a_backend_down_at_once():
    clock = FakeClock()
    pool, changes = make_pool(clock, HealthConfig(interval=60.0, rise=2, fall=3), n=2)
    mon = HealthMonitor(None, clock=clock)
    for b in pool:
        mon.watch(b)
    b0 = pool.backends["b0"]
    b0.target.on_connect_failed(b0.target, "connect_refused")
    b0.target.on_connect_failed(b0.target, "connect_timeout")
    assert b0.state is UP and b0.health == "failing"
    b0.target.on_connect_failed(b0.target, "connect_refused")
    assert b0.state is DOWN
    assert changes == [("b0", "up", "down", CAUSE_PASSIVE, "connect_refused")]
    assert pool.algo.pick(0) == pool.backends["b1"].slot             # out of rotation


def test_passive_and_active_failures_share_one_streak():
    clock = FakeClock()
    pool, changes = make_pool(clock, HealthConfig(interval=1.0, rise=2, fall=3), n=1)
    b0 = pool.backends["b0"]

    async def main():
        prober = ScriptedProber(clock, {1000: [False]})
        mon = HealthMonitor(None, clock=clock, sleep=clock.sleep, prober=prober)
        mon.watch(b0)
        b0.target.on_connect_failed(b0.target, "connect_refused")
        b0.target.on_connect_failed(b0.target, "connect_refused")
        mon.start()
        await asyncio.wait_for(prober.exhausted.wait(), 5)
        await mon.stop()

    asyncio.run(main())
    assert changes == [("b0", "up", "down", CAUSE_ACTIVE, "connect_refused")]


def test_a_pool_without_health_is_never_moved_by_passive_failures():
    clock = FakeClock()
    pool, changes = make_pool(clock, None, n=1)
    mon = HealthMonitor(None, clock=clock)
    b0 = pool.backends["b0"]
    mon.watch(b0)
    for _ in range(100):
        b0.target.on_connect_failed(b0.target, "connect_refused")
    assert changes == [] and b0.state is UP
    assert b0.health == "unchecked" and b0.last_error == "connect_refused"
    assert b0 not in mon.checks


def test_passive_failures_of_a_maint_backend_are_ignored():
    clock = FakeClock()
    pool, changes = make_pool(clock, HealthConfig(rise=1, fall=1), n=1)
    mon = HealthMonitor(None, clock=clock)
    b0 = pool.backends["b0"]
    mon.watch(b0)
    pool.set_state(b0, MAINT, "disable")
    b0.target.on_connect_failed(b0.target, "connect_refused")
    assert b0.state is MAINT and b0.last_error is None


@pytest.mark.parametrize("on_down,closed", [("close", True), ("keep", False)])
def test_on_down_close_aborts_open_connections_but_leaves_connecting_ones(on_down, closed):
    clock = FakeClock()
    pool, _ = make_pool(clock, HealthConfig(rise=1, fall=1), n=2, on_down=on_down)
    hub = FakeHub()
    b0, b1 = pool.backends["b0"], pool.backends["b1"]
    hub.live = [FakeRelay(b0.target, "open"), FakeRelay(b0.target, "connecting"),
                FakeRelay(b1.target, "open")]
    mon = HealthMonitor(closer_of(hub), clock=clock)
    for b in pool:
        mon.watch(b)
    b0.target.on_connect_failed(b0.target, "connect_refused")
    assert b0.state is DOWN
    assert [r.closed for r in hub.live] == [
        "backend_down" if closed else None, None, None]


# --- reload and removal ---------------------------------------------------------------------

def test_a_reload_with_the_same_health_settings_keeps_checks_and_streaks():
    clock = FakeClock()
    pool, _ = make_pool(clock, HealthConfig(rise=2, fall=3), n=1)
    mon = HealthMonitor(None, clock=clock)
    b0 = pool.backends["b0"]
    mon.watch(b0)
    check = mon.checks[b0]
    b0.target.on_connect_failed(b0.target, "connect_refused")
    pool.config = PoolConfig(name="p", health=HealthConfig(rise=2, fall=3))
    mon.rewatch_pool(pool)
    assert mon.checks[b0] is check and check.state.fails == 1


def test_a_reload_with_new_health_settings_restarts_the_checks():
    clock = FakeClock()
    pool, _ = make_pool(clock, HealthConfig(rise=2, fall=3), n=1)
    mon = HealthMonitor(None, clock=clock)
    b0 = pool.backends["b0"]
    mon.watch(b0)
    pool.config = PoolConfig(name="p", health=HealthConfig(rise=2, fall=1))
    mon.rewatch_pool(pool)
    b0.target.on_connect_failed(b0.target, "connect_refused")
    assert b0.state is DOWN                          # the new fall = 1 applies


def test_a_reload_dropping_the_health_section_brings_a_down_backend_back_up():
    clock = FakeClock()
    pool, changes = make_pool(clock, HealthConfig(rise=2, fall=1), n=1)
    mon = HealthMonitor(None, clock=clock)
    b0 = pool.backends["b0"]
    mon.watch(b0)
    b0.target.on_connect_failed(b0.target, "connect_refused")
    assert b0.state is DOWN
    pool.config = PoolConfig(name="p", health=None)
    mon.rewatch_pool(pool)
    assert b0.state is UP and b0.health == "unchecked" and b0 not in mon.checks
    assert changes[-1][1:4] == ("down", "up", "health_check_removed")


def test_a_removed_backend_is_no_longer_checked_or_observed():
    clock = FakeClock()
    pool, _ = make_pool(clock, HealthConfig(interval=1.0), n=2)

    async def main():
        prober = ScriptedProber(clock, {1000: [True] * 1000, 1001: [True] * 1000})
        mon = HealthMonitor(None, clock=clock, sleep=clock.sleep, prober=prober)
        for b in pool:
            mon.watch(b)
        mon.start()
        b1 = pool.remove_backend("b1")
        mon.unwatch(b1)
        for _ in range(50):
            await clock.sleep(1.0)
        await mon.stop()
        return prober, b1

    prober, b1 = asyncio.run(main())
    assert b1.target.on_connect_failed is None
    assert [p for p, _ in prober.calls if p == 1001] == []
    assert len([p for p, _ in prober.calls if p == 1000]) >= 40


def test_probes_go_to_the_pools_health_port_or_a_backends_health_address():
    clock = FakeClock()
    cfg = PoolConfig(name="p", algorithm="rr", health=HealthConfig(interval=1.0, port=8080),
                     backends=[BackendConfig("b0", Address("127.0.0.1", 1000)),
                               BackendConfig("b1", Address("127.0.0.1", 1001),
                                             health_address=Address("127.0.0.9", 7001))])
    pool = Pool(cfg, clock=clock)
    seen = []

    class RecordingProber(ScriptedProber):
        async def __call__(self, host, port, cfg):
            seen.append((host, port))
            return await super().__call__(host, port, cfg)

    prober = RecordingProber(clock, {8080: [True, True], 7001: [True, True]})

    async def main():
        mon = HealthMonitor(None, clock=clock, wallclock=lambda: 1.7e9, sleep=clock.sleep,
                            prober=prober)
        for b in pool:
            mon.watch(b)
        mon.start()
        await asyncio.wait_for(prober.exhausted.wait(), 5)
        await mon.stop()

    asyncio.run(main())
    assert set(seen) == {("127.0.0.1", 8080), ("127.0.0.9", 7001)}
    assert all(b.health == "passing" for b in pool)


def test_probe_duration_and_failures_in_a_row_are_kept_on_the_backend():
    clock = FakeClock()
    pool, _ = make_pool(clock, HealthConfig(interval=1.0, rise=1, fall=5), n=1)
    run_loop(pool, {1000: [True, False, False, False]}, clock=clock)
    b = pool.backends["b0"]
    assert b.check_failures == 3 and b.check_duration == pytest.approx(0.01)
