"""The balancer: one config's pools and listeners, run by a master and N workers
(DESIGN.md §9).

`Runtime` is the model both kinds of process build from the same config and runtime
state: pools, listeners, the Hub of the compiled data path, the operator's primitives.
`Balancer` is the master: it owns the listening sockets, the shared table (every
Target, PoolRuntime, ListenerRuntime and the Hub are attached to a record of it), the
health checks, the resolver, the metrics endpoint, the state file and the workers
(workers.py), and it never relays. A worker (worker.py) runs a Runtime of its own whose
objects are attached to the same records, and relays.

The other jobs live in their own rooms, which the master owns one each of:

- `listening` (listen.py): the listening sockets, one per worker per bind;
- `operator` (actions.py): the operator's actions, recording and persisting them;
- `state_writer` (persist.py): the state file, written off the loop, coalesced;
- `workers` (workers.py): starting, restarting and telling the workers;
- reload (reload.py): a pure plan from two configs, and its apply;
- `cluster` (cluster.py), with [cluster] only: the etcd session of a fleet's node.

Everything here is control plane: it runs per connection at most (the access log line,
in the workers), never per chunk of data.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from . import _native, vocab
from .actions import OperationError, Operator
from .cluster import Cluster
from .config import Config, PoolConfig
from .health import HealthMonitor
from .endpoint import MetricsEndpoint
from .listen import Inherited, Listening
from .log import get_logger
from .model import Backend, BackendState, Listener, Pool
from .persist import StateWriter
from .resolver import Resolver
from .reload import reload_from_file
from .sdnotify import Notifier
from .state import RuntimeState, StateFileError, load_state, state_path_for
from .workers import Workers

# Seconds between two looks at the shared table for what the workers did that the
# master acts on: connect failures (passive health) and backends that went idle (`wait`).
SHARED_POLL_INTERVAL = 0.05


class Runtime:
    """One config's model on one event loop: what master and workers both build."""

    publishes = False           # the master writes what picks read into the shared table

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, log):
        self.config = config
        self.loop = loop
        self.log = log
        self.hub = _native.Hub(self.loop)
        self.hub.max_connections = config.global_.max_connections
        self.pools: dict[str, Pool] = {}
        self.listeners: dict[str, Listener] = {}
        self.started_at = time.time()
        self.stopping = False
        self.runtime_state = RuntimeState()
        self.operator = Operator(self)

    def build(self) -> None:
        """Create the config's pools and listeners."""
        for pcfg in self.config.pools.values():
            self.pools[pcfg.name] = self.create_pool(pcfg)
        for lcfg in self.config.listeners.values():
            self.listeners[lcfg.name] = self.create_listener(lcfg)

    # --- construction hooks (each kind of process attaches the objects its way) ----------

    def create_pool(self, cfg: PoolConfig) -> Pool:
        pool = Pool(cfg, on_state_change=self.log_state_change, publish=self.publishes)
        self.attach_pool(pool)
        for backend in pool:
            self.wire_backend(backend)
        return pool

    def create_listener(self, cfg) -> Listener:
        table, index = self.listener_record(cfg.name)
        return Listener(cfg, self.hub, self.pools, table, index)

    def attach_pool(self, pool: Pool) -> None:
        self.hub.register_pool(pool.runtime)

    def detach_pool(self, pool: Pool) -> None:
        self.hub.unregister_pool(pool.runtime)

    def listener_record(self, name: str) -> tuple:
        """(table, index) of a new listener's shared record; (None, None): private."""
        return None, None

    def wire_backend(self, backend: Backend) -> None:
        """Hook a new backend's Target to this process's control plane."""

    def unwire_backend(self, backend: Backend) -> None:
        """Unhook a backend that was taken out."""

    def rewatch_pool(self, pool: Pool) -> None:
        """A reloaded pool's health config may have changed."""

    def configure_resolvers(self, cfg) -> None:
        """A reloaded [resolvers] section."""

    def remove_pool(self, pool: Pool) -> None:
        """A pool a reload dropped (its connections finish on their own)."""
        self.detach_pool(pool)

    # Binds on reload (reload.apply_plan): the master's BindGroups, a worker's Acceptors.
    def retune_binds(self, listener: Listener, lcfg, servers: dict) -> None:
        raise NotImplementedError

    def swap_binds(self, listener: Listener, servers: dict) -> None:
        raise NotImplementedError

    def close_listener(self, listener: Listener) -> None:
        raise NotImplementedError

    def log_state_change(self, backend: Backend, old: BackendState, new: BackendState,
                         cause: str) -> None:
        self.log.info("backend_state_changed", pool=backend.pool.name, backend=backend.name,
                      old=str(old), new=str(new), cause=cause, last_error=backend.last_error)

    def set_access_log(self, enabled: bool) -> None:
        """The access log is written where connections close: in the workers."""


class Balancer(Runtime):
    """The master: runs one config's listeners and pools through its workers."""

    publishes = True

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop | None = None,
                 zygote=None, takeover=None):
        loop = loop or asyncio.get_event_loop()
        super().__init__(config, loop, get_logger())
        # An upgrade's new master (upgrade.Takeover, its hello answered): it continues
        # the old one's generations and state.
        self.takeover = takeover
        info = takeover.info if takeover is not None else {}
        self.generation = info.get("generation", 0) + 1
        self.upgraded_from = info.get("pid")
        self.upgrade = None             # upgrade.Upgrade, set by serve()
        count = vocab.worker_count(config.global_.workers)
        # Rows for two generations of workers overlapping (a reload that changes their
        # number, up to one per CPU or the count asked, whichever is more), and spare.
        self.table = _native.SharedTable(rows=min(2 * max(count, vocab.cpu_count()) + 2,
                                                  2 * vocab.WORKERS_MAX))
        self.hub.attach(self.table)
        # Shared-table record of every pool, backend (by Target) and listener (by name).
        self.slots: dict[str, dict] = {"pools": {}, "backends": {}, "listeners": {}}
        self._sweeper: asyncio.Task | None = None
        self._poller: asyncio.Task | None = None
        self._stopped = asyncio.Event()
        self.state_path = state_path_for(config.control.socket)
        self.state_writer = StateWriter(self.loop, self.state_path, lambda: self.runtime_state,
                                        self.log)
        # Binds systemd may have opened for us (socket activation: LISTEN_FDS).
        self.listening = Listening(self.loop, self.hub, self.listeners, self.log, count,
                                   Inherited())
        self.workers = Workers(self, count, zygote)
        self.workers.generation = info.get("workers_generation", 0) + 1
        self.notifier = Notifier()              # systemd's Type=notify; a no-op elsewhere
        self.health = HealthMonitor(self.workers.close_open, self.log)
        self.resolver = Resolver(config.resolvers, lambda: self.pools.values(), self.log,
                                 on_resolved=self.resolved)
        self.build()
        self.restore_runtime_state(info.get("state"))
        if info.get("health"):              # what the old master's checks concluded
            self.health.adopt({b.ref: b for p in self.pools.values() for b in p},
                              info["health"])
        self.cluster = Cluster(self, config.cluster) if config.cluster is not None else None
        self.metrics = MetricsEndpoint(self)

    # --- construction --------------------------------------------------------------------

    def attach_pool(self, pool: Pool) -> None:
        index = self.table.alloc_pool()
        pool.runtime.attach(self.table, index)
        self.slots["pools"][pool.name] = index
        super().attach_pool(pool)

    def listener_record(self, name: str) -> tuple:
        index = self.slots["listeners"][name] = self.table.alloc_listener()
        return self.table, index

    def wire_backend(self, backend: Backend) -> None:
        """Give a new backend its shared record, publish what picks read, and hook it
        to the control plane: health checks and passive detection."""
        try:
            index = self.table.alloc_backend()
        except IndexError as exc:           # the table is sized at start (GUIDE: workers)
            backend.pool.remove_backend(backend.name)
            raise OperationError(f"cannot add backend '{backend.ref}': {exc}") from None
        backend.target.attach(self.table, index)
        self.slots["backends"][backend.ref] = index
        backend.pool.push(backend)              # into the shared record, now attached
        self.health.watch(backend)

    def unwire_backend(self, backend: Backend) -> None:
        self.health.unwatch(backend)
        self.slots["backends"].pop(backend.ref, None)

    def rewatch_pool(self, pool: Pool) -> None:
        self.health.rewatch_pool(pool)

    def remove_pool(self, pool: Pool) -> None:
        self.health.unwatch_pool(pool)
        super().remove_pool(pool)

    def configure_resolvers(self, cfg) -> None:
        self.resolver.configure(cfg)

    def retune_binds(self, listener: Listener, lcfg, servers: dict) -> None:
        self.listening.retune_binds(listener, lcfg, servers)

    def swap_binds(self, listener: Listener, servers: dict) -> None:
        self.listening.swap_binds(listener, servers)

    def close_listener(self, listener: Listener) -> None:
        self.listening.close_listener(listener)

    def resolved(self, backend: Backend) -> None:
        """Resolver: `backend`'s hostname has a new answer; the workers connect to it."""
        self.workers.broadcast({"op": "resolved", "pool": backend.pool.name,
                                "backend": backend.name, "addresses": backend.target.resolved})

    def set_access_log(self, enabled: bool) -> None:
        pass                            # the workers read config.log.access

    def restore_runtime_state(self, path=None) -> None:
        """Re-apply the operator's changes from the state file (ours, or the old master's
        of an upgrade, which wrote it just before) on top of the config. A corrupt file
        is reported and ignored."""
        path = self.state_path if path is None else Path(path)
        try:
            self.runtime_state = load_state(path)
        except StateFileError as exc:
            self.log.error("state_file_ignored", path=str(path), error=str(exc))
            self.runtime_state = RuntimeState()
            return
        for issue in self.runtime_state.issues:      # entries the state file's rules refused
            self.log.warning("state_entry_ignored", section=issue.section, key=issue.key,
                             error=issue.message)
        self.operator.restore_state()
        if path != self.state_path:             # an upgrade that moved the control socket
            self.state_writer.save()

    # --- what the workers get -------------------------------------------------------------

    def snapshot(self) -> dict:
        """What a new worker builds its Runtime from: the config's text, the runtime
        state, every object's shared record, and the hostname answers."""
        return {
            "config": {"text": self.config.text, "path": str(self.config.path)},
            "state": self.runtime_state.to_dict(),
            "slots": self.slots,
            "resolved": {b.ref: b.target.resolved for p in self.pools.values() for b in p
                         if b.target.resolved is not None},
        }

    # --- running -------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every listener, start the workers and the sweep. OSError if a bind fails
        or the workers cannot start (nothing is left listening in that case)."""
        try:
            if self.takeover is not None:       # the old master's sockets, not new binds
                await self.listening.take_over(self.takeover)
            for listener in self.listeners.values():
                await self.listening.open_listener(listener)
            self.listening.release_inherited()
            # An upgrade's groups may have fewer sockets than this master has workers.
            self.listening.resize(self.workers.count)
            listen = self.config.metrics.listen
            await self.metrics.start(listen, None if self.takeover is None
                                     else await self.takeover.metrics_socket(listen))
            await self.workers.start()
            self.listening.steer(self.workers.count)
        except BaseException:
            await self.workers.stop(0)
            self.listening.close_all()
            self.metrics.close()
            raise
        self._sweeper = self.loop.create_task(self.sweep_forever())
        self._poller = self.loop.create_task(self.poll_shared_forever())
        self.health.start()
        self.resolver.start()
        if self.cluster is not None:
            self.cluster.start()

    async def sweep_forever(self) -> None:
        """Slow-start ramps, published to the workers through the shared table."""
        interval = _native.SWEEP_INTERVAL
        while True:
            await asyncio.sleep(interval)
            try:
                for pool in self.pools.values():
                    pool.refresh_slow_start()
            except Exception:
                self.log.exception("sweep_failed")

    async def poll_shared_forever(self) -> None:
        """What the workers did that the master acts on: relay connect failures feed
        passive health, backends gone idle wake their `wait`s."""
        while True:
            await asyncio.sleep(SHARED_POLL_INTERVAL)
            try:
                self.poll_shared()
            except Exception:
                self.log.exception("sweep_failed")

    def poll_shared(self) -> None:
        for pool in list(self.pools.values()):
            for backend in list(pool):
                failed = backend.target.failed        # one sum: did anything fail since?
                if failed == backend.seen_failed:
                    continue
                backend.seen_failed = failed
                failures = backend.target.connect_failures()
                seen = backend.seen_failures
                for reason, count in failures.items():
                    new = count - seen.get(reason, 0)
                    if new > 0:
                        seen[reason] = count
                        self.health.connect_failed(backend, backend.target, reason, new)
        self.operator.poll_idle()

    async def reload(self, cause: str = "command") -> list[str]:
        """Re-read the config file and apply it in place (reload.py), in the master and
        then in every worker; refused while shutting down. OperationError, with nothing
        changed, says why it was refused. systemd hears RELOADING=1 first and READY=1
        once it was applied or refused (not during a shutdown: it is refused at once)."""
        if self.stopping:
            return await reload_from_file(self, cause)
        if self.upgrade is not None and (self.upgrade.running or self.upgrade.done):
            self.log.error("config_rejected", path=str(self.config.path), cause=cause,
                           errors=["an upgrade is under way"])
            raise OperationError("an upgrade is under way: reload refused (the new master "
                                 "reads the config file itself)")
        self.notifier.reloading()
        try:
            return await reload_from_file(self, cause)
        finally:
            self.notifier.ready(self.status_line())

    def status_line(self) -> str:
        """What `systemctl status` shows (sd_notify STATUS=)."""
        live = len(self.workers.live())
        return (f"serving {len(self.listeners)} listener(s) with {live}/{self.workers.count} "
                f"worker(s); {self.hub.active} connection(s) open")

    async def shutdown(self, timeout: float | None = None, handed_over: bool = False) -> None:
        """Stop accepting, let connections finish for up to `timeout` seconds (default
        global.shutdown_timeout), then close the rest. Idempotent. `handed_over`: an
        upgrade's old master, whose sockets, state file and systemd's attention are the
        new master's now (closing its descriptors closes no socket)."""
        if self.stopping:
            await self._stopped.wait()
            return
        self.stopping = True
        if timeout is None:
            timeout = self.config.global_.shutdown_timeout
        if not handed_over:
            self.notifier.stopping(f"stopping: {self.hub.active} connection(s) get up to "
                                   f"{timeout:g} s")
        await self.workers.stop_accepting()
        self.listening.close_all()
        self.log.info("shutdown_started", active=self.hub.active, timeout=timeout)
        await self.health.stop()
        await self.resolver.stop()
        left = await self.workers.stop(timeout)
        for task in (self._sweeper, self._poller):
            if task is not None:
                task.cancel()
        if self.cluster is not None:
            await self.cluster.stop()       # leaves the fleet: its record goes at once
        if not handed_over:
            await self.state_writer.flush()
        self.metrics.close()            # served until here: the drain can be watched
        self.log.info("shutdown_finished", closed=left)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()
