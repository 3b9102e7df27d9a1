"""The metrics: the table of every exported metric and the collector that fills it.

Theory of operation
-------------------
Nothing is counted through prometheus-client. The relay keeps its counters in C integers
(Target, ListenerRuntime, Hub in ext/l4lb/relay.pxd); at scrape time BalancerCollector
walks the pools' backends and the listeners once and copies those integers into metric
families, which prometheus-client renders in its text format. So a scrape costs
O(backends + listeners), independent of how many connections are open (open descriptors
are counted with one stat of /proc/self/fd, see l4lb.process.count_open_fds), and the data path pays
nothing for being observed.

The collector runs on the loop thread (it reads Cython objects the loop mutates); the
HTTP side that serves it is l4lb.endpoint. The backend and listener figures come from the
same rows as `show backends` and `show listeners` (l4lb.rows), the process figures from
l4lb.process, shared with `show info`.

METRICS is the list of every metric with its type, labels and meaning; the collector
builds its families from it and docs/REFERENCE.md is generated from it (l4lb.docs).
"""
from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Iterator, NamedTuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from . import __version__
from .log import dropped_lines
from .model import BackendState
from .process import process_probe
from .rows import backend_row, listener_row, queue_length, worker_rows

if TYPE_CHECKING:
    from .balancer import Balancer

# --- the metrics -------------------------------------------------------------------------


class MetricSpec(NamedTuple):
    """One exported metric. `name` is the sample name as scraped (counters end in
    `_total`); `kind` is "counter" or "gauge"."""
    name: str
    kind: str
    labels: tuple[str, ...]
    doc: str

    def family(self):
        """An empty prometheus-client family for this metric."""
        if self.kind == "counter":
            # CounterMetricFamily takes the name without `_total` and adds it to samples.
            return CounterMetricFamily(self.name.removesuffix("_total"), self.doc,
                                       labels=self.labels)
        return GaugeMetricFamily(self.name, self.doc, labels=self.labels)


_BACKEND = ("pool", "backend")

# Names prometheus-client's ProcessCollector uses, so stock dashboards and alerts on
# process_* work unchanged (issue 21); the l4lb_process_* and l4lb_uptime_seconds names
# of 0.2 are gone.
PROCESS_PREFIX = "process_"

METRICS: tuple[MetricSpec, ...] = (
    # process
    MetricSpec("l4lb_info", "gauge", ("version",), "Always 1; the version label says which l4lb runs."),
    MetricSpec("process_start_time_seconds", "gauge", (),
               "Start time of the process since the Unix epoch, in seconds."),
    MetricSpec("process_cpu_seconds_total", "counter", (),
               "CPU time (user + system) the process has used, in seconds."),
    MetricSpec("process_resident_memory_bytes", "gauge", (), "Resident set size (RSS) in bytes."),
    MetricSpec("process_virtual_memory_bytes", "gauge", (), "Virtual memory size in bytes."),
    MetricSpec("process_open_fds", "gauge", (), "File descriptors the process has open."),
    MetricSpec("process_max_fds", "gauge", (),
               "The soft limit on open file descriptors (RLIMIT_NOFILE); each relayed "
               "connection holds two."),
    MetricSpec("l4lb_connections_active", "gauge", (), "Client connections open now, all listeners."),
    MetricSpec("l4lb_connections_total", "counter", (), "Client connections admitted since start, all listeners."),
    MetricSpec("l4lb_worker_active_connections", "gauge", ("worker",),
               "Client connections open now on one worker process."),
    MetricSpec("l4lb_worker_accepted_total", "counter", ("worker",),
               "Client connections one worker accepted and admitted, since it last started."),
    MetricSpec("l4lb_log_lines_dropped_total", "counter", (),
               "Log lines dropped because stderr did not take them (its reader stalled)."),
    MetricSpec("l4lb_metrics_scrape_duration_seconds", "gauge", (),
               "How long the previous scrape took to collect and render, in seconds."),
    # listeners
    MetricSpec("l4lb_listener_accepted_total", "counter", ("listener",),
               "Client connections accepted and admitted by the listener."),
    MetricSpec("l4lb_listener_rejected_total", "counter", ("listener", "reason"),
               "Client connections closed without being relayed, by reason (limits, ACL, "
               "bad PROXY header, queue timeout, fd exhaustion, ...)."),
    MetricSpec("l4lb_listener_inspected_total", "counter", ("listener", "outcome"),
               "ClientHello inspections of an sni listener ended, by outcome: tls_found (a "
               "whole hello), sni_found (one naming a server), not_tls, too_large, malformed "
               "(bad fields, or an EOF before the whole hello), inspect_timeout."),
    MetricSpec("l4lb_listener_sni_route_ratio", "gauge", ("listener", "sni", "pool"),
               "Share (0..1) of an sni route's new connections sent to the pool, as "
               "l4lb_listener_split_ratio for the listener's default route."),
    MetricSpec("l4lb_listener_active_connections", "gauge", ("listener",),
               "Client connections of the listener open now."),
    MetricSpec("l4lb_listener_split_ratio", "gauge", ("listener", "pool"),
               "Share (0..1) of the listener's new connections routed to the pool: 1 for "
               "the active pool of a plain listener, the split percentage / 100 in a canary."),
    # pools
    MetricSpec("l4lb_pool_queue_length", "gauge", ("pool",),
               "Clients waiting in the pool's queue now (every eligible backend at its "
               "max_connections)."),
    MetricSpec("l4lb_pool_queue_timeouts_total", "counter", ("pool",),
               "Queued clients closed because their listener's queue_timeout passed."),
    MetricSpec("l4lb_pool_retries_total", "counter", ("pool",),
               "Connects tried again on another backend of the pool after a failed one "
               "(listener `retries`)."),
    # backends
    MetricSpec("l4lb_backend_active_connections", "gauge", _BACKEND,
               "Connections assigned to the backend and not yet closed."),
    MetricSpec("l4lb_backend_connections_total", "counter", _BACKEND,
               "Connections that reached the backend (connect succeeded)."),
    MetricSpec("l4lb_backend_bytes_total", "counter", _BACKEND + ("direction",),
               "Bytes relayed through the backend's connections: direction=\"in\" client "
               "to backend, direction=\"out\" backend to client."),
    MetricSpec("l4lb_backend_connect_failures_total", "counter", _BACKEND,
               "Connects to the backend that were refused, failed or timed out."),
    MetricSpec("l4lb_backend_connect_failures_by_reason_total", "counter", _BACKEND + ("reason",),
               "The same connect failures by reason: connect_refused, connect_timeout, "
               "connect_error, ..."),
    MetricSpec("l4lb_backend_up", "gauge", _BACKEND,
               "0 when the backend is broken as far as health goes (state down, or its last "
               "check failed), else 1. Admin states do not move it: a draining or maint "
               "backend that passes (or is not checked) is 1, so an alert on it does not "
               "fire in a deploy. Whether it takes traffic: l4lb_backend_state."),
    MetricSpec("l4lb_backend_state", "gauge", _BACKEND + ("state",),
               "1 for the backend's current state (up, down, draining, maint), 0 for the others."),
    MetricSpec("l4lb_backend_admin_state", "gauge", _BACKEND + ("state",),
               "1 for the state the operator set (enabled, draining, maint), 0 for the "
               "others; health never moves it (HAProxy's server admin state)."),
    MetricSpec("l4lb_backend_health", "gauge", _BACKEND + ("status",),
               "1 for the backend's last check result (passing, failing, unchecked), 0 for "
               "the others; kept current while draining (HAProxy's server_check_status)."),
    MetricSpec("l4lb_backend_check_failures", "gauge", _BACKEND,
               "Failed checks in a row (active probes and passive connect failures); "
               "0 after a pass."),
    MetricSpec("l4lb_backend_check_duration_seconds", "gauge", _BACKEND,
               "How long the last active probe took, in seconds; absent before the first."),
    MetricSpec("l4lb_backend_check_timestamp_seconds", "gauge", _BACKEND,
               "When the last active probe finished, since the Unix epoch; absent before the first."),
    MetricSpec("l4lb_backend_backup", "gauge", _BACKEND,
               "1 for a backup backend (used only when no other backend of its pool is up)."),
    MetricSpec("l4lb_backend_weight", "gauge", _BACKEND,
               "The backend's configured weight (0 = no new connections)."),
    MetricSpec("l4lb_backend_resolved_addresses", "gauge", _BACKEND,
               "Hostname backends only: addresses in the name's last good DNS answer (the "
               "ones new connections try); absent before the first answer."),
    MetricSpec("l4lb_backend_resolve_failing", "gauge", _BACKEND,
               "Hostname backends only: 1 while the name's DNS lookups fail (the last good "
               "answer stays in use), else 0."),
    MetricSpec("l4lb_backend_connect_time_average_seconds", "gauge", _BACKEND,
               "Exponentially weighted moving average of the backend's connect time in "
               "seconds; absent until its first connection."),
    MetricSpec("l4lb_backend_response_time_average_seconds", "gauge", _BACKEND,
               "Exponentially weighted moving average of the backend's response time in "
               "seconds: from a connection's first client bytes passed on to the "
               "backend's first bytes back (connections where the backend speaks first "
               "give none); absent until the first one."),
    MetricSpec("l4lb_backend_responses_total", "counter", _BACKEND,
               "Connections of the backend that gave a response time (its first bytes "
               "back after the client's first bytes)."),
    MetricSpec("l4lb_backend_response_time_seconds", "gauge", _BACKEND,
               "Deprecated (removed in the next release): the same figure as "
               "l4lb_backend_connect_time_average_seconds, under its old name."),
)

# Admin state per model state: up and down are health's, the other two the operator's.
ADMIN_STATES = {"up": "enabled", "down": "enabled", "draining": "draining", "maint": "maint"}
HEALTH_STATUSES = ("passing", "failing", "unchecked")

_STATES = tuple(str(s) for s in BackendState)


# --- the collector ---------------------------------------------------------------------------


class BalancerCollector:
    """A prometheus-client collector that reads a Balancer's counters at scrape time.

    Runs on the balancer's loop thread (it reads Cython objects the loop mutates). Walks
    pools, backends and listeners once; never the connections."""

    def __init__(self, balancer: "Balancer"):
        self.balancer = balancer
        self.last_duration = 0.0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def describe(self):
        # Nothing to describe up front: registering must not run a scrape.
        return []

    def collect(self) -> Iterator:
        b = self.balancer
        fam = {spec.name: spec.family() for spec in METRICS}

        def put(name, labels, value):
            fam[name].add_metric(labels, value)

        proc = process_probe().read()
        put("l4lb_info", [__version__], 1)
        put("process_start_time_seconds", [], proc.start_time or b.started_at)
        put("process_cpu_seconds_total", [], proc.cpu_seconds)
        put("process_resident_memory_bytes", [], proc.rss_bytes)
        put("process_virtual_memory_bytes", [], proc.vms_bytes)
        put("process_open_fds", [], proc.open_fds)
        put("process_max_fds", [], proc.fd_soft)
        put("l4lb_connections_active", [], b.hub.active)
        put("l4lb_connections_total", [], b.hub.total)
        for row in worker_rows(b):
            put("l4lb_worker_active_connections", [str(row["worker"])], row["active"])
            put("l4lb_worker_accepted_total", [str(row["worker"])], row["accepted"])
        put("l4lb_log_lines_dropped_total", [], dropped_lines())
        put("l4lb_metrics_scrape_duration_seconds", [], self.last_duration)

        for listener in b.listeners.values():
            row = listener_row(listener)
            name = row["name"]
            put("l4lb_listener_accepted_total", [name], row["accepted"])
            put("l4lb_listener_active_connections", [name], row["active"])
            for reason, count in row["rejected"].items():
                put("l4lb_listener_rejected_total", [name, reason], count)
            if row["split"]:
                for pool, pct in row["split"].items():
                    put("l4lb_listener_split_ratio", [name, pool], pct / 100.0)
            elif row["pool"] is not None:
                put("l4lb_listener_split_ratio", [name, row["pool"]], 1.0)
            for outcome, count in (row["inspected"] or {}).items():
                put("l4lb_listener_inspected_total", [name, outcome], count)
            for pattern, route in (row["sni"] or {}).items():
                shares = route.get("split") or {route["pool"]: 100}
                for pool, pct in shares.items():
                    put("l4lb_listener_sni_route_ratio", [name, pattern, pool], pct / 100.0)

        for pool in b.pools.values():
            rt = pool.runtime
            put("l4lb_pool_queue_length", [pool.name], queue_length(rt))
            put("l4lb_pool_queue_timeouts_total", [pool.name], rt.queue_timeouts)
            put("l4lb_pool_retries_total", [pool.name], rt.retried)
            for backend in pool.backends.values():
                row = backend_row(backend)
                labels = [row["pool"], row["name"]]
                state = row["state"]
                health = row["health"]
                put("l4lb_backend_active_connections", labels, row["active"])
                put("l4lb_backend_connections_total", labels, row["total"])
                put("l4lb_backend_bytes_total", labels + ["in"], row["bytes_in"])
                put("l4lb_backend_bytes_total", labels + ["out"], row["bytes_out"])
                put("l4lb_backend_connect_failures_total", labels, row["failed"])
                for reason, count in row["connect_failures"].items():
                    put("l4lb_backend_connect_failures_by_reason_total", labels + [reason], count)
                put("l4lb_backend_up", labels,
                    0 if state == "down" or health == "failing" else 1)
                for s in _STATES:
                    put("l4lb_backend_state", labels + [s], 1 if s == state else 0)
                admin = ADMIN_STATES[state]
                for s in dict.fromkeys(ADMIN_STATES.values()):
                    put("l4lb_backend_admin_state", labels + [s], 1 if s == admin else 0)
                for s in HEALTH_STATUSES:
                    put("l4lb_backend_health", labels + [s], 1 if s == health else 0)
                put("l4lb_backend_check_failures", labels, row["check_failures"])
                if row["check_duration_ms"] is not None:
                    put("l4lb_backend_check_duration_seconds", labels,
                        row["check_duration_ms"] / 1000.0)
                if row["last_check"] is not None:
                    put("l4lb_backend_check_timestamp_seconds", labels, row["last_check"])
                put("l4lb_backend_backup", labels, 1 if row.get("backup") else 0)
                put("l4lb_backend_weight", labels, row["weight"])
                if row["resolved"] is not None:
                    put("l4lb_backend_resolved_addresses", labels, len(row["resolved"]))
                if backend.address.family == socket.AF_UNSPEC:
                    put("l4lb_backend_resolve_failing", labels,
                        0 if row["resolve_error"] is None else 1)
                if row["rt_ms"] is not None:
                    put("l4lb_backend_connect_time_average_seconds", labels, row["rt_ms"] / 1000.0)
                    put("l4lb_backend_response_time_seconds", labels, row["rt_ms"] / 1000.0)
                if row["resp_ms"] is not None:
                    put("l4lb_backend_response_time_average_seconds", labels,
                        row["resp_ms"] / 1000.0)
                put("l4lb_backend_responses_total", labels, row["responses"])
        return iter(fam.values())

    def render(self) -> bytes:
        """The whole /metrics body in the Prometheus text format."""
        t0 = time.perf_counter()
        body = generate_latest(self.registry)
        self.last_duration = time.perf_counter() - t0
        return body


