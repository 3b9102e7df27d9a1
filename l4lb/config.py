"""The config file: TOML in, validated dataclasses out (the format is DESIGN.md §4).

How it works: tomllib turns the text into dicts and lists; one walk over SCHEMA, a tree of
rules that mirrors the file's sections, converts every value into the dataclasses below
and reports every problem it meets instead of stopping at the first; a last pass checks
what spans sections (a listener naming a missing pool, one address bound twice). Every
problem becomes a ConfigIssue `FILE:LINE key.path: message`, the line found by
TomlLocator, and load_config raises one ConfigError carrying all of them.

SCHEMA is data, not code: each key is a Key(rule, default, doc). The rule says what a
valid value is (and, in words, what it expects), the default is written as the TOML value
the file would hold, and the doc is the sentence the reference docs will print. Defaults
pass through the same rule as written values, so a missing key and a written one come
out identical.
"""
from __future__ import annotations

import difflib
import ipaddress
import json
import math
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from . import vocab
from .address import EXAMPLE_ADDRESSES, Address, parse_address
from .reference.sni import SNI_MAX_CLIENT_HELLO, SNI_MAX_CLIENT_HELLO_LIMIT
from .sni import check_sni_pattern
from .tomlpos import KeyPath, TomlLocator

__all__ = [
    "Address", "BackendConfig", "ClusterConfig", "Config", "ConfigError", "ConfigIssue", "ControlConfig",
    "GlobalConfig", "HealthConfig", "ListenerConfig", "LogConfig", "MetricsConfig",
    "PoolConfig", "SCHEMA", "default_config_path", "load_config", "parse_address",
    "parse_config",
]


# -- errors ----------------------------------------------------------------------------

class ConfigIssue(NamedTuple):
    """One problem in a config file, at a line and a key path such as `pools.blue.backends[1].weight`.

    `key` is empty for problems of the file as a whole (unreadable, not TOML); str()
    then leaves the key out: `conf.toml:3: invalid TOML: ...`.
    """
    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        if not self.key:
            return f"{self.file}:{self.line}: {self.message}"
        return f"{self.file}:{self.line} {self.key}: {self.message}"


class ConfigError(Exception):
    """A config file that cannot be used; `issues` holds every problem found, in line order."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = sorted(issues, key=lambda issue: issue.line)
        super().__init__("\n".join(str(issue) for issue in self.issues))

    def __reduce__(self):
        # Exception pickles its args (the joined text); rebuild from the issues instead.
        return (ConfigError, (self.issues,))


# -- addresses -------------------------------------------------------------------------
# One parser for every entry point (l4lb.address); re-exported here for the config's callers.

_EXAMPLE_ADDRESSES = EXAMPLE_ADDRESSES


# -- the parsed config -----------------------------------------------------------------
# Field defaults here must equal SCHEMA's (a unit test compares them).

@dataclass
class GlobalConfig:
    max_connections: int = 20000
    shutdown_timeout: float = 30.0
    workers: int | str = "auto"


@dataclass
class ControlConfig:
    socket: Path            # absolute: a relative path in the file is taken from the file's folder
    mode: int = 0o600


@dataclass
class LogConfig:
    level: str = "info"
    format: str = "json"
    access: bool = True


@dataclass
class MetricsConfig:
    listen: Address | None = None


@dataclass
class ResolversConfig:
    nameservers: list[Address] = field(default_factory=list)
    min_ttl: float = 1.0
    max_ttl: float = 300.0
    retry: float = 1.0
    timeout: float = 2.0


@dataclass
class ClusterConfig:
    etcd: list[Address]
    node: str | None = None          # None in the file: the host name (check_cluster sets it)
    prefix: str = "/l4lb"
    lease_ttl: float = 10.0


@dataclass
class BackendConfig:
    name: str
    address: Address
    weight: int = 1
    max_connections: int = 0
    backup: bool = False
    health_address: Address | None = None


@dataclass
class HealthConfig:
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    send: str = ""
    expect: str = ""
    send_proxy: str = "off"
    port: int = 0


@dataclass
class PoolConfig:
    name: str
    algorithm: str = "wrr"
    hash_key: str = "src_ip"
    slow_start: float = 0.0
    on_down: str = "keep"
    backends: list[BackendConfig] = field(default_factory=list)
    health: HealthConfig | None = None


@dataclass
class ListenerConfig:
    name: str
    bind: list[Address]
    pool: str | None = None
    split: dict[str, int] | None = None
    sticky_split: bool = True
    connect_timeout: float = 2.0
    idle_timeout: float = 600.0
    retries: int = 2
    send_proxy: str = "off"
    accept_proxy: bool = False
    proxy_timeout: float = 5.0
    rcvbuf: int = 0
    sndbuf: int = 0
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)
    max_connections: int = 10000
    per_source_max_connections: int = 0
    per_source_rate: float = 0.0
    queue_timeout: float = 5.0
    splice: bool = True
    sni: dict[str, str] | None = None
    inspect_timeout: float = 5.0
    max_client_hello: int = SNI_MAX_CLIENT_HELLO


@dataclass
class Config:
    path: Path              # absolute path of the file it was read from
    global_: GlobalConfig
    control: ControlConfig
    log: LogConfig
    metrics: MetricsConfig
    listeners: dict[str, ListenerConfig]
    pools: dict[str, PoolConfig]
    resolvers: ResolversConfig = field(default_factory=ResolversConfig)
    cluster: ClusterConfig | None = None       # None: a node of its own (no [cluster])
    # `FILE:LINE key: message` lines for keys that still work but are deprecated; the
    # caller logs them (the config is valid).
    warnings: list[str] = field(default_factory=list, compare=False)
    # The TOML text it was parsed from: what the master hands its workers, so that every
    # process builds its model from the same bytes (the file may change meanwhile).
    text: str = field(default="", compare=False, repr=False)


# -- rules: what a valid value is -------------------------------------------------------

class _Marker:
    """A named stand-in value that cannot be confused with anything read from TOML."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


# Stands in for a value already reported as wrong; a config holding it is never returned.
INVALID: Any = _Marker("INVALID")
# The default of a key that has none.
REQUIRED: Any = _Marker("REQUIRED")

# The compiled hot path keeps counters and limits in C ints.
C_INT_MAX = 2**31 - 1
# sun_path holds 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107
NAME_PATTERN = vocab.NAME_RE

Report = Callable[[KeyPath, str], None]


def show(value: Any) -> str:
    """A value as a message quotes it: TOML spelling for booleans, short for containers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def suggest(word: str, known) -> str:
    """' (did you mean 'x'?)' for the closest of `known`, or '' when nothing is close."""
    close = difflib.get_close_matches(str(word), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Rule:
    """Turns one raw TOML value into its Python value, or reports why it cannot.

    Scalar rules implement `check`, raising ValueError with the message; `expects` says
    in words what a valid value looks like ("an integer from 0 to 10000") for messages
    and for the reference docs.
    """
    expects = "a value"

    def convert(self, raw: Any, path: KeyPath, report: Report) -> Any:
        """The converted value, or INVALID after reporting the problem at `path`."""
        try:
            return self.check(raw)
        except ValueError as exc:
            report(path, str(exc))
            return INVALID

    def check(self, raw: Any) -> Any:
        raise NotImplementedError

    def reject(self, raw: Any) -> ValueError:
        return ValueError(f"must be {self.expects}, got {show(raw)}")


# The listener key `splice` chose between two relays until the uvloop stream relay was
# removed: `true` (the relay that remains) is accepted with a deprecation warning.
SPLICE_REMOVED = "the uvloop stream relay was removed; delete this key"
SPLICE_DEPRECATED = "deprecated: the raw-socket relay is the only relay; delete this key"


class SpliceFlag(Rule):
    """The deprecated `splice` key: true, the only relay there is, or an error."""
    expects = "true (deprecated)"

    def check(self, raw):
        if raw is True:
            return True
        if raw is False:
            raise ValueError(SPLICE_REMOVED)
        raise self.reject(raw)


class Integer(Rule):
    def __init__(self, low: int = 0, high: int = C_INT_MAX):
        self.low, self.high = low, high
        self.expects = f"an integer from {low} to {high}"

    def check(self, raw):
        if isinstance(raw, bool) or not isinstance(raw, int) or not self.low <= raw <= self.high:
            raise self.reject(raw)
        return raw


class Workers(Rule):
    """global.workers: "auto" or a worker count (vocab.check_workers)."""
    expects = f"'auto' or an integer from 1 to {vocab.WORKERS_MAX}"

    def check(self, raw):
        return vocab.check_workers(raw)


class FileMode(Integer):
    def __init__(self):
        super().__init__(0, 0o777)
        self.expects = "a file mode from 0o000 to 0o777"

    def reject(self, raw):
        if isinstance(raw, int) and not isinstance(raw, bool):
            return ValueError(f"must be {self.expects}, got {oct(raw)}")
        return super().reject(raw)


class Number(Rule):
    """A finite float; TOML integers are accepted (`timeout = 2` means 2.0)."""

    def __init__(self, low: float = 0.0, *, above: bool = False, high: float | None = None):
        self.low, self.above, self.high = low, above, high
        low_text = f"{low:g}"
        if high is not None:
            self.expects = f"a number from {low_text} to {high:g}"
        elif above:
            self.expects = f"a number greater than {low_text}"
        else:
            self.expects = f"a number of at least {low_text}"

    def check(self, raw):
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise self.reject(raw)
        value = float(raw)
        if (not math.isfinite(value) or value < self.low or (self.above and value == self.low)
                or (self.high is not None and value > self.high)):
            raise self.reject(raw)
        return value


class Boolean(Rule):
    expects = "true or false"

    def check(self, raw):
        if not isinstance(raw, bool):
            raise self.reject(raw)
        return raw


class Text(Rule):
    expects = "a string"

    def check(self, raw):
        if not isinstance(raw, str):
            raise self.reject(raw)
        return raw


class Choice(Rule):
    def __init__(self, *words: str):
        self.words = words
        self.expects = "one of " + ", ".join(repr(w) for w in words)

    def check(self, raw):
        if not isinstance(raw, str) or raw not in self.words:
            hint = suggest(raw, self.words) if isinstance(raw, str) else ""
            raise ValueError(f"must be {self.expects}, got {show(raw)}{hint}")
        return raw


class Name(Rule):
    """A listener, pool or backend name: it appears in control commands (`POOL/BACKEND`,
    `POOL=PCT`), so '/', '=', spaces and the like are kept out."""
    expects = f"a name of {vocab.NAME_DOC}"

    def check(self, raw):
        if not isinstance(raw, str) or not NAME_PATTERN.fullmatch(raw):
            raise self.reject(raw)
        return raw


class AddressRule(Rule):
    """A 'host:port' string (l4lb.address's rule); `port_zero` for an address to listen
    on, where port 0 means any free port."""

    def __init__(self, *, port_zero: bool = False):
        self.port_zero = port_zero
        low = 0 if port_zero else 1
        self.expects = f"a 'host:port' string such as {_EXAMPLE_ADDRESSES}, port {low} to 65535"

    def check(self, raw):
        if not isinstance(raw, str):
            raise self.reject(raw)
        return parse_address(raw, port_zero=self.port_zero)


class Cidr(Rule):
    """An IPv4 or IPv6 network; host bits are allowed and cleared (10.1.2.3/8 -> 10.0.0.0/8)."""
    expects = "a CIDR such as '10.0.0.0/8' or 'fd00::/8' (a bare address means /32 or /128)"

    def check(self, raw):
        if not isinstance(raw, str):
            raise self.reject(raw)
        try:
            return str(ipaddress.ip_network(raw, strict=False))
        except ValueError:
            raise ValueError(f"must be {self.expects}, got {show(raw)}") from None


class SocketPath(Rule):
    """A Unix socket path; relative paths are made absolute by the loader (see _resolve_paths)."""
    expects = "a file path"

    def check(self, raw):
        if not isinstance(raw, str) or not raw or "\0" in raw:
            raise self.reject(raw)
        return Path(raw)


class ListOf(Rule):
    def __init__(self, item: Rule, *, min_items: int = 0, expects: str | None = None):
        self.item, self.min_items = item, min_items
        self.expects = expects or f"an array of ({item.expects})"

    def convert(self, raw, path, report):
        if not isinstance(raw, list):
            report(path, f"must be {self.expects}, got {show(raw)}")
            return INVALID
        if len(raw) < self.min_items:
            report(path, f"must hold at least {self.min_items} item(s), got an empty array")
        return [self.item.convert(value, path + (i,), report) for i, value in enumerate(raw)]


class Percentages(Rule):
    """A table of name -> integer percentage; whether they sum to 100 is the listener's check."""
    expects = "a table of pool = percentage, such as { blue = 90, green = 10 }"
    percent = Integer(0, 100)

    def convert(self, raw, path, report):
        if not isinstance(raw, dict):
            report(path, f"must be {self.expects}, got {show(raw)}")
            return INVALID
        return {name: self.percent.convert(value, path + (name,), report)
                for name, value in raw.items()}


class SniTable(Rule):
    """A table of server-name pattern -> pool name (l4lb.sni: exact names and *.suffix)."""
    expects = 'a table of "name pattern" = "pool", such as { "api.example.com" = "api" }'
    pool = Name()

    def convert(self, raw, path, report):
        if not isinstance(raw, dict):
            report(path, f"must be {self.expects}, got {show(raw)}")
            return INVALID
        out = {}
        seen: dict[str, str] = {}     # normalized pattern -> as written
        for pattern, pool in raw.items():
            try:
                name = check_sni_pattern(pattern)
            except ValueError as exc:
                report(path + (pattern,), str(exc))
                continue
            if name in seen:
                report(path + (pattern,), f"same name as {seen[name]!r}")
                continue
            seen[name] = pattern
            out[pattern] = self.pool.convert(pool, path + (pattern,), report)
        return out


class Key(NamedTuple):
    """One key of a table: its rule, its default as written in TOML, and its doc line.

    default: REQUIRED (no default), None (absent means None), or a TOML value that is
    converted by `rule` exactly as if the file held it.
    """
    rule: Rule
    default: Any
    doc: str
    attribute: str = ""   # the dataclass field, when it differs from the key ("global" -> "global_")


class Table(Rule):
    """A TOML table whose keys are listed in `keys`, converted into `cls`.

    Unknown keys are reported with the closest known key as a hint; `check`, if given,
    runs on the built object for rules that span several keys of this table.
    """

    def __init__(self, cls: type, keys: dict[str, Key], doc: str,
                 check: Callable[[Any, KeyPath, Report], None] | None = None):
        self.cls, self.keys, self.doc, self.check_object = cls, keys, doc, check
        self.expects = "a table"

    def convert(self, raw, path, report, extra: dict | None = None):
        """The built `cls`, with `extra` fields (a table's name) beside its keys."""
        if not isinstance(raw, dict):
            report(path, f"must be a table, got {show(raw)}")
            return INVALID
        for key in raw:
            if key not in self.keys:
                report(path + (key,), f"unknown key {key!r}{suggest(key, self.keys)}")
        values = dict(extra or {})
        for key, spec in self.keys.items():
            name = spec.attribute or key
            if key in raw:
                values[name] = spec.rule.convert(raw[key], path + (key,), report)
            elif spec.default is REQUIRED:
                report(path + (key,), "required key is missing")
                values[name] = INVALID
            elif spec.default is None:
                values[name] = None
            else:
                values[name] = spec.rule.convert(spec.default, path + (key,), report)
        obj = self.cls(**values)
        if self.check_object is not None:
            self.check_object(obj, path, report)
        return obj


class TableOf(Rule):
    """A table of named tables (`[pools.NAME]`); each name is passed to the inner table."""

    def __init__(self, table: Table, what: str):
        self.table, self.what = table, what
        self.expects = f"a table of {what}"

    def convert(self, raw, path, report):
        if not isinstance(raw, dict):
            report(path, f"must be {self.expects}, got {show(raw)}")
            return INVALID
        result = {}
        for name, body in raw.items():
            if not NAME_PATTERN.fullmatch(name):
                report(path + (name,), f"bad name {name!r}: must be {Name.expects}")
            result[name] = self.table.convert(body, path + (name,), report, extra={"name": name})
        return result


# -- checks that span several keys -----------------------------------------------------

def check_listener(listener: ListenerConfig, path: KeyPath, report: Report) -> None:
    """Exactly one of pool/split; a split's percentages sum to 100."""
    if listener.pool is None and listener.split is None:
        report(path, "needs 'pool' (one active pool) or 'split' (percentages per pool)")
    elif listener.pool is not None and listener.split is not None:
        report(path + ("split",), "set either 'pool' or 'split', not both")
    if isinstance(listener.split, dict):
        percents = list(listener.split.values())
        if all(isinstance(p, int) for p in percents) and sum(percents) != vocab.SPLIT_TOTAL:
            report(path + ("split",),
                   f"percentages must sum to {vocab.SPLIT_TOTAL}, got {sum(percents)}")


def check_pool(pool: PoolConfig, path: KeyPath, report: Report) -> None:
    """Backend names are unique within a pool (control commands name them)."""
    if not isinstance(pool.backends, list):
        return
    first_index: dict[str, int] = {}
    for i, backend in enumerate(pool.backends):
        if not isinstance(backend, BackendConfig) or not isinstance(backend.name, str):
            continue
        if backend.name in first_index:
            report(path + ("backends", i, "name"),
                   f"duplicate backend name {backend.name!r} (also backends[{first_index[backend.name]}])")
        else:
            first_index[backend.name] = i


def check_resolvers(resolvers: ResolversConfig, path: KeyPath, report: Report) -> None:
    servers = resolvers.nameservers if isinstance(resolvers.nameservers, list) else []
    for i, server in enumerate(servers):     # not a list: reported already by its rule
        if isinstance(server, Address) and server.family == socket.AF_UNSPEC:
            report(path + ("nameservers", i),
                   f"a nameserver must be an IP address, got the hostname {server.host!r}")
    if (isinstance(resolvers.min_ttl, float) and isinstance(resolvers.max_ttl, float)
            and resolvers.min_ttl > resolvers.max_ttl):
        report(path + ("min_ttl",), f"must not exceed max_ttl ({resolvers.max_ttl:g})")


def check_cluster(cluster: ClusterConfig, path: KeyPath, report: Report) -> None:
    """The node name defaults to the host name, cut to a name (l4lb.vocab) at its first
    dot; a prefix is a key path: it starts with '/' and does not end with one."""
    if cluster.node is None:
        host = socket.gethostname().split(".")[0][:64] or "l4lb"
        cluster.node = host if NAME_PATTERN.fullmatch(host) else "l4lb"
    if isinstance(cluster.prefix, str) and (not cluster.prefix.startswith("/")
                                            or cluster.prefix.endswith("/")
                                            or len(cluster.prefix) < 2):
        report(path + ("prefix",), f"must start with '/' and not end with one, such as "
                                   f"\"/l4lb\", got {show(cluster.prefix)}")


def check_references(config: Config, report: Report) -> None:
    """At least one listener; pools named by listeners exist; no address is bound twice
    (listeners and metrics)."""
    listeners = config.listeners if isinstance(config.listeners, dict) else {}
    pools = config.pools if isinstance(config.pools, dict) else {}
    if config.listeners == {}:
        # An empty file (a non-atomic writer caught mid-copy when SIGHUP came) would
        # otherwise reload as "remove every listener" and stop serving.
        report(("listeners",), "at least one [listeners.NAME] table is required: a config "
               "without listeners would serve nothing (is the file empty or half written?)")
    for name, listener in listeners.items():
        if not isinstance(listener, ListenerConfig):
            continue
        path = ("listeners", name)
        if isinstance(listener.pool, str) and listener.pool not in pools:
            report(path + ("pool",), f"no pool named {listener.pool!r}{_pools_hint(listener.pool, pools)}")
        if isinstance(listener.split, dict):
            for pool in listener.split:
                if pool not in pools:
                    report(path + ("split", pool), f"no pool named {pool!r}{_pools_hint(pool, pools)}")
        if isinstance(listener.sni, dict):
            for pattern, pool in listener.sni.items():
                if isinstance(pool, str) and pool not in pools:
                    report(path + ("sni", pattern), f"no pool named {pool!r}{_pools_hint(pool, pools)}")

    bound: dict[Address, KeyPath] = {}
    for path, address in _bound_addresses(config, listeners):
        # Port 0 asks the kernel for a fresh port on each bind: never a clash.
        if address.port == 0:
            continue
        if address in bound:
            report(path, f"{address} is already bound by {format_path(bound[address])}")
        else:
            bound[address] = path


def _bound_addresses(config: Config, listeners: dict):
    for name, listener in listeners.items():
        if isinstance(listener, ListenerConfig) and isinstance(listener.bind, list):
            for i, address in enumerate(listener.bind):
                if isinstance(address, Address):
                    yield ("listeners", name, "bind", i), address
    if isinstance(config.metrics, MetricsConfig) and isinstance(config.metrics.listen, Address):
        yield ("metrics", "listen"), config.metrics.listen


def _pools_hint(name: str, pools: dict) -> str:
    hint = suggest(name, pools)
    if hint or not pools:
        return hint or " (no pools are defined)"
    return f" (pools: {', '.join(sorted(pools))})"


def _resolve_paths(config: Config, folder: Path, report: Report) -> None:
    """Make control.socket absolute (relative to the config file's folder) and check its length."""
    control = config.control
    if not isinstance(control, ControlConfig) or not isinstance(control.socket, Path):
        return
    control.socket = folder / control.socket   # an absolute socket path stays as it is
    size = len(str(control.socket).encode("utf-8", "surrogateescape"))
    if size > UNIX_PATH_MAX:
        report(("control", "socket"),
               f"{str(control.socket)!r} is {size} bytes long; Unix socket paths are limited "
               f"to {UNIX_PATH_MAX}: use a shorter or absolute path")


# -- the schema ------------------------------------------------------------------------

SEND_PROXY = Choice(*vocab.SEND_PROXY_WORDS)

GLOBAL = Table(GlobalConfig, {
    "max_connections": Key(Integer(), 20000,
        "Client connections open at once across all listeners; a connection beyond it is "
        "closed at once (not queued), counted as rejected (reason global_max_connections) "
        "and written to the access log. 0 = unlimited."),
    "shutdown_timeout": Key(Number(), 30.0,
        "Seconds open connections get to finish on SIGTERM/SIGINT before they are closed; "
        "0 closes them at once."),
    "workers": Key(Workers(), "auto",
        "Worker processes that run the data path (accept, pick, relay), each on its own "
        "event loop; the master process keeps the config, the control socket, health "
        "checks, metrics and the state file. \"auto\": one per CPU this process may run on "
        f"(sched_getaffinity); or an integer from 1 to {vocab.WORKERS_MAX}. Limits, "
        "leastconn and every figure are global across workers (a shared table)."),
}, doc="Process-wide settings.")

CONTROL = Table(ControlConfig, {
    "socket": Key(SocketPath(), "l4lb.sock",
        "Path of the Unix control socket used by `l4lb ctl` and `l4lb deploy`; a relative "
        "path is taken from the folder of this config file."),
    "mode": Key(FileMode(), 0o600,
        "File mode the socket is created with (before it listens): who may control the "
        "balancer."),
}, doc="The control socket.")

LOG = Table(LogConfig, {
    "level": Key(Choice(*vocab.LOG_LEVELS), "info",
        "Least severe event written: " + " | ".join(vocab.LOG_LEVELS) + "."),
    "format": Key(Choice(*vocab.LOG_FORMATS), "json",
        "json: one JSON object per line on stderr, for machines; console: aligned text for people."),
    "access": Key(Boolean(), True,
        "Write one `connection_closed` line per closed connection (the access log)."),
}, doc="Logging (structlog, to stderr).")

METRICS = Table(MetricsConfig, {
    "listen": Key(AddressRule(port_zero=True), None,
        "host:port of the Prometheus endpoint (GET /metrics); leave the key out to turn "
        "metrics off."),
}, doc="The Prometheus endpoint.")

RESOLVERS = Table(ResolversConfig, {
    "nameservers": Key(ListOf(AddressRule(), expects="an array of 'host:port' strings"), [],
        "DNS servers asked for hostname backends, as IP:port strings such as "
        "[\"10.0.0.2:53\"] (HAProxy `nameserver`, nginx `resolver`), tried in order; "
        "empty = the system's, from /etc/resolv.conf."),
    "min_ttl": Key(Number(0, above=True), 1.0,
        "Seconds an answer is used at least before it is asked again, whatever its TTL."),
    "max_ttl": Key(Number(0, above=True), 300.0,
        "Seconds an answer is used at most, however long its TTL (nginx `valid=`)."),
    "retry": Key(Number(0, above=True), 1.0,
        "Seconds between two lookups of a name whose last lookup failed (NXDOMAIN, "
        "SERVFAIL, no answer, timeout); meanwhile its last good answer stays in use "
        "(HAProxy `hold nx/timeout` without end)."),
    "timeout": Key(Number(0, above=True), 2.0,
        "Seconds one lookup (every nameserver, A and AAAA) may take before it counts as failed."),
}, doc="How hostname backends are resolved (HAProxy `resolvers`, nginx `resolve`): by a "
       "control-plane task, again when the answer's TTL runs out (bounded by min_ttl and "
       "max_ttl); every A and AAAA address of the name is tried in order by each connection "
       "(A first), which never waits on DNS. A host named `_SERVICE._tcp.DOMAIN` is asked "
       "for SRV records: their targets' addresses with the records' ports, by priority "
       "then weight (the address's own port is then unused). Before a name's first answer, a connection "
       "resolves it itself (getaddrinfo, which also reads /etc/hosts).", check=check_resolvers)

CLUSTER = Table(ClusterConfig, {
    "etcd": Key(ListOf(AddressRule(), min_items=1, expects="an array of 'host:port' strings"),
        REQUIRED,
        "etcd endpoints as host:port strings, such as [\"10.0.0.5:2379\"], tried in turn."),
    "node": Key(Name(), None,
        "This node's name in the fleet, unique among its nodes; absent = the host name "
        "(up to its first dot)."),
    "prefix": Key(Text(), "/l4lb",
        "Key prefix in etcd: fleets that share one etcd use different prefixes."),
    "lease_ttl": Key(Number(1.0), 10.0,
        "Seconds after which a node that stopped talking to etcd (crashed, cut off) "
        "leaves the fleet: its entry under its lease expires."),
}, doc="A fleet (DESIGN.md §10): nodes sharing their runtime state (admin states, "
       "weights, added and removed backends, switch/split) through etcd. Without this "
       "table a node keeps it to itself (the state file).", check=check_cluster)

BACKEND = Table(BackendConfig, {
    "name": Key(Name(), REQUIRED,
        "The backend's name, unique in its pool; control commands call it POOL/NAME."),
    "address": Key(AddressRule(), REQUIRED,
        "host:port the balancer connects to (IPv6 as \"[::1]:9001\"). A hostname is "
        "resolved by [resolvers] (every address, by TTL; `_SERVICE._tcp.DOMAIN:PORT` by SRV "
        "records, which give the port)."),
    "weight": Key(Integer(vocab.WEIGHT_MIN, vocab.WEIGHT_MAX), vocab.WEIGHT_DEFAULT,
        "Share of new connections relative to the pool's other backends; 0 = none."),
    "max_connections": Key(Integer(), 0,
        "Connections open to this backend at once; a full backend is skipped, and when "
        "all are full clients queue (listener queue_timeout). 0 = unlimited."),
    "backup": Key(Boolean(), False,
        "A backup server (HAProxy `backup`): it gets connections only while no other "
        "(non-backup) backend of its pool is up; then every up backup shares them by weight."),
    "health_address": Key(AddressRule(), None,
        "host:port this backend's health probes connect to instead of its address (HAProxy "
        "`addr` and `port`); wins over the pool's health.port. Absent = its address."),
}, doc="One backend server of a pool.")

HEALTH = Table(HealthConfig, {
    "interval": Key(Number(0, above=True), 2.0, "Seconds between two probes of a backend."),
    "timeout": Key(Number(0, above=True), 1.0,
        "Seconds a probe may take (connect, send, and reading the reply) before it counts as failed."),
    "rise": Key(Integer(1), 2, "Consecutive passed probes that mark a down backend up."),
    "fall": Key(Integer(1), 3, "Consecutive failed probes that mark an up backend down."),
    "send": Key(Text(), "",
        "Text sent (UTF-8) after connecting; empty = a plain TCP connect check."),
    "expect": Key(Text(), "",
        "Text the reply must contain for the probe to pass; empty = connecting is enough."),
    "send_proxy": Key(SEND_PROXY, "off",
        "off | v1 | v2: send a PROXY protocol header first, for backends that require one."),
    "port": Key(Integer(0, 65535), 0,
        "Port the probes connect to on each backend's host, when the check listens apart "
        "from the traffic (HAProxy `port`); 0 = the backend's own port. A backend's "
        "health_address wins over it."),
}, doc="Active health checks of a pool's backends; without this table backends stay up.")

POOL = Table(PoolConfig, {
    "algorithm": Key(Choice(*vocab.ALGORITHM_WORDS), "wrr",
        "How a backend is picked: rr round robin, wrr smooth weighted round robin, "
        "leastconn fewest active connections (per weight), hash consistent hashing "
        "(Maglev) of hash_key, lrt lowest response time, p2c power of two random choices."),
    "hash_key": Key(Choice(*vocab.HASH_KEYS), "src_ip",
        "What `hash` hashes: the client IP (a client keeps its backend) or IP and port."),
    "slow_start": Key(Number(), 0.0,
        "Seconds over which a backend that comes back up ramps from little to its full weight; 0 = at once."),
    "on_down": Key(Choice(*vocab.ON_DOWN_WORDS), "keep",
        "keep | close: what happens to a backend's open connections when it is marked down."),
    "backends": Key(ListOf(BACKEND, expects="an array of backend tables"), [],
        "The servers of this pool, as an array of inline tables "
        "{ name, address, weight, max_connections, backup, health_address }; may be empty "
        "(add them at run time)."),
    "health": Key(HEALTH, None, "The [pools.NAME.health] table; absent = no active checks."),
}, doc="A named set of backends and how to pick among them.", check=check_pool)

LISTENER = Table(ListenerConfig, {
    "bind": Key(ListOf(AddressRule(port_zero=True), min_items=1,
                       expects="an array of 'host:port' strings such as [\"127.0.0.1:8000\"]"),
                REQUIRED,
        "Addresses to accept on, as host:port strings; IPv6 as \"[::1]:8000\"."),
    "pool": Key(Name(), None, "The pool new connections go to; set this or split."),
    "split": Key(Percentages(), None,
        "Instead of pool: percentages of new connections per pool, summing to 100 (canary, A/B)."),
    "sticky_split": Key(Boolean(), True,
        "With split: a client IP always lands on the same side, as long as the split is unchanged."),
    "connect_timeout": Key(Number(0, above=True), 2.0,
        "Seconds to establish the connection to a backend before trying another."),
    "idle_timeout": Key(Number(0, above=True), 600.0,
        "Seconds with no byte in either direction after which both sides are closed."),
    "retries": Key(Integer(0, 32), 2,
        "Other backends tried when connecting to one fails (never the one that just failed)."),
    "send_proxy": Key(SEND_PROXY, "off",
        "off | v1 | v2: send a PROXY protocol header with the client's address to the backend first."),
    "accept_proxy": Key(Boolean(), False,
        "Expect a PROXY v1 or v2 header from the client side (an upstream balancer); its "
        "address then stands for the client's everywhere."),
    "proxy_timeout": Key(Number(0, above=True), 5.0,
        "With accept_proxy: seconds a client has to send its whole PROXY header; a slower "
        "one is closed and counted (a slowloris guard)."),
    "rcvbuf": Key(Integer(0, 1 << 30), 0,
        "SO_RCVBUF in bytes for both sockets of this listener's connections (the client's "
        "through the listening socket, the backend's when it is created); 0 = the kernel's "
        "autotuning. nginx's listen rcvbuf=, HAProxy's tune.rcvbuf.client/server. The "
        "client side applies to binds opened after a change."),
    "sndbuf": Key(Integer(0, 1 << 30), 0,
        "SO_SNDBUF in bytes, like rcvbuf; 0 = the kernel's autotuning."),
    "allow": Key(ListOf(Cidr(), expects="an array of CIDR strings"), [],
        "CIDRs whose clients may connect; empty = everyone not denied. The longest "
        "prefix matching the client across allow and deny decides (deny on a tie)."),
    "deny": Key(ListOf(Cidr(), expects="an array of CIDR strings"), [],
        "CIDRs whose clients are refused, unless a longer allow prefix holds the client."),
    "max_connections": Key(Integer(), 10000,
        "Client connections open at once on this listener; beyond it a new one is closed "
        "at once (not queued), counted and written to the access log. 0 = unlimited."),
    "per_source_max_connections": Key(Integer(), 0,
        "Connections open at once from one client IP; 0 = unlimited."),
    "per_source_rate": Key(Number(), 0.0,
        "New connections per second allowed from one client IP (burst of the same size); 0 = unlimited."),
    "queue_timeout": Key(Number(), 5.0,
        "Seconds a client may wait for a slot when every backend is at its max_connections; "
        "0 = do not queue, close at once."),
    "splice": Key(SpliceFlag(), True,
        "Deprecated, and only `true` is accepted (with a warning in the log): every "
        "listener relays with raw sockets, copying small reads and moving bulk in the "
        "kernel with splice(2) through a pipe borrowed from a pool while bytes wait in "
        "it (at most global.max_connections / 4 pipes). `false` chose the uvloop "
        "stream relay, which was removed: it is an error. Delete the key."),
    "sni": Key(SniTable(), None,
        "TLS passthrough routing: server-name pattern = pool, such as { \"api.example.com\" "
        "= \"api\", \"*.example.com\" = \"web\" }. The relay reads the server name from the "
        "client's ClientHello without terminating TLS: an exact name wins, then the longest "
        "*.suffix (any depth; *.example.com does not match example.com); names are compared "
        "in lower case, one trailing dot ignored, non-ASCII names in IDNA form (xn--). No "
        "match, no name, not TLS, a malformed or too large hello and a timeout take pool/split. "
        "Each pattern is a route of its own for switch and split (LISTENER/PATTERN)."),
    "inspect_timeout": Key(Number(0, above=True), 5.0,
        "With sni: seconds to wait for a whole ClientHello; then the wait ends and "
        "pool/split takes the connection, with whatever the client sent (HAProxy's "
        "tcp-request inspect-delay)."),
    "max_client_hello": Key(Integer(1, SNI_MAX_CLIENT_HELLO_LIMIT), SNI_MAX_CLIENT_HELLO,
        "With sni: bytes of the stream (TLS records included) the ClientHello must fit in; "
        "a larger one takes pool/split without being read further."),
}, doc="A set of listening addresses in front of a pool or a split of pools.",
    check=check_listener)

SCHEMA = Table(Config, {
    "global": Key(GLOBAL, {}, GLOBAL.doc, attribute="global_"),
    "control": Key(CONTROL, {}, CONTROL.doc),
    "log": Key(LOG, {}, LOG.doc),
    "metrics": Key(METRICS, {}, METRICS.doc),
    "listeners": Key(TableOf(LISTENER, "listeners"), {},
        "[listeners.NAME] tables; at least one is required, so an empty or half-written "
        "file is refused (by `l4lb check` and by a reload) instead of removing every listener."),
    "pools": Key(TableOf(POOL, "pools"), {},
        "[pools.NAME] tables; a pool no listener names is kept ready (blue-green standby)."),
    "resolvers": Key(RESOLVERS, {}, RESOLVERS.doc),
    "cluster": Key(CLUSTER, None, CLUSTER.doc),
}, doc="An l4lb config file.")


# -- loading ---------------------------------------------------------------------------

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_END = re.compile(r"\s*\(at end of document\)$")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_path(path: KeyPath) -> str:
    """('pools', 'blue', 'backends', 1, 'weight') -> 'pools.blue.backends[1].weight'."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
            text += f".{key}" if text else key
    return text


def default_config_path() -> Path:
    """The annotated default config shipped in the package (conf/l4lb.toml in the source tree)."""
    return Path(__file__).with_name("default.toml")


def load_config(path) -> Config:
    """Read and validate the config file at `path`.

    Raises ConfigError listing every problem, including an unreadable file, bytes that
    are not UTF-8 and TOML syntax errors (with the line tomllib reports).
    """
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError([ConfigIssue(name, 1, "", f"cannot read the config file: {reason}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError([ConfigIssue(name, line, "", "the file is not UTF-8 text")]) from None
    return parse_config(text, path)


def parse_config(text: str, path) -> Config:
    """Validate the TOML `text` of the config file `path` (named in messages; relative
    control.socket paths are taken from its folder). Raises ConfigError listing every problem."""
    name = str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_issue(name, text, str(exc))]) from None

    locator = TomlLocator(text)
    issues: list[ConfigIssue] = []

    def report(key_path: KeyPath, message: str) -> None:
        issues.append(ConfigIssue(name, locator.line_of(key_path), format_path(key_path), message))

    absolute = Path(path).absolute()
    config = SCHEMA.convert(data, (), report, extra={"path": absolute})
    check_references(config, report)
    _resolve_paths(config, absolute.parent, report)
    if issues:
        raise ConfigError(issues)
    config.warnings = _deprecations(data, name, locator)
    config.text = text
    return config


def _deprecations(data: dict, name: str, locator: TomlLocator) -> list[str]:
    """`FILE:LINE key: message` for each deprecated key the file sets: `splice = true`."""
    listeners = data.get("listeners")
    if not isinstance(listeners, dict):
        return []
    warnings = []
    for listener, body in listeners.items():
        if isinstance(body, dict) and body.get("splice") is True:
            path = ("listeners", listener, "splice")
            warnings.append(str(ConfigIssue(name, locator.line_of(path), format_path(path),
                                            SPLICE_DEPRECATED)))
    return warnings


def _syntax_issue(name: str, text: str, message: str) -> ConfigIssue:
    """A TOML syntax error as an issue at the line tomllib names (the last line at end of text)."""
    position = _TOML_POSITION.search(message)
    if position:
        line = int(position.group(1))
        message = f"{message[:position.start()]} (column {position.group(2)})"
    else:
        line = text.count("\n") + 1
        message = _TOML_END.sub(" (at the end of the file)", message)
    return ConfigIssue(name, line, "", f"invalid TOML: {message}")
