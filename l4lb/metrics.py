"""The Prometheus endpoint: `[metrics] listen = "HOST:PORT"` serves GET /metrics.

Theory of operation
-------------------
Nothing is counted through prometheus-client. The relay keeps its counters in C integers
(Target, ListenerRuntime, Hub in ext/l4lb/relay.pxd); at scrape time BalancerCollector
walks the pools' backends and the listeners once and copies those integers into metric
families, which prometheus-client renders in its text format. So a scrape costs
O(backends + listeners), independent of how many connections are open (open descriptors
are counted with one stat of /proc/self/fd, see count_open_fds), and the data path pays
nothing for being observed.

The collector reads Cython objects that the event loop mutates, so it must run on the
loop thread: the HTTP side is a small asyncio protocol on the balancer's own loop, not
prometheus-client's threaded server. It answers GET (and HEAD) /metrics, 404 for any
other path, 405 for any other method, 400 for anything that is not an HTTP request line,
and closes the connection after each reply. A request head larger than MAX_REQUEST bytes
or slower than REQUEST_TIMEOUT seconds is cut off, at most MAX_CLIENTS scrapers are
served at once, and a collector failure becomes a 500 and a log line: nothing a client
sends, and no bug in a collector, can stop the balancer.

METRICS is the list of every metric with its type, labels and meaning; the collector
builds its families from it and docs/REFERENCE.md is generated from it (l4lb.docs).
"""
from __future__ import annotations

import asyncio
import os
import re
import resource
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, NamedTuple

import psutil
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from . import __version__
from ._native import max_pipes  # the relay's pipe cap, also counted in fds_needed
from .config import Address
from .log import get_logger
from .model import BackendState

if TYPE_CHECKING:
    from .balancer import Balancer

# --- the metrics -------------------------------------------------------------------------


class MetricSpec(NamedTuple):
    """One exported metric. `name` is the sample name as scraped (counters end in
    `_total`); `kind` is "counter" or "gauge"."""
    name: str
    kind: str
    labels: tuple[str, ...]
    doc: str

    def family(self):
        """An empty prometheus-client family for this metric."""
        if self.kind == "counter":
            # CounterMetricFamily takes the name without `_total` and adds it to samples.
            return CounterMetricFamily(self.name.removesuffix("_total"), self.doc,
                                       labels=self.labels)
        return GaugeMetricFamily(self.name, self.doc, labels=self.labels)


_BACKEND = ("pool", "backend")

METRICS: tuple[MetricSpec, ...] = (
    # process
    MetricSpec("l4lb_info", "gauge", ("version",), "Always 1; the version label says which l4lb runs."),
    MetricSpec("l4lb_uptime_seconds", "gauge", (), "Seconds since the balancer started."),
    MetricSpec("l4lb_process_cpu_seconds_total", "counter", (),
               "CPU time (user + system) the process has used, in seconds."),
    MetricSpec("l4lb_process_resident_memory_bytes", "gauge", (), "Resident set size (RSS) in bytes."),
    MetricSpec("l4lb_process_open_fds", "gauge", (), "File descriptors the process has open."),
    MetricSpec("l4lb_process_max_fds", "gauge", (),
               "The soft limit on open file descriptors (RLIMIT_NOFILE); each relayed "
               "connection holds two."),
    MetricSpec("l4lb_connections_active", "gauge", (), "Client connections open now, all listeners."),
    MetricSpec("l4lb_connections_total", "counter", (), "Client connections admitted since start, all listeners."),
    MetricSpec("l4lb_metrics_scrape_duration_seconds", "gauge", (),
               "How long the previous scrape took to collect and render, in seconds."),
    # listeners
    MetricSpec("l4lb_listener_accepted_total", "counter", ("listener",),
               "Client connections accepted and admitted by the listener."),
    MetricSpec("l4lb_listener_rejected_total", "counter", ("listener", "reason"),
               "Client connections closed without being relayed, by reason (limits, ACL, "
               "bad PROXY header, queue timeout, fd exhaustion, ...)."),
    MetricSpec("l4lb_listener_active_connections", "gauge", ("listener",),
               "Client connections of the listener open now."),
    MetricSpec("l4lb_listener_split_ratio", "gauge", ("listener", "pool"),
               "Share (0..1) of the listener's new connections routed to the pool: 1 for "
               "the active pool of a plain listener, the split percentage / 100 in a canary."),
    # backends
    MetricSpec("l4lb_backend_active_connections", "gauge", _BACKEND,
               "Connections assigned to the backend and not yet closed."),
    MetricSpec("l4lb_backend_connections_total", "counter", _BACKEND,
               "Connections that reached the backend (connect succeeded)."),
    MetricSpec("l4lb_backend_bytes_total", "counter", _BACKEND + ("direction",),
               "Bytes relayed through the backend's connections: direction=\"in\" client "
               "to backend, direction=\"out\" backend to client."),
    MetricSpec("l4lb_backend_connect_failures_total", "counter", _BACKEND,
               "Connects to the backend that were refused, failed or timed out."),
    MetricSpec("l4lb_backend_up", "gauge", _BACKEND,
               "1 when the backend takes new connections (state up), else 0."),
    MetricSpec("l4lb_backend_state", "gauge", _BACKEND + ("state",),
               "1 for the backend's current state (up, down, draining, maint), 0 for the others."),
    MetricSpec("l4lb_backend_weight", "gauge", _BACKEND,
               "The backend's configured weight (0 = no new connections)."),
    MetricSpec("l4lb_backend_response_time_seconds", "gauge", _BACKEND,
               "Exponentially weighted moving average of the backend's connect time in "
               "seconds; absent until its first connection."),
)

METRICS_BY_NAME = {spec.name: spec for spec in METRICS}
_STATES = tuple(str(s) for s in BackendState)


# --- process figures (shared with `show info`) ---------------------------------------------

# File descriptors beyond two per connection: listening sockets, the control socket,
# health probes, the log stream, the metrics endpoint, epoll and libuv's own.
FD_HEADROOM = 100


def uses_pipes(config) -> bool:
    """Whether any listener relays with the raw-socket relay (`splice = true`), whose
    bulk transfers borrow pipes."""
    return any(getattr(l, "splice", False) for l in config.listeners.values())


def fds_needed(max_connections: int, pipes: bool = False) -> int:
    """Descriptors `max_connections` relayed connections need: two each (client and
    backend), two per pipe when a listener splices, plus FD_HEADROOM. 0 (unlimited)
    needs no particular figure."""
    if max_connections <= 0:
        return 0
    return 2 * max_connections + (2 * max_pipes(max_connections) if pipes else 0) + FD_HEADROOM


def fd_limit_warnings(max_connections: int, soft: int | None = None,
                      pipes: bool = False) -> list[str]:
    """Sentences for an operator when the soft RLIMIT_NOFILE (the current one unless
    given) is below what `global.max_connections` needs; [] when it is enough."""
    if soft is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = fds_needed(max_connections, pipes)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return []
    per = "2 per connection"
    if pipes:
        per += f", 2 per pipe for up to {max_pipes(max_connections)} pipes"
    room = max(0, (soft - FD_HEADROOM) * max_connections // (need - FD_HEADROOM))
    return [f"the open file limit is {soft} but global.max_connections = {max_connections} "
            f"needs {need} ({per}, + {FD_HEADROOM}): raise "
            f"LimitNOFILE / ulimit -n, or lower max_connections; beyond {room} "
            "connections new clients will be refused"]


def fd_limit_report(max_connections: int, pipes: bool = False) -> dict:
    """The `show info` fields on descriptors: fd_limit {soft, hard} (None = unlimited),
    fds_needed by global.max_connections, and warnings (sentences; [] when all is well)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    return {
        "fd_limit": {"soft": None if soft == unlimited else soft,
                     "hard": None if hard == unlimited else hard},
        "fds_needed": fds_needed(max_connections, pipes),
        "warnings": fd_limit_warnings(max_connections, soft, pipes),
    }


def count_open_fds(process: psutil.Process | None = None) -> int:
    """Descriptors this process has open.

    Linux 6.2+ reports the count as the size of /proc/self/fd: one stat, O(1). Older
    kernels report 0 there, and the count falls back to listing the directory (psutil),
    which costs O(open fds) — about 25 ms at 20,000 descriptors on a small machine."""
    try:
        size = os.stat("/proc/self/fd").st_size
    except OSError:
        size = 0
    if size > 0:
        return size
    return (process or psutil.Process()).num_fds()


@dataclass
class ProcessFigures:
    cpu_seconds: float
    rss_bytes: int
    open_fds: int
    fd_soft: int
    fd_hard: int


class ProcessProbe:
    """Reads this process's figures through psutil, one /proc pass per call."""

    def __init__(self):
        self.process = psutil.Process(os.getpid())

    def read(self) -> ProcessFigures:
        p = self.process
        with p.oneshot():
            cpu = p.cpu_times()
            figures = ProcessFigures(
                cpu_seconds=cpu.user + cpu.system,
                rss_bytes=p.memory_info().rss,
                open_fds=count_open_fds(p),
                fd_soft=0, fd_hard=0)
        figures.fd_soft, figures.fd_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return figures


# --- the collector ---------------------------------------------------------------------------


class BalancerCollector:
    """A prometheus-client collector that reads a Balancer's counters at scrape time.

    Runs on the balancer's loop thread (it reads Cython objects the loop mutates). Walks
    pools, backends and listeners once; never the connections."""

    def __init__(self, balancer: "Balancer"):
        self.balancer = balancer
        self.probe = ProcessProbe()
        self.last_duration = 0.0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def describe(self):
        # Nothing to describe up front: registering must not run a scrape.
        return []

    def collect(self) -> Iterator:
        b = self.balancer
        fam = {spec.name: spec.family() for spec in METRICS}

        def put(name, labels, value):
            fam[name].add_metric(labels, value)

        proc = self.probe.read()
        put("l4lb_info", [__version__], 1)
        put("l4lb_uptime_seconds", [], time.time() - b.started_at)
        put("l4lb_process_cpu_seconds_total", [], proc.cpu_seconds)
        put("l4lb_process_resident_memory_bytes", [], proc.rss_bytes)
        put("l4lb_process_open_fds", [], proc.open_fds)
        put("l4lb_process_max_fds", [], proc.fd_soft)
        put("l4lb_connections_active", [], b.hub.active)
        put("l4lb_connections_total", [], b.hub.total)
        put("l4lb_metrics_scrape_duration_seconds", [], self.last_duration)

        for listener in b.listeners.values():
            rt = listener.runtime
            name = listener.name
            put("l4lb_listener_accepted_total", [name], rt.accepted)
            put("l4lb_listener_active_connections", [name], rt.active)
            for reason, count in rt.rejected.items():
                put("l4lb_listener_rejected_total", [name, reason], count)
            if listener.split:
                for pool, pct in listener.split.items():
                    put("l4lb_listener_split_ratio", [name, pool], pct / 100.0)
            elif listener.pool_name is not None:
                put("l4lb_listener_split_ratio", [name, listener.pool_name], 1.0)

        for pool in b.pools.values():
            algo = pool.algo
            for backend in pool.backends.values():
                t = backend.target
                labels = [pool.name, backend.name]
                state = str(backend.state)
                put("l4lb_backend_active_connections", labels, t.active)
                put("l4lb_backend_connections_total", labels, t.total)
                put("l4lb_backend_bytes_total", labels + ["in"], t.bytes_in)
                put("l4lb_backend_bytes_total", labels + ["out"], t.bytes_out)
                put("l4lb_backend_connect_failures_total", labels, t.failed)
                put("l4lb_backend_up", labels, 1 if state == "up" else 0)
                for s in _STATES:
                    put("l4lb_backend_state", labels + [s], 1 if s == state else 0)
                put("l4lb_backend_weight", labels, backend.weight)
                rt_ewma = algo.rt_ewma(backend.slot)
                if rt_ewma is not None:
                    put("l4lb_backend_response_time_seconds", labels, rt_ewma)
        return iter(fam.values())

    def render(self) -> bytes:
        """The whole /metrics body in the Prometheus text format."""
        t0 = time.perf_counter()
        body = generate_latest(self.registry)
        self.last_duration = time.perf_counter() - t0
        return body


# --- the HTTP side -------------------------------------------------------------------------

# The text format the body is written in; identical in 0.0.4 and 1.0.0 for our names, and
# every Prometheus server since 2.0 accepts 0.0.4.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A scrape request is one short request line and a few headers; anything bigger is not one.
MAX_REQUEST = 8192
# Seconds a client gets to send its request head (a slowloris guard).
REQUEST_TIMEOUT = 10.0
# Scrapers served at once; beyond it new connections are closed at once. Prometheus uses one.
MAX_CLIENTS = 32

_REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (\S{1,4096}) HTTP/1\.[01]\r?")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}


class MetricsConnection(asyncio.Protocol):
    """One HTTP/1.x client: read the request head, answer once, close."""

    def __init__(self, endpoint: "MetricsEndpoint"):
        self.endpoint = endpoint
        self.transport = None
        self.buf = bytearray()
        self.timer = None
        self.done = False

    def connection_made(self, transport):
        self.transport = transport
        ep = self.endpoint
        ep.clients.add(self)
        if len(ep.clients) > MAX_CLIENTS:
            self.respond(503, b"too many scrapers\n")
            return
        self.timer = ep.loop.call_later(REQUEST_TIMEOUT, self.respond, 408, b"request timeout\n")

    def data_received(self, data):
        if self.done:
            return
        self.buf += data
        end = _HEAD_END.search(self.buf)
        if end is None:
            if len(self.buf) > MAX_REQUEST:
                self.respond(431, b"request too large\n")
            return
        self.handle(bytes(self.buf[:end.start()]))

    def eof_received(self):
        if not self.done:
            self.respond(400, b"incomplete request\n")
        return False

    def connection_lost(self, exc):
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.endpoint.clients.discard(self)

    def handle(self, head: bytes) -> None:
        m = _REQUEST_LINE.fullmatch(head.split(b"\n", 1)[0])
        if m is None:
            self.respond(400, b"not an HTTP request\n")
            return
        method, target = m.group(1), m.group(2)
        path = target.split(b"?", 1)[0]
        if path != b"/metrics":
            self.respond(404, b"not found; metrics are at /metrics\n")
        elif method not in (b"GET", b"HEAD"):
            self.respond(405, b"only GET and HEAD\n", extra=b"Allow: GET, HEAD\r\n")
        else:
            try:
                body = self.endpoint.collector.render()
            except Exception:
                self.endpoint.log.exception("metrics_scrape_failed")
                self.respond(500, b"scrape failed; see the balancer's log\n")
                return
            self.respond(200, body, content_type=CONTENT_TYPE, head_only=method == b"HEAD")

    def respond(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                extra: bytes = b"", head_only: bool = False) -> None:
        """Send one reply and close; later calls (timer after a reply) do nothing."""
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
                f"Content-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\n"
                "Connection: close\r\n").encode() + extra + b"\r\n"
        self.transport.write(head if head_only else head + body)
        self.transport.close()          # flushes what is buffered, then closes


class MetricsEndpoint:
    """The /metrics server of one Balancer: started, moved on reload, stopped.

    start/prepare raise OSError when the address cannot be bound (nothing changes then)."""

    def __init__(self, balancer: "Balancer"):
        self.balancer = balancer
        self.loop = balancer.loop
        self.log = get_logger()
        self.collector = BalancerCollector(balancer)
        self.clients: set[MetricsConnection] = set()
        self.address: Address | None = None
        self.server: asyncio.AbstractServer | None = None
        self._pending: tuple[Address | None, asyncio.AbstractServer | None] | None = None

    @property
    def port(self) -> int | None:
        """The port actually bound (port 0 resolved), or None when off."""
        if self.server is None or not self.server.sockets:
            return None
        return self.server.sockets[0].getsockname()[1]

    async def _open(self, address: Address) -> asyncio.AbstractServer:
        from .listen import open_listening_socket   # balancer imports this module

        sock = open_listening_socket(address)
        return await self.loop.create_server(lambda: MetricsConnection(self), sock=sock)

    async def start(self, address: Address | None) -> None:
        """Serve /metrics on `address` (None = off)."""
        await self.prepare(address)
        self.commit()

    async def prepare(self, address: Address | None) -> None:
        """Reload, step 1: bind `address` if it differs from the current one. OSError
        when it cannot be bound; nothing has changed then."""
        if address == self.address:
            self._pending = None
            return
        server = await self._open(address) if address is not None else None
        self._pending = (address, server)

    def commit(self) -> None:
        """Reload, step 2: switch to what prepare() opened; no-op when nothing changed."""
        if self._pending is None:
            return
        address, server = self._pending
        self._pending = None
        if self.server is not None:
            self.server.close()
            self.log.info("metrics_stopped", listen=str(self.address))
        self.address, self.server = address, server
        if server is not None:
            self.log.info("metrics_started", listen=str(address), port=self.port)

    def abort(self) -> None:
        """Reload failed elsewhere: close what prepare() opened, keep the current server."""
        if self._pending is not None and self._pending[1] is not None:
            self._pending[1].close()
        self._pending = None

    def close(self) -> None:
        self.abort()
        if self.server is not None:
            self.server.close()
            self.server = None
            self.address = None
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abort()
        self.clients.clear()
