"""The worker runtime shared by Pool, ProcessPoolExecutor and Pipeline.

Pool/Executor (:mod:`shmipc._engine`) and Pipeline (:mod:`shmipc.pipeline`)
keep only their own scheduling; what they have in common is answered here:

* **what a worker's death means** (:class:`StartupGuard`,
  :func:`killed_from_outside`): a worker that dies before it is ready, by
  its own hand (an initializer or a stage's setup that raises, exits or
  crashes), is evidence that workers cannot start, and workers that keep
  doing so stop the work; one killed from outside (the OOM killer, an
  operator's SIGKILL) is not, and is simply replaced (with a back-off if
  it keeps happening);
* **how a worker waits for work** (:func:`next_message`): in slices of
  :data:`shmipc._waiting.WORKER_IDLE_S`, looking at its parent (and a stop
  flag) between them, so a worker never outlives the process it serves;
* **how an exception raised in a worker comes back**
  (:func:`with_remote_traceback`): the worker's traceback text as the
  ``__cause__`` of the exception re-raised in the parent;
* the ``retries`` argument (:func:`check_retries`), and what a pipeline
  stage is in its worker (:func:`instantiate`; the Ray workers use both too).

The processes themselves are started and watched by
:class:`shmipc._workers.Supervisor` (parent side) and :mod:`shmipc._zygote`
(what runs inside them). Layers: this module imports only the ones below it.

Where to look (for a newcomer), bottom up:

* a record in shared memory: ``_ring.pyx`` (the only code touching raw
  shared memory; its own invariants at the top), ``arena.py``;
* a waiter sleeps: in the ring, on its semaphores; above it, in slices
  named in ``_waiting.py`` (every poll interval and back-off);
* a message is encoded: ``_wire.py`` (task data for pools and pipelines:
  a value that does not cross fails its own task or item);
* a process starts, is watched, is replaced: ``_workers.py`` (Supervisor),
  ``_zygote.py`` / ``_zygote_link.py`` (the fork helper, both sides of its
  protocol), ``_fork_safety.py`` (forking from a threaded parent);
* a worker died: the rules here (StartupGuard); for Pool/Executor,
  ``_engine_exits.py``; for Pipeline, ``_pipeline_crew.py`` (the facts a
  dead worker left) and ``_pipeline_sched.py`` (what they mean for items);
* scheduling: ``_engine.py`` + ``_engine_dispatch.py`` (Pool/Executor),
  ``pipeline.py`` + ``_pipeline_sched.py`` (Pipeline, pure code);
* the public APIs: ``pool.py`` / ``_pool_api.py`` / ``_pool_results.py``,
  ``futures.py``, ``pipeline.py`` / ``_pipeline_api.py``; the same APIs on
  Ray in ``cluster/`` (sharing ``_pool_api``, ``_pool_results`` and
  ``_pipeline_api``).
"""
from __future__ import annotations

import inspect
import queue
import signal
from typing import Any, Callable

from shmipc._proc import pid_alive
from shmipc._waiting import (SPAWN_RETRY_MAX_S, SPAWN_RETRY_S, STARTUP_RETRY_MAX_S, STARTUP_RETRY_S, WORKER_IDLE_S,
                             doubled)
from shmipc.errors import WorkerLost

try:        # the standard library's class, so `except`/isinstance checks written for it keep working
    from multiprocessing.pool import RemoteTraceback
except ImportError:         # pragma: no cover
    class RemoteTraceback(Exception):  # type: ignore[no-redef]
        def __init__(self, tb: str) -> None:
            self.tb = tb

        def __str__(self) -> str:
            return self.tb

__all__ = ["MAX_STARTUP_DEATHS", "MAX_SPAWN_FAILURES", "StartupGuard", "killed_from_outside", "next_message", "GONE",
           "RemoteTraceback", "with_remote_traceback", "check_retries", "instantiate"]

# Workers dying by their own hand before they are ready, in a row, that stop
# the work (a pool fails its pending tasks, a pipeline its run).
MAX_STARTUP_DEATHS = 5
# Replacements that could not be started at all (fork failed, the zygote did
# not answer: each try with a fresh zygote), in a row, with no worker left,
# that stop a pool's work. Higher: under heavy load or helper kills a
# zygote may miss its deadline a few times and then serve again.
MAX_SPAWN_FAILURES = 10

# Signals a process gets from its own doing (a fault, abort()): a worker
# killed by one of these died of its own code. Any other signal was sent.
_OWN_SIGNALS = frozenset(getattr(signal, name) for name in
                         ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGSYS", "SIGTRAP")
                         if hasattr(signal, name))


def killed_from_outside(exitcode: int | None) -> bool:
    """True for a death that says nothing about the worker's own code: a
    signal it did not raise itself (SIGKILL from the OOM killer or an
    operator, SIGTERM, ...), or an unknown exit code (reaped by a helper
    that died). Exit codes follow multiprocessing: negative = signal."""
    return exitcode is None or (exitcode < 0 and -exitcode not in _OWN_SIGNALS)


class StartupGuard:
    """Counts workers that die before they are ready, in a row, and says
    when that means workers cannot start at all.

    Invariants: `deaths` counts only deaths by the workers' own hand
    (exit codes >= 0, a fault signal) since a worker last got ready;
    `killed` the deaths from outside over the same span (they never trip
    the guard, they only slow respawning down: see respawn_delay).
    """

    __slots__ = ("limit", "deaths", "killed", "trips", "last")

    def __init__(self, limit: int = MAX_STARTUP_DEATHS) -> None:
        self.limit = limit
        self.deaths = 0
        self.killed = 0
        self.trips = 0                  # times it tripped without a worker getting ready since
        self.last = ""                  # "pid N, how it ended", for the message

    def died_starting(self, pid: int, exitcode: int | None) -> bool:
        """A worker died before it was ready; True if the guard trips now."""
        self.last = f"pid {pid}, {WorkerLost.describe(exitcode)}"
        if killed_from_outside(exitcode):
            self.killed += 1
            return False
        self.deaths += 1
        return self.deaths >= self.limit

    def ready(self) -> None:
        """A worker got through its start-up: the workers can start."""
        self.deaths = self.killed = self.trips = 0

    def respawn_delay(self) -> float:
        """Seconds to wait before starting a replacement: none, unless
        workers keep being killed while starting (then 50 ms, doubling up to
        1 s), so that a worker that kills itself does not make the parent
        fork as fast as it can."""
        extra = self.killed - self.limit
        return 0.0 if extra < 0 else doubled(SPAWN_RETRY_S, SPAWN_RETRY_MAX_S, extra)

    def trip(self) -> float:
        """The guard tripped (the caller fails its pending work): count
        afresh. Returns the seconds after which starting workers again is
        worth a try (1 s, doubling with each trip up to 30 s)."""
        self.trips += 1
        self.deaths = self.killed = 0
        return doubled(STARTUP_RETRY_S, STARTUP_RETRY_MAX_S, self.trips - 1)


GONE = object()     # next_message(): the worker should exit (its parent died, or stop was set)


def next_message(get: Callable[..., Any], parent_pid: int,
                 stop: Callable[[], bool] | None = None) -> Any:
    """The next message `get(timeout=...)` returns, waiting in slices of
    WORKER_IDLE_S; between slices, GONE if `parent_pid` died or `stop()`
    is true. Other exceptions of `get` propagate."""
    while True:
        try:
            return get(timeout=WORKER_IDLE_S)
        except queue.Empty:
            if (stop is not None and stop()) or not pid_alive(parent_pid):
                return GONE


def with_remote_traceback(exc: BaseException, tb: str | None,
                          cls: type = RemoteTraceback) -> BaseException:
    """`exc` with the worker's traceback text `tb` as its __cause__ (of
    `cls`: the executor uses concurrent.futures' own class). Returns exc."""
    if tb is not None:
        exc.__cause__ = cls(tb)
    return exc


def check_retries(retries: Any) -> int:
    """`retries` if it is an int >= 0.

    Raises:
        ValueError: anything else (named in the message).
    """
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    return retries


def instantiate(fn: Any) -> tuple[Any, Callable[[Any], Any]]:
    """A pipeline stage in its worker: (the object with setup/teardown, or
    None; the per-item callable). A class is instantiated once per worker.

    Raises:
        TypeError: a class without a process(item) method.
    """
    if inspect.isclass(fn):
        obj = fn()
        if not callable(getattr(obj, "process", None)):
            raise TypeError(f"stage class {fn.__name__} has no process(item) method")
        return obj, obj.process
    if callable(getattr(fn, "process", None)):
        return fn, fn.process
    return None, fn
