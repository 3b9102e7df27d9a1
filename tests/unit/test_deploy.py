"""Deploy strategies (l4lb.deploy) against a fake control socket and an injected clock:
the order of commands, what each failure leaves behind, and the summaries."""
import argparse

import pytest

from l4lb.control.client import ControlClientError
from l4lb.deploy import (
    BlueGreenDeploy,
    CanaryDeploy,
    DeployError,
    DeployInterrupted,
    RollingDeploy,
    canary_split,
    parse_steps,
    split_host_port,
)


def row(pool, name, port, **kw):
    r = {"pool": pool, "name": name, "address": f"127.0.0.1:{port}", "state": "up",
         "health": "unchecked", "weight": 1, "active": 0, "total": 0, "failed": 0,
         "last_check": None, "last_error": None}
    r.update(kw)
    return r


class FakeBalancer:
    """Answers the control commands a deploy sends, like the real handlers, and keeps a
    log of every command. `tick` hooks run on each injected sleep to move time along."""

    def __init__(self, pools, listeners):
        self.pools = {p: {r["name"]: r for r in rows} for p, rows in pools.items()}
        self.listeners = {n: {"name": n, "pool": route.get("pool"), "split": route.get("split")}
                          for n, route in listeners.items()}
        self.sent: list[str] = []
        self.now = 0.0
        self.ticks = []
        self.refuse: dict[str, str] = {}

    # the injected clock
    def clock(self):
        return self.now

    def sleep(self, dt):
        self.now += dt
        for tick in self.ticks:
            tick(self)

    # the control socket
    def call(self, line):
        self.sent.append(line)
        words = line.split()
        for prefix, error in self.refuse.items():
            if line.startswith(prefix):
                return {"ok": False, "error": error}
        if words[:2] == ["show", "backends"]:
            return {"ok": True, "backends": [dict(r) for r in self.pools[words[2]].values()]}
        if words[:2] == ["show", "listeners"]:
            return {"ok": True, "listeners": [dict(l) for l in self.listeners.values()]}
        verb = words[0]
        if verb in ("enable", "disable", "drain", "kill"):
            pool, name = words[1].split("/")
            b = self.pools[pool][name]
            if verb == "kill":
                closed, b["active"] = b["active"], 0
                return {"ok": True, "closed": closed}
            b["state"] = {"enable": "up", "disable": "maint", "drain": "draining"}[verb]
            assert words[2:] in ([], ["by", "deploy"]), line
            b["set_by"] = (None if verb == "enable"
                           else "deploy" if words[2:] == ["by", "deploy"] else "operator")
            return {"ok": True}
        if verb == "switch":
            self.listeners[words[1]].update(pool=words[2], split=None)
            return {"ok": True}
        if verb == "split":
            shares = {p: int(pct) for p, pct in (w.split("=") for w in words[2:])}
            assert sum(shares.values()) == 100, line
            self.listeners[words[1]].update(pool=None, split=shares)
            return {"ok": True}
        raise AssertionError(f"unexpected command {line!r}")

    def backend(self, ref):
        pool, name = ref.split("/")
        return self.pools[pool][name]

    def route(self, listener):
        l = self.listeners[listener]
        return {"split": l["split"]} if l["split"] else {"pool": l["pool"]}

    def state_changes(self):
        return [s for s in self.sent if not s.startswith("show")]


def make(cls, fake, *args, **kw):
    lines = []
    deploy = cls(fake, *args, out=lines.append, sleep=fake.sleep, clock=fake.clock, **kw)
    return deploy, lines


def three_backends(**kw):
    return FakeBalancer({"main": [row("main", f"app{i}", 9000 + i, **kw) for i in (1, 2, 3)]},
                        {"web": {"pool": "main"}})


# --- rolling -------------------------------------------------------------------------

def test_rolling_replaces_each_backend_in_order_drain_disable_command_enable():
    fake = three_backends()
    ran = []
    deploy, lines = make(RollingDeploy, fake, "main", "restart.sh",
                         run_command=lambda cmd, env: ran.append(
                             (cmd, env["L4LB_POOL"], env["L4LB_BACKEND"], env["L4LB_ADDRESS"])) or 0,
                         probe=lambda address: True)
    deploy.run()
    assert fake.state_changes() == [
        line.format(i) for i in (1, 2, 3)
        for line in ("drain main/app{} by deploy", "disable main/app{} by deploy",
                     "enable main/app{}")]
    assert ran == [("restart.sh", "main", f"app{i}", f"127.0.0.1:900{i}") for i in (1, 2, 3)]
    assert all(b["state"] == "up" for b in fake.pools["main"].values())
    assert lines[-1].startswith("done: 3/3 backends of main replaced")


def test_rolling_waits_for_connections_to_end_and_prints_how_many_are_left():
    fake = three_backends()
    fake.backend("main/app1")["active"] = 3

    def one_ends_per_sleep(f):
        b = f.backend("main/app1")
        b["active"] = max(0, b["active"] - 1)

    fake.ticks.append(one_ends_per_sleep)
    deploy, lines = make(RollingDeploy, fake, "main", "true", run_command=lambda c, e: 0,
                         probe=lambda a: True)
    deploy.run()
    assert "  app1: 3 connections left, 0.0 s" in lines
    assert any(l.startswith("  app1: drained in") for l in lines)
    assert "kill main/app1" not in fake.sent
    assert lines[-1].endswith("connections drained 3, killed 0")


def test_rolling_kills_what_is_left_after_the_drain_timeout_and_counts_it():
    fake = three_backends()
    fake.backend("main/app2")["active"] = 4         # never ends on its own
    deploy, lines = make(RollingDeploy, fake, "main", "true", run_command=lambda c, e: 0,
                         probe=lambda a: True, drain_timeout=2.0)
    deploy.run()
    sent = fake.state_changes()
    assert sent.index("kill main/app2") == sent.index("drain main/app2 by deploy") + 1
    assert fake.now == pytest.approx(2.0)
    assert lines[-1].endswith("connections drained 0, killed 4")


def test_rolling_failing_command_leaves_that_backend_in_maint_and_stops():
    fake = three_backends()
    ran = []
    deploy, lines = make(RollingDeploy, fake, "main", "deploy.sh",
                         run_command=lambda c, env: ran.append(env["L4LB_BACKEND"]) or 1,
                         probe=lambda a: True)
    with pytest.raises(DeployError) as err:
        deploy.run()
    assert ran == ["app1"]
    assert fake.backend("main/app1")["state"] == "maint"
    assert [fake.backend(f"main/app{i}")["state"] for i in (2, 3)] == ["up", "up"]
    assert not any("app2" in s or "app3" in s for s in fake.state_changes())
    assert "exited with status 1" in str(err.value)
    assert "main/app1 left in maint" in str(err.value)
    assert "not started: app2, app3" in str(err.value)


def test_rolling_backend_not_accepting_in_time_is_never_enabled():
    fake = three_backends()
    deploy, lines = make(RollingDeploy, fake, "main", "true", run_command=lambda c, e: 0,
                         probe=lambda a: False, ready_timeout=3.0)
    with pytest.raises(DeployError, match="did not accept connections within 3 s"):
        deploy.run()
    assert "enable main/app1" not in fake.sent
    assert fake.backend("main/app1")["state"] == "maint"
    assert any("not accepting connections yet" in l for l in lines)


def test_rolling_with_health_checks_waits_for_a_probe_after_the_enable():
    fake = three_backends(health="passing", last_check=100.0)

    def probe_passes_two_seconds_after_enable(f):
        for name in enabled:
            if f.now - enabled[name] >= 2:
                f.backend(f"main/{name}")["last_check"] = 100.0 + f.now

    enabled = {}
    real_call = fake.call

    def call(line):
        if line.startswith("enable"):
            enabled[line.split("/")[1]] = fake.now
        return real_call(line)

    fake.call = call

    fake.ticks.append(probe_passes_two_seconds_after_enable)
    deploy, lines = make(RollingDeploy, fake, "main", "true", run_command=lambda c, e: 0,
                         probe=lambda a: True)
    deploy.run()
    assert "health check passes" in lines[0]
    assert sum("health check passing after" in l for l in lines) == 3
    assert fake.now >= 6.0                    # 2 s per backend: the stale "passing" is not enough


def test_rolling_health_check_failing_after_enable_puts_the_backend_back_in_maint():
    fake = three_backends(health="passing", last_check=1.0)

    def probe_fails(f):
        b = f.backend("main/app1")
        b.update(health="failing", last_check=f.now, last_error="connection refused")
        if b["state"] == "up":
            b["state"] = "down"

    fake.ticks.append(probe_fails)
    deploy, _ = make(RollingDeploy, fake, "main", "true", run_command=lambda c, e: 0,
                     probe=lambda a: True, ready_timeout=2.0)
    with pytest.raises(DeployError, match="connection refused") as err:
        deploy.run()
    assert fake.state_changes()[-1] == "disable main/app1 by deploy"
    assert fake.backend("main/app1")["state"] == "maint"
    assert "left in maint" in str(err.value)


def test_rolling_ctrl_c_during_the_command_leaves_the_backend_in_maint_and_says_where():
    fake = three_backends()

    def interrupted(cmd, env):
        if env["L4LB_BACKEND"] == "app2":
            raise KeyboardInterrupt
        return 0

    deploy, _ = make(RollingDeploy, fake, "main", "true", run_command=interrupted,
                     probe=lambda a: True)
    with pytest.raises(DeployInterrupted) as err:
        deploy.run()
    assert err.value.exit_code == 130
    assert "while running the command for main/app2" in str(err.value)
    assert "done: app1" in str(err.value)
    assert [fake.backend(f"main/app{i}")["state"] for i in (1, 2, 3)] == ["up", "maint", "up"]


def test_rolling_backend_in_maint_before_gets_the_command_but_stays_in_maint():
    fake = three_backends()
    fake.backend("main/app3")["state"] = "maint"
    ran = []
    deploy, _ = make(RollingDeploy, fake, "main", "true",
                     run_command=lambda c, env: ran.append(env["L4LB_BACKEND"]) or 0,
                     probe=lambda a: True)
    deploy.run()
    assert ran == ["app1", "app2", "app3"]
    assert "enable main/app3" not in fake.sent
    assert fake.backend("main/app3")["state"] == "maint"
    # Never marked as the deploy's, so no rerun would ever enable it.
    assert not any("app3 by deploy" in s for s in fake.sent)
    assert fake.backend("main/app3")["set_by"] == "operator"


def test_rolling_rerun_after_a_failure_finishes_the_backend_it_left_in_maint():
    fake = three_backends()
    first, _ = make(RollingDeploy, fake, "main", "deploy.sh",
                    run_command=lambda c, env: 1 if env["L4LB_BACKEND"] == "app2" else 0,
                    probe=lambda a: True)
    with pytest.raises(DeployError):
        first.run()
    assert fake.backend("main/app2")["state"] == "maint"
    assert fake.backend("main/app2")["set_by"] == "deploy"
    again, lines = make(RollingDeploy, fake, "main", "deploy.sh",
                        run_command=lambda c, env: 0, probe=lambda a: True)
    again.run()
    assert [fake.backend(f"main/app{i}")["state"] for i in (1, 2, 3)] == ["up"] * 3
    assert lines[-1].startswith("done: 3/3 backends of main replaced")
    assert "left in maint" not in lines[-1]


def test_rolling_rerun_keeps_an_operators_maint_and_says_so_in_the_summary():
    fake = three_backends()
    fake.backend("main/app2").update(state="maint", set_by="operator")
    deploy, lines = make(RollingDeploy, fake, "main", "true", run_command=lambda c, e: 0,
                         probe=lambda a: True)
    deploy.run()
    assert fake.backend("main/app2")["state"] == "maint"
    assert lines[-1].endswith("left in maint as the operator set it: app2")


@pytest.mark.parametrize("state, set_by, expected_line", [
    ("up", None, "enable main/app1"),
    ("draining", "operator", "drain main/app1"),
    ("maint", "deploy", "disable main/app1 by deploy"),
])
def test_rolling_ctrl_c_during_the_drain_puts_the_backend_back_where_it_was(
        state, set_by, expected_line):
    fake = three_backends()
    fake.backend("main/app1").update(state=state, set_by=set_by, active=2)

    def interrupt(f):
        raise KeyboardInterrupt

    fake.ticks.append(interrupt)
    ran = []
    deploy, _ = make(RollingDeploy, fake, "main", "true",
                     run_command=lambda c, env: ran.append(1) or 0, probe=lambda a: True)
    with pytest.raises(DeployInterrupted) as err:
        deploy.run()
    assert ran == []
    assert fake.state_changes()[-1] == expected_line
    assert fake.backend("main/app1")["state"] == state
    assert f"main/app1 was not replaced and is back to {state}" in str(err.value)


def test_rolling_unreachable_balancer_is_a_deploy_error():
    class Gone:
        def call(self, line):
            raise ControlClientError("no control socket at x: is l4lb running?")

    deploy = RollingDeploy(Gone(), "main", "true", out=lambda l: None)
    with pytest.raises(DeployError, match="is l4lb running"):
        deploy.run()


# --- blue-green ----------------------------------------------------------------------

def blue_green(**green):
    return FakeBalancer({"blue": [row("blue", "b1", 9001), row("blue", "b2", 9002)],
                         "green": [row("green", "g1", 9101, **green),
                                   row("green", "g2", 9102)]},
                        {"web": {"pool": "blue"}})


@pytest.mark.parametrize("green", [{"state": "down"}, {"state": "maint"},
                                   {"health": "failing"}])
def test_blue_green_refuses_unless_every_green_backend_is_up(green):
    fake = blue_green(**green)
    deploy, _ = make(BlueGreenDeploy, fake, "web", "green")
    with pytest.raises(DeployError, match="refused: not every backend of pool green is up"):
        deploy.run()
    assert fake.state_changes() == []


def test_blue_green_refuses_a_pool_without_backends():
    fake = blue_green()
    fake.pools["empty"] = {}
    deploy, _ = make(BlueGreenDeploy, fake, "web", "empty")
    with pytest.raises(DeployError, match="no backends"):
        deploy.run()
    assert fake.state_changes() == []


def test_blue_green_switches_then_waits_for_blue_to_drain():
    fake = blue_green()
    fake.backend("blue/b1")["active"] = 2

    def drains_after_one_second(f):
        if f.now >= 1.0:
            f.backend("blue/b1")["active"] = 0

    fake.ticks.append(drains_after_one_second)
    deploy, lines = make(BlueGreenDeploy, fake, "web", "green")
    deploy.run()
    assert fake.state_changes() == ["switch web green"]
    assert lines[0] == "switched web: pool blue -> pool green"
    assert "  blue: 2 connections left, 0.0 s" in lines
    assert lines[-1].endswith("old connections killed after the drain timeout: 0")


def test_blue_green_kills_blue_connections_left_after_the_drain_timeout():
    fake = blue_green()
    fake.backend("blue/b2")["active"] = 5
    deploy, lines = make(BlueGreenDeploy, fake, "web", "green", drain_timeout=1.5)
    deploy.run()
    assert fake.state_changes() == ["switch web green", "kill blue/b2"]
    assert lines[-1].endswith("killed after the drain timeout: 5")


def test_blue_green_does_not_wait_for_or_kill_a_pool_another_listener_uses():
    fake = blue_green()
    fake.listeners["admin"] = {"name": "admin", "pool": "blue", "split": None}
    fake.backend("blue/b1")["active"] = 5
    deploy, lines = make(BlueGreenDeploy, fake, "web", "green", drain_timeout=1.0)
    deploy.run()
    assert fake.state_changes() == ["switch web green"]
    assert any("still routed by another listener" in l for l in lines)


def test_blue_green_ctrl_c_after_the_switch_keeps_it_and_kills_nothing():
    fake = blue_green()
    fake.backend("blue/b1")["active"] = 1

    def ctrl_c(f):
        raise KeyboardInterrupt

    fake.ticks.append(ctrl_c)
    deploy, _ = make(BlueGreenDeploy, fake, "web", "green")
    with pytest.raises(DeployInterrupted, match="routes to green"):
        deploy.run()
    assert fake.state_changes() == ["switch web green"]


# --- canary --------------------------------------------------------------------------

def canary_fake(start={"pool": "blue"}):
    return FakeBalancer({"blue": [row("blue", "b1", 9001)],
                         "green": [row("green", "g1", 9101), row("green", "g2", 9102)],
                         "old": [row("old", "o1", 9201)]},
                        {"web": start})


def traffic(per_tick, failing=0):
    """Each sleep: `per_tick` successful connects to green, `failing` failed ones."""
    def tick(f):
        f.backend("green/g1")["total"] += per_tick
        f.backend("green/g1")["failed"] += failing
    return tick


def test_canary_steps_through_splits_and_ends_switched():
    fake = canary_fake()
    fake.ticks.append(traffic(10))
    deploy, lines = make(CanaryDeploy, fake, "web", "green", [5, 25, 50, 100], 1.0)
    deploy.run()
    assert fake.state_changes() == ["split web blue=95 green=5", "split web blue=75 green=25",
                                    "split web blue=50 green=50", "switch web green"]
    assert fake.route("web") == {"pool": "green"}
    assert [l.split(":")[0] for l in lines if l.startswith("step")] == [
        "step 5%", "step 25%", "step 50%", "step 100%"]
    assert lines[-1].startswith("done: web now routes by pool green")


def test_canary_reaching_100_drains_and_kills_the_old_pool_as_blue_green_does():
    fake = canary_fake()
    fake.ticks.append(traffic(10))
    fake.backend("blue/b1")["active"] = 3          # a keep-alive client that never leaves
    deploy, lines = make(CanaryDeploy, fake, "web", "green", [50, 100], 1.0,
                         drain_timeout=2.0)
    deploy.run()
    assert fake.state_changes() == ["split web blue=50 green=50", "switch web green",
                                    "kill blue/b1"]
    assert fake.backend("blue/b1")["active"] == 0
    assert lines[-1].endswith("old connections killed after the drain timeout: 3")


def test_canary_stopping_short_of_100_leaves_the_old_pool_serving():
    fake = canary_fake()
    fake.ticks.append(traffic(10))
    fake.backend("blue/b1")["active"] = 3
    deploy, lines = make(CanaryDeploy, fake, "web", "green", [5, 50], 1.0, drain_timeout=1.0)
    deploy.run()
    assert not any(s.startswith("kill") for s in fake.state_changes())
    assert fake.backend("blue/b1")["active"] == 3


def test_canary_rolls_back_to_the_starting_split_exactly_on_a_failure_rate_breach():
    start = {"split": {"blue": 70, "old": 30, "green": 0}}
    fake = canary_fake(start)
    fake.ticks.append(traffic(18, failing=2))       # 10 % > 5 %
    deploy, lines = make(CanaryDeploy, fake, "web", "green", [20, 100], 5.0)
    with pytest.raises(DeployError) as err:
        deploy.run()
    assert fake.state_changes() == ["split web blue=56 old=24 green=20",
                                    "split web blue=70 old=30 green=0"]
    assert fake.route("web") == start
    assert "connect failure rate 2/20 (10.0%)" in str(err.value)
    assert "rolled back to split blue=70 old=30 green=0" in str(err.value)
    assert fake.now == pytest.approx(0.25)          # at the first look, not after 5 s


def test_canary_warns_when_a_step_sent_nothing_to_the_new_pool():
    fake = canary_fake()                            # no traffic at all
    deploy, lines = make(CanaryDeploy, fake, "web", "green", [10, 100], 0.5)
    deploy.run()
    warnings = [l for l in lines if l.startswith("warning:")]
    assert len(warnings) == 1 and "step 10% sent no connection to green" in warnings[0]


def test_canary_failure_rate_at_the_threshold_passes():
    fake = canary_fake()
    fake.ticks.append(traffic(19, failing=1))       # exactly 5 %
    deploy, _ = make(CanaryDeploy, fake, "web", "green", [50, 100], 0.5)
    deploy.run()
    assert fake.route("web") == {"pool": "green"}


def test_canary_rolls_back_when_a_green_backend_goes_down_mid_step():
    fake = canary_fake()

    def g2_dies(f):
        if f.now > 1.0:
            f.backend("green/g2").update(state="down", health="failing")

    fake.ticks.append(g2_dies)
    deploy, _ = make(CanaryDeploy, fake, "web", "green", [10, 50, 100], 1.0)
    with pytest.raises(DeployError, match=r"step 50%: pool green unhealthy: g2 \(down"):
        deploy.run()
    assert fake.route("web") == {"pool": "blue"}


def test_canary_refuses_a_pool_with_a_backend_down_and_changes_nothing():
    fake = canary_fake()
    fake.backend("green/g1")["state"] = "down"
    deploy, _ = make(CanaryDeploy, fake, "web", "green", [50, 100], 1.0)
    with pytest.raises(DeployError, match="refused"):
        deploy.run()
    assert fake.state_changes() == []


def test_canary_ctrl_c_restores_the_starting_route():
    fake = canary_fake()

    def ctrl_c_in_second_step(f):
        if f.now > 1.2:
            raise KeyboardInterrupt

    fake.ticks.append(ctrl_c_in_second_step)
    deploy, _ = make(CanaryDeploy, fake, "web", "green", [10, 50, 100], 1.0)
    with pytest.raises(DeployInterrupted, match="interrupted at step 50%; rolled back"):
        deploy.run()
    assert fake.route("web") == {"pool": "blue"}


def test_canary_that_cannot_roll_back_says_so():
    fake = canary_fake()
    fake.ticks.append(traffic(0, failing=1))
    fake.refuse["switch web blue"] = "unknown pool 'blue'"
    deploy, _ = make(CanaryDeploy, fake, "web", "green", [50], 1.0)
    with pytest.raises(DeployError, match="could not roll back .* restore it by hand"):
        deploy.run()


# --- helpers -------------------------------------------------------------------------

@pytest.mark.parametrize("start,pct,expected", [
    ({"pool": "blue"}, 5, {"blue": 95, "green": 5}),
    ({"split": {"a": 50, "b": 50}}, 25, {"a": 38, "b": 37, "green": 25}),
    ({"split": {"a": 1, "b": 1, "c": 1}}, 1, {"a": 33, "b": 33, "c": 33, "green": 1}),
    ({"split": {"blue": 90, "green": 10}}, 50, {"blue": 50, "green": 50}),
])
def test_canary_split_keeps_the_other_pools_proportions_and_sums_to_100(start, pct, expected):
    shares = canary_split(start, "green", pct)
    assert shares == expected
    assert sum(shares.values()) == 100


@pytest.mark.parametrize("text", ["5,x", "0,50", "50,101", "50,25", "50,50", ""])
def test_parse_steps_refuses_bad_steps(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_steps(text)


def test_split_host_port_handles_ipv6_brackets():
    assert split_host_port("[::1]:9001") == ("::1", 9001)
    assert split_host_port("app.local:80") == ("app.local", 80)
