"""The wire format for task data (shmipc._wire): every encoding round-trips,
through a real ring too; forged records raise CorruptMessage with the numbers;
in a real pool, a value that does not cross fails only its own task."""
from __future__ import annotations

import functools
import multiprocessing.pool
import pickle
import queue
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import shmipc
from shmipc import _wire, _wire_records
from shmipc._wire import (M_BLOBS, M_BYTEARRAY, M_BYTES, M_NDARRAY, M_PICKLE, OUT_OF_BAND_MIN, pack,
                          pack_error, pack_items, pack_task, rewrap, unpack, unpack_error, unpack_task)
from shmipc.arena import Arena
from shmipc.errors import CorruptMessage

BIG = OUT_OF_BAND_MIN


def _same(a, b):
    if isinstance(a, np.ndarray):
        return type(b) is np.ndarray and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, list):
        return type(b) is list and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _through_ring(data, meta, view=False):
    """(data, meta) as the other side gets them: put in a real ring inside a
    record tuple, taken out (copied, or as a zero-copy view)."""
    arena = Arena(Arena.size_for(rings=[4 << 20]))
    try:
        ring = arena.ring(4 << 20, name="r")
        ring.put((7, data, meta))
        if view:
            with ring.get_view(timeout=5) as rec:
                return rec[0], rec[1], rec[2], True
        rec = ring.get(timeout=5)
        return rec[0], rec[1], rec[2], False
    finally:
        arena.close()


class Unloadable:
    """Pickles, but never unpickles (its __setstate__ raises)."""

    def __init__(self, n=0):
        self.n = n

    def __setstate__(self, state):
        raise ValueError("this object refuses to be rebuilt")


class Unpicklable:
    def __reduce__(self):
        raise TypeError("this object refuses to be pickled")


ARRAYS = [
    np.arange(10, dtype=np.int8), np.arange(12, dtype=">i4").reshape(3, 4), np.linspace(0, 1, 7),
    np.zeros((0, 3)), np.array(3.5), np.ones((2, 3, 4), dtype=np.complex64),
    np.array([True, False]), np.array(["2020-01-01", "2021-06-30"], dtype="datetime64[ns]"),
    np.arange(40000, dtype=np.float64),                      # large: out of band
    np.arange(20, dtype=np.int32)[::2],                     # not contiguous: copied first
    np.asfortranarray(np.arange(6.0).reshape(2, 3)),
]


# ---------------------------------------------------------------------- round trips
@pytest.mark.timeout(30)
@pytest.mark.parametrize("value", [0, -2**63, 2**200, 1.5, float("inf"), 2 + 3j, "", "héllo\ud800", True, False,
                                   None, b"", b"x" * (BIG - 1), bytearray(b"ab")],
                         ids=lambda v: type(v).__name__)
def test_native_and_small_values_round_trip(value):
    data, meta = pack(value)
    for view in (False, True):
        _seq, d, m, copy = _through_ring(data, meta, view)
        out = unpack(d, m, copy)
        assert type(out) is type(value) and out == value


@pytest.mark.timeout(30)
@pytest.mark.parametrize("value", [bytes(range(256)) * (BIG // 256 + 1), bytearray(b"z" * (BIG * 3))],
                         ids=["bytes", "bytearray"])
def test_large_bytes_travel_out_of_band(value):
    data, meta = pack(value)
    assert meta == (M_BYTES if type(value) is bytes else M_BYTEARRAY)
    assert isinstance(data, pickle.PickleBuffer)
    for view in (False, True):
        _seq, d, m, copy = _through_ring(data, meta, view)
        out = unpack(d, m, copy)
        assert type(out) is type(value) and out == value


@pytest.mark.timeout(30)
@pytest.mark.parametrize("arr", ARRAYS, ids=lambda a: f"{a.dtype}{a.shape}")
def test_arrays_travel_as_raw_data(arr):
    data, meta = pack(arr)
    assert meta[0] == M_NDARRAY and meta[1] == arr.dtype.str and meta[2] == arr.shape
    for view in (False, True):
        _seq, d, m, copy = _through_ring(data, meta, view)
        out = unpack(d, m, copy)
        assert _same(arr, out)
        if copy:        # a view's memory is reused: the array must own its data
            assert out.base is None or not isinstance(out.base, memoryview)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("arr", [np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]),
                                 np.array([1, "x", None], dtype=object),
                                 np.zeros(2, dtype=[("a", "<i4", (3,))])], ids=["fields", "object", "subarray field"])
def test_arrays_of_other_dtypes_are_pickled(arr):
    data, meta = pack(arr)
    assert meta == M_PICKLE
    _seq, d, m, copy = _through_ring(data, meta)
    out = unpack(d, m, copy)
    assert out.dtype == arr.dtype and out.shape == arr.shape and pickle.dumps(out) == pickle.dumps(arr)


@pytest.mark.timeout(30)
def test_a_list_of_bytes_sends_each_distinct_object_once():
    a, b = bytes([1]) * (BIG * 2), bytes([2]) * (BIG * 2)
    items = [a, b, a, b"small", a, b]
    data, meta = pack_items(items)
    assert meta == (M_BLOBS, (0, 1, 0, 2, 0, 1))
    assert len(data) == 3               # a, b, b"small": the repeats cost nothing
    for view in (False, True):
        _seq, d, m, copy = _through_ring(data, meta, view)
        out = unpack(d, m, copy)
        assert out == items and all(type(x) is bytes for x in out)
        assert out[0] is out[2] is out[4]       # as pickle's memo would give


class _BytesSubclass(bytes):
    """Not exactly bytes: pickled with its class."""


def _blob_table_model(items: list, large: int):
    """What shmipc._ring.blob_table computes, in plain Python."""
    if any(type(x) is not bytes for x in items):
        return None
    if not any(len(x) >= large for x in items):
        return False
    distinct: list = []
    index = []
    for x in items:
        k = next((i for i, d in enumerate(distinct) if d is x), None)
        if k is None:
            k = len(distinct)
            distinct.append(x)
        index.append(k)
    return distinct, (tuple(index) if len(distinct) < len(items) else None)


@pytest.mark.timeout(60)
@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=40), st.integers(0, 2))
def test_blob_table_finds_what_the_python_model_finds(picks, odd):
    # six objects (two equal in content but distinct: identity decides),
    # items picked among them; `odd` puts a non-bytes item or a bytes subclass in
    from shmipc._ring import blob_table

    objs = [bytes(BIG), bytes(BIG), b"s", b"", bytes([7]) * (BIG + 1), b"t" * 10]
    items = [objs[i] for i in picks]
    if odd and items:
        items[len(items) // 2] = 5 if odd == 1 else _BytesSubclass(b"x")
    got = blob_table(items, BIG)
    want = _blob_table_model(items, BIG)
    if want is None or want is False:
        assert got is want
    else:
        assert got[1] == want[1] and len(got[0]) == len(want[0])
        assert all(a is b for a, b in zip(got[0], want[0]))
    data, meta = pack_items(items)
    if items:
        _seq, d, m, copy = _through_ring(data, meta)
        out = unpack(d, m, copy)
        assert out == items and [type(x) for x in out] == [type(x) for x in items]


@pytest.mark.timeout(60)
def test_blob_table_of_hundreds_of_objects_keeps_every_reference():
    # positions past 256 are int objects of their own (not CPython's cached
    # small ints): each must be held by the index, and every blob's
    # reference count must come back to what it was
    from shmipc._ring import blob_table

    blobs = [bytes([i % 251]) * (BIG + i) for i in range(600)]
    items = blobs + blobs[::-1] + [blobs[400]] * 5
    counts = [sys.getrefcount(b) for b in blobs]
    for _ in range(50):
        distinct, index = blob_table(items, BIG)
    assert [sys.getrefcount(b) for b in blobs] == [c + 1 for c in counts]     # (held by `distinct`)
    del distinct
    assert [sys.getrefcount(b) for b in blobs] == counts
    assert index == tuple(range(600)) + tuple(range(599, -1, -1)) + (400,) * 5
    assert sum(index) == 2 * sum(range(600)) + 2000         # every int is alive and intact
    data, meta = pack_items(items)
    assert meta == (M_BLOBS, index) and len(data) == 600


@pytest.mark.timeout(30)
def test_lists_of_other_items_are_pickled_with_large_bytes_out_of_band():
    big = b"q" * (BIG * 4)
    items = [(1,), big, "x", big, np.arange(5), None]
    data, meta = pack_items(items)
    assert meta == M_PICKLE
    stream, buffers = data
    assert len(buffers) == 1            # the repeated big bytes: once, out of band
    _seq, d, m, copy = _through_ring(data, meta)
    out = unpack(d, m, copy)
    assert _same(items, out)
    assert pack_items([1, big])[1] == M_PICKLE       # chunks of numbers are not scanned for bytes
    for small in ([], [1, 2, 3], [b"a", b"b"], [2.5] * 100, (1, 2)):
        assert _same(list(small) if isinstance(small, list) else small, unpack(*pack_items(small)))


@pytest.mark.timeout(30)
def test_tasks_round_trip():
    for payload, items in ((((1, 2), {"k": 3}), False), ([b"x" * BIG, b"y"], True), ([1, 2], True)):
        data, meta = pack_task(divmod, payload, items)
        _seq, d, m, copy = _through_ring(data, meta)
        func, out = unpack_task(d, m, copy)
        assert func is divmod and out == payload


@pytest.mark.timeout(30)
def test_rewrap_makes_a_received_value_sendable_again():
    for value in (b"r" * (BIG * 2), np.arange(5000.0), [b"s" * BIG, b"t"], {"a": np.arange(9000)}, 5):
        data, meta = pack(value) if not isinstance(value, list) else pack_items(value)
        _seq, d, m, _copy = _through_ring(data, meta)
        _seq, d2, m2, _copy = _through_ring(*rewrap(d, m))
        assert _same(value, unpack(d2, m2)) if not isinstance(value, dict) else \
            np.array_equal(unpack(d2, m2)["a"], value["a"])


@pytest.mark.timeout(60)
@settings(max_examples=150, deadline=None)
@given(st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(),
                              st.binary(max_size=64), st.binary(min_size=BIG, max_size=BIG + 40)),
                    lambda inner: st.lists(inner, max_size=6) | st.tuples(inner, inner)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=4), max_leaves=12))
def test_any_value_round_trips(value):
    assert unpack(*pack(value)) == value
    if isinstance(value, list):
        assert unpack(*pack_items(value)) == value


# ---------------------------------------------------------------------- exceptions
@pytest.mark.timeout(30)
def test_exceptions_cross_as_themselves_or_as_text():
    try:
        raise KeyError("k")
    except KeyError as exc:
        blob, text, tb = pack_error(exc)
    assert blob is not None and text == "KeyError: 'k'" and "raise KeyError" in tb
    back = unpack_error(blob, text, "item 3", RuntimeError)
    assert type(back) is KeyError and back.args == ("k",)

    class Local(Exception):             # not importable on the other side: cannot pickle
        pass

    blob, text, _tb = pack_error(Local("x"))
    assert blob is None
    back = unpack_error(blob, text, "item 4", RuntimeError)
    assert type(back) is RuntimeError and "item 4" in str(back) and "Local: x" in str(back)
    back = unpack_error(pickle.dumps(5), "int: 5", "item 5", RuntimeError)
    assert type(back) is RuntimeError and "unpickled to a int" in str(back)


# ---------------------------------------------------------------------- hostile records
HOSTILE = [
    (("x", ()), 99, "unknown value encoding"),
    ((b"stream",), M_PICKLE, "expected (stream, buffers)"),
    (("s", "not a tuple"), M_PICKLE, "expected (stream, buffers)"),
    (12345, M_BYTES, "not a buffer"),
    (b"\0" * 16, (M_NDARRAY, "<f8", (3,)), "needs 24 bytes, 16 arrived"),
    (b"\0" * 16, (M_NDARRAY, "|O", (2,)), "not a plain one"),
    (b"\0" * 16, (M_NDARRAY, "not-a-dtype", (2,)), "dtype 'not-a-dtype'"),
    (b"\0" * 16, (M_NDARRAY, "<f8", (-1, -2)), "shape"),
    (b"\0" * 16, (M_NDARRAY, "<f8", (2**62, 2**62)), "needs"),
    (b"\0" * 8, (M_NDARRAY, "<f8", [1]), "shape"),
    ((b"a", b"b"), (M_BLOBS, (0, 1, 5)), "refers to item 5 of 2"),
    ((b"a",), (M_BLOBS, (0, -1)), "refers to item -1 of 1"),
    ((b"a", 3), (M_BLOBS, None), "not a buffer"),
    ([b"a"], (M_BLOBS, None), "a list of bytes is a list"),
    (object(), None, "not a native type"),
]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("data, meta, words", HOSTILE, ids=[w for _, _, w in HOSTILE])
def test_forged_records_raise_corrupt_message_with_the_numbers(data, meta, words):
    with pytest.raises(CorruptMessage, match=words.replace("(", r"\(").replace(")", r"\)")):
        unpack(data, meta)


@pytest.mark.timeout(30)
def test_forged_tasks_raise_corrupt_message():
    with pytest.raises(CorruptMessage, match="expected \\(function, items\\)"):
        unpack_task(("not bytes", b""), (_wire.M_CALL_ITEMS, None))
    with pytest.raises(CorruptMessage, match="expected \\(function, payload\\)"):
        unpack_task(*pack([1, 2, 3]))


@pytest.mark.timeout(30)
def test_a_pickle_that_does_not_load_raises_its_own_error():
    data, meta = pack(Unloadable())
    with pytest.raises(ValueError, match="refuses to be rebuilt"):
        unpack(data, meta)
    with pytest.raises(TypeError, match="refuses to be pickled"):
        pack(Unpicklable())


# ---------------------------------------------------------------------- in a real pool
def make_unloadable(i):
    return Unloadable(i) if i == 3 else i


def echo(x):
    return x


@pytest.mark.timeout(60)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_in_a_pool_a_value_that_does_not_cross_fails_only_its_task(context):
    with shmipc.Pool(2, context=context) as pool:
        # a result that does not unpickle in the parent: that task only
        results = [pool.apply_async(make_unloadable, (i,)) for i in range(6)]
        for i, r in enumerate(results):
            if i == 3:
                with pytest.raises(shmipc.pool.MaybeEncodingError, match="refuses to be rebuilt"):
                    r.get(timeout=30)
            else:
                assert r.get(timeout=30) == i
        # an argument that does not unpickle in the worker: that task only
        bad = pool.apply_async(echo, (Unloadable(),))
        with pytest.raises(ValueError, match="refuses to be rebuilt"):
            bad.get(timeout=30)
        # an argument that does not pickle: that task only, at once
        with pytest.raises(TypeError, match="refuses to be pickled"):
            pool.apply(echo, (Unpicklable(),))
        # map: one bad chunk fails the map (as multiprocessing), the pool goes on
        with pytest.raises(shmipc.pool.MaybeEncodingError):
            pool.map(make_unloadable, range(8), chunksize=2)
        assert pool.map(echo, range(10)) == list(range(10))
        assert pool.statistics()["worker_deaths"] == 0


@pytest.mark.timeout(120)
def test_pool_results_are_checked_item_by_item_under_every_encoding():
    blob = bytes(range(256)) * 400                          # 100 KiB
    distinct = [i.to_bytes(8, "little") + blob + i.to_bytes(8, "little") for i in range(60)]
    inputs = {
        "ints": list(range(-5000, 5000)),
        "floats": [i / 7 for i in range(3000)],
        "repeated blobs": [blob] * 40,
        "distinct blobs": distinct,
        "mixed": [1, "a", blob, None, 2.5, b"b", (1, 2), blob] * 10,
        "arrays": [np.arange(i, dtype=np.int64) for i in range(0, 5000, 250)],
    }
    with shmipc.Pool(2, context="fork") as pool:
        for name, items in inputs.items():
            for chunksize in (None, 1, 7):
                got = pool.map(echo, items, chunksize=chunksize)
                assert len(got) == len(items), name
                for i, (a, b) in enumerate(zip(items, got)):
                    assert _same(a, b) if not isinstance(a, tuple) else a == b, (name, chunksize, i)
        assert pool.apply(echo, (blob,)) == blob
        arr = pool.apply(echo, (np.arange(100000.0).reshape(100, 1000),))
        assert arr.shape == (100, 1000) and arr[99, 999] == 99999.0
    with shmipc.ProcessPoolExecutor(2, mp_context="fork") as ex:
        # a chunk larger than a task ring message: cut into pieces, joined back in order
        got = list(ex.map(len, [bytes(102400)] * 100, chunksize=100))
        assert got == [102400] * 100
        got = list(ex.map(echo, distinct, chunksize=60))
        assert got == distinct


@pytest.mark.timeout(60)
def test_a_forged_task_record_fails_that_task_in_the_worker():
    """A task whose record is damaged in shared memory (here: forged before
    it is put) fails with a clear error; the pool goes on."""
    with shmipc.Pool(1, context="fork") as pool:
        engine = pool._engine
        original = _wire.pack_task

        def forged(func, payload, items):
            data, meta = original(func, payload, items)
            if payload == [b"forge me"]:
                return (data[0], (b"a",)), (_wire.M_CALL_ITEMS, (M_BLOBS, (0, 9)))
            return data, meta

        # (wherever the engine's dispatcher took pack_task from)
        users = [m for name, m in list(sys.modules.items())
                 if name.startswith("shmipc.") and m is not _wire and getattr(m, "pack_task", None) is original]
        assert users
        for module in users:
            module.pack_task = forged
        try:
            with pytest.raises(CorruptMessage, match="refers to item 9 of 1"):
                pool.map(echo, [b"forge me"])
        finally:
            for module in users:
                module.pack_task = original
        assert pool.map(echo, [b"fine"]) == [b"fine"]
        assert engine.statistics()["worker_deaths"] == 0


# ---------------------------------------------------------------------- forged results
def _forged_result(how):
    """A result record for the calling task, forged as `how` says (what a
    process writing into the arena could leave in the result ring)."""
    import gc

    from shmipc import _poolworker

    w = next(o for o in gc.get_objects() if type(o) is _poolworker._WorkerLoop)
    seq = _poolworker.HEAD3.unpack_from(w.slots, w.offset)[1]       # the task this worker runs
    d, m = pack(1)
    if how in ("long", "short", "far"):
        items = {"long": list(range(50)), "short": [7], "far": [1, 2]}[how]
        data, meta = _wire.pack_items(items)
        return _wire_records.result_record((seq, _poolworker.R_OK, 10**9 if how == "far" else 0,
                                            how != "far", data, meta, None))
    return {"int": (seq, _poolworker.R_OK, 0, True, d, m, None),
            "piece": (seq, _poolworker.R_OK, 0, False, d, m, None),
            "short_tuple": (seq,),
            "status": (seq, 99, 0, True, d, m, None),
            "offset": (seq, _poolworker.R_OK, -1, True, d, m, None),
            "last": (seq, _poolworker.R_OK, 0, 7, d, m, None),
            "info": (seq, _poolworker.R_RAISED, 0, True, d, m, 5),
            "no_tuple": 5,
            "seq_str": ("x", _poolworker.R_OK, 0, True, d, m, None)}[how]


def forge_then_echo(x, how):
    """Item 0 of a chunk first puts a forged result for its own task."""
    if x == 0:
        import gc

        from shmipc import _poolworker

        w = next(o for o in gc.get_objects() if type(o) is _poolworker._WorkerLoop)
        w.results.put(_forged_result(how))
    return x * 10


# how -> what the map of that chunk raises (None: the record names no task in flight, so it
# is dropped and reported, and the worker's own result arrives)
FORGERIES = {
    "int": "the result of forge_then_echo on items 0..3 .* arrived as int, not a list",
    "piece": "arrived as int, not a list",
    "long": "has 50 items \\(a piece of 50 at offset 0\\) for a chunk of 4",
    "short": "has 1 item for a chunk of 4",
    "far": "a piece of 2 at offset 1000000000\\) for a chunk of 4",
    "short_tuple": "a result record is tuple of length 1, not a tuple of 7",
    "status": "a result record's status is 99",
    "offset": "a result record's offset is -1",
    "last": "a result record's last flag is 7",
    "info": "a result record's error info is int, not \\(traceback, description\\)",
    "no_tuple": None,
    "seq_str": None,
}


@pytest.mark.timeout(120)
def test_a_forged_result_record_fails_its_task_and_never_the_pool(capfd):
    """A result record forged in the result ring (a value that is not a list,
    a chunk's results of the wrong length or past its end, a record of the
    wrong shape, status, offset, flag or error info) fails the task it names
    with CorruptMessage and the numbers; one that names no task is dropped
    and reported. The bookkeeping thread lives on: the pool keeps working
    (before, `len(5)` in it ended the thread and every later call hung)."""
    with shmipc.Pool(2, context="fork") as pool:
        for how, match in FORGERIES.items():
            args = [(i, how) for i in range(4)]
            if match is None:
                assert pool.starmap(forge_then_echo, args, chunksize=4) == [0, 10, 20, 30]
                assert "a result record was lost: CorruptMessage" in capfd.readouterr().err
            else:
                with pytest.raises(CorruptMessage, match=match):
                    pool.starmap(forge_then_echo, args, chunksize=4)
            assert pool.map(abs, [-1, -2, -3], chunksize=1) == [1, 2, 3], how
        assert pool._engine._thread.is_alive()
        assert pool._engine.statistics()["worker_deaths"] == 0


@pytest.mark.timeout(60)
def test_a_forged_result_record_fails_that_future_and_that_imap_item():
    with shmipc.ProcessPoolExecutor(1, mp_context="fork") as ex:
        with pytest.raises(CorruptMessage, match="has 50 items"):
            list(ex.map(forge_then_echo, range(4), ["long"] * 4, chunksize=4))
        assert list(ex.map(abs, [-4, -5])) == [4, 5]
    with shmipc.Pool(1, context="fork") as pool:
        it = pool.imap(functools.partial(forge_then_echo, how="int"), range(4), chunksize=2)
        with pytest.raises(CorruptMessage, match="arrived as int"):
            next(it)
        assert pool.map(abs, [-6]) == [6]


class _DropNextPut:
    """Stands in for a worker's result ring and loses the next record put
    (as a record destroyed in shared memory, or dropped by the ring as
    corrupt, is lost), then gets out of the way."""

    def __init__(self, loop):
        self.loop, self.ring = loop, loop.results

    def put(self, record, *args, **kwargs):
        self.loop.results = self.ring
        return None

    def __getattr__(self, name):
        return getattr(self.ring, name)


def lose_my_result(x):
    if x == 0:
        import gc

        from shmipc import _poolworker

        loop = next(o for o in gc.get_objects() if type(o) is _poolworker._WorkerLoop)
        loop.results = _DropNextPut(loop)
    return x + 1


@pytest.mark.timeout(60)
def test_a_lost_result_record_fails_its_task_instead_of_waiting_for_ever():
    """A task whose result record never reaches the parent fails with
    CorruptMessage: at once when its worker's next result arrives (a worker
    runs its tasks in order and puts all of one's records before taking the
    next), else once its worker has said it was done (W_DONE) for
    LOST_RESULT_S while the result ring is empty. Before, map() waited for
    ever. Nothing else is lost and the pool goes on."""
    from shmipc._waiting import LOST_RESULT_S

    with shmipc.Pool(1, context="fork") as pool:
        results = [pool.apply_async(lose_my_result, (x,)) for x in range(4)]
        with pytest.raises(CorruptMessage, match="no result came for lose_my_result.* its worker has sent a "
                                                 "later task's result"):
            results[0].get(timeout=20)
        assert [r.get(timeout=20) for r in results[1:]] == [2, 3, 4]
        t0 = time.monotonic()
        with pytest.raises(CorruptMessage, match=r"its worker \(pid \d+\) said it was done [\d.]+ s ago and the "
                                                 r"result ring is empty"):
            pool.map(lose_my_result, [0, 5], chunksize=2)        # its worker's last task: nothing follows
        assert LOST_RESULT_S <= time.monotonic() - t0 < LOST_RESULT_S + 10
        assert pool.map(abs, [-1, -2]) == [1, 2]
        assert pool._engine.statistics()["worker_deaths"] == 0 and pool._engine.statistics()["in_flight"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize("forged", [5, (1,), ("x", 1, None, None), (3, 99, None, None), (0, 0, None, None),
                                    b"\x00" * 40])
def test_a_record_forged_into_a_task_ring_costs_no_task(forged):
    """A record that is no task's (forged into a worker's ring between real
    ones) is reported by the worker as undecodable; the parent does not fail
    the task it would otherwise have blamed, whose own record comes next:
    every real task's result arrives, and the worker lives on."""
    with shmipc.Pool(1, context="fork") as pool:
        assert pool.map(abs, [-1]) == [1]
        engine = pool._engine
        with engine._lock:              # nothing is dispatched between the two puts
            engine._tasks[0].put(forged)
            job = pool.map_async(abs, [-1, -2, -3], chunksize=1)
        assert job.get(timeout=20) == [1, 2, 3]
        assert pool.map(abs, [-4, -5]) == [4, 5]
        stats = engine.statistics()
        assert stats["worker_deaths"] == 0 and stats["in_flight"] == 0 and not engine._bad_records


def swallow_next_task(x):
    """Take the next task record out of this worker's own ring and drop it,
    as a hostile write of the ring's read position would: the task is never
    run, no record of it is ever written."""
    import gc

    from shmipc import _poolworker

    loop = next(o for o in gc.get_objects() if type(o) is _poolworker._WorkerLoop)
    loop.tasks.get(timeout=20)
    return x + 1


@pytest.mark.timeout(60)
def test_a_lost_task_record_fails_its_task_instead_of_waiting_for_ever():
    """A task whose record vanished from its worker's task ring (skipped,
    forged over) is never run: once its worker has been READY with that
    ring empty for LOST_RESULT_S, the task fails with CorruptMessage (a
    worker marks a task BUSY before the ring lets its record go, so none is
    on its way). Before, apply_async().get() and map() without a timeout
    waited for ever. Nothing else is lost and the pool goes on."""
    from shmipc._waiting import LOST_RESULT_S

    with shmipc.Pool(1, context="fork") as pool:
        first = pool.apply_async(swallow_next_task, (1,))
        lost = pool.apply_async(abs, (-7,))
        assert first.get(timeout=20) == 2
        t0 = time.monotonic()
        with pytest.raises(CorruptMessage, match=r"no result came for .*abs.* its worker \(pid \d+\) has waited "
                                                 r"for tasks for [\d.]+ s with its task ring empty"):
            lost.get(timeout=20)
        assert LOST_RESULT_S <= time.monotonic() - t0 < LOST_RESULT_S + 10
        # a map chunk lost the same way: the map fails, it does not hang
        first = pool.apply_async(swallow_next_task, (0,))
        chunk = pool.map_async(abs, [-1, -2], chunksize=2)
        assert first.get(timeout=20) == 1
        with pytest.raises(CorruptMessage, match="has waited for tasks"):
            chunk.get(timeout=20)
        assert pool.map(abs, [-1, -2, -3], chunksize=1) == [1, 2, 3]
        stats = pool._engine.statistics()
        assert stats["worker_deaths"] == 0 and stats["in_flight"] == 0


def _task_waiting_in_the_ring(pool, tmp_path):
    """A worker held by a first task, and a second task (abs(-5)) whose
    record waits in that worker's ring: (release, first, second, ring,
    write position)."""
    import struct

    from shmipc import _ring
    from conftest import hold_until, region_of, wait_until

    go = str(tmp_path / "go")
    engine = pool._engine
    first = pool.apply_async(hold_until, (go,))
    wait_until(lambda: engine.busy_workers(), 20, "the worker busy with the first task")
    second = pool.apply_async(abs, (-5,))
    ring = engine._tasks[0]
    wait_until(lambda: ring.qsize() == 1, 20, "the second task's record in the ring")
    buf, base = region_of(ring)
    head = struct.unpack_from("<Q", buf, base + _ring._layout()["prod.pos"])[0]
    return (lambda: open(go, "w").close()), first, second, ring, head


@pytest.mark.timeout(60)
def test_a_record_skipped_by_a_hostile_read_position_fails_its_task(tmp_path):
    """The read position moved past a waiting record (its message counts
    untouched): the worker never sees the task; the parent, which judges an
    empty ring by its positions, fails it about LOST_RESULT_S later."""
    from shmipc._waiting import LOST_RESULT_S
    from conftest import poke

    with shmipc.Pool(1, context="fork") as pool:
        release, first, second, ring, head = _task_waiting_in_the_ring(pool, tmp_path)
        poke(ring, "cons.pos", "<Q", head)
        poke(ring, "cons.cursor", "<Q", head)
        release()
        assert first.get(timeout=20) is True
        t0 = time.monotonic()
        with pytest.raises(CorruptMessage, match="with its task ring empty"):
            second.get(timeout=20)
        assert time.monotonic() - t0 < LOST_RESULT_S + 10
        assert pool.map(abs, [-1, -2]) == [1, 2]
        assert pool.statistics()["worker_deaths"] == 0


@pytest.mark.timeout(60)
def test_a_damaged_task_ring_is_laid_out_afresh_and_its_tasks_run(tmp_path, capfd):
    """Read positions past the write position (a hostile write): the worker
    cannot take anything from its ring any more. It says so and exits
    (before, it spun at 100 % CPU reporting the same error, and with tasks
    in flight the pool hung); the parent lays the ring out afresh and
    re-queues its tasks, which a replacement worker runs."""
    from conftest import poke

    with shmipc.Pool(1, context="fork") as pool:
        engine = pool._engine
        release, first, second, ring, head = _task_waiting_in_the_ring(pool, tmp_path)
        old_pid = next(iter(engine.worker_pids().values()))
        poke(ring, "cons.pos", "<Q", head + 4096)
        poke(ring, "cons.cursor", "<Q", head + 4096)
        release()
        assert first.get(timeout=20) is True
        assert second.get(timeout=20) == 5
        assert engine.rings_remade == 1 and engine._tasks[0] is not ring
        assert pool.map(abs, range(-50, 0), chunksize=3) == list(range(50, 0, -1))
        assert next(iter(engine.worker_pids().values())) != old_pid
        assert pool.statistics()["in_flight"] == 0
    assert "the task ring of worker 0 was damaged in shared memory; laid out afresh" in capfd.readouterr().err


def slow_times_ten(x):
    time.sleep(0.005)
    return x * 10


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["pool", "executor"])
def test_a_damaged_result_ring_stops_the_pool_with_a_clear_error(kind, capfd):
    """The shared result ring's read position forged past its write
    position: no result can come back (and the ring cannot be laid out
    afresh while workers and the zygote use it). Every pending task fails
    with CorruptArena, a later submit raises with the reason, the workers
    stop, and close/shutdown return. Before, the bookkeeping thread spun
    printing the error (100,000s of lines) and every call hung."""
    import concurrent.futures
    import struct

    from shmipc import _ring
    from shmipc._proc import pid_alive
    from shmipc.errors import CorruptArena
    from conftest import poke, region_of, wait_until

    pool = shmipc.Pool(2, context="fork") if kind == "pool" else shmipc.ProcessPoolExecutor(2, mp_context="fork")
    engine = pool._engine
    pids = list(engine.worker_pids().values())
    if kind == "pool":
        job = pool.map_async(slow_times_ten, range(400), chunksize=1)
        pending = [job]
    else:
        pending = [pool.submit(slow_times_ten, x) for x in range(400)]
    ring = engine._results
    wait_until(lambda: ring.stats()["messages_out"] > 10, 20, "some results read")
    buf, base = region_of(ring)
    head = struct.unpack_from("<Q", buf, base + _ring._layout()["prod.pos"])[0]
    poke(ring, "cons.pos", "<Q", head + 4096)
    poke(ring, "cons.cursor", "<Q", head + 4096)
    with pytest.raises(CorruptArena, match="result ring was damaged in shared memory"):
        if kind == "pool":
            pending[0].get(timeout=20)
        else:
            [f.result(timeout=20) for f in pending]
    broken = RuntimeError if kind == "pool" else concurrent.futures.process.BrokenProcessPool
    with pytest.raises(broken, match="result ring was damaged"):
        pool.apply_async(abs, (-1,)).get(timeout=20) if kind == "pool" else pool.submit(abs, -1).result(20)
    t0 = time.monotonic()
    if kind == "pool":
        pool.close()
        pool.join()
    else:
        pool.shutdown(wait=True)
    assert time.monotonic() - t0 < 10
    wait_until(lambda: not any(pid_alive(p) for p in pids), 10, "the workers gone")
    err = capfd.readouterr().err
    assert err.count("result ring was damaged") == 1 and err.count("a result record was lost") < 10, err[-2000:]


@pytest.mark.timeout(60)
def test_long_tasks_are_not_mistaken_for_lost_ones():
    """W_DONE names the last task a worker finished: a task running longer
    than LOST_RESULT_S, and tasks queued behind it, are waited for."""
    from shmipc._waiting import LOST_RESULT_S

    with shmipc.Pool(1, context="fork") as pool:
        slow = pool.apply_async(time.sleep, (LOST_RESULT_S * 2.5,))
        queued = [pool.apply_async(abs, (-x,)) for x in range(3)]
        assert slow.get(timeout=30) is None and [r.get(timeout=30) for r in queued] == [0, 1, 2]


# ---------------------------------------------------------------------- compact records
def _compact_task(items=(1, 2, 3), seq=7, kind=1):
    data, meta = pack_task(divmod, list(items), True)
    return _wire_records.task_record(seq, kind, data, meta)


@pytest.mark.timeout(30)
def test_compact_records_stand_for_the_tuples_they_replace():
    data, meta = pack_task(divmod, [1, "a", None, 2.5], True)
    record = _wire_records.task_record(2**40, 2, data, meta)
    assert type(record) is bytes
    assert _wire_records.read_task_record(record) == (2**40, 2, data, meta)
    assert _wire_records.read_task_record(memoryview(record)) == (2**40, 2, data, meta)
    func, items = unpack_task(*_wire_records.read_task_record(record)[2:])
    assert func is divmod and items == [1, "a", None, 2.5]
    rdata, rmeta = _wire.pack_items([3, 4])
    for last, offset in ((True, 0), (False, 12345)):
        compact = _wire_records.result_record((99, 1, offset, last, rdata, rmeta, None))
        assert type(compact) is bytes
        seq, status, off, lst, data2, meta2, info = _wire_records.read_result_record(compact, 1)
        assert (seq, status, off, lst, meta2, info) == (99, 1, offset, last, rmeta, None)
        assert unpack(data2, meta2) == [3, 4]


@pytest.mark.timeout(30)
def test_a_long_stream_takes_the_compact_form_too():
    # a chunk of 25,000 floats pickles to ~225 KB, which dumps hands over as
    # a PickleBuffer: as a tuple the ring pickled it again (~110 us a put and
    # get, against ~15 as bytes)
    items = [float(x) for x in range(100_000, 125_000)]
    data, meta = pack_task(divmod, items, True)
    assert isinstance(data[1][0], pickle.PickleBuffer)
    record = _wire_records.task_record(3, 1, data, meta)
    assert type(record) is bytes and len(record) > _wire.IN_BAND_STREAM_MAX
    seq, kind, data2, meta2 = _wire_records.read_task_record(record)
    assert (seq, kind, meta2) == (3, 1, meta)
    func, got = unpack_task(data2, meta2)
    assert func is divmod and got == items
    rdata, rmeta = _wire.pack_items([x * 3 for x in items])
    assert isinstance(rdata[0], pickle.PickleBuffer)
    compact = _wire_records.result_record((8, 1, 25_000, True, rdata, rmeta, None))
    assert type(compact) is bytes
    seq, status, off, last, data3, meta3, info = _wire_records.read_result_record(compact, 1)
    assert (seq, status, off, last, info) == (8, 1, 25_000, True, None)
    assert unpack(data3, meta3) == [x * 3 for x in items]
    # a stream that is not contiguous (never from dumps) stays a tuple
    strided = pickle.PickleBuffer(memoryview(b"0123456789ab")[::2])
    assert type(_wire_records.task_record(1, 1, (data[0], (strided, ())), meta)) is tuple


class _Small(int):
    pass


def test_lists_of_plain_ints_travel_as_int64s_and_nothing_else_does():
    ints = [0, -1, 255, 256, -(2**63), 2**63 - 1, 10**12]
    data, meta = _wire.pack_items(ints)
    assert meta == _wire.M_INT64 and data == np.array(ints, np.int64).tobytes()
    assert unpack(data, meta) == ints and all(type(x) is int for x in unpack(data, meta))
    assert unpack(memoryview(data), meta) == ints and unpack(bytearray(data), meta) == ints
    for other in ([1, True], [True, 1], [1, 2**63], [-(2**63) - 1], [1, 2.0], [1, None], [_Small(3)],
                  [1, _Small(3)]):
        data, meta = _wire.pack_items(other)
        assert meta == M_PICKLE, other
        back = unpack(data, meta)
        assert back == other and list(map(type, back)) == list(map(type, other))
    assert _wire.pack_items([])[1] == M_PICKLE
    for bad in (b"1234567", b"x" * 9, 12345, "abcdefgh"):
        with pytest.raises(CorruptMessage, match="list of ints"):
            unpack(bad, _wire.M_INT64)


def test_int_lists_take_the_compact_form_both_ways():
    items = list(range(-5, 30_000))
    data, meta = pack_task(divmod, items, True)
    assert meta == (_wire.M_CALL_ITEMS, _wire.M_INT64)
    record = _wire_records.task_record(11, 1, data, meta)
    assert type(record) is bytes and record[:2] == b"sI"
    seq, kind, data2, meta2 = _wire_records.read_task_record(record)
    assert (seq, kind, meta2) == (11, 1, meta)
    assert unpack_task(data2, meta2) == (divmod, items)
    rdata, rmeta = _wire.pack_items([x + 1 for x in items])
    compact = _wire_records.result_record((12, 1, 5, False, rdata, rmeta, None))
    assert type(compact) is bytes and compact[:2] == b"sJ"
    seq, status, off, last, data3, meta3, info = _wire_records.read_result_record(compact, 1)
    assert (seq, status, off, last, meta3, info) == (12, 1, 5, False, _wire.M_INT64, None)
    assert unpack(data3, meta3) == [x + 1 for x in items]
    # a record whose magic was switched decodes to an error, never a crash
    swapped = b"sT" + record[2:]
    try:
        unpack_task(*_wire_records.read_task_record(swapped)[2:])
    except Exception as exc:        # what unpickling garbage raises
        assert not isinstance(exc, (SystemError, MemoryError))
    odd = _wire_records.result_record((1, 1, 0, True, *_wire.pack_items(["x"]), None))
    forged = b"sJ" + odd[2:]
    _seq, _status, _off, _last, data4, meta4, _info = _wire_records.read_result_record(forged, 1)
    if len(data4) % 8:
        with pytest.raises(CorruptMessage, match="not a multiple of 8"):
            unpack(data4, meta4)


@pytest.mark.timeout(60)
def test_pool_map_of_ints_round_trips_every_kind_of_int():
    values = [0, 1, -1, 2**63 - 2, -(2**63), 10**30, True, False, _Small(7)]
    with shmipc.Pool(2) as pool:
        assert pool.map(_identity, list(range(-3000, 3000)), 1000) == list(range(-3000, 3000))
        got = pool.map(_identity, values, 3)            # chunks with bools, big ints, subclasses
        assert got == values and list(map(type, got)) == list(map(type, values))
        assert pool.map(abs, [-(2**63) + 1] * 5) == [2**63 - 1] * 5
        assert pool.map(abs, [-(2**63)] * 3) == [2**63] * 3      # results past int64: pickled


def _identity(x):
    return x


@pytest.mark.timeout(30)
def test_only_in_band_values_take_the_compact_form():
    big = pack_task(divmod, [b"x" * OUT_OF_BAND_MIN], True)          # a blob out of band
    assert _wire_records.task_record(1, 1, *big) == (1, 1, *big)
    call = pack_task(divmod, ((1, 2), {}), False)                     # a call: pickled whole
    assert type(_wire_records.task_record(1, 0, *call)) is tuple
    err = (1, 0, 0, True, *_wire.pack_pickled(ValueError("x")), ("tb", "repr"))
    assert _wire_records.result_record(err) is err                            # an error carries info
    arr = (1, 1, 0, True, *pack(np.arange(3)), None)
    assert _wire_records.result_record(arr) is arr


@pytest.mark.timeout(30)
def test_out_of_band_bytes_counts_a_chunks_large_items_only():
    blob = b"b" * OUT_OF_BAND_MIN
    assert _wire.out_of_band_bytes(*pack_task(len, [blob, b"s", blob, bytearray(3)], True)) == 0   # pickled
    other = b"o" * (OUT_OF_BAND_MIN + 5)
    assert _wire.out_of_band_bytes(*pack_task(len, [blob, b"s", other], True)) == 2 * len(blob) + 6
    assert _wire.out_of_band_bytes(*pack_task(len, [blob] * 5, True)) == len(blob)    # sent once
    assert _wire.out_of_band_bytes(*pack_task(len, [1, 2], True)) == 0
    assert _wire.out_of_band_bytes(*pack_task(len, ((blob,), {}), False)) == 0


@pytest.mark.timeout(60)
def test_forged_compact_records_raise_corrupt_message_with_the_numbers():
    task = _compact_task()
    result = _wire_records.result_record((5, 1, 0, True, *_wire.pack_items([1, 2]), None))
    for good, read in ((task, _wire_records.read_task_record), (result, lambda b: _wire_records.read_result_record(b, 1))):
        read(good)
        for n in range(len(good)):                          # cut anywhere
            with pytest.raises(CorruptMessage, match=f"record of {n} bytes"):
                read(good[:n])
        with pytest.raises(CorruptMessage, match=f"record of {len(good) + 1} bytes"):
            read(good + b"\0")
        for at in range(4):                                 # magic, version (and last's range)
            forged = bytearray(good)
            forged[at] ^= 0x5A
            if read is _wire_records.read_task_record and at == 3:
                assert read(bytes(forged))[1] == 1 ^ 0x5A      # (the kind: the worker checks it)
                continue
            with pytest.raises(CorruptMessage, match="compact"):
                read(bytes(forged))
    # the lengths in the header (task: function and stream; result: stream)
    for offset in (4, 16):
        forged = bytearray(task)
        forged[offset: offset + 4] = (2**32 - 1).to_bytes(4, "little")
        with pytest.raises(CorruptMessage, match="4294967295-byte"):
            _wire_records.read_task_record(bytes(forged))
    forged = bytearray(result)
    forged[20:24] = (2**32 - 1).to_bytes(4, "little")
    with pytest.raises(CorruptMessage, match="4294967295-byte stream"):
        _wire_records.read_result_record(bytes(forged), 1)
    forged = bytearray(result)
    forged[12:20] = (-3).to_bytes(8, "little", signed=True)
    with pytest.raises(CorruptMessage, match="offset -3"):
        _wire_records.read_result_record(bytes(forged), 1)
    with pytest.raises(CorruptMessage, match="not a buffer"):
        _wire_records.read_task_record(12345)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.booleans(), st.booleans())
def test_random_bytes_never_read_as_anything_but_a_checked_record(raw, as_task, ints):
    raw = {(True, False): b"sT", (True, True): b"sI", (False, False): b"sR",
           (False, True): b"sJ"}[as_task, ints] + b"\x01" + raw
    try:
        record = _wire_records.read_task_record(raw) if as_task else _wire_records.read_result_record(raw, 1)
    except CorruptMessage:
        return
    if as_task:
        _seq, _kind, (fn, items), meta = record
        stream, buffers = (items, ()) if ints else items
        assert len(fn) + len(stream) + 20 == len(raw) and buffers == ()
        assert meta == (_wire.M_CALL_ITEMS, _wire.M_INT64 if ints else M_PICKLE)
    else:
        _seq, _status, offset, _last, data, meta, _info = record
        stream, buffers = (data, ()) if ints else data
        assert len(stream) + 24 == len(raw) and offset >= 0 and buffers == ()
        assert meta == (_wire.M_INT64 if ints else M_PICKLE)
    if ints:        # the int64s decode, or their length is named
        try:
            assert len(unpack(stream, _wire.M_INT64)) == len(stream) // 8
        except CorruptMessage as exc:
            assert "not a multiple of 8" in str(exc)


@pytest.mark.timeout(60)
def test_a_forged_compact_task_record_fails_that_task_in_the_worker():
    """A compact task record damaged in shared memory (here: forged before it
    is put) fails its task with a clear error; the pool goes on."""
    from shmipc import _engine_dispatch

    original = _engine_dispatch.task_record

    def forged(seq, kind, data, meta):
        record = original(seq, kind, data, meta)
        if type(record) is bytes and b"forge me" in record:
            return record[:-3]                      # three bytes short of what it announces
        if type(record) is bytes and b"bad kind" in record:
            return record[:3] + bytes([3]) + record[4:]     # K_BIG: a stub's kind
        return record

    with shmipc.Pool(1, context="fork") as pool:
        _engine_dispatch.task_record = forged
        try:
            with pytest.raises(RuntimeError, match="could not be read in the worker.*announces"):
                pool.map(echo, ["forge me"])
            with pytest.raises(RuntimeError, match="could not be read in the worker.*of kind 3"):
                pool.map(echo, ["bad kind"])
        finally:
            _engine_dispatch.task_record = original
        assert pool.map(echo, ["fine"] * 3) == ["fine"] * 3
        assert pool.statistics()["worker_deaths"] == 0


def _short_result_record(record):
    compact = _ORIGINAL_RESULT_RECORD(record)
    if type(compact) is bytes and b"damage me" in compact:
        return compact[:-2]                         # two bytes short of what it announces
    return compact


_ORIGINAL_RESULT_RECORD = _wire_records.result_record


@pytest.mark.timeout(60)
def test_a_damaged_compact_result_fails_its_task_and_the_pool_goes_on():
    """A compact result record damaged in shared memory (here: cut short by
    the worker, patched before the pool forks it) fails the task its header
    names with CorruptMessage instead of leaving it waiting."""
    from shmipc import _poolworker

    _poolworker.result_record = _short_result_record
    try:
        with shmipc.Pool(1, context="fork") as pool:
            with pytest.raises(CorruptMessage, match="announces a .*-byte stream"):
                pool.map(echo, ["damage me", "x"])
            assert pool.map(echo, ["fine"] * 3) == ["fine"] * 3
            assert pool.statistics()["worker_deaths"] == 0
    finally:
        _poolworker.result_record = _ORIGINAL_RESULT_RECORD
    with pytest.raises(CorruptMessage) as info:
        _wire_records.read_result_record(_short_result_record((41, 1, 0, True, *_wire.pack_items(["damage me"]), None)), 1)
    assert info.value.seq == 41


def _odd_int64_result_record(record):
    compact = _ORIGINAL_RESULT_RECORD(record)
    if type(compact) is bytes and compact[:2] == b"sJ" and (424242).to_bytes(8, "little") in compact:
        head = _wire_records._RESULT_HEAD
        fields = list(head.unpack_from(compact))
        fields[-1] -= 3                             # a stream 3 bytes short, announced as such
        return head.pack(*fields) + compact[head.size:-3]
    return compact


@pytest.mark.timeout(60)
def test_int64_records_whose_length_is_not_whole_ints_fail_their_task_and_the_pool_goes_on():
    from shmipc import _engine_dispatch, _poolworker

    original_task = _engine_dispatch.task_record

    def odd_task(seq, kind, data, meta):
        record = original_task(seq, kind, data, meta)
        if type(record) is bytes and record[:2] == b"sI" and (525252).to_bytes(8, "little") in record:
            head = _wire_records._TASK_HEAD
            fields = list(head.unpack_from(record))
            fields[-1] -= 5
            return head.pack(*fields) + record[head.size:-5]
        return record

    _poolworker.result_record = _odd_int64_result_record
    try:
        with shmipc.Pool(1, context="fork") as pool:
            with pytest.raises(multiprocessing.pool.MaybeEncodingError, match="5 bytes, not a multiple of 8"):
                pool.map(_identity, [1, 424242, 3])     # (one item a chunk: 8 bytes, 3 cut)
            _engine_dispatch.task_record = odd_task
            with pytest.raises(CorruptMessage, match="3 bytes, not a multiple of 8"):
                pool.map(_identity, [2, 525252])        # (the worker fails that chunk with it)
            _engine_dispatch.task_record = original_task
            assert pool.map(_identity, list(range(5000)), 1000) == list(range(5000))
            assert pool.statistics()["worker_deaths"] == 0
    finally:
        _poolworker.result_record = _ORIGINAL_RESULT_RECORD
        _engine_dispatch.task_record = original_task


@pytest.mark.timeout(30)
def test_a_record_that_is_not_a_task_at_all_is_reported():
    # the ring side of a forged record: a worker's ring holds garbage meta
    arena = Arena(Arena.size_for(rings=[1 << 20]))
    try:
        ring = arena.ring(1 << 20, name="t")
        ring.put((1, 1, ("x", None), (77, 1)))
        seq, kind, data, meta = ring.get(timeout=5)
        with pytest.raises(CorruptMessage, match="unknown value encoding"):
            unpack_task(data, meta)
        with pytest.raises(queue.Empty):
            ring.get_nowait()
    finally:
        arena.close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("payload", [[b"d" * BIG, b"e" * (BIG * 2), b"d" * BIG], [1, 2, 3],
                                     [np.arange(9000.0), "x", b"f" * BIG * 2], [b"small", b"also"]],
                         ids=["blobs", "ints", "mixed", "small bytes"])
def test_detach_copies_a_viewed_task_out_once_into_its_final_form(payload):
    """A worker takes its task as a view of the ring and copies it out with
    detach() before the ring space is reused: the values must not refer to
    the ring any more, and large bytes items come out as their final bytes."""
    arena = Arena(Arena.size_for(rings=[1 << 20]))
    try:
        ring = arena.ring(1 << 20, name="t", producers="one", consumers="many")
        ring.put((5, 1, *pack_task(divmod, payload, True)))
        with ring.get_view(timeout=5) as view:
            record = _wire.detach(view)
        for _ in range(4):          # round the ring: its space, the viewed record's too, is written over
            ring.put((6, 1, b"\xff" * (300 << 10), None))
            ring.get(timeout=5)
        seq, kind, data, meta = record
        assert (seq, kind) == (5, 1)
        func, items = unpack_task(data, meta)
        assert func is divmod and _same(payload, items)
        if isinstance(meta[1], tuple) and meta[1][0] == M_BLOBS:
            assert all(type(x) is bytes for x in data[1])           # already the final objects
    finally:
        arena.close()


@pytest.mark.timeout(30)
def test_detach_copies_any_buffer_of_a_record_it_does_not_know():
    mv = memoryview(b"abc")
    out = _wire.detach((1, (mv, (2, mv)), "x"))
    assert out == (1, (bytearray(b"abc"), (2, bytearray(b"abc"))), "x")
    assert type(out[1][0]) is bytearray and type(out[1][1][1]) is bytearray     # copies, not views
    assert _wire.detach(None) is None and _wire.detach(mv) == bytearray(b"abc")
    # a task record whose meta does not match its data: copied, left for unpack to refuse
    seq, kind, data, meta = _wire.detach((1, 1, (mv,), (_wire.M_CALL_ITEMS, None)))
    assert data == (bytearray(b"abc"),)
    with pytest.raises(CorruptMessage):
        unpack_task(data, meta)


_leaf = st.one_of(st.none(), st.integers(-3, 2**70), st.binary(max_size=40), st.text(max_size=8),
                  st.floats(allow_nan=False), st.builds(memoryview, st.binary(max_size=40)))
_records = st.recursive(_leaf, lambda inner: st.tuples(inner) | st.tuples(inner, inner)
                        | st.tuples(inner, inner, inner) | st.lists(inner, max_size=3), max_leaves=8)
_metas = st.one_of(_records, st.sampled_from([None, M_BYTES, M_BYTEARRAY, _wire.M_CALL_ITEMS]),
                   st.tuples(st.just(M_NDARRAY), st.sampled_from(["<f8", "|u1", "<i4", "|O", "x", 3]), _records),
                   st.tuples(st.just(M_BLOBS), st.one_of(st.none(), st.tuples(st.integers(-2, 4)),
                                                         st.tuples(st.integers(-2, 4), st.integers(-2, 4)))),
                   st.tuples(st.just(_wire.M_CALL_ITEMS), _records))


@pytest.mark.timeout(120)
@settings(max_examples=400, deadline=None)
@given(data=_records, meta=_metas)
def test_forged_records_raise_only_corrupt_message(data, meta):
    """Whatever a forged record holds, unpack and unpack_task raise
    CorruptMessage (never an IndexError, TypeError, ... of their own), except
    for a pickle, which raises whatever unpickling it raises; detach never
    raises."""
    for fn in (unpack, unpack_task):
        try:
            fn(data, meta)
        except CorruptMessage:
            pass
        except Exception:
            # only a pickle stream's own errors may pass through: then meta said pickle
            assert meta == M_PICKLE or (type(meta) is tuple and len(meta) == 2 and meta[0] == _wire.M_CALL_ITEMS)
    _wire.detach((1, 2, data, meta))
    _wire.detach(data)
