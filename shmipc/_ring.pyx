# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The ring: variable-length typed records in a byte ring inside shared memory.

This is the only module that touches raw shared memory. See _shm.h for the
layout and DESIGN.md for the model. In short:

Invariants (kept by the code below; every one is checked when read back,
since another process may have scribbled over the memory):
  * tail <= cursor <= head, head - tail <= capacity; all three only grow.
      head   = prod.pos:   bytes ever committed by producers,
      cursor = cons.cursor: bytes ever taken by consumers,
      tail   = cons.pos:   bytes ever released (free for producers again).
  * Records are 16-aligned and never wrap: a record that would cross the end
    is preceded by a PAD record running to the end.
  * A record becomes visible only when head moves past it (release store),
    after its header and payload are written: a consumer never sees a
    partial record, and a producer that dies mid-write leaves nothing behind.
  * Every record in [tail, cursor) is CLAIMED (a zero-copy view is open on
    it) or DONE; tail moves over DONE and PAD records only, so a producer
    never overwrites memory a view still shows. (The one-consumer fast
    paths, _get_now and _get_many_now, run only while tail == cursor and
    move both together past records they copied out: those records never
    enter [tail, cursor), so they are never marked DONE.)
  * "many" sides take a lock word holding the owner's identity (pid and
    start time, see _shm.h: a recycled or garbage pid is not mistaken for
    the owner); it is released before sleeping, so no lock is held across an
    unbounded wait, and a lock whose owner died is taken over (after a wait
    slice) by the next waiter. Claimed records carry the same identity. The
    one exception is a producer hold (_hold_producers): a Pipe sender keeps
    the producer lock while its chunked message waits for room, so that no
    other sender's record lands inside it; the others wait, and take the
    lock over if the holder dies.
  * One producer path (_produce) serves put and put_many; one consumer path
    (_consume) serves get, get_many and get_view. On one-to-one rings, fast
    paths (_put_now, _put_many_now, _get_now, _get_many_now) take the
    common case first with the same checks, and hand anything else
    (full, empty, padding, a view open, garbage) to those paths, having
    changed nothing. A record that cannot be
    delivered is consumed (and counted in `bad_messages`) only when it is the
    first of a call, which then raises; later in a batch, the call stops
    before it and returns what it took, so nothing good is lost with it.
    A payload that fails to decode after the lock is released (unpickling)
    costs only itself: get_many returns the messages before it, keeps the
    rest in `pending` (this process), and the next call raises its error,
    then delivers the rest in order.
  * A waiter registers in `wait.*_waiters` and re-checks its condition
    before sleeping; the other side publishes, issues a full fence, and then
    reads the counter (Dekker): a wake-up can be late by one slice at worst
    if a waiter died, never lost.
"""
cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t, INT64_MAX, INT64_MIN
from libc.string cimport memcpy, memset
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE, PyBUF_SIMPLE
from cpython.ref cimport Py_INCREF
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_CheckExact, PyLong_AsLongLongAndOverflow, PyLong_FromLongLong
from cpython.pyport cimport PY_SSIZE_T_MAX
from cpython.pythread cimport PyThread_get_thread_ident
from shmipc._posix cimport sem_t, sem_init, errno, EINTR, ETIMEDOUT, getpid
from shmipc._shm cimport *

import os
import queue
from collections import deque

from shmipc.errors import (MessageTooLarge, CorruptArena, CorruptMessage, UndecodableMessage,
                           PeerDied, RingClosed)

include "_codec.pxi"
include "_arenas.pxi"

cdef extern from "Python.h":
    int PyErr_CheckSignals() except -1

RING_HEADER_SIZE = SHM_RING_HEADER_SIZE
MIN_CAPACITY = 1024
MAX_CAPACITY = 1 << 40
DEBUG = bool(SHMIPC_DEBUG)

# How long one sleep lasts before the waiter looks around (deadline, Ctrl-C,
# close, dead peers and lock owners). Bounds recovery time, costs ~20 wake-ups/s.
cdef int64_t SLICE_NS = 50_000_000
cdef int64_t SPIN_MIN_NS = 1_000
cdef int64_t SPIN_MAX_NS = 50_000

# Whether a spin can win is measured, not guessed (issue 11): a waiter that
# spins on the CPU its peer needs only delays the peer. Each side publishes
# its CPU in the ring (shm_wait_t.prod_cpu / cons_cpu); `cpus_allowed` is this
# process's affinity count (1: pinned, or one online CPU), the fallback when
# the peer's CPU is not known (and for lock waits), read when a ring is set
# up and again on every sleep (a sleep costs tens of microseconds; the
# syscall well under one). Per-process tallies of how waits went, for tests
# and diagnosis (see _wait_stats).
cdef int cpus_allowed = shm_cpus_allowed()
cdef uint64_t n_pause_spins = 0    # waits that spun with PAUSE (peer elsewhere)
cdef uint64_t n_yield_spins = 0    # waits that spun with sched_yield (co-located)
cdef uint64_t n_spin_wins = 0      # spins (either kind) that ended ready
cdef uint64_t n_slow_yields = 0    # yields that gave the CPU away (see YIELD_SLOW_NS)
# A yield hands the CPU to whichever runnable task the scheduler picks, not
# to the peer: with a third CPU-bound task on our CPU, a waiter that yields
# lets it run until the next tick (4 ms at HZ=250), and a co-located round
# trip that takes 4 us took 4 ms in 70% of trips (issue 11: a mean of 1409 us
# against the pipe's 17, whose sleeping reader is picked at once). So a yield
# is "slow" when it took longer than YIELD_SLOW_NS (a tick at HZ=1000, or
# most of EEVDF's shortest slice; a peer just forked takes a few hundred us
# to answer its first messages) while the other side moved fewer than
# YIELD_SLOW_MSGS messages (a co-located stream's yield lets the peer drain
# or fill the whole ring: long, and worth it). One alone may be the peer's
# own long turn; a second within YIELD_SLOW_WINDOW_NS of the first makes this
# process's co-located waits sleep at once (a sleeper woken by the peer's
# post runs before that task) for a while, from YIELD_BACKOFF_MIN_NS,
# doubling while yields tried again are slow again, up to
# YIELD_BACKOFF_MAX_NS: each try costs one tick at most.
cdef int64_t YIELD_SLOW_NS = 500_000
cdef uint64_t YIELD_SLOW_MSGS = 16
cdef int64_t YIELD_SLOW_WINDOW_NS = 100_000_000
cdef int64_t YIELD_BACKOFF_MIN_NS = 100_000_000
cdef int64_t YIELD_BACKOFF_MAX_NS = 1_000_000_000
cdef int64_t last_slow_yield = INT64_MIN // 2   # when the last slow yield ended
cdef int64_t yield_backoff_ns = 0               # the current sleep-at-once period (0: none)
cdef int64_t yield_off_until = 0                # until then, co-located waits sleep at once


cdef inline void slow_yield(int64_t now) noexcept nogil:
    """A co-located wait's yield, ending `now`, gave the CPU away for longer
    than YIELD_SLOW_NS."""
    global n_slow_yields, last_slow_yield, yield_backoff_ns, yield_off_until
    cdef bint recent
    n_slow_yields += 1
    recent = now - last_slow_yield <= YIELD_SLOW_WINDOW_NS + yield_backoff_ns
    last_slow_yield = now
    if not recent:
        yield_backoff_ns = 0        # the first in a while: perhaps the peer's own long turn
        return
    yield_backoff_ns = min(max(yield_backoff_ns * 2, YIELD_BACKOFF_MIN_NS), YIELD_BACKOFF_MAX_NS)
    yield_off_until = now + yield_backoff_ns


def _wait_stats():
    """This process's tallies of how ring waits spun (for tests and diagnosis):
    ``cpus_allowed`` (affinity count as last read), ``pause_spins`` (waits
    that busy-spun, the peer running elsewhere), ``yield_spins`` (waits that
    spun by yielding the CPU, the peer sharing ours), ``spin_wins`` (spins
    that ended with the wait satisfied, without sleeping), ``slow_yields``
    (yields that gave the CPU to another task for a while, see
    YIELD_SLOW_NS) and ``yields_off_s`` (how long co-located waits will
    still sleep at once instead of yielding after them)."""
    return {"cpus_allowed": cpus_allowed, "pause_spins": n_pause_spins,
            "yield_spins": n_yield_spins, "spin_wins": n_spin_wins, "slow_yields": n_slow_yields,
            "yields_off_s": max(0, yield_off_until - shm_now_ns()) / 1e9}
cdef int64_t FOREVER = INT64_MAX
cdef int BATCH = 64            # put_many encodes this many items before writing them
# A batch (put_many, get_many) publishes what it wrote, or releases what it
# took, every PUBLISH_BYTES of ring space, not only at its end: with large
# messages a whole batch fills the ring, and a side that waited for the other
# to finish its batch would leave both CPUs idle in turn (issue 11: batched
# 64 KiB messages ran at a quarter of single puts). For small messages a
# batch of 64 stays below it: one commit per batch, as before.
cdef uint64_t PUBLISH_BYTES = 32 << 10
cdef Py_ssize_t BATCH_BYTES = 64 << 10   # get_many's default max_bytes (see there)
# how long leaving a zero-copy view may wait for the consumer lock to move
# the tail (the record itself is released at once, without the lock)
cdef int64_t CLAIM_RELEASE_NS = 1_000_000_000
cdef int CLAIM_ANY = 2                  # _consume: leave any payload claimed (Ring._get_held)

# not a record tag: marks a failure kept in Ring.pending (see get_many)
cdef enum:
    TAG_FAILED = 255

# what a waiter waits for
cdef enum:
    W_DATA = 0      # a consumer: a committed record past the cursor
    W_SPACE = 1     # a producer: room for `need` bytes (and the message limit)
    W_PLOCK = 2     # the producer lock
    W_CLOCK = 3     # the consumer lock

shm_sem_template_init()

# leak counters (uvloop-style): the test suite asserts they return to zero
cdef Py_ssize_t g_rings_open = 0      # rings mapped in this process
cdef Py_ssize_t g_views_open = 0      # zero-copy views not yet released
# producer holds of this process (Ring._hold_producers): ring (_hold_key)
# -> the holding thread, so that a put through another Ring object of the
# same ring in that thread (an end unpickled again: another mapping) is
# refused, not left to wait for its own thread
cdef dict g_holds = {}


def pid_alive(pid):
    """True if `pid` is a live process; a zombie (killed, not yet reaped)
    counts as dead. The check rings use to recover from dead processes."""
    if not 0 < pid < 2**32:
        raise ValueError(f"pid must be in 1..{2**32 - 1}, got {pid!r}")
    return bool(shm_pid_alive(<uint32_t>pid))


def self_ident():
    """This process's identity as rings record owners: its pid in the low 32
    bits, a token of its start time in the high 32 (see _shm.h)."""
    return shm_self_ident()


def ident_alive(ident):
    """True if `ident` (a self_ident() value, perhaps read back from shared
    memory) names a live process, the very one it was taken from: a dead,
    zombie or recycled pid, or junk, is False."""
    if type(ident) is not int or not 0 < ident < 2**64:
        return False
    return bool(shm_ident_alive(<uint64_t>ident))


def debug_counters():
    """Rings mapped and zero-copy views still open in this process."""
    return {"rings_open": g_rings_open, "views_open": g_views_open}


def _layout():
    """Byte offsets of the ring header's fields (and "rec.*": of a record
    header's), with the data start, for tests that write hostile values."""
    cdef shm_ring_t h
    cdef shm_rec_t r
    cdef size_t b = <size_t>&h, rb = <size_t>&r
    return {
        "magic": <size_t>&h.magic - b, "version": <size_t>&h.version - b,
        "flags": <size_t>&h.flags - b, "capacity": <size_t>&h.capacity - b,
        "data_offset": <size_t>&h.data_offset - b, "region_size": <size_t>&h.region_size - b,
        "record_size": <size_t>&h.record_size - b, "maxsize": <size_t>&h.maxsize - b,
        "prod.pos": <size_t>&h.prod.pos - b, "prod.msgs": <size_t>&h.prod.msgs - b,
        "prod.lock": <size_t>&h.prod.lock - b, "prod.pid": <size_t>&h.prod.pid - b,
        "prod.lock_pos": <size_t>&h.prod.lock_pos - b, "prod.lock_msgs": <size_t>&h.prod.lock_msgs - b,
        "cons.pos": <size_t>&h.cons.pos - b, "cons.cursor": <size_t>&h.cons.cursor - b,
        "cons.msgs": <size_t>&h.cons.msgs - b, "cons.lock": <size_t>&h.cons.lock - b,
        "cons.pid": <size_t>&h.cons.pid - b, "cons.lock_pos": <size_t>&h.cons.lock_pos - b,
        "cons.lock_msgs": <size_t>&h.cons.lock_msgs - b,
        "wait.data_waiters": <size_t>&h.wait.data_waiters - b,
        "wait.space_waiters": <size_t>&h.wait.space_waiters - b,
        "wait.plock_waiters": <size_t>&h.wait.plock_waiters - b,
        "wait.clock_waiters": <size_t>&h.wait.clock_waiters - b,
        "wait.shutdown": <size_t>&h.wait.shutdown - b,
        "wait.ready_signalled": <size_t>&h.wait.ready_signalled - b,
        "counters": <size_t>&h.counters - b,
        "data_sem": <size_t>&h.data_sem - b, "space_sem": <size_t>&h.space_sem - b,
        "plock_sem": <size_t>&h.plock_sem - b, "clock_sem": <size_t>&h.clock_sem - b,
        "data": SHM_RING_HEADER_SIZE,
        "rec.size": <size_t>&r.size - rb, "rec.tag": <size_t>&r.tag - rb,
        "rec.state": <size_t>&r.state - rb, "rec.check": <size_t>&r.check - rb,
        "rec.owner": <size_t>&r.owner - rb, "rec.header": SHM_REC_HDR,
    }


def _rec_check(uint32_t size, uint8_t tag):
    """The check word a record header of `size` and `tag` carries."""
    return shm_rec_check(size, tag)


# ---------------------------------------------------------------- int lists
# A list of plain ints (a Pool.map chunk of ints, its results) as native
# int64s: ~3-6 ns an item to pack and ~14 to rebuild, against ~14 and ~22
# for pickle here (issue 11: a Pool.map of 200,000 ints encodes them four
# times over, in the parent and the workers). Both ends are processes of one
# machine and one shmipc: native byte order.
@cython.boundscheck(False)
@cython.wraparound(False)
def pack_int64_list(list items):
    """The ints of `items` as native int64s (bytes), or None unless every
    item is an exact int (not a bool, not a subclass) within int64."""
    cdef Py_ssize_t i, n = len(items)
    cdef int overflow = 0
    cdef long long v
    cdef object out = PyBytes_FromStringAndSize(NULL, n * 8)
    cdef long long *dst = <long long *>PyBytes_AS_STRING(out)
    for i in range(n):
        x = items[i]
        if not PyLong_CheckExact(x):
            return None
        v = PyLong_AsLongLongAndOverflow(x, &overflow)
        if overflow:
            return None
        dst[i] = v
    return out


@cython.boundscheck(False)
@cython.wraparound(False)
def unpack_int64_list(data):
    """The list of ints pack_int64_list packed, from any contiguous buffer.

    Raises:
        CorruptMessage: its length is not a multiple of 8 (or it is not a
            contiguous buffer).
    """
    cdef Py_buffer b
    cdef Py_ssize_t i, n
    cdef list out
    cdef long long v
    try:
        PyObject_GetBuffer(data, &b, PyBUF_SIMPLE)
    except (TypeError, BufferError) as exc:
        raise CorruptMessage(f"a list of ints arrived as {type(data).__name__}: {exc}") from None
    try:
        if b.len % 8:
            raise CorruptMessage(f"a list of ints arrived as {b.len} bytes, not a multiple of 8")
        n = b.len // 8
        # filled before anyone sees it (on an error the unfilled slots are
        # NULL, which the list's deallocation skips)
        out = PyList_New(n)
        for i in range(n):
            memcpy(&v, <char *>b.buf + i * 8, 8)        # (no alignment assumed)
            item = PyLong_FromLongLong(v)
            Py_INCREF(item)                             # (PyList_SET_ITEM steals one)
            PyList_SET_ITEM(out, i, item)
        return out
    finally:
        PyBuffer_Release(&b)


@cython.boundscheck(False)
@cython.wraparound(False)
def blob_table(list items, Py_ssize_t large):
    """How a map chunk of bytes objects travels (see shmipc._wire.pack_items),
    found in C: None if an item is not exactly bytes, False if
    none has `large` bytes or more, else ``(distinct, index)``: the distinct
    objects (by identity) in first-seen order, and each item's position in
    them as a tuple, or None if no object repeats.

    (The same in Python, with map/set/max/id and a dict, took ~46 us for
    100 items here, ~a tenth of an executor's round trip for one chunk.)"""
    cdef Py_ssize_t i, n = len(items), k = 0, prev_k = 0
    cdef bint any_large = False, repeats = False
    cdef object x, prev = None, found
    cdef dict seen
    cdef list distinct, index
    for i in range(n):
        x = items[i]
        if not PyBytes_CheckExact(x):
            return None
        if PyBytes_GET_SIZE(x) >= large:
            any_large = True
    if not any_large:
        return False
    distinct = []
    seen = {}
    index = []
    for i in range(n):
        x = items[i]
        if x is prev:                   # (a run of one object: no lookup)
            k = prev_k
            repeats = True
        else:
            key = id(x)
            found = seen.get(key)
            if found is None:
                k = len(distinct)
                seen[key] = k
                distinct.append(x)
            else:
                k = <Py_ssize_t>found
                repeats = True
            prev, prev_k = x, k
        index.append(k)
    return distinct, (tuple(index) if repeats else None)


def _after_fork_in_child():
    shm_self_reset()        # the child's identity is computed on its first use


os.register_at_fork(after_in_child=_after_fork_in_child)


cdef inline uint64_t rec_len(uint64_t payload) noexcept nogil:
    return (SHM_REC_HDR + payload + SHM_REC_ALIGN - 1) & ~<uint64_t>(SHM_REC_ALIGN - 1)


cdef inline uint64_t snap_length(const shm_rec_t *hd, uint64_t off, uint64_t avail,
                                 uint64_t capacity, uint64_t max_payload) noexcept nogil:
    """Ring._rec_length's checks on a record header read once
    (shm_rec_snapshot) at ring offset `off`, with `avail` committed bytes
    from there: its length in the ring, or 0 if anything is out of range."""
    cdef uint64_t length = rec_len(hd.size)
    if hd.tag > TAG_MAX or hd.check != shm_rec_check(hd.size, hd.tag) or hd.state > SHM_REC_DONE:
        return 0
    if hd.tag == TAG_PAD:
        if length != capacity - off:
            return 0
    elif hd.size > max_payload or length > capacity - off:
        return 0
    if length > avail:
        return 0
    return length


cdef Py_ssize_t as_bound(object n) except? -1:
    """An int-like upper bound as a C size, ints past its range clamped
    (a negative one to -1: the caller's check names it). TypeError for
    what is not an index (a float)."""
    cdef Py_ssize_t v
    try:
        v = n
    except OverflowError:
        v = PY_SSIZE_T_MAX if n > 0 else -1
    return v


cdef int64_t deadline_of(bint block, object timeout) except -2:
    """Absolute CLOCK_MONOTONIC deadline; 0 means "do not wait"."""
    if not block:
        return 0
    if timeout is None:
        return FOREVER
    cdef double t
    try:
        if isinstance(timeout, (str, bytes, bytearray)):
            raise TypeError
        t = float(timeout)
    except (TypeError, ValueError):
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}") from None
    if not t >= 0:          # catches NaN too
        raise ValueError(f"timeout must be a non-negative number, got {timeout!r}")
    if t > 1e9:
        return FOREVER
    return shm_now_ns() + <int64_t>(t * 1e9)


cdef inline int check_timeout(bint block, object timeout) except -1:
    """Refuse what deadline_of refuses, without reading the clock in the
    common cases (None, a non-negative float): for the fast paths, which
    may finish without computing a deadline."""
    if block and timeout is not None and not (type(timeout) is float and <double>timeout >= 0):
        deadline_of(block, timeout)
    return 0


# Methods as plain builtins (method descriptors), not Cython function
# objects: a call costs ~100 fewer instructions, a third of a 64 B put or get
# (issue 11); the signatures stay visible to inspect through the
# docstrings' text signatures.
@cython.binding(False)
@cython.embedsignature(True)
@cython.embedsignature.format("clinic")
cdef class Ring:
    """A ring of typed messages in shared memory. Make one with ``Arena.ring()``.

    ``producers`` / ``consumers`` say whether one process (and thread) or many
    use a side; "one" sides take no lock. Messages from one producer reach a
    consumer in the order they were put.
    """

    def __cinit__(self):
        self.has_view = False
        self.closed = True
        self.active = 0
        self.spin_ns = 20_000
        self.pending = None
        self.allow_pickle = True
        self.notify_fd = -1

    def __init__(self, *args, **kwargs):
        raise TypeError("make rings with Arena.ring(); Ring cannot be instantiated directly")

    # ------------------------------------------------------------ creation
    @staticmethod
    def _create(buffer, uint64_t capacity, *, Py_ssize_t offset=0, bint many_producers=True,
                bint many_consumers=True, uint32_t maxsize=0, object dtype=None):
        """Lay out a new ring at `offset` in `buffer` (writable, with at least
        RING_HEADER_SIZE + capacity bytes there) and return it. Pass the
        mmap itself, not a memoryview of it: a memoryview with an export
        complains when the garbage collector clears a cycle holding it."""
        if capacity < MIN_CAPACITY or capacity > MAX_CAPACITY or (capacity & (capacity - 1)):
            raise ValueError(f"ring capacity must be a power of two between {MIN_CAPACITY} and "
                             f"{MAX_CAPACITY} bytes, got {capacity}")
        cdef uint32_t record_size = 0
        if dtype is not None:
            if dtype.hasobject:
                raise TypeError(f"dtype {dtype} holds Python objects; fixed-record rings need plain data")
            if dtype.itemsize > 0xFFFFFFFF:
                raise ValueError(f"records of {dtype.itemsize} bytes are too large")
            record_size = dtype.itemsize
            if record_size == 0 or rec_len(record_size) > capacity // 2:
                raise ValueError(f"records of {record_size} bytes do not fit a ring of {capacity} bytes")
        cdef Ring r = Ring.__new__(Ring)
        r._map(buffer, offset, SHM_RING_HEADER_SIZE + capacity)
        cdef shm_ring_t *h = r.hdr
        memset(h, 0, SHM_RING_HEADER_SIZE)
        h.version = SHM_RING_VERSION
        h.flags = (SHM_MANY_PRODUCERS if many_producers else 0) | (SHM_MANY_CONSUMERS if many_consumers else 0)
        h.capacity = capacity
        h.data_offset = SHM_RING_HEADER_SIZE
        h.region_size = SHM_RING_HEADER_SIZE + capacity
        h.record_size = record_size
        h.maxsize = maxsize
        h.creator = getpid()
        if (sem_init(&h.data_sem, 1, 0) or sem_init(&h.space_sem, 1, 0)
                or sem_init(&h.plock_sem, 1, 0) or sem_init(&h.clock_sem, 1, 0)):
            r._release()
            raise OSError(errno, "sem_init failed")
        shm_fence()
        h.magic = SHM_RING_MAGIC         # last: an attacher never sees a half-made ring
        r._setup(dtype)
        return r

    @staticmethod
    def _attach(buffer, object dtype=None, *, Py_ssize_t offset=0, Py_ssize_t size=-1):
        """Attach to a ring laid out earlier at `offset` in `buffer` (in a
        region of `size` bytes; -1: to the end); CorruptArena if the header
        is not a valid ring that fits the region."""
        cdef Ring r = Ring.__new__(Ring)
        r._map(buffer, offset, SHM_RING_HEADER_SIZE)
        try:
            r._validate_header(size)
            r._validate_dtype(dtype)
        except BaseException:
            r._release()
            raise
        r._setup(dtype)
        return r

    cdef int _map(self, object buffer, Py_ssize_t offset, uint64_t need) except -1:
        PyObject_GetBuffer(buffer, &self.view, PyBUF_WRITABLE)
        self.has_view = True
        if offset < 0 or offset > self.view.len or <uint64_t>(self.view.len - offset) < need:
            self._release()
            raise ValueError(f"a ring needs {need} bytes at offset {offset}, the buffer has {self.view.len}")
        if (<size_t>self.view.buf + offset) % 64:
            self._release()
            raise ValueError("a ring must start on a 64-byte boundary")
        self.buffer = buffer
        self.region_len = self.view.len - offset
        self.hdr = <shm_ring_t *>((<char *>self.view.buf) + offset)
        return 0

    cdef int _validate_header(self, Py_ssize_t size) except -1:
        cdef shm_ring_t *h = self.hdr
        if h.magic != SHM_RING_MAGIC:
            raise CorruptArena(f"no ring here: magic {h.magic:#x}, expected {SHM_RING_MAGIC:#x}")
        if h.version != SHM_RING_VERSION:
            raise CorruptArena(f"ring format version {h.version}, this shmipc reads {SHM_RING_VERSION}")
        cdef uint64_t cap = h.capacity
        if cap < MIN_CAPACITY or cap > MAX_CAPACITY or (cap & (cap - 1)):
            raise CorruptArena(f"ring capacity {cap} is not a power of two in range")
        if h.data_offset != SHM_RING_HEADER_SIZE or h.region_size != SHM_RING_HEADER_SIZE + cap:
            raise CorruptArena(f"ring data offset {h.data_offset} / size {h.region_size} do not "
                               f"match capacity {cap}")
        if size < 0 or size > self.region_len:
            size = self.region_len
        if h.region_size > <uint64_t>size:
            raise CorruptArena(f"ring of {h.region_size} bytes overruns its {size}-byte region")
        if h.flags & ~<uint32_t>(SHM_MANY_PRODUCERS | SHM_MANY_CONSUMERS):
            raise CorruptArena(f"ring flags {h.flags:#x} hold unknown bits")
        if h.record_size and rec_len(h.record_size) > cap // 2:
            raise CorruptArena(f"record size {h.record_size} does not fit capacity {cap}")
        return 0

    cdef int _validate_dtype(self, object dtype) except -1:
        """The dtype (from the arena's region table, written by any peer) must
        describe the records the header says the ring holds: puts copy
        dtype.itemsize bytes into records of the header's size."""
        cdef uint32_t size = self.hdr.record_size
        if dtype is None:
            if size:
                raise CorruptArena(f"ring header says fixed records of {size} bytes, "
                                   f"the region table gives no dtype")
            return 0
        try:
            itemsize = dtype.itemsize
            hasobject = dtype.hasobject
        except AttributeError:
            raise CorruptArena(f"ring dtype {dtype!r} is not a numpy dtype") from None
        if hasobject:
            raise CorruptArena(f"ring dtype {dtype} holds Python objects")
        if itemsize != size:
            raise CorruptArena(f"ring dtype {dtype} has {itemsize}-byte items, the ring header "
                               f"says records of {size} bytes")
        return 0

    cdef int _setup(self, object dtype) except -1:
        global cpus_allowed
        cdef shm_ring_t *h = self.hdr
        cpus_allowed = shm_cpus_allowed()   # see _wait: may this process use one CPU only?
        self.data = (<char *>self.hdr) + SHM_RING_HEADER_SIZE
        self.capacity = h.capacity
        self.mask = self.capacity - 1
        self.max_payload = self.capacity // 2 - SHM_REC_HDR
        if self.max_payload > 0xFFFFFFFF:
            self.max_payload = 0xFFFFFFFF
        self.record_size = h.record_size
        self.maxsize = h.maxsize
        self.many_producers = (h.flags & SHM_MANY_PRODUCERS) != 0
        self.many_consumers = (h.flags & SHM_MANY_CONSUMERS) != 0
        self.cached_tail = shm_load_acq64(&h.cons.pos)
        self.cached_head = shm_load_acq64(&h.prod.pos)
        self.dtype = dtype
        self.closed = False
        global g_rings_open
        g_rings_open += 1
        return 0

    cdef void _release(self) noexcept:
        global g_rings_open
        if self.hold_thread != 0 and self.hdr != NULL:
            # closed while a thread held the producers (_hold_producers):
            # the others must not wait for a hold nobody can end
            if shm_load_rlx64(&self.hdr.prod.lock) == shm_self_ident():
                self._end_hold()
            self.hold_thread = 0
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False
            if self.data != NULL:
                g_rings_open -= 1
        self.hdr = NULL
        self.data = NULL
        dv = self.data_view
        self.data_view = None
        if dv is not None:
            try:
                dv.release()
            except BufferError:
                pass            # a view of a message is still held (see MessageView._close)
        buf = self.buffer
        self.buffer = None
        if isinstance(buf, memoryview):
            try:
                buf.release()
            except BufferError:
                pass            # someone still holds a view: unmapped when they let go

    def __dealloc__(self):
        global g_rings_open
        if self.has_view:
            PyBuffer_Release(&self.view)
            if self.data != NULL:
                g_rings_open -= 1

    # ------------------------------------------------------------ bookkeeping
    cdef int _enter(self) except -1:
        if self.closed:
            raise RingClosed(f"ring {self.name!r} is closed")
        self.active += 1
        return 0

    cdef int _check_open(self) except -1:
        if self.closed:
            raise RingClosed(f"ring {self.name!r} is closed")
        return 0

    cdef void _leave(self) noexcept:
        self.active -= 1
        if self.closed and self.active == 0 and self.has_view:
            self._release()

    def close(self):
        """Detach this process from the ring (other processes are unaffected).

        Calls blocked in other threads wake up and raise RingClosed. Idempotent.
        """
        if self.closed:
            return
        self.closed = True
        if self.active:
            # wake our own sleepers so they notice; the last one out releases
            for _ in range(self.active):
                shm_sem_post(&self.hdr.data_sem)
                shm_sem_post(&self.hdr.space_sem)
                shm_sem_post(&self.hdr.plock_sem)
                shm_sem_post(&self.hdr.clock_sem)
        else:
            self._release()

    @property
    def closed(self):
        return self.closed

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        self.close()

    def __reduce__(self):
        if self.arena is None:
            raise TypeError("only rings that live in an Arena can be pickled")
        from shmipc.arena import _rebuild_ring
        if self.allow_pickle:
            return _rebuild_ring, (self.arena, self.name)
        return _rebuild_ring, (self.arena, self.name), {"allow_pickle": False}   # stays refused

    def __setstate__(self, state):
        self.allow_pickle = bool(state.get("allow_pickle", True))

    def __repr__(self):
        if self.closed:
            return f"<shmipc.Ring {self.name!r} closed>"
        return (f"<shmipc.Ring {self.name!r} capacity={self.capacity} "
                f"producers={'many' if self.many_producers else 'one'} "
                f"consumers={'many' if self.many_consumers else 'one'} qsize={self.qsize()}>")

    @property
    def allow_pickle(self):
        """Whether this process unpickles what it takes from the ring (True
        unless set False). Unpickling runs code of the writer's choosing:
        set it False on a ring that peers you do not trust can write, and
        only native types decode (bytes, bytearray, str, int, float, bool,
        None, numpy arrays of plain dtypes, fixed records); a pickled
        message then raises CorruptMessage (it is consumed and counted)."""
        return self.allow_pickle

    @allow_pickle.setter
    def allow_pickle(self, value):
        self.allow_pickle = bool(value)

    @property
    def capacity(self):
        """Data bytes in the ring."""
        return self.capacity

    @property
    def max_message_size(self):
        """Largest encoded message one put can carry, in bytes."""
        return self.max_payload

    @property
    def maxsize(self):
        """Most messages the ring holds at once (0: limited by bytes only)."""
        return self.maxsize

    @property
    def producers(self):
        return "many" if self.many_producers else "one"

    @property
    def consumers(self):
        return "many" if self.many_consumers else "one"

    # ------------------------------------------------------------ positions
    cdef shm_rec_t *_rec_at(self, uint64_t pos) noexcept nogil:
        return <shm_rec_t *>(self.data + (pos & self.mask))

    cdef int _corrupt(self, str what) except -1:
        raise CorruptArena(f"ring {self.name!r}: {what}")

    cdef uint64_t _rec_length(self, uint64_t pos, uint64_t head) noexcept nogil:
        """The length in the ring of the valid record header at `pos` (which
        must be < head), or 0 if anything in it is out of range."""
        cdef uint64_t off = pos & self.mask
        cdef shm_rec_t *r = <shm_rec_t *>(self.data + off)
        cdef uint32_t size = r.size
        cdef uint8_t tag = r.tag
        cdef uint64_t length = rec_len(size)
        if (pos & (SHM_REC_ALIGN - 1)) or tag > TAG_MAX or r.check != shm_rec_check(size, tag):
            return 0
        if tag == TAG_PAD:
            if length != self.capacity - off:
                return 0
        elif size > self.max_payload or length > self.capacity - off:
            return 0
        if length > head - pos or r.state > SHM_REC_DONE:
            return 0
        return length

    cdef uint64_t _check_record(self, uint64_t pos, uint64_t head) except 0:
        """Validate the record header at `pos` (which must be < head) and return
        its length in the ring. Raises CorruptArena on anything out of range."""
        cdef uint64_t length = self._rec_length(pos, head)
        if length:
            return length
        cdef uint64_t off = pos & self.mask
        cdef shm_rec_t *r = <shm_rec_t *>(self.data + off)
        cdef uint32_t size = r.size
        cdef uint8_t tag = r.tag
        if pos & (SHM_REC_ALIGN - 1):
            self._corrupt(f"position {pos} is not 16-aligned")
        if tag > TAG_MAX or r.check != shm_rec_check(size, tag):
            self._corrupt(f"garbage record header at position {pos} (tag {tag}, size {size})")
        length = rec_len(size)
        if tag == TAG_PAD:
            if length != self.capacity - off:
                self._corrupt(f"padding of {length} bytes at offset {off} does not reach the end")
        elif size > self.max_payload or length > self.capacity - off:
            self._corrupt(f"record of {size} bytes at offset {off} overruns the ring")
        if length > head - pos:
            self._corrupt(f"record of {length} bytes at position {pos} runs past the head {head}")
        if r.state > SHM_REC_DONE:
            self._corrupt(f"record at position {pos} has state {r.state}")
        self._corrupt(f"record header at position {pos} changed while it was read")

    cdef int _positions(self, uint64_t *head, uint64_t *cursor, uint64_t *tail) except -1:
        """Read and check the three positions; for the consumer side held
        (its tail and cursor cannot move meanwhile; the head only grows).

        The head is the producers' cache line: while the head last seen is
        past the cursor, it is a valid bound and is not read again, so a
        consumer that is behind costs the producer no cache-line transfer."""
        tail[0] = shm_load_acq64(&self.hdr.cons.pos)
        cursor[0] = shm_load_acq64(&self.hdr.cons.cursor)
        if cursor[0] < self.cached_head:
            head[0] = self.cached_head
        else:
            head[0] = self.cached_head = shm_load_acq64(&self.hdr.prod.pos)
        return self._check_positions(tail[0], cursor[0], head[0])

    cdef inline int _check_positions(self, uint64_t tail, uint64_t cursor, uint64_t head) except -1:
        """CorruptArena unless tail <= cursor <= head within one capacity."""
        if not (tail <= cursor <= head) or head - tail > self.capacity:
            self._corrupt(f"positions out of order: tail {tail}, cursor {cursor}, "
                          f"head {head}, capacity {self.capacity}")
        return 0

    # ------------------------------------------------------------ waiting
    cdef bint _ready(self, int kind, uint64_t need) noexcept nogil:
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t head, tail, off, total
        if kind == W_DATA:
            return shm_load_acq64(&h.prod.pos) != shm_load_acq64(&h.cons.cursor) or \
                shm_load_rlx32(&h.wait.shutdown) != 0
        if kind == W_SPACE:
            if shm_load_rlx32(&h.wait.shutdown):
                return True
            if self.maxsize and shm_load_rlx64(&h.prod.msgs) - shm_load_rlx64(&h.cons.msgs) >= self.maxsize:
                return False
            head = shm_load_acq64(&h.prod.pos)
            tail = shm_load_acq64(&h.cons.pos)
            off = head & self.mask
            total = need if need <= self.capacity - off else self.capacity - off + need
            return head - tail <= self.capacity - total
        if kind == W_PLOCK:
            return shm_cas64(&h.prod.lock, 0, shm_self_ident())
        return shm_cas64(&h.cons.lock, 0, shm_self_ident())

    cdef bint _wait(self, int kind, uint64_t need, int64_t deadline) except -1:
        """Wait until `kind` is ready. Returns False when ready, True when the
        deadline passed. Spins briefly (GIL released), then sleeps on the
        kind's semaphore in slices, between which it checks Ctrl-C, close,
        the deadline, and whether the process it waits for died.

        The spin only helps while the peer runs on another CPU. When the
        peer last put, took or waited on the CPU we run on now (or, its CPU
        unknown, this process may use one CPU only), a busy spin would hold the very CPU the peer needs
        to make us ready (issue 11: 50 us round trips against 6 us for a
        pipe); there the spin yields the CPU at every step instead, so the
        peer runs at once and no semaphore post or sleep is paid -- unless
        yields were found to hand the CPU to a third task (YIELD_SLOW_NS):
        then the wait sleeps at once for a while."""
        global n_pause_spins, n_yield_spins, n_spin_wins, cpus_allowed
        cdef shm_ring_t *h = self.hdr
        cdef int64_t now, spin_end, start
        cdef bint ok = False
        cdef bint shared
        cdef int i
        cdef uint32_t cpu, peer_cpu
        cdef uint32_t *my_slot
        cdef uint32_t *peer_slot
        cdef sem_t *sem
        cdef uint32_t *waiters
        cdef uint64_t moved
        cdef int64_t after
        cdef uint64_t *other_msgs       # the count the process we wait for moves
        if self._ready(kind, need):
            return False
        if deadline == 0:
            return not self._recover_at_deadline(kind, need)
        other_msgs = &h.prod.msgs if kind == W_DATA or kind == W_PLOCK else &h.cons.msgs
        # Where do we run, and where did the peer last put, take or wait?
        # Each side publishes its CPU after every put / take (shm_publish_cpu)
        # and here, and writes the shared line only when the CPU changed. Lock waits (W_PLOCK / W_CLOCK) wait
        # for a process of our own side: only the affinity rule applies there.
        # Pinned to one CPU alone proves nothing (the peer may be pinned to
        # another): it decides only when the peer's CPU is not known.
        shared = cpus_allowed <= 1
        if kind == W_DATA or kind == W_SPACE:
            cpu = shm_cpu_now()
            if kind == W_DATA:
                my_slot, peer_slot = &h.wait.cons_cpu, &h.wait.prod_cpu
            else:
                my_slot, peer_slot = &h.wait.prod_cpu, &h.wait.cons_cpu
            if shm_load_rlx32(my_slot) != cpu:
                shm_store_rel32(my_slot, cpu)
            peer_cpu = shm_load_rlx32(peer_slot)
            if cpu != 0 and peer_cpu != 0:
                shared = peer_cpu == cpu
            else:                       # rare (the first waits): read it afresh
                cpus_allowed = shm_cpus_allowed()
                shared = cpus_allowed <= 1
        now = start = shm_now_ns()
        if shared and now < yield_off_until:
            spin_end = now                  # yields were slow: sleep at once (see YIELD_BACKOFF_MIN_NS)
        else:
            spin_end = now + self.spin_ns
            if shared:
                n_yield_spins += 1
            else:
                n_pause_spins += 1
        if spin_end > deadline:
            spin_end = deadline
        with nogil:
            while not ok and spin_end > start:
                if shared:
                    moved = shm_load_rlx64(other_msgs)
                    shm_yield()
                    ok = self._ready(kind, need)
                    after = shm_now_ns()
                    if after - now > YIELD_SLOW_NS and shm_load_rlx64(other_msgs) - moved < YIELD_SLOW_MSGS:
                        slow_yield(after)
                        break
                    now = after
                else:
                    for i in range(64):
                        if self._ready(kind, need):
                            ok = True
                            break
                        shm_cpu_relax()
                    now = shm_now_ns()
                if ok or now >= spin_end:
                    break
        if ok:
            n_spin_wins += 1
            if self.spin_ns < SPIN_MAX_NS:
                self.spin_ns *= 2
            return False
        if kind == W_DATA:
            sem, waiters = &h.data_sem, &h.wait.data_waiters
        elif kind == W_SPACE:
            sem, waiters = &h.space_sem, &h.wait.space_waiters
        elif kind == W_PLOCK:
            sem, waiters = &h.plock_sem, &h.wait.plock_waiters
        else:
            sem, waiters = &h.clock_sem, &h.wait.clock_waiters
        try:
            return self._sleep(kind, need, deadline, sem, waiters)
        finally:
            # Adapt the spin to how long waits really take: one that ended
            # within SPIN_MAX_NS would have been cheaper spun through (a sleep
            # and wake-up cost tens of microseconds); a long one was not worth
            # spinning for. Halving on every sleep alone gets stuck sleeping
            # under load, where even short waits overrun a tiny budget.
            if shm_now_ns() - start < SPIN_MAX_NS:
                self.spin_ns = min(self.spin_ns * 2, SPIN_MAX_NS)
            elif self.spin_ns > SPIN_MIN_NS:
                self.spin_ns //= 2

    cdef bint _sleep(self, int kind, uint64_t need, int64_t deadline, sem_t *sem, uint32_t *waiters) except -1:
        """The sleeping half of _wait."""
        global cpus_allowed
        cdef shm_ring_t *h = self.hdr
        cdef int64_t now, slice_end, t0
        cdef int rc
        cpus_allowed = shm_cpus_allowed()   # affinity may have changed (taskset -p)
        while True:
            shm_add32(waiters, 1)           # seq_cst: orders against the ready check
            if self._ready(kind, need):
                shm_add32(waiters, -1)
                return False
            now = shm_now_ns()
            slice_end = now + SLICE_NS
            if slice_end > deadline:
                slice_end = deadline
            with nogil:
                rc = shm_sem_wait_until(sem, slice_end)
            shm_add32(waiters, -1)
            t0 = shm_now_ns()
            if kind == W_SPACE or kind == W_PLOCK:
                shm_add64(&h.counters.producer_sleeps, 1)
                shm_add64(&h.counters.producer_blocked_ns, <uint64_t>(t0 - now))
            else:
                shm_add64(&h.counters.consumer_sleeps, 1)
                shm_add64(&h.counters.consumer_blocked_ns, <uint64_t>(t0 - now))
            if self._ready(kind, need):
                return False
            PyErr_CheckSignals()
            if self.closed:
                raise RingClosed(f"ring {self.name!r} was closed while waiting")
            if t0 >= deadline:
                return not self._recover_at_deadline(kind, need)
            if rc != 0 and rc != ETIMEDOUT and rc != EINTR:
                self._corrupt(f"waiting on a semaphore failed: {os.strerror(rc)}")
            if rc == ETIMEDOUT:
                if self._look_around(kind):
                    return False
                if kind == W_SPACE:
                    self._check_room_accounts()

    cdef inline bint _await_data(self, int64_t deadline) except -1:
        """For the one-consumer fast paths of get and get_many, found empty:
        wait for data up to `deadline` (raising what _take would: closed,
        peer died, Ctrl-C). True if the fast path may be tried again (the
        ring was not closed meanwhile); shutdown and a passed deadline are
        left to the general path, which reports them."""
        self._enter()
        try:
            self._wait(W_DATA, 0, deadline)
        finally:
            self._leave()
        return not self.closed

    cdef bint _recover_at_deadline(self, int kind, uint64_t need) except -1:
        """A wait ran out (or was not allowed: block=False): recover what
        dead processes hold, as a whole quiet slice would have, at most once
        a slice per ring in this process. True if that made `kind` ready.

        Callers that wait in steps no longer than a slice (the Queue's
        large-message writer, any loop of short timeouts or of put_nowait /
        get_nowait) never reach the look-around at the end of a slice, and
        what a dead process holds (a lock, a claimed record at the tail)
        would never come back. Only the recovering kinds: a dead peer of a
        one-to-one side still ends such a wait as Empty/Full (PeerDied is
        raised after a whole quiet slice, as before)."""
        cdef int64_t now
        if not (kind == W_PLOCK or kind == W_CLOCK or (kind == W_SPACE and self.many_consumers)):
            return False
        now = shm_now_ns()
        if now - self.recovered_ns < SLICE_NS:
            return False
        self.recovered_ns = now
        return self._look_around(kind) or self._ready(kind, need)

    cdef bint _look_around(self, int kind) except -1:
        """After a quiet slice: raise if the peer we wait for is dead, recover
        what dead processes hold. Returns True if that made `kind` ready."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t owner, pid, me = shm_self_ident()
        cdef uint64_t *lock
        if kind == W_PLOCK or kind == W_CLOCK:
            lock = &h.prod.lock if kind == W_PLOCK else &h.cons.lock
            owner = shm_load_acq64(lock)
            if owner != 0 and owner != me and not shm_ident_alive(owner):
                if shm_cas64(lock, owner, me):
                    try:
                        self._recover_lock(kind)
                    except BaseException:
                        self._unlock(kind)
                        raise
                    return True
            return False
        if kind == W_DATA:
            pid = shm_load_rlx64(&h.prod.pid)
            if not self.many_producers and pid != 0 and pid != me and not shm_ident_alive(pid):
                if not self._ready(W_DATA, 0):
                    raise PeerDied(<uint32_t>pid, "producer")
            return False
        # W_SPACE
        pid = shm_load_rlx64(&h.cons.pid)
        if not self.many_consumers:
            if pid != 0 and pid != me and not shm_ident_alive(pid):
                raise PeerDied(<uint32_t>pid, "consumer")
            return False
        # many consumers: a dead one may sit on a claimed record at the tail,
        # or on the consumer lock; take the lock if it is free or dead, and repair
        owner = shm_load_acq64(&h.cons.lock)
        if owner == 0:
            if not shm_cas64(&h.cons.lock, 0, me):
                return False
            self._locked(&h.cons)
            try:
                self._reclaim_dead_claims()
            finally:
                self._unlock(W_CLOCK)
        elif owner != me and not shm_ident_alive(owner) and shm_cas64(&h.cons.lock, owner, me):
            try:
                self._recover_lock(W_CLOCK)
            finally:
                self._unlock(W_CLOCK)
        return False

    cdef int _check_room_accounts(self) except -1:
        """A producer that waited a quiet slice for room: raise CorruptArena
        if the positions or the message counts it waits on cannot be right,
        for then no consumer will ever make room (a forged tail, or counts
        claiming `maxsize` messages in an empty ring, made put() block for
        ever). Checked only while no commit is under way, so a producer
        stopped between counting and publishing is not taken for damage:
        one producer (this one, waiting), or many with their lock free
        (taken for the check). A consumer counts a message before it moves
        the cursor past it, so reading the cursor first errs the safe way."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t tail, cursor, head, taken, sent
        cdef int64_t count
        if self.many_producers:
            if not shm_cas64(&h.prod.lock, 0, shm_self_ident()):
                return 0
            self._locked(&h.prod)
        try:
            tail = shm_load_acq64(&h.cons.pos)
            cursor = shm_load_acq64(&h.cons.cursor)
            taken = shm_load_acq64(&h.cons.msgs)
            head = shm_load_acq64(&h.prod.pos)
            sent = shm_load_acq64(&h.prod.msgs)
            self._check_positions(tail, cursor, head)
            count = <int64_t>(sent - taken)
            if count < 0 or <uint64_t>count > (head - cursor) // SHM_REC_HDR:
                self._corrupt(f"message counts out of order: {sent} sent and {taken} taken, "
                              f"but {head - cursor} bytes unread (at least {SHM_REC_HDR} a message)")
        finally:
            if self.many_producers:
                self._unlock(W_PLOCK)
        return 0

    cdef int _recover_dead(self) except -1:
        """Take back, now and without waiting, what dead processes hold on the
        sides that can be shared: a many-producer ring's producer lock, a
        many-consumer ring's consumer lock and claimed records. A lock held by
        a live process is left alone (its holder is not waited for)."""
        if self.many_producers and self._look_around(W_PLOCK):
            self._unlock(W_PLOCK)
        if self.many_consumers:
            self._look_around(W_SPACE)
        return 0

    cdef int _reclaim_dead_claims(self) except -1:
        """With the consumer lock held: release records claimed by dead
        processes (their messages are lost and counted), then move the tail.
        A ring that keeps dead claims (_keep_dead_claims) leaves them for
        _take_back."""
        cdef uint64_t head, cursor, tail, pos, length, me = shm_self_ident()
        cdef shm_rec_t *r
        self._positions(&head, &cursor, &tail)
        pos = tail
        while pos < cursor:
            length = self._check_record(pos, head)
            r = self._rec_at(pos)
            if r.tag != TAG_PAD and r.state != SHM_REC_DONE:
                if r.state != SHM_REC_CLAIMED or (
                        not self.keep_dead_claims and r.owner != me and not shm_ident_alive(r.owner)):
                    shm_store_rel8(&r.state, SHM_REC_DONE)
                    shm_add64(&self.hdr.counters.lost, 1)
                    shm_add64(&self.hdr.counters.recoveries, 1)
            pos += length
        self._advance_tail()
        return 0

    cdef bint _lock(self, int kind, int64_t deadline) except -1:
        """Take a side's lock; True if the deadline passed first."""
        cdef shm_side_t *side = &self.hdr.prod if kind == W_PLOCK else &self.hdr.cons
        if not shm_cas64(&side.lock, 0, shm_self_ident()) and self._wait(kind, 0, deadline):
            return True
        self._locked(side)
        return False

    cdef void _locked(self, shm_side_t *side) noexcept:
        """Just took `side`'s lock: note the consistent point recovery rolls back to."""
        side.lock_msgs = side.msgs          # (first: see _consistent_point)
        shm_store_rel64(&side.lock_pos, side.cursor if side == &self.hdr.cons else side.pos)

    cdef bint _holding(self) noexcept:
        """True in the thread that holds the producer lock across puts
        (_hold_producers). The lock's owner is checked too: a forked child
        inherits hold_thread but not the lock."""
        return (self.hold_thread != 0 and self.hold_thread == PyThread_get_thread_ident()
                and shm_load_rlx64(&self.hdr.prod.lock) == shm_self_ident())

    cdef bint _held_elsewhere(self) except -1:
        """True if this thread holds the producers through another Ring
        object of this ring (see g_holds): waiting for them would be waiting
        for itself."""
        return (shm_load_rlx64(&self.hdr.prod.lock) == shm_self_ident()
                and g_holds.get(self._hold_key()) == PyThread_get_thread_ident())

    cdef object _hold_key(self):
        """What names this ring in g_holds whichever mapping of it this object
        uses: the backing file and the ring's offset in it (the mapping's
        address for an arena without a descriptor)."""
        if self.hold_key is None:
            fd = getattr(self.arena, "fd", -1)
            offset = <size_t>self.hdr - <size_t>self.view.buf if self.has_view else 0
            if fd is not None and fd >= 0:
                st = os.fstat(fd)
                self.hold_key = (st.st_dev, st.st_ino, offset)
            else:
                self.hold_key = (<size_t>self.hdr,)
        return self.hold_key

    def _hold_producers(self, timeout=None):
        """Take the producer lock and keep it across this thread's puts until
        _release_producers(): the messages put meanwhile are contiguous in the
        ring, with no other producer's in between (a Pipe's chunked message,
        or a mark and the record it marks, from one of several senders).
        Other producers -- other processes, and other threads of this one --
        wait meanwhile; a holder that dies is recovered from as any lock
        holder (what it committed stays, the rest is dropped). A one-producer
        ring has nothing to hold: True at once. Returns False if `timeout`
        seconds (None: no limit) passed first.

        Raises:
            RuntimeError: this thread holds it already.
        """
        cdef int64_t deadline = deadline_of(True, timeout)
        if not self.many_producers:
            return True
        self._enter()
        try:
            if self._holding() or self._held_elsewhere():
                raise RuntimeError(self._held_message())
            if self._lock(W_PLOCK, deadline):
                return False
            self.hold_thread = PyThread_get_thread_ident()
            g_holds[self._hold_key()] = self.hold_thread
            return True
        finally:
            self._leave()

    def _holds_producers(self):
        """True in the thread that holds the producers (_hold_producers)."""
        return self.hdr != NULL and (self._holding() or self._held_elsewhere())

    def _put_held(self, obj, timeout=None):
        """put, by the thread that holds the producers (_hold_producers): the
        record goes in under the hold. Plain puts of that thread meanwhile
        (a signal handler's, another coroutine's) raise RuntimeError rather
        than land inside the held message. A plain put on a one-producer
        ring.

        Raises:
            queue.Full: no room within `timeout` seconds (None: no limit).
            RuntimeError: this thread does not hold the producers.
            As put otherwise.
        """
        cdef enc_t e
        cdef int64_t deadline = deadline_of(True, timeout)
        segs = self._encode(obj, &e)
        self._check_size(&e)
        self._enter()
        try:
            if self._produce(&e, 1, segs, False, deadline, True) == 0:
                raise queue.Full
        finally:
            self._leave()

    def _held_message(self):
        return (f"this thread is in the middle of a message of several records on ring "
                f"{self.name!r} (a chunked Pipe message); a signal handler or another "
                f"coroutine of the same thread cannot put on it until that message is in")

    def _release_producers(self):
        """Let go of the producer lock _hold_producers took (other producers
        go on). Does nothing in a thread that does not hold it."""
        if self.hdr != NULL and self._holding():
            self._end_hold()

    cdef void _end_hold(self) noexcept:
        """The hold of _hold_producers is over: forget it (its key was made
        when the hold was taken), free the lock."""
        self.hold_thread = 0
        g_holds.pop(self._hold_key(), None)
        self._unlock(W_PLOCK)

    cdef int _recover_lock(self, int kind) except -1:
        """Just took over the lock of a dead holder: make the side consistent.

        Producers commit by storing head; a holder that died before that
        wrote nothing visible: its message is lost, and a `msgs` it had
        already counted is rolled back. Consumers advance the cursor per
        message; what a dead holder took since locking is lost and counted
        (records claimed by it are released by _reclaim_dead_claims, or in
        a ring that keeps dead claims, left claimed for _take_back)."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t head, cursor, tail, pos, length, taken = 0, kept = 0
        cdef shm_rec_t *r
        shm_add64(&h.counters.recoveries, 1)
        if kind == W_PLOCK:
            if h.prod.pos == h.prod.lock_pos and h.prod.msgs != h.prod.lock_msgs:
                shm_add64(&h.counters.lost, h.prod.msgs - h.prod.lock_msgs)
                h.prod.msgs = h.prod.lock_msgs
            return 0
        # The consumer side's point (lock_pos, lock_msgs) is at most one lock
        # hold old and never behind the tail (_consistent_point runs before
        # the tail moves and at every unlock). The messages are those counted
        # there plus the records the dead holder took since: unless it died
        # between its two stores of that point, where the sum exceeds `msgs`,
        # which is then right (no message was under way while it stored it);
        # and `msgs` one above the sum when it died between counting a
        # message and moving the cursor past it, which the sum corrects.
        self._positions(&head, &cursor, &tail)
        pos = h.cons.lock_pos
        if tail <= pos <= cursor:
            while pos < cursor:
                length = self._check_record(pos, head)
                r = self._rec_at(pos)
                if r.tag != TAG_PAD:
                    taken += 1
                    if self.keep_dead_claims and r.state == SHM_REC_CLAIMED:
                        kept += 1       # taken, not lost: for _take_back
                    else:
                        shm_store_rel8(&r.state, SHM_REC_DONE)
                pos += length
            if h.cons.lock_msgs + taken < h.cons.msgs:
                h.cons.msgs = h.cons.lock_msgs + taken
            shm_add64(&h.counters.lost, taken - kept)
        # (a point outside tail..cursor was forged: `msgs` is left as it is)
        self._reclaim_dead_claims()
        return 0

    cdef void _unlock(self, int kind) noexcept:
        cdef shm_ring_t *h = self.hdr
        if kind == W_PLOCK:
            shm_release_fenced64(&h.prod.lock)
            shm_wake(&h.plock_sem, &h.wait.plock_waiters)
        else:
            self._consistent_point()        # the next holder starts from a true point
            shm_release_fenced64(&h.cons.lock)
            shm_wake(&h.clock_sem, &h.wait.clock_waiters)

    # ------------------------------------------------------------ producing
    cdef uint64_t _reserve(self, uint64_t head, uint64_t length, uint64_t pending) except? 1:
        """With the producer side held and `head` the next free position (with
        `pending` messages written but not yet committed): find room for a
        record of `length` bytes, writing a PAD record first if it would cross
        the end. Returns the position to write at, or 1 (never a valid
        position) if the ring is full."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t off = head & self.mask
        cdef uint64_t to_end = self.capacity - off
        cdef uint64_t total = length if length <= to_end else to_end + length
        cdef shm_rec_t *pad
        if head & (SHM_REC_ALIGN - 1):
            self._corrupt(f"head {head} is not 16-aligned")
        if head < self.cached_tail or head - self.cached_tail > self.capacity - total:
            self.cached_tail = shm_load_acq64(&h.cons.pos)
            if head < self.cached_tail or head - self.cached_tail > self.capacity:
                self._corrupt(f"head {head} and tail {self.cached_tail} are out of order")
            # the high-water mark is sampled here, when the producer refreshes
            # its view of the tail: at least once a lap, and whenever the ring
            # looks full, which is when the maximum happens
            if head - self.cached_tail > h.counters.high_water:
                h.counters.high_water = head - self.cached_tail
            if head - self.cached_tail > self.capacity - total:
                return 1
        if self.maxsize and (shm_load_rlx64(&h.prod.msgs) + pending
                             - shm_load_rlx64(&h.cons.msgs) >= self.maxsize):
            return 1
        if total != length:
            pad = <shm_rec_t *>(self.data + off)
            pad.size = <uint32_t>(to_end - SHM_REC_HDR)
            pad.tag = TAG_PAD
            pad.state = SHM_REC_READY
            pad.check = shm_rec_check(pad.size, TAG_PAD)
            pad.owner = 0
            return head + to_end
        return head

    cdef int _write_record(self, uint64_t pos, enc_t *e, object segs) except -1:
        """Write one record at `pos` (reserved for rec_len(e.size) bytes). Its
        payload is e.ptr[:e.size], or when `segs` is a list its segments at
        16-byte boundaries; never more than e.size bytes, whatever they hold."""
        cdef shm_rec_t *r = self._rec_at(pos)
        cdef char *dst = <char *>r + SHM_REC_HDR
        cdef Py_buffer b
        cdef Py_ssize_t off = 0
        r.size = <uint32_t>e.size
        r.tag = e.tag
        r.state = SHM_REC_READY
        r.check = shm_rec_check(r.size, e.tag)
        r.owner = 0
        if type(segs) is not list:      # None, or the object e.ptr borrows from
            memcpy(dst, e.ptr, e.size)
            return 0
        for seg in <list>segs:
            off = align16(off)
            PyObject_GetBuffer(seg, &b, PyBUF_SIMPLE)
            try:
                if b.len > e.size - off:
                    raise RuntimeError(f"a message's buffers grew from {e.size} bytes while it was put")
                memcpy(dst + off, b.buf, b.len)
                off += b.len
            finally:
                PyBuffer_Release(&b)
        return 0

    cdef inline void _commit(self, uint64_t head, uint64_t nmsgs, uint64_t nbytes) noexcept:
        """Publish records up to `head` (the producer side held: its lock, or
        one producer). Consumers are not woken: see _signal_data, _publish."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t me = shm_self_ident()
        if h.prod.pid != me:
            h.prod.pid = me
        h.prod.msgs += nmsgs
        h.prod.bytes += nbytes
        shm_store_rel64(&h.prod.pos, head)     # the commit point
        # consistent again (see _recover_lock; one-producer rings never read
        # them, and two stores to our own line cost nothing measurable)
        h.prod.lock_msgs = h.prod.msgs      # (first: a holder killed between the two
        shm_store_rel64(&h.prod.lock_pos, head)     # leaves pos != lock_pos: nothing rolled back)

    cdef inline void _signal_data(self) noexcept:
        """After a commit: the full fence that orders it before the waiter
        count (Dekker, see the module docstring), then wake a consumer asleep
        waiting for data, and send a readiness byte if one is due."""
        cdef shm_ring_t *h = self.hdr
        shm_fence()
        shm_wake(&h.data_sem, &h.wait.data_waiters)
        if self.notify_fd >= 0:                 # readiness fds: see _ready_rearm
            shm_signal_ready(&h.wait.ready_signalled, self.notify_fd, self.notify_socket)

    cdef inline void _publish(self, uint64_t head, uint64_t nmsgs, uint64_t nbytes) noexcept:
        """Commit records up to `head` and wake a consumer waiting for them
        (where the producer side needs no unlock in between)."""
        self._commit(head, nmsgs, nbytes)
        self._signal_data()

    cdef Py_ssize_t _produce(self, enc_t *encs, Py_ssize_t n, object keep, bint batch,
                             int64_t deadline, bint under_hold=False) except -1:
        """The producer protocol, for put and put_many: write the encoded
        messages encs[0:n] in order, as many at a time as there is room for
        (one lock round trip and one commit each time), waiting for room
        between. `keep` holds what the payloads live in: for a batch, a list
        with each message's segments or the object its e.ptr borrows from
        (held here so a generator's items live until copied); else the one
        message's segments or None. Returns how many were written: n, or fewer
        if the deadline passed first."""
        cdef shm_ring_t *h = self.hdr
        cdef Py_ssize_t i = 0, start
        cdef uint64_t head, pos, length, nbytes, published
        cdef bint held = self.many_producers and self._holding()    # see _hold_producers
        cdef bint lock = self.many_producers and not held
        if held != (under_hold and self.many_producers):
            if held:
                # a signal handler, or another coroutine of this thread,
                # while the thread is in the middle of a held message
                raise RuntimeError(self._held_message())
            raise RuntimeError(f"_put_held on ring {self.name!r} without _hold_producers")
        if lock and self._held_elsewhere():
            raise RuntimeError(self._held_message())
        while True:
            self._shut()
            if lock and self._lock(W_PLOCK, deadline):
                return i
            if held:
                self._locked(&h.prod)   # recovery's point: this round's start
            start = i
            head = published = shm_load_rlx64(&h.prod.pos)
            nbytes = 0
            try:
                while i < n:
                    length = rec_len(encs[i].size)
                    pos = self._reserve(head, length, i - start)
                    if pos == 1:
                        break
                    self._write_record(pos, &encs[i], keep[i] if batch else keep)
                    head = pos + length
                    nbytes += encs[i].size
                    i += 1
                    if head - published >= PUBLISH_BYTES and i < n:
                        # let the consumer start on what is written (see PUBLISH_BYTES)
                        self._publish(head, i - start, nbytes)
                        start = i
                        nbytes = 0
                        published = head
            finally:
                if i > start:           # also on an error: what was written is put
                    self._commit(head, i - start, nbytes)
                if lock:
                    self._unlock(W_PLOCK)
                if i > start:
                    self._signal_data()
                    shm_publish_cpu(&h.wait.prod_cpu)   # see _wait
            if i == n:
                return n
            # (the deadline is checked here too: _wait returns at once while
            # the ring looks ready, and garbage may keep _reserve disagreeing)
            if deadline != FOREVER and shm_now_ns() >= deadline:
                # out of time: unless room held by dead consumers comes back
                # now (see _recover_at_deadline), this call is over
                if not self._recover_at_deadline(W_SPACE, rec_len(encs[i].size)):
                    return i
            elif self._wait(W_SPACE, rec_len(encs[i].size), deadline):
                return i

    cdef int _check_size(self, enc_t *e) except -1:
        if self.record_size and e.tag != TAG_RECORD:
            raise TypeError("this ring carries fixed records; put records of its dtype")
        if <uint64_t>e.size > self.max_payload:
            raise MessageTooLarge(e.size, self.max_payload, self.capacity)
        return 0

    cdef int _shut(self) except -1:
        if shm_load_rlx32(&self.hdr.wait.shutdown):
            raise BrokenPipeError(f"ring {self.name!r} was shut down; nothing more can be put")
        return 0

    cdef object _encode(self, object obj, enc_t *e):
        if self.dtype is None:
            return encode(obj, e)
        rec = self._as_records(obj)
        if rec.ndim != 0:
            raise ValueError(f"put takes one record of {self.dtype}, got an array of shape "
                             f"{rec.shape}; use put_many for several")
        e.tag = TAG_RECORD
        e.size = self.record_size
        e.ptr = NULL
        return [rec.reshape(1).view(numpy_module().uint8)]

    def _as_records(self, obj):
        try:
            return numpy_module().asarray(obj, dtype=self.dtype)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"this ring carries fixed records of {self.dtype}; "
                            f"cannot make one of {type(obj).__name__}: {exc}") from None

    def put(self, obj, bint block=True, timeout=None):
        """Put one message. Blocks while the ring is full (up to `timeout`
        seconds; None: forever) unless block is False.

        Raises:
            queue.Full: no room in time.
            MessageTooLarge: the message can never fit (raised at once).
            BrokenPipeError: the ring was shut down.
            PeerDied: the sole consumer died while the ring was full.
            Whatever pickling the object raises; the ring is then unchanged.
        """
        cdef enc_t e
        check_timeout(block, timeout)
        segs = self._encode(obj, &e)
        if segs is None and not self.closed and (
                self._put_now_shared(&e) if self.many_producers else self._put_now(&e)):
            if SHMIPC_DEBUG:
                self._debug_check()
            return
        self._check_size(&e)
        cdef int64_t deadline = deadline_of(block, timeout)
        self._enter()
        try:
            if self._produce(&e, 1, segs, False, deadline) == 0:
                raise queue.Full
            self._debug_check()
        finally:
            self._leave()

    cdef bint _put_now(self, enc_t *e) noexcept:
        """put's fast path, for a one-producer ring (or a many-producer one
        whose lock _put_now_shared took) and a one-segment payload
        (bytes, str, scalars): write and commit the record if it fits now
        without padding and nothing is unusual (no message limit, no
        shutdown, the positions in range). False when it did nothing: the
        general path (_produce) then decides, raises or waits. The same
        steps as _reserve, _write_record and _publish, without what only
        batches, segments and locks need; no Python object is touched, so
        nothing can run in between (the GIL is held throughout)."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t head = shm_load_rlx64(&h.prod.pos)     # ours alone (one producer, or the lock held)
        cdef uint64_t length = rec_len(e.size)
        cdef uint64_t off = head & self.mask
        cdef uint64_t tail
        cdef shm_rec_t *r
        if (<uint64_t>e.size > self.max_payload or (head & (SHM_REC_ALIGN - 1))
                or length > self.capacity - off or self.maxsize
                or shm_load_rlx32(&h.wait.shutdown)):
            return False
        if head < self.cached_tail or head - self.cached_tail > self.capacity - length:
            # as in _reserve: refresh the tail (and sample the high-water mark)
            tail = shm_load_acq64(&h.cons.pos)
            if head < tail or head - tail > self.capacity - length:
                return False
            self.cached_tail = tail
            if head - tail > h.counters.high_water:
                h.counters.high_water = head - tail
        r = <shm_rec_t *>(self.data + off)
        r.size = <uint32_t>e.size
        r.tag = e.tag
        r.state = SHM_REC_READY
        r.check = shm_rec_check(<uint32_t>e.size, e.tag)
        r.owner = 0
        memcpy((<char *>r) + SHM_REC_HDR, e.ptr, e.size)
        self._publish(head + length, 1, <uint64_t>e.size)
        shm_publish_cpu(&h.wait.prod_cpu)               # see _wait
        return True

    cdef bint _put_now_shared(self, enc_t *e) noexcept:
        """_put_now for a many-producer ring, while its producer lock is
        free: taken without waiting, released at once (so several producers
        sharing one end, as a Pipe's senders may, cost one atomic exchange
        each, not the general path). False when the lock is taken (by
        another producer, or held by this process's _hold_producers): the
        general path waits for it, or writes under the hold."""
        cdef shm_ring_t *h = self.hdr
        cdef bint done
        if not shm_cas64(&h.prod.lock, 0, shm_self_ident()):
            return False
        self._locked(&h.prod)
        done = self._put_now(e)
        self._unlock(W_PLOCK)
        return done

    cdef Py_ssize_t _put_many_now(self, enc_t *encs, Py_ssize_t n) noexcept:
        """put_many's fast path, for a one-producer ring and one-segment
        payloads: _put_now for each of encs[0:n] in turn with one commit
        (and one every PUBLISH_BYTES), stopping at the first that does not
        fit without padding or at anything unusual. Returns how many it
        wrote; _produce does the rest."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t head = shm_load_rlx64(&h.prod.pos)     # ours alone: one producer
        cdef uint64_t published = head, nbytes = 0, length, off, tail
        cdef Py_ssize_t i = 0, start = 0
        cdef shm_rec_t *r
        if (head & (SHM_REC_ALIGN - 1)) or self.maxsize or shm_load_rlx32(&h.wait.shutdown):
            return 0
        while i < n:
            length = rec_len(encs[i].size)
            off = head & self.mask
            if <uint64_t>encs[i].size > self.max_payload or length > self.capacity - off:
                break
            if head < self.cached_tail or head - self.cached_tail > self.capacity - length:
                tail = shm_load_acq64(&h.cons.pos)
                if head < tail or head - tail > self.capacity - length:
                    break
                self.cached_tail = tail
                if head - tail > h.counters.high_water:
                    h.counters.high_water = head - tail
            r = <shm_rec_t *>(self.data + off)
            r.size = <uint32_t>encs[i].size
            r.tag = encs[i].tag
            r.state = SHM_REC_READY
            r.check = shm_rec_check(<uint32_t>encs[i].size, encs[i].tag)
            r.owner = 0
            memcpy((<char *>r) + SHM_REC_HDR, encs[i].ptr, encs[i].size)
            head += length
            nbytes += <uint64_t>encs[i].size
            i += 1
            if head - published >= PUBLISH_BYTES or i == n:
                self._publish(head, i - start, nbytes)
                published = head
                start = i
                nbytes = 0
        if i > start:
            self._publish(head, i - start, nbytes)
        if i:
            shm_publish_cpu(&h.wait.prod_cpu)               # see _wait
        return i

    cdef int _debug_check(self) except -1:
        """Debug builds: the positions are in order after every call."""
        cdef uint64_t head, cursor, tail
        if SHMIPC_DEBUG and not self.closed:
            # read in this order: others may move any of them meanwhile, but
            # each only grows, so honest values still read tail <= cursor <= head
            tail = shm_load_acq64(&self.hdr.cons.pos)
            cursor = shm_load_acq64(&self.hdr.cons.cursor)
            head = shm_load_acq64(&self.hdr.prod.pos)
            if not (tail <= cursor <= head):
                self._corrupt(f"positions out of order: tail {tail}, cursor {cursor}, head {head}")
            if self.hdr.wait.data_waiters > 100000 or self.hdr.wait.space_waiters > 100000:
                self._corrupt("waiter counts out of range")
        return 0

    def put_nowait(self, obj):
        """put(obj, block=False)."""
        return self.put(obj, False)

    def put_many(self, items, bint block=True, timeout=None):
        """Put every item of an iterable (a 1-d array of records, for
        fixed-record rings), publishing them in batches. Returns how many
        were put.

        On queue.Full (timeout) or any error, the items before the failing one
        are in the ring; ``exc.args[0]`` of queue.Full holds that count.
        """
        cdef enc_t encs[64]
        cdef Py_ssize_t n, written, done = 0
        cdef int64_t deadline = deadline_of(block, timeout)
        cdef bint records = self.dtype is not None
        cdef bint plain
        cdef list keep
        if records:
            arr = self._as_records(items)
            if arr.ndim != 1:
                raise ValueError(f"put_many takes a 1-d array of records, got shape {arr.shape}")
            items = arr.view(numpy_module().uint8).reshape(len(arr), self.record_size) if len(arr) else ()
        it = iter(items)
        self._enter()
        try:
            while True:
                # encode a batch before taking any lock: pickling may run user code
                keep = []
                n = 0
                error = None
                plain = not records and not self.many_producers
                try:
                    for obj in it:
                        if records:
                            encs[n].tag = TAG_RECORD
                            encs[n].size = self.record_size
                            encs[n].ptr = NULL
                            keep.append([obj])
                        elif type(obj) is bytes:      # (encode's first case, inline)
                            encs[n].tag = TAG_BYTES
                            encs[n].ptr = PyBytes_AS_STRING(obj)
                            encs[n].size = PyBytes_GET_SIZE(obj)
                            if <uint64_t>encs[n].size > self.max_payload:
                                self._check_size(&encs[n])
                            keep.append(obj)
                        else:
                            segs = encode(obj, &encs[n])
                            if <uint64_t>encs[n].size > self.max_payload:
                                self._check_size(&encs[n])
                            # a borrowed e.ptr points into obj: hold obj until it is copied
                            if segs is None:
                                keep.append(obj)
                            else:
                                keep.append(segs)
                                plain = False
                        n += 1
                        if n == BATCH:
                            break
                except Exception as exc:
                    error = exc         # put the items before it, then raise
                if n == 0:
                    if error is not None:
                        raise error
                    return done
                written = self._put_many_now(encs, n) if plain else 0
                if written < n:
                    if written:
                        del keep[:written]
                    written += self._produce(encs + written, n - written, keep, True, deadline)
                done += written
                if written < n:
                    raise queue.Full(done)
                if error is not None:
                    raise error
        finally:
            self._leave()

    # ------------------------------------------------------------ consuming
    cdef shm_rec_t *_take(self, int64_t deadline, uint64_t *pos_out, uint64_t *len_out) except? NULL:
        """Find the next message at the cursor, skipping padding. Returns NULL
        if the deadline passed first. With many consumers, returns holding the
        consumer lock; the caller must _unlock(W_CLOCK)."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t head, cursor, tail, length
        cdef shm_rec_t *r
        cdef bint got, skipped
        while True:
            if self.many_consumers and self._lock(W_CLOCK, deadline):
                return NULL
            got = skipped = False
            try:
                self._positions(&head, &cursor, &tail)
                while cursor != head:
                    length = self._check_record(cursor, head)
                    r = self._rec_at(cursor)
                    if r.tag != TAG_PAD:
                        got = True
                        break
                    cursor += length
                    shm_store_rel64(&h.cons.cursor, cursor)
                    skipped = True
                if skipped:
                    self._advance_tail()
            except BaseException:
                if self.many_consumers:
                    self._unlock(W_CLOCK)
                raise
            if got:
                pos_out[0] = cursor
                len_out[0] = length
                return r
            if self.many_consumers:
                self._unlock(W_CLOCK)
            if shm_load_rlx32(&h.wait.shutdown):
                raise EOFError(f"ring {self.name!r} was shut down and is empty")
            if deadline != FOREVER and shm_now_ns() >= deadline:
                return NULL     # (as in _produce)
            if self._wait(W_DATA, 0, deadline):
                return NULL

    cdef object _consume(self, int64_t deadline, Py_ssize_t max_items, Py_ssize_t max_bytes,
                         int claim, list out, list tags, take_t *t):
        """The consumer protocol, for get, get_many and get_view: wait (up to
        `deadline`) for a message, then take it and whatever else is already
        there, up to `max_items` messages or `max_bytes` payload bytes, in
        one lock round trip.

        Each message is copied out (_copy_out), or for a fixed-record ring
        into one buffer; with `claim` (a zero-copy view, max_items 1) a
        buffer payload is left in place, CLAIMED; with CLAIM_ANY (a held
        message, see Ring._get_held) any payload is. Returns, and sets t.count
        (0 if the deadline passed first):
          - `out` is None (one message): the object copied out, its tag in
            t.tag (t.tag >= TAG_NDARRAY: a bytearray still to decode), or
            None if claimed (t.claimed; t.pos, t.rec, t.size, t.tag say where);
          - else, a fixed-record ring: a bytearray of t.count records;
          - else: None, the objects appended to `out` and their tags to `tags`.

        A record that cannot be delivered (a garbage header or payload,
        invalid UTF-8, a non-record in a fixed-record ring) is consumed and
        raised (CorruptArena / CorruptMessage) only if it is the first;
        later, the batch ends before it, so the good ones are delivered and
        the next call raises for it."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t pos, length, head, released
        cdef shm_rec_t *r
        cdef uint8_t tag = 0
        cdef uint32_t size = 0
        cdef Py_ssize_t k = 0, nbytes = 0, off = 0
        cdef bint raw = False, hold = False, first = True
        cdef char *dst = NULL
        one = records = None
        t.count = 0
        t.claimed = False
        r = self._take(deadline, &pos, &length)
        if r == NULL:
            return None
        released = pos
        # The first record is taken with no try/except (the fast path of get):
        # while `first` is set, the finally below consumes and counts it if
        # anything raised about it. Later records of a batch end the batch
        # instead (the next call meets them first).
        try:
            head = pos + length
            if max_items > 1:
                # one fresh look at the head per batch: take all there is
                head = self.cached_head = shm_load_acq64(&h.prod.pos)
                if head < pos + length or head - pos > self.capacity:
                    first = False
                    self._corrupt(f"head {head} moved out of range of the cursor {pos}")
            if self.record_size and out is not None:
                k = (head - pos) // rec_len(self.record_size) + 1
                if k > max_items:
                    k = max_items
                records = PyByteArray_FromStringAndSize(NULL, k * self.record_size)
                dst = records
                k = 0
            while True:
                # r: a message record at pos, of `length` bytes in the ring
                if not self._payload(r, length, &tag, &size):
                    if not first:
                        break
                    self._bad_payload(tag, size, length)
                if records is not None:
                    memcpy(dst + off, (<char *>r) + SHM_REC_HDR, size)
                    off += size
                else:
                    hold = claim == CLAIM_ANY or (claim and (tag < TAG_STR or tag > TAG_NONE))
                    if hold:
                        pass
                    elif first:
                        one = self._copy_out((<char *>r) + SHM_REC_HDR, tag, size, &raw)
                    else:
                        try:
                            one = self._copy_out((<char *>r) + SHM_REC_HDR, tag, size, &raw)
                        except Exception:
                            break
                first = False
                self._consumed(pos, length, r, size, hold)
                k += 1
                nbytes += size
                if out is not None and records is None:
                    out.append(one)
                    tags.append(tag)
                pos += length
                if k == max_items or (max_bytes > 0 and nbytes >= max_bytes):
                    break
                if pos - released >= PUBLISH_BYTES:
                    self._move_tail()       # give the producer room now (see PUBLISH_BYTES)
                    released = pos
                # the next message record, past any padding
                while pos != head:
                    length = self._rec_length(pos, head)
                    if length == 0:
                        break
                    r = self._rec_at(pos)
                    if r.tag != TAG_PAD:
                        break
                    pos += length
                    shm_store_rel64(&h.cons.cursor, pos)
                if pos == head or length == 0:
                    break
        finally:
            if first:       # raised about the first record: consume it, or it blocks the ring
                self._consumed(pos, length, r, size, False)
                shm_add64(&h.counters.bad_messages, 1)
            self._move_tail()       # garbage past what was taken: the next call raises
            if self.many_consumers:
                self._unlock(W_CLOCK)
        t.count = k
        t.tag = tag
        if hold:
            t.claimed = True
            t.pos = pos - length
            t.rec = r
            t.size = size
        return one if out is None else records

    cdef void _consumed(self, uint64_t pos, uint64_t length, shm_rec_t *r, uint32_t size, bint claim) noexcept:
        """Mark the record at `pos` taken: DONE after a copy, CLAIMED while a
        view is open on it; then move the cursor past it."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t me = shm_self_ident()
        if claim:
            r.owner = me
            shm_store_rel8(&r.state, SHM_REC_CLAIMED)
        else:
            shm_store_rel8(&r.state, SHM_REC_DONE)
        if h.cons.pid != me:
            h.cons.pid = me
        h.cons.msgs += 1
        h.cons.bytes += size
        shm_store_rel64(&h.cons.cursor, pos + length)

    cdef inline void _consistent_point(self) noexcept:
        """Consumer side held, between messages (`msgs` and the cursor
        agree): record them as the point recovery from this holder's death
        counts from (see _recover_lock). `lock_msgs` first: a holder killed
        between the two stores leaves a count too high for its position,
        which recovery recognises (it exceeds `msgs`), never one too low."""
        cdef shm_ring_t *h = self.hdr
        h.cons.lock_msgs = h.cons.msgs
        shm_store_rel64(&h.cons.lock_pos, h.cons.cursor)

    cdef bint _move_tail(self) noexcept:
        """Move the tail over DONE and PAD records (consumer side held) and
        wake a producer waiting for room. False if garbage stopped it (it
        moves as far as the records are valid)."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t tail = shm_load_rlx64(&h.cons.pos)
        cdef uint64_t cursor = shm_load_rlx64(&h.cons.cursor)
        cdef uint64_t start = tail, length
        cdef shm_rec_t *r
        cdef bint ok = True
        if cursor < tail or cursor - tail > self.capacity:
            return False
        while tail < cursor:
            r = self._rec_at(tail)
            if r.tag != TAG_PAD and r.state != SHM_REC_DONE:
                break
            length = self._rec_length(tail, cursor)
            if length == 0:
                ok = False
                break
            tail += length
        if tail != start:
            self._consistent_point()        # first: the tail never passes lock_pos
            shm_store_rel64(&h.cons.pos, tail)
            shm_fence()
            shm_wake(&h.space_sem, &h.wait.space_waiters)
            shm_publish_cpu(&h.wait.cons_cpu)   # see _wait
        return ok

    cdef int _advance_tail(self) except -1:
        """_move_tail, raising CorruptArena if garbage stopped it."""
        cdef uint64_t tail, cursor
        if not self._move_tail():
            tail = shm_load_rlx64(&self.hdr.cons.pos)
            cursor = shm_load_rlx64(&self.hdr.cons.cursor)
            if cursor < tail or cursor - tail > self.capacity:
                self._corrupt(f"cursor {cursor} and tail {tail} are out of order")
            self._corrupt(f"garbage record between the tail {tail} and the cursor {cursor}")
        return 0

    cdef bint _payload(self, shm_rec_t *r, uint64_t length, uint8_t *tag, uint32_t *size) noexcept:
        """Read a message record's tag and size once (another process could
        change them under us) and check them against the validated length,
        and in a fixed-record ring, against the record size."""
        tag[0] = r.tag
        size[0] = r.size
        if tag[0] == TAG_PAD or tag[0] > TAG_MAX or SHM_REC_HDR + <uint64_t>size[0] > length:
            return False
        return not self.record_size or (tag[0] == TAG_RECORD and size[0] == self.record_size)

    cdef int _bad_payload(self, uint8_t tag, uint32_t size, uint64_t length) except -1:
        if self.record_size:
            self._corrupt(f"record of tag {tag} and {size} bytes in a ring of "
                          f"{self.record_size}-byte records")
        self._corrupt(f"record changed under the reader (tag {tag}, size {size}, length {length})")

    cdef object _copy_out(self, const char *p, uint8_t tag, uint32_t size, bint *raw):
        """Copy a payload into a new object (bytes, str and scalars final;
        other payloads as a bytearray to decode, with raw set). Only allocates
        objects the garbage collector does not track, so no user code can run
        while the consumer lock is held."""
        raw[0] = False
        if tag == TAG_BYTES:
            return PyBytes_FromStringAndSize(p, size)
        if tag == TAG_STR:
            try:
                return PyUnicode_DecodeUTF8(p, size, NULL)
            except UnicodeDecodeError as exc:
                raise CorruptMessage(f"str message is not valid UTF-8: {exc}") from None
        if tag == TAG_BYTEARRAY:
            return PyByteArray_FromStringAndSize(p, size)
        if TAG_INT <= tag <= TAG_NONE:
            return decode_scalar(tag, p, size)
        raw[0] = True
        return PyByteArray_FromStringAndSize(p, size)

    cdef object _decode(self, uint8_t tag, object buf):
        """Decode a buffer payload (after the record was released or while it
        is claimed). A payload that does not decode costs that one message:
        counted, and raised as CorruptMessage (UndecodableMessage when its
        pickle, intact, fails to load here), chained from the cause."""
        try:
            return decode_buffer(tag, buf, self.dtype, self.allow_pickle)
        except Exception as exc:
            if not self.closed and self.hdr != NULL:
                shm_add64(&self.hdr.counters.bad_messages, 1)
            if isinstance(exc, CorruptMessage):
                raise
            raise CorruptMessage(f"{TAG_NAMES[tag]} message does not decode: "
                                 f"{type(exc).__name__}: {exc}") from exc

    cdef list _from_pending(self, Py_ssize_t max_items):
        """Deliver up to `max_items` messages left over from a batch whose
        decoding failed part way (see get_many), in order; the failure
        itself is raised when it comes first. A KeyboardInterrupt or
        SystemExit while one decodes leaves it, and the values taken before
        it, at the front for the next call."""
        cdef list result = []
        cdef uint8_t tag
        pending = self.pending
        try:
            while pending and len(result) < max_items:
                tag, value = pending[0]
                if tag == TAG_FAILED:
                    if result:
                        break
                    pending.popleft()
                    raise value
                if tag >= TAG_NDARRAY:
                    try:
                        value = self._decode(tag, value)
                    except CorruptMessage as exc:
                        pending.popleft()
                        if not result:
                            raise
                        pending.appendleft((TAG_FAILED, exc))
                        break
                    except BaseException:
                        pending.extendleft([(TAG_PAD, v) for v in reversed(result)])
                        raise
                pending.popleft()
                result.append(value)
        finally:
            if not pending and self.pending is pending:
                self.pending = None     # (None when empty: the fast paths test one pointer)
        return result

    cdef int _keep_undelivered(self, list items) except -1:
        """Put (tag, value) pairs back at the front of `pending`, in order,
        for the next get (TAG_PAD: a value already decoded)."""
        if items:
            if self.pending is None:
                self.pending = deque()
            self.pending.extendleft(reversed(items))
        return 0

    cdef object _decode_or_keep(self, uint8_t tag, object buf):
        """_decode a message already taken from the ring; a KeyboardInterrupt
        or SystemExit raised while it decodes (a signal handler runs inside
        unpickling's Python code) keeps the payload at the front of `pending`
        instead of losing it: the next get decodes it again."""
        try:
            return self._decode(tag, buf)
        except Exception:
            raise
        except BaseException:
            self._keep_undelivered([(tag, buf)])
            raise

    def get(self, bint block=True, timeout=None):
        """Take the next message, blocking while the ring is empty (up to
        `timeout` seconds; None: forever) unless block is False.

        Raises:
            queue.Empty: nothing arrived in time.
            EOFError: the ring was shut down and is empty.
            PeerDied: the sole producer died and everything it sent was read.
            CorruptMessage: the message does not decode (it is consumed and
                counted in ``stats()["bad_messages"]``; the ring goes on);
                UndecodableMessage, a subclass, when its pickle fails to load
                here (a class this process cannot import, an exception class
                whose ``__init__`` takes other arguments), chained from that.
            CorruptArena: the shared memory holds garbage.
        """
        cdef take_t t
        cdef bint done
        cdef int64_t deadline
        if self.pending is not None:
            self._check_open()
            return self._from_pending(1)[0]
        if not self.many_consumers and not self.closed and self.record_size == 0:
            check_timeout(block, timeout)
            out = self._get_now(&done)
            if done:
                return out
            deadline = deadline_of(block, timeout)
            if deadline != 0 and self._empty_now():
                # wait here, then take the fast path again: a round trip
                # (ping-pong) waits on every get, and the general path
                # costs it ~400 instructions more (_wait raises what _take
                # would: closed, peer died, Ctrl-C; shutdown and the
                # deadline fall through to the general path below)
                if self._await_data(deadline):
                    out = self._get_now(&done)
                    if done:
                        return out
        else:
            deadline = deadline_of(block, timeout)
        self._enter()
        try:
            out = self._consume(deadline, 1, 0, False, None, None, &t)
            self._debug_check()
        finally:
            self._leave()
        if t.count == 0:
            raise queue.Empty
        if t.tag >= TAG_NDARRAY:
            return self._decode_or_keep(t.tag, out)
        return out

    cdef object _get_now(self, bint *done):
        """get's fast path, for a one-consumer ring with no view open (tail
        == cursor): take the message at the cursor if one is there and its
        header checks out, and release its space at once (tail and cursor
        move together, so the record is never CLAIMED or DONE: no write to
        the producer's lines but the tail). Leaves `done` False, having
        changed nothing, for anything else (empty ring, padding, a view
        open, anything out of range, a str that is not UTF-8): the general
        path (_consume) then waits, skips, raises or counts. A payload that
        needs decoding (ndarray, pickle) is copied out, released, then
        decoded, as the general path does."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t tail = shm_load_rlx64(&h.cons.pos)     # ours alone: one consumer
        cdef uint64_t cursor = shm_load_rlx64(&h.cons.cursor)
        cdef uint64_t head = self.cached_head
        cdef uint64_t off, length, me
        cdef shm_rec_t hd
        cdef const char *p
        cdef bint ok
        done[0] = False
        if cursor != tail or (cursor & (SHM_REC_ALIGN - 1)):
            return None
        if cursor >= head:
            head = shm_load_acq64(&h.prod.pos)
            if head <= cursor:
                return None         # empty (or garbage: the general path says so)
            self.cached_head = head
        if head - cursor > self.capacity:
            return None
        off = cursor & self.mask
        hd = shm_rec_snapshot(<shm_rec_t *>(self.data + off))
        length = snap_length(&hd, off, head - cursor, self.capacity, self.max_payload)
        if length == 0 or hd.tag == TAG_PAD or hd.tag == TAG_RECORD:
            return None             # (a record in a ring without a dtype: the general path raises)
        p = self.data + off + SHM_REC_HDR
        if hd.tag == TAG_BYTES:
            out = PyBytes_FromStringAndSize(p, hd.size)
        elif hd.tag == TAG_NDARRAY or hd.tag == TAG_PICKLE:
            out = PyByteArray_FromStringAndSize(p, hd.size)     # decoded below, once released
        else:
            out = plain_payload(p, hd.tag, hd.size, &ok)
            if not ok:
                return None         # the general path consumes, counts and raises it
        me = shm_self_ident()
        if h.cons.pid != me:
            h.cons.pid = me
        h.cons.msgs += 1
        h.cons.bytes += hd.size
        shm_store_rel64(&h.cons.cursor, cursor + length)
        shm_store_rel64(&h.cons.pos, cursor + length)       # released: the producer may reuse it
        shm_fence()
        shm_wake(&h.space_sem, &h.wait.space_waiters)
        shm_publish_cpu(&h.wait.cons_cpu)                   # see _wait
        done[0] = True
        if SHMIPC_DEBUG:
            self._debug_check()
        if hd.tag >= TAG_NDARRAY:
            return self._decode_or_keep(hd.tag, out)
        return out

    cdef bint _empty_now(self) noexcept:
        """One consumer, no view open: nothing committed past the cursor (and
        the positions plausible: else the general path raises)."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t cursor = shm_load_rlx64(&h.cons.cursor)
        return (cursor == shm_load_rlx64(&h.cons.pos)
                and shm_load_acq64(&h.prod.pos) == cursor and not shm_load_rlx32(&h.wait.shutdown))

    cdef list _get_many_now(self, Py_ssize_t max_items, Py_ssize_t max_bytes, list tags):
        """get_many's fast path, for a one-consumer ring with no view open:
        take the messages from the cursor on, up to `max_items` or
        `max_bytes`, stopping before any that cannot be delivered (a
        garbage header, a str that is not UTF-8, a scalar of the wrong
        size: the next call meets it first, as in _consume), releasing their
        space as it goes (every PUBLISH_BYTES) and at the end. Plain
        payloads (see plain_payload) come final; ndarray and pickle ones
        as bytearrays, with every message's tag then in `tags` (else
        `tags` stays empty), for get_many to decode. None, having changed
        nothing, if it took none (empty ring, a first message that cannot
        be delivered): the general path then decides."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t tail = shm_load_rlx64(&h.cons.pos)     # ours alone: one consumer
        cdef uint64_t cursor = shm_load_rlx64(&h.cons.cursor)
        cdef uint64_t head, pos, off, length, released, released_bytes = 0
        cdef Py_ssize_t k = 0, released_k = 0, nbytes = 0
        cdef shm_rec_t hd
        cdef bint ok, raw = False
        cdef list out
        if cursor != tail or (cursor & (SHM_REC_ALIGN - 1)):
            return None
        head = shm_load_acq64(&h.prod.pos)      # one fresh look per batch: take all there is
        if head <= cursor or head - cursor > self.capacity:
            return None             # empty (or garbage: the general path says so)
        self.cached_head = head
        out = []
        pos = released = cursor
        try:
            while pos != head:
                off = pos & self.mask
                hd = shm_rec_snapshot(<shm_rec_t *>(self.data + off))
                length = snap_length(&hd, off, head - pos, self.capacity, self.max_payload)
                if length == 0:
                    break
                if hd.tag == TAG_BYTES:
                    obj = PyBytes_FromStringAndSize(self.data + off + SHM_REC_HDR, hd.size)
                elif hd.tag == TAG_NDARRAY or hd.tag == TAG_PICKLE:
                    # copied out now, decoded by get_many once released
                    obj = PyByteArray_FromStringAndSize(self.data + off + SHM_REC_HDR, hd.size)
                    if not raw:
                        tags.extend([TAG_BYTES] * k)    # (plain: any tag below TAG_NDARRAY)
                        raw = True
                elif hd.tag != TAG_PAD:
                    obj = plain_payload(self.data + off + SHM_REC_HDR, hd.tag, hd.size, &ok)
                    if not ok:
                        break
                if hd.tag != TAG_PAD:
                    if raw:
                        tags.append(hd.tag)
                    out.append(obj)
                    k += 1
                    nbytes += hd.size
                pos += length
                if k == max_items or (max_bytes > 0 and nbytes >= max_bytes):
                    break
                if pos - released >= PUBLISH_BYTES:
                    self._release_taken(released, pos, k - released_k, nbytes - released_bytes)
                    released, released_k, released_bytes = pos, k, nbytes
        except MemoryError:
            if k == 0:
                raise
            # deliver what was taken; `pos` is the record that failed,
            # which the next call meets first
            del tags[k:]
        if k == 0:
            return None
        if pos != released:
            self._release_taken(released, pos, k - released_k, nbytes - released_bytes)
        if SHMIPC_DEBUG:
            self._debug_check()
        return out

    cdef void _release_taken(self, uint64_t start, uint64_t end, Py_ssize_t nmsgs, uint64_t nbytes) noexcept:
        """One consumer, no view open: messages taken from `start` (the tail
        and cursor) to `end`; move both there and wake a producer waiting for room."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t me = shm_self_ident()
        if h.cons.pid != me:
            h.cons.pid = me
        h.cons.msgs += nmsgs
        h.cons.bytes += nbytes
        shm_store_rel64(&h.cons.cursor, end)
        shm_store_rel64(&h.cons.pos, end)
        shm_fence()
        shm_wake(&h.space_sem, &h.wait.space_waiters)
        shm_publish_cpu(&h.wait.cons_cpu)                   # see _wait

    def get_nowait(self):
        """get(block=False)."""
        return self.get(False)

    def get_many(self, max_items, bint block=True, timeout=None, *, max_bytes=None):
        """Take up to `max_items` messages: waits (as get does) for the first,
        then takes whatever else is already there. Returns a list, or for
        fixed-record rings one structured array.

        max_bytes: stop once the messages taken hold that many payload bytes
        (at least one message is always taken); 0: no limit. By default 64 KiB
        (fixed-record rings: no limit, their batch is one buffer). A batch of
        large messages gains nothing from batching but costs a burst of
        allocations: freed together, they cross malloc's trim threshold
        (128 KiB in glibc), and every batch then pays brk() calls and page
        faults anew (issue 11: batched 64 KiB messages ran at a quarter of
        single gets).

        A message that cannot be delivered costs only itself: the call returns
        the messages before it, and the next call (get, get_many or get_view)
        raises its error (as get does), then the ones after it follow, in
        order; none is lost or delivered twice. If it is the first, this call
        raises.
        """
        cdef take_t t
        cdef Py_ssize_t i = 0, k, limit, want
        # (both are upper bounds: any larger int means "no more than there
        # is"; converted in C, as a typed argument would be: this runs on
        # every batch, and a Python-level min() or lookup costs ~100 ns)
        want = as_bound(max_items)
        if want < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        if max_bytes is None:
            limit = 0 if self.record_size else BATCH_BYTES
        else:
            limit = as_bound(max_bytes)
            if limit < 0:
                raise ValueError(f"max_bytes must be 0 (no limit) or more, got {max_bytes}")
        if self.pending is not None:
            self._check_open()
            return self._from_pending(want)
        cdef list out = None
        cdef list tags = []
        cdef int64_t deadline
        deadline = deadline_of(block, timeout)
        if not self.many_consumers and not self.closed and self.record_size == 0:
            out = self._get_many_now(want, limit, tags)
            if out is None and deadline != 0 and self._empty_now():
                # wait, then take the fast path again (as get does)
                if self._await_data(deadline):
                    out = self._get_many_now(want, limit, tags)
            if out is not None and not tags:
                return out
        if out is None:
            out = []
            self._enter()
            try:
                records = self._consume(deadline, want, limit, False, out, tags, &t)
            finally:
                self._leave()
            if t.count == 0:
                raise queue.Empty
            if records is not None:
                return numpy_module().frombuffer(records, dtype=self.dtype, count=t.count)
        k = len(out)
        try:
            for i in range(k):
                if <uint8_t>tags[i] >= TAG_NDARRAY:
                    out[i] = self._decode(tags[i], out[i])
        except CorruptMessage as exc:
            # keep the rest, undecoded and in order, for the next calls
            self._keep_undelivered(([(TAG_FAILED, exc)] if i else []) + list(zip(tags[i + 1:], out[i + 1:])))
            if i == 0:
                raise
            del out[i:]
        except BaseException:
            # a KeyboardInterrupt or SystemExit while message i decodes:
            # every message of the batch waits, in order, for the next call
            self._keep_undelivered([(TAG_PAD, v) for v in out[:i]] + list(zip(tags[i:], out[i:])))
            del out[:]
            raise
        return out

    def get_view(self, bint block=True, timeout=None):
        """Zero-copy receive: ``with ring.get_view() as msg:`` gives the next
        message as a read-only memoryview (bytes-like messages) or read-only
        numpy array over the ring memory, valid until the block ends; other
        types come decoded as usual. The ring space is freed on leaving."""
        return MessageView(self, deadline_of(block, timeout), False)

    def _get_held(self, bint block=True, timeout=None):
        """``with ring._get_held() as msg:`` gives the next message as get()
        does (a copy: it stays valid after the block), but its record stays
        claimed by this process until the block ends. In a ring that keeps
        dead claims (_keep_dead_claims), a consumer killed inside the block
        leaves the message for _take_back instead of losing it: so a
        consumer can write down what it took before letting the ring forget
        it (the pipeline's workers)."""
        return MessageView(self, deadline_of(block, timeout), True)

    def _keep_dead_claims(self):
        """From now on, in this process (and processes forked from it later),
        records claimed by consumers that died are never released by the
        ring's recovery (which counts them lost): they hold their room until
        _take_back hands them over. For a ring whose owner calls _take_back
        whenever it learns that a consumer died (shmipc.pipeline)."""
        self.keep_dead_claims = True

    def _take_back(self, double timeout=0.05):
        """The messages claimed (a view or _get_held block) by consumers that
        have died, now released: a list of ``(pid, message)``, in ring order;
        a message that does not decode is given as its CorruptMessage. None
        if the consumer side could not be had within `timeout` seconds (a
        live consumer holds it: try again later). Each is handed over once;
        counted in ``stats()["recoveries"]``, not in ``lost``."""
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t head, cursor, tail, pos, length, owner, me
        cdef shm_rec_t *r
        cdef uint8_t tag
        cdef uint32_t size
        cdef bint raw
        cdef int64_t deadline = deadline_of(True, timeout)
        taken = []
        self._enter()
        try:
            me = shm_self_ident()
            # (a consumer killed holding the consumer side is taken over at
            # once, not after the quiet slice a wait for it would take)
            if self.many_consumers and not self._look_around(W_CLOCK) and self._lock(W_CLOCK, deadline):
                return None
            try:
                self._positions(&head, &cursor, &tail)
                pos = tail
                while pos < cursor:
                    length = self._check_record(pos, head)
                    r = self._rec_at(pos)
                    if r.tag != TAG_PAD and r.state == SHM_REC_CLAIMED:
                        owner = r.owner
                        if owner != me and not shm_ident_alive(owner):
                            if self._payload(r, length, &tag, &size):
                                # (only objects the collector does not track: no
                                # user code runs under the lock; decoded below)
                                obj = self._copy_out((<char *>r) + SHM_REC_HDR, tag, size, &raw)
                                taken.append((<uint32_t>owner, tag if raw else 0, obj))
                            else:
                                shm_add64(&h.counters.bad_messages, 1)
                                taken.append((<uint32_t>owner, 0, CorruptMessage(
                                    f"claimed record at position {pos} changed under the reader "
                                    f"(tag {tag}, size {size}, length {length})")))
                            shm_store_rel8(&r.state, SHM_REC_DONE)
                            shm_add64(&h.counters.recoveries, 1)
                    pos += length
                self._advance_tail()
            finally:
                if self.many_consumers:
                    self._unlock(W_CLOCK)
        finally:
            self._leave()
        out = []
        for pid, tag, obj in taken:
            if tag:
                try:
                    obj = self._decode(tag, obj)
                except CorruptMessage as exc:
                    obj = exc
            out.append((pid, obj))
        return out

    cdef int _release_claim(self, uint64_t pos, int64_t deadline) except -1:
        """Mark a record this process claimed DONE, then move the tail if the
        consumer side can be had by `deadline`; if not, its holder or the next
        consumer (or a producer short of room, after a wait slice) moves it."""
        cdef shm_rec_t *r = self._rec_at(pos)
        # an atomic store: a claim is ours alone, and the tail only moves
        # over DONE records; a claim taken back by recovery (we looked dead)
        # is no longer ours
        if r.state == SHM_REC_CLAIMED and r.owner == shm_self_ident():
            shm_store_rel8(&r.state, SHM_REC_DONE)
        if self.many_consumers:
            if self.closed:
                deadline = 0
            if self._lock(W_CLOCK, deadline):
                return 0
        try:
            self._advance_tail()
        finally:
            if self.many_consumers:
                self._unlock(W_CLOCK)
        return 0

    # ------------------------------------------------------------ readiness
    def _set_notify(self, int fd, bint is_socket=False):
        """Readiness fds (shmipc.connection, shmipc.queues): after each
        commit, this process's puts send one byte on `fd` (this process's
        descriptor: a pipe's write end, or a socket when `is_socket`)
        whenever no readiness byte is out (see _ready_rearm). -1 turns it off.
        Process-local: every producer process sets its own."""
        self.notify_fd = fd
        self.notify_socket = is_socket

    def _ready_rearm(self):
        """The consumer half of the readiness protocol. Returns True if the
        caller must now take one readiness byte out of its descriptor (it
        was sent and stands for nothing any more), False if it must leave it.

        Invariant (with producers that set a notify fd): while the ring holds
        a message (or is shut down), a readiness byte is out
        (wait.ready_signalled == 1) -- it was sent by the commit that found
        none out, or is about to be, by a producer between its exchange and
        its send. Re-arming only when the ring looks empty, with the
        Dekker re-check below (the producer: commit, fence, read the flag),
        keeps it: a commit racing the re-arm either sees 0 and sends a new
        byte (then the old one is taken out), or was seen by the re-check
        (then the old byte stays for it)."""
        self._check_open()
        cdef shm_ring_t *h = self.hdr
        if shm_load_rlx32(&h.wait.ready_signalled) == 0:
            return False                # no byte out: nothing to take
        if self._ready(W_DATA, 0):
            return False                # messages there: the byte stays
        if not shm_cas32(&h.wait.ready_signalled, 1, 0):
            return False                # another consumer re-armed first
        shm_fence()
        if self._ready(W_DATA, 0):      # a commit raced the re-arm
            if shm_cas32(&h.wait.ready_signalled, 0, 1):
                return False            # it sent nothing: the old byte stands for it
            return True                 # it sent a byte of its own: take the old one
        return True

    # ------------------------------------------------------------ state
    def qsize(self):
        """Messages in the ring now (approximate while others put and get),
        plus any this process took but has yet to deliver (see get_many)."""
        self._check_open()
        cdef uint64_t i = shm_load_rlx64(&self.hdr.prod.msgs)
        cdef uint64_t o = shm_load_rlx64(&self.hdr.cons.msgs)
        return (i - o if i > o else 0) + (len(self.pending) if self.pending is not None else 0)

    def empty(self):
        """True if the ring holds no message now (approximate)."""
        return self.qsize() == 0

    def full(self):
        """True if not even an empty message would fit now (approximate)."""
        if self.closed:
            raise RingClosed(f"ring {self.name!r} is closed")
        cdef uint64_t i = shm_load_rlx64(&self.hdr.prod.msgs)
        cdef uint64_t o = shm_load_rlx64(&self.hdr.cons.msgs)
        if self.maxsize and i > o and i - o >= self.maxsize:
            return True
        cdef uint64_t used = shm_load_rlx64(&self.hdr.prod.pos) - shm_load_rlx64(&self.hdr.cons.pos)
        cdef uint64_t least = rec_len(self.record_size)
        return used + least > self.capacity

    def shutdown(self):
        """Mark the ring finished, for every process: further puts raise
        BrokenPipeError; gets drain what is left, then raise EOFError."""
        self._enter()
        try:
            shm_store_rel32(&self.hdr.wait.shutdown, 1)
            shm_fence()
            # (bounded: the counts themselves may be garbage)
            for _ in range(min(shm_load_rlx32(&self.hdr.wait.data_waiters), 4096)):
                shm_sem_post(&self.hdr.data_sem)
            for _ in range(min(shm_load_rlx32(&self.hdr.wait.space_waiters), 4096)):
                shm_sem_post(&self.hdr.space_sem)
        finally:
            self._leave()

    @property
    def is_shutdown(self):
        """True once shutdown() was called by any process."""
        if self.closed:
            raise RingClosed(f"ring {self.name!r} is closed")
        return shm_load_rlx32(&self.hdr.wait.shutdown) != 0

    def stats(self, *, bint recover=True):
        """Live counters kept in the shared memory, as a dict.

        ``lost``: messages lost with a dead process; ``bytes_held``: ring
        space taken but not yet released (records claimed by views, or by
        dead consumers of a ring that keeps their claims); ``bad_messages``: messages
        taken that could not be delivered (garbage records, payloads that
        failed to decode), each raised to the call that took it.

        With `recover` (the default), what dead processes hold is first taken
        back (a side's lock, records claimed by a zero-copy view), as a waiting
        producer or consumer would after a quiet slice: without it, a consumer
        killed holding the last message of a stream would not be counted in
        ``lost`` until some producer next waited for room. ``recover=False``
        only reads (the inspector's way: it may be looking at a damaged ring)."""
        if self.closed:
            raise RingClosed(f"ring {self.name!r} is closed")
        if recover:
            self._enter()
            try:
                self._recover_dead()
            finally:
                self._leave()
        cdef shm_ring_t *h = self.hdr
        cdef uint64_t head = shm_load_rlx64(&h.prod.pos)
        cdef uint64_t tail = shm_load_rlx64(&h.cons.pos)
        cdef uint64_t cursor = shm_load_rlx64(&h.cons.cursor)
        return {
            "capacity": self.capacity,
            "producers": self.producers,
            "consumers": self.consumers,
            "messages_in": shm_load_rlx64(&h.prod.msgs),
            "bytes_in": shm_load_rlx64(&h.prod.bytes),
            "messages_out": shm_load_rlx64(&h.cons.msgs),
            "bytes_out": shm_load_rlx64(&h.cons.bytes),
            "qsize": self.qsize(),
            "bytes_used": head - tail if head >= tail else 0,
            "bytes_held": cursor - tail if cursor >= tail and cursor - tail <= self.capacity else 0,
            "high_water": shm_load_rlx64(&h.counters.high_water),
            "producers_waiting": shm_load_rlx32(&h.wait.space_waiters) + shm_load_rlx32(&h.wait.plock_waiters),
            "consumers_waiting": shm_load_rlx32(&h.wait.data_waiters) + shm_load_rlx32(&h.wait.clock_waiters),
            "producer_sleeps": shm_load_rlx64(&h.counters.producer_sleeps),
            "consumer_sleeps": shm_load_rlx64(&h.counters.consumer_sleeps),
            "producer_blocked_s": shm_load_rlx64(&h.counters.producer_blocked_ns) / 1e9,
            "consumer_blocked_s": shm_load_rlx64(&h.counters.consumer_blocked_ns) / 1e9,
            "recoveries": shm_load_rlx64(&h.counters.recoveries),
            "lost": shm_load_rlx64(&h.counters.lost),
            "bad_messages": shm_load_rlx64(&h.counters.bad_messages),
            "shutdown": shm_load_rlx32(&h.wait.shutdown) != 0,
            "producer_pid": <uint32_t>shm_load_rlx64(&h.prod.pid),
            "consumer_pid": <uint32_t>shm_load_rlx64(&h.cons.pid),
        }


cdef class MessageView:
    """The context manager returned by Ring.get_view()."""
    cdef Ring ring
    cdef int64_t deadline
    cdef uint64_t pos
    cdef bint held
    cdef bint copy          # Ring._get_held: a copy out, the record held until the block ends
    cdef object mv
    cdef readonly bint is_bytearray     # the record was put as a bytearray (a Pipe's chunk)

    def __cinit__(self, Ring ring, int64_t deadline, bint copy):
        self.ring = ring
        self.deadline = deadline
        self.held = False
        self.copy = copy

    def __enter__(self):
        cdef Ring ring = self.ring
        cdef take_t t
        if self.held:
            raise RuntimeError("this view is already open")
        if ring.pending is not None:
            ring._check_open()
            return ring._from_pending(1)[0]
        cdef bint raw
        ring._enter()
        try:
            out = ring._consume(self.deadline, 1, 0, CLAIM_ANY if self.copy else 1, None, None, &t)
        except BaseException:
            ring._leave()
            raise
        if not t.claimed:
            ring._leave()
            if t.count == 0:
                raise queue.Empty
            if t.tag >= TAG_NDARRAY:        # cannot happen: such payloads are claimed
                return ring._decode(t.tag, out)
            return out                      # str and scalars come copied: nothing is held
        self.pos = t.pos
        self.held = True
        global g_views_open
        g_views_open += 1
        try:
            if self.copy:
                out = ring._copy_out((<char *>t.rec) + SHM_REC_HDR, t.tag, t.size, &raw)
                return ring._decode(t.tag, out) if raw else out
            if ring.data_view is None:
                # one read-only view of the ring's data per ring, made at its
                # first get_view: each message's view is then a slice of it
                # (one new memoryview, where three and an export of the mmap
                # made a put and view of 64 B cost 1,593 ns, now 623)
                start = ring.data - <char *>ring.view.buf
                ring.data_view = memoryview(ring.buffer)[start: start + ring.capacity].toreadonly()
            start = (<char *>t.rec) + SHM_REC_HDR - ring.data
            self.mv = ring.data_view[start: start + t.size]
            self.is_bytearray = t.tag == TAG_BYTEARRAY
            if t.tag == TAG_BYTES or t.tag == TAG_BYTEARRAY:
                return self.mv
            return ring._decode(t.tag, self.mv)
        except BaseException as exc:
            if not isinstance(exc, Exception) and t.tag >= TAG_NDARRAY:
                # interrupted while it decoded (KeyboardInterrupt): a copy
                # waits in `pending` for the next get, as in get
                ring._keep_undelivered([(t.tag, PyByteArray_FromStringAndSize(
                    (<char *>t.rec) + SHM_REC_HDR, t.size))])
            self._close(shm_now_ns() + CLAIM_RELEASE_NS)
            raise

    cdef int _close(self, int64_t deadline) except -1:
        global g_views_open
        if not self.held:
            return 0
        self.held = False
        g_views_open -= 1
        if self.mv is not None:
            try:
                self.mv.release()
            except BufferError:
                pass        # the caller kept an array over it: its contents may change
            self.mv = None
        try:
            self.ring._release_claim(self.pos, deadline)
        finally:
            self.ring._leave()
        return 0

    def __exit__(self, exc_type, exc_value, traceback):
        # bounded: the record is released at once; only moving the tail
        # waits for the consumer lock, and that can be left to others
        self._close(shm_now_ns() + CLAIM_RELEASE_NS)
        return False

    def __dealloc__(self):
        # a finalizer must not wait: try the consumer lock once
        if self.held and self.ring is not None:
            try:
                self._close(0)
            except BaseException:
                pass
