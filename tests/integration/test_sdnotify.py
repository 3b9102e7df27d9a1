"""`l4lb run` under an emulated systemd (issue 16): Type=notify (READY=1 only once it
serves, RELOADING=1 with MONOTONIC_USEC then READY=1 around a reload, a refused one too,
STOPPING=1 on SIGTERM; only the master speaks) and socket activation (LISTEN_FDS)."""
import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from ..support import REPO, L4LB, ask, connect, echo_handler, recv_exactly, simple_config


def fields(datagram: bytes) -> dict:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n") if line)


def next_message(sock: socket.socket, timeout: float = 20.0) -> dict:
    sock.settimeout(timeout)
    return fields(sock.recv(4096))


@pytest.mark.timeout(90)
def test_ready_reloading_and_stopping_reach_the_notify_socket(backends, tmp_path):
    b = backends(echo_handler)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    lb = L4LB(tmp_path, simple_config([("b1", b.address)]),
              env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        ready = next_message(notify)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(lb.proc.pid)
        assert "2/2 worker(s)" in ready["STATUS"]
        lb.wait_ready()
        s = connect(lb.port())                     # READY meant: it serves, every worker
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
        s.close()
        t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lb.proc.send_signal(signal.SIGHUP)
        reloading = next_message(notify)
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) >= t0
        assert next_message(notify)["READY"] == "1"
        lb.path.write_text("this is not toml [")
        assert ask(lb, "reload")["ok"] is False        # refused: READY=1 all the same
        assert next_message(notify)["RELOADING"] == "1"
        assert next_message(notify)["READY"] == "1"
        lb.proc.send_signal(signal.SIGTERM)
        stopping = next_message(notify)
        assert stopping["STOPPING"] == "1" and "stopping" in stopping["STATUS"]
        assert lb.proc.wait(20) == 0
        notify.settimeout(0.5)
        with pytest.raises(socket.timeout):            # nothing after: workers never speak
            notify.recv(4096)
    finally:
        lb.stop()
        notify.close()


@pytest.mark.timeout(60)
def test_binds_are_taken_from_the_sockets_systemd_passes(backends, tmp_path):
    """Socket activation: a listening socket handed over as fd 3 (LISTEN_FDS=1,
    LISTEN_PID = l4lb's pid) serves the bind with its address, shared by both workers; a
    passed socket no bind names is closed with a warning. Connections made before l4lb
    started wait in that socket's queue and are served."""
    b = backends(echo_handler)
    passed = socket.socket()
    passed.bind(("127.0.0.1", 0))
    passed.listen(128)
    port = passed.getsockname()[1]
    spare = socket.socket()
    spare.bind(("127.0.0.1", 0))
    spare.listen(8)
    early = connect(port)                 # queued in the kernel before l4lb even runs
    config = simple_config([("b1", b.address)]).replace('bind = ["127.0.0.1:0"]',
                                                        f'bind = ["127.0.0.1:{port}"]')

    def as_fds_3_and_4():
        os.dup2(passed.fileno(), 3)
        os.dup2(spare.fileno(), 4)
        os.set_inheritable(3, True)
        os.set_inheritable(4, True)

    (tmp_path / "l4lb.toml").write_text(config)
    proc = subprocess.Popen(
        ["sh", "-c", f'LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=web:spare exec '
                     f'{sys.executable} -m l4lb run -c {tmp_path / "l4lb.toml"}'],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=as_fds_3_and_4, pass_fds=(3, 4))    # the copies preexec_fn made
    passed.close()                        # l4lb holds it now
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if '"event": "started"' in line:
                break
        text = "".join(lines)
        assert '"listen_fd_taken"' in text and '"listen_fds_unused"' in text, text
        early.sendall(b"early")
        assert recv_exactly(early, 5) == b"early"
        for _ in range(20):
            s = connect(port)
            s.sendall(b"x")
            assert recv_exactly(s, 1) == b"x"
            s.close()
        with pytest.raises(ConnectionRefusedError):       # the unused one was closed
            spare.close()
            connect(int(text.split('"binds": ["127.0.0.1:')[1].split('"')[0])).close()
    finally:
        early.close()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()


@pytest.mark.timeout(90)
def test_an_upgrade_tells_systemd_the_new_main_pid_then_the_new_master_is_ready(
        backends, tmp_path):
    b = backends(echo_handler)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    lb = L4LB(tmp_path, simple_config([("b1", b.address)]),
              env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    new = None
    try:
        assert next_message(notify)["READY"] == "1"
        lb.wait_ready()
        reply = ask(lb, "upgrade")
        assert reply["ok"], reply
        new = reply["pid"]
        handed = next_message(notify)              # from the old master, still the main one
        assert handed["MAINPID"] == str(new) and "upgraded" in handed["STATUS"]
        ready = next_message(notify)               # then the new one, now the main pid
        assert ready["READY"] == "1" and ready["MAINPID"] == str(new)
        assert lb.proc.wait(20) == 0               # the old master is gone: no STOPPING=1
        notify.settimeout(0.5)
        with pytest.raises(socket.timeout):
            notify.recv(4096)
        s = connect(lb.port())
        s.sendall(b"y")
        assert recv_exactly(s, 1) == b"y"
        s.close()
        os.kill(new, signal.SIGTERM)
        assert next_message(notify)["STOPPING"] == "1"
    finally:
        if new is not None:
            try:
                os.kill(new, signal.SIGTERM)
                psutil.Process(new).wait(20)
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass
            except psutil.TimeoutExpired:
                os.kill(new, signal.SIGKILL)
        lb.stop()
        notify.close()
