"""A hypothesis state machine: the ring against a model of its byte accounting.

The model keeps the messages in a deque and mirrors head/tail arithmetic
(16-byte record headers, 16-byte alignment, a padding record when a record
would cross the end), so it predicts exactly when a non-blocking put must
succeed and when it must raise queue.Full — wrap-around, mixed sizes,
batches and the full/empty edges all fall out of random programs.

Some messages do not decode on the way out (an exception whose ``__init__``
takes other arguments): the model also predicts which call raises for each,
and that every other message is still delivered once, in order.
"""
from __future__ import annotations

import pickle
import queue
from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

import shmipc

CAPACITY = 2048


def rec_len(payload: int) -> int:
    return (16 + payload + 15) & ~15


class Undecodable(Exception):
    """Pickles, but unpickling calls Undecodable(msg) and fails."""

    def __init__(self, msg, code):
        super().__init__(msg)
        self.code = code


BAD = object()      # marks an undecodable message in the model
FAILED = object()   # an undecodable message already met (and counted), raised by the next call


def pickled_size(obj) -> int:
    """The payload size of a pickled message: a 16-byte segment table, then
    the stream, 16-aligned."""
    return 16 + ((len(pickle.dumps(obj, protocol=5)) + 15) & ~15)


class RingModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.arena = shmipc.Arena(1 << 20)
        self.messages: deque[tuple[object, int]] = deque()   # (message or BAD, end position)
        self.pending: deque[object] = deque()   # taken from the ring, not yet delivered
        self.head = self.tail = 0
        self.counter = 0
        self.bad = 0            # undecodable messages met so far (stats()["bad_messages"])

    @initialize(sides=st.sampled_from(["one", "many"]))
    def make_ring(self, sides: str) -> None:
        self.ring = self.arena.ring(CAPACITY, producers=sides, consumers=sides)

    def teardown(self) -> None:
        self.arena.close()

    def fits(self, size: int, head: int) -> tuple[bool, int]:
        length = rec_len(size)
        off = head % CAPACITY
        to_end = CAPACITY - off
        total = length if length <= to_end else to_end + length
        return head - self.tail + total <= CAPACITY, head + total

    def message(self, size: int) -> bytes:
        self.counter += 1
        return (self.counter.to_bytes(4, "little") * (size // 4 + 1))[:size]

    @rule(size=st.integers(0, CAPACITY // 2 - 16))
    def put(self, size: int) -> None:
        msg = self.message(size)
        ok, end = self.fits(size, self.head)
        if ok:
            self.ring.put_nowait(msg)
            self.head = end
            self.messages.append((msg, end))
        else:
            with pytest.raises(queue.Full):
                self.ring.put_nowait(msg)

    @rule(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12))
    def put_many(self, sizes: list[int]) -> None:
        msgs = [self.message(s) for s in sizes]
        head, accepted = self.head, []
        for msg in msgs:
            ok, end = self.fits(len(msg), head)
            if not ok:
                break
            head = end
            accepted.append((msg, end))
        if len(accepted) == len(msgs):
            assert self.ring.put_many(msgs, block=False) == len(msgs)
        else:
            with pytest.raises(queue.Full) as info:
                self.ring.put_many(msgs, block=False)
            assert info.value.args[0] == len(accepted)
        self.head = head
        self.messages.extend(accepted)

    @rule(n=st.integers(0, 200))
    def put_undecodable(self, n: int) -> None:
        obj = Undecodable("x" * n, n)
        ok, end = self.fits(pickled_size(obj), self.head)
        if ok:
            self.ring.put_nowait(obj)
            self.head = end
            self.messages.append((BAD, end))
        else:
            with pytest.raises(queue.Full):
                self.ring.put_nowait(obj)

    def deliver(self, batch: list) -> list:
        """What one call delivers from `batch` (taken in order): the messages
        before the first undecodable one; it raises if that comes first. The
        rest waits in self.pending."""
        for i, msg in enumerate(batch):
            if msg is BAD:
                self.bad += 1
                if i == 0:
                    self.pending.extend(batch[1:])
                    return None                     # the call raises
                self.pending.append(FAILED)
                self.pending.extend(batch[i + 1:])
                return batch[:i]
        return batch

    def take(self, k: int) -> list | None:
        """The model of get_many(k): None if it raises."""
        if self.pending:
            out = []
            while self.pending and len(out) < k:
                if self.pending[0] is BAD:          # decoded now: fails, counted
                    self.bad += 1
                    self.pending[0] = FAILED
                if self.pending[0] is FAILED:
                    if out:
                        break
                    self.pending.popleft()
                    return None
                out.append(self.pending.popleft())
            return out
        batch = [self.messages.popleft() for _ in range(min(k, len(self.messages)))]
        self.tail = batch[-1][1]
        return self.deliver([m for m, _ in batch])

    def check(self, k: int, call) -> None:
        if not self.messages and not self.pending:
            with pytest.raises(queue.Empty):
                call()
            return
        expected = self.take(k)
        if expected is None:
            with pytest.raises(shmipc.CorruptMessage):
                call()
        else:
            assert call() == expected

    @rule()
    def get(self) -> None:
        self.check(1, lambda: [self.ring.get_nowait()])

    @rule(k=st.integers(1, 10))
    def get_many(self, k: int) -> None:
        self.check(k, lambda: self.ring.get_many(k, block=False))

    @rule()
    def get_view(self) -> None:
        def view():
            with self.ring.get_view(block=False) as v:
                return [bytes(v)]
        self.check(1, view)

    @invariant()
    def counts_agree(self) -> None:
        if hasattr(self, "ring"):
            assert self.ring.qsize() == len(self.messages) + len(self.pending)
            assert self.ring.empty() == (not self.messages and not self.pending)
            stats = self.ring.stats()
            assert stats["bytes_used"] == self.head - self.tail
            assert stats["lost"] == 0
            assert stats["bad_messages"] == self.bad


RingModel.TestCase.settings = settings(max_examples=200, stateful_step_count=80, deadline=None)
TestRingModel = pytest.mark.timeout(120)(RingModel.TestCase)
