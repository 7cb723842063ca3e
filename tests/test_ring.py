"""The ring: typed messages, ordering, wrap-around, timeouts, bad input, views, fork."""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import queue
import signal
import struct
import time
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

import shmipc
from conftest import fork_child, wait_child


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
    # a batch larger than the ring blocks until a consumer drains it; with no consumer: Full
    with pytest.raises(queue.Full) as info:
        ring.put_many([b"x" * 1000] * 200, timeout=0.2)
    done = info.value.args[0]
    assert 0 < done < 200 and ring.qsize() == done
    assert ring.get_many(1000) == [b"x" * 1000] * done


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
def test_bad_timeouts_raise_naming_the_value(arena, bad, exc):
    ring = arena.ring(4096)
    ring.put(b"kept")
    with pytest.raises(exc, match="timeout"):
        ring.get(timeout=bad)
    with pytest.raises(exc, match="timeout"):
        ring.put(b"x", timeout=bad)
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
    time.sleep(0.2)
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
    time.sleep(0.3)
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
    time.sleep(0.1)
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
