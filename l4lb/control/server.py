"""The control socket: a Unix stream socket speaking one command per line, one JSON reply
line per command (DESIGN.md §6).

It is accepted through l4lb.process.ReservedServer, which draws on a reserve of
descriptors, so that an operator still gets answers when the process has run out of them
(issue 20 item 11).

Commands of one connection are carried out in order (a `wait` delays the replies behind
it, never another connection's). Bad input of any kind gets an error reply; nothing a
client sends can raise out of here.

A stream command (`subscribe`) is a connection's last: from then on it gets one reply
line per interval until it closes (lines it sends after are not read beyond QUEUE_MAX),
paced by its own task, so it holds up no other client; frames it does not read are
skipped, then it is dropped (STREAM_STALL_FRAMES).
"""
from __future__ import annotations

import asyncio
import collections
import os
import select
import socket
import stat
from pathlib import Path

from ..log import get_logger
from ..process import ReservedServer, fd_reserve, open_loop_spare
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


# Reply bytes buffered for one client above which l4lb stops reading its commands, and
# below which it reads again: a client that pipelines `show backends` and never reads
# would otherwise grow l4lb's memory by every reply (issue 20 item 9). 256 KiB holds any
# single reply of a large deployment; 64 KiB lets the kernel's own buffer refill it.
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024
# Commands read and not yet answered above which reading pauses too: one 64 KiB read of
# "help\n" is 13,000 commands, whose replies would pass WRITE_HIGH long before the last.
QUEUE_MAX = 256
# Seconds between two checks whether a client that closed its sending side is gone
# altogether, while a command of its (a `wait`) is still being carried out.
HANGUP_POLL = 0.5
# `subscribe`: a frame that falls due while the client's unread frames are past WRITE_HIGH
# is skipped (the next carries the newest figures, and rates span the gap); after this
# many skipped in a row the client is closed (logged `subscriber_dropped`). So a stuck
# subscriber holds at most WRITE_HIGH plus one frame, and for a bounded time.
STREAM_STALL_FRAMES = 10


def peer_hung_up(transport) -> bool:
    """Whether the other end of a Unix stream socket has closed entirely (POLLHUP), not
    just its sending side (shutdown(SHUT_WR), as `socat` does before reading replies)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return any(revents & (select.POLLHUP | select.POLLERR)
                   for _, revents in poller.poll(0))
    except (OSError, ValueError):
        return True


class ControlConnection(asyncio.Protocol):
    """One control client: lines in, replies out, in order.

    Flow control: reading stops while the client's replies are not being read (the
    transport's write buffer is past WRITE_HIGH, signalled by pause_writing) or while
    QUEUE_MAX commands wait, and resumes when both have drained; so a client that never
    reads costs at most about WRITE_HIGH plus the kernel's socket buffers.

    End of input: a last command without its newline is answered (as HAProxy's CLI does).
    After its EOF a client may still be reading (half-close), so its replies are still
    written; but a client gone altogether (POLLHUP) is dropped at once, ending a `wait`
    it left behind instead of holding its descriptor until the wait times out."""

    def __init__(self, server: "ControlServer"):
        self.server = server
        self.reader = protocol.LineReader()
        self.queue: collections.deque = collections.deque()
        self.wakeup = asyncio.Event()
        self.writable = asyncio.Event()            # clear while pause_writing holds
        self.writable.set()
        self.transport = None
        self.worker = None
        self.eof = False
        self.unterminated = False                  # the last bytes read did not end a line
        self.reading = True
        self.hangup_timer = None

    def connection_made(self, transport):
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self.worker = asyncio.get_running_loop().create_task(self.serve())
        self.server.connections.add(self)

    def data_received(self, data):
        self.unterminated = not data.endswith(b"\n")
        self.queue.extend(self.reader.feed(data))
        if len(self.queue) >= QUEUE_MAX:
            self._set_reading(False)
        self.wakeup.set()

    def eof_received(self):
        self.eof = True
        if self.unterminated:                      # `printf 'show info' | socat ...`
            self.queue.extend(self.reader.feed(b"\n"))
        self.wakeup.set()
        self._check_hangup()
        return True                               # keep writing the replies still due

    def pause_writing(self):
        self.writable.clear()
        self._set_reading(False)

    def resume_writing(self):
        self.writable.set()
        self._update_reading()

    def connection_lost(self, exc):
        self.server.connections.discard(self)
        self.writable.set()
        if self.hangup_timer is not None:
            self.hangup_timer.cancel()
            self.hangup_timer = None
        if self.worker is not None:
            self.worker.cancel()
        fd_reserve().refill()              # its descriptors are free again: keep them

    def _set_reading(self, on: bool) -> None:
        if on == self.reading or self.eof or self.transport.is_closing():
            return
        self.reading = on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def _update_reading(self) -> None:
        """Read again once replies drain and the queue is short (hysteresis: half)."""
        if self.writable.is_set() and len(self.queue) <= QUEUE_MAX // 2:
            self._set_reading(True)

    def _check_hangup(self) -> None:
        """After EOF: drop a client gone altogether, else look again in HANGUP_POLL s."""
        self.hangup_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if peer_hung_up(transport):
            transport.abort()                     # connection_lost cancels the worker
            return
        self.hangup_timer = asyncio.get_running_loop().call_later(
            HANGUP_POLL, self._check_hangup)

    async def serve(self):
        try:
            while True:
                while self.queue:
                    if not self.writable.is_set():
                        await self.writable.wait()
                        if self.transport.is_closing():
                            return
                    item = self.queue.popleft()
                    if not self.reading:
                        self._update_reading()
                    reply = await self.answer(item)
                    if self.transport.is_closing():
                        return
                    if isinstance(reply, protocol.Stream):
                        await self.stream(reply)
                        return
                    self.transport.write(protocol.encode_reply(reply))
                if self.eof:
                    self.transport.close()
                    return
                self.wakeup.clear()
                await self.wakeup.wait()
        except asyncio.CancelledError:
            pass

    async def stream(self, stream: protocol.Stream) -> None:
        """Write stream's frames every stream.interval s until the client goes; skip the
        ones due while it is not reading, and close it after STREAM_STALL_FRAMES."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        skipped = 0
        while not self.transport.is_closing():
            if self.writable.is_set():
                skipped = 0
                try:
                    line = protocol.encode_reply(protocol.ok(**stream.frame()))
                except Exception as exc:      # a bug must not take the balancer down
                    self.server.log.exception("control_command_failed", command="subscribe")
                    self.transport.write(protocol.encode_reply(
                        protocol.error(f"internal error: {exc!r}")))
                    self.transport.close()
                    return
                self.transport.write(line)
            else:
                skipped += 1
                if skipped >= STREAM_STALL_FRAMES:
                    self.server.log.warning("subscriber_dropped", skipped=skipped,
                                            interval=stream.interval)
                    self.transport.abort()
                    return
            now = loop.time()
            due = max(due + stream.interval, now)     # late (a busy loop): no catching up
            await asyncio.sleep(due - now)

    async def answer(self, item):
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
        self.keep_path = False          # the socket file is a new master's now (upgrade)

    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen on the control socket: a new one at `path`, or `sock`, the one the old
        master answered on (an upgrade: the same file, nothing unlinked or bound)."""
        if sock is None:
            sock = open_control_socket(self.path, self.mode)
        loop = asyncio.get_running_loop()
        try:
            await open_loop_spare(loop)
        except BaseException:
            sock.close()
            raise
        self.server = ReservedServer(loop, sock, lambda: ControlConnection(self))
        self.log.info("control_started", socket=str(self.path), mode=oct(self.mode))

    @property
    def socket(self) -> socket.socket | None:
        """The listening socket (an upgrade hands it to the new master)."""
        return self.server.sock if self.server is not None else None

    def stop_accepting(self, keep_path: bool) -> None:
        """An upgrade handed over: no new client here (those connected get their
        replies); `keep_path`: the new master answers on this socket file, which close()
        then leaves in place."""
        if self.server is not None:
            self.server.close()
            self.server = None
        self.keep_path = keep_path

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if self.keep_path:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
