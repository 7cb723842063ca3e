"""get_context(): shmipc's queues and pipes, multiprocessing's everything else,
accepted where a multiprocessing context is (the stdlib ProcessPoolExecutor,
multiprocessing.pool.Pool), under fork, spawn and forkserver."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import multiprocessing.pool
import os
import time
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

import shmipc
from conftest import START_METHODS
from shmipc.connection import Connection
from shmipc.context import ShmipcContext
from shmipc.queues import JoinableQueue, Queue, SimpleQueue



def square(x):
    return x * x


def fail(x):
    raise KeyError(f"no {x}")


def die(x):
    os._exit(7)


def array_of(n):
    return np.arange(n, dtype=np.int64)


def pid_and_method(_):
    return os.getpid(), multiprocessing.get_start_method(allow_none=True)


def bump(counter, lock, n):
    for _ in range(n):
        with lock:
            counter.value += 1


@pytest.mark.timeout(30)
def test_members_are_shmipc_or_multiprocessing():
    ctx = shmipc.get_context("fork")
    assert isinstance(ctx, multiprocessing.context.BaseContext)
    assert isinstance(ctx.Queue(), Queue) and isinstance(ctx.JoinableQueue(3), JoinableQueue)
    sq = ctx.SimpleQueue()
    assert isinstance(sq, SimpleQueue) and sq.waitable
    a, b = ctx.Pipe()
    assert isinstance(a, Connection) and isinstance(b, Connection)
    r, w = ctx.Pipe(duplex=False)
    assert r.readable and not r.writable
    assert ctx.Queue(capacity=4096).capacity == 4096
    assert ctx.Process is multiprocessing.get_context("fork").Process
    assert ctx.get_start_method() == "fork"
    assert ctx.get_context() is ctx
    assert shmipc.get_context().get_context("spawn").get_start_method() == "spawn"
    assert ctx.cpu_count() == os.cpu_count()
    assert ctx.BufferTooShort is multiprocessing.BufferTooShort
    assert set(ctx.get_all_start_methods()) >= {"fork", "spawn"}
    with pytest.raises(ValueError):
        shmipc.get_context("teleport")
    with pytest.raises(ValueError):
        ctx.set_start_method("spawn")
    with pytest.raises(AttributeError):
        ctx.no_such_member


@pytest.mark.timeout(30)
def test_default_context_follows_multiprocessing():
    ctx = shmipc.get_context()
    assert ctx.get_start_method() == multiprocessing.get_start_method()
    assert ctx.get_start_method(allow_none=True) in (None, multiprocessing.get_start_method())
    assert repr(ctx) == "<shmipc context 'default'>"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_multiprocessing_members_work_across_processes(method):
    ctx = shmipc.get_context(method)
    counter, lock = ctx.Value("i", 0, lock=False), ctx.Lock()
    procs = [ctx.Process(target=bump, args=(counter, lock, 200)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert counter.value == 400


@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", START_METHODS)
def test_stdlib_process_pool_executor(method):
    ctx = shmipc.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        assert list(ex.map(square, range(500), chunksize=25)) == [x * x for x in range(500)]
        arr = ex.submit(array_of, 300_000).result(timeout=30)
        assert arr.sum() == np.arange(300_000).sum()
        with pytest.raises(KeyError, match="no 3"):
            ex.submit(fail, 3).result(timeout=30)
        pids = {pid for pid, _ in ex.map(pid_and_method, range(20))}
        assert 1 <= len(pids) <= 2 and os.getpid() not in pids


@pytest.mark.timeout(60)
def test_stdlib_executor_notices_a_dead_worker():
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=shmipc.get_context("fork")) as ex:
        fut = ex.submit(die, 1)
        t = time.monotonic()
        with pytest.raises(BrokenProcessPool):
            fut.result(timeout=30)
        assert time.monotonic() - t < 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_pool_with_shmipc_context(method):
    pool = multiprocessing.pool.Pool(2, context=shmipc.get_context(method))
    try:
        assert pool.map(square, range(300)) == [x * x for x in range(300)]
        assert sorted(pool.imap_unordered(square, range(10))) == [x * x for x in range(10)]
        with pytest.raises(KeyError):
            pool.apply(fail, (1,))
    finally:
        pool.terminate()
        pool.join()


@pytest.mark.timeout(60)
def test_context_pool_and_executor_are_shmipc():
    ctx = shmipc.get_context("fork")
    try:
        from shmipc.futures import ProcessPoolExecutor
        from shmipc.pool import Pool
    except ImportError as exc:      # built by another part of the project
        pytest.skip(f"shmipc.pool / shmipc.futures not available: {exc}")
    with ctx.Pool(2) as pool:
        assert isinstance(pool, Pool)
        assert pool.map(square, range(100)) == [x * x for x in range(100)]
    with ctx.ProcessPoolExecutor(2) as ex:
        assert isinstance(ex, ProcessPoolExecutor)
        assert list(ex.map(square, range(50))) == [x * x for x in range(50)]


@pytest.mark.timeout(30)
def test_context_pickles_by_method():
    import pickle

    ctx = pickle.loads(pickle.dumps(shmipc.get_context("spawn")))
    assert isinstance(ctx, ShmipcContext) and ctx.get_start_method() == "spawn"


@pytest.mark.timeout(60)
def test_manager_and_synchronisation_members():
    ctx = shmipc.get_context("fork")
    with ctx.Manager() as manager:
        shared = manager.dict()
        shared["k"] = 1
        assert dict(shared) == {"k": 1}
    event, barrier = ctx.Event(), ctx.Barrier(1)
    event.set()
    assert event.is_set() and barrier.wait(timeout=5) == 0
    assert ctx.Array("i", [1, 2, 3])[:] == [1, 2, 3]
