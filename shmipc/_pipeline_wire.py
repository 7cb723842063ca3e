"""What a pipeline's messages look like on its rings (its wire format).

Every item travels as an envelope ``(seq, credit, path, data, meta)`` (see
:mod:`shmipc._pipeline_sched` for seq, credit and path); messages to the
parent's output ring are ``(kind, seq, credit, path, data, meta)``.

A value is carried as ``(data, meta)``, so that a value that cannot be rebuilt
on the other side fails *its item*, never the ring read that brought it (the
envelope around it always decodes: ints, tuples, bytes, buffers):

  * meta None: ``data`` is the value itself (a native type: the ring encodes
    it without pickle, and it cannot fail to decode);
  * meta "bytes" / "bytearray": a large bytes-like value as an out-of-band
    buffer (in band, pickle would copy it once more);
  * meta (dtype.str, shape): a plain-dtype numpy array as its raw data, an
    out-of-band buffer the ring copies straight in and out (numpy's own
    pickling would cost ~6 us per hop);
  * meta "pickle": ``data`` is ``(pickle bytes, out-of-band buffers)``,
    pickled here, unpickled by :func:`unpack` (which may raise: the caller
    fails the item, naming it).
"""
from __future__ import annotations

import pickle
import sys
import traceback
from typing import Any

from shmipc.errors import ShmipcError

__all__ = ["K_RESULT", "K_DONE", "K_ERROR", "K_FATAL", "PipelineError", "RemoteTraceback",
           "pack", "unpack", "repack", "error_value", "rebuild_error"]

# output-ring record kinds: (kind, seq, credit, path, data, meta)
K_RESULT = 0     # data/meta carry a result
K_DONE = 1       # no value: returns credit (an input that yielded nothing)
K_ERROR = 2      # data is error_value(): (stage index, pickled exception or None, text, traceback)
K_FATAL = 3      # a stage's setup() failed: the pipeline cannot run

OUT_OF_BAND_MIN = 4096   # bytes: smaller bytes values are cheaper pickled in band
_NATIVE = (int, float, str, bool, type(None), complex)
_PICKLED = "pickle"

_ndarray: Any = None          # numpy.ndarray, once numpy is imported
_dtypes: dict[str, Any] = {}  # dtype.str -> dtype, for unpack


class PipelineError(ShmipcError):
    """The pipeline cannot go on (a stage's setup() failed, its workers keep
    dying at start), or an item's value or exception could not cross a
    process boundary as is (the message names the item)."""

    __module__ = "shmipc.pipeline"


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as the
    ``__cause__`` of the exception re-raised in the parent."""

    __module__ = "shmipc.pipeline"

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def pack(value: Any) -> tuple[Any, Any]:
    """(data, meta) for an envelope (see the module docstring).

    Raises:
        Whatever pickling `value` raises (PicklingError, TypeError, ...).
    """
    global _ndarray
    t = type(value)
    if t in _NATIVE or (t is bytes and len(value) < OUT_OF_BAND_MIN):
        return value, None
    if t is bytes or t is bytearray:
        if len(value) < OUT_OF_BAND_MIN:
            return _pickled(value)
        return pickle.PickleBuffer(value), t.__name__
    if _ndarray is None:
        np = sys.modules.get("numpy")
        if np is not None:
            _ndarray = np.ndarray
    if t is _ndarray and _ndarray is not None:
        dt = value.dtype
        if not (dt.hasobject or dt.fields is not None or dt.subdtype is not None):
            if not value.flags.c_contiguous:
                value = value.copy()
            return pickle.PickleBuffer(value), (dt.str, value.shape)
    return _pickled(value)


def _pickled(value: Any) -> tuple[Any, str]:
    buffers: list[pickle.PickleBuffer] = []
    blob = pickle.dumps(value, 5, buffer_callback=buffers.append)
    return (blob, tuple(buffers)), _PICKLED


def unpack(data: Any, meta: Any) -> Any:
    """The value that pack() took apart. Arrays are built over the received
    buffer, with no copy; bytes and bytearrays are copied out of it.

    Raises:
        Whatever unpickling raises (the caller fails the item).
    """
    if meta is None:
        return data
    if meta == _PICKLED:
        blob, buffers = data
        return pickle.loads(blob, buffers=buffers)
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


def repack(env: tuple) -> tuple:
    """A received envelope, ready to be put again: out-of-band data arrives
    as memoryviews, which pickle only wrapped in a PickleBuffer."""
    meta = env[4]
    if meta is None:
        return env
    data = env[3]
    if meta == _PICKLED:
        blob, buffers = data
        data = (blob, tuple(pickle.PickleBuffer(b) for b in buffers))
    elif not isinstance(data, pickle.PickleBuffer):
        data = pickle.PickleBuffer(data)
    return (*env[:3], data, meta)


def error_value(stage_index: int, exc: BaseException) -> tuple:
    """An exception raised in a worker, as K_ERROR/K_FATAL data: (stage index,
    the pickled exception or None if it does not pickle, its text, its
    traceback). The parent rebuilds it with rebuild_error()."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = f"{type(exc).__name__}: {exc}"
    exc.__traceback__ = None
    try:
        blob: bytes | None = pickle.dumps(exc, 5)
    except Exception:
        blob = None
    return (stage_index, blob, text, f'\n"""\n{tb}"""')


def rebuild_error(blob: bytes | None, text: str, tb: str, what: str) -> BaseException:
    """The exception a worker sent (error_value), with its traceback as
    __cause__; a PipelineError naming `what` if it cannot be rebuilt here."""
    exc: BaseException | None = None
    why = "not picklable"
    if blob is not None:
        try:
            exc = pickle.loads(blob)
        except Exception as err:
            why = f"could not be rebuilt: {type(err).__name__}: {err}"
        else:
            if not isinstance(exc, BaseException):
                exc, why = None, f"unpickled to a {type(exc).__name__}"
    if exc is None:
        exc = PipelineError(f"{what} raised {text} ({why}: sent as text)")
    exc.__cause__ = RemoteTraceback(tb)
    return exc

