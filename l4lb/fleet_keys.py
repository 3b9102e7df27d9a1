"""The fleet's runtime state as etcd keys (DESIGN.md §10): a pure mapping, no I/O.

What the state file keeps (l4lb.state.RuntimeState) lives in etcd one entry per key,
each a JSON object, under PREFIX/v1/state/:

    backends/POOL/BACKEND     {"state": "draining", "set_by": "deploy", "weight": 50}
    added/POOL/BACKEND        {"address": "127.0.0.1:9004", "weight": 1}
    removed/POOL/BACKEND      {}
    listeners/LISTENER[/SNI]  {"pool": "green"} | {"split": {"blue": 90, "green": 10}}

and each live node publishes PREFIX/v1/nodes/NODE under its own lease (l4lb.cluster).
One key per pool/backend and route means two operators acting on different backends
never touch the same key; a transaction compares the mod revision of the keys it
writes, so two acting on the same one cannot both win unseen.

Everything read back goes through RuntimeState.from_dict: the state file's rules
(names, weights, state words, addresses, splits summing to 100) are the only rules, and
a bad entry is skipped and reported, never applied. JSON keeps the order of a split's
pools as written, so every node builds the same split (and routes a client alike).
"""
from __future__ import annotations

import json

from .state import STATE_VERSION, RuntimeState, StateIssue

VERSION_PATH = "/v1/"
STATE_PATH = "state/"
NODES_PATH = "nodes/"
SECTIONS = ("backends", "added", "removed", "listeners")


def root(prefix: str) -> str:
    """Everything a node watches: PREFIX/v1/."""
    return prefix + VERSION_PATH


def state_root(prefix: str) -> str:
    return root(prefix) + STATE_PATH


def node_key(prefix: str, node: str) -> str:
    return root(prefix) + NODES_PATH + node


def node_of(prefix: str, key: str) -> str | None:
    """The node name of a node record's key; None for any other key."""
    head = root(prefix) + NODES_PATH
    return key[len(head):] if key.startswith(head) else None


def encode(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")


def entries_of(state: RuntimeState) -> dict[str, bytes]:
    """{key below state_root: JSON value} for every entry of `state` (not its revision)."""
    out = {}
    for ref, entry in state.backends.items():
        out[f"backends/{ref}"] = encode(entry)
    for ref, entry in state.added.items():
        out[f"added/{ref}"] = encode(entry)
    for ref in state.removed:
        out[f"removed/{ref}"] = encode({})
    for key, route in state.listeners.items():
        out[f"listeners/{key}"] = encode(route)
    return out


def state_of(entries: dict[str, bytes]) -> RuntimeState:
    """The RuntimeState the keys describe, each entry checked by the state file's rules;
    the ones they refuse (and values that are not JSON) are in the result's `issues`."""
    data: dict = {"version": STATE_VERSION, "backends": {}, "added": {}, "removed": [],
                  "listeners": {}}
    bad = []
    for key, raw in entries.items():
        section, slash, name = key.partition("/")
        if section not in SECTIONS or not slash:
            bad.append(StateIssue(section, name, "unknown section"))
            continue
        try:
            value = json.loads(raw)
        except (UnicodeDecodeError, ValueError):
            bad.append(StateIssue(section, name, "not JSON"))
            continue
        if section == "removed":
            data["removed"].append(name)
        else:
            data[section][name] = value
    state = RuntimeState.from_dict(data)
    state.issues.extend(bad)
    return state


def difference(old: RuntimeState, new: RuntimeState) -> tuple[dict[str, bytes], list[str]]:
    """(keys to put with their values, keys to delete) that turn `old` into `new`."""
    before, after = entries_of(old), entries_of(new)
    puts = {k: v for k, v in after.items() if before.get(k) != v}
    deletes = [k for k in before if k not in after]
    return puts, deletes
