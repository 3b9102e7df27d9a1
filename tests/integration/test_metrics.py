"""GET /metrics on a running `l4lb run`: real HTTP client, real traffic, prometheus-client's
own parser."""
from __future__ import annotations

import os
import re
import socket
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from l4lb.metrics import METRICS

from ..support import connect, echo_handler, recv_exactly, simple_config

# DESIGN.md §7: the names scripts and dashboards rely on.
DESIGN_NAMES = {
    "l4lb_backend_active_connections", "l4lb_backend_connections_total",
    "l4lb_backend_bytes_total", "l4lb_backend_connect_failures_total", "l4lb_backend_up",
    "l4lb_listener_accepted_total", "l4lb_listener_rejected_total",
}


def metrics_config(backends, listen="127.0.0.1:0", **kw) -> str:
    return simple_config(backends, **kw) + f'\n[metrics]\nlisten = "{listen}"\n'


def metrics_port(lb) -> int:
    return lb.wait_event("metrics_started")["port"]


def scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return resp.read().decode()


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, frozenset of labels): value} as prometheus-client parses the text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(parsed, name, **labels) -> float:
    return parsed[(name, frozenset(labels.items()))]


def total(parsed, name, **labels) -> float:
    """Sum of `name` over every sample whose labels include `labels`."""
    return sum(v for (n, ls), v in parsed.items()
               if n == name and set(labels.items()) <= ls)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result or time.monotonic() > deadline:
            return result
        time.sleep(0.05)


def test_counters_match_the_traffic_sent_during_and_after(l4lb, backends):
    b1 = backends(echo_handler, "b1")
    b2 = backends(echo_handler, "b2")
    lb = l4lb(metrics_config([("b1", b1.address), ("b2", b2.address)]))
    port = metrics_port(lb)

    # Two connections held open mid-traffic: 1000 bytes each way on each.
    held = []
    for _ in range(2):
        s = connect(lb.port())
        s.sendall(os.urandom(1000))
        assert len(recv_exactly(s, 1000)) == 1000
        held.append(s)
    # The workers count as they relay; the master reads the shared table: wait for the
    # last echo's count to land rather than race it.
    during = wait_for(lambda: (lambda p: p if total(p, "l4lb_backend_bytes_total",
                                                    direction="out") == 2000 else None)(
        samples(scrape(port))))
    assert during, "the echoed bytes were never counted"
    assert value(during, "l4lb_listener_active_connections", listener="web") == 2
    assert value(during, "l4lb_connections_active") == 2
    assert total(during, "l4lb_backend_active_connections", pool="main") == 2
    assert total(during, "l4lb_backend_bytes_total", direction="in") == 2000
    assert total(during, "l4lb_backend_bytes_total", direction="out") == 2000

    # Five more, each sending 3000 bytes and reading back its echo, then closed.
    for i in range(5):
        s = connect(lb.port())
        s.sendall(bytes([i]) * 3000)
        assert recv_exactly(s, 3000) == bytes([i]) * 3000
        s.close()
    for s in held:
        s.close()
    # A worker settles a closing connection's counts one after another (backend, then
    # listener and hub), and the master reads them from another process: wait for all.
    after = wait_for(lambda: (lambda p: p if value(p, "l4lb_connections_active") == 0
                              and total(p, "l4lb_backend_active_connections") == 0
                              and value(p, "l4lb_listener_active_connections",
                                        listener="web") == 0 else None)(
        samples(scrape(port))))
    assert after, "connections never closed"
    assert value(after, "l4lb_listener_accepted_total", listener="web") == 7
    assert value(after, "l4lb_connections_total") == 7
    assert total(after, "l4lb_backend_connections_total", pool="main") == 7
    # Round robin over two backends: 4 and 3 connections.
    assert sorted(value(after, "l4lb_backend_connections_total", pool="main", backend=b)
                  for b in ("b1", "b2")) == [3, 4]
    assert total(after, "l4lb_backend_bytes_total", direction="in") == 2000 + 5 * 3000
    assert total(after, "l4lb_backend_bytes_total", direction="out") == 2000 + 5 * 3000
    assert total(after, "l4lb_backend_active_connections") == 0
    assert total(after, "l4lb_backend_connect_failures_total") == 0
    for b in ("b1", "b2"):
        assert value(after, "l4lb_backend_up", pool="main", backend=b) == 1
        assert value(after, "l4lb_backend_state", pool="main", backend=b, state="up") == 1
        assert value(after, "l4lb_backend_state", pool="main", backend=b, state="down") == 0
        # Present once a connect happened; loopback connects may measure 0 (uvloop's
        # loop.time() has millisecond resolution).
        assert value(after, "l4lb_backend_connect_time_average_seconds", pool="main",
                     backend=b) >= 0
    assert value(after, "l4lb_listener_split_ratio", listener="web", pool="main") == 1
    assert value(after, "process_open_fds") > 0
    assert value(after, "process_max_fds") > 0
    assert value(after, "process_resident_memory_bytes") > 1e6
    assert 0 < value(after, "process_start_time_seconds") <= time.time()


def test_exported_names_are_design_names_and_the_metrics_table(l4lb, backends):
    b1 = backends(echo_handler, "b1")
    lb = l4lb(metrics_config([("b1", b1.address)],
                             listener_extra="max_connections = 1"))
    port = metrics_port(lb)
    first = connect(lb.port())
    first.sendall(b"x")
    recv_exactly(first, 1)
    refused = connect(lb.port())           # over the listener's max_connections
    assert refused.recv(10) == b""
    first.close()
    parsed = samples(wait_for(lambda: (lambda t: t if "reason=" in t else None)(scrape(port))))
    names = {name for name, _ in parsed}
    assert DESIGN_NAMES <= names
    assert names <= {spec.name for spec in METRICS}
    assert total(parsed, "l4lb_listener_rejected_total", listener="web") == 1
    for name, labels in parsed:
        spec = next(s for s in METRICS if s.name == name)
        assert {k for k, _ in labels} == set(spec.labels), name
    # Every metric is announced with HELP and TYPE, also those with no sample yet.
    # (prometheus-client >= 0.22 names a counter's TYPE line with `_total`, older without.)
    announced = {(name.removesuffix("_total"), kind)
                 for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", scrape(port), re.M)}
    assert announced == {(spec.name.removesuffix("_total"), spec.kind) for spec in METRICS}


def http_raw(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        if request:
            s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)
    finally:
        s.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", b"405"),
    (b"DELETE /metrics HTTP/1.0\r\n\r\n", b"405"),
    (b"GET /nothere HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),   # / is the status page
    (b"GET /metricsx HTTP/1.1\r\n\r\n", b"404"),
    (b"\x00\xff\xfe garbage \x80\r\n\r\n", b"400"),
    (b"GET /metrics\r\n\r\n", b"400"),                 # HTTP/0.9 style: no version
    (b"GET /metrics HTTP/1.1\r\n", b"400"),             # EOF before the head ends
    (b"", b"400"),                                       # connect, send nothing, EOF
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000, b"431"),
])
def test_bad_requests_get_an_error_and_the_balancer_keeps_serving(l4lb, backends,
                                                                 request_bytes, status):
    b1 = backends(echo_handler, "b1")
    lb = l4lb(metrics_config([("b1", b1.address)]))
    port = metrics_port(lb)
    reply = http_raw(port, request_bytes)
    assert reply.startswith(b"HTTP/1.1 " + status), reply[:200]
    assert b"Connection: close" in reply
    # Still alive: relays traffic and scrapes fine.
    s = connect(lb.port())
    s.sendall(b"ping")
    assert recv_exactly(s, 4) == b"ping"
    s.close()
    assert "l4lb_backend_up" in scrape(port)
    assert lb.proc.poll() is None


def test_head_and_query_string_are_served(l4lb, backends):
    b1 = backends(echo_handler, "b1")
    lb = l4lb(metrics_config([("b1", b1.address)]))
    port = metrics_port(lb)
    assert "l4lb_info" in scrape(port, "/metrics?name[]=x")
    reply = http_raw(port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""
    assert int(re.search(rb"Content-Length: (\d+)", head).group(1)) > 1000


def test_garbage_storm_and_idle_clients_leave_the_balancer_healthy(l4lb, backends):
    b1 = backends(echo_handler, "b1")
    lb = l4lb(metrics_config([("b1", b1.address)]))
    port = metrics_port(lb)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
    try:
        for i in range(50):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(os.urandom(512 + i * 7))
            s.close()
        # More idle clients than MAX_CLIENTS are open: a new scraper may get a 503 until
        # they go; once closed, scrapes succeed again.
    finally:
        for s in idle:
            s.close()
    assert wait_for(lambda: _scrapes(port))
    assert lb.proc.poll() is None


def _scrapes(port: int) -> bool:
    try:
        return "l4lb_info" in scrape(port)
    except (urllib.error.HTTPError, OSError):
        return False


def test_reload_moves_the_metrics_endpoint_and_can_turn_it_off(l4lb, backends):
    b1 = backends(echo_handler, "b1")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    fixed = probe.getsockname()[1]
    probe.close()
    lb = l4lb(metrics_config([("b1", b1.address)]))
    old = metrics_port(lb)
    lb.path.write_text(metrics_config([("b1", b1.address)], listen=f"127.0.0.1:{fixed}"))
    lb.proc.send_signal(1)                                   # SIGHUP
    lb.wait_event("config_reloaded")
    assert "l4lb_info" in scrape(fixed)
    with pytest.raises(OSError):
        scrape(old)
    lb.path.write_text(simple_config([("b1", b1.address)]))  # no [metrics]
    lb.proc.send_signal(1)
    lb.wait_event("metrics_stopped", listen=f"127.0.0.1:{fixed}")
    with pytest.raises(OSError):
        scrape(fixed)


def test_metrics_bind_failure_at_start_is_reported_and_exits_1(l4lb, backends, tmp_path):
    b1 = backends(echo_handler, "b1")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        lb = l4lb(metrics_config([("b1", b1.address)],
                                 listen=f"127.0.0.1:{taken.getsockname()[1]}"), wait=False)
        assert lb.proc.wait(15) == 1
        lb.reader.join(2)
        assert lb.events_named("start_failed")
    finally:
        taken.close()



def test_reload_to_an_unbindable_metrics_address_changes_nothing(l4lb, backends):
    b1 = backends(echo_handler, "b1")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        lb = l4lb(metrics_config([("b1", b1.address)]))
        port = metrics_port(lb)
        lb.path.write_text(metrics_config(
            [("b1", b1.address)], listen=f"127.0.0.1:{taken.getsockname()[1]}"))
        lb.proc.send_signal(1)                               # SIGHUP
        rejected = lb.wait_event("config_rejected")
        assert "Address already in use" in " ".join(rejected["errors"])
        assert "l4lb_info" in scrape(port)
    finally:
        taken.close()


def test_retries_connect_failure_reasons_and_queue_timeouts_are_counted_by_the_relay(
        l4lb, backends):
    live = backends(echo_handler, "live")
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))            # bound, never listening: connects are refused
    dead_address = "127.0.0.1:%d" % dead.getsockname()[1]
    try:
        lb = l4lb(metrics_config(
            [("dead", dead_address), ("live", live.address, {"max_connections": 1})],
            listener_extra="retries = 1\nqueue_timeout = 0"))
        port = metrics_port(lb)
        for _ in range(2):                   # rr: one of the two starts on the dead one
            s = connect(lb.port())
            s.sendall(b"x")
            assert recv_exactly(s, 1) == b"x"
            s.close()
            assert wait_for(lambda: value(samples(scrape(port)), "l4lb_connections_active") == 0)
        held = connect(lb.port())
        held.sendall(b"x")
        assert recv_exactly(held, 1) == b"x"
        # live is at max_connections and dead refuses: the next client queues, times out.
        extra = connect(lb.port())
        lb.wait_event("connection_closed", reason="queue_timeout")
        extra.close()
        held.close()
        parsed = samples(scrape(port))
        assert value(parsed, "l4lb_pool_retries_total", pool="main") >= 1
        assert value(parsed, "l4lb_backend_connect_failures_by_reason_total", pool="main",
                     backend="dead", reason="connect_refused") >= 1
        assert value(parsed, "l4lb_pool_queue_timeouts_total", pool="main") == 1
    finally:
        dead.close()
