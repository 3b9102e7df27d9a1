"""The shared words and bounds (l4lb.vocab) are the ones the config, the control protocol,
the state file and the logging setup use: one source, no copy to drift."""
import pytest

from l4lb import log, vocab
from l4lb.algorithms import ALGORITHMS, HASH_KEYS
from l4lb.config import SCHEMA
from l4lb.control.protocol import COMMANDS_BY_NAME, ControlError, parse_command
from l4lb.state import RuntimeState

LISTENER = SCHEMA.keys["listeners"].rule.table
POOL = SCHEMA.keys["pools"].rule.table
BACKEND = POOL.keys["backends"].rule.item
HEALTH = POOL.keys["health"].rule


def test_the_config_choices_are_the_vocabulary_and_the_registry():
    assert POOL.keys["algorithm"].rule.words == tuple(ALGORITHMS) == vocab.ALGORITHM_WORDS
    assert POOL.keys["hash_key"].rule.words == HASH_KEYS == vocab.HASH_KEYS
    assert POOL.keys["on_down"].rule.words == vocab.ON_DOWN_WORDS
    assert LISTENER.keys["send_proxy"].rule.words == vocab.SEND_PROXY_WORDS
    assert HEALTH.keys["send_proxy"].rule.words == vocab.SEND_PROXY_WORDS
    assert SCHEMA.keys["log"].rule.keys["level"].rule.words == vocab.LOG_LEVELS
    assert SCHEMA.keys["log"].rule.keys["format"].rule.words == vocab.LOG_FORMATS


def test_the_logging_setup_knows_every_level_the_config_accepts():
    assert set(log.LEVELS) == set(vocab.LOG_LEVELS)


def test_send_proxy_words_map_to_the_relay_codes_in_order():
    assert vocab.SEND_PROXY_CODES == {"off": 0, "v1": 1, "v2": 2}


def test_the_weight_bounds_are_the_same_for_config_control_and_state_file():
    rule = BACKEND.keys["weight"].rule
    assert (rule.low, rule.high) == (vocab.WEIGHT_MIN, vocab.WEIGHT_MAX)
    assert BACKEND.keys["weight"].default == vocab.WEIGHT_DEFAULT
    for name in ("weight", "add"):
        [count] = [a for a in COMMANDS_BY_NAME[name].args if a.key == "weight"]
        assert (count.low, count.high) == (vocab.WEIGHT_MIN, vocab.WEIGHT_MAX)
    assert parse_command(b"add p b h:1").args["weight"] == vocab.WEIGHT_DEFAULT


@pytest.mark.parametrize("weight", [vocab.WEIGHT_MIN, vocab.WEIGHT_MAX, vocab.WEIGHT_MAX + 1,
                                    vocab.WEIGHT_MIN - 1])
def test_config_control_and_state_file_agree_on_a_weight(weight):
    good = vocab.WEIGHT_MIN <= weight <= vocab.WEIGHT_MAX
    assert (BACKEND.keys["weight"].rule.convert(weight, (), lambda *a: None) == weight) == good
    try:
        parse_command(f"weight p/b {weight}".encode())
        control = True
    except ControlError:
        control = False
    assert control == good
    state = RuntimeState.from_dict({"version": 1, "backends": {"p/b": {"weight": weight}}})
    assert ("p/b" in state.backends) == good


@pytest.mark.parametrize("name", ["a", "a.b-c_d", "_x", "9", "x" * 64, "", "-a", ".a", "a b",
                                  "a/b", "a=b", "x" * 65, "é"])
def test_config_control_and_state_file_agree_on_a_name(name):
    good = bool(vocab.NAME_RE.fullmatch(name))
    assert (LISTENER.keys["pool"].rule.convert(name, (), lambda *a: None) == name) == good
    try:
        parse_command(f"switch web {name}".encode())
        control = True
    except ControlError:
        control = False
    assert control == good
    state = RuntimeState.from_dict({"version": 1, "listeners": {"web": {"pool": name}}})
    assert ("web" in state.listeners) == good
