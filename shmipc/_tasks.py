"""What the pool engine moves: tasks, the jobs they belong to, and how a
task's outcome is rebuilt in the parent (used by :mod:`shmipc._engine`).

* :class:`_Task`: one call, or one chunk of a map, and where it is;
* the :class:`_Job` protocol: what the engine calls on the Pool's result
  objects and the executor's futures (the engine never imports them);
* :class:`Outcomes`: a result record turned into ``(ok, value)``: the
  worker's exception with its traceback as ``__cause__`` (one
  RemoteTraceback, :func:`shmipc._runtime.with_remote_traceback`), a value
  that did not cross as MaybeEncodingError (Pool) or as itself (executor);
  whatever fails to unpickle fails its own task only (the executor: with an
  error that is also BrokenProcessPool, see ``undecodable_error``);
* :func:`_run_callback`: a user's callback, which must never kill the
  bookkeeping thread.
"""
from __future__ import annotations

import itertools
import sys
import traceback
from typing import TYPE_CHECKING, Any, Callable

from shmipc._poolworker import K_CALL, R_OK, R_UNDECODABLE, R_UNENCODABLE
from shmipc._runtime import RemoteTraceback, with_remote_traceback
from shmipc._wire import unpack

if TYPE_CHECKING:
    from typing import Protocol

    class _Feeder(Protocol):
        """An imap job's input reader (shmipc.pool._Feeder): a thread."""

        job: Any

        def start(self) -> None: ...

    class _Job(Protocol):
        """What the engine calls on the job a task belongs to (the Pool's
        result objects, the executor's futures), always with its lock held;
        the engine never imports those modules."""

        _job: int                                   # a number, for messages

        def _start_task(self, task: "_Task") -> bool: ...       # False: cancelled, drop it

        def _split(self, task: "_Task", parts: list) -> None: ...   # cut into `parts` to fit

        def _deliver(self, task: "_Task", ok: bool, value: Any) -> list: ...    # callbacks to run

        def fail(self, exc: BaseException) -> list: ...        # (imap) its input failed

try:        # the standard library's class, so `except`/isinstance checks written for it keep working
    from multiprocessing.pool import MaybeEncodingError
except ImportError:         # pragma: no cover
    class MaybeEncodingError(Exception):  # type: ignore[no-redef]
        pass

__all__ = ["_Task", "Outcomes", "_run_callback", "_job_counter", "MaybeEncodingError", "RemoteTraceback"]

_job_counter = itertools.count()


class _Task:
    """A unit of work: one call, or one chunk of a map."""

    __slots__ = ("seq", "job", "index", "start", "kind", "func", "payload", "tries_left",
                 "slot", "pieces", "started", "wire")

    def __init__(self, job: "_Job", index: int, start: int, kind: int, func: Callable, payload: Any,
                 retries: int) -> None:
        self.seq = 0
        self.job = job
        self.index = index          # chunk number within the job
        self.start = start          # first item's position within the job
        self.kind = kind
        self.func = func
        self.payload = payload
        self.tries_left = retries
        self.slot = -1
        self.pieces: list | None = None     # result pieces of a split result list
        self.started = False                # the job was told (_start_task) it is under way
        self.wire: tuple | None = None      # (data, meta) once encoded, while its ring was full

    def describe(self) -> str:
        name = getattr(self.func, "__qualname__", None) or repr(self.func)
        if self.kind == K_CALL:
            return f"{name}() (job {self.job._job})"
        n = len(self.payload)
        return f"{name} on items {self.start}..{self.start + n - 1} (job {self.job._job})"


class Outcomes:
    """Turns result records into (ok, value), as the Pool (multiprocessing)
    or the executor (concurrent.futures) shows them.

    Args:
        remote_traceback: the class of an exception's __cause__ carrying the
            worker's traceback.
        wrap_encoding_errors: a value that does not cross raises
            MaybeEncodingError (True, as multiprocessing) or the pickling
            error itself (False, as concurrent.futures).
        undecodable_error: None (Pool), or ``f(error, message)`` building
            the error of a task whose arguments failed to unpickle in the
            worker, or whose result or exception failed to unpickle here
            (`error`: what unpickling raised; the executor makes it a
            BrokenProcessPool that is also ``type(error)``, as the standard
            executor breaks there). It becomes that error's ``__cause__``.
    """

    def __init__(self, remote_traceback: type = RemoteTraceback, wrap_encoding_errors: bool = True,
                 undecodable_error: Callable[[BaseException, str], BaseException] | None = None) -> None:
        self.remote_traceback = remote_traceback
        self.wrap_encoding_errors = wrap_encoding_errors
        self.undecodable_error = undecodable_error

    def decode(self, task: _Task, msg: tuple) -> tuple[bool, Any]:
        """(ok, value) from a result record; whatever fails to unpickle fails
        this task only, with a clear error."""
        _seq, status, _offset, _last, data, meta, info = msg
        try:
            value = unpack(data, meta)
        except BaseException as exc:    # SystemExit, KeyboardInterrupt from a __reduce__ too:
            if status == R_OK:          # this thread must outlive any value a task returns
                what = f"<result of {task.describe()}>"
                tb = None
            else:
                tb, what = info
            if self.undecodable_error is not None:
                with_remote_traceback(exc, tb, self.remote_traceback)
                whose = f"the result of {task.describe()}" if status == R_OK else \
                    f"the exception {what} raised by {task.describe()}"
                return False, self.undecodable(exc, f"{whose} could not be unpickled in the parent")
            return False, self.encoding_error(exc, what, tb)
        if status == R_OK:
            return True, value
        tb, what = info
        if status == R_UNENCODABLE:
            return False, self.encoding_error(value, what, tb)
        if isinstance(value, BaseException):
            with_remote_traceback(value, tb, self.remote_traceback)
            if status == R_UNDECODABLE and self.undecodable_error is not None:
                return False, self.undecodable(
                    value, f"the arguments of {task.describe()} could not be unpickled in the worker")
        return False, value

    def undecodable(self, exc: BaseException, message: str) -> BaseException:
        """The undecodable_error for `exc` (what unpickling raised), `exc` as its cause."""
        assert self.undecodable_error is not None
        try:
            text = str(exc)
        except Exception:               # a broken __str__ must not hide the real error
            text = "?"
        error = self.undecodable_error(exc, f"{message}: {type(exc).__name__}: {text}")
        error.__cause__ = exc
        return error

    def encoding_error(self, exc: BaseException, what: str, tb: str | None) -> BaseException:
        """A value that could not cross: MaybeEncodingError (Pool) or the error itself (executor)."""
        with_remote_traceback(exc, tb, self.remote_traceback)
        if not self.wrap_encoding_errors:
            return exc
        # `what` is already the value's repr (made where the value was):
        # MaybeEncodingError repr()s what it is given, so hand it something
        # whose repr is `what`, and str(error) reads as multiprocessing's
        error = MaybeEncodingError(exc, _AsRepr(what))
        error.__cause__ = exc
        return error

    def bad_task(self, task: _Task, info: tuple) -> BaseException:
        """The error for a task whose record did not decode in the worker."""
        tb, what = info
        error = RuntimeError(f"the task record of {task.describe()} could not be read in the worker: {what}")
        return with_remote_traceback(error, tb, self.remote_traceback)


class _AsRepr(str):
    """A string that is its own repr (see Outcomes.encoding_error)."""

    def __repr__(self) -> str:
        return str(self)


def _run_callback(callback: Callable[[], Any]) -> None:
    try:
        callback()
    except BaseException:
        # as multiprocessing's result handler would, but without dying: the
        # bookkeeping thread serves every later result, so even a SystemExit
        # from a user's callback (or a done-callback a future runs) is
        # reported and survived
        print("Exception in a shmipc.Pool callback:", file=sys.stderr)
        traceback.print_exc()
