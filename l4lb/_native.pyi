# Typed stubs for l4lb._native, the compiled hot path (ext/l4lb/_native.pyx).
#
# One section per source part, in include order; each section lists what that part makes
# visible to Python, nothing more. tests/unit/test_native_stub.py fails when a public name
# of the module or of one of its classes is missing here, or declared here but gone: when
# a .pxi gains, renames or drops a Python-visible name, edit its section to match.
from asyncio import AbstractEventLoop
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

DEBUG_BUILD: bool  # built with L4LB_DEBUG=1

# --- hashing.pxi -------------------------------------------------------------------------

def hash64(data: bytes | bytearray | memoryview) -> int:
    """FNV-1a 64 then splitmix64's finalizer: the routing hash (twin: reference.hashing)."""

# --- algorithm.pxd / algorithm.pxi: the balancer interface --------------------------------

ALGO_MAX_AVOID: int   # most backends one pick can be told to avoid (32)
ALGO_WEIGHT_MAX: int  # largest weight an algorithm accepts (2^24; not the operator's bound)

class Algorithm:
    name: ClassVar[str]        # the config word ("" on the base class)
    needs_key: ClassVar[bool]  # whether pick() reads the routing key
    @property
    def rng(self) -> int: ...  # the splitmix64 state
    def __init__(self, seed: int = 0) -> None: ...
    def __len__(self) -> int: ...
    def add(self, name: str, weight: int = 1) -> int: ...
    def remove(self, i: int) -> None: ...
    def set_up(self, i: int, up: bool) -> None: ...
    def set_weight(self, i: int, weight: int) -> None: ...
    def set_max_connections(self, i: int, limit: int) -> None: ...
    def conn_opened(self, i: int) -> None: ...
    def conn_closed(self, i: int) -> None: ...
    def observe_rt(self, i: int, seconds: float) -> None: ...
    def pick(self, key: int = 0, avoid: Iterable[int] = ()) -> int: ...
    def bench_pick(self, n: int, key_start: int = 0, churn: bool = False) -> int: ...
    def active_count(self, i: int) -> int: ...
    def rt_ewma(self, i: int) -> float | None: ...
    def is_eligible(self, i: int) -> bool: ...

# --- rr.pxi -------------------------------------------------------------------------------

class RoundRobin(Algorithm):
    name: ClassVar[str]
    needs_key: ClassVar[bool]

# --- wrr.pxi ------------------------------------------------------------------------------

class WeightedRoundRobin(Algorithm):
    name: ClassVar[str]
    needs_key: ClassVar[bool]
    def credit(self, i: int) -> int: ...

# --- leastconn.pxi ------------------------------------------------------------------------

class LeastConn(Algorithm):
    name: ClassVar[str]
    needs_key: ClassVar[bool]
    def check_heap(self) -> None: ...

# --- lrt.pxi ------------------------------------------------------------------------------

class LeastResponseTime(LeastConn):
    name: ClassVar[str]
    needs_key: ClassVar[bool]

# --- hash.pxi -----------------------------------------------------------------------------

MAGLEV_TABLE_SIZE: int

def next_prime(n: int) -> int: ...
def maglev_table_size(current: int, present: int) -> int: ...

class MaglevHash(Algorithm):
    name: ClassVar[str]
    needs_key: ClassVar[bool]
    @property
    def table_size(self) -> int: ...
    @property
    def builds(self) -> int: ...
    def __init__(self, seed: int = 0, min_table_size: int = ...) -> None: ...
    def lookup_table(self) -> list[int]: ...

# --- p2c.pxi ------------------------------------------------------------------------------

class PowerOfTwo(Algorithm):
    name: ClassVar[str]
    needs_key: ClassVar[bool]

# --- runtime.pxd / runtime.pxi: what the control plane owns and the relay reads ----------

HASH_KEY_SRC_IP: int
HASH_KEY_SRC_IP_PORT: int
SWEEP_INTERVAL: float
ACCEPT_PAUSE: float                 # seconds accepting pauses when descriptors run out
OVERLOAD_ERRNOS: frozenset[int]     # errnos that mean "out of descriptors or memory"

def monotonic() -> float: ...
def address_key(host: str | None, port: int | None = None, kind: int = ...) -> int:
    """The routing key of a client address (twin: l4lb.reference.routing.address_key)."""

# The shared backend table (ext/l4lb/shared.pxi): counters and limits of every worker.
SHARED_MAGIC: int
SHARED_VERSION: int
REJECT_WORDS: tuple[str, ...]       # reject reasons with a counter slot, in reasons.py order

class SharedTable:
    @property
    def fd(self) -> int: ...         # the memfd (the table's own descriptor)
    @property
    def rows(self) -> int: ...       # worker rows (plus one hidden retired row)
    @property
    def row(self) -> int: ...        # the row this process writes; -1: reader only
    @property
    def epoch(self) -> int: ...      # count of Target.publish calls
    @property
    def capacities(self) -> dict[str, int]: ...
    def __init__(self, rows: int = 1, backends: int = 4096, listeners: int = 256,
                 pools: int = 1024, sources: int = 65536, fd: int = -1) -> None: ...
    def set_row(self, row: int) -> None: ...
    def alloc_backend(self) -> int: ...
    def alloc_listener(self) -> int: ...
    def alloc_pool(self) -> int: ...
    def row_figures(self, row: int) -> dict[str, int]: ...
    def retire_row(self, row: int) -> None: ...

class SharedSourceLimits:
    """acl.SourceLimits' per-source limits, shared by every worker (one listener)."""
    @property
    def table(self) -> SharedTable: ...
    @property
    def index(self) -> int: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def rate(self) -> float: ...
    @property
    def burst(self) -> float: ...
    @property
    def refill_time(self) -> float: ...
    @property
    def cap(self) -> int: ...
    @property
    def prune_interval(self) -> float: ...
    def __init__(self, table: SharedTable, index: int, max_connections: int = 0,
                 rate: float = 0.0, cap: int | None = None,
                 prune_interval: float = 1.0) -> None: ...
    def configure(self, max_connections: int, rate: float) -> None: ...
    def key_of(self, host: str | None, parsed: Any = None) -> int: ...
    def admit(self, key: int, now: float) -> str | None: ...
    def release(self, key: int) -> None: ...
    def prune(self, now: float) -> int: ...
    def __len__(self) -> int: ...

class Target:
    @property
    def pool(self) -> str: ...
    @property
    def name(self) -> str: ...
    host: Any
    port: Any
    resolved: list[tuple[int, str, int]] | None
    slot: int
    active: int
    total: int
    failed: int
    bytes_in: int
    bytes_out: int
    @property
    def responses(self) -> int: ...              # connections that gave a response time
    @property
    def response_time_average(self) -> float | None: ...   # their EWMA, seconds
    @property
    def connect_time_average(self) -> float | None: ...    # connect times' EWMA, seconds
    @property
    def published(self) -> tuple[bool, int, int]: ...      # (up, weight, max_conns)
    on_connect_failed: Callable[[Target, str], object] | None
    on_idle: Callable[[Target], object] | None
    def __init__(self, pool: str, name: str, host: Any, port: Any, slot: int) -> None: ...
    def attach(self, table: SharedTable, index: int) -> None: ...
    def publish(self, up: bool, weight: int, max_conns: int) -> None: ...
    def connect_failures(self) -> dict[str, int]: ...
    def try_acquire(self, max_conns: int) -> bool: ...
    def release(self) -> int: ...

class PoolRuntime:
    @property
    def name(self) -> str: ...
    algo: Algorithm
    targets: list[Target | None]
    hash_key: int
    needs_key: bool
    queue: deque[Relay]
    retried: int
    queue_timeouts: int
    @property
    def queued(self) -> int: ...     # clients waiting in this pool's queues, all workers
    def __init__(self, name: str, algo: Algorithm, hash_key: int = ...,
                 needs_key: bool = False) -> None: ...
    def add_target(self, target: Target) -> None: ...
    def serve_queue(self) -> None: ...
    def attach(self, table: SharedTable, index: int) -> None: ...

class RouteRuntime:
    """One route of a listener: the default one, or an sni pattern's."""
    @property
    def pattern(self) -> str | None: ...
    pool: PoolRuntime | None
    split_pools: list[PoolRuntime] | None
    split_bounds: list[int] | None
    def __init__(self, pattern: str | None = None) -> None: ...
    def set_split(self, pools: list[PoolRuntime] | None, percents: list[int] | None) -> None: ...

# ListenerRuntime.inspection_counts() keys by outcome number (index 0 unused).
INSPECT_OUTCOME_NAMES: tuple[str | None, ...]

class ListenerRuntime:
    @property
    def name(self) -> str: ...
    hub: Hub
    @property
    def route(self) -> RouteRuntime: ...   # the default route
    sni_routes: Any                  # l4lb.sni.SniRoutes of RouteRuntime, or None
    inspect_timeout: float
    max_client_hello: int
    sticky_split: bool
    connect_timeout: float
    idle_timeout: float
    queue_timeout: float             # seconds a client of this listener may wait queued
    retries: int
    max_connections: int
    @property
    def active(self) -> int: ...
    @property
    def accepted(self) -> int: ...
    @property
    def rejected(self) -> dict[str, int]: ...
    gate: Any
    send_proxy: int
    accept_proxy: bool
    proxy_timeout: float
    rcvbuf: int
    sndbuf: int
    header_hook: Callable[[Relay, bytes], Any] | None
    proxy_encoder: Callable[[int, Any, Any], bytes] | None
    def __init__(self, name: str, hub: Hub) -> None: ...
    def attach(self, table: SharedTable, index: int) -> None: ...
    def inspection_counts(self) -> dict[str, int]: ...
    def count_rejected(self, reason: str) -> None: ...

class Hub:
    loop: AbstractEventLoop
    now: float
    @property
    def active(self) -> int: ...
    @property
    def total(self) -> int: ...
    follow: bool                     # a worker: resync pools from the table before picks
    max_connections: int
    access_log: Callable[[Relay, str], object] | None
    on_overload: Callable[[], object] | None
    splice_poller: Poller | None
    next_id: int
    def __init__(self, loop: AbstractEventLoop) -> None: ...
    def sweep(self) -> None: ...
    def relays(self) -> list[Relay]: ...
    def close_all(self, reason: str = "shutdown") -> None: ...
    def close_target(self, target: Target, reason: str = "killed") -> int: ...
    def attach(self, table: SharedTable) -> None: ...
    def register_pool(self, pool: PoolRuntime) -> None: ...
    def resync(self, pool: PoolRuntime) -> None: ...
    def unregister_pool(self, pool: PoolRuntime) -> None: ...

# --- pump.pxd / pump.pxi: copy and splice, the pipe pool ----------------------------------

def max_pipes(max_connections: int) -> int: ...

# --- sni.pxd / sni.pxi: the TLS ClientHello parser (sans-IO; twin: l4lb/reference/sni.py) --

SNI_NEED_MORE: int
SNI_FOUND: int
SNI_NOT_TLS: int
SNI_TOO_LARGE: int
SNI_MALFORMED: int
SNI_MAX_CLIENT_HELLO: int          # default cap of the bytes looked at
SNI_MAX_CLIENT_HELLO_LIMIT: int    # largest cap allowed (65536)

def parse_client_hello(data: bytes | bytearray | memoryview, max_len: int = ...
                       ) -> tuple[int, int, str | None, tuple[str, ...] | None]:
    """(status, needed, server_name, alpn) of the bytes at the start of a TCP stream."""
def bench_sni_scan(data: bytes | bytearray | memoryview, max_len: int, count: int) -> int:
    """loadtests/bench_sni_parse.py only: the C scan `count` times."""

# --- relay.pxd / relay.pxi: one client connection and its backend connection --------------

SPLICE_HEADER_PEEK: int
RELAY_STATE_NAMES: tuple[str, ...]   # state_name by RELAY_* value

def _relay_walk(states: list[str]) -> str:
    """Tests only: move a fresh relay through `states` by the one state setter."""

class Relay:
    @property
    def id(self) -> int: ...
    @property
    def listener(self) -> ListenerRuntime: ...
    @property
    def pool(self) -> PoolRuntime | None: ...
    @property
    def target(self) -> Target | None: ...
    @property
    def client_host(self) -> str | None: ...
    @property
    def client_port(self) -> Any: ...
    @property
    def bytes_in(self) -> int: ...
    @property
    def bytes_out(self) -> int: ...
    @property
    def started(self) -> float: ...
    @property
    def sni(self) -> str | None: ...             # the ClientHello's server name
    @property
    def alpn(self) -> tuple[str, ...] | None: ...
    @property
    def route(self) -> str | None: ...           # the sni pattern that routed it
    @property
    def response_time(self) -> float | None: ... # first bytes back after the client's
    close_reason: str | None
    local_addr: tuple[str, int] | None
    @property
    def backend_name(self) -> str | None: ...
    @property
    def pool_name(self) -> str | None: ...
    @property
    def state_name(self) -> str: ...
    def close(self, reason: str = "killed") -> None: ...

# --- poller.pxd / poller.pxi: the edge-triggered epoll of the relays ----------------------

class Poller:
    @property
    def pipe_stats(self) -> dict[str, int]: ...

# --- acceptor.pxd / acceptor.pxi: accept4 on a listening socket ---------------------------

class Acceptor:
    @property
    def listener(self) -> ListenerRuntime | None: ...
    @property
    def sockets(self) -> list[Any]: ...
    def __init__(self, sock: Any, listener: ListenerRuntime | None = None) -> None: ...
    def attach(self, listener: ListenerRuntime) -> None: ...
    def close(self) -> None: ...
    def pause(self, seconds: float = ...) -> bool: ...
