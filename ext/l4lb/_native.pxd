# Declarations of every cdef class in l4lb._native, one part per file.
include "algorithm.pxd"
include "sni.pxd"
include "relay.pxd"
include "splice.pxd"
