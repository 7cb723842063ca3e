"""The worker side of a pipeline: one process runs one stage's function on
one item at a time, keeping its slot (see shmipc._pipeline_sched) up to date
so the parent knows, if it dies, exactly what it held and what it had sent.

Per item (the order is what makes a death decidable):
  1. take an envelope from the stage's ring, held: its record stays claimed
     by this process (slot READY);
  2. with retries, keep a copy in this worker's stash ring;
  3. write seq, credit and path, then state BUSY; let the ring forget the
     record (zero_copy: at 5, the input lives in it until then);
  4. before each put, write progress (sent, inflight) as one word; after it,
     (sent + 1, F_NONE), or (sent + 1, F_COMPLETE) after the item's last message;
  5. state DONE, empty the stash, state READY.
A kill between 1 and 3 leaves the record claimed by a dead process: the
stage's ring keeps it (Ring._keep_dead_claims) and the parent takes it back
(Ring._take_back) to retry or fail the item at once; after 3, the slot says
what was held and sent.
"""
from __future__ import annotations

import queue
import types
from typing import Any

from shmipc._pipeline_sched import (F_COMPLETE, F_END, F_FUNC, F_LAST, F_NONE, F_PART, S_BUSY,
                                    S_DONE, S_READY, SLOT_WORDS)
from shmipc._wire import K_DONE, K_ERROR, K_FATAL, K_RESULT, error_value, pack, repack, unpack
from shmipc._runtime import GONE, instantiate, next_message
from shmipc.errors import PeerDied, RingClosed

__all__ = ["StageWorker"]

_NOTHING = object()


class StageWorker:
    """Runs worker `j` of stage `stage` of a (forked) pipeline's rings.

    Args:
        p: the Pipeline (inherited by fork: its rings, slots and control block).
        stage: the stage's record (shmipc._pipeline_crew.Stage).
        j: this worker's index within the stage.
    """

    def __init__(self, p: Any, stage: Any, j: int) -> None:
        self.ctrl = p._ctrl
        self.slots = p._slots.words
        self.base = (stage.slot_base + j) * SLOT_WORDS
        self.index = stage.index
        self.name = stage.name
        self.fn = stage.fn
        self.zero_copy = stage.zero_copy
        self.inring = stage.ring
        self.out = p._out
        self.nxt = p._stages[stage.index + 1].ring if stage.index + 1 < len(p._stages) else None
        self.stash = stage.stashes[j] if stage.stashes else None
        self.owner = p._owner_pid
        self.obj: Any = None

    def run(self) -> int:
        """Set up, take items until told to stop, tear down. Returns the exit code."""
        try:
            self.obj, call = instantiate(self.fn)
            setup = getattr(self.obj, "setup", None) if self.obj is not None else None
            if setup is not None:
                setup()
        except Exception as exc:
            try:
                self.out.put((K_FATAL, -1, 0, (), error_value(self.index, exc), None), timeout=5)
            except (queue.Full, BrokenPipeError, EOFError, RingClosed):
                pass
            return 3
        self.call = call
        self.slots[self.base] = S_READY
        try:
            self._loop()
        except (BrokenPipeError, EOFError, RingClosed):
            pass                          # the pipeline is shutting down
        finally:
            teardown = getattr(self.obj, "teardown", None) if self.obj is not None else None
            if teardown is not None:
                teardown()
        return 0

    def _loop(self) -> None:
        ctrl = self.ctrl
        while not ctrl[0]:
            got = next_message(self._take, self.owner, lambda: bool(ctrl[0]))
            if got is GONE:
                return
            held, env = got
            del got
            try:
                if ctrl[0]:
                    return
                self._handle(env, held)
                del env
                self._finish(held)
            finally:
                held.__exit__(None, None, None)     # (once: a second call does nothing)

    def _take(self, timeout: float) -> tuple[Any, tuple]:
        """The next envelope, its record held (step 1). zero_copy: the input
        is read over the ring (no copy out) until the item is done."""
        ring = self.inring
        held = ring.get_view(timeout=timeout) if self.zero_copy else ring._get_held(timeout=timeout)
        return held, held.__enter__()

    # ------------------------------------------------------------ one item
    def _handle(self, env: tuple, held: Any) -> None:
        slots, base = self.slots, self.base
        if self.stash is not None:
            self.stash.put(repack(env))
        seq, e, path, data, meta = env
        slots[base + 1] = seq
        slots[base + 2] = e
        slots[base + 3] = 0
        n = len(path)
        slots[base + 4] = n
        for i, step in enumerate(path):
            slots[base + 5 + i] = step
        slots[base] = S_BUSY
        if not self.zero_copy:
            held.__exit__(None, None, None)     # written down: the ring may forget it
        self.seq, self.e, self.path, self.sent = seq, e, path, 0
        try:
            try:
                value = unpack(data, meta)
            except Exception as exc:
                exc.add_note("(this stage's input could not be unpickled)")
                raise
            del data
            result = self.call(value)
            del value
            if isinstance(result, types.GeneratorType):
                self._run_generator(result)
            else:
                self._emit(e, path, result, F_FUNC)
        except (BrokenPipeError, EOFError) as exc:
            # from our own rings: the pipeline is shutting down (or the parent
            # died); from the stage's code (or a RingClosed from a queue of
            # its own: this process never closes our rings): an item error
            if self.ctrl[0] or isinstance(exc, PeerDied):
                raise
            self._fail(exc)
        except Exception as exc:
            self._fail(exc)

    def _finish(self, held: Any) -> None:
        """Step 5. The held input (zero_copy) is let go while the slot says
        DONE: from then on a kill is settled by the slot, never retried."""
        slots, base = self.slots, self.base
        slots[base] = S_DONE
        held.__exit__(None, None, None)
        if self.stash is not None:
            with self.stash.get_view(timeout=0):
                pass
        slots[base] = S_READY

    def _run_generator(self, gen: types.GeneratorType) -> None:
        """Send each output once the next exists (so the last one can take
        all of the share that is left); K_DONE if there was none."""
        e, path = self.e, self.path
        held = _NOTHING
        try:
            for item in gen:
                if held is not _NOTHING:
                    # the held output takes half of what is left
                    self._emit(e + self.sent + 1, path + (self.sent,), held, F_PART)
                held = item
        except Exception:
            if held is not _NOTHING:
                self._emit(e + self.sent + 1, path + (self.sent,), held, F_PART)
            raise
        if held is _NOTHING:
            self._report(K_DONE, None)
        else:
            self._emit(e + self.sent, path + (self.sent,), held, F_LAST)

    def _emit(self, e: int, path: tuple, value: Any, inflight: int) -> None:
        """Send one output of the current item on (to the next stage, or to
        the parent from the last stage). A value that does not pickle raises
        here, before anything is marked in flight."""
        data, meta = pack(value)
        slots, base = self.slots, self.base
        slots[base + 3] = self.sent * 8 + inflight
        if self.nxt is None:
            self.out.put((K_RESULT, self.seq, e, path, data, meta))
        else:
            self.nxt.put((self.seq, e, path, data, meta))
        self.sent += 1
        slots[base + 3] = self.sent * 8 + (F_NONE if inflight == F_PART else F_COMPLETE)

    def _fail(self, exc: BaseException) -> None:
        """Report the current item's exception (naming the item in a note)."""
        exc.add_note(f"(item {self.seq} in stage {self.name!r})")
        self._report(K_ERROR, error_value(self.index, exc))

    def _report(self, kind: int, data: Any) -> None:
        """Send the rest of the current item's share to the parent: K_DONE,
        or K_ERROR with the exception."""
        slots, base = self.slots, self.base
        slots[base + 3] = self.sent * 8 + F_END
        self.out.put((kind, self.seq, self.e + self.sent, self.path, data, None))
        self.sent += 1
        slots[base + 3] = self.sent * 8 + F_COMPLETE

