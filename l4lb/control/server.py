"""The control socket: a Unix stream socket speaking one command per line, one JSON reply
line per command (DESIGN.md §6).

Commands of one connection are carried out in order (a `wait` delays the replies behind
it, never another connection's). Bad input of any kind gets an error reply; nothing a
client sends can raise out of here.
"""
from __future__ import annotations

import asyncio
import collections
import os
import socket
import stat
from pathlib import Path

from ..log import get_logger
from ..trust import untrusted_reason
from . import protocol
from .commands import CommandHandlers


class ControlSocketError(Exception):
    """The control socket cannot be created; the message says why."""


def open_control_socket(path: Path, mode: int) -> socket.socket:
    """A listening Unix socket at `path` created with file mode `mode` from the start
    (umask set around bind, so there is no moment where it is more open than `mode`).

    A stale socket file (nothing answers on it) is replaced. ControlSocketError when
    another process answers on it, the path is something other than a socket, or its
    folder could be changed by another user (l4lb.trust)."""
    if reason := untrusted_reason(path.parent):
        raise ControlSocketError(f"refusing the control socket's folder: {reason}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlSocketError(f"{path} exists and is not a socket; not touching it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)                       # stale: its process is gone
        except OSError as exc:
            raise ControlSocketError(f"{path}: {exc.strerror}") from None
        else:
            raise ControlSocketError(
                f"another l4lb is running: its control socket {path} answers")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise ControlSocketError(f"cannot create control socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(64)
    sock.setblocking(False)
    return sock


class ControlConnection(asyncio.Protocol):
    """One control client: lines in, replies out, in order."""

    def __init__(self, server: "ControlServer"):
        self.server = server
        self.reader = protocol.LineReader()
        self.queue: collections.deque = collections.deque()
        self.wakeup = asyncio.Event()
        self.transport = None
        self.worker = None
        self.eof = False

    def connection_made(self, transport):
        self.transport = transport
        self.worker = asyncio.get_running_loop().create_task(self.serve())
        self.server.connections.add(self)

    def data_received(self, data):
        self.queue.extend(self.reader.feed(data))
        self.wakeup.set()

    def eof_received(self):
        self.eof = True
        self.wakeup.set()
        return True                               # keep writing the replies still due

    def connection_lost(self, exc):
        self.server.connections.discard(self)
        if self.worker is not None:
            self.worker.cancel()

    async def serve(self):
        try:
            while True:
                while self.queue:
                    item = self.queue.popleft()
                    reply = await self.answer(item)
                    if self.transport.is_closing():
                        return
                    self.transport.write(protocol.encode_reply(reply))
                if self.eof:
                    self.transport.close()
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
        except asyncio.CancelledError:
            pass

    async def answer(self, item) -> dict:
        if isinstance(item, protocol.ControlError):
            return protocol.error(str(item))
        try:
            command = protocol.parse_command(item)
        except protocol.ControlError as exc:
            return protocol.error(str(exc))
        try:
            return await self.server.handlers.run(command)
        except Exception as exc:              # a bug must not take the balancer down
            self.server.log.exception("control_command_failed", command=command.name)
            return protocol.error(f"internal error: {exc!r}")


class ControlServer:
    def __init__(self, balancer, path: Path, mode: int):
        self.balancer = balancer
        self.path = Path(path)
        self.mode = mode
        self.handlers = CommandHandlers(balancer)
        self.log = get_logger()
        self.connections: set = set()
        self.server = None

    async def start(self) -> None:
        sock = open_control_socket(self.path, self.mode)
        self.server = await asyncio.get_running_loop().create_unix_server(
            lambda: ControlConnection(self), sock=sock)
        self.log.info("control_started", socket=str(self.path), mode=oct(self.mode))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
