"""The registry: one word per algorithm, the same as config value, module and class `name`."""
from pathlib import Path

import pytest

from l4lb import algorithms
from l4lb.algorithms import ALGORITHMS, REFERENCES, create_algorithm

pytestmark = pytest.mark.timeout(30)
EXT = Path(__file__).resolve().parents[2] / "ext" / "l4lb"
WORDS = ("rr", "wrr", "leastconn", "hash", "lrt", "p2c")


def test_the_registry_lists_the_six_config_words_in_config_order():
    assert tuple(ALGORITHMS) == tuple(REFERENCES) == WORDS


@pytest.mark.parametrize("word", WORDS)
def test_the_config_word_is_the_class_name_attribute_and_both_module_names(word):
    compiled, twin = ALGORITHMS[word], REFERENCES[word]
    assert compiled.name == twin.name == word
    assert twin.__module__ == f"l4lb.reference.{word}"
    source = (EXT / f"{word}.pxi").read_text()
    assert f"cdef class {compiled.__name__}(" in source
    assert f'include "{word}.pxi"' in (EXT / "_native.pyx").read_text()


@pytest.mark.parametrize("word", WORDS)
def test_only_hash_needs_the_client_key_in_the_class_and_its_twin(word):
    compiled, twin = ALGORITHMS[word], REFERENCES[word]
    assert compiled.needs_key is twin.needs_key is (word == "hash")
    assert create_algorithm(word).needs_key is (word == "hash")


def test_an_unknown_word_is_a_key_error():
    with pytest.raises(KeyError):
        algorithms.create_algorithm("roundrobin")
