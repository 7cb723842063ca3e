"""Arenas: one shared mapping that holds rings, and the ways to back it.

The header and region table (layout, validation, the cross-process lock)
live in ``shmipc/_arena_table.py``.

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

Opening and creating the file-system backings (files, devices, named
segments), their trust checks (other users' files, symbolic links, files that
are not arenas) and the reaper live in ``shmipc/_arena_files.py``; its
docstring states the trust rules. Nameless (memfd) arenas are sealed
(F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL): a peer holding the fd cannot
truncate them under us.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
import threading
import weakref
from typing import Any, Iterable, Iterator

from shmipc import _arena_files, _ring
from shmipc._arena_files import SHM_DIR
# the table's layout is re-exported: tests, the inspector and the engine read it here
from shmipc._arena_table import (ALIGN, DATA_START, ENTRY, ENTRY_SIZE, HEADER, KIND_BLOCK,  # noqa: F401
                                 KIND_NAMES, KIND_RING, MAGIC, MAX_REGIONS, META_MAX, MIN_SIZE, TABLE_OFFSET,
                                 VERSION, Region, TableLock, align, as_record_dtype, check_size,
                                 dtype_from_descr, format_header, peek_header, read_entry, read_header,
                                 write_entry)
from shmipc._lifetime import Closeable
from shmipc.errors import ArenaClosed, CorruptArena, ShmipcError

__all__ = ["Arena", "ArenaFull", "Region"]

DEFAULT_SIZE = 64 << 20
DEFAULT_RING_CAPACITY = 1 << 20
PAGE = mmap.PAGESIZE
_MEMFD_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class ArenaFull(ShmipcError, ValueError):
    """The arena has no room (or no table entry) left for another region."""


class Arena(Closeable):
    """A shared mapping that holds rings. See the module docstring for backings.

    Args:
        size: bytes to map (rounded up to a page). Memory is committed only as
            it is touched.

    Raises:
        ValueError / TypeError: an invalid size.

    Attributes:
        allow_pickle: the default for this arena's rings: False makes them
            decode native types only (bytes, str, numbers, None, arrays of
            plain dtypes) and refuse pickled records. True unless the arena
            was opened with ``allow_other_users=True`` and belongs to another
            user.
    """

    # set before anything can raise, so __del__ is safe after a failed __init__
    _mmap: mmap.mmap | None = None
    _buf: memoryview | None = None
    _fd: int = -1
    _closed: bool = True
    _owner_pid: int = 0
    _unlink_on_close: bool = False
    _writable: bool = True
    _ident: tuple[int, int] | None = None      # (st_dev, st_ino) of a named segment we created
    _reaper: "_arena_files.Reaper | None" = None
    _lock_depth: int = 0
    _sized_backing: bool = False               # a named segment or regular file: can be truncated
    _file_ident: tuple[int, int] | None = None # a file arena's (st_dev, st_ino)
    _lock_pid: int = 0
    _fd_locked: bool = False                   # TableLock holds the record lock on _fd
    allow_pickle: bool = True

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        size = align(check_size(size), PAGE)
        self._init_state("anonymous", None, size)
        fd = os.memfd_create("shmipc", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        self._fd = fd
        os.ftruncate(fd, size)
        # a peer that holds the fd (a child, or whoever it was passed to) must
        # not be able to shrink it under us (SIGBUS for every process mapping
        # it); growing and later seal changes are not needed either
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _MEMFD_SEALS)
        self._map(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
        self._format()

    @staticmethod
    def size_for(rings: "Iterable[int]" = (), blocks: "Iterable[int]" = ()) -> int:
        """The arena size (page-rounded) that holds rings of these capacities
        and blocks of these sizes: the header and region table included.

        ``Arena(Arena.size_for(rings=[1 << 20, 1 << 20], blocks=[64]))``

        Raises:
            TypeError, ValueError: a capacity ``ring()`` would refuse, a block
                size below 1, or a total beyond the largest arena (128 TiB).
        """
        size = DATA_START
        for capacity in rings:
            size = align(size, ALIGN) + _ring.RING_HEADER_SIZE + _check_capacity(capacity)
        for nbytes in blocks:
            if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 1:
                raise ValueError(f"block size must be a positive int, got {nbytes!r}")
            size = align(size, ALIGN) + nbytes
        return check_size(align(max(size, MIN_SIZE), PAGE), "the arena these rings and blocks need")

    def _init_state(self, kind: str, name: str | None, size: int) -> None:
        self.kind = kind
        self.name = name
        self.path: str | None = None
        self.size = size
        self._rings: weakref.WeakSet = weakref.WeakSet()
        self._blocks: list[memoryview] = []
        # re-entrant: block()/ring() take it too, inside a user's `with arena.lock()`
        self._lock = threading.RLock()
        self._lock_depth = 0            # nesting of TableLock in the thread holding _lock
        self._lock_pid = os.getpid()    # the process _lock and _lock_depth belong to
        self._owner_pid = os.getpid()
        self._follow_symlinks = False
        self._allow_other_users = False

    def _map(self, m: mmap.mmap) -> None:
        self._mmap = m
        self._buf = memoryview(m)
        self._closed = False

    # ------------------------------------------------------------ other backings
    @classmethod
    def from_file(cls, path: str | os.PathLike, size: int | None = None, private: bool = False,
                  raw: bool = False, *, overwrite: bool = False, follow_symlinks: bool = False,
                  allow_other_users: bool = False, allow_pickle: bool | None = None) -> "Arena":
        """Map a file (or any mmap-able path: a hugetlbfs file, ``/dev/zero``).

        A file that is not already an arena is never written (not grown, not
        formatted) unless this call creates it or `overwrite` says so.

        Args:
            path: the file. A missing file is created (O_EXCL, mode 0600, the
                given `size`) and formatted as a new arena.
            size: bytes to map; None maps the whole file (an arena: the size
                its header gives). Required to create a file or map a device.
            private: MAP_PRIVATE: writes stay in this process (copy-on-write)
                and never reach the file.
            raw: map the bytes as they are, with no arena header: use ``buf``
                to read and write them; ``ring()`` is not available. A shared
                raw mapping grows a shorter regular file to `size`.
            overwrite: format an existing file that is not an arena as a new
                one (its first 128 KiB are overwritten, it grows to `size`).
            follow_symlinks: follow a symbolic link as the last path component
                (by default refused: a link planted by another user could
                point at a file of yours).
            allow_other_users: open a file owned by another user (refused by
                default: its messages could run that user's code).
            allow_pickle: the default for this arena's rings (see the class
                docstring); None: True, or False for another user's file.

        Raises:
            FileNotFoundError: `private` and the file does not exist.
            ValueError: no size for a new file or a device, `size` beyond the
                end of a file mapped privately, or a path that is a FIFO or
                another special file that is not a device. (A directory
                raises IsADirectoryError and a socket OSError ENXIO, from
                open(2).)
            FileNotFoundError: an empty path.
            CorruptArena: the file holds data that is not an arena (pass
                raw=True to map it as plain memory, or overwrite=True to
                format it), or an arena whose header does not match the file.
            PermissionError: a file of another user (see allow_other_users).
            OSError: the path is a symbolic link (see follow_symlinks).
        """
        self = cls.__new__(cls)
        _arena_files.open_file(self, path, size, private, raw, overwrite, follow_symlinks,
                               allow_other_users, allow_pickle)
        return self

    @classmethod
    def named(cls, name: str, size: int = DEFAULT_SIZE, unlink_on_close: bool = True) -> "Arena":
        """Create a POSIX shared-memory segment that other processes attach to
        with ``Arena.attach(name)``. Created O_EXCL with mode 0600.

        The creating process unlinks the name when it closes the arena (or
        call ``unlink()`` earlier); attached processes keep their mapping. If
        the creator dies without closing (SIGKILL included), a small helper
        process (the reaper) unlinks it; it removes only the segment it was
        made for, never a later one of the same name, and a daemon thread
        of the creator starts a new one if it dies (so on Python 3.12+ a
        later ``os.fork()`` of the creator warns that the process is
        multi-threaded, as it does with a pool).

        Raises:
            ValueError: an invalid name (named in the message) or size.
            FileExistsError: a segment of that name already exists.

        A segment cannot be sealed: a process of the same user (or root) can
        still truncate it, and a process touching the memory then dies of
        SIGBUS. Calls that read the region table check the size first.
        """
        size = align(check_size(size), PAGE)
        self = cls.__new__(cls)
        _arena_files.create_named(self, name, size, unlink_on_close)
        return self

    @classmethod
    def attach(cls, name: str, *, allow_other_users: bool = False,
               allow_pickle: bool | None = None) -> "Arena":
        """Attach to a named arena made by ``Arena.named``.

        Args:
            name: the segment's name.
            allow_other_users: attach to a segment owned by another user
                (refused by default: its messages could run that user's code).
            allow_pickle: the default for this arena's rings (see the class
                docstring); None: True, or False for another user's segment.

        Raises:
            ValueError: an invalid name.
            FileNotFoundError: no segment of that name.
            PermissionError: another user's segment (see allow_other_users),
                or no permission to open it.
            CorruptArena: the segment is not a valid arena (or was truncated).
        """
        self = cls.__new__(cls)
        _arena_files.attach_named(self, name, allow_other_users, allow_pickle)
        return self

    @classmethod
    def _from_fd(cls, fd: int, size: int) -> "Arena":
        """Adopt a file descriptor of an existing arena (a spawned child)."""
        self = cls.__new__(cls)
        self._init_state("anonymous", None, size)
        self._owner_pid = 0
        self._fd = fd
        try:
            st = os.fstat(fd)
            if st.st_size < size:
                raise CorruptArena(f"the arena's memory is {st.st_size} bytes, {size} expected (truncated)")
            self._map(mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
            self._validate()
        except BaseException:
            self.close()
            raise
        return self

    def _map_file(self, private: bool) -> None:
        """Map `size` bytes of the backing fd: shared, or copy-on-write."""
        self._map(mmap.mmap(self._fd, self.size, access=mmap.ACCESS_COPY if private else mmap.ACCESS_WRITE))

    def _blank(self) -> bool:
        """True if the header and region table are all zero (fresh memory)."""
        return self._buf[:DATA_START] == bytes(DATA_START)

    _check_size = staticmethod(check_size)
    _peek_header = staticmethod(peek_header)

    def _format(self) -> None:
        format_header(self._buf, self.size, clear=self.kind == "file")

    def _header(self) -> tuple[int, int]:
        """(used, nregions) from the header, validated."""
        self._check_open()
        if self.kind == "raw":
            raise ValueError(f"{self!r} is a raw mapping (from_file(raw=True)): it has no arena header, "
                             "so no rings, blocks or regions; read and write its bytes through buf")
        self._check_backing()
        return read_header(self._buf, self.size)

    def _check_backing(self) -> None:
        """CorruptArena if a named segment or a file was truncated below the
        mapping (touching the lost pages would kill us with SIGBUS). Memfd
        arenas are sealed; devices have no size."""
        if self._sized_backing and self._fd >= 0:
            actual = os.fstat(self._fd).st_size
            if actual < self.size:
                raise CorruptArena(f"the arena's {'segment' if self.kind == 'named' else 'file'} was "
                                   f"truncated to {actual} bytes by another process; the arena needs "
                                   f"{self.size}")

    def _validate(self) -> None:
        self._header()
        if self.size > 0:
            list(self.regions())

    def info(self) -> dict[str, Any]:
        """The validated header, read-only, as JSON-ready data::

            {"kind": "named", "name": "/x", "path": None, "size": 67108864,
             "used": 1180160, "free": 65927104, "regions": 2, "max_regions": 255,
             "version": 1, "creator_pid": 1234, "allow_pickle": True}

        Raises:
            ArenaClosed: the arena is closed. CorruptArena: a bad header.
            ValueError: a raw mapping (no header).
        """
        used, nregions = self._header()
        creator = HEADER.unpack_from(self._buf, 0)[7]
        return {"kind": self.kind, "name": self.name, "path": self.path, "size": self.size,
                "used": used, "free": self.size - used, "regions": nregions,
                "max_regions": MAX_REGIONS, "version": VERSION, "creator_pid": creator,
                "allow_pickle": self.allow_pickle}

    def _entry(self, i: int, used: int) -> Region:
        return read_entry(self._buf, i, used)

    def regions(self) -> Iterator[Region]:
        """The region table, validated entry by entry."""
        used, nregions = self._header()
        for i in range(nregions):
            yield self._entry(i, used)

    # ------------------------------------------------------------ rings
    def ring(self, capacity: int | None = None, *, name: str | None = None,
             producers: str = "many", consumers: str = "many", maxsize: int = 0,
             dtype: Any = None, allow_pickle: bool | None = None) -> "_ring.Ring":
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
            allow_pickle: False: this process's handle decodes native types
                only and raises CorruptMessage for a pickled record (which
                would run code chosen by its writer). None: the arena's
                ``allow_pickle``.

        Raises:
            ValueError / TypeError: an invalid argument (named in the message).
            ArenaFull: no room left in the arena.
            KeyError: attaching to a name that is not in the arena.
            FileExistsError: creating a ring under a name already taken.
        """
        self._check_open()
        if allow_pickle is None:
            allow_pickle = self.allow_pickle
        if capacity is None and isinstance(name, str):
            return self._attach_ring(name, allow_pickle)   # any name, the generated "#N" ones included
        self._check_name(name)
        if capacity is None:
            capacity = DEFAULT_RING_CAPACITY
        _check_capacity(capacity)
        for side, value in (("producers", producers), ("consumers", consumers)):
            if value not in ("one", "many"):
                raise ValueError(f"{side} must be 'one' or 'many', got {value!r}")
        if not isinstance(maxsize, int) or isinstance(maxsize, bool) or not 0 <= maxsize < 2**32:
            raise ValueError(f"maxsize must be an int in [0, 2**32), got {maxsize!r}")
        meta: dict[str, Any] = {"producers": producers, "consumers": consumers}
        if dtype is not None:
            dtype = as_record_dtype(dtype)
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
        return self._adopt(ring, region_name, allow_pickle)

    def _adopt(self, ring: "_ring.Ring", name: str, allow_pickle: bool) -> "_ring.Ring":
        """`ring`, a new handle on region `name`, as this arena's: its
        pickle policy, arena and name set, closed with the arena."""
        _set_allow_pickle(ring, allow_pickle)
        ring.arena = self
        ring.name = name
        self._rings.add(ring)
        return ring

    def _allocate(self, kind: int, need: int, name: str | None, meta: bytes, make: Any) -> tuple[Any, str]:
        """Bump-allocate a region of `need` bytes, build it with make(offset),
        then publish its table entry. Returns (make's result, region name)."""
        with self._table_lock():
            used, nregions = self._header()
            if name is not None and any(r.name == name for r in self.regions()):
                raise FileExistsError(f"this arena already has a region named {name!r}")
            offset = align(used, ALIGN)
            if nregions >= MAX_REGIONS:
                raise ArenaFull(f"the arena's region table is full ({MAX_REGIONS} regions)")
            if offset + need > self.size:
                raise ArenaFull(f"a region of {need} bytes does not fit: the arena of "
                                f"{self.size} bytes has {max(self.size - offset, 0)} free")
            region_name = name if name is not None else f"#{nregions}"
            made = make(offset)
            write_entry(self._buf, nregions, region_name, kind, offset, need, meta)
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

    def lock(self) -> "TableLock":
        """A lock shared by every process using this arena (a POSIX record
        lock, which the kernel releases if its holder dies, plus a thread
        lock). For short critical sections: ``with arena.lock(): ...``"""
        self._check_open()
        return TableLock(self)

    def _attach_ring(self, name: str, allow_pickle: bool | None = None) -> "_ring.Ring":
        if allow_pickle is None:
            allow_pickle = self.allow_pickle
        for region in self.regions():
            if region.name == name and region.kind == "ring":
                dtype = region.meta.get("dtype")
                if dtype is not None:
                    dtype = dtype_from_descr(dtype)
                ring = _ring.Ring._attach(self._mmap, dtype, offset=region.offset, size=region.size)
                return self._adopt(ring, name, allow_pickle)
        raise KeyError(f"no ring named {name!r} in this arena (it has {[r.name for r in self.regions()]})")

    def _remake_ring(self, ring: "_ring.Ring") -> "_ring.Ring":
        """Lay `ring` (a handle of this arena's) out afresh, empty, where it
        is, and return the new handle (the old one is closed). For a ring
        whose header was damaged (CorruptArena) once no other process uses
        it: the caller guarantees that. Its size comes from the region table
        and is checked as a new ring's is; producers and consumers as the
        table says.

        Raises:
            KeyError: no ring of that name here.
            ValueError: the region's size does not hold a valid ring.
        """
        self._check_open()
        region = next((r for r in self.regions() if r.name == ring.name and r.kind == "ring"), None)
        if region is None:
            raise KeyError(f"no ring named {ring.name!r} in this arena")
        allow_pickle = ring.allow_pickle
        ring.close()
        made = _ring.Ring._create(self._mmap, region.size - _ring.RING_HEADER_SIZE, offset=region.offset,
                                  many_producers=region.meta.get("producers") != "one",
                                  many_consumers=region.meta.get("consumers") != "one")
        return self._adopt(made, region.name, allow_pickle)

    def _table_lock(self) -> "TableLock":
        return TableLock(self)

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

        The creator of a named arena also unlinks its name (if it is still
        the segment it created). Views still held elsewhere keep the memory
        mapped until they are released: using the arena or its rings after
        close raises ArenaClosed, never crashes. Idempotent, and complete
        after a failed open (the fd, the name and the reaper are released).
        """
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
        if self._unlink_on_close and self._owner_pid == os.getpid():
            self.unlink()
        self._stop_reaper()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _stop_reaper(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.stop()

    def unlink(self) -> None:
        """Remove a named arena's name now (attached processes keep their
        mapping; new attaches fail). Idempotent; only for named arenas.

        The creator removes the name only while it still names the segment
        it created (a later segment of the same name is left alone), and
        its reaper is dismissed: the name is no longer its business."""
        if self.kind != "named" or self.name is None:
            raise ValueError(f"only named arenas can be unlinked, this one is {self.kind}")
        self._unlink_on_close = False
        if self._owner_pid == os.getpid() and self._ident is not None:
            _arena_files.unlink_if(SHM_DIR + self.name, self._ident)
            self._stop_reaper()
        else:
            try:
                os.unlink(SHM_DIR + self.name)
            except FileNotFoundError:
                pass

    def __repr__(self) -> str:
        where = self.name or self.path or f"fd={self._fd}"
        state = "closed" if self._closed else f"{self.size} bytes"
        return f"<shmipc.Arena {self.kind} {where} {state}>"

    def __reduce__(self) -> tuple:
        self._check_open()
        if self.kind == "named":
            return _rebuild_named, (self.name, self._allow_other_users, self.allow_pickle)
        if self.kind == "file" and self._writable and self.path is not None:
            if not self._sized_backing:
                # each shared mapping of /dev/zero is new memory of its own: a
                # receiver would get an empty arena, not this one
                raise TypeError(f"an arena on the device {self.path!r} cannot be sent to another "
                                "process (its mappings do not share memory); use an anonymous, "
                                "named or file arena")
            if _arena_files.names_file(self.path, self._file_ident, self._follow_symlinks):
                return _rebuild_file, (self.path, self.size, self._follow_symlinks,
                                       self._allow_other_users, self.allow_pickle, self._file_ident)
            # unlinked or replaced since it was opened: the receiver gets the
            # file itself, not whatever has that name now
            from multiprocessing import reduction

            return _rebuild_fd_arena, (reduction.DupFd(self._fd), self.size, self.path, self.allow_pickle)
        if self.kind == "anonymous":
            from multiprocessing import reduction

            return _rebuild_fd_arena, (reduction.DupFd(self._fd), self.size)
        raise TypeError(f"a {self.kind} arena cannot be sent to another process")


def _check_capacity(capacity: Any) -> int:
    """A ring's capacity, or TypeError / ValueError naming it."""
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise TypeError(f"capacity must be an int, not {type(capacity).__name__}")
    if capacity < _ring.MIN_CAPACITY or capacity > _ring.MAX_CAPACITY or capacity & (capacity - 1):
        raise ValueError(f"capacity must be a power of two between {_ring.MIN_CAPACITY} and "
                         f"{_ring.MAX_CAPACITY}, got {capacity}")
    return capacity


def _set_allow_pickle(ring: "_ring.Ring", allow: bool) -> None:
    """Make `ring` (this process's handle) refuse pickled records, or not."""
    if allow and not hasattr(type(ring), "allow_pickle"):
        return
    try:
        ring.allow_pickle = bool(allow)
    except AttributeError:
        ring.close()
        raise ShmipcError("this build's ring cannot refuse pickled messages (no Ring.allow_pickle): "
                          "opening it with allow_pickle=False is impossible") from None


def _rebuild_named(name: str, allow_other_users: bool, allow_pickle: bool) -> Arena:
    return Arena.attach(name, allow_other_users=allow_other_users, allow_pickle=allow_pickle)


def _rebuild_file(path: str, size: int, follow_symlinks: bool, allow_other_users: bool,
                  allow_pickle: bool, ident: tuple[int, int] | None = None) -> Arena:
    """The arena file `path` names, which must still be the file `ident`
    (never created anew: FileNotFoundError if it was removed or replaced)."""
    self = Arena.__new__(Arena)
    _arena_files.open_file(self, path, size, False, False, False, follow_symlinks,
                           allow_other_users, allow_pickle, ident)
    return self


def _rebuild_fd_arena(dupfd: Any, size: int, path: str | None = None, allow_pickle: bool = True) -> Arena:
    arena = Arena._from_fd(dupfd.detach(), size)
    if path is not None:                # a file arena whose file has no (or another) name now
        arena.kind, arena.path, arena._sized_backing = "file", path, True
        arena.allow_pickle = allow_pickle
    return arena


def _rebuild_ring(arena: Arena, name: str) -> "_ring.Ring":
    return arena._attach_ring(name)
