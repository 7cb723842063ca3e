"""The wire format for task data: how a value crosses between a parent and
its workers (Pool, ProcessPoolExecutor, Pipeline), one definition for all.

A value travels as a pair ``(data, meta)`` inside a small record tuple (a
pool task ``(seq, kind, data, meta)``, a result ``(seq, status, offset, last,
data, meta, info)``, a pipeline envelope ``(seq, credit, path, data, meta)``).
The ring encodes that tuple itself (pickle protocol 5, out-of-band buffers
written straight into shared memory); ``data`` holds only what always
decodes (ints, floats, str, bytes, None, tuples of those, buffers), so a
record is never lost to a value: a value that fails to pickle fails at
:func:`pack`, one that fails to unpickle at :func:`unpack`, and the caller
fails *that task or item*, never the batch or the ring read that brought it.

``meta`` says how ``data`` holds the value:

  ==============  =========================================================
  ``None``        ``data`` is the value: int, float, complex, str, bool,
                  None, or bytes shorter than :data:`OUT_OF_BAND_MIN` (the
                  ring carries them natively, no pickle)
  ``M_BYTES``,    a bytes / bytearray of :data:`OUT_OF_BAND_MIN` or more:
  ``M_BYTEARRAY`` ``data`` is its buffer, out of band (written once into
                  the ring, copied once out of it)
  ``(M_NDARRAY,   a numpy array of a plain dtype (no objects, fields or
  descr, shape)`` subarrays): ``data`` is its C-ordered raw buffer, out of
                  band; ``descr`` is ``dtype.str`` (numpy's own pickling
                  costs ~6 us a hop)
  ``(M_BLOBS,     a list of bytes objects of which at least one is large
  index)``        (map chunks of images, files, records): ``data`` is the
                  tuple of its *distinct* objects (large ones out of band),
                  ``index`` the position of each item's object in it, or
                  None when all differ (a list repeating one object costs
                  one copy, as pickle's memo would give)
  ``M_INT64``     a list of plain ints (exactly ``int``, within int64; map
                  chunks and their results only): ``data`` is their native
                  int64s, ~3x cheaper to pack and ~1.5x to rebuild than pickle
  ``M_PICKLE``    anything else: ``data`` is ``(stream, buffers)``, pickle
                  protocol 5 with multiprocessing's reducers; contiguous
                  buffers (numpy arrays inside, large bytes inside a list or
                  a tuple) out of band, and the stream itself too when it
                  is :data:`IN_BAND_STREAM_MAX` or longer
  ==============  =========================================================

An exception crosses as ``(pickled exception or None, text, traceback
text)`` (:func:`pack_error`): it is always delivered, as itself when it
unpickles on the other side, as text otherwise.

Everything in ``(data, meta)`` comes from another process and is checked
before use: a record whose meta or data do not match raises
:class:`~shmipc.errors.CorruptMessage` naming the numbers (that fails the
task, as an unpicklable value does); nothing is allocated from an unchecked
length.

Measured, and therefore not done: lists of ints or floats sent as int64 /
float64 arrays. Pickle already encodes a list of small ints at ~14-18 ns
and decodes it at ~23-38 ns an item; ``array('q', items)`` costs ~33 ns
and ``tolist()`` ~23 ns, and checking that every item is exactly an int (a
bool or an IntEnum must come back as itself) costs ~18-35 ns more
(``set(map(type, items))``, ``operator.countOf``): no gain (measured again
on 2026-11-30, 2-core VM). Only a compiled codec (a C loop checking
``PyLong_CheckExact`` and storing int64, ~3 ns an item; building the ints
back, ~10 ns) would beat pickle; see benchmarks/bench_pool_floor.py for
what the codec costs against the rest of a map.
"""
from __future__ import annotations

import copyreg
import functools
import io
import pickle
import sys
import traceback
import types
from multiprocessing.pool import RemoteTraceback  # one class for pools and pipelines (see shmipc._runtime)
from multiprocessing.reduction import ForkingPickler
from typing import Any

from shmipc._ring import blob_table, pack_int64_list, unpack_int64_list
from shmipc.errors import CorruptMessage, ShmipcError

__all__ = ["OUT_OF_BAND_MIN", "IN_BAND_STREAM_MAX", "M_PICKLE", "M_BYTES", "M_BYTEARRAY",
           "M_NDARRAY", "M_BLOBS", "M_INT64", "pack", "pack_items", "pack_pickled", "unpack", "rewrap",
           "dumps", "pack_error", "unpack_error", "pack_task", "unpack_task", "format_traceback", "detach",
           "out_of_band_bytes",
           # pipeline records
           "K_RESULT", "K_DONE", "K_ERROR", "K_FATAL", "PipelineError", "RemoteTraceback",
           "repack", "error_value", "rebuild_error"]

# A bytes value (or a buffer inside a pickle) of this size or more travels
# out of band: written once into the ring instead of copied into a pickle
# stream first. Below it, the extra copy costs less than a buffer segment
# (a PickleBuffer, a callback, 16-byte alignment). One threshold for pools
# and pipelines (they had 16 KiB and 4 KiB).
OUT_OF_BAND_MIN = 16 << 10
# a pickle stream this long or longer is handed to the ring as a buffer
# (written once, straight into shared memory) rather than as bytes the
# record's own pickle would copy again
IN_BAND_STREAM_MAX = 16 << 10

M_PICKLE = 0
M_BYTES = 1
M_BYTEARRAY = 2
M_NDARRAY = 3
M_BLOBS = 4
M_CALL_ITEMS = 5      # a pool task: data (pickled function, items' data), meta (M_CALL_ITEMS, items' meta)
M_INT64 = 6           # a list of plain ints: data their native int64s (shmipc._ring.pack_int64_list)

_FunctionType = types.FunctionType
_BuiltinFunctionType = types.BuiltinFunctionType
_NATIVE = frozenset((int, float, complex, str, bool, type(None)))
_ndarray: Any = None              # numpy.ndarray, once numpy is imported
_dtypes: dict[str, Any] = {}      # descr -> dtype, for unpack (bounded: see _dtype)


# ---------------------------------------------------------------------- pickling
_table: dict | None = None        # copyreg's reducers plus multiprocessing's (ForkingPickler's)
_table_extra: dict | None = None  # ForkingPickler._extra_reducers when _table was built


def _dispatch_table() -> dict:
    """As ForkingPickler's (sockets, connections, whatever libraries register
    there), built once instead of per pickler."""
    global _table, _table_extra
    extra = ForkingPickler._extra_reducers
    if _table is None or _table_extra != extra:
        table = copyreg.dispatch_table.copy()
        table.update(extra)
        _table, _table_extra = table, dict(extra)
    return _table


def _keep_out_of_band(buffers: list, pb: pickle.PickleBuffer) -> bool:
    try:
        raw = pb.raw()
    except BufferError:
        return True                     # not contiguous: pickle copies it in band
    if raw.nbytes < OUT_OF_BAND_MIN:
        return True
    buffers.append(pickle.PickleBuffer(raw))
    return False


def dumps(obj: Any) -> tuple[Any, tuple]:
    """``(stream, buffers)``: `obj` pickled as multiprocessing does, protocol
    5, large contiguous buffers out of band (see the module docstring).

    Raises:
        Whatever pickling raises (PicklingError, TypeError, ...).
    """
    buffers: list = []
    out = io.BytesIO()
    pickler = pickle.Pickler(out, 5, buffer_callback=functools.partial(_keep_out_of_band, buffers))
    pickler.dispatch_table = _dispatch_table()
    pickler.dump(obj)
    if out.tell() < IN_BAND_STREAM_MAX:
        return out.getvalue(), tuple(buffers)
    # the value, not a view (see _framing.dump_parts: no copy either way, and
    # a view would keep the BytesIO exported for as long as it lives)
    return pickle.PickleBuffer(out.getvalue()), tuple(buffers)


class _Blob:
    """A large bytes object inside a pickled container: pickle protocol 5
    hands its buffer to the ring out of band, and it unpickles as plain
    bytes. The same object wrapped once per pickle, so repeats are memoized."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce_ex__(self, protocol: Any) -> tuple:
        if isinstance(protocol, int) and protocol >= 5:
            return bytes, (pickle.PickleBuffer(self.data),)
        return bytes, (self.data,)


# ---------------------------------------------------------------------- packing
def pack(value: Any) -> tuple[Any, Any]:
    """``(data, meta)`` for one value (see the module docstring).

    Raises:
        Whatever pickling `value` raises (PicklingError, TypeError, ...).
    """
    t = type(value)
    if t in _NATIVE:
        return value, None
    if t is bytes or t is bytearray:
        if len(value) < OUT_OF_BAND_MIN:
            return (value, None) if t is bytes else pack_pickled(value)
        return pickle.PickleBuffer(value), (M_BYTES if t is bytes else M_BYTEARRAY)
    if t is _array_type():
        dt = value.dtype
        if not (dt.hasobject or dt.fields is not None or dt.subdtype is not None):
            if not value.flags.c_contiguous:
                value = value.copy()
            # as bytes: the buffer protocol refuses some dtypes (datetime64)
            raw = value.reshape(-1).view("u1") if value.size else b""
            return pickle.PickleBuffer(raw), (M_NDARRAY, dt.str, value.shape)
    return pack_pickled(value)


def pack_items(items: Any) -> tuple[Any, Any]:
    """``(data, meta)`` for a list of items (a map chunk, its results): a
    list of bytes with large ones as M_BLOBS, any other list pickled, its
    large bytes out of band (repeats of one object sent once).

    Raises:
        Whatever pickling an item raises.
    """
    if type(items) is list and items and type(items[0]) is int:
        # ints as int64s: cheaper both ways than pickle (see _ring's
        # pack_int64_list); any other item, or one out of range, and it is None
        raw = pack_int64_list(items)
        if raw is not None:
            return raw, M_INT64
    if type(items) is not list or not items or type(items[0]) in _NATIVE:
        return pack_pickled(items)          # (chunks of numbers and strings: no scan)
    if type(items[0]) is not bytes:
        return pack_pickled(_blobs_once(items))
    # (in C: whether every item is bytes, whether any is large, which repeat)
    table = blob_table(items, OUT_OF_BAND_MIN)
    if table is None:
        return pack_pickled(_blobs_once(items))
    if table is False:
        return pack_pickled(items)
    distinct, index = table
    return tuple([pickle.PickleBuffer(x) if len(x) >= OUT_OF_BAND_MIN else x for x in distinct]), (M_BLOBS, index)


def _blobs_once(items: list) -> list:
    """`items` with each large bytes object replaced by one _Blob per object
    (so pickle's memo sends a repeated object once); `items` itself if it
    holds none."""
    wrapped: dict[int, _Blob] = {}
    out = None
    for i, x in enumerate(items):
        if type(x) is bytes and len(x) >= OUT_OF_BAND_MIN:
            if out is None:
                out = list(items[:i])
            blob = wrapped.get(id(x))
            if blob is None:
                blob = wrapped[id(x)] = _Blob(x)
            out.append(blob)
        elif out is not None:
            out.append(x)
    return items if out is None else out


def pack_pickled(value: Any) -> tuple[Any, int]:
    """``(data, M_PICKLE)``: `value` pickled whatever its type (exceptions,
    call arguments).

    Raises:
        Whatever pickling raises.
    """
    return dumps(value), M_PICKLE


# ---------------------------------------------------------------------- unpacking
def unpack(data: Any, meta: Any, copy: bool = False) -> Any:
    """The value :func:`pack` or :func:`pack_items` took apart.

    Args:
        copy: the buffers in `data` are views of memory that will be reused
            (a ring's zero-copy view): copy what the value keeps. Otherwise
            arrays are built over the received buffers, without a copy.

    Raises:
        CorruptMessage: `meta` and `data` do not match (a forged or damaged
            record), with the numbers.
        Whatever unpickling raises (a class this process cannot import, a
        ``__setstate__`` that fails, ...).
    """
    if meta is None:
        if type(data) not in _NATIVE and type(data) is not bytes:
            raise CorruptMessage(f"a native value of type {type(data).__name__} is not a native type")
        return data
    if meta == M_PICKLE:
        if type(data) is not tuple or len(data) != 2 or type(data[1]) is not tuple:
            raise CorruptMessage(f"a pickled value is {_shape(data)}, expected (stream, buffers)")
        stream, buffers = data
        if copy:
            buffers = tuple(bytearray(b) for b in buffers)
        return pickle.loads(stream, buffers=buffers)
    if meta == M_BYTES or meta == M_BYTEARRAY:
        if type(data) is (bytes if meta == M_BYTES else bytearray):
            return data                 # (detached: already its own copy)
        buf = _buffer(data, "a bytes value")
        return bytes(buf) if meta == M_BYTES else bytearray(buf)
    if meta == M_INT64:
        return unpack_int64_list(data)
    if type(meta) is tuple and meta and meta[0] == M_BLOBS:
        return _unpack_blobs(data, meta)
    if type(meta) is tuple and len(meta) == 3 and meta[0] == M_NDARRAY:
        return _unpack_array(data, meta[1], meta[2], copy)
    raise CorruptMessage(f"unknown value encoding {meta!r:.80}")


def _shape(data: Any) -> str:
    if type(data) is tuple:
        return f"a tuple of {len(data)}"
    return f"a {type(data).__name__}"


def _buffer(data: Any, what: str) -> memoryview:
    try:
        mv = memoryview(data)
    except TypeError:
        raise CorruptMessage(f"{what} arrived as a {type(data).__name__}, not a buffer") from None
    if mv.ndim != 1 or mv.itemsize != 1:
        if not mv.c_contiguous:
            raise CorruptMessage(f"{what} arrived as a buffer that is not contiguous")
        mv = mv.cast("B") if mv.nbytes else memoryview(b"")
    return mv


def _unpack_blobs(data: Any, meta: tuple) -> list:
    if type(data) is not tuple or len(meta) != 2:
        raise CorruptMessage(f"a list of bytes is {_shape(data)} with meta {meta!r:.80}")
    distinct = [x if type(x) is bytes else bytes(_buffer(x, "a list item")) for x in data]
    index = meta[1]
    if index is None:
        return distinct
    if type(index) is not tuple:
        raise CorruptMessage(f"a list of bytes has an index of type {type(index).__name__}")
    n = len(distinct)
    try:
        if index and (min(index) < 0 or max(index) >= n):
            raise IndexError
        return [distinct[k] for k in index]
    except (IndexError, TypeError):
        bad = next((k for k in index if type(k) is not int or not 0 <= k < n), None)
        raise CorruptMessage(f"a list of bytes refers to item {bad!r:.40} of {n}") from None


def _unpack_array(data: Any, descr: Any, shape: Any, copy: bool) -> Any:
    np = sys.modules.get("numpy")
    if np is None:
        import numpy as np
    dtype = _dtype(np, descr)
    if type(shape) is not tuple or not all(type(d) is int and d >= 0 for d in shape) or len(shape) > 64:
        raise CorruptMessage(f"an array arrived with the shape {shape!r:.80}")
    buf = _buffer(data, "an array")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != buf.nbytes:
        raise CorruptMessage(f"an array of shape {shape} and dtype {dtype} needs "
                             f"{count * dtype.itemsize} bytes, {buf.nbytes} arrived")
    arr = np.frombuffer(buf, dtype) if count else np.empty(0, dtype)
    if copy:
        arr = arr.copy()
    return arr if len(shape) == 1 else arr.reshape(shape)


def _dtype(np: Any, descr: Any) -> Any:
    dtype = _dtypes.get(descr)
    if dtype is None:
        if type(descr) is not str or len(descr) > 32:
            raise CorruptMessage(f"an array arrived with the dtype {descr!r:.40}")
        try:
            dtype = np.dtype(descr)
        except Exception as exc:
            raise CorruptMessage(f"an array arrived with the dtype {descr!r}: {exc}") from None
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise CorruptMessage(f"an array arrived with the dtype {descr!r}, not a plain one")
        if len(_dtypes) < 256:
            _dtypes[descr] = dtype
    return dtype


def _array_type() -> Any:
    global _ndarray
    if _ndarray is None:
        np = sys.modules.get("numpy")
        if np is None:
            return None             # numpy not imported: nothing can be an array
        _ndarray = np.ndarray
    return _ndarray


def detach(record: Any) -> Any:
    """A record taken as a zero-copy view of a ring (``ring.get_view()``),
    with every buffer in it copied out, into the form its value needs (a
    bytes item becomes its final bytes object, a pickle's buffers
    bytearrays that arrays may keep): one copy from the ring, where taking
    the record copied (``get``) costs two. Call it inside the view's block.
    A ``(..., data, meta)`` record of a task or a result is handled by its
    meta; anything else by copying each buffer found (nothing is decoded)."""
    if type(record) is not tuple or len(record) < 2:
        return _owned(record, 0)
    if len(record) == 4:                # a task: (seq, kind, data, meta)
        return (*record[:2], *_detach_value(record[2], record[3]))
    return _owned(record, 0)


def _detach_value(data: Any, meta: Any) -> tuple[Any, Any]:
    if type(meta) is tuple and len(meta) == 2 and meta[0] == M_CALL_ITEMS \
            and type(data) is tuple and len(data) == 2:
        return (_owned(data[0], 0), _detach_value(data[1], meta[1])[0]), meta
    if isinstance(data, memoryview):
        if meta == M_BYTES:
            return bytes(data), meta
        return bytearray(data), meta
    if type(meta) is tuple and meta and meta[0] == M_BLOBS and type(data) is tuple:
        return tuple(bytes(x) if isinstance(x, memoryview) else _owned(x, 0) for x in data), meta
    if meta == M_PICKLE and type(data) is tuple and len(data) == 2 and type(data[1]) is tuple:
        stream, buffers = data
        return (bytes(stream) if isinstance(stream, memoryview) else _owned(stream, 0),
                tuple(bytearray(b) if isinstance(b, memoryview) else _owned(b, 0) for b in buffers)), meta
    return _owned(data, 0), meta


def _owned(obj: Any, depth: int) -> Any:
    """`obj` with any memoryview in it (tuples, 8 levels at most: records
    are shallow) replaced by a bytearray copy."""
    if isinstance(obj, memoryview):
        return bytearray(obj)
    if type(obj) is tuple and depth < 8:
        return tuple(_owned(x, depth + 1) for x in obj)
    return obj


def rewrap(data: Any, meta: Any) -> tuple[Any, Any]:
    """A received ``(data, meta)``, ready to be put again unchanged: buffers
    arrive as memoryviews, which the ring sends out of band only wrapped in
    a PickleBuffer."""
    if meta is None:
        return data, meta
    if meta == M_PICKLE:
        stream, buffers = data
        if isinstance(stream, memoryview):
            stream = pickle.PickleBuffer(stream)
        return (stream, tuple(pickle.PickleBuffer(b) for b in buffers)), meta
    if type(meta) is tuple and meta[0] == M_BLOBS:
        return tuple(x if type(x) is bytes else pickle.PickleBuffer(x) for x in data), meta
    if not isinstance(data, pickle.PickleBuffer):
        data = pickle.PickleBuffer(data)
    return data, meta


# ---------------------------------------------------------------------- pool tasks


def pack_task(func: Any, payload: Any, items: bool) -> tuple[Any, Any]:
    """``(data, meta)`` for a pool task: `func` with its `payload`, a list of
    items (map, starmap: encoded as by pack_items, so a chunk of bytes
    travels as M_BLOBS) if `items`, else a call's ``(args, kwargs)``.

    Raises:
        Whatever pickling the function or the payload raises.
    """
    if not items:
        return pack_pickled((func, payload))
    fn, buffers = _dumps_function(func)
    if buffers or type(fn) is not bytes:        # (a function with large data attached)
        return pack_pickled((func, payload))
    data, meta = pack_items(payload)
    return (fn, data), (M_CALL_ITEMS, meta)


def out_of_band_bytes(data: Any, meta: Any) -> int:
    """How many bytes the large items of a map chunk from pack_task (M_BLOBS)
    take in a message at least (0 for any other encoding): a chunk whose
    items alone cannot fit is known to be too large without encoding it."""
    if type(meta) is tuple and len(meta) == 2 and meta[0] == M_CALL_ITEMS \
            and type(meta[1]) is tuple and meta[1] and meta[1][0] == M_BLOBS:
        return sum(map(len, map(memoryview, data[1])))
    return 0


def _dumps_function(func: Any) -> tuple[Any, tuple]:
    """:func:`dumps` of a task's function. A plain function pickles by
    reference (its module and name), the same with or without
    multiprocessing's reducers unless one is registered for its type: then
    ``pickle.dumps`` gives the same bytes without a Pickler set up per task
    (~4 us, paid for every chunk of a map)."""
    t = type(func)
    if (t is _FunctionType or t is _BuiltinFunctionType) and t not in _dispatch_table():
        return pickle.dumps(func, 5), ()
    return dumps(func)


def unpack_task(data: Any, meta: Any, copy: bool = False) -> tuple[Any, Any]:
    """``(func, payload)`` from pack_task's ``(data, meta)``.

    Raises:
        CorruptMessage: a malformed record. Whatever unpickling raises.
    """
    if type(meta) is tuple and len(meta) == 2 and meta[0] == M_CALL_ITEMS:
        if type(data) is not tuple or len(data) != 2 or type(data[0]) is not bytes:
            raise CorruptMessage(f"a task arrived as {_shape(data)}, expected (function, items)")
        return pickle.loads(data[0]), unpack(data[1], meta[1], copy)
    value = unpack(data, meta, copy)
    if type(value) is not tuple or len(value) != 2:
        raise CorruptMessage(f"a task decoded to {_shape(value)}, expected (function, payload)")
    return value


# ---------------------------------------------------------------------- exceptions
def format_traceback(exc: BaseException) -> str:
    """The traceback text of `exc` as it is shown as a remote traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return f'\n"""\n{tb}"""'


def pack_error(exc: BaseException) -> tuple[bytes | None, str, str]:
    """``(pickled exception or None, text, traceback text)``: an exception
    raised on this side, in a form that always crosses (the pickle is None
    when the exception does not pickle)."""
    tb = format_traceback(exc)
    text = f"{type(exc).__name__}: {exc}"
    exc.__traceback__ = None
    try:
        out = io.BytesIO()
        pickler = pickle.Pickler(out, 5)        # in band: the blob travels as plain bytes
        pickler.dispatch_table = _dispatch_table()
        pickler.dump(exc)
        blob: bytes | None = out.getvalue()
    except Exception:
        blob = None
    return blob, text, tb


def unpack_error(blob: bytes | None, text: str, what: str,
                 fallback: type[BaseException]) -> BaseException:
    """The exception :func:`pack_error` sent; if it cannot be rebuilt here,
    a `fallback` naming `what` and carrying the text."""
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
        exc = fallback(f"{what} raised {text} ({why}: sent as text)")
    return exc


# ---------------------------------------------------------------------- pipeline records
# Every item travels as an envelope ``(seq, credit, path, data, meta)`` (see
# shmipc._pipeline_sched for seq, credit and path); messages to the parent's
# output ring are ``(kind, seq, credit, path, data, meta)``, with kind:
K_RESULT = 0     # data/meta carry a result
K_DONE = 1       # no value: returns credit (an input that yielded nothing)
K_ERROR = 2      # data is error_value(): (stage index, pickled exception or None, text, traceback)
K_FATAL = 3      # a stage's setup() failed: the pipeline cannot run


class PipelineError(ShmipcError):
    """The pipeline cannot go on (a stage's setup() failed, its workers keep
    dying at start), or an item's value or exception could not cross a
    process boundary as is (the message names the item)."""

    __module__ = "shmipc.pipeline"


def repack(env: tuple) -> tuple:
    """A received pipeline envelope, ready to be put again (see rewrap)."""
    if env[4] is None:
        return env
    return (*env[:3], *rewrap(env[3], env[4]))


def error_value(stage_index: int, exc: BaseException) -> tuple:
    """An exception raised in a pipeline worker, as K_ERROR/K_FATAL data:
    (stage index, *pack_error(exc))."""
    return (stage_index, *pack_error(exc))


def rebuild_error(blob: bytes | None, text: str, tb: str, what: str) -> BaseException:
    """The exception a pipeline worker sent (error_value), with its
    traceback as __cause__; a PipelineError naming `what` if it cannot be
    rebuilt here."""
    exc = unpack_error(blob, text, what, PipelineError)
    exc.__cause__ = RemoteTraceback(tb)
    return exc
