"""The words and bounds that several entry points share, each written once.

The config file (l4lb.config), the control protocol (l4lb.control.protocol), the state
file (l4lb.state) and the reference docs all read these, so a bound or a word list cannot
mean one thing in one file and another elsewhere. Addresses have their own module
(l4lb.address); the algorithm words and hash keys come from the algorithm registry
(l4lb.algorithms), the only place that knows which algorithms exist.

Nothing here does I/O; every name is a constant or a check that raises ValueError.
"""
from __future__ import annotations

import re

from .algorithms import ALGORITHMS, HASH_KEYS

__all__ = [
    "ADMIN_STATES", "ALGORITHM_WORDS", "HASH_KEYS", "LOG_FORMATS", "LOG_LEVELS", "NAME_DOC",
    "NAME_PATTERN", "NAME_RE", "ON_DOWN_WORDS", "SEND_PROXY_CODES", "SEND_PROXY_WORDS",
    "SET_BY_DEFAULT", "SET_BY_WORDS",
    "SPLIT_TOTAL", "WEIGHT_DEFAULT", "WEIGHT_MAX", "WEIGHT_MIN", "check_name", "check_split",
    "check_weight", "WORKERS_AUTO", "WORKERS_MAX", "check_workers", "worker_count", "cpu_count",
]

# A backend's weight as the operator writes it (DESIGN.md §4): 0 takes no new connections.
# Not the algorithms' internal scale (l4lb.reference.algorithm has its own bound).
WEIGHT_MIN = 0
WEIGHT_MAX = 10_000
WEIGHT_DEFAULT = 1

# Worker processes (DESIGN.md §9): "auto" is one per CPU this process may run on.
# WORKERS_MAX bounds the shared table's rows (two generations of workers may overlap).
WORKERS_AUTO = "auto"
WORKERS_MAX = 64

# Names of listeners, pools and backends. Control commands write `POOL/BACKEND`,
# `POOL=PCT` and split tokens on spaces, so '/', '=' and whitespace are kept out; the
# config, the control socket and the state file accept exactly these, or some object
# could not be addressed by a command.
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"
NAME_RE = re.compile(NAME_PATTERN)
NAME_DOC = "1 to 64 letters, digits, '_', '-' or '.', not starting with '-' or '.'"

# send_proxy words and the wire codes the relay's ListenerRuntime.send_proxy holds.
SEND_PROXY_CODES = {"off": 0, "v1": 1, "v2": 2}
SEND_PROXY_WORDS = tuple(SEND_PROXY_CODES)

# pools.*.algorithm: the registry's words, in its order.
ALGORITHM_WORDS = tuple(ALGORITHMS)

# pools.*.on_down: what a backend marked down does with its open connections.
ON_DOWN_WORDS = ("keep", "close")

# Backend states an operator sets and the state file keeps (up is the absence of one).
ADMIN_STATES = ("maint", "draining")

# Who set a backend's admin state (`disable ... by deploy`): `l4lb deploy` marks its own
# so that a rerun after a failure finishes its work but never undoes an operator's maint.
SET_BY_WORDS = ("operator", "deploy")
SET_BY_DEFAULT = "operator"

# A split's percentages add up to this.
SPLIT_TOTAL = 100

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "console")


def check_name(value) -> str:
    """`value` if it is a valid name (NAME_PATTERN); ValueError otherwise."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(f"bad name {show_briefly(value)}: names are {NAME_DOC}")
    return value


def check_weight(value) -> int:
    """`value` if it is an integer weight in WEIGHT_MIN..WEIGHT_MAX (not a bool, not a
    float, even a whole one: the file and the commands write integers); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not (
            WEIGHT_MIN <= value <= WEIGHT_MAX):
        raise ValueError(f"weight must be an integer from {WEIGHT_MIN} to {WEIGHT_MAX}, "
                         f"got {show_briefly(value)}")
    return value


def check_split(shares) -> dict[str, int]:
    """`shares` (pool name -> percentage) if every name is valid, every percentage an
    integer 0..100 and they sum to SPLIT_TOTAL; ValueError otherwise. The order is kept."""
    if not isinstance(shares, dict) or not shares:
        raise ValueError(f"a split must be a non-empty table of pool = percentage, "
                         f"got {show_briefly(shares)}")
    for pool, percent in shares.items():
        check_name(pool)
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise ValueError(f"percentage of {pool!r} must be an integer from 0 to 100, "
                             f"got {show_briefly(percent)}")
    total = sum(shares.values())
    if total != SPLIT_TOTAL:
        raise ValueError(f"split percentages sum to {total}, not {SPLIT_TOTAL}")
    return dict(shares)


def show_briefly(value) -> str:
    """repr() cut short for a message; a huge int is not spelled out (repr() of one over
    4300 digits even raises)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**18:
        return "a huge integer"
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."


def check_workers(value) -> int | str:
    """`value` if it is "auto" or an integer worker count in 1..WORKERS_MAX; ValueError
    otherwise (the config's rule)."""
    if value == WORKERS_AUTO:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= WORKERS_MAX:
        raise ValueError(f"must be {WORKERS_AUTO!r} or an integer from 1 to {WORKERS_MAX}, "
                         f"got {show_briefly(value)}")
    return value


def cpu_count() -> int:
    """The CPUs this process may run on (os.sched_getaffinity: taskset and cpusets
    count), capped at WORKERS_MAX."""
    import os
    return max(1, min(WORKERS_MAX, len(os.sched_getaffinity(0))))


def worker_count(value) -> int:
    """The number of workers `global.workers` asks for: "auto" is one per CPU this
    process may run on (os.sched_getaffinity, so taskset and cpusets count), capped at
    WORKERS_MAX."""
    if value == WORKERS_AUTO:
        return cpu_count()
    return int(value)
