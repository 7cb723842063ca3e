"""A hostile peer: a forked child writes random and targeted values over a
ring's header (positions, capacity, flags, lock words, owners, waiter counts,
semaphores), its records (sizes, tags, states, check words, owners), their
payloads (numpy shapes and dtypes, pickle segment tables and bytes), the
dtype in the region table, and truncates records. Then readers, each in its
own forked child under an address-space limit, use the ring every way there
is, with timeouts.

A reader must get correct data or an exception (CorruptArena and its
subclasses, queue.Empty / queue.Full on timeout, EOFError / BrokenPipeError
after a forged shutdown): never a signal death, another exception, a call
that outlives its timeout, or an allocation the limit refuses (MemoryError).

What "correct" can mean here: a peer that writes a well-formed record can
make the ring deliver any message it likes, so values are not checked; the
honest messages that come through are (see test_crash.py for that).
"""
from __future__ import annotations

import json
import os
import queue
import random
import resource
import select
import struct
import time
import traceback
from collections import Counter

import numpy as np
import pytest

import shmipc
from shmipc import _ring
from conftest import SOAK, fork_child, wait_child

L = _ring._layout()
DATA = L["data"]
HDR = L["rec.header"]
TIMEOUT = 0.02
SLACK = 1.5                 # a loaded 2-core machine: scheduling, not waiting
ROUNDS = 64 * SOAK          # rings per test; each gets one hostile child and one reader
ALLOWED = (queue.Empty, queue.Full, shmipc.CorruptArena, EOFError, BrokenPipeError)
RECORD = np.dtype([("id", "<u4"), ("x", "<f8")])

HEADER_FIELDS = [
    ("prod.pos", "<Q"), ("cons.pos", "<Q"), ("cons.cursor", "<Q"), ("prod.msgs", "<Q"),
    ("cons.msgs", "<Q"), ("capacity", "<Q"), ("flags", "<I"), ("record_size", "<I"),
    ("maxsize", "<I"), ("version", "<I"), ("data_offset", "<Q"), ("region_size", "<Q"),
    ("prod.lock", "<Q"), ("cons.lock", "<Q"), ("prod.pid", "<Q"), ("cons.pid", "<Q"),
    ("prod.lock_pos", "<Q"), ("cons.lock_pos", "<Q"), ("prod.lock_msgs", "<Q"),
    ("cons.lock_msgs", "<Q"), ("wait.data_waiters", "<I"), ("wait.space_waiters", "<I"),
    ("wait.plock_waiters", "<I"), ("wait.clock_waiters", "<I"), ("wait.shutdown", "<I"),
]
SEMAPHORES = ["data_sem", "space_sem", "plock_sem", "clock_sem"]


def values(rng: random.Random, current: int, capacity: int, width: int) -> int:
    """A value worth trying in a field of `width` bytes."""
    live = [os.getppid(), 1, os.getpid()]       # the parent (alive), init, this writer (soon dead)
    choices = [
        0, 1, 15, 16, 17, capacity - 16, capacity, capacity + 16, capacity * 2, 2**31 - 1, 2**31,
        2**32 - 1, 2**32, 2**63, 2**64 - 1, current + 16, current - 16, current + capacity,
        current ^ (1 << rng.randrange(width * 8)), rng.getrandbits(width * 8),
        rng.choice(live), rng.choice(live) | rng.getrandbits(32) << 32,
    ]
    return rng.choice(choices) % (1 << (width * 8))


def records(buf, base: int, capacity: int) -> list[tuple[int, int, int]]:
    """(offset in buf, size, tag) of the records between tail and head, as
    honest headers lay them out (stops at the first implausible one)."""
    tail, head = struct.unpack_from("<Q", buf, base + L["cons.pos"])[0], struct.unpack_from(
        "<Q", buf, base + L["prod.pos"])[0]
    out = []
    pos = tail
    while pos < head and len(out) < 10_000:
        off = base + DATA + (pos & (capacity - 1))
        size, tag = struct.unpack_from("<IB", buf, off)
        length = (HDR + size + 15) & ~15
        if length > capacity:
            break
        out.append((off, size, tag))
        pos += length
    return out


def offset_of(ring) -> int:
    return next(r for r in ring.arena.regions() if r.name == ring.name).offset


def scribble(ring, base: int, seed: int) -> str:
    """Write hostile values over the ring (its header at `base` in the
    arena), as a peer with write access could. Returns what was done."""
    rng = random.Random(seed)
    buf = ring.arena.buf
    capacity = ring.capacity
    done = []
    for _ in range(rng.choice([1, 1, 2, 3, 8])):
        kind = rng.choice(["header", "header", "semaphore", "record", "record", "payload",
                           "payload", "truncate", "random", "dtype"])
        if kind == "header":
            field, fmt = rng.choice(HEADER_FIELDS)
            width = struct.calcsize(fmt)
            cur = struct.unpack_from(fmt, buf, base + L[field])[0]
            struct.pack_into(fmt, buf, base + L[field], values(rng, cur, capacity, width))
            done.append(field)
        elif kind == "semaphore":
            sem = base + L[rng.choice(SEMAPHORES)]
            at = rng.choice([0, 0, 4, rng.randrange(32)])
            n = rng.randint(1, 8)
            buf[sem + at: sem + at + n] = rng.randbytes(n)
            done.append("sem")
        elif kind == "random":
            n = rng.randint(1, 64)
            start = base + rng.randrange(L["data_sem"] + 128 + capacity - n)
            buf[start: start + n] = rng.randbytes(n)
            done.append("random")
        elif kind == "dtype":
            if ring.dtype is None:
                continue
            meta = bytes(buf[:65536]).find(b'"dtype":[["id","<u4"],["x","<f8"]]')
            if meta < 0:
                continue
            forged = rng.choice([b'["id","<u8"]', b'["id","|O8"]', b'["id","<u2"]', b'["id","|V9"]'])
            buf[meta + 9: meta + 9 + len(forged)] = forged
            done.append("dtype")
        else:
            recs = records(buf, base, capacity)
            if not recs:
                continue
            off, size, tag = rng.choice(recs)
            if kind == "record":
                field = rng.choice(["rec.size", "rec.tag", "rec.state", "rec.check", "rec.owner"])
                fmt = {"rec.size": "<I", "rec.tag": "<B", "rec.state": "<B", "rec.check": "<H",
                       "rec.owner": "<Q"}[field]
                width = struct.calcsize(fmt)
                cur = struct.unpack_from(fmt, buf, off + L[field])[0]
                struct.pack_into(fmt, buf, off + L[field], values(rng, cur, capacity, width))
                if field in ("rec.size", "rec.tag") and rng.random() < 0.7:
                    # a consistent forgery: the check word matches the new header
                    size, tag = struct.unpack_from("<IB", buf, off)
                    struct.pack_into("<H", buf, off + L["rec.check"], _ring._rec_check(size, tag))
                done.append(field)
            elif kind == "truncate":
                new = rng.randrange(size + 1) if size else 0
                struct.pack_into("<I", buf, off, new)
                struct.pack_into("<H", buf, off + L["rec.check"], _ring._rec_check(new, tag))
                done.append("truncate")
            else:
                # payload fields: ndarray (tag 9) ndim / descr length / shape / descr,
                # pickle (tag 10) segment count / lengths / stream bytes, or any byte
                p = off + HDR
                if tag == 9 and size >= 16:
                    at, fmt = rng.choice([(0, "<B"), (2, "<H"), (8, "<Q"), (16, "<Q"), (24, "<Q")])
                elif tag == 10 and size >= 16:
                    at, fmt = rng.choice([(0, "<I"), (8, "<Q"), (16, "<Q"), (32, "<Q"), (40, "<B")])
                else:
                    at, fmt = (rng.randrange(size) if size else 0), "<B"
                if at + struct.calcsize(fmt) <= size:
                    cur = struct.unpack_from(fmt, buf, p + at)[0]
                    struct.pack_into(fmt, buf, p + at, values(rng, cur, capacity, struct.calcsize(fmt)))
                    done.append(f"payload{tag}")
    return ",".join(done)


def fill(ring) -> None:
    """Honest traffic: every message type, some already taken (tail > 0)."""
    if ring.dtype is not None:
        recs = np.zeros(40, dtype=RECORD)
        recs["id"] = np.arange(40)
        ring.put_many(recs[:10])
        ring.get_many(5)
        ring.put_many(recs[10:], block=False)
        return
    msgs = [b"bytes" * 7, "str \u00e9", 12345, 2.5, None, True, bytearray(b"ba"),
            np.arange(6, dtype=np.int32).reshape(2, 3), {"pickled": [1, 2]}, 2**70,
            np.zeros(3, dtype=RECORD)]
    ring.put_many(msgs[:4])
    ring.get_many(3)
    for i in range(40):
        try:
            ring.put(msgs[i % len(msgs)], timeout=0)
        except queue.Full:
            break


def reader(ring, seed: int, out_fd: int) -> None:
    """Use the scribbled ring every way there is; report through out_fd.
    Exit status: 0 all well, 3 an exception outside ALLOWED, 4 a call that
    outlived its timeout. The address space is capped: a forged length that
    made the ring allocate without bound fails with MemoryError (status 3)."""
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), vm + (256 << 20)))
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    worst = (0.0, "")
    status = 0
    rings = [ring]
    try:
        rings.append(ring.arena.ring(name=ring.name))        # attach: validates the header
        outcomes["attach ok"] += 1
    except ALLOWED as exc:
        outcomes[f"attach {type(exc).__name__}"] += 1
    except Exception:
        traceback.print_exc()
        status = 3
    for _ in range(24):
        r = rng.choice(rings)
        op = rng.choice(["get", "get", "get_many", "get_many", "view", "put", "put_many", "state"])
        t = time.monotonic()
        try:
            if op == "get":
                r.get(timeout=TIMEOUT)
            elif op == "get_many":
                r.get_many(rng.randint(1, 50), timeout=TIMEOUT, max_bytes=rng.choice([0, 100]))
            elif op == "view":
                with r.get_view(timeout=TIMEOUT) as v:
                    if isinstance(v, (memoryview, np.ndarray, np.void)):
                        bytes(v)            # touch every byte the view shows
            elif op == "put":
                r.put(np.zeros((), RECORD) if r.dtype is not None else b"p" * rng.randint(0, 300),
                      timeout=TIMEOUT)
            elif op == "put_many":
                r.put_many(np.zeros(3, RECORD) if r.dtype is not None else ["m", 1, b"x" * 100],
                           timeout=TIMEOUT)
            else:
                r.stats()
                r.qsize()
                r.empty()
                r.full()
            outcomes[f"{op} ok"] += 1
        except ALLOWED as exc:
            outcomes[f"{op} {type(exc).__name__}"] += 1
        except Exception:
            traceback.print_exc()
            outcomes[f"{op} UNEXPECTED"] += 1
            status = 3
        took = time.monotonic() - t
        worst = max(worst, (took, op))
        if took > TIMEOUT + SLACK:
            outcomes[f"{op} OVERTIME"] += 1
            status = status or 4
    os.write(out_fd, json.dumps({"outcomes": outcomes, "worst": worst}).encode())
    os._exit(status)


def make_ring(arena, i: int):
    kind = i % 4
    if kind == 3:
        return arena.ring(8192, name=f"r{i}", dtype=RECORD)
    sides = "many" if kind != 1 else "one"
    return arena.ring(8192, name=f"r{i}", producers=sides, consumers=sides,
                      maxsize=0 if kind != 2 else 7)


def run_reader(ring, seed: int, results: list) -> None:
    rfd, wfd = os.pipe()
    pid = fork_child(reader, ring, seed, wfd)
    os.close(wfd)
    code = wait_child(pid, 60)
    data = b""
    while chunk := os.read(rfd, 65536):
        data += chunk
    os.close(rfd)
    results.append((seed, code, json.loads(data) if data else None))


def summarise(results: list, what: str) -> tuple[Counter, list]:
    total: Counter = Counter()
    bad = []
    worst = (0.0, "")
    for seed, code, report in results:
        if report:
            total.update(report["outcomes"])
            worst = max(worst, tuple(report["worst"]))
        if code != 0:
            bad.append((seed, code, what))
    calls = sum(total.values())
    print(f"\n{len(results)} hostile cases, {calls} reader calls, longest call {worst[0]:.3f} s "
          f"({worst[1]}; timeout {TIMEOUT} s); failures (seed, status): {bad}")
    for key, n in sorted(total.items()):
        print(f"  {key}: {n}")
    return total, bad


@pytest.mark.timeout(120)
def test_hostile_writes_before_reading_never_crash_hang_or_overallocate():
    """Each round: rings with honest traffic, a forked hostile child scribbles
    over them, then one forked reader per ring."""
    results = []
    what = {}
    for batch in range(ROUNDS // 8):
        arena = shmipc.Arena(1 << 20)
        rings = [make_ring(arena, i) for i in range(8)]
        for r in rings:
            fill(r)
        seeds = [batch * 8 + i for i in range(8)]

        bases = [offset_of(r) for r in rings]

        def hostile():
            for r, base, seed in zip(rings, bases, seeds):
                what[seed] = scribble(r, base, seed)
                print(f"{seed}: {what[seed]}", flush=True)

        assert wait_child(fork_child(hostile), 30) == 0
        for r, seed in zip(rings, seeds):
            run_reader(r, seed, results)
        arena.close()
    total, bad = summarise(results, "before")
    assert sum(total.values()) > 0
    assert not bad, f"readers failed (negative status = signal death): {bad}"


def _scribble_on(ring, base: int, seed: int, started_w: int, stop_r: int, theirs: tuple) -> None:
    """Scribble until the parent closes its end of the `stop_r` pipe (the
    reader is done, or the parent died); say so on `started_w` after the
    first scribble. (A bound of 60 s all the same.)"""
    for fd in theirs:
        os.close(fd)                    # else this child would hold its own stop pipe open
    n = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        scribble(ring, base, seed * 1000 + n)
        n += 1
        if n == 1:
            os.write(started_w, b"s")
        if select.select([stop_r], [], [], 0.002)[0]:
            return


@pytest.mark.timeout(120)
def test_hostile_writes_while_reading_never_crash_hang_or_overallocate():
    """The hostile child keeps scribbling while the reader works (values
    change between a check and a use)."""
    results = []
    for seed in range(1000, 1000 + ROUNDS // 4):
        arena = shmipc.Arena(1 << 20)
        ring = make_ring(arena, seed)
        fill(ring)
        started_r, started_w = os.pipe()
        stop_r, stop_w = os.pipe()
        hostile = fork_child(_scribble_on, ring, offset_of(ring), seed, started_w, stop_r, (started_r, stop_w))
        os.close(started_w)
        os.close(stop_r)
        try:
            # the scribbler is at work before the reader starts, and until it ends
            assert select.select([started_r], [], [], 30)[0] and os.read(started_r, 1) == b"s"
            run_reader(ring, seed, results)
        finally:
            os.close(stop_w)
            os.close(started_r)
        assert wait_child(hostile, 30) == 0
        arena.close()
    total, bad = summarise(results, "while")
    assert sum(total.values()) > 0
    assert not bad, f"readers failed (negative status = signal death): {bad}"


def _blocked_put(ring, payload):
    """put(payload) with no timeout in a thread; returns (thread, outcome list)."""
    import threading

    outcome: list = []

    def put():
        try:
            ring.put(payload)
            outcome.append("put")
        except BaseException as exc:     # noqa: B036 (reported, checked below)
            outcome.append(exc)

    thread = threading.Thread(target=put, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.timeout(60)
@pytest.mark.parametrize("producers", ["one", "many"])
@pytest.mark.parametrize("consumers", ["one", "many"])
@pytest.mark.parametrize("forgery", ["tail", "taken", "sent"])
def test_a_put_that_waits_without_timeout_ends_on_impossible_accounts(producers, consumers, forgery):
    """A producer asleep in put() (no timeout) waits for positions and
    message counts that a hostile write made impossible: a tail far behind
    the head (head - tail > capacity), or counts claiming `maxsize` messages
    in an empty ring (or more taken than sent). Nothing can ever make room:
    put() used to block for ever; now it raises CorruptArena naming the
    numbers after a quiet slice. The forgery comes from another process."""
    from conftest import poke, wait_until_asleep

    arena = shmipc.Arena(1 << 20)
    ring = arena.ring(1024, producers=producers, consumers=consumers,
                      maxsize=0 if forgery == "tail" else 2)
    for _ in range(3):                  # the positions a lap or more from 0
        ring.put_many([b"x" * 300] * 2)
        assert ring.get_many(2) == [b"x" * 300] * 2
    stats = ring.stats()
    sent, taken = stats["messages_in"], stats["messages_out"]
    assert sent == taken == 6

    def hostile():
        if forgery == "tail":
            poke(ring, "cons.pos", "<Q", 0)
        elif forgery == "taken":
            poke(ring, "cons.msgs", "<Q", sent + 1000)      # more taken than ever sent
        else:
            poke(ring, "prod.msgs", "<Q", taken + 2)        # 2 (maxsize) "in" the empty ring
        os._exit(0)

    if forgery == "tail":
        while True:                     # full by bytes: the next put waits for room
            try:
                ring.put(b"x" * 300, timeout=0)
            except queue.Full:
                break
        thread, outcome = _blocked_put(ring, b"y" * 300)
        wait_until_asleep(ring.stats, "producers")
        assert wait_child(fork_child(hostile)) == 0
    else:
        assert wait_child(fork_child(hostile)) == 0
        assert ring.qsize() == 0 or forgery == "sent"
        thread, outcome = _blocked_put(ring, b"y")
    thread.join(20)
    assert not thread.is_alive(), f"put() still blocked after 20 s (forged: {forgery})"
    assert len(outcome) == 1 and isinstance(outcome[0], shmipc.CorruptArena), outcome
    assert "out of order" in str(outcome[0])
    arena.close()
