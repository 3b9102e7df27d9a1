# The shared backend table: the counters and limits every worker of a balancer shares.
#
# Theory of operation (DESIGN.md §9, issue 15):
# - The master creates one SharedTable (a memfd, mapped MAP_SHARED) before it starts the
#   workers and passes them its descriptor; each worker maps it (SharedTable(fd=...)),
#   calls set_row(its row) and attaches its Targets, ListenerRuntimes, PoolRuntimes and
#   its Hub to the records the master allocated. From then on the relay bumps counters
#   in the table instead of in the objects. Without a table (one process, unit tests)
#   each object keeps a private record of one row, laid out the same way.
# - A record is a global part (one cache line: the atomics a limit is checked against,
#   and the fields the master writes) and rows + 1 row parts (whole cache lines each, so
#   two workers never write one line): row w is worker w's single-writer counters
#   (relaxed stores, relaxed loads by readers, who sum the rows); row `rows` is the
#   retired row, where retire_row moves the cumulative counters of a worker that exited.
# - Limits are exact across processes: an active count is taken with a CAS loop while
#   it is below its limit (shared_take) and given back with an atomic decrement. Each
#   row also keeps its own share of every active count, so that retire_row can take a
#   dead worker's share out of the globals.
# - Per-source limits (SharedSourceLimits, the twin of l4lb.acl.SourceLimits): one
#   region of entries keyed by (listener index, address key), split into SHARED_STRIPES
#   stripes, each a linear-probing table under its own process-shared ROBUST mutex: a
#   worker killed inside one (kill -9) leaves it to the next locker as EOWNERDEAD, which
#   marks it consistent and goes on, so no worker can deadlock the others.
# - Records are allocated by the master only and never freed in this layout version: a
#   removed backend's record stays (its counters are still summed by nobody).
from libc.errno cimport errno
from libc.stdlib cimport calloc, free
from libc.string cimport memset, memcpy
from l4lb.includes.system cimport (mmap, munmap, memfd_create, PROT_READ, PROT_WRITE,
                                   MAP_SHARED, MAP_FAILED, stat_t, c_fstat, ftruncate,
                                   c_close, c_dup, pthread_mutex_t)
import os as _os

cdef extern from *:
    """
    #include <pthread.h>
    #include <errno.h>
    /* Counters: a row is written by one process only, so a relaxed load and store is
       enough (no lock prefix); readers load relaxed. Limits use CAS (l4lb_take). */
    static inline int64_t l4lb_ld(const int64_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline void l4lb_st(int64_t* p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline void l4lb_bump(int64_t* p, int64_t v) {
        __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
    }
    static inline double l4lb_ldd(const double* p) {
        double v; __atomic_load(p, &v, __ATOMIC_RELAXED); return v;
    }
    static inline void l4lb_std(double* p, double v) { __atomic_store(p, &v, __ATOMIC_RELAXED); }
    static inline int64_t l4lb_add(int64_t* p, int64_t v) {
        return __atomic_add_fetch(p, v, __ATOMIC_ACQ_REL);
    }
    static inline int64_t l4lb_ld_acq(const int64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    /* Take one unit of *p while it is below limit (0 = unlimited): 1 taken, 0 full. */
    static inline int l4lb_take(int64_t* p, int64_t limit) {
        int64_t cur = __atomic_load_n(p, __ATOMIC_RELAXED);
        do {
            if (limit > 0 && cur >= limit) return 0;
        } while (!__atomic_compare_exchange_n(p, &cur, cur + 1, 1, __ATOMIC_ACQ_REL,
                                              __ATOMIC_RELAXED));
        return 1;
    }
    static inline int l4lb_cas_double(double* p, double expect, double want) {
        return __atomic_compare_exchange(p, &expect, &want, 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_RELAXED);
    }
    static int l4lb_mutex_init(void* m) {
        pthread_mutexattr_t a;
        int rc = pthread_mutexattr_init(&a);
        if (rc) return rc;
        rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
        if (!rc) rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
        if (!rc) rc = pthread_mutex_init((pthread_mutex_t*)m, &a);
        pthread_mutexattr_destroy(&a);
        return rc;
    }
    /* Lock; a holder that died leaves EOWNERDEAD: its critical sections only ever leave
       whole entries behind, so the state is usable and the mutex is made consistent. */
    static int l4lb_mutex_lock(void* m) {
        int rc = pthread_mutex_lock((pthread_mutex_t*)m);
        if (rc == EOWNERDEAD) rc = pthread_mutex_consistent((pthread_mutex_t*)m);
        return rc;
    }
    static void l4lb_mutex_unlock(void* m) { pthread_mutex_unlock((pthread_mutex_t*)m); }
    static size_t l4lb_mutex_size(void) { return sizeof(pthread_mutex_t); }
    """
    int64_t shared_ld "l4lb_ld" (const int64_t* p) noexcept nogil
    void shared_st "l4lb_st" (int64_t* p, int64_t v) noexcept nogil
    void shared_bump "l4lb_bump" (int64_t* p, int64_t v) noexcept nogil
    double shared_ldd "l4lb_ldd" (const double* p) noexcept nogil
    void shared_std "l4lb_std" (double* p, double v) noexcept nogil
    int64_t shared_add "l4lb_add" (int64_t* p, int64_t v) noexcept nogil
    int64_t shared_ld_acq "l4lb_ld_acq" (const int64_t* p) noexcept nogil
    bint shared_take "l4lb_take" (int64_t* p, int64_t limit) noexcept nogil
    bint shared_cas_double "l4lb_cas_double" (double* p, double expect, double want) noexcept nogil
    int shared_mutex_init "l4lb_mutex_init" (void* m) noexcept nogil
    int shared_mutex_lock "l4lb_mutex_lock" (void* m) noexcept nogil
    void shared_mutex_unlock "l4lb_mutex_unlock" (void* m) noexcept nogil
    size_t shared_mutex_size "l4lb_mutex_size" () noexcept nogil

# "l4lbshm" + the layout's first version: what a worker checks before trusting a memfd.
SHARED_MAGIC = 0x6c346c6273686d01
SHARED_VERSION = 1

# The reject reasons with a counter slot in a listener row: l4lb.reasons' words of kind
# "reject", in its order (one table, so the slots follow it).
from l4lb.reasons import REASONS as _REASONS
REJECT_WORDS = tuple(r.word for r in _REASONS if "reject" in r.kinds)[:SHARED_REJECT_SLOTS]
cdef dict REJECT_SLOT = {word: i for i, word in enumerate(REJECT_WORDS)}


cdef inline Py_ssize_t shared_round(Py_ssize_t n) noexcept:
    return (n + SHARED_LINE - 1) // SHARED_LINE * SHARED_LINE


cdef inline void backend_row_reset(backend_row* r) noexcept:
    memset(r, 0, sizeof(backend_row))
    r.resp_ewma = -1.0
    r.connect_ewma = -1.0


cdef class SharedTable:
    """One table in shared memory that every process of a balancer maps (see the top of
    shared.pxi). SharedTable(rows, backends, listeners, pools, sources) creates it (a
    memfd); SharedTable(fd=N) maps the table behind an existing memfd (a worker) and
    reads the capacities from its header: ValueError naming what is wrong when N is no
    such table. The table keeps its own dup of N. Records are allocated by the master
    (alloc_*) and never freed in this layout version."""

    def __cinit__(self, int rows=1, int backends=4096, int listeners=256, int pools=1024,
                  int sources=65536, int fd=-1):
        cdef stat_t st
        cdef int own
        cdef void* p
        cdef int i
        cdef shared_header h
        self.fd = -1
        self.base = NULL
        self.row = -1
        if fd < 0:
            if rows < 1 or backends < 0 or listeners < 0 or pools < 0 or sources < 0:
                raise ValueError("shared table: rows must be >= 1 and capacities >= 0")
            sources = max(SHARED_STRIPES, (sources + SHARED_STRIPES - 1)
                          // SHARED_STRIPES * SHARED_STRIPES)
            self.layout(rows, backends, listeners, pools, sources)
            own = memfd_create(b"l4lb-shared", 0)
            if own < 0:
                raise OSError(errno, _os.strerror(errno), "memfd_create")
            if ftruncate(own, self.size) < 0:
                c_close(own)
                raise OSError(errno, _os.strerror(errno), "ftruncate of the shared table")
            self.map(own)
            self.hdr.rows = rows
            self.hdr.backends = backends
            self.hdr.listeners = listeners
            self.hdr.pools = pools
            self.hdr.sources = sources
            self.hdr.size = self.size
            self.hdr.version = SHARED_VERSION
            for i in range(SHARED_STRIPES):
                if shared_mutex_init(self.base + self.stripe_off + i * SHARED_LINE) != 0:
                    raise OSError("pthread_mutex_init failed for the shared table")
            self.hdr.magic = SHARED_MAGIC         # last: a complete header
            return
        if c_fstat(fd, &st) < 0:
            raise ValueError(f"shared table fd {fd}: not an open descriptor "
                             f"({_os.strerror(errno)})")
        if st.st_size < <long>sizeof(shared_header):
            raise ValueError(f"shared table fd {fd}: {st.st_size} bytes, too small for "
                             "the table's header")
        p = mmap(NULL, sizeof(shared_header), PROT_READ, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            raise ValueError(f"shared table fd {fd}: cannot be mapped "
                             f"({_os.strerror(errno)})")
        h = (<shared_header*>p)[0]
        munmap(p, sizeof(shared_header))
        if h.magic != SHARED_MAGIC:
            raise ValueError(f"shared table fd {fd}: bad magic {h.magic:#x} "
                             f"(expected {SHARED_MAGIC:#x}): not an l4lb shared table")
        if h.version != SHARED_VERSION:
            raise ValueError(f"shared table fd {fd}: layout version {h.version}, this "
                             f"l4lb reads version {SHARED_VERSION}")
        if (h.rows < 1 or h.backends < 0 or h.listeners < 0 or h.pools < 0
                or h.sources < SHARED_STRIPES or h.sources % SHARED_STRIPES):
            raise ValueError(f"shared table fd {fd}: bad capacities in its header")
        self.layout(h.rows, h.backends, h.listeners, h.pools, h.sources)
        if h.size != self.size or st.st_size != self.size:
            raise ValueError(f"shared table fd {fd}: {st.st_size} bytes, header says "
                             f"{h.size}, its capacities need {self.size}")
        own = c_dup(fd)
        if own < 0:
            raise OSError(errno, _os.strerror(errno), "dup of the shared table fd")
        self.map(own)

    cdef layout(self, int64_t rows, int64_t backends, int64_t listeners, int64_t pools,
                int64_t sources):
        if (sizeof(backend_row) % SHARED_LINE or sizeof(listener_row) % SHARED_LINE
                or sizeof(shared_header) % SHARED_LINE or shared_mutex_size() > SHARED_LINE
                or SHARED_INSPECT_SLOTS < INSPECT_OUTCOMES):
            raise SystemError("shared table: a record is not a whole number of lines")
        self.rows = rows
        self.hub_off = sizeof(shared_header)
        self.hub_size = SHARED_LINE + (rows + 1) * sizeof(hub_row)
        self.backend_off = self.hub_off + self.hub_size
        self.backend_size = SHARED_LINE + (rows + 1) * sizeof(backend_row)
        self.listener_off = self.backend_off + backends * self.backend_size
        self.listener_size = SHARED_LINE + (rows + 1) * sizeof(listener_row)
        self.pool_off = self.listener_off + listeners * self.listener_size
        self.pool_size = SHARED_LINE + (rows + 1) * sizeof(pool_row)
        self.meta_off = self.pool_off + pools * self.pool_size
        self.stripe_off = self.meta_off + listeners * sizeof(source_meta)
        self.entry_off = self.stripe_off + SHARED_STRIPES * SHARED_LINE
        self.entry_size = shared_round(sizeof(source_entry) + rows * sizeof(int64_t))
        self.per_stripe = sources // SHARED_STRIPES
        self.size = self.entry_off + sources * self.entry_size

    cdef map(self, int fd):
        cdef void* p = mmap(NULL, self.size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        if p == MAP_FAILED:
            c_close(fd)
            raise OSError(errno, _os.strerror(errno), "mmap of the shared table")
        self.fd = fd
        self.base = <char*>p
        self.hdr = <shared_header*>p

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
        if self.fd >= 0:
            c_close(self.fd)

    cdef char* record(self, Py_ssize_t off, Py_ssize_t size, int64_t index, int64_t cap,
                      str what) except NULL:
        if index < 0 or index >= cap:
            raise IndexError(f"shared table: no {what} record {index} (capacity {cap})")
        return self.base + off + index * size

    cdef int write_row(self) noexcept:
        """The row this process writes: its worker row, or the retired row for a reader
        (the master's stray counts, if it ever relays, are kept there)."""
        return self.row if self.row >= 0 else self.rows

    cdef source_entry* entry(self, int stripe, int i) noexcept:
        return <source_entry*>(self.base + self.entry_off
                               + (stripe * self.per_stripe + i) * self.entry_size)

    def set_row(self, int row):
        """This process (a worker) writes its single-writer counters to `row`. Call it
        before attaching any object: attach() binds the object to the row current then."""
        if row < 0 or row >= self.rows:
            raise ValueError(f"shared table: no row {row} (rows 0..{self.rows - 1})")
        self.row = row

    @property
    def epoch(self):
        """How many times the master published a backend's (up, weight, max_conns)."""
        return shared_ld_acq(&self.hdr.epoch)

    @property
    def capacities(self):
        return {"backends": self.hdr.backends, "listeners": self.hdr.listeners,
                "pools": self.hdr.pools, "sources": self.hdr.sources}

    cdef int64_t alloc_index(self, int64_t* count, int64_t cap, str what) except -1:
        cdef int64_t n = count[0]
        if n >= cap:
            raise IndexError(f"shared table full: {cap} {what}")
        count[0] = n + 1
        return n

    def alloc_backend(self):
        """A fresh backend record's index (master only; never freed in this version).
        IndexError when the table is full."""
        cdef int64_t n = self.alloc_index(&self.hdr.n_backends, self.hdr.backends, "backends")
        cdef char* rec = self.record(self.backend_off, self.backend_size, n,
                                     self.hdr.backends, "backend")
        cdef int i
        memset(rec, 0, self.backend_size)
        for i in range(self.rows + 1):
            backend_row_reset(<backend_row*>(rec + SHARED_LINE) + i)
        return n

    def alloc_listener(self):
        """A fresh listener record's index (master only; never freed in this version)."""
        cdef int64_t n = self.alloc_index(&self.hdr.n_listeners, self.hdr.listeners, "listeners")
        memset(self.record(self.listener_off, self.listener_size, n, self.hdr.listeners,
                           "listener"), 0, self.listener_size)
        memset(self.base + self.meta_off + n * sizeof(source_meta), 0, sizeof(source_meta))
        return n

    def alloc_pool(self):
        """A fresh pool record's index (master only; never freed in this version)."""
        cdef int64_t n = self.alloc_index(&self.hdr.n_pools, self.hdr.pools, "pools")
        memset(self.record(self.pool_off, self.pool_size, n, self.hdr.pools, "pool"), 0,
               self.pool_size)
        return n

    cdef backend_row* backend_rows(self, int64_t i) noexcept:
        return <backend_row*>(self.base + self.backend_off + i * self.backend_size
                              + SHARED_LINE)

    cdef listener_row* listener_rows(self, int64_t i) noexcept:
        return <listener_row*>(self.base + self.listener_off + i * self.listener_size
                               + SHARED_LINE)

    cdef pool_row* pool_rows(self, int64_t i) noexcept:
        return <pool_row*>(self.base + self.pool_off + i * self.pool_size + SHARED_LINE)

    def row_figures(self, int row):
        """{"active", "accepted"} of worker `row`: its relays open now (the hub's row)
        and the connections its listeners admitted."""
        cdef int64_t i, accepted = 0
        if row < 0 or row > self.rows:
            raise ValueError(f"shared table: no row {row}")
        for i in range(self.hdr.n_listeners):
            accepted += shared_ld(&self.listener_rows(i)[row].accepted)
        return {"active": shared_ld(&(<hub_row*>(self.base + self.hub_off
                                                 + SHARED_LINE))[row].active),
                "accepted": accepted}

    def retire_row(self, int row):
        """Worker `row` died or exited (master only): take its share out of every
        global active count (hub, listeners, backends, per-source entries), zero its
        queue gauges, move its cumulative counters into the retired row and zero the row.
        Afterwards every figure is as if its connections had closed; totals are added to
        the retired row before the row is zeroed, so no total ever goes down."""
        cdef int64_t i
        cdef int k
        cdef backend_glob* bg
        cdef backend_row* br
        cdef backend_row* bz
        cdef listener_row* lr
        cdef listener_row* lz
        cdef pool_row* pr
        cdef pool_row* pz
        cdef hub_row* hr
        cdef hub_row* hz
        cdef int64_t n, m
        if row < 0 or row >= self.rows:
            raise ValueError(f"shared table: no worker row {row}")
        for i in range(self.hdr.n_backends):
            bg = <backend_glob*>(self.base + self.backend_off + i * self.backend_size)
            br = self.backend_rows(i) + row
            bz = self.backend_rows(i) + self.rows
            shared_add(&bg.active, -shared_ld(&br.active))
            n = shared_ld(&br.responses)
            m = shared_ld(&bz.responses)
            if n > 0 and br.resp_ewma >= 0:
                shared_std(&bz.resp_ewma, br.resp_ewma if m <= 0 or bz.resp_ewma < 0 else
                           (bz.resp_ewma * m + br.resp_ewma * n) / (m + n))
            shared_bump(&bz.responses, n)
            n = shared_ld(&br.connects)
            m = shared_ld(&bz.connects)
            if n > 0 and br.connect_ewma >= 0:
                shared_std(&bz.connect_ewma, br.connect_ewma if m <= 0 or bz.connect_ewma < 0
                           else (bz.connect_ewma * m + br.connect_ewma * n) / (m + n))
            shared_bump(&bz.connects, n)
            shared_bump(&bz.total, shared_ld(&br.total))
            shared_bump(&bz.failed, shared_ld(&br.failed))
            shared_bump(&bz.connect_refused, shared_ld(&br.connect_refused))
            shared_bump(&bz.connect_timeout, shared_ld(&br.connect_timeout))
            shared_bump(&bz.connect_error, shared_ld(&br.connect_error))
            shared_bump(&bz.bytes_in, shared_ld(&br.bytes_in))
            shared_bump(&bz.bytes_out, shared_ld(&br.bytes_out))
            backend_row_reset(br)
        for i in range(self.hdr.n_listeners):
            lr = self.listener_rows(i) + row
            lz = self.listener_rows(i) + self.rows
            shared_add(&(<listener_glob*>(self.base + self.listener_off
                                          + i * self.listener_size)).active,
                       -shared_ld(&lr.active))
            shared_bump(&lz.accepted, shared_ld(&lr.accepted))
            for k in range(SHARED_REJECT_SLOTS):
                shared_bump(&lz.rejected[k], shared_ld(&lr.rejected[k]))
            for k in range(SHARED_INSPECT_SLOTS):
                shared_bump(&lz.inspected[k], shared_ld(&lr.inspected[k]))
            memset(lr, 0, sizeof(listener_row))
        for i in range(self.hdr.n_pools):
            pr = self.pool_rows(i) + row
            pz = self.pool_rows(i) + self.rows
            shared_bump(&pz.retried, shared_ld(&pr.retried))
            shared_bump(&pz.queue_timeouts, shared_ld(&pr.queue_timeouts))
            memset(pr, 0, sizeof(pool_row))
        hr = <hub_row*>(self.base + self.hub_off + SHARED_LINE) + row
        hz = <hub_row*>(self.base + self.hub_off + SHARED_LINE) + self.rows
        shared_add(&(<hub_glob*>(self.base + self.hub_off)).active, -shared_ld(&hr.active))
        shared_bump(&hz.total, shared_ld(&hr.total))
        memset(hr, 0, sizeof(hub_row))
        self.retire_sources(row)

    cdef retire_sources(self, int row):
        cdef int s, i
        cdef source_entry* e
        cdef source_meta* meta
        cdef int64_t a
        for s in range(SHARED_STRIPES):
            sources_lock(self, s)
            i = 0
            while i < self.per_stripe:
                e = self.entry(s, i)
                a = e.row_active[row]
                if e.owner and a:
                    e.row_active[row] = 0
                    e.active -= a
                    if e.active < 0:
                        e.active = 0
                    meta = <source_meta*>(self.base + self.meta_off) + (e.owner - 1)
                    if e.active == 0 and meta.rate <= 0:
                        sources_delete(self, s, i)
                        continue          # another entry may have moved into slot i
                i += 1
            sources_unlock(self, s)

    def _lock_all_stripes(self):
        """For tests: take every per-source mutex and keep it (a worker about to be
        killed inside them)."""
        for s in range(SHARED_STRIPES):
            sources_lock(self, s)


# --- the per-source region -----------------------------------------------------------

cdef inline void* stripe_mutex(SharedTable t, int s) noexcept:
    return t.base + t.stripe_off + s * SHARED_LINE


cdef int sources_lock(SharedTable t, int s) except -1:
    cdef int rc = shared_mutex_lock(stripe_mutex(t, s))
    if rc != 0:
        raise OSError(rc, _os.strerror(rc), "locking a per-source stripe")
    return 0


cdef inline void sources_unlock(SharedTable t, int s) noexcept:
    shared_mutex_unlock(stripe_mutex(t, s))


cdef inline uint64_t source_hash(int64_t owner, uint64_t key) noexcept:
    # splitmix64's finalizer over the key and its listener: stripe and home slot.
    cdef uint64_t z = key ^ (<uint64_t>owner * <uint64_t>0x9E3779B97F4A7C15)
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EB
    return z ^ (z >> 31)


cdef inline int source_home(SharedTable t, source_entry* e) noexcept:
    return <int>((source_hash(e.owner, e.key) >> 6) % <uint64_t>t.per_stripe)


cdef int sources_find(SharedTable t, int s, int64_t owner, uint64_t key, int* empty) noexcept:
    """The slot of (owner, key) in stripe s, or -1; *empty: the first free slot on its
    probe path, -1 when the stripe is full. Called with the stripe locked."""
    cdef int n = t.per_stripe
    cdef int i = <int>((source_hash(owner, key) >> 6) % <uint64_t>n)
    cdef int k
    cdef source_entry* e
    empty[0] = -1
    for k in range(n):
        e = t.entry(s, i)
        if e.owner == 0:
            empty[0] = i
            return -1
        if e.owner == owner and e.key == key:
            return i
        i += 1
        if i == n:
            i = 0
    return -1


cdef void sources_delete(SharedTable t, int s, int i) noexcept:
    """Empty slot i of stripe s by backward shift (linear probing keeps no tombstones);
    counts the entry out of its listener. Called with the stripe locked."""
    cdef int n = t.per_stripe
    cdef int j = i, home
    cdef source_entry* e = t.entry(s, i)
    shared_add(&(<source_meta*>(t.base + t.meta_off) + (e.owner - 1)).count, -1)
    while True:
        j += 1
        if j == n:
            j = 0
        e = t.entry(s, j)
        if e.owner == 0 or j == i:
            break
        home = source_home(t, e)
        # e stays when its home lies cyclically in (i, j]
        if (home > i and home <= j) if i <= j else (home > i or home <= j):
            continue
        memcpy(t.entry(s, i), e, t.entry_size)
        i = j
    memset(t.entry(s, i), 0, t.entry_size)


cdef class SharedSourceLimits:
    """acl.SourceLimits' per-source limits in the shared table, exact across processes:
    the same admit / release / prune semantics (l4lb/acl.py's module doc), for one
    listener record `index`. Keys are 64-bit address keys (key_of: runtime.pxi's
    _address_key with HASH_KEY_SRC_IP, so every spelling of an address is one source).
    Entries are ordered by their stamp rather than kept in a list: with a rate the two
    orders are the same, so prune removes the same entries. At `cap` entries of this
    listener, or when the key's stripe is full, a new source is refused
    (per_source_table_full)."""
    cdef readonly SharedTable table
    cdef readonly int index
    cdef readonly int64_t max_connections
    cdef readonly double rate
    cdef readonly double burst
    cdef readonly double refill_time
    cdef readonly int64_t cap
    cdef readonly double prune_interval
    cdef source_meta* meta
    cdef int row

    def __init__(self, SharedTable table, int index, int64_t max_connections=0,
                 double rate=0.0, cap=None, double prune_interval=1.0):
        table.record(table.listener_off, table.listener_size, index, table.hdr.listeners,
                     "listener")
        self.table = table
        self.index = index
        self.meta = <source_meta*>(table.base + table.meta_off) + index
        self.row = table.write_row()
        self.cap = table.hdr.sources if cap is None else cap
        self.prune_interval = prune_interval
        self.configure(max_connections, rate)

    def configure(self, int64_t max_connections, double rate):
        """Change the limits in place (reload); the entries and their counts are kept."""
        cdef int s, i
        cdef source_entry* e
        self.max_connections = max_connections
        self.rate = rate
        self.burst = max(rate, 1.0)
        self.refill_time = self.burst / rate if rate > 0 else 0.0
        shared_std(&self.meta.rate, rate)
        if rate <= 0:
            for s in range(SHARED_STRIPES):
                sources_lock(self.table, s)
                for i in range(self.table.per_stripe):
                    e = self.table.entry(s, i)
                    if e.owner == self.index + 1:
                        e.tokens = self.burst
                sources_unlock(self.table, s)

    def key_of(self, host, parsed=None):
        """The key of a client address text (`parsed` is acl's parse, unused here)."""
        return _address_key(host, 0, HASH_KEY_SRC_IP)

    def admit(self, uint64_t key, double now):
        """None to admit a connection from `key` at clock time `now`, else the reason."""
        cdef SharedTable t = self.table
        cdef int64_t owner = self.index + 1
        cdef double next_prune = shared_ldd(&self.meta.next_prune)
        cdef int s, i, empty
        cdef source_entry* e
        cdef double tokens
        if now >= next_prune and shared_cas_double(&self.meta.next_prune, next_prune,
                                                   now + self.prune_interval):
            self.prune_entries(now)
        s = <int>(source_hash(owner, key) & (SHARED_STRIPES - 1))
        sources_lock(t, s)
        try:
            i = sources_find(t, s, owner, key, &empty)
            if i < 0:
                if shared_ld(&self.meta.count) >= self.cap or empty < 0:
                    return "per_source_table_full"
                # Counted first and owned last: a worker killed in between leaves
                # the count one high (a stricter cap), never an entry uncounted.
                shared_add(&self.meta.count, 1)
                e = t.entry(s, empty)
                memset(e, 0, t.entry_size)
                e.key = key
                e.tokens = self.burst
                e.stamp = now
                e.owner = owner
            else:
                e = t.entry(s, i)
                if 0 < self.max_connections <= e.active:
                    return "per_source_max_connections"
            if self.rate > 0:
                tokens = e.tokens + (now - e.stamp) * self.rate
                if tokens > self.burst:
                    tokens = self.burst
                e.stamp = now
                if tokens < 1.0:
                    e.tokens = tokens
                    return "per_source_rate"
                e.tokens = tokens - 1.0
            e.active += 1
            e.row_active[self.row] += 1
            return None
        finally:
            sources_unlock(t, s)

    def release(self, uint64_t key):
        """A connection admitted for `key` closed (exactly once per admit)."""
        cdef SharedTable t = self.table
        cdef int64_t owner = self.index + 1
        cdef int s = <int>(source_hash(owner, key) & (SHARED_STRIPES - 1))
        cdef int i, empty
        cdef source_entry* e
        sources_lock(t, s)
        try:
            i = sources_find(t, s, owner, key, &empty)
            if i < 0:
                return
            e = t.entry(s, i)
            if e.active > 0:                # never below 0, even across a reload
                e.active -= 1
            if e.row_active[self.row] > 0:
                e.row_active[self.row] -= 1
            if e.active == 0 and self.rate <= 0:
                sources_delete(t, s, i)
        finally:
            sources_unlock(t, s)

    def prune(self, double now):
        """Forget this listener's sources with no open connection and a full bucket
        (stamp at least one refill time old); returns how many."""
        shared_std(&self.meta.next_prune, now + self.prune_interval)
        return self.prune_entries(now)

    cdef int prune_entries(self, double now) except -1:
        cdef SharedTable t = self.table
        cdef int64_t owner = self.index + 1
        cdef double horizon = now - self.refill_time
        cdef int s, i, n = 0
        cdef source_entry* e
        for s in range(SHARED_STRIPES):
            sources_lock(t, s)
            i = 0
            while i < t.per_stripe:
                e = t.entry(s, i)
                if e.owner == owner and e.stamp <= horizon and e.active <= 0:
                    sources_delete(t, s, i)
                    n += 1
                    continue
                i += 1
            sources_unlock(t, s)
        return n

    def __len__(self):
        return shared_ld(&self.meta.count)
