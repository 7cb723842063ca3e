"""The worker side of the pool engine, and the records both sides exchange
(their values are encoded by :mod:`shmipc._wire`).

What runs in each pool worker process (:class:`_WorkerLoop`): take tasks from
its own ring, run them, put results; mark in the shared slot table what it is
doing, so that the parent knows exactly which task a dead worker held. The
parent side (scheduling, bookkeeping, crash handling) is
:mod:`shmipc._engine`, which imports this module, never the reverse.
"""
from __future__ import annotations

import itertools
import os
import queue
import struct
import time
import traceback
from typing import Any, Callable

from shmipc._footprint import BigRings
from shmipc._proc import give_memory_back, steady_memory
from shmipc._wire import detach, pack, pack_items, pack_pickled, unpack_task
from shmipc._wire_records import read_task_record, result_record
from shmipc._runtime import GONE, next_message
from shmipc._slots import BUSY, EXITING, HEAD3, READY, STARTING
from shmipc._waiting import BIG_MESSAGE_WAIT_S
from shmipc.arena import Arena
from shmipc.errors import CorruptArena, CorruptMessage, MessageTooLarge, RingClosed

# task kinds: what a worker does with the payload
K_CALL = 0          # payload (args, kwargs): func(*args, **kwargs)
K_MAP = 1           # payload [x, ...]: [func(x), ...]
K_STARMAP = 2       # payload [args, ...]: [func(*args), ...]
K_BIG = 3           # a stub: the task itself waits in the "bigtasks" ring (see _Engine)
_ITEM_KINDS = (K_MAP, K_STARMAP)    # the kinds a compact task record may have (see shmipc._wire)

# One slot per worker in the slot table (shmipc._slots), written by the
# worker: state, the sequence number of the task it runs, and its pid in
# W_PID. Invariant: BUSY is written before the task's arguments are
# unpickled and cleared after its result was committed, so a worker that
# dies in another state never started a task still owed; STARTING until its
# initializer returned (every exit then is a start-up death); EXITING when it
# leaves on purpose (an orphan's exit code is unknown).
SLOT_WORDS = 8                        # one cache line per worker
W_PID = 2
# The last task whose every result record is in the result ring (0: none
# yet), written after them: a task its worker says is done whose result the
# parent never read was lost in shared memory (see _Engine._lost_results).
W_DONE = 3
_WORD = struct.Struct("=q")

_BIG_WAIT = BIG_MESSAGE_WAIT_S        # a reader waits this long for a big message announced by a stub
_UNDECODABLE_MAX = 10_000             # task records in a row that do not decode: the ring is not giving up records


# ---------------------------------------------------------------------- the records
# Every task and result travels as a small tuple whose value is encoded on
# its own by shmipc._wire (the one wire format for task data, shared with
# the Pipeline: large data out of band, written once straight into the ring):
#   task:   (seq, kind, data, meta)       _wire.pack_task(func, payload)
#   result: (seq, status, offset, last, data, meta, info)
# So a value that fails to unpickle (a class the reader cannot import, an
# exception whose __init__ takes other arguments, a __setstate__ that raises)
# fails only its own task: the reader still knows which task it was. A map
# chunk and an R_OK result whose value is a short in-band pickle travel as
# compact bytes instead (_wire_records.task_record / result_record: no pickling of
# the record itself) and are read back into these very tuples.
R_OK = 1            # data/meta encode the value
R_RAISED = 0        # data/meta encode the exception; info = (traceback text, repr)
R_UNENCODABLE = 2   # the value did not pickle: data/meta encode why; info = (traceback, repr of the value)
R_BAD_TASK = 3      # a task record did not decode in worker `offset`: fail its oldest task
R_UNDECODABLE = 4   # as R_RAISED, the exception unpickling the task's arguments raised in the worker
R_BIG = None        # a stub: the record waits in the big-results ring



def _format_tb(exc: BaseException) -> str:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f'\n"""\n{tb}"""'


def _safe_repr(value: Any, limit: int = 500) -> str:
    try:
        text = repr(value)
    except Exception as exc:        # a broken __repr__ must not hide the real error
        text = f"<{type(value).__name__} object (repr failed: {exc!r})>"
    return text if len(text) <= limit else text[:limit] + "..."


def _run_task(kind: int, func: Callable, payload: Any) -> Any:
    if kind == K_CALL:
        args, kwargs = payload
        return func(*args, **kwargs)
    if kind == K_MAP:
        return list(map(func, payload))
    return list(itertools.starmap(func, payload))


class _WorkerLoop:
    """What runs in each worker process: take tasks from its own ring, run
    them, put results, until told to stop, the pool's parent dies, or
    `maxtasks` tasks are done."""

    def __init__(self, slot: int, arena: Arena, maxtasks: int | None, parent_pid: int,
                 catch_base: bool, big: BigRings) -> None:
        self.slot = slot
        self.tasks = arena.ring(name=f"tasks{slot}")
        self.results = arena.ring(name="results")
        # mapped only while a big message moves (see shmipc._footprint)
        self.big = big
        self.big_tasks, self.big_results = big.tasks, big.results
        self.slots = arena.block(name="slots")          # the slot table's bytes (see mark)
        self.offset = slot * SLOT_WORDS * 8
        self.pid = os.getpid()
        self.maxtasks = maxtasks
        self.parent_pid = parent_pid
        # the executor delivers SystemExit & co. as the future's exception (as
        # concurrent.futures); the Pool lets them end the worker (as multiprocessing)
        self.catch: type = BaseException if catch_base else Exception
        self.kept = False           # work done since the last idle give-back (see take)
        self.undecodable = 0        # task records in a row that did not decode (see next_task)

    def mark(self, state: int, seq: int = 0) -> None:
        # state, seq and pid (W_STATE, W_SEQ, W_PID) in one store: the parent
        # reads a record only once its worker is gone (or for statistics)
        HEAD3.pack_into(self.slots, self.offset, state, seq, self.pid)

    def finished(self, seq: int) -> None:
        """Task `seq` is settled on this side (its records are in the result
        ring): W_DONE says so, then READY. In that order: a READY slot's
        W_DONE always names its last task (see _Engine._lost_results)."""
        _WORD.pack_into(self.slots, self.offset + W_DONE * 8, seq)
        self.mark(READY)

    def run(self) -> None:
        done = 0
        while self.maxtasks is None or done < self.maxtasks:
            msg = self.next_task()
            if msg is None:
                break
            if msg is _SKIP:
                continue
            seq, kind, data, meta = msg
            del msg
            # BUSY since take(), before unpickling: a crash in there (a C
            # extension's __setstate__) is this task's, not a reason to re-run
            # it elsewhere
            try:
                func, payload = unpack_task(data, meta)
            except Exception as exc:            # the arguments do not unpickle here
                del data, meta
                self.send_error(seq, exc, "the task's arguments could not be unpickled in the worker",
                                status=R_UNDECODABLE)
                self.finished(seq)
                done += 1
                continue
            del data, meta
            try:
                value, ok = _run_task(kind, func, payload), True
            except self.catch as exc:
                value, ok = exc, False
            del func, payload
            if ok:
                self.send_value(seq, value, kind)
            else:
                self.send_error(seq, value)
            del value
            self.finished(seq)
            done += 1
        self.mark(EXITING)

    def next_task(self) -> Any:
        """The next task tuple; _SKIP to look again; None to exit."""
        try:
            msg = next_message(self.take, self.parent_pid)
            if msg is GONE:                     # the parent died
                return None
        except (RingClosed, EOFError):          # closed, shut down, or the parent died
            return None
        except Exception as exc:
            # a record that does not decode is consumed: report it, take the
            # next. A damaged ring (its header: CorruptArena) gives nothing
            # up any more, nor does one that yields only garbage: report it
            # and exit, so that the parent lays the ring out afresh and
            # re-queues its tasks (_Engine._on_exit) instead of this worker
            # spinning on it
            self.results.put((0, R_BAD_TASK, self.slot, True, *pack(None),
                              (_format_tb(exc), _safe_repr(exc))))
            self.undecodable += 1
            if not isinstance(exc, CorruptMessage) and isinstance(exc, CorruptArena) \
                    or self.undecodable > _UNDECODABLE_MAX:
                return None
            return _SKIP
        self.undecodable = 0
        if msg is None:                         # the pool is closing
            return None
        if msg[1] != K_BIG:
            return msg
        big = self.take_big(msg[0])
        if big is None:
            self.send_error(msg[0], RuntimeError(
                f"task {msg[0]}: its data never arrived in the big-message ring"))
            self.finished(msg[0])
            return _SKIP
        return big

    def take(self, timeout: float) -> Any:
        """One task record, waiting up to `timeout`: taken as a view and copied
        out once, into the values' own buffers (a plain get copies the whole
        record first)."""
        try:
            with self.tasks.get_view(timeout=timeout) as view:
                if type(view) is memoryview:        # a compact record (see shmipc._wire)
                    msg = read_task_record(view)
                    if msg[1] not in _ITEM_KINDS:
                        raise CorruptMessage(f"a compact task record of kind {msg[1]}: only map "
                                             f"and starmap chunks ({_ITEM_KINDS}) travel so")
                else:
                    msg = detach(view)
                    if msg is None:                 # the pool is closing
                        return None
                    problem = _task_problem(msg)
                    if problem:
                        raise CorruptMessage(f"a task record {problem}")
                self.kept = True
                # BUSY with its number before the ring lets the record go: a
                # parent that finds this ring empty and this slot READY knows
                # that a task it sent here and that W_DONE does not name was
                # lost (see _Engine._lost_results)
                self.mark(BUSY, msg[0])
                return msg
        except queue.Empty:
            # idle: the big rings' address space goes back (mapped again at
            # the next large message; see shmipc._footprint), and the memory
            # steady_memory kept, once per idle period
            self.big.release()
            if self.kept:
                self.kept = False
                give_memory_back()
            raise

    def take_big(self, seq: int) -> tuple | None:
        """The task announced by a K_BIG stub: the next message of the big-task
        ring with that sequence number (the parent sends one at a time and puts
        it right after the stub; leftovers of a dead worker are skipped)."""
        deadline = time.monotonic() + _BIG_WAIT
        while time.monotonic() < deadline:
            try:
                msg = next_message(self.big_tasks.get, self.parent_pid,
                                   stop=lambda: time.monotonic() >= deadline)
                if msg is GONE:
                    return None
            except (RingClosed, EOFError):
                return None
            except Exception:                   # a corrupt record: consumed, look further
                continue
            if msg[0] == seq:
                return msg
        return None

    def send_value(self, seq: int, value: Any, kind: int, offset: int = 0, last: bool = True) -> None:
        """Put a result; split a list too large for the ring into pieces (one
        item too large goes through the big ring, announced by a stub); a
        value that does not pickle becomes an R_UNENCODABLE record."""
        try:
            data, meta = pack(value) if kind == K_CALL else pack_items(value)
        except self.catch as exc:               # pickling failed (executor: SystemExit too, as concurrent.futures)
            self.send_unencodable(seq, exc, value, offset)
            return
        self.send_record((seq, R_OK, offset, last, data, meta, None), value, kind)

    def send_record(self, record: tuple, value: Any = None, kind: int = K_CALL) -> None:
        seq, status, offset, last = record[:4]
        try:
            self.results.put(result_record(record) if status == R_OK else record)
            return
        except MessageTooLarge as exc:
            if status == R_OK and kind != K_CALL and len(value) > 1:
                half = len(value) // 2
                self.send_value(seq, value[:half], kind, offset, False)
                self.send_value(seq, value[half:], kind, offset + half, last)
                return
            error: BaseException = exc
            try:
                # the payload first, then the stub that tells the parent to fetch it
                self.big_results.put(record, timeout=_BIG_WAIT)
                self.results.put((seq, R_BIG, offset, last, None, None, None))
                return
            except MessageTooLarge as big_exc:
                error = big_exc
            except queue.Full as full:
                error = full
        self.send_error(seq, error, offset=offset)

    def send_error(self, seq: int, exc: BaseException, note: str = "", offset: int = 0,
                   status: int = R_RAISED) -> None:
        """Put a task's exception (with its traceback text) as a `status`
        record (R_RAISED or R_UNDECODABLE); an exception that does not pickle
        becomes an R_UNENCODABLE record."""
        tb = _format_tb(exc)
        if note:
            tb = f"\n{note}:{tb}"
        try:
            data, meta = pack_pickled(exc)
        except self.catch as why:
            self.send_unencodable(seq, why, exc, offset)
            return
        self.send_record((seq, status, offset, True, data, meta, (tb, _safe_repr(exc))))

    def send_unencodable(self, seq: int, why: BaseException, value: Any, offset: int) -> None:
        try:
            data, meta = pack_pickled(why)
        except Exception:
            data, meta = pack_pickled(TypeError(_safe_repr(why)))
        self.results.put((seq, R_UNENCODABLE, offset, True, data, meta,
                          (_format_tb(why), _safe_repr(value))))


_SKIP = object()
_KINDS = (K_CALL, K_MAP, K_STARMAP, K_BIG)


def _task_problem(msg: Any) -> str:
    """What is wrong with a task tuple read from the ring ('' if nothing):
    (seq, kind, data, meta), seq an int >= 1 and kind one of _KINDS."""
    if type(msg) is not tuple or len(msg) != 4:
        return f"is {type(msg).__name__} {_safe_repr(msg, 80)}, not a (seq, kind, data, meta) tuple"
    seq, kind = msg[0], msg[1]
    if type(seq) is not int or seq < 1:
        return f"has task number {_safe_repr(seq, 80)}, not an int >= 1"
    if type(kind) is not int or kind not in _KINDS:
        return f"of task {seq} has kind {_safe_repr(kind, 80)}, not one of {_KINDS}"
    return ""


def _worker_main(slot: int, arena: Arena, initializer: Callable | None, initargs: tuple,
                 maxtasks: int | None, parent_pid: int, catch_base: bool, big: BigRings) -> None:
    """A pool worker (the Supervisor's target): see _WorkerLoop."""
    steady_memory()                 # large arguments must not cost a page fault storm each
    loop = _WorkerLoop(slot, arena, maxtasks, parent_pid, catch_base, big)
    loop.mark(STARTING)
    if initializer is not None:
        initializer(*initargs)
    loop.mark(READY)
    loop.run()
