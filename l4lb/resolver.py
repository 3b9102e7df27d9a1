"""Hostname backends resolved by the control plane, so the data path never waits on DNS.

Theory of operation: one asyncio task (Resolver.run) owns every name's answer. Once a
second (or sooner, when an answer is due) it walks the pools' backends, collects the
hostnames among their addresses, and asks DNS (dnspython, A and AAAA) for each name whose
answer has run out; an answer is used for its TTL, bounded by `[resolvers] min_ttl` and
`max_ttl`. Every backend whose address names that host gets the answer pushed into its
Target as `resolved`, [(family, ip, port)] in the order to try (A records first), and the
relay connects to those IP literals in order without a lookup of its own.

An address whose host is an SRV name (`_SERVICE._tcp.DOMAIN:PORT`, the first two labels
starting with '_', the second `_tcp`) is asked for SRV records instead: their targets,
by priority and then weight (heaviest first), each resolved to its A and AAAA
addresses, give the (ip, port) pairs to try, so the records say the port; the address's
own PORT is only the fallback for the answers that carry none (and for getaddrinfo
before a first answer, which finds no SRV name anyway). The answer lives as long as the
shortest TTL among the SRV and address records.

One backend keeps the whole address list (rather than one backend per address, HAProxy's
server-template): the backend an operator declared stays the one thing that has a name,
a state, a weight, health checks and a place in the state file; DNS changes only where
its connections go, and a name that grows from 2 to 5 addresses changes nothing else.

A lookup that fails (NXDOMAIN, SERVFAIL, no address, timeout) keeps the last good answer
in use and is asked again every `retry` seconds; the failure is logged once per episode
(`resolve_failed`), its end once (`resolve_recovered`), and `show backends` carries the
error meanwhile. Before a name's first answer nothing is pushed, and the relay resolves
it per connection as before (getaddrinfo, which also reads /etc/hosts).

This module is the only writer of Target.resolved, except that l4lb.model clears it when
a backend's address changes (the old name's answer no longer applies).
"""
from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from .config import ResolversConfig

__all__ = ["NameState", "Resolver", "is_srv_name"]

_SCAN_INTERVAL = 1.0     # seconds between two walks of the backends (new names, reloads)


@dataclass(eq=False)
class NameState:
    """What is known of one hostname: the last good answer and the current failure."""
    name: str
    # (family, ip, port): port 0 = the backend's own (A/AAAA), else the SRV record's
    addresses: list[tuple[int, str, int]] = field(default_factory=list)
    due: float = 0.0                  # monotonic time of the next lookup
    ttl: float | None = None          # the last good answer's TTL, as DNS gave it
    error: str | None = None          # set while the lookups fail (one episode)
    failures: int = 0                 # failed lookups, all time
    lookups: int = 0                  # lookups, all time


class Resolver:
    """Resolves the hostname backends of `pools()` (a callable returning the Balancer's
    pools) and pushes the answers into their Targets."""

    def __init__(self, config: ResolversConfig, pools: Callable[[], Iterable], log,
                 clock: Callable[[], float] = time.monotonic,
                 on_resolved: Callable[[object], None] | None = None):
        self.config = config
        self.pools = pools
        self.on_resolved = on_resolved    # (backend): its Target got a new answer
        self.log = log
        self.clock = clock
        self.names: dict[str, NameState] = {}
        self._dns = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    def configure(self, config: ResolversConfig) -> None:
        """A reloaded `[resolvers]` table: new servers and bounds apply to the next lookup."""
        if config != self.config:
            self.config = config
            self._dns = None
            for state in self.names.values():
                state.due = 0.0
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def state_of(self, host: str) -> NameState | None:
        """The resolver's state for `host` (None: not a name it resolves, or not yet)."""
        return self.names.get(host)

    async def run(self) -> None:
        while True:
            try:
                await self.resolve_due()
            except Exception:       # a bug here must not end resolution for good
                self.log.exception("resolver_failed")
            now = self.clock()
            wait = min([_SCAN_INTERVAL] + [s.due - now for s in self.names.values()])
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), max(wait, 0.01))
            except asyncio.TimeoutError:
                pass

    async def resolve_due(self) -> None:
        """One round: look up every name whose answer ran out, push answers everywhere."""
        backends = self.hostname_backends()
        wanted = {b.address.host for b in backends}
        for name in [n for n in self.names if n not in wanted]:
            del self.names[name]          # no backend names it any more
        now = self.clock()
        due = [state for state in (self.names.setdefault(n, NameState(n)) for n in wanted)
               if state.due <= now]
        if due:          # at once: one slow or dead name does not hold the others up
            await asyncio.gather(*(self.lookup(state) for state in due))
        for backend in backends:
            self.push(backend)

    def hostname_backends(self) -> list:
        return [b for pool in self.pools() for b in pool.backends.values()
                if b.address.family == socket.AF_UNSPEC]

    def push(self, backend) -> None:
        """Give `backend`'s Target its name's last good answer (when it differs)."""
        state = self.names.get(backend.address.host)
        target = backend.target
        error = None if state is None else state.error
        if backend.resolve_error != error:
            backend.resolve_error = error
        if state is None or not state.addresses or target.host != backend.address.host:
            return
        port = backend.address.port
        resolved = [(family, ip, srv_port or port) for family, ip, srv_port in state.addresses]
        if target.resolved != resolved:
            target.resolved = resolved
            if self.on_resolved is not None:
                self.on_resolved(backend)

    async def lookup(self, state: NameState) -> None:
        """Ask DNS for `state.name` (A and AAAA at once); keep the last good answer on failure."""
        cfg = self.config
        state.lookups += 1
        try:
            resolver = self.dns_client()
            query = self._query_srv if is_srv_name(state.name) else self._query_all
            found = await asyncio.wait_for(query(resolver, state.name), cfg.timeout)
        except (dns.exception.DNSException, asyncio.TimeoutError, OSError, ValueError) as exc:
            self._failed(state, _describe(exc))
            return
        addresses, ttl = found
        if not addresses:
            self._failed(state, "no SRV record with an address" if is_srv_name(state.name)
                         else "no A or AAAA record")
            return
        if state.error is not None:
            self.log.info("resolve_recovered", name=state.name, failed_for=state.error,
                          addresses=_shown(addresses))
            state.error = None
        elif addresses != state.addresses:
            self.log.info("resolve_changed", name=state.name, ttl=ttl,
                          addresses=_shown(addresses),
                          previous=_shown(state.addresses))
        state.addresses = addresses
        state.ttl = ttl
        state.due = self.clock() + min(max(ttl, cfg.min_ttl), cfg.max_ttl)

    async def _query_all(self, resolver, name: str):
        answers = await asyncio.gather(
            resolver.resolve(name, "A", search=not self.config.nameservers,
                             raise_on_no_answer=False),
            resolver.resolve(name, "AAAA", search=not self.config.nameservers,
                             raise_on_no_answer=False),
            return_exceptions=True)
        addresses: list[tuple[int, str, int]] = []
        ttls: list[float] = []
        errors = []
        for family, answer in zip((socket.AF_INET, socket.AF_INET6), answers):
            if isinstance(answer, BaseException):
                if not isinstance(answer, (dns.exception.DNSException, OSError)):
                    raise answer
                errors.append(answer)
                continue
            if answer.rrset is None:
                continue
            ttls.append(float(answer.rrset.ttl))
            addresses.extend((family, rr.address, 0) for rr in answer.rrset)
        if not addresses and errors:
            raise errors[0]
        return addresses, min(ttls) if ttls else 0.0

    async def _query_srv(self, resolver, name: str):
        """SRV records of `name`, each target's addresses with the record's port."""
        answer = await resolver.resolve(name, "SRV", search=not self.config.nameservers,
                                        raise_on_no_answer=False)
        if answer.rrset is None:
            return [], 0.0
        ttls = [float(answer.rrset.ttl)]
        addresses: list[tuple[int, str, int]] = []
        for rr in sorted(answer.rrset, key=lambda r: (r.priority, -r.weight)):
            target = rr.target.to_text(omit_final_dot=True)
            if not target or target == ".":       # "." = no such service here (RFC 2782)
                continue
            try:
                found, ttl = await self._query_all(resolver, target)
            except (dns.exception.DNSException, OSError):
                continue                         # one dead target; the others still count
            if found:
                ttls.append(ttl)
            addresses.extend((family, ip, rr.port) for family, ip, _ in found)
        return addresses, min(ttls)

    def _failed(self, state: NameState, error: str) -> None:
        state.failures += 1
        state.due = self.clock() + self.config.retry
        if state.error is None:       # once per episode
            self.log.warning("resolve_failed", name=state.name, error=error,
                             kept=_shown(state.addresses))
        state.error = error

    def dns_client(self):
        """The dnspython resolver: the configured nameservers, or the system's."""
        if self._dns is None:
            servers = self.config.nameservers
            if servers:
                client = dns.asyncresolver.Resolver(configure=False)
                client.nameservers = [dns.nameserver.Do53Nameserver(a.host, a.port)
                                      for a in servers]
            else:
                client = dns.asyncresolver.Resolver()
            client.lifetime = self.config.timeout
            client.cache = None         # TTLs are ours to honour, per name
            self._dns = client
        return self._dns


def is_srv_name(host: str) -> bool:
    """`_SERVICE._tcp.DOMAIN`: a name to ask SRV records of (RFC 2782)."""
    labels = host.split(".")
    return len(labels) >= 3 and labels[0].startswith("_") and labels[1] == "_tcp"


def _shown(addresses) -> list[str]:
    """Addresses for a log line: IPs, "ip:port" (IPv6 bracketed) when an SRV gave the port."""
    return [ip if not port else (f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}")
            for _, ip, port in addresses]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "NXDOMAIN"
    if isinstance(exc, (asyncio.TimeoutError, dns.exception.Timeout)):
        return "timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no nameserver answered (SERVFAIL or refused)"
    return f"{type(exc).__name__}: {exc}"
