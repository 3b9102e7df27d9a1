"""One row per model object, built in one place: the `show backends` and `show listeners`
rows, which the metrics collector reads too, so an operator's table and a scrape can never
disagree on a figure (issue 14 item 5).

`pool_row` and `worker_rows` are read by the live view (l4lb.live: `subscribe`, `l4lb
top`, /status.json) and `queue_length` by the metrics too.

A row is a plain dict of JSON values, read from the model and the relay's C counters at
the moment it is built; building one costs a few attribute reads, never a walk of the
connections.
"""
from __future__ import annotations

from .health import probe_address
from .resolver import is_srv_name


def backend_row(b) -> dict:
    """One `show backends` row of backend `b` (an l4lb.model.Backend)."""
    t = b.target
    rt = t.connect_time_average
    resp = t.response_time_average
    health = b.pool.config.health
    return {
        "pool": b.pool.name,
        "name": b.name,
        "address": str(b.address),
        "state": str(b.state),
        "health": b.health,
        "checked": health is not None,
        "check_address": None if health is None else str(probe_address(b, health)),
        "weight": b.weight,
        "backup": b.backup,
        "active": t.active,
        "total": t.total,
        "failed": t.failed,
        "bytes_in": t.bytes_in,
        "bytes_out": t.bytes_out,
        "rt_ms": None if rt is None else round(rt * 1000.0, 3),     # connect time EWMA
        # Response time EWMA (first bytes back after the client's first bytes), and how
        # many connections gave one (banner-first ones do not).
        "resp_ms": None if resp is None else round(resp * 1000.0, 3),
        "responses": t.responses,
        "last_check": b.last_check,
        "last_error": b.last_error,
        "check_duration_ms": (None if b.check_duration is None
                              else round(b.check_duration * 1000.0, 3)),
        "check_failures": b.check_failures,
        "connect_failures": dict(b.connect_failures),
        "set_by": b.set_by,
        # hostname addresses only (None otherwise, and before a first DNS answer): the IPs
        # new connections try in order ("ip:port" for an SRV name, whose records give the
        # port), and the error while lookups fail (the last answer is kept meanwhile)
        "resolved": None if t.resolved is None else _resolved(b.address.host, t.resolved),
        "resolve_error": b.resolve_error,
    }


def conn_row(r, now: float) -> dict:
    """One `show conns` row of relay `r` (in the worker that holds it; `now` is
    _native.monotonic())."""
    return {
        "id": r.id,
        "client": f"{r.client_host}:{r.client_port}",
        "listener": r.listener.name,
        "pool": r.pool_name,
        "backend": r.backend_name,
        "state": r.state_name,
        "sni": r.sni,
        "route": r.route,
        "age_s": round(now - r.started, 3),
        "bytes_in": r.bytes_in,
        "bytes_out": r.bytes_out,
    }


def _resolved(host: str, resolved: list) -> list[str]:
    if not is_srv_name(host):
        return [ip for _, ip, _ in resolved]
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for _, ip, port in resolved]


def listener_row(listener) -> dict:
    """One `show listeners` row of `listener` (a running listener of the Balancer)."""
    rt = listener.runtime
    return {
        "name": listener.name,
        "bind": [str(a) for a in listener.config.bind],
        "pool": listener.pool_name,
        "split": listener.split,
        "splice": listener.config.splice,
        "active": rt.active,
        "accepted": rt.accepted,
        "rejected": dict(rt.rejected),
        # sni listeners only (None otherwise): each pattern's route, and how the
        # ClientHello inspections ended (tls_found, sni_found, not_tls, too_large,
        # malformed, inspect_timeout).
        "sni": {p: dict(r) for p, r in listener.sni_routes.items()} if rt.sni_routes else None,
        "inspected": rt.inspection_counts() if rt.sni_routes else None,
    }


def queue_length(rt) -> int:
    """Clients of pool runtime `rt` still queued. The deque may hold relays that left it
    (timed out, gone) until a freed slot trims them, so they are counted by state; the
    walk is bounded by the queue, which is bounded by max_connections."""
    return sum(1 for r in rt.queue if r.state_name == "queued")


def pool_row(pool) -> dict:
    """One pool's own figures (an l4lb.model.Pool): its algorithm and its queue."""
    rt = pool.runtime
    return {
        "name": pool.name,
        "algorithm": pool.config.algorithm,
        "backends": len(pool.backends),
        "queue": queue_length(rt),
        "queue_timeouts": rt.queue_timeouts,
        "retries": rt.retried,
    }


def worker_rows(balancer) -> list[dict]:
    """One `show workers` row per worker process of the data path (workers.Workers)."""
    return balancer.workers.rows()
