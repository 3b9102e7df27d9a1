"""One address rule for every entry point (l4lb.address): the config file, the control
socket's `add`, the state file's added backends and `l4lb deploy` give the same verdict
on the same backend address, and the same canonical form when they accept it."""
import pytest

from l4lb.address import Address, parse_address
from l4lb.config import ConfigError, parse_config
from l4lb.control.protocol import ControlError, parse_command
from l4lb.deploy import split_host_port
from l4lb.state import RuntimeState

GOOD = [
    ("127.0.0.1:80", "127.0.0.1:80"),
    ("0.0.0.0:65535", "0.0.0.0:65535"),
    ("[::1]:9001", "[::1]:9001"),
    ("[2001:DB8:0:0::1]:443", "[2001:db8::1]:443"),
    ("[fe80::1%eth0]:22", "[fe80::1%eth0]:22"),
    ("my_svc:80", "my_svc:80"),                      # refused by the control socket before
    ("db-1.Example.com:5432", "db-1.example.com:5432"),
    ("host.example.:443", "host.example.:443"),
    ("1-2.example:1", "1-2.example:1"),
]
BAD = [
    "my_svc:0",                                      # accepted by the config before
    "127.0.0.1:0",
    "127.0.0.1",
    "::1:80",
    "[::1]80",
    "[::g]:80",
    "[fe80::1%e/0]:80",
    "1.2.3.256:80",
    "01.2.3.4:80",
    "1.2.3:80",
    "h:65536",
    "h:http",
    "h:+80",
    "h:٣",
    ":80",
    "-x:80",
    "x-:80",
    "a..b:80",
    "bad!host:80",
    "a" * 64 + ".example:80",
]


def via_config(text: str) -> str:
    config = parse_config(
        f'[listeners.web]\nbind = ["127.0.0.1:0"]\npool = "p"\n'
        f'[pools.p]\nbackends = [{{ name = "b", address = "{text}" }}]\n', "conf.toml")
    return str(config.pools["p"].backends[0].address)


def via_control(text: str) -> str:
    host, port = parse_command(f"add p b {text}".encode()).args["address"]
    return str(Address(host, port))


def via_state_file(text: str) -> str:
    state = RuntimeState.from_dict({"version": 1, "added": {"p/b": {"address": text}}})
    if "p/b" not in state.added:
        [issue] = state.issues
        raise ValueError(issue.message)
    return state.added["p/b"]["address"]


def via_deploy(text: str) -> str:
    return str(Address(*split_host_port(text)))


ENTRY_POINTS = {"config backend": via_config, "control add": via_control,
                "state file added": via_state_file, "deploy": via_deploy}
REFUSALS = (ConfigError, ControlError, ValueError)


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=list(ENTRY_POINTS))
@pytest.mark.parametrize("text, canonical", GOOD, ids=[g for g, _ in GOOD])
def test_every_entry_point_accepts_a_good_backend_address_in_the_same_form(entry, text, canonical):
    assert ENTRY_POINTS[entry](text) == canonical


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=list(ENTRY_POINTS))
@pytest.mark.parametrize("text", BAD)
def test_every_entry_point_refuses_a_bad_backend_address(entry, text):
    with pytest.raises(REFUSALS):
        ENTRY_POINTS[entry](text)


def test_a_listener_may_bind_port_zero_but_a_backend_may_not():
    config = parse_config('[listeners.web]\nbind = ["127.0.0.1:0", "[::1]:0"]\npool = "p"\n'
                          '[pools.p]\n', "conf.toml")
    assert [a.port for a in config.listeners["web"].bind] == [0, 0]
    assert parse_address("127.0.0.1:0", port_zero=True).port == 0
    with pytest.raises(ValueError, match="from 1 to 65535"):
        parse_address("127.0.0.1:0")


def test_an_error_about_a_huge_address_quotes_only_a_piece_of_it():
    with pytest.raises(ValueError) as info:
        parse_address("a" * 10_000 + ":80")
    assert len(str(info.value)) < 200
