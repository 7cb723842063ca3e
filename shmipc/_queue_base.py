"""What shmipc's three queues share (shmipc.queues): the checked
arguments and _Base, the state and methods of one ring in one arena
with its readiness descriptor. The queues themselves are in
shmipc.queues."""
from __future__ import annotations

import os
import sys
import time
import types
from typing import Any, Iterable, Iterator, NoReturn

import queue

from shmipc._framing import Frame as _Frame     # looked up on every get/recv
from shmipc.arena import Arena
from shmipc.errors import HandleClosed, MessageTooLarge, RingClosed
from shmipc._bulk import BLOCK_SIZE as _BULK_BLOCK_SIZE, _LOST_BLOCK, _Bulk, _NoFrame
from shmipc._queue_ready import _NOTHING, _QueueReadiness

#: Default ring bytes per queue: one message may use half (16 MiB). Memory is
#: committed as the ring's pages are first written, so a queue that only ever
#: holds small messages costs little until the ring has cycled once.
DEFAULT_CAPACITY = 32 << 20
# SimpleQueue's _rlock lives in the instance under this name plus the pid
# (one per process); pickling drops them
_RLOCK_HERE = "_rlock_here_"




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

    def _reading_locked_here(self) -> bool:
        """True while a thread of this process holds the queue's ``_rlock``
        (SimpleQueue: see _Reader.recv)."""
        return False

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, capacity: int | None = None) -> None:
        maxsize = _ring_maxsize(maxsize)
        cap = _ring_capacity(capacity)
        self._maxsize = maxsize
        # the arena holds the ring, the bulk ring for messages too large for
        # it (memory is only committed where written) and, for
        # JoinableQueue, a small state block
        self._arena = Arena(Arena.size_for(rings=[cap, cap], blocks=[64, _BULK_BLOCK_SIZE]))
        self._ring = self._arena.ring(cap, maxsize=maxsize)
        self._arena.block(_BULK_BLOCK_SIZE, name=_LOST_BLOCK)
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
        state.pop("_reader_half", None)     # (made again where it is asked for)
        state.pop("_big_read", None)        # (this process's own)
        for name in [k for k in state if k.startswith(_RLOCK_HERE)]:
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
            return self._bulk.read(item)
        except _NoFrame:
            self._dropped()
            return _NOTHING
        except RingClosed:
            self._raise_closed()

    def _get(self, block: bool, timeout: float | None) -> Any:
        """get(), past tokens whose frame was lost."""
        if self._big_read is not None:  # a large message get_async began to read
            item = self._take_big_read(timeout if block else 0.0)
            if item is not _NOTHING:
                return item
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                item = self._ring.get(block, timeout)
            except RingClosed:
                self._raise_closed()
            if type(item) is not _Frame:
                if self._polled:        # (inline: the common get makes no further call)
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
        for i, item in enumerate(items):
            if type(item) is _Frame:
                try:
                    item = self._unframe(item)
                except BaseException:
                    # the batch's later tokens will not be read: give them
                    # up now, or the readers after us wait for them
                    for rest in items[i + 1:]:
                        if type(rest) is _Frame:
                            try:
                                self._bulk.give_up(rest)
                            except (OSError, ValueError):
                                break       # the queue was closed under us: nobody reads on
                    raise
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
            return self._ring.empty() and self._big_read is None   # (a large message being read here)
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
        if aio is not None and self._ready_r >= 0 and aio._forget(self._ready_r):
            self._ready_r = -1              # wakes get_async awaits; closed by their loop
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
        # large messages lost by their readers (and by a getter killed as it
        # took its token: counted once the ring is seen empty BULK_HOLDER_QUIET_S apart)
        stats["lost"] += self._bulk.lost(all_taken=stats["qsize"] == 0)
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
