"""A fleet's state as etcd keys (l4lb.fleet_keys) and the [cluster] table, without etcd."""
import socket

import pytest

from l4lb import fleet_keys
from l4lb.config import parse_config
from l4lb.fleet_apply import changed_refs, changed_routes
from l4lb.state import RuntimeState

from .test_config import BASE, issues_of


def sample_state() -> RuntimeState:
    state = RuntimeState()
    state.record_state("blue/a", "draining", "deploy")
    state.record_weight("blue/b", 50)
    state.record_added("blue/c", "127.0.0.1:9003", 2)
    state.record_removed("green/x")
    state.record_route("web", split={"green": 10, "blue": 90})
    state.record_route("tls/*.example.com", pool="green")
    return state


def test_entries_round_trip_to_the_same_state_and_keep_a_splits_order():
    state = sample_state()
    entries = fleet_keys.entries_of(state)
    assert set(entries) == {"backends/blue/a", "backends/blue/b", "added/blue/c",
                            "removed/green/x", "listeners/web",
                            "listeners/tls/*.example.com"}
    back = fleet_keys.state_of(entries)
    assert back == state and not back.issues
    assert list(back.listeners["web"]["split"]) == ["green", "blue"]


@pytest.mark.parametrize(("key", "value", "why"), [
    ("backends/blue/a", b'{"state": "up"}', "state must be one of"),
    ("backends/blue/a", b'{"weight": 10001}', "weight"),
    ("added/blue/c", b'{"address": "nowhere"}', "port"),
    ("listeners/web", b'{"split": {"blue": 90}}', "100"),
    ("backends/blue/a", b"{not json", "not JSON"),
    ("deploys/x", b"{}", "unknown section"),
])
def test_an_entry_the_state_files_rules_refuse_is_skipped_and_reported(key, value, why):
    entries = fleet_keys.entries_of(sample_state())
    entries[key] = value
    state = fleet_keys.state_of(entries)
    assert any(why in issue.message for issue in state.issues), state.issues
    assert state.backends.get("blue/b") == {"weight": 50}       # the rest applies


def test_difference_puts_what_changed_and_deletes_what_went():
    old, new = sample_state(), sample_state()
    new.record_state("blue/a", "up")
    new.record_weight("blue/b", 7)
    puts, deletes = fleet_keys.difference(old, new)
    assert puts == {"backends/blue/b": b'{"weight":7}'}
    assert deletes == ["backends/blue/a"]
    assert changed_refs(old, new) == ["blue/a", "blue/b"] and changed_routes(old, new) == []


def test_node_keys_are_told_apart_from_state_keys():
    assert fleet_keys.node_key("/l4lb", "lb1") == "/l4lb/v1/nodes/lb1"
    assert fleet_keys.node_of("/l4lb", "/l4lb/v1/nodes/lb1") == "lb1"
    assert fleet_keys.node_of("/l4lb", "/l4lb/v1/state/backends/blue/a") is None


CLUSTER = BASE + """
[cluster]
etcd = ["127.0.0.1:2379", "[::1]:2379"]
node = "lb1"
"""


def test_a_cluster_table_gives_endpoints_and_defaults():
    cluster = parse_config(CLUSTER, "conf.toml").cluster
    assert [str(a) for a in cluster.etcd] == ["127.0.0.1:2379", "[::1]:2379"]
    assert (cluster.node, cluster.prefix, cluster.lease_ttl) == ("lb1", "/l4lb", 10.0)
    assert parse_config(BASE, "conf.toml").cluster is None


def test_the_node_name_defaults_to_the_host_name():
    cluster = parse_config(CLUSTER.replace('node = "lb1"\n', ""), "conf.toml").cluster
    assert cluster.node == (socket.gethostname().split(".")[0][:64] or "l4lb")


@pytest.mark.parametrize(("old", "new", "key", "message"), [
    ('etcd = ["127.0.0.1:2379", "[::1]:2379"]', "etcd = []", "cluster.etcd", "at least 1"),
    ('etcd = ["127.0.0.1:2379", "[::1]:2379"]', 'etcd = ["x"]', "cluster.etcd[0]", "host:port"),
    ('node = "lb1"', 'node = "lb 1"', "cluster.node", "name"),
    ('node = "lb1"', 'node = "lb1"\nprefix = "l4lb/"', "cluster.prefix", "start with '/'"),
    ('node = "lb1"', 'node = "lb1"\nlease_ttl = 0.5', "cluster.lease_ttl", "at least 1"),
    ('node = "lb1"', 'node = "lb1"\nttl = 3', "cluster.ttl", "unknown key"),
])
def test_a_bad_cluster_key_is_reported_at_its_line(old, new, key, message):
    text = CLUSTER.replace(old, new)
    issues = issues_of(text)
    assert [(i.key, message in i.message) for i in issues] == [(key, True)], issues
    assert issues[0].line == next(n for n, line in enumerate(text.splitlines(), 1)
                                  if line.startswith(key.split(".")[1].split("[")[0]))


def test_a_cluster_table_without_endpoints_is_refused():
    issues = issues_of(BASE + "\n[cluster]\nnode = \"lb1\"\n")
    assert [(i.key, i.message) for i in issues] == [("cluster.etcd", "required key is missing")]
