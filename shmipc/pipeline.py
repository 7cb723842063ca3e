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
pipeline, and it drains the output ring at least every few milliseconds
(also while a slow live source trickles in); so memory stays bounded with an
infinite source (backpressure), results leave as soon as they are ready, and
a Ctrl-C in the parent lands in its own thread. Workers start when
``results()`` does, forked (so stages may be lambdas or closures, and nothing
is pickled to start them) by the single-threaded zygote of a
:class:`shmipc._workers.Supervisor`; each takes one item at a time from its
stage's ring and puts what it makes into the next ring (the last stage into
the output ring). Every worker stage also writes errors, and "no output"
credits, straight to the output ring.

Where things are:
  * this module: the API and the parent's loop (feed, drain, reap);
  * :mod:`shmipc._pipeline_sched`: the scheduler, pure code: credits (how
    the parent knows a fanned-out item is finished), reordering, and what a
    dead worker's slot says was lost;
  * :mod:`shmipc._pipeline_crew`: the worker processes (start, notice a
    death and what its slot says, replace, stop);
  * :mod:`shmipc._pipeline_worker`: the worker loop;
  * :mod:`shmipc._wire`: the messages (the wire format shared with the
    pools: a value that fails to pickle or unpickle fails its item, naming
    it; numpy arrays and large bytes travel as raw data, out of band).

Failure model
-------------
  * An exception in a stage goes back to the parent with the worker's
    traceback (as ``__cause__``), and is handled by the stage's ``on_error``:
    "raise" (in source order, after the results before it), "skip", or
    "collect" (kept in ``Pipeline.errors``). So is a value (source item,
    result, exception) that cannot be pickled or unpickled: it fails its
    item only.
  * A worker that dies (SIGKILL, OOM, os._exit), busy or idle, is replaced.
    What it was working on, and which of its outputs were committed, is
    known from its slot in shared memory: every share of an item is counted
    exactly once (see shmipc._pipeline_sched). Its item fails with
    :class:`~shmipc.errors.WorkerLost` under ``on_error``, or is retried up
    to ``retries`` times if it had sent nothing yet (the worker keeps a copy
    of its current input in a small ring of its own when retries are on).
    A worker takes an item with its ring record claimed, and lets the ring
    forget it only once its slot says it holds the item: killed in between,
    it leaves the record claimed, and the parent takes it back from the ring
    (which keeps dead consumers' claims for it) and retries or fails the
    item at once. Only garbage in shared memory (a slot or a claim that does
    not decode) can lose an item without a trace: once nothing has moved
    for QUIET_S with every ring empty and no worker busy, unfinished items
    then fail with WorkerLost (so nothing hangs), and a late result is
    dropped (counted).
  * Only workers that keep dying by their own hand before their setup
    finished stop the pipeline (PipelineError, after MAX_START_DEATHS in a
    row), or a worker that cannot be started for SPAWN_GIVE_UP_S (15 s) by
    failures of its own (fork failing); workers killed from outside
    meanwhile are replaced (see shmipc._runtime.StartupGuard), and workers
    that cannot start because their zygotes are killed or stopped from
    outside, at the start too, are started after a back-off (50 ms,
    doubling up to 1 s) however long that lasts.
  * ``close()`` while ``results()`` runs (from another thread, or in the
    loop body) makes results() raise PipelineError ("... was closed while
    results() was running"), never a silent end.
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
from typing import Any, Iterable, Iterator

from shmipc import _ring
from shmipc._pipeline_api import DEFAULT_MAX_INFLIGHT, ON_ERROR, PipelineAPI  # noqa: F401
from shmipc._pipeline_crew import Crew, Stage
from shmipc._pipeline_sched import (MAX_PATH, S_BUSY, S_DONE, SLOT_WORDS, Raise, Scheduler, StageFailure,
                                    StageRule, is_envelope, output_problem)
from shmipc._slots import SlotTable
from shmipc._waiting import CLAIM_WAIT_S, FEED_SLICE_S, QUIET_S, REAP_EVERY_S
from shmipc._waiting import PIPELINE_POLL_S as POLL_S
from shmipc._wire import (K_DONE, K_FATAL, K_RESULT, PipelineError, RemoteTraceback, pack,
                          rebuild_error, repack, unpack)
from shmipc.arena import Arena
from shmipc.errors import CorruptMessage, MessageTooLarge, RingClosed, WorkerLost

__all__ = ["Pipeline", "PipelineError", "RemoteTraceback", "StageFailure"]

DEFAULT_RING_CAPACITY = 4 << 20

BATCH_BYTES = 128 << 10  # results taken at once, in bytes (malloc's trim threshold)


class Pipeline(PipelineAPI):
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
                 retries: int = 0, stop_timeout: float = 1.0, cluster: str | None = None) -> None:
        self._owner_pid = os.getpid()
        _check_capacity(ring_capacity)
        self._take_options(source, max_inflight, on_error, retries, stop_timeout)
        self._ring_capacity = ring_capacity

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
        on_error, retries, name = self._stage_options(fn, workers, on_error, retries, name)
        capacity = self._ring_capacity if ring_capacity is None else _check_capacity(ring_capacity)
        self._stages.append(Stage(len(self._stages), fn, workers, bool(ordered), on_error,
                                   retries, capacity, str(name), bool(zero_copy)))
        regions = self._regions_needed()
        if len(self._stages) > MAX_PATH:
            self._stages.pop()
            raise ValueError(f"too many stages: at most {MAX_PATH}")
        if regions > 60:
            self._stages.pop()
            raise ValueError(f"too many rings for one arena: this stage would need {regions} regions "
                             f"(at most 60); use fewer workers with retries, or fewer stages")
        return self

    def _regions_needed(self) -> int:
        return (len(self._stages) + 1 + 2
                + sum(s.workers for s in self._stages if s.retries))

    # ------------------------------------------------------------ results
    def _fill_levels(self) -> dict[str, str]:
        """Each ring's fill level: a full ring sits before the bottleneck stage."""
        if self._closed or self._arena is None:
            return {}
        out = {}
        try:
            for s in self._stages:
                out[s.name] = f"{s.ring.stats()['bytes_used'] / s.ring.capacity:.0%}"
            out["out"] = f"{self._out.stats()['bytes_used'] / self._out.capacity:.0%}"
        except RingClosed:       # closed under us
            pass
        return out

    def worker_pids(self) -> dict[str, list[int]]:
        """The live workers' pids, by stage name (empty before results())."""
        return {s.name: [pid for pid in s.pids if pid] for s in self._stages}

    def stats(self) -> dict[str, Any]:
        """Items fed and completed, errors collected, late messages dropped
        (for items settled after their worker died), items retried and
        shares lost with a worker; per stage: workers, deaths, and while
        running, items in/taken and its input ring's fill."""
        sched = getattr(self, "_sched", None)
        out: dict[str, Any] = {"fed": sched.next_seq if sched else 0,
                               "completed": sched.ncomplete if sched else 0,
                               "errors": len(self.errors),
                               "late_dropped": sched.dropped if sched else 0,
                               "retried": sched.retried if sched else 0,
                               "lost": sched.lost if sched else 0, "stages": []}
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
        self._arena = Arena(Arena.size_for(rings=rings, blocks=[64, SlotTable.nbytes(nworkers, SLOT_WORDS)]))
        arena = self._arena
        try:
            # the control block: byte 0 is the stop flag workers look at between items
            self._ctrl = arena.block(64, name="pipeline.ctrl")
            self._slots = SlotTable(arena.block(SlotTable.nbytes(nworkers, SLOT_WORDS),
                                                name="pipeline.slots"), SLOT_WORDS)
            base = 0
            for s in self._stages:
                # stage 0's input has one producer: this (single-threaded) parent
                s.ring = arena.ring(s.ring_capacity, producers="one" if s.index == 0 else "many",
                                    consumers="many")
                # a worker killed before it wrote down the item it took leaves
                # the item claimed in the ring, for _reap to take back
                s.ring._keep_dead_claims()
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
        self._sched = Scheduler([StageRule(s.name, s.on_error, s.retries) for s in self._stages],
                                all(s.ordered for s in self._stages), self._max_inflight, self.errors)
        self._unsent: tuple | None = None     # an envelope read from the source, not yet in ring 0
        self._requeue: list[tuple[Stage, tuple]] = []   # retried items waiting for room
        self._last_reap = time.monotonic()
        self._last_move = time.monotonic()
        self._moves = -1
        self._maybe_lost = False              # a death may have lost an item without a trace
        self._unsettled: list = []            # deaths whose ring could not be looked at yet (_reap)
        self._crew = Crew(self)
        self._started = True
        try:
            self._crew.start()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ workers
    def _reap(self) -> None:
        """Find dead workers; settle what they held and start replacements."""
        dead = self._crew.poll()
        if not dead and not self._unsettled:
            return
        # what a dead worker committed to the output ring is there now: take
        # it all before deciding what it lost (so a delivered result counts)
        self._drain_all()
        for d in dead:
            if not self._closed:
                self._crew.replace(d.stage, d.j)
        pending, self._unsettled = self._unsettled + dead, []
        had = {s.index: self._take_back(s, {d.pid for d in pending if d.stage is s})
               for s in {d.stage.index: d.stage for d in pending}.values()}
        for d in pending:
            s = d.stage
            if not had[s.index]:
                self._unsettled.append(d)   # its ring's consumer side was busy: next time
                continue
            claim = s.claims.pop(d.pid, None)
            stashed = d.stashed
            untraced = d.slot is None or d.slot.state not in (S_BUSY, S_DONE)
            if untraced and stashed is None and claim is not None and not isinstance(claim, BaseException):
                stashed = claim             # taken, not yet written down: as if stashed
            elif untraced and stashed is None:
                # idle, or garbage in its slot or claim: nothing says what it
                # held (normally nothing); see _settle_stuck
                self._maybe_lost = True
            env = self._sched.worker_lost(s.index, d.slot, stashed, d.lost)
            if env is not None:
                self._requeue.append((s, env))

    def _take_back(self, s: Stage, dead: set[int]) -> bool:
        """Collect in s.claims, by pid, the items of s's ring claimed by its
        workers that died (see shmipc._pipeline_worker), for _reap to settle
        with their slots. `dead`: the pids of s's workers known dead. False if
        the ring's consumer side could not be had now (a live worker holds
        it: tried again at the next reap)."""
        taken = s.ring._take_back(CLAIM_WAIT_S)
        if taken is None:
            return False
        for pid, env in taken:
            if pid in s.claims or (pid not in dead and pid not in s.pids):
                # not one of the stage's workers (or a second claim): garbage
                # in the ring named the owner; its item is settled as lost
                # once the pipeline goes quiet (_settle_stuck)
                self._maybe_lost = True
                continue
            if not isinstance(env, BaseException) and not is_envelope(env):
                env = CorruptMessage(f"a record claimed in stage {s.name!r}'s ring holds "
                                     f"{type(env).__name__}, not an item")
            s.claims[pid] = env     # (a live pid: its death is reported a little later)
        return True

    # ------------------------------------------------------------ the parent loop
    def _iterate(self) -> Iterator[Any]:
        sched = self._sched
        try:
            while True:
                try:
                    if self._closed:
                        raise self._closed_error()
                    if self._turn():
                        return
                except PipelineError:
                    raise
                except Exception:
                    # close() from another thread shuts the rings under us: whatever
                    # that made fail here (a ring shut down, an arena closed) is the
                    # close, said once, never a silent end nor a raw ring error
                    if not self._closed:
                        raise
                    raise self._closed_error() from None
                if sched.ready:
                    for item in sched.take_ready():
                        if type(item) is Raise:
                            raise item.exc
                        yield item
                        if self._closed:
                            raise self._closed_error()
        finally:
            self.close()

    def _closed_error(self) -> PipelineError:
        sched = self._sched
        return PipelineError(f"{self!r} was closed while results() was running ({sched.ncomplete} "
                             f"items completed, {sched.next_seq} read from the source"
                             f"{'' if sched.exhausted else ', which was not exhausted'})")

    def _turn(self) -> bool:
        """Feed, take results, reap dead workers. True when every item is done."""
        sched = self._sched
        more = self._feed()
        if sched.finished:
            return True
        try:
            # batches of about BATCH_BYTES: every result taken is a fresh
            # allocation, and when a large batch of big results is freed
            # at once malloc hands the memory back to the kernel, then
            # faults it in again for the next batch (measured: 5 page
            # faults per 64 KiB item, a third of the parent's time)
            if more or sched.ready:
                msgs = self._out.get_many(1024, False, max_bytes=BATCH_BYTES)
            else:
                msgs = self._out.get_many(1024, True, POLL_S, max_bytes=BATCH_BYTES)
        except queue.Empty:
            msgs = ()
        if msgs:
            self._handle_batch(msgs)
        now = time.monotonic()
        if now - self._last_reap >= REAP_EVERY_S:
            self._last_reap = now
            self._reap()
            # after a death, and at any time: a record destroyed or skipped
            # in a ring (a hostile write) leaves no trace either; also with
            # the source not done: at max_inflight, a lost head item would
            # otherwise stall an ordered pipeline
            self._settle_stuck(now)
        return False

    def _feed(self) -> bool:
        """Move retried items and source items into the rings, without
        blocking, for at most FEED_SLICE_S. True if there is more to feed
        right now (so the caller should not sleep)."""
        if self._requeue:
            keep = []
            for s, env in self._requeue:
                try:
                    s.ring.put_nowait(repack(env))
                except queue.Full:
                    keep.append((s, env))
            self._requeue[:] = keep
        # One item at a time: a source that blocks (a socket, a queue) must not
        # hold back items it already produced, waiting to fill a batch; and
        # back to the results after a slice, however slow the source is.
        sched = self._sched
        put = self._stages[0].ring.put_nowait
        source = self._source
        t0 = time.monotonic()
        while True:
            env = self._unsent
            if env is None:
                if sched.exhausted or not sched.can_admit():
                    return False
                try:
                    item = next(source)
                except StopIteration:
                    sched.exhausted = True
                    return False
                seq = sched.admit()
                try:
                    env = (seq, 0, (), *pack(item))
                except Exception as exc:
                    self._source_item_failed(seq, exc)
                    continue
            try:
                put(env)
            except queue.Full:
                self._unsent = env
                return False
            except (MessageTooLarge, pickle.PicklingError, TypeError, AttributeError) as exc:
                self._unsent = None
                self._source_item_failed(env[0], exc)
                continue
            self._unsent = None
            if time.monotonic() - t0 >= FEED_SLICE_S:
                return True

    def _source_item_failed(self, seq: int, exc: BaseException) -> None:
        """A source item that cannot be sent to the first stage fails alone."""
        hint = ("; give Pipeline or stage() a larger ring_capacity"
                if isinstance(exc, MessageTooLarge) else "")
        exc.add_note(f"(source item {seq}, going to stage {self._stages[0].name!r}{hint})")
        self._sched.error(0, seq, 0, (), exc)

    def _drain_all(self) -> None:
        """Handle every message now in the output ring."""
        out = self._out
        target = out.stats(recover=False)["messages_in"]
        while out.stats(recover=False)["messages_out"] < target:
            try:
                msgs = out.get_many(1024, False)
            except queue.Empty:
                return
            self._handle_batch(msgs)

    def _handle_batch(self, msgs: list) -> None:
        """Hand output messages to the scheduler (results on a fast path).
        A malformed message (forged or damaged in shared memory) fails all
        of the item it names, if that one is unfinished, with CorruptMessage
        (under the last stage's on_error); one naming no such item is
        dropped, with a line on stderr."""
        sched = self._sched
        for msg in msgs:
            problem = output_problem(msg)
            if problem is not None:
                self._bad_output(msg, problem)
                continue
            kind, seq, credit, path, data, meta = msg
            if kind == K_RESULT:
                if meta is not None:
                    try:
                        data = unpack(data, meta)
                    except Exception as exc:
                        last = self._stages[-1].name
                        err = PipelineError(f"the result of item {seq} from stage {last!r} "
                                            f"could not be unpickled: {type(exc).__name__}: {exc}")
                        err.__cause__ = exc
                        sched.error(len(self._stages) - 1, seq, credit, path, err)
                        continue
                sched.result(seq, credit, path, data)
            elif kind == K_DONE:
                sched.done(seq, credit, path)
            else:
                self._handle_error(kind, seq, credit, path, data)

    def _bad_output(self, msg: Any, problem: str) -> None:
        seq = msg[1] if type(msg) is tuple and len(msg) > 1 else None
        exc = CorruptMessage(problem)
        if type(seq) is not int or not self._sched.fail_item(len(self._stages) - 1, seq, exc):
            print(f"shmipc.Pipeline: an output message was lost: {problem}", file=sys.stderr)

    def _handle_error(self, kind: int, seq: int, credit: int, path: tuple, data: Any) -> None:
        """K_ERROR: a stage raised for an item; K_FATAL: a stage's setup failed."""
        stage_index, blob, text, tb = data
        last = len(self._stages) - 1
        if not (isinstance(stage_index, int) and 0 <= stage_index <= last):
            stage_index = 0
        name = self._stages[stage_index].name
        if kind == K_FATAL:
            err = PipelineError(f"setup of stage {name!r} failed: {text}")
            err.__cause__ = RemoteTraceback(tb)
            raise err
        exc = rebuild_error(blob, text, tb, f"item {seq} in stage {name!r}")
        self._sched.error(stage_index, seq, credit, path, exc, tb)

    def _settle_stuck(self, now: float) -> None:
        """Garbage in a dead worker's slot, or in a record it had claimed,
        may have lost an item without a trace (a worker killed at any
        instant leaves none: see _reap); so may a record destroyed or
        skipped in a ring, with no death at all. When nothing is being fed,
        every ring is empty with no record held, no worker holds an item (a
        worker marks its item BUSY before its ring forgets the record), and
        nothing moved for QUIET_S, the unfinished items are failed: with
        WorkerLost after a death, else with CorruptMessage."""
        sched = self._sched
        if not sched.outstanding:
            self._maybe_lost = False
            return
        stats = [s.ring.stats(recover=False) for s in self._stages] + [self._out.stats(recover=False)]
        moves = sum(st["messages_out"] for st in stats)
        if moves != self._moves:
            self._moves = moves
            self._last_move = now
            return
        if (now - self._last_move < QUIET_S or self._requeue or self._unsent is not None
                or self._unsettled):
            return
        if any(st["qsize"] or st["bytes_held"] for st in stats):
            return                  # (an item claimed by a live worker that has not written it down yet)
        if self._crew.busy():
            return

        died = self._maybe_lost
        quiet = now - self._last_move

        def lost(seq: int) -> BaseException:
            if died:
                return WorkerLost(0, None, task=f"item {seq} (taken by a worker that died)")
            return CorruptMessage(f"item {seq} was lost: no ring holds it, no worker has it, and nothing has "
                                  f"moved for {quiet:.1f} s (its record was destroyed or skipped in shared memory)")

        sched.fail_outstanding(lost)
        self._maybe_lost = False
        self._last_move = now

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop every worker (see stop_timeout) and release the arena.
        Idempotent. If results() is running (in this thread or another),
        asking it for more then raises PipelineError ("... was closed while
        results() was running"): a close is never mistaken for an exhausted
        source. (Leaving the loop, or closing the results() iterator, ends it
        without an error.)"""
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._owner_pid:
            return                       # a forked child never stops its parent's workers
        try:
            if self._started:
                self._crew.stop(self._ctrl, [s.ring for s in self._stages] + [self._out],
                                self._stop_timeout)
        finally:
            # views of our own over arena blocks would keep the mapping (and
            # its fd) alive past arena.close() for as long as this object lives
            slots = getattr(self, "_slots", None)
            if slots is not None:
                slots.release()
            if self._arena is not None:
                self._arena.close()

    def __repr__(self) -> str:
        stages = " -> ".join(f"{s.name}x{s.workers}" for s in self._stages) or "no stages"
        state = "closed" if self._closed else ("running" if self._started else "new")
        return f"<shmipc.Pipeline {stages} {state}>"


# __new__ takes (*args, cluster=, **kwargs) to hand a cluster= call to Ray; show
# help() and IDEs the real parameters, which are __init__'s.
Pipeline.__signature__ = inspect.signature(Pipeline.__init__).replace(  # type: ignore[attr-defined]
    parameters=list(inspect.signature(Pipeline.__init__).parameters.values())[1:],
    return_annotation=inspect.Signature.empty)


def _check_capacity(capacity: Any) -> int:
    if (not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < _ring.MIN_CAPACITY
            or capacity & (capacity - 1)):
        raise ValueError(f"ring_capacity must be a power of two >= {_ring.MIN_CAPACITY}, got {capacity!r}")
    return capacity

