"""A crash-proof process pool whose tasks and results travel through shared memory.

``shmipc.Pool`` is a drop-in for :class:`multiprocessing.pool.Pool`: the same
methods, ordering, chunking, callbacks and exceptions (re-raised in the parent
with the worker's traceback as their ``__cause__``). The machinery (rings,
workers, the bookkeeping thread, crash handling) is :class:`shmipc._engine._Engine`,
shared with :class:`shmipc.ProcessPoolExecutor`; this module holds the Pool
itself, its result objects and the imap input feeder.
"""
from __future__ import annotations

import inspect
import os
import threading
import time
import warnings
from multiprocessing import TimeoutError  # noqa: F401 (AsyncResult.get raises it, as mp)
from typing import Any, Callable, Iterable

from shmipc._engine import CLOSE, INIT, RUN, TERMINATE, _Engine
from shmipc._pool_api import PoolAPI, feed_imap
from shmipc._pool_results import (ApplyResult, AsyncResult, IMapIterator, IMapUnorderedIterator,  # noqa: F401
                                  MapResult)
from shmipc._waiting import EXIT_POLL_S
from shmipc._tasks import MaybeEncodingError, RemoteTraceback, _Task  # noqa: F401 (re-exported)
from shmipc._proc import pid_alive
from shmipc.errors import WorkerLost

__all__ = ["Pool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator",
           "IMapUnorderedIterator", "RemoteTraceback", "MaybeEncodingError", "WorkerLost"]

class _Feeder(threading.Thread):
    """Reads an imap job's input and queues it as tasks, from its own thread
    (see shmipc._pool_api.feed_imap).

    Runs no user code but the input iterator; never forks (threads are safe here:
    every fork of the pool happens in the zygote)."""

    def __init__(self, engine: "_Engine", job: "IMapIterator", func: Callable, iterable: Iterable,
                 chunksize: int, kind: int, retries: int) -> None:
        super().__init__(name="shmipc-imap-feeder", daemon=True)
        self.engine = engine
        self.job = job
        self.func = func
        self.iterable = iterable
        self.chunksize = chunksize
        self.kind = kind
        self.retries = retries

    def run(self) -> None:
        engine = self.engine
        try:
            feed_imap(self.job, self.func, self.iterable, self.chunksize, self.kind,
                      lambda *a: _Task(*a, self.retries), engine.enqueue,
                      lambda: engine.state == TERMINATE)
        finally:
            engine.feeder_done(self)


# ---------------------------------------------------------------------- the Pool
class Pool(PoolAPI):
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
        be started (they keep exiting or raising before they are ready: a
        failing initializer) fails its pending work with RuntimeError
        instead of hanging (multiprocessing respawns forever), and tries
        again at a submit after a back-off (1 s, doubling up to 30 s).
        Workers killed from outside while they start (the OOM killer) are
        simply replaced: they say nothing about the initializer. Nor do
        zygotes (under forkserver, multiprocessing's fork server) killed or
        stopped from outside, while the pool is made either: the constructor
        returns, and the workers are started after a back-off (50 ms,
        doubling up to 1 s) once they can be.
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
        self._processes = self._engine.processes
        self._retries = retries

    @property
    def _state(self) -> str:
        return self._engine.state if self._engine is not None else INIT

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
    def __repr__(self) -> str:
        return f"<{type(self).__module__}.{type(self).__qualname__} state={self._state} pool_size={self._processes}>"

    def statistics(self) -> dict[str, int]:
        """Worker deaths, tasks lost with a worker, tasks retried, in flight, queued."""
        assert self._engine is not None
        return self._engine.statistics()

    # -------------------------------------------------------- what PoolAPI builds on
    @property
    def _owner(self) -> _Engine | None:
        return self._engine

    def _task(self, job: Any, index: int, start: int, kind: int, func: Callable, payload: Any) -> _Task:
        return _Task(job, index, start, kind, func, payload, self._retries)

    def _submit(self, tasks: list) -> None:
        assert self._engine is not None
        self._engine.submit_tasks(tasks[0] if len(tasks) == 1 else iter(tasks))

    def _start_imap(self, job: IMapIterator, func: Callable, iterable: Iterable, chunksize: int,
                    kind: int) -> None:
        assert self._engine is not None
        self._engine.start_feeder(_Feeder(self._engine, job, func, iterable, chunksize, kind, self._retries))

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

    def __del__(self) -> None:
        # as multiprocessing: a pool collected while running warns, and is terminated
        # (results still pending hold a reference to it, so it is not collected early)
        engine = self._engine
        if engine is None or engine.state == TERMINATE or os.getpid() != engine.owner_pid:
            return      # a forked child's copy is the parent's pool: neither warn nor stop it
        if engine.state == RUN:
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
            time.sleep(EXIT_POLL_S)

    def __repr__(self) -> str:
        return f"<shmipc pool worker pid={self.pid} {'alive' if self.is_alive() else 'exited'}>"
