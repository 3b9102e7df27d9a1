"""The registry of selection algorithms: config word -> compiled class and reference twin.

One word names each algorithm three times over: the config value (`pools.*.algorithm`),
the module (ext/l4lb/<word>.pxi and l4lb/reference/<word>.py) and the class's own `name`
attribute. The registry is built from that attribute, so the word is written once, in
the class; tests/unit/test_algorithm_registry.py checks that the modules follow.
"""

from . import _native
from .reference.hash import MaglevHash as _MaglevHashTwin
from .reference.leastconn import LeastConn as _LeastConnTwin
from .reference.lrt import LeastResponseTime as _LeastResponseTimeTwin
from .reference.p2c import PowerOfTwo as _PowerOfTwoTwin
from .reference.rr import RoundRobin as _RoundRobinTwin
from .reference.wrr import WeightedRoundRobin as _WeightedRoundRobinTwin

# In the order the config documents the words (rr first): a list derived from this
# registry (config choices, docs) keeps it.
_COMPILED = (_native.RoundRobin, _native.WeightedRoundRobin, _native.LeastConn,
             _native.MaglevHash, _native.LeastResponseTime, _native.PowerOfTwo)
_TWINS = (_RoundRobinTwin, _WeightedRoundRobinTwin, _LeastConnTwin, _MaglevHashTwin,
          _LeastResponseTimeTwin, _PowerOfTwoTwin)

# word -> the compiled class the balancer runs.
ALGORITHMS = {cls.name: cls for cls in _COMPILED}
# word -> the plain-Python reference twin (the executable spec; tests and benchmarks only).
REFERENCES = {cls.name: cls for cls in _TWINS}

# pools.*.hash_key values: what of the client's address the `hash` algorithm routes on.
HASH_KEYS = ("src_ip", "src_ip_port")
HASH_KEY_CODES = {"src_ip": _native.HASH_KEY_SRC_IP, "src_ip_port": _native.HASH_KEY_SRC_IP_PORT}


def create_algorithm(word: str, seed: int = 0):
    """A new compiled algorithm instance for config word `word` (KeyError if unknown).

    The instance answers `needs_key` (class attribute): whether its picks read the
    client's routing key, so the pool computes one only then.
    """
    return ALGORITHMS[word](seed)


def routing_key(hash_key: str, host: str, port: int = 0) -> int:
    """The 64-bit routing key of a client address for `pick(key)`: the relay's own
    function (hash64 of the packed address, IPv4-mapped IPv6 taken as IPv4, then the port
    as two big-endian bytes for "src_ip_port"; twin: l4lb.reference.routing).
    ValueError for an unknown hash_key."""
    if hash_key not in HASH_KEY_CODES:
        raise ValueError(f"hash_key must be one of {', '.join(HASH_KEYS)}, not {hash_key!r}")
    return _native.address_key(host, port, HASH_KEY_CODES[hash_key])
