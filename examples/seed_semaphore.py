"""The classic shared-memory example, then the same pattern at production scale.

Part 1 is the textbook C program rebuilt on shmipc: an anonymous shared
mapping made before fork, a semaphore initialised to 1 (here a one-slot ring
holding a token: get() is sem_wait, put() is sem_post, and underneath is a
process-shared sem_t living in the mapping) guarding an int array that the
child fills and the parent prints.

Part 2 is that pattern at scale: N forked children send millions of typed
messages (ints, bytes, str, numpy arrays, dicts) through one ring each to the
parent, which verifies every single one and prints the rate. That rate is end
to end: the children build every message in Python and the parent checks
every one in Python, which costs far more than moving it; so the parent's
time spent checking is printed apart, and the rate outside the checks too.
The transport's own speed, against pipes and multiprocessing, is what
``.venv/bin/shmipc bench`` measures.

    .venv/bin/python examples/seed_semaphore.py [--children 4] [--messages 500000]
"""
from __future__ import annotations

import argparse
import os
import queue
import time
import zlib

import numpy as np

import shmipc


def classic() -> None:
    arena = shmipc.Arena(1 << 20)                      # mmap(MAP_SHARED|MAP_ANONYMOUS) before fork
    numbers = np.frombuffer(arena.block(10 * 8), dtype=np.int64)
    sem = arena.ring(4096, maxsize=1)                  # a binary semaphore...
    sem.put("token")                                   # ...initialised to 1
    pid = os.fork()
    if pid == 0:
        sem.get()                                      # sem_wait
        numbers[:] = np.arange(10) ** 2                # the child fills the array
        sem.put("token")                               # sem_post
        os._exit(0)
    os.waitpid(pid, 0)
    sem.get()                                          # sem_wait
    print("part 1: the child filled the shared array:", numbers.tolist())
    sem.put("token")                                   # sem_post
    assert numbers.tolist() == [i * i for i in range(10)]
    del numbers
    arena.close()


def message(child: int, seq: int):
    """The seq-th message of a child: the type cycles, the content is derived
    from (child, seq) so the parent can check every one."""
    kind = seq % 5
    if kind == 0:
        return (child << 40) | seq
    if kind == 1:
        return seq.to_bytes(4, "little") * 8
    if kind == 2:
        return f"child {child} message {seq}"
    if kind == 3:
        return np.full(16, seq, dtype=np.int32)
    return {"child": child, "seq": seq, "crc": zlib.crc32(seq.to_bytes(8, "little"))}


def verify(msg, child: int, seq: int) -> None:
    expected = message(child, seq)
    if isinstance(expected, np.ndarray):
        ok = isinstance(msg, np.ndarray) and np.array_equal(msg, expected)
    else:
        ok = type(msg) is type(expected) and msg == expected
    if not ok:
        raise AssertionError(f"child {child} message {seq}: got {msg!r}, expected {expected!r}")


def child_main(ring: shmipc.Ring, child: int, count: int) -> None:
    batch = 512
    for start in range(0, count, batch):
        ring.put_many([message(child, seq) for seq in range(start, min(start + batch, count))], timeout=60)


def at_scale(children: int, count: int) -> None:
    arena = shmipc.Arena(128 << 20)
    # one ring per child: messages need no envelope, order is per ring
    rings = [arena.ring(8 << 20, producers="one", consumers="one") for _ in range(children)]
    start = time.perf_counter()
    pids = []
    for child in range(children):
        pid = os.fork()
        if pid == 0:
            try:
                child_main(rings[child], child, count)
            finally:
                os._exit(0)
        pids.append(pid)
    next_seq = [0] * children
    received = 0
    child = 0
    checking = 0.0                                     # the parent's seconds spent in verify()
    while received < children * count:
        child = (child + 1) % children
        if next_seq[child] == count:
            continue
        try:
            # look at each ring in turn; wait a little only when this one is empty
            batch = rings[child].get_many(8192, timeout=0.001)
        except queue.Empty:
            continue
        seq = next_seq[child]
        t_check = time.perf_counter()
        for msg in batch:
            verify(msg, child, seq)
            seq += 1
        checking += time.perf_counter() - t_check
        received += seq - next_seq[child]
        next_seq[child] = seq
    elapsed = time.perf_counter() - start
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    stats = [r.stats() for r in rings]
    payload = sum(s["bytes_in"] for s in stats)
    print(f"part 2: {children} children sent {received:,} typed messages; every one verified, in order")
    print(f"        end to end (building and checking each message in Python included): "
          f"{received / elapsed:,.0f} messages/s, {payload / elapsed / 1e6:,.0f} MB/s of payload")
    print(f"        the parent spent {checking:.2f} s of {elapsed:.2f} s checking messages; outside the "
          f"checks it received {received / max(elapsed - checking, 1e-9):,.0f} messages/s and slept "
          f"{sum(s['consumer_sleeps'] for s in stats)} times")
    print("        (the transport alone, against pipes and multiprocessing: .venv/bin/shmipc bench)")
    arena.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--children", type=int, default=4)
    parser.add_argument("--messages", type=int, default=500_000, help="per child")
    args = parser.parse_args()
    classic()
    at_scale(args.children, args.messages)


if __name__ == "__main__":
    main()
