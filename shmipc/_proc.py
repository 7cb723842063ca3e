"""Small process helpers shared by the pool, the executor and pipelines."""
from __future__ import annotations

import ctypes
import multiprocessing
import ctypes.util
import os
import signal
from typing import Any

from shmipc._ring import pid_alive  # the rings' own liveness check, zombies counted dead

__all__ = ["die_with_parent", "pid_alive", "steady_malloc", "resolve_start_method"]

_PR_SET_PDEATHSIG = 1
_libc = None


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies, so a
    worker never outlives (and burns CPU after) the process that started it.

    Call it first thing in a child. If the parent is already gone the child
    exits at once (the request would never fire).
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")
    if os.getppid() != parent_pid:
        os._exit(1)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def steady_malloc(mmap_threshold: int = 32 << 20, trim_threshold: int = 64 << 20) -> bool:
    """Make glibc's malloc keep and reuse freed memory up to these sizes
    instead of unmapping it and faulting fresh pages in for the next large
    message. A worker that receives a stream of large messages otherwise
    spends most of its time in page faults, and whether it does depends on
    malloc's adaptive thresholds as inherited from its parent (measured:
    Pool.map over 2000 x 100 KiB bytes took 85 ms or 13 ms depending only on
    what the parent had allocated before). Returns False where mallopt is
    not available (not glibc)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        mallopt = _libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and \
        bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


def resolve_start_method(context: Any = None) -> str:
    """The start method named by `context`: None (multiprocessing's default),
    a method name, or a context object (multiprocessing's or shmipc's).

    Raises:
        ValueError: an unknown start method name.
        TypeError: something that is neither a name nor a context.
    """
    if context is None:
        return multiprocessing.get_start_method()
    if isinstance(context, str):
        method = context
    elif hasattr(context, "get_start_method"):
        method = context.get_start_method()
    else:
        raise TypeError(f"context must be None, a start method name or a multiprocessing "
                        f"context, not {type(context).__name__}")
    if method not in multiprocessing.get_all_start_methods():
        raise ValueError(f"unknown start method {method!r}; this platform has "
                         f"{multiprocessing.get_all_start_methods()}")
    return method
