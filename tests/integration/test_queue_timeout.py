"""queue_timeout is the listener's own (issue 14 item 6): two listeners sharing a pool
keep their own value, and a listener switched to another pool takes its value along.

Each backend takes one connection (max_connections = 1), so the second client queues.
A listener with queue_timeout = 0 closes a queued client at the next sweep; one with 60
keeps it queued. Before the fix the pool held one value for all its listeners (the
largest, or 5.0 for a pool no listener named in the file)."""
import socket

import pytest

from ..support import ask, backends_toml, connect, name_handler

CONFIG = """
[control]
socket = "l4lb.sock"
[listeners.fast]
bind = ["127.0.0.1:0"]
pool = "app"
queue_timeout = 0
[listeners.patient]
bind = ["127.0.0.1:0"]
pool = "app"
queue_timeout = 60
[pools.app]
algorithm = "rr"
backends = [
{app}
]
[pools.standby]
algorithm = "rr"
backends = [
{standby}
]
"""


def occupy(port: int) -> socket.socket:
    """A client that got its backend's one slot."""
    s = connect(port)
    s.sendall(b"x\n")
    assert s.recv(100).endswith(b"\n")
    return s


def closed_by_balancer(s: socket.socket) -> bool:
    """True when the balancer closes `s` (within a few seconds; False if it stays)."""
    s.settimeout(3.0)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def conn_states(lb, listener: str) -> list[str]:
    return [c["state"] for c in ask(lb, "show conns")["conns"] if c["listener"] == listener]


@pytest.mark.timeout(60)
def test_listeners_sharing_a_pool_keep_their_own_queue_timeout(backends, l4lb):
    a = backends(name_handler, name="a")
    s = backends(name_handler, name="s")
    lb = l4lb(CONFIG.format(app=backends_toml([("a", a.address, {"max_connections": 1})]),
                            standby=backends_toml([("s", s.address, {"max_connections": 1})])))
    holder = occupy(lb.port("patient"))
    waiting = connect(lb.port("patient"))                 # queues: a is full
    waiting.sendall(b"x\n")
    impatient = connect(lb.port("fast"))
    impatient.sendall(b"x\n")
    assert closed_by_balancer(impatient)                 # fast: 0 = do not queue
    assert sorted(conn_states(lb, "patient")) == ["open", "queued"]
    rows = {row["name"]: row for row in ask(lb, "show listeners")["listeners"]}
    assert rows["fast"]["rejected"].get("queue_timeout") == 1
    holder.close()
    assert waiting.recv(100) == b"a\n"                   # patient: still waiting, served
    waiting.close()


@pytest.mark.timeout(60)
def test_switch_to_a_standby_pool_keeps_the_listeners_queue_timeout(backends, l4lb):
    a = backends(name_handler, name="a")
    s = backends(name_handler, name="s")
    lb = l4lb(CONFIG.format(app=backends_toml([("a", a.address, {"max_connections": 1})]),
                            standby=backends_toml([("s", s.address, {"max_connections": 1})])))
    assert ask(lb, "switch fast standby")["ok"]
    assert ask(lb, "switch patient standby")["ok"]
    holder = occupy(lb.port("fast"))                     # s's one slot
    patient = connect(lb.port("patient"))
    patient.sendall(b"x\n")
    impatient = connect(lb.port("fast"))
    impatient.sendall(b"x\n")
    assert closed_by_balancer(impatient)                 # not the 5.0 a standby pool had
    assert conn_states(lb, "patient") == ["queued"]      # its 60 s, not 0 or 5
    holder.close()
    assert patient.recv(100) == b"s\n"
    patient.close()
