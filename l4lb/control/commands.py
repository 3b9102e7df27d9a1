"""The control commands of DESIGN.md §6, carried out on a running Balancer.

Each handler takes the parsed arguments (l4lb.control.protocol.Command.args) and returns
the fields of the ok reply; an OperationError becomes {"ok": false, "error": ...}. The
command table in protocol.py is the single source of the grammar and of `help`.
"""
from __future__ import annotations

import time

from .. import _native
from ..balancer import Balancer, OperationError
from ..config import Address
from ..process import show_info_fields
from . import protocol


class CommandHandlers:
    """Maps a command name ("show backends") to the method that carries it out."""

    def __init__(self, balancer: Balancer):
        self.balancer = balancer
        self.table = {
            "help": self.help,
            "show info": self.show_info,
            "show listeners": self.show_listeners,
            "show backends": self.show_backends,
            "show conns": self.show_conns,
            "enable": self.enable,
            "disable": self.disable,
            "drain": self.drain,
            "wait": self.wait,
            "kill": self.kill,
            "weight": self.weight,
            "add": self.add,
            "remove": self.remove,
            "switch": self.switch,
            "split": self.split,
            "reload": self.reload,
            "shutdown": self.shutdown,
        }
        missing = {spec.name for spec in protocol.COMMANDS} - set(self.table)
        assert not missing, f"commands without a handler: {missing}"

    async def run(self, command: protocol.Command) -> dict:
        """Carry out `command`; returns the reply object (ok or error), never raises
        for an operator mistake."""
        try:
            fields = await self.table[command.name](**command.args)
        except OperationError as exc:
            return protocol.error(str(exc))
        return protocol.ok(**fields)

    # --- show ---------------------------------------------------------------------------

    async def help(self):
        return {"commands": protocol.help_text()}

    async def show_info(self):
        return show_info_fields(self.balancer)

    async def show_listeners(self):
        rows = []
        for listener in self.balancer.listeners.values():
            rt = listener.runtime
            rows.append({
                "name": listener.name,
                "bind": [str(a) for a in listener.config.bind],
                "pool": listener.pool_name,
                "split": listener.split,
                "splice": listener.config.splice,
                "active": rt.active,
                "accepted": rt.accepted,
                "rejected": dict(rt.rejected),
            })
        return {"listeners": rows}

    async def show_backends(self, pool=None):
        pools = ([self.balancer.find_pool(pool)] if pool is not None
                 else list(self.balancer.pools.values()))
        return {"backends": [backend_row(b) for p in pools for b in p]}

    async def show_conns(self, pool=None, backend=None):
        if pool is not None:
            self.balancer.find_pool(pool)
        if backend is not None:
            self.balancer.find_backend(pool, backend)
        now = _native.monotonic()
        rows = []
        for r in self.balancer.hub.relays():
            if pool is not None and r.pool_name != pool:
                continue
            if backend is not None and r.backend_name != backend:
                continue
            rows.append({
                "id": r.id,
                "client": f"{r.client_host}:{r.client_port}",
                "listener": r.listener.name,
                "pool": r.pool_name,
                "backend": r.backend_name,
                "state": r.state_name,
                "age_s": round(now - r.started, 3),
                "bytes_in": r.bytes_in,
                "bytes_out": r.bytes_out,
            })
        return {"conns": rows}

    # --- backends -----------------------------------------------------------------------

    def _state_reply(self, backend, previous):
        return {"pool": backend.pool.name, "backend": backend.name,
                "state": str(backend.state), "previous": str(previous)}

    async def enable(self, pool, backend):
        b = self.balancer.find_backend(pool, backend)
        return self._state_reply(b, self.balancer.enable_backend(b))

    async def disable(self, pool, backend):
        b = self.balancer.find_backend(pool, backend)
        return self._state_reply(b, self.balancer.disable_backend(b))

    async def drain(self, pool, backend):
        b = self.balancer.find_backend(pool, backend)
        return self._state_reply(b, self.balancer.drain_backend(b))

    async def wait(self, pool, backend, timeout=None):
        b = self.balancer.find_backend(pool, backend)
        t0 = time.monotonic()
        if not await self.balancer.wait_backend_idle(b, timeout):
            raise OperationError(f"backend '{b.ref}' still has {b.active} active "
                                 f"connections after {timeout} s")
        return {"pool": pool, "backend": backend,
                "waited_s": round(time.monotonic() - t0, 3)}

    async def kill(self, pool, backend):
        b = self.balancer.find_backend(pool, backend)
        return {"pool": pool, "backend": backend, "closed": self.balancer.kill_backend(b)}

    async def weight(self, pool, backend, weight):
        b = self.balancer.find_backend(pool, backend)
        previous = self.balancer.set_backend_weight(b, weight)
        return {"pool": pool, "backend": backend, "weight": weight, "previous": previous}

    async def add(self, pool, backend, address, weight=1):
        host, port = address
        b = self.balancer.add_backend(pool, backend, Address(host, port), weight)
        return {"pool": pool, "backend": backend, "address": str(b.address),
                "weight": b.weight, "state": str(b.state)}

    async def remove(self, pool, backend):
        b = self.balancer.find_backend(pool, backend)
        self.balancer.remove_backend(b)
        return {"pool": pool, "backend": backend}

    # --- listeners and process -------------------------------------------------------------

    async def switch(self, listener, pool):
        lst = self.balancer.find_listener(listener)
        previous = self.balancer.switch_listener(lst, pool)
        return {"listener": listener, "pool": pool, "previous": previous}

    async def split(self, listener, split):
        lst = self.balancer.find_listener(listener)
        previous = self.balancer.split_listener(lst, dict(split))
        return {"listener": listener, "split": dict(split), "previous": previous}

    async def reload(self):
        return {"changes": await self.balancer.reload_from_file("command")}

    async def shutdown(self, timeout=None):
        b = self.balancer
        t = b.config.global_.shutdown_timeout if timeout is None else timeout
        b.loop.call_soon(lambda: b.loop.create_task(b.shutdown(t)))
        return {"timeout_s": t}


def backend_row(b) -> dict:
    """One `show backends` row."""
    t = b.target
    rt = b.pool.algo.rt_ewma(b.slot)
    return {
        "pool": b.pool.name,
        "name": b.name,
        "address": str(b.address),
        "state": str(b.state),
        "health": b.health,
        "checked": b.pool.config.health is not None,
        "weight": b.weight,
        "active": t.active,
        "total": t.total,
        "failed": t.failed,
        "bytes_in": t.bytes_in,
        "bytes_out": t.bytes_out,
        "rt_ms": None if rt is None else round(rt * 1000.0, 3),
        "last_check": b.last_check,
        "last_error": b.last_error,
    }
