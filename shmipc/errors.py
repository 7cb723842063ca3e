"""The exceptions shmipc raises beyond the standard ones.

Every exception of shmipc's own derives from :class:`ShmipcError`. Where the
standard library has a matching exception (``queue.Full``, ``queue.Empty``,
``EOFError``, ``BrokenPipeError``) shmipc raises that one, or a subclass of it,
so code written for :mod:`multiprocessing` keeps working.
"""
from __future__ import annotations

__all__ = [
    "ShmipcError",
    "MessageTooLarge",
    "CorruptArena",
    "CorruptMessage",
    "UndecodableMessage",
    "RingClosed",
    "ArenaClosed",
    "HandleClosed",
    "PeerDied",
    "WorkerLost",
]


class ShmipcError(Exception):
    """Base class of shmipc's own exceptions.

    Every subclass survives a pickle round trip (a task may raise one in a
    worker and the parent receives it intact): subclasses whose ``__init__``
    takes other arguments than the message define ``__reduce__``.
    """


class MessageTooLarge(ShmipcError, ValueError):
    """A message can never fit in the ring it was put into.

    Raised at once by ``put``; waiting would not help. ``size`` is the encoded
    message size and ``limit`` the largest the ring accepts, both in bytes.
    """

    def __init__(self, size: int, limit: int, capacity: int) -> None:
        self.size = size
        self.limit = limit
        self.capacity = capacity
        super().__init__(
            f"message of {size} bytes (encoded) can never fit: this ring takes at most "
            f"{limit} bytes per message (capacity {capacity} bytes; a message may use "
            f"at most half of it). Use a larger ring or split the message."
        )

    def __reduce__(self):
        return (type(self), (self.size, self.limit, self.capacity))


class CorruptArena(ShmipcError):
    """Shared memory holds something that is not a valid shmipc structure.

    Raised instead of reading or writing outside the mapping when a header,
    length, offset or tag read from shared memory is out of range.
    """


class CorruptMessage(CorruptArena):
    """A record's payload does not decode (bad lengths, offsets or dtype)."""


class UndecodableMessage(CorruptMessage):
    """A pickled message arrived but does not load in this process.

    Unpickling it raised (the original exception is ``__cause__``): a class
    this process cannot import, an exception class whose ``__init__`` takes
    other arguments than its ``args``, or bytes a peer forged. Only that one
    message is lost (and counted in the ring's ``stats()["bad_messages"]``);
    the ring, queue or connection goes on.

    Raised through :meth:`from_error`, it is also an instance of the original
    exception's type (multiprocessing's Queue and Connection raise that one),
    so both ``except UndecodableMessage`` and ``except pickle.UnpicklingError``
    (or ``AttributeError``, ``ModuleNotFoundError``...) catch it.
    """

    @classmethod
    def from_error(cls, error: BaseException, message: str) -> "UndecodableMessage":
        """This exception for `message`, made a subclass of both this class
        and ``type(error)`` (the error unpickling raised), so that ``except``
        clauses written for either catch it; a plain instance of this class
        when no such subclass can exist (``error`` is not an ``Exception``,
        or its type cannot be subclassed together with this one).
        Raise it ``from error``."""
        return _instance_with_original(cls, error, message)  # type: ignore[return-value]


# (class, original error type) -> their common subclass, or None where none can exist
_both_types: dict[tuple[type, type], type | None] = {}


def _with_original(base: type, original: type) -> type | None:
    """A subclass of `base` (an exception class of shmipc's) and of
    `original` (an error type from elsewhere), made once per pair; its
    instances take one message, print as `base`'s and pickle (see
    _rebuild_with_original). None when no such subclass can exist."""
    key = (base, original)
    if key in _both_types:
        return _both_types[key]
    both: type | None = None
    if issubclass(original, Exception) and not issubclass(base, original):
        if issubclass(original, base):
            both = original
        else:
            def __init__(self: BaseException, message: str) -> None:
                BaseException.__init__(self, message)

            def __reduce__(self: BaseException) -> tuple:
                import pickle

                try:        # a class pickle cannot name (a local one): the plain exception
                    pickle.dumps(original)
                except Exception:
                    return base, self.args
                return _rebuild_with_original, (base, original, self.args)

            try:
                both = type(base.__name__, (base, original), {
                    "__module__": base.__module__, "__qualname__": base.__qualname__,
                    "__init__": __init__, "__str__": BaseException.__str__,
                    "__reduce__": __reduce__, "original_type": original,
                    "__doc__": f"{base.__name__} that is also a {original.__qualname__}."})
            except TypeError:       # incompatible layouts, a final type
                both = None
    _both_types[key] = both
    return both


def _instance_with_original(base: type, error: BaseException, message: str) -> BaseException:
    """`base`(message), made an instance of ``type(error)`` too where it can
    be (see _with_original); a plain `base` instance otherwise."""
    both = _with_original(base, type(error))
    if both is not None:
        try:
            return both(message)
        except Exception:       # an exotic __new__: the plain exception still says it all
            pass
    return base(message)


def _rebuild_with_original(base: type, original: type, args: tuple) -> BaseException:
    both = _with_original(base, original)
    return (both or base)(*args)


class RingClosed(ShmipcError, ValueError):
    """This process closed the ring (or its arena) and then used it.

    One condition, one exception: layers above the ring catch this, not a
    bare ``ValueError`` (which user code, unpickling or bad arguments also
    raise). A ``ValueError`` subclass because multiprocessing raises
    ``ValueError`` for operations on a closed queue.
    """


class ArenaClosed(RingClosed):
    """This process closed the arena and then used it (or one of its rings)."""


class HandleClosed(RingClosed, OSError):
    """A closed queue's or connection's reader end was used where
    multiprocessing raises ``OSError`` ("handle is closed": ``SimpleQueue.get``
    after ``close()``, ``Queue.empty()`` after ``close()`` on Python 3.13+).
    Also a ``RingClosed`` (so a ``ValueError``), shmipc's one "closed"
    condition, so both kinds of ``except`` clause hold."""


class PeerDied(ShmipcError, EOFError):
    """The other end of a one-to-one channel died.

    Everything it committed before dying has been delivered; ``pid`` is the
    dead process.
    """

    def __init__(self, pid: int, role: str) -> None:
        self.pid = pid
        self.role = role
        super().__init__(f"the {role} (pid {pid}) died; nothing more will arrive from it")

    def __reduce__(self):
        return (type(self), (self.pid, self.role))


class WorkerLost(ShmipcError):
    """A worker process died while running a task.

    ``exitcode`` is the process exit status (negative: the signal number).
    """

    def __init__(self, pid: int, exitcode: int | None, task: str = "") -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.how = how = self.describe(exitcode)
        self.task = task
        super().__init__(f"worker pid {pid} {how}" + (f" while running {task}" if task else ""))

    @staticmethod
    def describe(exitcode: int | None) -> str:
        """How a process with this exit status ended: "killed by SIGKILL",
        "exited with code 3", or "lost" (None: not known)."""
        if exitcode is None:
            return "lost"
        if exitcode >= 0:
            return f"exited with code {exitcode}"
        import signal

        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"

    def __reduce__(self):
        return (type(self), (self.pid, self.exitcode, self.task))
