"""The master <-> worker channel: JSON messages, with descriptors attached, over a Unix
stream socket pair (DESIGN.md §9).

A message is one JSON object on one line (`\\n`-terminated; JSON escapes every newline
inside a value). A message that carries descriptors (listening sockets) says how many
in its `fds` field, and the descriptors ride as SCM_RIGHTS on the first byte of its line;
the reader keeps every descriptor it receives in arrival order and hands a message its
`fds` once the whole line is in. The kernel delivers ancillary data no later than the
byte it was sent with, so a complete line has all of its descriptors.

Neither end ever blocks its event loop: the socket is non-blocking, a message the kernel
does not take at once waits in an in-memory queue flushed when the socket is writable
(the loop's add_writer), and reads happen from add_reader. The queue is bounded only by
what the master sends, which is control traffic (operator actions, reloads, replies),
never per-connection data.

Requests and replies: `request()` numbers a message (`id`) and returns a future for the
reply carrying the same `id` (`reply` field); everything else goes to `on_message`.
"""
from __future__ import annotations

import array
import asyncio
import collections
import itertools
import json
import os
import socket
from typing import Callable

# Bytes read per recvmsg, and the most descriptors one recvmsg takes.
READ_SIZE = 256 * 1024
MAX_FDS = 256


class ChannelClosed(Exception):
    """The other end is gone."""


class Channel:
    """One end of a master <-> worker channel, on `loop`.

    `on_message(msg, fds)` gets every message that is not a reply to our own request;
    `on_close()` is called once when the other end closes or the socket fails."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[dict, list[int]], None],
                 on_close: Callable[[], None] | None = None):
        sock.setblocking(False)
        self.sock = sock
        self.loop = loop
        self.on_message = on_message
        self.on_close = on_close
        self.closed = False
        self._rbuf = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        self._wqueue: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self._writing = False
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        loop.add_reader(sock.fileno(), self._on_readable)

    # --- sending ------------------------------------------------------------------------

    def send(self, msg: dict, fds: list[int] = ()) -> None:
        """Queue `msg` (with descriptors `fds`, duplicated by the kernel on send)."""
        if self.closed:
            raise ChannelClosed("channel closed")
        if fds:
            msg = dict(msg, fds=len(fds))
        data = json.dumps(msg, separators=(",", ":")).encode() + b"\n"
        self._wqueue.append((data, list(fds)))
        self._flush()

    async def request(self, msg: dict, fds: list[int] = (), timeout: float | None = None):
        """Send `msg` and wait for its reply (a dict); ChannelClosed if the end goes."""
        rid = next(self._ids)
        fut = self.loop.create_future()
        self._pending[rid] = fut
        try:
            self.send(dict(msg, id=rid), fds)
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._pending.pop(rid, None)

    def reply(self, request: dict, fds: list[int] = (), **fields) -> None:
        """Answer `request` (a message that came with an `id`), with descriptors `fds`
        (the reply's `fds` is the list of them then)."""
        if not self.closed:
            self.send(dict(fields, reply=request["id"]), fds)

    def _flush(self) -> None:
        while self._wqueue:
            data, fds = self._wqueue[0]
            try:
                if fds:
                    sent = self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                       array.array("i", fds))])
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._lost()
                return
            if sent < len(data):
                self._wqueue[0] = (data[sent:], [] if sent else fds)
                self._watch_writable()
                return
            self._wqueue.popleft()
        self._unwatch_writable()

    def _watch_writable(self) -> None:
        if not self._writing:
            self._writing = True
            self.loop.add_writer(self.sock.fileno(), self._flush)

    def _unwatch_writable(self) -> None:
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.sock.fileno())

    # --- receiving ----------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                READ_SIZE, socket.CMSG_SPACE(MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self._fds.extend(fds)
        if not data:
            self._lost()
            return
        self._rbuf += data
        while not self.closed:
            end = self._rbuf.find(b"\n")
            if end < 0:
                break
            line = bytes(self._rbuf[:end])
            del self._rbuf[:end + 1]
            self._dispatch(line)

    def _dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except ValueError:                       # not our peer's: stop listening to it
            self._lost()
            return
        fds = [self._fds.popleft() for _ in range(min(msg.get("fds", 0), len(self._fds)))]
        rid = msg.get("reply")
        if rid is not None:
            fut = self._pending.get(rid)
            if fut is not None and not fut.done():
                msg["fds"] = fds                 # the requester owns them now
                fut.set_result(msg)
            else:
                for fd in fds:                   # nobody waits for them: never leak one
                    os.close(fd)
            return
        self.on_message(msg, fds)

    # --- closing ------------------------------------------------------------------------

    def _lost(self) -> None:
        if self.closed:
            return
        self.close()
        if self.on_close is not None:
            self.on_close()

    def close(self) -> None:
        """Stop using the socket: pending requests fail with ChannelClosed."""
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self.sock.fileno())
            self._unwatch_writable()
        except (ValueError, OSError):
            pass
        self.sock.close()
        while self._fds:
            os.close(self._fds.popleft())
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ChannelClosed("channel closed"))
        self._pending.clear()
