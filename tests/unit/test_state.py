"""The state file (l4lb.state): every entry is checked by the config's and the control
commands' rules, a bad entry is skipped and reported while the rest applies, and a file
another user could have written is refused (l4lb.trust)."""
import math
import os
import socket
import stat

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb import vocab
from l4lb.address import parse_address
from l4lb.control.server import ControlSocketError, open_control_socket
from l4lb.sni import check_sni_pattern
from l4lb.state import (RuntimeState, StateFileError, StateIssue, load_state, route_key,
                        save_state, split_route_key)
from l4lb.trust import untrusted_reason

OTHER_UID = 65534            # nobody


def state_of(**sections) -> RuntimeState:
    return RuntimeState.from_dict({"version": 1, **sections})


GOOD = {
    "backends": {"blue/app1": {"state": "maint", "weight": 50}},
    "added": {"blue/app4": {"address": "127.0.0.1:9004", "weight": 3}},
    "removed": ["blue/app3"],
    "listeners": {"web": {"split": {"blue": 80, "green": 20}}, "api": {"pool": "green"},
                  "tls/*.example.com": {"pool": "green"}},
}


@pytest.mark.parametrize("section, key, entry, words", [
    ("backends", "blue/app2", {"weight": -5}, "weight must be an integer from 0 to 10000"),
    ("backends", "blue/app2", {"weight": 2**63 - 1}, "got a huge integer"),
    ("backends", "blue/app2", {"weight": math.inf}, "weight must be"),
    ("backends", "blue/app2", {"weight": 20000}, "weight must be"),
    ("backends", "blue/app2", {"weight": 2.0}, "weight must be"),
    ("backends", "blue/app2", {"weight": True}, "weight must be"),
    ("backends", "blue/app2", {"state": "up"}, "state must be one of maint, draining"),
    ("backends", "blue/app2", {"colour": "red"}, "unknown key 'colour'"),
    ("backends", "blue/app2", "maint", "must be a table"),
    ("backends", "", {"weight": 1}, "want POOL/BACKEND"),
    ("backends", "blue/x y", {"weight": 1}, "bad name 'x y'"),
    ("backends", "blue/", {"weight": 1}, "bad name ''"),
    ("backends", "a/b/c", {"weight": 1}, "want POOL/BACKEND"),
    ("added", "blue/app5", {"address": "127.0.0.1:9005", "weight": 99999}, "weight must be"),
    ("added", "blue/app5", {"address": "my_svc:0"}, "from 1 to 65535"),
    ("added", "blue/app5", {"address": 9005}, "bad address"),
    ("added", "blue/app5", {"weight": 1}, "needs an address"),
    ("added", "x y/app5", {"address": "127.0.0.1:1"}, "bad name 'x y'"),
    ("listeners", "web2", {"split": {"blue": math.inf, "green": 0}}, "percentage of 'blue'"),
    ("listeners", "web2", {"split": {"blue": 90, "green": 20}}, "sum to 110, not 100"),
    ("listeners", "web2", {"split": {}}, "non-empty"),
    ("listeners", "web2", {"split": {"x y": 100}}, "bad name 'x y'"),
    ("listeners", "web2", {"pool": "x y"}, "bad name 'x y'"),
    ("listeners", "web2", {"pool": "blue", "split": {"blue": 100}}, "needs pool or split"),
    ("listeners", "web2", {}, "needs pool or split"),
    ("listeners", "", {"pool": "blue"}, "bad name ''"),
    ("listeners", "tls/*", {"pool": "blue"}, "matches every name"),
    ("listeners", "tls/a..test", {"pool": "blue"}, "empty label"),
    ("listeners", "x y/a.test", {"pool": "blue"}, "bad name 'x y'"),
])
def test_a_bad_entry_is_skipped_and_reported_while_the_rest_applies(section, key, entry, words):
    data = {name: (dict(value) if isinstance(value, dict) else list(value))
            for name, value in GOOD.items()}
    data[section][key] = entry
    state = state_of(**data)
    assert state == state_of(**GOOD)
    [issue] = state.issues
    assert (issue.section, issue.key) == (section, key)
    assert words in issue.message


def test_bad_items_of_removed_and_unknown_sections_are_reported():
    state = state_of(removed=["blue/app3", "", 7, "x y/z"], extra={"a": 1})
    assert state.removed == ["blue/app3"]
    assert [(i.section, i.key) for i in state.issues] == [
        ("removed", ""), ("removed", "7"), ("removed", "x y/z"), ("extra", "")]


@pytest.mark.parametrize("data", [[], "x", {"version": 2}, {}], ids=repr)
def test_an_unusable_file_raises_state_file_error(data):
    with pytest.raises(StateFileError):
        RuntimeState.from_dict(data)


def test_values_that_used_to_crash_the_start_load_as_issues(tmp_path):
    path = tmp_path / "l4lb.state.toml"
    path.write_text('version = 1\n'
                    '[backends."blue/a"]\nweight = -5\n'
                    '[backends."blue/b"]\nweight = 9223372036854775807\n'
                    '[backends."blue/c"]\nweight = inf\n'
                    '[backends."blue/d"]\nweight = 20\n'
                    '[listeners.web]\nsplit = { blue = inf, green = 0 }\n')
    state = load_state(path)
    assert state.backends == {"blue/d": {"weight": 20}}
    assert state.listeners == {}
    assert [i.key for i in state.issues] == ["blue/a", "blue/b", "blue/c", "web"]


def test_an_sni_route_key_is_kept_with_its_pattern_normalized():
    state = state_of(listeners={"tls/API.Example.com.": {"split": {"a": 50, "b": 50}}})
    assert state.listeners == {"tls/api.example.com": {"split": {"a": 50, "b": 50}}}
    assert split_route_key("tls/api.example.com") == ("tls", "api.example.com")
    assert route_key("tls", None) == "tls" and split_route_key("tls") == ("tls", None)


def test_a_saved_state_loads_back_equal_and_without_issues(tmp_path):
    path = tmp_path / "l4lb.state.toml"
    save_state(path, state_of(**GOOD))
    loaded = load_state(path)
    assert loaded == state_of(**GOOD) and loaded.issues == []


# -- fuzz ----------------------------------------------------------------------------------

_words = st.sampled_from(["version", "backends", "added", "removed", "listeners", "state",
                          "set_by", "deploy", "operator",
                          "weight", "address", "pool", "split", "blue/a", "blue", "green",
                          "maint", "draining", "up", "127.0.0.1:1", "my_svc:0", "x y", "",
                          "a/b/c", "/"])
_scalars = st.one_of(st.integers(-(2**64), 2**64), st.floats(), st.booleans(), _words,
                     st.text(max_size=8), st.none())
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(_words, st.text(max_size=6)),
                                                 inner, max_size=4)), max_leaves=20)
_sections = st.fixed_dictionaries({"version": st.sampled_from([1, 1, 1, 2, "1"])},
                                  optional={k: _values for k in
                                            ("backends", "added", "removed", "listeners")})


def assert_within_the_rules(state: RuntimeState) -> None:
    def ref_ok(ref):
        pool, slash, name = ref.partition("/")
        return slash and vocab.NAME_RE.fullmatch(pool) and vocab.NAME_RE.fullmatch(name)

    for ref, entry in state.backends.items():
        assert ref_ok(ref) and set(entry) <= {"state", "set_by", "weight"}
        assert entry.get("set_by", "deploy") in vocab.SET_BY_WORDS and (
            "set_by" not in entry or "state" in entry)
        assert entry.get("state", "maint") in vocab.ADMIN_STATES
        assert vocab.check_weight(entry.get("weight", 1)) is not None
    for ref, entry in state.added.items():
        assert ref_ok(ref) and set(entry) == {"address", "weight"}
        assert str(parse_address(entry["address"])) == entry["address"]
        vocab.check_weight(entry["weight"])
    assert all(ref_ok(ref) for ref in state.removed)
    for name, route in state.listeners.items():
        listener, sni = split_route_key(name)
        assert vocab.NAME_RE.fullmatch(listener)
        assert sni is None or check_sni_pattern(sni) == sni
        if "pool" in route:
            assert route.keys() == {"pool"} and vocab.NAME_RE.fullmatch(route["pool"])
        else:
            assert route.keys() == {"split"} and vocab.check_split(route["split"])
    assert all(isinstance(issue, StateIssue) for issue in state.issues)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_sections, _values))
def test_any_state_data_gives_state_file_error_or_only_entries_within_the_rules(data):
    try:
        state = RuntimeState.from_dict(data)
    except StateFileError:
        return
    assert_within_the_rules(state)
    again = RuntimeState.from_dict(state.to_dict())
    assert again == state and again.issues == []


# -- trust ---------------------------------------------------------------------------------

def write_state(path, uid=None, mode=0o600):
    save_state(path, state_of(**GOOD))
    os.chmod(path, mode)
    if uid is not None:
        os.chown(path, uid, -1)
    return path


def test_a_state_file_of_our_own_in_a_private_folder_is_trusted(tmp_path):
    path = write_state(tmp_path / "l4lb.state.toml")
    assert untrusted_reason(path) is None
    assert load_state(path) == state_of(**GOOD)


def test_a_state_file_owned_by_another_user_is_refused(tmp_path):
    path = write_state(tmp_path / "l4lb.state.toml", uid=OTHER_UID)
    with pytest.raises(StateFileError, match=f"owned by uid {OTHER_UID}"):
        load_state(path)


@pytest.mark.parametrize("mode, who", [(0o620, "its group"), (0o602, "others"),
                                       (0o666, "group and others")])
def test_a_state_file_others_can_write_is_refused(tmp_path, mode, who):
    path = write_state(tmp_path / "l4lb.state.toml", mode=mode)
    with pytest.raises(StateFileError, match=f"writable by {who}"):
        load_state(path)


def test_a_state_file_in_a_folder_others_can_write_is_refused(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir()
    path = write_state(folder / "l4lb.state.toml")
    os.chmod(folder, 0o777)
    with pytest.raises(StateFileError, match=f"{folder} is writable by group and others"):
        load_state(path)


def test_a_sticky_shared_folder_is_fine_only_for_a_file_of_our_own(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o1777)
    ours = write_state(folder / "ours.state.toml")
    planted = write_state(folder / "planted.state.toml", uid=OTHER_UID)
    assert load_state(ours) == state_of(**GOOD)
    with pytest.raises(StateFileError, match="refused"):
        load_state(planted)


def test_a_folder_above_owned_by_another_user_makes_the_file_untrusted(tmp_path):
    folder = tmp_path / "theirs" / "inner"
    folder.mkdir(parents=True)
    path = write_state(folder / "l4lb.state.toml")
    os.chown(tmp_path / "theirs", OTHER_UID, -1)
    assert f"{tmp_path / 'theirs'} is owned by uid {OTHER_UID}" in untrusted_reason(path)


def test_a_link_planted_by_another_user_is_refused_even_to_our_own_file(tmp_path):
    target = write_state(tmp_path / "real.state.toml")
    link = tmp_path / "l4lb.state.toml"
    link.symlink_to(target)
    os.lchown(link, OTHER_UID, -1)
    with pytest.raises(StateFileError, match="symbolic link owned by uid"):
        load_state(link)


def test_the_control_socket_is_not_opened_in_a_folder_others_can_write(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir()
    os.chmod(folder, 0o777)
    with pytest.raises(ControlSocketError, match="writable by group and others"):
        open_control_socket(folder / "l4lb.sock", 0o600)
    assert not (folder / "l4lb.sock").exists()


def test_the_control_socket_opens_in_a_folder_of_our_own(tmp_path):
    sock = open_control_socket(tmp_path / "l4lb.sock", 0o600)
    try:
        assert stat.S_ISSOCK(os.lstat(tmp_path / "l4lb.sock").st_mode)
        assert sock.family == socket.AF_UNIX
    finally:
        sock.close()


def test_a_path_not_there_yet_is_judged_by_the_folders_that_exist(tmp_path):
    assert untrusted_reason(tmp_path / "missing" / "l4lb.sock") is None
    os.chmod(tmp_path, 0o777)
    try:
        assert "writable by group and others" in untrusted_reason(tmp_path / "missing" / "x")
    finally:
        os.chmod(tmp_path, 0o700)


def test_a_maint_set_by_a_deploy_is_kept_with_its_marker_and_dropped_on_enable(tmp_path):
    state = RuntimeState()
    state.record_state("blue/a", "maint", "deploy")
    state.record_state("blue/b", "maint", "operator")
    path = tmp_path / "l4lb.state.toml"
    save_state(path, state)
    loaded = load_state(path)
    assert loaded.backends == {"blue/a": {"state": "maint", "set_by": "deploy"},
                               "blue/b": {"state": "maint"}}
    loaded.record_state("blue/a", "up")
    assert "blue/a" not in loaded.backends


@pytest.mark.parametrize("entry", [{"state": "maint", "set_by": "someone"},
                                   {"set_by": "deploy"}])
def test_a_set_by_that_is_unknown_or_without_a_state_is_skipped(entry):
    state = RuntimeState.from_dict({"version": 1, "backends": {"blue/a": entry}})
    assert state.backends == {} and [i.key for i in state.issues] == ["blue/a"]
