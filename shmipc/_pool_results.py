"""The result objects of a process pool, as multiprocessing's (AsyncResult,
the map result, the imap iterators): shared by :class:`shmipc.Pool` (whose
engine delivers into them) and the Ray pool (:mod:`shmipc.cluster.ray_pool`).

Their *owner* is what delivers results: it has ``_thread`` (the thread that
delivers, where waiting for a result would deadlock) and ``terminate()``
(Ctrl-C while waiting stops the workers). The owner calls ``_start_task``,
``_split``, ``_deliver`` (which returns the callbacks to run once its own
lock is released) and ``fail``, always with its lock held.
"""
from __future__ import annotations

import collections
import threading
import time
from multiprocessing import TimeoutError  # get() raises multiprocessing.TimeoutError, as mp
from typing import TYPE_CHECKING, Any, Callable, Deque

from shmipc._poolworker import K_CALL
from shmipc._tasks import _job_counter, _run_callback

if TYPE_CHECKING:
    from shmipc._tasks import _Task

__all__ = ["ApplyResult", "AsyncResult", "MapResult", "IMapIterator", "IMapUnorderedIterator"]


class ApplyResult:
    """The result of apply_async (and the base of map results), as in multiprocessing.

    ``get(timeout)`` returns the value or raises the worker's exception (its
    traceback attached as ``__cause__``), a WorkerLost if the worker died, or
    multiprocessing.TimeoutError.
    """

    def __init__(self, owner: Any, callback: Callable | None, error_callback: Callable | None) -> None:
        self._owner = owner         # has _thread (the one delivering results) and terminate()
        self._job = next(_job_counter)
        self._event = threading.Event()
        self._callback = callback
        self._error_callback = error_callback
        self._success = True
        self._value: Any = None
        self._pool: Any = None      # keeps the Pool alive (not collected, so not terminated) until done

    def ready(self) -> bool:
        return self._event.is_set()

    def successful(self) -> bool:
        if not self.ready():
            raise ValueError(f"{self!r} not ready")
        return self._success

    def wait(self, timeout: float | None = None) -> None:
        self._event.wait(timeout)

    def get(self, timeout: float | None = None) -> Any:
        owner = self._owner
        if owner is not None and owner._thread is threading.current_thread() and not self.ready():
            # a callback waiting for a result would stop the thread that delivers it
            raise RuntimeError("cannot wait for a pool result inside a pool callback")
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    # the engine's side (called with the engine lock held)
    def _start_task(self, task: _Task) -> bool:
        return True

    def _split(self, task: _Task, parts: list) -> None:
        pass

    def _deliver(self, task: _Task, ok: bool, value: Any) -> list:
        self._success, self._value = ok, value
        return [self._finish]

    def _finish(self) -> None:
        if self._success and self._callback is not None:
            _run_callback(lambda: self._callback(self._value))
        if not self._success and self._error_callback is not None:
            _run_callback(lambda: self._error_callback(self._value))
        self._event.set()
        self._owner = None
        self._pool = None

    def __class_getitem__(cls, item: Any) -> Any:
        return cls


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of map_async/starmap_async: ready when every chunk is back;
    the first error wins (as multiprocessing)."""

    def __init__(self, owner: Any, length: int, callback: Callable | None,
                 error_callback: Callable | None, chunks: int = 0) -> None:
        super().__init__(owner, callback, error_callback)
        self._value = [None] * length
        self._left = chunks         # chunks not settled (or counted by _add_chunk)
        self._sources_done = False

    def _add_chunk(self) -> None:
        self._left += 1

    def _split(self, task: _Task, parts: list) -> None:
        self._left += len(parts) - 1

    def _deliver(self, task: _Task, ok: bool, value: Any) -> list:
        self._left -= 1
        if ok and self._success:
            self._value[task.start: task.start + len(value)] = value
        elif not ok and self._success:
            self._success, self._value = False, value
        if self._left == 0:
            return [self._finish]
        return []


class IMapIterator:
    """The iterator returned by imap (ordered); ``next(timeout)`` as in multiprocessing."""

    def __init__(self, owner: Any, ordered: bool = True, ahead: int | None = None) -> None:
        self._owner = owner
        self._job = next(_job_counter)
        self._cond = threading.Condition(threading.Lock())
        self._items: dict[int, tuple[bool, Any]] = {}
        self._unordered: Deque[tuple[bool, Any]] = collections.deque()
        self._ordered = ordered
        self._index = 0             # next position to yield
        self._length: int | None = None     # chunks, once the input is exhausted
        self._next_chunk = 0        # chunks cut so far (set by the _ChunkSource)
        self._chunk_len: dict[int, int] = {}    # chunk -> items, for joining split chunks
        self._parts: dict[int, list] = {}
        # the feeder's credit: at most `ahead` chunks queued or running (see _Feeder)
        self._room = None if ahead is None else threading.Semaphore(ahead)
        self._pool: Any = None      # keeps the Pool alive until the iterator is exhausted
        self._raised: BaseException | None = None   # the failure next() raised last

    def __iter__(self) -> "IMapIterator":
        return self

    def next(self, timeout: float | None = None) -> Any:
        try:
            return self._next(timeout)
        except KeyboardInterrupt as exc:
            owner = self._owner
            if owner is not None and exc is not self._raised:
                owner.terminate()       # Ctrl-C stops the workers (see Pool's docstring)
            raise

    def _next(self, timeout: float | None) -> Any:
        owner = self._owner
        if owner is not None and owner._thread is threading.current_thread():
            raise RuntimeError("cannot iterate a pool's imap inside a pool callback")
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                if self._ordered and self._index in self._items:
                    ok, value = self._items.pop(self._index)
                    break
                if not self._ordered and self._unordered:
                    ok, value = self._unordered.popleft()
                    break
                if self._length is not None and self._index >= self._length:
                    self._owner = None
                    self._pool = None
                    raise StopIteration from None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError from None
                self._cond.wait(left)
            self._index += 1
        if ok:
            return value
        self._raised = value        # (a KeyboardInterrupt of the input or a task is no Ctrl-C)
        raise value

    __next__ = next

    # the engine's side (engine lock held)
    def _start_task(self, task: _Task) -> bool:
        return True

    def _split(self, task: _Task, parts: list) -> None:
        pass            # imap pieces are joined back by position below

    def _deliver(self, task: _Task, ok: bool, value: Any) -> list:
        with self._cond:
            pieces = self._pending_pieces(task, ok, value)
            if pieces is None:
                return []
            ok, value = pieces
            if self._room is not None:
                self._room.release()
            if self._ordered:
                self._items[task.index] = (ok, value)
            else:
                self._unordered.append((ok, value))
            self._cond.notify_all()
        return []

    def _pending_pieces(self, task: _Task, ok: bool, value: Any) -> tuple[bool, Any] | None:
        """Chunks split for size come back in pieces: join them per chunk."""
        want = self._chunk_len.get(task.index)
        if want is None or task.kind == K_CALL:
            return ok, value
        if len(task.payload) == want:
            del self._chunk_len[task.index]
            return ok, value
        got = self._parts.setdefault(task.index, [])
        got.append((task.start, ok, value, len(task.payload)))
        if sum(n for *_, n in got) < want:
            return None
        del self._parts[task.index], self._chunk_len[task.index]
        got.sort(key=lambda p: p[0])
        for _, piece_ok, piece, _ in got:
            if not piece_ok:
                return False, piece
        return True, [v for _, _, piece, _ in got for v in piece]

    def _set_length(self, chunks: int) -> None:
        with self._cond:
            self._length = chunks
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> list:
        """The input iterator raised (or the pool ended): report it at the next position."""
        with self._cond:
            n = self._next_chunk
            if self._ordered:
                self._items[n] = (False, exc)
            else:
                self._unordered.append((False, exc))
            self._length = n + 1
            self._cond.notify_all()
        return []


class IMapUnorderedIterator(IMapIterator):
    """The iterator returned by imap_unordered: results in completion order."""

    def __init__(self, owner: Any, ahead: int | None = None) -> None:
        super().__init__(owner, ordered=False, ahead=ahead)
