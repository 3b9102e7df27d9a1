"""The control-plane resolver without a network: `[resolvers]` parsing, and what a
lookup's success or failure does to the Targets (a fake DNS client stands in)."""
from __future__ import annotations

import asyncio
import socket

import dns.name
import dns.resolver
import pytest

from l4lb.address import parse_address
from l4lb.config import BackendConfig, ConfigError, ResolversConfig, parse_config
from l4lb.model import Pool
from l4lb.resolver import Resolver

from .test_config import BASE


def test_resolvers_default_to_the_system_servers_and_bounded_ttls():
    cfg = parse_config(BASE, "c.toml").resolvers
    assert cfg == ResolversConfig()
    assert cfg.nameservers == [] and cfg.min_ttl <= cfg.max_ttl


def test_resolvers_refuse_a_hostname_nameserver_and_min_ttl_above_max_ttl():
    text = BASE + '\n[resolvers]\nnameservers = ["dns.example:53"]\nmin_ttl = 10.0\nmax_ttl = 5.0\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.toml")
    messages = " ".join(i.message for i in info.value.issues)
    assert "must be an IP address" in messages and "must not exceed max_ttl" in messages


def test_resolvers_take_ip_nameservers_with_ports():
    text = BASE + '\n[resolvers]\nnameservers = ["127.0.0.1:5353", "[::1]:53"]\n'
    servers = parse_config(text, "c.toml").resolvers.nameservers
    assert [(a.host, a.port) for a in servers] == [("127.0.0.1", 5353), ("::1", 53)]


class FakeRRset(list):
    ttl = 30


class FakeAnswer:
    def __init__(self, ips):
        self.rrset = FakeRRset(type("RR", (), {"address": ip})() for ip in ips) if ips else None


class FakeDns:
    """Answers A with `self.a`, AAAA with nothing; raises `self.error` when set."""

    def __init__(self):
        self.a = ["10.0.0.1", "10.0.0.2"]
        self.error = None
        self.calls = 0

    async def resolve(self, name, rdtype, **kw):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return FakeAnswer(self.a if rdtype == "A" else [])


class Log:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda event, **kw: self.lines.append((level, event, kw))


def make(now):
    pool = Pool(parse_config(BASE, "c.toml").pools["blue"])
    pool.add_backend(BackendConfig("svc", parse_address("svc.internal:8080")))
    log = Log()
    resolver = Resolver(ResolversConfig(retry=1.0), lambda: [pool], log, clock=lambda: now[0])
    fake = FakeDns()
    resolver._dns = fake
    return pool.backends["svc"], resolver, fake, log


def test_an_answer_is_pushed_as_ip_literals_and_kept_through_failures_logged_once():
    now = [100.0]
    backend, resolver, fake, log = make(now)
    ip_backend = backend.pool.backends["a"]
    asyncio.run(resolver.resolve_due())
    assert backend.target.resolved == [(socket.AF_INET, "10.0.0.1", 8080),
                                       (socket.AF_INET, "10.0.0.2", 8080)]
    assert ip_backend.target.resolved is None          # IP literals are not resolved
    assert resolver.names["svc.internal"].due == 130.0  # the TTL

    fake.error = dns.resolver.NXDOMAIN()
    for step in range(3):
        now[0] += 31.0
        asyncio.run(resolver.resolve_due())
    assert backend.target.resolved[0][1] == "10.0.0.1"  # the last good answer stays
    assert backend.resolve_error == "NXDOMAIN"
    assert [e for _, e, _ in log.lines].count("resolve_failed") == 1

    fake.error, fake.a = None, ["10.0.0.9"]
    now[0] += 1.0
    asyncio.run(resolver.resolve_due())
    assert backend.target.resolved == [(socket.AF_INET, "10.0.0.9", 8080)]
    assert backend.resolve_error is None
    assert "resolve_recovered" in [e for _, e, _ in log.lines]


def test_a_name_is_not_asked_again_before_its_ttl_runs_out():
    now = [0.0]
    backend, resolver, fake, log = make(now)
    asyncio.run(resolver.resolve_due())
    calls = fake.calls
    now[0] += 10.0
    asyncio.run(resolver.resolve_due())
    assert fake.calls == calls


def test_a_changed_address_drops_the_old_names_answer_at_once():
    now = [0.0]
    backend, resolver, fake, log = make(now)
    asyncio.run(resolver.resolve_due())
    backend.pool.update_backend(BackendConfig("svc", parse_address("other.internal:8080")))
    assert backend.target.resolved is None


class FakeSrv:
    def __init__(self, priority, weight, port, target):
        self.priority, self.weight, self.port = priority, weight, port
        self.target = dns.name.from_text(target)


class FakeSrvDns(FakeDns):
    """SRV records for the service, A records per target name."""

    def __init__(self, records, hosts):
        super().__init__()
        self.records, self.hosts = records, hosts

    async def resolve(self, name, rdtype, **kw):
        if rdtype == "SRV":
            answer = FakeAnswer([])
            answer.rrset = FakeRRset(self.records)
            return answer
        return FakeAnswer(self.hosts.get(name, []) if rdtype == "A" else [])


def test_an_srv_name_resolves_to_its_targets_by_priority_then_weight_with_their_ports():
    now = [0.0]
    pool = Pool(parse_config(BASE, "c.toml").pools["blue"])
    pool.add_backend(BackendConfig("svc", parse_address("_db._tcp.svc.internal:1")))
    resolver = Resolver(ResolversConfig(), lambda: [pool], Log(), clock=lambda: now[0])
    resolver._dns = FakeSrvDns(
        [FakeSrv(20, 5, 7000, "late.internal."), FakeSrv(10, 1, 6001, "light.internal."),
         FakeSrv(10, 9, 6002, "heavy.internal."), FakeSrv(10, 9, 6003, ".")],
        {"late.internal": ["10.0.0.3"], "light.internal": ["10.0.0.1"],
         "heavy.internal": ["10.0.0.2"]})
    asyncio.run(resolver.resolve_due())
    assert pool.backends["svc"].target.resolved == [
        (socket.AF_INET, "10.0.0.2", 6002), (socket.AF_INET, "10.0.0.1", 6001),
        (socket.AF_INET, "10.0.0.3", 7000)]
