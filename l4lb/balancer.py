"""The balancer: builds pools and listeners from a config, runs them on the loop, and
owns the periodic sweep, graceful shutdown and the access log.

One Balancer per process and event loop. Everything here is control plane: it runs per
connection at most (the access log line), never per chunk of data.
"""
from __future__ import annotations

import asyncio
import socket
import time

from . import _native
from .config import Address, BackendConfig, Config, ConfigError, load_config, parse_address
from .endpoint import MetricsEndpoint
from .health import HealthMonitor
from .log import configure_logging, get_logger
from .model import Backend, BackendState, Listener, Pool
from .state import RuntimeState, StateFileError, load_state, save_state, state_path_for

# Backlog of each listening socket: deep enough for connection bursts (HAProxy uses the
# listener's maxconn; the kernel caps it at net.core.somaxconn anyway).
LISTEN_BACKLOG = 4096
# Seconds between two `fd_exhausted` warnings: one line per episode, not one per client.
FD_EXHAUSTED_LOG_INTERVAL = 10.0
# Seconds accepting stays paused once the process ran out of descriptors: new clients wait
# in the kernel's backlog meanwhile instead of being accepted only to be refused.
ACCEPT_PAUSE = 0.1


def open_listening_socket(addr: Address, rcvbuf: int = 0, sndbuf: int = 0) -> socket.socket:
    """A bound, listening, non-blocking socket for `addr`. OSError (e.g. EADDRINUSE)
    propagates with the address in its message."""
    family = addr.family
    host = addr.host
    if family == socket.AF_UNSPEC:               # a hostname: listen on its first address
        try:
            info = socket.getaddrinfo(host, addr.port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as exc:
            raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
        family, host = info[0], info[4][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit the listener's buffer sizes; set before listen() so
        # the window scale a client is offered fits them.
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.bind((host, addr.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
    return sock


class OperationError(Exception):
    """An operator request that cannot be carried out; the message says why. Nothing was
    changed."""


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
        self._idle_waiters: dict[object, list[asyncio.Future]] = {}
        self.set_access_log(config.log.access)
        self.hub.on_overload = self.note_fd_exhausted
        self._fd_exhausted_logged_at = -1e9
        self.health = HealthMonitor(self.hub, self.log)
        for pcfg in config.pools.values():
            self.pools[pcfg.name] = self.create_pool(pcfg)
        for lcfg in config.listeners.values():
            self.listeners[lcfg.name] = Listener(lcfg, self.hub, self.pools)
        self.restore_runtime_state()
        self.metrics = MetricsEndpoint(self)

    # --- construction --------------------------------------------------------------------

    def create_pool(self, cfg) -> Pool:
        pool = Pool(cfg, on_state_change=self.log_state_change)
        pool.runtime.queue_timeout = self._queue_timeout_for(cfg.name)
        for backend in pool:
            self.wire_backend(backend)
        return pool

    def wire_backend(self, backend: Backend) -> None:
        """Hook a backend's Target to the control plane: idle waiters, health checks and
        passive detection."""
        backend.target.on_idle = self._target_idle
        self.health.watch(backend)

    def _target_idle(self, target) -> None:
        for fut in self._idle_waiters.pop(target, ()):
            if not fut.done():
                fut.set_result(True)

    def log_state_change(self, backend: Backend, old: BackendState, new: BackendState,
                         cause: str) -> None:
        self.log.info("backend_state_changed", pool=backend.pool.name, backend=backend.name,
                      old=str(old), new=str(new), cause=cause, last_error=backend.last_error)

    def note_fd_exhausted(self) -> None:
        """The process ran out of descriptors: pause accepting on every listener for
        ACCEPT_PAUSE s (uvloop servers and splice servers alike), and log it once per
        episode (at most every FD_EXHAUSTED_LOG_INTERVAL s)."""
        paused = [listener.name for listener in self.listeners.values()
                  if any([server.pause() for server in listener.servers.values()])]
        if paused:
            for name in paused:
                self.listeners[name].runtime.count_rejected("accept_paused")
        now = self.loop.time()
        if now - self._fd_exhausted_logged_at >= FD_EXHAUSTED_LOG_INTERVAL:
            self._fd_exhausted_logged_at = now
            self.log.warning("fd_exhausted", active=self.hub.active, paused=paused,
                             pause_s=ACCEPT_PAUSE,
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
            duration_ms=round((_native.monotonic() - relay.started) * 1000.0, 3),
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
            await self.metrics.start(self.config.metrics.listen)
        except BaseException:
            self.close_listeners()
            raise
        self._sweeper = self.loop.create_task(self.sweep_forever())
        self.health.start()

    async def serve_socket(self, sock: socket.socket, splice: bool, runtime):
        """Accept on `sock` for `runtime` (a ListenerRuntime, or a factory of one for a
        listener a reload is creating): an Acceptor, attached once the listener exists.
        `splice` is always true (the stream relay was removed)."""
        return _native.Acceptor(
            sock, runtime if isinstance(runtime, _native.ListenerRuntime) else None)

    async def start_listener(self, listener: Listener) -> None:
        for addr in listener.config.bind:
            sock = open_listening_socket(addr, listener.config.rcvbuf, listener.config.sndbuf)
            server = await self.serve_socket(sock, listener.config.splice, listener.runtime)
            listener.servers[str(addr)] = server
            bound = server.sockets[0].getsockname() if server.sockets else (addr.host, addr.port)
            self.log.info("listener_started", listener=listener.name, bind=str(addr),
                          port=bound[1], **listener.route())

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
            for server in listener.servers.values():
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
        await self.health.stop()
        deadline = self.loop.time() + timeout
        while self.hub.active > 0 and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = self.hub.active
        if left:
            self.hub.close_all("shutdown")
        if self._sweeper is not None:
            self._sweeper.cancel()
        await asyncio.sleep(0)          # let aborted transports deliver connection_lost
        self.metrics.close()            # served until here: the drain can be watched
        self.log.info("shutdown_finished", closed=left)
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # --- operator actions (the control socket's commands) ----------------------------------

    def find_pool(self, name: str) -> Pool:
        try:
            return self.pools[name]
        except KeyError:
            raise OperationError(f"unknown pool '{name}'") from None

    def find_backend(self, pool: str, name: str) -> Backend:
        p = self.find_pool(pool)
        try:
            return p.backends[name]
        except KeyError:
            raise OperationError(f"unknown backend '{pool}/{name}'") from None

    def find_listener(self, name: str) -> Listener:
        try:
            return self.listeners[name]
        except KeyError:
            raise OperationError(f"unknown listener '{name}'") from None

    def enable_backend(self, backend: Backend) -> BackendState:
        """Back into rotation: `up`, or `down` while its health check is failing."""
        old = backend.state
        new = BackendState.DOWN if backend.health == "failing" else BackendState.UP
        backend.pool.set_state(backend, new, "operator")
        self.runtime_state.record_state(backend.ref, str(new))
        self.persist()
        return old

    def disable_backend(self, backend: Backend) -> BackendState:
        """`maint`: no new connections, health checks paused, connections continue."""
        return self._set_admin_state(backend, BackendState.MAINT)

    def drain_backend(self, backend: Backend) -> BackendState:
        """`draining`: no new connections; existing ones run until they end."""
        return self._set_admin_state(backend, BackendState.DRAINING)

    def _set_admin_state(self, backend: Backend, state: BackendState) -> BackendState:
        old = backend.state
        backend.pool.set_state(backend, state, "operator")
        self.runtime_state.record_state(backend.ref, str(state))
        self.persist()
        return old

    def kill_backend(self, backend: Backend) -> int:
        """Close the backend's connections now; returns how many were closed."""
        return self.hub.close_target(backend.target, "killed")

    def set_backend_weight(self, backend: Backend, weight: int) -> int:
        old = backend.weight
        backend.pool.set_weight(backend, weight)
        self.runtime_state.record_weight(backend.ref, weight)
        self.persist()
        return old

    def add_backend(self, pool: str, name: str, address: Address, weight: int = 1,
                    persist: bool = True) -> Backend:
        p = self.find_pool(pool)
        if name in p.backends:
            raise OperationError(f"backend '{pool}/{name}' already exists")
        backend = p.add_backend(BackendConfig(name=name, address=address, weight=weight))
        self.wire_backend(backend)
        self.log.info("backend_added", pool=pool, backend=name, address=str(address),
                      weight=weight)
        if persist:
            self.runtime_state.record_added(backend.ref, str(address), weight)
            self.persist()
        return backend

    def remove_backend(self, backend: Backend, force: bool = False) -> None:
        """Remove a backend; refused while it has active connections (unless `force`,
        used by reload, where they drain on their own)."""
        if backend.active and not force:
            raise OperationError(f"backend '{backend.ref}' has {backend.active} active "
                                 "connections; drain it and wait first")
        backend.pool.remove_backend(backend.name)
        self.health.unwatch(backend)
        self.log.info("backend_removed", pool=backend.pool.name, backend=backend.name,
                      active=backend.active)
        if not force:
            self.runtime_state.record_removed(backend.ref)
            self.persist()

    def switch_listener(self, listener: Listener, pool: str) -> dict:
        self.find_pool(pool)
        old = listener.route()
        listener.route_pool(pool, self.pools)
        self.log.info("listener_switched", listener=listener.name, pool=pool, previous=old)
        self.runtime_state.record_route(listener.name, pool=pool)
        self.persist()
        return old

    def split_listener(self, listener: Listener, split: dict[str, int]) -> dict:
        for name in split:
            self.find_pool(name)
        if sum(split.values()) != 100:
            raise OperationError("split percentages must sum to 100")
        old = listener.route()
        listener.route_split(split, self.pools)
        self.log.info("listener_split", listener=listener.name, split=split, previous=old)
        self.runtime_state.record_route(listener.name, split=split)
        self.persist()
        return old

    async def wait_backend_idle(self, backend: Backend, timeout: float | None) -> bool:
        """True once the backend has no active connections; False after `timeout` s."""
        if backend.active == 0:
            return True
        fut = self.loop.create_future()
        self._idle_waiters.setdefault(backend.target, []).append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return backend.active == 0
        finally:
            waiters = self._idle_waiters.get(backend.target)
            if waiters and fut in waiters:
                waiters.remove(fut)

    # --- runtime state ---------------------------------------------------------------------

    def persist(self) -> None:
        """Save the runtime state; a failure is logged, never fatal."""
        try:
            save_state(self.state_path, self.runtime_state)
        except (OSError, StateFileError) as exc:
            self.log.error("state_file_not_saved", path=str(self.state_path), error=str(exc))

    def restore_runtime_state(self) -> None:
        """Re-apply the operator's changes from the state file on top of the config.
        A corrupt file is reported and ignored; an entry that no longer fits the config
        (unknown pool, ...) is reported and dropped."""
        try:
            state = load_state(self.state_path)
        except StateFileError as exc:
            self.log.error("state_file_ignored", path=str(self.state_path), error=str(exc))
            self.runtime_state = RuntimeState()
            return
        for issue in state.issues:
            self._drop_state_entry(issue.section, issue.key, issue.message)
        self.runtime_state = state
        self.apply_runtime_state()

    def apply_runtime_state(self) -> None:
        state = self.runtime_state
        for ref, entry in list(state.added.items()):
            pool, _, name = ref.partition("/")
            try:
                if name in self.find_pool(pool).backends:
                    continue                      # the config has it now: the config wins
                self.add_backend(pool, name, parse_address(entry["address"]),
                                 entry.get("weight", 1), persist=False)
            except (OperationError, ValueError) as exc:
                self._drop_state_entry("added", ref, exc)
                state.added.pop(ref, None)
        for ref in list(state.removed):
            pool, _, name = ref.partition("/")
            p = self.pools.get(pool)
            if p is not None and name in p.backends:
                self.remove_backend(p.backends[name], force=True)
        for ref, entry in list(state.backends.items()):
            pool, _, name = ref.partition("/")
            try:
                backend = self.find_backend(pool, name)
            except OperationError as exc:
                self._drop_state_entry("backends", ref, exc)
                state.backends.pop(ref, None)
                continue
            if "weight" in entry:
                backend.pool.set_weight(backend, entry["weight"])
            if "state" in entry:
                backend.pool.set_state(backend, BackendState(entry["state"]), "state_file")
        for name, route in list(state.listeners.items()):
            listener = self.listeners.get(name)
            try:
                if listener is None:
                    raise OperationError(f"unknown listener '{name}'")
                if "split" in route:
                    for p in route["split"]:
                        self.find_pool(p)
                    listener.route_split(route["split"], self.pools)
                else:
                    listener.route_pool(self.find_pool(route["pool"]).name, self.pools)
            except (OperationError, ValueError) as exc:
                self._drop_state_entry("listeners", name, exc)
                state.listeners.pop(name, None)

    def _drop_state_entry(self, section: str, key: str, exc: Exception) -> None:
        self.log.warning("state_entry_ignored", section=section, key=key, error=str(exc))

    # --- reload ----------------------------------------------------------------------------

    async def reload_from_file(self, cause: str = "command") -> dict:
        """Re-read the config file and apply it in place. A broken file changes nothing:
        OperationError carries every config error. Connections in flight keep flowing,
        including those of removed backends and listeners."""
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            self.log.error("config_rejected", path=str(self.config.path), cause=cause,
                           errors=[str(i) for i in exc.issues])
            raise OperationError("config rejected, nothing changed: "
                                 + "; ".join(str(i) for i in exc.issues)) from None
        try:
            changes = await self.apply_config(new)
        except OSError as exc:
            self.log.error("config_rejected", path=str(self.config.path), cause=cause,
                           errors=[str(exc)])
            raise OperationError(f"reload failed: {exc}") from None
        self.log.info("config_reloaded", path=str(new.path), cause=cause, changes=changes)
        return changes

    async def apply_config(self, new: Config) -> list[str]:
        """Move the running balancer to `new` in place; returns a list of changes."""
        changes: list[str] = []
        # Open new binds first: if one fails, nothing has changed yet.
        await self.metrics.prepare(new.metrics.listen)
        try:
            new_servers = await self._open_new_binds(new)
        except BaseException:
            self.metrics.abort()
            raise
        self.metrics.commit()
        self.config = new
        configure_logging(new.log.level, new.log.format)
        self.set_access_log(new.log.access)
        self.hub.max_connections = new.global_.max_connections
        # Pools: add, change in place, remove.
        for name, pcfg in new.pools.items():
            old = self.pools.get(name)
            if old is None or (old.config.algorithm, old.config.hash_key) != (
                    pcfg.algorithm, pcfg.hash_key):
                self.pools[name] = self.create_pool(pcfg)
                changes.append(f"pool {name} {'added' if old is None else 'rebuilt'}")
                if old is not None:
                    self.pool_replaced(old, self.pools[name])
            else:
                changes.extend(self._update_pool(old, pcfg))
        # Listeners.
        for name, lcfg in new.listeners.items():
            listener = self.listeners.get(name)
            servers = new_servers.get(name, {})
            if listener is None:
                listener = self.listeners[name] = Listener(lcfg, self.hub, self.pools)
                changes.append(f"listener {name} added")
            else:
                changes.extend(self._retune_binds(listener, lcfg, servers))
                listener.configure(lcfg, self.pools)
            for server in servers.values():
                if isinstance(server, _native.Acceptor):
                    server.attach(listener.runtime)       # no-op once attached
            for addr, server in listener.servers.items():
                if servers.get(addr) is not server:
                    server.close()
                    changes.append(f"listener {name}: bind {addr} closed")
            for addr, server in servers.items():
                if listener.servers.get(addr) is not server:
                    changes.append(f"listener {name}: bind {addr} opened")
                    port = server.sockets[0].getsockname()[1] if server.sockets else None
                    self.log.info("listener_started", listener=name, bind=addr, port=port,
                                  **listener.route())
            listener.servers = servers
        for name in list(self.listeners):
            if name not in new.listeners:
                for server in self.listeners.pop(name).servers.values():
                    server.close()
                changes.append(f"listener {name} removed")
        for name in list(self.pools):
            if name not in new.pools:
                old = self.pools.pop(name)
                self.pool_removed(old)
                changes.append(f"pool {name} removed")
        self.apply_runtime_state()
        return changes

    def _retune_binds(self, listener: Listener, lcfg, servers: dict) -> list[str]:
        """A reload that changes a listener's rcvbuf or sndbuf: backend sockets follow at
        once (they are sized when created); client sockets inherit the listening
        socket's sizes, so the new size is set on each bind the reload keeps (new binds
        are opened with it). A size set back to 0 cannot give an open socket its
        autotuning back: the binds kept keep the old size until they are reopened (a
        restart, or a bind moved to another address), which the change says."""
        changes = []
        kept = [server for addr, server in listener.servers.items()
                if servers.get(addr) is server]
        for key, option in (("rcvbuf", socket.SO_RCVBUF), ("sndbuf", socket.SO_SNDBUF)):
            was, now = getattr(listener.config, key), getattr(lcfg, key)
            if was == now:
                continue
            if now:
                for server in kept:
                    for sock in server.sockets:
                        sock.setsockopt(socket.SOL_SOCKET, option, now)
                changes.append(f"listener {listener.config.name}: {key} {now}")
            elif kept:
                changes.append(f"listener {listener.config.name}: {key} 0 (autotuning) for "
                               f"backend sockets; client sockets keep {was} until the binds "
                               "are reopened (restart)")
            else:
                changes.append(f"listener {listener.config.name}: {key} 0 (autotuning)")
        return changes

    async def _open_new_binds(self, new: Config) -> dict:
        """Per listener: {bind: server} after the reload, existing servers kept and new
        binds opened. Opens every new bind before anything changes; on failure closes
        what it opened and re-raises."""
        result = {}
        opened_all = []
        try:
            for name, lcfg in new.listeners.items():
                listener = self.listeners.get(name)
                current = listener.servers if listener is not None else {}
                servers = {}
                for addr in lcfg.bind:
                    server = current.get(str(addr))
                    if server is None:
                        sock = open_listening_socket(addr, lcfg.rcvbuf, lcfg.sndbuf)
                        server = await self.serve_socket(
                            sock, lcfg.splice,
                            listener.runtime if listener else self._late_factory(name))
                        opened_all.append(server)
                    servers[str(addr)] = server
                result[name] = servers
        except BaseException:
            for server in opened_all:
                server.close()
            raise
        return result

    def _late_factory(self, name: str):
        """Protocol factory for a listener created by this reload (its runtime exists
        only after the config is applied, which happens before any accept runs)."""
        def factory():
            return self.listeners[name].runtime()
        return factory

    def _update_pool(self, pool: Pool, cfg) -> list[str]:
        changes = []
        pool.config = cfg
        pool.slow_start = cfg.slow_start
        pool.on_down = cfg.on_down
        pool.runtime.queue_timeout = self._queue_timeout_for(pool.name)
        wanted = {b.name: b for b in cfg.backends}
        for name, backend in list(pool.backends.items()):
            if name not in wanted and f"{pool.name}/{name}" not in self.runtime_state.added:
                self.remove_backend(backend, force=True)
                changes.append(f"backend {pool.name}/{name} removed")
        for name, bcfg in wanted.items():
            backend = pool.backends.get(name)
            if backend is None:
                backend = pool.add_backend(bcfg)
                self.wire_backend(backend)
                self.backend_added(backend)
                changes.append(f"backend {pool.name}/{name} added")
                continue
            if backend.address != bcfg.address:
                backend.address = bcfg.address
                backend.target.host = bcfg.address.host
                backend.target.port = bcfg.address.port
                changes.append(f"backend {pool.name}/{name} address {bcfg.address}")
            if backend.weight != bcfg.weight or backend.max_connections != bcfg.max_connections:
                backend.weight = bcfg.weight
                backend.max_connections = bcfg.max_connections
                pool.push(backend)
                changes.append(f"backend {pool.name}/{name} weight {bcfg.weight}")
        self.health.rewatch_pool(pool)
        return changes

    def _queue_timeout_for(self, pool: str) -> float:
        timeouts = [l.queue_timeout for l in self.config.listeners.values()
                    if l.pool == pool or (l.split and pool in l.split)]
        return max(timeouts) if timeouts else 5.0

    # Hooks for the subsystems that follow pools and backends (health checks).
    def backend_added(self, backend: Backend) -> None:
        pass

    def pool_replaced(self, old: Pool, new: Pool) -> None:
        self.health.unwatch_pool(old)

    def pool_removed(self, pool: Pool) -> None:
        self.health.unwatch_pool(pool)
