"""Pool: one test body run against multiprocessing.Pool and shmipc.Pool
(fork, real worker processes) wherever the two should behave alike: result
order of every map flavour and chunk size, empty inputs, exception types and
messages, callbacks, AsyncResult states, close/terminate/join. Where shmipc
differs on purpose, the test says so and asserts shmipc's behaviour (an
exception that is the stdlib's or a subclass of it). A mismatch that is a bug
is marked xfail(strict=True) with the reason, so that fixing it turns the
suite red until the mark goes.

(issue 12: "one test body run against multiprocessing and shmipc wherever
behaviour should match (pool ordering and error semantics too)")"""
from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import pickle
import threading
import time

import pytest

import shmipc


# ------------------------------------------------------------ task functions (module level: they cross)
def square(x):
    return x * x


def add(a, b=0):
    return a + b


def fail_on_three(x):
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


class TwoArgError(Exception):
    def __init__(self, code, detail):
        super().__init__(code, detail)


def raise_two_arg(_x):
    raise TwoArgError(7, "detail")


def nap_then(x, seconds=0.5):
    time.sleep(seconds)
    return x


def return_local_function(x):
    return lambda: x                        # cannot be pickled back to the parent


def uneven(x):
    time.sleep(0.001 * ((x * 7) % 5))       # results finish out of order
    return x


@pytest.fixture
def pool(impl):
    """A two-worker pool of `impl` (fork), terminated after the test."""
    p = (multiprocessing.get_context("fork").Pool(2) if impl is multiprocessing
         else shmipc.Pool(2, context="fork"))
    yield p
    p.terminate()
    p.join()


# ------------------------------------------------------------ ordering
@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [None, 1, 3, 7, 1000])
def test_map_flavours_keep_their_order(pool, chunksize):
    items = list(range(41))
    want = [uneven(x) for x in items]
    assert pool.map(uneven, items, chunksize) == want
    assert pool.map_async(uneven, iter(items), chunksize).get(30) == want
    assert list(pool.imap(uneven, items, chunksize or 1)) == want
    assert sorted(pool.imap_unordered(uneven, items, chunksize or 1)) == want
    pairs = [(x, -x) for x in items]
    assert pool.starmap(add, pairs, chunksize) == [0] * len(items)
    assert pool.starmap_async(add, iter(pairs), chunksize).get(30) == [0] * len(items)


@pytest.mark.timeout(60)
def test_empty_inputs(pool):
    assert pool.map(square, []) == []
    assert pool.map(square, iter(())) == []
    assert pool.map_async(square, []).get(10) == []
    assert pool.starmap(add, []) == []
    assert pool.starmap_async(add, []).get(10) == []
    assert list(pool.imap(square, [])) == []
    assert list(pool.imap_unordered(square, [])) == []


@pytest.mark.timeout(60)
def test_apply_and_apply_async_pass_args_and_kwds(pool):
    assert pool.apply(add, (1,), {"b": 2}) == 3
    assert pool.apply_async(add, (4, 5)).get(10) == 9
    assert pool.apply(square, (6,)) == 36


# ------------------------------------------------------------ chunksize edge cases
@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [0, -1])
def test_imap_refuses_a_chunksize_below_one(pool, chunksize):
    for call in (pool.imap, pool.imap_unordered):
        with pytest.raises(ValueError, match=f"Chunksize must be 1\\+, not {chunksize}"):
            list(call(square, range(5), chunksize))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [0, -1])
def test_map_with_a_chunksize_below_one(pool, impl, chunksize):
    """Differs on purpose: multiprocessing's map returns [None] * n for a
    chunksize below one (no task is even sent); shmipc raises the ValueError
    its imap raises, as shmipc refuses bad input at the call."""
    if impl is multiprocessing:
        assert pool.map(square, range(5), chunksize) == [None] * 5
        return
    with pytest.raises(ValueError, match=f"Chunksize must be 1\\+, not {chunksize}"):
        pool.map(square, range(5), chunksize)
    assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]        # the pool is fine


@pytest.mark.timeout(60)
def test_map_with_a_float_chunksize_is_refused(impl):
    """Differs on purpose: multiprocessing's map never returns for a float
    chunksize (its task handler thread dies on islice), so only shmipc is
    run: a TypeError (a stdlib exception) at the call."""
    if impl is multiprocessing:
        pytest.skip("multiprocessing.Pool.map hangs for chunksize=2.0")
    with shmipc.Pool(2, context="fork") as p:
        with pytest.raises(TypeError, match="chunksize"):
            p.map(square, range(5), chunksize=2.0)
        with pytest.raises(TypeError, match="chunksize"):
            list(p.imap(square, range(5), chunksize=2.0))


# ------------------------------------------------------------ errors
@pytest.mark.timeout(60)
def test_a_task_error_reaches_the_caller_with_its_type_and_message(pool):
    with pytest.raises(ValueError, match="^bad item 3$"):
        pool.map(fail_on_three, range(6))
    with pytest.raises(ValueError, match="^bad item 3$"):
        pool.map_async(fail_on_three, range(6)).get(30)
    with pytest.raises(ValueError, match="^bad item 3$"):
        pool.apply(fail_on_three, (3,))
    with pytest.raises(ValueError, match="^bad item 3$"):
        pool.starmap(fail_on_three, [(3,)])
    with pytest.raises(TwoArgError) as info:
        pool.apply(raise_two_arg, (0,))
    assert info.value.args == (7, "detail")
    assert pool.map(square, range(4)) == [0, 1, 4, 9]             # the pool carries on


@pytest.mark.timeout(60)
def test_imap_yields_up_to_the_failing_item_then_raises(pool):
    it = pool.imap(fail_on_three, range(6))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="^bad item 3$"):
        next(it)
    assert [next(it) for _ in range(2)] == [4, 5]                 # the rest still comes
    with pytest.raises(StopIteration):
        next(it)
    with pytest.raises(ValueError, match="^bad item 3$"):
        sorted(pool.imap_unordered(fail_on_three, range(6)))


def pickling_error_of(obj):
    """The exception this interpreter's pickle raises for obj."""
    try:
        pickle.dumps(obj)
    except Exception as error:
        return error
    raise AssertionError(f"{obj!r} pickled")


@pytest.mark.timeout(60)
def test_call_errors_in_the_parent(pool):
    with pytest.raises(TypeError, match="not iterable"):
        pool.map(square, 5)
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'a'"):
        pool.starmap(add, [()])
    with pytest.raises(TypeError, match="not iterable"):
        pool.starmap(add, [1])
    # what pickle itself raises for a local object differs by version
    # (3.11: AttributeError "Can't pickle local object", 3.13: "Can't get
    # local object", 3.14: PicklingError): the pool raises the same
    expected = pickling_error_of(lambda: 1)
    with pytest.raises(type(expected), match="local object"):
        pool.apply(square, (lambda: 1,))


@pytest.mark.timeout(60)
def test_apply_async_with_args_that_are_not_a_tuple(pool, impl):
    """Differs on purpose in *where*: multiprocessing accepts the call and
    the TypeError comes out of get(); shmipc raises it at apply_async, the
    call that caused it. Both are TypeError."""
    if impl is multiprocessing:
        with pytest.raises(TypeError, match="must be an iterable, not int"):
            pool.apply_async(square, 3).get(10)
    else:
        with pytest.raises(TypeError, match="not iterable"):
            pool.apply_async(square, 3)


@pytest.mark.timeout(60)
def test_a_result_that_cannot_be_pickled_is_a_maybe_encoding_error(pool):
    with pytest.raises(multiprocessing.pool.MaybeEncodingError) as info:
        pool.apply(return_local_function, (1,))
    expected = pickling_error_of(return_local_function(1))
    assert type(expected).__name__ in info.value.exc
    assert "local object" in info.value.exc
    with pytest.raises(multiprocessing.pool.MaybeEncodingError):
        pool.map(return_local_function, [1, 2])
    assert pool.apply(square, (3,)) == 9


@pytest.mark.timeout(60)
def test_maybe_encoding_error_message_matches_multiprocessing(pool):
    with pytest.raises(multiprocessing.pool.MaybeEncodingError) as info:
        pool.apply(return_local_function, (1,))
    assert info.value.value.startswith("<function return_local_function.<locals>.<lambda> at 0x")
    assert str(info.value).startswith("Error sending result: '<function return_local_function.<locals>")


# ------------------------------------------------------------ AsyncResult and callbacks
@pytest.mark.timeout(60)
def test_async_result_states(pool):
    slow = pool.apply_async(nap_then, (1, 0.5))
    assert not slow.ready()
    with pytest.raises(ValueError, match="not ready$"):
        slow.successful()
    with pytest.raises(multiprocessing.TimeoutError):
        slow.get(0.01)
    assert slow.wait(0.01) is None
    assert slow.get(30) == 1 and slow.ready() and slow.successful()
    failed = pool.apply_async(fail_on_three, (3,))
    failed.wait(30)
    assert failed.ready() and not failed.successful()
    done = pool.map_async(square, range(3))
    assert done.get(30) == [0, 1, 4] and done.get(30) == [0, 1, 4]         # get twice
    it = pool.imap(nap_then, [5])
    with pytest.raises(multiprocessing.TimeoutError):
        it.next(timeout=0.01)
    assert it.next(timeout=30) == 5


@pytest.mark.timeout(60)
def test_callbacks_run_once_with_the_result_or_the_error(pool):
    seen = []
    lock = threading.Lock()

    def record(kind):
        def cb(value):
            with lock:
                seen.append((kind, value if kind == "ok" else (type(value).__name__, str(value))))
        return cb

    pool.map_async(square, range(4), callback=record("ok"), error_callback=record("err")).wait(30)
    pool.map_async(fail_on_three, range(5), callback=record("ok"), error_callback=record("err")).wait(30)
    pool.apply_async(add, (2, 3), callback=record("ok"), error_callback=record("err")).wait(30)
    pool.apply_async(fail_on_three, (3,), callback=record("ok"), error_callback=record("err")).wait(30)
    pool.starmap_async(add, [(1, 1)], callback=record("ok")).wait(30)
    assert seen == [("ok", [0, 1, 4, 9]), ("err", ("ValueError", "bad item 3")), ("ok", 5),
                    ("err", ("ValueError", "bad item 3")), ("ok", [2])]


# ------------------------------------------------------------ close / terminate / join
@pytest.mark.timeout(60)
def test_close_then_join_finishes_queued_work(impl):
    p = (multiprocessing.get_context("fork").Pool(2) if impl is multiprocessing
         else shmipc.Pool(2, context="fork"))
    with pytest.raises(ValueError, match="^Pool is still running$"):
        p.join()
    r = p.map_async(nap_then, range(4), chunksize=1)
    p.close()
    p.close()                                               # twice is fine
    for call in (lambda: p.apply_async(square, (1,)), lambda: p.map(square, [1]),
                 lambda: p.imap(square, [1]), lambda: p.starmap(add, [(1, 2)])):
        with pytest.raises(ValueError, match="^Pool not running$"):
            call()
    p.join()
    assert r.ready() and r.get(0) == [0, 1, 2, 3]          # close() let the work finish


@pytest.mark.timeout(60)
def test_terminate_stops_the_pool(impl):
    p = (multiprocessing.get_context("fork").Pool(2) if impl is multiprocessing
         else shmipc.Pool(2, context="fork"))
    p.apply_async(nap_then, (1, 30))
    t = time.monotonic()
    p.terminate()
    p.join()
    assert time.monotonic() - t < 10                      # did not wait for the 30 s task
    with pytest.raises(ValueError, match="^Pool not running$"):
        p.map(square, [1])
    p.terminate()                                           # twice is fine


@pytest.mark.timeout(60)
def test_context_manager_terminates_on_exit(impl):
    p = (multiprocessing.get_context("fork").Pool(2) if impl is multiprocessing
         else shmipc.Pool(2, context="fork"))
    with p as entered:
        assert entered is p
        assert p.map(square, range(3)) == [0, 1, 4]
    with pytest.raises(ValueError, match="^Pool not running$"):
        p.apply_async(square, (1,))
    p.join()
