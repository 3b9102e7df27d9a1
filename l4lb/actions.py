"""The operator's actions on a running balancer: one room for what the control commands
do (DESIGN.md §6).

Every action takes names (pool, backend, listener), finds the objects, acts on the model,
records the change into RuntimeState and has it persisted, here and nowhere else; it
returns the fields of the command's ok reply. A change that could not be written to the
state file still happened, and the reply says so in `warning` (issue 20 item 12): each
action awaits its (shared, coalesced) write, which runs off the loop (persist.py).

`restore_state` re-applies RuntimeState on top of the config (start and reload), with the
same primitives and nothing recorded.

The master's Runtime (balancer.Balancer) runs the actions; a worker's runs the same
primitives when the master tells it what changed the model's shape (`add`, `remove`,
`route`: workers.py). What picks read — states, weights, limits — reaches the workers
through the shared table, and `kill` and `wait` reach every worker's connections.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from . import vocab
from .config import Address, BackendConfig, parse_address
from .model import Backend, BackendState, Listener, Pool
from .state import route_key, split_route_key

if TYPE_CHECKING:                      # the balancer owns the operator
    from .balancer import Runtime


# Causes of backend_state_changed set here (l4lb.health has the health causes).
CAUSE_OPERATOR = "operator"
CAUSE_STATE_FILE = "state_file"


class OperationError(Exception):
    """An operator request that cannot be carried out; the message says why. Nothing was
    changed."""


class Operator:
    """Carries out operator actions on one balancer's model."""

    def __init__(self, balancer: "Runtime"):
        self.balancer = balancer
        self.log = balancer.log
        self._idle_waiters: dict[object, list[asyncio.Future]] = {}

    # --- finding ------------------------------------------------------------------------

    def find_pool(self, name: str) -> Pool:
        try:
            return self.balancer.pools[name]
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
            return self.balancer.listeners[name]
        except KeyError:
            raise OperationError(f"unknown listener '{name}'") from None

    @property
    def state(self):
        return self.balancer.runtime_state

    async def _saved(self, reply: dict) -> dict:
        """Persist the state just recorded; the reply gains `warning` when it failed.
        In a fleet the change goes to etcd first (l4lb.cluster.publish), and the reply
        waits until this node applied it; when etcd did not take it the change is
        undone and OperationError says why."""
        if self.balancer.cluster is not None:
            await self.balancer.cluster.publish()
        warning = await self.balancer.state_writer.save()
        if warning is not None:
            reply["warning"] = warning
        return reply

    # --- backends -----------------------------------------------------------------------

    async def enable(self, pool: str, backend: str) -> dict:
        """Back into rotation: `up`, or `down` while its health check is failing."""
        b = self.find_backend(pool, backend)
        return await self._set_state(
            b, BackendState.DOWN if b.health == "failing" else BackendState.UP)

    async def disable(self, pool: str, backend: str, by: str | None = None) -> dict:
        """`maint`: no new connections, health checks paused, connections continue.
        `by` says who set it (vocab.SET_BY_WORDS; default operator)."""
        return await self._set_state(self.find_backend(pool, backend), BackendState.MAINT, by)

    async def drain(self, pool: str, backend: str, by: str | None = None) -> dict:
        """`draining`: no new connections; existing ones run until they end."""
        return await self._set_state(self.find_backend(pool, backend), BackendState.DRAINING,
                                     by)

    async def _set_state(self, b: Backend, new: BackendState, by: str | None = None) -> dict:
        by = by or vocab.SET_BY_DEFAULT
        if by not in vocab.SET_BY_WORDS:
            raise OperationError(f"by must be one of {', '.join(vocab.SET_BY_WORDS)}, "
                                 f"got {by!r}")
        old = b.state
        b.pool.set_state(b, new, CAUSE_OPERATOR)
        b.set_by = by if str(new) in vocab.ADMIN_STATES else None
        self.state.record_state(b.ref, str(new), b.set_by)
        return await self._saved({"pool": b.pool.name, "backend": b.name,
                                  "state": str(b.state), "previous": str(old)})

    async def kill(self, pool: str, backend: str) -> dict:
        """Close the backend's connections now."""
        b = self.find_backend(pool, backend)
        closed = await self.balancer.workers.close_target(b, "killed")
        return {"pool": pool, "backend": backend, "closed": closed}

    async def weight(self, pool: str, backend: str, weight: int) -> dict:
        b = self.find_backend(pool, backend)
        old = b.weight
        b.pool.set_weight(b, weight)
        self.state.record_weight(b.ref, weight)
        return await self._saved({"pool": pool, "backend": backend, "weight": weight,
                                  "previous": old})

    async def add(self, pool: str, backend: str, address: Address, weight: int = 1) -> dict:
        b = self.add_backend(pool, backend, address, weight)
        self.state.record_added(b.ref, str(address), weight)
        self.balancer.workers.broadcast({"op": "add", "pool": pool, "backend": backend,
                                         "address": str(address), "weight": weight,
                                         "slot": self.balancer.slots["backends"][b.ref]})
        return await self._saved({"pool": pool, "backend": backend, "address": str(b.address),
                                  "weight": b.weight, "state": str(b.state)})

    async def remove(self, pool: str, backend: str) -> dict:
        """Refused while the backend has active connections."""
        b = self.find_backend(pool, backend)
        if b.active:
            raise OperationError(f"backend '{b.ref}' has {b.active} active "
                                 "connections; drain it and wait first")
        self.drop_backend(b)
        self.state.record_removed(b.ref)
        self.balancer.workers.broadcast({"op": "remove", "pool": pool, "backend": backend})
        return await self._saved({"pool": pool, "backend": backend})

    async def wait(self, pool: str, backend: str, timeout: float | None = None) -> dict:
        """Replies once the backend has no active connections; an error after `timeout`."""
        b = self.find_backend(pool, backend)
        t0 = time.monotonic()
        if not await self.wait_idle(b, timeout):
            raise OperationError(f"backend '{b.ref}' still has {b.active} active "
                                 f"connections after {timeout} s")
        return {"pool": pool, "backend": backend, "waited_s": round(time.monotonic() - t0, 3)}

    async def wait_idle(self, backend: Backend, timeout: float | None) -> bool:
        """True once `backend` has no active connections on any worker; False after
        `timeout` s (the count is global: the shared table's)."""
        if backend.active == 0:
            return True
        fut = self.balancer.loop.create_future()
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
            if not waiters:
                self._idle_waiters.pop(backend.target, None)

    def poll_idle(self) -> None:
        """The master's periodic look (Balancer.poll_shared): wake the `wait`s of every
        waited-for backend whose connections all ended."""
        for target in [t for t in self._idle_waiters if t.active == 0]:
            self.target_idle(target)

    def target_idle(self, target) -> None:
        """Wake the `wait`s of that backend."""
        for fut in self._idle_waiters.pop(target, ()):
            if not fut.done():
                fut.set_result(True)

    # --- listeners ----------------------------------------------------------------------

    def find_route(self, listener: str, sni: str | None) -> tuple[Listener, str | None]:
        """The listener and the normalized sni pattern of a route (None: the default
        route); OperationError when the listener's sni table has no such pattern."""
        lst = self.find_listener(listener)
        if sni is None:
            return lst, None
        try:
            return lst, lst.find_sni_route(sni)
        except KeyError:
            known = ", ".join(lst.sni_routes) or "none"
            raise OperationError(f"listener '{listener}' has no sni route '{sni}' "
                                 f"(sni routes: {known})") from None

    async def switch(self, listener: str, pool: str, sni: str | None = None) -> dict:
        """Blue-green: every new connection of the route goes to `pool`; the route is
        the listener's default one, or its sni pattern `sni`."""
        lst, sni = self.find_route(listener, sni)
        self.find_pool(pool)
        old = lst.route(sni)
        lst.route_pool(pool, self.balancer.pools, sni=sni)
        self.balancer.workers.broadcast({"op": "route", "listener": listener, "sni": sni,
                                         "pool": pool})
        self.log.info("listener_switched", listener=listener, sni=sni, pool=pool, previous=old)
        self.state.record_route(route_key(listener, sni), pool=pool)
        return await self._saved({"listener": listener, "sni": sni, "pool": pool,
                                  "previous": old})

    async def split(self, listener: str, split: dict[str, int], sni: str | None = None) -> dict:
        """Canary: new connections of the route shared between pools by percentage."""
        lst, sni = self.find_route(listener, sni)
        try:
            split = vocab.check_split(dict(split))        # the config's and state file's rule
        except ValueError as exc:
            raise OperationError(str(exc)) from None
        for name in split:
            self.find_pool(name)
        old = lst.route(sni)
        lst.route_split(split, self.balancer.pools, sni=sni)
        self.balancer.workers.broadcast({"op": "route", "listener": listener, "sni": sni,
                                         "split": split})
        self.log.info("listener_split", listener=listener, sni=sni, split=split, previous=old)
        self.state.record_route(route_key(listener, sni), split=split)
        return await self._saved({"listener": listener, "sni": sni, "split": split,
                                  "previous": old})

    # --- primitives shared with reload and state restore -------------------------------

    def add_backend(self, pool: str, name: str, address: Address, weight: int = 1) -> Backend:
        """Add and wire a backend (not recorded)."""
        p = self.find_pool(pool)
        if name in p.backends:
            raise OperationError(f"backend '{pool}/{name}' already exists")
        backend = p.add_backend(BackendConfig(name=name, address=address, weight=weight))
        self.balancer.wire_backend(backend)
        self.log.info("backend_added", pool=pool, backend=name, address=str(address),
                      weight=weight)
        return backend

    def drop_backend(self, backend: Backend) -> None:
        """Take a backend out (not recorded); its open connections finish on their own."""
        backend.pool.remove_backend(backend.name)
        self.balancer.unwire_backend(backend)
        self.log.info("backend_removed", pool=backend.pool.name, backend=backend.name,
                      active=backend.active)

    def restore_state(self) -> None:
        """Re-apply the operator's changes (RuntimeState) on top of the config. An entry
        that no longer fits the config (unknown pool, ...) is logged and dropped."""
        state = self.state
        pools = self.balancer.pools
        for ref, entry in list(state.added.items()):
            pool, _, name = ref.partition("/")
            try:
                if name in self.find_pool(pool).backends:
                    continue                      # the config has it now: the config wins
                self.add_backend(pool, name, parse_address(entry["address"]),
                                 entry.get("weight", 1))
            except (OperationError, ValueError) as exc:
                self._drop_entry("added", ref, exc)
                state.added.pop(ref, None)
        for ref in list(state.removed):
            pool, _, name = ref.partition("/")
            p = pools.get(pool)
            if p is not None and name in p.backends:
                self.drop_backend(p.backends[name])
        for ref, entry in list(state.backends.items()):
            pool, _, name = ref.partition("/")
            try:
                backend = self.find_backend(pool, name)
            except OperationError as exc:
                self._drop_entry("backends", ref, exc)
                state.backends.pop(ref, None)
                continue
            if "weight" in entry:
                backend.pool.set_weight(backend, entry["weight"])
            if "state" in entry:
                backend.pool.set_state(backend, BackendState(entry["state"]), CAUSE_STATE_FILE)
                backend.set_by = entry.get("set_by", vocab.SET_BY_DEFAULT)
        for name, route in list(state.listeners.items()):
            try:
                listener, sni = self.find_route(*split_route_key(name))
                if "split" in route:
                    for p in route["split"]:
                        self.find_pool(p)
                    listener.route_split(route["split"], pools, sni=sni)
                else:
                    listener.route_pool(self.find_pool(route["pool"]).name, pools, sni=sni)
            except (OperationError, ValueError) as exc:
                self._drop_entry("listeners", name, exc)
                state.listeners.pop(name, None)

    def _drop_entry(self, section: str, key: str, exc: Exception) -> None:
        self.log.warning("state_entry_ignored", section=section, key=key, error=str(exc))
