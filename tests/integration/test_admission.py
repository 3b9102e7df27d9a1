"""Access control and limits through the balancer, clients bound to 127.0.0.x sources."""
import threading
import time

import pytest


from ..support import connect, name_handler, simple_config, ask, wait_until


def listener_row(lb, name="web"):
    return next(r for r in ask(lb, "show listeners")["listeners"] if r["name"] == name)


def open_conns(lb, source=None):
    """The balancer's open connections (relays), all or those of one source address."""
    return [c for c in ask(lb, "show conns")["conns"]
            if source is None or c["client"].rsplit(":", 1)[0] == source]


def counted(lb, name="web"):
    """Connections the listener has decided on: admitted plus refused for any reason."""
    row = listener_row(lb, name)
    return row["accepted"] + sum(row["rejected"].values())


def wait_rejected(lb, reason, count, timeout=10.0, name="web"):
    """The listener's rejected[reason] once it reaches `count` (or the last seen value)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = listener_row(lb, name)["rejected"].get(reason, 0)
        if seen >= count or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def served(port, source=None, timeout=5.0):
    """One line through the balancer: the backend's answer."""
    s = connect(port, source=source, timeout=timeout)
    try:
        s.sendall(b"x\n")
        return s.recv(100)
    finally:
        s.close()


def refused(port, source=None, timeout=5.0):
    """True when the balancer closes this client without serving it."""
    s = connect(port, source=source, timeout=timeout)
    try:
        s.sendall(b"x\n")
        return s.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        s.close()


def held_connection(port, source):
    """A connection that was served once and stays open."""
    s = connect(port, source=source)
    s.sendall(b"x\n")
    assert s.recv(100) == b"alpha\n"
    return s


@pytest.mark.timeout(30)
def test_longest_prefix_across_allow_and_deny_decides_and_refusals_are_counted(backends, l4lb):
    a = backends(name_handler, name="alpha")
    lb = l4lb(simple_config([("alpha", a.address)], listener_extra="""
allow = ["127.0.0.0/24", "127.0.1.7"]
deny = ["127.0.0.6", "127.0.1.0/24"]
"""))
    port = lb.port()
    assert served(port, "127.0.0.5") == b"alpha\n"       # allow /24
    assert refused(port, "127.0.0.6")                    # deny /32 inside it
    assert served(port, "127.0.1.7") == b"alpha\n"       # allow /32 inside a denied /24
    assert refused(port, "127.0.1.8")                    # deny /24
    assert refused(port, "127.0.2.1")                    # in neither, allow not empty
    assert wait_rejected(lb, "not_allowed", 1) == 1
    row = listener_row(lb)
    assert row["rejected"] == {"denied": 2, "not_allowed": 1}
    assert row["accepted"] == 2
    assert a.accepted == 2                               # refused clients cost no backend work
    closed = {ev["client"].split(":")[0]: ev["reason"]
              for ev in lb.events_named("connection_closed")}
    assert closed["127.0.0.6"] == "denied" and closed["127.0.2.1"] == "not_allowed"


@pytest.mark.timeout(40)
def test_one_source_over_its_connection_limit_leaves_other_sources_served(backends, l4lb):
    a = backends(name_handler, name="alpha", backlog=1024)
    lb = l4lb(simple_config([("alpha", a.address)], access=False,
                            listener_extra="per_source_max_connections = 10"))
    port = lb.port()
    held = [held_connection(port, "127.0.0.5") for _ in range(10)]
    attempts = 2000
    errors = []

    def flood():
        for _ in range(attempts):
            try:
                connect(port, source="127.0.0.5", timeout=5).close()
            except OSError as exc:
                errors.append(exc)

    flooder = threading.Thread(target=flood)
    flooder.start()
    others = []
    while flooder.is_alive() or len(others) < 20:
        others.append(served(port, f"127.0.0.{6 + len(others) % 4}"))
    flooder.join()
    assert errors == []
    assert others == [b"alpha\n"] * len(others)
    assert wait_rejected(lb, "per_source_max_connections", attempts) == attempts
    for s in held:                                       # the 10 it holds keep working
        s.sendall(b"x\n")
        assert s.recv(100) == b"alpha\n"
    held.pop().close()
    wait_until(lambda: len(open_conns(lb, "127.0.0.5")) == 9, what="the closed slot freed")
    held.append(held_connection(port, "127.0.0.5"))      # a slot freed: admitted again
    assert refused(port, "127.0.0.5")
    for s in held:
        s.close()


@pytest.mark.timeout(30)
def test_per_source_rate_admits_the_rate_per_second_from_a_flooding_source(backends, l4lb):
    a = backends(name_handler, name="alpha", backlog=1024)
    lb = l4lb(simple_config([("alpha", a.address)], access=False,
                            listener_extra="per_source_rate = 50"))
    port = lb.port()

    def attempt(source="127.0.0.5"):
        connect(port, source=source, timeout=5).close()

    t0 = time.monotonic()
    for _ in range(100):                                 # spend the burst (50) first
        attempt()
    # 50 of the 100 get the burst's tokens; the bucket refills at 50/s meanwhile, so a
    # slow machine admits a few more than 50 and refuses a few fewer.
    refill = int(50 * (time.monotonic() - t0)) + 1
    rejected = wait_rejected(lb, "per_source_rate", 50 - refill)
    assert 50 - refill <= rejected <= 50
    wait_until(lambda: counted(lb) == 100, what="all 100 burst attempts counted")
    start, accepted0 = time.monotonic(), listener_row(lb)["accepted"]
    tries, per_second = 0, 500
    while time.monotonic() - start < 2.0:                # 500 attempts a second for 2 s
        attempt()
        tries += 1
        ahead = start + tries / per_second - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    wait_until(lambda: counted(lb) == 100 + tries, what="the last attempts counted")
    elapsed = time.monotonic() - start
    admitted = listener_row(lb)["accepted"] - accepted0
    assert tries >= 400                                  # far above the rate, even on a busy machine
    assert 40 <= admitted / elapsed <= 60, (admitted, elapsed, tries)
    assert served(port, "127.0.0.6") == b"alpha\n"       # another source has its own bucket


@pytest.mark.timeout(30)
def test_full_backend_queues_clients_in_order_and_times_out_the_last(backends, l4lb):
    # One worker: the queue is per worker, in arrival order within each (a slot another
    # worker frees serves that worker's queue; test_workers covers the global limit).
    a = backends(name_handler, name="alpha")
    lb = l4lb(simple_config([("alpha", a.address, {"max_connections": 2})],
                            listener_extra="queue_timeout = 2.0", global_extra="workers = 1"))
    port = lb.port()
    clients = []
    for _ in range(6):
        s = connect(port)
        s.sendall(b"x\n")
        clients.append(s)
        wait_until(lambda: len(open_conns(lb)) == len(clients),   # arrive in a known order
                   what=f"client {len(clients)} taken in")
    for s in clients[:2]:
        assert s.recv(100) == b"alpha\n"
    states = sorted(c["state"] for c in open_conns(lb))
    assert states == ["open"] * 2 + ["queued"] * 4
    assert a.accepted == 2
    for freed, served_next in ((0, 2), (1, 3), (2, 4)):  # each freed slot serves the next
        clients[freed].close()
        assert clients[served_next].recv(100) == b"alpha\n"
    last = clients[5]
    waited = time.monotonic()
    try:
        assert last.recv(100) == b""                     # closed when its wait runs out
    except ConnectionResetError:
        pass
    assert time.monotonic() - waited < 2.5
    assert wait_rejected(lb, "queue_timeout", 1) == 1
    ev = lb.wait_event("connection_closed", reason="queue_timeout")
    assert ev["backend"] is None
    assert a.accepted == 5
    for s in clients:
        s.close()


@pytest.mark.timeout(30)
def test_global_max_connections_refuses_and_counts_and_zero_means_unlimited(backends, l4lb):
    a = backends(name_handler, name="alpha")
    lb = l4lb(simple_config([("alpha", a.address)], global_extra="max_connections = 3",
                            listener_extra="max_connections = 0"))
    port = lb.port()
    held = [held_connection(port, "127.0.0.1") for _ in range(3)]
    assert refused(port)
    assert wait_rejected(lb, "global_max_connections", 1) == 1
    held.pop().close()
    wait_until(lambda: len(open_conns(lb)) == 2, what="the closed connection released")
    assert served(port) == b"alpha\n"
    for s in held:
        s.close()
    assert listener_row(lb)["rejected"] == {"global_max_connections": 1}


@pytest.mark.timeout(30)
def test_reload_changes_the_lists_and_keeps_counting_open_connections(backends, l4lb):
    a = backends(name_handler, name="alpha")
    first = simple_config([("alpha", a.address)], listener_extra="""
deny = ["127.0.0.6"]
per_source_max_connections = 2
""")
    lb = l4lb(first)
    port = lb.port()
    held = [held_connection(port, "127.0.0.5") for _ in range(2)]
    assert refused(port, "127.0.0.6")
    lb.path.write_text(first.replace('deny = ["127.0.0.6"]', 'deny = ["127.0.0.7"]'))
    assert ask(lb, "reload")["ok"]
    assert served(port, "127.0.0.6") == b"alpha\n"
    assert refused(port, "127.0.0.7")
    assert refused(port, "127.0.0.5")                    # its 2 open connections still count
    lb.path.write_text(simple_config([("alpha", a.address)]))
    assert ask(lb, "reload")["ok"]                       # no lists, no limits: no gate
    assert served(port, "127.0.0.5") == b"alpha\n"
    assert served(port, "127.0.0.7") == b"alpha\n"
    for s in held:
        s.close()
    assert listener_row(lb)["rejected"] == {"denied": 2, "per_source_max_connections": 1}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("global_limit, listener_limit, reason", [
    (2, 0, "global_max_connections"),
    (0, 2, "max_connections"),
])
def test_a_client_refused_at_a_connection_limit_gets_an_access_log_line(
        backends, l4lb, global_limit, listener_limit, reason):
    a = backends(name_handler, name="alpha")
    lb = l4lb(simple_config([("alpha", a.address)],
                            global_extra=f"max_connections = {global_limit}",
                            listener_extra=f"max_connections = {listener_limit}"))
    port = lb.port()
    held = [held_connection(port, "127.0.0.1") for _ in range(2)]
    assert refused(port, source="127.0.0.7")
    line = lb.wait_event("connection_closed", reason=reason)
    assert line["client"].startswith("127.0.0.7:") and line["listener"] == "web"
    assert line["backend"] is None and line["bytes_in"] == 0
    for s in held:
        s.close()
