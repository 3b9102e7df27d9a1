"""Admission control (l4lb/acl.py): CIDR longest-prefix matching, per-source limits, the gate."""
import ipaddress
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4lb import acl
from l4lb.acl import (
    DENIED,
    NOT_ALLOWED,
    PER_SOURCE_MAX_CONNECTIONS,
    PER_SOURCE_RATE,
    PER_SOURCE_TABLE_FULL,
    AccessList,
    Gate,
    SourceLimits,
    configure_gate,
)

# --- access lists ---------------------------------------------------------------------------


@pytest.mark.parametrize("host, expected", [
    ("10.1.2.3", None),              # allow 10/8
    ("10.6.1.1", DENIED),            # deny 10.6/16 is longer than allow 10/8
    ("10.6.6.1", None),              # allow 10.6.6/24 is longer again
    ("10.6.6.66", DENIED),           # deny 10.6.6.66/32, the longest of all
    ("11.0.0.1", NOT_ALLOWED),       # no match and allow is not empty
    ("192.168.1.1", DENIED),         # the same network in both lists: deny wins the tie
    ("2001:db8:1::5", None),         # IPv6 allow
    ("2001:db8:1:bad::1", DENIED),   # IPv6 longer deny
    ("2001:db9::1", NOT_ALLOWED),
    ("::ffff:10.6.1.1", DENIED),     # IPv4-mapped IPv6 is judged as its IPv4 address
    ("::ffff:10.6.6.1", None),
    ("fe80::1%eth0", NOT_ALLOWED),   # a scope suffix does not break parsing
    ("not an address", NOT_ALLOWED),
    ("", NOT_ALLOWED),
    (None, NOT_ALLOWED),
])
def test_longest_prefix_across_allow_and_deny_decides(host, expected):
    lists = AccessList(
        allow=["10.0.0.0/8", "10.6.6.0/24", "192.168.1.0/24", "2001:db8::/32"],
        deny=["10.6.0.0/16", "10.6.6.66/32", "192.168.1.0/24", "2001:db8:1:bad::/64"],
    )
    assert lists.check(host) == expected


def test_empty_allow_admits_everyone_not_denied():
    lists = AccessList(deny=["127.0.0.6/32", "::1/128"])
    assert lists.check("127.0.0.5") is None
    assert lists.check("127.0.0.6") == DENIED
    assert lists.check("::2") is None
    assert lists.check("::1") == DENIED
    assert lists.check("garbage") is None


def test_zero_length_prefixes_match_their_whole_family_only():
    lists = AccessList(allow=["0.0.0.0/0"], deny=["::/0"])
    assert lists.check("203.0.113.9") is None
    assert lists.check("2001:db8::9") == DENIED
    assert lists.check("::ffff:203.0.113.9") is None      # mapped: IPv4


def test_ipv4_mapped_cidr_applies_to_plain_ipv4_clients():
    lists = AccessList(deny=[str(ipaddress.ip_network("::ffff:10.0.0.0/104"))])
    assert lists.check("10.9.9.9") == DENIED
    assert lists.check("11.9.9.9") is None


def test_bad_cidr_is_refused_when_building():
    with pytest.raises(ValueError):
        AccessList(allow=["10.0.0.0/33"])
    with pytest.raises(ValueError):
        AccessList(deny=["nonsense/8"])


def _reference_check(allow, deny, host):
    """Brute force with ipaddress: the longest matching network wins, deny on a tie."""
    address = ipaddress.ip_address(host)
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    best = None
    for verdict, cidrs in ((False, allow), (True, deny)):
        for cidr in cidrs:
            net = ipaddress.ip_network(cidr, strict=False)
            if net.version == address.version and address in net:
                key = (net.prefixlen, verdict)
                best = key if best is None or key > best else best
    if best is None:
        return NOT_ALLOWED if allow else None
    return DENIED if best[1] else None


def _near(base: str, bits: int):
    """Networks and addresses packed close to `base` so that they overlap often."""
    root = int(ipaddress.ip_address(base))
    span = st.integers(0, 2 ** 12 - 1).map(lambda k: root + (k << (bits - 16)))
    make = ipaddress.IPv4Address if bits == 32 else ipaddress.IPv6Address
    networks = st.tuples(span, st.integers(8, bits)).map(
        lambda p: str(ipaddress.ip_network((make(p[0]), p[1]), strict=False)))
    hosts = st.tuples(span, st.integers(0, 2 ** (bits - 16) - 1)).map(
        lambda p: str(make(p[0] + p[1])))
    return networks, hosts


v4_nets, v4_hosts = _near("10.0.0.0", 32)
v6_nets, v6_hosts = _near("2001:db8::", 128)


@given(
    st.lists(st.one_of(v4_nets, v6_nets), max_size=8),
    st.lists(st.one_of(v4_nets, v6_nets), max_size=8),
    st.lists(st.one_of(v4_hosts, v6_hosts), min_size=1, max_size=10),
)
def test_matching_agrees_with_a_brute_force_reference(allow, deny, hosts):
    lists = AccessList(allow, deny)
    for host in hosts:
        assert lists.check(host) == _reference_check(allow, deny, host), host


# --- per-source limits ------------------------------------------------------------------------


def test_concurrent_limit_per_source_and_release_makes_room():
    limits = SourceLimits(max_connections=2)
    assert limits.admit("10.0.0.1", 0.0) is None
    assert limits.admit("10.0.0.1", 0.0) is None
    assert limits.admit("10.0.0.1", 0.0) == PER_SOURCE_MAX_CONNECTIONS
    assert limits.admit("10.0.0.2", 0.0) is None            # another source is not affected
    limits.release("10.0.0.1")
    assert limits.admit("10.0.0.1", 0.0) is None


def test_sources_without_connections_are_forgotten_at_once_without_a_rate():
    limits = SourceLimits(max_connections=5)
    for host in ("10.0.0.1", "10.0.0.2"):
        limits.admit(host, 0.0)
    limits.release("10.0.0.1")
    assert len(limits) == 1
    limits.release("10.0.0.2")
    limits.release("10.0.0.2")                               # a stray release: no effect
    assert len(limits) == 0


def test_token_bucket_allows_a_burst_of_rate_then_rate_per_second():
    limits = SourceLimits(rate=10)
    admitted = sum(limits.admit("s", 0.0) is None for _ in range(25))
    assert admitted == 10                                    # burst = rate
    assert limits.admit("s", 0.05) == PER_SOURCE_RATE        # half a token back
    assert limits.admit("s", 0.1) is None                    # one token back
    # Steady attempts 100 times a second for 10 s: 10 per second get through.
    admitted = 0
    for i in range(1, 1001):
        admitted += limits.admit("s", 0.1 + i / 100) is None
    assert 99 <= admitted <= 100                            # float rounding at the edge


def test_refused_attempts_take_no_token():
    limits = SourceLimits(rate=1)
    assert limits.admit("s", 0.0) is None
    for i in range(10):
        assert limits.admit("s", 0.05 * i) == PER_SOURCE_RATE
    assert limits.admit("s", 1.0) is None


def test_bucket_never_fills_past_the_burst_however_long_the_source_was_away():
    limits = SourceLimits(rate=5, max_connections=0)
    limits.admit("s", 0.0)
    limits.release("s")
    # At t=1000 (and without a prune in between) only the burst of 5 is there.
    limits.next_prune = 1e9
    assert sum(limits.admit("s", 1000.0) is None for _ in range(20)) == 5


def test_rate_below_one_still_admits_one_connection_per_period():
    limits = SourceLimits(rate=0.5)
    assert limits.admit("s", 0.0) is None
    assert limits.admit("s", 1.0) == PER_SOURCE_RATE
    assert limits.admit("s", 2.0) is None


def test_concurrent_limit_is_checked_before_the_rate():
    limits = SourceLimits(max_connections=1, rate=100)
    assert limits.admit("s", 0.0) is None
    assert limits.admit("s", 0.0) == PER_SOURCE_MAX_CONNECTIONS
    assert limits.table["s"].tokens == 99


def test_prune_forgets_idle_sources_once_their_bucket_is_full():
    limits = SourceLimits(rate=10)                           # refill time 1 s
    limits.admit("idle", 0.0)
    limits.release("idle")
    limits.admit("busy", 0.0)                                # keeps its connection
    limits.admit("recent", 0.8)
    limits.release("recent")
    assert limits.prune(1.5) == 1                            # only "idle" is certainly full
    assert set(limits.table) == {"busy", "recent"}
    assert limits.prune(2.0) == 1
    assert set(limits.table) == {"busy"}


def test_admit_prunes_on_its_own_at_most_once_per_interval():
    limits = SourceLimits(rate=10)
    for i in range(100):
        limits.admit(f"10.0.0.{i}", 0.0)
        limits.release(f"10.0.0.{i}")
    assert len(limits) == 100
    limits.admit("10.1.0.0", 0.5)                            # first admit prunes, nothing is due
    assert len(limits) == 101
    limits.admit("10.1.0.1", 1.2)                            # the interval has passed: prune
    assert set(limits.table) == {"10.1.0.0", "10.1.0.1"}


def test_table_at_its_cap_refuses_new_sources_until_a_prune_makes_room():
    limits = SourceLimits(rate=10, cap=3)
    for host in ("a", "b", "c"):
        assert limits.admit(host, 0.0) is None
    limits.release("a")
    assert limits.admit("d", 0.1) == PER_SOURCE_TABLE_FULL
    assert limits.admit("b", 0.2) is None                    # known sources keep working
    assert len(limits) == 3
    assert limits.admit("d", 1.5) is None                    # the prune dropped "a"
    assert set(limits.table) == {"b", "c", "d"}


def test_reconfigure_keeps_the_open_connection_counts():
    limits = SourceLimits(max_connections=3)
    for _ in range(3):
        limits.admit("s", 0.0)
    limits.configure(max_connections=2, rate=0)
    assert limits.admit("s", 0.0) == PER_SOURCE_MAX_CONNECTIONS
    limits.configure(max_connections=5, rate=0)
    assert limits.admit("s", 0.0) is None


# --- the gate ----------------------------------------------------------------------------------


def _cfg(**kw):
    base = dict(allow=[], deny=[], per_source_max_connections=0, per_source_rate=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


def _relay(host):
    return SimpleNamespace(client_host=host, client_port=1234)


def test_no_gate_when_nothing_is_configured():
    assert configure_gate(None, _cfg(), lambda: 0.0) is None


def test_gate_checks_the_access_list_before_the_limits():
    gate = configure_gate(None, _cfg(deny=["10.0.0.0/8"], per_source_max_connections=1),
                          lambda: 0.0)
    assert gate.admit(_relay("10.1.1.1")) == DENIED
    assert len(gate.limits) == 0                            # a denied client takes nothing
    ok = _relay("192.0.2.1")
    assert gate.admit(ok) is None
    assert gate.admit(_relay("192.0.2.1")) == PER_SOURCE_MAX_CONNECTIONS
    gate.release(ok)
    assert gate.admit(_relay("192.0.2.1")) is None


def test_reload_reuses_the_gate_and_its_counts():
    clock = [0.0]
    gate = configure_gate(None, _cfg(per_source_max_connections=1), lambda: clock[0])
    held = _relay("192.0.2.1")
    assert gate.admit(held) is None
    again = configure_gate(gate, _cfg(allow=["192.0.2.0/24"], per_source_max_connections=1),
                           lambda: clock[0])
    assert again is gate
    assert gate.admit(_relay("192.0.2.1")) == PER_SOURCE_MAX_CONNECTIONS
    assert gate.admit(_relay("198.51.100.1")) == NOT_ALLOWED
    assert configure_gate(gate, _cfg(), lambda: 0.0) is None


def test_gate_with_access_list_only_has_no_table():
    gate = configure_gate(None, _cfg(allow=["::1/128"]), lambda: 0.0)
    assert isinstance(gate, Gate) and gate.limits is None
    assert gate.admit(_relay("::1")) is None
    gate.release(_relay("::1"))                              # harmless


def test_reasons_are_the_documented_words():
    assert (acl.DENIED, acl.NOT_ALLOWED, acl.PER_SOURCE_MAX_CONNECTIONS, acl.PER_SOURCE_RATE,
            acl.PER_SOURCE_TABLE_FULL) == ("denied", "not_allowed", "per_source_max_connections",
                                           "per_source_rate", "per_source_table_full")


# --- one address, one key (issue 20 item 7) ---------------------------------------------------


@pytest.mark.parametrize("spellings", [
    ("10.0.0.1", "::ffff:10.0.0.1", "::FFFF:10.0.0.1", "::ffff:a00:1",
     "0:0:0:0:0:ffff:a00:1", "::ffff:10.0.0.1%eth0"),
    ("2001:db8::1", "2001:DB8::1", "2001:0db8:0000::0001", "2001:db8::1%3"),
    ("fe80::1", "fe80::1%eth0", "fe80:0::1%lo"),
])
def test_every_spelling_of_one_address_has_one_source_key(spellings):
    assert len({acl.source_key(s) for s in spellings}) == 1


def test_different_addresses_have_different_keys_across_families():
    keys = [acl.source_key(h) for h in ("0.0.0.1", "::1", "::ffff:0.0.0.1", "not an ip")]
    assert keys[0] == keys[2] and len({keys[0], keys[1], keys[3]}) == 3
    assert acl.source_key("not an ip") == "not an ip"      # counted under its text


def test_per_source_limit_counts_an_address_once_whatever_its_spelling():
    gate = configure_gate(None, _cfg(per_source_max_connections=2), lambda: 0.0)
    first, second = _relay("10.0.0.1"), _relay("::ffff:10.0.0.1")
    assert gate.admit(first) is None and gate.admit(second) is None
    for spelling in ("10.0.0.1", "::ffff:10.0.0.1", "::ffff:a00:1", "::ffff:10.0.0.1%1"):
        assert gate.admit(_relay(spelling)) == PER_SOURCE_MAX_CONNECTIONS
    gate.release(second)                                   # released under its own spelling
    assert gate.admit(_relay("10.0.0.1")) is None
    assert len(gate.limits) == 1


def test_per_source_rate_counts_an_address_once_whatever_its_spelling():
    gate = configure_gate(None, _cfg(per_source_rate=2.0), lambda: 0.0)
    assert gate.admit(_relay("2001:db8::7")) is None
    assert gate.admit(_relay("2001:DB8:0::7")) is None
    assert gate.admit(_relay("2001:db8::7%eth0")) == PER_SOURCE_RATE


def test_access_lists_judge_every_spelling_alike():
    access = AccessList(allow=["10.0.0.0/8", "2001:db8::/32"], deny=["10.6.0.0/16"])
    for host in ("10.6.0.1", "::ffff:10.6.0.1", "::FFFF:a06:1", "::ffff:10.6.0.1%eth0"):
        assert access.check(host) == DENIED
    for host in ("2001:db8::1", "2001:DB8:0:0::1", "2001:db8::1%2"):
        assert access.check(host) is None
