"""Two relay 'workers' (a Hub, a listener and a pool each, on rows 0 and 1 of one shared
table) on one loop: a backend's max_connections holds across them, a client queued in
one worker is served when a connection of the other closes, and every figure sums."""
import asyncio
import socket
import threading

import pytest

from l4lb import _native

from ..support import Backend, echo_handler, wait_until

pytestmark = pytest.mark.timeout(60)


class Worker:
    """One worker's data path on `loop`: its table mapping, hub, listener and pool."""

    def __init__(self, loop, fd, row, indexes, backend):
        self.table = _native.SharedTable(fd=fd)
        self.table.set_row(row)
        self.hub = _native.Hub(loop)
        self.hub.attach(self.table)
        self.hub.follow = True
        algo = _native.LeastConn()
        algo.add("b", 1)
        algo.set_up(0, True)
        self.pool = _native.PoolRuntime("p", algo)
        self.pool.attach(self.table, indexes["pool"])
        self.target = _native.Target("p", "b", backend.host, backend.port, 0)
        self.target.attach(self.table, indexes["backend"])
        self.pool.add_target(self.target)
        self.hub.register_pool(self.pool)
        self.listener = _native.ListenerRuntime("l", self.hub)
        self.listener.attach(self.table, indexes["listener"])
        self.listener.route.pool = self.pool
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self.acceptor = _native.Acceptor(sock, self.listener)


@pytest.fixture
def two_workers():
    backend = Backend(echo_handler)
    master = _native.SharedTable(rows=2, backends=4, listeners=2, pools=2, sources=64)
    indexes = {"backend": master.alloc_backend(), "listener": master.alloc_listener(),
               "pool": master.alloc_pool()}
    published = _native.Target("p", "b", backend.host, backend.port, 0)
    published.attach(master, indexes["backend"])
    published.publish(True, 1, 2)                        # max_connections = 2
    loop = asyncio.new_event_loop()
    workers = []

    def sweep():
        for w in workers:
            w.hub.sweep()
        loop.call_later(0.05, sweep)

    def setup():
        workers.extend(Worker(loop, master.fd, row, indexes, backend) for row in range(2))
        sweep()

    ready = threading.Event()
    loop.call_soon(setup)
    loop.call_soon(ready.set)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield master, workers, published
    finally:
        def stop():
            for w in workers:
                w.hub.close_all()
                w.acceptor.close()
            loop.stop()
        loop.call_soon_threadsafe(stop)
        thread.join(10)
        loop.close()
        backend.close()


def echo(sock, data=b"ping"):
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        assert chunk
        got += chunk
    return got


def test_max_connections_hold_across_workers_and_a_queued_client_is_served_from_the_other(
        two_workers):
    master, (a, b), published = two_workers
    first = [socket.create_connection(("127.0.0.1", a.port), timeout=10) for _ in range(2)]
    try:
        for s in first:
            assert echo(s) == b"ping"
        assert published.active == 2
        late = socket.create_connection(("127.0.0.1", b.port), timeout=10)
        try:
            wait_until(lambda: b.pool.queued == 1, what="the client queued in worker 1")
            assert published.active == 2                 # never a third
            first[0].close()                             # worker 0 frees a slot
            assert echo(late) == b"ping"                 # worker 1's sweep serves it
            assert published.active == 2
            assert a.pool.queued == 0
        finally:
            late.close()
    finally:
        for s in first:
            s.close()
    wait_until(lambda: published.active == 0 and a.hub.active == 0,
               what="every relay closed")
    assert published.total == 3                          # summed over both rows
    assert a.listener.accepted == 3 and b.listener.accepted == 3
    assert master.row_figures(0)["accepted"] == 2
    assert master.row_figures(1)["accepted"] == 1
    assert a.hub.total == 3
