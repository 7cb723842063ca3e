"""multiprocessing-compatible queues over a shared-memory ring.

``Queue``, ``SimpleQueue`` and ``JoinableQueue`` keep the signatures and the
exceptions of :mod:`multiprocessing`'s, so a program switches by changing one
import. What differs, and why:

* ``put`` writes the message straight into the ring in shared memory. So a
  pickling error is raised by the ``put`` that caused it (multiprocessing
  prints it from its thread and loses the item), and a put waits while the
  ring is full (multiprocessing's returns at once and its feeder thread
  waits). One exception: a message larger than half the ring put with
  ``block=True, timeout=None`` is pickled by ``put``, which puts its place
  in the queue, hands its chunks to a daemon "feeder" thread and returns (so
  one thread can put such messages, then get them, as with multiprocessing).
  The thread writes the messages handed to it in order and ends when none is
  left; a write that fails goes to ``_on_queue_feeder_error`` (which prints
  it, as multiprocessing's) and counts as lost. ``join_thread()`` (after
  ``close()``) and the process's exit wait for it,
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
* ``fileno()`` (and ``q._reader.fileno()``) is a descriptor readable when a
  get would not wait, for ``select``/``selectors``/``wait``; ``get_async``
  and ``put_async`` await without blocking an event loop (see _Base and
  shmipc.aio).

Queues travel to child processes the way multiprocessing's do: inherited
through fork, or pickled as ``multiprocessing.Process`` arguments under spawn
and forkserver (the memfd is passed as a file descriptor). Pickling one at any
other time raises RuntimeError, as multiprocessing does.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from typing import Any, Iterable, overload


from shmipc._framing import Frame as _Frame     # looked up on every get/recv
from shmipc.errors import HandleClosed, MessageTooLarge, RingClosed
from shmipc._queue_ready import _NOTHING
from shmipc._queue_base import (DEFAULT_CAPACITY, _RLOCK_HERE, _Base, _check_spawning,  # noqa: F401 (re-exported)
                                 _ring_capacity, _ring_maxsize, _timeout)
from shmipc._waiting import JOIN_POLL_MAX_S, JOIN_POLL_S, Backoff

__all__ = ["Queue", "SimpleQueue", "JoinableQueue", "DEFAULT_CAPACITY"]


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
        if self._big_read is not None:  # a large message get_async began to read
            return self._get(block, timeout)
        try:
            item = self._ring.get(block, timeout)
        except RingClosed:
            self._raise_closed()
        if type(item) is not _Frame:
            if self._polled:
                self._after_get()
            return item                 # the common case
        item = self._unframe(item)
        if item is not _NOTHING:
            self._after_get()
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
        if self._big_read is not None:  # a large message get_async began to read
            item = self._take_big_read(timeout if block else 0.0)
            if item is not _NOTHING:
                return [item]
        try:
            items = self._ring.get_many(max_items, block, timeout)
        except RingClosed:
            self._raise_closed()
        items = self._unframe_all(items)
        if not items:
            return [self._get(block, timeout)]
        self._after_get()
        return items

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

    def close(self) -> None:
        """Stop using the queue in this process: later calls here raise
        ValueError; other processes are unaffected. Everything put is already
        in shared memory, so nothing is lost. Idempotent.

        As multiprocessing's (3.13 test_closed_queue_empty_exceptions): on a
        queue nothing was ever put on, empty() still answers True afterwards
        (multiprocessing only closes its reader once its feeder thread ran);
        otherwise empty() raises HandleClosed, an OSError.
        """
        if not self._closed and self._ring is not None:
            try:
                self._never_used = self._ring.stats(recover=False)["messages_in"] == 0
            except RingClosed:
                pass
        super().close()

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
        return self._ring.stats(recover=False)["messages_in"], struct.unpack_from("<Q", self._done, 0)[0]

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
        every 10 ms: shmipc._waiting), so it is interruptible and never holds a lock.
        """
        self._check_open()
        deadline = None if timeout is None else time.monotonic() + _timeout(timeout)
        backoff = Backoff(JOIN_POLL_S, JOIN_POLL_MAX_S)
        while True:
            put, done = self._counts()
            if done >= put:
                return None if deadline is None else True
            if not backoff.sleep(deadline):
                return False

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
        waitable: accepted for compatibility; every queue is now waitable
            (``fileno()``, ``q._reader.fileno()``: see _Base).

    Raises:
        TypeError / ValueError: an invalid capacity.
    """

    # multiprocessing's close() closes both pipe ends: put, get and empty
    # then raise OSError("handle is closed")
    _ClosedError = HandleClosed

    def __init__(self, *, ctx: Any = None, capacity: int | None = None, waitable: bool = True) -> None:
        super().__init__(0, ctx=ctx, capacity=capacity)

    # multiprocessing's SimpleQueue has two pipe ends; its Pool and the stdlib
    # ProcessPoolExecutor reach for them. Made on access to avoid a cycle.
    @property
    def _writer(self) -> "_Writer":
        return _Writer(self)

    @property
    def _rlock(self) -> Any:
        # multiprocessing.Pool's terminate takes this to stop its workers from
        # reading while it drains the queue, then kills them; shmipc's get
        # takes no such lock, so a lock of this process suffices, and a
        # _reader.recv() under it does not wait (see _Reader.recv: a worker
        # may take the message the drain's poll() saw).
        # One per process (setdefault: one per process even when threads
        # race): a forked child, perhaps forked while another thread held
        # its parent's, makes its own.
        return self.__dict__.setdefault(_RLOCK_HERE + str(os.getpid()), threading.Lock())

    def _reading_locked_here(self) -> bool:
        lock = self.__dict__.get(_RLOCK_HERE + str(os.getpid()))
        return lock is not None and lock.locked()

    @property
    def waitable(self) -> bool:
        """True: every queue has a readiness descriptor (kept for compatibility)."""
        return True

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

    def get(self) -> Any:
        """Remove and return the next message, waiting while the queue is empty.

        Raises:
            ValueError: the queue was closed in this process.
        """
        return self._get(True, None)

    def put_many(self, items: Iterable[Any]) -> int:
        """Put every item of `items` in order, publishing them in batches;
        returns how many were put.

        Raises:
            Pickling errors: as put, for the failing item (the items before
                it were put).
            ValueError: the queue was closed in this process.
        """
        return self._put_many(items, self._ring.put_many,
                              lambda obj: self._bulk.put(self._ring, obj, True, None))

    def get_many(self, max_items: int) -> list:
        """Wait for one message, then take up to `max_items` of those already
        there, in order.

        Raises:
            ValueError: max_items < 1, or the queue is closed.
        """
        try:
            items = self._ring.get_many(max_items)
        except RingClosed:
            self._raise_closed()
        items = self._unframe_all(items)
        if not items:
            return [self.get()]
        self._after_get()
        return items


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


