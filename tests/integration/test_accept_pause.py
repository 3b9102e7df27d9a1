"""Acceptor.pause: accepting stops for a moment (clients wait in the kernel backlog, they
are not refused) and resumes on its own; closing it closes the listening socket."""
import asyncio
import socket
import time

import uvloop

from l4lb import _native
from l4lb.listen import open_listening_socket
from l4lb.config import Address


async def greeter() -> tuple:
    """A backend on the loop that says `hi` and closes; (server, port)."""
    async def greet(reader, writer):
        writer.write(b"hi")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def relay_to(hub, port: int):
    """A ListenerRuntime whose one pool holds one backend at 127.0.0.1:port."""
    algo = _native.RoundRobin()
    slot = algo.add("b", 1)
    algo.set_up(slot, True)
    pool = _native.PoolRuntime("p", algo)
    pool.add_target(_native.Target("p", "b", "127.0.0.1", port, slot))
    listener = _native.ListenerRuntime("web", hub)
    listener.route.pool = pool
    return listener


def test_paused_acceptor_keeps_clients_in_the_backlog_and_serves_them_on_resume():
    async def scenario():
        loop = asyncio.get_running_loop()
        backend, backend_port = await greeter()
        hub = _native.Hub(loop)
        sock = open_listening_socket(Address("127.0.0.1", 0))
        port = sock.getsockname()[1]
        acceptor = _native.Acceptor(sock, relay_to(hub, backend_port))
        try:
            assert acceptor.pause(0.5) is True
            assert acceptor.pause(0.5) is False           # already paused
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(2), 5) == b"hi"
            waited = time.monotonic() - t0
            writer.close()
            assert waited >= 0.4                           # served only after the pause
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(2), 5) == b"hi"   # resumed for good
            writer.close()
        finally:
            acceptor.close()
            hub.close_all()
            backend.close()
        assert sock.fileno() == -1
        probe = socket.socket()
        try:
            assert probe.connect_ex(("127.0.0.1", port)) != 0          # nothing listens
        finally:
            probe.close()

    uvloop.run(scenario())
