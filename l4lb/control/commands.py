"""The control commands of DESIGN.md §6, carried out on a running Balancer.

Each handler takes the parsed arguments (l4lb.control.protocol.Command.args) and returns
the fields of the ok reply; an OperationError becomes {"ok": false, "error": ...}. The
command table in protocol.py is the single source of the grammar and of `help`; each
handler is registered next to its code with `@handles(NAME)`, checked against that table
when this module is imported. The operator's actions are one-liners into actions.py,
which finds, acts, records and persists.
"""
from __future__ import annotations

import os

import time

from ..actions import OperationError
from ..config import Address
from ..live import RateTracker, live_snapshot
from ..process import show_info_fields
from ..rows import backend_row, listener_row, worker_rows
from . import protocol

# Seconds `--fleet` waits for the other live nodes to apply a change before it replies
# with an error naming them (the change stays made: etcd holds it, they apply it later).
FLEET_TIMEOUT = 20.0

# command name ("show backends") -> the CommandHandlers method that carries it out
HANDLERS: dict[str, str] = {}


def handles(name: str):
    """Register the decorated CommandHandlers method as the handler of command `name`."""
    if name not in protocol.COMMANDS_BY_NAME:
        raise AssertionError(f"@handles({name!r}): no such command in protocol.COMMANDS")

    def register(method):
        if name in HANDLERS:
            raise AssertionError(f"command {name!r} has two handlers")
        HANDLERS[name] = method.__name__
        return method
    return register


class CommandHandlers:
    """Carries out parsed control commands on one balancer."""

    def __init__(self, balancer):
        self.balancer = balancer
        self.operator = balancer.operator
        self.table = {name: getattr(self, method) for name, method in HANDLERS.items()}

    async def run(self, command: protocol.Command) -> dict:
        """Carry out `command`; returns the reply object (ok or error), or the
        protocol.Stream of a stream command; never raises for an operator mistake."""
        try:
            self.check_not_handing_over(command.name)
            fields = await self.table[command.name](**command.args)
        except OperationError as exc:
            return protocol.error(str(exc))
        if isinstance(fields, protocol.Stream):
            return fields
        return protocol.ok(**fields)

    def check_not_handing_over(self, name: str) -> None:
        """While an upgrade hands over, and after, only looking is allowed here: a change
        made now would miss the new master, which read the state file already."""
        upgrade = self.balancer.upgrade
        if name in protocol.LOOKING or upgrade is None:
            return
        if upgrade.done:
            raise OperationError(f"this l4lb (pid {os.getpid()}) handed over to a new "
                                 "master (upgrade): send the command to the new one")
        if upgrade.running:
            raise OperationError("an upgrade is under way: try again once it is done")

    # --- show ---------------------------------------------------------------------------

    @handles("help")
    async def help(self):
        return {"commands": protocol.help_text()}

    @handles("show info")
    async def show_info(self):
        return show_info_fields(self.balancer, await self.balancer.workers.stats())

    @handles("show listeners")
    async def show_listeners(self):
        return {"listeners": [listener_row(lst) for lst in self.balancer.listeners.values()]}

    @handles("show backends")
    async def show_backends(self, pool=None):
        pools = ([self.operator.find_pool(pool)] if pool is not None
                 else list(self.balancer.pools.values()))
        return {"backends": [backend_row(b) for p in pools for b in p]}

    @handles("show conns")
    async def show_conns(self, pool=None, backend=None):
        if pool is not None:
            self.operator.find_pool(pool)
        if backend is not None:
            self.operator.find_backend(pool, backend)
        rows = await self.balancer.workers.conns(pool, backend)
        rows.sort(key=lambda row: (row["age_s"], row["worker"], row["id"]))
        return {"conns": rows}

    @handles("show workers")
    async def show_workers(self):
        return {"workers": worker_rows(self.balancer)}

    @handles("show cluster")
    async def show_cluster(self):
        cluster = self.fleet_cluster("show cluster")
        return {"nodes": cluster.rows()}

    # --- a fleet (l4lb.cluster) -----------------------------------------------------------

    def fleet_cluster(self, what: str):
        cluster = self.balancer.cluster
        if cluster is None:
            raise OperationError(f"{what} needs a [cluster] table in the config: this node "
                                 "is not part of a fleet")
        return cluster

    async def on_fleet(self, fleet: bool, action) -> dict:
        """Carry out `action` (a coroutine of the operator); with `--fleet`, reply once
        every live node applied it (OperationError naming the others after FLEET_TIMEOUT)."""
        try:
            cluster = self.fleet_cluster("--fleet") if fleet else None
        except OperationError:
            action.close()
            raise
        reply = await action
        if cluster is not None:
            await cluster.until_fleet_applied(FLEET_TIMEOUT)
        return reply

    # --- backends -----------------------------------------------------------------------

    @handles("enable")
    async def enable(self, pool, backend, fleet=False):
        return await self.on_fleet(fleet, self.operator.enable(pool, backend))

    @handles("disable")
    async def disable(self, pool, backend, by=None, fleet=False):
        return await self.on_fleet(fleet, self.operator.disable(pool, backend, by))

    @handles("drain")
    async def drain(self, pool, backend, by=None, fleet=False):
        return await self.on_fleet(fleet, self.operator.drain(pool, backend, by))

    @handles("wait")
    async def wait(self, pool, backend, timeout=None):
        """In a fleet: until no live node has a connection to the backend."""
        t0 = time.monotonic()
        reply = await self.operator.wait(pool, backend, timeout)
        cluster = self.balancer.cluster
        if cluster is not None:
            ref = f"{pool}/{backend}"
            left = None if timeout is None else max(0.0, timeout - (time.monotonic() - t0))
            if not await cluster.until_fleet_idle(ref, left):
                raise OperationError(f"backend '{ref}' still has {cluster.fleet_active(ref)} "
                                     f"active connections in the fleet after {timeout} s")
            reply["waited_s"] = round(time.monotonic() - t0, 3)
        return reply

    @handles("kill")
    async def kill(self, pool, backend):
        return await self.operator.kill(pool, backend)

    @handles("weight")
    async def weight(self, pool, backend, weight, fleet=False):
        return await self.on_fleet(fleet, self.operator.weight(pool, backend, weight))

    @handles("add")
    async def add(self, pool, backend, address, weight=1, fleet=False):
        return await self.on_fleet(fleet, self.operator.add(pool, backend, Address(*address),
                                                            weight))

    @handles("remove")
    async def remove(self, pool, backend, fleet=False):
        return await self.on_fleet(fleet, self.operator.remove(pool, backend))

    # --- listeners and process -------------------------------------------------------------

    @handles("switch")
    async def switch(self, listener, sni, pool, fleet=False):
        return await self.on_fleet(fleet, self.operator.switch(listener, pool, sni))

    @handles("split")
    async def split(self, listener, sni, split, fleet=False):
        return await self.on_fleet(fleet, self.operator.split(listener, split, sni))

    @handles("reload")
    async def reload(self):
        return {"changes": await self.balancer.reload("command")}

    @handles("upgrade")
    async def upgrade(self):
        return await self.balancer.upgrade.run("command")

    @handles("subscribe")
    async def subscribe(self, interval=None):
        """The live view's frames, each with rates since this subscriber's last one."""
        if interval is None:
            interval = protocol.SUBSCRIBE_INTERVAL
        if interval < protocol.SUBSCRIBE_MIN_INTERVAL:
            raise OperationError(f"INTERVAL must be at least "
                                 f"{protocol.SUBSCRIBE_MIN_INTERVAL:g} s, got {interval:g}")
        tracker = RateTracker()
        return protocol.Stream(interval, lambda: live_snapshot(self.balancer, tracker))

    @handles("shutdown")
    async def shutdown(self, timeout=None):
        b = self.balancer
        t = b.config.global_.shutdown_timeout if timeout is None else timeout
        b.loop.call_soon(lambda: b.loop.create_task(b.shutdown(t)))
        return {"timeout_s": t}


_missing = set(protocol.COMMANDS_BY_NAME) - set(HANDLERS)
if _missing:
    raise AssertionError(f"commands without a handler: {sorted(_missing)}")
