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

A reload that changes `global.workers` starts a new generation (`regenerate`): the bind
groups grow to a socket per new worker first (a socket joins its group already steered
away from, so nothing queues where nobody accepts), the new workers start and say ready,
new connections are steered to them, and only then do the old ones stop accepting and
finish their connections for up to global.shutdown_timeout. No socket closes, so nothing
queued is reset. Until they exit the old workers (`retiring`) keep their rows of the
table, so every limit and leastconn still counts their connections, and they still
answer `show conns`, `kill` and `stats`.

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

    def __init__(self, index: int, generation: int, row: int, of: int):
        self.index = index              # its place among its generation's `of` workers
        self.of = of                    # (BindGroup.assigned: which sockets it takes)
        self.row = row                  # its row of the shared table
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
        self.workers: list[Worker] = []          # the generation that accepts
        self.retiring: list[Worker] = []         # older ones finishing their connections
        self.free_rows = list(range(balancer.table.rows))
        self._regenerating = asyncio.Lock()
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
        self.workers = self.new_generation(self.count)
        await self.start_all(self.workers)

    def check_room(self, count: int) -> None:
        """OSError unless `count` new workers have a row of the shared table each."""
        if len(self.free_rows) < count:
            raise OSError(f"{count} new workers need {count} rows of the shared table and "
                          f"{len(self.free_rows)} of its {self.balancer.table.rows} are free "
                          f"(older workers are still finishing their connections: "
                          f"`show workers`); try again once they exit")

    def new_generation(self, count: int) -> list[Worker]:
        self.check_room(count)
        self.free_rows.sort()
        rows, self.free_rows = self.free_rows[:count], self.free_rows[count:]
        return [Worker(i, self.generation, row, count) for i, row in enumerate(rows)]

    async def start_all(self, workers: list[Worker]) -> None:
        """Spawn `workers` and wait until each accepts. OSError when one fails."""
        try:
            for worker in workers:
                await self.spawn(worker)
            await asyncio.wait_for(asyncio.gather(*(w.ready for w in workers)),
                                   READY_TIMEOUT)
        except (asyncio.TimeoutError, ChannelClosed) as exc:
            raise OSError(f"workers did not start: {exc or 'timed out'}") from None

    async def regenerate(self, count: int) -> None:
        """Replace the accepting workers by `count` new ones, refusing no connection:
        grow the bind groups (new sockets steered away from until their workers accept),
        start the new generation and wait until it accepts, steer new connections to it,
        then have the old one stop accepting and finish. OSError, with the old generation
        still accepting as before, when the new one cannot start."""
        async with self._regenerating:
            await self._regenerate(count)

    async def _regenerate(self, count: int) -> None:
        listening = self.balancer.listening
        old_count = self.count
        if count == old_count:
            return
        self.generation += 1
        try:
            new = self.new_generation(count)
        except OSError:
            self.generation -= 1
            raise
        grown = listening.resize(count, old_count)
        try:
            await self.start_all(new)
        except OSError:
            self.generation -= 1
            await self._retire(new)         # those that accept already finish theirs
            listening.shrink(grown, old_count)
            raise
        old, self.workers, self.count = self.workers, new, count
        listening.steer(count)
        self.log.info("workers_replaced", generation=self.generation, workers=count,
                      previous=old_count)
        await self._retire(old)

    async def _retire(self, workers: list[Worker]) -> None:
        """`workers` stop accepting, then finish their connections for up to
        global.shutdown_timeout and exit (their rows are freed when they do)."""
        for w in workers:
            w.stopping = True
            if w.live:
                self.retiring.append(w)
            elif w.exited is None or w.exited.done():   # never started, or gone
                self.free_rows.append(w.row)
        await self.ask({"op": "stop_accepting"}, workers=workers)
        timeout = self.balancer.config.global_.shutdown_timeout
        for w in workers:
            if w in self.retiring:
                self.loop.create_task(self._finish(w, timeout))

    @staticmethod
    def _kill(worker: Worker) -> None:
        if worker.pid is not None:
            try:
                os.kill(worker.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

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
        sockets = b.listening.sockets_of(worker.index, worker.of)
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
        if worker in self.retiring:             # an old generation's: its row is free
            self.retiring.remove(worker)
            self.free_rows.append(worker.row)
        started = worker.ready is not None and worker.ready.done()
        if not started and worker.ready is not None:
            worker.ready.set_exception(ChannelClosed(
                f"worker {worker.index} exited before it was ready ({describe_status(status)})"))
        if worker.exited is not None and not worker.exited.done():
            worker.exited.set_result(status)
        if worker.stopping or self.stopping or not (started or worker.restarts):
            # (one that died in its generation's start is the start's failure to report)
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
        """The accepting generation's live workers."""
        return [w for w in self.workers if w.live]

    def every(self) -> list[Worker]:
        """Every live worker: the accepting generation and the retiring ones."""
        return [w for w in self.workers + self.retiring if w.live]

    def broadcast(self, msg: dict, fds: list[int] = ()) -> None:
        """Send `msg` to every live worker (a worker started later gets the snapshot)."""
        for worker in self.every():
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
        for worker in self.every():
            if worker in self.retiring:         # accepts no more: no sockets
                pairs = []
            else:
                pairs = [([name, bind], sock) for name, bind, group in opened
                         for sock in group.assigned(worker.index, worker.of)]
            try:
                worker.channel.send(dict(snapshot, op="reload",
                                         binds=[pair for pair, _ in pairs]),
                                    [sock.fileno() for _, sock in pairs])
            except ChannelClosed:
                pass

    def converge(self, old, new) -> None:
        """The master moved its model from RuntimeState `old` to `new` (a fleet's change
        from etcd, or its undo: fleet_apply.apply_difference): each worker moves its own
        the same way."""
        self.broadcast({"op": "converge", "old": old.to_dict(), "new": new.to_dict(),
                        "slots": self.balancer.slots})

    async def ask(self, msg: dict, fds: list[int] = (),
                  workers: list[Worker] | None = None) -> list[tuple[Worker, dict]]:
        """Send request `msg` to every live worker (or to those of `workers` alive);
        (worker, reply) of those that answered."""
        workers = self.every() if workers is None else [w for w in workers if w.live]

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
        for w in self.workers + self.retiring:
            figures = table.row_figures(w.row)
            out.append({"worker": w.index, "pid": w.pid, "generation": w.generation,
                        "started": round(w.started_at, 3), "live": w.live,
                        "active": figures["active"], "accepted": figures["accepted"],
                        "restarts": w.restarts,
                        "accepting": w in self.workers and not self.stopping})
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
        workers = [w for w in self.workers + self.retiring
                   if w.exited is not None and not w.exited.done()]
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
            self._kill(worker)
            try:
                await asyncio.wait_for(asyncio.shield(worker.exited), EXIT_GRACE)
            except asyncio.TimeoutError:
                pass
        return closed
