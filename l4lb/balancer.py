"""The balancer: builds pools and listeners from a config, runs them on the loop, and
owns the periodic sweep, graceful shutdown and the access log.

One Balancer per process and event loop. Everything here is control plane: it runs per
connection at most (the access log line), never per chunk of data.
"""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import time

from . import _native
from .config import Address, Config
from .log import get_logger
from .model import Backend, BackendState, Listener, Pool

# Backlog of each listening socket: deep enough for connection bursts (HAProxy uses the
# listener's maxconn; the kernel caps it at net.core.somaxconn anyway).
LISTEN_BACKLOG = 4096
# Seconds between two `fd_exhausted` warnings: one line per episode, not one per client.
FD_EXHAUSTED_LOG_INTERVAL = 10.0


def open_listening_socket(addr: Address) -> socket.socket:
    """A bound, listening, non-blocking socket for `addr`. OSError (e.g. EADDRINUSE)
    propagates with the address in its message."""
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if addr.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
    return sock


class Balancer:
    """Runs one config's listeners and pools on one event loop."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop | None = None):
        self.config = config
        self.loop = loop or asyncio.get_event_loop()
        self.log = get_logger()
        self.hub = _native.Hub(self.loop)
        self.hub.max_connections = config.global_.max_connections
        self.pools: dict[str, Pool] = {}
        self.listeners: dict[str, Listener] = {}
        self.started_at = time.time()
        self.stopping = False
        self._sweeper: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self.set_access_log(config.log.access)
        self.hub.on_overload = self.note_fd_exhausted
        self._fd_exhausted_logged_at = -1e9
        for pcfg in config.pools.values():
            self.pools[pcfg.name] = self.create_pool(pcfg)
        for lcfg in config.listeners.values():
            self.listeners[lcfg.name] = Listener(lcfg, self.hub, self.pools)

    # --- construction --------------------------------------------------------------------

    def create_pool(self, cfg) -> Pool:
        pool = Pool(cfg, on_state_change=self.log_state_change)
        for backend in pool:
            self.wire_backend(backend)
        return pool

    def wire_backend(self, backend: Backend) -> None:
        """Hook a backend's Target to the control plane (passive health lands in issue 5)."""
        backend.target.on_connect_failed = None

    def log_state_change(self, backend: Backend, old: BackendState, new: BackendState,
                         cause: str) -> None:
        self.log.info("backend_state_changed", pool=backend.pool.name, backend=backend.name,
                      old=str(old), new=str(new), cause=cause, last_error=backend.last_error)

    def note_fd_exhausted(self) -> None:
        """Log fd exhaustion once per episode (at most every FD_EXHAUSTED_LOG_INTERVAL s)."""
        now = self.loop.time()
        if now - self._fd_exhausted_logged_at >= FD_EXHAUSTED_LOG_INTERVAL:
            self._fd_exhausted_logged_at = now
            self.log.warning("fd_exhausted", active=self.hub.active,
                             hint="raise LimitNOFILE / ulimit -n, or lower max_connections")

    def set_access_log(self, enabled: bool) -> None:
        self.hub.access_log = self.log_connection_closed if enabled else None

    def log_connection_closed(self, relay, reason: str) -> None:
        self.log.info(
            "connection_closed",
            client=f"{relay.client_host}:{relay.client_port}",
            listener=relay.listener.name,
            pool=relay.pool_name,
            backend=relay.backend_name,
            duration_ms=round((self.loop.time() - relay.started) * 1000.0, 3),
            bytes_in=relay.bytes_in,
            bytes_out=relay.bytes_out,
            reason=reason,
        )

    # --- running -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener and start the sweep. OSError if a bind fails (nothing is
        left listening in that case)."""
        try:
            for listener in self.listeners.values():
                await self.start_listener(listener)
        except BaseException:
            self.close_listeners()
            raise
        self._sweeper = self.loop.create_task(self.sweep_forever())

    async def start_listener(self, listener: Listener) -> None:
        for addr in listener.config.bind:
            sock = open_listening_socket(addr)
            server = await self.loop.create_server(listener.runtime, sock=sock,
                                                   backlog=LISTEN_BACKLOG)
            listener.servers.append(server)
            bound = server.sockets[0].getsockname() if server.sockets else (addr.host, addr.port)
            self.log.info("listener_started", listener=listener.name, bind=str(addr),
                          port=bound[1], **listener.route())

    def bound_addresses(self, name: str) -> list[tuple]:
        """The (host, port) each bind of listener `name` actually got (port 0 resolved)."""
        out = []
        for server in self.listeners[name].servers:
            for s in server.sockets:
                out.append(s.getsockname()[:2])
        return out

    async def sweep_forever(self) -> None:
        """The one periodic timer of the data path: timeouts and slow-start ramps."""
        interval = _native.SWEEP_INTERVAL
        while True:
            await asyncio.sleep(interval)
            try:
                self.hub.sweep()
                for pool in self.pools.values():
                    pool.refresh_slow_start()
            except Exception:  # never let one bad relay stop every timeout
                self.log.exception("sweep_failed")

    def close_listeners(self) -> None:
        for listener in self.listeners.values():
            for server in listener.servers:
                server.close()
            listener.servers.clear()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop accepting, let connections finish for up to `timeout` seconds (default
        global.shutdown_timeout), then close the rest. Idempotent."""
        if self.stopping:
            await self._stopped.wait()
            return
        self.stopping = True
        if timeout is None:
            timeout = self.config.global_.shutdown_timeout
        self.log.info("shutdown_started", active=self.hub.active, timeout=timeout)
        self.close_listeners()
        deadline = self.loop.time() + timeout
        while self.hub.active > 0 and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = self.hub.active
        if left:
            self.hub.close_all("shutdown")
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.sleep(0)          # let aborted transports deliver connection_lost
        self.log.info("shutdown_finished", closed=left)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
