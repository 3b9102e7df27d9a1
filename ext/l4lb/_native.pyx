# cython: language_level=3
"""l4lb's compiled hot path: backend selection and the byte relay.

This file only includes the parts; each part opens with its theory of operation.
"""
cdef extern from *:
    """
    #ifndef L4LB_DEBUG
    #define L4LB_DEBUG 0
    #endif
    """
    const bint L4LB_DEBUG

DEBUG_BUILD = L4LB_DEBUG

include "hashing.pxi"
include "algorithm.pxi"
include "roundrobin.pxi"
include "wrr.pxi"
include "leastconn.pxi"
include "lrt.pxi"
include "hash.pxi"
include "p2c.pxi"
include "sni.pxi"
include "relay.pxi"
include "splice.pxi"
