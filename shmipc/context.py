"""``get_context()``: a multiprocessing context whose queues and pipes are shmipc's.

Anything that accepts a multiprocessing context can take one::

    ctx = shmipc.get_context("spawn")
    concurrent.futures.ProcessPoolExecutor(mp_context=ctx)     # results through shared memory
    torch.utils.data.DataLoader(ds, num_workers=4, multiprocessing_context=ctx)

Queue, SimpleQueue, JoinableQueue and Pipe come from shmipc; Pool and
ProcessPoolExecutor from shmipc.pool / shmipc.futures (imported on first use,
as multiprocessing's context does); every other member (Process, Lock,
Event, Manager, Value, get_start_method, ...) is multiprocessing's, for the
same start method. The context is a ``multiprocessing.context.BaseContext``,
so ``isinstance`` checks made by libraries pass.

SimpleQueues made here are ``waitable``: the stdlib ProcessPoolExecutor waits
on ``result_queue._reader`` with ``multiprocessing.connection.wait``, which
needs a file descriptor.
"""
from __future__ import annotations

import multiprocessing
from multiprocessing import context as _mp_context
from typing import TYPE_CHECKING, Any, Callable, Iterable

if TYPE_CHECKING:       # the factories' return types, imported lazily at run time
    from shmipc.connection import Connection
    from shmipc.futures import ProcessPoolExecutor
    from shmipc.pool import Pool
    from shmipc.queues import JoinableQueue, Queue, SimpleQueue

__all__ = ["ShmipcContext", "get_context"]


class ShmipcContext(_mp_context.BaseContext):
    """A multiprocessing context with shmipc's queues, pipes and pools.

    Args:
        method: the start method ("fork", "spawn", "forkserver") or None for
            multiprocessing's default (decided when first used, so creating
            this context does not fix the default the way
            ``multiprocessing.get_context()`` does).

    Raises:
        ValueError: an unknown or unavailable start method.
    """

    def __init__(self, method: str | None = None) -> None:
        if method is None:
            # the DefaultContext itself: its start method is the one
            # multiprocessing would use at the moment a process starts
            self._mp: Any = _mp_context._default_context
        else:
            self._mp = multiprocessing.get_context(method)
        self._method = method

    # ------------------------------------------------------------ shmipc's
    # (the factories return shmipc's classes, not multiprocessing's: hence
    # the type: ignore[override] against typeshed's BaseContext)
    def Queue(self, maxsize: int = 0, *, capacity: int | None = None) -> "Queue":  # type: ignore[override]
        """A shmipc.Queue (see :class:`shmipc.queues.Queue`)."""
        from shmipc.queues import Queue

        return Queue(maxsize, ctx=self, capacity=capacity)

    def JoinableQueue(self, maxsize: int = 0, *,  # type: ignore[override]
                      capacity: int | None = None) -> "JoinableQueue":
        """A shmipc.JoinableQueue."""
        from shmipc.queues import JoinableQueue

        return JoinableQueue(maxsize, ctx=self, capacity=capacity)

    def SimpleQueue(self, *, capacity: int | None = None,  # type: ignore[override]
                    waitable: bool = True) -> "SimpleQueue":
        """A shmipc.SimpleQueue, waitable by default (see the module docstring)."""
        from shmipc.queues import SimpleQueue

        return SimpleQueue(ctx=self, capacity=capacity, waitable=waitable)

    def Pipe(self, duplex: bool = True, *,  # type: ignore[override]
             capacity: int | None = None) -> "tuple[Connection, Connection]":
        """A pair of shmipc Connections (see :func:`shmipc.connection.Pipe`)."""
        from shmipc.connection import Pipe

        return Pipe(duplex, capacity=capacity)

    def Pool(self, processes: int | None = None,  # type: ignore[override]
             initializer: Callable[..., object] | None = None, initargs: Iterable[Any] = (),
             maxtasksperchild: int | None = None) -> "Pool":
        """A shmipc.Pool whose workers start with this context's method."""
        from shmipc.pool import Pool

        return Pool(processes, initializer, initargs, maxtasksperchild, context=self)

    def ProcessPoolExecutor(self, max_workers: int | None = None,
                            initializer: Callable[..., object] | None = None,
                            initargs: tuple = (), **kwargs: Any) -> "ProcessPoolExecutor":
        """A shmipc.ProcessPoolExecutor whose workers start with this context's method."""
        from shmipc.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers, mp_context=self, initializer=initializer,
                                   initargs=initargs, **kwargs)

    # ------------------------------------------------------------ multiprocessing's
    @property
    def Process(self) -> Any:
        """multiprocessing's Process class for this start method."""
        return self._mp.Process

    @property
    def _name(self) -> str:
        return self._mp.get_start_method()

    def get_start_method(self, allow_none: bool = False) -> str | None:  # type: ignore[override]
        """The start method processes of this context use."""
        if self._method is None:
            return self._mp.get_start_method(allow_none)
        return self._mp.get_start_method()

    def set_start_method(self, method: str | None, force: bool = False) -> None:
        """multiprocessing.set_start_method, for the default context only.

        Raises:
            ValueError: this context has a fixed method (as multiprocessing's
                concrete contexts).
        """
        if self._method is not None:
            raise ValueError("cannot set the start method of a context made for a given method")
        self._mp.set_start_method(method, force)

    def get_context(self, method: str | None = None) -> "ShmipcContext":  # type: ignore[override]
        """This context (method None) or a shmipc context for `method`."""
        if method is None:
            return self
        return ShmipcContext(method)

    def get_all_start_methods(self) -> list:
        return multiprocessing.get_all_start_methods()

    def _check_available(self) -> None:
        check = getattr(self._mp, "_check_available", None)
        if check is not None:
            check()

    def __getattr__(self, name: str) -> Any:
        # anything BaseContext lacks (and multiprocessing adds in later
        # versions) comes from the wrapped multiprocessing context
        if name.startswith("__") or name == "_mp":
            raise AttributeError(name)
        return getattr(self._mp, name)

    def __reduce__(self) -> tuple:
        return ShmipcContext, (self._method,)

    def __repr__(self) -> str:
        return f"<shmipc context {self._method or 'default'!r}>"


def get_context(method: str | None = None) -> ShmipcContext:
    """A multiprocessing context whose Queue, SimpleQueue, JoinableQueue,
    Pipe, Pool and ProcessPoolExecutor are shmipc's.

    Args:
        method: "fork", "spawn", "forkserver", or None for multiprocessing's
            default start method.

    Raises:
        ValueError: an unknown or unavailable start method.
    """
    return ShmipcContext(method)


def __getattr__(name: str) -> Any:
    """Names of ``multiprocessing.context`` that shmipc has no version of
    (BaseContext, Process, the concrete contexts, ...) are multiprocessing's."""
    if not name.startswith("_"):
        try:
            return getattr(_mp_context, name)
        except AttributeError:
            pass
    raise AttributeError(f"module 'shmipc.context' has no attribute {name!r}")
