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
import sys
import threading
import time
import types
from typing import Any, Iterable, Iterator, NoReturn, overload

import queue

from shmipc._framing import Frame as _Frame     # looked up on every get/recv
from shmipc.arena import Arena
from shmipc.errors import HandleClosed, MessageTooLarge, RingClosed
from shmipc._bulk import _LOST_BLOCK, _Bulk, _NoFrame
from shmipc._queue_ready import _NOTHING, _QueueReadiness
from shmipc._waiting import JOIN_POLL_MAX_S, JOIN_POLL_S, Backoff

__all__ = ["Queue", "SimpleQueue", "JoinableQueue", "DEFAULT_CAPACITY"]

#: Default ring bytes per queue: one message may use half (16 MiB). Memory is
#: committed as the ring's pages are first written, so a queue that only ever
#: holds small messages costs little until the ring has cycled once.
DEFAULT_CAPACITY = 32 << 20




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


class _Base(_QueueReadiness):
    """State and methods common to the three queues (one ring in one arena).
    The readiness descriptor and the awaiting methods: shmipc._queue_ready.
    """

    # multiprocessing's queues are generic in annotations: Queue[int]
    __class_getitem__ = classmethod(types.GenericAlias)

    # set before anything can raise, so __del__ / repr work after a failed __init__
    _arena: Arena | None = None
    _ring: Any = None
    _closed: bool = False
    _never_used: bool = False   # closed before any message was put (Queue: close was a no-op)
    # What a closed queue raises (RingClosed: multiprocessing's ValueError).
    # SimpleQueue: HandleClosed, as multiprocessing's closes its pipe ends at
    # once and raises OSError("handle is closed").
    _ClosedError: type = RingClosed
    _maxsize: int = 0
    _ready_r: int = -1          # readiness pipe (see the class docstring)
    _ready_w: int = -1
    _polled: bool = False       # fileno() was called in this process: gets re-arm

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
        self._bulk.on_error = type(self)._on_queue_feeder_error
        self._ready_r, self._ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ring._set_notify(self._ready_w, False)
        self._closed = False

    # ------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        _check_spawning(self)
        from multiprocessing import reduction

        state = self.__dict__.copy()
        state["_closed"] = False
        state["_never_used"] = False
        state["_polled"] = False
        for name in [k for k in state if k.startswith("_rlock_here")]:
            del state[name]
        state["_ready_r"] = reduction.DupFd(self._ready_r)
        state["_ready_w"] = reduction.DupFd(self._ready_w)
        return state

    def __setstate__(self, state: dict) -> None:
        for name in ("_ready_r", "_ready_w"):
            state[name] = state[name].detach()
        self.__dict__.update(state)
        self._ring._set_notify(self._ready_w, False)
        self._bulk.on_error = type(self)._on_queue_feeder_error

    @staticmethod
    def _on_queue_feeder_error(e: BaseException, obj: Any) -> None:
        """Called (as multiprocessing's hook of the same name, which
        subclasses override) when the feeder thread writing a large message
        after put returned fails: the message is lost (counted in
        stats()["lost"]). Prints the traceback to stderr."""
        import traceback

        traceback.print_exception(e)

    # ------------------------------------------------------------ common API
    def _check_open(self) -> None:
        if self._closed:
            self._raise_closed()

    def _raise_closed(self) -> NoReturn:
        """The one translation of the ring's RingClosed (the queue, or its
        arena, was closed in this process, perhaps by another thread
        mid-call): multiprocessing's ValueError, naming the queue. Any other
        ValueError (from pickling, unpickling, user code) is never caught as
        "closed". (SimpleQueue: HandleClosed, also an OSError.)"""
        raise self._ClosedError(f"{type(self).__name__} {self!r} is closed") from None

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
                self._after_get()
                return item
            item = self._unframe(item)
            if item is not _NOTHING:
                self._after_get()
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
        multiprocessing: others may put or get at the same moment).

        Raises:
            HandleClosed (an OSError and a ValueError): the queue was closed
                in this process (as multiprocessing's OSError "handle is
                closed"), unless nothing had been put on it then (see
                Queue.close).
        """
        if self._closed:
            if self._never_used:
                return True
            raise HandleClosed(f"{type(self).__name__} {self!r} is closed")
        try:
            return self._ring.empty()
        except RingClosed:      # closed by another thread meanwhile
            raise HandleClosed(f"{type(self).__name__} {self!r} is closed") from None

    def close(self) -> None:
        """Stop using the queue in this process: later calls here raise
        ValueError; other processes are unaffected. Everything put is already
        in shared memory, so nothing is lost. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._ring is not None:
            self._ring.close()
        self._close_fds()

    def _close_fds(self) -> None:
        aio = sys.modules.get("shmipc.aio")
        if aio is not None and self._ready_r >= 0:
            aio._forget(self._ready_r)      # wake get_async awaits
        for name in ("_ready_r", "_ready_w"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)

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
            self._close_fds()
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
                self._never_used = self._ring.stats()["messages_in"] == 0
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
        # takes no such lock, so a lock of this process suffices.
        # One per process (setdefault: one per process even when threads
        # race): a forked child, perhaps forked while another thread held
        # its parent's, makes its own.
        return self.__dict__.setdefault(f"_rlock_here_{os.getpid()}", threading.Lock())

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
        while True:
            try:
                item = self._ring.get()
            except RingClosed:
                self._raise_closed()
            if type(item) is not _Frame:
                if self._polled:
                    self._after_get()
                return item
            item = self._unframe(item)
            if item is not _NOTHING:
                self._after_get()
                return item

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


