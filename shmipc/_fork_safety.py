"""Forking safely from a process that runs threads: the one place that
knows which shmipc threads run and stops them for the moment of a fork
(:func:`threads_paused`), and which threads outlive the workers they start
(so those workers may use the kernel's parent-death signal, which follows
the starting *thread*). Used by :class:`shmipc._workers.Supervisor`.
"""
from __future__ import annotations

import signal
import threading
import traceback
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

__all__ = ["register_pausable", "threads_paused", "mark_thread_long_lived",
           "unmark_thread_long_lived", "outlives_children", "sigint_blocked", "forget_mp_child"]

_long_lived_threads: set[int] = set()
_pausable: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register_pausable(obj: Any) -> None:
    """Register an object that runs threads of its own and can stop them for
    a moment: ``obj._pause_for_fork() -> bool`` (True if it stopped its
    threads; they must be gone, not merely idle) and ``obj._resume_after_fork()``.
    Before forking a zygote, every registered object is paused, so the fork
    happens with no shmipc thread running (Python 3.12+ warns about forking a
    process with threads, and such forks can deadlock). Held weakly."""
    _pausable.add(obj)


# One zygote fork at a time: two pools created at once by two threads would
# otherwise pause (and then restart) the same third pool's thread twice.
_fork_lock = threading.RLock()


@contextmanager
def threads_paused() -> Iterator[None]:
    """Stop the threads of every registered pausable object for the block
    (one such block at a time in this process)."""
    paused = []
    _fork_lock.acquire()
    try:
        for obj in list(_pausable):
            try:
                if obj._pause_for_fork():
                    paused.append(obj)
            except Exception:
                pass
        yield
    finally:
        try:
            for obj in paused:
                try:
                    obj._resume_after_fork()
                except Exception:
                    traceback.print_exc()
        finally:
            _fork_lock.release()


def mark_thread_long_lived() -> None:
    """Declare that the calling thread outlives every worker it starts (e.g.
    a pool's bookkeeping thread), so workers it starts may use the kernel's
    parent-death signal, which follows the starting *thread*."""
    _long_lived_threads.add(threading.get_ident())


def unmark_thread_long_lived() -> None:
    """Undo mark_thread_long_lived() (call it as the thread ends: idents are reused)."""
    _long_lived_threads.discard(threading.get_ident())


def outlives_children() -> bool:
    """True if the calling thread outlives every worker it starts."""
    return (threading.current_thread() is threading.main_thread()
            or threading.get_ident() in _long_lived_threads)


@contextmanager
def sigint_blocked() -> Iterator[None]:
    """Block SIGINT in this thread for the block: a child started meanwhile
    (fork+exec) starts with it blocked, so a Ctrl-C during its start-up
    cannot print a KeyboardInterrupt traceback from its imports. A Ctrl-C
    meanwhile reaches this process when the block ends."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    try:
        # started (if needed) first: starting it unblocks SIGINT in this thread
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    except Exception:
        pass
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def forget_mp_child(proc: Any) -> None:
    """Remove a process we manage ourselves from multiprocessing's registry of children."""
    try:
        from multiprocessing import process as mp_process

        mp_process._children.discard(proc)
    except Exception:
        pass
