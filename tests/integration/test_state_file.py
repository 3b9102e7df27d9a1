"""A state file with bad entries, or planted by another user, never stops l4lb: the bad
entries are logged and skipped, the rest applies; a planted file is logged and ignored."""
import os

from ..support import L4LB, ask, name_handler, simple_config


def test_out_of_range_state_entries_are_logged_and_skipped_the_rest_applies(backends, tmp_path):
    a = backends(name_handler, name="a")
    b = backends(name_handler, name="b")
    (tmp_path / "l4lb.state.toml").write_text(
        'version = 1\n'
        '[backends."main/a"]\nweight = inf\n'
        '[backends."main/b"]\nstate = "maint"\n'
        '[added."main/x y"]\naddress = "127.0.0.1:9"\n'
        '[added."main/c"]\naddress = "127.0.0.1:9"\nweight = 99999\n')
    lb = L4LB(tmp_path, simple_config([("a", a.address), ("b", b.address)])).wait_ready()
    try:
        rows = {r["name"]: r for r in ask(lb, "show backends")["backends"]}
        assert set(rows) == {"a", "b"}
        assert rows["a"]["weight"] == 1 and rows["b"]["state"] == "maint"
        ignored = {(ev["section"], ev["key"]) for ev in lb.events_named("state_entry_ignored")}
        assert ignored == {("backends", "main/a"), ("added", "main/x y"), ("added", "main/c")}
    finally:
        assert lb.stop() == 0


def test_a_state_file_another_user_wrote_is_logged_and_ignored(backends, tmp_path):
    a = backends(name_handler, name="a")
    planted = tmp_path / "l4lb.state.toml"
    planted.write_text('version = 1\n[backends."main/a"]\nstate = "maint"\n')
    os.chown(planted, 65534, -1)
    lb = L4LB(tmp_path, simple_config([("a", a.address)])).wait_ready()
    try:
        ev = lb.wait_event("state_file_ignored")
        assert "owned by uid 65534" in ev["error"]
        [row] = ask(lb, "show backends")["backends"]
        assert row["state"] == "up"
    finally:
        assert lb.stop() == 0


def test_a_deploys_maint_is_shown_kept_across_a_restart_and_an_operators_is_not_marked(
        backends, tmp_path):
    a = backends(name_handler, name="a")
    b = backends(name_handler, name="b")
    cfg = simple_config([("a", a.address), ("b", b.address)])
    lb = L4LB(tmp_path, cfg).wait_ready()
    try:
        assert ask(lb, "disable main/a by deploy")["ok"]
        assert ask(lb, "disable main/b")["ok"]
        assert not ask(lb, "drain main/b by someone")["ok"]
        rows = {r["name"]: r for r in ask(lb, "show backends")["backends"]}
        assert (rows["a"]["set_by"], rows["b"]["set_by"]) == ("deploy", "operator")
    finally:
        assert lb.stop() == 0
    lb = L4LB(tmp_path, cfg).wait_ready()
    try:
        rows = {r["name"]: r for r in ask(lb, "show backends")["backends"]}
        assert (rows["a"]["state"], rows["a"]["set_by"]) == ("maint", "deploy")
        assert (rows["b"]["state"], rows["b"]["set_by"]) == ("maint", "operator")
        assert ask(lb, "enable main/a")["ok"]
        assert next(r for r in ask(lb, "show backends")["backends"]
                    if r["name"] == "a")["set_by"] is None
    finally:
        assert lb.stop() == 0
