"""What happens when a pool worker dies: the one place that answers it for
Pool and ProcessPoolExecutor (a mixin of :class:`shmipc._engine._Engine`,
whose invariants it keeps; every method runs with the engine's lock held).

* the task it was running (its slot in shared memory says which, see
  :mod:`shmipc._poolworker`) fails with WorkerLost, or is re-queued while
  it has retries left;
* the tasks queued behind it in its ring never started: they go back to
  the front of the queue, for the other workers;
* a worker that died before it was ready is judged by the runtime's
  :class:`shmipc._runtime.StartupGuard` (killed from outside: replaced;
  by its own hand, time after time: the pending work fails, and a later
  submit tries again after a back-off);
* otherwise a replacement starts in the same slot (shmipc._workers.Supervisor).

The Pipeline's answer to the same question is shmipc._pipeline_crew (the
facts) plus shmipc._pipeline_sched (what they mean for its items), with the
same StartupGuard.
"""
from __future__ import annotations

import queue
import sys
import time
from typing import Any

from shmipc._poolworker import SLOT_WORDS, W_DONE, W_PID
from shmipc._runtime import MAX_SPAWN_FAILURES
from shmipc._slots import BUSY, EXITING, READY, STARTING, W_SEQ, W_STATE
from shmipc._tasks import _Task
from shmipc._waiting import DEAD_RING_SLICE_S, LOST_RESULT_S, SPAWN_RETRY_MAX_S, SPAWN_RETRY_S, doubled
from shmipc.errors import CorruptArena, CorruptMessage

# records in a row that do not decode before the parent counts a ring as
# damaged (more than a ring of them can hold: it is not giving its records up)
UNDECODABLE_MAX = 100_000

# pool states (as shmipc._engine's)
RUN = "RUN"
CLOSE = "CLOSE"


def _discard_all(ring: Any) -> bool:
    """Drop every record left in a dead worker's ring (none of them started).
    False if the ring itself is damaged (its header: nothing can be read
    from it any more, see _on_exit), True once it is empty."""
    undecodable = 0
    while ring.qsize():
        try:
            ring.get(timeout=DEAD_RING_SLICE_S)     # waits a slice if the dead worker held the lock
        except (queue.Empty, EOFError):
            break
        except CorruptMessage:
            undecodable += 1                        # a corrupt record is dropped as well
            if undecodable > UNDECODABLE_MAX:
                return False
        except CorruptArena:
            return False
    return True


def _unread_bytes(ring: Any) -> int:
    """Bytes between a ring's read and write positions (what its consumer
    can still take, or holds), -1 if they cannot be read (closed, damaged).
    Positions, not message counts: a hostile write that moves the read
    position past a record leaves the counts as they were."""
    try:
        return ring.stats(recover=False)["bytes_used"]
    except Exception:
        return -1


class _WorkerExits:
    """The engine's handling of worker exits (see the module docstring)."""

    _state: str
    _broken: str
    _slots: Any
    _done_seen: dict[int, tuple[tuple[int, bool], float]]
    _bad_records: dict[int, tuple]
    _tasks: list
    _arena: Any
    _footprint: Any
    rings_remade: int
    _lock: Any
    _resources_released: bool

    def _on_exit(self, ev: Any) -> list:
        """A worker exited: fail or retry the task it was running, re-queue the
        ones waiting in its ring, start a replacement. Lock held, results drained."""
        later: list = []
        slot = ev.slot
        self._pids.pop(slot, None)
        self._done_seen.pop(slot, None)
        _pid, state, running = self._slot(slot)
        if _pid != ev.pid:
            _pid, state, running = 0, STARTING, 0      # it never wrote its slot: died while starting
        busy = state == BUSY
        exitcode = ev.exitcode
        if exitcode is None and state == EXITING:
            exitcode = 0            # an orphan (its zygote died) that left on purpose
        # empty its ring: nothing in it ever started. A ring whose header is
        # damaged (a hostile write) is laid out afresh: no process uses it now
        # (its worker is gone; the replacement attaches after this), and the
        # tasks it held are re-queued below from _assigned
        if not _discard_all(self._tasks[slot]):
            self._tasks[slot] = self._arena._remake_ring(self._tasks[slot])
            self._footprint.replace_ring(slot, self._tasks[slot])
            self.rings_remade += 1
            print(f"shmipc.Pool: the task ring of worker {slot} was damaged in shared memory; "
                  f"laid out afresh, its tasks re-queued", file=sys.stderr)
        if self._big_slot == slot and self._big_seq in self._inflight:
            # the big task sent to it may still wait in the big ring: it never started
            _discard_all(self._big_tasks)
        requeue: list[_Task] = []
        for seq in list(self._assigned[slot]):
            task = self._inflight.get(seq)
            if task is None:
                continue
            self._settle(task)
            task.pieces = None
            if busy and seq == running:
                self.tasks_lost += 1
                if task.tries_left > 0:
                    task.tries_left -= 1
                    self.tasks_retried += 1
                    requeue.append(task)
                else:
                    later += task.job._deliver(task, False, self._lost_error(ev.pid, exitcode, task.describe()))
            else:
                requeue.append(task)
        for task in reversed(requeue):
            self._queue.appendleft(task)
        self._assigned[slot].clear()
        # big results read ahead for tasks that are no longer in flight will never be claimed
        self._big_stash = {k: v for k, v in self._big_stash.items() if k[0] in self._inflight}
        self._outstanding[slot] = 0
        self._sent_to[slot] = 0
        self._last_done[slot] = 0.0
        self._stopping[slot] = False
        self._slots.reset(slot)
        if exitcode != 0 or busy:
            self.worker_deaths += 1
        if state == STARTING:
            # an exit before the worker was ready by its own hand counts, exit
            # code 0 too (an initializer calling sys.exit(0) must not respawn
            # workers forever); a kill from outside does not (see StartupGuard)
            guard = self._startup
            if guard.died_starting(ev.pid, exitcode) and not self._broken:
                # mp would respawn forever and leave callers waiting: say why instead
                return later + self._trip(
                    f"{guard.deaths} workers in a row died while starting (last: {guard.last}); "
                    f"does the initializer fail or exit, or the function not import?")
        else:
            self._startup.ready()
        if not self._broken:                # (broken: a later submit starts workers again)
            later += self._respawn(slot, self._startup.respawn_delay())
        return later

    def _note_ready_workers(self) -> None:
        """A live worker past its start-up resets the start-up guard. Lock held."""
        for slot, pid in self._pids.items():
            _pid, state, _running = self._slot(slot)
            if _pid == pid and state != STARTING:
                self._startup.ready()
                return

    def _trip(self, why: str) -> list:
        """Workers cannot start: fail every pending task with `why`, start no
        worker until a submit after the guard's back-off. Lock held."""
        return self._break(why, time.monotonic() + self._startup.trip(), self._broken_error(why))

    def _break(self, why: str, retry_at: float, error: BaseException) -> list:
        """The pool cannot run tasks: submits raise `why` until `retry_at`,
        no worker is respawned, every pending task fails with `error`. Lock
        held; returns the callbacks to run."""
        self._broken = why
        self._retry_at = retry_at
        self._respawn_at.clear()
        return self._fail_all_locked(error)

    def _respawn(self, slot: int, delay: float = 0.0) -> list:
        """Start a worker in an empty slot (after `delay` seconds: at a later
        poll) if work may still come. Lock held."""
        later: list = []
        self._respawn_at.pop(slot, None)
        if delay > 0:
            self._respawn_at[slot] = time.monotonic() + delay
            return later
        if self._state == RUN or (self._state == CLOSE and (self._queue or self._inflight or self._feeders
                                                             or self._big_waiting)):
            assert self._sup is not None
            try:
                self._pids[slot] = self._sup.spawn(slot)
                self._spawn_failures = self._outside_spawn_failures = 0
            except Exception as exc:
                print(f"shmipc.Pool: could not start a replacement worker: {exc}", file=sys.stderr)
                if getattr(exc, "killed_from_outside", False):
                    self._put_off(slot)
                    return later
                self._respawn_at[slot] = 0.0        # tried again at the next poll
                self._spawn_failures += 1
                if not self._pids and self._spawn_failures >= MAX_SPAWN_FAILURES:
                    # no worker left and none could start, time after time (each
                    # time with fresh zygotes): fail everything rather than let
                    # callers wait forever
                    self._spawn_failures = 0
                    later += self._trip(f"the pool lost all its workers and cannot start new ones ({exc})")
        return later

    def _put_off(self, slot: int) -> None:
        """A worker start failed only because the zygotes (or the fork
        server) were killed or stopped from outside (or too slow): that says
        nothing about whether workers can start, so it never breaks the pool
        (as StartupGuard treats workers killed while starting); tried again
        after a back-off, so an attack costs few forks."""
        self._outside_spawn_failures += 1
        self._respawn_at[slot] = time.monotonic() + \
            doubled(SPAWN_RETRY_S, SPAWN_RETRY_MAX_S, self._outside_spawn_failures - 1)

    def _lost_results(self, now: float) -> list:
        """Tasks whose task or result record was lost in shared memory (a
        record damaged, forged over, skipped, or dropped by the ring as
        corrupt), which would otherwise be waited for for ever. Called when
        the parent has just found the result ring empty; lock held. A slot
        is suspect when
        * its W_DONE task is still in flight: the worker put every record of
          it into the result ring (before writing W_DONE), the parent has
          none: fail it and the tasks sent to that worker before it; or
        * it is READY (not running a task), its task ring is empty and tasks
          sent to it after its W_DONE task are in flight: a worker marks a
          task BUSY before the ring lets its record go, so none of them is
          on its way: fail them all.
        Either only once it has stayed so for LOST_RESULT_S (a record may be
        on its way; the words are read without a lock)."""
        later: list = []
        words = self._slots.words
        for slot, pid in list(self._pids.items()):
            base = slot * SLOT_WORDS
            done = words[base + W_DONE]
            suspect: tuple | None = None
            if words[base + W_PID] == pid and self._assigned[slot]:
                task = self._inflight.get(done)
                if task is not None and task.slot == slot:
                    suspect = (done, True)
                elif words[base + W_STATE] == READY and _unread_bytes(self._tasks[slot]) == 0:
                    suspect = (self._assigned[slot][-1], False)
            if suspect is None:
                self._done_seen.pop(slot, None)
                continue
            seen = self._done_seen.get(slot)
            if seen is None or seen[0] != suspect:
                self._done_seen[slot] = (suspect, now)      # look again later
            elif now - seen[1] >= LOST_RESULT_S:
                del self._done_seen[slot]
                upto, result_lost = suspect
                if result_lost:
                    why = f"its worker (pid {pid}) said it was done {now - seen[1]:.1f} s ago and " \
                          f"the result ring is empty"
                else:
                    why = f"its worker (pid {pid}) has waited for tasks for {now - seen[1]:.1f} s " \
                          f"with its task ring empty (its last task done: {done})"
                later += self._fail_lost(slot, upto, True, why)
        return later

    def _fail_lost(self, slot: int, upto: int, inclusive: bool, why: str) -> list:
        """Fail the tasks in flight on `slot` sent before task `upto` (and it
        too if `inclusive`): no result came for them although `why`. Lock held."""
        later: list = []
        for seq in list(self._assigned[slot]):
            if seq == upto and not inclusive:
                break
            task = self._inflight.get(seq)
            if task is not None and task.slot == slot:
                bad_record = self._bad_records.get(seq)
                self._settle(task)
                task.pieces = None
                later += task.job._deliver(task, False, self._outcomes.bad_task(task, bad_record)
                                           if bad_record else CorruptMessage(
                    f"no result came for {task.describe()}, although {why}: its task or result "
                    f"record was lost (damaged in shared memory)"))
            if seq == upto:
                break
        return later

    def _slot(self, slot: int) -> tuple[int, int, int]:
        """(pid, state, seq) of a worker's slot record (see shmipc._slots). Lock held."""
        assert self._slots is not None
        words, base = self._slots.words, slot * SLOT_WORDS
        return words[base + W_PID], words[base + W_STATE], words[base + W_SEQ]

    def busy_workers(self) -> dict[int, int]:
        """{slot: pid} of the live workers running a task right now (as
        their slots in shared memory say; for tests, examples and tools)."""
        with self._lock:
            if self._resources_released:
                return {}
            busy = {}
            for slot, pid in self._pids.items():
                wpid, state, _seq = self._slot(slot)
                if wpid == pid and state == BUSY:
                    busy[slot] = pid
            return busy
