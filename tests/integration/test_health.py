"""Health checks end to end: real backends (threads, or processes that are killed and
restarted on the same port) behind `l4lb run`, state changes read from its JSON log; and
the probe itself against asyncio servers on loopback."""
import asyncio
import threading
import time
from datetime import datetime

import pytest

from l4lb.config import HealthConfig
from l4lb.health import MAX_EXPECT_READ, probe

from ..backend_process import BackendProcess
from ..support import ask, connect, free_port_refused, iter_lines, simple_config, wait_until


def logged_at(event: dict) -> float:
    """The Unix time of a log line (structlog's ISO UTC timestamp)."""
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def health_section(interval=0.4, timeout=0.3, rise=2, fall=2, send="", expect="",
                   send_proxy="off") -> str:
    return f"""
[pools.main.health]
interval = {interval}
timeout = {timeout}
rise = {rise}
fall = {fall}
send = "{send}"
expect = "{expect}"
send_proxy = "{send_proxy}"
"""


def state_changes(lb, backend=None):
    return [(e["backend"], e["old"], e["new"]) for e in lb.events_named("backend_state_changed")
            if backend is None or e["backend"] == backend]


def backend_row(lb, name):
    return next(r for r in ask(lb, "show backends")["backends"] if r["name"] == name)


def wait_probes(backend, count, timeout=20):
    """Return once a (thread) Backend that only probes connect to has accepted `count`
    more connections than now: probes of one backend run one after the other, so by then
    the first count - 1 of them have been judged."""
    target = backend.accepted + count
    wait_until(lambda: backend.accepted >= target, timeout, what=f"{count} probes of "
               f"{backend.name}")


# --- a backend process killed under load, then restarted ------------------------------------

class LoadLoop:
    """`n` client threads, each doing short request/response connections back to back.
    Records (start time, answering backend or the error) for every connection."""

    def __init__(self, port: int, n: int = 10):
        self.port = port
        self.results: list[tuple[float, str | None, str | None]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True)
                        for i in range(n)]

    def client(self, i):
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                s = connect(self.port, timeout=5)
                try:
                    s.sendall(b"ping %d\n" % i)
                    reply = b""
                    while not reply.endswith(b"\n"):
                        data = s.recv(4096)
                        if not data:
                            raise ConnectionError(f"EOF after {reply!r}")
                        reply += data
                finally:
                    s.close()
                name, _, line = reply.decode().rstrip("\n").partition(":")
                assert line == f"ping {i}", reply
                self.results.append((started, name, None))
            except (OSError, AssertionError) as exc:
                self.results.append((started, None, repr(exc)))
            time.sleep(0.002)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(10)


@pytest.mark.timeout(60)
def test_killed_backend_is_marked_down_then_up_again_and_no_new_client_fails(l4lb):
    """SIGKILL is a crash: the requests in flight on that backend at that instant are
    reset with it, and no L4 balancer can hide those (the request may have been
    processed). Every connection started after the process is gone must succeed: the
    relay retries refused connects elsewhere and passive detection takes it out."""
    interval, rise, fall = 0.4, 2, 2
    procs = [BackendProcess(f"b{i}").start() for i in range(3)]
    try:
        lb = l4lb(simple_config(
            [(p.name, p.address) for p in procs],
            listener_extra="retries = 2\nconnect_timeout = 1.0",
            access=False) + health_section(interval=interval, timeout=0.3, rise=rise, fall=fall))
        victim = procs[1]
        with LoadLoop(lb.port(), n=10) as load:
            wait_until(lambda: any(r[1] == "b1" for r in load.results), what="b1 serving")
            killed_at = time.time()
            victim.kill()
            dead_since = time.monotonic()
            down = lb.wait_event("backend_state_changed", timeout=10, backend="b1", new="down")
            down_since = time.monotonic()        # clients keep coming while b1 is down
            wait_until(lambda: sum(r[0] > down_since for r in load.results) >= 50,
                       what="50 connections while b1 is down")
            victim.start()                       # same port
            listening_at, listening_since = time.time(), time.monotonic()
            up = lb.wait_event("backend_state_changed", timeout=10, backend="b1", new="up")
            wait_until(lambda: any(r[1] == "b1" and r[0] > listening_since
                                   for r in load.results), what="b1 back in rotation")
            wait_until(lambda: len(load.results) > 300, what="300 connections in all")
        results = load.results
    finally:
        for p in procs:
            p.kill()

    assert logged_at(down) - killed_at <= fall * interval + interval
    assert down["old"] == "up" and down["last_error"] in ("connect_refused", "connect_timeout")
    assert logged_at(up) - listening_at <= rise * interval + interval
    assert state_changes(lb) == [("b1", "up", "down"), ("b1", "down", "up")]

    failed_after_death = [r for r in results if r[2] is not None and r[0] >= dead_since]
    failed_in_flight = [r for r in results if r[2] is not None and r[0] < dead_since]
    assert failed_after_death == []
    assert len(failed_in_flight) <= 10           # at most one per client, at the kill
    assert len(results) > 300
    assert [r for r in results if r[1] == "b1" and r[0] > listening_since]  # back in rotation


# --- send / expect ------------------------------------------------------------------------

def ping_handler(answer: bytes | None, close_after: bool = False):
    """Lines: `PING` gets `answer` (None: never answered); anything else the backend's name."""
    def handler(conn, backend):
        for line in iter_lines(conn):
            if line != b"PING":
                conn.sendall(backend.name.encode() + b"\n")
            elif answer is not None:
                conn.sendall(answer)
                if close_after:
                    return
    return handler


@pytest.mark.timeout(60)
def test_backends_answering_wrong_bytes_are_marked_down_and_the_right_one_stays_up(
        backends, l4lb):
    right = backends(ping_handler(b"+PONG\r\n"), name="right")
    wrong_open = backends(ping_handler(b"-ERR\r\n"), name="wrong_open")
    wrong_close = backends(ping_handler(b"-ERR\r\n", close_after=True), name="wrong_close")
    lb = l4lb(simple_config(
        [(b.name, b.address) for b in (right, wrong_open, wrong_close)])
        + health_section(interval=0.2, timeout=0.5, rise=2, fall=2, send="PING\\n",
                         expect="PONG"))
    d1 = lb.wait_event("backend_state_changed", timeout=10, backend="wrong_open", new="down")
    d2 = lb.wait_event("backend_state_changed", timeout=10, backend="wrong_close", new="down")
    assert d1["last_error"].startswith("expect_timeout: 'PONG' not in b'-ERR\\r\\n'")
    assert d2["last_error"].startswith("expect_closed: 'PONG' not in b'-ERR\\r\\n'")
    wait_probes(right, 6)                        # five more probes judged
    assert state_changes(lb, "right") == []
    assert backend_row(lb, "right")["state"] == "up"
    for _ in range(6):
        s = connect(lb.port())
        s.sendall(b"who\n")
        assert s.recv(100) == b"right\n"
        s.close()


@pytest.mark.timeout(60)
def test_a_backend_that_accepts_but_never_answers_is_marked_down_by_timeout(backends, l4lb):
    silent = backends(ping_handler(None), name="silent")
    ok = backends(ping_handler(b"PONG\n"), name="ok")
    lb = l4lb(simple_config(
        [(b.name, b.address) for b in (silent, ok)])
        + health_section(interval=0.3, timeout=0.3, rise=2, fall=2, send="PING\\n",
                         expect="PONG"))
    down = lb.wait_event("backend_state_changed", timeout=10, backend="silent", new="down")
    assert down["cause"] == "health_check"
    assert down["last_error"] == "expect_timeout: 'PONG' not in b'' after 0.3s"
    assert state_changes(lb, "ok") == []


@pytest.mark.timeout(60)
def test_unreachable_backend_of_a_pool_without_health_stays_up_and_clients_are_retried(
        backends, l4lb):
    ok = backends(ping_handler(b"PONG\n"), name="ok")
    lb = l4lb(simple_config([("dead", f"127.0.0.1:{free_port_refused()}"), ("ok", ok.address)],
                            listener_extra="retries = 2"))
    for _ in range(10):
        s = connect(lb.port())
        s.sendall(b"who\n")
        assert s.recv(100) == b"ok\n"
        s.close()
    assert state_changes(lb) == []


# --- on_down ------------------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("on_down", ["close", "keep"])
def test_on_down_decides_whether_existing_connections_are_closed(backends, l4lb, on_down):
    healthy = threading.Event()
    healthy.set()

    def handler(conn, backend):
        """Health probe: PING -> PONG while healthy, SICK after; other lines echoed."""
        for line in iter_lines(conn):
            if line == b"PING":
                conn.sendall(b"PONG\n" if healthy.is_set() else b"SICK\n")
            else:
                conn.sendall(line + b"\n")

    b = backends(handler, name="a")
    lb = l4lb(simple_config(
        [("a", b.address)], pool_extra=f'on_down = "{on_down}"')
        + health_section(interval=0.2, timeout=0.5, rise=1, fall=1, send="PING\\n",
                         expect="PONG"))
    s = connect(lb.port(), timeout=5)
    s.sendall(b"hello\n")
    assert s.recv(100) == b"hello\n"
    healthy.clear()
    lb.wait_event("backend_state_changed", timeout=10, backend="a", new="down")
    if on_down == "close":
        lb.wait_event("backend_connections_closed", timeout=5, backend="a", closed=1)
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
    else:
        s.sendall(b"still there\n")
        assert s.recv(100) == b"still there\n"
        assert lb.events_named("backend_connections_closed") == []
    s.close()


# --- PROXY header on probes ------------------------------------------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("send_proxy,stays_up", [("v1", True), ("off", False)])
def test_probes_carry_a_proxy_header_for_backends_that_require_one(backends, l4lb,
                                                                   send_proxy, stays_up):
    def requires_proxy_v1(conn, backend):
        head = b""
        while b"\r\n" not in head:
            data = conn.recv(1)
            if not data:
                return
            head += data
            if len(head) > 107:                  # the v1 maximum: not a PROXY header
                return
        if not head.startswith(b"PROXY TCP4 127.0.0.1 127.0.0.1 "):
            return
        if conn.recv(100) == b"PING\n":
            conn.sendall(b"PONG\n")

    b = backends(requires_proxy_v1, name="a")
    lb = l4lb(simple_config([("a", b.address)]) + health_section(
        interval=0.2, timeout=0.5, rise=1, fall=2, send="PING\\n", expect="PONG",
        send_proxy=send_proxy))
    if stays_up:
        wait_probes(b, 6)                        # five probes judged, each a chance to fall
        assert state_changes(lb) == []
        assert backend_row(lb, "a")["state"] == "up"
    else:
        down = lb.wait_event("backend_state_changed", timeout=10, backend="a", new="down")
        assert down["last_error"].startswith("expect_timeout")   # no CRLF: it waits


# --- the probe, against asyncio servers --------------------------------------------------------

async def serve(handler):
    """An asyncio server on 127.0.0.1:0 running `handler(reader, writer)`."""
    async def wrapped(reader, writer):
        try:
            await handler(reader, writer)
        finally:
            writer.close()
    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def run_probe(handler, **cfg):
    async def main():
        server, port = await serve(handler)
        async with server:
            return await probe("127.0.0.1", port, HealthConfig(**cfg))
    return asyncio.run(main())


async def say(text):
    async def handler(reader, writer):
        await reader.readline()
        writer.write(text)
        await writer.drain()
        await asyncio.sleep(5)
    return handler


def test_probe_passes_on_connect_alone():
    async def idle(reader, writer):
        await reader.read()
    res = run_probe(idle, timeout=1.0)
    assert res.passed and res.error is None and 0 <= res.duration < 1.0


def test_probe_fails_refused_connect():
    res = asyncio.run(probe("127.0.0.1", free_port_refused(), HealthConfig(timeout=1.0)))
    assert (res.passed, res.error) == (False, "connect_refused")


def test_probe_with_send_only_passes_once_written_without_waiting_for_a_reply():
    got = []

    async def silent(reader, writer):
        got.append(await reader.readline())
        await asyncio.sleep(5)
    res = run_probe(silent, timeout=2.0, send="HELLO\n")
    assert res.passed and res.duration < 1.0


def test_probe_with_expect_only_checks_the_greeting():
    async def banner(reader, writer):
        writer.write(b"220 smtp ready\r\n")
        await writer.drain()
        await asyncio.sleep(5)
    assert run_probe(banner, timeout=1.0, expect="220 ").passed


def test_probe_finds_expect_split_across_reads():
    async def slow(reader, writer):
        await reader.readline()
        for chunk in (b"+PO", b"NG", b"\r\n"):
            writer.write(chunk)
            await writer.drain()
            await asyncio.sleep(0.02)
        await asyncio.sleep(5)
    assert run_probe(slow, timeout=1.0, send="PING\r\n", expect="PONG").passed


def test_probe_fails_when_expect_is_not_in_the_first_64_kib():
    async def flood(reader, writer):
        await reader.readline()
        writer.write(b"x" * (MAX_EXPECT_READ + 10))
        await writer.drain()
        await asyncio.sleep(5)
    res = run_probe(flood, timeout=2.0, send="PING\n", expect="PONG")
    assert not res.passed and res.error.startswith("expect_overflow")


@pytest.mark.parametrize("version,expected", [
    ("v2", b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00PING\n"),
    ("v1", b"PROXY TCP4 127.0.0.1 127.0.0.1 "),
])
def test_probe_sends_the_proxy_header_before_the_payload(version, expected):
    got = []

    async def record(reader, writer):
        got.append(await reader.read(200))
        writer.write(b"PONG\n")
        await writer.drain()
    res = run_probe(record, timeout=1.0, send="PING\n", expect="PONG", send_proxy=version)
    assert res.passed
    assert got[0].startswith(expected)
    if version == "v1":
        head, _, rest = got[0].partition(b"\r\n")
        assert rest == b"PING\n"
        assert len(head.split()) == 6
