"""joblib on shmipc's Pool: ``import shmipc.joblib`` registers the backend
``"shmipc"``::

    import joblib, shmipc.joblib
    with joblib.parallel_config(backend="shmipc", n_jobs=4):
        results = joblib.Parallel()(joblib.delayed(f)(x) for x in data)

Then joblib -- and so scikit-learn's ``n_jobs`` -- runs its batches on a
:class:`shmipc.Pool`: arguments and results travel through shared memory
(large numpy arrays too, with no temporary memory-mapped files), and a
worker that dies (OOM killer, segfault) fails its batch with
:class:`~shmipc.WorkerLost` instead of breaking the pool.

joblib's own behaviour is kept: an exception raised by a task reaches the
caller with its remote traceback, ``Parallel(timeout=...)`` raises
``TimeoutError`` and stops the workers, ``return_as="generator"`` and
``"generator_unordered"`` stream results, and auto-batching sizes the
batches. As with joblib's default backend (loky), the workers outlive one
``Parallel`` call and serve the next with the same ``n_jobs`` and start
method; they are stopped when a call is aborted (error, timeout) and at exit.

Backend arguments (``parallel_config(backend="shmipc", ...)``):
``initializer``, ``initargs``, ``maxtasksperchild`` as for Pool, and joblib's
``context`` (a start method name or a multiprocessing context; default:
multiprocessing's default start method). The memory-mapping arguments
(``max_nbytes``, ``mmap_mode``, ``temp_folder``) are accepted and ignored:
shared memory replaces the temporary files they configure.
"""
from __future__ import annotations

import atexit
import threading
from typing import Any

import joblib
from joblib._parallel_backends import (
    AutoBatchingMixin,
    FallbackToBackend,
    ParallelBackendBase,
    PoolManagerMixin,
    SequentialBackend,
)

__all__ = ["ShmipcBackend", "register"]

# Pools kept between Parallel calls, by (workers, start method, initializer,
# initargs, maxtasksperchild). Invariant: every pool here is running and used
# by at most one Parallel call at a time (a call takes it out while it runs).
_idle_pools: dict[tuple, Any] = {}
_pools_lock = threading.Lock()

# joblib's own arguments that concern its memory-mapping pool only
_IGNORED = {"max_nbytes", "mmap_mode", "temp_folder", "verbose", "prefer", "require"}


def _method_of(context: Any) -> str | None:
    if context is None or isinstance(context, str):
        return context
    get = getattr(context, "get_start_method", None)
    return get() if get is not None else None


class ShmipcBackend(PoolManagerMixin, AutoBatchingMixin, ParallelBackendBase):
    """A joblib backend running batches on a :class:`shmipc.Pool`."""

    supports_retrieve_callback = True     # joblib's timeout, generators, error handling
    supports_return_generator = True
    supports_timeout = True

    _key: tuple | None = None

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """n_jobs as joblib counts it (negative: cpu_count() + 1 + n_jobs);
        1 inside a worker of a process pool, whose children could not be
        reaped (joblib's multiprocessing backend does the same)."""
        import multiprocessing

        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if multiprocessing.current_process().daemon:
            return 1
        if not (self.in_main_thread() or self.nesting_level == 0):
            return 1        # no fork from a non-main thread of a nested call
        return super().effective_n_jobs(n_jobs)

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: Any = None,
                  require: Any = None, **kwargs: Any) -> int:
        """Take (or start) a pool of n_jobs workers for this Parallel call."""
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        options = {**self.backend_kwargs, **kwargs}
        for name in _IGNORED:
            options.pop(name, None)
        method = _method_of(options.pop("context", None))
        initializer = options.pop("initializer", None)
        initargs = tuple(options.pop("initargs", ()))
        maxtasksperchild = options.pop("maxtasksperchild", None)
        if options:
            raise TypeError(f"unexpected arguments for the shmipc joblib backend: {sorted(options)}")
        self._key = (n_jobs, method, initializer, initargs, maxtasksperchild)
        with _pools_lock:
            pool = _idle_pools.pop(self._key, None)
        if pool is None or pool._state != "RUN":
            import shmipc

            pool = shmipc.Pool(n_jobs, initializer, initargs, maxtasksperchild, context=method)
        self._pool = pool
        self.parallel = parallel
        return n_jobs

    def terminate(self) -> None:
        """End of a Parallel call: keep the workers for the next call."""
        pool, self._pool = self._pool, None
        if pool is not None:
            with _pools_lock:
                old = _idle_pools.pop(self._key, None)
                _idle_pools[self._key] = pool
            if old is not None and old is not pool:
                old.terminate()
        self.reset_batch_stats()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """An error or a timeout: stop the workers (running tasks included),
        then start fresh ones if joblib goes on."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()
        self.reset_batch_stats()
        if ensure_ready:
            self.configure(n_jobs=self.parallel.n_jobs, parallel=self.parallel,
                           **self.parallel._backend_kwargs)


def _shutdown() -> None:
    with _pools_lock:
        pools = list(_idle_pools.values())
        _idle_pools.clear()
    for pool in pools:
        try:
            pool.terminate()
        except Exception:       # at exit: one pool's failure must not keep the others running
            pass


def register() -> None:
    """Register the "shmipc" backend with joblib (done on import)."""
    joblib.register_parallel_backend("shmipc", ShmipcBackend)


register()
atexit.register(_shutdown)
