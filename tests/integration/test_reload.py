"""reload (command and SIGHUP) and runtime state that survives reloads and restarts."""
import signal
import threading
import time


from ..support import L4LB, backends_toml, connect, echo_handler, name_handler, hello, ask


def config(backends, listener_extra=""):
    return f"""
[global]
shutdown_timeout = 2.0
[listeners.web]
bind = ["127.0.0.1:0"]
pool = "main"
{listener_extra}
[pools.main]
algorithm = "rr"
backends = [
{backends_toml(backends)}
]
"""




def test_broken_reload_changes_nothing_and_serving_goes_on(backends, l4lb):
    a = backends(name_handler, name="a")
    lb = l4lb(config([("a", a.address)]))
    good = lb.path.read_text()
    lb.path.write_text(good.replace('algorithm = "rr"', 'algorithm = "rr"\nwieght = 3'))
    reply = ask(lb, "reload")
    assert reply["ok"] is False
    assert "pools.main.wieght" in reply["error"] and "nothing changed" in reply["error"]
    assert lb.wait_event("config_rejected")
    assert hello(lb.port()) == "a"
    lb.proc.send_signal(signal.SIGHUP)                    # the same through SIGHUP
    time.sleep(0.5)
    assert len(lb.events_named("config_rejected")) == 2
    assert lb.proc.poll() is None and hello(lb.port()) == "a"


def test_reload_adding_a_backend_puts_it_in_rotation_without_dropping_a_connection(
        backends, l4lb):
    a, b = backends(echo_handler, name="a"), backends(name_handler, name="b")
    lb = l4lb(config([("a", a.address)]))
    stream = connect(lb.port())
    stop = threading.Event()
    errors = []

    def keep_talking():
        i = 0
        while not stop.is_set():
            msg = f"{i}\n".encode()
            try:
                stream.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    got += stream.recv(100)
                if got != msg:
                    errors.append(got)
            except OSError as exc:
                errors.append(exc)
                return
            i += 1
            time.sleep(0.01)

    t = threading.Thread(target=keep_talking)
    t.start()
    lb.path.write_text(config([("a", a.address), ("b", b.address)]))
    reply = ask(lb, "reload")
    assert reply["ok"] is True and "backend main/b added" in reply["changes"]
    seen = set()
    for _ in range(6):
        s = connect(lb.port())
        s.sendall(b"hi\n")
        seen.add(s.recv(100))
        s.close()
    assert b"b\n" in seen and b"hi\n" in seen
    stop.set()
    t.join(5)
    stream.close()
    assert errors == []


def test_reload_removing_a_backend_lets_its_connections_finish(backends, l4lb):
    a, b = backends(echo_handler, name="a"), backends(echo_handler, name="b")
    lb = l4lb(config([("a", a.address), ("b", b.address)]))
    held = [connect(lb.port()) for _ in range(2)]
    for s in held:
        s.sendall(b"x")
        assert s.recv(1) == b"x"
    lb.path.write_text(config([("a", a.address)]))
    assert "backend main/b removed" in ask(lb, "reload")["changes"]
    for s in held:                                          # both still flow
        s.sendall(b"y")
        assert s.recv(1) == b"y"
        s.close()
    assert [r["name"] for r in ask(lb, "show backends")["backends"]] == ["a"]


def test_reload_changes_listener_settings_and_binds_in_place(backends, l4lb):
    a = backends(name_handler, name="a")
    lb = l4lb(config([("a", a.address)]))
    text = lb.path.read_text().replace('bind = ["127.0.0.1:0"]',
                                       'bind = ["127.0.0.1:0", "127.0.0.2:0"]')
    lb.path.write_text(text)
    reply = ask(lb, "reload")
    assert any("127.0.0.2:0 opened" in c for c in reply["changes"])
    port2 = lb.wait_event("listener_started", bind="127.0.0.2:0")["port"]
    assert hello(lb.port()) == "a"
    assert hello(port2, host="127.0.0.2") == "a"



def test_runtime_changes_survive_reload_and_restart(backends, l4lb, tmp_path):
    a, b, c = (backends(name_handler, name=n) for n in "abc")
    lb = l4lb(config([("a", a.address), ("b", b.address)]))
    ask(lb, "disable main/a")
    ask(lb, "weight main/b 7")
    ask(lb, f"add main c {c.address}")
    assert ask(lb, "reload")["ok"]
    rows = {r["name"]: r for r in ask(lb, "show backends")["backends"]}
    assert rows["a"]["state"] == "maint" and rows["b"]["weight"] == 7 and "c" in rows
    assert lb.stop() == 0
    again = L4LB(tmp_path, lb.path.read_text()).wait_ready()
    try:
        rows = {r["name"]: r for r in ask(again, "show backends")["backends"]}
        assert rows["a"]["state"] == "maint"
        assert rows["b"]["weight"] == 7
        assert rows["c"]["address"] == c.address
        assert {hello(again.port()) for _ in range(6)} == {"b", "c"}
    finally:
        again.stop()


def test_corrupt_state_file_is_reported_and_ignored(backends, tmp_path):
    a = backends(name_handler, name="a")
    (tmp_path / "l4lb.state.toml").write_text("this is [not toml")
    lb = L4LB(tmp_path, config([("a", a.address)])).wait_ready()
    try:
        ev = lb.wait_event("state_file_ignored")
        assert "l4lb.state.toml" in ev["path"]
        assert hello(lb.port()) == "a"
    finally:
        lb.stop()
