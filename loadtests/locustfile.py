"""Locust TCP users for l4lb: line request/response through the balancer.

    locust -f loadtests/locustfile.py PersistentUser -H 127.0.0.1:8000 --headless -u 20 -r 20 -t 10s
    locust -f loadtests/locustfile.py ConnectionPerRequestUser -H 127.0.0.1:8000 --headless -u 20 -r 20 -t 10s

The target (-H) is the balancer's HOST:PORT (a `tcp://` prefix is accepted); behind it run
line-echo backends (loadtests/echo_server.py). Each request sends one line and reads one
line back; the reply must end with what was sent ("NAME: " in front is a backend's version
tag, see echo_server.py --name).

- PersistentUser: one connection per user, kept open; requests named "line". A broken
  connection is reported as a failure and reopened on the next request ("connect").
  With --tcp-reconnect-every N the user closes its connection itself after about N
  requests (each connection draws its limit from N/2..3N/2, so users spawned together
  don't reconnect in step) and opens a new one, as pooled clients with keep-alive limits
  do; that is what lets a drain (l4lb deploy) finish without cutting anyone off.
- ConnectionPerRequestUser: a new connection per request, closed after the reply; requests
  named "connect+line" and timed from connect() to the reply.

Both report through `environment.events.request` with request_type "tcp", the response time
in ms, the reply length and the exception (None on success); `context` carries the version
tag of the backend that answered. Locust users are gevent greenlets: the socket module is
gevent's cooperative one here.

Options added to locust's command line:
  --tcp-timeout S     connect/read timeout per request (default 5)
  --tcp-wait S        pause between a user's requests (default 0: as fast as it can)
  --tcp-payload N     bytes per request line (default 32)
  --tcp-reconnect-every N
                      PersistentUser: close the connection after about N requests (N/2 to
                      3N/2, drawn per connection) and open a new one for the next
                      (default 0: keep it as long as it works)
  --tcp-source-addresses N
                      open each connection from one of N loopback addresses, 127.0.0.2 and
                      up, drawn at random (default 0: the system's choice). The target must
                      be on 127.0.0.0/8. Makes the load look like N client hosts, which a
                      split with sticky_split (by client IP) needs to spread at all.
  --timeline FILE     also write a per-second JSON-lines timeline: requests, failures,
                      errors by kind and requests per backend version
                      (env L4LB_LOCUST_TIMELINE; used by deploy_under_load.py)
  --timeline-step S   the timeline's bucket width in seconds (default 1; 0.25 shows a
                      deploy's steps)
  --tcp-time-unit us|ms
                      the unit response times are reported in (default us). Locust keeps
                      response times as whole numbers, so a loopback request of 0.3 ms
                      shows as 0 ms in the console, the CSV and the HTML report; in µs it
                      shows as 300. The unit is part of every request name ("line [us]"),
                      so every table says which it is.

Locust prints `--help` before it imports a locustfile, so `locust -f FILE --help` cannot list
these options: `python loadtests/locustfile.py --help` prints Locust's help with them, and
`python loadtests/locustfile.py ARGS...` runs `locust -f loadtests/locustfile.py ARGS...`.

The `--csv` stats file is rewritten once the run is over: Locust writes it every second and
not again at the end, so it would miss the last second's requests (up to a third of a 3 s
run; locust issues #1806, #2299); now it holds exactly what the printed summary holds.
"""
from __future__ import annotations

import atexit
import csv
import itertools
import json
import os
import random
import socket
import sys
import time

HELP_FLAGS = {"-h", "--help"}
if __name__ == "__main__" and not HELP_FLAGS & set(sys.argv[1:]):
    # Run as a script: hand over to Locust with this file (--help is answered at the end
    # of this file, once the options below are registered).
    os.execvp(sys.executable, [sys.executable, "-m", "locust", "-f", os.path.abspath(__file__),
                               *sys.argv[1:]])

import gevent
from locust import User, events, stats, task

# Bytes read per recv(): a reply line is short, one read almost always holds it all.
RECV_SIZE = 65536
# --tcp-time-unit: what one reported unit is worth in seconds.
TIME_UNITS = {"us": 1e6, "ms": 1e3}
_user_ids = itertools.count(1)


@events.init_command_line_parser.add_listener
def add_tcp_options(parser):
    parser.add_argument("--tcp-timeout", type=float, default=5.0, env_var="L4LB_TCP_TIMEOUT",
                        help="connect/read timeout per request, seconds")
    parser.add_argument("--tcp-wait", type=float, default=0.0, env_var="L4LB_TCP_WAIT",
                        help="pause between a user's requests, seconds")
    parser.add_argument("--tcp-payload", type=int, default=32, env_var="L4LB_TCP_PAYLOAD",
                        help="bytes per request line")
    parser.add_argument("--tcp-reconnect-every", type=int, default=0,
                        env_var="L4LB_TCP_RECONNECT_EVERY",
                        help="PersistentUser: close the connection after N requests and "
                             "reconnect (0 = never)")
    parser.add_argument("--tcp-source-addresses", type=int, default=0,
                        env_var="L4LB_TCP_SOURCE_ADDRESSES",
                        help="open connections from N loopback addresses 127.0.0.2.. "
                             "(0 = system's choice)")
    parser.add_argument("--timeline", default="", env_var="L4LB_LOCUST_TIMELINE",
                        help="write a per-second JSON-lines timeline to this file")
    parser.add_argument("--timeline-step", type=float, default=1.0,
                        env_var="L4LB_LOCUST_TIMELINE_STEP",
                        help="timeline bucket width, seconds (default 1)")
    parser.add_argument("--tcp-time-unit", choices=sorted(TIME_UNITS), default="us",
                        env_var="L4LB_TCP_TIME_UNIT",
                        help="unit of the reported response times, also named in each "
                             "request name (default us: sub-millisecond times stay visible)")


def parse_target(host: str | None) -> tuple[str, int]:
    """'127.0.0.1:8000' or 'tcp://127.0.0.1:8000' or '[::1]:8000' -> (host, port)."""
    if not host:
        raise ValueError("no target: pass -H HOST:PORT (the balancer's listener)")
    host = host.split("://", 1)[-1].rstrip("/")
    name, _, port = host.rpartition(":")
    if not name or not port.isdigit():
        raise ValueError("target %r is not HOST:PORT" % host)
    return name.strip("[]"), int(port)


class UnexpectedReply(Exception):
    """The backend answered, but not with the line that was sent."""


class LineClient:
    """One TCP connection speaking the line protocol; raises on any failure."""

    def __init__(self, address: tuple[str, int], timeout: float, source: str | None = None):
        self.sock = socket.create_connection(address, timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, line: bytes) -> tuple[bytes, str]:
        """Send `line` (ending in a newline); return (reply line, version tag or "")."""
        self.sock.sendall(line)
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                break
            data = self.sock.recv(RECV_SIZE)
            if not data:
                raise ConnectionResetError("connection closed before the reply")
            self.buf += data
        reply, self.buf = self.buf[:end + 1], self.buf[end + 1:]
        if not reply.endswith(line):
            raise UnexpectedReply("sent %r, got %r" % (line[:40], reply[:80]))
        tag = reply[:-len(line)]
        return reply, tag[:-2].decode(errors="replace") if tag.endswith(b": ") else ""

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class TcpUser(User):
    """Shared parts: the target, the options and the request event."""

    abstract = True

    def __init__(self, environment):
        super().__init__(environment)
        self.address = parse_target(self.host)
        opts = environment.parsed_options
        self.timeout = getattr(opts, "tcp_timeout", 5.0) if opts else 5.0
        self.pause = getattr(opts, "tcp_wait", 0.0) if opts else 0.0
        size = getattr(opts, "tcp_payload", 32) if opts else 32
        self.user_id = next(_user_ids)
        self.seq = 0
        self.pad = b"x" * max(0, size - 16)
        n = getattr(opts, "tcp_source_addresses", 0) if opts else 0
        if n > 65000:
            raise ValueError("--tcp-source-addresses: at most 65000")
        self.sources = n
        self.unit = getattr(opts, "tcp_time_unit", "us") if opts else "us"
        self.per_second = TIME_UNITS[self.unit]

    def source(self) -> str | None:
        """A source address for the next connection (None: the system picks)."""
        if not self.sources:
            return None
        j = random.randrange(self.sources) + 1      # 127.0.0.2, ... 127.0.0.254, 127.0.1.1, ...
        return "127.0.%d.%d" % (j // 254, j % 254 + 1)

    def connect(self) -> LineClient:
        return LineClient(self.address, self.timeout, self.source())

    def wait_time(self):
        return self.pause

    def next_line(self) -> bytes:
        self.seq += 1
        return b"%d-%d %s\n" % (self.user_id, self.seq, self.pad)

    def report(self, name: str, started: float, length: int, exc: Exception | None,
               version: str = "") -> None:
        self.environment.events.request.fire(
            request_type="tcp", name="%s [%s]" % (name, self.unit),
            response_time=(time.perf_counter() - started) * self.per_second,
            response_length=length, exception=exc, context={"version": version})


class PersistentUser(TcpUser):
    """Request/response over one persistent connection per user."""

    def on_start(self):
        self.client = None
        self.requests_on_client = 0
        opts = self.environment.parsed_options
        self.reconnect_every = getattr(opts, "tcp_reconnect_every", 0) if opts else 0

    def on_stop(self):
        if self.client:
            self.client.close()
            self.client = None

    @task
    def line(self):
        if self.client is None:
            started = time.perf_counter()
            try:
                self.client = self.connect()
            except (OSError, gevent.Timeout) as exc:
                self.report("connect", started, 0, exc)
                return
            self.requests_on_client = 0
            if self.reconnect_every:
                n = self.reconnect_every
                self.client_limit = random.randint(max(1, n - n // 2), n + n // 2)
        started = time.perf_counter()
        try:
            reply, version = self.client.request(self.next_line())
        except (OSError, UnexpectedReply, gevent.Timeout) as exc:
            self.client.close()
            self.client = None
            self.report("line", started, 0, exc)
            return
        self.report("line", started, len(reply), None, version)
        self.requests_on_client += 1
        if self.reconnect_every and self.requests_on_client >= self.client_limit:
            # Close between requests, nothing in flight: the clean end a drain waits for.
            self.client.close()
            self.client = None


class ConnectionPerRequestUser(TcpUser):
    """A new connection for every request: connect, one line each way, close."""

    @task
    def connect_and_line(self):
        started = time.perf_counter()
        client = None
        try:
            client = self.connect()
            reply, version = client.request(self.next_line())
        except (OSError, UnexpectedReply, gevent.Timeout) as exc:
            self.report("connect+line", started, 0, exc)
            return
        finally:
            if client:
                client.close()
        self.report("connect+line", started, len(reply), None, version)


# --- the final CSV -------------------------------------------------------------------

@events.init.add_listener
def rewrite_stats_csv_at_exit(environment, **_):
    """Locust's StatsCSVFileWriter writes PREFIX_stats.csv once a second and not at the end;
    rewrite it from the final stats once Locust has closed its files (it exits through
    sys.exit, so atexit runs after close_files)."""
    prefix = getattr(environment.parsed_options, "csv_prefix", None) \
        if environment.parsed_options else None
    if not prefix or environment.runner is None:
        return

    def rewrite():
        with open("%s_stats.csv" % prefix, "w", newline="") as f:
            stats.StatsCSV(environment, stats.PERCENTILES_TO_REPORT).requests_csv(csv.writer(f))

    atexit.register(rewrite)


# --- per-second timeline (deploy_under_load.py reads it) --------------------------------

class Timeline:
    """Counts requests, failures, error kinds and versions per time bucket (`step` seconds
    of wall clock, 1 by default) and appends one JSON line per finished bucket to a file:
    {"t": 1764000000, "dt": 1.0, "requests": 812, "failures": 3,
     "errors": {"ConnectionRefusedError": 3}, "versions": {"v1": 500, ...}}
    `t` is the bucket's start (unix seconds), `dt` its width."""

    def __init__(self, path: str, step: float = 1.0):
        self.path = path
        self.step = step if step > 0 else 1.0
        self.buckets: dict[int, dict] = {}   # bucket number (time // step) -> counts
        self.file = open(path, "a", buffering=1)
        self.flusher = None

    def on_request(self, request_type, name, response_time, response_length, exception=None,
                   context=None, **_):
        b = self.buckets.setdefault(int(time.time() // self.step), {
            "requests": 0, "failures": 0, "errors": {}, "versions": {}})
        b["requests"] += 1
        if exception is not None:
            b["failures"] += 1
            kind = type(exception).__name__
            b["errors"][kind] = b["errors"].get(kind, 0) + 1
        else:
            version = (context or {}).get("version") or "-"
            b["versions"][version] = b["versions"].get(version, 0) + 1

    def flush(self, everything: bool = False) -> None:
        now = int(time.time() // self.step)
        for n in sorted(self.buckets):
            if n < now or everything:
                t = n if self.step == 1.0 else round(n * self.step, 6)
                self.file.write(json.dumps({"t": t, "dt": self.step, **self.buckets.pop(n)})
                                + "\n")

    def run_flusher(self):
        while True:
            gevent.sleep(min(1.0, self.step))
            self.flush()

    def close(self):
        if self.flusher:
            self.flusher.kill(block=False)
        self.flush(everything=True)
        self.file.close()


@events.init.add_listener
def start_timeline(environment, **_):
    path = getattr(environment.parsed_options, "timeline", "") if environment.parsed_options else ""
    if not path:
        return
    timeline = Timeline(path, getattr(environment.parsed_options, "timeline_step", 1.0))
    environment.events.request.add_listener(timeline.on_request)
    timeline.flusher = gevent.spawn(timeline.run_flusher)
    environment.events.quitting.add_listener(lambda **_: timeline.close())


if __name__ == "__main__":
    # Only --help gets here (see the top): Locust's own help, with this file's options.
    from locust.argument_parser import get_parser

    get_parser().parse_args(["-f", os.path.abspath(__file__), *sys.argv[1:]])
