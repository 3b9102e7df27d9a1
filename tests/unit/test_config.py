"""The config loader (l4lb.config) and its line locator (l4lb.tomlpos), without sockets.

Every kind of validation error is asserted to name both the key path and the line it is
on; the shipped configs must validate; arbitrary input never escapes as anything but
ConfigError.
"""
import dataclasses
import json
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from l4lb.config import (
    REQUIRED, SCHEMA, Address, Config, ConfigError, ConfigIssue, Table, TableOf, default_config_path,
    format_path, load_config, parse_address, parse_config,
)
from l4lb.tomlpos import TomlLocator

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "conf" / "examples").glob("*.toml"))

# A valid config that the cases below break one line at a time.
BASE = """\
[global]
max_connections = 100

[listeners.web]
bind = ["127.0.0.1:8000"]
pool = "blue"

[pools.blue]
algorithm = "rr"
backends = [
  { name = "a", address = "127.0.0.1:9001" },
  { name = "b", address = "127.0.0.1:9002", weight = 3 },
]

[pools.blue.health]
interval = 2.0

[pools.green]
backends = []
"""


def issues_of(text: str, name: str = "conf.toml") -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, name)
    return info.value.issues


def line_with(text: str, fragment: str) -> int:
    """1-based number of the first line of `text` that contains `fragment`."""
    for number, line in enumerate(text.splitlines(), 1):
        if fragment in line:
            return number
    raise AssertionError(f"{fragment!r} not in text")


def edit(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def test_base_config_is_valid():
    config = parse_config(BASE, "conf.toml")
    assert config.listeners["web"].pool == "blue"
    assert [b.weight for b in config.pools["blue"].backends] == [1, 3]
    assert config.pools["green"].health is None


# -- one test per kind of validation error -------------------------------------------
# (id, text, key path reported, fragment of the line it must point at, fragment of the message)

CASES = [
    ("unknown key suggests the closest",
     edit("weight = 3", "wieght = 3"),
     "pools.blue.backends[1].wieght", "wieght", "unknown key 'wieght' (did you mean 'weight'?)"),
    ("unknown section",
     edit("[global]", "[globl]"),
     "globl", "[globl]", "did you mean 'global'?"),
    ("unknown key in a table without a close match",
     edit("max_connections = 100", "max_connections = 100\nfrobnicate = 1"),
     "global.frobnicate", "frobnicate", "unknown key 'frobnicate'"),
    ("unknown key in the health table",
     edit("interval = 2.0", "intervall = 2.0"),
     "pools.blue.health.intervall", "intervall", "did you mean 'interval'?"),
    ("bool is not an integer",
     edit("max_connections = 100", "max_connections = true"),
     "global.max_connections", "max_connections", "must be an integer from 0 to 2147483647, got true"),
    ("string is not a number",
     edit('pool = "blue"', 'pool = "blue"\nconnect_timeout = "2s"'),
     "listeners.web.connect_timeout", "connect_timeout", "must be a number greater than 0, got '2s'"),
    ("float is not an integer",
     edit("weight = 3", "weight = 1.5"),
     "pools.blue.backends[1].weight", "weight = 1.5", "got 1.5"),
    ("weight out of range",
     edit("weight = 3", "weight = -3"),
     "pools.blue.backends[1].weight", "weight = -3", "must be an integer from 0 to 10000, got -3"),
    ("retries out of range",
     edit('pool = "blue"', 'pool = "blue"\nretries = 33'),
     "listeners.web.retries", "retries", "from 0 to 32, got 33"),
    ("a timeout must be above zero",
     edit('pool = "blue"', 'pool = "blue"\nidle_timeout = 0'),
     "listeners.web.idle_timeout", "idle_timeout", "must be a number greater than 0, got 0"),
    ("a timeout must be finite",
     edit("interval = 2.0", "interval = inf"),
     "pools.blue.health.interval", "interval", "got inf"),
    ("rise is at least one",
     edit("interval = 2.0", "interval = 2.0\nrise = 0"),
     "pools.blue.health.rise", "rise", "from 1 to"),
    ("negative rate",
     edit('pool = "blue"', 'pool = "blue"\nper_source_rate = -1.0'),
     "listeners.web.per_source_rate", "per_source_rate", "a number of at least 0, got -1.0"),
    ("socket mode out of range",
     "[control]\nmode = 0o1000\n",
     "control.mode", "mode", "from 0o000 to 0o777, got 0o1000"),
    ("algorithm enum",
     edit('algorithm = "rr"', 'algorithm = "round-robin"'),
     "pools.blue.algorithm", "algorithm", "must be one of 'rr', 'wrr', 'leastconn', 'hash', 'lrt', 'p2c'"),
    ("hash_key enum",
     edit('algorithm = "rr"', 'algorithm = "hash"\nhash_key = "src_port"'),
     "pools.blue.hash_key", "hash_key", "one of 'src_ip', 'src_ip_port'"),
    ("on_down enum",
     edit('algorithm = "rr"', 'on_down = "drop"'),
     "pools.blue.on_down", "on_down", "one of 'keep', 'close'"),
    ("send_proxy enum on a listener",
     edit('pool = "blue"', 'pool = "blue"\nsend_proxy = "v3"'),
     "listeners.web.send_proxy", "send_proxy", "one of 'off', 'v1', 'v2', got 'v3'"),
    ("send_proxy enum on health checks",
     edit("interval = 2.0", "send_proxy = true"),
     "pools.blue.health.send_proxy", "send_proxy", "got true"),
    ("log level enum suggests",
     '\n[log]\nlevel = "warn"\n',
     "log.level", "level", "(did you mean 'warning'?)"),
    ("log format enum",
     '[log]\nformat = "text"\n',
     "log.format", "format", "one of 'json', 'console'"),
    ("log access is a boolean",
     '[log]\naccess = "yes"\n',
     "log.access", "access", "must be true or false, got 'yes'"),
    ("address without a port",
     edit('"127.0.0.1:9002"', '"127.0.0.1"'),
     "pools.blue.backends[1].address", '"127.0.0.1"', "expected host:port"),
    ("port out of range",
     edit('bind = ["127.0.0.1:8000"]', 'bind = ["127.0.0.1:8000", "127.0.0.1:70000"]'),
     "listeners.web.bind[1]", "70000", "the port must be a number from 0 to 65535, got '70000'"),
    ("IPv6 without brackets",
     '[metrics]\nlisten = "::1:9100"\n',
     "metrics.listen", "listen = ", "needs brackets"),
    ("bad IPv4 literal",
     edit('"127.0.0.1:9001"', '"127.0.0.300:9001"'),
     "pools.blue.backends[0].address", "127.0.0.300", "'127.0.0.300' is not an IPv4 address"),
    ("bad CIDR",
     edit('pool = "blue"', 'pool = "blue"\nallow = ["10.0.0.0/8",\n  "10.0.0.0/33"]'),
     "listeners.web.allow[1]", "/33", "must be a CIDR"),
    ("listener with neither pool nor split",
     edit('pool = "blue"\n', ""),
     "listeners.web", "[listeners.web]", "needs 'pool'"),
    ("listener with both pool and split",
     edit('pool = "blue"', 'pool = "blue"\nsplit = { blue = 100 }'),
     "listeners.web.split", "split", "either 'pool' or 'split', not both"),
    ("listener naming a missing pool",
     edit('pool = "blue"', 'pool = "bleu"'),
     "listeners.web.pool", "bleu", "no pool named 'bleu' (did you mean 'blue'?)"),
    ("split not summing to 100",
     edit('pool = "blue"', 'split = { blue = 80, green = 10 }'),
     "listeners.web.split", "split", "must sum to 100, got 90"),
    ("split naming a missing pool",
     edit('pool = "blue"', 'split = { blue = 90, red = 10 }'),
     "listeners.web.split.red", "split", "no pool named 'red'"),
    ("split percentage out of range",
     edit('pool = "blue"', 'split = { blue = 101, green = -1 }'),
     "listeners.web.split.blue", "split", "from 0 to 100, got 101"),
    ("duplicate backend names",
     edit('name = "b"', 'name = "a"'),
     "pools.blue.backends[1].name", '"127.0.0.1:9002"', "duplicate backend name 'a' (also backends[0])"),
    ("duplicate bind across listeners",
     BASE + '\n[listeners.api]\npool = "green"\nbind = ["127.0.0.1:9999",\n  "127.0.0.1:8000"]\n',
     "listeners.api.bind[1]", '  "127.0.0.1:8000"', "127.0.0.1:8000 is already bound by listeners.web.bind[0]"),
    ("metrics on a listener's address",
     BASE + '[metrics]\nlisten = "127.0.0.1:8000"\n',
     "metrics.listen", "listen = ", "already bound by listeners.web.bind[0]"),
    ("empty bind list",
     edit('bind = ["127.0.0.1:8000"]', "bind = []"),
     "listeners.web.bind", "bind", "at least 1"),
    ("bind is a list, not a string",
     edit('bind = ["127.0.0.1:8000"]', 'bind = "127.0.0.1:8000"'),
     "listeners.web.bind", "bind", "must be an array of 'host:port' strings"),
    ("missing bind",
     edit('bind = ["127.0.0.1:8000"]\n', ""),
     "listeners.web.bind", "[listeners.web]", "required key is missing"),
    ("backend without an address",
     edit('{ name = "b", address = "127.0.0.1:9002", weight = 3 }', '{ name = "b", weight = 3 }'),
     "pools.blue.backends[1].address", '{ name = "b"', "required key is missing"),
    ("backend that is not a table",
     edit('backends = []', 'backends = ["127.0.0.1:9003"]'),
     "pools.green.backends[0]", '["127.0.0.1:9003"]', "must be a table"),
    ("section that is not a table",
     "global = 5\n",
     "global", "global", "must be a table, got 5"),
    ("name unusable in control commands",
     edit('name = "b"', 'name = "b/c"'),
     "pools.blue.backends[1].name", "b/c", "must be a name"),
    ("pool name unusable in control commands",
     BASE + '[pools."x y"]\n',
     'pools."x y"', '[pools."x y"]', "bad name 'x y'"),
    ("sni route to a pool that does not exist",
     edit('pool = "blue"', 'pool = "blue"\nsni = { "api.test" = "red" }'),
     'listeners.web.sni."api.test"', "sni =", "no pool named 'red'"),
    ("sni pattern that is a bare star",
     edit('pool = "blue"', 'pool = "blue"\nsni = { "*" = "green" }'),
     'listeners.web.sni."*"', "sni =", "matches every name"),
    ("sni pattern with a star inside",
     edit('pool = "blue"', 'pool = "blue"\nsni = { "a.*.test" = "green" }'),
     'listeners.web.sni."a.*.test"', "sni =", "may only be the whole first label"),
    ("sni patterns that are the same name",
     edit('pool = "blue"', 'pool = "blue"\nsni = { "a.test" = "green", "A.Test." = "blue" }'),
     'listeners.web.sni."A.Test."', "sni =", "same name as 'a.test'"),
    ("sni that is not a table",
     edit('pool = "blue"', 'pool = "blue"\nsni = "a.test"'),
     "listeners.web.sni", "sni =", "must be a table of"),
    ("max_client_hello past the parser's limit",
     edit('pool = "blue"', 'pool = "blue"\nmax_client_hello = 65537'),
     "listeners.web.max_client_hello", "max_client_hello", "from 1 to 65536"),
    ("control socket path too long for a Unix socket",
     f'[control]\nsocket = "/{"s" * 120}.sock"\n',
     "control.socket", "socket", "Unix socket paths are limited to 107"),
]


@pytest.mark.parametrize("text, key, line_fragment, message",
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_validation_error_names_key_path_and_line(text, key, line_fragment, message):
    issues = issues_of(text)
    matching = [issue for issue in issues if issue.key == key]
    assert matching, f"no issue for {key}: {issues}"
    issue = matching[0]
    assert issue.file == "conf.toml"
    assert issue.line == line_with(text, line_fragment), issue
    assert message in issue.message
    assert str(issue) == f"conf.toml:{issue.line} {key}: {issue.message}"


def test_every_problem_is_reported_at_once_in_line_order():
    text = edit("weight = 3", "weight = -3")
    text = edit('pool = "blue"', 'pool = "nope"\nretries = 99', text)
    text = edit('algorithm = "rr"', 'algorithm = "fast"\nbogus = 1', text)
    text = edit("max_connections = 100", "max_connections = -5", text)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "conf.toml")
    keys = [issue.key for issue in info.value.issues]
    assert sorted(keys) == sorted([
        "global.max_connections", "listeners.web.pool", "listeners.web.retries",
        "pools.blue.algorithm", "pools.blue.bogus", "pools.blue.backends[1].weight",
    ])
    lines = [issue.line for issue in info.value.issues]
    assert lines == sorted(lines)
    assert str(info.value).splitlines() == [str(issue) for issue in info.value.issues]


def test_toml_syntax_error_reports_the_line_from_tomllib():
    text = "[global]\nmax_connections = 100\nshutdown_timeout = = 3\n"
    [issue] = issues_of(text)
    assert issue.line == 3
    assert issue.key == ""
    assert issue.message.startswith("invalid TOML: ")
    assert str(issue).startswith("conf.toml:3: invalid TOML: ")


def test_toml_syntax_error_at_end_of_file_points_at_the_last_line():
    [issue] = issues_of('[global]\nname = "unterminated\n')
    assert issue.line == 2


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    [issue] = info.value.issues
    assert "cannot read the config file" in issue.message
    assert str(issue).startswith(f"{tmp_path / 'missing.toml'}:1: ")


def test_non_utf8_file_is_a_config_error_at_the_bad_line(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"[log]\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.issues[0].line == 2


# -- values, defaults and paths ----------------------------------------------------------

def test_integers_are_accepted_where_numbers_are_expected():
    config = parse_config(edit('pool = "blue"', 'pool = "blue"\nconnect_timeout = 3'), "conf.toml")
    assert config.listeners["web"].connect_timeout == 3.0
    assert isinstance(config.listeners["web"].connect_timeout, float)


MINIMAL = '[listeners.web]\nbind = ["127.0.0.1:0"]\npool = "p"\n[pools.p]\n'


def test_a_minimal_config_takes_the_defaults_of_every_other_key(tmp_path):
    config = parse_config(MINIMAL, tmp_path / "minimal.toml")
    assert list(config.listeners) == ["web"] and config.pools["p"].backends == []
    assert config.global_.max_connections == 20000
    assert config.log.level == "info" and config.metrics.listen is None
    assert config.control.socket == tmp_path / "l4lb.sock"
    assert config.control.mode == 0o600
    assert config.path == tmp_path / "minimal.toml"


@pytest.mark.parametrize("text", ["", "\n", "# half written\n", "[global]\n",
                                  MINIMAL.split("[listeners.web]")[0] + "[pools.p]\n"],
                         ids=["empty", "newline", "comment", "global only", "pools only"])
def test_a_config_without_listeners_is_refused(tmp_path, text):
    path = tmp_path / "lb.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    [issue] = info.value.issues
    assert issue.key == "listeners" and "at least one [listeners.NAME]" in issue.message


def test_check_refuses_an_empty_config_file(tmp_path):
    path = tmp_path / "lb.toml"
    path.write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "l4lb", "check", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "listeners: at least one [listeners.NAME] table is required" in result.stderr + result.stdout


def test_relative_socket_is_taken_from_the_config_folder_not_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "lb.toml"
    path.write_text('[control]\nsocket = "run/ctl.sock"\n' + MINIMAL)
    assert load_config("etc/lb.toml").control.socket == tmp_path / "etc" / "run" / "ctl.sock"
    absolute = parse_config('[control]\nsocket = "/run/x.sock"\n' + MINIMAL, path)
    assert absolute.control.socket == Path("/run/x.sock")


def test_sni_table_keeps_the_patterns_as_written_with_their_pools():
    config = parse_config(edit('pool = "blue"', 'pool = "blue"\nsni = { "API.test" = "green", '
                               '"*.web.test" = "blue" }\ninspect_timeout = 1.5'), "conf.toml")
    listener = config.listeners["web"]
    assert listener.sni == {"API.test": "green", "*.web.test": "blue"}
    assert (listener.inspect_timeout, listener.max_client_hello) == (1.5, 16384)


def test_cidrs_are_normalized_and_accept_bare_addresses():
    text = edit('pool = "blue"', 'pool = "blue"\nallow = ["10.1.2.3/8", "::1"]\ndeny = ["192.0.2.7"]')
    listener = parse_config(text, "conf.toml").listeners["web"]
    assert listener.allow == ["10.0.0.0/8", "::1/128"]
    assert listener.deny == ["192.0.2.7/32"]


def test_port_zero_binds_may_repeat():
    text = BASE + '\n[listeners.api]\npool = "green"\nbind = ["127.0.0.1:0", "127.0.0.1:0"]\n'
    parse_config(text, "conf.toml")


def test_backends_may_be_written_as_an_array_of_tables():
    text = (
        '[listeners.web]\nbind = ["127.0.0.1:0"]\npool = "p"\n[pools.p]\n'
        '[[pools.p.backends]]\nname = "a"\naddress = "127.0.0.1:1"\n'
        '[[pools.p.backends]]\nname = "b"\naddress = "127.0.0.1:2"\nweight = 20000\n'
    )
    [issue] = issues_of(text)
    assert issue.key == "pools.p.backends[1].weight"
    assert issue.line == line_with(text, "weight")


def _schema_tables(table: Table):
    yield table
    for key in table.keys.values():
        rule = key.rule.table if isinstance(key.rule, TableOf) else key.rule
        rule = getattr(rule, "item", rule)
        if isinstance(rule, Table):
            yield from _schema_tables(rule)


def test_schema_defaults_match_the_dataclass_defaults():
    for table in _schema_tables(SCHEMA):
        fields = {f.name: f for f in dataclasses.fields(table.cls)}
        for name, key in table.keys.items():
            f = fields[key.attribute or name]
            assert key.doc, f"{name} has no doc"
            if key.default is None:
                assert f.default is None, (table.cls, name)
            elif f.default is not dataclasses.MISSING:
                assert key.rule.check(key.default) == f.default, (table.cls, name)
            elif f.default_factory is not dataclasses.MISSING:
                assert key.rule.convert(key.default, (), None) == f.default_factory()


# -- shipped configs ---------------------------------------------------------------------

def test_default_config_validates_and_fronts_the_demo_backends():
    path = default_config_path()
    assert path.name == "default.toml" and path.parent.name == "l4lb"
    assert path.resolve() == (ROOT / "conf" / "l4lb.toml").resolve()
    config = load_config(path)
    [listener] = config.listeners.values()
    assert [str(a) for a in listener.bind] == ["127.0.0.1:8000"]
    [pool] = config.pools.values()
    assert pool.algorithm == "rr"
    assert [str(b.address) for b in pool.backends] == [f"127.0.0.1:{p}" for p in (9001, 9002, 9003)]
    assert config.control.socket.name == "l4lb.sock" and config.control.socket.is_absolute()


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"postgres.toml", "redis.toml", "canary.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_config_validates(path):
    config = load_config(path)
    assert config.listeners and config.pools


# -- addresses -------------------------------------------------------------------------

@pytest.mark.parametrize("text, host, port, family, canonical", [
    ("127.0.0.1:80", "127.0.0.1", 80, socket.AF_INET, "127.0.0.1:80"),
    ("0.0.0.0:0", "0.0.0.0", 0, socket.AF_INET, "0.0.0.0:0"),
    ("[::1]:80", "::1", 80, socket.AF_INET6, "[::1]:80"),
    ("[0:0::1]:65535", "::1", 65535, socket.AF_INET6, "[::1]:65535"),
    ("[::]:8000", "::", 8000, socket.AF_INET6, "[::]:8000"),
    ("[FE80::1%eth0]:22", "fe80::1%eth0", 22, socket.AF_INET6, "[fe80::1%eth0]:22"),
    ("LocalHost:8000", "localhost", 8000, socket.AF_UNSPEC, "localhost:8000"),
    ("db-1.internal_net.example:5432", "db-1.internal_net.example", 5432, socket.AF_UNSPEC,
     "db-1.internal_net.example:5432"),
])
def test_parse_address_round_trips(text, host, port, family, canonical):
    address = parse_address(text, port_zero=True)
    assert (address.host, address.port, address.family) == (host, port, family)
    assert str(address) == canonical
    assert parse_address(str(address), port_zero=True) == address


@pytest.mark.parametrize("text, reason", [
    ("127.0.0.1", "expected host:port"),
    ("::1:80", "needs brackets"),
    ("[::1]80", "expected ':port' after ']'"),
    ("[::1:80", "no ']'"),
    ("[1.2.3.4]:80", "not an IPv6 address"),
    (":80", "the host is empty"),
    ("1.2.3:80", "not an IPv4 address"),
    ("bad host:80", "neither an IP address nor a hostname"),
    ("-x:80", "neither an IP address nor a hostname"),
    ("h:", "the port must be a number"),
    ("h:-1", "the port must be a number"),
    ("h:65536", "the port must be a number"),
    ("h:٣", "the port must be a number"),
    ("h:0", "the port must be a number from 1 to 65535"),
    ("[fe80::1%a b]:80", "not an interface name"),
])
def test_parse_address_says_what_is_wrong(text, reason):
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert reason in str(info.value)
    assert repr(text) in str(info.value)


@given(st.ip_addresses(), st.integers(0, 65535))
def test_address_of_any_ip_round_trips_through_str(ip, port):
    address = parse_address(str(Address(str(ip), port)), port_zero=True)
    assert address == Address(str(ip), port)
    assert address.family == (socket.AF_INET6 if ip.version == 6 else socket.AF_INET)
    assert parse_address(str(address), port_zero=True) == address


@given(st.text(max_size=40))
def test_parse_address_raises_only_value_error_and_round_trips_what_it_accepts(text):
    try:
        address = parse_address(text)
    except ValueError:
        return
    assert parse_address(str(address)) == address


# -- arbitrary input -----------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_raises_nothing_but_config_error(text):
    try:
        parse_config(text, "fuzz.toml")
    except ConfigError as exc:
        assert exc.issues and all(issue.line >= 1 for issue in exc.issues)


_SCHEMA_WORDS = sorted({name for table in _schema_tables(SCHEMA) for name in table.keys}
                       | {"web", "blue", "green", "health", "backends", "rr", "off"})
_printable = st.characters(blacklist_categories=("Cs", "Cc"))   # what json.dumps writes as valid TOML
_keys = st.one_of(st.sampled_from(_SCHEMA_WORDS), st.text(alphabet=_printable, max_size=6))
_toml_scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(), st.booleans(),
    st.sampled_from(["127.0.0.1:8000", "[::1]:1", "10.0.0.0/8", "blue", "rr", "v1", "", "x:y"]),
    st.text(alphabet=_printable, max_size=10),
)
_toml_values = st.recursive(
    _toml_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)),
    max_leaves=25,
)


def write_toml(data: dict) -> tuple[str, dict]:
    """TOML text for `data` (tables as [headers], arrays one element per line) and the
    line every path in it is written on."""
    lines: list[str] = []
    where: dict[tuple, int] = {}

    def key(k: str) -> str:
        return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)

    def inline(value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, float):
            return "nan" if value != value else ("inf" if value == float("inf") else
                                                 "-inf" if value == float("-inf") else repr(value))
        if isinstance(value, str):
            return json.dumps(value, ensure_ascii=False)
        if isinstance(value, list):
            return "[" + ", ".join(inline(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{ " + ", ".join(f"{key(k)} = {inline(v)}" for k, v in value.items()) + " }"
        return str(value)

    def mark_inline(path, value, line):
        where[path] = line
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for k, v in items:
            mark_inline(path + (k,), v, line)

    def table(path, body: dict):
        subtables = {k: v for k, v in body.items() if isinstance(v, dict) and v}
        for k, v in body.items():
            if k in subtables:
                continue
            if isinstance(v, list) and v:
                lines.append(f"{key(k)} = [")
                where[path + (k,)] = len(lines)
                for i, element in enumerate(v):
                    lines.append(f"  {inline(element)},")
                    mark_inline(path + (k, i), element, len(lines))
                lines.append("]")
            else:
                lines.append(f"{key(k)} = {inline(v)}")
                mark_inline(path + (k,), v, len(lines))
        for k, v in subtables.items():
            lines.append("[" + ".".join(key(p) for p in path + (k,)) + "]")
            where[path + (k,)] = len(lines)
            table(path + (k,), v)

    table((), data)
    return "\n".join(lines) + "\n", where


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _toml_values, max_size=6))
def test_schema_shaped_documents_give_a_config_or_config_error(data):
    text, _ = write_toml(data)
    try:
        result = parse_config(text, "fuzz.toml")
    except ConfigError as exc:
        assert exc.issues
    else:
        assert isinstance(result, Config)


# -- the locator -------------------------------------------------------------------------

LOCATOR_TEXT = """\
# comment with [brackets] and { braces } and key = "value"
top = 1

[a.b]
s = "has ] and # and \\" inside"
dotted.key."quoted part" = 'x'
ml = \"\"\"
line one
[not.a.header]
\"\"\"
after_ml = 2
backends = [   # a multi-line array of inline tables
  { name = "one", weight = 1 },

  { name = "two",  weight = 2 },
  [ 1,
    2 ],
]

[[runs]]
n = 1
[[runs]]
n = 2
[runs.detail]
when = 1979-05-27 07:32:00Z
"""


@pytest.mark.parametrize("path, fragment", [
    (("top",), "top = 1"),
    (("a",), "[a.b]"),
    (("a", "b"), "[a.b]"),
    (("a", "b", "s"), "s = "),
    (("a", "b", "dotted"), "dotted.key"),
    (("a", "b", "dotted", "key", "quoted part"), "dotted.key"),
    (("a", "b", "ml"), "ml = "),
    (("a", "b", "after_ml"), "after_ml"),
    (("a", "b", "backends"), "backends = ["),
    (("a", "b", "backends", 0), '{ name = "one"'),
    (("a", "b", "backends", 0, "weight"), '{ name = "one"'),
    (("a", "b", "backends", 1), '{ name = "two"'),
    (("a", "b", "backends", 1, "weight"), '{ name = "two"'),
    (("a", "b", "backends", 2), "[ 1,"),
    (("a", "b", "backends", 2, 1), "2 ],"),
    (("runs",), "[[runs]]"),
    (("runs", 1, "n"), "n = 2"),
    (("runs", 1, "detail", "when"), "when ="),
    # fallbacks: unknown key -> nearest recorded ancestor -> line 1
    (("a", "b", "missing", "deeper"), "[a.b]"),
    (("a", "b", "backends", 7, "name"), "backends = ["),
    (("nowhere",), "# comment"),
    ((), "# comment"),
])
def test_locator_finds_the_line_of_a_key_path(path, fragment):
    tomllib.loads(LOCATOR_TEXT)   # the fixture itself is valid TOML
    assert TomlLocator(LOCATOR_TEXT).line_of(path) == line_with(LOCATOR_TEXT, fragment)


def test_locator_reads_multi_line_inline_tables_of_toml_1_1():
    text = 'backends = [\n  { name = "a",\n    weight = 2 },\n]\n'
    assert TomlLocator(text).line_of(("backends", 0, "weight")) == 3


def test_locator_header_beats_an_earlier_implicit_parent():
    text = "[x.y.z]\nk = 1\n[x.y]\nm = 2\n"
    locator = TomlLocator(text)
    assert locator.line_of(("x", "y")) == 3
    assert locator.line_of(("x",)) == 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_locator_never_raises_on_arbitrary_text(text):
    locator = TomlLocator(text)
    assert locator.line_of(("a", 0, "b")) >= 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_keys, _toml_values, max_size=6))
def test_locator_agrees_with_the_writer_on_every_path(data):
    text, where = write_toml(data)
    tomllib.loads(text)   # the writer wrote valid TOML
    locator = TomlLocator(text)
    for path, line in where.items():
        assert locator.line_of(path) == line, (path, text)


def test_format_path_quotes_keys_that_are_not_bare():
    assert format_path(("pools", "blue", "backends", 1, "weight")) == "pools.blue.backends[1].weight"
    assert format_path(("pools", "a b", "x.y")) == 'pools."a b"."x.y"'


# -- conf/l4lb.toml against the schema ---------------------------------------------------
# The annotated default shows every key of the schema with its default value (commented
# out where the default is "absent"), so deleting a line changes nothing; the exceptions
# are the keys without a default and the few the file sets on purpose, listed here.

DEFAULT_CONFIG = ROOT / "conf" / "l4lb.toml"
# (table, key) -> why the file's value differs from the schema default
ON_PURPOSE = {
    ("pools.NAME", "algorithm"): "the demo's backends are visited in turn: rr",
}
_COMMENTED_KEY = re.compile(r"^#\s*([a-z_]+)\s*=\s*(.+)$")
# A table shown commented out ("# [cluster]": optional, off by default) opens one too.
_HEADER = re.compile(r"^(?:#\s*)?\[([A-Za-z0-9_.]+)\]\s*$")


def _table_at(parts: list[str]) -> str:
    """The generic name ('pools.NAME.health') of the schema table a [header] opens."""
    table = SCHEMA
    while parts:
        rule = table.keys[parts.pop(0)].rule
        if isinstance(rule, TableOf):
            parts.pop(0)
            rule = rule.table
        table = rule
    return _table_name(table)


def _table_name(table: Table) -> str:
    for name, candidate in _named_tables():
        if candidate is table:
            return name
    raise AssertionError(table)


def _named_tables():
    yield "", SCHEMA
    for key, spec in SCHEMA.keys.items():
        rule = spec.rule
        if isinstance(rule, TableOf):
            yield f"{key}.NAME", rule.table
            for sub, subspec in rule.table.keys.items():
                inner = getattr(subspec.rule, "item", subspec.rule)
                if isinstance(inner, Table):
                    yield f"{key}.NAME.{sub}", inner
        else:
            yield key, rule


def shown_keys() -> list[tuple[str, str, object]]:
    """(table name, key, TOML value) of every key conf/l4lb.toml shows, set or commented."""
    text = DEFAULT_CONFIG.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    shown = []
    for key, value in data.items():
        rule = SCHEMA.keys[key].rule if key in SCHEMA.keys else None
        if isinstance(rule, TableOf):
            for body in value.values():
                for sub, subvalue in body.items():
                    inner = rule.table.keys.get(sub)
                    inner = inner and inner.rule
                    if isinstance(getattr(inner, "item", None), Table):      # backends
                        shown.append((f"{key}.NAME", sub, subvalue))
                        for item in subvalue:
                            shown += [(f"{key}.NAME.{sub}", k, v) for k, v in item.items()]
                    elif isinstance(inner, Table):                           # health
                        shown += [(f"{key}.NAME.{sub}", k, v) for k, v in subvalue.items()]
                    else:
                        shown.append((f"{key}.NAME", sub, subvalue))
        elif isinstance(value, dict):
            shown += [(key, k, v) for k, v in value.items()]
        else:
            shown.append(("", key, value))
    table = ""
    for line in text.splitlines():
        if header := _HEADER.match(line):
            table = _table_at(header.group(1).split("."))
        elif commented := _COMMENTED_KEY.match(line):
            try:
                value = tomllib.loads(f"v = {commented.group(2)}")["v"]
            except tomllib.TOMLDecodeError:
                continue                       # prose that happens to hold an '='
            shown.append((table, commented.group(1), value))
    return shown


def test_the_default_config_shows_only_keys_the_schema_has():
    tables = dict(_named_tables())
    for table, key, _ in shown_keys():
        assert key in tables[table].keys, f"conf/l4lb.toml shows {table}.{key}: not in SCHEMA"


# Keys kept in the schema only to refuse or warn about them: the default config names them in
# a comment ("# KEY: deprecated ...") instead of showing a value.
DEPRECATED = {("listeners.NAME", "splice")}


def test_the_default_config_shows_every_key_of_the_schema():
    shown = {(table, key) for table, key, _ in shown_keys()}
    text = DEFAULT_CONFIG.read_text(encoding="utf-8")
    for name, table in _named_tables():
        for key, spec in table.keys.items():
            if isinstance(spec.rule, (Table, TableOf)) or isinstance(getattr(spec.rule, "item", None), Table):
                continue                       # a section: shown by its [header] or array
            if (name, key) in DEPRECATED:
                assert f"# {key}: deprecated" in text, f"conf/l4lb.toml does not say {key} is deprecated"
                assert (name, key) not in shown, f"conf/l4lb.toml still sets deprecated {key}"
                continue
            assert (name, key) in shown, f"conf/l4lb.toml lacks {name}.{key}"


def test_the_default_config_shows_every_key_with_its_default():
    def fail(path, message):
        raise AssertionError(message)

    tables = dict(_named_tables())
    for table, key, value in shown_keys():
        spec = tables[table].keys[key]
        if spec.default in (None, REQUIRED) or (table, key) in ON_PURPOSE:
            continue                           # an example value, or no default to show
        if isinstance(getattr(spec.rule, "item", None), Table):
            continue                           # the backends array: its items are checked
        assert spec.rule.convert(value, (), fail) == spec.rule.convert(spec.default, (), fail), (
            f"conf/l4lb.toml: {table}.{key} = {value!r}, but the default is {spec.default!r}")


def test_the_keys_set_on_purpose_are_still_set_otherwise():
    shown = {(table, key): value for table, key, value in shown_keys()}
    tables = dict(_named_tables())
    for (table, key) in ON_PURPOSE:
        assert shown[(table, key)] != tables[table].keys[key].default


def test_the_packaged_default_is_the_annotated_config():
    assert default_config_path().read_bytes() == DEFAULT_CONFIG.read_bytes()


def test_health_port_and_a_backends_health_address_are_validated_by_the_address_rule():
    base = ('[control]\nsocket = "s"\n[listeners.w]\nbind = ["127.0.0.1:0"]\npool = "p"\n'
            '[pools.p]\nbackends = [ {{ name = "a", address = "127.0.0.1:1"{extra} }} ]\n'
            '[pools.p.health]\nport = {port}\n')
    cfg = parse_config(base.format(extra=', health_address = "[::1]:8080"', port=9000), "x.toml")
    pool = cfg.pools["p"]
    assert pool.health.port == 9000
    assert str(pool.backends[0].health_address) == "[::1]:8080"
    with pytest.raises(ConfigError, match="health_address"):
        parse_config(base.format(extra=', health_address = "::1:8080"', port=0), "x.toml")
    with pytest.raises(ConfigError, match="port"):
        parse_config(base.format(extra="", port=70000), "x.toml")
