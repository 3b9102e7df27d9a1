"""The Prometheus endpoint: `[metrics] listen = "HOST:PORT"` serves GET /metrics, and the
status page beside it: GET / (l4lb.statuspage) and GET /status.json (l4lb.live).

Theory of operation
-------------------
The collector (l4lb.metrics) reads Cython objects that the event loop mutates, so it must
run on the loop thread: the HTTP side is a small asyncio protocol on the balancer's own
loop, not prometheus-client's threaded server. It answers GET (and HEAD) on ROUTES, 404 for
any other path, 405 for any other method, 400 for anything that is not an HTTP request
line, and closes the connection after each reply. A request head larger than MAX_REQUEST
bytes or slower than REQUEST_TIMEOUT seconds is cut off, at most MAX_CLIENTS scrapers are
served at once, and a collector failure becomes a 500 and a log line: nothing a client
sends, and no bug in a collector, can stop the balancer.

The socket is accepted through l4lb.process.ReservedServer, so that a scrape is still
answered when the process has run out of descriptors (issue 20 item 11).
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import TYPE_CHECKING


from . import statuspage
from .config import Address
from .live import MIN_RATE_INTERVAL, RateTracker, live_snapshot
from .log import get_logger
from .listen import open_listening_socket
from .metrics import BalancerCollector
from .process import ReservedServer, fd_reserve

if TYPE_CHECKING:
    from .balancer import Balancer


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


def render_metrics(endpoint: "MetricsEndpoint") -> bytes:
    return endpoint.collector.render()


def render_status_json(endpoint: "MetricsEndpoint") -> bytes:
    snap = live_snapshot(endpoint.balancer, endpoint.status_rates)
    return json.dumps(snap, separators=(",", ":"), allow_nan=False).encode()


def render_status_page(endpoint: "MetricsEndpoint") -> bytes:
    return statuspage.render_page(live_snapshot(endpoint.balancer, endpoint.status_rates))


def _scrape_failed(log) -> None:
    log.exception("metrics_scrape_failed")


def _status_failed(log) -> None:
    log.exception("status_page_failed")


# path -> (body builder, Content-Type, what logs a builder that raised)
ROUTES = {
    b"/metrics": (render_metrics, CONTENT_TYPE, _scrape_failed),
    b"/": (render_status_page, "text/html; charset=utf-8", _status_failed),
    b"/status.json": (render_status_json, "application/json", _status_failed),
}


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
        fd_reserve().refill()              # its descriptors are free again: keep them

    def handle(self, head: bytes) -> None:
        m = _REQUEST_LINE.fullmatch(head.split(b"\n", 1)[0])
        if m is None:
            self.respond(400, b"not an HTTP request\n")
            return
        method, target = m.group(1), m.group(2)
        path = target.split(b"?", 1)[0]
        route = ROUTES.get(path)
        if route is None:
            self.respond(404, b"not found; metrics are at /metrics, the status page at /\n")
        elif method not in (b"GET", b"HEAD"):
            self.respond(405, b"only GET and HEAD\n", extra=b"Allow: GET, HEAD\r\n")
        else:
            build, content_type, log_failure = route
            try:
                body = build(self.endpoint)
            except Exception:
                log_failure(self.endpoint.log)
                self.respond(500, b"failed; see the balancer's log\n")
                return
            self.respond(200, body, content_type=content_type, head_only=method == b"HEAD")

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
        # Rates of the status page and /status.json: one tracker for all their viewers
        # (each request samples; see l4lb.live.MIN_RATE_INTERVAL).
        self.status_rates = RateTracker(MIN_RATE_INTERVAL)
        self.clients: set[MetricsConnection] = set()
        self.address: Address | None = None
        self.server: ReservedServer | None = None
        self._pending: tuple[Address | None, ReservedServer | None] | None = None

    @property
    def port(self) -> int | None:
        """The port actually bound (port 0 resolved), or None when off."""
        if self.server is None or not self.server.sockets:
            return None
        return self.server.sockets[0].getsockname()[1]

    @property
    def socket(self):
        """The listening socket, or None (an upgrade hands it to the new master)."""
        return self.server.sock if self.server is not None else None

    async def _open(self, address: Address, sock=None) -> ReservedServer:
        if sock is None:
            sock = open_listening_socket(address)
        return ReservedServer(self.loop, sock, lambda: MetricsConnection(self))

    async def start(self, address: Address | None, sock=None) -> None:
        """Serve /metrics on `address` (None = off); on `sock` when given (the old
        master's, an upgrade)."""
        if sock is not None and address is not None:
            self._pending = (address, await self._open(address, sock))
        else:
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
