"""The registry of selection algorithms: config word -> compiled class and reference twin.

The config word (`pools.*.algorithm`), the module of the twin and the class are one name.
"""

from . import _native
from .reference.hash import MaglevHash as MaglevHashReference
from .reference.leastconn import LeastConn as LeastConnReference
from .reference.lrt import LeastResponseTime as LeastResponseTimeReference
from .reference.p2c import PowerOfTwo as PowerOfTwoReference
from .reference.roundrobin import RoundRobin as RoundRobinReference
from .reference.wrr import WeightedRoundRobin as WeightedRoundRobinReference

# word: (compiled class used by the balancer, plain-Python reference twin used by tests)
ALGORITHMS = {
    "rr": (_native.RoundRobin, RoundRobinReference),
    "wrr": (_native.WeightedRoundRobin, WeightedRoundRobinReference),
    "leastconn": (_native.LeastConn, LeastConnReference),
    "hash": (_native.MaglevHash, MaglevHashReference),
    "lrt": (_native.LeastResponseTime, LeastResponseTimeReference),
    "p2c": (_native.PowerOfTwo, PowerOfTwoReference),
}

# pools.*.hash_key values: what of the client's address the `hash` algorithm routes on.
HASH_KEYS = ("src_ip", "src_ip_port")
HASH_KEY_CODES = {"src_ip": _native.HASH_KEY_SRC_IP, "src_ip_port": _native.HASH_KEY_SRC_IP_PORT}


def create_algorithm(word: str, seed: int = 0):
    """A new compiled algorithm instance for config word `word` (KeyError if unknown)."""
    return ALGORITHMS[word][0](seed)


def routing_key(hash_key: str, host: str, port: int = 0) -> int:
    """The 64-bit routing key of a client address for `pick(key)`: the relay's own
    function (hash64 of the packed address, IPv4-mapped IPv6 taken as IPv4, then the port
    as two big-endian bytes for "src_ip_port"). ValueError for an unknown hash_key."""
    if hash_key not in HASH_KEY_CODES:
        raise ValueError(f"hash_key must be one of {', '.join(HASH_KEYS)}, not {hash_key!r}")
    return _native.address_key(host, port, HASH_KEY_CODES[hash_key])
