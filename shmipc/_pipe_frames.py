"""Receiving a chunked message on a Pipe end (a mixin of
shmipc.connection.Connection): the records of a frame (see shmipc._framing)
read into whole parts, an interrupted receive's leftovers dropped, a
writer's abort or death costing the one message.

Invariants:
    * A frame's chunks are bytearray records (``_ring.Chunk``), and nothing
      else is: a Pipe sends a user's bytearray pickled. So a receive that
      meets a bytearray where a message should be drops it, whatever state
      an interrupted receive left behind (a signal's handler may raise
      after the ring consumed a frame's announcement and before the
      receive recorded it).
    * A frame's records are contiguous (its writer holds the ring's
      producers) unless the writer stopped midway -- killed, or interrupted
      with no room left for its ABORT: then the next record that is not a
      chunk ends the frame (dropped) and is delivered, so another sender's
      message is never read as a chunk of a dead one.
    * ``_frame_left`` is the number of bytes of the frame being read that
      have not been taken from the ring; while it is above zero after an
      interrupted receive, ``_pending`` is ``_ABANDONED`` and the next
      receive drops those bytes first.
"""
from __future__ import annotations

import pickle
import queue
import time
from typing import Any

from shmipc import _framing
from shmipc._framing import Frame as _Frame     # looked up on every recv
from shmipc.errors import PeerDied, RingClosed

#: Seconds a blocked recv/send waits on the ring before it checks whether the
#: other end still has a live holder.
SLICE = 0.05

_NOTHING = object()     # no message received ahead by poll()
# in _pending: a receive was interrupted (an exception from a signal handler,
# Ctrl-C) in the middle of a frame; _frame_left bytes of its chunks are still
# to come, and the next receive drops them before it takes a message
_ABANDONED = object()
_EOF_MESSAGE = "the other end of the pipe is closed and nothing is left to read"


class _Whole:
    """A message read whole and not yet made what a receive gives: what a
    read in a thread (as_bytes None) returns, so that whichever receive
    collects it converts it once, from the original (see _finish)."""

    __slots__ = ("kind", "parts")

    def __init__(self, kind: str, parts: list) -> None:
        self.kind = kind
        self.parts = parts


class _Interrupted(Exception):
    """Raised inside a frame's reading: a record that is not the next chunk
    arrived (the writer was interrupted), carried in ``item``."""

    def __init__(self, item: Any) -> None:
        self.item = item


def _detached(view: Any) -> Any:
    """A message taken with get_view, as get would have returned it (views
    over the ring die with the with-block)."""
    if type(view) is memoryview:
        return bytes(view)
    if type(view).__module__ == "numpy" and hasattr(view, "copy"):
        return view.copy()
    return view


def _as_bytes(item: Any) -> bytes:
    """A message as multiprocessing's recv_bytes returns it: bytes as they
    are, anything else sent with send() as its pickle."""
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    return pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)



class _FrameReading:
    """The receive side's record taking and frame reading, for Connection."""

    _pending: Any
    _frame_left: int
    _recv_ring: Any

    def _take(self, timeout: float | None, raw: bool = False) -> Any:
        """The next record, waiting up to `timeout` (None: forever). Unless
        `raw`, the rest of an interrupted frame is dropped first, and a
        frame's size is recorded the moment its announcement is taken.

        Raises:
            queue.Empty: nothing came in time (the peer is still held).
            EOFError: the peer is gone and everything it sent was read.
        """
        if not raw:
            if self._pending is _NOTHING and self._frame_left > 0:
                # a receive was interrupted between taking a frame's
                # announcement and reading its chunks (outside the reading's
                # own try): its chunks must not be taken for messages
                self._pending = _ABANDONED
            item = self._pending
            if item is not _NOTHING:
                self._pending = _NOTHING
                if item is _ABANDONED:
                    item = self._drop_abandoned(timeout)
                if item is not _NOTHING and type(item) is not bytearray:
                    return item
        ring = self._recv_ring
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = SLICE
            if deadline is not None:
                wait = min(SLICE, max(deadline - time.monotonic(), 0.0))
            item = _NOTHING
            try:
                item = ring.get(True, wait)
            except queue.Empty:
                pass
            except PeerDied:
                pass            # the last sender died; another holder may remain
            except EOFError:
                raise EOFError(_EOF_MESSAGE) from None
            except RingClosed:
                self._raise_closed()
            if item is _NOTHING and self._peer_gone():
                try:
                    item = ring.get_nowait()        # whatever it sent before going
                except (queue.Empty, EOFError):
                    raise EOFError(_EOF_MESSAGE) from None
            if item is not _NOTHING:
                if raw:
                    return item
                if type(item) is _Frame and item.sizes:
                    # from here its chunks belong to it (see _FrameReading)
                    self._frame_left = sum(item.sizes)
                if type(item) is not bytearray:
                    return item
                continue                    # a stray chunk (see the invariants): dropped
            if deadline is not None and time.monotonic() >= deadline:
                raise queue.Empty

    def _drop_abandoned(self, timeout: float | None) -> Any:
        """Take and drop the rest of a frame whose reading was interrupted
        (never deliver its chunks as messages). Returns the first record
        after it if one had to be taken to see that the writer gave up on
        the frame (not a chunk), else _NOTHING.

        Raises:
            queue.Empty: the rest did not come in time (dropped later).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._frame_left > 0:
            try:
                left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                item = self._take(left, raw=True)
            except BaseException:
                self._pending = _ABANDONED      # the next receive goes on dropping
                raise
            if type(item) is not bytearray or len(item) > self._frame_left:
                self._frame_left = 0            # the writer gave up on that frame
                return item
            self._frame_left -= len(item)
        return _NOTHING

    def _unframe(self, frame: Any, as_bytes: bool | None) -> Any:
        """The message a Frame (or Pickled) announces: for recv (as_bytes
        False) the object, for recv_bytes its bytes, as multiprocessing would
        give them; for a read in a thread (None) a _Whole, converted by the
        receive that collects it (_finish).
        Reads records until a whole message is there: an ABORT, or a record
        that is not the expected chunk (the writer was interrupted midway),
        drops the partial message and the next message is read instead.

        Raises:
            EOFError: the writer went away before the message was complete
                (nothing partial is delivered).
        """
        while True:
            if type(frame) is bytearray:
                frame = self._take(None)        # a stray chunk (see the invariants): dropped
                continue
            if type(frame) is _framing.Pickled:
                if type(frame.data) is not bytes:
                    frame = self._take(None)    # (only shmipc makes them: garbage) dropped
                    continue
                if as_bytes is None:
                    return _Whole("bytes", [frame.data])
                return frame.data if as_bytes else pickle.loads(frame.data)
            if type(frame) is not _Frame:
                return frame if not as_bytes else _as_bytes(frame)
            if frame.kind == "abort":
                frame = self._take(None)        # nothing pending: the next message
                continue
            if frame.sizes is None:
                # a mark for the next record, which shmipc no longer sends
                # (with several senders the next record need not be the one
                # it marked): dropped
                frame = self._take(None)
                continue
            self._frame_left = sum(frame.sizes)
            try:
                parts = _framing.read_parts(frame.sizes, self._next_chunk)
            except _Interrupted as exc:
                self._frame_left = 0
                frame = exc.item
                continue
            except BaseException:
                # interrupted (Ctrl-C, a signal handler) or the writer went
                # away: what remains of this frame must never be taken for
                # messages, so the next receive drops it first
                if self._frame_left > 0 and self._pending is _NOTHING:
                    self._pending = _ABANDONED
                raise
            if as_bytes is None:
                return _Whole(frame.kind, parts)
            return self._finish(_Whole(frame.kind, parts), as_bytes)

    @staticmethod
    def _finish(item: Any, as_bytes: bool) -> Any:
        """What recv (as_bytes False) or recv_bytes gives for a message
        _unframe(..., None) read: a _Whole, or a record's item."""
        if type(item) is not _Whole:
            return _as_bytes(item) if as_bytes else item
        parts = item.parts
        if item.kind == "bytes":
            data = parts[0] if len(parts) == 1 and type(parts[0]) is bytes else b"".join(parts)
            return data if as_bytes else pickle.loads(data)
        obj = _framing.load_parts(parts)
        return obj if not as_bytes else _as_bytes(obj)

    def _next_chunk(self, dest: memoryview) -> int:
        """Copy the next chunk record into `dest` (straight from the ring)."""
        if self._pending is not _NOTHING:
            item, self._pending = self._pending, _NOTHING
            raise _Interrupted(item)
        ring = self._recv_ring
        if ring is None:
            self._check_readable()
        while True:
            try:
                taking = ring.get_view(True, SLICE)
                with taking as view:
                    if type(view) is bytearray:         # (a chunk kept in the ring's pending)
                        view = memoryview(view)
                    elif type(view) is not memoryview or not taking.is_bytearray:
                        # not a chunk: the writer stopped midway (killed, or
                        # interrupted with no room for its ABORT), and this
                        # is another sender's message, whatever its type
                        raise _Interrupted(_detached(view))
                    if view.nbytes > dest.nbytes:
                        # a chunk of no frame this one could be: dropped with it
                        raise _Interrupted(bytearray())
                    n = view.nbytes
                    # counted first: from here the with-block's exit takes
                    # the record, even if an exception interrupts the copy
                    self._frame_left -= n
                    dest[:n] = view
                    return n
            except queue.Empty:
                pass
            except PeerDied:
                pass
            except EOFError:
                raise EOFError("the other end of the pipe closed in the middle of a message; "
                               "the partial message was dropped") from None
            except RingClosed:
                self._raise_closed()
            if self._peer_gone() and ring.empty():
                raise EOFError("the other end of the pipe went away in the middle of a "
                               "message; the partial message was dropped")

