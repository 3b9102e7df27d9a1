"""The process's own figures, in one place: descriptors (limit, what max_connections needs,
how many are open), CPU, memory and uptime, for `show info` and for the metrics.

Theory of operation
-------------------
Figures are read through psutil, one /proc pass per reading (ProcessProbe). The open
descriptor count costs one stat of /proc/self/fd on Linux 6.2+ (count_open_fds), which
opens nothing.

Out of descriptors (issue 20 item 11) is exactly when an operator asks for these figures,
and exactly when reading them (psutil opens /proc files) or even accepting the operator's
connection fails with EMFILE. So the process keeps a small reserve of descriptors opened
on /dev/null (FdReserve, as HAProxy reserves descriptors for its CLI). The control socket
and the metrics endpoint accept through ReservedServer, which on EMFILE/ENFILE closes one
reserved descriptor and tries again; a figure reading does the same; the reserve is
refilled as soon as descriptors are free again (after a reading, when such a connection
closes, at the next accept). If even the reserve is spent, a reading answers with the
last good figures and the open count from the stat (`stale` is then True), never with an
error. libuv's own servers cannot be used for those two sockets: on EMFILE libuv accepts
and closes the waiting connections (its "emfile trick"), so the operator would get a
closed connection instead of an answer.

What this does not do: it does not stop the relay from taking descriptors freed between
two refills; the relay pauses its own accepts when it runs out (ACCEPT_PAUSE).
"""
from __future__ import annotations

import asyncio
import errno
import functools
import os
import resource
import socket
import time
from dataclasses import dataclass, replace
from typing import Callable

import psutil

from . import __version__
from ._native import max_pipes  # the relay's pipe cap, also counted in fds_needed

# --- descriptor arithmetic ---------------------------------------------------------------

# File descriptors beyond two per connection: listening sockets, the control socket,
# health probes, the log stream, the metrics endpoint, epoll, libuv's own and the reserve.
FD_HEADROOM = 100


def fds_needed(max_connections: int) -> int:
    """Descriptors `max_connections` relayed connections need: two each (client and
    backend), two per pipe the relay may hold for bulk transfers (max_pipes), plus
    FD_HEADROOM. 0 (unlimited) needs no particular figure."""
    if max_connections <= 0:
        return 0
    return 2 * max_connections + 2 * max_pipes(max_connections) + FD_HEADROOM


def fd_limit_warnings(max_connections: int, soft: int | None = None) -> list[str]:
    """Sentences for an operator when the soft RLIMIT_NOFILE (the current one unless
    given) is below what `global.max_connections` needs; [] when it is enough."""
    if soft is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = fds_needed(max_connections)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return []
    per = f"2 per connection, 2 per pipe for up to {max_pipes(max_connections)} pipes"
    room = max(0, (soft - FD_HEADROOM) * max_connections // (need - FD_HEADROOM))
    return [f"the open file limit is {soft} but global.max_connections = {max_connections} "
            f"needs {need} ({per}, + {FD_HEADROOM}): raise "
            f"LimitNOFILE / ulimit -n, or lower max_connections; beyond {room} "
            "connections new clients will be refused"]


def fd_limit_report(max_connections: int) -> dict:
    """The `show info` fields on descriptors: fd_limit {soft, hard} (None = unlimited),
    fds_needed by global.max_connections, and warnings (sentences; [] when all is well)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    return {
        "fd_limit": {"soft": None if soft == unlimited else soft,
                     "hard": None if hard == unlimited else hard},
        "fds_needed": fds_needed(max_connections),
        "warnings": fd_limit_warnings(max_connections, soft),
    }


def count_open_fds(process: psutil.Process | None = None) -> int:
    """Descriptors this process has open.

    Linux 6.2+ reports the count as the size of /proc/self/fd: one stat, O(1), and no
    descriptor needed. Older kernels report 0 there, and the count falls back to listing
    the directory (psutil), which costs O(open fds) — about 25 ms at 20,000 descriptors
    on a small machine — and one descriptor."""
    try:
        size = os.stat("/proc/self/fd").st_size
    except OSError:
        size = 0
    if size > 0:
        return size
    return (process or psutil.Process()).num_fds()


# --- the descriptor reserve ------------------------------------------------------------------

# Errors that mean "no descriptor left" (per process, system-wide): the ones a reserved
# descriptor can cure. Not the relay's overload set: ENOBUFS/ENOMEM are not cured by it.
NO_DESCRIPTOR_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE})
# Descriptors held in reserve: an operator's connection takes one, a reading one at a
# time; 8 leaves room for a few operators and a scrape arriving in the same moment.
RESERVE_SIZE = 8
# Seconds a ReservedServer stops watching its socket when even the reserve is spent, so
# that a connection it cannot accept does not spin the loop.
ACCEPT_RETRY = 0.1


class FdReserve:
    """Descriptors opened on /dev/null, given back one at a time when a descriptor is
    what an operation lacks (see the module doc). Loop thread only."""

    def __init__(self, size: int = RESERVE_SIZE):
        self.size = size
        self.fds: list[int] = []
        self.released = 0                   # descriptors given back since start
        self.refill()

    def refill(self) -> None:
        """Take back free descriptors up to `size`; stops quietly when none is free."""
        while len(self.fds) < self.size:
            try:
                self.fds.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                return

    def release_one(self) -> bool:
        """Close one reserved descriptor so that the next open gets it; False if none."""
        if not self.fds:
            return False
        os.close(self.fds.pop())
        self.released += 1
        return True

    def call(self, fn: Callable, *args):
        """fn(*args), retried with one more reserved descriptor each time it fails for
        want of one; the last OSError is raised when the reserve is spent."""
        while True:
            try:
                return fn(*args)
            except OSError as exc:
                if exc.errno not in NO_DESCRIPTOR_ERRNOS or not self.release_one():
                    raise

    async def call_async(self, fn: Callable, *args):
        """call() for a coroutine function."""
        while True:
            try:
                return await fn(*args)
            except OSError as exc:
                if exc.errno not in NO_DESCRIPTOR_ERRNOS or not self.release_one():
                    raise

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


@functools.cache
def fd_reserve() -> FdReserve:
    """The process's one reserve, opened on first use (the control socket's start)."""
    return FdReserve()


async def open_loop_spare(loop: asyncio.AbstractEventLoop) -> None:
    """Make libuv open its own spare descriptor now rather than at the first operator
    connection. libuv opens one (on /dev/null, its "emfile" reserve) when the loop's
    first stream handle is made; with no libuv server for the control socket that would
    be the first control connection, and the process's descriptor count would grow by
    one after start. One throwaway socket pair, once per loop."""
    if getattr(loop, "_l4lb_spare_opened", False):
        return
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        ours.setblocking(False)
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, ours)
        transport.abort()
    finally:
        theirs.close()
    loop._l4lb_spare_opened = True


class ReservedServer:
    """A listening socket accepted by our own loop.add_reader callback, drawing on the
    reserve when out of descriptors (libuv's servers drop connections then, see the
    module doc). `sockets` and `close()` stand in for asyncio.Server's."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 protocol_factory: Callable[[], asyncio.Protocol],
                 reserve: FdReserve | None = None):
        self.loop = loop
        self.sock = sock
        self.sockets = [sock]
        self.factory = protocol_factory
        self.reserve = reserve or fd_reserve()
        self.retry = None
        self.closed = False
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept_ready)

    def _accept_ready(self) -> None:
        reserve = self.reserve
        reserve.refill()
        for _ in range(16):                  # a burst, then let the loop breathe
            try:
                conn, _ = reserve.call(self.sock.accept)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in NO_DESCRIPTOR_ERRNOS:      # even the reserve is spent
                    self._pause()
                return
            self.loop.create_task(self._wrap(conn))

    async def _wrap(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        try:
            await self.reserve.call_async(self.loop.connect_accepted_socket,
                                          self.factory, conn)
        except OSError:
            conn.close()                     # nothing more to give: this client waits no more

    def _pause(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.retry = self.loop.call_later(ACCEPT_RETRY, self._resume)

    def _resume(self) -> None:
        self.retry = None
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept_ready)
            self._accept_ready()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.retry is not None:
            self.retry.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


# --- readings ----------------------------------------------------------------------------


@dataclass
class ProcessFigures:
    cpu_seconds: float
    cpu_percent: float | None      # since the previous reading that asked for it
    rss_bytes: int
    open_fds: int
    fd_soft: int
    fd_hard: int
    stale: bool = False            # out of descriptors: the last good reading, fds fresh
    vms_bytes: int = 0             # virtual memory size
    start_time: float = 0.0        # when the process started, seconds since the epoch


class ProcessProbe:
    """Reads this process's figures through psutil, one /proc pass per reading, drawing
    on the descriptor reserve when out of descriptors (see the module doc)."""

    def __init__(self, reserve: FdReserve | None = None):
        self.reserve = reserve
        self.process = psutil.Process(os.getpid())
        self.process.cpu_percent(None)          # prime: the next call measures since now
        self.last: ProcessFigures | None = None

    def read(self, cpu_percent: bool = False) -> ProcessFigures:
        """The figures now. Never raises for want of descriptors once one reading has
        succeeded: it answers with the last one then (stale=True, open_fds fresh)."""
        reserve = self.reserve or fd_reserve()
        try:
            figures = reserve.call(self._read, cpu_percent)
        except OSError as exc:
            if exc.errno not in NO_DESCRIPTOR_ERRNOS or self.last is None:
                raise
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            try:
                fds = count_open_fds(self.process)
            except OSError:
                fds = soft
            return replace(self.last, open_fds=fds, fd_soft=soft, fd_hard=hard,
                           cpu_percent=None, stale=True)
        finally:
            reserve.refill()
        self.last = figures
        return figures

    def _read(self, cpu_percent: bool) -> ProcessFigures:
        p = self.process
        with p.oneshot():
            cpu = p.cpu_times()
            mem = p.memory_info()
            figures = ProcessFigures(
                cpu_seconds=cpu.user + cpu.system,
                cpu_percent=p.cpu_percent(None) if cpu_percent else None,
                rss_bytes=mem.rss,
                open_fds=count_open_fds(p),
                fd_soft=0, fd_hard=0,
                vms_bytes=mem.vms,
                start_time=p.create_time())
        figures.fd_soft, figures.fd_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return figures


@functools.cache
def process_probe() -> ProcessProbe:
    """The process's one probe (so that cpu_percent measures between two `show info`)."""
    return ProcessProbe()


def uptime(balancer) -> float:
    """Seconds since the balancer started."""
    return time.time() - balancer.started_at


def show_info_fields(balancer, workers: list[dict] = ()) -> dict:
    """The fields of the `show info` reply: the figures of the whole balancer (the
    master's plus those each worker in `workers` reported: Workers.stats), the
    connection counts and the descriptor report. Answers even out of descriptors (see
    ProcessProbe.read)."""
    from .log import dropped_lines

    b = balancer
    figures = process_probe().read(cpu_percent=True)
    pipes = {"used": 0, "free": 0, "max": 0, "created": 0}
    cpu, rss, fds = figures.cpu_seconds, figures.rss_bytes, figures.open_fds
    dropped = dropped_lines()
    for w in workers:
        dropped += w["log_lines_dropped"]
        for key in pipes:
            pipes[key] += w["pipes"][key]
        cpu += w["cpu_seconds"]
        rss += w["rss_bytes"]
        fds += w["open_fds"]
    info = {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(uptime(b), 3),
        "cpu_percent": figures.cpu_percent,
        "cpu_seconds": round(cpu, 3),
        "rss_bytes": rss,
        "open_fds": fds,
        "conns_active": b.hub.active,
        "conns_total": b.hub.total,
        "pipes": pipes,
        "log_lines_dropped": dropped,
        "workers": len(workers),
        "generation": getattr(b, "generation", 1),
        "started": round(b.started_at, 3),
        "upgraded_from": getattr(b, "upgraded_from", None),
    }
    info.update(fd_limit_report(b.config.global_.max_connections))
    return info
