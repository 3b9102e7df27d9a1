"""A worker process: the data path only — accept, ACL and limits, pick, connect, relay —
on its own uvloop loop (DESIGN.md §9).

It builds the same Runtime as the master from the master's snapshot (the config's text,
the runtime state), attaches every object to the record the master gave it in the shared
table, and accepts on its socket of every bind. From then on it follows the master: what
picks read (state, weight, limits) from the table, the rest from channel messages
(workers.py lists them). It writes its own access log lines (with `worker`); everything
else is the master's to log, so the model building a worker repeats is not logged twice.

It stops when the master says so (`stop_accepting`, then `shutdown`), or when the master
is gone (its channel closed): it stops accepting, lets its connections finish for up to
global.shutdown_timeout, closes the rest and exits. It ignores SIGTERM, SIGINT and SIGHUP,
which a process group or a cgroup (systemd's KillMode=control-group) delivers to every
process at once: the master handles them and stops its workers in order.
"""
from __future__ import annotations

import asyncio
import signal
import socket

from . import _native
from .balancer import Runtime
from .channel import Channel
from .config import parse_address, parse_config
from .fleet_apply import apply_difference
from .health import close_open_relays
from .listen import Accepting
from .log import configure_logging, dropped_lines, get_logger, stderr_writer
from .model import Backend, Listener, Pool
from .process import process_probe
from .reload import apply_plan, plan_reload, running_backends
from .rows import conn_row
from .state import RuntimeState


class _Quiet:
    """The model's logger in a worker: the master already logs what the model does;
    errors still get through."""

    def __init__(self, log):
        self._log = log

    def debug(self, *args, **kwargs):
        pass

    info = warning = debug

    def error(self, *args, **kwargs):
        self._log.error(*args, **kwargs)

    def exception(self, *args, **kwargs):
        self._log.exception(*args, **kwargs)


class WorkerRuntime(Runtime):
    """A worker's model: attached to the master's table records, relaying."""

    def __init__(self, config, loop, table, slots: dict, index: int):
        self.index = index
        self.data_log = get_logger(worker=index)
        super().__init__(config, loop, _Quiet(self.data_log))
        self.table = table
        self.slots = slots
        self.hub.attach(table)
        self.hub.follow = True
        self.accepting = Accepting(loop, self.hub, self.listeners, self.data_log)
        self.set_access_log(config.log.access)

    # --- attaching to the master's records ----------------------------------------------

    def attach_pool(self, pool: Pool) -> None:
        pool.runtime.attach(self.table, self.slots["pools"][pool.name])
        super().attach_pool(pool)

    def listener_record(self, name: str) -> tuple:
        return self.table, self.slots["listeners"][name]

    def wire_backend(self, backend: Backend) -> None:
        backend.target.attach(self.table, self.slots["backends"][backend.ref])

    # --- binds on reload (the master retuned the shared sockets already) ----------------

    def retune_binds(self, listener: Listener, lcfg, servers: dict) -> None:
        pass

    def swap_binds(self, listener: Listener, servers: dict) -> None:
        self.accepting.swap_binds(listener, servers, [str(a) for a in listener.config.bind])

    def close_listener(self, listener: Listener) -> None:
        self.accepting.close_listener(listener)

    # --- the access log -----------------------------------------------------------------

    def set_access_log(self, enabled: bool) -> None:
        self.hub.access_log = self.log_connection_closed if enabled else None

    def log_connection_closed(self, relay, reason: str) -> None:
        self.data_log.info(
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


class Worker:
    """One worker process: its runtime, its channel to the master, its sweep."""

    def __init__(self, loop, channel_sock: socket.socket, index: int, generation: int):
        self.loop = loop
        self.index = index
        self.generation = generation
        self.runtime: WorkerRuntime | None = None
        self.failed = False             # the init message could not be carried out
        self.stopped = asyncio.Event()
        self.stopping = False
        self.channel = Channel(channel_sock, loop, self.on_message, self.on_master_gone)

    # --- messages -----------------------------------------------------------------------

    def on_message(self, msg: dict, fds: list[int]) -> None:
        op = msg.get("op")
        try:
            if op == "init":
                self.init(msg, fds)
            else:
                handler = getattr(self, "op_" + str(op), None)
                if handler is None:
                    raise ValueError(f"unknown op {op!r}")
                result = handler(msg, fds)
                if asyncio.iscoroutine(result):
                    self.loop.create_task(self._answer(msg, result))
                elif "id" in msg:
                    self.channel.reply(msg, **(result or {}))
        except Exception as exc:             # a bug here must not take the data path down
            get_logger(worker=self.index).exception("worker_op_failed", op=op)
            if "id" in msg:
                self.channel.reply(msg, error=str(exc))
            if op == "init":
                self.failed = True
                self.stopped.set()

    async def _answer(self, msg: dict, coro) -> None:
        try:
            result = await coro
        except Exception as exc:
            get_logger(worker=self.index).exception("worker_op_failed", op=msg.get("op"))
            result = {"error": str(exc)}
        if "id" in msg and not self.channel.closed:
            self.channel.reply(msg, **(result or {}))

    def init(self, msg: dict, fds: list[int]) -> None:
        config = parse_config(msg["config"]["text"], msg["config"]["path"])
        configure_logging(config.log.level, config.log.format)
        table = _native.SharedTable(fd=fds[0])
        table.set_row(msg["row"])
        rt = WorkerRuntime(config, self.loop, table, msg["slots"], self.index)
        rt.build()
        rt.runtime_state = RuntimeState.from_dict(msg["state"])
        rt.operator.restore_state()
        self.set_resolved(rt, msg.get("resolved", {}))
        for (name, bind), fd in zip(msg["binds"], fds[1:]):
            rt.accepting.serve(rt.listeners[name], bind, socket.socket(fileno=fd))
        self.runtime = rt
        self.loop.create_task(self.sweep_forever())
        self.channel.send({"event": "ready"})

    @staticmethod
    def set_resolved(rt: WorkerRuntime, resolved: dict) -> None:
        for ref, addresses in resolved.items():
            pool, _, name = ref.partition("/")
            backend = rt.pools.get(pool, {}).backends.get(name) if pool in rt.pools else None
            if backend is not None:
                backend.target.resolved = [tuple(a) for a in addresses]

    def op_add(self, msg, fds):
        rt = self.runtime
        rt.slots["backends"][f"{msg['pool']}/{msg['backend']}"] = msg["slot"]
        rt.operator.add_backend(msg["pool"], msg["backend"], parse_address(msg["address"]),
                                msg["weight"])

    def op_remove(self, msg, fds):
        rt = self.runtime
        rt.operator.drop_backend(rt.operator.find_backend(msg["pool"], msg["backend"]))

    def op_route(self, msg, fds):
        rt = self.runtime
        listener, sni = rt.operator.find_route(msg["listener"], msg.get("sni"))
        if msg.get("split") is not None:
            listener.route_split(msg["split"], rt.pools, sni=sni)
        else:
            listener.route_pool(msg["pool"], rt.pools, sni=sni)

    def op_resolved(self, msg, fds):
        addresses = msg["addresses"]
        self.set_resolved(self.runtime, {f"{msg['pool']}/{msg['backend']}": addresses}
                          if addresses is not None else {})

    def op_converge(self, msg, fds):
        """The master moved its model from one runtime state to another (a fleet's
        change): the same primitives move this one (fleet_apply.apply_difference)."""
        rt = self.runtime
        rt.slots = msg["slots"]
        new = RuntimeState.from_dict(msg["new"])
        apply_difference(rt.operator, RuntimeState.from_dict(msg["old"]), new)
        rt.runtime_state = new

    def op_reload(self, msg, fds):
        """The master's reload, applied here from the same text: the same plan, and
        the sockets of the binds it opened."""
        rt = self.runtime
        new = parse_config(msg["config"]["text"], msg["config"]["path"])
        rt.slots = msg["slots"]
        state = RuntimeState.from_dict(msg["state"])
        plan = plan_reload(rt.config, running_backends(rt), set(state.added), new,
                           state.backends)
        sockets = [(name, bind, socket.socket(fileno=fd))
                   for (name, bind), fd in zip(msg["binds"], fds)]
        servers = rt.accepting.new_binds(sockets)
        rt.runtime_state = state
        apply_plan(rt, plan, servers)
        return {}

    def op_conns(self, msg, fds):
        rt = self.runtime
        now = _native.monotonic()
        pool, backend = msg.get("pool"), msg.get("backend")
        rows = []
        for r in rt.hub.relays():
            if pool is not None and r.pool_name != pool:
                continue
            if backend is not None and r.backend_name != backend:
                continue
            rows.append(dict(conn_row(r, now), worker=self.index))
        return {"conns": rows}

    def op_kill(self, msg, fds):
        """Abort a backend's connections (kill)."""
        rt = self.runtime
        b = rt.operator.find_backend(msg["pool"], msg["backend"])
        return {"closed": rt.hub.close_target(b.target, msg.get("reason", "killed"))}

    def op_close(self, msg, fds):
        """on_down = "close": abort a backend's open connections (not those connecting)."""
        rt = self.runtime
        b = rt.operator.find_backend(msg["pool"], msg["backend"])
        return {"closed": close_open_relays(rt.hub, b.target, msg["reason"])}

    def op_stats(self, msg, fds):
        """This process's figures for `show info`."""
        rt = self.runtime
        poller = rt.hub.splice_poller
        figures = process_probe().read(cpu_percent=False)
        return {"pipes": (poller.pipe_stats if poller is not None
                          else {"used": 0, "free": 0, "max": 0, "created": 0}),
                "cpu_seconds": figures.cpu_seconds, "rss_bytes": figures.rss_bytes,
                "open_fds": figures.open_fds, "log_lines_dropped": dropped_lines()}

    def op_stop_accepting(self, msg, fds):
        if self.runtime is not None:
            self.runtime.accepting.close_all()
        return {}

    def op_shutdown(self, msg, fds):
        return self.shutdown(msg.get("timeout"))

    def on_master_gone(self) -> None:
        """The channel closed: the master is gone. Finish what runs, then exit."""
        if not self.stopping:
            self.loop.create_task(self.shutdown(None))

    # --- running ------------------------------------------------------------------------

    async def sweep_forever(self) -> None:
        """The one periodic timer of the data path: every timeout, and queued clients
        whose backend another worker freed."""
        interval = _native.SWEEP_INTERVAL
        hub = self.runtime.hub
        while not self.stopped.is_set():
            await asyncio.sleep(interval)
            try:
                hub.sweep()
            except Exception:  # never let one bad relay stop every timeout
                self.runtime.data_log.exception("sweep_failed")

    async def shutdown(self, timeout: float | None) -> dict:
        """Stop accepting, let connections finish for up to `timeout` s, close the rest."""
        if self.stopping:
            await self.stopped.wait()
            return {"closed": 0}
        self.stopping = True
        rt = self.runtime
        left = 0
        if rt is not None:
            if timeout is None:
                timeout = rt.config.global_.shutdown_timeout
            rt.accepting.close_all()
            deadline = self.loop.time() + timeout
            while rt.hub.relays() and self.loop.time() < deadline:   # this worker's own
                await asyncio.sleep(0.05)
            left = len(rt.hub.relays())
            if left:
                rt.hub.close_all("shutdown")
            await asyncio.sleep(0)      # let aborted sockets settle
        self.stopped.set()
        return {"closed": left}


async def main(channel_sock: socket.socket, index: int, generation: int) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(loop, channel_sock, index, generation)
    await worker.stopped.wait()
    await asyncio.sleep(0)              # the shutdown reply goes out before the exit
    worker.channel.close()
    return 1 if worker.failed else 0


def run(channel_sock: socket.socket, index: int, generation: int) -> None:
    """The worker process's body (in the child the zygote forked)."""
    # The terminal's Ctrl-C and hang-up, and a SIGTERM to the whole group or cgroup, are
    # the master's to handle (it stops the workers in order, and restarts none meanwhile);
    # a worker only stops when told, or when the master is gone.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    import uvloop
    try:
        status = uvloop.run(main(channel_sock, index, generation))
    finally:
        # The zygote's child ends with os._exit: no atexit handler runs, so the lines
        # still queued for stderr are written here.
        stderr_writer().flush_at_exit()
    if status:
        raise SystemExit(status)
