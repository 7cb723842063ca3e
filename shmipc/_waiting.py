"""How the waiters above the ring sleep: every poll interval and back-off in one place.

The ring sleeps on its semaphores and wakes at once. Everything above it
that must also notice something no semaphore signals (a worker's parent
died, a stop flag, a process exited, a deadline) waits in slices and looks
between them: the slice is the trade between idle CPU and reaction time.
Those slices live here, named by what they wait for, so that how quickly
each part of shmipc notices a death or a stop can be read (and tuned) in
one file. Every wait here has a path out (a deadline, a dead peer, a flag).
"""
from __future__ import annotations

import time
from typing import Callable

__all__ = ["Backoff", "doubled", "wait_until"]

# ---------------------------------------------------------------- worker processes
WORKER_IDLE_S = 0.5          # a worker's longest wait for work before it looks at its parent / stop flag
BIG_MESSAGE_WAIT_S = 30.0    # a reader waits this long for a big message announced by a stub
DEAD_RING_SLICE_S = 0.5      # a read from a dead worker's ring (it may have held the lock: recovered)

# ---------------------------------------------------------------- parent: pool / executor
BOOKKEEPING_S = 0.05         # the bookkeeping thread looks at worker exits at least this often
FEEDER_ROOM_S = 0.1          # an imap feeder waiting for room looks at the pool's state this often
FORK_PAUSE_S = 0.001         # join() while the bookkeeping thread is paused for another pool's fork
# a pool whose workers kept dying at start fails its work, then lets a later
# submit try again after this long, doubling at each new trip up to the cap
STARTUP_RETRY_S = 1.0
STARTUP_RETRY_MAX_S = 30.0
# a worker killed from outside while starting (once that keeps happening,
# see StartupGuard.respawn_delay), or that could not be started because its
# zygotes were killed or stopped from outside, is started again after this
# long, doubling up to the cap
SPAWN_RETRY_S = 0.05
SPAWN_RETRY_MAX_S = 1.0


def doubled(first: float, cap: float, times: int) -> float:
    """The wait of a back-off after `times` doublings: `first` * 2**times,
    at most `cap`."""
    return min(first * 2 ** min(times, 30), cap)

# ---------------------------------------------------------------- parent: pipeline
PIPELINE_POLL_S = 0.05       # the parent's longest sleep before it looks at its workers
FEED_SLICE_S = 0.002         # longest the parent reads the source before it drains results
REAP_EVERY_S = 0.1           # how often the parent checks for dead workers
CLAIM_WAIT_S = 0.05          # the pipeline's parent waits this long for a stage ring's consumer side (take-back)
QUIET_S = 1.0                # nothing moving this long after a death: stuck items are lost
SPAWN_GIVE_UP_S = 15.0       # a worker that cannot be started for this long stops the pipeline

# ---------------------------------------------------------------- parent: the Ray path (shmipc.cluster)
RAY_POOL_POLL_S = 0.02       # the Ray pool's bookkeeping thread looks for new tasks this often
RAY_PIPELINE_POLL_S = 0.05   # the Ray pipeline's driver waits this long for a worker's answer

# ---------------------------------------------------------------- processes (supervisor, zygote)
EXIT_POLL_S = 0.005          # waiting for a process to exit when there is no fd to wait on
STOP_POLL_S = 0.05           # a stopping pipeline looks at its workers' exits this often
ZYGOTE_IDLE_S = 0.25         # the zygote's longest sleep (commands and pidfds wake it earlier)
ZYGOTE_POLL_S = 0.05         # ... while a worker of it has no pidfd (old kernels: polled)
PARENT_WATCH_S = 0.2         # a worker's parent watchdog without a pidfd
ZYGOTE_EXIT_CHECK_S = 0.1    # how often the supervisor checks for exits a zygote did not report

# ---------------------------------------------------------------- queues, pipes, asyncio (queues.py, _bulk.py, aio.py)
JOIN_POLL_S = 0.0002         # JoinableQueue.join polls the shared counts, from this ...
JOIN_POLL_MAX_S = 0.01       # ... doubling to this
READY_SPURIOUS_S = 50e-6     # a queue's readiness wait after a byte with nothing behind it, from this ...
READY_SPURIOUS_MAX_S = 0.005  # ... doubling to this
BULK_WRITE_SLICE_S = 0.05    # a large put waits for room this long at a time, then checks its deadline and reader
BULK_LOCK_S = 0.0005         # a bulk-ring lock held by another process is retried after this ...
BULK_LOCK_MAX_S = 0.01       # ... doubling to this (the holder finishes or dies: the kernel frees it)
BULK_HOLDER_QUIET_S = 2.0    # a large message's token taken this long ago by a process that never said it holds it is lost
ASYNC_POLL_S = 50e-6         # asyncio awaits with no descriptor to wait on retry on timers from this ...
ASYNC_POLL_MAX_S = 0.005     # ... doubling to this


class Backoff:
    """Sleeps that start short and double up to `cap`: for polling shared
    state that changes soon in the common case and late in the rare one.

    ``sleep(deadline)`` never sleeps past `deadline` (a time.monotonic()
    value, or None for no deadline) and returns False once it has passed."""

    __slots__ = ("pause", "cap")

    def __init__(self, first: float, cap: float) -> None:
        self.pause = first
        self.cap = cap

    def sleep(self, deadline: float | None = None) -> bool:
        pause = self.pause
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            pause = min(pause, left)
        time.sleep(pause)
        self.pause = min(self.pause * 2, self.cap)
        return True


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = EXIT_POLL_S) -> bool:
    """Poll `cond` every `interval` seconds for up to `timeout`; True once it holds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True
LOST_RESULT_S = 1.0           # a task its pool worker says is done, its result not come: lost after this
