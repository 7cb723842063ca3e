"""asyncio for shmipc: await gets and puts on queues, pipes and rings without
blocking the event loop and without a thread per waiter.

The names are the blocking method's with ``_async``, so an asyncio user
finds them where the blocking one is:

* ``Queue`` / ``JoinableQueue`` / ``SimpleQueue``: ``await q.get_async(timeout=None)``,
  ``await q.put_async(obj, timeout=None)`` (``queue.Empty`` / ``queue.Full``
  when a timeout passes, as ``get``/``put``).
* ``Connection`` (a ``Pipe`` end): ``await conn.recv_async()``,
  ``await conn.recv_bytes_async(maxlength=None)``, ``await conn.send_async(obj)``,
  ``await conn.send_bytes_async(buf, offset=0, size=None)`` (``EOFError`` /
  ``BrokenPipeError`` when the other end is gone, as ``recv``/``send``).
* a bare ``Ring``: ``await shmipc.aio.ring_get(ring, timeout=None)``,
  ``await shmipc.aio.ring_put(ring, obj, timeout=None)``.

How they wait:

* Gets on queues and connections wait on the object's readiness descriptor
  (``fileno()``) with ``loop.add_reader``: no polling, no thread. Many
  awaits on one object share one reader callback.
* Puts on a full queue or pipe, and gets and puts on a bare ring (which has
  no descriptor), retry a non-blocking call on asyncio timers, 50 us growing
  to 5 ms while nothing changes (so at most ~200 wake-ups a second per idle
  waiter). A writability descriptor would cost every get a system call;
  full rings are the rare case.

Cancellation: a cancelled await loses no message. A get takes a message
only after the wait, synchronously, and returns it in the same step; a put
puts all of a message or nothing (a message larger than the ring, cut into
chunks, is aborted if cancelled midway, and the reader drops the part).

Large messages (over half the ring) are read in a thread as they stream in
(a writer stopped half way stalls that read, not the loop); the read
belongs to the queue or connection, so a cancelled await leaves it to the
next receive. Queues write theirs from a feeder thread, as ``put``.
"""
from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
import weakref
from typing import Any

from shmipc._waiting import ASYNC_POLL_MAX_S, ASYNC_POLL_S

__all__ = ["ring_get", "ring_put"]


# loop -> {fd: [futures waiting for fd to be readable]}: one add_reader per
# (loop, fd), however many awaits wait on it (add_reader replaces a callback)
_waiting: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, list]]" = \
    weakref.WeakKeyDictionary()


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    from shmipc.queues import _timeout

    return time.monotonic() + _timeout(timeout)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


async def readable(fd: int, timeout: float | None = None) -> bool:
    """Wait until `fd` is readable (True) or `timeout` seconds passed
    (False), with the running loop's add_reader."""
    loop = asyncio.get_running_loop()
    table = _waiting.setdefault(loop, {})
    futs = table.get(fd)
    if futs is None:
        futs = table[fd] = []

        def ready() -> None:
            waiters = table.pop(fd, [])
            loop.remove_reader(fd)
            for f in waiters:
                if not f.done():
                    f.set_result(True)

        loop.add_reader(fd, ready)
    fut = loop.create_future()
    futs.append(fut)
    timer = None
    if timeout is not None:
        timer = loop.call_later(timeout, lambda: fut.done() or fut.set_result(False))
    try:
        return await fut
    finally:
        if timer is not None:
            timer.cancel()
        waiters = table.get(fd)
        if waiters is not None and fut in waiters:
            waiters.remove(fut)
            if not waiters:
                del table[fd]
                loop.remove_reader(fd)


def _forget(fd: int) -> bool:
    """`fd` is about to be closed (its queue or connection is being closed):
    wake every await waiting on it, in every loop, so they find it closed
    and raise instead of waiting on a descriptor that no longer exists.
    Safe from any thread.

    Returns True when the caller must not close `fd` itself: a loop running
    in another thread still watches it, and closes it once that loop has
    removed its reader. Closed first, the descriptor could not be removed
    from epoll any more (a forked peer still holds the socket or pipe, so
    the registration stays), it stayed readable, and that loop spun at 100%
    CPU for ever; and that thread may be the one waiting for this close, so
    it cannot be waited for here."""
    foreign = []
    for loop, table in list(_waiting.items()):
        if fd in table and not loop.is_closed():
            if _running_loop() is loop or not loop.is_running():
                _wake(loop, table, fd)      # (a loop not running selects nothing meanwhile)
            else:
                foreign.append((loop, table))
    if not foreign:
        return False
    left = [len(foreign)]
    lock = threading.Lock()

    def one_done() -> None:             # the last loop to drop its reader closes fd
        with lock:
            left[0] -= 1
            last = left[0] == 0
        if last:
            os.close(fd)

    def wake_then_close(loop: asyncio.AbstractEventLoop, table: dict) -> None:
        try:
            _wake(loop, table, fd)
        finally:
            one_done()

    for loop, table in foreign:
        try:
            loop.call_soon_threadsafe(wake_then_close, loop, table)
        except RuntimeError:                # the loop closed meanwhile: nothing to remove
            one_done()
    return True


def _wake(loop: asyncio.AbstractEventLoop, table: dict, fd: int) -> None:
    """Remove `loop`'s reader of `fd` and wake the awaits waiting on it."""
    waiters = table.pop(fd, None)
    if waiters is not None:
        loop.remove_reader(fd)
        for f in waiters:
            if not f.done():
                f.set_result(True)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class _Backoff:
    """Asyncio-timer back-off, ASYNC_POLL_S doubling to ASYNC_POLL_MAX_S
    (shmipc._waiting: 50 us to 5 ms); the event loop's, so not
    _waiting.Backoff's time.sleep."""

    __slots__ = ("pause",)

    def __init__(self) -> None:
        self.pause = ASYNC_POLL_S

    async def sleep(self, deadline: float | None) -> None:
        pause = self.pause
        if deadline is not None:
            pause = min(pause, max(deadline - time.monotonic(), 0.0))
        await asyncio.sleep(pause)
        self.pause = min(self.pause * 2, ASYNC_POLL_MAX_S)


# ---------------------------------------------------------------- queues
async def get_when_ready(q: Any, timeout: float | None) -> Any:
    """Queue.get_async: see there."""
    from shmipc.queues import _NOTHING

    deadline = _deadline(timeout)
    fd = q.fileno()                 # this process now keeps readiness exact
    backoff = _Backoff()
    woke = False
    while True:
        if q._big_read is not None:
            # a large message read in a thread (Queue._start_big_read): a
            # stalled writer stalls it, not the loop
            if not await _await_read(q._big_read, deadline):
                raise queue.Empty
            item = q._take_big_read(0.0)
            if item is not _NOTHING:
                return item
            continue
        item = q._get_ready()
        if item is not _NOTHING:
            return item
        q._rearm()
        if q._has_message():
            continue
        if woke:
            # readable with nothing to get: another consumer was first, or
            # a producer is mid-announcement; do not spin on the descriptor
            await backoff.sleep(deadline)
        left = _left(deadline)
        if left is not None and left <= 0:
            raise queue.Empty
        woke = await readable(fd, left)


async def put_when_room(q: Any, obj: Any, timeout: float | None) -> None:
    """Queue.put_async: see there."""
    deadline = _deadline(timeout)
    backoff = _Backoff()
    while not q._try_put(obj):
        if deadline is not None and time.monotonic() >= deadline:
            raise queue.Full
        await backoff.sleep(deadline)


# ---------------------------------------------------------------- connections
async def recv_when_ready(conn: Any, as_bytes: bool, maxlength: int | None) -> Any:
    """Connection.recv_async / recv_bytes_async: see there."""
    from shmipc._framing import Frame

    conn._check_readable()
    fd = conn.fileno()              # this process now keeps readiness exact
    backoff = _Backoff()
    woke = False
    while True:
        if conn._frame_read is not None:
            return await _finish_frame_read(conn, as_bytes, maxlength)
        if conn.poll(0):            # a message (taken ahead, kept by conn), or EOF
            pending = conn._pending
            if type(pending) is Frame and pending.sizes:
                # chunks that stream in, perhaps from a writer in this very
                # loop: read them in a thread, kept on the connection so a
                # cancelled await leaves it to the next receive
                conn._pending = conn._nothing
                conn._start_frame_read(pending)
                continue
            return conn.recv_bytes(maxlength) if as_bytes else conn.recv()
        conn._rearm()
        if woke:
            await backoff.sleep(None)
        woke = await readable(fd, None)


async def _finish_frame_read(conn: Any, as_bytes: bool, maxlength: int | None) -> Any:
    """The chunked message conn's frame read gives (see
    Connection._start_frame_read), awaited without blocking the loop. A
    cancelled await leaves the read, and its message, to the next receive."""
    await _await_read(conn._frame_read)
    return conn._frame_result(as_bytes, maxlength)


async def _await_read(future: Any, deadline: float | None = None) -> bool:
    """Await a large message's read (_framing.read_in_thread) without
    blocking the loop: True once it is over (its owner collects its result
    or raises its error), False if `deadline` passed first. A cancelled or
    timed-out await leaves the read running, for the next receive: only
    this loop's wrapper of the future goes."""
    waited = asyncio.wrap_future(future)
    try:
        await asyncio.wait_for(asyncio.shield(waited), _left(deadline))
    except asyncio.CancelledError:
        waited.cancel()
        raise
    except BaseException:
        if not waited.done():       # (timed out; else the read's own error)
            waited.cancel()
            return False
    return True


async def after_waiting_sends(conn: Any) -> None:
    """Return once no send of `conn` in this loop waits for room (see
    send_when_room), so that a send trying the ring at once does not put
    its record inside another coroutine's chunked message."""
    lock = conn._async_send_lock
    while lock is not None and lock.locked():
        async with lock:
            pass        # (released without a yield: nothing is under way now)


async def send_when_room(conn: Any, records: list) -> None:
    """Put `records` (one message: one record, or a frame's) on `conn`'s
    ring, awaiting room; on any failure after the first record is in, put
    ABORT so the reader drops the partial message.

    The records of one message stay together: a message of several records
    holds the ring's producers (other processes and threads wait, see
    Ring._hold_producers), and every send of this connection that has to
    wait goes through its asyncio lock, so no other coroutine's record
    lands inside a chunked message either (a coroutine that calls the
    blocking send meanwhile gets RuntimeError, see Ring._put_held)."""
    lock = conn._async_send_lock
    if lock is None:
        lock = conn._async_send_lock = asyncio.Lock()
    async with lock:
        if len(records) == 1:
            await _put_records(conn, records)
            return
        ring = conn._sending_ring()
        try:
            await _hold_producers(conn, ring)
            await _put_records(conn, records)
        finally:
            ring._release_producers()


async def _hold_producers(conn: Any, ring: Any) -> None:
    """Take `ring`'s producers for this thread (Ring._hold_producers),
    awaiting another holder on asyncio timers while the reader lives."""
    await _while_reader_lives(conn, lambda: ring._hold_producers(0))


async def _while_reader_lives(conn: Any, attempt: Any) -> None:
    """Call attempt() -- one try that does not wait -- until it returns
    True, on asyncio timers (50 us growing to 5 ms), looking between tries
    whether the reader still lives (BrokenPipeError once it is gone). A
    full ring, or a dead last reader process while another holder may
    remain (queue.Full, PeerDied), is a try that did not succeed."""
    from shmipc.errors import PeerDied, RingClosed

    backoff = _Backoff()
    while True:
        try:
            if attempt():
                return
        except (queue.Full, PeerDied):
            pass
        except RingClosed:
            conn._raise_closed()
        if conn._peer_gone():
            raise BrokenPipeError("the other end of the pipe is closed")
        await backoff.sleep(None)


async def _put_records(conn: Any, records: list) -> None:
    from shmipc import _framing

    held = len(records) > 1         # (send_when_room holds the producers)

    def put(rec: Any) -> bool:
        ring = conn._send_ring
        if ring is None:
            conn._check_writable()
        if held:
            ring._put_held(rec, 0)
        else:
            ring.put(rec, False)
        return True

    started = False
    try:
        for rec in records:
            await _while_reader_lives(conn, lambda: put(rec))
            started = True
    except BaseException:
        if started and held:
            try:
                conn._send_ring._put_held(_framing.ABORT, 0.05)
            except BaseException:
                pass        # the reader drops the frame anyway (the next message ends it)
        raise


# ---------------------------------------------------------------- rings
async def ring_get(ring: Any, timeout: float | None = None) -> Any:
    """Await the next message of a shmipc Ring without blocking the event
    loop: a non-blocking get retried on asyncio timers (50 us growing to
    5 ms; a bare ring has no descriptor to wait on -- queues and pipes do).

    Raises:
        queue.Empty: nothing came within `timeout` seconds (None: forever).
        EOFError: the ring was shut down and is empty.
        PeerDied, RingClosed, CorruptArena: as Ring.get.
    """
    deadline = _deadline(timeout)
    backoff = _Backoff()
    while True:
        try:
            return ring.get(False)
        except queue.Empty:
            pass
        if deadline is not None and time.monotonic() >= deadline:
            raise queue.Empty
        if backoff.pause >= ASYNC_POLL_MAX_S and ring.producers == "one":
            _check_producer(ring)   # what Ring.get looks at between its sleep slices
        await backoff.sleep(deadline)


def _check_producer(ring: Any) -> None:
    from shmipc._ring import pid_alive
    from shmipc.errors import PeerDied

    pid = ring.stats(recover=False)["producer_pid"]
    if pid and not pid_alive(pid) and ring.empty():
        raise PeerDied(pid, "producer")


async def ring_put(ring: Any, obj: Any, timeout: float | None = None) -> None:
    """Await room in a shmipc Ring and put `obj`, without blocking the event
    loop (back-off as ring_get).

    Raises:
        queue.Full: no room within `timeout` seconds (None: forever).
        MessageTooLarge, BrokenPipeError, PeerDied: as Ring.put.
    """
    deadline = _deadline(timeout)
    backoff = _Backoff()
    while True:
        try:
            ring.put(obj, False)
            return
        except queue.Full:
            pass
        if deadline is not None and time.monotonic() >= deadline:
            raise queue.Full
        await backoff.sleep(deadline)
