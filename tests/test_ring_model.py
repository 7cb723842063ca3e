"""A hypothesis state machine: the ring against a model of its byte accounting.

The model keeps the messages in a deque and mirrors head/tail arithmetic
(16-byte record headers, 16-byte alignment, a padding record when a record
would cross the end), so it predicts exactly when a non-blocking put must
succeed and when it must raise queue.Full — wrap-around, mixed sizes,
batches and the full/empty edges all fall out of random programs.
"""
from __future__ import annotations

import queue
from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import shmipc

CAPACITY = 2048


def rec_len(payload: int) -> int:
    return (16 + payload + 15) & ~15


class RingModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.arena = shmipc.Arena(1 << 20)
        self.messages: deque[tuple[bytes, int]] = deque()    # (message, end position)
        self.head = self.tail = 0
        self.counter = 0

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

    @rule()
    def get(self) -> None:
        if not self.messages:
            with pytest.raises(queue.Empty):
                self.ring.get_nowait()
            return
        msg, end = self.messages.popleft()
        assert self.ring.get_nowait() == msg
        self.tail = end

    @rule(k=st.integers(1, 10))
    def get_many(self, k: int) -> None:
        if not self.messages:
            with pytest.raises(queue.Empty):
                self.ring.get_many(k, block=False)
            return
        expected = [self.messages.popleft() for _ in range(min(k, len(self.messages)))]
        assert self.ring.get_many(k, block=False) == [m for m, _ in expected]
        self.tail = expected[-1][1]

    @precondition(lambda self: bool(self.messages))
    @rule()
    def get_view(self) -> None:
        msg, end = self.messages.popleft()
        with self.ring.get_view(block=False) as view:
            assert view == msg
        self.tail = end

    @invariant()
    def counts_agree(self) -> None:
        if hasattr(self, "ring"):
            assert self.ring.qsize() == len(self.messages)
            assert self.ring.empty() == (not self.messages)
            stats = self.ring.stats()
            assert stats["bytes_used"] == self.head - self.tail
            assert stats["lost"] == 0


RingModel.TestCase.settings = settings(max_examples=200, stateful_step_count=80, deadline=None)
TestRingModel = pytest.mark.timeout(120)(RingModel.TestCase)
