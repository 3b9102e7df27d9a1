#!/usr/bin/env python3
"""A line-echo backend for load tests: every line a client sends comes back as one line.

    python loadtests/echo_server.py --port 9001                 # "hello\\n" -> "hello\\n"
    python loadtests/echo_server.py --port 9001 --name v2       # "hello\\n" -> "v2: hello\\n"

With --name, each reply carries the name as a tag, so a load generator can tell which
backend version served a request (the deploy-under-load scenarios tag backends v1, v2,
blue, green). The Locust users in locustfile.py accept both forms.

It prints one line `listening HOST:PORT` on stdout once bound (so --port 0 works: read the
port from that line), runs on uvloop when it is installed, and exits 0 on SIGTERM/SIGINT,
closing its client connections. --delay adds a fixed pause before each reply (a slow
backend for least-connections demos).
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys

MAX_LINE = 1 << 20   # a client that sends 1 MiB without a newline is cut off, not buffered forever


class LineEchoProtocol(asyncio.Protocol):
    """Echo complete lines, tagged with `prefix`; partial lines wait for the rest."""

    def __init__(self, prefix: bytes, delay: float, conns: set):
        self.prefix = prefix
        self.delay = delay
        self.conns = conns
        self.buf = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        self.conns.add(transport)

    def connection_lost(self, exc):
        self.conns.discard(self.transport)

    def data_received(self, data: bytes):
        buf = self.buf + data if self.buf else data
        end = buf.rfind(b"\n")
        if end < 0:
            if len(buf) > MAX_LINE:
                self.transport.abort()
            self.buf = buf
            return
        self.buf = buf[end + 1:]
        lines = buf[:end + 1]
        if self.prefix:
            lines = b"".join(self.prefix + line + b"\n" for line in lines.split(b"\n")[:-1])
        if self.delay:
            asyncio.get_running_loop().call_later(self.delay, self.reply, lines)
        else:
            self.transport.write(lines)

    def reply(self, lines: bytes):
        if not self.transport.is_closing():
            self.transport.write(lines)

    def eof_received(self):
        return False   # close once the client is done sending


async def serve(host: str, port: int, name: str, delay: float) -> None:
    loop = asyncio.get_running_loop()
    conns: set = set()
    prefix = (name + ": ").encode() if name else b""
    server = await loop.create_server(lambda: LineEchoProtocol(prefix, delay, conns),
                                      host, port, reuse_address=True, backlog=1024)
    bound = server.sockets[0].getsockname()
    print("listening %s:%d" % (bound[0], bound[1]), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    for t in list(conns):
        t.close()
    await server.wait_closed()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="line-echo backend for l4lb load tests")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9001, help="0 = any free port (printed)")
    ap.add_argument("--name", default="", help="tag replies as 'NAME: line' (a version name)")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each reply")
    args = ap.parse_args(argv)
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(args.host, args.port, args.name, args.delay))
    except OSError as exc:
        print("echo_server: %s" % exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
