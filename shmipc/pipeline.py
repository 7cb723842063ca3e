"""Producer/consumer pipelines: a source iterable, stages of forked workers, results.

::

    with shmipc.Pipeline(source=read_records()) as p:     # any iterable, may be infinite
        p.stage(parse, workers=2)
        p.stage(Enrich, workers=4, ordered=False)          # a class: setup/process/teardown
        for result in p.results(progress=True):
            ...

How it works
------------
One arena holds one ring per stage (its input) plus an output ring read by
the parent. The parent is single-threaded: it reads the source only while
the first ring has room and fewer than ``max_inflight`` items are inside the
pipeline, and it drains the output ring; so memory stays bounded with an
infinite source (backpressure), and a Ctrl-C in the parent lands in its own
thread. Workers start when ``results()`` does, forked (so stages may be
lambdas or closures, and nothing is pickled to start them) by the
single-threaded zygote of a :class:`shmipc._workers.Supervisor`; each takes
one item at a time from its stage's ring and puts what it makes into the next
ring (the last stage into the output ring). Every worker stage also writes
errors, and "no output" credits, straight to the output ring.

Every message carries an envelope ``(seq, credit, path, value, meta)``:
  * ``seq`` is the source position; results are yielded in ``seq`` order
    (a reorder buffer in the parent, bounded by ``max_inflight``) unless a
    stage was declared ``ordered=False``;
  * ``credit`` is an exponent e (the message carries 2**-e of its source
    item); a generator stage splits its input's credit among the outputs it
    yields (halving as it goes, so every share is still a power of two), and
    an input that yields nothing, fails, or is lost with its worker returns
    its credit straight to the parent. An item is finished when the credits
    the parent got for it add up to 1: that is how the parent knows all
    outputs of a fanned-out item have arrived, without counting them first;
  * ``path`` holds the output index at each generator stage, so outputs of
    one item are yielded in the order the generators made them.
  * a numpy array (of a plain dtype) travels as its raw data, a pickle-5
    out-of-band buffer that the ring copies straight in and out, with
    ``meta = (dtype.str, shape)`` to rebuild it: the array is never pickled
    (numpy's own pickling would cost ~6 us per hop); only the few-dozen-byte
    envelope is. Other values travel as themselves (meta None). A stage
    with ``zero_copy=True`` even reads its input arrays in place in the ring.

Failure model
-------------
  * An exception in a stage goes back to the parent with the worker's
    traceback (as ``__cause__``), and is handled by the stage's ``on_error``:
    "raise" (in source order, after the results before it), "skip", or
    "collect" (kept in ``Pipeline.errors``).
  * A worker that dies (SIGKILL, OOM, os._exit) is replaced. What it was
    working on is known from its slot in shared memory: the item fails with
    :class:`~shmipc.errors.WorkerLost` under ``on_error``, or is retried up
    to ``retries`` times (the worker keeps a copy of its current input in a
    small ring of its own when retries are on). A generator item whose
    outputs were partly sent is not retried (that would duplicate them).
    If a worker dies in the instant between taking an item and writing its
    slot, nothing records the item: once nothing has moved for QUIET_S with
    every ring empty and every worker idle, unfinished items fail with
    WorkerLost (so nothing hangs), and a late result is dropped (counted).
  * ``close()`` (also on leaving the ``with`` block, breaking out of
    ``results()``, or an exception) tells the workers to stop, shuts the rings
    down (waking every waiter), gives them ``stop_timeout`` seconds to run
    ``teardown()``, then has the supervisor SIGTERM/SIGKILL and reap the rest,
    and closes the arena.
  * Workers die with the parent (PR_SET_PDEATHSIG, via the zygote) and ignore
    SIGINT: a Ctrl-C raises KeyboardInterrupt in the parent, which stops them.
"""
from __future__ import annotations

import inspect
import os
import pickle
import queue
import sys
import time
import traceback
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from shmipc import _ring
from shmipc._workers import parent_alive
from shmipc.arena import Arena
from shmipc._lifetime import Closeable
from shmipc._proc import steady_malloc
from shmipc.errors import MessageTooLarge, PeerDied, ShmipcError, WorkerLost

__all__ = ["Pipeline", "PipelineError", "RemoteTraceback", "StageFailure"]

ON_ERROR = ("raise", "skip", "collect")
DEFAULT_RING_CAPACITY = 4 << 20
DEFAULT_MAX_INFLIGHT = 256

# output-ring record kinds: (kind, seq, credit, path, value, meta)
K_RESULT = 0     # value is a result
K_DONE = 1       # no value: just returns credit (an input that yielded nothing)
K_ERROR = 2      # value is (stage index, exception or None, repr, traceback text)
K_FATAL = 3      # a stage's setup() failed: the pipeline cannot run

# Worker slots: one row of SLOT_WORDS int64 per worker in a shared block, written
# by the worker, read by the parent after the worker died, to learn what it held.
#   [0] state, [1] seq, [2] credit exponent, [3] outputs sent so far,
#   [4] path length, [5:] path
S_IDLE, S_BUSY, S_DONE = 0, 1, 2
SLOT_WORDS = 32
MAX_PATH = SLOT_WORDS - 5

OUT_OF_BAND_MIN = 4096   # bytes: smaller bytes values are cheaper pickled in band
BATCH_BYTES = 128 << 10  # results taken at once, in bytes (malloc's trim threshold)
POLL_S = 0.05            # parent's longest sleep before it looks at its workers
WORKER_POLL_S = 0.5      # worker's longest sleep before it looks at the stop flag
REAP_EVERY_S = 0.1       # how often the parent checks for dead workers
QUIET_S = 1.0            # nothing moving this long after a death: stuck items are lost
MAX_START_DEATHS = 3     # replacements that die before taking an item, in a row


class PipelineError(ShmipcError):
    """The pipeline cannot go on: a stage's setup() failed, its workers keep
    dying at start, or a worker's exception could not be sent back as is."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as the
    ``__cause__`` of the exception re-raised in the parent."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


@dataclass
class StageFailure:
    """One failed item, as kept in ``Pipeline.errors`` with on_error="collect".

    ``seq`` is the item's position in the source; ``exception`` has the
    worker's traceback as ``__cause__`` (a RemoteTraceback), also in
    ``traceback`` as text.
    """

    stage: str
    seq: int
    exception: BaseException
    traceback: str


class _Raise:
    """A failure waiting in the output queue for its turn to be raised."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Stage:
    """One stage's configuration and its parent-side state."""

    def __init__(self, index: int, fn: Any, workers: int, ordered: bool, on_error: str,
                 retries: int, ring_capacity: int, name: str, zero_copy: bool) -> None:
        self.index = index
        self.fn = fn
        self.workers = workers
        self.ordered = ordered
        self.on_error = on_error
        self.retries = retries
        self.ring_capacity = ring_capacity
        self.name = name
        self.zero_copy = zero_copy
        self.ring: Any = None            # input ring
        self.slot_base = 0               # index of this stage's first worker slot
        self.stashes: list[Any] = []     # per worker: its current input (retries only)
        self.pids: list[int] = []        # per worker slot: pid, 0 when none
        self.deaths = 0
        self.start_deaths = 0            # deaths in a row of workers that took no item


class Pipeline(Closeable):
    """Stages of forked workers connected by shared-memory rings.

    Args:
        source: any iterable (may be infinite); read lazily in the parent,
            only as fast as the pipeline drains.
        ring_capacity: bytes of each stage's input ring (a power of two); one
            message may use at most half of it. Per stage: ``stage(...,
            ring_capacity=)``.
        max_inflight: most source items inside the pipeline at once (read
            but not yet yielded): bounds the reorder buffer and memory.
        on_error: default policy for stage exceptions: "raise", "skip" or
            "collect" (see ``errors``).
        retries: default number of times an item whose worker died is tried
            again before it fails with WorkerLost.
        stop_timeout: seconds workers get to finish (teardown) on close
            before they are killed.
        cluster: None (default): this machine, through shared memory. "ray",
            "ray://host:port" or "ray:ADDRESS": the same API on a Ray cluster
            (a :class:`shmipc.cluster.RayPipeline` is returned; see shmipc.cluster).

    Raises:
        TypeError: `source` is not iterable.
        ValueError: an invalid option (named in the message).
    """

    # set before anything can raise, so close()/__del__ are safe after a failed __init__
    _arena: Arena | None = None
    _started = False
    _closed = False
    _owner_pid = 0

    def __new__(cls, *args: Any, cluster: str | None = None, **kwargs: Any) -> Any:
        if cluster is None:
            return super().__new__(cls)
        from shmipc.cluster.ray_pipeline import RayPipeline     # imports Ray only when asked for

        return RayPipeline(*args, cluster=cluster, **kwargs)

    def __init__(self, source: Iterable[Any], *, ring_capacity: int = DEFAULT_RING_CAPACITY,
                 max_inflight: int = DEFAULT_MAX_INFLIGHT, on_error: str = "raise",
                 retries: int = 0, stop_timeout: float = 1.0, cluster: None = None) -> None:
        self._owner_pid = os.getpid()
        try:
            self._source = iter(source)
        except TypeError:
            raise TypeError(f"source must be iterable, got {type(source).__name__}") from None
        try:
            self._total: int | None = len(source)  # type: ignore[arg-type]
        except TypeError:
            self._total = None
        _check_capacity(ring_capacity)
        if not isinstance(max_inflight, int) or isinstance(max_inflight, bool) or max_inflight < 1:
            raise ValueError(f"max_inflight must be an int >= 1, got {max_inflight!r}")
        _check_policy(on_error)
        _check_retries(retries)
        if not isinstance(stop_timeout, (int, float)) or not stop_timeout >= 0:
            raise ValueError(f"stop_timeout must be a number >= 0, got {stop_timeout!r}")
        self._ring_capacity = ring_capacity
        self._max_inflight = max_inflight
        self._on_error = on_error
        self._retries = retries
        self._stop_timeout = float(stop_timeout)
        self._stages: list[_Stage] = []
        self._iterating = False
        #: failures kept by stages with on_error="collect", in arrival order
        self.errors: list[StageFailure] = []

    # ------------------------------------------------------------ building
    def stage(self, fn: Any, workers: int = 1, *, ordered: bool = True, on_error: str | None = None,
              retries: int | None = None, ring_capacity: int | None = None,
              name: str | None = None, zero_copy: bool = False) -> "Pipeline":
        """Add a stage; returns the pipeline (calls chain).

        Args:
            fn: a function of one item returning one output; a generator
                function yielding 0..n outputs per item (any call that returns
                a generator object counts as one); a class (one instance per
                worker) or an object with ``process(item)`` and optional
                ``setup()`` / ``teardown()`` run once per worker (teardown
                when the pipeline closes, unless the worker is killed).
            workers: processes running this stage.
            ordered: False lets results leave in completion order (the
                pipeline's output is in source order only if every stage is
                ordered).
            on_error, retries, ring_capacity: per-stage overrides of the
                pipeline's defaults.
            name: shown in progress and errors (default: fn's name).
            zero_copy: hand numpy inputs to fn as read-only arrays over the
                ring itself instead of a private copy (saves one copy per
                item). Such an input is valid only during the call: fn must
                not keep it (nor a view of it) after returning; returning it
                or yielding it is fine (it is copied on).

        Raises:
            TypeError: fn is not callable and has no process().
            ValueError: an invalid option; or the pipeline already started.
        """
        if self._started or self._closed:
            raise ValueError("stages must be added before results() starts the pipeline")
        if not (callable(fn) or callable(getattr(fn, "process", None))):
            raise TypeError(f"a stage must be callable or have a process() method, got {fn!r}")
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        on_error = self._on_error if on_error is None else _check_policy(on_error)
        retries = self._retries if retries is None else _check_retries(retries)
        capacity = self._ring_capacity if ring_capacity is None else _check_capacity(ring_capacity)
        if name is None:
            name = getattr(fn, "__name__", None) or type(fn).__name__
            if any(st.name == name for st in self._stages):
                name = f"{name}#{len(self._stages)}"
        elif any(st.name == name for st in self._stages):
            raise ValueError(f"a stage named {name!r} already exists")
        self._stages.append(_Stage(len(self._stages), fn, workers, bool(ordered), on_error,
                                   retries, capacity, str(name), bool(zero_copy)))
        regions = self._regions_needed()
        if regions > 60:
            self._stages.pop()
            raise ValueError(f"too many rings for one arena: this stage would need {regions} regions "
                             f"(at most 60); use fewer workers with retries, or fewer stages")
        return self

    def _regions_needed(self) -> int:
        return (len(self._stages) + 1 + 2
                + sum(s.workers for s in self._stages if s.retries))

    # ------------------------------------------------------------ results
    def results(self, progress: bool = False, desc: str | None = None) -> Iterator[Any]:
        """Start the workers and yield the results (in source order unless a
        stage is unordered). Can be called once. Leaving the loop early, or
        an exception, closes the pipeline.

        Args:
            progress: show a progress bar (shmipc.progress.track) with items/s
                and each stage's ring fill level, so the bottleneck shows.
            desc: the bar's label.

        Raises:
            ValueError: no stages, or results() already called, or closed.
            Whatever a stage raised (on_error="raise"), with the worker's
            traceback as __cause__; WorkerLost for an item whose worker died;
            PipelineError when a stage cannot start.
        """
        if not self._stages:
            raise ValueError("add at least one stage with stage() before results()")
        if self._closed:
            raise ValueError("pipeline is closed")
        if self._iterating:
            raise ValueError("results() can be called only once per pipeline")
        self._iterating = True
        self._start()
        it = self._iterate()
        if not progress:
            return it
        from shmipc.progress import track

        return track(it, total=self._total, desc=desc or "pipeline", status=self._fill_levels)

    def __iter__(self) -> Iterator[Any]:
        return self.results()

    def _fill_levels(self) -> dict[str, str]:
        """Each ring's fill level: a full ring sits before the bottleneck stage."""
        if self._closed or self._arena is None:
            return {}
        out = {}
        try:
            for s in self._stages:
                out[s.name] = f"{s.ring.stats()['bytes_used'] / s.ring.capacity:.0%}"
            out["out"] = f"{self._out.stats()['bytes_used'] / self._out.capacity:.0%}"
        except ValueError:       # closed under us
            pass
        return out

    def worker_pids(self) -> dict[str, list[int]]:
        """The live workers' pids, by stage name (empty before results())."""
        return {s.name: [pid for pid in s.pids if pid] for s in self._stages}

    def stats(self) -> dict[str, Any]:
        """Items fed and completed, errors collected, late messages dropped
        (for items settled after their worker died); per stage: workers,
        deaths, and while running, items in/taken and its input ring's fill."""
        out: dict[str, Any] = {"fed": getattr(self, "_next_seq", 0),
                               "completed": getattr(self, "_ncomplete", 0),
                               "errors": len(self.errors),
                               "late_dropped": getattr(self, "_dropped", 0), "stages": []}
        for s in self._stages:
            row: dict[str, Any] = {"name": s.name, "workers": s.workers, "deaths": s.deaths}
            if s.ring is not None and not s.ring.closed:
                st = s.ring.stats()
                row.update(items_in=st["messages_in"], items_taken=st["messages_out"],
                           fill=st["bytes_used"] / st["capacity"])
            out["stages"].append(row)
        return out

    # ------------------------------------------------------------ start
    def _start(self) -> None:
        nworkers = sum(s.workers for s in self._stages)
        out_capacity = max(self._ring_capacity, max(s.ring_capacity for s in self._stages))
        rings = [out_capacity]
        for s in self._stages:
            rings += [s.ring_capacity] * (1 + (s.workers if s.retries else 0))
        self._arena = Arena(Arena.size_for(rings=rings, blocks=[64, max(nworkers, 1) * SLOT_WORDS * 8]))
        arena = self._arena
        try:
            # the control block: byte 0 is the stop flag workers look at between items
            self._ctrl = arena.block(64, name="pipeline.ctrl")
            slots = arena.block(max(nworkers, 1) * SLOT_WORDS * 8, name="pipeline.slots")
            self._slots = slots.cast("q")
            base = 0
            for s in self._stages:
                # stage 0's input has one producer: this (single-threaded) parent
                s.ring = arena.ring(s.ring_capacity, producers="one" if s.index == 0 else "many",
                                    consumers="many")
                if s.retries:
                    s.stashes = [arena.ring(s.ring_capacity, producers="many", consumers="many")
                                 for _ in range(s.workers)]
                s.slot_base = base
                s.pids = [0] * s.workers
                base += s.workers
            self._out = arena.ring(out_capacity, producers="many", consumers="one")
        except BaseException:
            self.close()
            raise
        # The parent's iteration state.
        # Invariants (between two steps of _iterate):
        #   * every seq in [0, _next_seq) was read from the source exactly once;
        #     it is in _outstanding until its credits add up to 1 (or it is
        #     settled as lost), then counted in _ncomplete;
        #   * ordered: seqs < _emit_seq have had their results moved to _ready;
        #     a finished seq >= _emit_seq waits in _complete with its results
        #     in _held; _next_seq - _emit_seq <= max_inflight bounds both;
        #   * unordered: _next_seq - _ncomplete <= max_inflight;
        #   * a message for a seq not in _outstanding is late (its item was
        #     settled after a worker died) and is dropped, never yielded.
        self._next_seq = 0                    # next source position to read
        self._emit_seq = 0                    # next position to yield (ordered)
        self._ncomplete = 0                   # items finished
        self._exhausted = False
        self._ordered = all(s.ordered for s in self._stages)
        self._unsent: tuple | None = None     # an envelope read from the source, not yet in ring 0
        self._requeue: list[tuple[_Stage, tuple]] = []   # retried items waiting for room
        self._partial: dict[int, tuple[int, int]] = {}   # seq -> (numerator, exponent) of credit
        self._held: dict[int, list[tuple[tuple, Any]]] = {}   # seq -> [(path, value)] (ordered)
        self._failed: dict[int, BaseException] = {}       # seq -> exception to raise (ordered)
        self._complete: set[int] = set()      # finished seqs not yet yielded (ordered)
        self._outstanding: set[int] = set()   # seqs read and not finished
        self._ready: list[Any] = []           # results (and _Raise) to yield, in order
        self._attempts: dict[tuple, int] = {} # (stage, seq, path) -> tries so far
        self._dropped = 0                     # late messages for items already finished
        self._last_reap = time.monotonic()
        self._last_move = time.monotonic()
        self._moves = -1
        self._lost_any = False
        self._started = True
        try:
            self._start_workers()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ workers
    # Workers run in numbered slots of a shmipc._workers.Supervisor: forked by
    # its single-threaded zygote (itself forked here, once, when results()
    # starts, before any thread of ours exists), so replacements started later
    # are safe even if the caller has threads running by then (a progress bar's).
    # Slot k is stage s's worker j for k = s.slot_base + j.
    def _start_workers(self) -> None:
        from shmipc._workers import Supervisor

        self._sup = Supervisor(_worker_entry, (self,), context="fork", name="shmipc-pipeline")
        slots = [s.slot_base + j for s in self._stages for j in range(s.workers)]
        for k in slots:
            self._slots[k * SLOT_WORDS] = S_IDLE
        for k, pid in self._sup.start(slots).items():
            s, j = self._slot_owner(k)
            s.pids[j] = pid

    def _slot_owner(self, k: int) -> tuple[_Stage, int]:
        for s in self._stages:
            if s.slot_base <= k < s.slot_base + s.workers:
                return s, k - s.slot_base
        raise AssertionError(f"no stage has worker slot {k}")

    def _spawn(self, s: _Stage, j: int) -> None:
        """Start a replacement for slot j of stage s."""
        k = s.slot_base + j
        self._slots[k * SLOT_WORDS] = S_IDLE
        s.pids[j] = self._sup.spawn(k)

    def _reap(self) -> None:
        """Find dead workers; settle what they held and start replacements."""
        for ev in self._sup.poll():
            s, j = self._slot_owner(ev.slot)
            if s.pids[j] == ev.pid:
                s.pids[j] = 0
                self._worker_died(s, j, ev.pid, ev.exitcode)

    def _worker_died(self, s: _Stage, j: int, pid: int, exitcode: int | None) -> None:
        s.deaths += 1
        self._lost_any = True
        slots = self._slots
        base = (s.slot_base + j) * SLOT_WORDS
        state, seq, credit, sent, npath = slots[base: base + 5]
        path = tuple(slots[base + 5: base + 5 + npath]) if 0 < npath <= MAX_PATH else ()
        stashed = None
        if s.stashes:
            try:
                stashed = s.stashes[j].get_nowait()
            except queue.Empty:
                pass
        if state == S_IDLE and stashed is not None:
            # died between keeping its copy and marking itself busy: not started yet
            seq, credit, path = stashed[0], stashed[1], stashed[2]
            state, sent = S_BUSY, 0
        if state == S_BUSY:
            s.start_deaths = 0
            key = (s.index, seq, path)
            tries = self._attempts.get(key, 0) + 1
            if stashed is not None and sent == 0 and tries <= s.retries:
                self._attempts[key] = tries
                self._requeue.append((s, stashed))
            else:
                self._attempts.pop(key, None)
                exc = WorkerLost(pid, exitcode, task=f"item {seq} of stage {s.name!r}")
                self._settle_error(s, seq, credit + sent, exc, "")
        elif state == S_DONE:
            s.start_deaths = 0
        elif state == S_IDLE:
            s.start_deaths += 1
            if s.start_deaths >= MAX_START_DEATHS:
                raise PipelineError(
                    f"workers of stage {s.name!r} keep dying before taking an item (last: pid "
                    f"{pid}, {WorkerLost(pid, exitcode).how}); giving up")
        if not self._closed:
            self._spawn(s, j)

    def _stop_workers(self) -> None:
        """Stop every worker: flag, shut the rings (waking all waiters), give
        them stop_timeout seconds to exit (and run teardown), then let the
        supervisor SIGTERM/SIGKILL and reap the rest."""
        sup = getattr(self, "_sup", None)
        if sup is None:
            return
        try:
            self._ctrl[0] = 1
            for s in self._stages:
                s.ring.shutdown()
            self._out.shutdown()
        except ValueError:
            pass
        deadline = time.monotonic() + self._stop_timeout
        while sup.pids():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sup.wait(min(left, 0.05))
        sup.stop(timeout=0.2)
        for s in self._stages:
            s.pids = [0] * len(s.pids)

    # ------------------------------------------------------------ the parent loop
    def _iterate(self) -> Iterator[Any]:
        out = self._out
        ready = self._ready
        try:
            while not self._closed:
                more = self._feed()
                if self._exhausted and self._next_seq == self._ncomplete and not ready:
                    return
                try:
                    # batches of about BATCH_BYTES: every result taken is a fresh
                    # allocation, and when a large batch of big results is freed
                    # at once malloc hands the memory back to the kernel, then
                    # faults it in again for the next batch (measured: 5 page
                    # faults per 64 KiB item, a third of the parent's time)
                    if more:
                        msgs = out.get_many(1024, False, max_bytes=BATCH_BYTES)
                    else:
                        msgs = out.get_many(1024, True, POLL_S, max_bytes=BATCH_BYTES)
                except queue.Empty:
                    msgs = ()
                if msgs:
                    self._handle_batch(msgs)
                now = time.monotonic()
                if now - self._last_reap >= REAP_EVERY_S:
                    self._last_reap = now
                    self._reap()
                    if self._lost_any:
                        # also with the source not done: at max_inflight, a lost
                        # head item would otherwise stall an ordered pipeline
                        self._settle_stuck(now)
                if ready:
                    items = ready[:]
                    ready.clear()
                    for item in items:
                        if type(item) is _Raise:
                            raise item.exc
                        yield item
                        if self._closed:
                            return
        finally:
            self.close()

    def _feed(self) -> bool:
        """Move retried items and source items into the rings, without
        blocking. True if there is more to feed right now (so the caller
        should not sleep)."""
        if self._requeue:
            keep = []
            for s, env in self._requeue:
                try:
                    s.ring.put_nowait(_repack(env))
                except queue.Full:
                    keep.append((s, env))
            self._requeue[:] = keep
        # One item at a time: a source that blocks (a socket, a queue) must not
        # hold back items it already produced, waiting to fill a batch.
        ring = self._stages[0].ring
        put = ring.put_nowait
        source = self._source
        budget = 1024            # then drain the output for a while
        while budget > 0:
            env = self._unsent
            if env is None:
                if self._exhausted:
                    return False
                # ordered: finished items wait in the reorder buffer until they
                # are yielded, so they count as inside the pipeline until then
                done = self._emit_seq if self._ordered else self._ncomplete
                if self._next_seq - done >= self._max_inflight:
                    return False
                try:
                    item = next(source)
                except StopIteration:
                    self._exhausted = True
                    return False
                seq = self._next_seq
                env = (seq, 0, (), *_pack(item))
                self._outstanding.add(seq)
                self._next_seq = seq + 1
            try:
                put(env)
            except queue.Full:
                self._unsent = env
                return False
            except _ring_message_errors() as exc:
                self._unsent = None
                hint = ("; give Pipeline or stage() a larger ring_capacity"
                        if isinstance(exc, MessageTooLarge) else "")
                exc.add_note(f"(source item {env[0]}, going to stage {self._stages[0].name!r}{hint})")
                raise
            self._unsent = None
            budget -= 1
        return True

    def _handle_batch(self, msgs: list) -> None:
        """Handle output messages; the common one (a whole item's only result)
        on a fast path, the rest in _handle."""
        outstanding = self._outstanding
        ready = self._ready
        ordered = self._ordered
        for msg in msgs:
            kind, seq, credit, path, value, meta = msg
            # credit 0: this is the item's one and only message
            if kind != K_RESULT or credit != 0 or seq not in outstanding:
                self._handle(msg)
                continue
            if meta is not None:
                value = _unpack(value, meta)
            outstanding.discard(seq)
            self._ncomplete += 1
            if not ordered:
                ready.append(value)
            elif seq == self._emit_seq:
                ready.append(value)
                self._emit_seq = seq + 1
                if self._complete:
                    self._flush()
            else:
                self._held[seq] = [(path, value)]
                self._complete.add(seq)

    def _handle(self, msg: tuple) -> None:
        kind, seq, credit, path, value, meta = msg
        if meta is not None:
            value = _unpack(value, meta)
        if kind == K_FATAL:
            stage_index, exc, text, tb = value
            name = self._stages[stage_index].name
            err = PipelineError(f"setup of stage {name!r} failed: {text}")
            err.__cause__ = RemoteTraceback(tb)
            raise err
        if seq not in self._outstanding:
            self._dropped += 1   # late: the item was settled after its worker died
            return
        if kind == K_RESULT:
            if self._ordered:
                held = self._held.get(seq)
                if held is None:
                    self._held[seq] = [(path, value)]
                else:
                    held.append((path, value))
            else:
                self._ready.append(value)
        elif kind == K_ERROR:
            stage_index, exc, text, tb = value
            s = self._stages[stage_index]
            if exc is None:
                exc = PipelineError(f"stage {s.name!r} raised {text} (not picklable: sent as text)")
            exc.__cause__ = RemoteTraceback(tb)
            self._settle_error(s, seq, credit, exc, tb, add_credit=False)
        self._add_credit(seq, credit)

    def _settle_error(self, s: _Stage, seq: int, credit: int, exc: BaseException, tb: str,
                      add_credit: bool = True) -> None:
        if s.on_error == "raise":
            if self._ordered:
                self._failed.setdefault(seq, exc)
            else:
                self._ready.append(_Raise(exc))
        elif s.on_error == "collect":
            self.errors.append(StageFailure(s.name, seq, exc, tb))
        if add_credit:
            self._add_credit(seq, credit)

    def _add_credit(self, seq: int, e: int) -> None:
        """Count 2**-e of item `seq` as arrived; finish the item at 1."""
        if e == 0 and seq not in self._partial:
            self._finish(seq)
            return
        num, den = self._partial.get(seq, (0, 0))
        if e > den:
            num <<= e - den
            den = e
        num += 1 << (den - e)
        if num >= 1 << den:
            self._partial.pop(seq, None)
            self._finish(seq)
        else:
            self._partial[seq] = (num, den)

    def _finish(self, seq: int) -> None:
        self._outstanding.discard(seq)
        self._ncomplete += 1
        if self._attempts:                    # only items that were retried
            for key in [k for k in self._attempts if k[1] == seq]:
                del self._attempts[key]
        if not self._ordered:
            return
        self._complete.add(seq)
        self._flush()

    def _flush(self) -> None:
        """Ordered: move the results of finished items at the head to _ready."""
        while self._emit_seq in self._complete:
            s = self._emit_seq
            self._complete.discard(s)
            held = self._held.pop(s, None)
            if held:
                if len(held) > 1:
                    held.sort(key=_path_key)
                self._ready.extend(v for _, v in held)
            exc = self._failed.pop(s, None)
            if exc is not None:
                self._ready.append(_Raise(exc))
            self._emit_seq = s + 1

    def _settle_stuck(self, now: float) -> None:
        """After a worker died, an item it had just taken (before it could
        write its slot) may be lost without a trace. When nothing is being
        fed, every ring is empty, every worker idle, and nothing moved for
        QUIET_S, the unfinished items are failed with WorkerLost."""
        moves = sum(s.ring.stats()["messages_out"] for s in self._stages) + \
            self._out.stats()["messages_out"]
        if moves != self._moves:
            self._moves = moves
            self._last_move = now
            return
        if now - self._last_move < QUIET_S or self._requeue or self._unsent is not None or not self._outstanding:
            return
        if any(s.ring.qsize() for s in self._stages) or self._out.qsize():
            return
        slots = self._slots
        nworkers = sum(s.workers for s in self._stages)
        if any(slots[i * SLOT_WORDS] != S_IDLE for i in range(nworkers)):
            return
        for seq in sorted(self._outstanding):
            exc = WorkerLost(0, None, task=f"item {seq} (taken by a worker that died)")
            self._partial.pop(seq, None)
            self._settle_error(self._stages[0], seq, 0, exc, "", add_credit=False)
            self._finish(seq)
        self._last_move = now

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop every worker (see stop_timeout) and release the arena.
        Idempotent; results() stops yielding."""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._owner_pid:
            return                       # a forked child never stops its parent's workers
        try:
            if self._started:
                self._stop_workers()
        finally:
            # views of our own over arena blocks would keep the mapping (and
            # its fd) alive past arena.close() for as long as this object lives
            slots = getattr(self, "_slots", None)
            if slots is not None:
                slots.release()
            if self._arena is not None:
                self._arena.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        stages = " -> ".join(f"{s.name}x{s.workers}" for s in self._stages) or "no stages"
        state = "closed" if self._closed else ("running" if self._started else "new")
        return f"<shmipc.Pipeline {stages} {state}>"


# ---------------------------------------------------------------- worker side
def _worker_entry(slot: int, p: Pipeline) -> None:
    """Supervisor target: run worker `slot` of pipeline `p` (inherited by fork).
    The supervisor has made it ignore SIGINT (the parent stops it) and die
    with its parent."""
    s, j = p._slot_owner(slot)
    steady_malloc()                 # large items must not cost a page fault storm each
    code = _worker_main(p, s, j)
    if code:
        raise SystemExit(code)


def _worker_main(p: Pipeline, s: _Stage, j: int) -> int:
    """The body of a worker: set up, then take items until told to stop.
    Returns the exit code."""
    ctrl = p._ctrl
    slots = p._slots
    base = (s.slot_base + j) * SLOT_WORDS
    inring = s.ring
    out = p._out
    nxt = p._stages[s.index + 1].ring if s.index + 1 < len(p._stages) else None
    stash = s.stashes[j] if s.stashes else None
    owner = p._owner_pid
    try:
        obj, call = _instantiate(s.fn)
        setup = getattr(obj, "setup", None) if obj is not None else None
        if setup is not None:
            setup()
    except Exception as exc:
        _send(out, (K_FATAL, -1, 0, (), _error_value(s.index, exc), None))
        return 3
    try:
        if nxt is None:
            def emit(seq: int, e: int, path: tuple, value: Any) -> None:
                out.put((K_RESULT, seq, e, path, *_pack(value)))
        else:
            def emit(seq: int, e: int, path: tuple, value: Any) -> None:
                nxt.put((seq, e, path, *_pack(value)))
        def handle(env: tuple) -> None:
            if stash is not None:
                stash.put(_repack(env))
            seq, e, path, value, meta = env
            if meta is not None:
                value = _unpack(value, meta)
            slots[base + 1] = seq
            slots[base + 2] = e
            slots[base + 3] = 0
            n = len(path)
            slots[base + 4] = n
            if n:
                slots[base + 5: base + 5 + n] = _as_q(path)
            slots[base] = S_BUSY
            sent = 0
            try:
                result = call(value)
                del value
                if isinstance(result, types.GeneratorType):
                    held = _NOTHING
                    try:
                        for item in result:
                            if held is not _NOTHING:
                                # the held output takes half of what is left
                                emit(seq, e + sent + 1, path + (sent,), held)
                                sent += 1
                                slots[base + 3] = sent
                            held = item
                    except Exception:
                        if held is not _NOTHING:
                            emit(seq, e + sent + 1, path + (sent,), held)
                            sent += 1
                            slots[base + 3] = sent
                        raise
                    if held is _NOTHING:
                        out.put((K_DONE, seq, e + sent, path, None, None))
                    else:
                        emit(seq, e + sent, path + (sent,), held)
                else:
                    emit(seq, e, path, result)
            except (BrokenPipeError, EOFError) as exc:
                # from our own rings: the pipeline is shutting down (or the
                # parent died); from the stage's code: an error like any other
                if ctrl[0] or isinstance(exc, PeerDied):
                    raise
                out.put((K_ERROR, seq, e + sent, path, _error_value(s.index, exc), None))
            except Exception as exc:
                out.put((K_ERROR, seq, e + sent, path, _error_value(s.index, exc), None))
            slots[base] = S_DONE
            if stash is not None:
                with stash.get_view(timeout=0):
                    pass
            slots[base] = S_IDLE

        while not ctrl[0]:
            try:
                if s.zero_copy:
                    # the input stays in the ring (claimed) until handled: no copy out
                    view = inring.get_view(timeout=WORKER_POLL_S)
                    env = view.__enter__()
                else:
                    view = None
                    env = inring.get(timeout=WORKER_POLL_S)
            except queue.Empty:
                if not parent_alive(owner):
                    break
                continue
            except EOFError:
                break
            try:
                if ctrl[0]:
                    break
                handle(env)
            finally:
                del env
                if view is not None:
                    view.__exit__(None, None, None)
    except (BrokenPipeError, EOFError):
        pass
    finally:
        teardown = getattr(obj, "teardown", None) if obj is not None else None
        if teardown is not None:
            teardown()
    return 0


_NOTHING = object()
_ndarray: Any = None          # numpy.ndarray, once numpy is imported
_dtypes: dict[str, Any] = {}  # dtype.str -> dtype, for _unpack


def _pack(value: Any) -> tuple[Any, Any]:
    """(value, meta) for an envelope. A plain-dtype numpy array becomes its
    raw data (an out-of-band buffer) and (dtype.str, shape); large bytes and
    bytearrays go out of band too (in band, pickle would copy them once more)."""
    global _ndarray
    t = type(value)
    if t is bytes or t is bytearray:
        if len(value) < OUT_OF_BAND_MIN:
            return value, None
        return pickle.PickleBuffer(value), t.__name__
    if _ndarray is None:
        np = sys.modules.get("numpy")
        if np is None:
            return value, None
        _ndarray = np.ndarray
    if t is not _ndarray:
        return value, None
    dt = value.dtype
    if dt.hasobject or dt.fields is not None or dt.subdtype is not None:
        return value, None          # str does not describe these: pickle them
    if not value.flags.c_contiguous:
        value = value.copy()
    return pickle.PickleBuffer(value), (dt.str, value.shape)


def _unpack(data: Any, meta: Any) -> Any:
    """The value that _pack took apart (an array over the received buffer,
    with no copy; bytes and bytearrays copied out of it)."""
    if meta == "bytes":
        return bytes(data)
    if meta == "bytearray":
        return bytearray(data)
    descr, shape = meta
    dtype = _dtypes.get(descr)
    if dtype is None:
        import numpy as np

        dtype = _dtypes[descr] = np.dtype(descr)
    arr = _frombuffer(data, dtype)
    return arr if len(shape) == 1 else arr.reshape(shape)


def _frombuffer(data: Any, dtype: Any) -> Any:
    global _frombuffer
    import numpy as np

    _frombuffer = np.frombuffer
    return np.frombuffer(data, dtype)


def _repack(env: tuple) -> tuple:
    """A received envelope, ready to be put again (its array data arrives as
    a memoryview, which pickles only wrapped in a PickleBuffer)."""
    if env[4] is None:
        return env
    return (*env[:3], pickle.PickleBuffer(env[3]), env[4])


def _instantiate(fn: Any) -> tuple[Any, Callable[[Any], Any]]:
    """(object with setup/teardown or None, the per-item callable)."""
    if inspect.isclass(fn):
        obj = fn()
        if not callable(getattr(obj, "process", None)):
            raise TypeError(f"stage class {fn.__name__} has no process(item) method")
        return obj, obj.process
    if callable(getattr(fn, "process", None)):
        return fn, fn.process
    return None, fn


def _error_value(stage_index: int, exc: BaseException) -> tuple:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = f"{type(exc).__name__}: {exc}"
    exc.__traceback__ = None
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc = None
    return (stage_index, exc, text, f'\n"""\n{tb}"""')


def _send(ring: Any, msg: tuple) -> None:
    try:
        ring.put(msg, timeout=5)
    except (queue.Full, BrokenPipeError, EOFError, ValueError):
        pass


def _as_q(path: tuple) -> Any:
    import array

    return memoryview(array.array("q", path))


def _path_key(pair: tuple) -> tuple:
    return pair[0]


def _ring_message_errors() -> tuple[type[BaseException], ...]:
    """What put raises for a message that cannot be sent (too large, or not
    picklable: pickle raises PicklingError, TypeError or AttributeError)."""
    return (MessageTooLarge, pickle.PicklingError, TypeError, AttributeError)


def _check_capacity(capacity: Any) -> int:
    if (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < _ring.MIN_CAPACITY
            or capacity & (capacity - 1)):
        raise ValueError(f"ring_capacity must be a power of two >= {_ring.MIN_CAPACITY}, got {capacity!r}")
    return capacity


def _check_policy(on_error: Any) -> str:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def _check_retries(retries: Any) -> int:
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ValueError(f"retries must be an int >= 0, got {retries!r}")
    return retries
