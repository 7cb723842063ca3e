"""The one runtime under RayPool and RayPipeline: a group of Ray actors,
each one worker process, fed a bounded number of calls at a time, whose
deaths are noticed, charged to the one call that was running, and repaired
by starting a replacement.

Why actors we manage rather than ``ray.util.multiprocessing.Pool``: that
pool sends work round-robin to actors that are never replaced, so after one
actor is killed every later task routed to it fails too (measured: a second
``map`` on the pool fails with ActorDiedError). shmipc promises that a
worker's death costs only the task it was running; that needs the
bookkeeping below. Ray's own task retries are off (``max_task_retries=0``)
because they cannot tell "was running" from "was queued", nor count.

Invariants (kept by ActorGroup, read by both drivers):
  * an actor runs its calls one at a time, in the order submitted (a
    synchronous Ray actor with one submitter), so of the calls queued on an
    actor only the oldest is charged when it dies; the others are handed
    back to be sent again, free of charge;
  * at most `depth` calls are queued on an actor, and `depth` is 1 by
    default: with more, the actor starts its next call while Ray may still
    be sending the previous call's reply, so a kill can lose a finished
    call's result as well as the running call (seen under load: two tasks
    lost for one death). With one call at a time, a death costs exactly the
    call it was sent;
  * work is only sent to an actor once its start() returned (its setup or
    initializer ran), so a failing setup is reported once, not as task errors.
"""
from __future__ import annotations

import inspect
import os
import pickle
import traceback
import types
from collections import deque
from typing import Any, Callable, Iterable

from shmipc._runtime import MAX_STARTUP_DEATHS, instantiate

# worker roles
POOL = "pool"
STAGE = "stage"

# pool task kinds (as the shared-memory pool's)
K_CALL, K_MAP, K_STARMAP = 0, 1, 2

MAX_START_DEATHS = MAX_STARTUP_DEATHS   # replacements that die before starting, in a row (the runtime's)


def error_value(exc: BaseException) -> tuple:
    """(exception or None if it does not pickle, 'Type: message', traceback
    text) for an exception raised in a worker."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = f"{type(exc).__name__}: {exc}"
    exc.__traceback__ = None
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc = None  # type: ignore[assignment]
    return (exc, text, f'\n"""\n{tb}"""')


class Worker:
    """The actor: one process running pool tasks or one pipeline stage.
    Made a Ray actor class by :func:`actor_class` (so this module imports
    without Ray)."""

    def __init__(self, role: str, fn: Any, initializer: Callable | None, initargs: tuple) -> None:
        self._role = role
        self._fn = fn
        self._initializer = initializer
        self._initargs = initargs
        self._obj: Any = None
        self._call: Callable[[Any], Any] | None = None

    def start(self) -> tuple[int, tuple | None]:
        """Run the initializer (pool) or instantiate the stage and call its
        setup(). Returns (pid, None) or (pid, error_value)."""
        try:
            if self._role == POOL:
                if self._initializer is not None:
                    self._initializer(*self._initargs)
            else:
                self._obj, self._call = instantiate(self._fn)
                setup = getattr(self._obj, "setup", None) if self._obj is not None else None
                if setup is not None:
                    setup()
        except Exception as exc:
            return os.getpid(), error_value(exc)
        return os.getpid(), None

    def task(self, kind: int, func: Callable, payload: Any) -> tuple:
        """A pool task: (True, value) or (False, error_value). A chunk fails
        as a whole at its first error, as in multiprocessing."""
        try:
            if kind == K_CALL:
                args, kwargs = payload
                return True, func(*args, **kwargs)
            if kind == K_MAP:
                return True, [func(x) for x in payload]
            return True, [func(*x) for x in payload]
        except Exception as exc:
            return False, error_value(exc)

    def item(self, value: Any) -> tuple[tuple, Any]:
        """A pipeline item (two returns: a small status the driver reads, and
        the output(s), which can go on to the next stage without passing
        through the driver). Status: (generator?, outputs made, error_value
        or None). A generator's outputs are collected in a list; those made
        before it raised are kept."""
        assert self._call is not None
        outs: list = []
        try:
            result = self._call(value)
            del value
            if isinstance(result, types.GeneratorType):
                for out in result:
                    outs.append(out)
                return (True, len(outs), None), outs
            return (False, 1, None), result
        except Exception as exc:
            gen = bool(outs) or inspect.isgeneratorfunction(self._call)
            return (gen, len(outs), error_value(exc)), (outs if gen else None)

    def stop(self) -> None:
        """Run the stage's teardown() (the pipeline is closing)."""
        teardown = getattr(self._obj, "teardown", None) if self._obj is not None else None
        self._obj = self._call = None
        if teardown is not None:
            teardown()


_actor_classes: dict[int, Any] = {}


def actor_class(ray: Any) -> Any:
    """Worker as a Ray actor class (made once per process). Ray's restarts
    and retries are off: ActorGroup does both, knowing which call died."""
    cls = _actor_classes.get(id(ray))
    if cls is None:
        cls = _actor_classes[id(ray)] = ray.remote(max_restarts=0, max_task_retries=0)(Worker)
    return cls


# ---------------------------------------------------------------- driver side
STARTING, READY, DEAD = "starting", "ready", "dead"


class Call:
    """One call queued on an actor: `ref` is what the driver waits on,
    `extra` a second return (a stage's outputs), `job` the driver's note."""

    __slots__ = ("ref", "extra", "job")

    def __init__(self, ref: Any, extra: Any, job: Any) -> None:
        self.ref = ref
        self.extra = extra
        self.job = job


class Slot:
    """One worker of a group: its actor, pid (once started) and queued calls."""

    __slots__ = ("actor", "pid", "state", "start_ref", "calls", "ncalls")

    def __init__(self, actor: Any, start_ref: Any) -> None:
        self.actor = actor
        self.pid = 0
        self.state = STARTING
        self.start_ref = start_ref
        self.calls: deque[Call] = deque()
        self.ncalls = 0             # calls sent to this actor, for max_calls


# events ActorGroup.poll returns: (kind, group, slot, job, value)
E_DONE = "done"          # value: the call's result (an exception if Ray failed it)
E_LOST = "lost"          # the actor died running this call; value: its pid
E_REQUEUE = "requeue"    # the actor died before starting this call: send it again
E_FATAL = "fatal"        # the group cannot work; value: (pid, error_value or text)


class ActorGroup:
    """`size` actors of one role, at most `depth` calls queued on each.

    Args:
        ray: the ray module (connected).
        role, fn, initializer, initargs: what each Worker runs.
        max_calls: an actor is replaced after this many calls (None: never).
        options: Ray actor options (num_cpus=1 by default; resources, runtime_env...).
    """

    def __init__(self, ray: Any, name: str, size: int, role: str, fn: Any = None,
                 initializer: Callable | None = None, initargs: Iterable = (), depth: int = 1,
                 max_calls: int | None = None, options: dict | None = None) -> None:
        self.slots: list[Slot] = []      # set first: stop() reads it after a failed __init__
        self.ray = ray
        self.name = name
        self.role = role
        self.fn = fn
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self.depth = depth
        self.max_calls = max_calls
        self.options = {"num_cpus": 1, **(options or {})}
        self.deaths = 0
        self.start_deaths = 0            # in a row
        self._died = ray.exceptions.RayActorError
        self._cls = actor_class(ray).options(**self.options)
        self.slots = [self._new_slot() for _ in range(size)]

    def _new_slot(self) -> Slot:
        actor = self._cls.remote(self.role, self.fn, self.initializer, self.initargs)
        return Slot(actor, actor.start.remote())

    # ---------------------------------------------------------- sending
    def room(self) -> int:
        """Calls that submit() would take now."""
        return sum(self.depth - len(s.calls) for s in self.slots if self._open(s))

    def _open(self, s: Slot) -> bool:
        return (s.state == READY and len(s.calls) < self.depth
                and (self.max_calls is None or s.ncalls < self.max_calls))

    def submit(self, job: Any, method: str, *args: Any, num_returns: int = 1) -> bool:
        """Send a call to the least busy started actor; False if none has room."""
        best = None
        for s in self.slots:
            if self._open(s) and (best is None or len(s.calls) < len(best.calls)):
                best = s
        if best is None:
            return False
        fn = getattr(best.actor, method)
        if num_returns == 1:
            call = Call(fn.remote(*args), None, job)
        else:
            ref, extra = fn.options(num_returns=num_returns).remote(*args)
            call = Call(ref, extra, job)
        best.calls.append(call)
        best.ncalls += 1
        return True

    def busy(self) -> int:
        """Calls queued or running."""
        return sum(len(s.calls) for s in self.slots)

    def pids(self) -> list[int]:
        return [s.pid for s in self.slots if s.state == READY and s.pid]

    # ---------------------------------------------------------- receiving
    def waitables(self) -> dict[Any, tuple["ActorGroup", Slot]]:
        """What poll() waits on: each starting actor's start() and each
        actor's oldest call (calls finish in order, so only the oldest can
        be the next to finish)."""
        out = {}
        for s in self.slots:
            if s.state == STARTING:
                out[s.start_ref] = (self, s)
            elif s.calls:
                out[s.calls[0].ref] = (self, s)
        return out

    def _handle(self, s: Slot, events: list) -> None:
        """s's awaited ref is ready: turn it into events."""
        ray = self.ray
        if s.state == STARTING:
            try:
                pid, err = ray.get(s.start_ref)
            except self._died as exc:
                self._replace(s, events, start_failed=exc)
                return
            s.pid, s.start_ref = pid, None
            if err is not None:
                self._kill(s)           # its setup failed: it holds a CPU for nothing
                events.append((E_FATAL, self, s, None, (pid, err)))
                return
            s.state = READY
            self.start_deaths = 0
            return
        call = s.calls[0]
        try:
            value = ray.get(call.ref)
        except self._died:
            self._died_running(s, events)
            return
        except Exception as exc:     # Ray failed the call (a result that did not serialize, ...)
            value = exc
        s.calls.popleft()
        events.append((E_DONE, self, s, call, value))
        if s.state == READY and not s.calls and self.max_calls is not None and s.ncalls >= self.max_calls:
            self._retire(s)

    def _died_running(self, s: Slot, events: list) -> None:
        self.deaths += 1
        calls = list(s.calls)
        s.calls.clear()
        events.append((E_LOST, self, s, calls[0], s.pid))
        for call in calls[1:]:
            events.append((E_REQUEUE, self, s, call, None))
        self._replace(s, events)

    def _retire(self, s: Slot) -> None:
        """maxtasksperchild: end this actor (it has no call left) and start another."""
        self._kill(s)
        self._restart(s)

    def _restart(self, s: Slot) -> None:
        new = self._new_slot()
        s.actor, s.pid, s.state, s.start_ref, s.ncalls = new.actor, 0, STARTING, new.start_ref, 0

    def _replace(self, s: Slot, events: list, start_failed: BaseException | None = None) -> None:
        if start_failed is not None:
            self.deaths += 1
            self.start_deaths += 1
            if self.start_deaths >= MAX_START_DEATHS:
                s.state = DEAD
                events.append((E_FATAL, self, s, None,
                               (s.pid, f"{MAX_START_DEATHS} workers in a row died while starting "
                                       f"(last: {type(start_failed).__name__}: "
                                       f"{str(start_failed).splitlines()[0] if str(start_failed) else ''})")))
                return
        self._kill(s)
        self._restart(s)

    def _kill(self, s: Slot) -> None:
        try:
            self.ray.kill(s.actor, no_restart=True)
        except Exception:
            pass
        s.state = DEAD

    # ---------------------------------------------------------- stopping
    def stop(self, timeout: float, graceful: bool = True) -> None:
        """End every actor: with `graceful`, let each finish its queued calls
        and run teardown() (Worker.stop) for up to `timeout` seconds; then kill."""
        ray = self.ray
        if graceful and timeout > 0:
            refs = []
            for s in self.slots:
                if s.state == READY:
                    try:
                        refs.append(s.actor.stop.remote())
                    except Exception:
                        pass
            if refs:
                try:
                    ray.wait(refs, num_returns=len(refs), timeout=timeout)
                except Exception:
                    pass
        for s in self.slots:
            self._kill(s)       # also DEAD ones: killing an actor twice is harmless
            s.calls.clear()


def poll(ray: Any, groups: Iterable[ActorGroup], timeout: float) -> list:
    """Wait up to `timeout` seconds for any call or start of `groups` to
    finish; return the events of all that have (see E_*)."""
    index: dict[Any, tuple[ActorGroup, Slot]] = {}
    for g in groups:
        index.update(g.waitables())
    if not index:
        return []
    refs = list(index)
    ready, _ = ray.wait(refs, num_returns=1, timeout=timeout, fetch_local=False)
    if not ready:
        return []
    if len(refs) > 1:
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
    events: list = []
    for ref in ready:
        g, s = index[ref]
        g._handle(s, events)
    return events
