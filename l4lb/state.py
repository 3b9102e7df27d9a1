"""Runtime state that survives reloads and restarts (DESIGN.md §6).

Operators change weights, states, routes and backends at runtime; those changes are kept
in a small TOML file beside the control socket and re-applied on top of the config at
every start and reload, so a restart never silently undoes an operator's `disable`.

File format (written by the `toml` package, checked by reading it back with tomllib):

    version = 1
    removed = ["blue/app3"]
    [backends."blue/app1"]         # operator overrides of config backends
    state = "maint"                # only admin states are kept: maint | draining
    weight = 50
    [added."blue/app4"]            # backends added with `add`
    address = "127.0.0.1:9004"
    weight = 1
    [listeners.web]                # `switch` or `split`
    pool = "green"                 # or: split = { blue = 80, green = 20 }

Writes are atomic (temp file + rename), so a crash leaves the old file or the new one.
A corrupt or unreadable file is reported by the caller and ignored, never fatal.
"""
from __future__ import annotations

import os
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import toml

STATE_VERSION = 1


class StateFileError(Exception):
    """The state file exists but cannot be used; the message says why."""


@dataclass
class RuntimeState:
    backends: dict[str, dict] = field(default_factory=dict)   # "pool/name" -> {state, weight}
    added: dict[str, dict] = field(default_factory=dict)      # "pool/name" -> {address, weight}
    removed: list[str] = field(default_factory=list)          # "pool/name"
    listeners: dict[str, dict] = field(default_factory=dict)  # name -> {pool} | {split}

    # --- recording operator changes -----------------------------------------------------

    def record_state(self, ref: str, state: str) -> None:
        entry = self.backends.setdefault(ref, {})
        if state in ("maint", "draining"):
            entry["state"] = state
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
    def from_dict(cls, data: dict) -> "RuntimeState":
        if data.get("version") != STATE_VERSION:
            raise StateFileError(f"unsupported state file version {data.get('version')!r}")
        state = cls()
        try:
            for ref, entry in dict(data.get("backends", {})).items():
                state.backends[str(ref)] = _checked_backend_entry(entry)
            for ref, entry in dict(data.get("added", {})).items():
                if not isinstance(entry.get("address"), str):
                    raise StateFileError(f"added.{ref}: address must be a string")
                state.added[str(ref)] = {"address": entry["address"],
                                         "weight": int(entry.get("weight", 1))}
            state.removed = [str(r) for r in data.get("removed", [])]
            for name, route in dict(data.get("listeners", {})).items():
                if "split" in route:
                    state.listeners[str(name)] = {
                        "split": {str(k): int(v) for k, v in dict(route["split"]).items()}}
                elif isinstance(route.get("pool"), str):
                    state.listeners[str(name)] = {"pool": route["pool"]}
                else:
                    raise StateFileError(f"listeners.{name}: needs pool or split")
        except (TypeError, ValueError, AttributeError) as exc:
            raise StateFileError(f"malformed entry: {exc}") from None
        return state


def _checked_backend_entry(entry) -> dict:
    out = {}
    if "state" in entry:
        if entry["state"] not in ("maint", "draining"):
            raise StateFileError(f"bad backend state {entry['state']!r}")
        out["state"] = entry["state"]
    if "weight" in entry:
        out["weight"] = int(entry["weight"])
    return out


def state_path_for(socket_path: Path) -> Path:
    """The state file kept beside the control socket: l4lb.sock -> l4lb.state.toml."""
    return socket_path.with_name(socket_path.stem + ".state.toml")


def load_state(path: Path) -> RuntimeState:
    """The state in `path`; an empty state when there is no file. StateFileError when the
    file exists but is unreadable, not TOML, or malformed."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return RuntimeState()
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror}") from None
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
