"""How the pool engine hands tasks to workers (a mixin of
:class:`shmipc._engine._Engine`, whose invariants it keeps; every method
runs with the engine's lock held): which worker gets the next task (the one
with the most credit left), how a task is encoded into its ring (the wire
format is :mod:`shmipc._wire`), a chunk too large for a message cut into
pieces, a single task too large sent through the big ring, and the credit
each worker earns from how fast it completes tasks.
"""
from __future__ import annotations

import operator
import queue
import sys
import time
from typing import Any

from shmipc._poolworker import K_BIG, K_CALL
from shmipc._tasks import _Task
from shmipc._waiting import BIG_MESSAGE_WAIT_S
from shmipc._wire import out_of_band_bytes, pack_task
from shmipc._wire_records import task_record
from shmipc.errors import MessageTooLarge, RingClosed

# How many tasks may wait in a worker's ring behind the one it runs: enough
# to cover the parent's reaction time (a thread wake-up, ~0.1 ms) for short
# tasks, few for long ones so that work stays balanced between workers. Each
# slot's credit follows the time between its completions (EWMA).
_CREDIT_MIN = 2
_CREDIT_MAX = 64
_CREDIT_HORIZON = 0.004               # seconds of work to keep queued per worker


class _Dispatch:
    """The engine's scheduling (see the module docstring)."""

    def _send_big(self, slot: int, task: _Task, exc: MessageTooLarge, data: Any,
                  meta: Any) -> bool | None:
        """Send one task too large for a worker's ring: a stub in the worker's
        ring, the task in the big ring. One at a time: a worker that reads a
        stub takes the big ring's only message. Lock held. True if sent, None
        to retry later, False if it can never fit."""
        big = self._big_tasks
        if exc.size > big.max_message_size:
            return False
        if big.qsize():
            return None                         # the previous big task was not taken yet
        try:
            self._tasks[slot].put_nowait((task.seq, K_BIG, None, None))
        except queue.Full:
            return None                         # (rare: a stub is tiny) tried again later
        big.put_nowait((task.seq, task.kind, data, meta))
        self._big_seq, self._big_slot = task.seq, slot
        return True

    def _fetch_big(self, seq: int, offset: int) -> tuple | None:
        """The big result record announced by a stub; those of others read on
        the way are kept for their own stubs. Lock held. None if it never came."""
        key = (seq, offset)
        deadline = time.monotonic() + BIG_MESSAGE_WAIT_S
        while key not in self._big_stash:
            try:
                record = self._big_results.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                return None
            except RingClosed:
                raise
            except Exception:                   # a corrupt record: consumed; look further
                continue
            self._big_stash[(record[0], record[2])] = record
        return self._big_stash.pop(key)

    def _free_slot(self, exclude: set[int]) -> int:
        best, best_load = -1, _CREDIT_MAX + 1
        for slot in range(self._processes):
            load = self._outstanding[slot]
            if load <= self._credit[slot] and load < best_load and not self._stopping[slot] \
                    and slot in self._live and slot not in exclude:
                if self._maxtasks is not None and self._sent_to[slot] >= self._maxtasks:
                    continue
                best, best_load = slot, load
        return best

    def _dispatch(self) -> list:
        """Send queued tasks to workers with credit left. Lock held. Returns
        callbacks to run after the lock is released."""
        later: list = []
        blocked: set[int] = set()           # slots whose ring is full for now
        if self._big_waiting and not self._big_tasks.qsize():
            self._queue.appendleft(self._big_waiting.popleft())
        while self._queue:
            slot = self._free_slot(blocked)
            if slot < 0:
                break
            head = self._queue[0]
            if isinstance(head, _Task):
                task = self._queue.popleft()
            else:
                try:
                    task = next(head)
                except StopIteration:
                    self._queue.popleft()
                    continue
                except Exception as exc:        # pragma: no cover (our own finite lists)
                    self._queue.popleft()
                    print(f"shmipc.Pool: a task source failed: {exc!r}", file=sys.stderr)
                    continue
                if operator.length_hint(head, 1) == 0:
                    # exhausted: drop it now, or the list behind it (and every
                    # task's arguments) stays referenced until the next dispatch
                    self._queue.popleft()
            if not task.started:
                if not task.job._start_task(task):
                    continue                    # cancelled (a future)
                task.started = True
            task.seq = next(self._seq)
            data = meta = None
            try:
                data, meta = task.wire or pack_task(task.func, task.payload, task.kind != K_CALL)
                ring = self._tasks[slot]
                if task.kind != K_CALL and len(task.payload) > 1:
                    # a chunk whose buffers alone exceed a message is cut at once:
                    # the ring would encode it first to find out (~1.4 us a buffer)
                    size = out_of_band_bytes(data, meta)
                    if size > ring.max_message_size:
                        raise MessageTooLarge(size, ring.max_message_size, ring.capacity)
                ring.put_nowait(task_record(task.seq, task.kind, data, meta))
            except queue.Full:
                task.wire = (data, meta)        # tried again as it is: encoded once
                self._queue.appendleft(task)
                blocked.add(slot)
                continue
            except MessageTooLarge as exc:
                n = len(task.payload) if task.kind != K_CALL else 1
                if n > 1:
                    # cut it into pieces that fit (with room to spare), keeping item order
                    pieces = min(n, -(-exc.size * 5 // (exc.limit * 4)))
                    step = -(-n // pieces)
                    parts = [_Task(task.job, task.index, task.start + i, task.kind, task.func,
                                   task.payload[i: i + step], task.tries_left)
                             for i in range(0, n, step)]
                    for part in parts:
                        part.started = task.started
                    task.job._split(task, parts)
                    self._queue.extendleft(reversed(parts))
                    continue
                sent = self._send_big(slot, task, exc, data, meta)
                if sent is None:                # the big ring is busy: later, others go first
                    self._big_waiting.append(task)
                    continue
                if not sent:
                    big = self._big_tasks
                    later += task.job._deliver(task, False, MessageTooLarge(
                        exc.size, big.max_message_size, big.capacity))
                    continue
            except BaseException as exc:        # pickling the task failed
                # (SystemExit or KeyboardInterrupt from a __reduce__ too: it
                # fails this task, whose get() raises it; in the bookkeeping
                # thread it used to end the thread, and every result then hung)
                later += task.job._deliver(task, False, exc)
                continue
            finally:
                del data, meta
            task.wire = None
            task.slot = slot
            self._inflight[task.seq] = task
            self._outstanding[slot] += 1
            self._sent_to[slot] += 1
            self._assigned[slot].append(task.seq)
        return later

    def _settle(self, task: _Task) -> None:
        del self._inflight[task.seq]
        if self._bad_records:
            self._bad_records.pop(task.seq, None)
        slot = task.slot
        self._outstanding[slot] -= 1
        now = time.monotonic()
        if self._last_done[slot]:
            interval = self._interval[slot] = 0.8 * self._interval[slot] + 0.2 * (now - self._last_done[slot])
            self._credit[slot] = max(_CREDIT_MIN, min(_CREDIT_MAX, int(_CREDIT_HORIZON / max(interval, 1e-6))))
        self._last_done[slot] = now
        try:
            self._assigned[slot].remove(task.seq)
        except ValueError:
            pass
