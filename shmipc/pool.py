"""A crash-proof process pool whose tasks and results travel through shared memory.

``shmipc.Pool`` is a drop-in for :class:`multiprocessing.pool.Pool`: the same
methods, ordering, chunking, callbacks and exceptions (re-raised in the parent
with the worker's traceback as their ``__cause__``). The machinery (rings,
workers, the bookkeeping thread, crash handling) is :class:`shmipc._engine._Engine`,
shared with :class:`shmipc.ProcessPoolExecutor`; this module holds the Pool
itself, its result objects and the imap input feeder.
"""
from __future__ import annotations

import collections
import inspect
import itertools
import os
import threading
import time
import warnings
from multiprocessing import TimeoutError  # AsyncResult.get raises multiprocessing.TimeoutError, as mp
from typing import Any, Callable, Deque, Iterable, Iterator

from shmipc._engine import (CLOSE, INIT, RUN, TERMINATE, _IMAP_AHEAD, MaybeEncodingError, RemoteTraceback,
                            _Engine, _job_counter, _run_callback, _Task)
from shmipc._poolworker import K_CALL, K_MAP, K_STARMAP
from shmipc._proc import pid_alive
from shmipc.errors import WorkerLost

__all__ = ["Pool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator",
           "IMapUnorderedIterator", "RemoteTraceback", "MaybeEncodingError", "WorkerLost"]

# ---------------------------------------------------------------------- results
class ApplyResult:
    """The result of apply_async (and the base of map results), as in multiprocessing.

    ``get(timeout)`` returns the value or raises the worker's exception (its
    traceback attached as ``__cause__``), a WorkerLost if the worker died, or
    multiprocessing.TimeoutError.
    """

    def __init__(self, engine: _Engine | None, callback: Callable | None,
                 error_callback: Callable | None) -> None:
        self._engine = engine
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
        engine = self._engine
        if engine is not None and engine._thread is threading.current_thread() and not self.ready():
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
        self._engine = None
        self._pool = None

    def __class_getitem__(cls, item: Any) -> Any:
        return cls


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of map_async/starmap_async: ready when every chunk is back;
    the first error wins (as multiprocessing)."""

    def __init__(self, engine: _Engine, length: int, callback: Callable | None,
                 error_callback: Callable | None) -> None:
        super().__init__(engine, callback, error_callback)
        self._value = [None] * length
        self._left = 0              # chunks not settled
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

    def __init__(self, engine: _Engine, ordered: bool = True) -> None:
        self._engine = engine
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
        self._room: threading.Semaphore | None = None    # the feeder's credit (see _Feeder)
        self._pool: Any = None      # keeps the Pool alive until the iterator is exhausted

    def __iter__(self) -> "IMapIterator":
        return self

    def next(self, timeout: float | None = None) -> Any:
        try:
            return self._next(timeout)
        except KeyboardInterrupt:
            engine = self._engine
            if engine is not None:
                engine.terminate()      # Ctrl-C stops the workers (see Pool's docstring)
            raise

    def _next(self, timeout: float | None) -> Any:
        engine = self._engine
        if engine is not None and engine._thread is threading.current_thread():
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
                    self._engine = None
                    self._pool = None
                    raise StopIteration from None
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError from None
                self._cond.wait(left)
            self._index += 1
        if ok:
            return value
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

    def __init__(self, engine: _Engine) -> None:
        super().__init__(engine, ordered=False)


class _Feeder(threading.Thread):
    """Reads an imap job's input and queues it as tasks, from its own thread
    (as multiprocessing's task handler does, so a slow or blocking input never
    stalls result handling, nor the caller of imap). At most `ahead` chunks of
    the job are queued or running at a time: the input is read as workers
    need it, and an endless input is fine.

    Runs no user code but the input iterator; never forks (threads are safe here:
    every fork of the pool happens in the zygote)."""

    def __init__(self, engine: "_Engine", job: "IMapIterator", func: Callable, iterable: Iterable,
                 chunksize: int, kind: int, retries: int, ahead: int) -> None:
        super().__init__(name="shmipc-imap-feeder", daemon=True)
        self.engine = engine
        self.job = job
        self.func = func
        self.iterable = iterable
        self.chunksize = chunksize
        self.kind = kind
        self.retries = retries
        job._room = threading.Semaphore(ahead)

    def run(self) -> None:
        engine, job = self.engine, self.job
        index = start = 0
        try:
            it = iter(self.iterable)
            while True:
                while not job._room.acquire(timeout=0.1):
                    if engine._state == TERMINATE:
                        return
                if engine._state == TERMINATE:
                    return
                try:
                    items = list(itertools.islice(it, self.chunksize))
                except Exception as exc:        # the input raised: the job reports it in place
                    job.fail(exc)
                    return
                if not items:
                    job._set_length(index)
                    return
                if self.kind == K_CALL:
                    payload: Any = ((items[0],), {})
                else:
                    payload = items
                    job._chunk_len[index] = len(items)
                task = _Task(job, index, start, self.kind, self.func, payload, self.retries)
                index += 1
                start += len(items)
                job._next_chunk = index
                if not engine._enqueue(task):
                    return                      # terminated meanwhile: the job was failed
        except Exception as exc:                # iter() itself failed
            job.fail(exc)
        finally:
            engine._feeder_done(self)


# ---------------------------------------------------------------------- the Pool
class Pool:
    """A process pool with multiprocessing.Pool's API; tasks and results go
    through shared memory, and a dying worker costs only its own task.

    Args:
        processes: number of workers (default: os.cpu_count(), at most 251).
        initializer, initargs: ``initializer(*initargs)`` runs first in each worker.
        maxtasksperchild: a worker exits after this many tasks (chunks) and a
            fresh one replaces it (None: never).
        context: start method: None (multiprocessing's default), "fork",
            "spawn", "forkserver", or a multiprocessing/shmipc context. Under
            spawn and forkserver, functions must be importable (as with
            multiprocessing).
        retries: how many times a task whose worker died while running it
            is run again before it fails with WorkerLost.
        cluster: None (default): this machine, through shared memory. "ray",
            "ray://host:port" or "ray:ADDRESS": the same API on a Ray cluster
            (a :class:`shmipc.cluster.RayPool` is returned; see shmipc.cluster).

    Raises:
        ValueError / TypeError: an invalid argument, named in the message.

    Where this deliberately differs from multiprocessing.Pool:
      * A worker that dies while running a task (SIGKILL, the OOM killer,
        os._exit, a segfault) fails only that task, with
        :class:`shmipc.WorkerLost` naming the exit code or signal (or the task
        is re-run, up to `retries` times); the tasks queued behind it go to
        the other workers, a replacement worker starts, and the pool stays
        usable. multiprocessing.Pool hangs forever instead (CPython gh-66587).
        With map(), the lost chunk makes the whole map raise WorkerLost (the
        first error wins, as for any exception), after the other chunks ran.
      * Ctrl-C in map()/starmap()/apply() (or iterating imap) terminates the
        pool's workers before KeyboardInterrupt propagates; workers ignore
        SIGINT, so no child tracebacks are printed.
      * terminate() fails results still pending with ValueError instead of
        leaving their get() blocked forever.
      * The workers exit within a second when the parent dies.
      * Callbacks run in the pool's bookkeeping thread, as in multiprocessing;
        an exception in a callback is printed and the pool carries on, and
        waiting for a pool result inside a callback raises RuntimeError
        (multiprocessing deadlocks).
      * Under fork, workers (including replacements) are forked from a helper
        process made when the pool is created, never from a process running
        threads: a function defined in ``__main__`` after the pool was made
        is not visible to the workers (as for multiprocessing's own first
        workers).
      * imap/imap_unordered read their input (in a thread, as
        multiprocessing) only as workers need more work: at most 256 chunks
        of a job are queued or running at once.
      * No helper process is a single point of failure: if the zygote is
        killed (or stopped), the workers carry on, and the next replacement
        comes from a new zygote; a pool whose workers really can no longer
        be started fails its pending work with RuntimeError instead of
        hanging (multiprocessing respawns forever).
      * A value that does not cross a process boundary (a result, an
        exception or an argument that fails to pickle or unpickle) fails only
        its own task: MaybeEncodingError for a result or an exception, the
        unpickling error itself for an argument.
      * At most 251 workers per pool (one shared-memory ring each); one
        argument or result may be up to 128 MiB once pickled.
    """

    def __new__(cls, *args: Any, cluster: str | None = None, **kwargs: Any) -> Any:
        if cluster is None:
            return super().__new__(cls)
        from shmipc.cluster.ray_pool import RayPool     # imports Ray only when asked for

        return RayPool(*args, cluster=cluster, **kwargs)

    def __init__(self, processes: int | None = None, initializer: Callable | None = None,
                 initargs: Iterable = (), maxtasksperchild: int | None = None,
                 context: Any = None, retries: int = 0, *, cluster: str | None = None) -> None:
        self._engine: _Engine | None = None
        self._engine = _Engine(processes, initializer, initargs, maxtasksperchild, context,
                               retries, name="ShmipcPoolWorker")
        self._processes = self._engine._processes
        self._retries = retries

    @property
    def _state(self) -> str:
        return self._engine._state if self._engine is not None else INIT

    @_state.setter
    def _state(self, value: str) -> None:
        # (CPython's own tests set it, e.g. to check the ResourceWarning below)
        if self._engine is not None:
            self._engine._state = value

    @property
    def _pool(self) -> list["_WorkerHandle"]:
        """The live workers, as multiprocessing.Pool._pool lists them (objects
        with ``pid``, ``exitcode``, ``is_alive()``, ``join()``), for code and
        tests that look there."""
        if self._engine is None:
            return []
        return [_WorkerHandle(pid) for pid in self._engine.worker_pids().values()]

    # -------------------------------------------------------- state
    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")

    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__qualname__} state={self._state} pool_size={self._processes}>"

    def __reduce__(self) -> Any:
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    def statistics(self) -> dict[str, int]:
        """Worker deaths, tasks lost with a worker, tasks retried, in flight, queued."""
        assert self._engine is not None
        return self._engine.statistics()

    # -------------------------------------------------------- one call
    def apply(self, func: Callable, args: tuple = (), kwds: dict = {}) -> Any:  # noqa: B006 (as mp)
        """Call func(*args, **kwds) in a worker and return its result."""
        self._check_running()
        return self._wait(self.apply_async(func, args, kwds))

    def apply_async(self, func: Callable, args: tuple = (), kwds: dict = {}, callback: Callable | None = None,  # noqa: B006
                    error_callback: Callable | None = None) -> ApplyResult:
        """Call func(*args, **kwds) in a worker; returns an AsyncResult.

        Raises:
            ValueError: the pool is not running.
        """
        self._check_running()
        assert self._engine is not None
        result = ApplyResult(self._engine, callback, error_callback)
        result._pool = self
        self._engine.submit_tasks(_Task(result, 0, 0, K_CALL, func, (tuple(args), dict(kwds)),
                                        self._retries))
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
            return list(self.imap(func, iterable, chunksize or self._default_chunksize(iterable),
                                  progress=True))
        return self._wait(self._map_async(func, iterable, K_MAP, chunksize))

    def starmap(self, func: Callable, iterable: Iterable, chunksize: int | None = None) -> list:
        """[func(*args) for args in iterable], in chunks as map()."""
        self._check_running()
        return self._wait(self._map_async(func, iterable, K_STARMAP, chunksize))

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

    def _default_chunksize(self, iterable: Any) -> int:
        if not hasattr(iterable, "__len__"):
            return 1
        chunksize, extra = divmod(len(iterable), self._processes * 4)
        return max(chunksize + bool(extra), 1)

    def _map_async(self, func: Callable, iterable: Iterable, kind: int, chunksize: int | None,
                   callback: Callable | None = None, error_callback: Callable | None = None) -> MapResult:
        assert self._engine is not None
        # a range stays a range: its slices pickle in a few bytes
        items = iterable if isinstance(iterable, (list, tuple, range)) else list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(items), self._processes * 4)
            if extra:
                chunksize += 1
        _check_chunksize(chunksize, allow_zero=not items)
        result = MapResult(self._engine, len(items), callback, error_callback)
        result._pool = self
        if not items:
            result._finish()
            return result
        tasks = []
        for index, start in enumerate(range(0, len(items), chunksize)):
            tasks.append(_Task(result, index, start, kind, func, items[start: start + chunksize],
                               self._retries))
            result._add_chunk()
        self._engine.submit_tasks(iter(tasks))
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
        assert self._engine is not None
        _check_chunksize(chunksize)
        total = len(iterable) if hasattr(iterable, "__len__") else None
        job = IMapIterator(self._engine, ordered)
        job._pool = self
        kind = K_CALL if chunksize == 1 else K_MAP
        self._engine.start_feeder(_Feeder(self._engine, job, func, iterable, chunksize, kind,
                                          self._retries, ahead=max(_IMAP_AHEAD, 4 * self._processes)))
        out: Iterator = job if chunksize == 1 else (item for chunk in job for item in chunk)
        if progress:
            from shmipc.progress import track

            out = track(out, total=total, desc=desc)
        return out

    def _wait(self, result: ApplyResult) -> Any:
        """get() that stops the workers on Ctrl-C before re-raising it."""
        try:
            return result.get()
        except KeyboardInterrupt:
            self.terminate()
            raise

    # -------------------------------------------------------- lifetime
    def close(self) -> None:
        """No more tasks: the workers exit once everything queued is done."""
        if self._engine is not None:
            self._engine.close()

    def terminate(self) -> None:
        """Stop the workers now (SIGTERM, then SIGKILL); pending results fail."""
        if self._engine is not None:
            self._engine.terminate()

    def join(self) -> None:
        """Wait for the workers to exit (after close() or terminate()).

        Raises:
            ValueError: the pool is still running (call close() first).
        """
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        assert self._engine is not None
        self._engine.join()

    def __enter__(self) -> "Pool":
        self._check_running()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    def __del__(self) -> None:
        # as multiprocessing: a pool collected while running warns, and is terminated
        # (results still pending hold a reference to it, so it is not collected early)
        engine = self._engine
        if engine is None or engine._state == TERMINATE or os.getpid() != engine._owner_pid:
            return      # a forked child's copy is the parent's pool: neither warn nor stop it
        if engine._state == RUN:
            warnings.warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning,
                          source=self)
        try:
            engine.terminate()
        except Exception:
            pass


# __new__ takes (*args, cluster=, **kwargs) to hand a cluster= call to Ray; show
# help() and IDEs the real parameters, which are __init__'s.
Pool.__signature__ = inspect.signature(Pool.__init__).replace(  # type: ignore[attr-defined]
    parameters=list(inspect.signature(Pool.__init__).parameters.values())[1:],
    return_annotation=inspect.Signature.empty)


class _WorkerHandle:
    """A worker process as multiprocessing.Pool._pool shows it (read-only)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def is_alive(self) -> bool:
        return pid_alive(self.pid)

    @property
    def exitcode(self) -> int | None:
        # only the zygote (or multiprocessing) reaps workers and knows the code
        return None if self.is_alive() else 0

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_alive() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.005)

    def __repr__(self) -> str:
        return f"<shmipc pool worker pid={self.pid} {'alive' if self.is_alive() else 'exited'}>"


def _check_chunksize(chunksize: Any, allow_zero: bool = False) -> None:
    if not isinstance(chunksize, int) or isinstance(chunksize, bool):
        raise TypeError(f"chunksize must be an int, not {type(chunksize).__name__}")
    if chunksize < 1 and not (allow_zero and chunksize == 0):
        raise ValueError(f"Chunksize must be 1+, not {chunksize}")
