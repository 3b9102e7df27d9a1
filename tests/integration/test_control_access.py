"""Who may use the control socket: its mode from the moment it exists, and what
`l4lb ctl` says to someone the mode keeps out."""
import io
import os
import shutil
import socket
import stat
import sys
import tempfile
from pathlib import Path

import pytest

import l4lb.cli
import l4lb.control.client  # noqa: F401 - imported before fork: cli imports it lazily
from l4lb.control import server as control_server

from ..support import L4LB, simple_config

NOBODY = 65534


def test_socket_has_its_mode_before_it_is_listened_on(tmp_path, monkeypatch):
    seen = {}
    path = tmp_path / "c.sock"

    class WatchedSocket(socket.socket):
        def bind(self, address):
            super().bind(address)
            seen["bind"] = stat.S_IMODE(os.stat(address).st_mode)

        def listen(self, *args):
            seen["listen"] = stat.S_IMODE(os.stat(path).st_mode)
            super().listen(*args)

    monkeypatch.setattr(control_server.socket, "socket", WatchedSocket)
    old_umask = os.umask(0)                          # the most open umask a user could have
    try:
        sock = control_server.open_control_socket(path, 0o600)
    finally:
        os.umask(old_umask)
    sock.close()
    assert seen == {"bind": 0o600, "listen": 0o600}


def run_ctl_as_nobody(sock_path: Path) -> tuple[int, str]:
    """`l4lb ctl -s SOCK show info` in a forked child running as nobody: (exit, stderr).
    Forked rather than exec'd: nobody may not be able to reach the Python binary."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:                                     # the child: never return to pytest
        code = 99
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            err = io.StringIO()
            sys.stdout, sys.stderr = io.StringIO(), err
            code = l4lb.cli.main(["ctl", "-s", str(sock_path), "show", "info"])
            os.write(write_fd, err.getvalue().encode())
        except BaseException as exc:                 # noqa: BLE001 - report, then exit
            os.write(write_fd, repr(exc).encode())
        finally:
            os._exit(code if isinstance(code, int) else 98)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        err = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


@pytest.mark.timeout(30)
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root to switch to user nobody (root ignores file modes)")
def test_ctl_reports_permission_denied_when_the_mode_keeps_the_user_out(backends):
    # A folder anyone may traverse, so that only the socket's own mode decides.
    folder = Path(tempfile.mkdtemp(prefix="l4lb-ctl-"))
    folder.chmod(0o755)
    started = []
    try:
        for mode, allowed in ((0o600, False), (0o666, True)):
            lb = L4LB(folder, simple_config([("a", "127.0.0.1:9")]).replace(
                "[control]", f"[control]\nmode = {oct(mode)}"), name=f"m{mode:o}.toml")
            started.append(lb)
            lb.wait_ready()
            sock_path = folder / "l4lb.sock"
            assert stat.S_IMODE(os.stat(sock_path).st_mode) == mode
            code, err = run_ctl_as_nobody(sock_path)
            if allowed:
                assert code == 0, err
            else:
                assert code == 1
                assert "permission denied" in err and str(sock_path) in err, err
            lb.stop()
    finally:
        for lb in started:
            lb.stop()
        shutil.rmtree(folder, ignore_errors=True)
