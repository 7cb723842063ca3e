"""Queue messages larger than the queue's ring: a second ("bulk") ring of the
queue's arena carries them in chunks (see :class:`_Bulk`). Used by
shmipc.queues only."""
from __future__ import annotations

import collections
import os
import struct
import threading
import time
import weakref
from typing import Any

import fcntl
import queue

from shmipc import _framing
from shmipc._framing import Frame as _Frame
from shmipc.arena import Arena
from shmipc._waiting import BULK_LOCK_MAX_S, BULK_LOCK_S, BULK_WRITE_SLICE_S, Backoff
from shmipc.errors import RingClosed

# Byte offsets of the record locks (on the arena's file) that serialise the
# writers and the readers of large messages; far past any arena's end and
# apart from the arena's own table lock (offset 0).
_WRITER_LOCK = 1 << 60
_READER_LOCK = (1 << 60) + 1


# a large put waits for room in the bulk ring this long at a time, then
# checks its deadline and that its reader is still there
_WRITE_SLICE_S = BULK_WRITE_SLICE_S

# name of the arena block counting large messages lost mid-read: at 0 the
# count, at _READING 1 while the reader lock's holder is inside a message
# (see _Bulk.read: a holder that left without clearing it lost one)
_LOST_BLOCK = "bulk_lost"
_READING = 8


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

    #: called as on_error(exception, obj) when a feeder thread fails to write
    #: a message (the queue's _on_queue_feeder_error, as multiprocessing's)
    on_error: Any = None

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
        # the frames handed to this process's feeder thread, in order, and
        # whether one runs (see _hand_off); guarded by feed_lock
        self.feed_lock = threading.Lock()
        self.feed_queue: collections.deque = collections.deque()
        self.feeding = False
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
        backoff = Backoff(BULK_LOCK_S, BULK_LOCK_MAX_S)
        while True:
            try:
                fcntl.lockf(self.arena.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, which)
                return True
            except (BlockingIOError, PermissionError):
                pass            # another process holds it
            except BaseException:
                tlock.release()
                raise
            # bounded: the holder finishes or dies (the kernel frees it)
            if not backoff.sleep(deadline):
                tlock.release()
                return False

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
        if block and deadline is None:
            # the frame may not fit before a reader comes, and the only
            # reader may be our caller (put then get in one thread): a
            # feeder thread writes it, as multiprocessing's does
            self._hand_off(main, parts, obj, True)
            return
        if not self._acquire(_WRITER_LOCK, deadline if block else time.monotonic()):
            raise queue.Full
        try:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            main.put(_framing.Frame("token"), block, remaining)     # queue.Full: nothing put
            # records of the bulk ring put before ours: once more than these
            # were taken, a reader has started on our frame
            start = self.ring.stats(recover=False)["messages_in"]
            self._write_frame(parts, block, deadline, start)
        finally:
            self._release(_WRITER_LOCK)

    def try_hand_off(self, main: Any, obj: Any) -> bool:
        """put_async's large put: without waiting, take the writer lock and
        put the token, then hand the frame to a feeder thread (as a put
        without timeout does). False if the lock or room for the token is
        not there now (nothing was put: retry later).

        Raises:
            Whatever pickling `obj` raises (nothing was put).
        """
        parts = [memoryview(p).cast("B") for p in _framing.dump_parts(obj)]
        return self._hand_off(main, parts, obj, False)

    def _hand_off(self, main: Any, parts: list[memoryview], obj: Any, wait: bool) -> bool:
        """Put the token of `parts` and queue its frame for this process's
        feeder thread (started if none runs); waiting for the writer lock
        and room for the token if `wait`, else False if either is not there
        now (nothing was put).

        Invariant: while ``feeding``, this process holds the writer lock on
        behalf of its feeder thread, so every token put meanwhile (by any
        thread of ours) enters the main ring in the order its frame enters
        the feed queue, and the feeder writes the frames in that order with
        no other writer's frame between: tokens and frames pair up as when
        each put held the lock for itself, and a second large put does not
        wait for the first message to be read.

        The parts that are the caller's buffers are copied first: put has
        returned by the time they are written."""
        owned = [parts[0]] + [memoryview(bytes(p)) for p in parts[1:]]
        token = _framing.Frame("token")
        with self.feed_lock:
            if self.feeding:
                try:
                    main.put(token, wait, None)
                except queue.Full:
                    return False
                self.feed_queue.append((owned, obj))
                return True
        if not self._acquire(_WRITER_LOCK, None if wait else time.monotonic()):
            return False
        started = False
        try:
            try:
                main.put(token, wait, None)
            except queue.Full:
                return False
            with self.feed_lock:
                self.feed_queue.append((owned, obj))
                self.feeding = True
                self._start_feeder()
                started = True
            return True
        finally:
            if not started:
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

    def _start_feeder(self) -> None:
        """Start the daemon thread that writes the queued frames in order
        (see _hand_off), then releases the writer lock (held for it)."""

        def feed() -> None:
            try:
                while True:
                    with self.feed_lock:
                        if not self.feed_queue:
                            self._stop_feeding()
                            return
                        owned, obj = self.feed_queue.popleft()
                    self._feed_one(owned, obj)
            except BaseException:
                with self.feed_lock:
                    if self.feeding:
                        self._stop_feeding()
                raise

        thread = threading.Thread(target=feed, name="shmipc-queue-feeder", daemon=True)
        self.feeders = [t for t in self.feeders if t.is_alive()] + [thread]
        if not self._exit_join:
            # as multiprocessing: a process exits once its queued messages are
            # written (cancel_join_thread() skips this)
            self._exit_join = True
            from multiprocessing import util
            util.Finalize(self, _Bulk._join_at_exit, args=(weakref.ref(self),), exitpriority=10)
        thread.start()

    def _stop_feeding(self) -> None:
        """feed_lock held: the feeder ends; let go of the writer lock."""
        self.feeding = False
        self.feed_queue.clear()
        try:
            self._release(_WRITER_LOCK)
        except (OSError, ValueError):
            pass        # the queue's arena was closed: its record lock went with it

    def _feed_one(self, owned: list[memoryview], obj: Any) -> None:
        """Write one queued frame (writer lock held for us)."""
        # records of the bulk ring put before ours: once more than these
        # were taken, a reader has started on our frame
        try:
            start = self.ring.stats(recover=False)["messages_in"]
            self._write_frame(owned, True, None, start)
        except BaseException as exc:
            # put has returned: the frame was aborted (readers skip it),
            # the message is lost; say so as multiprocessing's feeder does
            try:
                self.count_lost()
            except BaseException:
                pass            # the arena itself is gone
            on_error = self.on_error
            if on_error is not None:
                try:
                    on_error(exc, obj)
                except BaseException:
                    pass

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
        if self.ring.stats(recover=False)["messages_out"] <= start:
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
        """The reader of our frame left: take the reader lock, count the
        message it left lost (see _take_over) and throw away what is in the
        bulk ring (only our frame's records: everything before them was
        taken). If a new reader has the lock, that reader counts it and
        skips our records itself."""
        if self._acquire(_READER_LOCK, time.monotonic()):
            try:
                self._take_over()
                while True:
                    try:
                        with self.ring.get_view(False):
                            pass
                    except queue.Empty:
                        break
            finally:
                self._release(_READER_LOCK)

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
        """Large messages lost by readers that left them midway. A reader
        killed inside one is counted here (if the reader lock is free) or by
        whoever takes the lock next."""
        block = self._lost_block()
        if block is None:
            return 0
        if struct.unpack_from("<Q", block, _READING)[0] and self._acquire(_READER_LOCK, time.monotonic()):
            try:
                self._take_over()
            finally:
                self._release(_READER_LOCK)
        return struct.unpack_from("<Q", block, 0)[0]

    def _set_reading(self, on: bool) -> None:
        """(Reader lock held) mark that its holder is inside a message, or no longer."""
        block = self._lost_block()
        if block is not None:
            struct.pack_into("<Q", block, _READING, 1 if on else 0)

    def _take_over(self) -> None:
        """Just took the reader lock: if its last holder left while inside a
        message without clearing the mark (it was killed, or left by an
        exception while a writer was still writing), that message is lost:
        count it (first, then clear: a kill in between counts it twice
        rather than not at all)."""
        block = self._lost_block()
        if block is not None and struct.unpack_from("<Q", block, _READING)[0]:
            self.count_lost()
            struct.pack_into("<Q", block, _READING, 0)

    # ------------------------------------------------------------ reading
    def read(self) -> Any:
        """The message of a token just taken from the main ring.

        Raises:
            _NoFrame: its frame will never come (see the class docstring).
        """
        self._acquire(_READER_LOCK, None)
        try:
            self._take_over()
            # From here until a whole frame is read, the token's message is
            # ours alone: a kill leaves the mark set, and whoever takes the
            # lock next (a reader, the writer discarding the frame, stats())
            # counts the message lost
            self._set_reading(True)
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
                    break
            except _NoFrame:
                self._set_reading(False)            # dropped (see the class docstring), not lost
                raise
            except RingClosed:
                raise                               # closed under us: the arena may be gone too
            except BaseException:
                # left midway (Ctrl-C, a signal handler raising): the next
                # reader skips the rest as leftovers. With no writer at work
                # the loss is counted now; else the mark stays, and the
                # writer (noticing, it discards the frame) or the next
                # reader counts it
                if not self._lock_held(_WRITER_LOCK):
                    self._take_over()
                raise
            self._set_reading(False)
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


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
