"""A pool's shared memory follows its traffic (issue 11: a ``Pool(2)`` mapped
~560 MiB of address space for ~1 MB in use, and kept every page a large
message had touched for its whole life).

* The rings every task and result go through are small (a few MiB: a map
  chunk larger than a message is cut into pieces, a result list too).
* The rare single value too large for them goes through one of two "big"
  rings (parent -> workers, workers -> parent) that live in shared memory of
  their own (:class:`BigRings`): made before the workers start, so they
  inherit it (or receive it as a file descriptor under spawn and
  forkserver), but *mapped* by a process only while it moves big messages:
  a worker unmaps it at its first idle wait, the parent when the pool has
  been idle for IDLE_RELEASE_S.
* When a pool has been idle for :data:`IDLE_RELEASE_S`, the parent gives
  the pages back (:func:`give_back`): ``fallocate(PUNCH_HOLE)`` on the data
  of every empty ring that only the parent writes (each worker's task ring,
  the big task ring) and, when no task is in flight (so no worker can be
  writing one), the big result ring. A punched page reads as zeros, which
  is what a fresh ring holds; a ring's positions live in its header, which
  is never punched. The shared result ring (written by workers, the zygote
  and the parent's other threads at any time) is not punched: it is small.

Invariant kept by the callers (the engine's lock): no process writes a ring
while its pages are punched; that is why only empty rings whose every
producer is the caller, or is known to be idle, are punched.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from typing import Any, Iterable

from shmipc import _ring
from shmipc.arena import Arena
from shmipc._proc import libc

__all__ = ["BigRings", "give_back", "IDLE_RELEASE_S"]

IDLE_RELEASE_S = 1.0          # a pool idle this long gives its ring pages back
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2
_PAGE = mmap.PAGESIZE

_fallocate_fn: Any = None


def _fallocate() -> Any:
    global _fallocate_fn
    if _fallocate_fn is None:
        fn = _fallocate_fn = libc().fallocate
        fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return _fallocate_fn


def punch(fd: int, offset: int, length: int) -> int:
    """Free the whole pages of ``fd[offset:offset + length]`` (they read as
    zeros afterwards, for every process mapping them). Returns the bytes
    freed, 0 if the file system cannot punch holes."""
    start = -(-offset // _PAGE) * _PAGE
    end = (offset + length) // _PAGE * _PAGE
    if end <= start:
        return 0
    if _fallocate()(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, end - start) != 0:
        return 0
    return end - start


def ring_data(arena: Arena, names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """{ring name: (offset, length) of its data area in the arena's file}."""
    wanted = set(names)
    return {r.name: (r.offset + _ring.RING_HEADER_SIZE, r.size - _ring.RING_HEADER_SIZE)
            for r in arena.regions() if r.name in wanted}


def give_back(fd: int, areas: Iterable[tuple[Any, tuple[int, int]]]) -> int:
    """Punch the data area of each empty ring of `areas` ((ring, (offset,
    length)) pairs in the file `fd`). The caller guarantees that nobody
    writes these rings meanwhile (see the module docstring). Returns the
    bytes freed."""
    freed = 0
    for ring, (offset, length) in areas:
        try:
            if ring.stats(recover=False)["bytes_used"]:
                continue
        except Exception:           # closed under us: nothing to give back
            continue
        freed += punch(fd, offset, length)
    return freed


class _LazyRing:
    """One of the big rings, as the engine and the workers use it: the same
    methods as a Ring, mapped at the first call that needs the memory."""

    __slots__ = ("_owner", "_name", "capacity", "max_message_size")

    def __init__(self, owner: "BigRings", name: str, capacity: int, max_message_size: int) -> None:
        self._owner = owner
        self._name = name
        self.capacity = capacity
        self.max_message_size = max_message_size

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._owner._ring(self._name), attr)


class BigRings:
    """The two big rings of a pool ("bigtasks", one producer: the parent;
    "bigresults", one consumer: the parent) in a memfd of their own, mapped
    in each process only while used (see the module docstring).

    Made in the parent before the workers start; passed to them with the
    worker's arguments (a forked worker inherits the descriptor; pickled
    for spawn/forkserver, it travels as a duplicated descriptor).
    """

    def __init__(self, capacity: int) -> None:
        self._fd = -1
        self._arena: Arena | None = None
        self._rings: dict[str, Any] = {}
        arena = Arena(Arena.size_for(rings=[capacity, capacity]))
        try:
            tasks = arena.ring(capacity, name="bigtasks", producers="one", consumers="many")
            arena.ring(capacity, name="bigresults", producers="many", consumers="one")
            limit = tasks.max_message_size
            self._areas = ring_data(arena, ("bigtasks", "bigresults"))
            self._fd = os.dup(arena.fd)
        finally:
            arena.close()           # unmapped: the address space comes back at once
        self._setup(capacity, limit)

    def _setup(self, capacity: int, limit: int) -> None:
        self.capacity = capacity
        self.tasks = _LazyRing(self, "bigtasks", capacity, limit)
        self.results = _LazyRing(self, "bigresults", capacity, limit)

    def _ring(self, name: str) -> Any:
        ring = self._rings.get(name)
        if ring is None:
            if self._fd < 0:
                raise ValueError("the big rings were closed")
            if self._arena is None:
                # (a new open of the same memfd: its own mapping and descriptor, released alone)
                try:
                    self._arena = Arena.from_file(f"/proc/self/fd/{self._fd}", follow_symlinks=True)
                except OSError:         # no /proc here: adopt a duplicate of ours
                    self._arena = Arena._from_fd(os.dup(self._fd), os.fstat(self._fd).st_size)
            ring = self._rings[name] = self._arena.ring(name=name)
        return ring

    @property
    def mapped(self) -> bool:
        """True while this process has the big rings mapped."""
        return self._arena is not None

    def release(self) -> None:
        """Unmap the big rings in this process (the next use maps them again).
        Only between messages: nothing of them may be in use here."""
        arena, self._arena = self._arena, None
        self._rings = {}
        if arena is not None:
            arena.close()

    def give_back(self, results_idle: bool) -> int:
        """Punch the pages of the empty big task ring, and of the big result
        ring if `results_idle` (no worker can be writing it), then unmap them
        here. Returns the bytes freed. The parent's, with the engine lock."""
        if self._fd < 0:
            return 0
        freed = 0
        names = ("bigtasks", "bigresults") if results_idle else ("bigtasks",)
        if self._arena is not None:
            freed = give_back(self._fd, [(self._ring(n), self._areas[n]) for n in names])
        self.release()
        return freed

    def close(self) -> None:
        """Unmap and close the descriptor (the memory goes with the last process holding it)."""
        self.release()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __reduce__(self) -> tuple:
        from multiprocessing import reduction

        return _rebuild, (reduction.DupFd(self._fd), self.capacity, self.tasks.max_message_size,
                          self._areas)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _rebuild(dupfd: Any, capacity: int, limit: int, areas: dict) -> BigRings:
    self = BigRings.__new__(BigRings)
    self._fd = dupfd.detach()
    self._arena = None
    self._rings = {}
    self._areas = areas
    self._setup(capacity, limit)
    return self


class Footprint:
    """When a pool gives its memory back: once it has done no work for
    IDLE_RELEASE_S (so a program mapping in a loop does not pay page faults
    between calls), once per idle period. The engine calls :meth:`tick`
    from its bookkeeping loop, with its lock held."""

    def __init__(self, arena: Arena, task_rings: list, big: BigRings) -> None:
        areas = ring_data(arena, [ring.name for ring in task_rings])
        self._arena = arena         # (its fd is read at each give-back: never a closed, reused one)
        self._areas = [(ring, areas[ring.name]) for ring in task_rings]
        self._big = big
        self._idle_since: float | None = None
        self._used = True           # work was done since the last give-back
        self.bytes_freed = 0        # statistics: bytes given back so far

    def replace_ring(self, index: int, ring: Any) -> None:
        """Task ring `index` was laid out afresh (a new handle, same memory)."""
        self._areas[index] = (ring, self._areas[index][1])

    def tick(self, now: float, idle: bool) -> bool:
        """`idle`: no task queued or in flight (so no worker writes a ring).
        True when this call gave the pool's memory back (once per idle
        period: the caller then gives back its process's kept memory,
        shmipc._proc.give_memory_back, without the engine's lock)."""
        if not idle:
            self._idle_since = None
            self._used = True
            return False
        if not self._used:
            return False
        if self._idle_since is None:
            self._idle_since = now
        elif now - self._idle_since >= IDLE_RELEASE_S:
            self._used = False
            if self._arena.closed:
                return False
            self.bytes_freed += give_back(self._arena.fd, self._areas) + self._big.give_back(results_idle=True)
            return True
        return False
