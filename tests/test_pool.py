"""Pool: one test body run against multiprocessing.Pool and shmipc.Pool for every
shared behaviour (ordering, exceptions, AsyncResult, chunksize, imap laziness,
initializer, maxtasksperchild, callbacks, states), each start method, then what
only shmipc does (bad arguments named, progress, statistics, large payloads).

Crash behaviour lives in test_pool_crash.py.
"""
from __future__ import annotations

import concurrent.futures.process
import hashlib
import multiprocessing
import multiprocessing.pool
import os
import threading
import time

import numpy as np
import pytest

import shmipc
from conftest import START_METHODS



# ------------------------------------------------------------ worker functions (importable)
def inc(x):
    return x + 1


def add(a, b):
    return a + b


def square(x):
    return x * x


def slow_square(x):
    time.sleep(0.002 * (x % 5))
    return x * x


def fail_on_three(x):
    if x == 3:
        raise KeyError(f"three:{x}")
    return x


def return_pid(_x=None):
    time.sleep(0.002)
    return os.getpid()


def sleep_then(x, seconds=0.3):
    time.sleep(seconds)
    return x


_init_value = None


def set_init(value):
    global _init_value
    _init_value = value


def get_init(_x=None):
    return _init_value


def digest(blob):
    return hashlib.sha256(blob).hexdigest()


def array_sum(arr):
    return float(arr.sum()), arr.shape


def make_bytes(n):
    return bytes([n % 256]) * (200 << 10)


class Unpicklable:
    def __reduce__(self):
        raise TypeError("I refuse to be pickled")


def return_unpicklable(_x):
    return Unpicklable()


# ------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", params=["multiprocessing", "shmipc"])
def impl(request):
    return request.param


def make_pool(impl, *args, **kwargs):
    """A pool of `impl` ('multiprocessing' or 'shmipc'); fork unless context= says otherwise."""
    context = kwargs.pop("context", "fork")
    if impl == "multiprocessing":
        return multiprocessing.get_context(context).Pool(*args, **kwargs)
    return shmipc.Pool(*args, context=context, **kwargs)


@pytest.fixture(scope="module")
def pool(impl):
    """One 2-worker pool per implementation, shared by the read-only tests."""
    p = make_pool(impl, 2)
    yield p
    p.terminate()
    p.join()


# ------------------------------------------------------------ shared behaviour
@pytest.mark.timeout(60)
def test_map_order_and_chunksizes(pool):
    data = list(range(1000))
    want = [x * x for x in data]
    assert pool.map(square, data) == want
    for chunksize in (1, 3, 7, 1000, 5000):
        assert pool.map(square, data, chunksize) == want
    assert pool.map(square, iter(data)) == want              # an iterator without len
    assert pool.map(square, range(1000)) == want
    assert pool.map(square, []) == []
    assert pool.starmap(add, [(i, i) for i in range(100)]) == [2 * i for i in range(100)]


@pytest.mark.timeout(60)
def test_async_variants_and_callbacks(pool):
    got, errors = [], []
    r = pool.map_async(square, range(50), callback=got.append, error_callback=errors.append)
    assert r.get(timeout=30) == [x * x for x in range(50)]
    r.wait(5)
    assert got == [[x * x for x in range(50)]] and errors == []
    r = pool.starmap_async(add, [(1, 2), (3, 4)])
    assert r.get(timeout=30) == [3, 7]
    r = pool.apply_async(add, (2, 3), callback=got.append)
    assert r.get(timeout=30) == 5
    assert pool.apply(add, (5,), {"b": 6}) == 11
    r = pool.apply_async(fail_on_three, (3,), error_callback=errors.append)
    with pytest.raises(KeyError):
        r.get(timeout=30)
    deadline = time.monotonic() + 5
    while not errors and time.monotonic() < deadline:       # callbacks run before ready
        time.sleep(0.01)
    assert len(errors) == 1 and isinstance(errors[0], KeyError)
    assert r.ready() and not r.successful()


@pytest.mark.timeout(60)
def test_async_result_states(pool):
    r = pool.apply_async(sleep_then, (7, 0.5))
    assert not r.ready()
    with pytest.raises(ValueError):
        r.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        r.get(timeout=0.01)
    r.wait(0.01)
    assert not r.ready()
    assert r.get(timeout=30) == 7
    assert r.ready() and r.successful()


@pytest.mark.timeout(60)
def test_exception_carries_remote_traceback(pool):
    with pytest.raises(KeyError) as info:
        pool.map(fail_on_three, range(10), chunksize=2)
    cause = info.value.__cause__
    assert isinstance(cause, multiprocessing.pool.RemoteTraceback)
    assert "fail_on_three" in str(cause) and "three:3" in str(cause)
    with pytest.raises(KeyError):
        pool.apply(fail_on_three, (3,))
    # the pool is still usable after errors
    assert pool.map(inc, range(5)) == [1, 2, 3, 4, 5]


@pytest.mark.timeout(60)
def test_imap_order_and_errors(pool):
    assert list(pool.imap(slow_square, range(40))) == [x * x for x in range(40)]
    assert list(pool.imap(slow_square, range(40), chunksize=6)) == [x * x for x in range(40)]
    assert sorted(pool.imap_unordered(slow_square, range(40))) == [x * x for x in range(40)]
    assert sorted(pool.imap_unordered(slow_square, range(40), 4)) == [x * x for x in range(40)]
    # chunksize 1: the error is raised in its place and iteration goes on
    it = pool.imap(fail_on_three, range(6))
    got = []
    for _ in range(6):
        try:
            got.append(it.next(timeout=30))
        except KeyError:
            got.append("E")
    assert got == [0, 1, 2, "E", 4, 5]
    with pytest.raises(StopIteration):
        it.next(timeout=30)
    it = pool.imap(sleep_then, [1])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.01)
    assert it.next(timeout=30) == 1


def _gated_input(gate, pulled, n):
    for i in range(n):
        if i == 3:
            # blocks until the caller saw a first result: only a lazy imap gets here
            assert gate.wait(20), "imap read its whole input before yielding"
        pulled.append(i)
        yield i


@pytest.mark.timeout(60)
def test_imap_is_lazy(pool):
    gate, pulled = threading.Event(), []
    it = pool.imap(inc, _gated_input(gate, pulled, 10))
    assert it.next(timeout=30) == 1
    assert len(pulled) <= 3
    gate.set()
    assert list(it) == list(range(2, 11))
    # the input iterator raising: reported in place, after the good items
    def bad():
        yield 1
        yield 2
        raise ZeroDivisionError("input broke")
    got = []
    with pytest.raises(ZeroDivisionError):
        for x in pool.imap(inc, bad()):
            got.append(x)
    assert got == [2, 3]


@pytest.mark.timeout(60)
def test_initializer_and_maxtasksperchild(impl):
    p = make_pool(impl, 2, initializer=set_init, initargs=("ready",), maxtasksperchild=2)
    try:
        assert p.map(get_init, range(10), chunksize=1) == ["ready"] * 10
        pids = set(p.map(return_pid, range(20), chunksize=1))
        assert len(pids) >= 10 // 1 / 2           # 20 tasks, 2 per worker: at least 10 workers
        assert p.map(inc, range(100), chunksize=3) == list(range(1, 101))
    finally:
        p.close()
        p.join()


@pytest.mark.timeout(60)
def test_close_join_terminate_states(impl):
    p = make_pool(impl, 2)
    assert p._state == "RUN"
    r = p.map_async(slow_square, range(20), chunksize=2)
    with pytest.raises(ValueError):
        p.join()                                  # still running
    p.close()
    assert p._state == "CLOSE"
    with pytest.raises(ValueError):
        p.apply_async(inc, (1,))
    with pytest.raises(ValueError):
        p.map(inc, [1])
    p.join()
    assert r.get(timeout=5) == [x * x for x in range(20)]
    with make_pool(impl, 2) as q:
        assert q.apply(inc, (1,)) == 2
    assert q._state == "TERMINATE"
    with pytest.raises(ValueError):
        q.apply_async(inc, (1,))
    q.join()


@pytest.mark.timeout(60)
def test_close_keeps_imap_going(impl):
    p = make_pool(impl, 2)
    it = p.imap(inc, range(200))
    p.close()
    assert sum(it) == sum(range(1, 201))
    p.join()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", START_METHODS)
def test_start_methods(impl, method):
    with make_pool(impl, 2, context=method, initializer=set_init, initargs=(method,)) as p:
        assert p.map(square, range(100)) == [x * x for x in range(100)]
        assert p.apply(get_init) == method
        assert sorted(p.imap_unordered(inc, range(10))) == list(range(1, 11))
        with pytest.raises(KeyError):
            p.apply(fail_on_three, (3,))


@pytest.mark.timeout(60)
def test_unpicklable_result(pool):
    with pytest.raises(multiprocessing.pool.MaybeEncodingError):
        pool.apply(return_unpicklable, (1,))
    assert pool.apply(inc, (1,)) == 2


# ------------------------------------------------------------ shmipc only
@pytest.mark.timeout(60)
def test_large_payloads_travel_intact():
    blobs = [os.urandom(100 << 10) for _ in range(300)]
    with shmipc.Pool(2) as p:
        assert p.map(digest, blobs) == [digest(b) for b in blobs]
        # chunks far above a ring's message limit are cut to fit
        assert p.map(digest, blobs, chunksize=300) == [digest(b) for b in blobs]
        back = p.map(make_bytes, range(100), chunksize=100)       # large results come back in pieces
        assert back == [make_bytes(n) for n in range(100)]
        arrays = [np.arange(i, i + 50_000, dtype=np.float64).reshape(100, 500) for i in range(20)]
        assert p.map(array_sum, arrays) == [(float(a.sum()), (100, 500)) for a in arrays]
        assert list(p.imap(digest, blobs, chunksize=150)) == [digest(b) for b in blobs]


def double(arr):
    return arr * 2


def make_huge(n):
    return bytes([n]) * (20 << 20)


@pytest.mark.timeout(60)
def test_items_larger_than_a_ring_message():
    # beyond the per-worker ring's message limit: through the big-message rings
    blobs = [os.urandom(12 << 20) for _ in range(3)]
    arr = np.random.default_rng(1).random(3_000_000)
    with shmipc.Pool(2) as p:
        assert p.map(digest, blobs) == [digest(b) for b in blobs]
        assert list(p.imap_unordered(digest, blobs)) and p.apply(digest, (blobs[0],)) == digest(blobs[0])
        assert [len(x) for x in p.map(make_huge, range(3))] == [20 << 20] * 3
        assert np.array_equal(p.apply(double, (arr,)), arr * 2)
        with pytest.raises(shmipc.MessageTooLarge, match="can never fit"):
            p.apply(len, (bytes(200 << 20),))
        assert p.apply(len, (b"small",)) == 5


@pytest.mark.timeout(60)
def test_bad_arguments_named():
    with pytest.raises(ValueError, match="processes"):
        shmipc.Pool(0)
    with pytest.raises(ValueError, match="maxtasksperchild"):
        shmipc.Pool(1, maxtasksperchild=0)
    with pytest.raises(ValueError, match="retries"):
        shmipc.Pool(1, retries=-1)
    with pytest.raises(TypeError, match="initializer"):
        shmipc.Pool(1, initializer=3)
    with pytest.raises(ValueError, match="start method"):
        shmipc.Pool(1, context="teleport")
    with shmipc.Pool(1) as p:
        with pytest.raises(ValueError, match="Chunksize"):
            p.map(inc, [1, 2], chunksize=0)
        with pytest.raises(ValueError, match="Chunksize"):
            p.imap(inc, [1, 2], chunksize=-1)
        with pytest.raises(TypeError, match="chunksize"):
            p.map(inc, [1, 2], chunksize="2")


@pytest.mark.timeout(60)
def test_progress_and_statistics(capsys):
    with shmipc.Pool(2) as p:
        assert p.map(inc, range(100), progress=True) == list(range(1, 101))
        assert list(p.imap(inc, range(10), progress=True)) == list(range(1, 11))
        stats = p.statistics()
    assert stats["worker_deaths"] == 0 and stats["in_flight"] == 0 and stats["processes"] == 2
    err = capsys.readouterr().err
    assert "100" in err


@pytest.mark.timeout(60)
def test_callbacks_from_threads_and_nested_submit():
    results = []
    with shmipc.Pool(2) as p:
        done = threading.Event()

        def chain(value):
            if value < 5:
                p.apply_async(inc, (value,), callback=chain)    # submitting from a callback
            else:
                done.set()
            results.append(value)
        p.apply_async(inc, (0,), callback=chain)
        assert done.wait(20)
        threads = [threading.Thread(target=lambda: results.append(sum(p.map(inc, range(100)))))
                   for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert results[:5] == [1, 2, 3, 4, 5] and results[5:] == [5050] * 4


@pytest.mark.timeout(60)
def test_no_leaks_after_close_and_terminate(no_leaks):
    p = shmipc.Pool(2)
    assert p.map(inc, range(10)) == list(range(1, 11))
    p.close()
    p.join()
    q = shmipc.Pool(2, context="spawn")
    q.map_async(sleep_then, range(4))
    q.terminate()
    q.join()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_made_in_a_thread_outlives_it(method):
    # the kernel's parent-death signal follows the thread that forked a process:
    # workers must not die when the thread that made the pool ends
    box = []
    t = threading.Thread(target=lambda: box.append(shmipc.Pool(2, context=method)))
    t.start()
    t.join(30)
    p = box[0]
    try:
        import signal

        from conftest import pending_signals, wait_until
        from shmipc._proc import pid_alive

        # the thread has ended, so a parent-death signal aimed at its children
        # has been sent: a worker or helper it hit is dead, or has it pending
        wait_until(lambda: len(p._engine.worker_pids()) == 2, 30, "two workers started")
        procs = set(p._engine.worker_pids().values()) | set(p._engine._sup.helper_pids())
        assert p.map(square, range(100)) == [x * x for x in range(100)]
        assert set(p._engine.worker_pids().values()) <= procs        # nobody was replaced
        for pid in procs:
            assert pid_alive(pid) and not pending_signals(pid) & {signal.SIGKILL, signal.SIGTERM}, pid
        assert p.statistics()["worker_deaths"] == 0
    finally:
        p.terminate()


@pytest.mark.timeout(60)
def test_second_pool_forks_with_no_thread_running(monkeypatch):
    # a new pool's zygote is forked while no other pool's bookkeeping thread runs
    # (Python 3.12+ warns about forking with threads; such forks can deadlock)
    first = shmipc.Pool(2)
    r = first.map_async(slow_square, range(200), chunksize=1)     # busy meanwhile
    seen = []
    real_fork = os.fork

    def fork_spy():
        seen.append([t.name for t in threading.enumerate()
                     if "bookkeeping" in t.name or "feeder" in t.name])
        return real_fork()
    monkeypatch.setattr(os, "fork", fork_spy)
    try:
        second = shmipc.Pool(2)
        monkeypatch.setattr(os, "fork", real_fork)
        assert seen and seen[0] == [], seen        # (other libraries' threads may run)
        assert second.map(square, range(50)) == [x * x for x in range(50)]
        assert r.get(timeout=30) == [x * x for x in range(200)]
        assert first.map(square, range(50)) == [x * x for x in range(50)]
        second.close()
        second.join()
    finally:
        first.terminate()
        first.join()


@pytest.mark.timeout(60)
def test_close_without_join_leaks_nothing(no_leaks):
    p = shmipc.Pool(2)
    r = p.map_async(slow_square, range(20))
    p.close()
    assert r.get(timeout=30) == [x * x for x in range(20)]
    # no join(): the pool releases its workers, zygote and arena by itself


def _use_inherited_pool(p):
    try:
        p.apply(inc, (1,))
    except ValueError as exc:
        assert "forked copy" in str(exc)
        return
    raise AssertionError("a forked copy of a pool accepted work")


@pytest.mark.timeout(60)
def test_forked_copy_of_a_pool_refuses_work():
    from conftest import fork_child, wait_child

    with shmipc.Pool(1) as p:
        assert wait_child(fork_child(_use_inherited_pool, p), 30) == 0
        assert p.apply(inc, (1,)) == 2          # the original is unaffected


@pytest.mark.timeout(60)
def test_waiting_inside_a_callback_raises_instead_of_deadlocking():
    errors = []
    with shmipc.Pool(1) as p:
        def callback(_value):
            try:
                p.apply_async(inc, (1,)).get(timeout=5)
            except RuntimeError as exc:
                errors.append(exc)
        p.apply_async(inc, (1,), callback=callback).wait(10)
        assert p.apply(inc, (2,)) == 3
    assert len(errors) == 1 and "callback" in str(errors[0])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", START_METHODS)
def test_shmipc_context_objects(method):
    ctx = shmipc.get_context(method)
    with shmipc.Pool(2, context=ctx) as p:
        assert p.map(square, range(20)) == [x * x for x in range(20)]
    with ctx.Pool(2) as p:                      # the context's own Pool is shmipc's
        assert isinstance(p, shmipc.Pool) and p.apply(square, (3,)) == 9


# ------------------------------------------------------------ what crosses a process boundary (issue 9)
class CodedError(Exception):
    """An exception whose __init__ takes more than its message: pickling
    rebuilds it from args (the message only), which fails."""

    def __init__(self, msg, code):
        super().__init__(msg)
        self.code = code


def raise_coded(x):
    raise CodedError(f"bad {x}", 7)


def _restore_bad_state():
    raise ValueError("this state cannot be restored")


class BadState:
    """Pickles anywhere; unpickling it raises ValueError, wherever that happens."""

    def __reduce__(self):
        return _restore_bad_state, ()


def return_bad_state(_x=None):
    return BadState()


def identity(x):
    return x


def bad_state_at_two(x):
    return BadState() if x == 2 else x


def raise_shmipc_error(kind):
    from shmipc.errors import CorruptArena, MessageTooLarge, PeerDied, WorkerLost

    raise {"too_large": MessageTooLarge(5000, 4096, 8192), "peer": PeerDied(1234, "producer"),
           "lost": WorkerLost(99, -9, "a task"), "corrupt": CorruptArena("garbage at 64")}[kind]


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.timeout(60)
def test_values_that_do_not_cross_fail_only_their_task(no_leaks):
    """A result or exception that cannot be rebuilt in the parent, or an
    argument that cannot be rebuilt in the worker, fails that task with a
    clear error; the bookkeeping thread, the workers and the pool go on."""
    with shmipc.Pool(2) as p:
        # a result whose unpickling raises in the parent
        with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="cannot be restored") as info:
            p.apply(return_bad_state)
        assert "return_bad_state" in str(info.value)
        # an exception that cannot be rebuilt from its args
        with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="CodedError") as info:
            p.apply(raise_coded, (1,))
        assert "bad 1" in str(info.value)
        assert "raise_coded" in str(info.value.__cause__.__cause__)      # the worker's traceback
        # an argument whose unpickling raises ValueError in the worker
        r = p.apply_async(identity, (BadState(),))
        with pytest.raises(ValueError, match="cannot be restored") as info:
            r.get(timeout=20)
        assert "could not be unpickled in the worker" in str(info.value.__cause__)
        # in a map, only its chunk fails; imap yields the others
        with pytest.raises(multiprocessing.pool.MaybeEncodingError):
            p.map(bad_state_at_two, range(6), chunksize=1)
        got = []
        for x in [0, 1, BadState(), 3]:
            try:
                got.append(p.apply_async(identity, (x,)).get(timeout=20))
            except ValueError:
                got.append("bad")
        assert got == [0, 1, "bad", 3]
        it = p.imap(bad_state_at_two, range(5))
        out = []
        for _ in range(5):
            try:
                out.append(it.next(timeout=20))
            except multiprocessing.pool.MaybeEncodingError:
                out.append("bad")
        assert out == [0, 1, "bad", 3, 4]
        assert p.map(inc, range(10)) == list(range(1, 11))
        stats = p.statistics()
        assert stats["worker_deaths"] == 0 and stats["in_flight"] == 0 and stats["queued"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["too_large", "peer", "lost", "corrupt"])
def test_shmipc_exceptions_raised_by_a_task_arrive_intact(pool, kind):
    from shmipc.errors import CorruptArena, MessageTooLarge, PeerDied, WorkerLost

    with pytest.raises((MessageTooLarge, PeerDied, WorkerLost, CorruptArena)) as info:
        pool.apply(raise_shmipc_error, (kind,))
    err = info.value
    if kind == "too_large":
        assert type(err) is MessageTooLarge and (err.size, err.limit, err.capacity) == (5000, 4096, 8192)
    elif kind == "peer":
        assert type(err) is PeerDied and (err.pid, err.role) == (1234, "producer")
    elif kind == "lost":
        assert type(err) is WorkerLost and (err.pid, err.exitcode, err.task) == (99, -9, "a task")
    else:
        assert type(err) is CorruptArena and str(err) == "garbage at 64"
    assert pool.apply(inc, (1,)) == 2


@pytest.mark.timeout(60)
def test_close_and_join_inside_a_callback_finish_pending_results(no_leaks):
    p = shmipc.Pool(2)
    try:
        slow = [p.apply_async(sleep_then, (i, 0.2)) for i in range(4)]
        done = threading.Event()

        def close_and_join(_value):
            p.close()
            p.join()                # inside the bookkeeping thread: returns at once
            done.set()

        p.apply_async(inc, (1,), callback=close_and_join)
        assert [r.get(timeout=20) for r in slow] == [0, 1, 2, 3]
        assert done.wait(10)
        p.join()
    finally:
        p.terminate()


@pytest.mark.timeout(120)
def test_pools_made_by_threads_at_once_have_one_bookkeeper_each(no_leaks):
    """Each new pool pauses the others' bookkeeping threads while it forks its
    zygote; several pausing one pool at once must not restart it twice."""
    pools, errors = [shmipc.Pool(1)], []            # the one every other pauses
    barrier = threading.Barrier(8)

    def make():
        try:
            barrier.wait()
            pools.append(shmipc.Pool(1))
        except Exception as exc:        # reported below
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors and len(pools) == 9
        for p in pools:
            engine = p._engine
            keepers = [t for t in threading.enumerate()
                       if getattr(getattr(t, "_target", None), "__self__", None) is engine]
            assert len(keepers) == 1, keepers
            assert p.map(inc, range(50)) == list(range(1, 51))
    finally:
        for p in pools:
            p.terminate()


class CountedObject:
    """As CPython's test_release_task_refs: counts live instances in this process."""

    n_instances = 0

    def __new__(cls):
        cls.n_instances += 1
        return object.__new__(cls)

    def __del__(self):
        type(self).n_instances -= 1


def make_counted(_x=None):
    return CountedObject()


@pytest.mark.timeout(60)
def test_release_task_refs():
    """(CPython's test) arguments and results are not kept alive once done with."""
    import gc
    import weakref

    with shmipc.Pool(2) as p:
        objs = [CountedObject() for _ in range(10)]
        refs = [weakref.ref(o) for o in objs]
        p.map(identity, objs)
        del objs
        assert wait_for(lambda: gc.collect() is not None and {wr() for wr in refs} == {None}, 2)
        assert CountedObject.n_instances == 0
        # the last result delivered is not held by the (now idle) bookkeeping thread
        r = p.apply_async(make_counted)
        value = r.get(timeout=20)
        assert CountedObject.n_instances == 1
        del value, r
        assert wait_for(lambda: gc.collect() is not None and CountedObject.n_instances == 0, 2)


# ------------------------------------------------------------ as multiprocessing (issue 10)
@pytest.mark.timeout(60)
def test_unclosed_running_pool_warns(impl):
    """(As CPython's test_resource_warning.)"""
    import gc
    import warnings

    p = make_pool(impl, 1)
    p.terminate()
    p.join()
    p._state = multiprocessing.pool.RUN         # as CPython's test: pretend it still runs
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = None
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning)
               and "unclosed running multiprocessing pool" in str(w.message) for w in caught), caught


@pytest.mark.timeout(60)
def test_pool_lists_its_workers(impl):
    p = make_pool(impl, 3)
    try:
        assert p._processes == 3 and len(p._pool) == 3
        pids = [w.pid for w in p._pool]
        assert all(w.is_alive() and w.exitcode is None for w in p._pool)
        assert len(set(pids)) == 3 and os.getpid() not in pids
    finally:
        p.terminate()
        p.join()
    assert wait_for(lambda: not any(pid_alive_(x) for x in pids), 10)


def pid_alive_(pid):
    from shmipc._proc import pid_alive

    return pid_alive(pid)


class ExitsWhenLoaded:
    """A value whose unpickling calls sys.exit (a BaseException, not an Exception)."""

    def __reduce__(self):
        import sys
        return (sys.exit, (7,))


def return_exits_when_loaded():
    return ExitsWhenLoaded()


def _exit_callback(_value):
    import sys
    sys.exit(4)


@pytest.mark.timeout(120)
def test_base_exceptions_from_results_and_callbacks_do_not_kill_the_bookkeeping_thread(no_leaks):
    """A SystemExit raised while a result is rebuilt in the parent, by a
    Pool callback, or by an executor's done-callback used to end the
    bookkeeping thread silently: that get() and every later one waited
    forever. Each now costs only its own task (or is reported, for a
    callback), and the next task completes."""
    with shmipc.Pool(1) as p:
        with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="SystemExit"):
            p.apply_async(return_exits_when_loaded).get(timeout=20)
        assert p.apply_async(abs, (-5,)).get(timeout=20) == 5
        assert p.apply_async(square, (3,), callback=_exit_callback).get(timeout=20) == 9
        assert p.apply_async(abs, (-6,)).get(timeout=20) == 6
    with shmipc.ProcessPoolExecutor(1) as ex:
        # as the standard executor, BrokenProcessPool (not the SystemExit
        # itself, which would end the caller), but only that call fails
        with pytest.raises(concurrent.futures.process.BrokenProcessPool) as info:
            ex.submit(return_exits_when_loaded).result(timeout=20)
        assert type(info.value.__cause__) is SystemExit and info.value.__cause__.code == 7
        assert ex.submit(abs, -7).result(timeout=20) == 7
        f = ex.submit(abs, -1)
        f.add_done_callback(_exit_callback)
        assert f.result(timeout=20) == 1
        assert ex.submit(abs, -2).result(timeout=20) == 2


@pytest.mark.timeout(60)
def test_forked_child_exiting_normally_prints_nothing_about_the_parents_pool():
    """A plain os.fork() child that exits normally holds a copy of the
    parent's Pool; its __del__ at the child's shutdown used to print
    'Exception ignored in Pool.__del__' (an import during shutdown)."""
    import subprocess
    import sys
    code = ("import os, shmipc\n"
            "p = shmipc.Pool(2)\n"
            "assert p.map(abs, [-1]) == [1]\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    raise SystemExit(0)\n"
            "assert os.waitpid(pid, 0)[1] == 0\n"
            "p.terminate()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert r.returncode == 0, r.stderr
    assert "Exception ignored" not in r.stderr, r.stderr


class _RaisesWhenPickled:
    def __init__(self, exc_type):
        self.exc_type = exc_type

    def __reduce__(self):
        raise self.exc_type("not this argument")


def _input_raising(exc_type):
    yield 1
    yield 2
    raise exc_type("from the input")


def _square(x):
    return x * x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("exc_type", [SystemExit, KeyboardInterrupt])
def test_base_exceptions_from_arguments_inputs_and_tasks_fail_only_their_own_work(tmp_path, exc_type):
    """A SystemExit or KeyboardInterrupt raised by pickling an argument
    queued behind busy workers (pickled in the bookkeeping thread) ended
    that thread: the tasks already running never delivered and every later
    call hung. Raised by imap's input, it ended the feeder thread and the
    iterator waited for ever. Now each fails only its own task or job (its
    get()/next() raises it); a KeyboardInterrupt that is a task's result or
    the input's is not taken for Ctrl-C (the pool used to be terminated),
    and the pool goes on."""
    from conftest import hold_until

    flag = str(tmp_path / "go")
    with shmipc.Pool(1) as pool:
        held = [pool.apply_async(hold_until, (flag,)) for _ in range(30)]
        bad = pool.apply_async(_square, (_RaisesWhenPickled(exc_type),))
        after = pool.apply_async(_square, (7,))
        open(flag, "w").close()
        assert [r.get(timeout=30) for r in held] == [True] * 30
        with pytest.raises(exc_type, match="not this argument"):
            bad.get(timeout=30)
        assert after.get(timeout=30) == 49
        it = pool.imap(_square, _input_raising(exc_type))
        assert [it.next(timeout=30), it.next(timeout=30)] == [1, 4]
        with pytest.raises(exc_type, match="from the input"):
            it.next(timeout=30)
        with pytest.raises(exc_type, match="not this argument"):
            pool.map(_square, [1, _RaisesWhenPickled(exc_type)], chunksize=1)
        assert pool.map(_square, range(4)) == [0, 1, 4, 9]


@pytest.mark.timeout(60)
def test_a_pool_never_runs_a_subprocess_to_find_libc():
    """Pool() loaded the C library through ctypes.util.find_library('c'),
    which runs ldconfig in a subprocess. A pool made meanwhile in another
    thread forks its zygote, which inherited the pipe the subprocess module
    waits on, and that wait never ended: two threads making their first
    Pool at once hung 1 to 4 times in 15 (found through joblib). Here
    find_library raises, in a fresh interpreter (the library is loaded once
    a process), and a pool must still start, trim memory and map."""
    import subprocess
    import sys

    code = (
        "import ctypes.util\n"
        "def refuse(name):\n"
        "    raise AssertionError(f'find_library({name!r}) runs a subprocess')\n"
        "ctypes.util.find_library = refuse\n"
        "import shmipc, shmipc._proc\n"
        "assert shmipc._proc.steady_malloc()\n"
        "with shmipc.Pool(2) as pool:\n"
        "    assert pool.map(abs, range(-5, 5)) == [abs(x) for x in range(-5, 5)]\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
