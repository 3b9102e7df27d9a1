"""The balancer: one config's pools and listeners running on one event loop.

It builds the model from a config (pools, listeners, health checks, the runtime state
restored on top), runs it (binds, the periodic sweep, the metrics endpoint) and stops it
(graceful shutdown); it writes the access log. The other jobs live in their own rooms,
which it owns one each of:

- `listening` (listen.py): the listening sockets, and accept pausing when out of fds;
- `operator` (actions.py): the operator's actions, recording and persisting them;
- `state_writer` (persist.py): the state file, written off the loop, coalesced;
- reload (reload.py): a pure plan from two configs, and its apply;
- `cluster` (cluster.py), with [cluster] only: the etcd session of a fleet's node.

Everything here is control plane: it runs per connection at most (the access log line),
never per chunk of data.
"""
from __future__ import annotations

import asyncio
import time

from . import _native
from .actions import Operator
from .cluster import Cluster
from .config import Config, PoolConfig
from .health import HealthMonitor
from .endpoint import MetricsEndpoint
from .listen import Listening
from .log import get_logger
from .model import Backend, BackendState, Listener, Pool
from .persist import StateWriter
from .resolver import Resolver
from .reload import reload_from_file
from .state import RuntimeState, StateFileError, load_state, state_path_for


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
        self.state_path = state_path_for(config.control.socket)
        self.runtime_state = RuntimeState()
        self.state_writer = StateWriter(self.loop, self.state_path, lambda: self.runtime_state,
                                        self.log)
        self.operator = Operator(self)
        self.listening = Listening(self.loop, self.hub, self.listeners, self.log)
        self.set_access_log(config.log.access)
        self.health = HealthMonitor(self.hub, self.log)
        self.resolver = Resolver(config.resolvers, lambda: self.pools.values(), self.log)
        for pcfg in config.pools.values():
            self.pools[pcfg.name] = self.create_pool(pcfg)
        for lcfg in config.listeners.values():
            self.listeners[lcfg.name] = self.create_listener(lcfg)
        self.restore_runtime_state()
        self.cluster = Cluster(self, config.cluster) if config.cluster is not None else None
        self.metrics = MetricsEndpoint(self)

    # --- construction --------------------------------------------------------------------

    def create_pool(self, cfg: PoolConfig) -> Pool:
        pool = Pool(cfg, on_state_change=self.log_state_change)
        for backend in pool:
            self.wire_backend(backend)
        return pool

    def create_listener(self, cfg) -> Listener:
        return Listener(cfg, self.hub, self.pools)

    def wire_backend(self, backend: Backend) -> None:
        """Hook a backend's Target to the control plane: idle waiters, health checks and
        passive detection."""
        backend.target.on_idle = self.operator.target_idle
        self.health.watch(backend)

    def log_state_change(self, backend: Backend, old: BackendState, new: BackendState,
                         cause: str) -> None:
        self.log.info("backend_state_changed", pool=backend.pool.name, backend=backend.name,
                      old=str(old), new=str(new), cause=cause, last_error=backend.last_error)

    def set_access_log(self, enabled: bool) -> None:
        self.hub.access_log = self.log_connection_closed if enabled else None

    def log_connection_closed(self, relay, reason: str) -> None:
        self.log.info(
            "connection_closed",
            client=f"{relay.client_host}:{relay.client_port}",
            listener=relay.listener.name,
            pool=relay.pool_name,
            backend=relay.backend_name,
            duration_ms=round((_native.monotonic() - relay.started) * 1000.0, 3),
            bytes_in=relay.bytes_in,
            bytes_out=relay.bytes_out,
            response_ms=(None if (rt := relay.response_time) is None
                         else round(rt * 1000.0, 3)),
            reason=reason,
            sni=relay.sni,
            alpn=None if relay.alpn is None else list(relay.alpn),
        )

    def restore_runtime_state(self) -> None:
        """Re-apply the operator's changes from the state file on top of the config.
        A corrupt file is reported and ignored."""
        try:
            self.runtime_state = load_state(self.state_path)
        except StateFileError as exc:
            self.log.error("state_file_ignored", path=str(self.state_path), error=str(exc))
            self.runtime_state = RuntimeState()
            return
        for issue in self.runtime_state.issues:      # entries the state file's rules refused
            self.log.warning("state_entry_ignored", section=issue.section, key=issue.key,
                             error=issue.message)
        self.operator.restore_state()

    # --- running -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener and start the sweep. OSError if a bind fails (nothing is
        left listening in that case)."""
        try:
            for listener in self.listeners.values():
                await self.listening.open_listener(listener)
            await self.metrics.start(self.config.metrics.listen)
        except BaseException:
            self.listening.close_all()
            raise
        self._sweeper = self.loop.create_task(self.sweep_forever())
        self.health.start()
        self.resolver.start()
        if self.cluster is not None:
            self.cluster.start()

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

    async def reload(self, cause: str = "command") -> list[str]:
        """Re-read the config file and apply it in place (reload.py); refused while
        shutting down. OperationError, with nothing changed, says why it was refused."""
        return await reload_from_file(self, cause)

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
        self.listening.close_all()
        await self.health.stop()
        await self.resolver.stop()
        deadline = self.loop.time() + timeout
        while self.hub.active > 0 and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = self.hub.active
        if left:
            self.hub.close_all("shutdown")
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.sleep(0)          # let aborted transports deliver connection_lost
        if self.cluster is not None:
            await self.cluster.stop()       # leaves the fleet: its record goes at once
        await self.state_writer.flush()
        self.metrics.close()            # served until here: the drain can be watched
        self.log.info("shutdown_finished", closed=left)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
