"""Runtime state that survives reloads and restarts (DESIGN.md §6).

Operators change weights, states, routes and backends at runtime; those changes are kept
in a small TOML file beside the control socket and re-applied on top of the config at
every start and reload, so a restart never silently undoes an operator's `disable`.

File format (written by the `toml` package, checked by reading it back with tomllib):

    version = 1
    revision = 1742                # in a fleet: the etcd revision this state is as of
    removed = ["blue/app3"]
    [backends."blue/app1"]         # operator overrides of config backends
    state = "maint"                # only admin states are kept: maint | draining
    set_by = "deploy"              # who set it, when not the operator (l4lb deploy)
    weight = 50
    [added."blue/app4"]            # backends added with `add`
    address = "127.0.0.1:9004"
    weight = 1
    [listeners.web]                # `switch` or `split`
    pool = "green"                 # or: split = { blue = 80, green = 20 }
    [listeners."tls/*.example.com"]  # the same, for one sni route (LISTENER/PATTERN)
    split = { web = 90, web-canary = 10 }

Every entry read back is checked by the rules the config and the control commands use
(names, weight bounds and state words from l4lb.vocab, addresses from l4lb.address, split
percentages summing to 100): a bad entry is skipped and listed in `RuntimeState.issues`
for the caller to log, the rest applies. A file another user could have written is
refused whole (l4lb.trust). Writes are atomic (temp file + rename), so a crash leaves the
old file or the new one. A corrupt, unreadable or refused file is reported by the caller
and ignored, never fatal.
"""
from __future__ import annotations

import os
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import toml

from . import vocab
from .address import parse_address
from .sni import check_sni_pattern
from .trust import untrusted_reason

STATE_VERSION = 1


class StateFileError(Exception):
    """The state file exists but cannot be used; the message says why."""


@dataclass
class RuntimeState:
    backends: dict[str, dict] = field(default_factory=dict)   # "pool/name" -> {state, weight}
    added: dict[str, dict] = field(default_factory=dict)      # "pool/name" -> {address, weight}
    removed: list[str] = field(default_factory=list)          # "pool/name"
    listeners: dict[str, dict] = field(default_factory=dict)  # route_key -> {pool} | {split}
    # In a fleet (l4lb.cluster): the etcd revision this state was applied at; 0 = none.
    revision: int = 0
    # Entries skipped when read from the file (StateIssue); never written back.
    issues: list = field(default_factory=list, compare=False, repr=False)

    # --- recording operator changes -----------------------------------------------------

    def record_state(self, ref: str, state: str, set_by: str | None = None) -> None:
        """Keep an admin state and who set it (only `deploy` is written: operator is
        the default); any other state drops both."""
        entry = self.backends.setdefault(ref, {})
        entry.pop("set_by", None)
        if state in vocab.ADMIN_STATES:
            entry["state"] = state
            if set_by is not None and set_by != vocab.SET_BY_DEFAULT:
                entry["set_by"] = set_by
        else:
            entry.pop("state", None)
        self._prune(ref)

    def record_weight(self, ref: str, weight: int) -> None:
        if ref in self.added:
            self.added[ref]["weight"] = weight
        else:
            self.backends.setdefault(ref, {})["weight"] = weight

    def record_added(self, ref: str, address: str, weight: int) -> None:
        if ref in self.removed:
            self.removed.remove(ref)
        self.added[ref] = {"address": address, "weight": weight}

    def record_removed(self, ref: str) -> None:
        self.backends.pop(ref, None)
        if self.added.pop(ref, None) is None and ref not in self.removed:
            self.removed.append(ref)

    def record_route(self, listener: str, pool: str | None = None,
                     split: dict[str, int] | None = None) -> None:
        self.listeners[listener] = {"split": dict(split)} if split else {"pool": pool}

    def _prune(self, ref: str) -> None:
        if ref in self.backends and not self.backends[ref]:
            del self.backends[ref]

    # --- the file -----------------------------------------------------------------------

    def to_dict(self) -> dict:
        out: dict = {"version": STATE_VERSION}
        if self.revision:
            out["revision"] = self.revision
        if self.removed:
            out["removed"] = list(self.removed)
        if self.backends:
            out["backends"] = self.backends
        if self.added:
            out["added"] = self.added
        if self.listeners:
            out["listeners"] = self.listeners
        return out

    @classmethod
    def from_dict(cls, data) -> "RuntimeState":
        """The state `data` (the file's TOML tables) describes, every entry validated by
        the rules the config and the control commands use (l4lb.vocab, l4lb.address).

        A bad entry is skipped and described in `issues` (section, key, message), the
        rest applies; StateFileError only when the whole file is unusable (not a table, an
        unknown version). Never raises anything else, whatever `data` holds."""
        if not isinstance(data, dict):
            raise StateFileError("the state file is not a TOML table")
        if data.get("version") != STATE_VERSION:
            raise StateFileError(
                f"unsupported state file version {vocab.show_briefly(data.get('version'))}")
        state = cls()
        for section, value in data.items():
            if section == "version":
                continue
            if section == "revision":
                if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                    state.revision = value
                else:
                    state.issues.append(StateIssue("revision", "", "must be a whole number"))
                continue
            reader = _SECTION_READERS.get(section)
            if reader is None:
                state.issues.append(StateIssue(section, "", "unknown section"))
                continue
            reader(state, value)
        return state

    def _read_backends(self, section) -> None:
        self.backends.update(_read_tables(self, "backends", section, _checked_ref,
                                          _checked_override))

    def _read_added(self, section) -> None:
        self.added.update(_read_tables(self, "added", section, _checked_ref, _checked_added))

    def _read_removed(self, section) -> None:
        if not isinstance(section, list):
            self.issues.append(StateIssue("removed", "", "must be an array of POOL/BACKEND"))
            return
        for ref in section:
            try:
                ref = _checked_ref(ref)
            except ValueError as exc:
                self.issues.append(StateIssue("removed", _key_text(ref), str(exc)))
                continue
            if ref not in self.removed:
                self.removed.append(ref)

    def _read_listeners(self, section) -> None:
        self.listeners.update(_read_tables(self, "listeners", section, _checked_route_key,
                                           _checked_route))


class StateIssue(NamedTuple):
    """A state file entry skipped because it breaks a rule: `section` ("added"), `key`
    ("blue/app4"; empty for the section as a whole) and what is wrong with it."""
    section: str
    key: str
    message: str


_SECTION_READERS = {
    "backends": RuntimeState._read_backends,
    "added": RuntimeState._read_added,
    "removed": RuntimeState._read_removed,
    "listeners": RuntimeState._read_listeners,
}


def _read_tables(state: RuntimeState, section: str, value, check_key, check_entry) -> dict:
    """{key: checked entry} of a section of tables; each bad one goes to state.issues."""
    if not isinstance(value, dict):
        state.issues.append(StateIssue(section, "", "must be a table"))
        return {}
    out = {}
    for key, entry in value.items():
        try:
            key = check_key(key)
            if not isinstance(entry, dict):
                raise ValueError("must be a table")
            out[key] = check_entry(entry)
        except ValueError as exc:
            state.issues.append(StateIssue(section, _key_text(key), str(exc)))
    return out


def _key_text(key) -> str:
    return key if isinstance(key, str) and len(key) <= 80 else vocab.show_briefly(key)


def _checked_ref(ref) -> str:
    """A "POOL/BACKEND" reference with both names valid."""
    if not isinstance(ref, str) or ref.count("/") != 1:
        raise ValueError(f"want POOL/BACKEND, got {vocab.show_briefly(ref)}")
    pool, _, backend = ref.partition("/")
    vocab.check_name(pool)
    vocab.check_name(backend)
    return ref


def _only_keys(entry: dict, allowed: tuple[str, ...]) -> None:
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        raise ValueError(f"unknown key {vocab.show_briefly(unknown[0])}; "
                         f"known: {', '.join(allowed)}")


def _checked_override(entry: dict) -> dict:
    """A config backend's overrides: an admin state (and who set it) and/or a weight."""
    _only_keys(entry, ("state", "set_by", "weight"))
    out = {}
    if "state" in entry:
        if entry["state"] not in vocab.ADMIN_STATES:
            raise ValueError(f"state must be one of {', '.join(vocab.ADMIN_STATES)}, "
                             f"got {vocab.show_briefly(entry['state'])}")
        out["state"] = entry["state"]
    if "set_by" in entry:
        if "state" not in entry or entry["set_by"] not in vocab.SET_BY_WORDS:
            raise ValueError(f"set_by must be one of {', '.join(vocab.SET_BY_WORDS)}, "
                             f"beside a state; got {vocab.show_briefly(entry['set_by'])}")
        out["set_by"] = entry["set_by"]
    if "weight" in entry:
        out["weight"] = vocab.check_weight(entry["weight"])
    return out


def _checked_added(entry: dict) -> dict:
    """A backend added with `add`: its address (the backend rule of l4lb.address, kept
    in canonical form) and weight."""
    _only_keys(entry, ("address", "weight"))
    if "address" not in entry:
        raise ValueError("needs an address")
    address = parse_address(entry["address"])
    weight = vocab.check_weight(entry.get("weight", vocab.WEIGHT_DEFAULT))
    return {"address": str(address), "weight": weight}


def route_key(listener: str, sni: str | None) -> str:
    """The state file's key of a route: LISTENER, or LISTENER/PATTERN for an sni route
    (the pattern normalized, as l4lb.sni.check_sni_pattern gives it)."""
    return listener if sni is None else f"{listener}/{sni}"


def split_route_key(key: str) -> tuple[str, str | None]:
    """(listener, sni pattern or None) of a route_key."""
    listener, slash, sni = key.partition("/")
    return listener, (sni if slash else None)


def _checked_route_key(key) -> str:
    """A route_key whose listener name and sni pattern are valid; the pattern normalized."""
    if not isinstance(key, str):
        raise ValueError(f"want LISTENER or LISTENER/SNI, got {vocab.show_briefly(key)}")
    listener, sni = split_route_key(key)
    vocab.check_name(listener)
    return route_key(listener, None if sni is None else check_sni_pattern(sni))


def _checked_route(route: dict) -> dict:
    """A listener's route set by `switch` ({pool}) or `split` ({split})."""
    _only_keys(route, ("pool", "split"))
    if ("pool" in route) == ("split" in route):
        raise ValueError("needs pool or split (one of them)")
    if "pool" in route:
        return {"pool": vocab.check_name(route["pool"])}
    return {"split": vocab.check_split(route["split"])}


def state_path_for(socket_path: Path) -> Path:
    """The state file kept beside the control socket: l4lb.sock -> l4lb.state.toml."""
    return socket_path.with_name(socket_path.stem + ".state.toml")


def load_state(path: Path) -> RuntimeState:
    """The state in `path`; an empty state when there is no file.

    StateFileError when the file exists but is unreadable, not TOML, of another version,
    or untrusted: owned or writable by another user, or in a folder others can write
    (l4lb.trust, sshd's StrictModes), since whoever writes it steers the balancer. Entries
    that break a rule are skipped and listed in the result's `issues`."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return RuntimeState()
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror}") from None
    reason = untrusted_reason(path)
    if reason:
        raise StateFileError(f"refused {path}, as sshd's StrictModes would: {reason}")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise StateFileError(f"{path}: {exc}") from None
    return RuntimeState.from_dict(data)


def save_state(path: Path, state: RuntimeState) -> None:
    """Write `state` atomically. OSError propagates (the caller logs it; serving goes on)."""
    text = toml.dumps(state.to_dict())
    # toml 0.10 speaks TOML 0.5 and drops what it cannot express: read it back to be sure.
    if RuntimeState.from_dict(tomllib.loads(text)).to_dict() != state.to_dict():
        raise StateFileError("state did not survive a TOML round trip")
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
