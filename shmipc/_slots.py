"""The slot table: one record per worker in shared memory, written only by
that worker, so that when it dies the parent knows exactly what it held.
One table for the pool engine (Pool, ProcessPoolExecutor) and the Pipeline.

A record is `width` int64 words (one cache line at least). Every record
starts with the same two words:

  * word 0, the state: STARTING (also what a fresh, zeroed record says: a
    worker that dies before it wrote anything died starting), READY (waiting
    for work), BUSY (holding the task or item in word 1), DONE (pipeline: its
    item is settled, the worker is cleaning up), EXITING (pool: it leaves on
    purpose);
  * word 1, the sequence number of the task (pool) or item (pipeline) it holds.

The rest is the user's: the pool puts the worker's pid in word 2 (a record
whose pid is not the dead worker's was never written by it); the pipeline its
credit, progress and path (see :mod:`shmipc._pipeline_sched`).

Invariants: only the worker of a slot writes it, and the parent only after
that worker is gone (or to reset it before starting the next); a worker
writes the fields a state makes meaningful *before* that state (BUSY last).
Every word read back is untrusted: readers bounds-check what they use.
"""
from __future__ import annotations

import struct
from typing import Any

__all__ = ["SlotTable", "STARTING", "READY", "BUSY", "DONE", "EXITING", "W_STATE", "W_SEQ", "HEAD3"]

STARTING, READY, BUSY, DONE, EXITING = 0, 1, 2, 3, 4
W_STATE, W_SEQ = 0, 1               # the words every record starts with
# a record's first three words written in one call (state, seq, and the
# user's word 2): a worker on its hot path (twice per task) pays one call
# instead of three item stores (~130 ns against ~360 ns)
HEAD3 = struct.Struct("=qqq")


class SlotTable:
    """The slot records over an arena block (see the module docstring).

    Args:
        block: a writable buffer of at least ``nbytes(count, width)`` bytes.
        width: int64 words per record.
    """

    def __init__(self, block: Any, width: int) -> None:
        self.words = memoryview(block).cast("q")
        self.width = width

    @staticmethod
    def nbytes(count: int, width: int) -> int:
        """Bytes of a table of `count` records (at least one)."""
        return max(count, 1) * width * 8

    def state(self, k: int) -> int:
        return self.words[k * self.width]

    def set_state(self, k: int, state: int) -> None:
        self.words[k * self.width] = state

    def row(self, k: int) -> Any:
        """Record k's words (a view: read them at once, they are live)."""
        base = k * self.width
        return self.words[base: base + self.width]

    def reset(self, k: int) -> None:
        """Zero record k (STARTING, nothing held): before its next worker starts."""
        base = k * self.width
        for i in range(base + self.width - 1, base - 1, -1):   # the state word last
            self.words[i] = 0

    def release(self) -> None:
        """Let go of the view, so the arena can be unmapped."""
        self.words.release()
