"""PROXY protocol glue (l4lb/proxyhooks.py): the relay's header hook and encoder, probes."""
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4lb.proxyhooks import encode_backend_header, read_client_header
from l4lb.proxyproto import encode_v1, encode_v2, parse_proxy_header


def _relay():
    return SimpleNamespace(local_addr=None)


@pytest.mark.parametrize("encode", [encode_v1, encode_v2])
def test_header_hook_returns_consumed_and_source_and_keeps_the_destination(encode):
    header = encode(("203.0.113.7", 4242), ("198.51.100.1", 443))
    relay = _relay()
    assert read_client_header(relay, header + b"GET") == (len(header), ("203.0.113.7", 4242))
    assert relay.local_addr == ("198.51.100.1", 443)


def test_header_hook_needs_more_for_a_prefix_and_refuses_garbage():
    relay = _relay()
    assert read_client_header(relay, b"PROXY TCP4 1.2") is None
    assert read_client_header(relay, b"GET / HTTP/1.1\r\n") == (-1, None)
    assert read_client_header(relay, b"\r\n\r\n\x00\r\nQUIX") == (-1, None)   # v2 signature
    assert read_client_header(relay, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n") == (-1, None)
    assert relay.local_addr is None


@pytest.mark.parametrize("header", [b"PROXY UNKNOWN\r\n", encode_v2(None, None, "LOCAL")])
def test_header_hook_keeps_the_socket_address_for_unknown_and_local(header):
    relay = _relay()
    assert read_client_header(relay, header + b"x") == (len(header), None)
    assert relay.local_addr is None


@given(st.binary(max_size=300))
def test_header_hook_never_raises(data):
    result = read_client_header(_relay(), data)
    assert result is None or result[0] == -1 or 0 < result[0] <= len(data)


@pytest.mark.parametrize("version", [1, 2])
def test_encoder_accepts_socket_style_ipv6_tuples(version):
    header = encode_backend_header(version, ("2001:db8::5", 1000, 0, 0), ("::1", 80, 0, 0))
    parsed, _ = parse_proxy_header(header)
    assert (parsed.src, parsed.dst) == (("2001:db8::5", 1000), ("::1", 80))


@pytest.mark.parametrize("version", [1, 2])
def test_encoder_maps_ipv4_into_ipv6_when_families_differ(version):
    parsed, _ = parse_proxy_header(
        encode_backend_header(version, ("2001:db8::5", 1000), ("127.0.0.1", 80)))
    assert parsed.family == "TCP6"
    assert parsed.src == ("2001:db8::5", 1000)
    assert parsed.dst == ("::ffff:7f00:1", 80)


@pytest.mark.parametrize("version, expected", [
    (1, b"PROXY UNKNOWN\r\n"), (2, encode_v2(None, None, "LOCAL"))])
@pytest.mark.parametrize("src, dst", [
    (None, ("127.0.0.1", 80)), (("127.0.0.1", None), ("127.0.0.1", 80)),
    (("a-hostname", 1), ("127.0.0.1", 80))])
def test_encoder_falls_back_to_a_header_without_addresses(version, expected, src, dst):
    assert encode_backend_header(version, src, dst) == expected
