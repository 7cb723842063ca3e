"""ProcessPoolExecutor: one test body against concurrent.futures' executor and
shmipc's (submit, map with chunksize and timeout, exceptions, initializer,
max_tasks_per_child, shutdown with cancel_futures, as_completed), each start
method, then shmipc-only behaviour. Worker deaths: test_pool_crash.py."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time

import pytest

import shmipc
from conftest import START_METHODS



def inc(x):
    return x + 1


def add(a, b=0):
    return a + b


def boom(x):
    if x == 3:
        raise ValueError(f"boom {x}")
    return x


def nap(x, seconds=0.2):
    time.sleep(seconds)
    return x


def getpid(_x=None):
    time.sleep(0.002)
    return os.getpid()


def touch(path):
    time.sleep(0.02)
    with open(path, "w"):
        pass
    return 0


_init = None


def set_init(value):
    global _init
    _init = value


def get_init(_x=None):
    return _init


@pytest.fixture(scope="module", params=["concurrent.futures", "shmipc"])
def impl(request):
    return request.param


def make_executor(impl, max_workers=2, method="fork", **kwargs):
    if impl == "concurrent.futures":
        if method == "fork":
            kwargs.pop("max_tasks_per_child", None)     # the standard one refuses it under fork
        return cf.ProcessPoolExecutor(max_workers, mp_context=multiprocessing.get_context(method),
                                      **kwargs)
    return shmipc.ProcessPoolExecutor(max_workers, mp_context=method, **kwargs)


@pytest.fixture(scope="module")
def executor(impl):
    ex = make_executor(impl)
    yield ex
    ex.shutdown(wait=True)


@pytest.mark.timeout(60)
def test_submit_and_results(executor):
    assert executor.submit(add, 2, b=3).result(timeout=30) == 5
    futures = [executor.submit(inc, i) for i in range(100)]
    assert [f.result(timeout=30) for f in futures] == list(range(1, 101))
    done = {f.result() for f in cf.as_completed(futures, timeout=30)}
    assert done == set(range(1, 101))
    f = executor.submit(boom, 3)
    with pytest.raises(ValueError, match="boom 3"):
        f.result(timeout=30)
    assert isinstance(f.exception(), ValueError)


@pytest.mark.timeout(60)
def test_map_chunksize_order_errors(executor):
    for chunksize in (1, 7, 1000):
        assert list(executor.map(inc, range(500), chunksize=chunksize)) == list(range(1, 501))
    assert list(executor.map(add, range(10), range(10), chunksize=3)) == [2 * i for i in range(10)]
    assert list(executor.map(inc, iter([1, 2, 3]))) == [2, 3, 4]
    assert list(executor.map(inc, [])) == []
    it = executor.map(boom, range(6), chunksize=2)
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(ValueError):             # the chunk (2, 3) fails as a whole
        next(it)
    with pytest.raises(ValueError):
        executor.map(inc, [1], chunksize=0)


@pytest.mark.timeout(60)
def test_map_timeout(executor):
    it = executor.map(nap, [1, 2], timeout=0.05)
    with pytest.raises(cf.TimeoutError):
        list(it)


@pytest.mark.timeout(60)
def test_map_close_stops_and_cancels(impl, tmp_path):
    # map() hands items out of C iterators (shmipc): close() must still act
    # as the standard generator's: nothing more comes out, and the calls not
    # started are cancelled (each call that runs leaves a file)
    with make_executor(impl, max_workers=1) as ex:
        it = ex.map(touch, [str(tmp_path / str(i)) for i in range(40)], chunksize=1)
        assert next(it) == 0
        it.close()
        assert list(it) == []
    assert 1 <= len(os.listdir(tmp_path)) < 40


@pytest.mark.timeout(60)
def test_map_of_a_list_is_in_order_and_complete(executor):
    items = list(range(1000))
    assert list(executor.map(inc, items, chunksize=7)) == [x + 1 for x in items]
    assert list(executor.map(inc, items, chunksize=5000)) == [x + 1 for x in items]
    assert list(executor.map(inc, [], chunksize=3)) == []


@pytest.mark.timeout(60)
def test_initializer(impl):
    with make_executor(impl, 2, initializer=set_init, initargs=("hi",)) as ex:
        assert list(ex.map(get_init, range(6))) == ["hi"] * 6


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_max_tasks_per_child(method):
    # shmipc only: the standard executor refuses it under fork, and on 3.11
    # can hang with it under spawn (CPython gh-115634)
    with shmipc.ProcessPoolExecutor(2, mp_context=method, initializer=set_init, initargs=("hi",),
                                    max_tasks_per_child=3) as ex:
        pids = {f.result(timeout=30) for f in [ex.submit(getpid) for _ in range(12)]}
        assert len(pids) >= 4
        assert list(ex.map(get_init, range(6))) == ["hi"] * 6


@pytest.mark.timeout(60)
def test_shutdown_cancel_futures(impl):
    ex = make_executor(impl, 1)
    futures = [ex.submit(nap, i, 0.2) for i in range(6)]
    futures[0].result(timeout=30)
    ex.shutdown(wait=True, cancel_futures=True)
    assert futures[0].done() and not futures[0].cancelled()
    assert any(f.cancelled() for f in futures[2:])
    assert all(f.done() for f in futures)
    with pytest.raises(RuntimeError):
        ex.submit(inc, 1)


@pytest.mark.timeout(60)
def test_cancel_before_start(impl):
    with make_executor(impl, 1) as ex:
        first = ex.submit(nap, 0, 0.3)
        waiting = [ex.submit(inc, i) for i in range(50)]
        last = waiting[-1]
        assert last.cancel()
        assert first.result(timeout=30) == 0
        assert last.cancelled()
        assert [f.result(timeout=30) for f in waiting[:-1]] == list(range(1, 50))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", START_METHODS)
def test_start_methods(impl, method):
    with make_executor(impl, 2, method, initializer=set_init, initargs=(method,)) as ex:
        assert list(ex.map(inc, range(50), chunksize=5)) == list(range(1, 51))
        assert ex.submit(get_init).result(timeout=60) == method


@pytest.mark.timeout(60)
def test_shmipc_bad_arguments():
    with pytest.raises(ValueError, match="max_workers"):
        shmipc.ProcessPoolExecutor(0)
    with pytest.raises(ValueError, match="max_tasks_per_child"):
        shmipc.ProcessPoolExecutor(1, max_tasks_per_child=0)
    with pytest.raises(ValueError, match="start method"):
        shmipc.ProcessPoolExecutor(1, mp_context="teleport")


@pytest.mark.timeout(60)
def test_no_leaks(no_leaks):
    ex = shmipc.ProcessPoolExecutor(2)
    assert list(ex.map(inc, range(2000), chunksize=100)) == list(range(1, 2001))
    ex.shutdown(wait=True)
    with shmipc.ProcessPoolExecutor(2) as ex:
        ex.submit(nap, 1, 0.1)


@pytest.mark.timeout(60)
def test_shutdown_without_wait_leaks_nothing(no_leaks):
    ex = shmipc.ProcessPoolExecutor(2)
    futures = [ex.submit(nap, i, 0.05) for i in range(4)]
    ex.shutdown(wait=False)
    assert [f.result(timeout=30) for f in futures] == [0, 1, 2, 3]


def _counting(log, n):
    for i in range(n):
        log.append(i)
        yield i


@pytest.mark.timeout(60)
def test_map_buffersize_reads_lazily():
    log = []
    with shmipc.ProcessPoolExecutor(2) as ex:
        it = ex.map(inc, _counting(log, 1000), chunksize=10, buffersize=3)
        assert next(it) == 1
        assert len(log) <= 50                       # at most a few chunks read ahead
        assert list(it) == list(range(2, 1001))
        with pytest.raises(ValueError, match="buffersize"):
            ex.map(inc, [1], buffersize=0)


@pytest.mark.timeout(60)
def test_terminate_and_kill_workers(no_leaks, tmp_path):
    from conftest import touch_then_sleep, wait_until

    for stop in ("terminate_workers", "kill_workers"):
        ex = shmipc.ProcessPoolExecutor(2)
        flag = str(tmp_path / stop)
        f = ex.submit(touch_then_sleep, flag, 30, 1)
        wait_until(lambda: os.path.exists(flag), 30, "the task started")     # it runs in a worker now
        getattr(ex, stop)()
        assert f.done() and f.exception() is not None
        with pytest.raises(RuntimeError):
            ex.submit(inc, 1)


def failing_init():
    raise OSError("cannot initialise")


@pytest.mark.timeout(60)
def test_failing_initializer_breaks_the_pool(impl):
    with make_executor(impl, 2, initializer=failing_init) as ex:
        f = ex.submit(inc, 1)
        with pytest.raises(cf.process.BrokenProcessPool):
            f.result(timeout=30)
        with pytest.raises(cf.process.BrokenProcessPool):
            ex.submit(inc, 1)


# ------------------------------------------------------------ issues 9 and 10: boundaries, fidelity
class Unpicklable:
    def __reduce__(self):
        raise TypeError("I refuse to be pickled")


def return_unpicklable(_x=None):
    return Unpicklable()


def _restore_bad_state():
    raise ValueError("this state cannot be restored")


class BadState:
    def __reduce__(self):
        return _restore_bad_state, ()


def return_bad_state(_x=None):
    return BadState()


class CodedError(Exception):
    def __init__(self, msg, code):
        super().__init__(msg)
        self.code = code


def raise_coded(x):
    raise CodedError(f"bad {x}", 7)


def call_exit(code):
    import sys

    sys.exit(code)


def kill_self(_x=None):
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


class CountedObject:
    n_instances = 0

    def __new__(cls):
        cls.n_instances += 1
        return object.__new__(cls)

    def __del__(self):
        type(self).n_instances -= 1


def make_counted(_x=None):
    return CountedObject()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.timeout(60)
def test_values_that_do_not_cross_fail_only_their_future(impl):
    """As concurrent.futures: a result that fails to pickle arrives as the
    pickling error itself; shmipc also survives what the standard executor
    does not (a result or exception that fails to unpickle in the parent)."""
    with make_executor(impl, 2) as ex:
        exc = ex.submit(return_unpicklable).exception(timeout=30)
        assert isinstance(exc, TypeError) and "refuse" in str(exc)
        assert "I refuse to be pickled" in str(exc.__cause__)
        assert type(exc.__cause__) is cf.process._RemoteTraceback
        exc = ex.submit(call_exit, 3).exception(timeout=30)
        assert isinstance(exc, SystemExit) and exc.code == 3
        assert ex.submit(inc, 1).result(timeout=30) == 2
    if impl == "shmipc":
        with shmipc.ProcessPoolExecutor(2) as ex:
            # each also a BrokenProcessPool (see test_undecodable_call_is_a_broken_process_pool)
            exc = ex.submit(return_bad_state).exception(timeout=30)
            assert isinstance(exc, ValueError) and "cannot be restored" in str(exc)
            assert "return_bad_state" in str(exc) and "in the parent" in str(exc)
            exc = ex.submit(raise_coded, 1).exception(timeout=30)
            assert isinstance(exc, TypeError) and "CodedError('bad 1') raised by raise_coded" in str(exc)
            assert "raise_coded" in str(exc.__cause__.__cause__)        # the worker's traceback
            exc = ex.submit(inc, BadState()).exception(timeout=30)
            assert isinstance(exc, ValueError) and "unpickled in the worker" in str(exc)
            assert "unpickled in the worker" in str(exc.__cause__.__cause__)
            assert isinstance(exc, cf.process.BrokenProcessPool)
            assert list(ex.map(inc, range(10))) == list(range(1, 11))


def _raise_unpickling_error():
    import pickle

    raise pickle.UnpicklingError("cannot load this")


class ErrorAtUnpickle:
    """Pickles anywhere; unpickling it raises pickle.UnpicklingError (as
    CPython's test_concurrent_futures.ErrorAtUnpickle)."""

    def __reduce__(self):
        return _raise_unpickling_error, ()


def return_error_at_unpickle(_x=None):
    return ErrorAtUnpickle()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["argument", "result", "map"])
def test_undecodable_call_is_a_broken_process_pool(impl, where):
    """As concurrent.futures (CPython's ExecutorDeadlockTest.test_error_at_task_unpickle
    and test_error_during_result_unpickle_in_result_handler): an argument that
    fails to unpickle in the worker, or a result that fails to unpickle in the
    parent, raises BrokenProcessPool. shmipc fails only that future, and its
    error is also the unpickling error's type (with it as __cause__), so
    except clauses written for either catch it; the executor goes on."""
    import pickle

    with make_executor(impl, 2) as ex:
        if where == "argument":
            exc = ex.submit(id, ErrorAtUnpickle()).exception(timeout=30)
        elif where == "result":
            exc = ex.submit(return_error_at_unpickle).exception(timeout=30)
        else:                   # one item of a map chunk: the chunk's result does not load
            with pytest.raises(cf.process.BrokenProcessPool) as info:
                list(ex.map(identity_or_bad, [1, 2, 3], chunksize=3, timeout=30))
            exc = info.value
        assert isinstance(exc, cf.process.BrokenProcessPool), repr(exc)
        if impl == "shmipc":
            assert isinstance(exc, pickle.UnpicklingError), repr(exc)
            assert type(exc.__cause__) is pickle.UnpicklingError and "cannot load this" in str(exc)
            assert ("worker" if where == "argument" else "parent") in str(exc)
            assert ex.submit(inc, 1).result(timeout=30) == 2        # only that call failed
            assert list(ex.map(inc, range(10), chunksize=3)) == list(range(1, 11))


def identity_or_bad(x):
    return ErrorAtUnpickle() if x == 2 else x


@pytest.mark.timeout(60)
def test_worker_lost_is_a_broken_process_pool(no_leaks):
    with shmipc.ProcessPoolExecutor(2) as ex:
        exc = ex.submit(kill_self).exception(timeout=30)
        assert isinstance(exc, shmipc.WorkerLost) and isinstance(exc, cf.process.BrokenProcessPool)
        assert ex.submit(inc, 1).result(timeout=30) == 2       # only that call failed


@pytest.mark.timeout(60)
def test_map_chunk_larger_than_a_message_is_split():
    with shmipc.ProcessPoolExecutor(2) as ex:
        assert list(ex.map(len, [bytes(102400)] * 100, chunksize=100)) == [102400] * 100


@pytest.mark.timeout(60)
def test_map_iterator_keeps_no_result_it_yielded():
    import gc
    import weakref

    with shmipc.ProcessPoolExecutor(2) as ex:
        it = ex.map(make_counted, range(4), chunksize=2)
        first = next(it)
        ref = weakref.ref(first)
        del first
        gc.collect()
        assert ref() is None
        assert len(list(it)) == 3


def use(ex):
    f = ex.submit(raise_coded, 1)
    f.result()


@pytest.mark.timeout(60)
def test_dropped_executor_whose_last_future_raised_is_collected(no_leaks):
    import gc
    import weakref

    ex = shmipc.ProcessPoolExecutor(2)
    pids = list(ex._engine._pids.values())
    with pytest.raises(Exception):
        use(ex)         # the exception's traceback holds use()'s frame, which holds ex
    ref = weakref.ref(ex)
    del ex
    assert wait_for(lambda: gc.collect() is not None and ref() is None, 5)
    from shmipc._proc import pid_alive

    assert wait_for(lambda: not any(pid_alive(p) for p in pids), 5)


def sleep_and_print(seconds, text):
    time.sleep(seconds)
    print(text, flush=True)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl_name", ["concurrent.futures", "shmipc"])
def test_work_submitted_before_interpreter_exit_completes(impl_name):
    """(As CPython's test_interpreter_shutdown.)"""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    make = ("shmipc.ProcessPoolExecutor(5)" if impl_name == "shmipc"
            else "concurrent.futures.ProcessPoolExecutor(5)")
    script = (f"import sys; sys.path.insert(0, {here!r}); sys.path.insert(0, {os.path.dirname(here)!r})\n"
              "import concurrent.futures, shmipc\n"
              "from test_futures import sleep_and_print\n"
              "if __name__ == '__main__':\n"
              f"    t = {make}\n"
              "    t.submit(sleep_and_print, 1.0, 'apple')\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50)
    assert out.returncode == 0 and not out.stderr, out.stderr
    assert out.stdout.strip() == "apple"


@pytest.mark.timeout(60)
def test_is_a_standard_process_pool_executor(no_leaks):
    with shmipc.ProcessPoolExecutor(2, mp_context="fork") as ex:
        assert isinstance(ex, cf.ProcessPoolExecutor)
        assert len(ex._processes) == 2 and all(w.is_alive() for w in ex._processes.values())
        assert ex._broken is False and ex._mp_context.get_start_method() == "fork"
        assert ex.submit(inc, 1).result(timeout=30) == 2


class ExitAtPickle:
    def __reduce__(self):
        import sys

        sys.exit(4)


def return_exit_at_pickle(_x=None):
    return ExitAtPickle()


@pytest.mark.timeout(60)
def test_sys_exit_while_pickling_a_result_is_the_futures_exception(impl):
    """As concurrent.futures (CPython's test_exit_during_result_pickle_on_worker):
    SystemExit raised while the worker pickles a result is delivered as the
    future's exception, and the executor goes on."""
    with make_executor(impl, 2) as ex:
        exc = ex.submit(return_exit_at_pickle).exception(timeout=30)
        assert isinstance(exc, SystemExit) and exc.code == 4, repr(exc)
        assert ex.submit(inc, 1).result(timeout=30) == 2
