"""shmipc.Pipeline's API on a Ray cluster: ``shmipc.Pipeline(source, cluster="ray")``.

Each stage's workers are Ray actors (one CPU each by default); the driver
(the process iterating ``results()``) reads the source, sends each item to
a worker of the first stage, and each output on to the next stage. What the
driver reads back per call is a small status (outputs made, error); the
outputs themselves stay in Ray's object store and go from one stage's node
to the next stage's directly, except a generator stage's (the driver splits
its list of outputs) and the last stage's (they are the results).
"""
from __future__ import annotations

import collections
from typing import Any, Iterable, Iterator

from shmipc._pipeline_api import DEFAULT_MAX_INFLIGHT, PipelineAPI, StageConfig
from shmipc._waiting import RAY_PIPELINE_POLL_S as POLL_S
from shmipc.cluster import connect
from shmipc.cluster._actors import E_FATAL, E_LOST, E_REQUEUE, STAGE, ActorGroup, poll
from shmipc.errors import WorkerLost

__all__ = ["RayPipeline"]



def _pipeline_names() -> tuple[Any, Any, Any]:
    """PipelineError, RemoteTraceback, StageFailure: the shared-memory
    pipeline's own classes, so `except` clauses written for it still match."""
    from shmipc.pipeline import PipelineError, RemoteTraceback, StageFailure

    return PipelineError, RemoteTraceback, StageFailure


class _Raise:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _Unit:
    """One input waiting for, or at, a stage: item `seq`, its `path` through
    generator stages, the value (or a Ray reference to it) and tries so far."""

    __slots__ = ("stage", "seq", "path", "arg", "tries")

    def __init__(self, stage: int, seq: int, path: tuple, arg: Any) -> None:
        self.stage = stage
        self.seq = seq
        self.path = path
        self.arg = arg
        self.tries = 0


class _Stage(StageConfig):
    def __init__(self, index: int, fn: Any, workers: int, ordered: bool, on_error: str,
                 retries: int, name: str, options: dict) -> None:
        super().__init__(index, fn, workers, ordered, on_error, retries, name)
        self.options = options
        self.group: ActorGroup | None = None
        self.pending: collections.deque[_Unit] = collections.deque()


class RayPipeline(PipelineAPI):
    """``shmipc.Pipeline``'s API with its stages' workers on a Ray cluster.
    Made by ``shmipc.Pipeline(source, ..., cluster="ray")`` (see
    :mod:`shmipc.cluster` for the values of `cluster`).

    Args:
        source: any iterable (may be infinite); read lazily by the driver,
            only as fast as the pipeline drains.
        max_inflight: most source items inside the pipeline at once (read
            but not yet yielded): bounds the reorder buffer and memory.
        on_error, retries, stop_timeout: as the shared-memory Pipeline.
        ring_capacity: accepted and ignored (there are no rings: Ray's object
            store carries the items, with no size limit per message).
        cluster: where to run (see shmipc.cluster).
        ray_options: Ray actor options for every worker (default one CPU
            each); per stage: ``stage(..., ray_options=)``.

    The same as on one machine: stages of functions, generator functions
    and classes with setup()/process()/teardown() (one instance per worker),
    ``workers=``, ``ordered=``, ``on_error=`` ("raise" in source order,
    "skip", "collect" into ``errors``), ``retries=``, backpressure
    (``max_inflight``), ``results(progress=True)``, early close() (also by
    leaving the loop) of an infinite source, ``errors``, ``stats()``,
    ``worker_pids()``. A worker killed while processing an item costs that
    item (WorkerLost under on_error) or a retry on a fresh worker.

    What differs on Ray:
      * items, outputs, stages and errors are pickled (cloudpickle) to reach
        workers on other processes or nodes: a stage cannot be a closure
        over unpicklable state (it can be a lambda);
      * a generator stage's outputs for one item are sent on together when
        the generator finishes (one list), not one by one: an item may fan
        out to as many outputs as fit in memory, not endlessly;
      * a generator item whose worker dies is retried whole (no output of
        it had left the worker), where one machine does not retry it;
      * ``zero_copy=`` is accepted and ignored: Ray already hands numpy
        arrays to workers as read-only views of its object store (results
        that are arrays are read-only too: copy one before writing to it);
      * each worker holds one CPU of the cluster while the pipeline runs:
        more workers than the cluster has CPUs for raises ValueError at
        results() (Ray would wait forever for the missing CPUs).
    """

    _closed = False
    _started = False

    def __init__(self, source: Iterable[Any], *, ring_capacity: int | None = None,
                 max_inflight: int = DEFAULT_MAX_INFLIGHT, on_error: str = "raise",
                 retries: int = 0, stop_timeout: float = 1.0, cluster: str = "ray",
                 ray_options: dict | None = None) -> None:
        self._take_options(source, max_inflight, on_error, retries, stop_timeout)
        from shmipc.cluster import check_cluster

        check_cluster(cluster)      # a bad value fails here, not at results()
        self._cluster = cluster
        self._ray_options = dict(ray_options or {})
        self._ray: Any = None

    # ------------------------------------------------------------ building
    def stage(self, fn: Any, workers: int = 1, *, ordered: bool = True, on_error: str | None = None,
              retries: int | None = None, ring_capacity: int | None = None,
              name: str | None = None, zero_copy: bool = False,
              ray_options: dict | None = None) -> "RayPipeline":
        """Add a stage; returns the pipeline (as shmipc.Pipeline.stage;
        ring_capacity and zero_copy are accepted and ignored on Ray;
        ray_options: Ray actor options for this stage's workers)."""
        on_error, retries, name = self._stage_options(fn, workers, on_error, retries, name)
        options = {**self._ray_options, **(ray_options or {})}
        self._stages.append(_Stage(len(self._stages), fn, workers, bool(ordered), on_error, retries,
                                   str(name), options))
        return self

    # ------------------------------------------------------------ results
    def _fill_levels(self) -> dict[str, str]:
        """Each stage's backlog: items waiting + in its workers (the
        bottleneck is the stage with the largest)."""
        return {s.name: f"{len(s.pending)}+{s.group.busy() if s.group else 0}" for s in self._stages}

    def worker_pids(self) -> dict[str, list[int]]:
        """The started workers' pids (on their nodes), by stage name."""
        return {s.name: (s.group.pids() if s.group else []) for s in self._stages}

    def stats(self) -> dict[str, Any]:
        """Items fed and completed, errors collected; per stage: workers,
        deaths, items waiting and in the workers."""
        out: dict[str, Any] = {"fed": getattr(self, "_next_seq", 0),
                               "completed": getattr(self, "_ncomplete", 0),
                               "errors": len(self.errors), "late_dropped": 0, "stages": []}
        for s in self._stages:
            out["stages"].append({"name": s.name, "workers": s.workers,
                                  "deaths": s.group.deaths if s.group else 0,
                                  "waiting": len(s.pending), "in_workers": s.group.busy() if s.group else 0})
        return out

    # ------------------------------------------------------------ start
    def _start(self) -> None:
        ray = connect(self._cluster)
        cpus = float(ray.cluster_resources().get("CPU", 0))
        need = sum(s.workers * float(s.options.get("num_cpus", 1)) for s in self._stages)
        if need > cpus:
            raise ValueError(f"the pipeline's {sum(s.workers for s in self._stages)} workers need "
                             f"{need:g} CPUs; the Ray cluster has {cpus:g} (use fewer workers, or "
                             f"ray_options={{'num_cpus': ...}})")
        self._ray = ray
        self._started = True
        # The driver's state. Invariants (between two steps of _iterate):
        #   * every seq in [0, _next_seq) was read from the source once; while
        #     unfinished, _units[seq] counts its inputs waiting at or running in
        #     a stage; at 0 the item is finished (counted in _ncomplete);
        #   * ordered: seqs < _emit_seq are yielded; a finished seq >= _emit_seq
        #     waits in _complete, its results in _held; _next_seq - _emit_seq
        #     <= max_inflight bounds both;
        #   * unordered: _next_seq - _ncomplete <= max_inflight.
        self._next_seq = 0
        self._emit_seq = 0
        self._ncomplete = 0
        self._exhausted = False
        self._ordered = all(s.ordered for s in self._stages)
        self._units: dict[int, int] = {}
        self._held: dict[int, list] = {}
        self._failed: dict[int, BaseException] = {}
        self._complete: set[int] = set()
        self._ready: list[Any] = []
        try:
            for s in self._stages:
                s.group = ActorGroup(ray, s.name, s.workers, STAGE, s.fn, options=s.options)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ the driver loop
    def _iterate(self) -> Iterator[Any]:
        ray = self._ray
        groups = [s.group for s in self._stages]
        ready = self._ready
        try:
            while not self._closed:
                self._feed()
                self._dispatch()
                if self._exhausted and self._next_seq == self._ncomplete and not ready:
                    return
                for event in poll(ray, groups, POLL_S):
                    self._handle(event)
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

    def _feed(self) -> None:
        """Read source items while fewer than max_inflight are inside."""
        first = self._stages[0]
        while not self._exhausted:
            done = self._emit_seq if self._ordered else self._ncomplete
            if self._next_seq - done >= self._max_inflight:
                return
            # no further ahead than the first stage can take soon: the source
            # is read as the pipeline drains, not max_inflight items at once
            if len(first.pending) >= 2 * first.workers:
                return
            try:
                item = next(self._source)
            except StopIteration:
                self._exhausted = True
                return
            seq = self._next_seq
            self._next_seq = seq + 1
            self._units[seq] = 1
            first.pending.append(_Unit(0, seq, (), item))

    def _dispatch(self) -> None:
        for s in self._stages:
            g = s.group
            assert g is not None
            while s.pending and g.room():
                u = s.pending[0]
                g.submit(u, "item", u.arg, num_returns=2)
                s.pending.popleft()

    def _handle(self, event: tuple) -> None:
        kind, group, slot, call, value = event
        if kind == E_FATAL:
            PipelineError, RemoteTraceback, _ = _pipeline_names()
            pid, err = value
            if isinstance(err, tuple):
                e = PipelineError(f"setup of stage {group.name!r} failed: {err[1]}")
                e.__cause__ = RemoteTraceback(err[2])
            else:
                e = PipelineError(f"stage {group.name!r} cannot start: {err}")
            raise e
        u: _Unit = call.job
        s = self._stages[u.stage]
        if kind == E_REQUEUE:
            s.pending.appendleft(u)
            return
        if kind == E_LOST:
            if u.tries < s.retries:
                u.tries += 1
                s.pending.appendleft(u)
            else:
                self._error(s, u.seq, WorkerLost(value, None, task=f"item {u.seq} of stage {s.name!r}"), "")
                self._done_unit(u.seq)
            return
        # E_DONE: value is the status (generator?, outputs made, error)
        if not isinstance(value, tuple):     # Ray failed the call itself
            self._error(s, u.seq, value, "")
            self._done_unit(u.seq)
            return
        gen, n, err = value
        if n:
            outs = self._ray.get(call.extra) if (gen or s.index + 1 == len(self._stages)) else call.extra
            if not gen:
                outs = [outs]
            last = s.index + 1 == len(self._stages)
            for i, out in enumerate(outs):
                path = u.path + (i,) if gen else u.path
                if last:
                    self._result(u.seq, path, out)
                else:
                    self._units[u.seq] += 1
                    self._stages[s.index + 1].pending.append(_Unit(s.index + 1, u.seq, path, out))
        if err is not None:
            exc, text, tb = err
            PipelineError, RemoteTraceback, _ = _pipeline_names()
            if exc is None:
                exc = PipelineError(f"stage {s.name!r} raised {text} (not picklable: sent as text)")
            exc.__cause__ = RemoteTraceback(tb)
            self._error(s, u.seq, exc, tb)
        self._done_unit(u.seq)

    def _result(self, seq: int, path: tuple, value: Any) -> None:
        if self._ordered:
            self._held.setdefault(seq, []).append((path, value))
        else:
            self._ready.append(value)

    def _error(self, s: _Stage, seq: int, exc: BaseException, tb: str) -> None:
        if s.on_error == "raise":
            if self._ordered:
                self._failed.setdefault(seq, exc)
            else:
                self._ready.append(_Raise(exc))
        elif s.on_error == "collect":
            _, _, StageFailure = _pipeline_names()
            self.errors.append(StageFailure(s.name, seq, exc, tb))

    def _done_unit(self, seq: int) -> None:
        left = self._units[seq] - 1
        if left:
            self._units[seq] = left
            return
        del self._units[seq]
        self._ncomplete += 1
        if not self._ordered:
            return
        self._complete.add(seq)
        while self._emit_seq in self._complete:
            e = self._emit_seq
            self._complete.discard(e)
            held = self._held.pop(e, None)
            if held:
                held.sort(key=lambda pair: pair[0])
                self._ready.extend(v for _, v in held)
            exc = self._failed.pop(e, None)
            if exc is not None:
                self._ready.append(_Raise(exc))
            self._emit_seq = e + 1

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Stop every worker: each finishes what it holds and runs teardown()
        for up to stop_timeout seconds, then is killed. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for s in self._stages:
            if s.group is not None:
                s.group.stop(self._stop_timeout)
            s.pending.clear()

    def __repr__(self) -> str:
        stages = " -> ".join(f"{s.name}x{s.workers}" for s in self._stages) or "no stages"
        state = "closed" if self._closed else ("running" if self._started else "new")
        return f"<shmipc.cluster.RayPipeline {stages} {state}>"
