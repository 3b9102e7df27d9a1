import pytest
"""PausableServer: accepting stops for a moment (clients wait in the kernel backlog, they
are not refused) and resumes on its own; closing it closes the listening socket."""
import asyncio
import socket
import time

import uvloop

from l4lb.listen import PausableServer, open_listening_socket
from l4lb.config import Address

# Every test here runs against both relays (splice = true and false).
pytestmark = pytest.mark.each_relay


class Greeter(asyncio.Protocol):
    def connection_made(self, transport):
        transport.write(b"hi")
        transport.close()


def test_paused_server_keeps_clients_in_the_backlog_and_serves_them_on_resume():
    async def scenario():
        loop = asyncio.get_running_loop()
        sock = open_listening_socket(Address("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = PausableServer(loop, sock, Greeter)
        await server.start()
        try:
            assert server.pause(0.5) is True
            assert server.pause(0.5) is False             # already paused
            t0 = time.monotonic()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(2), 5) == b"hi"
            waited = time.monotonic() - t0
            writer.close()
            assert 0.4 <= waited < 3.0                     # served only after the pause
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await asyncio.wait_for(reader.read(2), 5) == b"hi"   # resumed for good
            writer.close()
        finally:
            server.close()
        assert sock.fileno() == -1
        probe = socket.socket()
        try:
            assert probe.connect_ex(("127.0.0.1", port)) != 0          # nothing listens
        finally:
            probe.close()

    uvloop.run(scenario())
