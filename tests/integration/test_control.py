"""The control socket and `l4lb ctl` against a running balancer (real sockets)."""
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest

from l4lb.control.client import call

from ..support import (REPO, L4LB, connect, name_handler, hello, ask, two_pool_config,
                       wait_until)


def backend_active(lb, pool, name):
    """The `active` count of backend POOL/NAME in `show backends`."""
    return next(r["active"] for r in ask(lb, f"show backends {pool}")["backends"]
                if r["name"] == name)





def ctl(lb, *words, json_out=False):
    args = [sys.executable, "-m", "l4lb", "ctl", "-s", str(lb.path.parent / "l4lb.sock")]
    if json_out:
        args.append("--json")
    return subprocess.run(args + list(words), cwd=REPO, capture_output=True, text=True,
                          timeout=30)


@pytest.fixture
def blue_green(backends, l4lb):
    b1, b2 = backends(name_handler, name="b1"), backends(name_handler, name="b2")
    g1 = backends(name_handler, name="g1")
    lb = l4lb(two_pool_config([("b1", b1.address), ("b2", b2.address)],
                              [("g1", g1.address)], mode=0o640))
    return lb, (b1, b2, g1)


def test_socket_is_created_with_the_configured_mode(blue_green):
    lb, _ = blue_green
    mode = stat.S_IMODE(os.stat(lb.path.parent / "l4lb.sock").st_mode)
    assert mode == 0o640


def test_show_commands_reply_with_their_rows(blue_green):
    lb, _ = blue_green
    hello(lb.port())
    rows = ask(lb, "show backends")["backends"]
    assert [(r["pool"], r["name"], r["state"]) for r in rows] == [
        ("blue", "b1", "up"), ("blue", "b2", "up"), ("green", "g1", "up")]
    assert {"address", "weight", "active", "total", "failed", "bytes_in", "bytes_out",
            "health", "rt_ms"} <= set(rows[0])
    assert sum(r["total"] for r in rows) == 1
    assert ask(lb, "show backends green")["backends"][0]["name"] == "g1"
    info = ask(lb, "show info")
    assert info["ok"] and info["pid"] == lb.proc.pid and info["conns_total"] >= 1
    listeners = ask(lb, "show listeners")["listeners"]
    assert listeners[0]["name"] == "web" and listeners[0]["pool"] == "blue"
    assert "show backends [POOL]" in " ".join(ask(lb, "help")["commands"])


def test_show_conns_lists_open_connections(blue_green):
    lb, _ = blue_green
    s = connect(lb.port())
    s.sendall(b"hi\n")
    s.recv(100)
    conns = ask(lb, "show conns blue")["conns"]
    assert len(conns) == 1 and conns[0]["pool"] == "blue" and conns[0]["bytes_in"] == 3
    assert conns[0]["client"] == "%s:%d" % s.getsockname()
    assert ask(lb, "show conns green")["conns"] == []
    s.close()


@pytest.mark.parametrize("line, message", [
    ("enable nopool/b1", "unknown pool 'nopool'"),
    ("drain blue/nobody", "unknown backend 'blue/nobody'"),
    ("weight blue/b1 -3", "weight"),
    ("weight blue/b1 10001", "weight"),
    ("split web blue=70 green=20", "100"),
    ("split nolistener blue=50 green=50", "unknown listener 'nolistener'"),
    ("switch web nopool", "unknown pool 'nopool'"),
    ("frobnicate", "unknown command"),
    ("show backends nopool", "unknown pool 'nopool'"),
])
def test_bad_commands_get_an_error_reply(blue_green, line, message):
    lb, _ = blue_green
    reply = ask(lb, line)
    assert reply["ok"] is False
    assert message in reply["error"]


def test_oversized_line_and_bad_utf8_get_errors_and_the_connection_goes_on(blue_green):
    lb, _ = blue_green
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(str(lb.path.parent / "l4lb.sock"))
    s.sendall(b"x" * 70000 + b"\n" + b"show \xff\xfe\n" + b"show info\n")
    f = s.makefile("rb")
    replies = [json.loads(f.readline()) for _ in range(3)]
    s.close()
    assert replies[0]["ok"] is False and "65536" in replies[0]["error"]
    assert replies[1]["ok"] is False and "UTF-8" in replies[1]["error"]
    assert replies[2]["ok"] is True
    assert lb.proc.poll() is None


def test_ctl_prints_a_table_and_json_and_exits_1_on_error(blue_green):
    lb, _ = blue_green
    out = ctl(lb, "show", "backends")
    assert out.returncode == 0
    assert out.stdout.splitlines()[0].split()[:4] == ["POOL", "NAME", "ADDRESS", "STATE"]
    out = ctl(lb, "show", "info", json_out=True)
    assert out.returncode == 0 and json.loads(out.stdout)["ok"] is True
    out = ctl(lb, "drain", "blue/zzz")
    assert out.returncode == 1 and "unknown backend" in out.stdout


def test_drain_stops_new_picks_but_keeps_existing_connections(blue_green):
    lb, _ = blue_green
    held = connect(lb.port())
    held.sendall(b"x\n")
    first = held.recv(100).strip().decode()
    assert ask(lb, f"drain blue/{first}")["state"] == "draining"
    assert {hello(lb.port()) for _ in range(6)} == {"b1", "b2"} - {first}
    held.sendall(b"y\n")
    assert held.recv(100).strip().decode() == first     # the old connection still works
    held.close()


def test_wait_returns_only_when_the_last_connection_has_closed(blue_green):
    lb, _ = blue_green
    held = []
    while len(held) < 2:
        s = connect(lb.port())
        s.sendall(b"x\n")
        if s.recv(100).strip() == b"b1":
            held.append(s)
        else:
            s.close()
    ask(lb, "drain blue/b1")
    assert ask(lb, "wait blue/b1 0.5")["ok"] is False
    result = {}
    t = threading.Thread(target=lambda: result.update(ask(lb, "wait blue/b1 20")))
    t.start()
    # A pending wait shows nowhere; this pause only lets the close below find the wait
    # already waiting (the assertions hold either way, a late wait just tests less).
    time.sleep(0.5)
    held[0].close()
    wait_until(lambda: backend_active(lb, "blue", "b1") == 1, what="the first close seen")
    time.sleep(0.5)                                      # far longer than a wake-up takes
    assert not result                                    # one connection is still open
    t_closed = time.monotonic()
    held[1].close()
    t.join(10)
    assert result["ok"] is True
    assert time.monotonic() - t_closed < 2.0


def test_kill_closes_a_backends_connections(blue_green):
    lb, _ = blue_green
    s = connect(lb.port())
    s.sendall(b"x\n")
    name = s.recv(100).strip().decode()
    assert ask(lb, f"kill blue/{name}")["closed"] == 1
    assert s.recv(100) == b""
    s.close()


def test_weight_zero_and_disable_take_a_backend_out_of_rotation(blue_green):
    lb, _ = blue_green
    ask(lb, "weight blue/b1 0")
    assert {hello(lb.port()) for _ in range(4)} == {"b2"}
    ask(lb, "weight blue/b1 1")
    ask(lb, "disable blue/b2")
    assert {hello(lb.port()) for _ in range(4)} == {"b1"}
    ask(lb, "enable blue/b2")
    assert {hello(lb.port()) for _ in range(4)} == {"b1", "b2"}


def test_add_and_remove_backends(blue_green, backends):
    lb, _ = blue_green
    b3 = backends(name_handler, name="b3")
    reply = ask(lb, f"add blue b3 {b3.address} weight 1")
    assert reply["ok"] and reply["state"] == "up"
    assert "b3" in {hello(lb.port()) for _ in range(6)}
    held = connect(lb.port())
    held.sendall(b"x\n")
    name = held.recv(100).strip().decode()
    refused = ask(lb, f"remove blue/{name}")
    assert refused["ok"] is False and "active" in refused["error"]
    held.close()
    wait_until(lambda: backend_active(lb, "blue", name) == 0, what="the held connection closed")
    assert ask(lb, f"remove blue/{name}")["ok"] is True
    assert name not in {hello(lb.port()) for _ in range(6)}


def test_switch_sends_every_new_connection_to_the_other_pool(blue_green):
    lb, _ = blue_green
    held = connect(lb.port())
    held.sendall(b"x\n")
    assert held.recv(100).strip() in (b"b1", b"b2")
    assert ask(lb, "switch web green")["previous"] == {"pool": "blue"}
    assert {hello(lb.port()) for _ in range(6)} == {"g1"}
    held.sendall(b"y\n")
    assert held.recv(100).strip() in (b"b1", b"b2")          # blue's stream goes on
    held.close()


def test_canary_split_shares_by_percentage_and_each_source_stays_on_one_side(blue_green):
    lb, _ = blue_green
    assert ask(lb, "split web blue=80 green=20")["ok"]
    sides = {}
    green = 0
    for i in range(2000):
        source = f"127.0.{1 + i % 100 // 250}.{2 + i % 100}"
        reply = hello(lb.port(), source=source)
        side = "green" if reply == "g1" else "blue"
        green += side == "green"
        sides.setdefault(source, set()).add(side)
    assert all(len(s) == 1 for s in sides.values())
    assert 0.15 <= green / 2000 <= 0.25


def test_shutdown_command_stops_the_balancer_gracefully(blue_green):
    lb, _ = blue_green
    assert ask(lb, "shutdown 1")["ok"]
    assert lb.proc.wait(10) == 0
    assert not (lb.path.parent / "l4lb.sock").exists()


def test_second_instance_on_a_live_socket_is_refused_and_a_stale_one_replaced(
        blue_green, tmp_path, backends):
    lb, (b1, _, _) = blue_green
    second = L4LB(tmp_path, lb.path.read_text(), name="again.toml")
    try:
        assert second.proc.wait(15) == 1
        assert "another l4lb is running" in "".join(second.raw)
    finally:
        second.stop()
    # A stale socket file (its process was killed) is replaced on the next start.
    lb.proc.kill()
    lb.proc.wait(5)
    assert (lb.path.parent / "l4lb.sock").exists()
    third = L4LB(tmp_path, lb.path.read_text(), name="third.toml").wait_ready()
    try:
        assert call(tmp_path / "l4lb.sock", "show info")["pid"] == third.proc.pid
    finally:
        third.stop()
