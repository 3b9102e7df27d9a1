"""`l4lb run` under an emulated systemd (issue 16, Type=notify): READY=1 only once it
serves, RELOADING=1 with MONOTONIC_USEC then READY=1 around a reload (a refused one too),
STOPPING=1 on SIGTERM, and STATUS= lines; only the master speaks."""
import signal
import socket
import time

import pytest

from ..support import L4LB, ask, connect, echo_handler, recv_exactly, simple_config


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
