# One explicit 64-bit hash for routing, the same in l4lb/reference/hashing.py.
#
# Python's hash() is salted per process, so it would send a client to different backends
# from different workers and after every restart. FNV-1a (64-bit) walks the bytes; the
# splitmix64 finalizer then spreads FNV's weak low bits over the whole word, which Maglev's
# modulo arithmetic needs.
from libc.stdint cimport uint64_t

cdef uint64_t FNV64_OFFSET = 0xcbf29ce484222325ULL
cdef uint64_t FNV64_PRIME = 0x100000001b3ULL


cdef inline uint64_t mix64(uint64_t z) noexcept nogil:
    """splitmix64's finalizer: a bijection with full avalanche."""
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL
    return z ^ (z >> 31)


cdef inline uint64_t hash64_c(const unsigned char* data, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = FNV64_OFFSET
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ data[i]) * FNV64_PRIME
    return mix64(h)


cdef inline uint64_t splitmix64_next(uint64_t* state) noexcept nogil:
    """Advance a splitmix64 state and return the next draw."""
    state[0] += 0x9e3779b97f4a7c15ULL
    return mix64(state[0])


def hash64(const unsigned char[:] data):
    """The routing hash of `data` (bytes): identical to l4lb.reference.hashing.hash64."""
    if data.shape[0] == 0:
        return hash64_c(NULL, 0)
    return hash64_c(&data[0], data.shape[0])
