"""sd_notify datagrams (l4lb.sdnotify): the text systemd parses, and a Notifier that never
raises or blocks, whether or not a manager listens."""
import os
import socket

from l4lb.sdnotify import Notifier, message, monotonic_usec


def test_message_is_key_value_lines_with_newlines_kept_out_of_values():
    assert message(ready=1, status="two\nlines") == b"READY=1\nSTATUS=two lines\n"


def test_without_notify_socket_every_call_does_nothing():
    n = Notifier({})
    assert not n.enabled
    assert n.ready("x") is False and n.reloading() is False and n.sent == 0


def test_a_path_and_an_abstract_socket_receive_the_datagrams(tmp_path):
    for address, env in ((str(tmp_path / "notify"), str(tmp_path / "notify")),
                         (f"\0l4lb-test-{os.getpid()}", f"@l4lb-test-{os.getpid()}")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(address)
            n = Notifier({"NOTIFY_SOCKET": env})
            before = monotonic_usec()
            assert n.reloading() and n.ready("serving")
            first = dict(line.split("=", 1) for line in listener.recv(4096).decode().split("\n")
                         if line)
            second = listener.recv(4096).decode()
        assert first["RELOADING"] == "1" and int(first["MONOTONIC_USEC"]) >= before
        assert "READY=1\n" in second and f"MAINPID={os.getpid()}\n" in second
        assert n.sent == 2


def test_a_manager_that_is_gone_or_full_changes_nothing(tmp_path):
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled and n.ready("x") is False and n.sent == 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "full"))
        n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "full")})
        results = [n.status("x" * 1000) for _ in range(10_000)]   # never read: it fills
        assert results[0] is True and results[-1] is False          # dropped, not blocked
