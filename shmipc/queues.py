"""multiprocessing-compatible queues over a shared-memory ring.

``Queue``, ``SimpleQueue`` and ``JoinableQueue`` keep the signatures and the
exceptions of :mod:`multiprocessing`'s, so a program switches by changing one
import. What differs, and why:

* ``put`` writes the message straight into the ring in shared memory. So a
  pickling error is raised by the ``put`` that caused it (multiprocessing
  prints it from its thread and loses the item), and a put waits while the
  ring is full (multiprocessing's returns at once and its feeder thread
  waits). One exception: a message larger than half the ring put with
  ``block=True, timeout=None`` is pickled by ``put``, which then hands its
  chunks to a daemon "feeder" thread started for that message only and
  returns (so one thread can put such a message, then get it, as with
  multiprocessing). The thread ends once the message is written;
  ``join_thread()`` (after ``close()``) and the process's exit wait for it,
  unless ``cancel_join_thread()`` was called. Forking while it runs makes
  Python 3.12+ warn about forking a threaded process; the child does not
  inherit the thread or its locks. A put with a timeout or ``block=False``
  never starts one: it writes the chunks itself and raises queue.Full by its
  deadline.
* Each queue owns one :class:`~shmipc.Arena` (a memfd) holding its ring. The
  ring has a fixed byte ``capacity`` (default :data:`DEFAULT_CAPACITY`; pages
  are only committed as they are touched). ``maxsize`` bounds the number of
  messages, as in multiprocessing. Messages of any size go: one larger than
  half the ring travels in chunks through a second ring of the arena
  (:class:`_Bulk`), delivered whole or not at all.
* ``put_many`` / ``get_many`` move batches with one lock round trip, and
  ``stats()`` returns the ring's live counters.

Queues travel to child processes the way multiprocessing's do: inherited
through fork, or pickled as ``multiprocessing.Process`` arguments under spawn
and forkserver (the memfd is passed as a file descriptor). Pickling one at any
other time raises RuntimeError, as multiprocessing does.
"""
from __future__ import annotations

import os
import select
import struct
import threading
import time
import types
import weakref
from typing import Any, Iterable, Iterator, NoReturn, overload

import fcntl
import queue

from shmipc import _framing
from shmipc._framing import Frame as _Frame     # looked up on every get/recv
from shmipc.arena import Arena
from shmipc.errors import MessageTooLarge, RingClosed

__all__ = ["Queue", "SimpleQueue", "JoinableQueue", "DEFAULT_CAPACITY"]

#: Default ring bytes per queue: one message may use half (16 MiB). Memory is
#: committed as the ring's pages are first written, so a queue that only ever
#: holds small messages costs little until the ring has cycled once.
DEFAULT_CAPACITY = 32 << 20

_NOTHING = object()

# a waitable SimpleQueue's get looks for a stranded message this often (ms)
_BELL_SLICE_MS = 50



def _ring_capacity(capacity: Any) -> int:
    if capacity is None:
        return DEFAULT_CAPACITY
    if not isinstance(capacity, int) or isinstance(capacity, bool):
        raise TypeError(f"capacity must be an int (bytes), not {type(capacity).__name__}")
    if capacity < 1024 or capacity & (capacity - 1):
        raise ValueError(f"capacity must be a power of two of at least 1024 bytes, got {capacity}")
    return capacity


def _ring_maxsize(maxsize: Any) -> int:
    if not isinstance(maxsize, int) or isinstance(maxsize, bool):
        raise TypeError(f"maxsize must be an int, not {type(maxsize).__name__}")
    if maxsize >= 2**32 - 1:
        raise ValueError(f"maxsize must be below {2**32 - 1}, got {maxsize}")
    return maxsize if maxsize > 0 else 0     # multiprocessing: <= 0 means unbounded


def _timeout(timeout: Any) -> Any:
    """A timeout in seconds, checked: negative means 0 (multiprocessing's
    semaphores clamp it); NaN raises ValueError, as multiprocessing does
    (a NaN compares false with everything, so a deadline made of it would
    never pass and the wait would never end)."""
    try:
        if timeout < 0:
            return 0.0
    except TypeError:
        raise TypeError(f"timeout must be a number or None, not {type(timeout).__name__}") from None
    if timeout != timeout:
        raise ValueError("timeout must be a number of seconds, got NaN")
    return timeout


def _check_spawning(obj: object) -> None:
    from multiprocessing import context

    if context.get_spawning_popen() is None:
        raise RuntimeError(
            f"{type(obj).__name__} objects should only be shared between processes through "
            "inheritance: pass them as multiprocessing.Process arguments, or create them "
            "before fork")


# Byte offsets of the record locks (on the arena's file) that serialise the
# writers and the readers of large messages; far past any arena's end and
# apart from the arena's own table lock (offset 0).
_WRITER_LOCK = 1 << 60
_READER_LOCK = (1 << 60) + 1


# a large put waits for room in the bulk ring this long at a time, then
# checks its deadline and that its reader is still there
_WRITE_SLICE_S = 0.05

# name of the arena block counting large messages lost mid-read
_LOST_BLOCK = "bulk_lost"


class _ReaderLeft(Exception):
    """The reader of the frame being written left it midway."""


class _NoFrame(Exception):
    """A reader holds a token whose frame will never come (see _Bulk)."""


# every _Bulk of this process, to re-make their thread locks after fork
_all_bulks: "weakref.WeakSet[_Bulk]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for bulk in list(_all_bulks):
        bulk._new_locks()


class _Bulk:
    """Messages larger than the main ring's max_message_size, through a
    second ring of the queue's arena (the "bulk" ring).

    A writer, holding the writer lock: puts a token (``Frame("token")``) in
    the main ring -- so the message takes its place in the queue, counts
    against maxsize and as a JoinableQueue task -- then a header
    (``Frame("object", sizes)``) and the parts in chunks in the bulk ring.
    A consumer that gets a token takes the reader lock and reads the next
    complete frame of the bulk ring, streaming as the writer writes.

    Invariants:
        * Frames enter the bulk ring one at a time (writer lock), each after
          its token; readers read one at a time (reader lock).
        * Every token stands for one frame, but frames are interchangeable:
          a reader delivers the next *complete* frame, whichever token it
          holds, and skips torn ones (ABORT, a header where a chunk should
          be, leftover chunks of a reader that died). A token whose reader
          finds the bulk ring empty while no writer holds the writer lock
          has lost its frame (its writer died, or another reader took it);
          it is dropped (JoinableQueue marks it done). So #delivered +
          #dropped = #tokens, nothing torn is delivered, and nobody waits
          for a frame that cannot come.
        * Locks are POSIX record locks on the arena's file, released by
          the kernel when their holder dies, plus a thread lock for the
          threads of one process.
    """

    def __init__(self, arena: Arena, ring: Any) -> None:
        self.arena = arena
        self.ring = ring
        self.chunk = _framing.chunk_size(ring.max_message_size)
        self._lost_view: memoryview | None = None
        self.feeders: list[threading.Thread] = []
        self._exit_join = False
        self.cancel_join = False
        self._new_locks()
        _all_bulks.add(self)

    def _new_locks(self) -> None:
        """Fresh thread locks: at creation, and in a forked child (a lock
        held by a thread of the parent would stay held there forever; the
        record locks are not inherited by a child anyway)."""
        self.locks = {_WRITER_LOCK: threading.Lock(), _READER_LOCK: threading.Lock()}
        self.feeders = []           # a parent's feeder threads do not exist in a child
        self._exit_join = False     # multiprocessing clears its finalizers in a child

    def __getstate__(self) -> dict:
        return {"arena": self.arena, "ring": self.ring}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["arena"], state["ring"])

    # ------------------------------------------------------------ locks
    def _acquire(self, which: int, deadline: float | None) -> bool:
        """Take a lock; False if the deadline passed first."""
        tlock = self.locks[which]
        if not tlock.acquire(timeout=-1 if deadline is None else max(deadline - time.monotonic(), 0)):
            return False
        pause = 0.0005
        while True:
            try:
                fcntl.lockf(self.arena.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, which)
                return True
            except (BlockingIOError, PermissionError):
                pass            # another process holds it
            except BaseException:
                tlock.release()
                raise
            if deadline is not None and time.monotonic() >= deadline:
                tlock.release()
                return False
            time.sleep(pause)       # bounded: the holder finishes or dies (the kernel frees it)
            pause = min(pause * 2, 0.01)

    def _release(self, which: int) -> None:
        try:
            fcntl.lockf(self.arena.fd, fcntl.LOCK_UN, 1, which)
        finally:
            self.locks[which].release()

    def _writer_active(self) -> bool:
        """True if some thread or process is writing a large message."""
        return self._lock_held(_WRITER_LOCK)

    # ------------------------------------------------------------ writing
    def put(self, main: Any, obj: Any, block: bool, timeout: float | None) -> None:
        """Put `obj` (too large for the main ring) as a token and a frame.

        The frame is written in slices, each waiting at most 50 ms for room,
        so that the writer keeps its deadline and notices a reader that left
        mid-frame (killed, or interrupted by an exception): it then discards
        the rest of the frame from the bulk ring and counts the message lost
        (the reader took its token, so it is gone), and returns.

        Raises:
            queue.Full: the writer lock, room for the token, or room for the
                frame did not come in time (at once when block is False). If
                the token was in already, the frame is left incomplete: the
                reader that takes the token skips it (see the class
                docstring), nothing torn is delivered.
            Whatever pickling `obj` raises (nothing was put).
        """
        parts = [memoryview(p).cast("B") for p in _framing.dump_parts(obj)]
        deadline = None if not block or timeout is None else time.monotonic() + timeout
        if not self._acquire(_WRITER_LOCK, deadline if block else time.monotonic()):
            raise queue.Full
        handed_off = False
        try:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            main.put(_framing.Frame("token"), block, remaining)     # queue.Full: nothing put
            # records of the bulk ring put before ours: once more than these
            # were taken, a reader has started on our frame
            start = self.ring.stats()["messages_in"]
            if block and deadline is None:
                # the frame may not fit before a reader comes, and the only
                # reader may be our caller (put then get in one thread): a
                # feeder thread writes it, as multiprocessing's does
                self._start_feeder(parts, start)
                handed_off = True
                return
            self._write_frame(parts, block, deadline, start)
        finally:
            if not handed_off:
                self._release(_WRITER_LOCK)

    def _write_frame(self, parts: list[memoryview], block: bool, deadline: float | None,
                     start: int) -> None:
        """Write the frame of `parts` (writer lock held): its Frame record,
        then the chunks. A reader that left mid-frame makes the rest be
        discarded; anything else that stops the write puts an ABORT (if it
        can) and is raised."""
        try:
            self._put_record(_framing.Frame("object", tuple(p.nbytes for p in parts)),
                             block, deadline, start)
            for part in parts:
                for off in range(0, part.nbytes, self.chunk):
                    self._put_record(part[off:off + self.chunk], block, deadline, start)
        except _ReaderLeft:
            self._discard_frame()
        except BaseException:
            try:
                self.ring.put(_framing.ABORT, False)
            except BaseException:
                pass        # the reader drops the frame when we let go of the lock
            raise

    def _start_feeder(self, parts: list[memoryview], start: int) -> None:
        """Write the frame of `parts` from a daemon thread, which then
        releases the writer lock (held for it by the caller). The parts that
        are the caller's buffers are copied first: put has returned by the
        time they are written."""
        owned = [parts[0]] + [memoryview(bytes(p)) for p in parts[1:]]

        def feed() -> None:
            try:
                self._write_frame(owned, True, None, start)
            except BaseException:
                pass        # put has returned: the frame was aborted, readers skip it
            finally:
                try:
                    self._release(_WRITER_LOCK)
                except OSError:
                    pass        # the queue's arena was closed: its record lock went with it

        thread = threading.Thread(target=feed, name="shmipc-queue-feeder", daemon=True)
        self.feeders = [t for t in self.feeders if t.is_alive()] + [thread]
        if not self._exit_join:
            # as multiprocessing: a process exits once its queued messages are
            # written (cancel_join_thread() skips this)
            self._exit_join = True
            from multiprocessing import util
            util.Finalize(self, _Bulk._join_at_exit, args=(weakref.ref(self),), exitpriority=10)
        thread.start()

    @staticmethod
    def _join_at_exit(ref: Any) -> None:
        bulk = ref()
        if bulk is not None and not bulk.cancel_join:
            bulk.join_feeders()

    def join_feeders(self, timeout: float | None = None) -> None:
        """Wait until the frames handed to feeder threads are written."""
        for thread in list(self.feeders):
            thread.join(timeout)

    def _put_record(self, rec: Any, block: bool, deadline: float | None, start: int) -> None:
        """Put one record of the frame being written, waiting for room in
        slices.

        Raises:
            queue.Full: no room by the deadline (at once when not block).
            _ReaderLeft: the reader of this frame left it midway.
        """
        if not block:
            self.ring.put(rec, False)
            return
        while True:
            wait = _WRITE_SLICE_S
            if deadline is not None:
                wait = min(wait, max(deadline - time.monotonic(), 0.0))
            try:
                self.ring.put(rec, True, wait)
                return
            except queue.Full:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            if self._reader_left(start):
                raise _ReaderLeft

    def _reader_left(self, start: int) -> bool:
        """True if a reader started on the frame whose first record was
        record number `start` of the bulk ring and has let go of the reader
        lock (it died -- the kernel freed its record lock -- or left by an
        exception) while the frame is not complete: nobody will read the rest."""
        if self.ring.stats()["messages_out"] <= start:
            return False            # nobody has taken our header yet: keep waiting
        return not self._lock_held(_READER_LOCK)

    def _lock_held(self, which: int) -> bool:
        """True if some thread or process holds lock `which`."""
        tlock = self.locks[which]
        if not tlock.acquire(blocking=False):
            return True             # a thread of this process
        try:
            try:
                fcntl.lockf(self.arena.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, which)
            except (BlockingIOError, PermissionError):
                return True         # another process
            fcntl.lockf(self.arena.fd, fcntl.LOCK_UN, 1, which)
            return False
        finally:
            tlock.release()

    def _discard_frame(self) -> None:
        """The reader of our frame left: take the reader lock (if a new
        reader has it, it skips our records itself), throw away what is in
        the bulk ring (only our frame's records: everything before them was
        taken) and count the message lost."""
        if self._acquire(_READER_LOCK, time.monotonic()):
            try:
                while True:
                    try:
                        with self.ring.get_view(False):
                            pass
                    except queue.Empty:
                        break
            finally:
                self._release(_READER_LOCK)
        self.count_lost()

    def _lost_block(self) -> memoryview | None:
        if self._lost_view is None:
            try:
                self._lost_view = self.arena.block(name=_LOST_BLOCK)
            except KeyError:
                return None         # a queue made without the counter
        return self._lost_view

    def count_lost(self) -> None:
        """One more large message lost by a reader that left it midway
        (shown in the queue's stats()["lost"])."""
        block = self._lost_block()
        if block is None:
            return
        with self.arena.lock():
            struct.pack_into("<Q", block, 0, struct.unpack_from("<Q", block, 0)[0] + 1)

    def lost(self) -> int:
        """Large messages lost by readers that left them midway."""
        block = self._lost_block()
        return 0 if block is None else struct.unpack_from("<Q", block, 0)[0]

    # ------------------------------------------------------------ reading
    def read(self) -> Any:
        """The message of a token just taken from the main ring.

        Raises:
            _NoFrame: its frame will never come (see the class docstring).
        """
        self._acquire(_READER_LOCK, None)
        try:
            item = self._next()
            while True:
                if type(item) is not _Frame or item.kind != "object" or not item.sizes:
                    item = self._next()         # leftovers of a torn frame
                    continue
                try:
                    parts = _framing.read_parts(item.sizes, self._chunk_into)
                except _Torn as exc:
                    item = exc.item             # a new header (or junk): go on from it
                    continue
                except BaseException:
                    # left midway (Ctrl-C, a signal handler raising): the next
                    # reader skips the rest as leftovers; a writer still
                    # writing it notices, discards it and counts the loss
                    if not self._lock_held(_WRITER_LOCK):
                        self.count_lost()
                    raise
                return _framing.load_parts(parts)
        finally:
            self._release(_READER_LOCK)

    def _next(self) -> Any:
        """The next bulk record, waiting while a writer is at work."""
        while True:
            try:
                return self.ring.get(True, 0.05)
            except queue.Empty:
                pass
            if not self._writer_active() and self.ring.empty():
                raise _NoFrame

    def _chunk_into(self, dest: memoryview) -> int:
        """Copy the next chunk of the frame being read into `dest`, straight
        from the ring."""
        while True:
            try:
                with self.ring.get_view(True, 0.05) as view:
                    if type(view) is not memoryview or view.nbytes > dest.nbytes:
                        raise _Torn(view if type(view) is not memoryview else None)
                    n = view.nbytes
                    dest[:n] = view
                    return n
            except queue.Empty:
                pass
            if not self._writer_active() and self.ring.empty():
                raise _Torn(None)   # the writer died midway: skip, read on


class _Torn(Exception):
    """The frame being read was cut short; ``item`` is the record found
    instead of its next chunk (None: nothing)."""

    def __init__(self, item: Any) -> None:
        self.item = item


class _Base:
    """State and methods common to the three queues (one ring in one arena)."""

    # multiprocessing's queues are generic in annotations: Queue[int]
    __class_getitem__ = classmethod(types.GenericAlias)

    # set before anything can raise, so __del__ / repr work after a failed __init__
    _arena: Arena | None = None
    _ring: Any = None
    _closed: bool = False
    _maxsize: int = 0

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, capacity: int | None = None) -> None:
        maxsize = _ring_maxsize(maxsize)
        cap = _ring_capacity(capacity)
        self._maxsize = maxsize
        # the arena holds the ring, the bulk ring for messages too large for
        # it (memory is only committed where written) and, for
        # JoinableQueue, a small state block
        self._arena = Arena(Arena.size_for(rings=[cap, cap], blocks=[64, 64]))
        self._ring = self._arena.ring(cap, maxsize=maxsize)
        self._arena.block(64, name=_LOST_BLOCK)
        self._bulk = _Bulk(self._arena, self._arena.ring(cap, name="bulk"))
        self._closed = False

    # ------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        _check_spawning(self)
        state = self.__dict__.copy()
        state["_closed"] = False
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------ common API
    def _check_open(self) -> None:
        if self._closed:
            raise RingClosed(f"{type(self).__name__} {self!r} is closed")

    def _raise_closed(self) -> NoReturn:
        """The one translation of the ring's RingClosed (the queue, or its
        arena, was closed in this process, perhaps by another thread
        mid-call): multiprocessing's ValueError, naming the queue. Any other
        ValueError (from pickling, unpickling, user code) is never caught as
        "closed"."""
        raise RingClosed(f"{type(self).__name__} {self!r} is closed") from None

    def _dropped(self) -> None:
        """A large message's token whose frame was lost (its writer died
        midway): nothing to deliver. JoinableQueue counts it done."""

    def _unframe(self, item: Any) -> Any:
        """The message a token stands for, or _NOTHING if its frame was lost."""
        if item.kind != "token":
            return _NOTHING         # a Frame only shmipc's own code makes: not a message
        try:
            return self._bulk.read()
        except _NoFrame:
            self._dropped()
            return _NOTHING
        except RingClosed:
            self._raise_closed()

    def _get(self, block: bool, timeout: float | None) -> Any:
        """get(), past tokens whose frame was lost."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                item = self._ring.get(block, timeout)
            except RingClosed:
                self._raise_closed()
            if type(item) is not _Frame:
                return item
            item = self._unframe(item)
            if item is not _NOTHING:
                return item
            if deadline is not None:
                timeout = max(deadline - time.monotonic(), 0.0)

    def _put_many(self, items: Iterable[Any], put_many: Any, put_large: Any) -> int:
        """put_many through `put_many`, sending an item too large for the
        ring with `put_large` and going on with the rest. (The ring puts the
        items before the failing one, then raises: so at MessageTooLarge,
        every item yielded but the last is in.)"""
        last: list = [None]
        yielded = [0]

        def watched() -> Iterator[Any]:
            for item in items:
                yielded[0] += 1
                last[0] = item
                yield item

        it = watched()
        base = 0
        while True:
            try:
                return base + put_many(it)
            except MessageTooLarge:
                put_large(last[0])
                base = yielded[0]
            except queue.Full as exc:
                raise queue.Full(base + (exc.args[0] if exc.args else 0)) from None
            except RingClosed:
                self._raise_closed()

    def _unframe_all(self, items: list) -> list:
        if not any(type(item) is _Frame for item in items):
            return items
        out = []
        for item in items:
            if type(item) is _Frame:
                item = self._unframe(item)
                if item is _NOTHING:
                    continue
            out.append(item)
        return out

    def empty(self) -> bool:
        """True if the queue holds no message now (approximate, as in
        multiprocessing: others may put or get at the same moment)."""
        self._check_open()
        return self._ring.empty()

    def close(self) -> None:
        """Stop using the queue in this process: later calls here raise
        ValueError; other processes are unaffected. Everything put is already
        in shared memory, so nothing is lost. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._ring is not None:
            self._ring.close()

    @property
    def capacity(self) -> int:
        """Bytes in the queue's ring; one message may use at most half."""
        return self._ring.capacity

    @property
    def max_message_size(self) -> int:
        """Largest encoded message one put accepts, in bytes."""
        return self._ring.max_message_size

    def stats(self) -> dict:
        """The ring's live counters (messages and bytes in and out, waits,
        recoveries of dead processes' locks, lost messages), as a dict."""
        self._check_open()
        stats = self._ring.stats()
        stats["lost"] += self._bulk.lost()      # large messages lost mid-read
        return stats

    def __repr__(self) -> str:
        state = "closed" if self._closed or self._ring is None else f"capacity={self._ring.capacity}"
        return f"<shmipc.{type(self).__name__} maxsize={self._maxsize} {state} at {id(self):#x}>"

    def __del__(self) -> None:
        try:
            if self._arena is not None:
                self._arena.close()
        except Exception:
            pass


class Queue(_Base):
    """A process-shared FIFO queue, a drop-in for ``multiprocessing.Queue``.

    Args:
        maxsize: most messages held at once; <= 0 means no limit but bytes.
        ctx: accepted for signature compatibility (the context's start method
            does not matter to a shared-memory queue).
        capacity: ring bytes, a power of two >= 1024 (default 32 MiB). A
            message larger than about capacity/2 goes through a second ring
            of that size, in chunks (see _Bulk).

    Raises:
        TypeError / ValueError: an invalid maxsize or capacity.
    """

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Put `obj` on the queue; wait for room while it is full (up to
        `timeout` seconds; None: forever) unless block is False.

        Raises:
            queue.Full: no room in time (at once when block is False).
            ValueError: the queue was closed in this process.
            Whatever pickling `obj` raises; the queue is then unchanged.
        """
        if timeout is not None:
            timeout = _timeout(timeout)
        try:
            self._ring.put(obj, block, timeout)
        except MessageTooLarge:
            self._bulk.put(self._ring, obj, block, timeout)
        except RingClosed:
            self._raise_closed()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        """Remove and return the next message; wait while the queue is empty
        (up to `timeout` seconds; None: forever) unless block is False.

        Raises:
            queue.Empty: nothing arrived in time (at once when block is False).
            ValueError: the queue was closed in this process.
        """
        if timeout is not None:
            timeout = _timeout(timeout)
        try:
            item = self._ring.get(block, timeout)
        except RingClosed:
            self._raise_closed()
        if type(item) is not _Frame:
            return item                 # the common case
        item = self._unframe(item)
        if item is not _NOTHING:
            return item
        return self._get(block, timeout)

    def put_nowait(self, obj: Any) -> None:
        """put(obj, False)."""
        return self.put(obj, False)

    def get_nowait(self) -> Any:
        """get(False)."""
        return self.get(False)

    def put_many(self, items: Iterable[Any], block: bool = True, timeout: float | None = None) -> int:
        """Put every item of `items` in order, publishing them in batches;
        returns how many were put.

        Raises:
            queue.Full: the queue stayed full past `timeout`; the items before
                the failing one were put (their count is ``exc.args[0]``).
            MessageTooLarge, pickling errors: as put, for the failing item.
        """
        if timeout is not None:
            timeout = _timeout(timeout)
        return self._put_many(items, lambda it: self._ring.put_many(it, block, timeout),
                              lambda obj: self._bulk.put(self._ring, obj, block, timeout))

    def get_many(self, max_items: int, block: bool = True, timeout: float | None = None) -> list:
        """Wait (as get) for one message, then take up to `max_items` of those
        already there, in order.

        Raises:
            queue.Empty: nothing arrived in time.
            ValueError: max_items < 1, or the queue is closed.
        """
        if timeout is not None:
            timeout = _timeout(timeout)
        try:
            items = self._ring.get_many(max_items, block, timeout)
        except RingClosed:
            self._raise_closed()
        items = self._unframe_all(items)
        return items if items else [self._get(block, timeout)]

    def qsize(self) -> int:
        """Messages in the queue now (approximate while others put and get)."""
        self._check_open()
        return self._ring.qsize()

    def full(self) -> bool:
        """True if a put would have to wait now (approximate)."""
        self._check_open()
        return self._ring.full()

    def join_thread(self) -> None:
        """Wait until the large messages handed to feeder threads are written
        (as multiprocessing waits for its feeder thread).

        Raises:
            AssertionError: the queue is not closed (as multiprocessing).
        """
        if not self._closed:
            raise AssertionError(f"Queue {self!r} not closed")
        if not self._bulk.cancel_join:
            self._bulk.join_feeders()

    def cancel_join_thread(self) -> None:
        """multiprocessing's way to exit without flushing: neither
        join_thread() nor the process's exit waits for the feeder threads
        (a large message they have not written is then lost)."""
        self._bulk.cancel_join = True


class JoinableQueue(Queue):
    """A Queue that counts unfinished tasks, a drop-in for
    ``multiprocessing.JoinableQueue``: every put adds a task, ``task_done()``
    finishes one, ``join()`` waits until none is left.

    The put count is the ring's own message counter (so put costs nothing
    extra); the done count lives in a block of the queue's arena and is
    changed under the arena's cross-process lock.
    """

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, capacity: int | None = None) -> None:
        super().__init__(maxsize, ctx=ctx, capacity=capacity)
        assert self._arena is not None
        # u64 tasks done, by every process
        self._done = self._arena.block(64, name="tasks_done")

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        del state["_done"]          # a view of the arena: found again by name
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        assert self._arena is not None
        self._done = self._arena.block(name="tasks_done")

    def _dropped(self) -> None:
        """A token whose frame was lost (its writer died midway): the task
        it counted will never be taken, so it is done."""
        self.task_done()

    def _counts(self) -> tuple[int, int]:
        """(tasks put, tasks done). A task is counted as put before any
        consumer can see its message (the ring bumps its message count before
        publishing the record), so done <= put holds for correct callers."""
        return self._ring.stats()["messages_in"], struct.unpack_from("<Q", self._done, 0)[0]

    def task_done(self) -> None:
        """Mark one task (one message taken with get) finished.

        Raises:
            ValueError: called more times than messages were put.
        """
        self._check_open()
        assert self._arena is not None
        with self._arena.lock():
            put, done = self._counts()
            if done >= put:
                raise ValueError("task_done() called too many times")
            struct.pack_into("<Q", self._done, 0, done + 1)

    @overload
    def join(self, timeout: None = None) -> None: ...
    @overload
    def join(self, timeout: float) -> bool: ...

    def join(self, timeout: float | None = None) -> bool | None:
        """Block until every message put has been marked done with task_done.

        Args:
            timeout: shmipc extension: give up after this many seconds
                (negative: 0) and return False, or return True once every
                task is done. Without it (multiprocessing's signature) join
                waits forever and returns None, as multiprocessing's does.

        Raises:
            ValueError: a NaN timeout, or the queue was closed in this process.

        Waits by polling the shared counters (every 0.2 ms, backing off to
        every 10 ms), so it is interruptible and never holds a lock.
        """
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + _timeout(timeout)
        pause = 0.0002
        while True:
            put, done = self._counts()
            if done >= put:
                return None if deadline is None else True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def stats(self) -> dict:
        """Queue.stats() plus ``unfinished_tasks``."""
        stats = super().stats()
        put, done = self._counts()
        stats["unfinished_tasks"] = put - done
        return stats


class SimpleQueue(_Base):
    """An unbounded process-shared FIFO queue, a drop-in for
    ``multiprocessing.SimpleQueue`` (put, get, empty, close).

    Args:
        ctx: accepted for signature compatibility.
        capacity: ring bytes, as for Queue.
        waitable: also keep an event fd that counts messages, so that code
            written against multiprocessing's internals can wait on
            ``q._reader`` with ``multiprocessing.connection.wait`` (the stdlib
            ProcessPoolExecutor does). Costs two system calls per message;
            queues made by ``shmipc.get_context().SimpleQueue()`` turn it on.

    Raises:
        TypeError / ValueError: an invalid capacity.
    """

    _bell: int = -1

    def __init__(self, *, ctx: Any = None, capacity: int | None = None, waitable: bool = False) -> None:
        super().__init__(0, ctx=ctx, capacity=capacity)
        if waitable:
            # Invariant (waitable queues): the event counter never exceeds the
            # messages in the ring that no consumer has claimed. A producer
            # bumps it after its message is committed; a consumer takes one
            # count before it takes one message. So a readable fd means a
            # message is there, and a consumer holding a count finds one at
            # once. (One exception: a producer that dies between committing
            # and counting leaves a message without a count; _take_bell then
            # takes it without one, and a later count is one spare wake-up.)
            self._bell = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # multiprocessing's SimpleQueue has two pipe ends; its Pool and the stdlib
    # ProcessPoolExecutor reach for them. Made on access to avoid a cycle.
    @property
    def _reader(self) -> "_Reader":
        return _Reader(self)

    @property
    def _writer(self) -> "_Writer":
        return _Writer(self)

    @property
    def _rlock(self) -> Any:
        # multiprocessing.Pool's terminate takes this to stop its workers from
        # reading while it drains the queue, then kills them; shmipc's get
        # takes no such lock, so a lock of this process suffices.
        lock = self.__dict__.get("_rlock_here")
        if lock is None:
            lock = self.__dict__.setdefault("_rlock_here", threading.Lock())
        return lock

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_rlock_here", None)
        if self._bell >= 0:
            from multiprocessing import reduction

            state["_bell"] = reduction.DupFd(self._bell)
        return state

    def __setstate__(self, state: dict) -> None:
        bell = state.get("_bell", -1)
        if not isinstance(bell, int):
            state["_bell"] = bell.detach()
        super().__setstate__(state)

    @property
    def waitable(self) -> bool:
        """True if this queue keeps an event fd for multiprocessing.connection.wait."""
        return self._bell >= 0

    def put(self, obj: Any) -> None:
        """Put `obj` on the queue (waits only if the ring's bytes are full).
        Any size: one too large for the ring goes in chunks.

        Raises:
            ValueError: the queue was closed in this process.
            Whatever pickling `obj` raises; the queue is then unchanged.
        """
        try:
            self._ring.put(obj)
        except MessageTooLarge:
            self._bulk.put(self._ring, obj, True, None)
        except RingClosed:
            self._raise_closed()
        if self._bell >= 0:
            os.eventfd_write(self._bell, 1)

    def get(self) -> Any:
        """Remove and return the next message, waiting while the queue is empty.

        Raises:
            ValueError: the queue was closed in this process.
        """
        while True:
            if self._bell >= 0:
                self._take_bell()
            try:
                item = self._ring.get()
            except RingClosed:
                self._raise_closed()
            if type(item) is not _Frame:
                return item
            item = self._unframe(item)
            if item is not _NOTHING:
                return item

    def put_many(self, items: Iterable[Any]) -> int:
        """Put every item of `items` in order, publishing them in batches;
        returns how many were put.

        Raises:
            Pickling errors: as put, for the failing item (the items before
                it were put).
            ValueError: the queue was closed in this process.
        """
        if self._bell < 0:
            return self._put_many(items, self._ring.put_many,
                                  lambda obj: self._bulk.put(self._ring, obj, True, None))
        count = 0
        for item in items:          # one by one: each message is counted on the event fd
            self.put(item)
            count += 1
        return count

    def get_many(self, max_items: int) -> list:
        """Wait for one message, then take up to `max_items` of those already
        there, in order.

        Raises:
            ValueError: max_items < 1, or the queue is closed.
        """
        if self._bell < 0:
            try:
                items = self._ring.get_many(max_items)
            except RingClosed:
                self._raise_closed()
            items = self._unframe_all(items)
            return items if items else [self.get()]
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        out = [self.get()]
        while len(out) < max_items:
            try:
                os.eventfd_read(self._bell)     # one count per further message
            except BlockingIOError:
                break
            try:
                item = self._ring.get()
            except RingClosed:
                self._raise_closed()
            if type(item) is _Frame:
                item = self._unframe(item)
                if item is _NOTHING:
                    continue
            out.append(item)
        return out

    def _take_bell(self) -> None:
        """Before a get on a waitable queue: take one count from the event fd,
        waiting for one. If the count stays zero for a whole slice while the
        ring holds messages, a producer died (or stalled) between committing
        a message and counting it: go on without a count rather than strand
        that message (a count arriving later is then one spare wake-up)."""
        poller = None
        while True:
            self._check_open()
            try:
                os.eventfd_read(self._bell)
                return
            except BlockingIOError:
                pass        # no count (or another consumer took it): wait for one
            if poller is None:
                poller = select.poll()
                poller.register(self._bell, select.POLLIN)
            if not poller.poll(_BELL_SLICE_MS) and not self._ring.empty():
                return

    def _readable(self, timeout: float | None) -> bool:
        """True if a get would not wait, waiting up to `timeout` for that."""
        self._check_open()
        if self._bell < 0:
            if timeout is None:
                raise ValueError("waiting with poll(None) needs a waitable SimpleQueue")
            deadline = time.monotonic() + timeout
            while self._ring.empty():
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.001)
            return True
        poller = select.poll()
        poller.register(self._bell, select.POLLIN)
        return bool(poller.poll(None if timeout is None else max(int(timeout * 1000), 0)))

    def close(self) -> None:
        """Stop using the queue in this process (later calls raise
        ValueError); other processes are unaffected. Idempotent."""
        super().close()
        if self._bell >= 0:
            os.close(self._bell)
            self._bell = -1

    def __del__(self) -> None:
        try:
            if self._bell >= 0:
                os.close(self._bell)
                self._bell = -1
        except Exception:
            pass
        super().__del__()


class _Reader:
    """``SimpleQueue._reader``: the receiving half as multiprocessing's
    internals use it (``recv``, ``poll``, ``fileno`` for
    ``multiprocessing.connection.wait``, ``close``)."""

    def __init__(self, q: SimpleQueue) -> None:
        self._q = q

    def fileno(self) -> int:
        """The event fd that is readable while a message waits.

        Raises:
            OSError: the queue is not waitable (make it with waitable=True or
                through ``shmipc.get_context().SimpleQueue()``), or closed.
        """
        if self._q._bell < 0:
            raise OSError("this shmipc SimpleQueue has no file descriptor to wait on: "
                          "create it with SimpleQueue(waitable=True) or "
                          "shmipc.get_context().SimpleQueue()")
        return self._q._bell

    @property
    def closed(self) -> bool:
        """True once the queue was closed in this process (as the pipe end of
        multiprocessing's SimpleQueue)."""
        return self._q._closed

    def recv(self) -> Any:
        return self._q.get()

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self._q._readable(timeout)

    def close(self) -> None:
        """multiprocessing closes unused pipe ends in children; the shared
        ring has no per-end state, so this is a no-op."""


class _Writer:
    """``SimpleQueue._writer``: the sending half as multiprocessing's
    internals use it (``send``, ``close``)."""

    def __init__(self, q: SimpleQueue) -> None:
        self._q = q

    @property
    def closed(self) -> bool:
        """True once the queue was closed in this process."""
        return self._q._closed

    def send(self, obj: Any) -> None:
        self._q.put(obj)

    def close(self) -> None:
        """A no-op: see _Reader.close."""


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
