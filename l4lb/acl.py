"""Admission control for a listener: allow/deny CIDR lists and per-source limits.

Theory of operation
-------------------
The relay calls ``ListenerRuntime.gate.admit(relay)`` once per connection, right after
accept (after the PROXY header with ``accept_proxy``, so the address from the header is
the one judged), before any backend work. It returns ``None`` to admit or a reason string;
a refused client is aborted at once and counted under that reason in ``show listeners``.
A relay the gate admitted calls ``gate.release(relay)`` when it closes. A listener with
no allow/deny and no per-source limit gets no gate at all, so its accept path makes no
Python call for admission.

Access lists (``allow``/``deny``): longest prefix wins across both lists. Among every CIDR
of allow ∪ deny that contains the client address, the longest prefix decides: a deny
refuses (``denied``), an allow admits; the same network in both lists counts as deny.
When nothing matches, the client is admitted if ``allow`` is empty and refused
(``not_allowed``) otherwise. So ``allow = ["10.0.0.0/8"]`` with ``deny = ["10.6.0.0/16"]``
admits 10.1.2.3 and refuses 10.6.1.1, and adding ``allow = ["10.6.6.0/24"]`` re-opens that
/24 inside the denied /16. An IPv4-mapped IPv6 address (``::ffff:10.1.2.3``, e.g. from a
PROXY header) is judged as the IPv4 address it carries.

The lookup is a dict per prefix length holding the network numbers (address >> host bits)
with their verdict, tried from the longest length down: the cost per connection is one
``inet_pton`` plus at most one dict probe per distinct prefix length in the lists, however
many CIDRs they hold.

Per-source limits are keyed by the address, not by its spelling (``source_key``): the
kernel writes a client as ``10.0.0.1`` while a PROXY header may say ``::ffff:10.0.0.1``,
``::FFFF:a00:1`` or a scoped ``fe80::1%eth0``; each is one number (an IPv4-mapped IPv6
address is its IPv4 address, a zone is ignored as in the access lists), so a client
cannot multiply its limits by rewriting its address (issue 20 item 7):

* ``per_source_max_connections``: connections open at once from one address; beyond it the
  new one is refused (``per_source_max_connections``).
* ``per_source_rate``: a token bucket per address refilled at ``rate`` tokens per second and
  holding at most ``burst = max(rate, 1)`` tokens; each admitted connection takes one. A
  source with less than one token is refused (``per_source_rate``). Refused attempts take
  no token, so a flood does not starve the source further than the rate says.

The per-source table forgets idle sources: an entry with no open connection is dropped at
once when there is no rate limit, else as soon as its bucket is certainly full again
(``burst / rate`` seconds after its last attempt), by a pass that runs at most once per
``PRUNE_INTERVAL`` and only walks entries that old (the table is kept in last-use order).
It is capped at ``SOURCE_TABLE_CAP`` entries. At the cap a new source is refused
(``per_source_table_full``) until a prune pass makes room, rather than admitted unaccounted: admitting would let
a flood from many addresses bypass every per-source limit exactly when they matter, while
refusing keeps the balancer's cost bounded and keeps serving every source it already
knows. Reaching the cap takes more than ``SOURCE_TABLE_CAP`` distinct addresses within
one bucket-refill time (about one second), or that many addresses holding connections.

Failure: nothing here raises for any address text; an address that does not parse matches
no CIDR and is counted under its literal text.

Shared limits (several workers, issue 15): given a shared table and the listener's record
index, configure_gate makes the limits an ``l4lb._native.SharedSourceLimits`` instead,
with this class's API and semantics, kept in the table under process-shared robust
mutexes so that ``per_source_max_connections = 10`` admits exactly 10 from one address
across every worker. Its keys are the relay's 64-bit address keys (``address_key``: every
spelling of an address is one source); its entries are ordered by their stamp, which
with a rate is the last-use order, so it prunes the same entries; its cap counts this
listener's entries in the table (whose size is fixed when the master creates it). The
tests drive both with one random sequence and expect the same verdicts.

Cost: the gate parses the address once per connection (one ``inet_pton``) for both the
access lists and the per-source key.
"""
from __future__ import annotations

import socket
from collections import OrderedDict
from collections.abc import Callable, Iterable

from l4lb._native import SharedSourceLimits

__all__ = [
    "DENIED",
    "NOT_ALLOWED",
    "PER_SOURCE_MAX_CONNECTIONS",
    "PER_SOURCE_RATE",
    "PER_SOURCE_TABLE_FULL",
    "SOURCE_TABLE_CAP",
    "AccessList",
    "Gate",
    "SourceLimits",
    "configure_gate",
    "source_key",
]

# Reasons, as counted in ListenerRuntime.rejected (`show listeners`).
DENIED = "denied"
NOT_ALLOWED = "not_allowed"
PER_SOURCE_MAX_CONNECTIONS = "per_source_max_connections"
PER_SOURCE_RATE = "per_source_rate"
PER_SOURCE_TABLE_FULL = "per_source_table_full"

# Entries in one listener's per-source table: about 100 bytes each, so ~10 MB at the cap.
SOURCE_TABLE_CAP = 100_000
# Seconds between two prune passes over the per-source table.
PRUNE_INTERVAL = 1.0

_ALLOW = False
_DENY = True
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"   # ::ffff:0:0/96 (RFC 4291 §2.5.5.2)


def _parse_address(host) -> tuple[int, int] | None:
    """(family bits, address as an int) for an IP text, or None if it is not one. An
    IPv4-mapped IPv6 address gives its IPv4 address; a "%scope" suffix is ignored."""
    if not host:
        return None
    try:
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
            if packed[:12] == _V4_MAPPED:
                return 32, int.from_bytes(packed[12:], "big")
            return 128, int.from_bytes(packed, "big")
        return 32, int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")
    except (OSError, ValueError, TypeError):
        return None


# Added to an IPv6 address's number in its per-source key, so that no IPv6 key equals an
# IPv4 one (::1 and 0.0.0.1 are different sources).
_V6_KEY = 1 << 128


def _key_of(parsed: tuple[int, int] | None, host):
    """The per-source key of a parsed address (see source_key)."""
    if parsed is None:
        return host
    bits, address = parsed
    return address if bits == 32 else address | _V6_KEY


def source_key(host):
    """The per-source table key of an IP text: one int per address whatever its spelling
    (IPv4, IPv4-mapped IPv6, any IPv6 text form, with or without a zone); the text itself
    when it is not an IP address."""
    return _key_of(_parse_address(host), host)


def _parse_network(cidr: str) -> tuple[int, int, int]:
    """(family bits, prefix length, network as an int) for a CIDR text; ValueError if bad.
    Host bits are cleared, as the config loader does. An IPv4-mapped IPv6 network of /96
    or longer becomes the IPv4 network it maps, since mapped addresses are judged as IPv4."""
    text, _, length_text = cidr.strip().partition("/")
    try:
        if ":" in text:
            bits, address = 128, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
        else:
            bits, address = 32, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
        length = int(length_text) if length_text else bits
    except (OSError, ValueError):
        raise ValueError(f"not a CIDR: {cidr!r}") from None
    if not 0 <= length <= bits:
        raise ValueError(f"prefix length out of range: {cidr!r}")
    if bits == 128 and length >= 96 and address >> 32 == 0xFFFF:
        bits, length, address = 32, length - 96, address & 0xFFFFFFFF
    return bits, length, address >> (bits - length) << (bits - length)


class _PrefixTable:
    """One address family: prefix length -> {network >> host bits: verdict}."""

    __slots__ = ("bits", "levels")

    def __init__(self, bits: int):
        self.bits = bits
        self.levels: list[tuple[int, dict[int, bool]]] = []   # (host bits, nets), longest first

    def add(self, length: int, network: int, verdict: bool) -> None:
        shift = self.bits - length
        for level_shift, nets in self.levels:
            if level_shift == shift:
                break
        else:
            nets = {}
            self.levels.append((shift, nets))
            self.levels.sort(key=lambda level: level[0])
        key = network >> shift
        nets[key] = nets.get(key, _ALLOW) or verdict      # deny wins a tie

    def lookup(self, address: int) -> bool | None:
        """The verdict of the longest prefix holding `address`, or None."""
        for shift, nets in self.levels:
            verdict = nets.get(address >> shift)
            if verdict is not None:
                return verdict
        return None


class AccessList:
    """allow/deny CIDR lists; ``check(host)`` -> None (admit), DENIED or NOT_ALLOWED."""

    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()):
        self.allow = list(allow)
        self.deny = list(deny)
        self.tables = {32: _PrefixTable(32), 128: _PrefixTable(128)}
        for verdict, cidrs in ((_ALLOW, self.allow), (_DENY, self.deny)):
            for cidr in cidrs:
                bits, length, network = _parse_network(cidr)
                self.tables[bits].add(length, network, verdict)
        self.unmatched = None if not self.allow else NOT_ALLOWED

    def check(self, host) -> str | None:
        return self.check_parsed(_parse_address(host))

    def check_parsed(self, parsed: tuple[int, int] | None) -> str | None:
        """check() for an address already parsed by _parse_address."""
        if parsed is None:
            return self.unmatched
        verdict = self.tables[parsed[0]].lookup(parsed[1])
        if verdict is None:
            return self.unmatched
        return DENIED if verdict else None

    def __bool__(self) -> bool:
        return bool(self.allow or self.deny)


class _Source:
    """One client address in the per-source table."""

    __slots__ = ("active", "tokens", "stamp")

    def __init__(self, tokens: float, stamp: float):
        self.active = 0          # connections open now
        self.tokens = tokens     # bucket level as of `stamp`
        self.stamp = stamp       # clock time of the last attempt (refill reference)


class SourceLimits:
    """Per-source concurrent connections and connection rate (see the module doc).

    ``admit(key, now)`` -> None or a reason; every admitted key must be given back with
    ``release(key)`` exactly once. ``now`` is any monotonic clock in seconds. A key is
    any hashable; the Gate passes ``source_key(host)`` so that spellings of one address
    share one entry.
    """

    def __init__(self, max_connections: int = 0, rate: float = 0.0,
                 cap: int = SOURCE_TABLE_CAP):
        self.table: OrderedDict[object, _Source] = OrderedDict()   # least recently tried first
        self.cap = cap
        self.next_prune = 0.0
        self.configure(max_connections, rate)

    def key_of(self, host, parsed):
        """The table key of a client address (`parsed`: its _parse_address)."""
        return _key_of(parsed, host)

    def configure(self, max_connections: int, rate: float) -> None:
        """Change the limits in place (reload); the table and its counts are kept."""
        self.max_connections = max_connections
        self.rate = rate
        self.burst = max(rate, 1.0)
        # After this long without an attempt a bucket is certainly full again.
        self.refill_time = self.burst / rate if rate > 0 else 0.0
        if rate <= 0:
            for source in self.table.values():
                source.tokens = self.burst

    def admit(self, key, now: float) -> str | None:
        table = self.table
        if now >= self.next_prune:
            self.prune(now)
        source = table.get(key)
        if source is None:
            if len(table) >= self.cap:
                return PER_SOURCE_TABLE_FULL
            source = table[key] = _Source(self.burst, now)
        else:
            if 0 < self.max_connections <= source.active:
                return PER_SOURCE_MAX_CONNECTIONS
            table.move_to_end(key)
        rate = self.rate
        if rate > 0:
            tokens = source.tokens + (now - source.stamp) * rate
            if tokens > self.burst:
                tokens = self.burst
            source.stamp = now
            if tokens < 1.0:
                source.tokens = tokens
                return PER_SOURCE_RATE
            source.tokens = tokens - 1.0
        source.active += 1
        return None

    def release(self, key) -> None:
        source = self.table.get(key)
        if source is None:
            return
        if source.active > 0:                # never below 0, even across a reload
            source.active -= 1
        if source.active == 0 and self.rate <= 0:
            del self.table[key]

    def prune(self, now: float) -> int:
        """Forget sources with no open connection and a full bucket; returns how many.
        Walks only entries older than one refill time (the table is in last-use order)."""
        self.next_prune = now + PRUNE_INTERVAL
        horizon = now - self.refill_time
        dead = []
        for key, source in self.table.items():
            if source.stamp > horizon:
                break
            if source.active <= 0:
                dead.append(key)
        for key in dead:
            del self.table[key]
        return len(dead)

    def __len__(self) -> int:
        return len(self.table)


class Gate:
    """The object ListenerRuntime.gate holds: an access list and/or per-source limits."""

    def __init__(self, access: AccessList | None, limits: SourceLimits | None,
                 clock: Callable[[], float]):
        self.access = access
        self.limits = limits
        self.clock = clock

    def admit(self, relay) -> str | None:
        """None to admit `relay`, else the reason it is refused (called by the relay)."""
        host = relay.client_host
        parsed = _parse_address(host)
        if self.access is not None:
            reason = self.access.check_parsed(parsed)
            if reason is not None:
                return reason
        limits = self.limits
        if limits is not None:
            return limits.admit(limits.key_of(host, parsed), self.clock())
        return None

    def release(self, relay) -> None:
        """`relay`, admitted by this gate, has closed (called by the relay)."""
        limits = self.limits
        if limits is not None:
            host = relay.client_host
            limits.release(limits.key_of(host, _parse_address(host)))


def configure_gate(previous: Gate | None, cfg, clock: Callable[[], float],
                   table=None, index: int | None = None) -> Gate | None:
    """The gate for a listener config (``allow``, ``deny``, ``per_source_*``), or None when
    it sets none of them. Reuses `previous` in place on reload, so the per-source counts of
    open connections carry over (relays release to the gate that admitted them). With a
    shared table (``l4lb._native.SharedTable``) and the listener's record `index`, the
    per-source limits are the shared ones (SharedSourceLimits), global across workers;
    `clock` must then be one every process shares (CLOCK_MONOTONIC: loop.time or
    _native.monotonic)."""
    access = AccessList(cfg.allow, cfg.deny) if (cfg.allow or cfg.deny) else None
    wants_limits = cfg.per_source_max_connections > 0 or cfg.per_source_rate > 0
    if access is None and not wants_limits:
        return None
    gate = previous if previous is not None else Gate(None, None, clock)
    gate.access = access
    gate.clock = clock
    shared = table is not None and index is not None
    if not wants_limits:
        gate.limits = None
    elif gate.limits is None or shared != isinstance(gate.limits, SharedSourceLimits):
        if shared:
            gate.limits = SharedSourceLimits(
                table, index, cfg.per_source_max_connections, cfg.per_source_rate,
                prune_interval=PRUNE_INTERVAL)
        else:
            gate.limits = SourceLimits(cfg.per_source_max_connections, cfg.per_source_rate)
    else:
        gate.limits.configure(cfg.per_source_max_connections, cfg.per_source_rate)
    return gate
