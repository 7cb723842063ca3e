"""``shmipc.ProcessPoolExecutor``: a concurrent.futures executor on shmipc's pool engine.

Calls and results travel through shared-memory rings (see shmipc._engine); the
executor is a :class:`concurrent.futures.ProcessPoolExecutor` (for isinstance
checks: it shares none of its machinery), so ``submit``, ``map`` (with
``chunksize`` and ``timeout``), ``shutdown(wait, cancel_futures)``,
``as_completed`` and ``wait`` behave as with the standard one.
"""
from __future__ import annotations

import collections
import itertools
import threading
import time
from concurrent.futures import Future
from concurrent.futures import ProcessPoolExecutor as _StdProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
from typing import Any, Callable, Iterable, Iterator

from shmipc._engine import RUN, _Engine, _Task
from shmipc._poolworker import K_CALL, K_MAP, K_STARMAP
from shmipc.errors import ShmipcError, WorkerLost, _instance_with_original

__all__ = ["ProcessPoolExecutor", "WorkerLostError", "UndecodableCallError"]


class WorkerLostError(WorkerLost, BrokenProcessPool):
    """The worker running this call died: a :class:`shmipc.WorkerLost` that is
    also the standard executor's :class:`BrokenProcessPool`, so ``except``
    clauses written for concurrent.futures still catch it (only this call
    failed, though: the executor goes on)."""


class UndecodableCallError(ShmipcError, BrokenProcessPool):
    """A call's arguments failed to unpickle in the worker, or its result or
    exception failed to unpickle in the parent (what unpickling raised is
    ``__cause__``). The standard executor marks the whole pool broken there
    (BrokenProcessPool); shmipc fails only this call and goes on, but raises
    an error that is a BrokenProcessPool and, where it can be, also an
    instance of the unpickling error's type (``pickle.UnpicklingError``,
    ``AttributeError``, ...), so ``except`` clauses written for either catch it.
    """


def _undecodable_call_error(error: BaseException, message: str) -> BaseException:
    # a subclass of UndecodableCallError and type(error), made once per type;
    # a plain UndecodableCallError where none can exist (SystemExit & co.:
    # raising one of those from Future.result() would end the caller)
    return _instance_with_original(UndecodableCallError, error, message)


class _FutureJob:
    """Connects one task of the engine to a Future. A chunk (map) too large
    for one message is cut by the engine into parts; their results are joined
    back here, in order, before the future is set."""

    __slots__ = ("future", "_job", "_parts", "_left")
    _ids = itertools.count()

    def __init__(self, future: Future) -> None:
        self.future = future
        self._job = next(self._ids)
        self._parts: list | None = None     # (start, ok, value) of a split chunk's parts
        self._left = 1                      # parts not settled

    def _start_task(self, task: _Task) -> bool:
        # False when the future was cancelled before a worker got it
        return self.future.set_running_or_notify_cancel()

    def _split(self, task: _Task, parts: list) -> None:
        if self._parts is None:
            self._parts = []
        self._left += len(parts) - 1

    def _deliver(self, task: _Task, ok: bool, value: Any) -> list:
        if self._parts is not None:
            self._parts.append((task.start, ok, value))
            self._left -= 1
            if self._left:
                return []
            parts, self._parts = sorted(self._parts, key=lambda p: p[0]), None
            failed = [v for _, part_ok, v in parts if not part_ok]
            ok = not failed
            value = failed[0] if failed else [x for _, _, v in parts for x in v]
            del parts, failed
        future = self.future

        def settle() -> None:
            if future.done():
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)
        return [settle]

    def fail(self, exc: BaseException) -> list:       # pragma: no cover (not a lazy source)
        return []


def _process_chunk(fn: Callable, chunk: list) -> list:
    return [fn(*args) for args in chunk]


class _MapIterator(itertools.chain):
    """What ProcessPoolExecutor.map returns: its items, one chunk after the
    other, handed out in C (``from_iterable`` of the per-chunk iterators of
    :meth:`ProcessPoolExecutor._results`), with a generator's ``close()``:
    closing it (or dropping it) cancels the calls not started. A timeout or
    a call's exception ends it, as it ends the standard executor's."""

    _chunks: Any = None
    _current: list

    @classmethod
    def start(cls, chunks: Any, current: list) -> "_MapIterator":
        """Hand out the items of the iterators `chunks` yields; `current[0]`
        is the list of call arguments driving the current one."""
        self = cls.from_iterable(chunks)
        self._chunks, self._current = chunks, current
        return self

    def close(self) -> None:
        """Stop: nothing more is handed out, and the calls not started are
        cancelled (as a generator's close())."""
        chunks = self._chunks
        if chunks is not None:
            self._chunks = None
            for args in self._current:
                args.clear()            # the current chunk's iterator ends at its next step
            chunks.close()


class ProcessPoolExecutor(_StdProcessPoolExecutor):
    """A concurrent.futures.ProcessPoolExecutor whose calls and results go
    through shared memory.

    Args:
        max_workers: number of worker processes (default os.cpu_count(), at most 251).
        mp_context: start method: None (multiprocessing's default), a name,
            or a multiprocessing/shmipc context.
        initializer, initargs: ``initializer(*initargs)`` runs first in each worker.
        max_tasks_per_child: a worker exits after this many calls and a fresh
            one replaces it (allowed with every start method, fork included).

    Raises:
        ValueError: max_workers <= 0 (or above 251), or max_tasks_per_child <= 0.
        TypeError: an initializer that is not callable.

    As with the standard executor, calls submitted and not finished when the
    interpreter exits are completed first.

    Where this deliberately differs from the standard library: a worker that
    dies while running a call (SIGKILL, OOM killer, os._exit, a segfault)
    fails only that call's future with :class:`shmipc.WorkerLost`, and a
    replacement worker starts; the standard executor marks the whole pool
    broken (BrokenProcessPool) and fails every pending future. Likewise a
    call whose arguments or result fail to unpickle fails alone, with
    :class:`UndecodableCallError` (a BrokenProcessPool that is also the
    unpickling error's type).
    """

    # (a subclass of the standard executor for isinstance() checks only: it
    # shares none of its machinery, so __init__ does not call the base's)
    def __init__(self, max_workers: int | None = None, mp_context: Any = None,  # noqa: PLW0231
                 initializer: Callable | None = None, initargs: tuple = (), *,
                 max_tasks_per_child: int | None = None) -> None:
        self._engine: _Engine | None = None
        self._shutdown_lock = threading.Lock()
        self._shutdown = False
        if max_workers is not None:
            if not isinstance(max_workers, int) or isinstance(max_workers, bool):
                raise TypeError(f"max_workers must be an int or None, not {type(max_workers).__name__}")
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int) or isinstance(max_tasks_per_child, bool):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        # as concurrent.futures: SystemExit & co. delivered as the call's
        # exception; BrokenProcessPool when no worker can start any more (a
        # failing initializer), and for a call whose worker died (a subclass
        # of it and of WorkerLost); the original error for a value that does
        # not pickle; _RemoteTraceback as an exception's __cause__; an
        # UndecodableCallError (a BrokenProcessPool) for a call whose arguments
        # or result do not unpickle, where the standard executor breaks
        self._engine = _Engine(max_workers, initializer, initargs, max_tasks_per_child, mp_context,
                               0, name="ShmipcExecutorWorker", catch_base=True,
                               broken_error=BrokenProcessPool, lost_error=WorkerLostError,
                               remote_traceback=_RemoteTraceback, wrap_encoding_errors=False,
                               undecodable_error=_undecodable_call_error, finish_at_exit=True)
        self._max_workers = self._engine.processes

    def submit(self, fn: Callable, /, *args: Any, **kwargs: Any) -> Future:
        """Schedule fn(*args, **kwargs); returns a Future.

        Raises:
            RuntimeError: after shutdown() (or the interpreter is exiting).
        """
        with self._shutdown_lock:
            self._check_open()
            assert self._engine is not None
            future: Future = Future()
            self._engine.submit_tasks(_Task(_FutureJob(future), 0, 0, K_CALL, fn, (args, kwargs), 0))
            return future

    def map(self, fn: Callable, *iterables: Iterable, timeout: float | None = None,
            chunksize: int = 1, buffersize: int | None = None) -> Iterator:
        """Like map(fn, *iterables), results in order; `chunksize` calls travel
        per task.

        Args:
            timeout: seconds, from this call, until each result must be ready.
            chunksize: calls per task (a range input travels as range slices).
            buffersize: (as Python 3.14) at most this many chunks submitted
                and not yet yielded; the iterables are then read lazily.
                None: read them all now (as the standard executor).

        Raises:
            ValueError: chunksize < 1 or buffersize < 1.
            RuntimeError: after shutdown().
            TimeoutError: (on iteration) a result is not ready `timeout`
                seconds after the map() call.
        """
        if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        if buffersize is not None and (not isinstance(buffersize, int) or isinstance(buffersize, bool)
                                       or buffersize < 1):
            raise ValueError(f"buffersize must be None or an int >= 1, got {buffersize!r}")
        end_time = None if timeout is None else timeout + time.monotonic()
        # one iterable: chunks of its items (a range: range slices, a few bytes
        # each); several: chunks of argument tuples, as the standard executor
        if len(iterables) == 1:
            kind = K_MAP
            source = iterables[0]
            if isinstance(source, range) or (type(source) is list and buffersize is None):
                # slices (read now, as the items would be): a range's travel in
                # a few bytes, a list's are copied in C, not item by item
                chunks: Iterator = (source[i: i + chunksize] for i in range(0, len(source), chunksize))
            else:
                it = iter(source)
                chunks = iter(lambda: list(itertools.islice(it, chunksize)), [])
        else:
            kind = K_STARMAP
            zipped = zip(*iterables)
            chunks = iter(lambda: list(itertools.islice(zipped, chunksize)), [])
        futures: collections.deque = collections.deque()
        with self._shutdown_lock:
            self._check_open()
            tasks = []
            for chunk in (chunks if buffersize is None else itertools.islice(chunks, buffersize)):
                future: Future = Future()
                futures.append(future)
                tasks.append(_Task(_FutureJob(future), 0, 0, kind, fn, chunk, 0))
            assert self._engine is not None
            self._engine.submit_tasks(iter(tasks))
        more = None if buffersize is None else (kind, fn, chunks)
        current: list = []
        return _MapIterator.start(self._results(futures, end_time, more, current), current)

    def _check_open(self) -> None:
        if self._engine is not None and self._engine.broken:
            raise BrokenProcessPool(self._engine.broken)
        if self._shutdown or self._engine is None or self._engine.state != RUN:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def _results(self, futures: "collections.deque[Future]", end_time: float | None,
                 more: tuple | None, current: list) -> Iterator[Iterator]:
        """An iterator over each chunk's results, in order (a generator, so
        that closing it early cancels what has not started). `current` holds
        the arguments list driving the chunk being handed out (emptied, it
        ends that chunk: see _MapIterator.close)."""
        try:
            while futures:
                future = futures.popleft()
                if more is not None:            # buffersize: one chunk in for each one out
                    kind, fn, chunks = more
                    chunk = next(chunks, None)
                    if chunk is not None:
                        nxt: Future = Future()
                        with self._shutdown_lock:
                            self._check_open()
                            assert self._engine is not None
                            self._engine.submit_tasks(_Task(_FutureJob(nxt), 0, 0, kind, fn, chunk, 0))
                        futures.append(nxt)
                if end_time is None:
                    result = future.result()
                else:
                    result = future.result(end_time - time.monotonic())
                del future
                # hand the items over one by one, keeping none: the caller's
                # last item is not kept alive by this iterator. (In C, item by
                # item: a generator's own loop costs ~50 ns an item, which
                # the parent, one GIL for all its threads, pays for every item)
                result.reverse()
                current[:] = [[()] * len(result)]
                yield itertools.starmap(result.pop, current[0])
                del result
        finally:
            for future in futures:
                future.cancel()

    def terminate_workers(self) -> None:
        """(As Python 3.14) stop every worker now (SIGTERM, then SIGKILL);
        calls not finished fail. The executor is shut down."""
        with self._shutdown_lock:
            self._shutdown = True
        if self._engine is not None:
            self._engine.terminate()

    def kill_workers(self) -> None:
        """(As Python 3.14) SIGKILL every worker now; calls not finished fail.
        The executor is shut down."""
        with self._shutdown_lock:
            self._shutdown = True
        engine = self._engine
        if engine is not None:
            engine.kill_workers()
            engine.terminate()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new calls; cancel the pending ones if `cancel_futures`; with
        `wait`, return once everything running finished and the workers exited."""
        with self._shutdown_lock:
            self._shutdown = True
            engine = self._engine
            if engine is None:
                return
            if cancel_futures:
                # False (kept) for a future that already started once; the
                # dispatcher drops the cancelled ones
                engine.for_each_queued(lambda task: task.job.future.cancel())  # type: ignore[attr-defined]
            engine.close()
        if wait:
            engine.join()

    def __del__(self) -> None:
        # as the standard executor: once collected, finish what was submitted and stop
        engine = self._engine
        if engine is not None and engine.state == RUN:
            try:
                engine.close()
            except Exception:
                pass

    # what code and tests written for the standard executor look at
    # (read-only views where the base class has plain attributes: hence the type: ignore)
    @property
    def _processes(self) -> dict[int, Any]:  # type: ignore[override]
        """{pid: worker} of the live workers (as the standard executor's)."""
        from shmipc.pool import _WorkerHandle

        engine = self._engine
        return {} if engine is None else {pid: _WorkerHandle(pid) for pid in engine.worker_pids().values()}

    @property
    def _broken(self) -> str | bool:  # type: ignore[override]
        engine = self._engine
        return (engine.broken if engine is not None else "") or False

    @property
    def _mp_context(self) -> Any:  # type: ignore[override]
        import multiprocessing

        engine = self._engine
        return None if engine is None else multiprocessing.get_context(engine.start_method)

    def __repr__(self) -> str:
        state = "running" if self._engine is not None and self._engine.state == RUN else "shut down"
        return f"<shmipc.ProcessPoolExecutor {state} max_workers={getattr(self, '_max_workers', '?')}>"
