"""The control socket under clients that misbehave (issue 20 items 9 and 10): one that
never reads its replies, many that leave a `wait` behind, and a last command without
its newline."""
import json
import shutil
import socket
import subprocess
import threading
import time

import pytest

from l4lb.control.client import ControlClientError

from ..support import ask, connect, name_handler, simple_config


def control_path(lb):
    return str(lb.path.parent / "l4lb.sock")


def open_control(lb) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(control_path(lb))     # blocking: a full backlog waits instead of EAGAIN
    s.settimeout(10)
    return s


def read_replies(s: socket.socket) -> list[dict]:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def lb(backends, l4lb):
    b1 = backends(name_handler, name="b1")
    return l4lb(simple_config([("b1", b1.address)], access=False))


@pytest.mark.timeout(30)
def test_a_last_command_without_its_newline_is_answered_at_eof(lb):
    s = open_control(lb)
    s.sendall(b"show info")
    s.shutdown(socket.SHUT_WR)
    [reply] = read_replies(s)
    s.close()
    assert reply["ok"] and reply["pid"] == lb.proc.pid
    s = open_control(lb)                      # two commands, the second unterminated
    s.sendall(b"help\r\nshow backends main")
    s.shutdown(socket.SHUT_WR)
    first, second = read_replies(s)
    s.close()
    assert first["ok"] and second["backends"][0]["name"] == "b1"
    s = open_control(lb)                      # a clean end gets no extra reply
    s.sendall(b"show info\n")
    s.shutdown(socket.SHUT_WR)
    assert len(read_replies(s)) == 1
    s.close()


@pytest.mark.timeout(30)
@pytest.mark.skipif(shutil.which("socat") is None, reason="needs socat")
def test_printf_into_socat_gets_its_reply(lb):
    out = subprocess.run(f"printf 'show info' | socat - UNIX-CONNECT:{control_path(lb)}",
                         shell=True, capture_output=True, timeout=20)
    assert json.loads(out.stdout)["ok"]


@pytest.mark.timeout(60)
def test_a_client_that_never_reads_its_replies_cannot_grow_memory(lb):
    baseline = lb.ps.memory_info().rss
    hog = open_control(lb)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    payload = b"help\n" * (4 * 1024 * 1024)              # 20 MiB of commands
    sent = [0]

    def write():
        hog.settimeout(5)                                # l4lb stops reading: give up
        view = memoryview(payload)
        try:
            while sent[0] < len(payload):
                sent[0] += hog.send(view[sent[0]:sent[0] + 65536])
        except OSError:
            pass

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    peak = baseline
    deadline = time.monotonic() + 8
    while writer.is_alive() and time.monotonic() < deadline:
        info = ask(lb, "show info")                      # others are still answered
        assert info["ok"]
        peak = max(peak, lb.ps.memory_info().rss)
        time.sleep(0.2)
    writer.join(10)
    peak = max(peak, lb.ps.memory_info().rss)
    assert sent[0] < len(payload)                        # l4lb stopped reading the hog
    assert peak - baseline < 40 * 1024 * 1024
    hog.close()
    assert ask(lb, "show info")["ok"]


@pytest.mark.timeout(60)
def test_waits_whose_clients_left_end_and_free_their_descriptors(lb):
    held = connect(lb.port())                            # b1 stays busy: a wait blocks
    held.sendall(b"hi\n")
    assert held.recv(100) == b"b1\n"
    baseline = ask(lb, "show info")["open_fds"]
    clients = []
    for _ in range(200):
        s = open_control(lb)
        s.sendall(b"wait main/b1 20\n")
        clients.append(s)
    for s in clients:
        s.close()
    deadline = time.monotonic() + 10                     # half the wait's own timeout
    while True:
        try:
            now = ask(lb, "show info")["open_fds"]
        except ControlClientError:      # the backlog is still full of the left clients
            now = baseline + 1
        if now <= baseline or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert now <= baseline, f"{now - baseline} descriptors still held by left waits"
    s = open_control(lb)                                 # a wait that stays still waits
    s.sendall(b"wait main/b1 0.5\n")
    reply = json.loads(s.recv(65536))
    s.close()
    assert not reply["ok"] and "still has 1 active" in reply["error"]
    held.close()
