"""multiprocessing.Pool's methods, written once for :class:`shmipc.Pool` and
the Ray pool (:class:`shmipc.cluster.RayPool`).

A pool class using :class:`PoolAPI` supplies the few primitives that differ:
``_state`` (multiprocessing's "RUN", "CLOSE", ...), ``_processes``, ``terminate()``, ``_owner`` (what
delivers results into the result objects of :mod:`shmipc._pool_results`),
``_task(job, index, start, kind, func, payload)``, ``_submit(tasks)`` (a
list, queued at once) and ``_start_imap(job, func, iterable, chunksize,
kind)`` (starts the job's input feeder). Everything a caller sees (argument
checks, chunking, ordering, Ctrl-C handling, progress bars) is here.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator

from shmipc._pool_results import ApplyResult, IMapIterator, MapResult
from shmipc._poolworker import K_CALL, K_MAP, K_STARMAP
from shmipc._waiting import FEEDER_ROOM_S

__all__ = ["PoolAPI", "check_chunksize", "feed_imap"]

IMAP_AHEAD = 256                     # chunks of one imap job queued or running at once (at least)


class PoolAPI:
    """The public methods of a process pool (see the module docstring)."""

    _processes: int
    _owner: Any
    _state: str

    def _check_running(self) -> None:
        if self._state != "RUN":
            raise ValueError("Pool not running")

    def terminate(self) -> None:
        raise NotImplementedError

    def _task(self, job: Any, index: int, start: int, kind: int, func: Callable, payload: Any) -> Any:
        raise NotImplementedError

    def _submit(self, tasks: list) -> None:
        raise NotImplementedError

    def _start_imap(self, job: IMapIterator, func: Callable, iterable: Iterable, chunksize: int,
                    kind: int) -> None:
        raise NotImplementedError

    # -------------------------------------------------------- one call
    def apply(self, func: Callable, args: tuple = (), kwds: dict = {}) -> Any:  # noqa: B006 (as mp)
        """Call func(*args, **kwds) in a worker and return its result."""
        self._check_running()
        return self._wait(lambda: self.apply_async(func, args, kwds))

    def apply_async(self, func: Callable, args: tuple = (), kwds: dict = {}, callback: Callable | None = None,  # noqa: B006
                    error_callback: Callable | None = None) -> ApplyResult:
        """Call func(*args, **kwds) in a worker; returns an AsyncResult.

        Raises:
            ValueError: the pool is not running.
        """
        self._check_running()
        result = ApplyResult(self._owner, callback, error_callback)
        result._pool = self         # the pool lives (is not collected, so not terminated) until done
        self._submit([self._task(result, 0, 0, K_CALL, func, (tuple(args), dict(kwds)))])
        return result

    # -------------------------------------------------------- map
    def map(self, func: Callable, iterable: Iterable, chunksize: int | None = None, *,
            progress: bool = False) -> list:
        """[func(x) for x in iterable], computed by the workers in chunks.

        Args:
            chunksize: items per task (default as multiprocessing: about four
                chunks per worker).
            progress: draw a progress bar (shmipc.progress.track).
        """
        self._check_running()
        if progress:
            items = iterable if hasattr(iterable, "__len__") else list(iterable)
            return list(self.imap(func, items, chunksize or self._default_chunksize(items), progress=True))
        return self._wait(lambda: self._map_async(func, iterable, K_MAP, chunksize))

    def starmap(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        """[func(*args) for args in iterable], in chunks as map()."""
        self._check_running()
        return self._wait(lambda: self._map_async(func, iterable, K_STARMAP, chunksize))

    def map_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                  callback: Callable | None = None, error_callback: Callable | None = None) -> MapResult:
        """map() without waiting: returns an AsyncResult of the list."""
        self._check_running()
        return self._map_async(func, iterable, K_MAP, chunksize, callback, error_callback)

    def starmap_async(self, func: Callable, iterable: Iterable, chunksize: int | None = None,
                      callback: Callable | None = None, error_callback: Callable | None = None) -> MapResult:
        """starmap() without waiting: returns an AsyncResult of the list."""
        self._check_running()
        return self._map_async(func, iterable, K_STARMAP, chunksize, callback, error_callback)

    def _default_chunksize(self, items: Any) -> int:
        chunksize, extra = divmod(len(items), self._processes * 4)
        return max(chunksize + bool(extra), 1)

    def _map_async(self, func: Callable, iterable: Iterable, kind: int, chunksize: int | None,
                   callback: Callable | None = None, error_callback: Callable | None = None) -> MapResult:
        # a range stays a range: its slices pickle in a few bytes
        items = iterable if isinstance(iterable, (list, tuple, range)) else list(iterable)
        if chunksize is None:
            chunksize = self._default_chunksize(items) if items else 0
        check_chunksize(chunksize, allow_zero=not items)
        starts = range(0, len(items), chunksize) if items else range(0)
        result = MapResult(self._owner, len(items), callback, error_callback, chunks=len(starts))
        result._pool = self
        if not items:
            result._finish()
            return result
        self._submit([self._task(result, index, start, kind, func, items[start: start + chunksize])
                      for index, start in enumerate(starts)])
        return result

    def imap(self, func: Callable, iterable: Iterable, chunksize: int = 1, *,
             progress: bool = False) -> Iterator:
        """Like map() but returns an iterator (in input order); reads the input lazily."""
        return self._imap(func, iterable, chunksize, True, progress, "Pool.imap")

    def imap_unordered(self, func: Callable, iterable: Iterable, chunksize: int = 1, *,
                       progress: bool = False) -> Iterator:
        """Like imap() but yields results as they complete."""
        return self._imap(func, iterable, chunksize, False, progress, "Pool.imap_unordered")

    def _imap(self, func: Callable, iterable: Iterable, chunksize: int, ordered: bool,
              progress: bool, desc: str) -> Iterator:
        self._check_running()
        check_chunksize(chunksize)
        total = len(iterable) if hasattr(iterable, "__len__") else None
        job = IMapIterator(self._owner, ordered, ahead=max(IMAP_AHEAD, 4 * self._processes))
        job._pool = self
        self._start_imap(job, func, iterable, chunksize, K_CALL if chunksize == 1 else K_MAP)
        out: Iterator = job if chunksize == 1 else (item for chunk in job for item in chunk)
        if progress:
            from shmipc.progress import track

            out = track(out, total=total, desc=desc)
        return out

    def _wait(self, start: Callable[[], ApplyResult]) -> Any:
        """start().get(), stopping the workers on Ctrl-C before re-raising it:
        also one that lands while the tasks are being submitted (some may
        already run)."""
        result = None
        try:
            result = start()
            return result.get()
        except KeyboardInterrupt as exc:
            # (unless it is the result: a task or its input raised it)
            if result is None or not result.ready() or result._success or exc is not result._value:
                self.terminate()
            raise

    # -------------------------------------------------------- lifetime
    def __enter__(self) -> Any:
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")


def check_chunksize(chunksize: Any, allow_zero: bool = False) -> None:
    """Raises TypeError / ValueError (as multiprocessing) for a bad chunksize."""
    if not isinstance(chunksize, int) or isinstance(chunksize, bool):
        raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}")
    if chunksize < 1 and not (allow_zero and chunksize == 0):
        raise ValueError(f"Chunksize must be 1+, not {chunksize}")


def feed_imap(job: IMapIterator, func: Callable, iterable: Iterable, chunksize: int, kind: int,
              make_task: Callable[..., Any], queue_task: Callable[[Any], bool],
              terminated: Callable[[], bool]) -> None:
    """An imap job's input, read in the feeder's own thread (as
    multiprocessing's task handler does, so a slow or blocking input never
    stalls result handling, nor the caller of imap) only as the job has room:
    at most its look-ahead of chunks queued or running, so an endless input
    is fine. Each chunk becomes ``make_task(job, index, start, kind, func,
    payload)``, handed to ``queue_task`` (False: the pool was terminated and
    the job failed). The input raising fails the job in its place."""
    index = start = 0
    try:
        it = iter(iterable)
        while True:
            while not job._room.acquire(timeout=FEEDER_ROOM_S):
                if terminated():
                    return
            if terminated():
                return
            try:
                items = list(itertools.islice(it, chunksize))
            except BaseException as exc:    # the input raised: the job reports it in place
                job.fail(exc)               # (SystemExit too: this thread would end, the job never)
                return
            if not items:
                job._set_length(index)
                return
            if kind == K_CALL:
                payload: Any = ((items[0],), {})
            else:
                payload = items
                job._chunk_len[index] = len(items)
            task = make_task(job, index, start, kind, func, payload)
            index += 1
            start += len(items)
            job._next_chunk = index
            if not queue_task(task):
                return
    except BaseException as exc:            # iter() itself failed
        job.fail(exc)
