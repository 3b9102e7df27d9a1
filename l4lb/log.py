"""Structured logging: structlog, JSON lines on stderr (or a console renderer for people).

Events are past-tense snake_case facts with fields (`backend_state_changed`), never
formatted sentences. The data path logs per connection at most (the access line), never
per chunk: one emitted JSON line costs about as much as a whole echo round trip.

LOG_EVENTS lists every event the package logs, with its level and fields: the reference
docs are generated from it (l4lb.docs), and a test checks it against every logging call
in the source, so a new event without an entry here fails the suite.
"""
import logging
import sys
from typing import NamedTuple

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "json", stream=None) -> None:
    """Set up structlog for the whole process. Idempotent; safe to call on reload."""
    if fmt == "json":
        # format_exc_info: log.exception(...) carries its traceback as the `exception`
        # field; without it JSONRenderer writes only "exc_info": true.
        tail = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        tail = [structlog.dev.ConsoleRenderer(colors=False)]
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *tail,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=False,
    )


def get_logger(**bound):
    return structlog.get_logger("l4lb").bind(**bound) if bound else structlog.get_logger("l4lb")


class LogEvent(NamedTuple):
    """One event: its name, level (log.exception logs at "error"), fields and meaning.
    Every line also has `event`, `level` and `timestamp`."""
    name: str
    level: str
    fields: tuple[str, ...]
    doc: str


LOG_EVENTS: tuple[LogEvent, ...] = (
    # start and stop
    LogEvent("fd_limit", "info", ("soft", "hard"),
             "The open-file limit after `l4lb run` raised the soft limit to the hard one."),
    LogEvent("fd_limit_low", "warning", ("soft", "hard", "warning"),
             "The open-file limit is below what global.max_connections needs (2 per "
             "connection, 2 per pipe for up to max_connections / 4 pipes with splice listeners, + 100); `warning` says what to change."),
    LogEvent("control_started", "info", ("socket", "mode"), "The control socket listens."),
    LogEvent("listener_started", "info", ("listener", "bind", "port", "pool", "split"),
             "A listener's bind accepts connections; `port` is the one bound (port 0 "
             "resolved); `pool` or `split` says where its connections go."),
    LogEvent("metrics_started", "info", ("listen", "port"),
             "The Prometheus endpoint serves GET /metrics; `port` is the one bound."),
    LogEvent("metrics_stopped", "info", ("listen",),
             "The Prometheus endpoint at `listen` closed (reload moved or removed it)."),
    LogEvent("started", "info", ("pid", "version", "config", "control"),
             "The balancer runs: every listener is bound."),
    LogEvent("start_failed", "error", ("error",),
             "`l4lb run` could not start (a bind or the control socket failed); it exits 1."),
    LogEvent("shutdown_started", "info", ("active", "timeout"),
             "Graceful shutdown began: listeners closed, `active` connections get "
             "`timeout` seconds to finish."),
    LogEvent("shutdown_finished", "info", ("closed",),
             "Shutdown is done; `closed` connections were still open at the deadline and "
             "were closed."),
    # connections
    LogEvent("connection_closed", "info",
             ("client", "listener", "pool", "backend", "duration_ms", "bytes_in",
              "bytes_out", "reason"),
             "The access log (log.access): one line per closed connection; bytes_in is "
             "client to backend, bytes_out backend to client; `reason` is closed, "
             "client_reset, backend_reset, idle_timeout, connect_refused, connect_timeout, "
             "no_backend, fd_exhausted, shutdown, killed, ..."),
    LogEvent("fd_exhausted", "warning", ("active", "paused", "pause_s", "hint"),
             "The process ran out of file descriptors (a backend connect or an accept "
             "found none): that client is refused without blaming the backend, and the "
             "`paused` listeners stop accepting for `pause_s` seconds (new clients wait in "
             "the kernel backlog). At most one line per 10 s episode."),
    # backends and listeners
    LogEvent("backend_state_changed", "info",
             ("pool", "backend", "old", "new", "cause", "last_error"),
             "A backend moved between up, down, draining and maint; `cause` is operator, "
             "health, passive or state_file."),
    LogEvent("backend_added", "info", ("pool", "backend", "address", "weight"),
             "A backend was added at run time (`add`, or re-applied from the state file)."),
    LogEvent("backend_removed", "info", ("pool", "backend", "active"),
             "A backend was removed (`remove`, or a reload dropped it); `active` "
             "connections finish on their own."),
    LogEvent("listener_switched", "info", ("listener", "pool", "previous"),
             "`switch`: every new connection of the listener goes to `pool` (blue-green)."),
    LogEvent("listener_split", "info", ("listener", "split", "previous"),
             "`split`: the listener's new connections are shared by percentage (canary)."),
    # config and state
    LogEvent("config_reloaded", "info", ("path", "cause", "changes"),
             "A reload (`cause` command or sighup) applied the config file; `changes` "
             "lists what changed."),
    LogEvent("config_rejected", "error", ("path", "cause", "errors"),
             "A reload found the config file unusable (or a new bind failed); nothing "
             "changed and `errors` says why."),
    LogEvent("state_file_not_saved", "error", ("path", "error"),
             "The runtime state file could not be written; the change is applied but will "
             "not survive a restart."),
    LogEvent("state_file_ignored", "error", ("path", "error"),
             "The runtime state file is unreadable or malformed; it was ignored at start."),
    LogEvent("state_entry_ignored", "warning", ("section", "key", "error"),
             "One entry of the state file no longer fits the config (unknown pool, ...) "
             "and was dropped."),
    LogEvent("health_checks_started", "info",
             ("pool", "interval", "timeout", "rise", "fall", "backends"),
             "A pool's active health checks started (at start, or when a reload adds them)."),
    LogEvent("backend_connections_closed", "info", ("pool", "backend", "closed", "reason"),
             "A backend marked down in a pool with on_down = \"close\" had its open "
             "connections closed."),
    # bugs: these carry the traceback as `exception`
    LogEvent("sweep_failed", "error", ("exception",),
             "The periodic timeout sweep raised; it keeps running. A bug: please report it."),
    LogEvent("control_command_failed", "error", ("command", "exception"),
             "A control command raised; its client got an error reply. A bug: please report it."),
    LogEvent("health_check_crashed", "error", ("pool", "backend", "exception"),
             "A health checker raised; it keeps checking. A bug: please report it."),
    LogEvent("metrics_scrape_failed", "error", ("exception",),
             "Collecting the metrics raised; the scraper got a 500. A bug: please report it."),
)

LOG_EVENTS_BY_NAME = {e.name: e for e in LOG_EVENTS}
