"""Compact pool records: the commonest task and result records as bytes
(a fixed header, then the pickle streams) instead of tuples the ring would
pickle and unpickle. Written by shmipc._engine_dispatch and the worker
(shmipc._poolworker), read back by the worker and shmipc._engine; the
values inside are shmipc._wire's (pack_task, pack_items)."""
from __future__ import annotations

import pickle
import struct
from typing import Any

from shmipc._wire import M_CALL_ITEMS, M_INT64, M_PICKLE, _buffer
from shmipc.errors import CorruptMessage

__all__ = ["task_record", "read_task_record", "result_record", "read_result_record"]

# The commonest pool records travel as bytes: a fixed header and the
# streams, which the ring copies as they are, instead of a tuple the ring
# pickles on the way in and unpickles on the way out (a Pickler set up each
# way: ~15 us a round trip for a task, ~12 for a result, against ~1 for
# bytes; a map of 200 chunks pays it 400 times, mostly in the GIL-bound
# parent). Only records whose value is one pickle stream with nothing out
# of band take this form, however long the stream: as a tuple, a 125 KB
# stream (a chunk of 25,000 ints) cost ~110 us a put and get against ~15
# as bytes, the join's copy included. Any other record (large data out of
# band, errors, stubs, control messages) stays a tuple. Read back,
# a compact record becomes the very tuple it stands for, so nothing after
# the ring sees a difference. Every field is checked before use: a
# record that is not exactly its header plus the lengths it announces
# raises CorruptMessage naming the numbers (the worker then fails that
# task, as for any record that does not decode).
#
#   task:   magic "sT", version, kind (u8), function length (u32), seq (i64),
#           items stream length (u32); then the function's pickle and the items'
#           -> (seq, kind, (function, (items stream, ())), (M_CALL_ITEMS, M_PICKLE))
#   result: magic "sR", version, last (u8: 0 or 1), seq (i64), offset (i64),
#           stream length (u32); then the value's pickle
#           -> (seq, status, offset, last, (stream, ()), M_PICKLE, None), status
#           being the one given to result_record (the pool's R_OK)
# A list of plain ints (M_INT64: native int64s, see _wire.pack_items) comes
# the same way, with magic "sI" (task) or "sJ" (result) and M_INT64 for
# M_PICKLE, its int64s for the stream.
_TASK_HEAD = struct.Struct("<2sBBIqI")
_RESULT_HEAD = struct.Struct("<2sBBqqI")
_TASK_MAGIC = {M_PICKLE: b"sT", M_INT64: b"sI"}         # the items' encoding -> magic
_RESULT_MAGIC = {M_PICKLE: b"sR", M_INT64: b"sJ"}
_TASK_ENCODING = {m: e for e, m in _TASK_MAGIC.items()}   # and back
_RESULT_ENCODING = {m: e for e, m in _RESULT_MAGIC.items()}
_COMPACT_VERSION = 1


def task_record(seq: int, kind: int, data: Any, meta: Any) -> Any:
    """What to put into a worker's ring for the task ``(seq, kind, data,
    meta)`` (from pack_task): compact bytes when its items are one pickle
    stream with nothing out of band, or int64s, else that tuple itself."""
    if type(meta) is tuple and len(meta) == 2 and meta[0] == M_CALL_ITEMS and type(meta[1]) is int \
            and meta[1] in _TASK_MAGIC and 0 <= kind < 256:
        fn, items = data
        stream, buffers = (items, ()) if meta[1] == M_INT64 else items
        size = _stream_size(stream)
        if not buffers and size >= 0 and type(fn) is bytes:
            return b"".join((_TASK_HEAD.pack(_TASK_MAGIC[meta[1]], _COMPACT_VERSION, kind, len(fn), seq, size),
                             fn, stream))
    return (seq, kind, data, meta)


def _stream_size(stream: Any) -> int:
    """The length of a record's stream: a pickle stream from _wire.dumps
    (bytes, or a long one as a PickleBuffer over bytes) or int64s (bytes);
    -1 for anything else or anything too long for the header's 32-bit
    length (no ring message is that large: the tuple form then meets the
    ring's MessageTooLarge, as before)."""
    if type(stream) is bytes:
        size = len(stream)
    elif type(stream) is pickle.PickleBuffer:
        try:
            size = stream.raw().nbytes
        except BufferError:         # (not contiguous: never from dumps)
            return -1
    else:
        return -1
    return size if size < 1 << 32 else -1


def _compact_head(buf: Any, head: struct.Struct, magics: dict, what: str) -> tuple[memoryview, int, tuple]:
    """``(view, size, header fields)`` of the compact record `buf`, whose
    header `head` must start with one of `magics` (magic -> encoding) and
    this version.

    Raises:
        CorruptMessage: shorter than its header, or another magic or version.
    """
    mv = _buffer(buf, what)
    n = mv.nbytes
    if n < head.size:
        raise CorruptMessage(f"{what} of {n} bytes is shorter than its {head.size}-byte header")
    fields = head.unpack_from(mv)
    if fields[0] not in magics or fields[1] != _COMPACT_VERSION:
        raise CorruptMessage(f"{what} starts with {fields[0]!r} version {fields[1]}, "
                             f"expected {' or '.join(map(repr, magics))} version {_COMPACT_VERSION}")
    return mv, n, fields


def read_task_record(buf: Any) -> tuple:
    """The task tuple a compact task record (bytes, or a view of the ring:
    what is kept is copied out) stands for.

    Raises:
        CorruptMessage: it is not a well-formed compact task record.
    """
    mv, n, (magic, _version, kind, fn_len, seq, stream_len) = \
        _compact_head(buf, _TASK_HEAD, _TASK_ENCODING, "a compact task record")
    if _TASK_HEAD.size + fn_len + stream_len != n:
        raise CorruptMessage(f"a compact task record of {n} bytes announces a {fn_len}-byte function "
                             f"and a {stream_len}-byte stream after its {_TASK_HEAD.size}-byte header")
    start = _TASK_HEAD.size
    fn = bytes(mv[start: start + fn_len])
    stream = bytes(mv[start + fn_len: n])
    encoding = _TASK_ENCODING[magic]
    return seq, kind, (fn, stream if encoding == M_INT64 else (stream, ())), (M_CALL_ITEMS, encoding)


def result_record(record: tuple) -> Any:
    """What to put into the result ring for the result ``(seq, status,
    offset, last, data, meta, info)``: compact bytes when its value is one
    pickle stream with nothing out of band, or int64s, and it carries no
    info (a value, not an error),
    else that tuple itself. (The status is not carried: read_result_record
    is told which one compact records have.)"""
    seq, _status, offset, last, data, meta, info = record
    if type(meta) is int and meta in _RESULT_MAGIC and info is None and offset >= 0:
        stream, buffers = (data, ()) if meta == M_INT64 else data
        size = _stream_size(stream)
        if not buffers and size >= 0:
            return b"".join((_RESULT_HEAD.pack(_RESULT_MAGIC[meta], _COMPACT_VERSION, bool(last), seq, offset,
                                               size), stream))
    return record


def read_result_record(buf: Any, status: int) -> tuple:
    """The result tuple a compact result record stands for, with `status`.
    `buf` must be the record's own copy (bytes): the stream is a view of it.

    Raises:
        CorruptMessage: it is not a well-formed compact result record; when
            only its lengths are wrong, the error's ``seq`` names the task it
            claims to be the result of.
    """
    mv, n, (magic, _version, last, seq, offset, stream_len) = \
        _compact_head(buf, _RESULT_HEAD, _RESULT_ENCODING, "a compact result record")
    if last > 1:
        raise CorruptMessage(f"a compact result record has last={last}, expected 0 or 1")
    if _RESULT_HEAD.size + stream_len != n or offset < 0:
        error = CorruptMessage(f"a compact result record of {n} bytes announces a {stream_len}-byte "
                               f"stream after its {_RESULT_HEAD.size}-byte header (offset {offset})")
        error.seq = seq         # (its task can be failed rather than left waiting)
        raise error
    encoding = _RESULT_ENCODING[magic]
    stream = mv[_RESULT_HEAD.size:]
    return seq, status, offset, bool(last), stream if encoding == M_INT64 else (stream, ()), encoding, None
