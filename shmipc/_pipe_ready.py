"""A Pipe end's readiness descriptor and awaiting methods (a mixin of
shmipc.connection.Connection).

Readiness descriptor (``fileno()``):
Each Pipe also owns a ``socket.socketpair()``; an end's ``fileno()`` is
its socket, held exactly by the holders of that end (so it travels and
dies with the end, like the tokens). It serves two things, as a
multiprocessing Connection's descriptor does: it is readable while a
message is waiting or the other end is gone (so
``multiprocessing.connection.wait``, ``select``, ``selectors`` and
asyncio's ``loop.add_reader`` watch shmipc connections mixed with
sockets and pipes), and ``multiprocessing.reduction.send_handle`` /
``recv_handle`` pass file descriptors over it (SCM_RIGHTS).

The sender's ring sends one readiness byte on the sender's socket after
a commit that finds none out (``wait.ready_signalled`` in the ring
header: see ``Ring._ready_rearm``): so while nobody polls, a put pays one
relaxed load in C, the byte of the first message staying out. The
reader takes the byte out ("re-arms") only when it finds the ring
empty: in ``fileno()`` (which ``wait``, ``recv_handle`` and ``register``
call), and after each receive once ``fileno()`` was called in this
process. Invariants: a message in the ring implies a readiness byte out
(sent, or being sent by a producer between its exchange and its send);
a readiness byte is taken out only when it is at the front of the
socket (a peeked byte of anything else -- an fd message, a user's
bytes -- is left alone: the socket is readable anyway) and the ring was
seen empty. So a message is never unannounced, and a stale byte never
sits in front of an fd message for ``recv_handle`` as long as the
messages sent before the fd were received first (the order
multiprocessing requires anyway, its data and fds sharing one stream).

One case differs from multiprocessing: if the writer sends messages, then
a descriptor, then more messages, and the reader (having received the
first messages) calls recv_handle while the later ones are still in the
ring, the readiness byte of the first ones still stands in front of the
descriptor (it stands for the later messages too) and recv_handle raises
RuntimeError. Receive what was sent after the descriptor only after
recv_handle, or send descriptors before the messages that follow them are
sent (the usual request/response order).
"""
from __future__ import annotations

import pickle
import queue
import select
import socket
import time
from typing import Any

from shmipc import _framing
from shmipc.errors import MessageTooLarge, PeerDied, RingClosed
from shmipc._pipe_frames import _ABANDONED, _NOTHING

# the readiness byte the ring sends (SHM_READY_BYTE in _shm.h)
_READY = b"R"
# how long taking out a readiness byte still in flight may wait (its
# producer is between two instructions, or died there)
_DRAIN_WAIT = 1.0


class _Readiness:
    """fileno() and the *_async methods, for Connection."""

    _nothing = _NOTHING             # for shmipc.aio
    _pending: Any
    _recv_ring: Any
    _send_ring: Any
    _sock: Any
    _polled: bool

    def fileno(self) -> int:
        """This end's descriptor, as multiprocessing's: readable while a
        message is waiting (or the other end is gone, so that recv raises
        EOFError), for ``multiprocessing.connection.wait``, ``select``,
        ``selectors`` and ``loop.add_reader``; and a Unix socket connected
        to the other end, for ``multiprocessing.reduction.send_handle`` /
        ``recv_handle``. Never read from it yourself (but through
        recv_handle): it also carries readiness bytes.

        From the first call on, receives in this process keep its
        readiness exact (a few system calls when they empty the ring);
        before, receiving costs nothing extra. See the module docstring.

        Raises:
            OSError: this end is closed.
        """
        self._check_closed()
        if self._recv_ring is not None:
            self._polled = True
            self._rearm()
        return self._sock.fileno()

    def _rearm(self) -> None:
        """Take the readiness byte out if it stands for nothing any more (the
        ring is empty and no message was received ahead by poll)."""
        ring = self._recv_ring
        if ring is None or (self._pending is not _NOTHING and self._pending is not _ABANDONED):
            return
        try:
            front = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            front = None            # nothing (or our byte still in flight)
        except OSError:
            return
        if front is not None and front != _READY:
            return                  # EOF, an fd message, a user's bytes: readable anyway
        try:
            take = ring._ready_rearm()
        except RingClosed:
            self._raise_closed()
        if take:
            self._drain_ready()

    def _drain_ready(self) -> None:
        """Take one readiness byte out of the socket, waiting a little for
        it if its producer is between announcing and sending it."""
        sock = self._sock
        deadline = time.monotonic() + _DRAIN_WAIT
        while True:
            try:
                front = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                if front == _READY:
                    sock.recv(1, socket.MSG_DONTWAIT)
                return              # taken; or EOF / something else in front: leave it
            except BlockingIOError:
                pass
            except OSError:
                return
            if time.monotonic() >= deadline or self._peer_gone():
                return              # its producer died midway: a late byte is one spare wake-up
            select.select([sock], [], [], 0.005)

    # ------------------------------------------------------------ asyncio
    async def send_async(self, obj: Any) -> None:
        """Like send, awaiting room without blocking the event loop (a
        non-blocking put retried on asyncio timers, 50 us growing to 5 ms,
        while the ring is full). Cancelled midway, nothing is sent (a chunked
        message is aborted, the reader drops it). See shmipc.aio.

        Raises:
            BrokenPipeError, OSError, pickling errors: as send.
        """
        from shmipc import aio

        self._check_writable()
        if type(obj) is bytearray:
            # pickled, as send() sends it (a bytearray record is a chunk)
            obj = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
            return await self.send_bytes_async(obj)
        records = [obj]
        await aio.after_waiting_sends(self)
        try:
            if self._put_if_room(obj):
                return                  # the common case
        except MessageTooLarge:
            records = self._frame_records("object", _framing.dump_parts(obj))
        await aio.send_when_room(self, records)

    async def send_bytes_async(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        """Like send_bytes, awaiting room as send_async does.

        Raises:
            ValueError, BrokenPipeError, OSError: as send_bytes.
        """
        from shmipc import aio

        payload = self._payload(buf, offset, size)
        form = self._bytes_form(payload)
        if form == "pickled":
            records = [_framing.Pickled(bytes(payload))]
        elif form == "framed":
            records = self._frame_records("bytes", [payload])
        else:
            records = [payload]
            await aio.after_waiting_sends(self)
            if self._put_if_room(payload):
                return                  # the common case
        await aio.send_when_room(self, records)

    def _put_if_room(self, obj: Any) -> bool:
        """Put one record if there is room now (send_async's first try):
        False if not, or if the ring's last reader process died (the
        caller waits, and looks at the reader)."""
        try:
            self._send_ring.put(obj, False)
            return True
        except (queue.Full, PeerDied):
            return False
        except RingClosed:
            self._raise_closed()

    async def recv_async(self) -> Any:
        """Like recv, awaiting a message without blocking the event loop and
        without a thread: waits on fileno() with ``loop.add_reader``. A
        cancelled await loses no message (one is taken only once it is
        there, and returned in the same step). A message larger than half
        the ring is read as it streams in, blocking the loop meanwhile.

        Raises:
            EOFError: the other end is gone and nothing is left to read.
            OSError, unpickling errors: as recv.
        """
        from shmipc import aio

        return await aio.recv_when_ready(self, False, None)

    async def recv_bytes_async(self, maxlength: int | None = None) -> bytes:
        """Like recv_bytes, awaiting as recv_async does.

        Raises:
            EOFError, OSError: as recv_bytes.
        """
        from shmipc import aio

        return await aio.recv_when_ready(self, True, maxlength)

