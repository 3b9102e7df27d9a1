"""Listeners: several per config, IPv4 and IPv6, and accept that never crashes."""
import resource
import socket
import time

import pytest

from l4lb.control.client import ControlClientError

from ..support import ask, backends_toml, connect, name_handler, wait_steady, wait_until


def listener_active(lb, name="web"):
    """The listener's open connections, or None while the balancer cannot answer (it
    may be out of descriptors)."""
    try:
        rows = ask(lb, "show listeners")["listeners"]
    except ControlClientError:
        return None
    return next(r["active"] for r in rows if r["name"] == name)


def has_ipv6_loopback() -> bool:
    try:
        s = socket.socket(socket.AF_INET6)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


def test_several_listeners_and_binds_route_to_their_pools(backends, l4lb):
    a, b = backends(name_handler, name="alpha"), backends(name_handler, name="beta")
    binds = '"127.0.0.1:0", "[::1]:0"' if has_ipv6_loopback() else '"127.0.0.1:0", "127.0.0.2:0"'
    lb = l4lb(f"""
[listeners.one]
bind = [{binds}]
pool = "pa"
[listeners.two]
bind = ["127.0.0.1:0"]
pool = "pb"
[pools.pa]
algorithm = "rr"
backends = [{backends_toml([("alpha", a.address)], indent="")}]
[pools.pb]
algorithm = "rr"
backends = [{backends_toml([("beta", b.address)], indent="")}]
""")
    hosts = [ev["bind"] for ev in lb.events_named("listener_started") if ev["listener"] == "one"]
    assert len(lb.ports["one"]) == 2
    for bind, port in zip(hosts, lb.ports["one"]):
        host = bind.rsplit(":", 1)[0].strip("[]")
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(b"x\n")
        assert s.recv(100) == b"alpha\n"
        s.close()
    s = connect(lb.port("two"))
    s.sendall(b"x\n")
    assert s.recv(100) == b"beta\n"
    s.close()


def test_listener_max_connections_closes_extra_clients_at_once_and_counts_them(backends, l4lb):
    a = backends(name_handler, name="alpha")
    lb = l4lb(f"""
[listeners.web]
bind = ["127.0.0.1:0"]
pool = "p"
max_connections = 3
[pools.p]
algorithm = "rr"
backends = [{backends_toml([("alpha", a.address)], indent="")}]
""")
    held = []
    for _ in range(3):
        s = connect(lb.port())
        s.sendall(b"x\n")
        assert s.recv(100) == b"alpha\n"
        held.append(s)
    extra = connect(lb.port())
    with pytest.raises(ConnectionResetError):
        extra.sendall(b"x\n")
        if extra.recv(100) == b"":
            raise ConnectionResetError
    extra.close()
    for s in held:
        s.close()
    wait_until(lambda: listener_active(lb) == 0, what="the held connections closed")
    s = connect(lb.port())                             # room again
    s.sendall(b"x\n")
    assert s.recv(100) == b"alpha\n"
    s.close()


@pytest.mark.timeout(60)
def test_fd_exhaustion_refuses_cleanly_and_serves_again(backends, l4lb):
    a = backends(name_handler, name="alpha", backlog=1024)

    def low_fd_limit():                                  # `ulimit -n 256`
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    lb = l4lb(f"""
[global]
workers = 1
[listeners.web]
bind = ["127.0.0.1:0"]
pool = "p"
[pools.p]
algorithm = "rr"
backends = [{backends_toml([("alpha", a.address)], indent="")}]
""", preexec_fn=low_fd_limit)
    worker = lb.worker_ps                                # the workers inherit the limit
    held = []
    for _ in range(1000):
        try:
            s = connect(lb.port(), timeout=2)
            held.append(s)
        except OSError:
            pass
    # The flood is taken in (or dropped) once l4lb's descriptors and backend connects stop
    # changing; then nothing it did may have crashed it or blamed the backend.
    wait_steady(lambda: (worker.num_fds(), a.accepted), what="the flood taken in")
    assert lb.proc.poll() is None
    # Which runs out first is a race: an accept (libuv then accepts and closes with its
    # reserved descriptor, unseen by l4lb) or a backend connect (l4lb refuses that client,
    # pauses accepting for a moment and says so, once per episode).
    exhausted = lb.events_named("fd_exhausted")
    assert len(exhausted) <= 1
    if exhausted:
        assert exhausted[0]["paused"] == ["web"]
    reasons = {ev["reason"] for ev in lb.events_named("connection_closed")}
    assert reasons <= {"closed", "fd_exhausted"}      # the backend is never blamed
    for s in held:
        s.close()
    wait_until(lambda: listener_active(lb) == 0, what="the flood's connections closed")
    for _ in range(5):
        s = connect(lb.port())
        s.sendall(b"x\n")
        assert s.recv(100) == b"alpha\n"
        s.close()
    assert lb.proc.poll() is None
