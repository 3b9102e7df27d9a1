"""The control protocol (DESIGN.md §6), sans-IO: bytes in, commands out, reply lines back.

Theory of operation
-------------------
The control socket carries one UTF-8 command per line and answers each with exactly one
line holding a JSON object, ``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``.
This module owns the wire format and nothing else — no socket, no event loop, no balancer
state — in the style of h11, so every malformed input is tested without a server:

* ``LineReader.feed(data)`` turns the byte stream into lines. It keeps a partial line
  across calls and never holds more than ``MAX_LINE`` bytes: a longer line yields one
  ``ControlError`` in its place and the reader skips the rest of it up to its newline, so a
  client can keep talking after a mistake (DESIGN.md §6: "a line over 64 KiB ... gets an
  error reply, never a crash").
* ``parse_command(line)`` turns one line into a ``Command`` with typed arguments, or raises
  ``ControlError`` whose message is fit to send back as the error reply.
* ``encode_reply(ok(...))`` / ``encode_reply(error(...))`` build the reply line.

``COMMANDS`` is the single source of truth for the grammar: each ``CommandSpec`` gives the
command's words, its typed arguments, a one-line summary and the fields of its reply.
Parsing, ``help`` and generated docs all read it, so they cannot drift apart. The parser
is table-driven: a command is found by its words, then each ``ArgSpec`` is handed to the
parser registered for its ``ArgKind`` in ``_ARG_PARSERS``.

Guarantees: ``parse_command`` and ``LineReader.feed`` raise/return no exception type but
``ControlError`` for any input bytes. Not covered here: whether a named pool, backend or
listener exists — that is the command handler's job, which knows the running config.
"""
from __future__ import annotations

import difflib
import enum
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import vocab
from ..sni import check_sni_pattern
from ..address import parse_address

__all__ = [
    "COMMANDS",
    "COMMANDS_BY_NAME",
    "MAX_LINE",
    "SUBSCRIBE_INTERVAL",
    "NAME_PATTERN",
    "ArgKind",
    "ArgSpec",
    "Command",
    "CommandSpec",
    "ControlError",
    "LineReader",
    "Stream",
    "encode_reply",
    "error",
    "help_text",
    "ok",
    "parse_command",
    "parse_host_port",
]

# DESIGN.md §6: a longer line is refused. Counted on the bytes before the newline, a
# trailing \r included, so the reader can decide before the newline arrives.
MAX_LINE = 64 * 1024

# Names, weight bounds and the address rule are shared with the config and the state
# file: they live in l4lb.vocab and l4lb.address, and are only used here.
NAME_PATTERN = vocab.NAME_PATTERN
_NAME_RE = vocab.NAME_RE
_DIGITS_RE = re.compile(r"[0-9]+")  # not int() alone: it also takes "+5", "1_000" and "٥"
# Digits beyond this make any number out of every range here; int() of a string over 4300
# digits raises ValueError (CVE-2020-10735 limit), so longer ones are never converted.
_MAX_DIGITS = 18
_DECIMAL_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")  # not float(): "inf", "nan", "1e9"

WEIGHT_MAX = vocab.WEIGHT_MAX
WEIGHT_DEFAULT = vocab.WEIGHT_DEFAULT
# `subscribe`: seconds between two frames unless given, and the shortest interval taken
# (a frame is a snapshot of every backend: at 20 a second a viewer costs a little, and
# no screen or eye needs more).
SUBSCRIBE_INTERVAL = 1.0
SUBSCRIBE_MIN_INTERVAL = 0.05


class ControlError(Exception):
    """A control line is malformed; ``str(exc)`` is the message for the error reply.

    The only exception type ``LineReader`` and ``parse_command`` produce.
    """


# ---------------------------------------------------------------------------------------
# The command table


class ArgKind(enum.Enum):
    """How an argument's text is checked and what value it becomes (see _ARG_PARSERS)."""

    NAME = "name"  # a pool or listener name -> str
    BACKEND_REF = "backend_ref"  # POOL/BACKEND -> {"pool": str, "backend": str}
    BACKEND_FILTER = "backend_filter"  # POOL[/BACKEND] -> {"pool": str, "backend": str|None}
    COUNT = "count"  # decimal integer within [low, high] -> int
    TIMEOUT = "timeout"  # seconds, > 0, finite -> float
    ADDRESS = "address"  # HOST:PORT, [IPv6]:PORT -> (host, port)
    SPLIT = "split"  # POOL=PCT ... summing to 100 -> {pool: pct} in the given order
    ROUTE = "route"  # LISTENER[/SNI] -> {"listener": str, "sni": str|None (normalized pattern)}
    FLAG = "flag"  # a keyword alone (--fleet) -> True; absent -> False


@dataclass(frozen=True)
class ArgSpec:
    """One argument of a command.

    ``key`` names the value in ``Command.args`` (BACKEND_REF and BACKEND_FILTER fill
    "pool" and "backend" instead). An ``optional`` argument absent from the line gets
    ``default``. ``keyword`` makes it a named option written ``keyword VALUE`` after the
    positional ones (``add ... weight 50``). SPLIT takes every remaining token.
    """

    kind: ArgKind
    key: str
    metavar: str
    optional: bool = False
    default: Any = None
    keyword: str | None = None
    low: int = 0  # COUNT only
    high: int | None = None  # COUNT only; None = unbounded

    @property
    def usage(self) -> str:
        if self.kind is ArgKind.FLAG:
            return f"[{self.keyword}]"
        text = f"{self.keyword} {self.metavar}" if self.keyword else self.metavar
        if self.kind is ArgKind.SPLIT:
            text += " ..."
        return f"[{text}]" if self.optional else text

    @property
    def keys(self) -> tuple[str, ...]:
        """The keys this argument sets in Command.args."""
        if self.kind in (ArgKind.BACKEND_REF, ArgKind.BACKEND_FILTER):
            return ("pool", "backend")
        if self.kind is ArgKind.ROUTE:
            return ("listener", "sni")
        return (self.key,)


@dataclass(frozen=True)
class CommandSpec:
    """One command of DESIGN.md §6.

    ``reply`` lists the fields of the ok reply besides "ok". When ``rows`` is set, the
    reply holds one field, ``reply[0]``, a list of objects each with the ``rows`` fields
    (``show backends`` -> ``{"ok": true, "backends": [{"pool": ..., ...}, ...]}``).
    A ``stream`` command is answered by one such reply line per interval, not by one
    line, until the client closes (its handler returns a ``Stream``).
    """

    words: tuple[str, ...]
    args: tuple[ArgSpec, ...]
    summary: str
    reply: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()
    stream: bool = False

    @property
    def name(self) -> str:
        return " ".join(self.words)

    @property
    def usage(self) -> str:
        return " ".join([self.name, *(arg.usage for arg in self.args)])


_BACKEND = ArgSpec(ArgKind.BACKEND_REF, "backend", "POOL/BACKEND")
# A listener's default route, or one of its sni routes by pattern as the config writes it.
_ROUTE = ArgSpec(ArgKind.ROUTE, "listener", "LISTENER[/SNI]")
_TIMEOUT = ArgSpec(ArgKind.TIMEOUT, "timeout", "TIMEOUT", optional=True)
_STATE_REPLY = ("pool", "backend", "state", "previous")
# `by deploy`: l4lb deploy marks the admin states it sets (vocab.SET_BY_WORDS).
_SET_BY = ArgSpec(ArgKind.NAME, "by", "WHO", optional=True, keyword="by")
# In a fleet ([cluster]): reply once every live node applied the change, not only this one.
_FLEET = ArgSpec(ArgKind.FLAG, "fleet", "", optional=True, default=False, keyword="--fleet")

COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec(("help",), (), "list the commands", reply=("commands",)),
    CommandSpec(
        ("show", "info"), (),
        "the process: version, uptime, resources, connection counts, the master's "
        "generation (1 + the binary upgrades it descends from) and start time",
        reply=("version", "pid", "uptime_s", "cpu_percent", "cpu_seconds", "rss_bytes", "open_fds",
               "conns_active", "conns_total", "pipes", "log_lines_dropped", "fd_limit",
               "fds_needed", "warnings", "workers", "generation", "started",
               "upgraded_from"),
    ),
    CommandSpec(
        ("show", "listeners"), (), "every listener with its pool or split and counters",
        reply=("listeners",),
        rows=("name", "bind", "pool", "split", "splice", "active", "accepted", "rejected",
              "sni", "inspected"),
    ),
    CommandSpec(
        ("show", "backends"), (ArgSpec(ArgKind.NAME, "pool", "POOL", optional=True),),
        "backends with state, health, weight and counters; all pools or one",
        reply=("backends",),
        rows=("pool", "name", "address", "state", "health", "checked", "weight", "active",
              "total", "failed", "bytes_in", "bytes_out", "rt_ms", "resp_ms", "responses", "last_check",
              "last_error", "check_duration_ms", "check_failures", "connect_failures",
              "set_by", "backup", "check_address", "resolved", "resolve_error"),
    ),
    CommandSpec(
        ("show", "conns"),
        (ArgSpec(ArgKind.BACKEND_FILTER, "pool", "POOL[/BACKEND]", optional=True),),
        "open connections; all, one pool's or one backend's",
        reply=("conns",),
        rows=("id", "worker", "client", "listener", "pool", "backend", "state", "sni", "route",
              "age_s", "bytes_in", "bytes_out"),
    ),
    CommandSpec(
        ("show", "workers"), (), "the worker processes: pid, start, connections, restarts",
        reply=("workers",),
        rows=("worker", "pid", "generation", "started", "live", "active", "accepted",
              "restarts"),
    ),
    CommandSpec(("enable",), (_BACKEND, _FLEET), "put a backend in rotation (state up)",
                reply=_STATE_REPLY),
    CommandSpec(("disable",), (_BACKEND, _SET_BY, _FLEET),
                "take a backend out for maintenance (state maint, health checks paused); "
                "`by deploy` marks it as a deploy's",
                reply=_STATE_REPLY),
    CommandSpec(("drain",), (_BACKEND, _SET_BY, _FLEET),
                "stop new connections to a backend, let existing ones finish; "
                "`by deploy` marks it as a deploy's",
                reply=_STATE_REPLY),
    CommandSpec(
        ("wait",), (_BACKEND, _TIMEOUT),
        "reply once the backend has no active connections (in a fleet: on any live node); "
        "ok:false after TIMEOUT s",
        reply=("pool", "backend", "waited_s"),
    ),
    CommandSpec(("kill",), (_BACKEND,), "close a backend's connections now",
                reply=("pool", "backend", "closed")),
    CommandSpec(
        ("weight",),
        (_BACKEND, ArgSpec(ArgKind.COUNT, "weight", "N", high=WEIGHT_MAX), _FLEET),
        f"set a backend's weight (0..{WEIGHT_MAX}; 0 = no new connections)",
        reply=("pool", "backend", "weight", "previous"),
    ),
    CommandSpec(
        ("add",),
        (
            ArgSpec(ArgKind.NAME, "pool", "POOL"),
            ArgSpec(ArgKind.NAME, "backend", "BACKEND"),
            ArgSpec(ArgKind.ADDRESS, "address", "HOST:PORT"),
            ArgSpec(ArgKind.COUNT, "weight", "N", optional=True, default=WEIGHT_DEFAULT,
                    keyword="weight", high=WEIGHT_MAX),
            _FLEET,
        ),
        f"add a backend to a pool (weight {WEIGHT_DEFAULT} unless given)",
        reply=("pool", "backend", "address", "weight", "state"),
    ),
    CommandSpec(("remove",), (_BACKEND, _FLEET),
                "remove a backend; refused while it has active connections",
                reply=("pool", "backend")),
    CommandSpec(
        ("switch",),
        (_ROUTE, ArgSpec(ArgKind.NAME, "pool", "POOL"), _FLEET),
        "blue-green: send all new connections of LISTENER (or of its sni route SNI) to POOL",
        reply=("listener", "sni", "pool", "previous"),
    ),
    CommandSpec(
        ("split",),
        (_ROUTE, ArgSpec(ArgKind.SPLIT, "split", "POOL=PCT"), _FLEET),
        "canary: share new connections of LISTENER (or of its sni route SNI) between pools, "
        "percentages summing to 100",
        reply=("listener", "sni", "split", "previous"),
    ),
    CommandSpec(
        ("show", "cluster"), (),
        "with [cluster]: the live nodes of the fleet, the revision each applied, its lag, "
        "last heartbeat and active connections (per backend)",
        reply=("nodes",),
        rows=("node", "self", "pid", "applied", "lag", "heartbeat_age_s", "active",
              "backends", "etcd"),
    ),
    CommandSpec(("reload",), (), "re-read the config file; a bad file changes nothing",
                reply=("changes",)),
    CommandSpec(("upgrade",), (),
                "binary upgrade: the l4lb now installed takes over the listening and control "
                "sockets and the runtime state; this one finishes its connections and exits; "
                "a new master that fails changes nothing",
                reply=("pid", "generation", "version")),
    CommandSpec(("shutdown",), (_TIMEOUT,),
                "graceful shutdown: stop accepting, close connections after TIMEOUT s",
                reply=("timeout_s",)),
    CommandSpec(
        ("subscribe",), (ArgSpec(ArgKind.TIMEOUT, "interval", "INTERVAL", optional=True),),
        f"stream one reply line every INTERVAL s (default {SUBSCRIBE_INTERVAL:g}, at least "
        f"{SUBSCRIBE_MIN_INTERVAL:g}) with the figures of show info, listeners, backends and "
        "workers, their rates and the drains under way, until the client closes; the "
        "connection's last command (docs/status.schema.json)",
        reply=("ts", "interval", "info", "pools", "backends", "listeners", "workers", "drains"),
        stream=True,
    ),
)

COMMANDS_BY_NAME: dict[str, CommandSpec] = {spec.name: spec for spec in COMMANDS}
# The commands that change nothing: the ones a master still answers while it hands over
# to a new one (upgrade), and after.
LOOKING = frozenset(name for name in COMMANDS_BY_NAME
                    if name.startswith("show") or name in ("help", "subscribe", "wait"))
# First words that need a second one ("show" -> info, listeners, ...).
_PREFIXES = {spec.words[0] for spec in COMMANDS if len(spec.words) > 1}


@dataclass(frozen=True)
class Command:
    """A parsed command: ``name`` is its words joined by a space ("show backends"),
    ``args`` maps every argument key of its spec to a typed value (defaults filled in)."""

    name: str
    args: dict[str, Any]


# ---------------------------------------------------------------------------------------
# Argument parsers: text -> {key: value}; ControlError (message without usage) on failure.

_QUOTE_MAX = 40  # characters of client input echoed in an error message


def _quote(text: str) -> str:
    """``text`` quoted for an error message, cut short: a 64 KiB token is not echoed."""
    return repr(text) if len(text) <= _QUOTE_MAX else repr(text[:_QUOTE_MAX]) + "..."


def _shorten(text: str) -> str:
    """``text`` as is for an error message, cut short like _quote."""
    return text if len(text) <= _QUOTE_MAX else text[:_QUOTE_MAX] + "..."


def _parse_name(spec: ArgSpec, text: str) -> dict[str, Any]:
    return {spec.key: _check_name(text, spec.metavar)}


def _check_name(text: str, what: str) -> str:
    if not _NAME_RE.fullmatch(text):
        raise ControlError(f"bad {what} {_quote(text)}: names are {vocab.NAME_DOC}")
    return text


def _parse_backend_ref(spec: ArgSpec, text: str) -> dict[str, Any]:
    pool, slash, backend = text.partition("/")
    if not slash:
        raise ControlError(
            f"bad {spec.metavar} {_quote(text)}: want POOL/BACKEND, e.g. blue/app1"
        )
    return {"pool": _check_name(pool, "POOL"), "backend": _check_name(backend, "BACKEND")}


def _parse_backend_filter(spec: ArgSpec, text: str) -> dict[str, Any]:
    if "/" in text:
        return _parse_backend_ref(spec, text)
    return {"pool": _check_name(text, "POOL"), "backend": None}


def _parse_route(spec: ArgSpec, text: str) -> dict[str, Any]:
    listener, slash, pattern = text.partition("/")
    if not slash:
        return {"listener": _check_name(listener, "LISTENER"), "sni": None}
    try:
        sni = check_sni_pattern(pattern)
    except ValueError as exc:
        raise ControlError(f"bad SNI in {_quote(text)}: {exc}") from None
    return {"listener": _check_name(listener, "LISTENER"), "sni": sni}


def _parse_natural(text: str) -> int | None:
    """ASCII decimal digits -> int (saturated at 10**_MAX_DIGITS); None if not digits."""
    if not _DIGITS_RE.fullmatch(text):
        return None
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else 10**_MAX_DIGITS


def _parse_count(spec: ArgSpec, text: str) -> dict[str, Any]:
    value = _parse_natural(text)
    if value is None:
        raise ControlError(f"bad {spec.key} {_quote(text)}: want a whole number like 50")
    if value < spec.low or (spec.high is not None and value > spec.high):
        bound = f"between {spec.low} and {spec.high}" if spec.high is not None else (
            f"at least {spec.low}")
        raise ControlError(f"{spec.key} must be {bound}, got {_shorten(text)}")
    return {spec.key: value}


def _parse_timeout(spec: ArgSpec, text: str) -> dict[str, Any]:
    if not _DECIMAL_RE.fullmatch(text):
        raise ControlError(f"bad {spec.metavar} {_quote(text)}: want seconds like 30 or 2.5")
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise ControlError(
            f"{spec.metavar} must be a positive, finite number of seconds, got {_shorten(text)}"
        )
    return {spec.key: value}


def _parse_address(spec: ArgSpec, text: str) -> dict[str, Any]:
    return {spec.key: parse_host_port(text)}


def _parse_split_item(text: str) -> tuple[str, int]:
    pool, equals, pct = text.partition("=")
    if not equals:
        raise ControlError(f"bad POOL=PCT {_quote(text)}: want e.g. blue=90")
    value = _parse_natural(pct)
    if value is None or value > 100:
        raise ControlError(f"bad percentage in {_quote(text)}: want a whole number 0..100")
    return _check_name(pool, "POOL"), value


def _parse_split(spec: ArgSpec, tokens: list[str]) -> dict[str, Any]:
    shares: dict[str, int] = {}
    for token in tokens:
        pool, pct = _parse_split_item(token)
        if pool in shares:
            raise ControlError(f"pool {pool!r} appears twice in the split")
        shares[pool] = pct
    try:
        return {spec.key: vocab.check_split(shares)}
    except ValueError as exc:
        raise ControlError(str(exc)) from None


# ArgKind -> parser of one token. SPLIT is variadic and handled apart (_parse_split).
_ARG_PARSERS: dict[ArgKind, Callable[[ArgSpec, str], dict[str, Any]]] = {
    ArgKind.NAME: _parse_name,
    ArgKind.BACKEND_REF: _parse_backend_ref,
    ArgKind.BACKEND_FILTER: _parse_backend_filter,
    ArgKind.COUNT: _parse_count,
    ArgKind.TIMEOUT: _parse_timeout,
    ArgKind.ADDRESS: _parse_address,
    ArgKind.ROUTE: _parse_route,
}


def parse_host_port(text: str) -> tuple[str, int]:
    """Parse a backend's ``HOST:PORT`` into ``(host, port)`` by the one address rule
    (l4lb.address.parse_address: port 1..65535); raise ControlError if malformed."""
    try:
        address = parse_address(text)
    except ValueError as exc:
        raise ControlError(str(exc)) from None
    return address.host, address.port


# ---------------------------------------------------------------------------------------
# Commands


def parse_command(line: bytes) -> Command:
    """Parse one control line (without its newline) into a Command.

    Raises ControlError, with a message meant for the client, for bad UTF-8, an empty
    line, an unknown command (naming the closest one), missing or extra arguments (with
    the command's usage), and any argument of the wrong type or out of range.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ControlError(f"command is not valid UTF-8 (byte {exc.start})") from None
    tokens = text.split()
    if not tokens:
        raise ControlError("empty command (try 'help')")
    spec, rest = _find_command(tokens)
    try:
        args = _parse_args(spec, rest)
    except ControlError as exc:
        raise ControlError(f"{exc}; usage: {spec.usage}") from None
    return Command(spec.name, args)


def _find_command(tokens: list[str]) -> tuple[CommandSpec, list[str]]:
    """The spec named by the first one or two tokens, and the tokens after its words."""
    first = tokens[0].lower()
    if first in _PREFIXES:
        if len(tokens) == 1:
            choices = ", ".join(s.usage for s in COMMANDS if s.words[0] == first)
            raise ControlError(f"incomplete command {_quote(first)}: one of {choices}")
        name = f"{first} {tokens[1].lower()}"
        rest = tokens[2:]
    else:
        name = first
        rest = tokens[1:]
    spec = COMMANDS_BY_NAME.get(name)
    if spec is None:
        raise ControlError(_unknown_command_message(name, tokens))
    return spec, rest


def _unknown_command_message(name: str, tokens: list[str]) -> str:
    """Name the unknown command and the closest known one, judged on one or two words."""
    # Only short guesses: nothing long is close to a command, and difflib is quadratic.
    guesses = [g for g in (" ".join(tokens[:2]).lower(), name) if len(g) <= _QUOTE_MAX]
    matches = [m for g in guesses for m in difflib.get_close_matches(g, COMMANDS_BY_NAME, 1)]
    hint = f"; did you mean {matches[0]!r}?" if matches else ""
    return f"unknown command {_quote(name)}{hint} (try 'help')"


def _parse_args(spec: CommandSpec, tokens: list[str]) -> dict[str, Any]:
    """Match tokens against the spec: positionals in order, then keyword options."""
    args: dict[str, Any] = {}
    positional = [a for a in spec.args if a.keyword is None]
    options = {a.keyword: a for a in spec.args if a.keyword is not None}
    i = 0
    for arg in positional:
        if arg.kind is ArgKind.SPLIT:
            end = next((j for j in range(i, len(tokens)) if tokens[j] in options),
                       len(tokens))
            if i >= end:
                raise ControlError(f"missing {arg.metavar}")
            args.update(_parse_split(arg, tokens[i:end]))
            i = end
        elif i < len(tokens) and not (arg.optional and tokens[i] in options):
            args.update(_ARG_PARSERS[arg.kind](arg, tokens[i]))
            i += 1
        elif arg.optional:
            args.update(dict.fromkeys(arg.keys, arg.default))
        else:
            raise ControlError(f"missing {arg.metavar}")
    seen = set()
    while i < len(tokens):
        option = options.get(tokens[i])
        if option is None:
            raise ControlError(f"unexpected argument {_quote(tokens[i])}")
        if option.keyword in seen:
            raise ControlError(f"{option.keyword!r} given twice")
        if option.kind is ArgKind.FLAG:
            args[option.key] = True
            seen.add(option.keyword)
            i += 1
            continue
        if i + 1 >= len(tokens):
            raise ControlError(f"missing {option.metavar} after {option.keyword!r}")
        args.update(_ARG_PARSERS[option.kind](option, tokens[i + 1]))
        seen.add(option.keyword)
        i += 2
    for option in options.values():
        if option.keyword not in seen:
            args[option.key] = option.default
    return args


def help_text() -> list[str]:
    """One line per command: its usage, padded, then its summary."""
    width = max(len(spec.usage) for spec in COMMANDS) + 2
    return [f"{spec.usage:<{width}}{spec.summary}" for spec in COMMANDS]


# ---------------------------------------------------------------------------------------
# Replies


@dataclass(frozen=True)
class Stream:
    """What a ``stream`` command's handler returns: ``frame()`` builds the fields of the
    next reply line, due every ``interval`` seconds (the server owns the timing and the
    flow control)."""

    interval: float
    frame: Callable[[], dict[str, Any]]


def ok(**fields: Any) -> dict[str, Any]:
    """The success reply ``{"ok": true, **fields}``; a field named "ok" is a TypeError."""
    if "ok" in fields:
        raise TypeError("a reply field cannot be named 'ok'")
    return {"ok": True, **fields}


def error(message: str) -> dict[str, Any]:
    """The failure reply ``{"ok": false, "error": message}``."""
    return {"ok": False, "error": str(message)}


def encode_reply(obj: dict[str, Any]) -> bytes:
    """One reply line: compact JSON, UTF-8, ending in a newline.

    Raises TypeError for a value JSON cannot hold and ValueError for NaN or infinity (which
    are not JSON, and a client's parser would choke on them): a bug in the caller, which
    should reply with ``error()`` instead. A lone surrogate in a string is escaped, not
    fatal.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8", "backslashreplace") + b"\n"


# ---------------------------------------------------------------------------------------
# Framing


class LineReader:
    """Split a byte stream into lines, bounded by MAX_LINE.

    ``feed(data)`` returns, in stream order, each complete line (without its "\\n" and one
    trailing "\\r") and, in place of each over-long line, one ControlError. A partial line
    is kept for the next feed. Memory stays under MAX_LINE bytes per reader: the bytes of
    an over-long line are dropped as they come, up to its newline.
    """

    def __init__(self) -> None:
        self._partial = bytearray()  # the start of the current line, <= MAX_LINE bytes
        self._discarding = False  # inside an over-long line, already reported

    def feed(self, data: bytes) -> list[bytes | ControlError]:
        out: list[bytes | ControlError] = []
        start = 0
        while (newline := data.find(b"\n", start)) != -1:
            self._take(data, start, newline, out)
            self._end_line(out)
            start = newline + 1
        self._take(data, start, len(data), out)
        return out

    def _take(self, data: bytes, start: int, end: int, out: list) -> None:
        """Append data[start:end] to the partial line, or drop it if the line is too long."""
        if self._discarding:
            return
        if len(self._partial) + (end - start) > MAX_LINE:
            out.append(ControlError(f"line longer than {MAX_LINE} bytes"))
            self._partial.clear()
            self._discarding = True
            return
        self._partial += data[start:end]

    def _end_line(self, out: list) -> None:
        if self._discarding:
            self._discarding = False
            return
        line = bytes(self._partial)
        self._partial.clear()
        out.append(line[:-1] if line.endswith(b"\r") else line)
