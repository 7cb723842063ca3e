"""Small process helpers shared by the pool, the executor and pipelines."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal

__all__ = ["die_with_parent", "pid_alive"]

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


def pid_alive(pid: int) -> bool:
    """True if `pid` is a live process (a zombie counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return False
    state = data[data.rfind(b")") + 2: data.rfind(b")") + 3]
    return state not in (b"Z", b"X", b"x")
