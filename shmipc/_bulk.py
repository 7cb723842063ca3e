"""Queue messages larger than the queue's ring: a second ("bulk") ring of the
queue's arena carries them in chunks (see :class:`_Bulk`). Used by
shmipc.queues only."""
from __future__ import annotations

import collections
import os
import threading
import time
import weakref
from typing import Any

import fcntl
import queue

from shmipc import _framing
from shmipc._framing import Frame as _Frame
from shmipc._ring import ident_alive, self_ident
from shmipc.arena import Arena
from shmipc._waiting import (BULK_HOLDER_QUIET_S, BULK_LOCK_MAX_S, BULK_LOCK_S, BULK_WRITE_SLICE_S,
                             Backoff)
from shmipc.errors import RingClosed

# Byte offsets of the record locks (on the arena's file) that serialise the
# writers and the readers of large messages; far past any arena's end and
# apart from the arena's own table lock (offset 0).
_WRITER_LOCK = 1 << 60
_READER_LOCK = (1 << 60) + 1


# a large put waits for room in the bulk ring this long at a time, then
# checks its deadline and that its reader is still there
_WRITE_SLICE_S = BULK_WRITE_SLICE_S

# The queue's arena block of this name holds the shared state of its large
# messages (see _Bulk), u64 words at these byte offsets, each changed only
# under its lock:
_LOST_BLOCK = "bulk_lost"
_LOST = 0           # (arena lock) large messages counted lost
_READING = 8        # (reader lock) 1 + the number of the frame its holder is in; 0: none
_NEXT = 16          # (writer lock) the number the next token gets
_DONE = 24          # (writer lock) every frame numbered below is whole in the bulk ring, or aborted
_TURN = 32          # (reader lock) the number of the frame to be read next
_HOLDERS = 64       # _SLOTS pairs (1 + number, identity): who holds which token (the
                    # holder's _ring.self_ident(): pid and start time; 0: given up), see _hold
_SLOTS = 124
BLOCK_SIZE = _HOLDERS + 16 * _SLOTS         # 2 KiB
_SEQ_LIMIT = 1 << 62                        # numbers at or past it are garbage


def _number(value: Any) -> int | None:
    """A frame number read from shared memory, or None if it is not one."""
    return value if type(value) is int and 0 <= value < _SEQ_LIMIT else None


class _ReaderLeft(Exception):
    """The reader of the frame being written left it midway."""


class _NoFrame(Exception):
    """A reader holds a token whose frame will never come, or was given up
    for it (see _Bulk)."""


# every _Bulk of this process, to re-make their thread locks after fork
_all_bulks: "weakref.WeakSet[_Bulk]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for bulk in list(_all_bulks):
        bulk._new_locks()


class _Bulk:
    """Messages larger than the main ring's max_message_size, through a
    second ring of the queue's arena (the "bulk" ring).

    A writer, holding the writer lock: puts a numbered token
    (``Frame("token", seq=n)``) in the main ring -- so the message takes
    its place in the queue, counts against maxsize and as a JoinableQueue
    task -- then a header of the same number (``Frame("object", sizes,
    seq=n)``) and the parts in chunks in the bulk ring. A consumer that gets
    token n says so in the holders table, waits for its turn (frame n is the
    next to be read), takes the reader lock and reads frame n, streaming as
    the writer writes.

    Invariants (the numbers and the table live in the arena block
    _LOST_BLOCK, see its layout above):
        * Tokens and frames are numbered 0, 1, 2... in the order they enter
          their rings (writer lock): frame n is the only one token n stands
          for, and the frames in the bulk ring are in number order.
        * Frames are read in number order, one at a time (reader lock): the
          turn (the number of the next frame to read) moves past n only
          once frame n was read, or given up, or will never come. A reader
          never takes a header numbered past its own (save junk).
        * The turn waits for a live holder only: a holder found dead (or
          that gave its token up, or that never said it held it
          BULK_HOLDER_QUIET_S after a later token was taken) has its frame
          counted lost, and the turn moves on; so does a reader killed
          inside its frame (its _READING mark). The frame's records are
          then skipped as leftovers (numbered below the turn).
        * A frame that will never be whole (its writer died, or gave up)
          is followed, before any later frame, by an abort record numbered
          as the last of the frames that will not come (``_DONE`` tells the
          next writer); a reader meeting it, or finding the bulk ring empty
          while no writer is at work, drops its token (JoinableQueue marks
          it done). So every token's message is delivered once, or counted
          lost, or dropped because its put never finished; nothing torn is
          delivered, and nobody waits for a frame that cannot come.
        * Locks are POSIX record locks on the arena's file, released by
          the kernel when their holder dies, plus a thread lock for the
          threads of one process.
    """

    #: called as on_error(exception, obj) when a feeder thread fails to write
    #: a message (the queue's _on_queue_feeder_error, as multiprocessing's)
    on_error: Any = None

    def __init__(self, arena: Arena, ring: Any) -> None:
        self.arena = arena
        self.ring = ring
        self.chunk = _framing.chunk_size(ring.max_message_size)
        self._block_view: memoryview | None = None
        # the turn whose token nobody said they hold, and since when (see _reap)
        self._quiet: tuple[int, float] | None = None
        self.feeders: list[threading.Thread] = []
        self._exit_join = False
        self.cancel_join = False
        self._new_locks()
        _all_bulks.add(self)

    def _new_locks(self) -> None:
        """Fresh thread locks: at creation, and in a forked child (a lock
        held by a thread of the parent would stay held there forever; the
        record locks are not inherited by a child anyway)."""
        self.locks = {_WRITER_LOCK: threading.Lock(), _READER_LOCK: threading.Lock()}
        self.feeders = []           # a parent's feeder threads do not exist in a child
        # the frames handed to this process's feeder thread, in order, and
        # whether one runs (see _hand_off); guarded by feed_lock
        self.feed_lock = threading.Lock()
        self.feed_queue: collections.deque = collections.deque()
        self.feeding = False
        self._exit_join = False     # multiprocessing clears its finalizers in a child

    def __getstate__(self) -> dict:
        return {"arena": self.arena, "ring": self.ring}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["arena"], state["ring"])

    # ------------------------------------------------------------ locks
    def _acquire(self, which: int, deadline: float | None) -> bool:
        """Take a lock; False if the deadline passed first."""
        tlock = self.locks[which]
        if not tlock.acquire(timeout=-1 if deadline is None else max(deadline - time.monotonic(), 0)):
            return False
        backoff = Backoff(BULK_LOCK_S, BULK_LOCK_MAX_S)
        while True:
            try:
                fcntl.lockf(self.arena.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, which)
                return True
            except (BlockingIOError, PermissionError):
                pass            # another process holds it
            except BaseException:
                tlock.release()
                raise
            # bounded: the holder finishes or dies (the kernel frees it)
            if not backoff.sleep(deadline):
                tlock.release()
                return False

    def _release(self, which: int) -> None:
        try:
            fcntl.lockf(self.arena.fd, fcntl.LOCK_UN, 1, which)
        finally:
            self.locks[which].release()

    def _writer_active(self) -> bool:
        """True if some thread or process is writing a large message."""
        return self._lock_held(_WRITER_LOCK)

    # ------------------------------------------------------------ writing
    def put(self, main: Any, obj: Any, block: bool, timeout: float | None) -> None:
        """Put `obj` (too large for the main ring) as a token and a frame.

        The frame is written in slices, each waiting at most 50 ms for room,
        so that the writer keeps its deadline and notices a reader that left
        mid-frame (killed, or interrupted by an exception): it then discards
        the rest of the frame from the bulk ring and counts the message lost
        (the reader took its token, so it is gone), and returns.

        Raises:
            queue.Full: the writer lock, room for the token, or room for the
                frame did not come in time (at once when block is False). If
                the token was in already, the frame is left incomplete: the
                reader that takes the token skips it (see the class
                docstring), nothing torn is delivered.
            Whatever pickling `obj` raises (nothing was put).
        """
        parts = [memoryview(p).cast("B") for p in _framing.dump_parts(obj)]
        deadline = None if not block or timeout is None else time.monotonic() + timeout
        if block and deadline is None:
            # the frame may not fit before a reader comes, and the only
            # reader may be our caller (put then get in one thread): a
            # feeder thread writes it, as multiprocessing's does
            self._hand_off(main, parts, obj, True)
            return
        if not self._acquire(_WRITER_LOCK, deadline if block else time.monotonic()):
            raise queue.Full
        try:
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            ticket = self._put_token(main, block, remaining)    # queue.Full: nothing put
            self._write_frame(parts, block, deadline, ticket)
        finally:
            self._release(_WRITER_LOCK)

    def _put_token(self, main: Any, block: bool, timeout: float | None) -> "_Ticket":
        """(Writer lock held) Put the next numbered token in the main ring;
        returns its number and how to tell that it was taken.

        Raises:
            queue.Full: no room for it (nothing was put).
            ValueError: the queue's shared state is damaged.
        """
        seq = _number(self._get(_NEXT))
        if seq is None:
            raise ValueError(f"the queue's shared state is damaged: next large-message number "
                             f"{self._get(_NEXT)} is not below {_SEQ_LIMIT}")
        # counted before the put: if we are killed with the token in, the
        # next writer must neither reuse the number nor leave it without an
        # abort record (see _settle)
        self._set(_NEXT, seq + 1)
        try:
            main.put(_framing.Frame("token", seq=seq), block, timeout)
        except BaseException:
            self._set(_NEXT, seq)       # not put: the number is free again
            raise
        return _Ticket(seq, main, main.stats(recover=False)["messages_in"])

    def try_hand_off(self, main: Any, obj: Any) -> bool:
        """put_async's large put: without waiting, take the writer lock and
        put the token, then hand the frame to a feeder thread (as a put
        without timeout does). False if the lock or room for the token is
        not there now (nothing was put: retry later).

        Raises:
            Whatever pickling `obj` raises (nothing was put).
        """
        parts = [memoryview(p).cast("B") for p in _framing.dump_parts(obj)]
        return self._hand_off(main, parts, obj, False)

    def _hand_off(self, main: Any, parts: list[memoryview], obj: Any, wait: bool) -> bool:
        """Put the token of `parts` and queue its frame for this process's
        feeder thread (started if none runs); waiting for the writer lock
        and room for the token if `wait`, else False if either is not there
        now (nothing was put).

        Invariant: while ``feeding``, this process holds the writer lock on
        behalf of its feeder thread, so every token put meanwhile (by any
        thread of ours) enters the main ring in the order its frame enters
        the feed queue, and the feeder writes the frames in that order with
        no other writer's frame between: tokens and frames pair up as when
        each put held the lock for itself, and a second large put does not
        wait for the first message to be read.

        The parts that are the caller's buffers are copied first: put has
        returned by the time they are written."""
        owned = [parts[0]] + [memoryview(bytes(p)) for p in parts[1:]]
        backoff = Backoff(BULK_LOCK_S, BULK_LOCK_MAX_S)
        while True:
            with self.feed_lock:
                if not self.feeding:
                    break
                # never wait for room under feed_lock: the feeder takes it
                # to go on to the next frame, and a reader may be waiting
                # for that frame before it frees room for our token
                try:
                    ticket = self._put_token(main, False, None)
                except queue.Full:
                    pass
                else:
                    self.feed_queue.append((owned, obj, ticket))
                    return True
            if not wait:
                return False
            backoff.sleep(None)     # the queue's ring is full: readers take tokens, or the feeder stops
        if not self._acquire(_WRITER_LOCK, None if wait else time.monotonic()):
            return False
        started = False
        try:
            try:
                ticket = self._put_token(main, wait, None)
            except queue.Full:
                return False
            with self.feed_lock:
                self.feed_queue.append((owned, obj, ticket))
                self.feeding = True
                self._start_feeder()
                started = True
            return True
        finally:
            if not started:
                self._release(_WRITER_LOCK)

    def _write_frame(self, parts: list[memoryview], block: bool, deadline: float | None,
                     ticket: "_Ticket") -> None:
        """Write the frame of `parts` (writer lock held, its token put):
        after _settle, its header, then the chunks. A reader that left
        mid-frame, or died holding the token, makes the rest be discarded;
        anything else that stops the write puts an abort record (if it can)
        and is raised."""
        seq = ticket.seq
        try:
            self._settle(seq, block, deadline)
            # records of the bulk ring put before ours: once more than these
            # were taken, a reader has started on our frame
            start = self.ring.stats(recover=False)["messages_in"]
            self._put_record(_framing.Frame("object", tuple(p.nbytes for p in parts), seq),
                             block, deadline, start, ticket)
            for part in parts:
                for off in range(0, part.nbytes, self.chunk):
                    self._put_record(part[off:off + self.chunk], block, deadline, start, ticket)
        except _ReaderLeft:
            self._discard_frame()
        except BaseException:
            try:
                self.ring.put(_framing.Frame("abort", seq=seq), False)
            except BaseException:
                pass        # the next frame's _settle puts it
            else:
                self._set(_DONE, seq + 1)
            raise
        self._set(_DONE, seq + 1)

    def _settle(self, seq: int, block: bool, deadline: float | None) -> None:
        """(Writer lock held) Before frame `seq`: if a frame numbered below
        it is not whole in the bulk ring and never will be (its writer was
        killed, or could not put its abort record), put one abort record
        numbered `seq` - 1: it tells the readers of those frames that they
        will not come, before they could take our header for theirs.

        Raises:
            queue.Full: no room for it by the deadline.
        """
        done = self._get(_DONE)
        if done < seq:
            self._put_record(_framing.Frame("abort", seq=seq - 1), block, deadline)
        self._set(_DONE, seq)

    def _start_feeder(self) -> None:
        """Start the daemon thread that writes the queued frames in order
        (see _hand_off), then releases the writer lock (held for it)."""

        def feed() -> None:
            try:
                while True:
                    with self.feed_lock:
                        if not self.feed_queue:
                            self._stop_feeding()
                            return
                        owned, obj, ticket = self.feed_queue.popleft()
                    self._feed_one(owned, obj, ticket)
            except BaseException:
                with self.feed_lock:
                    if self.feeding:
                        self._stop_feeding()
                raise

        thread = threading.Thread(target=feed, name="shmipc-queue-feeder", daemon=True)
        self.feeders = [t for t in self.feeders if t.is_alive()] + [thread]
        if not self._exit_join:
            # as multiprocessing: a process exits once its queued messages are
            # written (cancel_join_thread() skips this)
            self._exit_join = True
            from multiprocessing import util
            util.Finalize(self, _Bulk._join_at_exit, args=(weakref.ref(self),), exitpriority=10)
        thread.start()

    def _stop_feeding(self) -> None:
        """feed_lock held: the feeder ends; let go of the writer lock."""
        self.feeding = False
        self.feed_queue.clear()
        try:
            self._release(_WRITER_LOCK)
        except (OSError, ValueError):
            pass        # the queue's arena was closed: its record lock went with it

    def _feed_one(self, owned: list[memoryview], obj: Any, ticket: "_Ticket") -> None:
        """Write one queued frame (writer lock held for us)."""
        try:
            self._write_frame(owned, True, None, ticket)
        except BaseException as exc:
            # put has returned: the frame was aborted (readers skip it),
            # the message is lost; say so as multiprocessing's feeder does
            try:
                self.count_lost()
            except BaseException:
                pass            # the arena itself is gone
            on_error = self.on_error
            if on_error is not None:
                try:
                    on_error(exc, obj)
                except BaseException:
                    pass

    @staticmethod
    def _join_at_exit(ref: Any) -> None:
        bulk = ref()
        if bulk is not None and not bulk.cancel_join:
            bulk.join_feeders()

    def join_feeders(self, timeout: float | None = None) -> None:
        """Wait until the frames handed to feeder threads are written."""
        for thread in list(self.feeders):
            thread.join(timeout)

    def _put_record(self, rec: Any, block: bool, deadline: float | None, start: int | None = None,
                    ticket: "_Ticket | None" = None) -> None:
        """Put one record of the frame being written, waiting for room in
        slices (start, ticket: see _reader_left; None: no reader to watch for).

        Raises:
            queue.Full: no room by the deadline (at once when not block).
            _ReaderLeft: the reader of this frame left it midway.
        """
        if not block:
            self.ring.put(rec, False)
            return
        while True:
            wait = _WRITE_SLICE_S
            if deadline is not None:
                wait = min(wait, max(deadline - time.monotonic(), 0.0))
            try:
                self.ring.put(rec, True, wait)
                return
            except queue.Full:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            if ticket is not None and self._reader_left(start, ticket):
                raise _ReaderLeft

    def _reader_left(self, start: int | None, ticket: "_Ticket") -> bool:
        """True if nobody will read the rest of the frame being written:
        either a reader started on it (took record number `start` of the
        bulk ring, its header) and has let go of the reader lock (it died --
        the kernel freed its record lock -- or left by an exception), or the
        holder of its token is gone before reading it (see _reap: it died,
        gave the token up, or never said it held it although the token is
        known taken). The frame is not complete, or we would not be here."""
        if start is not None and self.ring.stats(recover=False)["messages_out"] > start:
            return not self._lock_held(_READER_LOCK)
        taken = ticket.main.stats(recover=False)["messages_out"] >= ticket.after
        turn = self._catch_up(ticket.seq + 1, patient=taken)
        # (None: a reader is at work: it reads our frame, or reaps its holder)
        return turn is not None and turn > ticket.seq

    def _lock_held(self, which: int) -> bool:
        """True if some thread or process holds lock `which`."""
        tlock = self.locks[which]
        if not tlock.acquire(blocking=False):
            return True             # a thread of this process
        try:
            try:
                fcntl.lockf(self.arena.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, which)
            except (BlockingIOError, PermissionError):
                return True         # another process
            fcntl.lockf(self.arena.fd, fcntl.LOCK_UN, 1, which)
            return False
        finally:
            tlock.release()

    def _discard_frame(self) -> None:
        """The reader of our frame left: take the reader lock, count the
        message it left lost (see _take_over) and throw away what is in the
        bulk ring (only our frame's records: everything before them was
        taken). If a new reader has the lock, that reader counts it and
        skips our records itself."""
        if self._acquire(_READER_LOCK, time.monotonic()):
            try:
                self._take_over()
                while True:
                    try:
                        with self.ring.get_view(False):
                            pass
                    except queue.Empty:
                        break
            finally:
                self._release(_READER_LOCK)

    # ------------------------------------------------------------ shared state
    def _words(self) -> memoryview:
        """The queue's _LOST_BLOCK as u64 words (see its layout at the top)."""
        if self._block_view is None:
            view = self.arena.block(name=_LOST_BLOCK)
            if view.nbytes < BLOCK_SIZE:
                raise ValueError(f"the queue's {_LOST_BLOCK!r} block has {view.nbytes} bytes, "
                                 f"not {BLOCK_SIZE}: made by another version of shmipc?")
            self._block_view = view[:BLOCK_SIZE].cast("Q")
        return self._block_view

    def _block(self) -> memoryview:
        """The same block as bytes (for tests that write junk into it)."""
        return self._words().cast("B")

    def _get(self, offset: int) -> int:
        return self._words()[offset >> 3]

    def _set(self, offset: int, value: int) -> None:
        self._words()[offset >> 3] = value

    def count_lost(self, n: int = 1) -> None:
        """`n` more large messages lost (shown in the queue's stats()["lost"])."""
        with self.arena.lock():
            self._set(_LOST, self._get(_LOST) + n)

    def lost(self, all_taken: bool = False) -> int:
        """Large messages lost: by readers that left them midway or died
        holding their token, and by writers whose reader left. Counts first
        (if the reader lock is free) what dead readers left uncounted. A
        getter killed before it said it held its token is seen only by
        waiting (see _reap): by a later reader, or by calls BULK_HOLDER_QUIET_S
        apart while `all_taken` (the queue's ring is empty: every token
        put was taken)."""
        nxt = self._get(_NEXT)
        if self._get(_READING) or self._get(_TURN) < nxt:
            self._catch_up(nxt, patient=all_taken)
        return self._get(_LOST)

    def _catch_up(self, upto: int, patient: bool) -> int | None:
        """If the reader lock is free now: count what its last holder left
        (_take_over) and move the turn past the dead readers' frames below
        `upto` (_reap). Returns the turn, or None if the lock was held."""
        if not self._acquire(_READER_LOCK, time.monotonic()):
            return None
        try:
            self._take_over()
            return self._reap(upto, patient)
        finally:
            self._release(_READER_LOCK)

    def holders(self) -> dict[int, int]:
        """{token number: pid} of the readers holding a large message's
        token whose frame's turn has not gone yet (0: given up, to be
        counted lost)."""
        turn = self._get(_TURN)
        return {seq: ident & 0xFFFFFFFF for seq, ident in self._holders().items() if seq >= turn}

    def _holders(self) -> dict[int, int]:
        """{token number: holder's identity} (see _HOLDERS; an entry in the
        wrong slot for its number is junk, left out)."""
        table = self._words()[_HOLDERS >> 3:].tolist()
        return {key - 1: ident for slot, (key, ident) in enumerate(zip(table[0::2], table[1::2]))
                if key and (key - 1) % _SLOTS == slot}

    def _hold(self, seq: int, ident: int) -> None:
        """Say in the holders table that the process of identity `ident`
        (_ring.self_ident()) holds token `seq` (0: it was given up).

        Token n has slot n % _SLOTS, its holder's alone: no lock is needed
        (the identity is written before the number, so that a number read
        is never paired with a stale identity). Only if more than _SLOTS
        readers hold tokens at once can one overwrite another's entry: that
        token then goes unsaid (see _reap)."""
        words = self._words()
        at = self._slot(seq)
        words[at + 1] = ident
        words[at] = seq + 1

    @staticmethod
    def _slot(seq: int) -> int:
        """The index, in _words(), of token `seq`'s slot of the holders table."""
        return (_HOLDERS >> 3) + 2 * (seq % _SLOTS)

    def _unhold(self, seq: int) -> None:
        """Token `seq` is no longer held (its frame was read or dropped)."""
        words = self._words()
        at = self._slot(seq)
        if words[at] == seq + 1:
            words[at] = 0
            words[at + 1] = 0

    def give_up(self, token: Any) -> None:
        """A token taken from the main ring that will not be read (its
        getter failed first): whoever reads next counts its message lost."""
        seq = _number(getattr(token, "seq", None))
        if seq is not None:
            self._hold(seq, 0)

    def _take_over(self) -> None:
        """Just took the reader lock: if its last holder left while inside a
        frame without clearing the mark (it was killed, or left by an
        exception while a writer was still writing), that message is lost:
        count it (first, then clear: a kill in between counts it twice
        rather than not at all), and move the turn past it."""
        mark = self._get(_READING)
        if mark:
            self.count_lost()
            if mark <= self._get(_NEXT):
                self._pass(mark)
            self._set(_READING, 0)

    def _pass(self, n: int) -> None:
        """(Reader lock held) The frames numbered below `n` are done with:
        the turn moves on to `n` (never back)."""
        self._set(_TURN, max(self._get(_TURN), n))

    def _reap(self, upto: int, patient: bool) -> int:
        """(Reader lock held) Move the turn past the frames, numbered below
        `upto`, whose readers are gone: the holder died or gave its token
        up -- or, if `patient`, nobody said they held it for
        BULK_HOLDER_QUIET_S (its getter was killed between taking it and
        saying so; every token below ours was taken before ours). Each is
        counted lost; its records are skipped as leftovers by the next
        reader. Returns the turn."""
        turn = self._get(_TURN)
        if turn > self._get(_NEXT):
            # junk in shared memory (no frame is numbered past _NEXT): a
            # reader starts again from its own frame (those before it are
            # then skipped as leftovers); stats() leaves it to them
            if not patient:
                return turn
            turn = upto
        holders = self._holders() if turn < upto else {}
        while turn < upto:
            ident = holders.get(turn)
            if ident is None:
                if not patient:
                    break
                now = time.monotonic()
                if self._quiet is None or self._quiet[0] != turn:
                    self._quiet = (turn, now)
                    break
                if now - self._quiet[1] < BULK_HOLDER_QUIET_S:
                    break
                # every number up to the next one held is unsaid: all lost
                to = min((n for n in holders if turn < n < upto), default=upto)
                self.count_lost(to - turn)
                turn = to
                continue
            if ident_alive(ident):
                break           # it reads its frame when it gets the lock: wait for it
            self.count_lost()
            self._unhold(turn)
            turn += 1
        self._set(_TURN, turn)
        return turn

    # ------------------------------------------------------------ reading
    def read(self, token: Any) -> Any:
        """The message of `token` (a Frame just taken from the main ring).

        Raises:
            _NoFrame: its frame will never come, or was given up for it
                (counted lost: this reader was taken for dead). See the
                class docstring.
        """
        seq = _number(getattr(token, "seq", None))
        if seq is None:
            raise _NoFrame          # not a token of ours (junk): nothing stands behind it
        self._hold(seq, self_ident())
        given_up = inside = False
        try:
            backoff = Backoff(BULK_LOCK_S, BULK_LOCK_MAX_S)
            while True:
                self._acquire(_READER_LOCK, None)
                try:
                    self._take_over()
                    turn = self._reap(seq, patient=True)
                    if turn == seq:
                        inside = True
                        return self._read_frame(seq)
                    if turn > seq:
                        raise _NoFrame
                finally:
                    self._release(_READER_LOCK)
                # an older token's reader is alive (or has not said so yet):
                # its frame comes first
                backoff.sleep(None)
        except (_NoFrame, RingClosed):
            raise
        except BaseException:
            # left before our turn (Ctrl-C, a signal handler raising): give
            # the token up, the next reader counts it lost. (Left inside our
            # frame: _read_frame's mark says so.)
            if not inside:
                try:
                    self._hold(seq, 0)
                    given_up = True
                except BaseException:
                    pass
            raise
        finally:
            if not given_up:
                try:
                    self._unhold(seq)
                except (OSError, ValueError, RingClosed):
                    pass        # the arena was closed under us

    def _read_frame(self, seq: int) -> Any:
        """(Reader lock held, frame `seq`'s turn) Read frame `seq`, skipping
        what comes before it; the turn then moves past it."""
        # From here until the frame is read, its message is ours alone: a
        # kill leaves the mark set, and whoever takes the lock next (a
        # reader, the writer discarding the frame, stats()) counts the
        # message lost
        self._set(_READING, seq + 1)
        try:
            item = self._next()
            while True:
                number = _number(getattr(item, "seq", None)) if type(item) is _Frame else None
                if number is None or number < seq:
                    item = self._next()             # leftovers of a torn or given-up frame, or junk
                    continue
                if item.kind == "abort":
                    if number >= self._get(_NEXT):
                        item = self._next()         # junk: no frame is numbered so
                        continue
                    self._pass(number + 1)
                    raise _NoFrame                  # the frames up to `number` will not come
                if number > seq:
                    raise _NoFrame                  # (junk: a later header is never before an abort)
                if item.kind != "object" or not item.sizes:
                    item = self._next()
                    continue
                try:
                    parts = _framing.read_parts(item.sizes, self._chunk_into)
                except _Torn as exc:
                    item = exc.item                 # a new header (or junk): go on from it
                    continue
                break
        except _NoFrame:
            self._pass(seq + 1)
            self._set(_READING, 0)                  # dropped (see the class docstring), not lost
            raise
        except RingClosed:
            raise                                   # closed under us: the arena may be gone too
        except BaseException:
            # left midway (Ctrl-C, a signal handler raising): the next
            # reader skips the rest as leftovers. With no writer at work
            # the loss is counted now; else the mark stays, and the
            # writer (noticing, it discards the frame) or the next
            # reader counts it
            if not self._lock_held(_WRITER_LOCK):
                self._take_over()
            raise
        self._pass(seq + 1)
        self._set(_READING, 0)
        return _framing.load_parts(parts)

    def _next(self) -> Any:
        """The next bulk record, waiting while a writer is at work."""
        while True:
            try:
                return self.ring.get(True, 0.05)
            except queue.Empty:
                pass
            if not self._writer_active() and self.ring.empty():
                raise _NoFrame

    def _chunk_into(self, dest: memoryview) -> int:
        """Copy the next chunk of the frame being read into `dest`, straight
        from the ring."""
        while True:
            try:
                with self.ring.get_view(True, 0.05) as view:
                    if type(view) is not memoryview or view.nbytes > dest.nbytes:
                        raise _Torn(view if type(view) is not memoryview else None)
                    n = view.nbytes
                    dest[:n] = view
                    return n
            except queue.Empty:
                pass
            if not self._writer_active() and self.ring.empty():
                raise _Torn(None)   # the writer died midway: skip, read on


class _Ticket:
    """A large put's token: its number, the queue's ring, and that ring's
    messages_in count just after the put (once messages_out reaches it, the
    token was surely taken)."""

    __slots__ = ("seq", "main", "after")

    def __init__(self, seq: int, main: Any, after: int) -> None:
        self.seq = seq
        self.main = main
        self.after = after


class _Torn(Exception):
    """The frame being read was cut short; ``item`` is the record found
    instead of its next chunk (None: nothing)."""

    def __init__(self, item: Any) -> None:
        self.item = item


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
