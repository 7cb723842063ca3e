"""Arenas: one shared mapping that holds rings, and the ways to back it.

An arena starts with a header (magic, version, size, a table of named
regions) followed by 64-byte-aligned regions that rings live in::

    offset 0      header (64 bytes)
    offset 64      region table: MAX_REGIONS entries of 512 bytes
    offset 131072  regions, bump-allocated

Backings:
  * ``Arena(size)``: nameless shared memory (a memfd) made in the parent and
    inherited by forked children; also passed to spawn/forkserver children
    as a file descriptor when pickled while a child is being started.
  * ``Arena.from_file(path, size=None, private=False)``: a mapping of a file
    (MAP_SHARED: writes reach the file; ``private=True``: MAP_PRIVATE,
    copy-on-write) or of any mmap-able path (hugetlbfs, ``/dev/zero``).
  * ``Arena.named(name, size)`` / ``Arena.attach(name)``: a POSIX
    shared-memory segment that an unrelated process can attach to by name,
    created O_EXCL with mode 0600 and unlinked by its owner.

Everything read back from the header is validated before use: a corrupt or
foreign header raises :class:`~shmipc.errors.CorruptArena`.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
import stat
import struct
import subprocess
import threading
import weakref
from typing import Any, Iterable, Iterator, NamedTuple

from shmipc import _ring
from shmipc._lifetime import Closeable
from shmipc.errors import ArenaClosed, CorruptArena, ShmipcError

__all__ = ["Arena", "ArenaFull", "Region"]

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
DEFAULT_SIZE = 64 << 20
DEFAULT_RING_CAPACITY = 1 << 20
KIND_RING = 1
KIND_BLOCK = 2
KIND_NAMES = {KIND_RING: "ring", KIND_BLOCK: "block"}
PAGE = mmap.PAGESIZE


class ArenaFull(ShmipcError, ValueError):
    """The arena has no room (or no table entry) left for another region."""


class Region(NamedTuple):
    """One entry of an arena's region table."""

    index: int
    name: str
    kind: str
    offset: int
    size: int
    meta: dict


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _check_size(size: Any, what: str = "size") -> int:
    if not isinstance(size, int) or isinstance(size, bool):
        raise TypeError(f"{what} must be an int, not {type(size).__name__}")
    if size < MIN_SIZE:
        raise ValueError(f"{what} must be at least {MIN_SIZE} bytes, got {size}")
    return size


def _shm_name(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a named arena needs a non-empty str name, got {name!r}")
    full = name if name.startswith("/") else "/" + name
    if "/" in full[1:] or len(full) > 255:
        raise ValueError(f"invalid shared-memory name {name!r}: no '/' inside, at most 254 characters")
    return full


class Arena(Closeable):
    """A shared mapping that holds rings. See the module docstring for backings.

    Args:
        size: bytes to map (rounded up to a page). Memory is committed only as
            it is touched.

    Raises:
        ValueError / TypeError: an invalid size.
    """

    # set before anything can raise, so __del__ is safe after a failed __init__
    _mmap: mmap.mmap | None = None
    _buf: memoryview | None = None
    _fd: int = -1
    _closed: bool = True
    _owner_pid: int = 0
    _shm: Any = None
    _unlink_on_close: bool = False
    _writable: bool = True

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        size = _align(_check_size(size), PAGE)
        self._init_state("anonymous", None, size)
        fd = os.memfd_create("shmipc", os.MFD_CLOEXEC)
        self._fd = fd
        os.ftruncate(fd, size)
        self._map(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
        self._format()

    @staticmethod
    def size_for(rings: "Iterable[int]" = (), blocks: "Iterable[int]" = ()) -> int:
        """The arena size (page-rounded) that holds rings of these capacities
        and blocks of these sizes: the header and region table included.

        ``Arena(Arena.size_for(rings=[1 << 20, 1 << 20], blocks=[64]))``
        """
        size = DATA_START
        for capacity in rings:
            size = _align(size, ALIGN) + _ring.RING_HEADER_SIZE + capacity
        for nbytes in blocks:
            size = _align(size, ALIGN) + nbytes
        return _align(max(size, MIN_SIZE), PAGE)

    def _init_state(self, kind: str, name: str | None, size: int) -> None:
        self.kind = kind
        self.name = name
        self.path: str | None = None
        self.size = size
        self._rings: weakref.WeakSet = weakref.WeakSet()
        self._blocks: list[memoryview] = []
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()

    def _map(self, m: mmap.mmap) -> None:
        self._mmap = m
        self._buf = memoryview(m)
        self._closed = False

    # ------------------------------------------------------------ other backings
    @classmethod
    def from_file(cls, path: str | os.PathLike, size: int | None = None, private: bool = False,
                  raw: bool = False) -> "Arena":
        """Map a file (or any mmap-able path: a hugetlbfs file, ``/dev/zero``).

        Args:
            path: the file; a missing regular file is created (mode 0600).
            size: bytes to map; None maps the whole file. A shared mapping of a
                smaller regular file grows the file to `size`.
            private: MAP_PRIVATE: writes stay in this process (copy-on-write)
                and never reach the file.
            raw: map the bytes as they are, with no arena header: use ``buf``
                to read and write them; ``ring()`` is not available.

        Raises:
            FileNotFoundError: `private` and the file does not exist.
            ValueError: no size for an empty file or a device, or `size`
                beyond the end of a file mapped privately.
            CorruptArena: the file holds data that is not an arena (pass
                raw=True to map it as plain memory).
        """
        self = cls.__new__(cls)
        path = os.fspath(path)
        flags = os.O_RDONLY if private else os.O_RDWR | os.O_CREAT
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            regular = stat.S_ISREG(st.st_mode)
            if size is None:
                if not regular or st.st_size == 0:
                    raise ValueError(f"{path!r} is empty or not a regular file: give a size")
                size = st.st_size
            elif not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"size must be a positive int, got {size!r}")
            if regular and size > st.st_size:
                if private:
                    raise ValueError(f"size {size} is beyond the end of {path!r} ({st.st_size} bytes); "
                                     "a private mapping cannot grow the file")
                os.ftruncate(fd, size)
            if not raw:
                _check_size(size)
            access = mmap.ACCESS_COPY if private else mmap.ACCESS_WRITE
            m = mmap.mmap(fd, size, access=access)
        except BaseException:
            os.close(fd)
            raise
        self._init_state("file", None, size)
        self.path = path
        self._fd = fd
        self._writable = not private
        self._map(m)
        if not raw:
            if m[:8] == b"\0" * 8:
                self._format()
            else:
                try:
                    self._validate()
                except CorruptArena as exc:
                    self.close()
                    raise CorruptArena(f"{path!r}: {exc} (pass raw=True to map it as plain memory)") from None
        else:
            self.kind = "raw"
        return self

    @classmethod
    def named(cls, name: str, size: int = DEFAULT_SIZE, unlink_on_close: bool = True) -> "Arena":
        """Create a POSIX shared-memory segment that other processes attach to
        with ``Arena.attach(name)``. Created O_EXCL with mode 0600.

        The creating process unlinks the name when it closes the arena (or
        call ``unlink()`` earlier); attached processes keep their mapping.

        Raises:
            FileExistsError: a segment of that name already exists.
        """
        import posix_ipc

        full = _shm_name(name)
        size = _align(_check_size(size), PAGE)
        self = cls.__new__(cls)
        try:
            shm = posix_ipc.SharedMemory(full, posix_ipc.O_CREX, mode=0o600, size=size)
        except posix_ipc.ExistentialError:
            raise FileExistsError(f"a shared-memory segment named {full!r} already exists") from None
        self._init_state("named", full, size)
        self._shm = shm
        self._fd = shm.fd
        self._unlink_on_close = unlink_on_close
        try:
            if unlink_on_close:
                self._start_reaper()
            self._map(mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
            self._format()
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def attach(cls, name: str) -> "Arena":
        """Attach to a named arena made by ``Arena.named``.

        Raises:
            FileNotFoundError: no segment of that name.
            CorruptArena: the segment is not a valid arena.
        """
        import posix_ipc

        full = _shm_name(name)
        self = cls.__new__(cls)
        try:
            shm = posix_ipc.SharedMemory(full)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(f"no shared-memory segment named {full!r}") from None
        except posix_ipc.PermissionsError as exc:
            raise PermissionError(f"cannot open shared-memory segment {full!r}: {exc}") from None
        size = os.fstat(shm.fd).st_size
        self._init_state("named", full, size)
        self._owner_pid = 0                      # attached: never unlinks
        self._shm = shm
        self._fd = shm.fd
        try:
            if size < MIN_SIZE:
                raise CorruptArena(f"segment {full!r} is {size} bytes, too small to be an arena")
            self._map(mmap.mmap(shm.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
            self._validate()
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def _from_fd(cls, fd: int, size: int) -> "Arena":
        """Adopt a file descriptor of an existing arena (a spawned child)."""
        self = cls.__new__(cls)
        self._init_state("anonymous", None, size)
        self._owner_pid = 0
        self._fd = fd
        try:
            self._map(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
            self._validate()
        except BaseException:
            self.close()
            raise
        return self

    # ------------------------------------------------------------ header
    def _format(self) -> None:
        buf = self._buf
        if self.kind == "file":
            buf[:DATA_START] = bytes(DATA_START)   # new shared memory is zero already
        HEADER.pack_into(buf, 0, b"\0" * 8, VERSION, 0, self.size, DATA_START, 0, MAX_REGIONS, os.getpid())
        buf[:8] = MAGIC                          # last: a half-made header never looks valid

    def _header(self) -> tuple[int, int]:
        """(used, nregions) from the header, validated."""
        self._check_open()
        magic, version, _flags, size, used, nregions, max_regions, _creator = HEADER.unpack_from(self._buf, 0)
        if magic != MAGIC:
            raise CorruptArena(f"not an shmipc arena: magic {magic!r}, expected {MAGIC!r}")
        if version != VERSION:
            raise CorruptArena(f"arena format version {version}, this shmipc reads {VERSION}")
        if size != self.size and not (self.kind == "named" and size <= self.size):
            raise CorruptArena(f"arena header says {size} bytes, the mapping has {self.size}")
        if max_regions != MAX_REGIONS or nregions > MAX_REGIONS:
            raise CorruptArena(f"arena region table of {nregions}/{max_regions} entries, expected <= {MAX_REGIONS}")
        if not DATA_START <= used <= self.size:
            raise CorruptArena(f"arena allocation mark {used} is outside [{DATA_START}, {self.size}]")
        return used, nregions

    def _validate(self) -> None:
        self._header()
        if self.size > 0:
            list(self.regions())

    def _entry(self, i: int, used: int) -> Region:
        base = TABLE_OFFSET + i * ENTRY_SIZE
        name, kind, _flags, offset, size, meta_len = ENTRY.unpack_from(self._buf, base)
        if kind not in KIND_NAMES:
            raise CorruptArena(f"region {i} has unknown kind {kind}")
        if offset < DATA_START or offset % ALIGN or size > used or offset > used - size:
            raise CorruptArena(f"region {i} at offset {offset} of {size} bytes lies outside the "
                               f"allocated {DATA_START}..{used}")
        if meta_len > META_MAX:
            raise CorruptArena(f"region {i} metadata of {meta_len} bytes (at most {META_MAX})")
        try:
            text = name.rstrip(b"\0").decode()
            meta = json.loads(bytes(self._buf[base + ENTRY.size: base + ENTRY.size + meta_len]))
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            raise CorruptArena(f"region {i} has an unreadable name or metadata: {exc}") from None
        return Region(i, text, KIND_NAMES[kind], offset, size, meta)

    def regions(self) -> Iterator[Region]:
        """The region table, validated entry by entry."""
        used, nregions = self._header()
        for i in range(nregions):
            yield self._entry(i, used)

    # ------------------------------------------------------------ rings
    def ring(self, capacity: int | None = None, *, name: str | None = None,
             producers: str = "many", consumers: str = "many", maxsize: int = 0,
             dtype: Any = None) -> "_ring.Ring":
        """Make a ring in this arena, or attach to the named one.

        ``arena.ring(cap, name="tasks")`` creates; ``arena.ring(name="tasks")``
        (no capacity) attaches to the ring of that name.

        Args:
            capacity: data bytes, a power of two >= 1024 (default 1 MiB). One
                message may use at most half of it.
            name: a name other processes find the ring by (no leading '#').
            producers, consumers: "one" (one process and thread: no lock, the
                fast path) or "many" (serialised by a crash-safe lock).
            maxsize: most messages in the ring at once (0: no limit but bytes).
            dtype: a numpy dtype: the ring carries fixed records of it, and
                ``get_many`` returns them as one structured array.

        Raises:
            ValueError / TypeError: an invalid argument (named in the message).
            ArenaFull: no room left in the arena.
            KeyError: attaching to a name that is not in the arena.
            FileExistsError: creating a ring under a name already taken.
        """
        self._check_open()
        if capacity is None and isinstance(name, str):
            return self._attach_ring(name)      # any name, the generated "#N" ones included
        self._check_name(name)
        if capacity is None:
            capacity = DEFAULT_RING_CAPACITY
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
        if capacity < _ring.MIN_CAPACITY or capacity > _ring.MAX_CAPACITY or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two between {_ring.MIN_CAPACITY} and "
                             f"{_ring.MAX_CAPACITY}, got {capacity}")
        for side, value in (("producers", producers), ("consumers", consumers)):
            if value not in ("one", "many"):
                raise ValueError(f"{side} must be 'one' or 'many', got {value!r}")
        if not isinstance(maxsize, int) or isinstance(maxsize, bool) or not 0 <= maxsize < 2**32:
            raise ValueError(f"maxsize must be an int in [0, 2**32), got {maxsize!r}")
        meta: dict[str, Any] = {"producers": producers, "consumers": consumers}
        if dtype is not None:
            dtype = _as_record_dtype(dtype)
            meta["dtype"] = dtype.str if dtype.fields is None else dtype.descr
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        if len(meta_bytes) > META_MAX:
            raise ValueError(f"dtype description of {len(meta_bytes)} bytes is too long (at most {META_MAX})")
        need = _ring.RING_HEADER_SIZE + capacity

        def make(offset: int) -> "_ring.Ring":
            return _ring.Ring._create(
                self._mmap, capacity, offset=offset, many_producers=producers == "many",
                many_consumers=consumers == "many", maxsize=maxsize, dtype=dtype)

        ring, region_name = self._allocate(KIND_RING, need, name, meta_bytes, make)
        ring.arena = self
        ring.name = region_name
        self._rings.add(ring)
        return ring

    def _allocate(self, kind: int, need: int, name: str | None, meta: bytes, make: Any) -> tuple[Any, str]:
        """Bump-allocate a region of `need` bytes, build it with make(offset),
        then publish its table entry. Returns (make's result, region name)."""
        with self._table_lock():
            used, nregions = self._header()
            if name is not None and any(r.name == name for r in self.regions()):
                raise FileExistsError(f"this arena already has a region named {name!r}")
            offset = _align(used, ALIGN)
            if nregions >= MAX_REGIONS:
                raise ArenaFull(f"the arena's region table is full ({MAX_REGIONS} regions)")
            if offset + need > self.size:
                raise ArenaFull(f"a region of {need} bytes does not fit: the arena of "
                                f"{self.size} bytes has {max(self.size - offset, 0)} free")
            region_name = name if name is not None else f"#{nregions}"
            made = make(offset)
            base = TABLE_OFFSET + nregions * ENTRY_SIZE
            ENTRY.pack_into(self._buf, base, region_name.encode(), kind, 0, offset, need, len(meta))
            self._buf[base + ENTRY.size: base + ENTRY.size + len(meta)] = meta
            # commit: the allocation mark, then the count that makes the entry visible
            struct.pack_into("<Q", self._buf, 24, offset + need)
            struct.pack_into("<I", self._buf, 32, nregions + 1)
        return made, region_name

    @staticmethod
    def _check_name(name: Any) -> None:
        if name is not None:
            if not isinstance(name, str) or not name or name.startswith("#") or len(name.encode()) > 63:
                raise ValueError(f"region name must be a str of 1..63 bytes not starting with '#', got {name!r}")

    def block(self, size: int | None = None, *, name: str | None = None) -> memoryview:
        """A raw block of shared memory (zero-filled, 64-byte aligned) for
        state of your own; ``arena.block(name="x")`` finds a named one again.
        Pair it with ``arena.lock()`` for updates that must not interleave.

        Raises:
            ValueError: an invalid size. KeyError: no block of that name.
            ArenaFull: no room left.
        """
        self._check_open()
        self._check_name(name)
        if size is None:
            if name is None:
                raise ValueError("give a size to allocate a block, or a name to find one")
            for region in self.regions():
                if region.name == name and region.kind == "block":
                    view = self._buf[region.offset: region.offset + region.size]
                    self._blocks.append(view)
                    return view
            raise KeyError(f"no block named {name!r} in this arena")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= self.size:
            raise ValueError(f"block size must be an int in 1..{self.size}, got {size!r}")

        def make(offset: int) -> memoryview:
            view = self._buf[offset: offset + size]
            view[:] = bytes(size)
            return view

        view, _ = self._allocate(KIND_BLOCK, size, name, b"{}", make)
        self._blocks.append(view)
        return view

    def lock(self) -> "_TableLock":
        """A lock shared by every process using this arena (a POSIX record
        lock, which the kernel releases if its holder dies, plus a thread
        lock). For short critical sections: ``with arena.lock(): ...``"""
        self._check_open()
        return _TableLock(self)

    def _attach_ring(self, name: str) -> "_ring.Ring":
        for region in self.regions():
            if region.name == name and region.kind == "ring":
                dtype = region.meta.get("dtype")
                if dtype is not None:
                    dtype = _dtype_from_descr(dtype)
                ring = _ring.Ring._attach(self._mmap, dtype, offset=region.offset, size=region.size)
                ring.arena = self
                ring.name = name
                self._rings.add(ring)
                return ring
        raise KeyError(f"no ring named {name!r} in this arena (it has {[r.name for r in self.regions()]})")

    def _table_lock(self) -> "_TableLock":
        return _TableLock(self)

    # ------------------------------------------------------------ lifetime
    def _check_open(self) -> None:
        if self._closed:
            raise ArenaClosed("arena is closed")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def buf(self) -> memoryview:
        """The whole mapping as a writable memoryview (raw access)."""
        self._check_open()
        assert self._buf is not None
        return self._buf

    @property
    def fd(self) -> int:
        """The file descriptor behind the mapping (-1 for none)."""
        return self._fd

    def close(self) -> None:
        """Close every ring of this arena in this process and unmap it.

        The creator of a named arena also unlinks its name. Views still held
        elsewhere keep the memory mapped until they are released: using the
        arena or its rings after close raises ValueError, never crashes.
        """
        if self._closed and self._mmap is None:
            return
        self._closed = True
        for ring in list(getattr(self, "_rings", ())):
            ring.close()
        for view in getattr(self, "_blocks", ()):
            try:
                view.release()
            except BufferError:
                pass
        self._blocks = []
        if self._buf is not None:
            try:
                self._buf.release()
            except BufferError:
                pass
            self._buf = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass        # a view is still held: the mapping goes when it does
            self._mmap = None
        if self._shm is not None:
            if self._unlink_on_close and self._owner_pid == os.getpid():
                self.unlink()
            self._stop_reaper()
            try:
                self._shm.close_fd()
            except Exception:
                pass
            self._shm = None
            self._fd = -1
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _start_reaper(self) -> None:
        """Start a tiny process that unlinks the name once this one is gone,
        however it goes (SIGKILL included): it waits for EOF on a pipe whose
        only write end this process holds. posix_spawn-style start, so it is
        safe from a threaded process."""
        assert self.name is not None
        self._reaper = subprocess.Popen(
            ["/bin/sh", "-c", 'read _ignored; rm -f -- "/dev/shm/$1"', "shmipc-reaper", self.name[1:]],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=True, start_new_session=True)
        _REAPED.add(self)

    def _stop_reaper(self) -> None:
        reaper = self.__dict__.pop("_reaper", None)
        if reaper is None:
            return
        _REAPED.discard(self)
        if self._owner_pid != os.getpid():
            return          # a forked child's copy: the pipe end was closed at fork
        if reaper.stdin is not None:
            reaper.stdin.close()
        try:
            reaper.wait(timeout=2)
        except subprocess.TimeoutExpired:
            reaper.kill()
            reaper.wait()

    def unlink(self) -> None:
        """Remove a named arena's name now (attached processes keep their
        mapping; new attaches fail). Idempotent; only for named arenas."""
        if self.kind != "named" or self.name is None:
            raise ValueError(f"only named arenas can be unlinked, this one is {self.kind}")
        import posix_ipc

        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass

    def __repr__(self) -> str:
        where = self.name or self.path or f"fd={self._fd}"
        state = "closed" if self._closed else f"{self.size} bytes"
        return f"<shmipc.Arena {self.kind} {where} {state}>"

    def __reduce__(self) -> tuple:
        self._check_open()
        if self.kind == "named":
            return Arena.attach, (self.name,)
        if self.kind == "file" and self._writable and self.path is not None:
            return Arena.from_file, (self.path, self.size)
        if self.kind == "anonymous":
            from multiprocessing import reduction

            return _rebuild_fd_arena, (reduction.DupFd(self._fd), self.size)
        raise TypeError(f"a {self.kind} arena cannot be sent to another process")


_REAPED: "weakref.WeakSet[Arena]" = weakref.WeakSet()


def _close_reaper_pipes_in_child() -> None:
    # a forked child must not hold the reaper's pipe open, or the name would
    # outlive its owner for as long as the child lives
    for arena in list(_REAPED):
        reaper = arena.__dict__.get("_reaper")
        if reaper is not None and reaper.stdin is not None:
            try:
                os.close(reaper.stdin.fileno())
            except OSError:
                pass
            reaper.stdin = None


os.register_at_fork(after_in_child=_close_reaper_pipes_in_child)


class _TableLock:
    """Serialise region-table changes: a thread lock within the process and a
    POSIX record lock on the backing fd across processes (released by the
    kernel if the holder dies)."""

    def __init__(self, arena: Arena) -> None:
        self.arena = arena
        self.locked_fd = False

    def __enter__(self) -> None:
        self.arena._lock.acquire()
        if self.arena._fd >= 0 and self.arena._writable:
            try:
                fcntl.lockf(self.arena._fd, fcntl.LOCK_EX, 1, 0)
                self.locked_fd = True
            except OSError:
                pass        # e.g. a device: nobody else can share the table then
        return None

    def __exit__(self, *exc: object) -> None:
        if self.locked_fd:
            fcntl.lockf(self.arena._fd, fcntl.LOCK_UN, 1, 0)
        self.arena._lock.release()


def _as_record_dtype(dtype: Any) -> Any:
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


def _dtype_from_descr(descr: Any) -> Any:
    import numpy as np

    try:
        if isinstance(descr, str):
            return np.dtype(descr)
        return np.dtype([_tuplify(field) for field in descr])
    except (TypeError, ValueError) as exc:
        raise CorruptArena(f"ring dtype {descr!r} is invalid: {exc}") from None


def _rebuild_fd_arena(dupfd: Any, size: int) -> Arena:
    return Arena._from_fd(dupfd.detach(), size)


def _rebuild_ring(arena: Arena, name: str) -> "_ring.Ring":
    return arena._attach_ring(name)
