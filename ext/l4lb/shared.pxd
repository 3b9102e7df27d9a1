# The shared backend table (shared.pxi): one memfd every process of the balancer maps,
# holding the records whose counters the relay bumps, so that limits, leastconn and the
# figures the operator sees are global across workers. Each record is a global part
# (atomics and master-written fields, one cache line) followed by one part per row
# (a worker's single-writer counters, padded to whole cache lines) and the "retired" row.
from libc.stdint cimport int64_t, uint64_t

cdef enum:
    SHARED_LINE = 64                # every record and row part is a multiple of this
    SHARED_STRIPES = 64             # robust mutexes of the per-source region
    # Reject reasons with a counter slot of their own in a listener row (the reasons.py
    # words of kind "reject", indexed once at import); any other word is counted in a
    # per-process dict.
    SHARED_REJECT_SLOTS = 24
    SHARED_INSPECT_SLOTS = 8        # >= INSPECT_OUTCOMES (runtime.pxd)

cdef struct backend_glob:
    int64_t active                  # atomic: relays holding a slot of it, all workers
    int64_t up                      # master-written (Target.publish): 1 while up
    int64_t weight                  # master-written: the effective weight
    int64_t max_conns               # master-written: 0 = unlimited
    int64_t pad[4]

cdef struct backend_row:
    int64_t active                  # this row's share of backend_glob.active
    int64_t total                   # connections that reached the backend
    int64_t failed                  # connect failures and connect timeouts
    int64_t connect_refused         # failed, by kind (passive health polls these)
    int64_t connect_timeout
    int64_t connect_error
    int64_t bytes_in                # client -> backend
    int64_t bytes_out               # backend -> client
    int64_t responses               # connections that gave a response time
    double resp_ewma                # their EWMA (seconds); < 0 before the first
    int64_t connects                # connects that completed (timed)
    double connect_ewma             # their connect time's EWMA (seconds); < 0 before
    int64_t pad[4]

cdef struct listener_glob:
    int64_t active                  # atomic: relays of this listener not yet closed
    int64_t pad[7]

cdef struct listener_row:
    int64_t active                  # this row's share of listener_glob.active
    int64_t accepted                # connections accepted and admitted
    int64_t rejected[SHARED_REJECT_SLOTS]   # refused, by reject reason slot
    int64_t inspected[SHARED_INSPECT_SLOTS] # ClientHello inspections, by outcome
    int64_t pad[6]

cdef struct pool_row:
    int64_t retried                 # connects tried again on another backend
    int64_t queue_timeouts          # queued clients closed by their queue_timeout
    int64_t queued                  # this row's queue length (a gauge)
    int64_t pad[5]

cdef struct hub_glob:
    int64_t active                  # atomic: relays not yet closed, all listeners
    int64_t pad[7]

cdef struct hub_row:
    int64_t active                  # this row's share of hub_glob.active
    int64_t total                   # relays ever admitted
    int64_t pad[6]

cdef struct shared_header:
    uint64_t magic                  # SHARED_MAGIC
    uint64_t version                # SHARED_VERSION: the layout below
    int64_t rows                    # worker rows (the retired row is rows)
    int64_t backends                # capacities
    int64_t listeners
    int64_t pools
    int64_t sources                 # per-source entries (a multiple of SHARED_STRIPES)
    int64_t size                    # bytes mapped
    int64_t epoch                   # atomic: Target.publish count
    int64_t n_backends              # records allocated (master only writes)
    int64_t n_listeners
    int64_t n_pools
    int64_t pad[4]

cdef struct source_meta:
    int64_t count                   # atomic: entries of this listener
    double next_prune               # clock time of the next prune pass (CAS winner prunes)
    double rate                     # the limit's rate (retire_row deletes as release does)
    int64_t pad[5]

cdef struct source_entry:
    int64_t owner                   # listener index + 1; 0 = an empty slot
    uint64_t key                    # the client's address key (HASH_KEY_SRC_IP)
    int64_t active                  # connections open now, all rows
    double tokens                   # bucket level as of stamp
    double stamp                    # clock time of the last attempt
    int64_t row_active[1]           # rows + 1 entries: each row's share of active


cdef class SharedTable:
    cdef readonly int fd              # the memfd (owned)
    cdef readonly int rows            # worker rows; row `rows` is the retired row
    cdef readonly int row             # the row this process writes, -1: reader only
    cdef char* base                   # the mapping
    cdef Py_ssize_t size              # its length
    cdef shared_header* hdr
    cdef Py_ssize_t hub_off, backend_off, listener_off, pool_off
    cdef Py_ssize_t meta_off, stripe_off, entry_off
    cdef Py_ssize_t backend_size, listener_size, pool_size, hub_size, entry_size
    cdef int per_stripe               # source entries per stripe

    cdef layout(self, int64_t rows, int64_t backends, int64_t listeners, int64_t pools,
                int64_t sources)
    cdef map(self, int fd)
    cdef int64_t alloc_index(self, int64_t* count, int64_t cap, str what) except -1
    cdef backend_row* backend_rows(self, int64_t i) noexcept
    cdef listener_row* listener_rows(self, int64_t i) noexcept
    cdef pool_row* pool_rows(self, int64_t i) noexcept
    cdef retire_sources(self, int row)
    cdef char* record(self, Py_ssize_t off, Py_ssize_t size, int64_t index,
                      int64_t cap, str what) except NULL
    cdef int write_row(self) noexcept
    cdef source_entry* entry(self, int stripe, int i) noexcept
