"""Structured logging: structlog, JSON lines on stderr (or a console renderer for people).

Events are past-tense snake_case facts with fields (`backend_state_changed`), never
formatted sentences. The data path logs per connection at most (the access line), never
per chunk: one emitted JSON line costs about as much as a whole echo round trip.

LOG_EVENTS lists every event the package logs, with its level and fields: the reference
docs are generated from it (l4lb.docs), and a test checks it against every logging call
in the source, so a new event without an entry here fails the suite.

The writer never waits (issue 20 item 2)
----------------------------------------
A process that writes its log synchronously to a pipe whose reader stalls (a stuck log
shipper, journald under pressure) blocks in write(2) once the pipe's 64 KiB are full; for
an event loop that stops every connection. So lines go to stderr through LogWriter: when
stderr is a pipe or a socket its descriptor is made non-blocking, a line the kernel does
not take at once waits in an in-memory queue of at most LOG_QUEUE_MAX bytes, and the loop
flushes that queue when the descriptor becomes writable (loop.add_writer). A line that
does not fit is dropped whole and counted (dropped_lines()); when the queue has drained
again one `log_lines_dropped` line says how many were lost since the last report.

Why this and not a writer thread: the common case (the reader keeps up) stays one write(2)
per line on the loop thread, as before, while a thread hand-off costs a lock, a wake-up and
a GIL switch per line. Measured here (2026-12-02, 200,000 access-sized lines into a pipe
read by `cat`): 2.5 µs of CPU per line for this writer, 3.5 for the print() it replaces,
4.8 for a writer thread behind a 1,000-line queue, which also dropped 5% of the lines
while the reader kept up (the thread did not get the GIL often enough). Why only pipes and sockets: O_NONBLOCK is a property of the open
file description, shared with whoever else holds it; a terminal is often shared with the
user's shell (which would then see EAGAIN), and a regular file never blocks for long,
while a pipe or socket on stderr belongs to the log reader the service was started with.
"""
import asyncio
import atexit
import collections
import errno
import fcntl
import logging
import os
import select
import stat
import sys
import time
from typing import NamedTuple

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
          "warning": logging.WARNING, "error": logging.ERROR}


# Bytes of log lines held while stderr does not take them; beyond it whole lines are
# dropped. 256 KiB is about 1,000 access lines: minutes of a busy balancer's log when the
# reader only hiccups, a bounded cost when it is gone for good.
LOG_QUEUE_MAX = 256 * 1024
# Bytes handed to one write(2) when flushing the queue: whole lines, at most PIPE_BUF
# bytes, which a pipe writes all at once or not at all. The master and its workers share
# stderr, so a bigger write that the pipe takes in part could put another process's line
# in the middle of one of ours. (The first try of a line is one write of that line.)
FLUSH_CHUNK = select.PIPE_BUF
# Seconds the exit flush may wait for a slow reader before the rest is lost.
EXIT_FLUSH_TIMEOUT = 1.0

# Errors that mean "the descriptor cannot take more now", not "it is gone".
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)


class LogWriter:
    """Writes whole lines to one descriptor without ever waiting (see the module doc).

    Called on the loop thread (every l4lb log call is), also before the loop runs and
    after it stops: without a running loop the queue is flushed at the next write or at
    exit. Failure: a line that can neither be written nor queued is dropped and counted;
    a descriptor that is gone (EPIPE, EBADF) drops everything after it, counted too."""

    def __init__(self, fd: int, queue_max: int = LOG_QUEUE_MAX):
        self.fd = fd
        self.queue_max = queue_max
        self.queue: collections.deque[bytes] = collections.deque()
        self.queued = 0              # bytes in `queue`
        self.dropped = 0             # lines dropped since start (dropped_lines())
        self.unreported = 0          # lines dropped since the last log_lines_dropped
        self.watching = None         # the loop whose add_writer flushes the queue, or None
        self.reporting = False       # writing the log_lines_dropped line itself
        self.nonblocking = self._make_nonblocking(fd)

    @staticmethod
    def _make_nonblocking(fd: int) -> bool:
        """Set O_NONBLOCK on a pipe or socket (see the module doc); True if set."""
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
                return False
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        except OSError:
            return False
        return True

    def write_line(self, text: str) -> None:
        data = text.encode("utf-8", "backslashreplace") + b"\n"
        if self.queue:
            self._flush()
        if not self.queue:
            try:
                written = os.write(self.fd, data)
            except BlockingIOError:
                written = 0
            except OSError:
                self._drop(1)
                return
            if written == len(data):
                return
            data = data[written:]         # the rest of a line already begun must follow
            self._enqueue(data, started=written > 0)
        else:
            self._enqueue(data, started=False)
        self._watch()

    def _enqueue(self, data: bytes, started: bool) -> None:
        if not started and self.queued + len(data) > self.queue_max:
            self._drop(1)
            return
        self.queue.append(data)
        self.queued += len(data)

    def _drop(self, lines: int) -> None:
        self.dropped += lines
        self.unreported += lines

    def _flush(self) -> None:
        """Write what the descriptor takes now; on an empty queue, report drops once."""
        while self.queue:
            chunk = b"".join(self._take(FLUSH_CHUNK))
            try:
                written = os.write(self.fd, chunk)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                if exc.errno in _WOULD_BLOCK:
                    written = 0
                else:                      # the reader is gone: nothing will be read
                    self._drop(len(self.queue) + chunk.count(b"\n"))
                    self.queue.clear()
                    self.queued = 0
                    break
            rest = chunk[written:]
            if rest:
                self.queue.appendleft(rest)
                self.queued += len(rest)
                return
        self._unwatch()
        if self.unreported and not self.reporting:
            count, self.unreported = self.unreported, 0
            self.reporting = True
            try:
                get_logger().warning("log_lines_dropped", count=count, total=self.dropped)
            finally:
                self.reporting = False

    def _take(self, limit: int) -> list[bytes]:
        """Pop queued lines (at least one) up to about `limit` bytes."""
        out, size = [], 0
        while self.queue and (not out or size + len(self.queue[0]) <= limit):
            data = self.queue.popleft()
            out.append(data)
            size += len(data)
        self.queued -= size
        return out

    def _watch(self) -> None:
        """Flush from the loop when the descriptor is writable, if a loop runs here."""
        if self.watching is not None or not self.nonblocking:
            return
        try:
            loop = asyncio.get_running_loop()
            loop.add_writer(self.fd, self._flush)
        except (RuntimeError, OSError, ValueError):
            return                         # no loop: the next write or exit flushes
        self.watching = loop

    def _unwatch(self) -> None:
        loop, self.watching = self.watching, None
        if loop is not None and not loop.is_closed():
            try:
                loop.remove_writer(self.fd)
            except (RuntimeError, OSError, ValueError):
                pass

    def flush_at_exit(self, timeout: float = EXIT_FLUSH_TIMEOUT) -> None:
        """Give a slow reader up to `timeout` s for what is queued (the loop is gone)."""
        self.watching = None
        deadline = time.monotonic() + timeout
        while self.queue:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                select.select([], [self.fd], [], left)
            except (OSError, ValueError):
                break
            self._flush()


class _WriterLogger:
    """The structlog logger that hands each rendered line to a LogWriter."""

    def __init__(self, writer: LogWriter):
        self.writer = writer

    def msg(self, message: str) -> None:
        self.writer.write_line(message)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


_writer: LogWriter | None = None


def stderr_writer() -> LogWriter:
    """The process's one writer for stderr (created on first use, kept across reloads)."""
    global _writer
    if _writer is None:
        _writer = LogWriter(sys.stderr.fileno())
        atexit.register(_writer.flush_at_exit)
    return _writer


def dropped_lines() -> int:
    """Log lines dropped since start because stderr did not take them (for `show info`
    and l4lb_log_lines_dropped_total); 0 before logging is configured."""
    return _writer.dropped if _writer is not None else 0


def configure_logging(level: str = "info", fmt: str = "json", stream=None) -> None:
    """Set up structlog for the whole process. Idempotent; safe to call on reload.
    Lines go to stderr through the non-blocking LogWriter; a `stream` given explicitly
    (tests, tools) is written to synchronously instead."""
    if stream is None or stream is sys.stderr:
        writer = stderr_writer()
        factory = lambda *args: _WriterLogger(writer)   # noqa: E731
    else:
        factory = structlog.PrintLoggerFactory(stream)
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
        logger_factory=factory,
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


# The `cause` of backend_state_changed, each with what it means. The constants that log
# them are the CAUSE_* of l4lb.actions and l4lb.health; a test holds the two together.
STATE_CHANGE_CAUSES = {
    "operator": "a control command (enable, disable, drain)",
    "state_file": "the state file, re-applied at start or reload",
    "health_check": "active probes crossed rise or fall",
    "passive_check": "failed relay connects crossed fall",
    "health_check_removed": "a reload dropped the pool's health section (down -> up)",
    "cluster": "a fleet's change, applied from etcd (l4lb.cluster)",
    "upgrade": "an upgrade's new master: the old master's health checks had it down",
}

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
    LogEvent("listen_fd_taken", "info", ("listener", "bind"),
             "A bind uses the listening socket systemd passed for its address (socket "
             "activation, LISTEN_FDS) instead of opening its own; every worker accepts on it."),
    LogEvent("listen_fds_unused", "warning", ("binds", "hint"),
             "Sockets systemd passed that no listener's bind names; they were closed."),
    LogEvent("started", "info", ("pid", "version", "config", "control", "generation"),
             "The balancer runs: every listener is bound and every worker accepts."),
    LogEvent("worker_started", "info", ("worker", "pid", "generation", "restarts", "startup_ms"),
             "A worker process accepts (at start, and after a restart): `startup_ms` from "
             "its fork to its first accept."),
    LogEvent("worker_exited", "warning", ("worker", "pid", "status", "lost"),
             "A worker process died (`status`: `exit N` or `killed by SIGNAL`) with `lost` "
             "connections open on it; it is started again at once."),
    LogEvent("worker_stopped", "info", ("worker", "pid", "status"),
             "A worker process ended as told (shutdown, or its generation was replaced), "
             "or died while its generation was starting."),
    LogEvent("upgrade_started", "info", ("cause", "argv"),
             "`upgrade` or SIGUSR2: this master starts `argv` (its own command line, the code "
             "installed now) as the new master."),
    LogEvent("upgrade_failed", "error", ("cause", "error"),
             "The new master did not take over (why: its error, or its exit); this master "
             "serves on as before."),
    LogEvent("upgrade_handed_over", "info", ("cause", "pid", "generation", "version"),
             "The new master's workers accept on the same sockets: this master stopped "
             "accepting, finishes its connections (shutdown_started follows) and exits."),
    LogEvent("upgrade_taking_over", "info", ("old_pid", "generation"),
             "This is an upgrade's new master: it takes the old master's sockets and state."),
    LogEvent("listen_fds_taken_over", "info", ("listener", "bind", "sockets"),
             "An upgrade's new master accepts on the old master's sockets of this bind "
             "(nothing is bound again, nothing queued is lost)."),
    LogEvent("workers_replaced", "info", ("generation", "workers", "previous"),
             "A reload changed `global.workers`: the new generation accepts; the previous "
             "workers stopped accepting and finish their connections."),
    LogEvent("workers_not_replaced", "error", ("workers", "error"),
             "A reload's new generation of workers could not start; the running workers "
             "keep serving (the reload's reply says so too)."),
    LogEvent("listen_steering_failed", "warning", ("bind", "error", "hint"),
             "The kernel refused the cBPF program that sends a bind's new connections to "
             "the accepting workers' sockets; connections still spread over every socket "
             "of the bind."),
    LogEvent("worker_not_restarted", "error", ("worker", "reason"),
             "A worker that died is not started again: it died too often, or the fork "
             "server is gone."),
    LogEvent("worker_op_failed", "error", ("worker", "op"),
             "A worker could not carry out a message from the master (with its traceback); "
             "its connections go on."),
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
             ("worker", "client", "listener", "pool", "backend", "duration_ms", "bytes_in",
              "bytes_out", "response_ms", "reason", "sni", "alpn"),
             "The access log (log.access): one line per closed connection, written by the "
             "worker that held it (`worker`); bytes_in is "
             "client to backend, bytes_out backend to client; `reason` is closed, "
             "client_reset, backend_reset, idle_timeout, connect_refused, connect_timeout, "
             "no_backend, fd_exhausted, shutdown, killed, ...; `response_ms` is the "
             "time from the client's first bytes passed on to the backend's first bytes "
             "back (null when the backend spoke first, as a banner, or never answered); "
             "a client refused at "
             "global_max_connections or max_connections gets its line too (backend null, "
             "no bytes); on an sni listener, `sni` is the ClientHello's server name and "
             "`alpn` its ALPN protocols (null when none was read; the name is the client's "
             "word, with ECH the outer one)."),
    LogEvent("fd_exhausted", "warning", ("active", "paused", "pause_s", "hint"),
             "The process ran out of file descriptors (a backend connect or an accept "
             "found none): that client is refused without blaming the backend, and the "
             "`paused` listeners stop accepting for `pause_s` seconds (new clients wait in "
             "the kernel backlog). At most one line per 10 s episode."),
    LogEvent("log_lines_dropped", "warning", ("count", "total"),
             "stderr did not take the log for a while (its reader stalled): `count` lines "
             "were dropped since the last such report, `total` since start. Written once "
             "the writer has caught up; traffic never waits for the log."),
    # backends and listeners
    LogEvent("backend_state_changed", "info",
             ("pool", "backend", "old", "new", "cause", "last_error"),
             "A backend moved between up, down, draining and maint; `cause` is "
             + "; ".join(f"{cause} ({why})" for cause, why in STATE_CHANGE_CAUSES.items())
             + "."),
    LogEvent("backend_added", "info", ("pool", "backend", "address", "weight"),
             "A backend was added at run time (`add`, or re-applied from the state file)."),
    LogEvent("backend_removed", "info", ("pool", "backend", "active"),
             "A backend was removed (`remove`, or a reload dropped it); `active` "
             "connections finish on their own."),
    LogEvent("listener_switched", "info", ("listener", "sni", "pool", "previous"),
             "`switch`: every new connection of the listener (of its sni route `sni`, when "
             "not null) goes to `pool` (blue-green)."),
    LogEvent("listener_split", "info", ("listener", "sni", "split", "previous"),
             "`split`: the listener's new connections (its sni route's, when `sni` is not "
             "null) are shared by percentage (canary)."),
    # config and state
    LogEvent("config_reloaded", "info", ("path", "cause", "changes"),
             "A reload (`cause` command or sighup) applied the config file; `changes` "
             "lists what changed."),
    LogEvent("config_deprecated", "warning", ("warning",),
             "The config sets a key that is kept only for old files (`FILE:LINE key: "
             "message`, e.g. `splice = true`): it changes nothing; delete it."),
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
    LogEvent("resolve_failed", "warning", ("name", "error", "kept"),
             "A hostname backend's DNS lookup failed (NXDOMAIN, timeout, SERVFAIL, no "
             "address); logged once per episode. Its connections keep using the `kept` "
             "addresses (the last good answer; empty before the first one, when each "
             "connection resolves the name itself), and it is retried every resolvers.retry."),
    LogEvent("resolve_recovered", "info", ("name", "failed_for", "addresses"),
             "A hostname that was failing resolved again (`failed_for`: its last error)."),
    LogEvent("resolve_changed", "info", ("name", "ttl", "addresses", "previous"),
             "A hostname backend's DNS answer changed (or came for the first time); new "
             "connections go to `addresses`, open ones keep theirs."),
    # a fleet ([cluster], l4lb.cluster)
    LogEvent("cluster_connected", "info", ("node", "endpoint", "revision", "how"),
             "The node has a session with etcd; its watch runs from `revision` on. `how`: "
             "first (the whole state read), resumed (from the revision it had applied), "
             "compacted (etcd had compacted past it) or behind (etcd's revision is below it: "
             "a store rebuilt); the last two read everything again and apply the difference."),
    LogEvent("cluster_disconnected", "warning", ("node", "endpoint", "error", "revision"),
             "The etcd session failed or could not start: the node keeps serving the state "
             "of `revision` (fail static), refuses writes with `error`, and retries."),
    LogEvent("cluster_resynced", "info", ("node", "revision", "how", "changes"),
             "The node read the whole fleet state at `revision` and applied what differed "
             "(`changes`: backends and routes looked at)."),
    LogEvent("cluster_node_joined", "info", ("node",),
             "A node's record appeared: it is live in the fleet."),
    LogEvent("cluster_node_left", "info", ("node",),
             "A node's record is gone (it stopped, or its lease expired): it no longer "
             "counts for `--fleet`, `wait` and deploys."),
    LogEvent("cluster_entry_ignored", "warning", ("section", "key", "error"),
             "An entry of the fleet's state breaks a rule or names what this node's config "
             "lacks; it was skipped here (the other nodes may apply it)."),
    LogEvent("listener_routed", "info", ("listener", "sni", "route", "cause"),
             "A fleet's switch or split moved a route of this node's listener."),
    # bugs: these carry the traceback as `exception`
    LogEvent("sweep_failed", "error", ("exception",),
             "The periodic timeout sweep raised; it keeps running. A bug: please report it."),
    LogEvent("control_command_failed", "error", ("command", "exception"),
             "A control command raised; its client got an error reply. A bug: please report it."),
    LogEvent("subscriber_dropped", "warning", ("skipped", "interval"),
             "A `subscribe` client read none of its frames for `skipped` intervals in a row "
             "(its unread frames passed 256 KiB): the connection was closed, so a stuck "
             "viewer costs no memory. Subscribe again to resume."),
    LogEvent("status_page_failed", "error", ("exception",),
             "Building the status page or /status.json raised; the client got a 500. A "
             "bug: please report it."),
    LogEvent("health_check_crashed", "error", ("pool", "backend", "exception"),
             "A health checker raised; it keeps checking. A bug: please report it."),
    LogEvent("metrics_scrape_failed", "error", ("exception",),
             "Collecting the metrics raised; the scraper got a 500. A bug: please report it."),
    LogEvent("cluster_apply_failed", "error", ("exception",),
             "Applying a fleet's change from etcd raised; the node reads the whole state "
             "again. A bug: please report it."),
    LogEvent("resolver_failed", "error", ("exception",),
             "A round of the DNS resolver raised; it keeps resolving. A bug: please report it."),
)

LOG_EVENTS_BY_NAME = {e.name: e for e in LOG_EVENTS}
