"""BalancerCollector on a Balancer built in-process (nothing bound): what it reports for
states, splits and removed backends, read from the model and the C counters."""
import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from l4lb.balancer import Balancer
from l4lb.config import parse_config
from l4lb.metrics import METRICS, BalancerCollector

CONFIG = """
[control]
socket = "l4lb.sock"
[listeners.web]
bind = ["127.0.0.1:0"]
split = { blue = 75, green = 25 }
[listeners.admin]
bind = ["127.0.0.1:0"]
pool = "blue"
[pools.blue]
algorithm = "rr"
backends = [
  { name = "b1", address = "127.0.0.1:9001", weight = 3 },
  { name = "b2", address = "127.0.0.1:9002" },
]
[pools.green]
algorithm = "rr"
backends = [ { name = "g1", address = "127.0.0.1:9101" } ]
"""


@pytest.fixture
def balancer(tmp_path):
    loop = asyncio.new_event_loop()
    try:
        yield Balancer(parse_config(CONFIG, tmp_path / "l4lb.toml"), loop)
    finally:
        loop.close()


def act(balancer, action, *args):
    """Run one operator action (actions.Operator) to completion on the balancer's loop."""
    return balancer.loop.run_until_complete(getattr(balancer.operator, action)(*args))


def scrape(balancer) -> dict:
    text = BalancerCollector(balancer).render().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(parsed, name, **labels):
    return parsed[(name, tuple(sorted(labels.items())))]


def test_state_gauge_has_one_current_state(balancer):
    act(balancer, "drain", "blue", "b2")
    parsed = scrape(balancer)
    states = {s: get(parsed, "l4lb_backend_state", pool="blue", backend="b2", state=s)
              for s in ("up", "down", "draining", "maint")}
    assert states == {"up": 0, "down": 0, "draining": 1, "maint": 0}
    assert get(parsed, "l4lb_backend_up", pool="blue", backend="b1") == 1
    assert get(parsed, "l4lb_backend_weight", pool="blue", backend="b1") == 3


def test_split_ratio_per_pool_and_one_for_a_plain_listener(balancer):
    parsed = scrape(balancer)
    assert get(parsed, "l4lb_listener_split_ratio", listener="web", pool="blue") == 0.75
    assert get(parsed, "l4lb_listener_split_ratio", listener="web", pool="green") == 0.25
    assert get(parsed, "l4lb_listener_split_ratio", listener="admin", pool="blue") == 1.0
    act(balancer, "switch", "web", "green")
    parsed = scrape(balancer)
    ratios = {k: v for k, v in parsed.items() if k[0] == "l4lb_listener_split_ratio"
              and ("listener", "web") in k[1]}
    assert ratios == {("l4lb_listener_split_ratio", (("listener", "web"), ("pool", "green"))): 1.0}


def test_removed_backend_leaves_the_metrics_and_an_added_one_joins(balancer):
    act(balancer, "remove", "blue", "b2")
    act(balancer, "add", "green", "g2", parse_config(CONFIG, "x").pools["blue"].backends[0].address)
    parsed = scrape(balancer)
    backends = {dict(labels)["backend"] for name, labels in parsed
                if name == "l4lb_backend_up"}
    assert backends == {"b1", "g1", "g2"}


def test_counters_come_from_the_native_targets(balancer):
    t = balancer.operator.find_backend("green", "g1").target
    t.total, t.failed, t.bytes_in, t.bytes_out, t.active = 7, 2, 1234, 5678, 1
    balancer.listeners["web"].runtime.count_rejected("max_connections")
    parsed = scrape(balancer)
    labels = {"pool": "green", "backend": "g1"}
    assert get(parsed, "l4lb_backend_connections_total", **labels) == 7
    assert get(parsed, "l4lb_backend_connect_failures_total", **labels) == 2
    assert get(parsed, "l4lb_backend_bytes_total", direction="in", **labels) == 1234
    assert get(parsed, "l4lb_backend_bytes_total", direction="out", **labels) == 5678
    assert get(parsed, "l4lb_backend_active_connections", **labels) == 1
    assert get(parsed, "l4lb_listener_rejected_total", listener="web",
               reason="max_connections") == 1
    # No response-time sample yet: the metric is announced but has no sample.
    assert not any(name == "l4lb_backend_response_time_seconds" for name, _ in parsed)


def test_every_metric_spec_is_well_formed():
    names = [spec.name for spec in METRICS]
    assert len(names) == len(set(names))
    for spec in METRICS:
        assert spec.name.startswith(("l4lb_", "process_")) and spec.kind in ("counter", "gauge")
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        assert spec.doc.endswith("."), spec.name


def test_backend_and_listener_figures_are_the_show_rows(balancer):
    from l4lb.rows import backend_row, listener_row

    t = balancer.operator.find_backend("blue", "b1").target
    t.total, t.failed, t.bytes_in, t.bytes_out, t.active = 3, 1, 10, 20, 2
    balancer.listeners["admin"].runtime.count_rejected("denied")
    parsed = scrape(balancer)
    for pool in balancer.pools.values():
        for backend in pool.backends.values():
            row = backend_row(backend)
            labels = {"pool": row["pool"], "backend": row["name"]}
            assert get(parsed, "l4lb_backend_active_connections", **labels) == row["active"]
            assert get(parsed, "l4lb_backend_connections_total", **labels) == row["total"]
            assert get(parsed, "l4lb_backend_connect_failures_total", **labels) == row["failed"]
            assert get(parsed, "l4lb_backend_weight", **labels) == row["weight"]
            assert get(parsed, "l4lb_backend_state", state=row["state"], **labels) == 1
    for listener in balancer.listeners.values():
        row = listener_row(listener)
        assert get(parsed, "l4lb_listener_accepted_total", listener=row["name"]) == row["accepted"]
        for reason, count in row["rejected"].items():
            assert get(parsed, "l4lb_listener_rejected_total", listener=row["name"],
                       reason=reason) == count


def test_the_process_figures_and_dropped_log_lines_are_exported(balancer, monkeypatch):
    from l4lb import log

    monkeypatch.setattr(log, "dropped_lines", lambda: 0)
    parsed = scrape(balancer)
    assert get(parsed, "l4lb_log_lines_dropped_total") == 0
    assert get(parsed, "process_open_fds") > 0
    assert get(parsed, "process_resident_memory_bytes") > 0


def test_a_draining_backend_that_passes_its_check_is_up_and_shows_admin_state_apart(balancer):
    b2 = balancer.operator.find_backend("blue", "b2")
    act(balancer, "drain", "blue", "b2")
    b2.health = "passing"
    parsed = scrape(balancer)
    labels = {"pool": "blue", "backend": "b2"}
    assert get(parsed, "l4lb_backend_up", **labels) == 1
    admin = {s: get(parsed, "l4lb_backend_admin_state", state=s, **labels)
             for s in ("enabled", "draining", "maint")}
    assert admin == {"enabled": 0, "draining": 1, "maint": 0}
    assert get(parsed, "l4lb_backend_health", status="passing", **labels) == 1
    assert get(parsed, "l4lb_backend_health", status="failing", **labels) == 0


def test_a_maint_backend_failing_its_check_is_visible_as_failing_and_not_up(balancer):
    b1 = balancer.operator.find_backend("blue", "b1")
    act(balancer, "disable", "blue", "b1")
    b1.health, b1.check_failures, b1.check_duration, b1.last_check = "failing", 4, 0.25, 1e9
    parsed = scrape(balancer)
    labels = {"pool": "blue", "backend": "b1"}
    assert get(parsed, "l4lb_backend_up", **labels) == 0
    assert get(parsed, "l4lb_backend_admin_state", state="maint", **labels) == 1
    assert get(parsed, "l4lb_backend_health", status="failing", **labels) == 1
    assert get(parsed, "l4lb_backend_check_failures", **labels) == 4
    assert get(parsed, "l4lb_backend_check_duration_seconds", **labels) == 0.25
    assert get(parsed, "l4lb_backend_check_timestamp_seconds", **labels) == 1e9


def test_connect_failures_by_reason_retries_and_queue_figures_per_pool(balancer):
    g1 = balancer.operator.find_backend("green", "g1")
    balancer.health.connect_failed(g1, g1.target, "connect_refused")
    balancer.health.connect_failed(g1, g1.target, "connect_refused")
    balancer.health.connect_failed(g1, g1.target, "connect_timeout")
    rt = balancer.pools["green"].runtime
    rt.retried, rt.queue_timeouts = 5, 2
    parsed = scrape(balancer)
    labels = {"pool": "green", "backend": "g1"}
    assert get(parsed, "l4lb_backend_connect_failures_by_reason_total",
               reason="connect_refused", **labels) == 2
    assert get(parsed, "l4lb_backend_connect_failures_by_reason_total",
               reason="connect_timeout", **labels) == 1
    assert get(parsed, "l4lb_pool_retries_total", pool="green") == 5
    assert get(parsed, "l4lb_pool_queue_timeouts_total", pool="green") == 2
    assert get(parsed, "l4lb_pool_queue_length", pool="green") == 0


def test_process_figures_use_the_process_collector_names(balancer):
    import time

    parsed = scrape(balancer)
    for name in ("process_cpu_seconds_total", "process_open_fds", "process_max_fds",
                 "process_resident_memory_bytes", "process_virtual_memory_bytes"):
        assert get(parsed, name) > 0, name
    assert 0 < get(parsed, "process_start_time_seconds") <= time.time()
    assert not any(name.startswith("l4lb_process_") or name == "l4lb_uptime_seconds"
                   for name, _ in parsed)


def test_connect_time_average_has_the_haproxy_name_and_the_old_name_is_deprecated():
    specs = {spec.name: spec for spec in METRICS}
    assert "l4lb_backend_connect_time_average_seconds" in specs
    assert specs["l4lb_backend_response_time_seconds"].doc.startswith("Deprecated")
