"""A pool's shared memory follows its traffic (shmipc._footprint, issue 11):
small rings while idle, the big rings mapped only while a large message
moves, and every page given back once the pool has been idle a while.
Measured from /proc and fstat, in real processes."""
from __future__ import annotations

import os

import pytest

import shmipc
from shmipc._footprint import IDLE_RELEASE_S
from conftest import touch_then_sleep, wait_until

MiB = 1 << 20
# Pool(2): two 4 MiB task rings, a 4 MiB result ring, the slot table and the
# arena's header; the big rings (2 x 256 MiB) only while in use. (It was
# ~560 MiB mapped in every process of the pool, for its whole life.)
IDLE_MAPPED_MAX = 16 * MiB


def shm_mapped(pid: int) -> int:
    """Bytes of shmipc shared memory (memfd arenas) mapped by `pid`."""
    total = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "memfd:shmipc" in line:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                total += end - start
    return total


def status(pid: int, key: str) -> int:
    """A /proc/PID/status figure, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def committed(fd: int) -> int:
    """Bytes of memory a memfd really holds (pages written and not freed)."""
    return os.fstat(fd).st_blocks * 512


def pool_pids(pool) -> list[int]:
    return [os.getpid(), *pool._engine.worker_pids().values()]


def big_value(n: int) -> bytes:
    return bytes([n % 256]) * n


@pytest.mark.timeout(60)
def test_an_idle_pool_maps_a_few_mib_not_hundreds():
    with shmipc.Pool(2, context="fork") as pool:
        assert pool.map(abs, range(-100, 100)) == [abs(x) for x in range(-100, 100)]
        for pid in pool_pids(pool):
            assert 0 < shm_mapped(pid) <= IDLE_MAPPED_MAX, (pid, shm_mapped(pid))
        assert pool._engine._big.mapped is False       # the big rings were never needed


@pytest.mark.timeout(120)
def test_large_messages_map_the_big_rings_only_while_used_and_idle_pools_give_memory_back():
    with shmipc.Pool(2, context="fork") as pool:
        engine = pool._engine
        n = 40 * MiB
        # a 40 MiB argument and a 40 MiB result: through the big rings
        assert pool.apply(len, (big_value(n),)) == n
        got = pool.apply(big_value, (n,))
        assert len(got) == n and got[:3] == bytes([n % 256]) * 3
        del got
        # and a busy stretch of ordinary traffic: the task rings' pages are touched
        blob = b"x" * (100 * 1024)
        assert pool.map(len, [blob] * 400) == [len(blob)] * 400
        arena_fd, big_fd = engine._arena.fd, engine._big._fd
        assert committed(arena_fd) + committed(big_fd) > 2 * n - MiB        # the memory really was used
        workers = pool_pids(pool)[1:]
        # a worker that has nothing to do unmaps the big rings (at its first idle wait)
        wait_until(lambda: all(shm_mapped(pid) <= IDLE_MAPPED_MAX for pid in workers), timeout=10,
                   what="idle workers unmapping the big rings")

        # idle for IDLE_RELEASE_S: the parent punches the pages of every empty
        # ring and unmaps the big rings; every process's footprint is back
        wait_until(lambda: engine._footprint.bytes_freed > 0, timeout=IDLE_RELEASE_S + 10,
                   what="the idle pool giving its memory back")
        wait_until(lambda: committed(big_fd) <= MiB and committed(arena_fd) <= 6 * MiB,
                   timeout=10, what="the memfds' pages freed")
        assert engine._footprint.bytes_freed >= 2 * n - MiB
        for pid in pool_pids(pool):
            assert shm_mapped(pid) <= IDLE_MAPPED_MAX, (pid, shm_mapped(pid))
            assert status(pid, "RssShmem") <= 8 * MiB, (pid, status(pid, "RssShmem"))

        # and it still works after giving everything back (pages come back zeroed: fresh rings)
        assert pool.apply(len, (big_value(n),)) == n
        assert pool.map(len, [blob] * 50) == [len(blob)] * 50
        assert pool.statistics()["worker_deaths"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("context", ["spawn", "forkserver"])
def test_big_rings_reach_spawned_workers(context):
    with shmipc.Pool(1, context=context) as pool:
        n = 5 * MiB
        assert pool.apply(len, (big_value(n),)) == n
        assert len(pool.apply(big_value, (n,))) == n


def hold_big(flag: str, blob: bytes) -> int:
    """Take a large argument (through the big ring), say so, then wait to be killed."""
    return touch_then_sleep(flag, 60, len(blob))


@pytest.mark.timeout(120)
def test_a_worker_killed_holding_the_big_rings_costs_its_task_only(tmp_path):
    """A worker dies with the big rings mapped (it took a large argument and
    runs): its task fails, a replacement starts, the next large messages go
    through, and the idle pool still gives every page back."""
    import signal

    with shmipc.Pool(2, context="fork") as pool:
        engine = pool._engine
        n = 24 * MiB
        flag = str(tmp_path / "started")
        doomed = pool.apply_async(hold_big, (flag, big_value(n)))
        wait_until(lambda: os.path.exists(flag), timeout=30, what="the task holding a large argument started")
        victim = next(pid for pid in pool_pids(pool)[1:] if shm_mapped(pid) > IDLE_MAPPED_MAX)
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(shmipc.WorkerLost):
            doomed.get(timeout=30)
        assert pool.statistics()["worker_deaths"] == 1
        # large messages both ways still go through, with the replacement worker too
        assert pool.map(len, [big_value(n), big_value(n + 1)], chunksize=1) == [n, n + 1]
        assert len(pool.apply(big_value, (n,))) == n
        freed_before = engine._footprint.bytes_freed
        wait_until(lambda: engine._footprint.bytes_freed > freed_before, timeout=IDLE_RELEASE_S + 10,
                   what="the idle pool giving its memory back after the death")
        wait_until(lambda: committed(engine._big._fd) <= MiB, timeout=10, what="the big rings' pages freed")
