"""PROXY protocol v1/v2 parser and encoders (haproxy doc/proxy-protocol.txt), no sockets."""
import ipaddress
import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from l4lb import proxyproto
from l4lb.proxyproto import (
    MAX_V1,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    parse_proxy_header,
)

PAYLOAD = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"


def v2(ver_cmd: int, fam: int, body: bytes, length: int | None = None) -> bytes:
    """A hand-built v2 header: signature, the two nibble bytes, length, body."""
    length = len(body) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, length) + body


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


IPV4_BLOCK = bytes([192, 168, 0, 1, 192, 168, 0, 11]) + struct.pack("!HH", 56324, 443)
IPV6_BLOCK = (
    ipaddress.IPv6Address("2001:db8::1").packed
    + ipaddress.IPv6Address("::ffff:10.0.0.1").packed
    + struct.pack("!HH", 1, 65535)
)
MAPPED = str(ipaddress.ip_address("::ffff:10.0.0.1"))  # its text form varies across Pythons
TCP4_HEADER = ProxyHeader(1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443))
TCP4_V2 = ProxyHeader(2, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443))
UNKNOWN_V1 = ProxyHeader(1, "PROXY", "UNKNOWN", None, None)
UNKNOWN_V2 = ProxyHeader(2, "PROXY", "UNKNOWN", None, None)
LOCAL_V2 = ProxyHeader(2, "LOCAL", "UNKNOWN", None, None)
F = "ffff:" * 7 + "ffff"

# --- known vectors (spec §2.1 and §2.2) ----------------------------------------------------

VECTORS = [
    # §2.1 example line.
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", TCP4_HEADER),
    # §2.1 longest lines a receiver must support: TCP6 (104 bytes) and UNKNOWN (107).
    (
        f"PROXY TCP6 {F} {F} 65535 65535\r\n".encode(),
        ProxyHeader(1, "PROXY", "TCP6", (F, 65535), (F, 65535)),
    ),
    (f"PROXY UNKNOWN {F} {F} 65535 65535\r\n".encode(), UNKNOWN_V1),
    (b"PROXY UNKNOWN\r\n", UNKNOWN_V1),
    (
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        ProxyHeader(1, "PROXY", "TCP4", ("0.0.0.0", 0), ("255.255.255.255", 65535)),
    ),
    (
        b"PROXY TCP6 2001:DB8::1 ::ffff:10.0.0.1 1 2\r\n",
        ProxyHeader(1, "PROXY", "TCP6", ("2001:db8::1", 1), (MAPPED, 2)),
    ),
    # §2.2: \x21 = version 2, PROXY; \x11 = TCP over IPv4, 12 address bytes.
    (v2(0x21, 0x11, IPV4_BLOCK), TCP4_V2),
    (
        v2(0x21, 0x21, IPV6_BLOCK),
        ProxyHeader(2, "PROXY", "TCP6", ("2001:db8::1", 1), (MAPPED, 65535)),
    ),
    # TLVs (§2.2.1-2.2.8) after the addresses are skipped.
    (
        v2(0x21, 0x11, IPV4_BLOCK + tlv(0x01, b"h2") + tlv(0x04, b"") + tlv(0x05, b"x" * 128)),
        TCP4_V2,
    ),
    # LOCAL (health check of the proxy itself): addresses ignored, even if present.
    (v2(0x20, 0x00, b""), LOCAL_V2),
    (v2(0x20, 0x11, IPV4_BLOCK), LOCAL_V2),
    (v2(0x20, 0x00, b"\xff" * 7), LOCAL_V2),
    # UNSPEC, UDP and AF_UNIX: valid, but no relayable address -> UNKNOWN.
    (v2(0x21, 0x00, b""), UNKNOWN_V2),
    (v2(0x21, 0x10, b"junk"), UNKNOWN_V2),
    (v2(0x21, 0x12, IPV4_BLOCK), UNKNOWN_V2),
    (v2(0x21, 0x22, IPV6_BLOCK + tlv(0x04, b"pad")), UNKNOWN_V2),
    (v2(0x21, 0x31, b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")), UNKNOWN_V2),
    # The longest header we accept: length == MAX_V2_LENGTH.
    (
        v2(0x21, 0x11, IPV4_BLOCK + tlv(0x04, b"\0" * (MAX_V2_LENGTH - 12 - 3))),
        TCP4_V2,
    ),
]


@pytest.mark.parametrize(("header", "expected"), VECTORS, ids=lambda v: repr(v)[:50])
def test_known_header_parses_and_leaves_the_payload(header, expected):
    assert parse_proxy_header(header + PAYLOAD) == (expected, len(header))
    assert parse_proxy_header(bytearray(header)) == (expected, len(header))
    assert parse_proxy_header(memoryview(header + PAYLOAD)) == (expected, len(header))


@pytest.mark.parametrize(("header", "expected"), VECTORS, ids=lambda v: repr(v)[:50])
def test_known_header_cut_anywhere_needs_more_bytes(header, expected):
    for cut in range(len(header)):
        assert parse_proxy_header(header[:cut]) is None, cut


def test_v1_longest_lines_are_the_spec_sizes():
    assert len(f"PROXY TCP6 {F} {F} 65535 65535\r\n") == 104
    assert len(f"PROXY UNKNOWN {F} {F} 65535 65535\r\n") == MAX_V1 == 107


# --- malformed input: an error, as early as the bytes allow ------------------------------

MALFORMED = [
    # (bytes, shortest prefix that already fails, message fragment)
    (b"GET / HTTP/1.1\r\n", 1, "not a PROXY protocol header"),
    (b"\x16\x03\x01", 1, "not a PROXY protocol header"),
    (b"proxy TCP4", 1, "not a PROXY"),
    (b"PROXY\tTCP4", 6, "bad v1 prefix"),
    (b"PROXY TCP5 ", 10, "unknown family"),
    (b"PROXY TCP44", 11, "unknown family"),
    (b"PROXY UNKNOWNX\r\n", 14, "unknown family 'UNKNOWNX'"),
    (b"PROXY \r\n", 7, "unknown family ''"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", 34, "bad port '65536'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", 29, "bad port '01'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", 28, "bad port '-'"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", 31, "too many fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", 29, "needs 4 fields"),
    (b"PROXY TCP4 256.1.1.1 5.6.7.8 1 2\r\n", 14, "bad IPv4 address '256'"),
    (b"PROXY TCP4 01.1.1.1 5.6.7.8 1 2\r\n", 13, "bad IPv4 address '01'"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", 17, "bad IPv4 address '1.2.3'"),
    (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", 19, "bad IPv4 address"),
    (b"PROXY TCP4 ::1 ::1 1 2\r\n", 12, "bad IPv4 address ':'"),
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", 13, "bad IPv6 address '1.'"),
    (b"PROXY TCP6 ::1%eth0 ::1 1 2\r\n", 15, "bad IPv6 address"),
    (b"PROXY TCP6 1:::2 ::1 1 2\r\n", 15, "bad IPv6 address"),
    (b"PROXY TCP6 1::2::3 ::1 1 2\r\n", 17, "bad IPv6 address"),
    (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", 27, "bad IPv6 address"),
    (b"PROXY TCP6 12345:: ::1 1 2\r\n", 16, "bad IPv6 address"),
    (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", 12, "bad IPv4 address ''"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", 31, "stray CR or LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", 32, "stray CR or LF"),
    (b"PROXY UNKNOWN \n\r\n", 15, "stray CR or LF"),
    (b"PROXY UNKNOWN \xc3\xa9\r\n", 15, "non-ASCII"),
    (b"PROXY UNKNOWN " + b"x" * 200, MAX_V1 - 1, f"no CRLF within {MAX_V1} bytes"),
    (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", MAX_V1 - 1, "no CRLF"),
    # v2: each fixed byte is judged as it arrives.
    (b"\r\n\r\n\x00\r\nQUIT!", 12, "signature mismatch"),
    (b"\r\r", 2, "signature mismatch"),
    (v2(0x11, 0x11, IPV4_BLOCK), 13, "unsupported version 1"),
    (v2(0x31, 0x11, IPV4_BLOCK), 13, "unsupported version 3"),
    (v2(0x22, 0x11, IPV4_BLOCK), 13, "unknown command 0x2"),
    (v2(0x2F, 0x11, IPV4_BLOCK), 13, "unknown command"),
    (v2(0x21, 0x41, IPV4_BLOCK), 14, "unknown address family/protocol 0x41"),
    (v2(0x21, 0x13, IPV4_BLOCK), 14, "unknown address family/protocol 0x13"),
    (v2(0x21, 0x11, b"", length=MAX_V2_LENGTH + 1), 16, f"over the limit of {MAX_V2_LENGTH}"),
    (v2(0x21, 0x11, b"", length=0xFFFF), 16, "over the limit"),
    (v2(0x21, 0x11, IPV4_BLOCK[:11]), 16, "too short for a 12-byte address block"),
    (v2(0x21, 0x21, IPV4_BLOCK), 16, "too short for a 36-byte address block"),
    (v2(0x21, 0x31, b"\0" * 215), 16, "too short for a 216-byte"),
    (v2(0x21, 0x11, IPV4_BLOCK + b"\x04\x00"), 16, "truncated TLV"),
    (v2(0x21, 0x11, IPV4_BLOCK + tlv(0x04, b"abc")[:-1]), 31, "TLV runs past the end"),
    (v2(0x21, 0x11, IPV4_BLOCK + tlv(0x04, b"") + b"\x01"), 31, "truncated TLV"),
]


@pytest.mark.parametrize(("data", "fails_at", "message"), MALFORMED, ids=lambda v: repr(v)[:50])
def test_malformed_header_fails_as_soon_as_it_cannot_become_valid(data, fails_at, message):
    for cut in range(fails_at):
        assert parse_proxy_header(data[:cut]) is None, cut
    with pytest.raises(ProxyHeaderError) as excinfo:
        parse_proxy_header(data[:fails_at])
    assert message in str(excinfo.value)
    for cut in range(fails_at, len(data) + 1):
        with pytest.raises(ProxyHeaderError):
            parse_proxy_header(data[:cut])


def test_v1_line_of_exactly_107_bytes_is_accepted_and_one_byte_more_is_not():
    line = b"PROXY UNKNOWN " + b"a" * 91 + b"\r\n"
    assert len(line) == MAX_V1
    assert parse_proxy_header(line) == (UNKNOWN_V1, MAX_V1)
    with pytest.raises(ProxyHeaderError, match="no CRLF within 107 bytes"):
        parse_proxy_header(line[:-2] + b"a")  # 106 bytes: CRLF would end at byte 108


def test_v1_tcp6_line_that_could_only_finish_past_107_bytes_fails_early():
    # IPv6 with an IPv4 tail is up to 45 characters; two of them cannot fit in 107 bytes.
    long6 = "0000:0000:0000:0000:0000:ffff:255.255.255.255"
    with pytest.raises(ProxyHeaderError):
        parse_proxy_header(f"PROXY TCP6 {long6} {long6}".encode())
    assert parse_proxy_header(f"PROXY TCP6 {long6} ::1.2.3.4".encode()) is None


# --- encoders ------------------------------------------------------------------------------


def test_encode_v1_matches_the_spec_example():
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    )
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"


def test_encode_v2_matches_the_hand_built_headers():
    assert encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == v2(0x21, 0x11, IPV4_BLOCK)
    assert encode_v2(("2001:db8::1", 1), ("::ffff:10.0.0.1", 65535)) == v2(0x21, 0x21, IPV6_BLOCK)
    assert encode_v2(None, None, command="LOCAL") == v2(0x20, 0x00, b"")
    assert encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), command="LOCAL") == v2(0x20, 0x00, b"")


@pytest.mark.parametrize("encode", [encode_v1, encode_v2])
@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        (("1.2.3.4", 65536), ("5.6.7.8", 1), "bad port 65536"),
        (("1.2.3.4", -1), ("5.6.7.8", 1), "bad port -1"),
        (("1.2.3.4", "80"), ("5.6.7.8", 1), "bad port '80'"),
        (("1.2.3.4", True), ("5.6.7.8", 1), "bad port True"),
        (("1.2.3.999", 1), ("5.6.7.8", 1), "bad endpoint"),
        (("example.com", 1), ("5.6.7.8", 1), "bad endpoint"),
        (("1.2.3.4",), ("5.6.7.8", 1), "bad endpoint"),
        ("1.2.3.4:80", ("5.6.7.8", 1), "bad endpoint"),
        (("fe80::1%eth0", 1), ("fe80::2", 1), "scoped IPv6"),
        (("1.2.3.4", 1), ("::1", 1), "mixed address families"),
        (("::1", 1), ("1.2.3.4", 1), "mixed address families"),
        (("1.2.3.4", 1), None, "both source and destination"),
    ],
)
def test_encoders_refuse_what_they_cannot_encode(encode, src, dst, message):
    with pytest.raises(ProxyHeaderError) as excinfo:
        encode(src, dst)
    assert message in str(excinfo.value)


def test_encode_v2_refuses_an_unknown_command():
    with pytest.raises(ProxyHeaderError, match="unknown PROXY v2 command"):
        encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), command="BOGUS")


# --- properties ----------------------------------------------------------------------------

ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
endpoint_pairs = st.one_of(
    st.tuples(st.tuples(ipv4, ports), st.tuples(ipv4, ports)),
    st.tuples(st.tuples(ipv6, ports), st.tuples(ipv6, ports)),
)


@given(endpoint_pairs, st.sampled_from([encode_v1, encode_v2]), st.binary(max_size=20))
def test_encoded_header_round_trips_through_the_parser(pair, encode, payload):
    src, dst = pair
    header = encode(src, dst)
    parsed, consumed = parse_proxy_header(header + payload)
    assert consumed == len(header)
    assert parsed.version == (1 if encode is encode_v1 else 2)
    assert parsed.command == "PROXY"
    assert parsed.family == ("TCP4" if ":" not in src[0] else "TCP6")
    assert (parsed.src, parsed.dst) == (src, dst)


def _ipv6_spellings(address: ipaddress.IPv6Address) -> st.SearchStrategy[str]:
    """Text forms a v1 sender may use: compressed, exploded, upper case, IPv4 tail."""
    tail = ipaddress.IPv4Address(address.packed[12:])
    groups = address.exploded.split(":")
    return st.sampled_from(
        [
            address.compressed,
            address.exploded,
            address.compressed.upper(),
            ":".join(groups[:6]) + f":{tail}",
            ":".join(g.lstrip("0") or "0" for g in groups),
        ]
    )


ipv6_text = st.ip_addresses(v=6).flatmap(_ipv6_spellings)
v1_lines = st.one_of(
    st.builds("PROXY TCP4 {} {} {} {}\r\n".format, ipv4, ipv4, ports, ports),
    st.builds("PROXY TCP6 {} {} {} {}\r\n".format, ipv6_text, ipv6_text, ports, ports),
    st.builds(
        lambda rest: f"PROXY UNKNOWN{rest}\r\n",
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=92).map(
            lambda t: " " + t if t else ""
        ),
    ),
).map(str.encode)
v2_headers = st.one_of(
    st.builds(lambda pair: encode_v2(*pair), endpoint_pairs),
    st.builds(lambda: encode_v2(None, None, "LOCAL")),
    st.builds(
        lambda pair, tlvs: (
            lambda h: h[:14] + struct.pack("!H", len(h) - 16 + len(tlvs)) + h[16:] + tlvs
        )(encode_v2(*pair)),
        endpoint_pairs,
        st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=5).map(
            lambda items: b"".join(tlv(k, v) for k, v in items)
        ),
    ),
    st.builds(
        lambda cmd, fam, body: v2(0x20 | cmd, fam, body),
        st.sampled_from([0, 1]),
        st.sampled_from([0x00, 0x01, 0x02, 0x10, 0x20, 0x30]),
        st.binary(max_size=60),
    ),
)
valid_headers = st.one_of(v1_lines.filter(lambda b: len(b) <= MAX_V1), v2_headers)


@given(valid_headers, st.binary(max_size=30))
def test_valid_header_cut_at_every_offset_needs_more_then_parses(header, payload):
    expected = parse_proxy_header(header)
    assert expected is not None and expected[1] == len(header)
    for cut in range(len(header)):
        assert parse_proxy_header(header[:cut]) is None, cut
    assert parse_proxy_header(header + payload) == expected


@given(
    ipv6_text.flatmap(lambda text: st.tuples(st.just(text), st.integers(0, len(text)))),
)
def test_ipv6_prefix_completion_finds_a_valid_address(text_and_cut):
    text, cut = text_and_cut
    completed = proxyproto._complete_ipv6(text[:cut])
    assert completed is not None and completed.startswith(text[:cut])
    assert proxyproto._is_ipv6(completed)
    assert len(completed) <= len(text)  # the shortest, so the 107-byte test is exact


@given(st.text("0123456789abcdef:.", max_size=16), st.text("0123456789abcdef:.", max_size=24))
@example("1:2:3:4:5:6:7:8", ":")
@example("::ffff:1.2.3.4", ".")
def test_ipv6_prefix_without_completion_has_no_valid_extension(prefix, extension):
    completed = proxyproto._complete_ipv6(prefix)
    if completed is None:
        assert not proxyproto._is_ipv6(prefix + extension)
    else:
        assert proxyproto._is_ipv6(completed) and completed.startswith(prefix)


def _outcome(data: bytes):
    try:
        return parse_proxy_header(data)
    except ProxyHeaderError:
        return "error"


@given(st.binary(max_size=200))
def test_arbitrary_bytes_give_none_a_header_or_proxy_header_error(data):
    outcome = _outcome(data)
    assert outcome is None or outcome == "error" or isinstance(outcome[0], ProxyHeader)


@given(
    valid_headers,
    st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=3),
    st.binary(max_size=20),
)
def test_parser_is_monotonic_on_mutated_headers(header, mutations, tail):
    # Valid headers with a few bytes changed reach deep into the parser. Whatever it says
    # about a prefix must hold for every longer one: an error stays an error (no error is
    # premature), a result stays the same result (it never depends on bytes after it).
    data = bytearray(header + tail)
    for position, value in mutations:
        if position < len(data):
            data[position] = value
    data = bytes(data)
    settled = None
    for cut in range(len(data) + 1):
        outcome = _outcome(data[:cut])
        if settled is not None:
            assert outcome == settled, cut
        elif outcome is not None:
            settled = outcome
            if outcome != "error":
                assert outcome[1] <= cut


# Arbitrary bytes rarely get past the first byte; these reach every later check directly.
@given(
    st.one_of(
        st.binary(max_size=1100).map(lambda tail: V2_SIGNATURE + tail),
        st.builds(
            lambda ver_cmd, fam, length, body: v2(ver_cmd, fam, body, length),
            st.integers(0, 255), st.integers(0, 255), st.integers(0, 65535),
            st.binary(max_size=300),
        ),
        st.text(st.characters(max_codepoint=0x7F), max_size=120).map(
            lambda rest: b"PROXY " + rest.encode()),
        st.binary(max_size=120).map(lambda rest: b"PROXY TCP4 " + rest),
    )
)
def test_bytes_behind_a_valid_start_give_none_a_header_or_proxy_header_error(data):
    outcome = _outcome(data)
    assert outcome is None or outcome == "error" or isinstance(outcome[0], ProxyHeader)
    if outcome is None:                                 # still a prefix: within the bounds
        assert len(data) < (MAX_V1 if data[:1] == b"P" else 16 + MAX_V2_LENGTH)


@given(
    st.sampled_from(["TCP4", "TCP6"]),
    st.integers(0, 999), st.integers(0, 999), st.integers(0, 999_999), st.integers(0, 999_999),
)
def test_v1_fields_out_of_range_are_refused_and_in_range_ones_parse(family, a, b, sport, dport):
    if family == "TCP4":
        src, dst = f"10.0.{a}.1", f"10.{b}.0.2"
        ok_addresses = a <= 255 and b <= 255
    else:
        src, dst = f"::{a}", f"2001:db8::{b}:1"
        ok_addresses = True                             # hex groups up to ffff
    line = f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()
    outcome = _outcome(line)
    if ok_addresses and sport <= 65535 and dport <= 65535:
        assert outcome != "error" and outcome[0].src[1] == sport and outcome[0].dst[1] == dport
    else:
        assert outcome == "error"
