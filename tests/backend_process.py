"""A backend as a separate process, so a test can kill it (SIGKILL: a crash) and start it
again on the same port — what threads in the test process cannot do.

Run as a script: `python tests/backend_process.py NAME [PORT]`. It listens on
127.0.0.1:PORT (0 = any; SO_REUSEADDR so a restart can take the same port while old
connections sit in TIME_WAIT), prints `listening PORT` once it accepts, and answers each
line it receives with `NAME:LINE`.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

SCRIPT = Path(__file__).resolve()


def serve_line(conn: socket.socket, name: bytes) -> None:
    buf = b""
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                conn.sendall(name + b":" + line + b"\n")
    except OSError:
        pass
    finally:
        conn.close()


def main(argv: list[str]) -> None:
    name = argv[0].encode()
    port = int(argv[1]) if len(argv) > 1 else 0
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(512)
    print(f"listening {sock.getsockname()[1]}", flush=True)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve_line, args=(conn, name), daemon=True).start()


class BackendProcess:
    """`backend_process.py NAME PORT` as a child process; `kill` then `start` again keeps
    the port."""

    def __init__(self, name: str, port: int = 0):
        self.name = name
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "BackendProcess":
        """Start it and return once it is listening."""
        self.proc = subprocess.Popen([sys.executable, str(SCRIPT), self.name, str(self.port)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     text=True)
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


if __name__ == "__main__":
    main(sys.argv[1:])
