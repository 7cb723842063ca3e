"""``Pipe()`` and ``Connection``: multiprocessing's pipes over shared-memory rings.

A pipe is one arena holding one ring per direction (two for a duplex pipe),
each with one consumer and any number of producers (see the end of this
docstring). What the rings cannot tell -- whether anyone still holds the other end --
comes from the kernel:

Liveness (why the ends hold pipe fds):
    Each end E owns a tiny OS pipe used only as a token, never for data.
    Every process holding end E keeps the token's write fd open; processes
    holding either end keep read fds to watch. The kernel reports POLLHUP on
    a read fd once every copy of the write fd is closed, so "no live holder of
    E remains" is exact however E spread: fork copies the fd at the instant of
    the fork (a parent closing its copy right after ``Process.start()`` cannot
    race the child), spawn/forkserver children and unpickling processes
    receive duplicates, and a process that dies (even by SIGKILL) drops its
    copies.

Invariants:
    * An end's token write fd is open in exactly the processes that hold the
      end and have not closed it.
    * A ring is shut down only once no holder of the end on one side of it is
      left: by the last closer (which finds POLLHUP on its own token after
      closing its copy), or by a reader or writer that finds the peer's token
      hung up. So a shut-down ring never loses a live end's data: a shut-down
      ring still drains, then raises EOFError.
    * A blocked recv or send waits on the ring in slices of SLICE seconds and
      checks the peer's token between them: EOF or BrokenPipeError follows a
      holder's death within about one slice, and a plain close at once.

Compared with multiprocessing: any message size goes (one larger than the
ring's max_message_size travels in chunks, see shmipc._framing, and is
delivered whole or not at all); ``recv`` unpickles what ``send_bytes`` sent
and ``recv_bytes`` returns the pickle of what ``send`` sent, as there. A
send to a peer that closed its end raises BrokenPipeError at once; to a
peer that died without closing, within PROBE_EVERY sends (multiprocessing
fails at the first write; looking at the peer on every send would cost a
system call each). ``fileno()`` is a readiness descriptor and a socket for
fd passing, as multiprocessing's (see shmipc._pipe_ready); awaiting
versions of recv and send are there too (see shmipc.aio). Receiving a
chunked message is shmipc._pipe_frames'.
Several processes (and threads) may send on one end at once, as programs
written for multiprocessing do with small messages: each ring takes many
producers (a lock word, taken with one atomic exchange on the fast path), and
a message of several records -- a chunked one, larger than max_message_size --
holds the producers while it is put, so every message arrives whole, of any
size (multiprocessing interleaves large messages). Receiving stays one at a
time, as multiprocessing requires: two processes must not receive from the
same end at once (each ring has one consumer); threads of one process may
share an end, one receiving at a time.
"""
from __future__ import annotations

import concurrent.futures
import os
import pickle
import queue
import select
import socket
import sys
import time
from multiprocessing import BufferTooShort, reduction
from typing import Any, NoReturn

from shmipc.arena import Arena
from shmipc._lifetime import Closeable
from shmipc import _framing
from shmipc._framing import Frame as _Frame     # looked up on every get/recv
from shmipc._ring import Chunk
from shmipc.errors import MessageTooLarge, PeerDied, RingClosed
from shmipc.queues import _ring_capacity, _timeout
from shmipc._pipe_frames import (SLICE, _ABANDONED, _EOF_MESSAGE, _NOTHING, _FrameReading,
                                 _as_bytes)
from shmipc._pipe_ready import _Readiness

__all__ = ["Pipe", "Connection", "SLICE", "PROBE_EVERY", "wait"]

#: A send looks whether the other end still has a live holder once every
#: this many sends (a poll() system call), so a send to a reader that died
#: without closing fails within this many sends.
PROBE_EVERY = 64

def _hung_up(fd: int) -> bool:
    """True if every copy of the write end of the pipe `fd` reads is closed."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    for _, events in poller.poll(0):
        if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
    return False


def Pipe(duplex: bool = True, *, capacity: int | None = None) -> tuple["Connection", "Connection"]:
    """Return a pair of connected Connections, like ``multiprocessing.Pipe``.

    Args:
        duplex: True: both ends send and receive. False: the first end only
            receives and the second only sends.
        capacity: ring bytes per direction, a power of two >= 1024 (default
            32 MiB; pages are committed as first used). A message larger than
            about capacity/2 goes in chunks.

    Raises:
        TypeError / ValueError: an invalid capacity.
        OSError: out of file descriptors.
    """
    cap = _ring_capacity(capacity)
    nrings = 2 if duplex else 1
    arena = Arena(Arena.size_for(rings=[cap] * nrings))
    fds: list[int] = []
    try:
        # "many" producers: an end may be shared by several senders (see the
        # module's docstring); one consumer: receivers take turns, as there
        arena.ring(cap, name="a>b", producers="many", consumers="one")
        if duplex:
            arena.ring(cap, name="b>a", producers="many", consumers="one")
        r_a, w_a = os.pipe()
        fds += [r_a, w_a]
        r_b, w_b = os.pipe()
        fds += [r_b, w_b]
        r_a2, r_b2 = os.dup(r_a), os.dup(r_b)
        fds += [r_a2, r_b2]
        s_a, s_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds += [s_a.detach(), s_b.detach()]
    except BaseException:
        for fd in fds:
            os.close(fd)
        arena.close()
        raise
    sock_a, sock_b = fds[-2:]
    if duplex:
        a = Connection._make(arena, send="a>b", recv="b>a", token=w_a, mine=r_a, peer=r_b, sock=sock_a)
        b = Connection._make(arena, send="b>a", recv="a>b", token=w_b, mine=r_b2, peer=r_a2,
                             sock=sock_b)
    else:
        # multiprocessing's order: (receiving end, sending end)
        a = Connection._make(arena, send=None, recv="a>b", token=w_a, mine=r_a, peer=r_b, sock=sock_a)
        b = Connection._make(arena, send="a>b", recv=None, token=w_b, mine=r_b2, peer=r_a2,
                             sock=sock_b)
    return a, b


class Connection(Closeable, _FrameReading, _Readiness):
    """One end of a Pipe: send/recv objects, send_bytes/recv_bytes(_into)
    raw bytes, poll, close. Make them with :func:`Pipe`.

    A Connection can be passed to child processes as multiprocessing's can:
    inherited through fork, or pickled (as a Process argument under spawn
    and forkserver, or sent through another connection or queue).
    """

    # set before anything can raise, so __del__ is safe after a failed set-up
    _closed: bool = True
    _token: int = -1
    _mine: int = -1
    _peer: int = -1
    _sock: socket.socket | None = None
    _send_ring: Any = None
    _recv_ring: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("make connections with shmipc.Pipe()")

    @classmethod
    def _make(cls, arena: Arena, *, send: str | None, recv: str | None,
              token: int, mine: int, peer: int, sock: int) -> "Connection":
        self = cls.__new__(cls)
        self._token, self._mine, self._peer = token, mine, peer
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=sock)
        self._arena = arena
        self._send_name, self._recv_name = send, recv
        # each end attaches its own Ring objects, so closing one end in a
        # process never closes the other end's rings there
        self._send_ring = arena.ring(name=send) if send is not None else None
        self._recv_ring = arena.ring(name=recv) if recv is not None else None
        if self._send_ring is not None:
            # our puts announce themselves on our socket, readable at the peer's
            self._send_ring._set_notify(sock, True)
        self._polled = False            # fileno() was called here: receives re-arm
        self._frame_read = None         # recv_async: the future of a chunked message read in a thread
        self._async_send_lock = None    # send_async: one chunked message at a time
        self._pending = _NOTHING
        self._frame_left = 0            # bytes of the frame being read not yet taken
        self._probe_in = 1              # the first send looks at the peer
        self._closed = False
        return self

    # ------------------------------------------------------------ state
    @property
    def closed(self) -> bool:
        """True if this end was closed in this process."""
        return self._closed

    @property
    def readable(self) -> bool:
        """True if this end can receive."""
        return self._recv_ring is not None

    @property
    def writable(self) -> bool:
        """True if this end can send."""
        return self._send_ring is not None

    def _check_closed(self) -> None:
        if self._closed:
            raise OSError("handle is closed")

    def _check_readable(self) -> None:
        if self._closed:
            raise OSError("handle is closed")
        if self._recv_ring is None:
            raise OSError("connection is write-only")

    def _raise_closed(self) -> NoReturn:
        """The one translation of the ring's RingClosed (this end was closed
        in this process, by another thread mid-call, or its arena was):
        multiprocessing's OSError. Any other ValueError (from pickling,
        unpickling, user code) is never caught as "closed"."""
        raise OSError("handle is closed") from None

    def _check_writable(self) -> None:
        if self._closed:
            raise OSError("handle is closed")
        if self._send_ring is None:
            raise OSError("connection is read-only")

    def _peer_gone(self) -> bool:
        """True if no process holds the other end any more; then shut both
        rings down so every later call here and in other holders of this end
        answers at once (recv drains first)."""
        if not _hung_up(self._peer):
            return False
        for ring in (self._send_ring, self._recv_ring):
            if ring is not None:
                ring.shutdown()
        return True

    def stats(self) -> dict:
        """The rings' live counters: ``{"send": {...}, "recv": {...}}``."""
        self._check_closed()
        out = {}
        if self._send_ring is not None:
            out["send"] = self._send_ring.stats()
        if self._recv_ring is not None:
            out["recv"] = self._recv_ring.stats()
        return out

    # ------------------------------------------------------------ sending
    def send(self, obj: Any) -> None:
        """Send an object to the other end (read it with recv). Any size:
        one larger than the ring's max_message_size goes in chunks.

        Raises:
            BrokenPipeError: the other end was closed, or died (noticed at
                once if it closed, within PROBE_EVERY sends if it died).
            OSError: this end is closed or read-only.
            Whatever pickling `obj` raises; nothing is sent then.
        """
        if type(obj) is bytearray:
            # pickled, as multiprocessing sends it (a bytearray record is a
            # chunk of a large message, see _pipe_frames)
            return self.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        ring = self._send_ring          # None once closed, or on a read-only end
        if ring is None:
            self._check_writable()
        self._probe_in -= 1
        if not self._probe_in:
            self._probe()
        try:
            ring.put(obj, True, SLICE)  # the common case: there is room
        except (queue.Full, PeerDied):
            self._send_slow(obj)        # the reader is slow, or gone: look
        except MessageTooLarge:
            self._send_frame("object", _framing.dump_parts(obj))
        except RingClosed:
            self._raise_closed()

    def _probe(self) -> None:
        """Every PROBE_EVERY sends (and at the first): a send to a peer
        that died without closing fails within that many sends instead of
        once the ring is full. One poll() system call, amortised."""
        self._probe_in = PROBE_EVERY
        if self._send_ring is not None and self._peer_gone():
            raise BrokenPipeError("the other end of the pipe is closed")

    def _put(self, obj: Any) -> None:
        """One record, waiting for room as long as the reader lives."""
        ring = self._send_ring
        if ring is None:
            self._check_writable()
        try:
            ring.put(obj, True, SLICE)
        except (queue.Full, PeerDied):
            self._send_slow(obj)
        except RingClosed:
            self._raise_closed()

    def _send_slow(self, obj: Any) -> None:
        while True:
            if self._peer_gone():
                raise BrokenPipeError("the other end of the pipe is closed")
            ring = self._send_ring
            if ring is None:
                self._check_writable()
            try:
                ring.put(obj, True, SLICE)
                return
            except queue.Full:
                pass
            except PeerDied:
                pass            # the ring's last reader died; another holder may remain
            except RingClosed:
                self._raise_closed()

    def _sending_ring(self) -> Any:
        """The send ring, for a message of several records: refused (before
        anything is held or put) in a signal handler or coroutine running
        while this thread is in the middle of such a message on it, whose
        hold is not this call's to release."""
        ring = self._send_ring
        if ring is None:
            self._check_writable()
        if ring._holds_producers():
            raise RuntimeError(ring._held_message())
        return ring

    def _hold_send(self, ring: Any) -> None:
        """Take the send ring's producers for a message of several records
        (a chunked one, or a mark and the record it marks), so that no other
        sender of this end -- another process or thread -- puts a record
        inside it; they wait until ``ring._release_producers()``, which the
        caller calls in a ``finally`` around this call (a Ctrl-C right after
        the hold is taken must not leave it held). Waits as long as the
        reader lives."""
        self._while_reader_lives(lambda: ring._hold_producers(SLICE))

    def _send_frame(self, kind: str, parts: list) -> None:
        """A message too large for one record: a Frame, then its parts in
        chunks, with the producers held. Interrupted midway (peer gone,
        Ctrl-C), it puts ABORT if it can, so the reader drops the partial
        message (see shmipc._framing)."""
        records = self._frame_records(kind, parts)
        ring = self._sending_ring()
        try:
            self._hold_send(ring)
            self._put_held(ring, records[0])
            try:
                for rec in records[1:]:
                    self._put_held(ring, rec)
            except BaseException:
                try:
                    ring._put_held(_framing.ABORT, SLICE)
                except BaseException:
                    pass    # the reader is gone, or the ring stays full: the next message ends the frame
                raise
        finally:
            ring._release_producers()

    def _put_held(self, ring: Any, rec: Any) -> None:
        """One record of a held message (see _hold_send), waiting for room
        as long as the reader lives."""
        self._while_reader_lives(lambda: ring._put_held(rec, SLICE) is None)    # (None: put)

    def _while_reader_lives(self, attempt: Any) -> None:
        """Call attempt() -- one try, waiting at most SLICE -- until it
        returns True, looking between tries whether the reader still lives
        (BrokenPipeError once it is gone). A full ring, or a dead last
        reader process while another holder may remain (queue.Full,
        PeerDied), is a try that did not succeed."""
        while True:
            try:
                if attempt():
                    return
            except (queue.Full, PeerDied):
                pass
            except RingClosed:
                self._raise_closed()
            if self._peer_gone():
                raise BrokenPipeError("the other end of the pipe is closed")

    def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        """Send the bytes of a bytes-like object, or of buf[offset:offset+size]
        (counted in bytes), as one message (read it with recv_bytes, or
        with recv if it is a pickle). Any size, as send.

        Raises:
            ValueError: a negative offset or size, or one past the end of buf.
            BrokenPipeError, OSError: as send.
        """
        ring = self._send_ring
        if ring is not None and type(buf) is bytes and not offset and size is None \
                and not (buf and buf[0] == _framing.PICKLE_PROTO):
            self._probe_in -= 1
            if not self._probe_in:
                self._probe()
            try:
                ring.put(buf, True, SLICE)  # the common case, inlined
                return
            except (queue.Full, PeerDied):
                return self._send_slow(buf)
            except MessageTooLarge:
                return self._send_frame("bytes", [buf])
            except RingClosed:
                self._raise_closed()
        payload = self._payload(buf, offset, size)
        self._probe_in -= 1
        if not self._probe_in:
            self._probe()
        form = self._bytes_form(payload)
        if form == "pickled":
            return self._put(_framing.Pickled(bytes(payload)))
        if form == "framed":
            return self._send_frame("bytes", [payload])
        # the ring encodes a memoryview as a bytes message (one copy, into
        # the ring), so the receiver gets bytes whatever buf was
        self._put(payload)

    def _bytes_form(self, payload: memoryview) -> str:
        """How a send_bytes payload travels (send_bytes, send_bytes_async):
        "pickled" (a pickle of up to PICKLED_MAX bytes: one Pickled record,
        so that recv() unpickles it as multiprocessing's does, while a plain
        bytes record is what send(b"...") puts), "framed" (a larger pickle,
        or a payload larger than one record) or "plain" (one bytes record)."""
        limit = self._send_ring.max_message_size
        if payload.nbytes and payload[0] == _framing.PICKLE_PROTO:
            return "pickled" if payload.nbytes <= min(_framing.PICKLED_MAX, limit // 2) else "framed"
        return "framed" if payload.nbytes > limit else "plain"

    def _payload(self, buf: Any, offset: int, size: int | None) -> memoryview:
        """buf[offset:offset+size] in bytes, checked as multiprocessing does."""
        self._check_writable()
        m = memoryview(buf)
        if m.itemsize > 1 or m.ndim != 1:
            m = m.cast("B")
        n = m.nbytes
        if offset < 0:
            raise ValueError(f"offset is negative ({offset})")
        if n < offset:
            raise ValueError(f"buffer length {n} < offset {offset}")
        if size is None:
            size = n - offset
        elif size < 0:
            raise ValueError(f"size is negative ({size})")
        elif offset + size > n:
            raise ValueError(f"buffer length {n} < offset {offset} + size {size}")
        return m[offset:offset + size]

    def _frame_records(self, kind: str, parts: list) -> list:
        """A message too large for one record, as the records _send_frame puts."""
        chunk = _framing.chunk_size(self._send_ring.max_message_size)
        views = [memoryview(p).cast("B") for p in parts]
        records: list = [_framing.Frame(kind, tuple(v.nbytes for v in views))]
        for view in views:
            records += [Chunk(view[off:off + chunk]) for off in range(0, view.nbytes, chunk)]
        return records

    # ------------------------------------------------------------ receiving
    def recv(self) -> Any:
        """Receive the next object sent with send (or the unpickled bytes
        sent with send_bytes), waiting for one.

        Raises:
            EOFError: the other end is closed (or its holders died) and
                nothing is left to read.
            OSError: this end is closed or write-only.
            Whatever unpickling the message raises (the message is consumed).
        """
        if self._frame_read is not None:
            return self._frame_result(False, None)
        ring = self._recv_ring          # None once closed, or on a write-only end
        if ring is None:
            self._check_readable()
        item = _NOTHING
        if self._pending is _NOTHING:
            try:
                item = ring.get(True, SLICE)    # the common case: a message is there
            except (queue.Empty, PeerDied):
                pass
            except EOFError:
                raise EOFError(_EOF_MESSAGE) from None
            except RingClosed:
                self._raise_closed()
        if item is _NOTHING:
            item = self._take(None)
        if type(item) is _Frame or type(item) is bytearray or type(item) is _framing.Pickled:
            item = self._unframe(item, False)       # (a bytearray: a stray chunk, dropped)
        if self._polled:
            self._rearm()
        return item

    def _recv_buffer(self) -> bytes:
        """The next message as multiprocessing's recv_bytes gives it."""
        if self._frame_read is not None:
            return self._frame_result(True, None)
        item = self._take(None)
        if type(item) is _Frame or type(item) is _framing.Pickled:
            item = self._unframe(item, True)
        elif type(item) is not bytes:
            item = _as_bytes(item)
        if self._polled:
            self._rearm()
        return item

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        """Receive the next message as bytes (one sent with send_bytes).

        Raises:
            ValueError: a negative maxlength.
            OSError: the message is longer than `maxlength` (it is discarded
                and this end stops receiving, as in multiprocessing), or this
                end is closed or write-only.
            EOFError: as recv.
        """
        ring = self._recv_ring
        if ring is not None and maxlength is None and self._pending is _NOTHING and self._frame_read is None:
            try:
                data = ring.get(True, SLICE)        # the common case, inlined
                if type(data) is bytes:
                    if self._polled:
                        self._rearm()
                    return data
                self._pending = data
            except (queue.Empty, PeerDied):
                pass
            except EOFError:
                raise EOFError(_EOF_MESSAGE) from None
            except RingClosed:
                self._raise_closed()
        if maxlength is not None and maxlength < 0:
            raise ValueError(f"negative maxlength ({maxlength})")
        self._check_readable()
        data = self._recv_buffer()
        if maxlength is not None and len(data) > maxlength:
            self._bad_message_length()
        return data

    def _start_frame_read(self, frame: _Frame) -> None:
        """Read the chunked message `frame` announces (taken from the ring)
        in a thread of its own (_framing.read_in_thread), for recv_async:
        its chunks may come from a writer in the very event loop that
        awaits it. The read belongs to the connection, not to the await: a
        cancelled recv_async, a plain recv or poll, or a recv_async in a
        later event loop collects it (_frame_result), so no message is lost
        and none is read twice (close() ends the read)."""
        # read whole but not converted (as_bytes None): the receive that
        # collects it may be either kind
        self._frame_read = _framing.read_in_thread(lambda: self._unframe(frame, None),
                                                   "shmipc-frame-read")

    def _frame_result(self, as_bytes: bool, maxlength: int | None) -> Any:
        """The message of the frame read (waiting for it), as recv
        (as_bytes False) or recv_bytes gives it; raises what the read
        raised. Clears the read."""
        future = self._frame_read
        try:
            item = future.result()
        finally:
            if future.done():
                self._frame_read = None
        item = self._finish(item, as_bytes)
        if as_bytes and maxlength is not None and len(item) > maxlength:
            self._bad_message_length()
        if self._polled:
            self._rearm()
        return item

    def _bad_message_length(self) -> None:
        if self._send_ring is not None:
            self._recv_ring.close()
            self._recv_ring = None
        else:
            self.close()
        raise OSError("bad message length")

    def recv_bytes_into(self, buf: Any, offset: int = 0) -> int:
        """Receive the next message into the writable buffer `buf` at byte
        `offset`; returns the message's length in bytes.

        Raises:
            ValueError: a negative offset, or one past the end of buf.
            multiprocessing.BufferTooShort: the message does not fit; it is
                consumed and held in ``exc.args[0]``.
            EOFError, OSError: as recv.
        """
        self._check_readable()
        with memoryview(buf) as m:
            bytesize = m.nbytes
            if offset < 0:
                raise ValueError(f"negative offset ({offset})")
            if offset > bytesize:
                raise ValueError(f"offset {offset} too large for a buffer of {bytesize} bytes")
            data = self._recv_buffer()
            size = len(data)
            if bytesize < offset + size:
                raise BufferTooShort(data)
            m.cast("B")[offset:offset + size] = data
            return size

    def poll(self, timeout: float | None = 0.0) -> bool:
        """True if a recv would not wait: a message is there, or the other end
        is gone (recv then raises EOFError). Waits up to `timeout` seconds
        (None: forever) for that.

        Raises:
            OSError: this end is closed or write-only.
            ValueError: a NaN timeout (as multiprocessing).
        """
        self._check_readable()
        if timeout is not None:
            timeout = _timeout(timeout)     # negative: 0; NaN: ValueError
        if self._frame_read is not None:    # a chunked message read in a thread: once it is read
            return bool(concurrent.futures.wait([self._frame_read], timeout).done)
        if self._pending is not _NOTHING and self._pending is not _ABANDONED:
            return True
        try:
            self._pending = self._take(timeout)
        except queue.Empty:
            return False
        except EOFError:
            return True
        return True

    # ------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Close this end in this process. When no process holds it any more,
        the other end's recv raises EOFError (after draining) and its send
        raises BrokenPipeError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            os.close(self._token)
            self._token = -1
            if _hung_up(self._mine):        # this was the last holder of this end
                for ring in (self._send_ring, self._recv_ring):
                    if ring is not None:
                        ring.shutdown()
        finally:
            for ring in (self._send_ring, self._recv_ring):
                if ring is not None:
                    ring.close()
            self._send_ring = self._recv_ring = None
            self._pending = _NOTHING
            self._frame_read = None         # (its thread ends: the ring is closed)
            if self._sock is not None:
                aio = sys.modules.get("shmipc.aio")
                if aio is not None and self._sock.fileno() >= 0 and aio._forget(self._sock.fileno()):
                    self._sock.detach()     # wakes recv_async awaits; closed by their loop
                else:
                    self._sock.close()
            for name in ("_mine", "_peer"):
                fd = getattr(self, name)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, name, -1)

    def __repr__(self) -> str:
        if self._closed:
            return "<shmipc.Connection closed>"
        mode = "duplex" if self.readable and self.writable else ("read" if self.readable else "write")
        return f"<shmipc.Connection {mode}>"

    # ------------------------------------------------------------ pickling
    def __reduce__(self) -> tuple:
        self._check_closed()
        if self._pending is not _NOTHING:
            raise TypeError("cannot pickle a Connection holding a message that poll() "
                            "received ahead; recv it first")
        return _rebuild_connection, (
            self._arena, self._send_name if self.writable else None,
            self._recv_name if self.readable else None,
            reduction.DupFd(self._token), reduction.DupFd(self._mine), reduction.DupFd(self._peer),
            reduction.DupFd(self._sock.fileno()))


def _rebuild_connection(arena: Arena, send: str | None, recv: str | None,
                        token: Any, mine: Any, peer: Any, sock: Any) -> Connection:
    fds = []
    try:
        for dup in (token, mine, peer, sock):
            fds.append(dup.detach())
        return Connection._make(arena, send=send, recv=recv, token=fds[0], mine=fds[1], peer=fds[2],
                                sock=fds[3])
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def wait(object_list: Any, timeout: float | None = None) -> list:
    """Like ``multiprocessing.connection.wait``: return the objects of
    `object_list` that are ready, waiting up to `timeout` seconds (None:
    forever) for at least one.

    `object_list` may mix shmipc Connections and queues with whatever
    multiprocessing's wait takes (its Connections, sockets,
    ``Process.sentinel`` ints, objects with ``fileno()``). It waits on their
    descriptors (multiprocessing's own wait works on shmipc objects too);
    this one also counts a message that poll() received ahead as ready, and
    never reports a shmipc Connection whose descriptor holds nothing to
    receive (a readiness byte another holder's message left behind).

    Raises:
        OSError: a shmipc Connection in the list is closed.
        ValueError: a NaN timeout (as multiprocessing).
    """
    from multiprocessing.connection import wait as wait_fds

    objects = list(object_list)
    ours = [obj for obj in objects if isinstance(obj, Connection)]
    if not ours:
        return wait_fds(objects, timeout)
    deadline = None if timeout is None else time.monotonic() + _timeout(timeout)
    while True:
        ahead = [c for c in ours if c._pending is not _NOTHING and c._pending is not _ABANDONED]
        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        ready = wait_fds(objects, 0 if ahead else left)
        ready = [obj for obj in objects if obj in ready or obj in ahead]
        ready = [obj for obj in ready if not isinstance(obj, Connection) or obj in ahead
                 or obj.poll(0)]
        if ready:
            return ready
        if deadline is not None and time.monotonic() >= deadline:
            return []


def __getattr__(name: str) -> Any:
    """Names of ``multiprocessing.connection`` that shmipc has no version of
    (Listener, Client, answer_challenge, ...) are multiprocessing's, so code
    that does ``import shmipc as multiprocessing`` finds them here too."""
    if not name.startswith("_"):
        import multiprocessing.connection as mp_connection

        try:
            return getattr(mp_connection, name)
        except AttributeError:
            pass
    raise AttributeError(f"module 'shmipc.connection' has no attribute {name!r}")
