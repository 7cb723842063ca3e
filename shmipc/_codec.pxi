# Typed messages: how a Python object becomes a record payload and back.
# Included into _ring.pyx (the encoders run before any lock is taken; the
# decoders run after the record has been copied out or claimed).
#
# Payload layouts (all integers little-endian, every segment 16-aligned):
#   BYTES, BYTEARRAY, STR (UTF-8), RECORD: the raw bytes
#   INT: int64;  FLOAT: float64;  TRUE, FALSE, NONE: empty
#   NDARRAY: u8 ndim, u8 0, u16 descr_len, u32 0, u64 shape[ndim], descr,
#            then the C-ordered data at the next 16-byte boundary
#   PICKLE:  u32 nseg, u32 0, u64 length[nseg], then nseg segments each at a
#            16-byte boundary: the pickle-5 stream and its out-of-band buffers

from libc.string cimport memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_CheckExact
from cpython.bytearray cimport PyByteArray_FromStringAndSize
from cpython.unicode cimport PyUnicode_DecodeUTF8
import copyreg
import io
import sys
import struct
import pickle
import threading

cdef extern from "Python.h":
    const char *PyUnicode_AsUTF8AndSize(object u, Py_ssize_t *size) except NULL
    long long PyLong_AsLongLongAndOverflow(object o, int *overflow) except? -1
    double PyFloat_AS_DOUBLE(object o)

cdef enum:
    TAG_PAD = 0
    TAG_BYTES = 1
    TAG_BYTEARRAY = 2
    TAG_STR = 3
    TAG_INT = 4
    TAG_FLOAT = 5
    TAG_TRUE = 6
    TAG_FALSE = 7
    TAG_NONE = 8
    TAG_NDARRAY = 9
    TAG_PICKLE = 10
    TAG_RECORD = 11
    TAG_MAX = 11


cdef class Chunk:
    """A piece of a message too large for one record (see shmipc._framing),
    put as a bytearray record without a copy. A Pipe never sends a user's
    bytearray as one (it goes pickled), so its reader tells a stray chunk
    (left by an interrupted receive) from a message by its type alone."""

    cdef readonly object view

    def __init__(self, view):
        self.view = view

    def __reduce__(self):
        return (Chunk, (bytes(self.view),))

TAG_NAMES = ("pad", "bytes", "bytearray", "str", "int", "float", "True", "False",
             "None", "ndarray", "pickle", "record")

cdef object _ndarray_type = None     # numpy.ndarray once numpy is imported
cdef object _np = None               # the numpy module, imported on first need
cdef dict _dtype_descr_cache = {}    # dtype -> descr bytes
cdef dict _descr_dtype_cache = {}    # descr bytes -> dtype
cdef object _meta_head = struct.Struct("<BBHI")
cdef object _pickle_head = struct.Struct("<II")
cdef object _pickle_head1 = struct.Struct("<IIQ")     # the header of a one-segment pickle


cdef inline Py_ssize_t align16(Py_ssize_t n) noexcept nogil:
    return (n + 15) & ~<Py_ssize_t>15


cdef object numpy_module():
    global _np, _ndarray_type
    if _np is None:
        import numpy
        _np = numpy
        _ndarray_type = numpy.ndarray
    return _np


cdef inline bint is_ndarray(object obj):
    global _ndarray_type
    if _ndarray_type is None:
        np = sys.modules.get("numpy")
        if np is None:
            return False        # numpy is not even imported: obj cannot be an array
        numpy_module()
    return type(obj) is _ndarray_type


cdef bytes dtype_descr(object dt):
    cdef bytes d = _dtype_descr_cache.get(dt)
    if d is None:
        if dt.fields is None and dt.subdtype is None:
            d = b"S" + dt.str.encode("ascii")
        else:
            d = b"P" + pickle.dumps(dt, protocol=5)
        if len(d) > 0xFFFF:
            raise ValueError(f"dtype description of {len(d)} bytes is too long (at most 65535)")
        _dtype_descr_cache[dt] = d
    return d


cdef object descr_dtype(bytes d, bint allow_pickle):
    dt = _descr_dtype_cache.get(d)
    if dt is None:
        np = numpy_module()
        if d[:1] == b"P" and not allow_pickle:
            raise CorruptMessage("ndarray message with a pickled dtype refused: this ring "
                                 "decodes native types only")
        try:
            if d[:1] == b"S":
                dt = np.dtype(d[1:].decode("ascii"))
            elif d[:1] == b"P":
                dt = pickle.loads(d[1:])
                if not isinstance(dt, np.dtype):
                    raise TypeError(type(dt).__name__)
            else:
                raise ValueError("unknown kind")
        except Exception as exc:
            raise CorruptMessage(f"ndarray message carries an invalid dtype {d[:40]!r}: {exc}") from None
        if dt.hasobject:
            raise CorruptMessage(f"ndarray message carries an object dtype {dt}")
        if len(_descr_dtype_cache) < 1024:
            _descr_dtype_cache[d] = dt
    return dt


cdef object encode(object obj, enc_t *e):
    """Fill `e` for `obj`. Returns None when the payload is e.ptr[:e.size]
    (borrowed from obj or e.small), or a list of segments (objects with the
    buffer protocol) laid out one after another at 16-byte boundaries, with
    e.ptr NULL and e.size their total."""
    cdef type t = type(obj)
    cdef Py_ssize_t n
    cdef int overflow = 0
    cdef long long iv
    cdef double dv
    e.ptr = NULL
    if t is bytes:
        e.tag = TAG_BYTES
        e.ptr = PyBytes_AS_STRING(obj)
        e.size = PyBytes_GET_SIZE(obj)
        return None
    if t is str:
        try:
            e.ptr = PyUnicode_AsUTF8AndSize(obj, &n)
        except UnicodeEncodeError:      # lone surrogates: let pickle carry it
            return encode_pickle(obj, e)
        e.tag = TAG_STR
        e.size = n
        return None
    if t is int:
        iv = PyLong_AsLongLongAndOverflow(obj, &overflow)
        if overflow:
            return encode_pickle(obj, e)
        e.tag = TAG_INT
        memcpy(e.small, &iv, 8)
        e.ptr = e.small
        e.size = 8
        return None
    if t is float:
        dv = PyFloat_AS_DOUBLE(obj)
        e.tag = TAG_FLOAT
        memcpy(e.small, &dv, 8)
        e.ptr = e.small
        e.size = 8
        return None
    if obj is None or obj is True or obj is False:
        e.tag = TAG_NONE if obj is None else (TAG_TRUE if obj is True else TAG_FALSE)
        e.ptr = e.small
        e.size = 0
        return None
    if t is bytearray or t is memoryview or t is Chunk:
        e.tag = TAG_BYTES if t is memoryview else TAG_BYTEARRAY
        mv = memoryview((<Chunk>obj).view if t is Chunk else obj)
        if not mv.c_contiguous:
            mv = memoryview(mv.tobytes())
        elif mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B") if mv.nbytes else memoryview(b"")
        e.size = mv.nbytes
        return [mv]
    if is_ndarray(obj):
        if obj.dtype.hasobject:
            return encode_pickle(obj, e)
        return encode_ndarray(obj, e)
    return encode_pickle(obj, e)


cdef object encode_ndarray(object arr, enc_t *e):
    np = numpy_module()
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    cdef bytes descr = dtype_descr(arr.dtype)
    cdef int ndim = arr.ndim
    if ndim > 64:
        raise ValueError(f"arrays of {ndim} dimensions are not supported (at most 64)")
    meta = bytearray(align16(8 + 8 * ndim + len(descr)))
    _meta_head.pack_into(meta, 0, ndim, 0, len(descr), 0)
    struct.pack_into(f"<{ndim}Q", meta, 8, *arr.shape)
    meta[8 + 8 * ndim: 8 + 8 * ndim + len(descr)] = descr
    data = arr.reshape(-1).view(np.uint8) if arr.size else memoryview(b"")
    e.tag = TAG_NDARRAY
    e.size = len(meta) + arr.nbytes
    return [meta, data]


cdef object _fp_table = None          # copyreg's table plus multiprocessing's reducers
cdef dict _fp_seen = None             # ForkingPickler._extra_reducers when the table was built
cdef object _fp_reduction = None      # multiprocessing.reduction, once imported
cdef object _fp_local = threading.local()   # .state: this thread's reusable _PickleState


class _ForkingPickler(pickle.Pickler):
    """Pickles as multiprocessing's ForkingPickler does (sockets, Connections,
    and whatever libraries register there, torch tensors for one), with
    protocol 5 out-of-band buffers, which ForkingPickler.dumps cannot do."""


class _PickleState:
    """A pickler kept for one thread's messages, with its stream and its
    buffer callback: making a Pickler costs ~0.9 us, more than pickling a
    small tuple (issue 11). Used by one dump at a time (`busy`: a __reduce__
    that puts on a ring pickles with a fresh one), dropped after a failed
    dump and when the reducer table changes."""

    __slots__ = ("out", "pickler", "buffers", "busy", "table")

    def __init__(self, table):
        self.out = io.BytesIO()
        self.pickler = _ForkingPickler(self.out, 5, buffer_callback=self.keep)
        self.pickler.dispatch_table = table
        self.table = table
        self.buffers = None
        self.busy = False

    def keep(self, pb):
        """Contiguous buffers travel out of band; others in band."""
        try:
            raw = pb.raw()
        except BufferError:
            return True
        self.buffers.append(raw)
        return False


cdef tuple pickle_dumps(object obj):
    """(pickle stream, [out-of-band buffers]) of obj, as multiprocessing's
    ForkingPickler would pickle it, protocol 5."""
    global _fp_table, _fp_seen, _fp_reduction
    if _fp_reduction is None:
        from multiprocessing import reduction       # registers the socket reducers
        _fp_reduction = reduction
    extra = _fp_reduction.ForkingPickler._extra_reducers
    if _fp_seen is None or _fp_seen != extra:
        table = copyreg.dispatch_table.copy()
        table.update(extra)
        _fp_table, _fp_seen = table, dict(extra)
    state = getattr(_fp_local, "state", None)
    if state is None or state.busy or state.table is not _fp_table:
        fresh = _PickleState(_fp_table)
        if state is None or not state.busy:
            _fp_local.state = fresh
        state = fresh
    state.busy = True
    state.buffers = buffers = []
    try:
        state.pickler.dump(obj)
        stream = state.out.getvalue()       # (hands over its bytes: no copy)
    except BaseException:
        if getattr(_fp_local, "state", None) is state:
            _fp_local.state = None          # not reused after a failure
        raise
    finally:
        state.buffers = None
        state.out.seek(0)
        state.out.truncate()
        state.pickler.clear_memo()
        state.busy = False
    return stream, buffers


cdef object encode_pickle(object obj, enc_t *e):
    stream, buffers = pickle_dumps(obj)
    cdef Py_ssize_t nseg = 1 + len(buffers)
    head = bytearray(align16(8 + 8 * nseg))
    if nseg == 1:
        _pickle_head1.pack_into(head, 0, 1, 0, len(stream))
    else:
        _pickle_head.pack_into(head, 0, nseg, 0)
        struct.pack_into(f"<{nseg}Q", head, 8, len(stream), *[b.nbytes for b in buffers])
    cdef Py_ssize_t total = len(head) + align16(len(stream))
    for b in buffers:
        total = align16(total) + b.nbytes
    e.tag = TAG_PICKLE
    e.size = total
    return [head, stream] + buffers


cdef object decode_scalar(uint8_t tag, const char *p, Py_ssize_t n):
    """Decode the payloads that need no buffer; raises CorruptMessage."""
    cdef long long iv
    cdef double dv
    if tag == TAG_INT or tag == TAG_FLOAT:
        if n != 8:
            raise CorruptMessage(f"{TAG_NAMES[tag]} message of {n} bytes (expected 8)")
        if tag == TAG_INT:
            memcpy(&iv, p, 8)
            return iv
        memcpy(&dv, p, 8)
        return dv
    if n != 0:
        raise CorruptMessage(f"{TAG_NAMES[tag]} message of {n} bytes (expected 0)")
    if tag == TAG_TRUE:
        return True
    if tag == TAG_FALSE:
        return False
    return None


cdef inline object plain_payload(const char *p, uint8_t tag, uint32_t size, bint *ok):
    """The object for a payload that needs no decoding after its record is
    released: bytes, bytearray, str (valid UTF-8) and scalars of the right
    size. Anything else, or a str that is not UTF-8, sets ok False and
    returns None: the ring's general path consumes, counts or raises it."""
    ok[0] = True
    if tag == TAG_BYTES:
        return PyBytes_FromStringAndSize(p, size)
    if tag == TAG_STR:
        try:
            return PyUnicode_DecodeUTF8(p, size, NULL)
        except UnicodeDecodeError:
            pass
    elif tag == TAG_BYTEARRAY:
        return PyByteArray_FromStringAndSize(p, size)
    elif tag == TAG_INT or tag == TAG_FLOAT:
        if size == 8:
            return decode_scalar(tag, p, 8)
    elif TAG_TRUE <= tag <= TAG_NONE:
        if size == 0:
            return None if tag == TAG_NONE else tag == TAG_TRUE
    ok[0] = False
    return None


cdef object decode_buffer(uint8_t tag, object buf, object dtype, bint allow_pickle):
    """Decode an NDARRAY, PICKLE or RECORD payload held in `buf` (a bytearray
    copy, or a read-only memoryview over the ring for zero-copy views).
    Every length in it is checked against the payload before use (nothing is
    allocated for a forged one): a bad payload raises CorruptMessage, a
    pickle that fails to load UndecodableMessage (from its error). Without
    `allow_pickle`, nothing is unpickled: pickled messages (and arrays of
    dtypes that travel pickled) raise CorruptMessage."""
    mv = memoryview(buf)
    cdef Py_ssize_t n = mv.nbytes
    cdef Py_ssize_t off, ndim, dlen, nseg, i, length
    if tag == TAG_RECORD:
        if dtype is None or n != dtype.itemsize:
            raise CorruptMessage(f"record of {n} bytes in a ring of {dtype}")
        return numpy_module().frombuffer(mv, dtype=dtype, count=1)[0]
    if tag == TAG_NDARRAY:
        if n < 8:
            raise CorruptMessage(f"ndarray message of {n} bytes is shorter than its header")
        ndim, _, dlen, _ = _meta_head.unpack_from(mv, 0)
        off = 8 + 8 * ndim + dlen
        if off > n:
            raise CorruptMessage(f"ndarray header of {off} bytes overruns the {n}-byte message")
        shape = struct.unpack_from(f"<{ndim}Q", mv, 8)
        dt = descr_dtype(bytes(mv[8 + 8 * ndim: off]), allow_pickle)
        off = align16(off)
        # in Python ints: a forged shape may overflow any fixed width
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dt.itemsize
        if nbytes > n - off or max(shape, default=0) >= 2**63:
            raise CorruptMessage(
                f"ndarray of shape {shape} and dtype {dt} needs {nbytes} bytes, "
                f"the message holds {max(n - off, 0)}")
        np = numpy_module()
        try:
            if nbytes == 0:
                return np.empty(shape, dtype=dt)
            return np.frombuffer(mv, dtype=dt, count=count, offset=off).reshape(shape)
        except (ValueError, TypeError, OverflowError, MemoryError) as exc:
            raise CorruptMessage(f"ndarray of shape {shape} and dtype {dt} does not decode: {exc}") from exc
    if tag == TAG_PICKLE:
        if not allow_pickle:
            raise CorruptMessage(f"pickled message of {n} bytes refused: this ring decodes "
                                 f"native types only (bytes, str, int, float, bool, None, "
                                 f"numpy arrays of plain dtypes)")
        if n < 8:
            raise CorruptMessage(f"pickle message of {n} bytes is shorter than its header")
        nseg, _ = _pickle_head.unpack_from(mv, 0)
        if nseg < 1 or 8 + 8 * nseg > n:
            raise CorruptMessage(f"pickle message claims {nseg} segments in {n} bytes")
        lengths = _pickle_head1.unpack_from(mv, 0)[2:] if nseg == 1 else struct.unpack_from(f"<{nseg}Q", mv, 8)
        off = align16(8 + 8 * nseg)
        segs = []
        for i in range(nseg):
            length = lengths[i]
            if length > n - off:
                raise CorruptMessage(
                    f"pickle segment {i} of {length} bytes at offset {off} overruns the {n}-byte message")
            segs.append(mv[off: off + length])
            off = align16(off + length)
        try:
            return pickle.loads(segs[0], buffers=segs[1:])
        except Exception as exc:
            raise UndecodableMessage.from_error(exc,    # also the original error's type, as multiprocessing raises
                f"pickled message of {n} bytes does not load in this process: "
                f"{type(exc).__name__}: {exc}") from exc
    raise CorruptMessage(f"unknown message tag {tag}")
