"""`backup = true` through a running balancer: the backup serves only while no other
backend of its pool is up, and `show backends` says which backends are backups."""
import pytest

from ..support import ask, hello, name_handler, simple_config


@pytest.mark.timeout(30)
def test_a_backup_serves_only_while_the_primaries_are_out(backends, l4lb):
    a = backends(name_handler, name="a")
    spare = backends(name_handler, name="spare")
    lb = l4lb(simple_config([("a", a.address), ("spare", spare.address, {"backup": "true"})]))
    port = lb.port()
    rows = {r["name"]: r for r in ask(lb, "show backends")["backends"]}
    assert (rows["a"]["backup"], rows["spare"]["backup"]) == (False, True)
    assert {hello(port) for _ in range(4)} == {"a"}
    assert ask(lb, "disable main/a")["ok"]
    assert {hello(port) for _ in range(4)} == {"spare"}
    assert ask(lb, "enable main/a")["ok"]
    assert {hello(port) for _ in range(4)} == {"a"}
