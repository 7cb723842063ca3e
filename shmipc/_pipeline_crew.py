"""A pipeline's worker processes: each stage's configuration, starting its
workers in numbered slots of a :class:`shmipc._workers.Supervisor`, noticing
deaths (with what the dead worker's slot and stash say), replacing them, and
stopping them all. What a death *means* for the items is the scheduler's
business (shmipc._pipeline_sched); this module only gathers the facts.

Workers are forked by the Supervisor's single-threaded zygote (itself forked
once, when results() starts, before any thread of ours exists), so
replacements started later are safe even if the caller has threads running
by then (a progress bar's). Slot k is stage s's worker j for k = s.slot_base + j.
"""
from __future__ import annotations

import queue
import time
from typing import Any, NamedTuple

from shmipc._pipeline_api import StageConfig
from shmipc._pipeline_sched import S_BUSY, S_DONE, S_STARTING, SLOT_WORDS, SlotRecord, is_envelope
from shmipc._wire import PipelineError
from shmipc._proc import steady_malloc
from shmipc._runtime import MAX_STARTUP_DEATHS, StartupGuard
from shmipc._waiting import SPAWN_GIVE_UP_S, SPAWN_RETRY_MAX_S, SPAWN_RETRY_S, STOP_POLL_S, doubled
from shmipc.errors import RingClosed, WorkerLost

__all__ = ["Stage", "Crew", "Death", "MAX_START_DEATHS", "SPAWN_GIVE_UP_S"]

MAX_START_DEATHS = MAX_STARTUP_DEATHS   # (the runtime's: see shmipc._runtime.StartupGuard)


class Stage(StageConfig):
    """One stage's configuration and its parent-side state."""

    def __init__(self, index: int, fn: Any, workers: int, ordered: bool, on_error: str,
                 retries: int, ring_capacity: int, name: str, zero_copy: bool) -> None:
        super().__init__(index, fn, workers, ordered, on_error, retries, name)
        self.ring_capacity = ring_capacity
        self.zero_copy = zero_copy
        self.ring: Any = None            # input ring
        self.slot_base = 0               # index of this stage's first worker slot
        self.stashes: list[Any] = []     # per worker: its current input (retries only)
        self.pids: list[int] = []        # per worker slot: pid, 0 when none
        self.deaths = 0
        self.claims: dict[int, Any] = {}   # pid of a dead worker: the item it had taken (Pipeline._take_back)
        self.startup = StartupGuard()    # deaths in a row of workers that had not finished setup


class Death(NamedTuple):
    """A worker that died, and what it left: its slot (None if garbage) and
    the copy of its input it kept (retries only)."""

    stage: Stage
    j: int
    pid: int
    exitcode: int | None
    slot: SlotRecord | None
    stashed: tuple | None

    def lost(self, seq: int) -> BaseException:
        return WorkerLost(self.pid, self.exitcode, task=f"item {seq} of stage {self.stage.name!r}")


class Crew:
    """The workers of a pipeline `p` (whose stages, slots and rings exist)."""

    def __init__(self, p: Any) -> None:
        self.p = p
        self.stages: list[Stage] = p._stages
        self.slots = p._slots.words          # the slot table's words (see shmipc._slots)
        self.sup: Any = None
        self._respawn: dict[int, tuple[float, str, float]] = {}  # slot -> (first failure, why, not before)
        self._outside: dict[int, int] = {}      # slot -> failed starts in a row caused from outside

    def start(self) -> None:
        from shmipc._workers import Supervisor

        self.sup = Supervisor(_worker_entry, (self.p,), context="fork", name="shmipc-pipeline")
        slots = [s.slot_base + j for s in self.stages for j in range(s.workers)]
        for k in slots:
            self.slots[k * SLOT_WORDS] = S_STARTING
        started = self.sup.start(slots)
        now = time.monotonic()
        for k in slots:
            s, j = self.slot_owner(k)
            if k in started:
                s.pids[j] = started[k]
            else:                               # its zygotes were killed from outside
                self._put_off(k, now)

    def slot_owner(self, k: int) -> tuple[Stage, int]:
        for s in self.stages:
            if s.slot_base <= k < s.slot_base + s.workers:
                return s, k - s.slot_base
        raise AssertionError(f"no stage has worker slot {k}")

    def replace(self, s: Stage, j: int) -> None:
        """Start a worker for slot j of stage s; if it cannot be started now
        (its helper is being replaced, fork failed), poll() tries again, for
        up to SPAWN_GIVE_UP_S of failures of its own. Workers that keep being
        killed while starting are replaced after the guard's back-off, and
        starts that failed because the helpers were killed or stopped from
        outside after a back-off of their own (also by poll())."""
        k = s.slot_base + j
        now = time.monotonic()
        delay = s.startup.respawn_delay()
        if delay > 0 and k not in self._respawn:
            self._respawn[k] = (now, "", now + delay)
            return
        self.slots[k * SLOT_WORDS] = S_STARTING
        try:
            s.pids[j] = self.sup.spawn(k)
        except (OSError, ValueError) as exc:   # Supervisor.spawn's "cannot now"
            if getattr(exc, "killed_from_outside", False):
                self._put_off(k, now)
                return
            first = self._respawn.get(k, (now, "", 0.0))[0]
            self._respawn[k] = (first, f"{type(exc).__name__}: {exc}", 0.0)
            return
        self._respawn.pop(k, None)
        self._outside.pop(k, None)

    def _put_off(self, k: int, now: float) -> None:
        """Slot k's start failed only because the helpers were killed or
        stopped from outside (or too slow): that says nothing about whether
        workers can start, so it never stops the pipeline (as a Pool: see
        _engine_exits); tried again after a back-off, so that an attack
        costs few forks, and the give-up clock starts anew."""
        tries = self._outside[k] = self._outside.get(k, 0) + 1
        self._respawn[k] = (now, "", now + doubled(SPAWN_RETRY_S, SPAWN_RETRY_MAX_S, tries - 1))

    def poll(self) -> list[Death]:
        """The workers that died since the last call (not yet replaced).

        Raises:
            PipelineError: a stage's workers keep dying before their setup
                finished, or a worker could not be started for SPAWN_GIVE_UP_S.
        """
        for k, (first, why, not_before) in list(self._respawn.items()):
            if time.monotonic() < not_before:
                continue
            s, j = self.slot_owner(k)
            self._respawn[k] = (first, why, 0.0)
            self.replace(s, j)
            first, why, _ = self._respawn.get(k, (0.0, "", 0.0))
            if why and time.monotonic() - first > SPAWN_GIVE_UP_S:
                raise PipelineError(f"cannot start a worker for stage {s.name!r} for "
                                    f"{SPAWN_GIVE_UP_S:.0f} s: {why}")
        dead = []
        for ev in self.sup.poll():
            s, j = self.slot_owner(ev.slot)
            if s.pids[j] == ev.pid:
                s.pids[j] = 0
                s.deaths += 1
                dead.append(self._death(s, j, ev.pid, ev.exitcode))
        for s in self.stages:
            guard = s.startup
            if (guard.deaths or guard.killed) and any(
                    pid and self.slots[(s.slot_base + j) * SLOT_WORDS] != S_STARTING
                    for j, pid in enumerate(s.pids)):
                guard.ready()                    # a worker of it got through setup
        return dead

    def _death(self, s: Stage, j: int, pid: int, exitcode: int | None) -> Death:
        base = (s.slot_base + j) * SLOT_WORDS
        rec = SlotRecord.from_words(self.slots[base: base + SLOT_WORDS])
        stashed = None
        if s.stashes:
            try:
                stashed = s.stashes[j].get_nowait()
            except queue.Empty:
                pass
            except Exception:
                stashed = None            # a copy that does not decode: as if none
            if stashed is not None and not is_envelope(stashed):
                stashed = None            # garbage in the stash ring: as if none
        if (rec is None or rec.state == S_STARTING) and s.startup.died_starting(pid, exitcode):
            # (killed from outside: not the stage's fault, never counted here)
            raise PipelineError(f"workers of stage {s.name!r} keep dying before their setup "
                                f"finished (last: {s.startup.last}); giving up")
        return Death(s, j, pid, exitcode, rec, stashed)

    def busy(self) -> bool:
        """Some worker holds an item (by its slot)."""
        n = sum(s.workers for s in self.stages)
        return any(self.slots[i * SLOT_WORDS] in (S_BUSY, S_DONE) for i in range(n))

    def stop(self, ctrl: Any, rings: list[Any], timeout: float) -> None:
        """Stop every worker: flag, shut the rings (waking all waiters), give
        them `timeout` seconds to exit (and run teardown), then let the
        supervisor SIGTERM/SIGKILL and reap the rest."""
        sup = self.sup
        if sup is None:
            return
        try:
            ctrl[0] = 1
            for ring in rings:
                ring.shutdown()
        except RingClosed:
            pass
        deadline = time.monotonic() + timeout
        while sup.pids():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sup.wait(min(left, STOP_POLL_S))
        sup.stop(timeout=0.2)
        for s in self.stages:
            s.pids = [0] * len(s.pids)


def _worker_entry(slot: int, p: Any) -> None:
    """Supervisor target: run worker `slot` of pipeline `p` (inherited by fork).
    The supervisor has made it ignore SIGINT (the parent stops it) and die
    with its parent."""
    from shmipc._pipeline_worker import StageWorker

    s, j = p._crew.slot_owner(slot)
    steady_malloc()                 # large items must not cost a page fault storm each
    code = StageWorker(p, s, j).run()
    if code:
        raise SystemExit(code)
