"""A tiny line-echo backend process for deploy and health tests: each line comes back as
"VERSION LINE" (or VERSION, --separator, LINE), so a client can tell which version served it.

    python tests/echo_backend.py --port 9001 --version v2 [--pidfile F] [--daemon]
                                 [--lifetime S] [--separator SEP] [--announce]

--port 0 takes any free port; --announce prints `listening PORT` on stdout once it
listens (tests/backend_process.py reads it).

It writes its pid to --pidfile once it listens (so the file's pid always accepts
connections), retries the bind for a few seconds while the previous version still holds
the port, dies on SIGTERM, and exits by itself after --lifetime seconds so a test that
crashed cannot leave it behind. With --daemon it goes to the background only once it
listens, like a service manager's `restart`: when the command returns, the port is served
by the new version, never by the old one on its way out.
"""
from __future__ import annotations

import argparse
import errno
import os
import socket
import threading
import time

# How long to retry the bind while the old process on the port is still exiting.
BIND_RETRY_SECONDS = 5.0


def serve_client(conn: socket.socket, tag: bytes) -> None:
    buf = b""
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            if lines:
                conn.sendall(b"".join(tag + line + b"\n" for line in lines))
    except OSError:
        pass
    finally:
        conn.close()


def listen(host: str, port: int) -> socket.socket:
    deadline = time.monotonic() + BIND_RETRY_SECONDS
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(512)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def detach() -> None:
    """Fork; the parent exits 0, the child goes on in its own session with stdio on
    /dev/null (so it holds no pipe of whoever ran the command open)."""
    if os.fork():
        os._exit(0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--version", required=True)
    ap.add_argument("--pidfile")
    ap.add_argument("--daemon", action="store_true")
    ap.add_argument("--lifetime", type=float, default=120.0)
    ap.add_argument("--separator", default=" ")
    ap.add_argument("--announce", action="store_true")
    args = ap.parse_args()
    sock = listen(args.host, args.port)
    if args.announce:
        print(f"listening {sock.getsockname()[1]}", flush=True)
    if args.daemon:
        detach()
    threading.Timer(args.lifetime, os._exit, (0,)).start()
    if args.pidfile:
        tmp = f"{args.pidfile}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, args.pidfile)
    tag = (args.version + args.separator).encode()
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=serve_client, args=(conn, tag), daemon=True).start()


if __name__ == "__main__":
    main()
