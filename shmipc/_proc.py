"""Small process helpers shared by the pool, the executor and pipelines."""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from typing import Any

from shmipc._ring import arena_cache, arena_cache_release, pid_alive  # (pid_alive: the rings' own liveness check, zombies counted dead)

__all__ = ["die_with_parent", "pid_alive", "steady_malloc", "steady_memory", "give_memory_back",
           "resolve_start_method", "ARENA_CACHE_BYTES"]

_PR_SET_PDEATHSIG = 1
_libc = None


def libc() -> Any:
    """The C library, loaded once, errno kept (ctypes' use_errno): the
    symbols already in this process (dlopen(NULL)), or libc.so.6. Not
    ctypes.util.find_library("c"), which runs ldconfig in a subprocess: a
    fork in another thread meanwhile (a new pool's zygote) inherits the
    pipe the subprocess module waits on, and the wait never ends (two
    threads making their first Pool at once hung 1 to 4 times in 15)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        if not hasattr(lib, "mallopt") and not hasattr(lib, "prctl"):
            lib = ctypes.CDLL("libc.so.6", use_errno=True)
        _libc = lib
    return _libc


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies, so a
    worker never outlives (and burns CPU after) the process that started it.

    Call it first thing in a child. If the parent is already gone the child
    exits at once (the request would never fire).
    """
    if libc().prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
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
    try:
        mallopt = libc().mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and \
        bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


# Freed object arenas a process keeps for reuse (see shmipc/_arenas.pxi): a
# map of 200,000 ints creates and frees ~6.4 MB of int objects per process;
# 64 MiB covers maps of ~2 M small objects, as steady_malloc's trim threshold
# covers their lists.
ARENA_CACHE_BYTES = 64 << 20
_OPT_OUT = "SHMIPC_STEADY_MEMORY"
_steady = False                 # steady_memory was done in this process


def steady_memory(parent: bool = False) -> bool:
    """steady_malloc, and keep up to ARENA_CACHE_BYTES of the interpreter's
    freed object arenas for reuse: a process that builds and drops the same
    large lists of small objects over and over (a pool map's arguments and
    results) then reuses its pages instead of faulting fresh ones in for
    every list (measured on Pool.map of 200,000 ints: the parent's minor
    faults 2,100 -> 0 a map, its CPU 11 -> 6.5 ms, the map 23 -> 16 ms).
    Memory kept so goes back at the next idle period (give_memory_back).
    Workers always do it; in the user's process (`parent`), the pool does
    it unless the environment variable SHMIPC_STEADY_MEMORY is "0". Returns
    whether it was done."""
    global _steady
    if parent and os.environ.get(_OPT_OUT, "1").strip() == "0":
        return False
    if not _steady:
        steady_malloc()                 # (not glibc: a no-op; the arena cache still helps)
        arena_cache(ARENA_CACHE_BYTES)
        _steady = True
    return True


def give_memory_back() -> int:
    """What steady_memory kept, back to the system: the cached arenas, and
    the free memory at the top of malloc's heap (malloc_trim). Returns the
    bytes of arenas given back (nothing unless steady_memory was done here)."""
    if not _steady:
        return 0
    freed = arena_cache_release()
    if _libc is not None:
        try:
            _libc.malloc_trim(0)
        except AttributeError:          # not glibc
            pass
    return freed


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
