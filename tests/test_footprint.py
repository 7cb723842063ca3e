"""A pool's shared memory follows its traffic (shmipc._footprint, issue 11):
small rings while idle, the big rings mapped only while a large message
moves, and every page given back once the pool has been idle a while.
Measured from /proc and fstat, in real processes."""
from __future__ import annotations

import os

import pytest

import shmipc
from shmipc._footprint import IDLE_RELEASE_S
from conftest import hold_until, touch_then_sleep, wait_until

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


# ---------------------------------------------------------------------- kept memory
def arena_stats() -> dict:
    """The arena cache's figures in the process that runs this (a worker)."""
    from shmipc import _ring

    return _ring.arena_cache_stats()


def plus_one(x: int) -> int:
    return x + 1


@pytest.mark.timeout(120)
def test_freed_object_arenas_are_reused_then_given_back_when_the_pool_is_idle():
    """steady_memory (shmipc._proc): a map's freed int objects leave their
    arenas in a cache, the next map reuses them instead of faulting fresh
    pages in, and an idle pool gives them back: the workers' at their first
    idle wait, the parent's when the pool has been idle IDLE_RELEASE_S."""
    from shmipc import _ring
    from shmipc._proc import ARENA_CACHE_BYTES

    ints = list(range(400_000))
    expect = [x + 1 for x in ints]
    with shmipc.Pool(2, context="fork") as pool:
        pids = list(pool._engine._pids.values())
        for _ in range(3):
            out = pool.map(plus_one, ints, chunksize=200_000)   # one chunk a worker: ~12.8 MB of ints each
            assert out == expect
            del out
        parent = _ring.arena_cache_stats()
        assert parent["installed"] and parent["limit"] == ARENA_CACHE_BYTES
        assert parent["reused"] > 0 and 0 < parent["cached_bytes"] <= ARENA_CACHE_BYTES
        worker = pool.apply(arena_stats)
        assert worker["installed"] and worker["reused"] > 0
        # the workers, untouched since: their cached arenas go back at their first idle wait
        rss = {pid: status(pid, "RssAnon") for pid in pids}
        wait_until(lambda: all(status(pid, "RssAnon") < rss[pid] - 6 * MiB for pid in pids), 20,
                   f"the workers' kept memory given back (RssAnon was {rss})")
        wait_until(lambda: _ring.arena_cache_stats()["cached_bytes"] == 0, IDLE_RELEASE_S + 20,
                   "the parent's cached arenas given back")
        assert pool.map(plus_one, ints[:1000]) == expect[:1000]


@pytest.mark.timeout(60)
def test_the_arena_cache_keeps_objects_intact_and_within_its_limit(tmp_path):
    """In a fresh interpreter: arenas freed into the cache come back for new
    objects (counted as reused), never more than the limit is kept, release
    empties it, and a limit below 0 is a clear error."""
    import subprocess
    import sys

    script = tmp_path / "arenas.py"
    script.write_text(
        "from shmipc import _ring\n"
        "try:\n"
        "    _ring.arena_cache(-1)\n"
        "except ValueError as exc:\n"
        "    assert '-1' in str(exc), exc\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "assert _ring.arena_cache_release() == 0 and not _ring.arena_cache_stats()['installed']\n"
        "limit = 8 << 20\n"
        "_ring.arena_cache(limit)\n"
        "for round in range(5):\n"
        "    xs = [x * 3 + round for x in range(1_000_000)]\n"
        "    assert sum(xs) == 3 * 999_999 * 1_000_000 // 2 + round * 1_000_000\n"
        "    del xs\n"
        "    s = _ring.arena_cache_stats()\n"
        "    assert 0 < s['cached_bytes'] <= limit, s\n"
        "assert s['reused'] > 0, s\n"
        "freed = _ring.arena_cache_release()\n"
        "assert freed == s['cached_bytes'] and _ring.arena_cache_stats()['cached_bytes'] == 0\n"
        "assert _ring.arena_cache(0) == 0 and _ring.arena_cache_stats()['limit'] == 0\n"
        "xs = [str(x) for x in range(200_000)]; del xs\n"
        "assert _ring.arena_cache_stats()['cached_bytes'] == 0\n"
        "print('ok')\n")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


@pytest.mark.timeout(60)
def test_a_user_can_keep_the_pool_from_tuning_their_process(tmp_path):
    """SHMIPC_STEADY_MEMORY=0: the pool leaves the user's process's malloc
    and object arenas as they were (its workers still keep memory)."""
    import subprocess
    import sys

    script = tmp_path / "optout.py"
    script.write_text(
        "import shmipc\n"
        "from shmipc import _ring\n"
        "def arena_stats():\n"
        "    return _ring.arena_cache_stats()\n"
        "if __name__ == '__main__':\n"
        "    with shmipc.Pool(1, context='fork') as pool:\n"
        "        assert pool.map(abs, [-1, -2]) == [1, 2]\n"
        "        assert not _ring.arena_cache_stats()['installed']\n"
        "        assert pool.apply(arena_stats)['installed']\n"
        "    print('ok')\n")
    env = dict(os.environ, SHMIPC_STEADY_MEMORY="0")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=50, env=env)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


@pytest.mark.timeout(120)
def test_a_big_task_whose_data_vanished_fails_alone(tmp_path, monkeypatch):
    """A large task's data is taken out of the big task ring before its
    worker reads it (a hostile reader, a damaged ring): the worker waits
    BIG_MESSAGE_WAIT_S for it, fails that task with a clear error, marks it
    done, and takes the next; nothing else is lost or taken for lost."""
    from shmipc import _poolworker

    monkeypatch.setattr(_poolworker, "_BIG_WAIT", 1.0)        # (inherited by the forked worker)
    go = str(tmp_path / "go")
    with shmipc.Pool(1, context="fork") as pool:
        engine = pool._engine
        blocker = pool.apply_async(hold_until, (go,))
        wait_until(lambda: engine.busy_workers(), 30, "the worker busy with the first task")
        big = pool.apply_async(len, (big_value(3 * MiB),))       # over a task ring message: the big ring
        wait_until(lambda: engine._big_tasks.qsize() == 1, 30, "the large task's data in the big ring")
        stolen = engine._big_tasks.get(timeout=10)
        assert stolen[0] > 0 and len(stolen) == 4
        del stolen
        open(go, "w").close()
        assert blocker.get(timeout=30) is True
        with pytest.raises(RuntimeError, match="its data never arrived in the big-message ring"):
            big.get(timeout=30)
        # settled on the worker's side too: READY, not shown running it for ever
        wait_until(lambda: not engine.busy_workers(), 10, "the worker READY after the failed large task")
        assert pool.map(abs, [-1, -2, -3]) == [1, 2, 3]
        assert len(pool.apply(big_value, (3 * MiB,))) == 3 * MiB
        stats = pool.statistics()
        assert stats["worker_deaths"] == 0 and stats["in_flight"] == 0
