"""The relay's backend connect, in process on a uvloop loop: every address of a
hostname is tried in order, and a client whose backends all failed is closed with the
reason of the last failure, not `no_backend`.

The name resolution goes through loop.getaddrinfo as in production; the loop here is a
uvloop subclass whose getaddrinfo answers a few made-up names (this machine's
/etc/hosts maps no name to two addresses)."""
import asyncio
import socket
import threading

import pytest
import uvloop

from l4lb import _native
from l4lb.listen import open_listening_socket
from l4lb.config import Address

from ..support import free_port_refused

pytestmark = pytest.mark.timeout(30)

NAMES = {
    # The first address refuses (nothing listens on 127.0.0.2), the second serves.
    "dead-then-live.test": ["127.0.0.2", "127.0.0.1"],
    "both-dead.test": ["127.0.0.2", "127.0.0.3"],
}


class MadeUpNamesLoop(uvloop.Loop):
    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        if host in NAMES:
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port))
                    for ip in NAMES[host]]
        return await super().getaddrinfo(host, port, family=family, type=type,
                                          proto=proto, flags=flags)


def run(scenario):
    with asyncio.Runner(loop_factory=MadeUpNamesLoop) as runner:
        return runner.run(scenario())


async def echo_backend():
    """An echo server on 127.0.0.1 only; (server, port)."""
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


class Relaying:
    """A Hub, a listener with one pool of `targets` ((host, port) each), its Acceptor on
    127.0.0.1:0, and the access log's (relay, reason) records."""

    def __init__(self, targets, retries=2):
        loop = asyncio.get_running_loop()
        # An exception in a relay callback (a debug build's failed transition check) is
        # only logged by the loop: collect them, close() fails the test on any.
        self.errors = []
        loop.set_exception_handler(lambda loop, context: self.errors.append(context))
        self.hub = _native.Hub(loop)
        self.closed = []
        self.hub.access_log = lambda relay, reason: self.closed.append(reason)
        algo = _native.RoundRobin()
        pool = _native.PoolRuntime("p", algo)
        self.targets = []
        for k, (host, port) in enumerate(targets):
            slot = algo.add(f"b{k}", 1)
            algo.set_up(slot, True)
            target = _native.Target("p", f"b{k}", host, port, slot)
            pool.add_target(target)
            self.targets.append(target)
        self.listener = _native.ListenerRuntime("web", self.hub)
        self.listener.route.pool = pool
        self.listener.retries = retries
        sock = open_listening_socket(Address("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.acceptor = _native.Acceptor(sock, self.listener)

    async def closed_reason(self):
        while not self.closed:
            await asyncio.sleep(0.01)
        return self.closed[0]

    def close(self):
        self.acceptor.close()
        self.hub.close_all()
        assert not self.errors, self.errors


def test_a_hostname_whose_first_address_is_dead_connects_to_the_next():
    async def scenario():
        backend, port = await echo_backend()
        relaying = Relaying([("dead-then-live.test", port)])
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relaying.port)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            assert await asyncio.wait_for(relaying.closed_reason(), 10) == "closed"
            [target] = relaying.targets
            assert (target.total, target.failed) == (1, 0)    # one target, not blamed
        finally:
            relaying.close()
            backend.close()

    run(scenario)


def test_a_hostname_whose_addresses_all_refuse_is_one_failure_of_its_target():
    async def scenario():
        relaying = Relaying([("both-dead.test", free_port_refused())], retries=0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relaying.port)
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            assert await asyncio.wait_for(relaying.closed_reason(), 10) == "connect_refused"
            assert relaying.targets[0].failed == 1
        finally:
            relaying.close()

    run(scenario)


def test_a_client_whose_only_backend_refused_is_closed_as_connect_refused_not_no_backend():
    # retries = 2 with one backend: after its failure the retry finds every backend
    # avoided. The close names what happened to this client.
    async def scenario():
        relaying = Relaying([("127.0.0.1", free_port_refused())], retries=2)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", relaying.port)
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            assert await asyncio.wait_for(relaying.closed_reason(), 10) == "connect_refused"
        finally:
            relaying.close()

    run(scenario)


def test_a_backend_that_resets_right_after_accepting_is_logged_as_backend_reset():
    # Whether the reset comes before or after the relay saw its connect complete, the
    # client is told the same thing: never `no_backend` for a backend that is up.
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]

    def accept_and_reset():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            conn.close()

    thread = threading.Thread(target=accept_and_reset, daemon=True)
    thread.start()

    async def scenario():
        relaying = Relaying([("127.0.0.1", port)], retries=2)
        try:
            for _ in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", relaying.port)
                try:
                    await asyncio.wait_for(reader.read(), 10)
                except ConnectionResetError:
                    pass
                writer.close()
            while len(relaying.closed) < 20:
                await asyncio.sleep(0.01)
            assert set(relaying.closed) == {"backend_reset"}
        finally:
            relaying.close()

    try:
        run(scenario)
    finally:
        listener.shutdown(socket.SHUT_RDWR)              # wakes the blocked accept()
        listener.close()
        thread.join(timeout=5)
