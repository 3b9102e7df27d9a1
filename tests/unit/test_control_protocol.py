"""The sans-IO control protocol (DESIGN.md §6): framing, command grammar, replies."""
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4lb.control.protocol import (
    COMMANDS,
    COMMANDS_BY_NAME,
    MAX_LINE,
    ArgKind,
    Command,
    ControlError,
    LineReader,
    encode_reply,
    error,
    help_text,
    ok,
    parse_command,
    parse_host_port,
)

# --- every command parses ---------------------------------------------------------------

VALID_COMMANDS = [
    (b"help", Command("help", {})),
    (b"show info", Command("show info", {})),
    (b"show listeners", Command("show listeners", {})),
    (b"show backends", Command("show backends", {"pool": None})),
    (b"show backends blue", Command("show backends", {"pool": "blue"})),
    (b"show conns", Command("show conns", {"pool": None, "backend": None})),
    (b"show conns blue", Command("show conns", {"pool": "blue", "backend": None})),
    (b"show conns blue/app1", Command("show conns", {"pool": "blue", "backend": "app1"})),
    (b"show workers", Command("show workers", {})),
    (b"enable blue/app1", Command("enable", {"pool": "blue", "backend": "app1", "fleet": False})),
    (b"disable blue/app1", Command("disable", {"pool": "blue", "backend": "app1", "by": None, "fleet": False})),
    (b"disable blue/app1 by deploy",
     Command("disable", {"pool": "blue", "backend": "app1", "by": "deploy", "fleet": False})),
    (b"drain blue/app1", Command("drain", {"pool": "blue", "backend": "app1", "by": None, "fleet": False})),
    (b"kill blue/app1", Command("kill", {"pool": "blue", "backend": "app1"})),
    (b"remove blue/app1", Command("remove", {"pool": "blue", "backend": "app1", "fleet": False})),
    (b"wait blue/app1", Command("wait", {"pool": "blue", "backend": "app1", "timeout": None})),
    (b"wait blue/app1 2.5", Command("wait", {"pool": "blue", "backend": "app1", "timeout": 2.5})),
    (b"wait blue/app1 30", Command("wait", {"pool": "blue", "backend": "app1", "timeout": 30.0})),
    (b"weight blue/app1 50", Command("weight", {"pool": "blue", "backend": "app1", "weight": 50, "fleet": False})),
    (b"weight blue/app1 0", Command("weight", {"pool": "blue", "backend": "app1", "weight": 0, "fleet": False})),
    (
        b"weight blue/app1 " + b"0" * 5000 + b"7",
        Command("weight", {"pool": "blue", "backend": "app1", "weight": 7, "fleet": False}),
    ),
    (
        b"weight blue/app1 10000",
        Command("weight", {"pool": "blue", "backend": "app1", "weight": 10000, "fleet": False}),
    ),
    (
        b"add blue app3 127.0.0.1:9003",
        Command(
            "add",
            {"pool": "blue", "backend": "app3", "address": ("127.0.0.1", 9003), "weight": 1, "fleet": False},
        ),
    ),
    (
        b"add blue app3 [::1]:9003 weight 7",
        Command("add", {"pool": "blue", "backend": "app3", "address": ("::1", 9003), "weight": 7, "fleet": False}),
    ),
    (
        b"add blue app3 db.Example.com:5432",
        Command(
            "add",
            {"pool": "blue", "backend": "app3", "address": ("db.example.com", 5432), "weight": 1, "fleet": False},
        ),
    ),
    (b"switch web green", Command("switch", {"listener": "web", "sni": None, "pool": "green", "fleet": False})),
    (
        b"split web blue=90 green=10",
        Command("split", {"listener": "web", "sni": None, "split": {"blue": 90, "green": 10}, "fleet": False}),
    ),
    (b"split web green=100", Command("split", {"listener": "web", "sni": None, "split": {"green": 100}, "fleet": False})),
    (
        b"split web a=0 b=33 c=67",
        Command("split", {"listener": "web", "sni": None, "split": {"a": 0, "b": 33, "c": 67}, "fleet": False}),
    ),
    (b"reload", Command("reload", {})),
    (b"upgrade", Command("upgrade", {})),
    (b"shutdown", Command("shutdown", {"timeout": None})),
    (b"shutdown 10", Command("shutdown", {"timeout": 10.0})),
    (b"subscribe", Command("subscribe", {"interval": None})),
    (b"subscribe 0.5", Command("subscribe", {"interval": 0.5})),
    (b"drain blue/app1 by deploy --fleet",
     Command("drain", {"pool": "blue", "backend": "app1", "by": "deploy", "fleet": True})),
    (b"weight blue/app1 5 --fleet",
     Command("weight", {"pool": "blue", "backend": "app1", "weight": 5, "fleet": True})),
    (b"split web blue=90 green=10 --fleet",
     Command("split", {"listener": "web", "sni": None, "split": {"blue": 90, "green": 10},
                       "fleet": True})),
    (b"show cluster", Command("show cluster", {})),
]


@pytest.mark.parametrize(("line", "expected"), VALID_COMMANDS, ids=lambda v: repr(v)[:40])
def test_valid_command_parses_to_typed_arguments(line, expected):
    assert parse_command(line) == expected


def test_every_command_in_the_table_has_a_valid_example():
    assert {command.name for _, command in VALID_COMMANDS} == set(COMMANDS_BY_NAME)


def test_command_words_are_case_insensitive_but_names_are_not():
    assert parse_command(b"SHOW Backends Blue") == Command("show backends", {"pool": "Blue"})


def test_extra_whitespace_and_crlf_remains_are_ignored():
    assert parse_command(b"  weight\tblue/app1   5 \r") == parse_command(b"weight blue/app1 5")


@pytest.mark.parametrize(("line", "listener", "sni"), [
    (b"switch tls/api.example.com green", "tls", "api.example.com"),
    (b"switch tls/*.Example.COM. green", "tls", "*.example.com"),
    (b"switch tls green", "tls", None),
])
def test_switch_names_a_listener_or_one_of_its_sni_routes(line, listener, sni):
    cmd = parse_command(line)
    assert (cmd.args["listener"], cmd.args["sni"], cmd.args["pool"]) == (listener, sni, "green")


def test_split_names_an_sni_route_by_its_wildcard_pattern():
    cmd = parse_command(b"split tls/*.example.com web=90 canary=10")
    assert cmd.args == {"listener": "tls", "sni": "*.example.com",
                        "split": {"web": 90, "canary": 10}, "fleet": False}


@pytest.mark.parametrize("line", [b"switch tls/ green", b"switch tls/* green",
                                  b"switch tls/a..b green", b"split tls/a.*.b x=100",
                                  b"switch bad!name/a.test green"])
def test_a_route_with_a_bad_sni_pattern_or_listener_is_refused(line):
    with pytest.raises(ControlError):
        parse_command(line)


def test_parsed_split_keeps_the_order_given():
    assert list(parse_command(b"split web z=50 a=50").args["split"]) == ["z", "a"]


def test_every_spec_fills_every_key_it_declares():
    # Each example sets exactly the keys of its spec, so handlers can index args directly.
    for _, command in VALID_COMMANDS:
        spec = COMMANDS_BY_NAME[command.name]
        keys = {key for arg in spec.args for key in arg.keys}
        assert set(command.args) == keys, command


# --- malformed input: ControlError with a useful message ---------------------------------

MALFORMED = [
    (b"", "empty command"),
    (b"   \t ", "empty command"),
    (b"\xff\xfe", "not valid UTF-8"),
    (b"show \xc3", "not valid UTF-8"),
    (b"frobnicate", "unknown command 'frobnicate'"),
    (b"shwo info", "did you mean 'show info'"),
    (b"show backend", "did you mean 'show backends'"),
    (b"weigth blue/app1 5", "did you mean 'weight'"),
    (b"show", "incomplete command 'show'"),
    (b"show nothing", "unknown command 'show nothing'"),
    (b"enable", "missing POOL/BACKEND; usage: enable POOL/BACKEND"),
    (b"enable blue/app1 now", "unexpected argument 'now'; usage: enable POOL/BACKEND"),
    (b"show info please", "unexpected argument 'please'"),
    (b"help me", "unexpected argument 'me'"),
    (b"enable blue", "want POOL/BACKEND"),
    (b"enable blue/", "bad BACKEND ''"),
    (b"enable /app1", "bad POOL ''"),
    (b"enable blue/app1/x", "bad BACKEND 'app1/x'"),
    (b"enable bl\xc3\xa9/app1", "bad POOL"),
    (b"enable -x/app1", "bad POOL '-x'"),
    (b"show backends a/b", "bad POOL 'a/b'"),
    (b"show conns a/", "bad BACKEND ''"),
    (b"weight blue/app1", "missing N"),
    (b"weight blue/app1 -1", "bad weight '-1'"),
    (b"weight blue/app1 +5", "bad weight '+5'"),
    (b"weight blue/app1 1_000", "bad weight '1_000'"),
    (b"weight blue/app1 2.5", "bad weight '2.5'"),
    (b"weight blue/app1 10001", "weight must be between 0 and 10000, got 10001"),
    (b"weight blue/app1 " + b"9" * 5000, "weight must be between 0 and 10000"),
    (b"weight blue/app1 heavy", "want a whole number"),
    (b"weight blue/app1 5 6", "unexpected argument '6'"),
    (b"wait blue/app1 0", "TIMEOUT must be a positive, finite number of seconds, got 0"),
    (b"wait blue/app1 " + b"9" * 400, "TIMEOUT must be a positive, finite number"),
    (b"wait blue/app1 -3", "bad TIMEOUT '-3'"),
    (b"wait blue/app1 nan", "bad TIMEOUT 'nan'"),
    (b"wait blue/app1 inf", "bad TIMEOUT 'inf'"),
    (b"wait blue/app1 1e3", "bad TIMEOUT '1e3'"),
    (b"shutdown soon", "bad TIMEOUT 'soon'"),
    (b"add blue app3", "missing HOST:PORT; usage: add POOL BACKEND HOST:PORT [weight N]"),
    (b"add blue app3 127.0.0.1", "bad address '127.0.0.1': expected host:port"),
    (b"add blue app3 127.0.0.1:0", "the port must be a number from 1 to 65535"),
    (b"add blue app3 127.0.0.1:65536", "the port must be a number from 1 to 65535"),
    (b"add blue app3 127.0.0.1:http", "the port must be a number"),
    (b"add blue app3 1.2.3.256:80", "'1.2.3.256' is not an IPv4 address"),
    (b"add blue app3 01.2.3.4:80", "is not an IPv4 address"),
    (b"add blue app3 ::1:80", "an IPv6 address needs brackets"),
    (b"add blue app3 [::g]:80", "'::g' is not an IPv6 address"),
    (b"add blue app3 [fe80::1%e/0]:80", "not an interface name"),
    (b"add blue app3 bad!host:80", "'bad!host' is neither an IP address nor a hostname"),
    (b"add blue app3 -x.example:80", "neither an IP address nor a hostname"),
    (b"add blue app3 :80", "the host is empty"),
    (b"add blue app3 h:80 weight", "missing N after 'weight'"),
    (b"add blue app3 h:80 weight 99999", "weight must be between 0 and 10000"),
    (b"add blue app3 h:80 weight 1 weight 2", "'weight' given twice"),
    (b"add blue app3 h:80 colour red", "unexpected argument 'colour'"),
    (b"add blue/app3 h:80", "bad POOL 'blue/app3'"),
    (b"switch web", "missing POOL"),
    (b"switch web a b", "unexpected argument 'b'"),
    (b"split web", "missing POOL=PCT"),
    (b"split web blue=90 green=20", "split percentages sum to 110, not 100"),
    (b"split web blue=90", "sum to 90, not 100"),
    (b"split web blue=50 blue=50", "pool 'blue' appears twice"),
    (b"split web blue", "bad POOL=PCT 'blue'"),
    (b"split web blue=x green=100", "bad percentage in 'blue=x'"),
    (b"split web blue=101", "bad percentage"),
    (b"split web =100", "bad POOL ''"),
    (b"reload now", "unexpected argument 'now'"),
]


@pytest.mark.parametrize(("line", "message"), MALFORMED, ids=lambda v: repr(v)[:40])
def test_malformed_command_raises_control_error_saying_why(line, message):
    with pytest.raises(ControlError) as excinfo:
        parse_command(line)
    assert message in str(excinfo.value)


@pytest.mark.parametrize(
    "line",
    [
        b"x" * 60_000,
        b"enable " + b"p" * 60_000,
        b"weight a/b " + b"9" * 60_000,
        b"wait a/b " + b"0" * 60_000,
        b"add a b h:" + b"8" * 60_000,
        b"split web a=" + b"1" * 60_000,
        b"add a b " + b"1:" * 30_000 + b"80",
        b"split web " + b"a" * 60_000,
        b"help " + b"z" * 60_000,
    ],
    ids=["command", "name", "count", "timeout", "port", "percent", "address", "split", "extra"],
)
def test_error_messages_echo_only_a_short_piece_of_a_huge_token(line):
    with pytest.raises(ControlError) as excinfo:
        parse_command(line)
    assert len(str(excinfo.value)) < 300


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9001", ("127.0.0.1", 9001)),
        ("[::1]:9001", ("::1", 9001)),
        ("[2001:DB8:0:0::1]:443", ("2001:db8::1", 443)),
        ("localhost:1", ("localhost", 1)),
        ("app-1.internal.:65535", ("app-1.internal.", 65535)),
        ("1-2.example:80", ("1-2.example", 80)),
        ("my_svc:80", ("my_svc", 80)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
    ],
)
def test_parse_host_port_accepts_ipv4_bracketed_ipv6_and_hostnames(text, expected):
    assert parse_host_port(text) == expected


# --- help and the table ------------------------------------------------------------------


def test_help_has_one_line_per_command_starting_with_its_usage():
    lines = help_text()
    assert len(lines) == len(COMMANDS)
    for spec, line in zip(COMMANDS, lines):
        assert line.startswith(spec.usage + " ")
        assert line.endswith(spec.summary)


def test_help_usage_lines_match_design_md_section_6():
    usages = {spec.usage for spec in COMMANDS}
    assert {
        "show backends [POOL]",
        "show conns [POOL[/BACKEND]]",
        "wait POOL/BACKEND [TIMEOUT]",
        "weight POOL/BACKEND N [--fleet]",          # issue 17: --fleet in a fleet
        "add POOL BACKEND HOST:PORT [weight N] [--fleet]",
        "switch LISTENER[/SNI] POOL [--fleet]",          # issue 18: /SNI names an sni route
        "split LISTENER[/SNI] POOL=PCT ... [--fleet]",
        "shutdown [TIMEOUT]",
    } <= usages


def test_table_declares_summary_and_reply_fields_for_every_command():
    for spec in COMMANDS:
        assert spec.summary and "\n" not in spec.summary
        assert spec.reply, spec.name
        assert not spec.rows or len(spec.reply) == 1, spec.name
        for arg in spec.args:
            assert isinstance(arg.kind, ArgKind)
    assert COMMANDS_BY_NAME["show backends"].rows[:3] == ("pool", "name", "address")


# --- replies -----------------------------------------------------------------------------


def test_ok_reply_is_one_compact_json_line():
    line = encode_reply(ok(backends=[{"pool": "blue", "name": "app1"}]))
    assert line == b'{"ok":true,"backends":[{"pool":"blue","name":"app1"}]}\n'
    assert line.count(b"\n") == 1


def test_error_reply_carries_the_message_as_utf8():
    line = encode_reply(error(ControlError("pool 'blé' not found\nsecond line")))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"ok": False, "error": "pool 'blé' not found\nsecond line"}
    assert "blé".encode() in line


def test_reply_refuses_nan_rather_than_emit_invalid_json():
    with pytest.raises(ValueError):
        encode_reply(ok(rt_ms=float("nan")))


def test_ok_refuses_a_field_named_ok():
    with pytest.raises(TypeError):
        ok(ok=False)


# --- LineReader --------------------------------------------------------------------------


def test_line_reader_splits_lines_and_strips_one_trailing_cr():
    reader = LineReader()
    assert reader.feed(b"help\r\nshow info\n\nx\r\r\n") == [b"help", b"show info", b"", b"x\r"]


def test_line_reader_keeps_a_partial_line_until_its_newline():
    reader = LineReader()
    assert reader.feed(b"show ") == []
    assert reader.feed(b"in") == []
    assert reader.feed(b"fo\r") == []
    assert reader.feed(b"\nhel") == [b"show info"]
    assert reader.feed(b"p\n") == [b"help"]


def test_line_reader_reports_an_oversize_line_once_and_recovers():
    reader = LineReader()
    out = reader.feed(b"help\n" + b"a" * (MAX_LINE + 1))
    assert out[0] == b"help"
    assert len(out) == 2 and isinstance(out[1], ControlError)
    assert str(out[1]) == "line longer than 65536 bytes"
    assert reader.feed(b"b" * 100_000) == []  # the rest of that line: dropped, silently
    assert len(reader._partial) == 0
    assert reader.feed(b"bbb\nshow info\n") == [b"show info"]


def test_line_reader_accepts_a_line_of_exactly_max_line_bytes():
    reader = LineReader()
    assert reader.feed(b"a" * MAX_LINE + b"\n") == [b"a" * MAX_LINE]
    out = reader.feed(b"a" * (MAX_LINE + 1) + b"\nok\n")
    assert isinstance(out[0], ControlError) and out[1:] == [b"ok"]


def test_line_reader_buffer_never_grows_past_the_limit_fed_byte_by_byte():
    reader = LineReader()
    errors = []
    for _ in range(MAX_LINE + 10):
        errors += reader.feed(b"z")
        assert len(reader._partial) <= MAX_LINE
    assert len(errors) == 1 and isinstance(errors[0], ControlError)


def _reference_split(stream: bytes) -> list:
    """What LineReader should return for the whole stream.

    Complete lines, and "too long" for an over-long line, even an unfinished one: the
    reader reports it as soon as it knows.
    """
    *lines, partial = stream.split(b"\n")
    out = []
    for line in lines:
        if len(line) > MAX_LINE:
            out.append("too long")
        else:
            out.append(line[:-1] if line.endswith(b"\r") else line)
    if len(partial) > MAX_LINE:
        out.append("too long")
    return out


def _normalise(results: list) -> list:
    return ["too long" if isinstance(r, ControlError) else r for r in results]


line_bytes = st.one_of(
    st.binary(max_size=20),
    st.sampled_from([b"help", b"show info", b"\r", b"x\r"]),
    st.integers(MAX_LINE - 2, MAX_LINE + 2).map(lambda n: b"q" * n),
)


@given(lines=st.lists(line_bytes, max_size=8), cuts=st.lists(st.integers(0, 200_000)))
def test_line_reader_output_does_not_depend_on_feed_boundaries(lines, cuts):
    stream = b"\n".join(lines)
    reader = LineReader()
    out = []
    positions = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    for start, end in zip(positions, positions[1:]):
        out += reader.feed(stream[start:end])
    assert _normalise(out) == _reference_split(stream)


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_arbitrary_bytes_through_reader_and_parser_only_raise_control_error(chunks):
    reader = LineReader()
    for chunk in chunks:
        for item in reader.feed(chunk):
            if isinstance(item, ControlError):
                continue
            try:
                command = parse_command(item)
            except ControlError as exc:
                encode_reply(error(exc))  # every error message must be encodable
            else:
                assert command.name in COMMANDS_BY_NAME


command_words = st.sampled_from(sorted({w for spec in COMMANDS for w in spec.words}))
argument_like = st.one_of(
    st.from_regex(r"[a-z]{1,4}(/[a-z0-9]{0,3})?", fullmatch=True),
    st.from_regex(r"[a-z]{1,3}=-?[0-9]{1,3}", fullmatch=True),
    st.from_regex(r"(\[[0-9a-f:]{0,8}\]|[0-9.]{1,16}|[a-z_.-]{1,6}):[0-9]{0,6}", fullmatch=True),
    st.from_regex(r"-?[0-9]{0,6}(\.[0-9]{0,3})?", fullmatch=True),
    st.sampled_from(["weight", "nan", "inf", "1e9", "٣", "x" * 70]),
    st.integers(4000, 5000).map(lambda n: "9" * n),  # int() refuses over 4300 digits
    st.text(max_size=8),
)


@given(st.lists(st.one_of(command_words, argument_like), min_size=1, max_size=7))
def test_command_shaped_input_parses_or_raises_control_error(tokens):
    line = " ".join(tokens).encode("utf-8", "surrogatepass")
    try:
        command = parse_command(line)
    except ControlError as exc:
        assert str(exc)
        encode_reply(error(exc))
    else:
        spec = COMMANDS_BY_NAME[command.name]
        assert set(command.args) == {key for arg in spec.args for key in arg.keys}
        encode_reply(ok(**{k: v for k, v in command.args.items()}))


@given(st.binary(max_size=400))
def test_arbitrary_bytes_straight_into_the_parser_only_raise_control_error(data):
    # The reader never hands the parser a newline, but the parser must not rely on it.
    try:
        command = parse_command(data)
    except ControlError as exc:
        encode_reply(error(exc))
    else:
        assert command.name in COMMANDS_BY_NAME


def test_ctl_tables_show_check_times_as_ages():
    from l4lb.control.client import format_table

    table = format_table([{"name": "a", "last_check": 1000.0}, {"name": "b", "last_check": None}],
                         now=1002.5)
    assert table.splitlines() == ["NAME  LAST_CHECK", "a     2.5s ago", "b     -"]
