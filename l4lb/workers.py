"""The master's workers: starting them, restarting the ones that die, telling them what
changed and asking them what only they know (DESIGN.md §9).

A worker is a process forked from the zygote (zygote.py: a fork server the master forked
before it had a thread), so a start costs a fork and a model build, not an interpreter
start, and nothing of the master's threads or event loop leaks into it. Each worker gets, over its channel (channel.py), an `init` message
with the master's snapshot (the config's text, the runtime state, every object's record
in the shared table, hostname answers) and its descriptors: the shared table's memfd and
its socket of every bind. It replies `ready` once it accepts.

What the workers share through the table needs no message: admin and health state,
weights and limits (published by the master at every change), and every counter. What
changes the shape of the model does: `add`, `remove`, `route` (switch/split), `reload`
(the new config's text and state, and the sockets of new binds) and `resolved`.
Requests — `conns`, `kill`, `close`, `stats` — are answered by each worker for its own
connections, and the master sums.

A worker that exits while the master runs is logged (`worker_exited`: worker, pid,
status, connections lost) and started again at once, on the same row of the table and
the same sockets: connections queued in the kernel on its sockets wait for it. Its row's
counts are folded into the table's retired row first (SharedTable.retire_row), so no
total goes down and no limit stays held by connections that died with it.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import TYPE_CHECKING

from .channel import Channel, ChannelClosed

if TYPE_CHECKING:
    from .balancer import Balancer

# Seconds a starting worker gets to say it is ready before the start fails.
READY_TIMEOUT = 30.0
# Seconds a request to a worker may take before its reply is counted as missing.
REQUEST_TIMEOUT = 5.0
# Seconds after shutdown_timeout that a worker gets to exit before it is killed.
EXIT_GRACE = 5.0
# Restarts of one worker within RESTART_WINDOW seconds beyond which the master stops
# restarting it (a worker that dies at start would otherwise loop forever).
RESTART_BURST = 20
RESTART_WINDOW = 10.0

def describe_status(exitcode: int | None) -> str:
    """A process exit status in words: `exit 0`, `killed by SIGKILL`."""
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit {exitcode}"


class Worker:
    """One worker process as the master sees it."""

    def __init__(self, index: int, generation: int):
        self.index = index              # its place: sockets[index] of each bind
        self.row = index                # its row of the shared table
        self.generation = generation
        self.channel: Channel | None = None
        self.pid: int | None = None
        self.started_at = 0.0           # wall clock
        self.ready: asyncio.Future | None = None
        self.restarts = 0
        self.exits: list[float] = []    # monotonic times of its recent exits
        self.stopping = False
        self.exited: asyncio.Future | None = None

    @property
    def live(self) -> bool:
        return self.channel is not None and not self.channel.closed


class Workers:
    """The master's N workers."""

    def __init__(self, balancer: "Balancer", count: int, zygote=None):
        self.balancer = balancer
        self.loop = balancer.loop
        self.log = balancer.log
        self.count = count
        self.generation = 1
        self.workers: list[Worker] = []
        self.by_pid: dict[int, Worker] = {}
        self.stopping = False
        self.zygote = zygote            # zygote.ZygoteHandle (serve.py forks it first)
        self.zygote_channel: Channel | None = None

    # --- starting ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each accepts. OSError when one fails."""
        if self.zygote is None:
            raise OSError("no fork server to start workers from (l4lb.serve makes one)")
        self.zygote_channel = Channel(self.zygote.sock, self.loop, self.on_zygote_event,
                                      self.on_zygote_gone)
        self.workers = [Worker(i, self.generation) for i in range(self.count)]
        try:
            for worker in self.workers:
                await self.spawn(worker)
            await asyncio.wait_for(asyncio.gather(*(w.ready for w in self.workers)),
                                   READY_TIMEOUT)
        except (asyncio.TimeoutError, ChannelClosed) as exc:
            raise OSError(f"workers did not start: {exc or 'timed out'}") from None

    async def spawn(self, worker: Worker) -> None:
        """Have the zygote fork worker `worker`, and send it its init message.
        ChannelClosed when the zygote is gone."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker.ready = self.loop.create_future()
        worker.exited = self.loop.create_future()
        try:
            reply = await self.zygote_channel.request(
                {"index": worker.index, "generation": worker.generation}, [theirs.fileno()],
                REQUEST_TIMEOUT)
        except (ChannelClosed, asyncio.TimeoutError):
            ours.close()
            raise ChannelClosed("the fork server is gone") from None
        finally:
            theirs.close()
        worker.pid = reply["pid"]
        self.by_pid[worker.pid] = worker
        worker.started_at = time.time()
        worker.channel = Channel(ours, self.loop,
                                 lambda msg, fds, w=worker: self.on_message(w, msg, fds))
        b = self.balancer
        sockets = b.listening.sockets_of(worker.index)
        init = dict(b.snapshot(), op="init", index=worker.index, row=worker.row,
                    generation=worker.generation,
                    binds=[[name, bind] for name, bind, _ in sockets])
        worker.channel.send(init, [b.table.fd] + [sock.fileno() for _, _, sock in sockets])

    def on_message(self, worker: Worker, msg: dict, fds: list[int]) -> None:
        for fd in fds:                  # workers send none
            os.close(fd)
        if msg.get("event") == "ready" and worker.ready is not None and not worker.ready.done():
            worker.ready.set_result(True)
            if worker.restarts:
                self.balancer.notifier.status(self.balancer.status_line())
            self.log.info("worker_started", worker=worker.index, pid=worker.pid,
                          generation=worker.generation, restarts=worker.restarts,
                          startup_ms=round((time.time() - worker.started_at) * 1000.0, 1))

    def on_zygote_event(self, msg: dict, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)
        if msg.get("event") == "exited":
            worker = self.by_pid.pop(msg["pid"], None)
            if worker is not None:
                self._reap(worker, msg["status"])

    def on_zygote_gone(self) -> None:
        if not self.stopping:
            self.log.error("worker_not_restarted", worker=None,
                           reason="the fork server exited: workers that die are not replaced")

    def _reap(self, worker: Worker, status: int) -> None:
        """The worker's process ended: fold its row, log it, start it again."""
        if worker.channel is not None:
            worker.channel.close()
        table = self.balancer.table
        lost = table.row_figures(worker.row)["active"]
        table.retire_row(worker.row)
        if worker.ready is not None and not worker.ready.done():
            worker.ready.set_exception(ChannelClosed(
                f"worker {worker.index} exited before it was ready ({describe_status(status)})"))
        if worker.exited is not None and not worker.exited.done():
            worker.exited.set_result(status)
        if worker.stopping or self.stopping:
            self.log.info("worker_stopped", worker=worker.index, pid=worker.pid,
                          status=describe_status(status))
            return
        self.log.warning("worker_exited", worker=worker.index, pid=worker.pid,
                         status=describe_status(status), lost=lost)
        self.balancer.notifier.status(f"worker {worker.index} exited "
                                      f"({describe_status(status)}); restarting it")
        now = time.monotonic()
        worker.exits = [t for t in worker.exits if now - t < RESTART_WINDOW] + [now]
        if len(worker.exits) > RESTART_BURST:
            self.log.error("worker_not_restarted", worker=worker.index,
                           reason=f"{len(worker.exits)} exits in {RESTART_WINDOW:g} s")
            return
        worker.restarts += 1
        self.loop.create_task(self._restart(worker))

    async def _restart(self, worker: Worker) -> None:
        try:
            await self.spawn(worker)
        except (ChannelClosed, OSError) as exc:
            self.log.error("worker_not_restarted", worker=worker.index, reason=str(exc))

    # --- telling and asking -----------------------------------------------------------

    def live(self) -> list[Worker]:
        return [w for w in self.workers if w.live]

    def broadcast(self, msg: dict, fds: list[int] = ()) -> None:
        """Send `msg` to every live worker (a worker started later gets the snapshot)."""
        for worker in self.live():
            try:
                worker.channel.send(msg, fds)
            except ChannelClosed:
                pass

    def reload(self, opened: list) -> None:
        """After the master applied a reload: each worker applies the same plan from
        the same text, with its socket of every bind the reload opened ((listener, bind,
        BindGroup))."""
        b = self.balancer
        snapshot = b.snapshot()
        binds = [[name, bind] for name, bind, _ in opened]
        for worker in self.live():
            fds = [group.sockets[worker.index].fileno() for _, _, group in opened]
            try:
                worker.channel.send(dict(snapshot, op="reload", binds=binds), fds)
            except ChannelClosed:
                pass

    def converge(self, old, new) -> None:
        """The master moved its model from RuntimeState `old` to `new` (a fleet's change
        from etcd, or its undo: fleet_apply.apply_difference): each worker moves its own
        the same way."""
        self.broadcast({"op": "converge", "old": old.to_dict(), "new": new.to_dict(),
                        "slots": self.balancer.slots})

    async def ask(self, msg: dict, fds: list[int] = ()) -> list[tuple[Worker, dict]]:
        """Send request `msg` to every live worker; (worker, reply) of those that answered."""
        workers = self.live()

        async def one(worker):
            try:
                return worker, await worker.channel.request(msg, fds, REQUEST_TIMEOUT)
            except (ChannelClosed, asyncio.TimeoutError):
                return worker, None

        answers = await asyncio.gather(*(one(w) for w in workers))
        return [(w, reply) for w, reply in answers if reply is not None]

    async def close_open(self, backend, reason: str) -> int:
        """HealthMonitor's closer (on_down = "close"): every worker aborts the backend's
        open connections; how many in all."""
        return await self._closed_by_all("close", backend, reason)

    async def close_target(self, backend, reason: str) -> int:
        """`kill`: every worker aborts the backend's connections; how many in all."""
        return await self._closed_by_all("kill", backend, reason)

    async def _closed_by_all(self, op: str, backend, reason: str) -> int:
        replies = await self.ask({"op": op, "pool": backend.pool.name,
                                  "backend": backend.name, "reason": reason})
        return sum(reply.get("closed", 0) for _, reply in replies)

    async def conns(self, pool: str | None, backend: str | None) -> list[dict]:
        """`show conns`: every worker's connections (rows.conn_row, with `worker`)."""
        replies = await self.ask({"op": "conns", "pool": pool, "backend": backend})
        return [row for _, reply in replies for row in reply.get("conns", [])]

    async def stats(self) -> list[dict]:
        """Each live worker's process figures (`show info`)."""
        return [reply for _, reply in await self.ask({"op": "stats"})]

    def rows(self) -> list[dict]:
        """`show workers`: one row per worker."""
        table = self.balancer.table
        out = []
        for w in self.workers:
            figures = table.row_figures(w.row)
            out.append({"worker": w.index, "pid": w.pid, "generation": w.generation,
                        "started": round(w.started_at, 3), "live": w.live,
                        "active": figures["active"], "accepted": figures["accepted"],
                        "restarts": w.restarts})
        return out

    # --- stopping -----------------------------------------------------------------------

    async def stop_accepting(self) -> None:
        """First step of a graceful stop: every worker closes its Acceptors (the master
        then closes its sockets, and nothing accepts on them any more)."""
        self.stopping = True
        for w in self.workers:
            w.stopping = True
        await self.ask({"op": "stop_accepting"})

    async def stop(self, timeout: float) -> int:
        """Then the workers finish their connections for up to `timeout` s, close the
        rest and exit; the zygote goes too. Returns the connections closed at the
        deadline."""
        self.stopping = True
        workers = [w for w in self.workers if w.exited is not None and not w.exited.done()]
        for w in workers:
            w.stopping = True
        closed = sum(await asyncio.gather(*(self._finish(w, timeout) for w in workers)))
        if self.zygote_channel is not None:
            self.zygote_channel.close()          # the zygote exits on EOF
        return closed

    async def _finish(self, worker: Worker, timeout: float) -> int:
        closed = 0
        if worker.live:
            try:
                reply = await worker.channel.request({"op": "shutdown", "timeout": timeout},
                                                     timeout=timeout + EXIT_GRACE)
                closed = reply.get("closed", 0)
            except (ChannelClosed, asyncio.TimeoutError):
                pass
        try:
            await asyncio.wait_for(asyncio.shield(worker.exited), EXIT_GRACE)
        except asyncio.TimeoutError:
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(asyncio.shield(worker.exited), EXIT_GRACE)
            except asyncio.TimeoutError:
                pass
        return closed
