"""A backend as a separate process, so a test can kill it (SIGKILL: a crash) and start it
again on the same port — what threads in the test process cannot do.

It is tests/echo_backend.py answering each line with `NAME:LINE`; the bind is retried
while the killed process's port is still being released, so a restart takes the same port.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ECHO_BACKEND = Path(__file__).resolve().parent / "echo_backend.py"


class BackendProcess:
    """An echo_backend.py child process; `kill` then `start` again keeps the port."""

    def __init__(self, name: str, port: int = 0):
        self.name = name
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "BackendProcess":
        """Start it and return once it is listening."""
        self.proc = subprocess.Popen(
            [sys.executable, str(ECHO_BACKEND), "--port", str(self.port), "--version", self.name,
             "--separator", ":", "--announce"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening "):
            self.kill()
            raise RuntimeError(f"backend {self.name} did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def kill(self) -> None:
        """SIGKILL, and wait until the process (and so its listening socket) is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)
            self.proc.stdout.close()
