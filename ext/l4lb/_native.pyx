# cython: language_level=3
"""l4lb's compiled hot path: backend selection and the byte relay.

This file only includes the parts; each part opens with its theory of operation:
hashing and the algorithms (backend selection), runtime (what the control plane
configures: Target, PoolRuntime, ListenerRuntime, Hub; shared: the table in shared
memory that makes their counters and limits global across workers), pump (bytes of one direction:
copy and splice, the pipe pool), sni (the TLS ClientHello parser, sans-IO), relay (one
client and its backend: the state machine),
poller (the epoll every relay socket is in) and acceptor (accept4 on a listening socket).
"""
cimport cython
from l4lb.includes.system cimport L4LB_DEBUG

# True in a debug build (L4LB_DEBUG=1 at build time): the relay's state transitions are
# checked against their table (relay_set_state) and a bad one raises AssertionError.
DEBUG_BUILD = L4LB_DEBUG

include "hashing.pxi"
include "algorithm.pxi"
include "rr.pxi"
include "wrr.pxi"
include "leastconn.pxi"
include "lrt.pxi"
include "hash.pxi"
include "p2c.pxi"
include "shared.pxi"
include "runtime.pxi"
include "pump.pxi"
include "sni.pxi"
include "relay.pxi"
include "poller.pxi"
include "acceptor.pxi"
