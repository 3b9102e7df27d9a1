"""Every command's reply has exactly the fields its CommandSpec declares — the fields
docs/REFERENCE.md lists — on a running balancer."""
from l4lb.control.client import call
from l4lb.control.protocol import COMMANDS_BY_NAME

from ..support import backends_toml, connect, echo_handler, free_port_refused, recv_exactly


def check(reply: dict, name: str) -> None:
    spec = COMMANDS_BY_NAME[name]
    assert reply["ok"], reply
    assert set(reply) - {"ok"} == set(spec.reply), name
    if spec.rows:
        rows = reply[spec.reply[0]]
        assert rows, f"{name}: no rows to check"
        for row in rows:
            assert set(row) == set(spec.rows), f"{name}: {sorted(set(row) ^ set(spec.rows))}"


def test_replies_carry_the_declared_fields(l4lb, backends, tmp_path):
    b1 = backends(echo_handler, "b1")
    lb = l4lb(f"""
[control]
socket = "l4lb.sock"
[listeners.web]
bind = ["127.0.0.1:0"]
pool = "blue"
[pools.blue]
algorithm = "rr"
backends = [
{backends_toml([("b1", b1.address)])}
]
[pools.green]
algorithm = "rr"
backends = [
{backends_toml([("g1", b1.address)])}
]
""")
    sock = tmp_path / "l4lb.sock"

    def ask(line):
        return call(sock, line, timeout=10)

    held = connect(lb.port())
    held.sendall(b"x")
    recv_exactly(held, 1)
    for name, line in [
        ("help", "help"), ("show info", "show info"), ("show listeners", "show listeners"),
        ("show backends", "show backends"), ("show conns", "show conns"),
        ("drain", "drain blue/b1"), ("enable", "enable blue/b1"),
        ("disable", "disable green/g1"), ("weight", "weight blue/b1 5"),
        ("kill", "kill blue/b1"), ("wait", "wait blue/b1 5"),
        ("add", f"add blue b9 127.0.0.1:{free_port_refused()} weight 2"),
        ("remove", "remove blue/b9"), ("switch", "switch web green"),
        ("split", "split web blue=50 green=50"), ("reload", "reload"),
    ]:
        check(ask(line), name)
    held.close()
    check(ask("shutdown 1"), "shutdown")
    assert lb.proc.wait(15) == 0
