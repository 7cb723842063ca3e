"""Messages of any size through a ring of bounded size, and the marks that
let a receiver tell how a message was sent.

A ring takes messages of at most ``ring.max_message_size`` bytes (half its
capacity). A larger message travels as a *frame*: a small :class:`Frame`
record announcing the sizes of its parts, then the parts cut into chunks of
at most :func:`chunk_size` bytes, each a bytearray record
(``_ring.Chunk``). An object is one pickle stream plus its protocol-5
out-of-band buffers (a numpy array's data is never copied into the stream);
a ``send_bytes`` payload is one part.

Invariants:
    * The records of one frame are contiguous in their ring: the writer
      holds the ring's producers (a Pipe sender, see Ring._hold_producers;
      a Queue's large writers take a lock of their own), and
      the reader reads them all before anything else.
    * A reader delivers a framed message only once every announced byte has
      arrived: a writer that dies mid-frame, or is interrupted (it then puts
      an ABORT frame if it can), costs that one message, never a torn one.

Frame records are pickled (a few hundred bytes): they are rare, and only
shmipc's own code makes Frame objects, so a user's message is never one.
"""
from __future__ import annotations

import concurrent.futures
import copyreg
import io
import pickle
import threading
from typing import Any, Callable

from shmipc.errors import UndecodableMessage

__all__ = ["Frame", "ABORT", "Pickled", "PICKLED_MAX", "chunk_size", "dump_parts", "load_parts", "read_in_thread"]


class Frame:
    """Announces what the next records of a ring hold.

    kind:
        "bytes": a send_bytes payload (one part); recv() unpickles it, as
            multiprocessing does, and recv_bytes() returns it.
        "object": an object: part 0 is its pickle stream, the others its
            out-of-band buffers.
        "abort": the frame before this one will never be completed.
    sizes: the byte size of each part. (None marked the next record as a
        send_bytes pickle; no longer sent -- see Pickled -- and dropped.)
    seq: a Queue's large messages only (see shmipc._bulk): the number that
        pairs a token with its frame. None elsewhere.
    """

    __slots__ = ("kind", "sizes", "seq")

    def __init__(self, kind: str, sizes: tuple[int, ...] | None = None, seq: int | None = None) -> None:
        self.kind = kind
        self.sizes = sizes
        self.seq = seq

    def __reduce__(self) -> tuple:
        if self.seq is None:
            return (Frame, (self.kind, self.sizes))
        return (Frame, (self.kind, self.sizes, self.seq))

    def __repr__(self) -> str:
        if self.seq is None:
            return f"Frame({self.kind!r}, {self.sizes!r})"
        return f"Frame({self.kind!r}, {self.sizes!r}, seq={self.seq!r})"


ABORT = Frame("abort")

#: a send_bytes pickle at most this long goes as one Pickled record (not
#: framed): one record needs no hold and no read in a thread
PICKLED_MAX = 64 << 10


class Pickled:
    """A send_bytes payload that is a pickle, in one record: recv()
    unpickles it, recv_bytes() returns it (multiprocessing's behaviour).
    Larger ones are framed (see PICKLED_MAX)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple:
        return (Pickled, (self.data,))

# the first byte of every pickle of protocol 2 or later (multiprocessing
# pickles with the default protocol, 4 or 5)
PICKLE_PROTO = 0x80


def chunk_size(max_message_size: int) -> int:
    """Bytes per chunk record: half the largest message, so that the writer
    fills one chunk while the reader copies another."""
    return max(max_message_size // 2, 1)


_table: dict | None = None
_table_seen: dict | None = None


def _dispatch_table() -> dict:
    """copyreg's table plus multiprocessing's reducers (sockets, Connections,
    whatever libraries register with ForkingPickler), as the ring pickles."""
    global _table, _table_seen
    from multiprocessing import reduction

    extra = reduction.ForkingPickler._extra_reducers
    if _table is None or _table_seen != extra:
        table = copyreg.dispatch_table.copy()
        table.update(extra)
        _table, _table_seen = table, dict(extra)
    return _table


def dump_parts(obj: Any) -> list[bytes | memoryview]:
    """An object as [pickle stream, out-of-band buffer, ...] (protocol 5:
    contiguous buffers such as numpy arrays' data are not copied).

    The stream is the BytesIO's value, not a view of it: getvalue() hands
    over the BytesIO's own bytes without a copy, and a view would keep the
    BytesIO exported (when a failed put's traceback puts the parts in a
    reference cycle, 3.13's BytesIO finalizer then reports a BufferError)."""
    buffers: list[memoryview] = []

    def keep(pb: pickle.PickleBuffer) -> bool:
        try:
            buffers.append(pb.raw())
        except BufferError:
            return True         # not contiguous: pickled in band
        return False

    out = io.BytesIO()
    pickler = pickle.Pickler(out, 5, buffer_callback=keep)
    pickler.dispatch_table = _dispatch_table()
    pickler.dump(obj)
    return [out.getvalue(), *buffers]


def load_parts(parts: list[bytearray]) -> Any:
    """The object dump_parts cut into `parts` (the buffers become the
    out-of-band buffers: a numpy array is rebuilt over its bytearray).

    Raises:
        UndecodableMessage: unpickling raised (its exception is the cause),
            as the ring reports a message that does not load; the message
            was read whole, so the channel goes on.
    """
    try:
        return pickle.loads(parts[0], buffers=parts[1:])
    except Exception as exc:
        raise UndecodableMessage.from_error(exc,        # also the original error's type, as multiprocessing raises
            f"pickled message of {sum(len(p) for p in parts)} bytes does not load in this "
            f"process: {type(exc).__name__}: {exc}") from exc


def read_parts(sizes: tuple[int, ...], next_chunk: Callable[[memoryview], None]) -> list[bytearray]:
    """Allocate the parts of a frame and fill each, chunk after chunk, with
    `next_chunk(view)`, which must fill `view` (at most one chunk's bytes;
    it returns how many it wrote) or raise."""
    parts = []
    for size in sizes:
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"bad part size in a frame: {size!r}")
        part = bytearray(size)
        view = memoryview(part)
        done = 0
        while done < size:
            done += next_chunk(view[done:])
        parts.append(part)
    return parts


def read_in_thread(read: Callable[[], Any], name: str) -> concurrent.futures.Future:
    """Run `read` (a large message's read: it streams in as its writer
    writes it) in a daemon thread of its own, its result or exception in
    the returned future. The future is running from the start, so it can
    never be cancelled: a read that has begun is always finished and
    collected, never lost. Daemon, not an executor's: asyncio.run and
    interpreter exit do not wait for a writer that stalls. (Pipe ends'
    recv_async, Queue.get_async.)"""
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_running_or_notify_cancel()

    def run() -> None:
        try:
            future.set_result(read())
        except BaseException as exc:        # (its collector raises it)
            future.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
