"""The registry of selection algorithms: config word -> compiled class and reference twin.

The config word (`pools.*.algorithm`), the module of the twin and the class are one name.
"""
from . import _native
from .reference.roundrobin import RoundRobin as RoundRobinReference

# word: (compiled class used by the balancer, plain-Python reference twin used by tests)
ALGORITHMS = {
    "rr": (_native.RoundRobin, RoundRobinReference),
}


def create_algorithm(word: str, seed: int = 0):
    """A new compiled algorithm instance for config word `word` (KeyError if unknown)."""
    return ALGORITHMS[word][0](seed)
