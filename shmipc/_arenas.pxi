# A cache of the interpreter's object arenas (included into _ring.pyx).
#
# Why: CPython's small-object allocator (pymalloc) takes memory from the
# system in arenas (1 MiB on 64-bit 3.10+) and gives an arena back (munmap)
# as soon as every object in it is freed, keeping at most one empty arena.
# A pool that moves a list of 200,000 ints creates ~6.4 MB of int objects
# in the parent (the results) and in the workers (arguments and results)
# on every map, and frees them when the caller drops the list: each map
# then faults ~1,600 fresh pages in per process (measured: 2,078 minor
# faults a map in the parent, ~3 us each on this VM, half its CPU time).
# Keeping up to `limit` bytes of freed arenas mapped, for the next arena
# the interpreter asks for, turns those faults into plain reuse.
#
# How: PyObject_SetArenaAllocator (documented since 3.4) with an allocator
# that wraps the one it replaces: a new arena comes from the cache if one
# of that size is there, else from the previous allocator; a freed arena
# goes into the cache while it holds fewer than `limit` bytes, else back to
# the previous allocator. Both allocators map arenas the same way (the
# default one with mmap, the cache never changes a mapping), so an arena
# allocated before the cache was installed can be freed into it, and the
# cache can be emptied (release) at any time. The interpreter calls these
# with its lock held; a mutex keeps them safe where interpreters have a lock
# each. A free-threaded build does not use pymalloc: installing is a no-op.

from libc.stddef cimport size_t
cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *, void *)
    int pthread_mutex_lock(pthread_mutex_t *)
    int pthread_mutex_unlock(pthread_mutex_t *)

cdef extern from "Python.h":
    ctypedef void *(*arena_alloc_fn)(void *ctx, size_t size) noexcept nogil
    ctypedef void (*arena_free_fn)(void *ctx, void *ptr, size_t size) noexcept nogil
    ctypedef struct PyObjectArenaAllocator:
        void *ctx
        arena_alloc_fn alloc
        arena_free_fn free
    void PyObject_GetArenaAllocator(PyObjectArenaAllocator *allocator)
    void PyObject_SetArenaAllocator(PyObjectArenaAllocator *allocator)

cdef enum:
    _ARENA_SLOTS = 256          # at most this many arenas are kept (256 MiB of 1 MiB arenas)

cdef PyObjectArenaAllocator _arena_previous
cdef PyObjectArenaAllocator _arena_ours
cdef bint _arena_installed = False
cdef pthread_mutex_t _arena_lock
cdef void *_arena_ptr[_ARENA_SLOTS]
cdef size_t _arena_size[_ARENA_SLOTS]
cdef int _arena_count = 0
cdef size_t _arena_bytes = 0
cdef size_t _arena_limit = 0
cdef unsigned long long _arena_reused = 0


cdef void *_arena_alloc(void *ctx, size_t size) noexcept nogil:
    global _arena_count, _arena_bytes, _arena_reused
    cdef void *ptr = NULL
    cdef int i
    pthread_mutex_lock(&_arena_lock)
    i = _arena_count - 1
    while i >= 0:
        if _arena_size[i] == size:
            ptr = _arena_ptr[i]
            _arena_count -= 1
            _arena_ptr[i] = _arena_ptr[_arena_count]
            _arena_size[i] = _arena_size[_arena_count]
            _arena_bytes -= size
            _arena_reused += 1
            break
        i -= 1
    pthread_mutex_unlock(&_arena_lock)
    if ptr != NULL:
        return ptr
    return _arena_previous.alloc(_arena_previous.ctx, size)


cdef void _arena_free(void *ctx, void *ptr, size_t size) noexcept nogil:
    global _arena_count, _arena_bytes
    cdef bint kept = False
    if ptr == NULL:
        return
    pthread_mutex_lock(&_arena_lock)
    if _arena_count < _ARENA_SLOTS and _arena_bytes + size <= _arena_limit:
        _arena_ptr[_arena_count] = ptr
        _arena_size[_arena_count] = size
        _arena_count += 1
        _arena_bytes += size
        kept = True
    pthread_mutex_unlock(&_arena_lock)
    if not kept:
        _arena_previous.free(_arena_previous.ctx, ptr, size)


def arena_cache(Py_ssize_t limit):
    """Keep up to `limit` bytes of the interpreter's freed object arenas
    mapped for reuse (see _arenas.pxi); 0 gives every cached arena back
    and keeps none from now on. Installed once per process, on first use;
    returns the bytes given back.

    Raises:
        ValueError: `limit` < 0.
    """
    global _arena_installed, _arena_limit
    if limit < 0:
        raise ValueError(f"an arena cache limit must be >= 0 bytes, got {limit}")
    if not _arena_installed and limit:
        PyObject_GetArenaAllocator(&_arena_previous)
        if _arena_previous.alloc == NULL or _arena_previous.free == NULL:
            return 0                            # no arenas here (a free-threaded build)
        pthread_mutex_init(&_arena_lock, NULL)
        _arena_ours.ctx = NULL
        _arena_ours.alloc = _arena_alloc
        _arena_ours.free = _arena_free
        PyObject_SetArenaAllocator(&_arena_ours)
        _arena_installed = True
    if not _arena_installed:
        return 0
    pthread_mutex_lock(&_arena_lock)
    _arena_limit = <size_t>limit
    pthread_mutex_unlock(&_arena_lock)
    return arena_cache_release(limit)


def arena_cache_release(Py_ssize_t keep=0):
    """Give cached arenas back to the system until at most `keep` bytes
    remain cached; returns the bytes given back."""
    global _arena_count, _arena_bytes
    cdef void *ptr
    cdef size_t size, freed = 0
    if not _arena_installed:
        return 0
    while True:
        pthread_mutex_lock(&_arena_lock)
        if _arena_count == 0 or _arena_bytes <= <size_t>max(keep, 0):
            pthread_mutex_unlock(&_arena_lock)
            break
        _arena_count -= 1
        ptr = _arena_ptr[_arena_count]
        size = _arena_size[_arena_count]
        _arena_bytes -= size
        pthread_mutex_unlock(&_arena_lock)
        _arena_previous.free(_arena_previous.ctx, ptr, size)
        freed += size
    return freed


def arena_cache_stats():
    """{'installed', 'limit', 'cached_bytes', 'cached_arenas', 'reused'}."""
    return {"installed": bool(_arena_installed), "limit": _arena_limit, "cached_bytes": _arena_bytes,
            "cached_arenas": _arena_count, "reused": _arena_reused}
