"""The ClientHello parser (ext/l4lb/sni.pxi) and its reference twin (l4lb/reference/sni.py).

Real hellos come from Python's ssl with memory BIOs (no network); the edge cases are built
field by field. Every test runs against the compiled parser and the twin; the hypothesis
and fuzz tests check that the two agree byte for byte.
"""
import random
import ssl

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb import _native
from l4lb.reference import sni as twin

pytestmark = pytest.mark.timeout(120)

PARSERS = {"compiled": _native.parse_client_hello, "twin": twin.parse_client_hello}
BOTH = pytest.mark.parametrize("parse", PARSERS.values(), ids=PARSERS.keys())

NEED_MORE, FOUND, NOT_TLS = twin.SNI_NEED_MORE, twin.SNI_FOUND, twin.SNI_NOT_TLS
TOO_LARGE, MALFORMED = twin.SNI_TOO_LARGE, twin.SNI_MALFORMED
CAP_LIMIT = twin.SNI_MAX_CLIENT_HELLO_LIMIT


# ---------------------------------------------------------------- making hellos

def make_client_hello(server_name, alpn=None, max_version=None):
    """The records an ssl client sends first (its ClientHello), with no network."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def handshake_payload(records):
    """The concatenated bodies of a run of TLS records."""
    out, pos = bytearray(), 0
    while pos < len(records):
        length = int.from_bytes(records[pos + 3:pos + 5], "big")
        out += records[pos + 5:pos + 5 + length]
        pos += 5 + length
    return bytes(out)


def frame(payload, cuts=(), version=b"\x03\x01"):
    """`payload` as handshake records cut at the given payload offsets."""
    edges = [0, *sorted(set(cuts)), len(payload)]
    return b"".join(b"\x16" + version + (b - a).to_bytes(2, "big") + payload[a:b]
                    for a, b in zip(edges, edges[1:]) if b > a)


def frame_in_records_of_at_most(payload, size):
    return frame(payload, range(size, len(payload), size))


def vec(n, data):
    """A TLS vector: an n-byte big-endian length, then the data."""
    return len(data).to_bytes(n, "big") + data


def ext(etype, data):
    return etype.to_bytes(2, "big") + vec(2, data)


def sni_ext(*names, name_type=0):
    return ext(0, vec(2, b"".join(bytes([name_type]) + vec(2, n) for n in names)))


def alpn_ext(*protocols):
    return ext(16, vec(2, b"".join(vec(1, p) for p in protocols)))


def build_hello_body(extensions=(), session_id=b"\x00" * 32, suites=b"\x13\x01\x13\x02",
                     compression=b"\x00", version=b"\x03\x03", with_block=True):
    body = version + bytes(range(32)) + vec(1, session_id) + vec(2, suites) + vec(1, compression)
    if with_block:
        body += vec(2, b"".join(extensions))
    return body


def build_hello(extensions=(), **fields):
    """One record holding one ClientHello made field by field."""
    return frame(b"\x01" + vec(3, build_hello_body(extensions, **fields)))


def with_padding(records, pad):
    """The same hello with a padding extension (RFC 7685, type 21) of `pad` zero bytes
    appended, framed in records of 2^14 bytes as a client would."""
    payload = handshake_payload(records)
    body = payload[4:4 + int.from_bytes(payload[1:4], "big")]
    fixed = 2 + 32
    fixed += 1 + body[fixed]
    fixed += 2 + int.from_bytes(body[fixed:fixed + 2], "big")
    fixed += 1 + body[fixed]
    exts = body[fixed + 2:] + ext(21, bytes(pad))
    new_body = body[:fixed] + vec(2, exts)
    return frame_in_records_of_at_most(b"\x01" + vec(3, new_body), 16384)


HELLO_CASES = {
    "api-h2-http11-tls13": ("api.example.com", ["h2", "http/1.1"], None, "api.example.com"),
    "web-http11-tls12": ("web.example.com", ["http/1.1"], ssl.TLSVersion.TLSv1_2,
                         "web.example.com"),
    "mixed-case-trailing-dot": ("A.Example.COM.", None, None, "a.example.com"),
    "deep-name-many-alpn-tls12": ("x.y.z.long-label-0123456789.test", ["h2", "spdy/3", "acme-tls/1",
                                  "http/1.1"], ssl.TLSVersion.TLSv1_2,
                                  "x.y.z.long-label-0123456789.test"),
    "no-sni": (None, ["h2"], None, None),
    "no-sni-no-alpn-tls12": (None, None, ssl.TLSVersion.TLSv1_2, None),
}


@pytest.fixture(scope="module")
def hellos():
    """name -> (records, expected answer)."""
    out = {}
    for case, (name, alpn, max_version, want_name) in HELLO_CASES.items():
        records = make_client_hello(name, alpn, max_version)
        out[case] = (records, (FOUND, 0, want_name, tuple(alpn or ())))
    return out


CASE_IDS = list(HELLO_CASES)


# ---------------------------------------------------------------- real hellos

@BOTH
@pytest.mark.parametrize("case", CASE_IDS)
def test_real_hello_gives_its_server_name_and_alpn(parse, hellos, case):
    records, expected = hellos[case]
    assert parse(records) == expected
    assert parse(bytearray(records)) == expected
    assert parse(memoryview(records)) == expected


@BOTH
@pytest.mark.parametrize("case", CASE_IDS)
def test_every_prefix_needs_more_and_needed_is_where_the_answer_next_changes(parse, hellos, case):
    records, expected = hellos[case]
    answers = [parse(records[:k]) for k in range(len(records) + 1)]
    assert answers[-1] == expected
    for k, (status, needed, name, alpn) in enumerate(answers[:-1]):
        assert (status, name, alpn) == (NEED_MORE, None, ())
        assert k < needed <= len(records)
        # No prefix between k and needed answers differently: a caller may sleep until then.
        assert all(answers[j] == answers[k] for j in range(k, needed))


@BOTH
@pytest.mark.parametrize("case", CASE_IDS)
def test_hello_reframed_into_2_to_8_records_gives_the_same_answer_at_every_split(
        parse, hellos, case):
    records, expected = hellos[case]
    payload = handshake_payload(records)
    rnd = random.Random(case)
    for count in range(2, 9):
        cuts = rnd.sample(range(1, len(payload)), count - 1)
        reframed = frame(payload, cuts)
        assert reframed.count(b"\x16\x03\x01") >= count
        assert parse(reframed) == expected
        for k in range(len(reframed)):
            status, needed, _, _ = parse(reframed[:k])
            assert status == NEED_MORE and k < needed <= len(reframed)


@BOTH
@pytest.mark.parametrize("cuts", [(1,), (2,), (3,), (1, 2, 3), (4,), (5,)],
                         ids=lambda c: "cut@" + "+".join(map(str, c)))
def test_handshake_header_split_across_records_is_reassembled(parse, hellos, cuts):
    records, expected = hellos["api-h2-http11-tls13"]
    assert parse(frame(handshake_payload(records), cuts)) == expected


@BOTH
def test_hello_in_records_of_one_byte_each_is_reassembled(parse, hellos):
    records, expected = hellos["web-http11-tls12"]
    one_byte = frame_in_records_of_at_most(handshake_payload(with_padding(records, 3000)), 1)
    assert 16384 < len(one_byte) <= CAP_LIMIT
    assert parse(one_byte, CAP_LIMIT) == expected
    assert parse(one_byte) == (TOO_LARGE, 0, None, ())     # 6 bytes a byte: past 16384


@BOTH
def test_bytes_after_the_hello_are_ignored(parse, hellos):
    records, expected = hellos["api-h2-http11-tls13"]
    assert parse(records + b"\x17\x03\x03\x00\x05hello" + bytes(100)) == expected
    # The hello's record may hold more than the hello: that is not the parser's business.
    payload = handshake_payload(records)
    assert parse(frame(payload + b"\x0f\x00\x00\x00")) == expected


# ---------------------------------------------------------------- the cap

@BOTH
def test_padded_hello_past_the_cap_is_too_large_as_soon_as_its_length_is_known(parse, hellos):
    records, _ = hellos["api-h2-http11-tls13"]
    padded = with_padding(records, 20000)
    assert len(padded) > 20000
    assert parse(padded) == (TOO_LARGE, 0, None, ())
    assert parse(padded[:9]) == (TOO_LARGE, 0, None, ())        # the handshake header
    assert parse(padded[:8]) == (NEED_MORE, 9, None, ())
    assert parse(padded, CAP_LIMIT) == (FOUND, 0, "api.example.com", ("h2", "http/1.1"))


@BOTH
def test_hello_of_exactly_the_cap_is_found_and_one_byte_more_is_too_large(parse, hellos):
    records, expected = hellos["web-http11-tls12"]
    padded = with_padding(records, 3000)
    assert parse(padded, len(padded)) == expected
    assert parse(padded, len(padded) - 1) == (TOO_LARGE, 0, None, ())
    two_records = frame(handshake_payload(padded), [1000])
    assert parse(two_records, len(two_records)) == expected
    assert parse(two_records, len(two_records) - 1) == (TOO_LARGE, 0, None, ())


@BOTH
def test_bytes_past_the_cap_are_never_read_and_a_full_cap_never_needs_more(parse, hellos):
    rnd = random.Random(7)
    for records, _ in hellos.values():
        for cap in {1, 4, 5, 8, 9, 10, 60, len(records) - 1, len(records), len(records) + 1}:
            for tail in (b"", bytes(rnd.randrange(256) for _ in range(64))):
                data = records + tail
                answer = parse(data, cap)
                assert answer == parse(data[:cap], cap)
                if len(data) >= cap:
                    assert answer[0] != NEED_MORE


@BOTH
@pytest.mark.parametrize("max_len", [0, -1, CAP_LIMIT + 1])
def test_cap_outside_1_to_65536_is_refused(parse, max_len):
    with pytest.raises(ValueError, match="max_len"):
        parse(b"\x16", max_len)


# ---------------------------------------------------------------- not TLS

@BOTH
@pytest.mark.parametrize("data", [
    b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n",
    b"G",
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + bytes(37),    # SSLv2-style hello
    b"\x00" * 10,
    b"\x16\x02\x00\x00\x30",           # record version 2.0
    b"\x16\x03\x05\x00\x30",           # record version 3.5: no such TLS
    b"\x16\x04\x01\x00\x30",
], ids=["http", "one-byte", "ssh", "sslv2", "zeros", "v2.0", "v3.5", "v4.1"])
def test_what_is_not_a_tls_handshake_is_not_tls(parse, data):
    assert parse(data) == (NOT_TLS, 0, None, ())


@BOTH
def test_empty_input_needs_one_byte(parse):
    assert parse(b"") == (NEED_MORE, 1, None, ())
    assert parse(b"\x16") == (NEED_MORE, 5, None, ())
    assert parse(b"\x16\x03\x01\x02\x00") == (NEED_MORE, 9, None, ())


# ---------------------------------------------------------------- malformed

def body_of(records):
    return handshake_payload(records)[4:]


MALFORMED_CASES = {
    "record-length-0": b"\x16\x03\x01\x00\x00",
    "record-length-past-2^14+2048": b"\x16\x03\x01\x48\x01",
    "not-a-client-hello": frame(b"\x02" + vec(3, build_hello_body())),
    "second-record-not-handshake": frame(b"\x01\x00\x00\x50" + bytes(10))
    + b"\x17\x03\x03\x00\x46" + bytes(70),
    "second-record-version-2": frame(b"\x01\x00\x00\x50" + bytes(10))
    + b"\x16\x02\x00\x00\x46" + bytes(70),
    "hello-too-short": frame(b"\x01" + vec(3, b"\x03\x03" + bytes(32))),
    "hello-version-2": build_hello(version=b"\x02\x00"),
    "session-id-33": build_hello(session_id=bytes(33)),
    "session-id-past-hello": frame(b"\x01" + vec(3, b"\x03\x03" + bytes(32) + b"\x20")),
    "no-cipher-suites": build_hello(suites=b""),
    "odd-cipher-suites": build_hello(suites=b"\x13\x01\x13"),
    "no-compression": build_hello(compression=b""),
    "extension-block-short": frame(b"\x01" + vec(3, build_hello_body(with_block=False)
                                               + b"\x00\x10" + sni_ext(b"a.test"))),
    "bytes-after-extension-block": frame(b"\x01" + vec(3, build_hello_body([sni_ext(b"a")])
                                                     + b"\x00")),
    "extension-past-block": frame(b"\x01" + vec(3, build_hello_body(with_block=False)
                                              + vec(2, b"\x00\x00\x00\x09abc"))),
    "extension-header-cut": frame(b"\x01" + vec(3, build_hello_body(with_block=False)
                                              + vec(2, b"\x00\x00\x00"))),
    "two-sni-extensions": build_hello([sni_ext(b"a.test"), sni_ext(b"b.test")]),
    "two-host-names": build_hello([sni_ext(b"a.test", b"b.test")]),
    "empty-sni-extension": build_hello([ext(0, b"")]),
    "empty-server-name-list": build_hello([ext(0, vec(2, b""))]),
    "server-name-list-short": build_hello([ext(0, b"\x00\x09\x00\x00\x01a")]),
    "server-name-list-long": build_hello([ext(0, vec(2, b"\x00\x00\x01a") + b"\x00")]),
    "server-name-entry-cut": build_hello([ext(0, vec(2, b"\x00\x00"))]),
    "host-name-past-list": build_hello([ext(0, vec(2, b"\x00\x00\x05a"))]),
    "empty-host-name": build_hello([sni_ext(b"")]),
    "host-name-dot": build_hello([sni_ext(b".")]),
    "host-name-nul": build_hello([sni_ext(b"a\x00.test")]),
    "host-name-space": build_hello([sni_ext(b"a .test")]),
    "host-name-utf8": build_hello([sni_ext("é.test".encode())]),
    "two-alpn-extensions": build_hello([alpn_ext(b"h2"), alpn_ext(b"h2")]),
    "alpn-empty": build_hello([ext(16, b"")]),
    "alpn-empty-list": build_hello([ext(16, vec(2, b""))]),
    "alpn-one-byte-list": build_hello([ext(16, vec(2, b"\x00"))]),
    "alpn-empty-name": build_hello([alpn_ext(b"h2", b"")]),
    "alpn-name-past-list": build_hello([ext(16, vec(2, b"\x05h2"))]),
    "alpn-list-short": build_hello([ext(16, b"\x00\x09\x02h2")]),
}


@BOTH
@pytest.mark.parametrize("case", MALFORMED_CASES)
def test_malformed_hello_is_malformed(parse, case):
    data = MALFORMED_CASES[case]
    assert parse(data) == (MALFORMED, 0, None, ())
    assert parse(data + bytes(50)) == (MALFORMED, 0, None, ())


FOUND_CASES = {
    "no-extensions-block": (build_hello(with_block=False), None, ()),
    "empty-extensions-block": (build_hello(), None, ()),
    "other-name-type-skipped": (build_hello([sni_ext(b"opaque", name_type=7)]), None, ()),
    "other-name-type-then-host": (
        build_hello([ext(0, vec(2, b"\x07" + vec(2, b"x") + b"\x00" + vec(2, b"A.Test")))]),
        "a.test", ()),
    "host-name-one-trailing-dot-only": (build_hello([sni_ext(b"a.test..")]), "a.test.", ()),
    "unknown-extensions-skipped": (build_hello([ext(0xFAFA, b""), sni_ext(b"b.test"),
                                                ext(43, b"\x02\x03\x04"), alpn_ext(b"h2")]),
                                   "b.test", ("h2",)),
    "alpn-latin-1": (build_hello([alpn_ext(b"\xff\x00x")]), None, ("\xff\x00x",)),
    "sni-max-ascii": (build_hello([sni_ext(bytes(range(0x21, 0x7F)))]),
                      bytes(range(0x21, 0x7F)).lower().decode(), ()),
    "empty-hello-after-header": (build_hello(with_block=False, session_id=b""), None, ()),
    "record-version-ssl3": (frame(handshake_payload(build_hello([sni_ext(b"c.test")])),
                                  version=b"\x03\x00"), "c.test", ()),
}


@BOTH
@pytest.mark.parametrize("case", FOUND_CASES)
def test_unusual_but_well_formed_hello_is_found(parse, case):
    data, name, alpn = FOUND_CASES[case]
    assert parse(data) == (FOUND, 0, name, alpn)


@BOTH
def test_zero_length_hello_body_is_malformed_not_a_hang(parse):
    assert parse(frame(b"\x01\x00\x00\x00")) == (MALFORMED, 0, None, ())
    assert parse(frame(b"\x01\x00\x00\x00", [2])) == (MALFORMED, 0, None, ())


# ---------------------------------------------------------------- compiled vs twin

def test_compiled_parser_and_twin_export_the_same_constants():
    for word in ("SNI_NEED_MORE", "SNI_FOUND", "SNI_NOT_TLS", "SNI_TOO_LARGE", "SNI_MALFORMED",
                 "SNI_MAX_CLIENT_HELLO", "SNI_MAX_CLIENT_HELLO_LIMIT"):
        assert getattr(_native, word) == getattr(twin, word), word
    assert len({twin.SNI_NEED_MORE, FOUND, NOT_TLS, TOO_LARGE, MALFORMED}) == 5


def agree(data, cap):
    compiled = _native.parse_client_hello(data, cap)
    assert compiled == twin.parse_client_hello(data, cap), (data.hex(), cap)
    assert compiled == _native.parse_client_hello(data[:cap], cap)
    if len(data) >= cap:
        assert compiled[0] != NEED_MORE
    return compiled


CAPS = st.one_of(st.sampled_from([1, 5, 9, 64, 517, 16384, CAP_LIMIT]), st.integers(1, 2048))


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=600), cap=CAPS)
def test_compiled_and_twin_agree_on_random_bytes(data, cap):
    agree(data, cap)


@settings(max_examples=400, deadline=None)
@given(head=st.sampled_from([b"\x16\x03\x01", b"\x16\x03\x03", b"\x16\x03\x01\x00",
                             b"\x16\x03\x01\x02\x00\x01\x00\x01"]),
       rest=st.binary(max_size=600), cap=CAPS)
def test_compiled_and_twin_agree_on_random_bytes_behind_a_record_header(head, rest, cap):
    agree(head + rest, cap)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), cap=CAPS)
def test_compiled_and_twin_agree_on_mutated_real_hellos(hellos, data, cap):
    records, _ = data.draw(st.sampled_from(list(hellos.values())))
    payload = bytearray(handshake_payload(records))
    cuts = data.draw(st.lists(st.integers(1, len(payload) - 1), max_size=7))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    agree(frame(bytes(payload), cuts), cap)


def mutate(rnd, data):
    """One random flip, truncation, insertion, deletion or length-field poke of `data`."""
    data = bytearray(data)
    kind = rnd.randrange(5)
    i = rnd.randrange(len(data)) if data else 0
    if kind == 0 and data:
        data[i] ^= 1 << rnd.randrange(8)
    elif kind == 1:
        del data[rnd.randrange(len(data) + 1):]
    elif kind == 2:
        data[i:i] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
    elif kind == 3 and data:
        del data[i:i + rnd.randint(1, 8)]
    elif data:
        data[i] = rnd.choice([0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF])
    return bytes(data)


def test_mutation_fuzz_of_20000_real_hellos_never_crashes_and_both_parsers_agree(hellos):
    rnd = random.Random(20_000)
    seeds = [records for records, _ in hellos.values()]
    seeds += [frame(handshake_payload(r), rnd.sample(range(1, 200), 3)) for r in seeds]
    seen = set()
    for _ in range(20_000):
        data = rnd.choice(seeds)
        for _ in range(rnd.randint(1, 3)):
            data = mutate(rnd, data)
        cap = rnd.choice([16384, 16384, CAP_LIMIT, rnd.randint(1, len(data) + 8)])
        seen.add(agree(data, cap)[0])
    assert seen == {NEED_MORE, FOUND, NOT_TLS, TOO_LARGE, MALFORMED}


# ---------------------------------------------------------------- memory safety

GUARD_PAGE_CHECK = r"""
import ctypes, mmap, random, ssl, sys
from l4lb import _native

def hello(name, alpn):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(alpn)
    i, o = ssl.MemoryBIO(), ssl.MemoryBIO()
    c = ctx.wrap_bio(i, o, server_hostname=name)
    try:
        c.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return o.read()

PAGE = mmap.PAGESIZE
READABLE = 5 * PAGE
mm = mmap.mmap(-1, READABLE + 2 * PAGE)
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
assert libc.mprotect(base + READABLE, 2 * PAGE, 0) == 0      # PROT_NONE: a read faults
window = memoryview(mm)
rnd = random.Random(5)
seeds = [hello("api.example.com", ["h2", "http/1.1"]), hello("b.test", ["x" * 200] * 30)]
checked = 0
for _ in range(3000):
    data = bytearray(rnd.choice(seeds))
    for _ in range(rnd.randint(0, 3)):
        data[rnd.randrange(len(data))] = rnd.randrange(256)
    data = bytes(data[:rnd.randint(0, len(data))])
    cap = rnd.choice([rnd.randint(1, len(data) + 2), 16384])
    shown = min(cap, len(data))
    start = READABLE - shown
    window[start:READABLE] = data[:shown]
    # The view runs into the guard pages past the cap: reading there kills the process.
    view = window[start:start + min(len(data), shown + 2 * PAGE)]
    assert _native.parse_client_hello(view, cap) == _native.parse_client_hello(data, cap)
    checked += 1
print(checked)
"""


def test_compiled_parser_reads_nothing_past_the_input_or_the_cap_even_next_to_a_guard_page():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", GUARD_PAGE_CHECK], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["3000"]


def test_bench_entry_point_scans_like_the_parser(hellos):
    records, _ = hellos["api-h2-http11-tls13"]
    assert _native.bench_sni_scan(records, 16384, 3) == FOUND
    assert _native.bench_sni_scan(records[:10], 16384, 3) == NEED_MORE
