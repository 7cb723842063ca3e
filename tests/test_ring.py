"""The ring: typed messages, ordering, wrap-around, timeouts, bad input, views, fork."""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import queue
import random
import signal
import struct
import threading
import time
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmipc
import shmipc.errors
from shmipc import _ring
from conftest import fork_child, ident as _ident, poke, region_of, wait_child, wait_until_asleep


@pytest.fixture
def arena():
    a = shmipc.Arena(32 << 20)
    yield a
    a.close()


@pytest.fixture(params=["one", "many"])
def sides(request):
    return request.param


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __eq__(self, other):
        return type(other) is Point and (self.x, self.y) == (other.x, other.y)


SAMPLES = [
    b"", b"raw bytes", bytes(range(256)) * 10, bytearray(b"mutable"), "", "h\xe9llo \u2603 \U0001f600",
    "lone \udc80 surrogate", 0, 1, -1, 2**63 - 1, -(2**63), 2**64, -(2**200), 0.0, -1.5, math.inf,
    True, False, None, {"id": 1, "tags": ["a", "b"]}, (1, "two", 3.0), [None, b"x"], Fraction(1, 3),
    Point(1, 2), {"nested": {"deep": [1, 2, {"x": b"y"}]}}, frozenset({1, 2}),
]


def same(a, b):
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    return type(a) is type(b) and a == b


@pytest.mark.timeout(20)
def test_native_and_pickled_messages_round_trip(arena, sides):
    ring = arena.ring(1 << 20, producers=sides, consumers=sides)
    for obj in SAMPLES:
        ring.put(obj)
    for obj in SAMPLES:
        got = ring.get(timeout=1)
        assert same(obj, got), (obj, got)
    nan = float("nan")
    ring.put(nan)
    assert math.isnan(ring.get(timeout=1))
    ring.put(memoryview(b"view"))
    assert ring.get(timeout=1) == b"view"        # a memoryview arrives as bytes
    ring.put(memoryview(np.arange(6, dtype=np.int16).reshape(2, 3)))
    assert ring.get(timeout=1) == np.arange(6, dtype=np.int16).tobytes()
    ring.put(memoryview(b"abcdef")[::2])          # not contiguous: copied
    assert ring.get(timeout=1) == b"ace"
    assert ring.empty() and ring.qsize() == 0


ARRAYS = [
    np.arange(10), np.zeros((3, 4, 5), dtype=np.float32), np.array(3.5), np.array([], dtype=np.int8),
    np.zeros((0, 7)), np.array([1 + 2j, 3 - 4j]), np.array([True, False]), np.array(["ab", "cde"]),
    np.array([b"x", b"yz"]), np.arange(3, dtype=">i4"), np.array(["2020-01-01", "2021-06-30"], dtype="M8[D]"),
    np.zeros(4, dtype=[("a", "<i8"), ("b", "<f4", (2,)), ("c", "S3")]), np.arange(24).reshape(2, 3, 4)[:, ::2, 1:],
    np.asfortranarray(np.arange(12.0).reshape(3, 4)), np.array([1, "mixed", None], dtype=object),
]


@pytest.mark.timeout(20)
def test_numpy_arrays_round_trip_writable(arena):
    ring = arena.ring(1 << 20)
    for a in ARRAYS:
        ring.put(a)
    for a in ARRAYS:
        got = ring.get(timeout=1)
        assert type(got) is np.ndarray and got.dtype == a.dtype and got.shape == a.shape
        assert (got == a).all() if a.dtype.kind != "O" else list(got) == list(a)
        if got.size:
            assert got.flags.writeable and got.flags.c_contiguous


@pytest.mark.timeout(20)
def test_pickled_arrays_travel_out_of_band(arena):
    ring = arena.ring(8 << 20)
    big = np.random.default_rng(1).random(200_000)      # 1.6 MB
    ring.put({"big": big, "label": "x"})
    stats = ring.stats()
    # one copy of the array in the ring, plus a small pickle: no in-band duplicate
    assert big.nbytes <= stats["bytes_in"] < big.nbytes + 1024
    got = ring.get(timeout=1)
    assert got["label"] == "x" and np.array_equal(got["big"], big) and got["big"].flags.writeable


@pytest.mark.timeout(30)
def test_wrap_around_keeps_order_and_content(arena, sides):
    ring = arena.ring(4096, producers=sides, consumers=sides)
    rng = np.random.default_rng(7)
    sent = received = 0
    pending = []
    for _ in range(3000):
        if rng.random() < 0.55:
            size = int(rng.integers(0, ring.max_message_size))
            msg = rng.bytes(size)
            try:
                ring.put_nowait(msg)
            except queue.Full:
                continue
            pending.append(msg)
            sent += 1
        elif pending:
            assert ring.get_nowait() == pending.pop(0)
            received += 1
    while pending:
        assert ring.get_nowait() == pending.pop(0)
        received += 1
    assert sent == received > 500
    with pytest.raises(queue.Empty):
        ring.get_nowait()


@pytest.mark.timeout(20)
def test_batches(arena, sides):
    ring = arena.ring(1 << 16, producers=sides, consumers=sides)
    items = [i.to_bytes(4, "little") * (i % 50) for i in range(200)]
    assert ring.put_many(items) == 200
    got = []
    while len(got) < 200:
        got += ring.get_many(37, timeout=1)
        assert len(got) % 37 == 0 or len(got) == 200
    assert got == items
    assert ring.put_many([]) == 0
    ring.put_many([b"a" * 100] * 10)
    assert len(ring.get_many(10, max_bytes=250)) == 3        # stops once 250 bytes are taken
    assert len(ring.get_many(10, max_bytes=1)) == 1          # always at least one
    assert len(ring.get_many(10)) == 6
    with pytest.raises(queue.Empty):
        ring.get_many(5, timeout=0.01)
    with pytest.raises(ValueError, match="max_items"):
        ring.get_many(0)
    # both are upper bounds: past what a C size holds means "all there is"
    # (was an OverflowError naming no argument); a negative byte limit is an error
    ring.put_many([b"y"] * 3)
    assert ring.get_many(10 ** 20, max_bytes=10 ** 30) == [b"y"] * 3
    ring.put(b"z")
    with pytest.raises(ValueError, match="max_bytes must be 0 .no limit. or more, got -1"):
        ring.get_many(2, max_bytes=-1)
    with pytest.raises(TypeError):
        ring.get_many(1.5)
    assert ring.get_many(2) == [b"z"]                          # nothing was taken by the bad calls
    # a batch larger than the ring blocks until a consumer drains it; with no consumer: Full
    with pytest.raises(queue.Full) as info:
        ring.put_many([b"x" * 1000] * 200, timeout=0.2)
    done = info.value.args[0]
    assert 0 < done < 200 and ring.qsize() == done
    assert ring.get_many(1000) == [b"x" * 1000] * done


@pytest.mark.timeout(20)
def test_get_many_takes_about_64_kib_by_default(arena, sides):
    """A batch of large messages is cut at 64 KiB of payload unless asked
    otherwise: freed together, a larger burst crosses malloc's trim
    threshold and every batch pays brk() and page faults anew (issue 11)."""
    ring = arena.ring(1 << 20, producers=sides, consumers=sides)
    ring.put_many([bytes([i]) * (20 << 10) for i in range(10)])
    first = ring.get_many(10)
    assert [m[0] for m in first] == [0, 1, 2, 3]         # 80 KiB: stops once past 64 KiB
    assert len(ring.get_many(10, max_bytes=0)) == 6      # 0: no limit
    ring.put_many([b"s" * 64] * 300)
    assert len(ring.get_many(300)) == 300                # small messages: the whole batch


@pytest.mark.timeout(60)
@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=80),
       max_items=st.integers(1, 100), max_bytes=st.sampled_from([None, 0, 1, 100, 2500, 10_000]))
def test_get_many_batches_end_where_their_limits_say_with_mixed_sizes(sizes, max_items, max_bytes):
    """Batch boundaries over messages of mixed sizes, most batches wrapping
    the ring's end: each get_many holds exactly the messages its limits
    allow (max_items; max_bytes reached, the default 64 KiB when None, 0 no
    limit; always one), in order, on the fast one-consumer path and the
    general one."""
    with shmipc.Arena(4 << 20) as arena:
        for sides in ("one", "many"):
            ring = arena.ring(1 << 19, producers=sides, consumers=sides)
            for _ in range(2):                          # so that most batches wrap the ring's end
                ring.put(b"w" * 200_000)
                ring.get()
            sent = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
            assert ring.put_many(sent) == len(sent)
            limit = 64 << 10 if max_bytes is None else max_bytes
            got: list = []
            while len(got) < len(sent):
                batch = ring.get_many(max_items, block=False, max_bytes=max_bytes)
                want, taken = [], 0
                for m in sent[len(got):]:
                    want.append(m)
                    taken += len(m)
                    if len(want) == max_items or (limit and taken >= limit):
                        break
                assert batch == want
                got += batch
            assert ring.qsize() == 0


@pytest.mark.timeout(30)
def test_get_many_decodes_mixed_batches_wherever_the_objects_fall(arena, sides):
    """Batches of plain payloads (bytes, str, ints) with pickled objects and
    arrays first, last, in the middle or not at all come back equal, in
    order, each of its type (the one-consumer fast path starts noting the
    tags of a batch when it meets the first payload to decode)."""
    ring = arena.ring(1 << 20, producers=sides, consumers=sides)
    rng = random.Random(11)
    kinds = [lambda i: bytes([i % 256]) * (i % 50), lambda i: f"s{i}", lambda i: i,
             lambda i: {"k": i}, lambda i: np.arange(i % 7, dtype=np.int32), lambda i: (i, None)]
    for round_ in range(300):
        n = rng.randint(1, 12)
        batch = [kinds[rng.randrange(len(kinds)) if rng.random() < 0.5 else rng.randrange(3)](round_ * 12 + j)
                 for j in range(n)]
        ring.put_many(batch)
        got = ring.get_many(64, timeout=5)
        assert len(got) == n and [type(x) for x in got] == [type(x) for x in batch], (round_, batch, got)
        for a, b in zip(got, batch):
            assert np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b
    assert ring.qsize() == 0


@pytest.mark.timeout(20)
def test_fixed_record_ring(arena):
    dt = np.dtype([("id", "<u4"), ("x", "<f8"), ("tag", "S4")])
    ring = arena.ring(1 << 16, dtype=dt, name="recs")
    ring.put((1, 2.5, b"ab"))
    recs = np.zeros(100, dtype=dt)
    recs["id"] = np.arange(100)
    recs["x"] = np.arange(100) / 2
    assert ring.put_many(recs) == 100
    one = ring.get(timeout=1)
    assert one["id"] == 1 and one["x"] == 2.5 and one["tag"] == b"ab"
    got = ring.get_many(1000, timeout=1)
    assert got.dtype == dt and len(got) == 100 and np.array_equal(got, recs)
    again = arena.ring(name="recs")
    assert again.dtype == dt
    with pytest.raises(TypeError, match="fixed records"):
        ring.put_many([b"not a record"])
    with pytest.raises(ValueError, match="put_many"):
        ring.put(recs[:2])
    with pytest.raises(TypeError, match="Python objects"):
        arena.ring(4096, dtype=object)


@pytest.mark.timeout(20)
def test_timeouts_and_nonblocking(arena):
    ring = arena.ring(1024, maxsize=2)
    t = time.monotonic()
    with pytest.raises(queue.Empty):
        ring.get(timeout=0.2)
    assert 0.15 < time.monotonic() - t < 2
    with pytest.raises(queue.Empty):
        ring.get(block=False)
    ring.put(1)
    ring.put(2)
    assert ring.full() and ring.qsize() == 2
    t = time.monotonic()
    with pytest.raises(queue.Full):
        ring.put(3, timeout=0.2)
    assert 0.15 < time.monotonic() - t < 2
    with pytest.raises(queue.Full):
        ring.put_nowait(3)
    assert [ring.get(), ring.get()] == [1, 2]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (float("nan"), ValueError), ("1", TypeError), ([], TypeError)])
def test_bad_timeouts_raise_naming_the_value(arena, sides, bad, exc):
    """Refused even where the call could finish at once (the fast paths)."""
    ring = arena.ring(4096, producers=sides, consumers=sides)
    ring.put(b"kept")
    with pytest.raises(exc, match="timeout"):
        ring.get(timeout=bad)
    with pytest.raises(exc, match="timeout"):
        ring.get_many(5, timeout=bad)
    with pytest.raises(exc, match="timeout"):
        ring.put(b"x", timeout=bad)
    with pytest.raises(exc, match="timeout"):
        ring.put_many([b"x"], timeout=bad)
    assert ring.qsize() == 1 and ring.get() == b"kept"


@pytest.mark.timeout(20)
def test_message_too_large_is_immediate_and_harmless(arena, sides):
    ring = arena.ring(8192, producers=sides, consumers=sides)
    ring.put(b"before")
    t = time.monotonic()
    with pytest.raises(shmipc.MessageTooLarge) as info:
        ring.put(b"x" * 5000, timeout=30)
    assert time.monotonic() - t < 1
    assert info.value.size == 5000 and info.value.limit == ring.max_message_size == 4096 - 16
    assert "5000" in str(info.value) and "4080" in str(info.value)
    with pytest.raises(shmipc.MessageTooLarge):
        ring.put({"pickled": b"y" * 6000})
    with pytest.raises(shmipc.MessageTooLarge):
        ring.put_many([b"ok", b"z" * 9000])
    assert ring.get_many(10) == [b"before", b"ok"]
    ring.put(b"x" * ring.max_message_size)       # the limit itself fits
    assert len(ring.get()) == ring.max_message_size


@pytest.mark.timeout(20)
def test_unpicklable_object_raises_in_put_and_ring_is_unchanged(arena):
    ring = arena.ring(4096)
    ring.put("first")
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        ring.put(lambda: 1)
    with pytest.raises(TypeError):
        ring.put(_Unpicklable())
    assert ring.qsize() == 1 and ring.stats()["messages_in"] == 1
    ring.put("second")
    assert ring.get_many(5) == ["first", "second"]


class _Unpicklable:
    def __reduce__(self):
        raise TypeError("cannot pickle this on purpose")


@pytest.mark.timeout(20)
def test_invalid_ring_arguments(arena):
    for cap in (1000, 3 << 10, 0, 512):
        with pytest.raises(ValueError, match=str(cap)):
            arena.ring(cap)
    with pytest.raises(TypeError, match="capacity"):
        arena.ring(4096.0)
    with pytest.raises(ValueError, match="'some'"):
        arena.ring(4096, producers="some")
    with pytest.raises(ValueError, match="maxsize"):
        arena.ring(4096, maxsize=-1)
    with pytest.raises(ValueError, match="#x"):
        arena.ring(4096, name="#x")
    with pytest.raises(TypeError, match="Arena.ring"):
        shmipc.Ring()
    arena.ring(4096, name="dup")
    with pytest.raises(FileExistsError, match="dup"):
        arena.ring(4096, name="dup")
    with pytest.raises(KeyError, match="nothere"):
        arena.ring(name="nothere")
    with pytest.raises(shmipc.ArenaFull, match="free"):
        arena.ring(1 << 30)


@pytest.mark.timeout(20)
def test_closed_ring_and_arena_raise_not_crash():
    arena = shmipc.Arena(1 << 20)
    ring = arena.ring(4096)
    ring.put(b"x")
    ring.close()
    for call in (ring.get, lambda: ring.put(1), ring.qsize, ring.stats, lambda: ring.get_many(1)):
        with pytest.raises(ValueError, match="closed"):
            call()
    ring2 = arena.ring(4096)
    arena.close()
    with pytest.raises(ValueError, match="closed"):
        ring2.get()
    with pytest.raises(ValueError, match="closed"):
        arena.ring(4096)
    arena.close()                                   # idempotent


@pytest.mark.timeout(30)
def test_views_across_laps_are_exactly_their_messages(arena):
    # every view is a slice of one read-only view of the ring's data: at any
    # offset, across wrap-around padding, it is exactly its message
    ring = arena.ring(1 << 16, producers="one", consumers="one")
    for i in range(3000):
        msg = struct.pack("<I", i) * (1 + (i * 37) % 900)
        ring.put(msg)
        with ring.get_view() as view:
            assert view.readonly and view.nbytes == len(msg) and view == msg
            with pytest.raises(TypeError):
                view[0] = 0
    assert ring.empty() and ring.stats()["messages_out"] == 3000


@pytest.mark.timeout(30)
def test_an_array_kept_over_a_view_outlives_ring_and_arena_close(no_leaks):
    arena = shmipc.Arena(1 << 20)
    ring = arena.ring(1 << 16)
    ring.put(np.arange(100, dtype=np.int64))
    with ring.get_view() as a:
        kept = a                        # kept past its block: may change later, never a crash
    assert kept.sum() == 4950
    ring.put(b"next")
    with ring.get_view() as v:
        assert v == b"next"
    ring.close()
    arena.close()
    assert kept.shape == (100,) and kept.dtype == np.int64
    int(kept.sum())                     # still mapped: readable (its value may have changed)
    del kept


@pytest.mark.timeout(20)
def test_zero_copy_views(arena, sides):
    ring = arena.ring(1 << 16, producers=sides, consumers=sides)
    payload = bytes(range(256)) * 100
    arr = np.arange(1000, dtype=np.float64)
    ring.put(payload)
    ring.put(arr)
    ring.put("text")
    used_before = ring.stats()["bytes_used"]
    with ring.get_view(timeout=1) as view:
        assert isinstance(view, memoryview) and view.readonly and view == payload
        with pytest.raises(TypeError):
            view[0] = 1
        # nested: a second view while the first is open; the first still holds its space
        with ring.get_view(timeout=1) as a:
            assert a.flags.writeable is False and np.array_equal(a, arr)
            assert ring.stats()["bytes_used"] == used_before
        assert ring.stats()["bytes_used"] == used_before     # released out of order: tail waits
    with ring.get_view() as s:
        assert s == "text"
    assert ring.stats()["bytes_used"] == 0 and ring.empty()
    with pytest.raises(queue.Empty):
        with ring.get_view(timeout=0.05):
            pass


@pytest.mark.timeout(20)
def test_shutdown_drains_then_eof(arena):
    ring = arena.ring(4096)
    ring.put(1)
    ring.put(2)
    ring.shutdown()
    assert ring.is_shutdown
    with pytest.raises(BrokenPipeError):
        ring.put(3)
    assert ring.get() == 1 and ring.get_many(5) == [2]
    with pytest.raises(EOFError):
        ring.get(timeout=5)


def _blocked_getter(ring, out):
    try:
        ring.get(timeout=20)
    except EOFError:
        out.put("eof")


@pytest.mark.timeout(20)
def test_shutdown_wakes_a_blocked_consumer(arena):
    ring = arena.ring(4096)
    out = arena.ring(4096)
    pid = fork_child(_blocked_getter, ring, out)
    # asleep in get: a child that reached get only after the shutdown would
    # get EOFError at once, and the test would pass without any wake-up
    wait_until_asleep(ring.stats, "consumers")
    t = time.monotonic()
    ring.shutdown()
    assert out.get(timeout=5) == "eof"
    assert time.monotonic() - t < 1
    assert wait_child(pid) == 0


# ---------------------------------------------------------------- processes

def _producer(ring, producer_id, count, size):
    for seq in range(count):
        body = struct.pack("<II", producer_id, seq) + bytes([seq % 251]) * (seq % size)
        ring.put(body + hashlib.blake2b(body, digest_size=8).digest(), timeout=20)


def _consumer(ring, results):
    got = []
    ends = 0
    while not ends:
        for msg in ring.get_many(64, timeout=20):
            if msg == b"end":
                ends += 1
                continue
            body, digest = msg[:-8], msg[-8:]
            assert hashlib.blake2b(body, digest_size=8).digest() == digest, "corrupt message"
            got.append(struct.unpack_from("<II", body))
    for _ in range(ends - 1):       # a batch took another consumer's end marker: hand it back
        ring.put(b"end")
    results.put(got, timeout=20)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("producers, consumers", [(1, 1), (3, 1), (1, 3), (3, 3)])
def test_many_producers_many_consumers_exactly_once_in_order(producers, consumers):
    arena = shmipc.Arena(64 << 20)
    try:
        one = producers == 1 and consumers == 1
        ring = arena.ring(1 << 16, producers="one" if one else "many", consumers="one" if one else "many")
        results = arena.ring(16 << 20)
        count = 20_000 // producers
        cons = [fork_child(_consumer, ring, results) for _ in range(consumers)]
        prods = [fork_child(_producer, ring, p, count, 300) for p in range(producers)]
        for pid in prods:
            assert wait_child(pid, 60) == 0
        for _ in range(consumers):
            ring.put(b"end")
        per_consumer = [results.get(timeout=60) for _ in range(consumers)]
        for pid in cons:
            assert wait_child(pid, 30) == 0
        everything = Counter()
        for got in per_consumer:
            last = {}
            for pid_, seq in got:
                assert seq > last.get(pid_, -1), "per-producer order broken"
                last[pid_] = seq
            everything.update(got)
        assert len(everything) == producers * count and max(everything.values()) == 1
        assert ring.stats()["lost"] == 0 and ring.empty()
    finally:
        arena.close()


def _slow_put_then_exit(ring, n):
    for i in range(n):
        ring.put(i)
    time.sleep(0.2)


@pytest.mark.timeout(20)
def test_peer_death_on_one_to_one_ring_raises_after_draining():
    arena = shmipc.Arena(1 << 20)
    ring = arena.ring(4096, producers="one", consumers="one")
    pid = fork_child(_slow_put_then_exit, ring, 3)
    assert [ring.get(timeout=5) for _ in range(3)] == [0, 1, 2]
    assert wait_child(pid) == 0
    t = time.monotonic()
    with pytest.raises(shmipc.PeerDied) as info:
        ring.get(timeout=10)
    assert time.monotonic() - t < 1 and info.value.pid == pid
    assert isinstance(info.value, EOFError)
    arena.close()


def _interrupted_get(ring, out):
    try:
        ring.get()
    except KeyboardInterrupt:
        out.put("interrupted")
        ring.put(b"still works")
        out.put(ring.get(timeout=1))


@pytest.mark.timeout(20)
def test_ctrl_c_interrupts_a_blocked_get_promptly(sides):
    arena = shmipc.Arena(1 << 20)
    ring = arena.ring(4096, producers=sides, consumers=sides)
    out = arena.ring(4096)
    pid = fork_child(_interrupted_get, ring, out)
    # asleep in get: a SIGINT landing before get is reached also ends in the
    # child's except clause, without testing an interrupted wait
    wait_until_asleep(ring.stats, "consumers")
    t = time.monotonic()
    os.kill(pid, signal.SIGINT)
    assert out.get(timeout=5) == "interrupted"
    assert time.monotonic() - t < 0.5
    assert out.get(timeout=5) == b"still works"
    assert wait_child(pid) == 0
    arena.close()


def _child_of_spawn(arena):
    ring = arena.ring(name="jobs")
    ring.put(sum(ring.get(timeout=10) for _ in range(3)))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_rings_reach_children_of_every_start_method(method):
    import multiprocessing as mp

    arena = shmipc.Arena(1 << 20)
    ring = arena.ring(4096, name="jobs")
    proc = mp.get_context(method).Process(target=_child_of_spawn, args=(arena,))
    proc.start()
    ring.put_many([1, 2, 3])
    deadline = time.monotonic() + 30
    while ring.qsize() != 1 and proc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.join(30)
    assert proc.exitcode == 0
    assert ring.get(timeout=1) == 6
    arena.close()


def _socket_through_a_ring():
    import socket

    arena = shmipc.Arena(1 << 20)
    ring = arena.ring(4096)
    here, there = socket.socketpair()
    with here, there:
        ring.put({"sock": there})
        got = ring.get(timeout=5)
        assert isinstance(got["sock"], socket.socket) and got["sock"].fileno() != there.fileno()
        got["sock"].sendall(b"ping")
        assert here.recv(4) == b"ping"
        got["sock"].close()
    arena.close()


@pytest.mark.timeout(30)
def test_objects_registered_with_forking_pickler_travel_like_multiprocessing():
    """A socket inside a message is reduced the way multiprocessing reduces it
    (a duplicated descriptor), not pickled with its raw fd number. In a forked
    helper: reducing a socket starts multiprocessing's resource-sharer thread,
    which later raw forks of the test process would copy half-alive."""
    assert wait_child(fork_child(_socket_through_a_ring), 20) == 0


@pytest.mark.timeout(20)
def test_high_water_mark_catches_a_full_ring(arena):
    ring = arena.ring(4096)
    while True:
        try:
            ring.put_nowait(b"x" * 100)
        except queue.Full:
            break
    full = ring.stats()["bytes_used"]
    assert full > 4096 - 128 and ring.stats()["high_water"] == full
    ring.get_many(1000)
    ring.put(b"small")
    assert ring.stats()["high_water"] == full and ring.stats()["bytes_used"] == 32


# ---------------------------------------------------------------- hardening (issue 9)
# Hostile values are written at the ring's own field offsets (_ring._layout()).

def _generator_producer(ring, big):
    # every item is a fresh object that only the generator refers to
    ring.put_many(bytes([i % 251]) * 3000 for i in range(200))
    ring.put_many(("\u00e9%d" % i) * 500 for i in range(50))
    ring.put_many(bytes([i]) * (1 << 20) for i in range(big))


@pytest.mark.timeout(60)
def test_put_many_holds_generator_items_until_copied():
    """put_many used to keep only a pointer into each bytes/str of a batch: a
    generator's items were freed before being copied (corrupt messages, or a
    segfault for 1 MiB items). The producer runs in a child so that a crash
    shows as its exit status."""
    arena = shmipc.Arena(24 << 20)
    ring = arena.ring(8 << 20, producers="one", consumers="one")
    big = 8
    pid = fork_child(_generator_producer, ring, big)
    got = []
    while len(got) < 200 + 50 + big:
        got += ring.get_many(64, timeout=20)
    assert wait_child(pid, 30) == 0
    assert got[:200] == [bytes([i % 251]) * 3000 for i in range(200)]
    assert got[200:250] == [("\u00e9%d" % i) * 500 for i in range(50)]
    for i, msg in enumerate(got[250:]):
        assert msg == bytes([i]) * (1 << 20), f"1 MiB item {i} arrived corrupt"
    arena.close()


class NeedsCode(Exception):
    """An exception whose __init__ takes more than its args: pickles, but its
    unpickling calls NeedsCode(msg) and fails."""

    def __init__(self, msg, code):
        super().__init__(msg)
        self.code = code


def _put_a_class_the_parent_cannot_import(ring):
    import sys
    import types
    mod = types.ModuleType("shmipc_test_only_in_child")
    cls = type("OnlyHere", (), {"__module__": mod.__name__})
    mod.OnlyHere = cls
    sys.modules[mod.__name__] = mod
    ring.put_many(["before", cls(), "after"])


@pytest.mark.timeout(30)
def test_get_many_delivers_every_good_message_around_an_undecodable_one(arena, sides):
    """One message that fails to decode used to cost its whole batch. Now the
    batch stops before it, the next call raises it (counted), and the ones
    after it follow: nothing lost, nothing twice."""
    ring = arena.ring(1 << 16, producers=sides, consumers=sides)
    ring.put_many([1, "two", NeedsCode("x", 3), [4], b"5", np.arange(3)])
    assert ring.qsize() == 6
    assert ring.get_many(10) == [1, "two"]
    assert ring.qsize() == 4            # taken from the ring but not yet delivered: still counted
    with pytest.raises(shmipc.CorruptMessage) as info:
        ring.get_many(10)
    assert isinstance(info.value, shmipc.errors.UndecodableMessage)
    assert isinstance(info.value.__cause__, TypeError)
    rest = ring.get_many(10)
    assert rest[:2] == [[4], b"5"] and np.array_equal(rest[2], np.arange(3))
    assert ring.empty() and ring.stats()["bad_messages"] == 1
    # the bad one first in its batch: raised at once, the rest follows
    ring.put_many([NeedsCode("y", 1), 6, 7])
    with pytest.raises(shmipc.CorruptMessage):
        ring.get_many(10)
    assert ring.get() == 6                  # pending messages reach get and get_view too
    with ring.get_view() as v:
        assert v == 7
    # get alone: the bad message raises, the next is fine
    ring.put(NeedsCode("z", 2))
    ring.put(8)
    with pytest.raises(shmipc.CorruptMessage):
        ring.get()
    assert ring.get() == 8 and ring.stats()["bad_messages"] == 3
    # a class only the producer can import
    assert wait_child(fork_child(_put_a_class_the_parent_cannot_import, ring)) == 0
    assert ring.get_many(10) == ["before"]
    with pytest.raises(shmipc.CorruptMessage) as info:
        ring.get_many(10)
    assert isinstance(info.value.__cause__, ImportError)
    assert ring.get_many(10) == ["after"]
    assert ring.stats()["bad_messages"] == 4 and ring.empty()


class InterruptsOnce:
    """Unpickling the first instance with `ctrl_c` set sends this process a
    real SIGINT: Python's handler raises KeyboardInterrupt inside
    __setstate__, as when Ctrl-C lands while a message decodes."""
    armed = False

    def __init__(self, i, ctrl_c=False):
        self.i, self.ctrl_c = i, ctrl_c

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.ctrl_c and InterruptsOnce.armed:
            InterruptsOnce.armed = False
            os.kill(os.getpid(), signal.SIGINT)

    def __eq__(self, other):
        return isinstance(other, InterruptsOnce) and other.i == self.i

    __hash__ = None


def _interrupted(call):
    InterruptsOnce.armed = True
    with pytest.raises(KeyboardInterrupt):
        call()
    assert not InterruptsOnce.armed, "the message was never decoded"


@pytest.mark.timeout(30)
def test_ctrl_c_while_messages_decode_loses_none(arena, sides):
    """A KeyboardInterrupt raised while a message unpickles (Ctrl-C runs its
    handler in the decoding Python code) used to lose that message, and in
    get_many the whole batch, already taken from the ring: 60 put, 0
    delivered. Now the interrupted message, and the ones of its batch
    before and after it, wait in order for the next call."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ring = arena.ring(1 << 16, producers=sides, consumers=sides)
    items = [InterruptsOnce(i, ctrl_c=(i == 2)) for i in range(6)]
    ring.put_many(items)
    _interrupted(lambda: ring.get_many(10))
    assert ring.get_many(10) == items       # decoded again, then the rest: nothing lost
    ring.put_many(items)
    assert [ring.get(), ring.get()] == items[:2]
    _interrupted(ring.get)
    assert ring.get_many(10) == items[2:3]  # (what was kept back comes alone)
    assert ring.get_many(10) == items[3:]
    ring.put(items[2])
    _interrupted(lambda: ring.get_view().__enter__())
    assert ring.get() == items[2]
    # interrupted while a batch left over from an undecodable message decodes
    ring.put_many([0, NeedsCode("x", 1)] + items)
    assert ring.get_many(10) == [0]
    with pytest.raises(shmipc.CorruptMessage):
        ring.get_many(10)
    assert ring.get_many(1) == items[:1]
    _interrupted(lambda: ring.get_many(10))
    assert ring.get_many(10) == items[1:]
    assert ring.empty() and ring.qsize() == 0 and ring.stats()["bad_messages"] == 1


@pytest.mark.timeout(20)
def test_get_many_stops_before_a_garbage_record_and_keeps_the_good_ones(arena):
    ring = arena.ring(1 << 16)
    ring.put_many([b"a", "\u00e9t\u00e9", b"c"])
    # the second message's UTF-8 made invalid under the lock: it cannot even be copied out
    buf, base = region_of(ring)
    data = base + _ring._layout()["data"]
    second = data + 32                       # after the 16-byte header and 16-aligned b"a"
    assert bytes(buf[second + 16: second + 18]) == "\u00e9".encode()
    buf[second + 16] = 0xFF
    assert ring.get_many(10) == [b"a"]
    with pytest.raises(shmipc.CorruptMessage, match="UTF-8"):
        ring.get_many(10)
    assert ring.get_many(10) == [b"c"] and ring.stats()["bad_messages"] == 1


@pytest.mark.timeout(20)
@pytest.mark.parametrize("forged", ['"<u8"', '"|O8"'])
def test_fixed_record_dtype_must_match_the_ring_header(forged):
    """A peer that rewrites the region table's dtype used to make a later put
    write past its record (8-byte items into 4-byte records)."""
    arena = shmipc.Arena(1 << 20)
    ring = arena.ring(4096, name="recs", dtype="<u4")
    ring.put(7)
    buf = arena.buf
    at = bytes(buf).find(b'"dtype":"<u4"')
    assert at > 0
    buf[at + 8: at + 8 + len(forged)] = forged.encode()
    with pytest.raises(shmipc.CorruptArena, match="dtype"):
        arena.ring(name="recs")
    assert ring.get() == 7
    arena.close()


@pytest.mark.timeout(30)
def test_forged_payloads_raise_corrupt_message(arena, sides):
    """Lengths, shapes and pickles forged in a record raise CorruptMessage
    (not OverflowError, UnpicklingError, ...), from get, get_many and
    get_view alike, and cost only that message."""
    ring = arena.ring(1 << 16, producers=sides, consumers=sides)
    buf, base = region_of(ring)
    data = base + _ring._layout()["data"]
    forgeries = [
        (np.arange(4, dtype=np.int64), 16 + 8, "<Q", 2**63 + 5),        # shape overflows
        (np.arange(4, dtype=np.int64), 16 + 8, "<Q", 2**40),            # shape far too large
        (np.arange(4, dtype=np.int64), 16, "<B", 200),                  # ndim beyond the payload
        ({"a": 1}, 16 + 32, "<Q", 0x4141414141414141),                  # pickle bytes garbage
        ({"a": 1}, 16, "<I", 0xFFFFFFFF),                               # pickle segment count
        ({"a": 1}, 16 + 8, "<Q", 2**63),                                # pickle segment length
    ]
    for how in ("get", "get_many", "get_view"):
        for obj, off, fmt, value in forgeries:
            assert ring.empty()
            pos = _ring_head(ring)
            ring.put(obj)
            ring.put("next")
            struct.pack_into(fmt, buf, data + (pos & (ring.capacity - 1)) + off, value)
            with pytest.raises(shmipc.CorruptMessage):
                if how == "get":
                    ring.get(timeout=1)
                elif how == "get_many":
                    ring.get_many(1, timeout=1)
                else:
                    with ring.get_view(timeout=1):
                        pass
            assert ring.get(timeout=1) == "next"
    assert ring.stats()["bad_messages"] == 3 * len(forgeries)


def _ring_head(ring):
    buf, base = region_of(ring)
    return struct.unpack_from("<Q", buf, base + _ring._layout()["prod.pos"])[0]


def _sleep_until_killed(ready):
    ready.put(os.getpid())
    time.sleep(120)


@pytest.fixture
def unrelated_live_pid(arena):
    """The pid of a live process that has nothing to do with any ring."""
    ready = arena.ring(4096)
    pid = fork_child(_sleep_until_killed, ready)
    assert ready.get(timeout=10) == pid
    yield pid
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("side", ["prod", "cons"])
def test_lock_word_naming_a_live_unrelated_pid_is_taken_over(arena, unrelated_live_pid, side):
    """A lock word holding a live pid that is not the lock's owner (garbage, or
    a recycled pid) used to block every call for as long as that process
    lived. Owners are identified by pid and start time: it is taken over."""
    ring = arena.ring(4096, producers="many", consumers="many")
    ring.put(b"queued")
    poke(ring, f"{side}.lock", "<Q", unrelated_live_pid)
    t = time.monotonic()
    if side == "prod":
        ring.put(b"more", timeout=5)
    else:
        assert ring.get(timeout=5) == b"queued"
    assert time.monotonic() - t < 2
    assert ring.stats()["recoveries"] == 1


@pytest.mark.timeout(30)
def test_claim_owned_by_a_live_unrelated_pid_is_reclaimed(arena, unrelated_live_pid):
    """A claimed record whose owner word names a live process that is not its
    claimer is released when producers run short of room."""
    ring = arena.ring(4096, producers="many", consumers="many")
    ring.put(b"claimed")
    view = ring.get_view(timeout=1)
    assert view.__enter__() == b"claimed"
    buf, base = region_of(ring)
    L = _ring._layout()
    struct.pack_into("<Q", buf, base + L["data"] + L["rec.owner"], unrelated_live_pid)
    for i in range(10):             # the claimed record pins the tail: producers need it back
        ring.put(bytes([i]) * 1000, timeout=5)
        assert ring.get(timeout=1) == bytes([i]) * 1000
    stats = ring.stats()
    assert stats["recoveries"] >= 1 and stats["lost"] == 1
    view.__exit__(None, None, None)             # no longer ours: nothing to release
    assert ring.empty() and ring.stats()["bytes_used"] == 0


def _drop_a_view_while_the_lock_is_held(ring, owner_ident):
    view = ring.get_view(timeout=1)
    assert view.__enter__() == b"held"
    poke(ring, "cons.lock", "<Q", owner_ident)      # a live process holds the consumer lock
    t = time.monotonic()
    del view                                        # __dealloc__: must not wait for it
    assert time.monotonic() - t < 0.5
    view = ring.get_view(timeout=1)
    poke(ring, "cons.lock", "<Q", 0)
    assert view.__enter__() == b"second"
    poke(ring, "cons.lock", "<Q", owner_ident)
    t = time.monotonic()
    view.__exit__(None, None, None)                 # bounded too
    assert time.monotonic() - t < 3


@pytest.mark.timeout(30)
def test_dropping_a_view_never_waits_unbounded_for_the_consumer_lock(arena, unrelated_live_pid):
    """MessageView.__dealloc__ used to wait for the consumer lock with no
    timeout: a live holder hung the finalizer (and the thread running it)."""
    ring = arena.ring(4096, producers="many", consumers="many")
    ring.put(b"held")
    ring.put(b"second")
    assert wait_child(fork_child(_drop_a_view_while_the_lock_is_held, ring, _ident(unrelated_live_pid)), 20) == 0
    poke(ring, "cons.lock", "<Q", 0)
    ring.put(b"x", timeout=1)
    assert ring.get(timeout=1) == b"x"
    assert ring.stats()["bytes_used"] == 0 and ring.stats()["lost"] == 0


CALLS = []


def _record_call(what):
    CALLS.append(what)
    return what


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return _record_call, ("unpickled",)


def _pickled_copies_keep_allow_pickle(refusing, trusting):
    assert pickle.loads(pickle.dumps(refusing)).allow_pickle is False
    assert pickle.loads(pickle.dumps(trusting)).allow_pickle is True


@pytest.mark.timeout(20)
def test_a_ring_can_refuse_to_unpickle(arena):
    """Unpickling runs code the writer chooses: with allow_pickle False only
    native types decode, and a pickled message (or an array whose dtype
    travels pickled) raises CorruptMessage without running anything."""
    ring = arena.ring(1 << 16, name="untrusted")
    reader = arena.ring(name="untrusted")
    assert reader.allow_pickle
    reader.allow_pickle = False
    only_here = np.dtype([("only_in_this_test", "<i4")])
    ring.put_many([b"a", RunsCodeWhenUnpickled(), np.arange(3), np.zeros(2, dtype=only_here), "s"])
    assert reader.get_many(10) == [b"a"]
    with pytest.raises(shmipc.CorruptMessage, match="native types only"):
        reader.get_many(10)
    assert np.array_equal(reader.get(), np.arange(3))
    with pytest.raises(shmipc.CorruptMessage, match="native types only"):
        with reader.get_view():
            pass
    assert reader.get() == "s" and CALLS == []
    assert reader.stats()["bad_messages"] == 2
    # a copy pickled to another process refuses too (in a helper: pickling an
    # arena starts multiprocessing's resource sharer, which later raw forks
    # of the test process would inherit half-alive)
    assert wait_child(fork_child(_pickled_copies_keep_allow_pickle, reader, ring), 20) == 0
    reader.allow_pickle = True
    ring.put(RunsCodeWhenUnpickled())
    assert reader.get() == "unpickled" and CALLS == ["unpickled"]


# ---------------------------------------------------------------- spinning where it can win
# (issue 11) A waiter that busy-spins on the CPU its peer needs only delays the
# peer: ping-pong of two processes sharing one CPU took ~50 us a round trip
# (the whole spin budget) against ~10 us for os.pipe. Each side now publishes
# its CPU in the ring, and a waiter that shares its peer's CPU yields instead.
# These tests check which way the waits went (_ring._wait_stats, per process),
# never how long they took.

def _spin_delta(before):
    after = _ring._wait_stats()
    return {k: after[k] - before[k] for k in ("pause_spins", "yield_spins", "spin_wins")}


def _echo_pinned(ring_in, ring_out, n, cpu):
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    before = _ring._wait_stats()
    for _ in range(n):
        ring_out.put(ring_in.get(timeout=20))
    ring_out.put(_spin_delta(before), timeout=20)


def _ping_pong(arena, n, parent_cpu, child_cpu):
    ping = arena.ring(1 << 16, producers="one", consumers="one")
    pong = arena.ring(1 << 16, producers="one", consumers="one")
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {parent_cpu})
    try:
        pid = fork_child(_echo_pinned, ping, pong, n, child_cpu)
        before = _ring._wait_stats()
        try:
            for i in range(n):
                msg = (i, bytes([i % 251]) * 64)
                ping.put(msg, timeout=20)
                assert pong.get(timeout=20) == msg
            child = pong.get(timeout=20)
        finally:
            ours = _spin_delta(before)
            assert wait_child(pid, 30) == 0
    finally:
        os.sched_setaffinity(0, old)
    return ours, child


@pytest.mark.timeout(60)
def test_ping_pong_on_one_cpu_yields_and_never_busy_spins(arena):
    """Both processes pinned to the same CPU: every round trip arrives intact,
    and no wait on either side busy-spins (each yields the CPU to its peer)."""
    cpu = min(os.sched_getaffinity(0))
    ours, child = _ping_pong(arena, 300, cpu, None)      # the child inherits the pin
    assert ours["pause_spins"] == 0 and child["pause_spins"] == 0, (ours, child)
    assert ours["yield_spins"] > 0 and child["yield_spins"] > 0, (ours, child)


@pytest.mark.timeout(60)
def test_ping_pong_on_two_cpus_keeps_the_busy_spin(arena):
    """Pinned to two different CPUs, the waiters still spin (the fast case:
    ~1 us round trips), once each side has seen where the other runs."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs two CPUs")
    ours, child = _ping_pong(arena, 300, cpus[0], cpus[1])
    assert ours["pause_spins"] > 0 and child["pause_spins"] > 0, (ours, child)
    # only the first waits, before the peer's CPU is known, may yield
    assert ours["yield_spins"] <= 2 and child["yield_spins"] <= 2, (ours, child)


def _echo_telling(ring_in, ring_out):
    """Echo every message; answer "stats" with this process's wait tallies."""
    while True:
        msg = ring_in.get(timeout=20)
        ring_out.put(_ring._wait_stats() if msg == "stats" else msg, timeout=20)


@pytest.mark.timeout(90)
def test_co_located_waits_stop_yielding_to_a_third_task(arena):
    """Ping-pong on one CPU beside a CPU-bound loop on that CPU. A yield hands
    the CPU to whichever task the scheduler picks: the loop then ran until the
    next tick, and 70% of round trips took 4 ms instead of 4 us (issue 11).
    Yields that give the CPU away while the peer moves (almost) nothing are
    "slow"; after two, that process's waits sleep at once, and the peer's post
    wakes them ahead of the loop. Checks, on whichever side waited (tried until
    a loop does take the CPU from a yield), that the waits then sleep instead
    of yielding, and that every round trip arrives intact."""
    from shmipc.bench.runner import busy_loops

    cpu = min(os.sched_getaffinity(0))
    ping = arena.ring(1 << 16, producers="one", consumers="one")
    pong = arena.ring(1 << 16, producers="one", consumers="one")
    _yields_back()      # (slow yields of earlier tests)
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    n = 0

    def round_trips(k):
        nonlocal n
        for _ in range(k):
            msg = (n, bytes([n % 251]) * 64)
            ping.put(msg, timeout=20)
            assert pong.get(timeout=20) == msg
            n += 1

    def both_sides():
        ping.put("stats", timeout=20)
        return _ring._wait_stats(), pong.get(timeout=20)

    pid = fork_child(_echo_telling, ping, pong)     # inherits the pin
    try:
        # a new loop while none has taken the CPU from a yield (the scheduler
        # may keep picking the peer for a while): up to 4 loops of 5000 trips
        engaged = False
        for attempt in range(4):
            with busy_loops(1) as [loop]:               # pinned to the lowest usable CPU: ours
                assert os.sched_getaffinity(loop) == {cpu}
                for _ in range(20):
                    round_trips(250)
                    # a side that will still sleep at once for a good while
                    # (the back-off is 0.1 s at least; 100 trips take ~1-5 ms)
                    mid, t0 = both_sides(), time.monotonic()
                    if any(side["yields_off_s"] > 0.05 for side in mid):
                        round_trips(100)
                        after, took = both_sides(), time.monotonic() - t0
                        checked = [(was, now) for was, now in zip(mid, after) if was["yields_off_s"] > took]
                        for was, now in checked:
                            assert now["slow_yields"] >= 1
                            # it slept at once: not one yield
                            assert now["yield_spins"] == was["yield_spins"], (was, now, took)
                        engaged = bool(checked)
                    if engaged:
                        break
                if engaged:
                    break
        assert engaged, f"no yield lost the CPU to a loop on our CPU in {n} round trips (4 loops)"
    finally:
        os.kill(pid, signal.SIGKILL)
        wait_child(pid, 30)
        os.sched_setaffinity(0, old)
    _yields_back()      # (for the tests after this one that count yields)


def _yields_back() -> None:
    """Wait until this process's sleep-at-once period after slow yields (a
    second at most, see YIELD_BACKOFF_MAX_NS in _ring.pyx) is over."""
    deadline = time.monotonic() + 5
    while _ring._wait_stats()["yields_off_s"] > 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _ring._wait_stats()["yields_off_s"] == 0


@pytest.mark.timeout(20)
def test_one_to_one_fast_paths_leave_anything_unusual_to_the_general_path(arena):
    """put and get on a one-producer one-consumer ring take a fast path for
    plain messages (issue 11); whatever it does not handle (a view open,
    padding at the end, a str that is not UTF-8, a scalar of the wrong
    size, a garbage header) must behave exactly as the general path says."""
    ring = arena.ring(4096, producers="one", consumers="one")
    buf, base = region_of(ring)
    data = base + _ring._layout()["data"]
    size_at = _ring._layout()["rec.size"]
    check_at = _ring._layout()["rec.check"]

    def forge(pos, size, tag):        # an honest-looking header of another size
        at = data + (pos & (ring.capacity - 1))
        struct.pack_into("<I", buf, at + size_at, size)
        struct.pack_into("<H", buf, at + check_at, _ring._rec_check(size, tag))

    sent = 0
    for lap in range(6):                 # several wrap-arounds: padding on every lap
        for i in range(20):
            msg = bytes([lap, i]) * 50
            ring.put(msg)
            sent += 1
            assert ring.get() == msg
    ring.put(b"held")
    ring.put(7)
    with ring.get_view() as view:        # the tail stays behind while the view is open
        assert view == b"held"
        assert ring.get() == 7
        assert ring.stats()["bytes_used"] > 0
    assert ring.stats()["bytes_used"] == 0
    # a str that is not UTF-8: consumed, counted, raised; the next one is fine
    pos = _ring_head(ring)
    ring.put("\u00e9t\u00e9")
    ring.put(1.5)
    buf[data + (pos & (ring.capacity - 1)) + 16] = 0xFF
    with pytest.raises(shmipc.CorruptMessage, match="UTF-8"):
        ring.get()
    assert ring.get() == 1.5
    # an int of 4 bytes instead of 8 (the header otherwise valid)
    pos = _ring_head(ring)
    ring.put(12345)
    ring.put(None)
    forge(pos, 4, 4)                     # TAG_INT
    with pytest.raises(shmipc.CorruptMessage, match="int message of 4 bytes"):
        ring.get()
    assert ring.get() is None
    # a garbage header: CorruptArena, and nothing delivered
    pos = _ring_head(ring)
    ring.put(b"x" * 40)
    struct.pack_into("<H", buf, data + (pos & (ring.capacity - 1)) + check_at, 0xBEEF)
    with pytest.raises(shmipc.CorruptArena):
        ring.get(timeout=0.1)
    stats = ring.stats()
    assert stats["bad_messages"] == 2 and stats["messages_in"] == sent + 7


# ---------------------------------------------------------------- dead claims handed back
# (the pipeline's workers take items held, and its parent takes back what a
# killed worker held: see shmipc._pipeline_worker and Pipeline._reap)
def _hold_until_killed(ring, ready):
    with ring._get_held(timeout=10) as msg:
        ready.put(msg)
        time.sleep(120)


def _keeping(arena):
    """A many-consumer ring that keeps dead consumers' claims."""
    ring = arena.ring(1 << 16, producers="one", consumers="many")
    ring._keep_dead_claims()
    return ring


def _killed_holding(ring):
    """Fork a consumer that takes the next message held, SIGKILL it inside the
    block; returns (its pid, the message it reported, its ring identity)."""
    ready = ring.arena.ring(1 << 16)
    pid = fork_child(_hold_until_killed, ring, ready)
    msg = ready.get(timeout=10)
    ident = _ident(pid)
    os.kill(pid, signal.SIGKILL)
    assert wait_child(pid) == -signal.SIGKILL
    return pid, msg, ident


@pytest.mark.timeout(30)
@pytest.mark.parametrize("first", [("item", 0, b"x" * 100), b"raw bytes", "text", 7])
def test_a_killed_consumers_held_message_is_handed_back_where_dead_claims_are_kept(arena, first):
    ring = _keeping(arena)
    for m in [first, ("item", 1), ("item", 2)]:
        ring.put(m)
    pid, msg, _ = _killed_holding(ring)
    assert msg == first
    stats = ring.stats()                    # recovery runs, and leaves the claim alone
    assert (stats["lost"], stats["recoveries"]) == (0, 0) and stats["bytes_held"] > 0
    assert ring.get(timeout=1) == ("item", 1)           # later messages flow past it
    assert ring._take_back() == [(pid, first)]
    assert ring._take_back() == []                      # handed over once
    stats = ring.stats()
    assert (stats["lost"], stats["recoveries"], stats["bytes_held"]) == (0, 1, 0)
    assert ring.get(timeout=1) == ("item", 2)
    assert ring.stats()["bytes_used"] == 0


@pytest.mark.timeout(30)
def test_without_keeping_dead_claims_a_killed_consumers_held_message_is_counted_lost(arena):
    ring = arena.ring(1 << 16, producers="one", consumers="many")
    ring.put(b"held")
    _killed_holding(ring)
    stats = ring.stats()
    assert (stats["lost"], stats["recoveries"], stats["bytes_used"]) == (1, 1, 0)
    assert ring._take_back() == []


@pytest.mark.timeout(30)
def test_messages_held_by_live_consumers_are_never_handed_back(arena):
    ring = _keeping(arena)
    ring.put(b"theirs")
    ring.put(b"ours")
    ready = arena.ring(1 << 16)
    pid = fork_child(_hold_until_killed, ring, ready)
    assert ready.get(timeout=10) == b"theirs"
    try:
        with ring._get_held(timeout=1) as mine:
            assert ring._take_back() == []
        assert mine == b"ours"              # a copy: valid after the block
        assert ring.stats()["bytes_held"] > 0               # theirs, still
    finally:
        os.kill(pid, signal.SIGKILL)
        wait_child(pid)
    assert ring._take_back() == [(pid, b"theirs")]
    assert ring.stats()["bytes_used"] == 0


@pytest.mark.timeout(30)
def test_take_back_gives_up_in_time_while_a_live_process_holds_the_consumer_side(arena, unrelated_live_pid):
    ring = _keeping(arena)
    ring.put(b"held")
    pid, _, _ = _killed_holding(ring)
    poke(ring, "cons.lock", "<Q", _ident(unrelated_live_pid))
    t = time.monotonic()
    assert ring._take_back(0.2) is None
    assert time.monotonic() - t < 2
    poke(ring, "cons.lock", "<Q", 0)
    assert ring._take_back(0.2) == [(pid, b"held")]


@pytest.mark.timeout(30)
def test_a_dead_claim_whose_payload_is_garbage_is_handed_back_as_an_error(arena):
    ring = _keeping(arena)
    ring.put(("a", "pickled", "tuple"))
    ring.put(b"next")
    pid, _, _ = _killed_holding(ring)
    buf, base = region_of(ring)
    L = _ring._layout()
    at = base + L["data"] + L["rec.header"]
    buf[at: at + 16] = b"\xff" * 16                     # the pickle's segment table
    (got_pid, exc), = ring._take_back()
    assert got_pid == pid and isinstance(exc, shmipc.errors.CorruptMessage)
    assert ring.stats()["bad_messages"] == 1
    assert ring.get(timeout=1) == b"next"


@pytest.mark.timeout(30)
def test_a_consumer_killed_holding_the_consumer_side_after_its_claim_leaves_the_message_for_take_back(arena):
    # as if killed inside _get_held's take: the record claimed, the consumer
    # side still locked by it (its lock word and the position it locked at)
    ring = _keeping(arena)
    ring.put(b"first")
    ring.put(b"second")
    pid, msg, ident = _killed_holding(ring)
    assert msg == b"first"
    poke(ring, "cons.lock", "<Q", ident)
    poke(ring, "cons.lock_pos", "<Q", 0)            # it locked before the first record
    poke(ring, "cons.lock_msgs", "<Q", 0)
    assert ring._take_back() == [(pid, b"first")]
    stats = ring.stats()
    assert (stats["lost"], stats["messages_out"], stats["bytes_held"]) == (0, 1, 0)
    assert ring.get(timeout=1) == b"second"


class _PutsWhilePickled:
    """Its pickling puts another message on the ring (a nested pickle)."""

    def __init__(self, ring, n):
        self.ring, self.n = ring, n

    def __reduce__(self):
        if self.n:
            self.ring.put({"nested": self.n, "list": list(range(self.n))})
        return (dict, ({"outer": self.n},))


class _FailsToPickle:
    def __reduce__(self):
        raise ValueError("no pickling this one")


@pytest.mark.timeout(60)
def test_reused_pickler_survives_nesting_failures_and_threads(arena):
    """Each thread pickles with one reused pickler (making one costs more
    than pickling a small tuple): a message whose pickling puts another one,
    a pickling that fails half way, and four threads at once all give the
    right messages, each decoded whole."""
    ring = arena.ring(1 << 22)
    ring.put(_PutsWhilePickled(ring, 3))
    assert ring.get() == {"nested": 3, "list": [0, 1, 2]}       # put first, from inside
    assert ring.get() == {"outer": 3}
    big = list(range(50_000))
    with pytest.raises(ValueError, match="no pickling"):
        ring.put([big, _FailsToPickle()])
    assert ring.qsize() == 0
    ring.put(("after", big))
    assert ring.get() == ("after", big)

    def put_many_objects(who):
        for i in range(2000):
            ring.put((who, i, "x" * (i % 50), [i] * (i % 7)))

    threads = [threading.Thread(target=put_many_objects, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    got = {w: [] for w in range(4)}
    for _ in range(8000):
        who, i, s, lst = ring.get(timeout=30)
        assert s == "x" * (i % 50) and lst == [i] * (i % 7)
        got[who].append(i)
    for t in threads:
        t.join(30)
    assert all(v == list(range(2000)) for v in got.values())
