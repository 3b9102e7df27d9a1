"""The live view's figures: one snapshot of the whole balancer, and the rates between two.

Theory of operation
-------------------
`subscribe` (the control socket), `l4lb top` (which reads `subscribe`) and the status
page's GET /status.json all show one dict built here, `snapshot(balancer)`: the rows of
`show info`, `show listeners`, `show backends` and `show workers` (l4lb.rows and
l4lb.process build them, so a live figure and a `show` figure can never disagree), each
pool's queue, and the drains under way. Its shape is documented, and tested, in
docs/status.schema.json.

Rates need two snapshots. A `RateTracker` keeps the counters of the last sample it took
and gives each row of the next snapshot its `rates` (per second, over the time between
the two): new connections, bytes each way and connect failures per backend, accepts per
listener and worker. A tracker shared by several viewers (the status page's) is given a
`min_interval`, MIN_RATE_INTERVAL: a snapshot taken sooner after its last sample reuses
that sample's rates (two pages polling at once do not make one of them measure over a
few milliseconds); a subscriber's own tracker samples every frame. The first snapshot of a tracker has no rates
(`rates` is null).

Drain progress: each backend in state `draining` is listed with its `remaining` (active)
connections, the rate they close at and an ETA. A draining backend takes no new
connections, so its close rate is the fall of its active count; it is smoothed
(DRAIN_SMOOTHING) so that one quiet interval does not turn the ETA into "never". The ETA
is null until a close has been seen.

What this does not do: it walks pools, backends, listeners and workers, never the
connections, so a snapshot costs O(backends + listeners), like a scrape; and it keeps no
history: sparklines are drawn by the viewer from successive snapshots.
"""
from __future__ import annotations

import time

from .metrics import ADMIN_STATES       # the admin state per state: l4lb_backend_admin_state's
from .process import show_info_fields
from .rows import backend_row, listener_row, pool_row, worker_rows

# Seconds below which a new sample of a shared tracker would make rates of noise: the
# last ones are reused.
MIN_RATE_INTERVAL = 0.25
# Weight of the newest close rate in a drain's smoothed one (an EWMA): 0.5 forgets a
# quiet second in two or three samples, yet does not swing with every close.
DRAIN_SMOOTHING = 0.5

# counter in a row -> its rate's name, per kind of row
BACKEND_RATES = {"total": "new_s", "bytes_in": "bytes_in_s", "bytes_out": "bytes_out_s",
                 "failed": "errors_s"}
LISTENER_RATES = {"accepted": "accepted_s"}
WORKER_RATES = {"accepted": "accepted_s"}


def snapshot(balancer) -> dict:
    """Every figure of the live view, now, without rates (RateTracker.update adds them)."""
    b = balancer
    backends = []
    for pool in b.pools.values():
        for backend in pool:
            row = backend_row(backend)
            row["admin"] = ADMIN_STATES[row["state"]]
            backends.append(row)
    return {
        "ts": time.time(),
        "info": show_info_fields(b),
        "pools": [pool_row(p) for p in b.pools.values()],
        "backends": backends,
        "listeners": [listener_row(lst) for lst in b.listeners.values()],
        "workers": worker_rows(b),
        "drains": [],
    }


def _counters(snap: dict) -> dict:
    """The counters rates are taken of, keyed by (kind, row key)."""
    out = {}
    for row in snap["backends"]:
        out["backend", row["pool"], row["name"]] = (
            {k: row[k] for k in BACKEND_RATES} | {"active": row["active"]})
    for row in snap["listeners"]:
        out["listener", row["name"]] = {k: row[k] for k in LISTENER_RATES}
    for row in snap["workers"]:
        out["worker", row["worker"]] = {k: row[k] for k in WORKER_RATES}
    return out


def _key(kind: str, row: dict) -> tuple:
    if kind == "backend":
        return ("backend", row["pool"], row["name"])
    if kind == "listener":
        return ("listener", row["name"])
    return ("worker", row["worker"])


class RateTracker:
    """Successive snapshots of one viewer (a subscriber, the status page) -> rates.

    Not thread-safe; loop thread only, like the rows it reads."""

    def __init__(self, min_interval: float = 0.0):
        self.min_interval = min_interval      # seconds a sample's rates are reused for
        self.ts: float | None = None          # when the last sample was taken
        self.counters: dict = {}              # its counters (see _counters)
        self.rates: dict = {}                 # the rates it gave, same keys
        self.interval: float | None = None    # seconds those rates were measured over
        self.close_rates: dict = {}           # draining backend key -> smoothed closes/s

    def update(self, snap: dict) -> dict:
        """Give `snap`'s rows their `rates` and fill its `drains`; returns `snap`."""
        now = snap["ts"]
        if self.ts is None or now - self.ts >= self.min_interval:
            self._sample(snap, now)
        snap["interval"] = self.interval
        for kind, section in (("backend", "backends"), ("listener", "listeners"),
                              ("worker", "workers")):
            for row in snap[section]:
                row["rates"] = self.rates.get(_key(kind, row))
        snap["drains"] = [self._drain(row) for row in snap["backends"]
                          if row["state"] == "draining"]
        return snap

    def _sample(self, snap: dict, now: float) -> None:
        counters = _counters(snap)
        if self.ts is not None and now > self.ts:
            dt = now - self.ts
            names = {"backend": BACKEND_RATES, "listener": LISTENER_RATES,
                     "worker": WORKER_RATES}
            rates = {}
            for key, values in counters.items():
                before = self.counters.get(key)
                if before is None:                 # added since: no rate yet
                    continue
                # max(0, ...): a counter can only go back if its object was replaced
                # (a backend removed and added again); that is no negative rate.
                rates[key] = {rate: round(max(0, values[c] - before[c]) / dt, 3)
                              for c, rate in names[key[0]].items()}
                if key[0] == "backend":
                    closes = (max(0, before["active"] - values["active"])
                              + max(0, values["total"] - before["total"])) / dt
                    rates[key]["closes_s"] = round(closes, 3)
            self.rates = rates
            self.interval = round(dt, 3)
            self._smooth_close_rates(snap)
        self.ts = now
        self.counters = counters

    def _smooth_close_rates(self, snap: dict) -> None:
        smoothed = {}
        for row in snap["backends"]:
            if row["state"] != "draining":
                continue
            key = _key("backend", row)
            rate = self.rates.get(key)
            if rate is None:
                continue
            old = self.close_rates.get(key)
            new = rate["closes_s"]
            smoothed[key] = new if old is None else (
                DRAIN_SMOOTHING * new + (1 - DRAIN_SMOOTHING) * old)
        self.close_rates = smoothed

    def _drain(self, row: dict) -> dict:
        remaining = row["active"]
        rate = self.close_rates.get(_key("backend", row))
        if remaining == 0:
            eta = 0.0
        elif rate:
            eta = round(remaining / rate, 1)
        else:
            eta = None
        return {"pool": row["pool"], "backend": row["name"], "set_by": row["set_by"],
                "remaining": remaining,
                "closes_s": None if rate is None else round(rate, 3),
                "eta_s": eta, "drained": remaining == 0}


def live_snapshot(balancer, tracker: RateTracker) -> dict:
    """A snapshot with its rates and drains: what one frame of the live view shows."""
    return tracker.update(snapshot(balancer))


# --- how a figure is written (l4lb top and the status page; the page's script mirrors it)

def field(row: dict, path: str):
    """row["a"]["b"] for path "a.b"; None where a step is missing or null."""
    value = row
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def format_count(value) -> str:
    """A rate or a count for a narrow column: 3, 12.5, 1.2k, 3.4M; "-" for none."""
    if value is None:
        return "-"
    # from 10,000 on in thousands: up to 9999 fits the column as it is
    for limit, unit, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(value) >= limit:
            return f"{value / unit:.1f}{suffix}"
    if isinstance(value, float) and value != int(value):
        return f"{value:.2f}" if abs(value) < 0.1 else f"{value:.1f}"
    return str(int(value))


def format_bytes(value) -> str:
    """Bytes (per second) in binary units: 512B, 1.5K, 20M; "-" for none."""
    if value is None:
        return "-"
    for limit, suffix in ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{int(value)}B"


def format_eta(drain: dict) -> str:
    """A drain's ETA: "done", "12s", "3m20s", or "?" before a close was seen."""
    if drain["drained"]:
        return "done"
    eta = drain["eta_s"]
    if eta is None:
        return "?"
    if eta < 60:
        return f"{eta:.0f}s"
    if eta < 3600:
        return f"{int(eta // 60)}m{int(eta % 60):02d}s"
    return f"{eta / 3600:.1f}h"


FORMATS = {"text": lambda v: "-" if v is None else str(v), "count": format_count,
           "bytes": format_bytes}


class Column:
    """One column of the backend table: its heading, the row field and how it reads."""

    def __init__(self, key: str, heading: str, path: str, kind: str = "text"):
        self.key, self.heading, self.path, self.kind = key, heading, path, kind

    def text(self, row: dict) -> str:
        return FORMATS[self.kind](field(row, self.path))

    def as_json(self) -> dict:
        return {"key": self.key, "heading": self.heading, "path": self.path, "kind": self.kind}


# The backend table of both viewers. `key` names the cell (the status page's class
# `c-KEY`, `l4lb top`'s sort keys).
BACKEND_COLUMNS = (
    Column("backend", "backend", "name"),
    Column("address", "address", "address"),
    Column("admin", "admin", "admin"),
    Column("health", "health", "health"),
    Column("weight", "weight", "weight", "count"),
    Column("active", "active", "active", "count"),
    Column("total", "total", "total", "count"),
    Column("new", "new/s", "rates.new_s", "count"),
    Column("in", "in/s", "rates.bytes_in_s", "bytes"),
    Column("out", "out/s", "rates.bytes_out_s", "bytes"),
    Column("errors", "err/s", "rates.errors_s", "count"),
    Column("failed", "failed", "failed", "count"),
)
