"""A queue's readiness descriptor and awaiting methods (a mixin of
shmipc.queues' queues).

Readiness descriptor (``fileno()``, ``_reader.fileno()``):
    Each queue owns a non-blocking OS pipe, both ends held by every
    process holding the queue (inherited through fork, passed as file
    descriptors under spawn and forkserver). Every producer's ring sends
    one byte on the write end after a commit that finds no readiness
    byte out (the ring's ``wait.ready_signalled``, one relaxed load when
    one is out: nothing else on the put path). A consumer takes the byte
    out ("re-arms", ``Ring._ready_rearm``) only when it finds the ring
    empty: in ``fileno()``, in ``poll``, before an async get waits, and
    after each get once ``fileno()`` was called in its process.

    Invariant: while the queue holds a message, the pipe holds a byte (or
    a producer is between its exchange and its write), so the read end
    is readable whenever a get would not wait. The converse is as loose
    as for any descriptor several processes read: another consumer may
    take the message first (multiprocessing's pipes behave so too), and
    a consumer that never re-arms leaves the descriptor readable after
    the queue empties until some polling consumer re-arms.
"""
from __future__ import annotations

import concurrent.futures
import os
import queue
import select
import threading
import time
from typing import Any

from shmipc._framing import Frame as _Frame, read_in_thread
from shmipc.errors import MessageTooLarge, RingClosed
from shmipc._waiting import READY_SPURIOUS_MAX_S, READY_SPURIOUS_S, Backoff

_NOTHING = object()
_BIG_READ_LOCK = threading.Lock()     # one collector of a queue's large-message read

# how long taking out a readiness byte still in flight may wait (its
# producer is between two instructions, or died there)
_DRAIN_WAIT = 1.0


def _drain_pipe(fd: int) -> None:
    """Take one readiness byte out of the readiness pipe `fd` (non-blocking),
    waiting a little for it if its producer is between announcing and
    sending it (see _Base's readiness invariant)."""
    deadline = time.monotonic() + _DRAIN_WAIT
    while True:
        try:
            os.read(fd, 1)
            return
        except BlockingIOError:
            pass
        if time.monotonic() >= deadline:
            return          # its producer died midway: a late byte is one spare wake-up
        select.select([fd], [], [], 0.005)


class _QueueReadiness:
    """fileno(), _reader, get_async and put_async, for the queues. (The
    queue's methods these call -- _check_open, _raise_closed, _unframe --
    are _Base's.)"""

    _ring: Any
    _bulk: Any
    _closed: bool
    _ready_r: int
    _polled: bool

    # ------------------------------------------------------------ readiness
    def fileno(self) -> int:
        """A descriptor readable whenever a get would not wait, for
        ``select``, ``selectors``, ``multiprocessing.connection.wait`` (give
        it the queue itself) and asyncio's ``loop.add_reader`` (or use
        :meth:`get_async`). Never read from it: see the class docstring.

        From the first call on, gets in this process keep its readiness
        exact (a few system calls when they empty the queue); before, they
        cost nothing extra. Several consumers: as with any shared pipe, it
        may be readable for a message another consumer takes first.

        Raises:
            ValueError: the queue was closed in this process.
        """
        self._check_open()
        self._polled = True
        self._rearm()
        return self._ready_r

    def _rearm(self) -> None:
        """Take the readiness byte out if the queue looks empty (see
        Ring._ready_rearm)."""
        try:
            take = self._ring._ready_rearm()
        except RingClosed:
            self._raise_closed()
        if take:
            _drain_pipe(self._ready_r)

    def _readable(self, timeout: float | None) -> bool:
        """True if a get would not wait (approximately, as multiprocessing's
        poll with several consumers), waiting up to `timeout` seconds (None:
        forever) for that, on the readiness descriptor."""
        from shmipc.queues import _timeout

        self._check_open()
        self._polled = True
        deadline = None if timeout is None else time.monotonic() + _timeout(timeout)
        if self._big_read is not None:      # a large message being read: once it is
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            return bool(concurrent.futures.wait([self._big_read], left).done)
        backoff = None
        while True:
            if not self._ring.empty():
                return True
            self._rearm()
            if not self._ring.empty():
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if select.select([self._ready_r], [], [], left)[0] and self._ring.empty():
                # a byte with nothing behind it: a consumer elsewhere took
                # the message, or a producer died mid-announcement; the
                # re-arm above takes it out once its producer is done
                if backoff is None:
                    backoff = Backoff(READY_SPURIOUS_S, READY_SPURIOUS_MAX_S)
                backoff.sleep(deadline)

    @property
    def _reader(self) -> "_Reader":
        """The receiving half as multiprocessing's internals reach for it
        (``q._reader.fileno()``, ``poll``, ``recv``). One object per queue,
        as multiprocessing's: ``wait([q._reader]) == [q._reader]``."""
        reader = self.__dict__.get("_reader_half")
        if reader is None:
            reader = self.__dict__["_reader_half"] = _Reader(self)
        return reader

    def _after_get(self) -> None:
        """After a get in a process that polls: keep the descriptor exact."""
        if self._polled and not self._closed:
            self._rearm()

    async def get_async(self, timeout: float | None = None) -> Any:
        """Await the next message without blocking the event loop (no thread):
        waits on the readiness descriptor with ``loop.add_reader``.

        Cancelling the await loses no message: one is only taken once the
        descriptor said so, synchronously, and returned at once. A message
        larger than half the ring is read in a thread as it streams in; a
        cancelled or timed-out await leaves that read to the next get in
        this process (get_async, get, get_many), which returns it.

        Raises:
            queue.Empty: nothing came within `timeout` seconds (None: wait forever).
            ValueError: the queue was closed in this process.
        """
        from shmipc import aio

        return await aio.get_when_ready(self, timeout)

    async def put_async(self, obj: Any, timeout: float | None = None) -> None:
        """Await room and put `obj` without blocking the event loop: retries
        a non-blocking put with a back-off of asyncio timers (50 us growing to
        5 ms) while the queue is full; a writability descriptor would cost
        every get a system call. A message larger than half the ring is
        written by a feeder thread, as put does.

        Cancelling the await puts nothing (or the whole message, if it was
        already in).

        Raises:
            queue.Full: no room within `timeout` seconds (None: wait forever).
            ValueError: the queue was closed in this process.
            Whatever pickling `obj` raises.
        """
        from shmipc import aio

        await aio.put_when_room(self, obj, timeout)

    def _get_ready(self) -> Any:
        """One non-blocking get for get_async: the next message, or _NOTHING.
        A large message's token starts its read in a thread (_big_read):
        _NOTHING then, and get_async awaits that read."""
        try:
            item = self._ring.get(False)
        except queue.Empty:
            return _NOTHING
        except RingClosed:
            self._raise_closed()
        if type(item) is _Frame:
            if item.kind == "token":
                self._start_big_read(item)
                return _NOTHING
            item = self._unframe(item)
        if item is not _NOTHING:
            self._after_get()
        return item

    # A large message taken by get_async is read in a thread of its own: it
    # streams in as its writer writes it, and a writer stopped half way
    # (SIGSTOP) blocked the event loop until it died, past any timeout. The
    # read belongs to the queue in this process: whichever get comes next
    # (get_async, get, get_many, poll) collects it, and a cancelled or
    # timed-out await leaves it there, so it is never lost nor read twice.
    _big_read: "concurrent.futures.Future | None" = None

    def _start_big_read(self, token: Any) -> None:
        # (its result is _NOTHING if the token's frame was lost)
        self._big_read = read_in_thread(lambda: self._unframe(token), "shmipc-queue-read")

    def _take_big_read(self, timeout: float | None) -> Any:
        """The message of the large-message read under way, waiting up to
        `timeout` seconds (None: until it is read); raises queue.Empty if it
        is not read by then (it stays for the next get). _NOTHING if there
        is none (or another thread took it, or its frame was lost)."""
        future = self._big_read
        if future is None:
            return _NOTHING
        if not concurrent.futures.wait([future], timeout).done:
            raise queue.Empty
        with _BIG_READ_LOCK:
            if self._big_read is not future:
                return _NOTHING                 # another thread collected it
            self._big_read = None
        item = future.result()
        if item is not _NOTHING:
            self._after_get()
        return item

    def _has_message(self) -> bool:
        self._check_open()
        return not self._ring.empty()

    def _try_put(self, obj: Any) -> bool:
        """One non-blocking attempt for put_async: True if `obj` is in (or
        handed to a feeder thread)."""
        try:
            self._ring.put(obj, False)
        except queue.Full:
            return False
        except MessageTooLarge:
            return self._bulk.try_hand_off(self._ring, obj)
        except RingClosed:
            self._raise_closed()
        return True


class _Reader:
    """``q._reader``: the receiving half as multiprocessing's internals use
    it (``recv``, ``poll``, ``fileno`` for ``multiprocessing.connection.wait``,
    ``close``)."""

    def __init__(self, q: Any) -> None:
        self._q = q

    def fileno(self) -> int:
        """The queue's readiness descriptor (see _Base.fileno)."""
        return self._q.fileno()

    @property
    def closed(self) -> bool:
        """True once the queue was closed in this process (as the pipe end of
        multiprocessing's SimpleQueue)."""
        return self._q._closed

    def recv(self) -> Any:
        """The next message, waiting for one; but without waiting while this
        process holds the queue's ``_rlock``. multiprocessing.Pool's
        terminate drains its task queue so (``_rlock`` held, then
        ``while poll(): recv()``), counting on the lock to keep the workers
        from reading meanwhile. shmipc's readers take no such lock: a worker
        may take the message poll() saw, and recv() then returns None
        instead of waiting for ever for another."""
        q = self._q
        if q._reading_locked_here():
            try:
                return q._get(False, None)
            except queue.Empty:
                return None
        return q.get()

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self._q._readable(timeout)

    def close(self) -> None:
        """multiprocessing closes unused pipe ends in children; the shared
        ring has no per-end state, so this is a no-op."""
