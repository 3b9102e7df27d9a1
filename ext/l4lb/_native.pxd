# Declarations of every cdef class and shared C type of l4lb._native, one part per file
# (C declarations from the system: includes/system.pxd).
include "algorithm.pxd"
include "shared.pxd"
include "runtime.pxd"
include "pump.pxd"
include "sni.pxd"
include "relay.pxd"
include "poller.pxd"
include "acceptor.pxd"
