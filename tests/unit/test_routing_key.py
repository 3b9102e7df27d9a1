"""The routing key: the compiled `address_key` against its twin, l4lb.reference.routing."""
import ipaddress

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from l4lb import _native
from l4lb.algorithms import HASH_KEY_CODES, HASH_KEYS, routing_key
from l4lb.reference import routing
from l4lb.reference.hashing import hash64

pytestmark = pytest.mark.timeout(60)
SRC_IP, SRC_IP_PORT = _native.HASH_KEY_SRC_IP, _native.HASH_KEY_SRC_IP_PORT

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)


def spellings6(ip):
    """The ways a client's IPv6 address can be written."""
    return st.sampled_from([str(ip), ip.exploded, str(ip).upper(), ip.exploded.upper()])


mapped = ipv4.flatmap(lambda ip: st.sampled_from([
    f"::ffff:{ip}", f"::FFFF:{ip}", f"0:0:0:0:0:ffff:{ip}",
    str(ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)).replace(".", ":"),
    ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed).exploded,
    f"::{ip}",                                  # IPv4-compatible: not mapped, 16 bytes
    f"::fffe:{ip}", f"1::ffff:{ip}",            # near misses of the mapped prefix
]))
v6 = ipv6.flatmap(spellings6)
zone = st.text(max_size=8)
scoped = st.one_of(
    st.builds(lambda a, z: f"{a}%{z}", st.one_of(v6, mapped, ipv4.map(str)), zone))
# Text that is almost an address: the parser's edge (leading zeros, 5-digit groups, two
# `::`, octets over 255, a trailing dot) is where two readings of the grammar could split.
near = st.text(alphabet="0123456789abcdefABCDEF:.", max_size=45)
garbage = st.one_of(st.text(max_size=30), near, st.none())
with_nul = st.builds(lambda a, t: f"{a}\0{t}", st.one_of(ipv4.map(str), v6), st.text(max_size=5))
hosts = st.one_of(ipv4.map(str), v6, mapped, scoped, garbage, with_nul)
ports = st.one_of(st.none(), st.integers(0, 65535))
kinds = st.sampled_from([SRC_IP, SRC_IP_PORT])


@settings(max_examples=2000, deadline=None)
@given(host=hosts, port=ports, kind=kinds)
@example("01.2.3.4", 1, SRC_IP)
@example("1.2.3.4.", 1, SRC_IP)
@example("256.1.1.1", 1, SRC_IP)
@example("1::2:3:4:5:6:7", 80, SRC_IP_PORT)
@example("::1.2.3", 80, SRC_IP_PORT)
@example("12345::", 80, SRC_IP_PORT)
@example("", None, SRC_IP_PORT)
@example("é.1.1.1", None, SRC_IP_PORT)
def test_compiled_address_key_and_its_twin_agree_on_any_host_port_and_kind(host, port, kind):
    assert _native.address_key(host, port, kind) == routing.address_key(host, port, kind)


def test_the_twin_uses_the_compiled_hash_key_codes():
    assert (routing.HASH_KEY_SRC_IP, routing.HASH_KEY_SRC_IP_PORT) == (SRC_IP, SRC_IP_PORT)
    assert set(HASH_KEY_CODES) == set(HASH_KEYS)


@pytest.mark.parametrize("key", [routing.address_key, _native.address_key],
                         ids=["twin", "compiled"])
def test_the_key_is_hash64_of_the_packed_address_then_the_big_endian_port(key):
    assert key("10.1.2.3") == hash64(bytes([10, 1, 2, 3]))
    assert key("10.1.2.3", 0x1F90, SRC_IP_PORT) == hash64(bytes([10, 1, 2, 3, 0x1F, 0x90]))
    assert key("10.1.2.3", 0x1F90, SRC_IP) == key("10.1.2.3")
    assert key("::ffff:10.1.2.3", 7, SRC_IP_PORT) == key("10.1.2.3", 7, SRC_IP_PORT)
    assert key("fe80::1%eth0", 7, SRC_IP_PORT) == key("fe80::1", 7, SRC_IP_PORT)
    assert key("fe80::1") == hash64(ipaddress.IPv6Address("fe80::1").packed)
    assert key("/run/l4lb.sock", 7, SRC_IP_PORT) == hash64(b"/run/l4lb.sock")
    assert key(None) == key("") == hash64(b"")


@settings(max_examples=300, deadline=None)
@given(host=st.one_of(ipv4.map(str), v6, mapped, garbage.filter(lambda h: h is not None)),
       port=st.integers(0, 65535), word=st.sampled_from(HASH_KEYS))
def test_routing_key_is_the_twin_key_for_the_hash_key_word(host, port, word):
    assert routing_key(word, host, port) == routing.address_key(host, port, HASH_KEY_CODES[word])


def test_routing_key_refuses_an_unknown_hash_key_word_naming_the_valid_ones():
    with pytest.raises(ValueError, match="src_ip, src_ip_port"):
        routing_key("dst_ip", "10.0.0.1", 80)
