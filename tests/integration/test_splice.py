"""The raw-socket relay's own machinery: raw accept, pipes and their pool, send_proxy
written before splicing, fd accounting. The relay's contract itself is in test_relay.py,
the PROXY header in test_proxy_protocol.py."""
import hashlib
import os
import resource
import signal
import socket
import threading
import time

import psutil
import pytest

from l4lb.config import parse_config
from l4lb._native import max_pipes

from ..support import (ask, connect, echo_handler, name_handler, recv_all,
                       recv_exactly, simple_config, wait_stalled, wait_steady,
                       wait_until)

MiB = 1024 * 1024
# One worker: these tests count the descriptors and CPU of the one process that relays.
ONE = "workers = 1"


def pipe_fds(lb) -> int:
    folder = f"/proc/{lb.worker_ps.pid}/fd"
    n = 0
    for name in os.listdir(folder):
        try:
            n += os.readlink(f"{folder}/{name}").startswith("pipe:")
        except OSError:
            pass
    return n


def test_splice_listener_copies_short_exchanges_splices_bulk_and_shows_in_show_conns(backends, l4lb):
    b = backends(echo_handler)
    lb = l4lb(simple_config([("a", b.address)], global_extra=ONE))
    pipes_idle = pipe_fds(lb)
    s = connect(lb.port())
    s.sendall(b"ping")
    assert recv_exactly(s, 4) == b"ping"
    assert pipe_fds(lb) == pipes_idle               # a short exchange is copied: no pipes
    bulk = os.urandom(300 * 1024)                   # past the first 64 KiB: splice
    s.sendall(bulk)
    assert recv_exactly(s, len(bulk)) == bulk
    pipes = ask(lb, "show info")["pipes"]
    assert pipes["created"] >= 1                    # bulk went through a pipe
    assert pipes["used"] == 0                       # and an idle connection holds none
    assert pipe_fds(lb) == pipes_idle + 2 * pipes["free"]
    total = 4 + len(bulk)
    conns = ask(lb, "show conns")["conns"]
    assert len(conns) == 1 and conns[0]["backend"] == "a" and conns[0]["state"] == "open"
    assert conns[0]["bytes_in"] == total and conns[0]["bytes_out"] == total
    assert ask(lb, "show listeners")["listeners"][0]["splice"] is True
    s.close()
    assert wait_until(lambda: ask(lb, "show info")["conns_active"] == 0)
    assert pipe_fds(lb) == pipes_idle + 2 * ask(lb, "show info")["pipes"]["free"]
    ev = lb.wait_event("connection_closed")
    assert (ev["reason"], ev["bytes_in"], ev["bytes_out"], ev["backend"]) == (
        "closed", total, total, "a")
    backend = ask(lb, "show backends")["backends"][0]
    assert (backend["bytes_in"], backend["bytes_out"], backend["active"]) == (total, total, 0)


def test_kill_drain_and_wait_through_the_control_socket(backends, l4lb):
    b1, b2 = backends(name_handler, name="one"), backends(name_handler, name="two")
    lb = l4lb(simple_config([("one", b1.address), ("two", b2.address)], global_extra=ONE))
    clients = []
    for _ in range(4):
        s = connect(lb.port())
        s.sendall(b"hi\n")
        s.recv(100)
        clients.append(s)
    assert ask(lb, "drain main/one")["ok"]
    for _ in range(4):                               # drained: new clients avoid it
        s = connect(lb.port())
        s.sendall(b"hi\n")
        assert s.recv(100).strip() == b"two"
        s.close()
    waited = ask(lb, "wait main/one 0.3")
    assert waited["ok"] is False                     # its two clients are still open
    killed = ask(lb, "kill main/one")
    assert killed["ok"] and killed.get("closed", 2) == 2
    assert ask(lb, "wait main/one 5")["ok"] is True
    assert [c["backend"] for c in ask(lb, "show conns")["conns"]] == ["two", "two"]
    for s in clients:
        s.close()


def test_send_proxy_header_is_written_before_the_spliced_bytes(backends, l4lb):
    got = []

    def record(conn, backend):
        got.append(recv_all(conn))

    b = backends(record)
    lb = l4lb(simple_config([("a", b.address)], listener_extra='send_proxy = "v1"',
                            global_extra=ONE))
    s = connect(lb.port())
    port = s.getsockname()[1]
    s.sendall(b"payload")
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == b""
    s.close()
    assert wait_until(lambda: got)
    header, _, rest = got[0].partition(b"\r\n")
    assert header == b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d" % (port, lb.port())
    assert rest == b"payload"


def test_clients_queue_when_every_backend_is_full_and_are_served_in_turn(backends, l4lb):
    b = backends(echo_handler)
    lb = l4lb(simple_config([("a", b.address, {"max_connections": 1})],
                            listener_extra="queue_timeout = 5.0", global_extra=ONE))
    first = connect(lb.port())
    first.sendall(b"1")
    assert first.recv(1) == b"1"
    second = connect(lb.port())
    second.sendall(b"2")                             # waits in its socket while queued
    assert wait_until(lambda: any(c["state"] == "queued"
                                  for c in ask(lb, "show conns")["conns"]))
    first.close()
    assert recv_exactly(second, 1) == b"2"
    second.close()


def test_accept_pauses_on_emfile_and_resumes_without_spinning(backends, l4lb):
    b = backends(echo_handler)
    limit = 64

    def low_nofile():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    lb = l4lb(simple_config([("a", b.address)], global_extra=ONE), preexec_fn=low_nofile)
    worker = lb.worker_ps
    held = []
    try:
        for _ in range(40):                          # 6 fds per relay: far past the limit
            try:
                held.append(connect(lb.port(), timeout=2))
            except OSError:
                break
        lb.wait_event("fd_exhausted")                # accepting is paused from here on
        cpu = worker.cpu_times()
        time.sleep(1.0)                              # the window a spinning loop would burn
        cpu2 = worker.cpu_times()
        assert (cpu2.user + cpu2.system) - (cpu.user + cpu.system) < 0.5   # no spin
        lb.wait_event("fd_exhausted")                # logged once per episode
        assert len(lb.events_named("fd_exhausted")) == 1
    finally:
        for s in held:
            s.close()
    # Once the clients are gone, the listener serves again (the control socket too: it
    # shares the descriptor limit).
    assert wait_until(lambda: worker.num_fds() < limit - 10, timeout=10)
    rejected = ask(lb, "show listeners")["listeners"][0]["rejected"]
    assert rejected.get("accept_paused", 0) > 0
    s = connect(lb.port())
    s.sendall(b"again")
    assert recv_exactly(s, 5) == b"again"
    s.close()
    assert lb.proc.poll() is None


@pytest.mark.timeout(60)
def test_bytes_of_a_short_send_are_kept_when_no_pipe_can_be_made(backends, l4lb):
    """A small read's send to a full backend is short, and the rest goes into a pipe;
    when pipe2 then fails (out of descriptors) those bytes are already off the client's
    socket: they must still arrive, in order, and the connection go on."""
    go = threading.Event()

    def read_when_told(conn, backend):
        go.wait(30)
        h = hashlib.sha256()
        while data := conn.recv(65536):
            h.update(data)
        conn.sendall(h.hexdigest().encode())

    b = backends(read_when_told)
    lb = l4lb(simple_config([("a", b.address)], global_extra=ONE))
    s = connect(lb.port(), timeout=30)
    assert wait_until(lambda: b.accepted == 1)
    worker = lb.worker_ps
    wait_until(lambda: [c["state"] for c in ask(lb, "show conns")["conns"]] == ["open"],
               what="the relay open")
    _, hard = worker.rlimit(psutil.RLIMIT_NOFILE)
    worker.rlimit(psutil.RLIMIT_NOFILE, (worker.num_fds(), hard))   # no new descriptor
    payload = os.urandom(16 * MiB)
    progress = [0]

    def send_slowly():
        # 8 KiB at a time, slowly: l4lb reads each piece alone, so it copies (no pipe)
        # until the backend, which reads nothing yet, is full and a send comes up short.
        for i in range(0, len(payload), 8192):
            s.sendall(payload[i:i + 8192])
            progress[0] = i
            time.sleep(0.0005)

    sender = threading.Thread(target=send_slowly)
    sender.start()
    try:
        last, still = -1, 0
        while still < 5 and sender.is_alive():       # wait until the client is stuck
            time.sleep(0.1)
            still = still + 1 if progress[0] == last else 0
            last = progress[0]
        assert progress[0] < len(payload) - 8192     # it was stuck, not done
    finally:
        go.set()
        sender.join(30)
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == hashlib.sha256(payload).hexdigest().encode()
    s.close()
    worker.rlimit(psutil.RLIMIT_NOFILE, (hard, hard))
    assert ask(lb, "show info")["pipes"]["created"] == 0
    assert lb.proc.poll() is None


def test_the_header_peek_covers_the_longest_proxy_header_the_parser_accepts():
    from l4lb import _native
    from l4lb.proxyproto import MAX_V1, MAX_V2_LENGTH
    assert _native.SPLICE_HEADER_PEEK >= max(MAX_V1, 16 + MAX_V2_LENGTH)
    text = simple_config([("a", "127.0.0.1:9")], listener_extra="accept_proxy = true")
    assert parse_config(text, "l4lb.toml").listeners["web"].accept_proxy is True


@pytest.mark.timeout(60)
def test_pipes_are_reused_and_past_the_cap_bulk_is_copied_intact(backends, l4lb):
    """max_connections = 4 caps the pool at one pipe: of three stalled bulk streams one
    holds it, the others copy with MSG_PEEK and leave what their reader cannot take in
    the kernel. Every byte arrives in order; later transfers reuse the kept pipe."""
    size = 24 * MiB
    payload = os.urandom(MiB)

    def firehose(conn, backend):
        for _ in range(size // MiB):
            conn.sendall(payload)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)

    b = backends(firehose)
    lb = l4lb(simple_config([("a", b.address)], global_extra="max_connections = 4\n" + ONE))
    clients = [connect(lb.port(), timeout=30) for _ in range(3)]
    for s in clients:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    wait_stalled(lb, 3)                               # nobody reads: every stream stalls
    pipes = ask(lb, "show info")["pipes"]
    assert pipes["max"] == max_pipes(4) == 1
    assert pipes["used"] <= 1 and pipes["created"] <= 1
    for s in clients:
        got = bytearray()
        while len(got) < size:
            chunk = s.recv(1 << 20)
            assert chunk, len(got)
            got += chunk
        assert got == payload * (size // MiB)
        s.close()
    for _ in range(5):                                # one after another: the pipe is reused
        s = connect(lb.port(), timeout=30)
        assert len(recv_all(s)) == size
        s.close()
    pipes = ask(lb, "show info")["pipes"]
    assert pipes["created"] <= 1 and pipes["used"] == 0


def segments_received(sock) -> int:
    """tcpi_segs_in of a TCP socket (struct tcp_info, Linux 4.2+: offset 140)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 192)
    return int.from_bytes(info[140:144], "little")


@pytest.mark.timeout(30)
def test_a_reply_and_the_fin_that_came_with_it_leave_in_one_segment(backends, l4lb):
    """When the backend's FIN is in by the time its reply is read, that read is the last:
    the reply goes out with MSG_MORE and the shutdown right after puts the FIN into the
    same segment (HAProxy does the same), one packet and one wake-up less per closing
    exchange. l4lb is stopped while the backend replies and closes, so it finds both in
    one edge."""
    got, go, sent = threading.Event(), threading.Event(), threading.Event()

    def reply_and_close(conn, backend):
        conn.recv(100)
        got.set()
        go.wait(10)
        conn.sendall(b"r" * 1000)
        conn.close()
        sent.set()

    b = backends(reply_and_close)
    lb = l4lb(simple_config([("a", b.address)], global_extra=ONE))
    s = connect(lb.port(), timeout=10)
    s.sendall(b"request")
    assert got.wait(10)
    wait_steady(lambda: segments_received(s), what="every ACK in")
    worker = lb.worker_ps                        # the process that relays
    worker.send_signal(signal.SIGSTOP)
    try:
        before = segments_received(s)
        go.set()
        assert sent.wait(10)
        time.sleep(0.2)              # the reply and the FIN wait in l4lb's backend socket
    finally:
        worker.send_signal(signal.SIGCONT)
    assert recv_all(s) == b"r" * 1000
    assert segments_received(s) - before == 1
    s.close()
