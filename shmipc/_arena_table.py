"""An arena's header and region table: their byte layout, the checks on
everything read back from them (another process may have written anything
there), and the lock that serialises changes to the table across processes.

An arena starts with a header (magic, version, size, a table of named
regions) followed by 64-byte-aligned regions that rings live in::

    offset 0      header (64 bytes)
    offset 64      region table: MAX_REGIONS entries of 512 bytes
    offset 131072  regions, bump-allocated

Invariant: a region's table entry is written before the count that makes it
visible (write_entry), and a new header's magic is written last
(format_header): a half-made header or entry is never taken for a valid one.
"""
from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
from typing import TYPE_CHECKING, Any, NamedTuple

from shmipc import _ring
from shmipc.errors import CorruptArena

if TYPE_CHECKING:
    from shmipc.arena import Arena

MAGIC = b"SHMIPCAR"
VERSION = 1
HEADER = struct.Struct("<8sIIQQIII4x")   # magic, version, flags, size, used, nregions, max_regions, creator
ENTRY = struct.Struct("<64sIIQQI4x")     # name, kind, flags, offset, size, meta_len
ENTRY_SIZE = 512
META_MAX = ENTRY_SIZE - ENTRY.size
TABLE_OFFSET = 64
MAX_REGIONS = 255
DATA_START = 131072
ALIGN = 64
MIN_SIZE = DATA_START + _ring.RING_HEADER_SIZE + _ring.MIN_CAPACITY
MAX_SIZE = 1 << 47                  # (x86-64 user address space; beyond it an int overflowed in C)
KIND_RING = 1
KIND_BLOCK = 2
KIND_NAMES = {KIND_RING: "ring", KIND_BLOCK: "block"}


class Region(NamedTuple):
    """One entry of an arena's region table."""

    index: int
    name: str
    kind: str
    offset: int
    size: int
    meta: dict


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def check_size(size: Any, what: str = "size") -> int:
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"{what} must be an int, not {type(size).__name__}")
    if size < MIN_SIZE:
        raise ValueError(f"{what} must be at least {MIN_SIZE} bytes, got {size}")
    if size > MAX_SIZE:
        raise ValueError(f"{what} must be at most {MAX_SIZE} bytes (128 TiB), got {size}")
    return size


def peek_header(fd: int, file_size: int, what: str) -> int:
    """The size an existing arena's header gives, read with pread before
    anything is mapped or written, checked against the file's real size (so
    the mapping never reaches past the end of the file: SIGBUS)."""
    head = os.pread(fd, HEADER.size, 0)
    if len(head) < HEADER.size or head[:8] != MAGIC:
        raise CorruptArena(f"{what} is not an shmipc arena ({file_size} bytes, first bytes {head[:8]!r})")
    size = HEADER.unpack(head)[3]
    if size < MIN_SIZE:
        raise CorruptArena(f"{what}: arena header says {size} bytes, less than the smallest arena ({MIN_SIZE})")
    if size > file_size:
        raise CorruptArena(f"{what} is {file_size} bytes but its arena header says {size} (truncated?)")
    return size


def format_header(buf: Any, size: int, clear: bool) -> None:
    """Write a new, empty arena's header (`clear`: zero the table first;
    new shared memory is zero already)."""
    if clear:
        buf[:DATA_START] = bytes(DATA_START)   # new shared memory is zero already
    HEADER.pack_into(buf, 0, b"\0" * 8, VERSION, 0, size, DATA_START, 0, MAX_REGIONS, os.getpid())
    buf[:8] = MAGIC                          # last: a half-made header never looks valid


def read_header(buf: Any, mapped: int) -> tuple[int, int]:
    """(used, nregions) from the header of an arena mapped with `mapped`
    bytes, validated (CorruptArena)."""
    magic, version, _flags, size, used, nregions, max_regions, _creator = HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CorruptArena(f"not an shmipc arena: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise CorruptArena(f"arena format version {version}, this shmipc reads {VERSION}")
    if size != mapped:
        raise CorruptArena(f"arena header says {size} bytes, the mapping has {mapped}")
    if max_regions != MAX_REGIONS or nregions > MAX_REGIONS:
        raise CorruptArena(f"arena region table of {nregions}/{max_regions} entries, expected <= {MAX_REGIONS}")
    if not DATA_START <= used <= mapped:
        raise CorruptArena(f"arena allocation mark {used} is outside [{DATA_START}, {mapped}]")
    return used, nregions


def read_entry(buf: Any, i: int, used: int) -> Region:
    """Region table entry `i`, validated against the allocation mark `used`."""
    base = TABLE_OFFSET + i * ENTRY_SIZE
    name, kind, _flags, offset, size, meta_len = ENTRY.unpack_from(buf, base)
    if kind not in KIND_NAMES:
        raise CorruptArena(f"region {i} has unknown kind {kind}")
    if offset < DATA_START or offset % ALIGN or size > used or offset > used - size:
        raise CorruptArena(f"region {i} at offset {offset} of {size} bytes lies outside the "
                           f"allocated {DATA_START}..{used}")
    if meta_len > META_MAX:
        raise CorruptArena(f"region {i} metadata of {meta_len} bytes (at most {META_MAX})")
    if name[0] == 0 or name[-1] != 0:       # names are 1..63 bytes, NUL-padded
        raise CorruptArena(f"region {i} has an empty or unterminated name {name[:16]!r}...")
    try:
        text = name.rstrip(b"\0").decode()
        meta = json.loads(bytes(buf[base + ENTRY.size: base + ENTRY.size + meta_len]))
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise CorruptArena(f"region {i} has an unreadable name or metadata: {exc}") from None
    return Region(i, text, KIND_NAMES[kind], offset, size, meta)


def write_entry(buf: Any, nregions: int, name: str, kind: int, offset: int, need: int, meta: bytes) -> None:
    """Publish region number `nregions` (with the table lock held)."""
    base = TABLE_OFFSET + nregions * ENTRY_SIZE
    ENTRY.pack_into(buf, base, name.encode(), kind, 0, offset, need, len(meta))
    buf[base + ENTRY.size: base + ENTRY.size + len(meta)] = meta
    # commit: the allocation mark, then the count that makes the entry visible
    struct.pack_into("<Q", buf, 24, offset + need)
    struct.pack_into("<I", buf, 32, nregions + 1)


class TableLock:
    """Serialise region-table changes and users' critical sections: a
    re-entrant thread lock within the process and a POSIX record lock on the
    backing fd across processes (released by the kernel if the holder dies).

    Invariant: the record lock is held exactly while the arena's
    ``_lock_depth`` > 0; only the outermost enter takes it and only the
    outermost exit drops it (record locks do not nest: one unlock frees
    them all)."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena

    def __enter__(self) -> None:
        arena = self.arena
        if arena._lock_pid != os.getpid():
            # a forked child: the thread lock, the depth and the record lock
            # it inherited describe its parent's holder, not itself
            arena._lock = threading.RLock()
            arena._lock_depth = 0
            arena._fd_locked = False
            arena._lock_pid = os.getpid()
        arena._lock.acquire()
        try:
            if arena._lock_depth == 0 and arena._fd >= 0 and arena._writable:
                try:
                    fcntl.lockf(arena._fd, fcntl.LOCK_EX, 1, 0)
                    arena._fd_locked = True
                except OSError:
                    arena._fd_locked = False    # e.g. a device: nobody else can share the table then
        except BaseException:
            arena._lock.release()
            raise
        arena._lock_depth += 1
        return None

    def __exit__(self, *exc: object) -> None:
        arena = self.arena
        arena._lock_depth -= 1
        try:
            if arena._lock_depth == 0 and getattr(arena, "_fd_locked", False):
                arena._fd_locked = False
                if arena._fd >= 0:
                    fcntl.lockf(arena._fd, fcntl.LOCK_UN, 1, 0)
        finally:
            arena._lock.release()


def as_record_dtype(dtype: Any) -> Any:
    import numpy as np

    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype {dtype!r} is not a numpy dtype: {exc}") from None
    if dt.hasobject:
        raise TypeError(f"dtype {dt} holds Python objects; fixed-record rings need plain data")
    if dt.itemsize == 0:
        raise ValueError(f"dtype {dt} has no size")
    if dt.fields is None and dt.subdtype is not None:
        raise ValueError(f"dtype {dt} is a sub-array; wrap it in a structured dtype")
    return dt


def _tuplify(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    return x


def dtype_from_descr(descr: Any) -> Any:
    import numpy as np

    try:
        if isinstance(descr, str):
            return np.dtype(descr)
        return np.dtype([_tuplify(field) for field in descr])
    except (TypeError, ValueError) as exc:
        raise CorruptArena(f"ring dtype {descr!r} is invalid: {exc}") from None
