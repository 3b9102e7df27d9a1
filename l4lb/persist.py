"""Writing the runtime state file off the event loop, coalesced.

An operator command changes RuntimeState on the loop and asks for the file to be written
(`StateWriter.save`). The write runs in the loop's default executor, so the loop never
waits on the disk (an fsync can take a long time on a busy or failing disk). At most one
write is in flight; every change made while it runs joins the next write, and the next
write starts on the loop iteration after the first change asked for it, so a burst of
commands costs a few writes, not one per command. Each write snapshots the state when it
starts, so the last state is always the one on disk once the writes have finished.

`save` returns a future each command awaits before replying: None when the write that
carried its change succeeded, else the error text, which the reply carries as its
`warning` (issue 20 item 12: a change that will not survive a restart must say so).
"""
from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Callable

from .state import RuntimeState, save_state


class StateWriter:
    """The one writer of one state file."""

    def __init__(self, loop: asyncio.AbstractEventLoop, path: Path, state: Callable[[], RuntimeState],
                 log, write: Callable[[Path, RuntimeState], None] = save_state):
        self.loop = loop
        self.path = path
        self.state = state                  # returns the current RuntimeState
        self.log = log
        self.write = write                  # runs in the executor: (path, snapshot)
        self.writes = 0                     # writes started (tests count coalescing)
        self._next: asyncio.Future | None = None   # waiters of the write not yet started
        self._scheduled = False             # a start of the next write is on the loop
        self._running: asyncio.Future | None = None   # waiters of the write in flight

    def save(self) -> asyncio.Future:
        """Ask for the current state to be written. The future resolves with None once a
        write that started after this call succeeded, or with why it failed."""
        if self._next is None:
            self._next = self.loop.create_future()
        fut = self._next
        if self._running is None and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._start)
        return fut

    async def flush(self) -> None:
        """Wait for the writes asked for so far (shutdown)."""
        while self._running is not None or self._next is not None:
            await (self._next or self._running)

    def _start(self) -> None:
        self._scheduled = False
        fut, self._next = self._next, None
        if fut is None:
            return
        self._running = fut
        self.writes += 1
        snapshot = copy.deepcopy(self.state())       # on the loop: consistent
        job = self.loop.run_in_executor(None, self.write, self.path, snapshot)
        job.add_done_callback(lambda job: self._finished(job, fut))

    def _finished(self, job: asyncio.Future, fut: asyncio.Future) -> None:
        self._running = None
        exc = job.exception()
        error = None
        if exc is not None:
            detail = (exc.strerror if isinstance(exc, OSError) and exc.strerror
                      else str(exc) or repr(exc))
            self.log.error("state_file_not_saved", path=str(self.path), error=detail)
            error = (f"state file {self.path} not saved ({detail}): the change is applied "
                     "but will not survive a restart")
        if not fut.done():
            fut.set_result(error)
        if self._next is not None and not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._start)
