"""shmipc.Pool's API on a Ray cluster: ``shmipc.Pool(n, cluster="ray")``.

The workers are `n` Ray actors (one CPU each by default), placed by Ray
anywhere on the cluster; tasks and results travel through Ray (its object
store is shared memory on each node, the network between nodes). A
bookkeeping thread sends each worker at most four chunks at a time and
delivers results, as the shared-memory pool's does.
"""
from __future__ import annotations

import collections
import threading
import weakref
from multiprocessing.pool import MaybeEncodingError
from typing import Any, Callable, Iterable

from shmipc._pool_api import PoolAPI, feed_imap
from shmipc._pool_results import ApplyResult, AsyncResult, IMapIterator, MapResult  # noqa: F401
from shmipc._runtime import with_remote_traceback
from shmipc._waiting import RAY_POOL_POLL_S as _POLL_S
from shmipc.cluster import connect
from shmipc.cluster._actors import (E_DONE, E_FATAL, E_LOST, E_REQUEUE, K_CALL, POOL,
                                    ActorGroup, poll)
from shmipc.errors import WorkerLost

__all__ = ["RayPool"]

INIT, RUN, CLOSE, TERMINATE = "INIT", "RUN", "CLOSE", "TERMINATE"


def _rebuild(err: tuple) -> BaseException:
    exc, text, tb = err
    if exc is None:
        exc = MaybeEncodingError(text, "the exception raised in the worker does not pickle")
    return with_remote_traceback(exc, tb)


class _Task:
    __slots__ = ("job", "index", "start", "kind", "func", "payload", "tries", "settled")

    def __init__(self, job: Any, index: int, start: int, kind: int, func: Callable, payload: Any) -> None:
        self.job = job
        self.index = index
        self.start = start
        self.kind = kind
        self.func = func
        self.payload = payload
        self.tries = 0
        self.settled = False        # delivered (set under the pool's lock: exactly once)

    def describe(self) -> str:
        name = getattr(self.func, "__qualname__", None) or repr(self.func)
        return f"{name} (chunk {self.index})" if self.kind != K_CALL else name


# ---------------------------------------------------------------------- the pool
class RayPool(PoolAPI):
    """``shmipc.Pool``'s API with its workers on a Ray cluster. Made by
    ``shmipc.Pool(processes, ..., cluster="ray")`` (see :mod:`shmipc.cluster`
    for the values of `cluster`).

    Args:
        processes: workers (Ray actors); default: the cluster's CPUs.
        initializer, initargs: ``initializer(*initargs)`` runs first in each
            worker (also in a replacement).
        maxtasksperchild: a worker is replaced after this many tasks (chunks).
        context: ignored (Ray starts its own worker processes; functions and
            arguments are pickled with cloudpickle, so lambdas work).
        retries: how many times a task whose worker died while running it is
            run again (on another worker) before it fails with WorkerLost.
        cluster: where to run (see shmipc.cluster).
        ray_options: Ray actor options for each worker, e.g. ``{"num_cpus": 2}``
            or ``{"resources": {...}, "runtime_env": {...}}`` (default one CPU).

    Raises:
        ValueError / TypeError: an invalid argument, named in the message;
            more workers than the cluster has CPUs for.
        ImportError: Ray is not installed.

    What is the same as the shared-memory pool: map/starmap/imap/
    imap_unordered/apply_async and their _async forms, chunking, callbacks
    (in the pool's bookkeeping thread), the first error wins in map, the
    worker's exception re-raised with its traceback as ``__cause__``, a
    worker that dies (SIGKILL, OOM, a node lost) costs only the task it was
    running (WorkerLost, or a re-run with `retries`) and is replaced,
    terminate() fails pending results with ValueError, imap reads its input
    only as workers need it, ``progress=True``, ``statistics()``.

    What differs on Ray:
      * workers are started by Ray, not forked: functions, arguments and
        results are pickled (cloudpickle) and must be importable or
        picklable on every node (install shmipc and your code there, or use
        ``ray_options={"runtime_env": ...}``);
      * a dead worker's exit code is not known: WorkerLost.exitcode is None
        (its pid is known: the worker reports it when it starts);
      * Ray must be running or startable: the first pool of a process may
        start a local Ray instance (seconds), which lives as long as the process;
      * each worker holds one CPU of the cluster for the pool's lifetime;
        asking for more than the cluster has raises ValueError (Ray would
        wait forever for the missing CPUs).
    """

    def __init__(self, processes: int | None = None, initializer: Callable | None = None,
                 initargs: Iterable = (), maxtasksperchild: int | None = None, context: Any = None,
                 retries: int = 0, *, cluster: str = "ray", ray_options: dict | None = None) -> None:
        self._state = INIT
        self._group: ActorGroup | None = None     # set first: terminate()/__del__ read them
        self._thread: threading.Thread | None = None
        if processes is not None and (not isinstance(processes, int) or isinstance(processes, bool)
                                      or processes < 1):
            raise ValueError(f"Number of processes must be at least 1, got {processes!r}")
        if maxtasksperchild is not None and (not isinstance(maxtasksperchild, int)
                                             or isinstance(maxtasksperchild, bool) or maxtasksperchild < 1):
            raise ValueError(f"maxtasksperchild must be a positive int or None, got {maxtasksperchild!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        ray = connect(cluster)
        options = dict(ray_options or {})
        cpus = float(ray.cluster_resources().get("CPU", 0))
        per = float(options.get("num_cpus", 1))
        if processes is None:
            processes = max(int(cpus // per) if per else int(cpus), 1)
        if processes * per > cpus:
            raise ValueError(f"{processes} workers of {per:g} CPU each need {processes * per:g} CPUs; "
                             f"the Ray cluster has {cpus:g} (use fewer processes, or "
                             f"ray_options={{'num_cpus': ...}})")
        self._ray = ray
        self._processes = processes
        self._retries = retries
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._queue: collections.deque[_Task] = collections.deque()
        self._feeders: set[threading.Thread] = set()
        self._stats = {"worker_deaths": 0, "tasks_lost": 0, "tasks_retried": 0}
        self._group = ActorGroup(ray, "pool", processes, POOL, None, initializer, initargs,
                                 max_calls=maxtasksperchild, options=options)
        # the thread holds the pool only weakly: a pool dropped while running
        # is collected, warns and is terminated, as the shared-memory one
        self._thread = threading.Thread(target=_bookkeeping, args=(weakref.ref(self),),
                                        name="shmipc-ray-pool", daemon=True)
        self._state = RUN
        self._thread.start()

    # -------------------------------------------------------- state
    def __repr__(self) -> str:
        return f"<shmipc.cluster.RayPool state={self._state} pool_size={getattr(self, '_processes', 0)}>"

    def statistics(self) -> dict[str, int]:
        """Worker deaths, tasks lost with a worker, tasks retried, in flight, queued."""
        with self._lock:
            g = self._group
            return {**self._stats, "worker_deaths": g.deaths if g else 0,
                    "in_flight": g.busy() if g else 0, "queued": len(self._queue),
                    "processes": getattr(self, "_processes", 0)}

    def worker_pids(self) -> list[int]:
        """The started workers' pids (on their nodes)."""
        with self._lock:
            return self._group.pids() if self._group else []

    # -------------------------------------------------------- the bookkeeping thread
    def _submit(self, tasks: Iterable[_Task]) -> None:
        with self._lock:
            if self._state == TERMINATE:
                raise ValueError("Pool not running")
            self._queue.extend(tasks)
        self._wake.set()

    def _step(self) -> bool:
        """One round of the bookkeeping thread: send queued tasks to workers
        with room, wait (briefly) for results, deliver them. False: stop."""
        group = self._group
        assert group is not None
        with self._lock:
            if self._state == TERMINATE:
                return False
            while self._queue and group.room():
                t = self._queue[0]
                group.submit(t, "task", t.kind, t.func, t.payload)
                self._queue.popleft()
            idle = not self._queue and not group.busy() and not self._feeders
            if self._state == CLOSE and idle:
                group.stop(timeout=1.0)
                return False
        try:
            events = poll(self._ray, [group], _POLL_S)
        except Exception:           # Ray is shutting down under us
            if self._state == TERMINATE:
                return False
            raise
        if not events:
            if not group.busy():
                self._wake.wait(_POLL_S)
                self._wake.clear()
            return True
        for kind, _g, _slot, call, value in events:
            if kind == E_FATAL:
                self._fatal(value)
                return False
            task: _Task = call.job
            if kind == E_DONE:
                if isinstance(value, tuple):
                    ok, v = value
                    self._settle(task, ok, v if ok else _rebuild(v))
                else:                # Ray failed the call itself
                    self._settle(task, False, value)
            elif kind == E_REQUEUE:
                with self._lock:
                    self._queue.appendleft(task)
            elif kind == E_LOST:
                if task.tries < self._retries:
                    task.tries += 1
                    with self._lock:
                        self._stats["tasks_retried"] += 1
                        self._queue.appendleft(task)
                else:
                    with self._lock:
                        self._stats["tasks_lost"] += 1
                    self._settle(task, False, WorkerLost(value, None, task=task.describe()))
        return True

    def _settle(self, task: _Task, ok: bool, value: Any) -> None:
        """Deliver a task's outcome, unless terminate() already failed it."""
        with self._lock:
            if task.settled:
                return
            task.settled = True
        _deliver(task, ok, value)

    def _fatal(self, value: tuple) -> None:
        pid, err = value
        if isinstance(err, tuple):
            exc: BaseException = RuntimeError(f"pool workers cannot start: the initializer raised {err[1]}")
            with_remote_traceback(exc, err[2])
        else:
            exc = RuntimeError(f"pool workers cannot start: {err}")
        self._fail_pending(exc)

    def _fail_pending(self, exc: BaseException) -> None:
        """Terminate: every task not delivered fails with `exc`."""
        with self._lock:
            self._state = TERMINATE
            tasks = list(self._queue)
            self._queue.clear()
            group = self._group
            if group is not None:
                for s in group.slots:
                    tasks += [c.job for c in list(s.calls)]     # list(): one step under the GIL
            tasks = [t for t in tasks if not t.settled]
            for t in tasks:
                t.settled = True
        if group is not None:
            group.stop(0, graceful=False)
        for t in tasks:
            _deliver(t, False, exc)
        self._wake.set()

    # -------------------------------------------------------- what PoolAPI builds on
    @property
    def _owner(self) -> "RayPool":
        return self

    def _task(self, job: Any, index: int, start: int, kind: int, func: Callable, payload: Any) -> _Task:
        return _Task(job, index, start, kind, func, payload)

    def _start_imap(self, job: IMapIterator, func: Callable, iterable: Iterable, chunksize: int,
                    kind: int) -> None:
        feeder = threading.Thread(target=self._feed, args=(job, func, iterable, chunksize, kind),
                                  name="shmipc-ray-imap-feeder", daemon=True)
        with self._lock:
            self._feeders.add(feeder)
        feeder.start()

    def _feed(self, job: IMapIterator, func: Callable, iterable: Iterable, chunksize: int, kind: int) -> None:
        """An imap job's input (see shmipc._pool_api.feed_imap), in its own thread."""
        def queue_task(task: _Task) -> bool:
            try:
                self._submit([task])
            except ValueError as exc:           # terminated meanwhile
                job._next_chunk = task.index
                job.fail(exc)
                return False
            return True

        try:
            feed_imap(job, func, iterable, chunksize, kind, _Task, queue_task,
                      lambda: self._state == TERMINATE)
        finally:
            with self._lock:
                self._feeders.discard(threading.current_thread())
            self._wake.set()

    # -------------------------------------------------------- lifetime
    def close(self) -> None:
        """No more tasks: the workers end once everything queued is done."""
        with self._lock:
            if self._state == RUN:
                self._state = CLOSE
        self._wake.set()

    def terminate(self) -> None:
        """Kill the workers now; results still pending fail with ValueError."""
        if self._state == TERMINATE or self._group is None:
            self._state = TERMINATE
            return
        self._fail_pending(ValueError("Pool was terminated"))
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def join(self) -> None:
        """Wait for the workers to end (after close() or terminate())."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __del__(self) -> None:
        if getattr(self, "_state", INIT) not in (RUN, CLOSE):
            return
        if self._state == RUN:
            import warnings

            warnings.warn(f"unclosed running pool {self!r}", ResourceWarning, source=self)
        try:
            self.terminate()
        except Exception:
            pass


def _bookkeeping(ref: "weakref.ref[RayPool]") -> None:
    """The pool's bookkeeping thread (see RayPool._step)."""
    while True:
        pool = ref()
        if pool is None:
            return
        try:
            if not pool._step():
                return
        except BaseException as exc:
            # nothing may wait forever on a thread that is gone: fail what is pending
            err = RuntimeError(f"the pool's bookkeeping thread failed: {type(exc).__name__}: {exc}")
            err.__cause__ = exc
            pool._fail_pending(err)
            raise
        finally:
            del pool


def _deliver(task: _Task, ok: bool, value: Any) -> None:
    """Hand a task's outcome to its job (outside any lock) and run what it asks."""
    for callback in task.job._deliver(task, ok, value):
        callback()
