"""The engine behind Pool and ProcessPoolExecutor: workers, rings, bookkeeping.

* one arena per pool holds a task ring per worker (parent -> worker), one
  result ring (workers -> parent) and a *slot table*: each worker writes the task it is about to run into its slot, so
  when it dies the parent knows exactly which task it held (and that the
  ones queued behind it in its own ring never ran); a big-message ring each
  way, for the rare value too large for the others (announced by a small
  stub), lives in memory of its own, mapped only while used, and an idle
  pool gives its rings' pages back (see :mod:`shmipc._footprint`);
* one bookkeeping thread in the parent reads results, hands out tasks (a
  few queued per worker, more for short tasks: see _CREDIT_*), runs
  callbacks, notices worker exits and starts replacements; imap jobs read
  their input from a feeder thread of their own (shmipc.pool._Feeder);
* workers are started by :class:`shmipc._workers.Supervisor`: under fork, by
  a single-threaded helper (the zygote) forked when the pool is made, with
  the threads of other pools paused for that moment, so no fork happens
  while shmipc threads run; no helper is a single point of failure (a lost
  zygote is replaced, its workers live on);
* chunks too large for a message are cut into pieces that fit; ``range``
  inputs travel as range slices;
* each task and result is encoded on its own inside its record by
  :mod:`shmipc._wire` (the wire format shared with the Pipeline: large
  bytes and arrays out of band, written once straight into the ring), so
  one that does not pickle or unpickle fails only its own task; the
  records are described in :mod:`shmipc._poolworker`, the worker side.
"""
from __future__ import annotations

import atexit
import collections
import functools
import itertools
import os
import queue
import signal
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Callable, Deque, Iterable

if TYPE_CHECKING:
    from shmipc._tasks import _Feeder

from shmipc._engine_exits import UNDECODABLE_MAX, _WorkerExits
from shmipc._engine_dispatch import _CREDIT_MIN, _Dispatch
from shmipc._footprint import BigRings, Footprint
from shmipc._proc import give_memory_back, steady_memory
from shmipc._poolworker import (K_CALL, SLOT_WORDS, R_BAD_TASK, R_BIG, R_OK, R_RAISED, R_UNDECODABLE,
                                R_UNENCODABLE, _worker_main)
from shmipc._slots import SlotTable
from shmipc._runtime import StartupGuard, check_retries
from shmipc._tasks import (MaybeEncodingError, Outcomes, RemoteTraceback, _job_counter,  # noqa: F401 (re-exported)
                           _run_callback, _Task)
from shmipc._waiting import BOOKKEEPING_S as _POLL
from shmipc._waiting import FORK_PAUSE_S
from shmipc._wire_records import read_result_record
from shmipc._workers import Supervisor, mark_thread_long_lived, register_pausable, unmark_thread_long_lived
from shmipc.arena import MAX_REGIONS, Arena
from shmipc.errors import CorruptArena, CorruptMessage, RingClosed, WorkerLost


# Pool states, as strings like CPython's pool.py
INIT = "INIT"
RUN = "RUN"
CLOSE = "CLOSE"
TERMINATE = "TERMINATE"

_MAX_WORKERS = MAX_REGIONS - 4        # a task ring each, plus the result ring, big rings, slot table
# Small rings: a pool's memory follows its traffic (see shmipc._footprint).
# A map chunk larger than a message is cut into pieces that fit, a result
# list too; a single value too large goes through one "big" ring per
# direction (up to half its capacity), in memory of its own that is mapped
# only while used.
_TASK_RING = 4 << 20                  # per worker: messages up to 2 MiB
_RESULT_RING = 4 << 20                # shared: messages up to 2 MiB (it is never punched: see _footprint)
_BIG_RING = 256 << 20
_live_pools: "weakref.WeakSet[_Engine]" = weakref.WeakSet()
_shutdown_lock = threading.Lock()


class _Engine(_Dispatch, _WorkerExits):
    """Workers, rings and the bookkeeping thread behind Pool and ProcessPoolExecutor.

    Invariants (under self._lock):
      * every task is in exactly one place: self._queue (not yet sent),
        self._big_waiting (too large for a ring message, waiting for the
        big ring to be free), or self._inflight[seq] with task.slot set
        (sent to that worker's ring);
        it leaves _inflight when its last result piece arrives, when it is
        failed, or when its worker died (then it is re-queued, or failed if
        it was the one running and has no tries left);
      * self._outstanding[slot] == number of in-flight tasks sent to slot;
        at most self._credit[slot] + 1 (and never past the worker's maxtasks);
      * a worker's exit is handled only after the result ring was drained,
        so results it committed before dying are never mistaken for losses.
    """

    _state = INIT
    _resources_released = False
    _broken_error: type = RuntimeError     # what broken-pool failures raise (the executor: BrokenProcessPool)
    _outcomes = Outcomes()                  # how results look (see shmipc._tasks.Outcomes)
    _lost_error: type = WorkerLost         # a task's worker died (the executor: also a BrokenProcessPool)
    _broken = ""                # why the pool cannot run tasks any more (no workers can start)
    _arena: Arena | None = None
    _slots: SlotTable | None = None
    _big: BigRings | None = None
    _sup: Supervisor | None = None
    _thread: threading.Thread | None = None

    def __init__(self, processes: int | None, initializer: Callable | None, initargs: Iterable,
                 maxtasks: int | None, context: Any, retries: int, name: str,
                 task_ring: int = _TASK_RING, result_ring: int = _RESULT_RING, *,
                 catch_base: bool = False, broken_error: type = RuntimeError,
                 lost_error: type = WorkerLost, remote_traceback: type = RemoteTraceback,
                 wrap_encoding_errors: bool = True, undecodable_error: Callable | None = None,
                 finish_at_exit: bool = False) -> None:
        if processes is None:
            processes = min(os.cpu_count() or 1, _MAX_WORKERS)
        if not isinstance(processes, int) or isinstance(processes, bool):
            raise TypeError(f"processes must be an int or None, not {type(processes).__name__}")
        if processes < 1:
            raise ValueError(f"Number of processes must be at least 1, got {processes}")
        if processes > _MAX_WORKERS:
            raise ValueError(f"processes={processes}: a shmipc pool has at most {_MAX_WORKERS} workers")
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
        if maxtasks is not None and (not isinstance(maxtasks, int) or isinstance(maxtasks, bool)
                                     or maxtasks < 1):
            raise ValueError(f"maxtasksperchild must be a positive int or None, got {maxtasks!r}")
        check_retries(retries)
        self._owner_pid = os.getpid()
        # how failures look: Pool as multiprocessing, the executor as concurrent.futures
        self._broken_error = broken_error
        self._lost_error = lost_error
        # a value that does not cross: Pool raises MaybeEncodingError (as
        # multiprocessing), the executor the pickling error itself (as concurrent.futures)
        # (the executor: an undecodable call's error is also BrokenProcessPool)
        self._outcomes = Outcomes(remote_traceback, wrap_encoding_errors, undecodable_error)
        # at interpreter exit: finish what was submitted (concurrent.futures)
        # or stop at once (multiprocessing.Pool's finalizer terminates)
        self._finish_at_exit = finish_at_exit
        self._processes = processes
        self._maxtasks = maxtasks
        self._retries = retries
        self._lock = threading.RLock()
        self._queue: Deque[Any] = collections.deque()      # _Task, or an iterator of _Tasks
        self._inflight: dict[int, _Task] = {}
        self._outstanding = [0] * processes
        self._credit = [_CREDIT_MIN] * processes
        self._interval = [0.01] * processes                 # EWMA of seconds between completions
        self._last_done = [0.0] * processes
        self._sent_to = [0] * processes                     # tasks sent to the slot's current worker
        self._assigned: list[Deque[int]] = [collections.deque() for _ in range(processes)]
        self._stopping = [False] * processes                # a stop message was sent
        self._seq = itertools.count(1)
        self._feeders: set = set()                          # live _Feeder threads
        self._big_waiting: Deque[_Task] = collections.deque()  # too large, waiting for the big ring
        self._big_seq = 0                                   # the task last sent through the big ring
        self._big_slot = -1
        self._big_stash: dict[tuple[int, int], tuple] = {}  # big results read ahead of their stub
        self._done_seen: dict[int, tuple[tuple[int, bool], float]] = {}  # slot -> (suspect, when first seen): _lost_results
        self._bad_records: dict[int, tuple] = {}    # seq -> why a task record in its ring did not decode
        self._startup = StartupGuard()                      # workers dying before they are ready
        self._retry_at = 0.0                                # broken: when a submit may try again
        self._respawn_at: dict[int, float] = {}             # empty slot -> when to start its worker
        self._spawn_failures = 0                            # consecutive spawns that failed
        self._outside_spawn_failures = 0                    # ... of which the zygotes were killed from outside
        self.worker_deaths = 0                              # statistics
        self.tasks_retried = 0
        self.tasks_lost = 0
        self.rings_remade = 0                               # task rings laid out afresh after damage
        self._bad_results = 0                               # result records in a row that did not decode
        # the parent builds and drops every map's result lists: keep their
        # pages (until the pool is idle: see _step) instead of faulting them in
        steady_memory(parent=True)
        self._arena = Arena(Arena.size_for(rings=[result_ring] + [task_ring] * processes,
                                           blocks=[SlotTable.nbytes(processes, SLOT_WORDS)]))
        try:
            self._results = self._arena.ring(result_ring, name="results", producers="many",
                                             consumers="one")
            self._tasks = [self._arena.ring(task_ring, name=f"tasks{i}", producers="one",
                                            consumers="many") for i in range(processes)]
            self._big = BigRings(_BIG_RING)
            self._big_tasks, self._big_results = self._big.tasks, self._big.results
            self._footprint = Footprint(self._arena, self._tasks, self._big)
            self._slots = SlotTable(self._arena.block(SlotTable.nbytes(processes, SLOT_WORDS), name="slots"),
                                    SLOT_WORDS)
            # the zygote posts a None into the result ring after each worker exit,
            # so the bookkeeping thread handles it at once instead of at its next poll
            self._sup = Supervisor(_worker_main, (self._arena, initializer, tuple(initargs), maxtasks,
                                                  os.getpid(), catch_base, self._big), context=context, name=name,
                                   wake=functools.partial(self._results.put_nowait, None))
            self._sup.start(range(processes))
            self._pids = self._sup.pids()        # slot -> pid of the live workers
            for slot in range(processes):
                if slot not in self._pids:      # its zygotes were killed from outside
                    self._put_off(slot)
        except BaseException:
            self._shutdown_resources()
            raise
        self._state = RUN
        _live_pools.add(self)
        # started last: every fork (the zygote's) has happened by now
        self._name = name
        self._pause_requested = False
        self._loop_done = False             # the loop ended for good (finished or terminated)
        self._start_thread()
        register_pausable(self)

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"{self._name}-bookkeeping", daemon=True)
        self._thread.start()

    def _pause_for_fork(self) -> bool:
        """Stop the bookkeeping thread while another pool forks its zygote
        (see shmipc._workers.register_pausable). Results wait in the ring."""
        thread = self._thread
        if (thread is None or not thread.is_alive() or thread is threading.current_thread()
                or os.getpid() != self._owner_pid):
            return False
        self._pause_requested = True
        self._wake()
        thread.join(2.0)
        if thread.is_alive():           # busy in a long callback: fork anyway, it is idle in C
            self._pause_requested = False
            return False
        return True

    def _resume_after_fork(self) -> None:
        self._pause_requested = False
        if not self._loop_done and self._state != TERMINATE:
            self._start_thread()

    # ------------------------------------------------------------ submitting
    def _check_running(self) -> None:
        if self._state != RUN:
            raise ValueError("Pool not running")
        if self._broken:
            if time.monotonic() < self._retry_at:
                raise self._broken_error(self._broken)
            # workers kept dying at start a while ago: try again (the
            # executor checks `broken` before it submits, so it stays
            # broken for good, as concurrent.futures)
            self._broken = ""
            for slot in range(self._processes):
                if slot not in self._pids:
                    self._respawn_at[slot] = 0.0
            self._wake()
        if os.getpid() != self._owner_pid:
            raise ValueError("this pool belongs to the process that created it "
                             f"(pid {self._owner_pid}), not to this forked copy")

    def submit_tasks(self, tasks: Any) -> None:
        """Queue a _Task or an iterator of _Tasks (a finite one: it is pulled
        under the engine lock) and send what fits.

        Raises:
            ValueError: the pool is not running.
        """
        with self._lock:
            self._check_running()
            self._queue.append(tasks)
            later = self._dispatch()
        for callback in later:
            _run_callback(callback)

    def start_feeder(self, feeder: "_Feeder") -> None:
        """Start an imap job's input reader (see _Feeder)."""
        with self._lock:
            self._check_running()
            self._feeders.add(feeder)
        feeder.start()

    def enqueue(self, task: _Task) -> bool:
        """Queue a task from a feeder (allowed after close(), as the job was
        accepted before). False if the pool was terminated."""
        with self._lock:
            if self._state == TERMINATE or self._broken:
                return False
            self._queue.append(task)
            later = self._dispatch()
        for callback in later:
            _run_callback(callback)
        return True

    def feeder_done(self, feeder: "_Feeder") -> None:
        with self._lock:
            self._feeders.discard(feeder)
        self._wake()

    def _wake(self) -> None:
        """Wake the bookkeeping thread now (it also wakes every _POLL seconds)."""
        try:
            self._results.put_nowait(None)
        except Exception:
            pass

    # ------------------------------------------------------------ bookkeeping thread
    @property
    def _live(self) -> dict[int, int]:
        return self._pids

    def _run(self) -> None:
        """The bookkeeping thread: it outlives every worker it starts (close()
        ends it only after they all exited; terminate() kills them first)."""
        mark_thread_long_lived()
        try:
            self._loop()
        finally:
            unmark_thread_long_lived()
            if not self._pause_requested:
                self._loop_done = True

    def _loop(self) -> None:
        """Results, worker exits, dispatch, closing."""
        assert self._sup is not None
        self._last_poll = 0.0
        while not self._pause_requested:
            try:
                msgs = self._results.get_many(256, timeout=_POLL)
            except queue.Empty:
                msgs = []
            except RingClosed:                  # closed under us: terminate() is running
                return
            except CorruptArena as exc:
                if not isinstance(exc, CorruptMessage) or self._undecodable_results(exc):
                    self._results_damaged(exc)  # the ring gives nothing up any more
                    return
                msgs = []
            except Exception as exc:            # records that do not decode (corrupt): consumed
                print(f"shmipc.Pool: a result record was lost: {exc!r}", file=sys.stderr)
                msgs = []
            else:
                self._bad_results = 0
            # (a step of its own, so that no result stays referenced here while idle)
            outcome = self._step(msgs)
            del msgs
            if outcome is None:
                return
            if outcome:
                # every worker exited: release the arena and the zygote now, so
                # that close() without join() (or shutdown(wait=False)) leaks nothing
                self._shutdown_resources()
                return

    def _undecodable_results(self, exc: BaseException) -> bool:
        """A result record that does not decode was consumed: report it. True
        once too many come in a row (the ring yields nothing else)."""
        print(f"shmipc.Pool: a result record was lost: {exc!r}", file=sys.stderr)
        self._bad_results += 1
        return self._bad_results > UNDECODABLE_MAX

    def _results_damaged(self, exc: BaseException) -> None:
        """The result ring is damaged in shared memory (its header: every read
        raises): no result can come back, and the ring is shared by every
        worker and the zygote, so it cannot be laid out afresh while they
        run. Fail every pending task with CorruptArena, make later submits
        raise it, and stop the workers (before, the bookkeeping thread spun
        on the error and every call hung)."""
        why = (f"the pool's result ring was damaged in shared memory ({exc}): the pool stopped, "
               f"every task in flight or queued failed; make a new pool")
        print(f"shmipc.Pool: {why}", file=sys.stderr)
        with self._lock:
            later = self._break(why, float("inf"), CorruptArena(why))
        for callback in later:
            _run_callback(callback)
        if self._sup is not None:
            self._sup.stop(0.5)
        self._shutdown_resources()

    def _step(self, msgs: list) -> bool | None:
        """Handle a batch of results, worker exits, dispatch. Returns None if
        the pool was terminated, True once closed and finished."""
        later: list = []
        with self._lock:
            if self._state == TERMINATE:
                return None
            for msg in msgs:
                if msg is not None:
                    later += self._on_result_guarded(msg)
            now = time.monotonic()
            if not msgs or now - self._last_poll > _POLL or None in msgs:
                self._last_poll = now
                exits = self._sup.poll()
                if exits:
                    later += self._drain_results()
                    for ev in exits:
                        later += self._on_exit(ev)
                if self._startup.deaths or self._startup.killed:
                    self._note_ready_workers()
                if not msgs and self._inflight:
                    later += self._lost_results(now)        # (the result ring was just found empty)
                for slot, at in sorted(self._respawn_at.items()):
                    if at <= now and not self._broken and slot not in self._pids:
                        later += self._respawn(slot)
            later += self._dispatch()
            if self._footprint.tick(now, not (self._inflight or self._queue or self._big_waiting)):
                later.append(give_memory_back)      # (idle: what steady_memory kept goes back too)
            finished = self._state == CLOSE and self._maybe_finish()
        msgs.clear()
        while later:
            _run_callback(later.pop(0))
        return finished

    def _drain_results(self) -> list:
        later: list = []
        while True:
            try:
                msgs = self._results.get_many(256, block=False)
            except queue.Empty:
                return later
            except RingClosed:
                return later
            except Exception:                   # corrupt records: consumed
                continue
            for msg in msgs:
                if msg is not None:
                    later += self._on_result_guarded(msg)

    def _on_result_guarded(self, msg: Any) -> list:
        """_on_result, which must never end the bookkeeping thread (every
        pending result would wait for ever): whatever it raises fails the
        task the record names, if one is in flight, else is reported."""
        try:
            return self._on_result(msg)
        except Exception as exc:
            return self._fail_named(msg[0] if type(msg) is tuple and msg else None, exc)

    def _fail_named(self, seq: Any, exc: Exception) -> list:
        """A result record that could not be used fails the task it names,
        if that one is in flight (rather than leaving it to wait for ever);
        otherwise it is reported as lost. Lock held."""
        task = self._inflight.get(seq) if type(seq) is int else None
        if task is None:
            print(f"shmipc.Pool: a result record was lost: {exc!r}", file=sys.stderr)
            return []
        task.pieces = None
        self._settle(task)
        return task.job._deliver(task, False, exc)

    def _on_result(self, msg: tuple | bytes) -> list:
        """One result record (lock held). Every part of it is untrusted (it
        was read from shared memory): a malformed record fails the task it
        names with CorruptMessage, or is dropped when it names none in flight."""
        if type(msg) is bytes:                  # a compact result record (see shmipc._wire)
            try:
                msg = read_result_record(msg, R_OK)
            except CorruptMessage as exc:
                # damaged in shared memory: its task (if the header still names
                # one in flight) fails with the error rather than waiting for ever
                return self._fail_named(getattr(exc, "seq", None), exc)
        try:
            seq, status, offset, last = _result_head(msg)
        except CorruptMessage as exc:
            return self._fail_named(getattr(exc, "seq", None), exc)
        if status == R_BAD_TASK:
            return self._on_bad_task(offset, msg[6])
        if status is R_BIG:                     # a stub: the record waits in the big ring
            msg = self._fetch_big(seq, offset)
            if msg is not None and (_result_head(msg)[1] in (R_BIG, R_BAD_TASK) or msg[0] != seq):
                raise CorruptMessage(f"the big result record for task {seq} is a stub or names another task")
        task = self._inflight.get(seq)
        if task is None:
            return []           # a late piece of a task already settled
        assigned = self._assigned[task.slot] if 0 <= task.slot < self._processes else ()
        # a worker runs its tasks in the order sent and puts all of a task's
        # records before it takes the next: any task sent to it before this one
        # still in flight never will be
        lost = self._fail_lost(task.slot, seq, False, "its worker has sent a later task's result") \
            if assigned and assigned[0] != seq else []
        if msg is None:
            ok, value, last = False, RuntimeError(f"task {seq}: its large result never arrived"), True
        else:
            ok, value = self._outcomes.decode(task, msg)
        del msg
        if ok and task.kind != K_CALL:
            # a chunk's results: lists that tile its items exactly
            problem = _piece_problem(task, offset, value)
            if problem:
                ok, value, last = False, CorruptMessage(f"the result of {task.describe()} {problem}"), True
        if not last and ok:
            if task.pieces is None:
                task.pieces = []
            task.pieces.append((offset, value))
            return lost
        if ok and task.kind != K_CALL:
            pieces = sorted((task.pieces or []) + [(offset, value)], key=lambda p: p[0])
            problem = _tiling_problem(pieces, len(task.payload))
            if problem:
                ok, value = False, CorruptMessage(f"the result of {task.describe()} {problem}")
            elif len(pieces) > 1:
                value = [v for _, piece in pieces for v in piece]
            del pieces
        task.pieces = None
        self._settle(task)
        return lost + task.job._deliver(task, ok, value)

    def _on_bad_task(self, slot: int, info: tuple) -> list:
        """A record in the task ring of `slot` did not decode in its worker.
        It was the record of the oldest task sent there and not settled (a
        worker takes them in order, and its earlier results were read before
        this record), or one forged in that belongs to no task. So that task
        is not failed now: if its result comes, the bad record was not its
        own; if it never does (its worker sends a later task's result, or
        waits for work with its ring empty: see _lost_results), it fails with
        this error. Lock held."""
        for seq in self._assigned[slot] if 0 <= slot < self._processes else ():
            if seq in self._inflight:
                self._bad_records[seq] = info
                break
        return []

    def _maybe_finish(self) -> bool:
        """CLOSE: once all work is done, tell workers to stop; True when they all exited."""
        if self._queue or self._inflight or self._feeders or self._big_waiting:
            return False
        for slot in list(self._pids):
            if not self._stopping[slot]:
                try:
                    self._tasks[slot].put_nowait(None)
                    self._stopping[slot] = True
                except queue.Full:
                    pass
        return not self._pids

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        with self._lock:
            if self._state == RUN:
                self._state = CLOSE
        self._wake()

    def join(self, timeout: float | None = None) -> None:
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state == INIT:
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            thread = self._thread
            if thread is threading.current_thread():
                # join() in a callback: the bookkeeping thread cannot wait for
                # itself; it finishes the pending work and releases everything
                # itself once the workers exited (see _loop)
                return
            if thread is None:
                break
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
            if thread.is_alive():
                return                          # timed out
            if self._loop_done or self._state == TERMINATE:
                break
            time.sleep(FORK_PAUSE_S)            # paused for another pool's fork: it comes back
        if self._state == CLOSE:
            self._shutdown_resources()

    def terminate(self) -> None:
        if os.getpid() != self._owner_pid:
            return                  # a forked copy of the pool owns nothing
        with self._lock:
            if self._state == TERMINATE:
                return
            self._state = TERMINATE
        if self._sup is not None:
            self._sup.stop(0.5)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        self._fail_everything(ValueError("the pool was terminated before this task finished"))
        self._shutdown_resources()

    def worker_pids(self) -> dict[int, int]:
        """{slot: pid} of the live workers."""
        with self._lock:
            return dict(self._pids)

    @property
    def state(self) -> str:
        """INIT, RUN, CLOSE or TERMINATE."""
        return self._state

    @property
    def owner_pid(self) -> int:
        """The process that made the pool (a forked copy owns nothing)."""
        return self._owner_pid

    @property
    def processes(self) -> int:
        return self._processes

    @property
    def start_method(self) -> str:
        assert self._sup is not None
        return self._sup.start_method

    @property
    def broken(self) -> str:
        """Why the pool cannot run tasks any more ("" while it can)."""
        return self._broken

    def for_each_queued(self, fn: Callable[[_Task], Any]) -> None:
        """Call fn(task) for every task not yet sent to a worker (under the
        lock: fn must be quick and must not call the engine)."""
        with self._lock:
            pending: list[_Task] = []
            for head in self._queue:
                pending.extend([head] if isinstance(head, _Task) else list(head))
            # (iterators were consumed: queue the tasks themselves instead)
            self._queue.clear()
            self._queue.extend(pending)
            for task in list(pending) + list(self._big_waiting):
                fn(task)

    def kill_workers(self) -> None:
        """SIGKILL every worker now (terminate() then cleans up)."""
        if self._sup is not None:
            for slot in list(self._sup.pids()):
                self._sup.kill(slot, signal.SIGKILL)

    def _fail_everything(self, exc: BaseException) -> None:
        with self._lock:
            later = self._fail_all_locked(exc)
        for callback in later:
            _run_callback(callback)

    def _fail_all_locked(self, exc: BaseException) -> list:
        """Fail every task in flight or queued, and every imap job still reading
        its input, with `exc`. Lock held; returns the callbacks to run."""
        later: list = []
        for task in list(self._inflight.values()):
            self._settle(task)
            later += task.job._deliver(task, False, exc)
        self._queue.extendleft(reversed(self._big_waiting))
        self._big_waiting.clear()
        while self._queue:
            head = self._queue.popleft()
            tasks: Iterable[_Task] = [head] if isinstance(head, _Task) else head
            for task in tasks:
                if task.started or task.job._start_task(task):
                    later += task.job._deliver(task, False, exc)
        for feeder in list(self._feeders):
            later.append(lambda job=feeder.job: job.fail(exc))
        return later

    def _shutdown_resources(self) -> None:
        """Stop the workers and the zygote, close the arena. Once (several threads may race here)."""
        with _shutdown_lock:
            if self._resources_released:
                return
            self._resources_released = True
        if self._sup is not None:
            self._sup.stop(0.5)
        if self._slots is not None:
            with self._lock:
                self._slots.release()       # our view of the arena: then it can be unmapped
        if self._arena is not None:
            self._arena.close()
        if self._big is not None:
            self._big.close()
        _live_pools.discard(self)

    def statistics(self) -> dict[str, int]:
        """Counters: worker deaths, tasks lost with a worker, tasks retried, in flight, queued."""
        with self._lock:
            return {"worker_deaths": self.worker_deaths, "tasks_lost": self.tasks_lost,
                    "tasks_retried": self.tasks_retried, "in_flight": len(self._inflight),
                    "queued": len(self._queue) + len(self._big_waiting), "processes": self._processes}

    def __del__(self) -> None:
        if self._state in (RUN, CLOSE):
            try:
                self.terminate()
            except Exception:
                pass


@atexit.register
def _terminate_live_pools() -> None:
    for engine in list(_live_pools):
        try:
            if engine._finish_at_exit and engine._state in (RUN, CLOSE) \
                    and os.getpid() == engine._owner_pid and not engine._broken:
                engine.close()
                engine.join()
            engine.terminate()
        except Exception:
            pass


_STATUSES = (R_OK, R_RAISED, R_UNENCODABLE, R_BAD_TASK, R_UNDECODABLE, R_BIG)


def _result_head(msg: Any) -> tuple[int, Any, int, bool]:
    """``(seq, status, offset, last)`` of a result record, its shape checked
    (a forged record must not end the bookkeeping thread).

    Raises:
        CorruptMessage: not a well-formed record; ``seq`` names its task when
            the record still says which one.
    """
    seq = msg[0] if type(msg) is tuple and msg and type(msg[0]) is int else None
    problem = None
    if type(msg) is not tuple or len(msg) != 7:
        problem = f"a result record is {type(msg).__name__} of length {_length(msg)}, not a tuple of 7"
    elif seq is None:
        problem = f"a result record's sequence number is {type(msg[0]).__name__}, not int"
    elif msg[1] not in _STATUSES or type(msg[1]) not in (int, type(None)):
        problem = f"a result record's status is {msg[1]!r:.40}"
    elif type(msg[2]) is not int or msg[2] < 0:
        problem = f"a result record's offset is {msg[2]!r:.40}"
    elif type(msg[3]) not in (bool, int) or msg[3] not in (0, 1):
        problem = f"a result record's last flag is {msg[3]!r:.40}"
    elif msg[1] not in (R_OK, R_BIG) and not (
            type(msg[6]) is tuple and len(msg[6]) == 2 and all(type(x) in (str, type(None)) for x in msg[6])):
        problem = f"a result record's error info is {type(msg[6]).__name__}, not (traceback, description)"
    if problem:
        exc = CorruptMessage(problem)
        exc.seq = seq                   # type: ignore[attr-defined]
        raise exc
    return msg[0], msg[1], msg[2], bool(msg[3])


def _length(obj: Any) -> str:
    try:
        return str(len(obj))
    except Exception:
        return "-"


def _piece_problem(task: Any, offset: int, value: Any) -> str | None:
    """Why `value`, a chunk's result (or a piece of it at `offset`), cannot
    be one: not a list, or past the chunk's end (None: it can)."""
    n = len(task.payload)
    if type(value) is not list:
        return f"arrived as {type(value).__name__}, not a list"
    have = sum(len(piece) for _, piece in task.pieces or ())
    if offset + len(value) > n or have + len(value) > n:
        return f"has {have + len(value)} items (a piece of {len(value)} at offset {offset}) for a chunk of {n}"
    return None


def _tiling_problem(pieces: list, n: int) -> str | None:
    """Why the pieces (offset, list), sorted, do not tile a chunk of `n`
    items exactly (None: they do)."""
    at = 0
    for offset, piece in pieces:
        if offset != at:
            return f"arrived in pieces that do not follow each other (offset {offset}, expected {at})"
        at += len(piece)
    if at != n:
        return f"has {at} item{'s' if at != 1 else ''} for a chunk of {n}"
    return None
