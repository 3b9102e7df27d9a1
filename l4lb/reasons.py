"""Why a client connection ended or was refused: every reason word, with its kind and doc.

The relay (ext/l4lb) and the Python side (health, the balancer's kill and shutdown, the
acl gate) pass these words as string literals, because a reason is chosen on the hot path
where a lookup would cost; this table is what they mean. docs/REFERENCE.md renders it
(l4lb.docs), and tests/unit/test_reasons.py scans the sources by call pattern so that
every reason literal the code passes is here and every entry here is passed somewhere.

Kinds, one reason may have several:
- ``close``: the `reason` of the access log's connection_closed line (the connection was
  accepted and counted active; it ended this way).
- ``reject``: counted in its listener's `rejected` table (`show listeners`,
  l4lb_listener_rejected_total): the client was refused before any byte was relayed.
- ``connect``: a connect to a backend failed this way; it becomes that backend's
  `last_error` and feeds passive health checks, and, after the last retry, the close
  reason of the client's connection.
"""
from __future__ import annotations

from typing import NamedTuple

__all__ = ["KINDS", "REASONS", "REASONS_BY_WORD", "Reason"]

KINDS = ("close", "reject", "connect")


class Reason(NamedTuple):
    word: str
    kinds: tuple[str, ...]
    doc: str


REASONS: tuple[Reason, ...] = (
    # a relayed connection's end
    Reason("closed", ("close",),
           "Both sides finished normally (each sent its FIN, or one side closed after the other)."),
    Reason("client_reset", ("close",),
           "The client reset the connection (RST, or a socket error on its side)."),
    Reason("backend_reset", ("close",),
           "The backend reset the connection (RST, or a socket error on its side)."),
    Reason("client_gone", ("close",),
           "The client closed before it was connected to a backend, or vanished while its "
           "PROXY header was being read."),
    Reason("idle_timeout", ("close",),
           "No byte moved in either direction for the listener's idle_timeout."),
    Reason("shutdown", ("close",),
           "Still open when a graceful shutdown's timeout ran out."),
    Reason("killed", ("close",),
           "Closed by the operator: `kill POOL/BACKEND` (or a forced remove)."),
    Reason("backend_down", ("close",),
           "Its backend was marked down in a pool with on_down = \"close\"."),
    # no backend to relay to
    Reason("no_pool", ("close",),
           "The listener's route names no pool that exists (a split or switch to a pool "
           "since removed)."),
    Reason("no_backend", ("close",),
           "No backend of the pool was eligible (none up, or every one at weight 0). When "
           "backends were tried and every one failed, the close names the last failure "
           "instead (connect_refused, connect_timeout, connect_error, backend_reset)."),
    Reason("connect_refused", ("connect", "close"),
           "The backend refused the connection (ECONNREFUSED)."),
    Reason("connect_timeout", ("connect", "close"),
           "Connecting to the backend took longer than connect_timeout (or ETIMEDOUT)."),
    Reason("connect_error", ("connect", "close"),
           "Connecting to the backend failed otherwise (unreachable, name not resolved, ...)."),
    # refused clients
    Reason("global_max_connections", ("reject",),
           "global.max_connections connections were open: the client was closed at once."),
    Reason("max_connections", ("reject",),
           "The listener's max_connections connections were open: the client was closed at once."),
    Reason("queue_timeout", ("reject", "close"),
           "Every backend was at its max_connections for the listener's queue_timeout."),
    Reason("bad_proxy_header", ("reject", "close"),
           "With accept_proxy: the client's PROXY header was malformed or missing."),
    Reason("proxy_timeout", ("reject", "close"),
           "With accept_proxy: the client did not send its whole PROXY header within "
           "proxy_timeout (a slowloris guard)."),
    Reason("fd_exhausted", ("reject", "close"),
           "The process had no file descriptor left for the backend socket: the client was "
           "refused without blaming the backend."),
    Reason("accept_paused", ("reject",),
           "accept() found no descriptor (or memory): the listener paused accepting for a "
           "moment; counts pauses, not clients (they wait in the kernel backlog)."),
    Reason("denied", ("reject", "close"),
           "The client's address is in the listener's deny list (longest prefix)."),
    Reason("not_allowed", ("reject", "close"),
           "The listener has an allow list and the client's address is in none of it."),
    Reason("per_source_max_connections", ("reject", "close"),
           "The client's address already had per_source_max_connections connections open."),
    Reason("per_source_rate", ("reject", "close"),
           "The client's address opened connections faster than per_source_rate."),
    Reason("per_source_table_full", ("reject", "close"),
           "The per-source table was full (100,000 addresses): a new address is refused "
           "until idle ones expire."),
)

REASONS_BY_WORD: dict[str, Reason] = {reason.word: reason for reason in REASONS}
