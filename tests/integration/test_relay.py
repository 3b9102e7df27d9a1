"""The byte relay end to end: real sockets on loopback, l4lb run as a subprocess."""
import hashlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from ..support import (ask, connect, echo_handler, free_port_refused, name_handler, recv_all,
                       recv_exactly, simple_config, fds_in_use, wait_stalled,
                       wait_until)

MiB = 1024 * 1024


def test_64_mib_each_way_concurrently_arrives_intact(backends, l4lb):
    b = backends(echo_handler)
    lb = l4lb(simple_config([("a", b.address)]))
    payload = os.urandom(64 * MiB)
    s = connect(lb.port(), timeout=60)
    sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
    sender.start()
    received = recv_all(s)
    sender.join()
    s.close()
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_200_concurrent_connections_of_random_sizes_all_intact(backends, l4lb):
    b1, b2 = backends(echo_handler), backends(echo_handler)
    lb = l4lb(simple_config([("a", b1.address), ("b", b2.address)]))
    port = lb.port()
    failures = []

    def one(i):
        payload = os.urandom(int.from_bytes(os.urandom(3), "big") % (2 * MiB) + 1)
        try:
            s = connect(port, timeout=60)
            t = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
            t.start()
            got = recv_all(s)
            t.join()
            s.close()
            if got != payload:
                failures.append((i, len(payload), len(got)))
        except OSError as exc:
            failures.append((i, repr(exc)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert failures == []
    assert b1.accepted + b2.accepted == 200


def test_half_close_client_still_receives_the_whole_reply(backends, l4lb):
    def digest_after_eof(conn, backend):
        h = hashlib.sha256()
        while data := conn.recv(65536):
            h.update(data)
        reply = h.hexdigest().encode() * 10000        # sent only after the client's EOF
        conn.sendall(reply)

    b = backends(digest_after_eof)
    lb = l4lb(simple_config([("a", b.address)]))
    payload = os.urandom(3 * MiB)
    s = connect(lb.port())
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    reply = recv_all(s)
    s.close()
    assert reply == hashlib.sha256(payload).hexdigest().encode() * 10000


@pytest.mark.timeout(60)
def test_a_short_request_and_reply_that_arrive_with_their_fin_are_never_stuck(backends, l4lb):
    """Small data and the FIN behind it, in both directions, as fast as they can come:
    the relay must pass on every byte and every EOF, whichever edge carried them."""
    def reply_then_close(conn, backend):
        request = recv_all(conn)                       # up to the client's FIN
        conn.sendall(b"re:" + request)
        conn.shutdown(socket.SHUT_WR)

    b = backends(reply_then_close, backlog=512)
    lb = l4lb(simple_config([("a", b.address)]))
    for round_ in range(3):
        clients = []
        for i in range(100):
            s = connect(lb.port(), timeout=10)
            s.sendall(b"q%d" % i)
            s.shutdown(socket.SHUT_WR)
            clients.append(s)
        for i, s in enumerate(clients):
            assert recv_all(s) == b"re:q%d" % i, (round_, i)
            s.close()


@pytest.mark.timeout(60)
def test_tcp_urgent_data_ends_no_read_early(backends, l4lb):
    """A read stops short at TCP's urgent mark, so a short read is no proof that the
    socket was drained (the raw relay trusts short reads, and after a FIN takes one for
    the last). The urgent byte itself is not relayed, as with HAProxy: l4lb reads the
    in-band stream only (no SO_OOBINLINE, no MSG_OOB)."""
    def echo_to_eof(conn, backend):
        conn.sendall(recv_all(conn))
        conn.shutdown(socket.SHUT_WR)

    b = backends(echo_to_eof)
    lb = l4lb(simple_config([("a", b.address)], global_extra="workers = 1"))
    worker = lb.worker_ps                        # the process that relays
    for stopped in (True, False):
        s = connect(lb.port(), timeout=10)
        wait_until(lambda: [c["state"] for c in ask(lb, "show conns")["conns"]] == ["open"],
                   what="the relay open")        # backend connected, the client read
        if stopped:
            # Stopped, l4lb finds data, urgent mark, more data and FIN in one edge.
            worker.send_signal(signal.SIGSTOP)
        try:
            s.sendall(b"a" * 100)
            time.sleep(0 if stopped else 0.05)
            s.send(b"!", socket.MSG_OOB)
            time.sleep(0 if stopped else 0.05)
            s.sendall(b"b" * 100)
            s.shutdown(socket.SHUT_WR)
            time.sleep(0.1)
        finally:
            worker.send_signal(signal.SIGCONT)
        assert recv_all(s) == b"a" * 100 + b"b" * 100, stopped
        s.close()


def test_backend_reset_midstream_closes_client_and_leaks_no_fds(backends, l4lb):
    def reset_after_some(conn, backend):
        conn.sendall(b"x" * 100000)
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()                                  # RST

    b = backends(reset_after_some)
    lb = l4lb(simple_config([("a", b.address)]))
    fds_before = fds_in_use(lb)
    for _ in range(20):
        s = connect(lb.port())
        assert len(recv_exactly(s, 100000)) == 100000
        s.sendall(b"go")
        with pytest.raises((ConnectionResetError, AssertionError)):
            assert recv_all(s) != b""                 # reset, or closed with nothing more
        s.close()
    # Each sample asks the control socket, whose own connection may still be open on
    # l4lb's side for a moment: the last sample within the deadline decides.
    deadline = time.monotonic() + 5
    while (in_use := fds_in_use(lb)) > fds_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_use <= fds_before
    reasons = {ev["reason"] for ev in lb.events_named("connection_closed")}
    assert reasons <= {"backend_reset", "closed"}


def test_refusing_backend_is_skipped_and_clients_are_served_by_the_others(backends, l4lb):
    b1, b2 = backends(name_handler, name="one"), backends(name_handler, name="two")
    dead = f"127.0.0.1:{free_port_refused()}"
    lb = l4lb(simple_config([("dead", dead), ("one", b1.address), ("two", b2.address)],
                            listener_extra="retries = 2"))
    seen = []
    for _ in range(30):
        s = connect(lb.port())
        s.sendall(b"hi\n")
        seen.append(s.recv(100).strip())
        s.close()
    assert set(seen) == {b"one", b"two"}
    failures = lb.events_named("connection_closed")
    assert all(ev["reason"] == "closed" for ev in failures)


def test_every_backend_down_closes_the_client_promptly_and_counts_it(l4lb):
    dead = [(f"d{i}", f"127.0.0.1:{free_port_refused()}") for i in range(3)]
    lb = l4lb(simple_config(dead, listener_extra="retries = 2"))
    t0 = time.monotonic()
    s = connect(lb.port())
    assert recv_all(s) == b""
    s.close()
    assert time.monotonic() - t0 < 2.0
    ev = lb.wait_event("connection_closed")
    assert ev["reason"] == "connect_refused"
    assert ev["backend"] is None


def test_slow_reader_keeps_balancer_memory_bounded_then_flows_again(backends, l4lb):
    total = 1024 * MiB
    chunk = os.urandom(MiB)

    def firehose(conn, backend):
        sent = 0
        while sent < total:
            conn.sendall(chunk)
            sent += len(chunk)
        conn.shutdown(socket.SHUT_WR)

    b = backends(firehose)
    lb = l4lb(simple_config([("a", b.address)], global_extra="workers = 1"))
    worker = lb.worker_ps                        # where the relay's buffers would grow
    rss_before = worker.memory_info().rss
    s = connect(lb.port(), timeout=60)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    wait_stalled(lb, 1)                               # read nothing while the backend pushes
    rss_stalled = worker.memory_info().rss
    received = 0
    while data := s.recv(1 << 20):
        received += len(data)
    s.close()
    assert rss_stalled - rss_before < 64 * MiB
    assert received == total


def test_idle_timeout_closes_an_idle_pair(backends, l4lb):
    b = backends(echo_handler)
    lb = l4lb(simple_config([("a", b.address)], listener_extra="idle_timeout = 1.0"))
    s = connect(lb.port())
    s.sendall(b"ping")
    assert recv_exactly(s, 4) == b"ping"
    t0 = time.monotonic()
    assert recv_all(s) == b""
    elapsed = time.monotonic() - t0
    s.close()
    assert 0.9 <= elapsed < 3.0
    assert lb.wait_event("connection_closed")["reason"] == "idle_timeout"


def test_connect_timeout_bounds_a_backend_that_never_completes_the_handshake(l4lb):
    # A listener with a full accept queue that never accepts: further SYNs are dropped,
    # so a connect to it hangs until the balancer's connect_timeout.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(blackhole.getsockname())
        fillers.append(f)
    _, ready, _ = select.select([], fillers[:1], [], 10)   # its handshake fills the queue
    assert ready, "the first filler never connected"
    addr = "%s:%d" % blackhole.getsockname()
    try:
        lb = l4lb(simple_config([("hole", addr)],
                                listener_extra="connect_timeout = 1.0\nretries = 0"))
        t0 = time.monotonic()
        s = connect(lb.port())
        assert recv_all(s) == b""
        elapsed = time.monotonic() - t0
        s.close()
        assert 0.9 <= elapsed < 3.0
        assert lb.wait_event("connection_closed")["reason"] == "connect_timeout"
    finally:
        for f in fillers:
            f.close()
        blackhole.close()


def test_bytes_sent_before_the_backend_is_up_are_delivered_first(backends, l4lb):
    b = backends(echo_handler)
    lb = l4lb(simple_config([("a", b.address)]))
    s = connect(lb.port())
    payload = os.urandom(300 * 1024)                  # more than the pending limit
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == payload
    s.close()


def test_sigterm_exits_0_within_shutdown_timeout(backends, l4lb):
    b = backends(echo_handler)
    lb = l4lb(simple_config([("a", b.address)]))
    s = connect(lb.port())
    s.sendall(b"x")
    assert s.recv(1) == b"x"
    t0 = time.monotonic()
    assert lb.stop(timeout=15) == 0
    assert time.monotonic() - t0 < 5.0 + 2.0          # shutdown_timeout = 5 in simple_config
    s.close()


def socket_buffers(local_port=None, remote_port=None):
    """[(rb, tb)] of established TCP sockets on 127.0.0.1 by `ss -tmn` (skmem rb/tb)."""
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) is not installed")
    filt = f"sport = :{local_port}" if local_port else f"dport = :{remote_port}"
    out = subprocess.run(["ss", "-tmnH", "state", "established", f"( {filt} )"],
                         capture_output=True, text=True, timeout=10).stdout
    return [(int(rb), int(tb)) for rb, tb in re.findall(r"rb(\d+),t\d+,tb(\d+)", out)]


@pytest.mark.timeout(30)
def test_rcvbuf_and_sndbuf_size_both_sockets_of_a_connection(backends, l4lb):
    b = backends(echo_handler)
    lb = l4lb(simple_config([("a", b.address)], listener_extra="rcvbuf = 100000\nsndbuf = 150000"))
    s = connect(lb.port())
    s.sendall(b"ping")
    assert recv_exactly(s, 4) == b"ping"
    # The kernel doubles what SO_RCVBUF/SO_SNDBUF ask for (its bookkeeping overhead).
    assert socket_buffers(local_port=lb.port()) == [(200000, 300000)]      # client side
    backend_port = int(b.address.rsplit(":", 1)[1])
    sides = socket_buffers(remote_port=backend_port)                         # l4lb -> backend
    assert sides == [(200000, 300000)]
    s.close()


@pytest.mark.timeout(30)
def test_a_reload_resizes_the_buffers_of_new_connections(backends, l4lb):
    b = backends(echo_handler)
    lb = l4lb(simple_config([("a", b.address)], listener_extra="rcvbuf = 100000\nsndbuf = 150000"))
    backend_port = int(b.address.rsplit(":", 1)[1])
    first = connect(lb.port())
    first.sendall(b"ping")
    assert recv_exactly(first, 4) == b"ping"
    text = lb.path.read_text()
    lb.path.write_text(text.replace("rcvbuf = 100000", "rcvbuf = 120000")
                       .replace("sndbuf = 150000", "sndbuf = 160000"))
    changes = ask(lb, "reload")["changes"]
    assert "listener web: rcvbuf 120000" in changes
    assert "listener web: sndbuf 160000" in changes
    second = connect(lb.port())
    second.sendall(b"pong")
    assert recv_exactly(second, 4) == b"pong"
    # The first connection keeps its sizes; the second has the new ones, on both sides.
    assert sorted(socket_buffers(local_port=lb.port())) == [(200000, 300000), (240000, 320000)]
    assert sorted(socket_buffers(remote_port=backend_port)) == [(200000, 300000),
                                                                  (240000, 320000)]
    # Back to autotuning: backend sockets follow; the open bind cannot, and says so.
    lb.path.write_text(text.replace("rcvbuf = 100000\n", "").replace("sndbuf = 150000\n", ""))
    changes = ask(lb, "reload")["changes"]
    assert any(c.startswith("listener web: rcvbuf 0 (autotuning) for backend sockets; "
                            "client sockets keep 120000") for c in changes), changes
    third = connect(lb.port())
    third.sendall(b"ring")
    assert recv_exactly(third, 4) == b"ring"
    assert sorted(socket_buffers(local_port=lb.port()))[-1] == (240000, 320000)
    assert len([s for s in socket_buffers(remote_port=backend_port)
                if s not in ((200000, 300000), (240000, 320000))]) == 1
    for s in (first, second, third):
        s.close()


def send_with_urgent_byte(s: socket.socket, first: bytes, second: bytes) -> None:
    """`first`, one MSG_OOB byte, `second`, then FIN."""
    s.sendall(first)
    s.send(b"!", socket.MSG_OOB)
    s.sendall(second)
    s.shutdown(socket.SHUT_WR)


def test_urgent_data_from_the_client_drops_only_the_urgent_byte(backends, l4lb):
    # The urgent byte stops splice() at its mark, which once passed for end of file:
    # the backend got the first 4 MiB and a FIN. All 8 MiB must arrive.
    first, second = os.urandom(4 * MiB), os.urandom(4 * MiB)

    def digest_handler(conn, backend):
        h, n = hashlib.sha256(), 0
        while data := conn.recv(262144):
            h.update(data)
            n += len(data)
        conn.sendall(f"{n} {h.hexdigest()}".encode())

    b = backends(digest_handler)
    lb = l4lb(simple_config([("a", b.address)]))
    s = connect(lb.port(), timeout=30)
    send_with_urgent_byte(s, first, second)
    reply = recv_all(s)
    s.close()
    assert reply == f"{8 * MiB} {hashlib.sha256(first + second).hexdigest()}".encode()
    assert lb.wait_event("connection_closed")["reason"] == "closed"


def test_urgent_data_from_the_backend_drops_only_the_urgent_byte(backends, l4lb):
    first, second = os.urandom(4 * MiB), os.urandom(4 * MiB)

    def urgent_handler(conn, backend):
        send_with_urgent_byte(conn, first, second)
        recv_all(conn)

    b = backends(urgent_handler)
    lb = l4lb(simple_config([("a", b.address)]))
    s = connect(lb.port(), timeout=30)
    received = recv_all(s)
    s.close()
    assert len(received) == 8 * MiB
    assert hashlib.sha256(received).digest() == hashlib.sha256(first + second).digest()
    assert lb.wait_event("connection_closed")["reason"] == "closed"
