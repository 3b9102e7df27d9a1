"""Binary upgrade: the l4lb now installed takes over from the running one, refusing no
connection (`l4lb ctl upgrade`, SIGUSR2; DESIGN.md §9).

The old master (`Upgrade`) starts its own command line again (sys.orig_argv: the program
and the config as it was started, run by the code installed now) with one end of a Unix
socket pair as $L4LB_UPGRADE_FD. The new master (`Takeover`) reads its config as any start
does, then asks the old one over that channel (channel.py: JSON lines, descriptors as
SCM_RIGHTS):

1. `hello`: the old master writes its state file and answers where it is, its
   generation, its workers' generation, and its binds (address, sockets, steering);
2. `bind`, for each bind of the new config the old one has: its sockets, the very same
   ones (the kernel's queues come along; nothing is bound again);
3. `control` and `metrics`, when the new config keeps their address: those sockets too;
4. `ready`, once every new worker accepts on those sockets. Only then does the old master
   stop: its workers stop accepting (they close their descriptors, not the sockets),
   it stops answering on the control socket and tells systemd the new main pid; then it
   lets its connections finish for up to global.shutdown_timeout and exits, leaving the
   socket files and the state file to the new master.

Before `ready` the old master changes nothing: a new master that fails (a bad config, an
import error, a bind it cannot open, a worker that does not start, or no `ready` within
UPGRADE_TIMEOUT) leaves it serving as before, and `upgrade` answers why (the new master
sends its error as `failed` when it can; otherwise its exit status is what is known, and
its log says more).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from .actions import OperationError
from .channel import Channel, ChannelClosed
from .workers import describe_status

if TYPE_CHECKING:
    from .balancer import Balancer

# The environment variable naming the new master's end of the channel.
ENV_FD = "L4LB_UPGRADE_FD"
# Seconds the new master gets to have every worker accepting.
UPGRADE_TIMEOUT = 60.0
# Seconds one request of the new master to the old may take.
REQUEST_TIMEOUT = 10.0


class Upgrade:
    """The old master's side: start the new master, answer it, hand over on `ready`."""

    def __init__(self, balancer: "Balancer", control):
        self.balancer = balancer
        self.control = control
        self.loop = balancer.loop
        self.log = balancer.log
        self.running = False
        self.done = False               # handed over: this master is on its way out

    async def run(self, cause: str) -> dict:
        """Upgrade; the reply's fields once the new master serves. OperationError, with
        this master serving as before, when it could not."""
        b = self.balancer
        if b.stopping or self.done:
            raise OperationError("shutting down: upgrade refused")
        if self.running:
            raise OperationError("an upgrade is already under way")
        self.running = True
        self.log.info("upgrade_started", cause=cause, argv=list(sys.orig_argv))
        try:
            result = await self._run()
        except OperationError as exc:
            self.log.error("upgrade_failed", cause=cause, error=str(exc))
            raise
        finally:
            self.running = False
        self.log.info("upgrade_handed_over", cause=cause, **result)
        self.loop.create_task(b.shutdown(handed_over=True))
        return result

    async def _run(self) -> dict:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        outcome = self.loop.create_future()
        channel = Channel(ours, self.loop,
                          lambda msg, fds: self.on_message(channel, msg, fds, outcome),
                          lambda: outcome.done() or outcome.set_result(
                              ("gone", "closed the channel")))
        try:
            proc = subprocess.Popen(
                list(sys.orig_argv), stdin=subprocess.DEVNULL, pass_fds=[theirs.fileno()],
                env=dict(os.environ, **{ENV_FD: str(theirs.fileno())}))
        except OSError as exc:
            channel.close()
            raise OperationError(f"upgrade failed: cannot start {sys.orig_argv[0]}: "
                                 f"{exc.strerror}") from None
        finally:
            theirs.close()
        exited = self.loop.create_future()
        self._watch_exit(proc, exited)
        try:
            await asyncio.wait([outcome, exited], timeout=UPGRADE_TIMEOUT,
                               return_when=asyncio.FIRST_COMPLETED)
            kind, detail = outcome.result() if outcome.done() else (None, None)
            if kind == "ready":
                return detail
            if kind == "failed":                # its own words say the most
                why = detail
            elif exited.done():
                why = f"exited ({describe_status(exited.result())}) before it was ready"
            elif kind == "gone":
                why = "closed its channel before it was ready"
            else:
                why = f"was not ready within {UPGRADE_TIMEOUT:g} s"
            self._stop(proc, exited)
            raise OperationError(f"upgrade failed: the new master (pid {proc.pid}) {why}; "
                                 f"this one (pid {os.getpid()}) keeps serving")
        finally:
            if not channel.closed:
                channel.close()

    def _watch_exit(self, proc: subprocess.Popen, exited: asyncio.Future) -> None:
        """`exited` gets the exit status (Popen's returncode) when `proc` ends."""
        pidfd = os.pidfd_open(proc.pid)

        def on_exit():
            self.loop.remove_reader(pidfd)
            os.close(pidfd)
            if not exited.done():
                exited.set_result(proc.wait())

        self.loop.add_reader(pidfd, on_exit)

    def _stop(self, proc: subprocess.Popen, exited: asyncio.Future) -> None:
        """A new master that failed: SIGTERM (a graceful stop: whatever its workers
        accepted finishes), and reaped when it ends."""
        if not exited.done():
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    # --- the new master's requests ------------------------------------------------------

    def on_message(self, channel: Channel, msg: dict, fds: list[int],
                   outcome: asyncio.Future) -> None:
        for fd in fds:                  # the new master sends none
            os.close(fd)
        op = msg.get("op") or msg.get("event")
        try:
            if op == "hello":
                self.loop.create_task(self.hello(channel, msg))
            elif op == "bind":
                group = self.group(msg.get("bind"))
                channel.reply(msg, [s.fileno() for s in group.sockets] if group else [],
                              found=group is not None)
            elif op == "control":
                sock = self.control.socket if self.control is not None else None
                channel.reply(msg, [sock.fileno()] if sock is not None else [],
                              found=sock is not None)
            elif op == "metrics":
                sock = self.balancer.metrics.socket
                channel.reply(msg, [sock.fileno()] if sock is not None else [],
                              found=sock is not None)
            elif op == "ready":
                self.hand_over(msg)
                channel.reply(msg, ok=True)
                if not outcome.done():
                    outcome.set_result(("ready", {"pid": msg.get("pid"),
                                                  "generation": msg.get("generation"),
                                                  "version": msg.get("version")}))
            elif op == "failed":
                if not outcome.done():
                    outcome.set_result(("failed", str(msg.get("error"))[:2000]))
            elif "id" in msg:
                channel.reply(msg, error=f"unknown op {op!r}")
        except (ChannelClosed, OSError) as exc:
            if not outcome.done():
                outcome.set_result(("failed", f"hand-over broke: {exc}"))

    async def hello(self, channel: Channel, msg: dict) -> None:
        """Write the state file (the new master reads it), then say where things are."""
        b = self.balancer
        error = await b.state_writer.save()
        binds = [{"bind": str(group.addr), "sockets": len(group.sockets),
                  "shared": group.shared, "steered_to": group.steered_to}
                 for _, group in b.listening.groups()]
        if not channel.closed:
            channel.reply(msg, pid=os.getpid(), generation=b.generation,
                          workers_generation=b.workers.generation,
                          state=str(b.state_path), state_error=error, binds=binds,
                          health=b.health.verdicts(),
                          control=str(self.control.path) if self.control is not None else None,
                          metrics=str(b.metrics.address) if b.metrics.address else None)

    def group(self, bind):
        for _, group in self.balancer.listening.groups():
            if str(group.addr) == bind:
                return group
        return None

    def hand_over(self, msg: dict) -> None:
        """The new master's workers accept: stop taking anything new here."""
        b = self.balancer
        self.done = True
        self.loop.create_task(b.workers.stop_accepting())
        if self.control is not None:
            self.control.stop_accepting(keep_path=msg.get("control_taken", False))
        b.metrics.close()
        pid = msg.get("pid")
        if isinstance(pid, int):
            b.notifier.send(MAINPID=pid, STATUS=f"upgraded: pid {pid} serves")


class Takeover:
    """The new master's side of an upgrade: what it asks the old master for."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.channel = Channel(sock, loop, self.on_message)
        self.info: dict = {}
        self.binds: dict[str, dict] = {}

    @classmethod
    def from_environ(cls, loop) -> "Takeover | None":
        """The takeover this process was started for ($L4LB_UPGRADE_FD), or None."""
        fd = os.environ.pop(ENV_FD, None)
        if fd is None or not fd.isdigit():
            return None
        sock = socket.socket(fileno=int(fd))
        sock.set_inheritable(False)
        return cls(sock, loop)

    def on_message(self, msg: dict, fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)

    async def _ask(self, msg: dict) -> dict:
        try:
            return await self.channel.request(msg, timeout=REQUEST_TIMEOUT)
        except (ChannelClosed, asyncio.TimeoutError):
            raise OSError("upgrade: the old master stopped answering") from None

    async def hello(self) -> dict:
        self.info = await self._ask({"op": "hello", "pid": os.getpid()})
        self.binds = {b["bind"]: b for b in self.info.get("binds", [])}
        return self.info

    async def _sockets(self, msg: dict) -> list[socket.socket]:
        reply = await self._ask(msg)
        out = []
        for fd in reply.get("fds", []):
            sock = socket.socket(fileno=fd)
            sock.set_inheritable(False)
            sock.setblocking(False)
            out.append(sock)
        return out

    async def bind_sockets(self, bind: str) -> tuple[list[socket.socket], dict] | None:
        """The old master's sockets of `bind` and what it said of them, or None."""
        meta = self.binds.get(bind)
        if meta is None:
            return None
        sockets = await self._sockets({"op": "bind", "bind": bind})
        return (sockets, meta) if sockets else None

    async def control_socket(self, path) -> socket.socket | None:
        if self.info.get("control") != str(path):
            return None
        sockets = await self._sockets({"op": "control"})
        return sockets[0] if sockets else None

    async def metrics_socket(self, address) -> socket.socket | None:
        if address is None or self.info.get("metrics") != str(address):
            return None
        sockets = await self._sockets({"op": "metrics"})
        return sockets[0] if sockets else None

    async def ready(self, **fields) -> None:
        """Every worker accepts: the old master stops taking anything new."""
        await self._ask(dict(fields, op="ready", pid=os.getpid()))
        self.channel.close()

    def failed(self, error: str) -> None:
        """Tell the old master why this start failed (it keeps serving)."""
        report_failure(error, self.channel.sock.fileno() if not self.channel.closed else None)


def report_failure(error: str, fd: int | None = None) -> None:
    """Tell the old master why this new master cannot start — from anywhere before the
    loop too (a config error in `l4lb run`): one `failed` line on $L4LB_UPGRADE_FD."""
    if fd is None:
        value = os.environ.get(ENV_FD)
        if value is None or not value.isdigit():
            return
        fd = int(value)
    line = json.dumps({"event": "failed", "error": error, "at": time.time()}) + "\n"
    try:
        os.set_blocking(fd, True)
        os.write(fd, line.encode())
    except OSError:
        pass
