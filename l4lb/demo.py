"""`l4lb demo`: three tiny line-echo backends that answer with their own name, and the
balancer (round robin) in front of them, in one process. Ctrl-C stops everything."""
from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import uvloop

from .config import parse_config
from .log import configure_logging
from .serve import serve

DEMO_CONFIG = """\
[global]
max_connections = 1000     # a demo: fits the usual open-file limit, so no fd warning
workers = 1                # one rotation to watch: each new connection, the next app

[log]
format = "console"

[control]
socket = "l4lb-demo.sock"

[listeners.demo]
bind = ["127.0.0.1:{port}"]
pool = "demo"
idle_timeout = 300.0

[pools.demo]
algorithm = "rr"
backends = [
{backends}
]
"""


class DemoBackend(asyncio.Protocol):
    """Answers every line it receives with `<name>: <line>`."""

    def __init__(self, name: str):
        self.name = name.encode()
        self.buf = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            self.transport.write(self.name + b": " + line + b"\n")


async def start_demo_backends(first_port: int, count: int = 3, host: str = "127.0.0.1"):
    """Start `count` demo backends on consecutive ports; returns the servers."""
    loop = asyncio.get_running_loop()
    servers = []
    for i in range(count):
        name = f"app{i + 1}"
        servers.append(await loop.create_server(lambda n=name: DemoBackend(n), host,
                                                first_port + i))
    return servers


def demo_config_text(port: int, backend_port: int) -> str:
    backends = ",\n".join(
        f'  {{ name = "app{i + 1}", address = "127.0.0.1:{backend_port + i}" }}'
        for i in range(3))
    return DEMO_CONFIG.format(port=port, backends=backends)


def run_demo(port: int = 8000, backend_port: int = 9001) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="l4lb-demo-"))
    path = workdir / "demo.toml"
    path.write_text(demo_config_text(port, backend_port))
    config = parse_config(path.read_text(), path)
    configure_logging(config.log.level, config.log.format)

    def ready(balancer):
        print(f"\nl4lb demo: balancing 127.0.0.1:{port} over app1..app3 "
              f"(127.0.0.1:{backend_port}-{backend_port + 2}), round robin.\n"
              f"Try:  nc 127.0.0.1 {port}     (type a line; each connection gets the next app)\n"
              f"  or: python -c \"import socket; s=socket.create_connection(('127.0.0.1', {port}));"
              f" s.sendall(b'hello\\n'); print(s.recv(100).decode())\"\n"
              f"Config: {path}\nCtrl-C stops the demo.\n", flush=True)

    async def main():
        servers = await start_demo_backends(backend_port)
        try:
            await serve(config, ready)
        finally:
            for s in servers:
                s.close()

    try:
        uvloop.run(main())
    except OSError as exc:
        print(f"l4lb demo: {exc}")
        return 1
    return 0
