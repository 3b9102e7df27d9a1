"""Backends, pools and listeners as the control plane sees them (DESIGN.md §5).

Each model object owns one runtime object of the compiled data path (Target,
PoolRuntime, ListenerRuntime) and pushes every change into it at once, so the relay
never consults Python state on its own path.

Backend states:

| state      | new connections | existing       | health checks | entered by                       |
|------------|-----------------|----------------|---------------|----------------------------------|
| up         | yes             | continue       | run           | enable, or health passes `rise`  |
| down       | no              | continue       | run           | health fails `fall`, passive     |
| draining   | no              | until they end | run           | drain                            |
| maint      | no              | continue       | paused        | disable                          |

Health results move a backend only between `up` and `down`; the admin states
(`draining`, `maint`) win until an operator enables the backend again.

A `backup` backend (HAProxy's `backup`) is shown to its pool's algorithm as up only while
no non-backup backend of the pool is up (Pool.serving); Pool.push re-pushes the backups
whenever a non-backup backend changes, so the switch to and from the backups follows
every state change at once. A non-backup that is up but at its max_connections still
counts as up: its clients queue rather than spill onto the backups.
"""
from __future__ import annotations

import enum
import time
from typing import Callable

from . import _native, acl, proxyhooks, vocab
from .sni import SniRoutes, check_sni_pattern
from .algorithms import HASH_KEY_CODES, create_algorithm
from .config import BackendConfig, ListenerConfig, PoolConfig

# Weights are pushed to the algorithms scaled by this factor so that slow start can ramp
# a weight of 1 smoothly; every algorithm is invariant to scaling all weights alike.
WEIGHT_SCALE = 100


class BackendState(str, enum.Enum):
    UP = "up"
    DOWN = "down"
    DRAINING = "draining"
    MAINT = "maint"

    def __str__(self) -> str:
        return self.value


class Backend:
    """One backend of one pool: admin and health state, and its relay-side Target."""

    def __init__(self, pool: "Pool", cfg: BackendConfig, slot: int):
        self.pool = pool
        self.name = cfg.name
        self.address = cfg.address
        self.weight = cfg.weight
        self.max_connections = cfg.max_connections
        self.backup = cfg.backup
        self.health_address = cfg.health_address   # where probes go; None = address
        self.state = BackendState.UP
        self.health = "unchecked"        # unchecked | passing | failing
        self.last_check: float | None = None   # wall-clock time of the last probe
        self.last_error: str | None = None
        self.set_by: str | None = None   # who set its admin state (vocab.SET_BY_WORDS);
                                         # written by l4lb.actions only
        # Written by l4lb.health only: the last probe's duration (None before the first),
        # the failed results in a row (probes and passive failures), and every failed
        # relay connect by reason (connect_refused, connect_timeout, ...).
        self.check_duration: float | None = None
        self.check_failures = 0
        self.connect_failures: dict[str, int] = {}
        # The master's last look at the Target's shared connect failure counts (by
        # reason): what the workers reported since is new (Balancer.poll_shared).
        self.seen_failures: dict[str, int] = {}
        self.seen_failed = 0             # and of their sum (Target.failed)
        # Written by l4lb.resolver only: the error of a hostname address's failing DNS
        # lookups (None while they succeed); its answer is in target.resolved.
        self.resolve_error: str | None = None
        self.up_since = 0.0              # monotonic time it last entered `up` (slow start)
        self.slot = slot
        self.target = _native.Target(pool.name, cfg.name, cfg.address.host,
                                     cfg.address.port, slot)

    @property
    def ref(self) -> str:
        return f"{self.pool.name}/{self.name}"

    @property
    def active(self) -> int:
        return self.target.active

    def effective_weight(self, now: float) -> int:
        """The weight pushed to the algorithm: scaled, and ramped during slow start."""
        w = self.weight * WEIGHT_SCALE
        ramp = self.pool.slow_start
        if w == 0 or ramp <= 0 or self.up_since <= 0:
            return w
        frac = (now - self.up_since) / ramp
        if frac >= 1.0:
            return w
        return max(1, int(w * frac))

    def ramping(self, now: float) -> bool:
        return (self.state is BackendState.UP and self.pool.slow_start > 0
                and self.up_since > 0 and now - self.up_since < self.pool.slow_start)


StateListener = Callable[[Backend, BackendState, BackendState, str], None]


class Pool:
    """A named group of backends behind one algorithm."""

    def __init__(self, cfg: PoolConfig, on_state_change: StateListener | None = None,
                 clock: Callable[[], float] = time.monotonic, publish: bool = True):
        self.name = cfg.name
        # Whether pushes are also published to the backends' shared records (the master;
        # a worker's algorithms follow those records instead, Hub.follow).
        self.publish = publish
        self.config = cfg
        self.slow_start = cfg.slow_start
        self.on_down = cfg.on_down
        self.clock = clock
        self.on_state_change = on_state_change
        self.algo = create_algorithm(cfg.algorithm)
        self.runtime = _native.PoolRuntime(cfg.name, self.algo, HASH_KEY_CODES[cfg.hash_key],
                                           self.algo.needs_key)
        self.backends: dict[str, Backend] = {}
        for b in cfg.backends:
            self.add_backend(b)

    def reconfigure(self, cfg: PoolConfig) -> bool:
        """Take a reloaded pool config in place: its settings, and a new algorithm when
        `algorithm` or `hash_key` changed (returns True then). The backends stay what
        they are (their Targets, connections, counters, states and health); backends the
        config adds, drops or changes are the caller's (add_backend, remove_backend,
        update_backend)."""
        rebuild = (cfg.algorithm, cfg.hash_key) != (self.config.algorithm,
                                                    self.config.hash_key)
        self.config = cfg
        self.slow_start = cfg.slow_start
        self.on_down = cfg.on_down
        if rebuild:
            self._rebuild_algorithm(cfg)
        return rebuild

    def _rebuild_algorithm(self, cfg: PoolConfig) -> None:
        """A new algorithm with the same slots (relays in flight hold their slot and give
        it back to whichever algorithm the pool has when they close), re-seeded with
        every backend's weight, state, max_connections and current active count. Slots
        of removed backends are created and removed again, so slot numbers line up."""
        algo = create_algorithm(cfg.algorithm)
        for slot, target in enumerate(self.runtime.targets):
            added = algo.add(target.name if target is not None else f"\0removed{slot}", 0)
            assert added == slot, (added, slot)
            if target is None:
                algo.remove(slot)
        self.algo = algo
        rt = self.runtime
        rt.algo = algo
        rt.hash_key = HASH_KEY_CODES[cfg.hash_key]
        rt.needs_key = cfg.algorithm == "hash"
        for backend in self.backends.values():
            for _ in range(backend.target.active):
                algo.conn_opened(backend.slot)
            self.push(backend)

    def update_backend(self, cfg: BackendConfig) -> None:
        """A reloaded config's address, weight and max_connections for an existing
        backend (new connections use them; open ones keep their backend socket)."""
        backend = self.backends[cfg.name]
        if cfg.address != backend.address:
            backend.target.resolved = None    # the old name's answer; the resolver pushes the new
        backend.address = cfg.address
        backend.target.host = cfg.address.host
        backend.target.port = cfg.address.port
        backend.weight = cfg.weight
        backend.max_connections = cfg.max_connections
        backend.backup = cfg.backup
        backend.health_address = cfg.health_address
        self.push(backend)
        self.push_backups()

    def add_backend(self, cfg: BackendConfig, state: BackendState = BackendState.UP) -> Backend:
        """Add a backend in `state` (up by default). ValueError if the name is taken."""
        if cfg.name in self.backends:
            raise ValueError(f"backend {self.name}/{cfg.name} already exists")
        slot = self.algo.add(cfg.name, 0)
        backend = Backend(self, cfg, slot)
        self.runtime.add_target(backend.target)
        self.backends[cfg.name] = backend
        backend.state = state
        self.push(backend)
        return backend

    def remove_backend(self, name: str) -> Backend:
        """Take a backend out for good. Its open connections finish on their own."""
        backend = self.backends.pop(name)
        self.algo.remove(backend.slot)
        self.runtime.targets[backend.slot] = None
        if not backend.backup:
            self.push_backups()
        return backend

    def push(self, backend: Backend) -> None:
        """Push one backend's state, weight and limit into the algorithm; a non-backup
        backend's change re-pushes the backups too (their eligibility follows it)."""
        self._push_one(backend)
        if not backend.backup:
            self.push_backups()
        if self.runtime.queue:
            self.runtime.serve_queue()

    def push_backups(self) -> None:
        """Tell the algorithm again whether each backup backend may be picked."""
        for b in self.backends.values():
            if b.backup:
                self._push_one(b)

    def _push_one(self, backend: Backend) -> None:
        slot = backend.slot
        weight = backend.effective_weight(self.clock())
        up = self.serving(backend)
        self.algo.set_weight(slot, weight)
        self.algo.set_max_connections(slot, backend.max_connections)
        self.algo.set_up(slot, up)
        if self.publish:
            backend.target.publish(up, weight, backend.max_connections)

    def serving(self, backend: Backend) -> bool:
        """Whether the algorithm may pick `backend`: it is up, and when it is a backup,
        no non-backup backend of the pool is up."""
        if backend.state is not BackendState.UP:
            return False
        if not backend.backup:
            return True
        return not any(b.state is BackendState.UP and not b.backup
                       for b in self.backends.values())

    def set_state(self, backend: Backend, new: BackendState, cause: str) -> bool:
        """Move `backend` to `new`; returns False when it was already there."""
        old = backend.state
        if old is new:
            return False
        backend.state = new
        if new is BackendState.UP and old is not BackendState.UP:
            backend.up_since = self.clock() if self.slow_start > 0 else 0.0
        self.push(backend)
        if self.on_state_change is not None:
            self.on_state_change(backend, old, new, cause)
        return True

    def set_weight(self, backend: Backend, weight: int) -> None:
        backend.weight = weight
        self.push(backend)

    def refresh_slow_start(self) -> bool:
        """Re-push the weights of backends in slow start; True while any still ramps."""
        now = self.clock()
        ramping = False
        for backend in self.backends.values():
            if backend.up_since > 0:
                self._push_one(backend)          # only its weight ramps
                if backend.ramping(now):
                    ramping = True
                else:
                    backend.up_since = 0.0
        return ramping

    def __iter__(self):
        return iter(self.backends.values())


class Listener:
    """A named set of binds routed to one pool or split across several; with an `sni`
    table, each server-name pattern is a route of its own (its own pool or split) and
    the listener's pool/split is the default route."""

    def __init__(self, cfg: ListenerConfig, hub, pools: dict[str, Pool], table=None,
                 index: int | None = None):
        self.name = cfg.name
        self.config = cfg
        self.runtime = _native.ListenerRuntime(cfg.name, hub)
        # The listener's record in the shared table (None: a private one): its counters,
        # limits and per-source table are global across the processes that attach it.
        self.table, self.index = table, index
        if table is not None:
            self.runtime.attach(table, index)
        self.servers: dict = {}           # bind (str) -> asyncio server
        self.pool_name: str | None = None
        self.split: dict[str, int] | None = None
        # sni pattern (normalized) -> {"pool": name} | {"split": {...}}, config order.
        self.sni_routes: dict[str, dict] = {}
        self._sni_lookup: SniRoutes | None = None   # pattern -> RouteRuntime, as the relay reads it
        self.configure(cfg, pools)

    def configure(self, cfg: ListenerConfig, pools: dict[str, Pool]) -> None:
        """Apply a listener config's data-path settings in place (start and reload)."""
        self.config = cfg
        rt = self.runtime
        rt.connect_timeout = cfg.connect_timeout
        rt.idle_timeout = cfg.idle_timeout
        rt.retries = cfg.retries
        rt.max_connections = cfg.max_connections
        rt.sticky_split = cfg.sticky_split
        rt.accept_proxy = cfg.accept_proxy
        rt.proxy_timeout = cfg.proxy_timeout
        rt.rcvbuf = cfg.rcvbuf
        rt.sndbuf = cfg.sndbuf
        rt.inspect_timeout = cfg.inspect_timeout
        rt.max_client_hello = cfg.max_client_hello
        # The listener's own: a switch or split to another pool keeps it.
        rt.queue_timeout = cfg.queue_timeout
        rt.send_proxy = vocab.SEND_PROXY_CODES[cfg.send_proxy]
        # Always set (the relay calls them only with accept_proxy / send_proxy on), so a
        # reload that turns accept_proxy off cannot strand a client mid-header.
        rt.header_hook = proxyhooks.read_client_header
        rt.proxy_encoder = proxyhooks.encode_backend_header
        if self.table is not None:       # shared per-source counts: one clock for all
            rt.gate = acl.configure_gate(rt.gate, cfg, _native.monotonic, self.table,
                                         self.index)
        else:
            rt.gate = acl.configure_gate(rt.gate, cfg, rt.hub.loop.time)   # None: no ACL/limits
        if cfg.split:
            self.route_split(dict(cfg.split), pools)
        else:
            self.route_pool(cfg.pool, pools)
        self._configure_sni(cfg.sni or {}, pools)

    def _configure_sni(self, table: dict[str, str], pools: dict[str, Pool]) -> None:
        """Routes as the config's sni table has them (a reload drops operator changes;
        the caller re-applies the state file). New RouteRuntimes: relays in flight hold
        only their pool."""
        self.sni_routes = {}
        if not table:
            self._sni_lookup = None
            self.runtime.sni_routes = None
            return
        lookup = SniRoutes({pattern: _native.RouteRuntime(check_sni_pattern(pattern))
                            for pattern in table})
        self._sni_lookup = lookup
        for pattern, pool in table.items():
            self.route_pool(pool, pools, sni=pattern)
        self.runtime.sni_routes = lookup

    def find_sni_route(self, sni: str) -> str:
        """The normalized form of `sni`, a pattern of this listener's sni table;
        KeyError when the table has no such pattern."""
        try:
            pattern = check_sni_pattern(sni)
        except ValueError:
            raise KeyError(sni) from None
        if self._sni_lookup is None or pattern not in self._sni_lookup.routes:
            raise KeyError(sni)
        return pattern

    def _route_runtime(self, sni: str | None):
        if sni is None:
            return self.runtime.route
        return self._sni_lookup.routes[self.find_sni_route(sni)]

    def route_pool(self, pool: str, pools: dict[str, Pool], sni: str | None = None) -> None:
        """Send every new connection of the route to `pool` (blue-green switch): the
        default route, or the sni pattern `sni` (KeyError if the table lacks it)."""
        route = self._route_runtime(sni)
        route.pool = pools[pool].runtime
        route.set_split(None, None)
        if sni is None:
            self.pool_name = pool
            self.split = None
        else:
            self.sni_routes[route.pattern] = {"pool": pool}

    def route_split(self, split: dict[str, int], pools: dict[str, Pool],
                    sni: str | None = None) -> None:
        """Split new connections of the route across pools by percentage (canary)."""
        route = self._route_runtime(sni)
        names = [n for n, pct in split.items() if pct > 0] or list(split)
        route.set_split([pools[n].runtime for n in names], [split[n] for n in names])
        route.pool = pools[names[0]].runtime
        if sni is None:
            self.pool_name = None
            self.split = dict(split)
        else:
            self.sni_routes[route.pattern] = {"split": dict(split)}

    def route(self, sni: str | None = None) -> dict:
        """The route's {pool} or {split}: the default route, or sni pattern `sni`'s."""
        if sni is not None:
            return dict(self.sni_routes[self.find_sni_route(sni)])
        return {"split": self.split} if self.split else {"pool": self.pool_name}
