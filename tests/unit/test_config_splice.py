"""The listener key `splice`: the stream relay it chose is gone, so `false` is a config
error and `true` a deprecation warning the caller logs."""
import pytest

from l4lb.config import ConfigError, parse_config

CONFIG = '[listeners.web]\nbind = ["127.0.0.1:1"]\npool = "p"\n{key}[pools.p]\n'


def test_splice_false_is_an_error_that_says_the_stream_relay_was_removed():
    with pytest.raises(ConfigError) as err:
        parse_config(CONFIG.format(key="splice = false\n"), "l4lb.toml")
    assert [str(i) for i in err.value.issues] == [
        "l4lb.toml:4 listeners.web.splice: the uvloop stream relay was removed; "
        "delete this key"]


def test_splice_true_is_accepted_with_a_deprecation_warning_at_its_line():
    config = parse_config(CONFIG.format(key="splice = true\n"), "l4lb.toml")
    assert config.listeners["web"].splice is True
    assert config.warnings == [
        "l4lb.toml:4 listeners.web.splice: deprecated: the raw-socket relay is the only "
        "relay; delete this key"]


def test_a_config_without_the_key_has_no_warning():
    assert parse_config(CONFIG.format(key=""), "l4lb.toml").warnings == []


def test_splice_of_another_type_is_refused():
    with pytest.raises(ConfigError, match="must be true"):
        parse_config(CONFIG.format(key='splice = "yes"\n'), "l4lb.toml")
