"""Pipelines: ordering, backpressure, early close, error policies, worker
death, class and generator stages. Real forked workers and real rings."""
from __future__ import annotations

import contextlib
import itertools
import os
import random
import queue
import signal
import threading
import time

import pytest

import shmipc
from shmipc._pipeline_sched import S_READY, SLOT_WORDS
from shmipc._proc import pid_alive
from shmipc._waiting import QUIET_S
from shmipc.pipeline import Pipeline, PipelineError, RemoteTraceback, StageFailure

from conftest import fork_child, ident, poke, proc_stat, wait_child, wait_until

np = pytest.importorskip("numpy")


# ---------------------------------------------------------------- stage functions
def double(x):
    return x * 2


def add_one(x):
    return x + 1


def jitter(x):
    # finish out of order on purpose
    time.sleep(random.random() * 0.002)
    return x


def fan_out(x):
    """0, 1 or 2 outputs per input."""
    for i in range(x % 3):
        yield (x, i)


def fan_out_again(pair):
    x, i = pair
    for k in range(x % 2 + 1):
        time.sleep(random.random() * 0.0005)
        yield (x, i, k)


def fail_on_multiples_of_seven(x):
    if x % 7 == 0 and x:
        raise ValueError(f"bad item {x}")
    return x


def raise_eof_on_odd(x):
    if x % 2:
        raise EOFError(f"truncated record {x}")
    return x


class Unpicklable(Exception):
    def __init__(self, lock):
        super().__init__("holds a lock")
        self.lock = lock

    def __reduce__(self):
        raise TypeError("no pickling")


def raise_unpicklable(x):
    import threading

    raise Unpicklable(threading.Lock())


class Scale:
    """A class stage: state made in setup, a file written in teardown."""

    def __init__(self):
        self.factor = None
        self.seen = 0

    def setup(self):
        self.factor = 3
        self.pid = os.getpid()

    def process(self, x):
        self.seen += 1
        return (x * self.factor, self.pid)

    def teardown(self):
        with open(os.path.join(os.environ["PIPELINE_TEST_DIR"], f"teardown-{self.pid}"), "w") as f:
            f.write(str(self.seen))


class BadSetup:
    def setup(self):
        raise RuntimeError("no model file")

    def process(self, x):
        return x


def slow_forever(x):
    time.sleep(60)
    return x


def kill_self_on(x):
    """SIGKILL its own worker on item 7, every time."""
    if x == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def kill_self_once_on(x):
    """SIGKILL its own worker on item 7, the first time only (a marker file)."""
    if x == 7:
        marker = os.path.join(os.environ["PIPELINE_TEST_DIR"], "killed-once")
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return x
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def park_on_three(x):
    """On item 3 write our pid for the test to find, then wait to be killed."""
    if x == 3:
        path = os.path.join(os.environ["PIPELINE_TEST_DIR"], "parked")
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(path + ".tmp", path)
        time.sleep(60)
    return x


def invert(a):
    return 255 - a


def row_sums(a):
    return a.sum(axis=1, dtype=np.int64)


@pytest.fixture
def test_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_TEST_DIR", str(tmp_path))
    return tmp_path


# ---------------------------------------------------------------- ordering
@pytest.mark.timeout(60)
def test_two_stages_keep_source_order(no_leaks):
    with Pipeline(range(2000)) as p:
        p.stage(jitter, workers=3)
        p.stage(double, workers=2)
        out = list(p.results())
    assert out == [2 * x for x in range(2000)]
    assert p.closed


@pytest.mark.timeout(60)
def test_unordered_stage_gives_every_result_once(no_leaks):
    with shmipc.Pipeline(range(1000)) as p:
        p.stage(jitter, workers=3, ordered=False)
        p.stage(add_one, workers=1)
        out = list(p.results())
    assert sorted(out) == [x + 1 for x in range(1000)]


@pytest.mark.timeout(60)
def test_iterating_the_pipeline_and_chaining_stages(no_leaks):
    with Pipeline([1, 2, 3]).stage(double).stage(add_one).stage(lambda x: -x) as p:
        assert list(p) == [-3, -5, -7]


@pytest.mark.timeout(60)
def test_empty_source(no_leaks):
    with Pipeline([]) as p:
        p.stage(double, workers=2)
        assert list(p.results()) == []


# ---------------------------------------------------------------- generators
@pytest.mark.timeout(60)
def test_generator_stages_fan_out_in_order(no_leaks):
    with Pipeline(range(400)) as p:
        p.stage(fan_out, workers=2)
        p.stage(fan_out_again, workers=3)
        out = list(p.results())
    expected = [(x, i, k) for x in range(400) for i in range(x % 3) for k in range(x % 2 + 1)]
    assert out == expected


# ---------------------------------------------------------------- numpy
@pytest.mark.timeout(60)
def test_numpy_arrays_between_stages(no_leaks):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(64, 256), dtype=np.uint8) for _ in range(200)]
    with Pipeline(images) as p:
        p.stage(invert, workers=2)
        p.stage(row_sums, workers=2)
        out = list(p.results())
    assert len(out) == len(images)
    for img, sums in zip(images, out):
        assert sums.dtype == np.int64
        np.testing.assert_array_equal(sums, (255 - img).sum(axis=1, dtype=np.int64))


def identity(x):
    return x


def scale_in_place(a):
    a *= 2
    return a


def _values():
    rng = np.random.default_rng(2)
    return [
        b"small", b"x" * 100_000, bytearray(b"y" * 50_000), "text", 12, 3.5, None, True,
        {"k": [1, 2]}, np.float32(1.5), np.array(7), np.zeros((0, 3)),
        rng.random((40, 30)), rng.random((40, 30))[:, ::3],          # non-contiguous
        np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),    # structured
        np.array([1, "a", None], dtype=object),
        rng.integers(0, 2**40, size=(5, 5, 5)).astype(">i8"),     # big-endian
    ]


def _same(a, b):
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and (a == b).all())
    return type(a) is type(b) and a == b


@pytest.mark.timeout(60)
@pytest.mark.parametrize("zero_copy", [False, True])
def test_values_of_every_kind_arrive_unchanged(zero_copy, no_leaks):
    values = _values()
    with Pipeline(values) as p:
        p.stage(identity, workers=2, zero_copy=zero_copy)
        p.stage(identity, workers=1, zero_copy=zero_copy)
        out = list(p.results())
    assert len(out) == len(values)
    for a, b in zip(values, out):
        assert _same(a, b), (a, b)


@pytest.mark.timeout(60)
def test_inputs_are_private_copies_unless_zero_copy(no_leaks):
    arrays = [np.arange(10) for _ in range(5)]
    with Pipeline(arrays) as p:
        p.stage(scale_in_place, workers=2)
        out = list(p.results())
    assert all((o == np.arange(10) * 2).all() for o in out)
    with Pipeline(arrays, on_error="collect") as p:
        p.stage(scale_in_place, workers=2, zero_copy=True)
        assert list(p.results()) == []
    assert len(p.errors) == 5
    assert all("read-only" in str(f.exception) for f in p.errors)


# ---------------------------------------------------------------- class stages
@pytest.mark.timeout(60)
def test_class_stage_setup_process_teardown(test_dir, no_leaks):
    with Pipeline(range(300)) as p:
        p.stage(Scale, workers=2)
        out = list(p.results())
    assert [v for v, _ in out] == [3 * x for x in range(300)]
    pids = {pid for _, pid in out}
    # teardown ran in every worker that ran, and they saw every item between them
    files = sorted(test_dir.glob("teardown-*"))
    assert {int(f.name.split("-")[1]) for f in files} >= pids
    assert sum(int(f.read_text()) for f in files) == 300


@pytest.mark.timeout(60)
def test_failing_setup_raises_pipeline_error(no_leaks):
    with Pipeline(range(10)) as p:
        p.stage(BadSetup, workers=2)
        with pytest.raises(PipelineError, match="no model file") as info:
            list(p.results())
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "BadSetup" in str(info.value.__cause__) or "setup" in str(info.value.__cause__)


class ExitInSetup:
    def setup(self):
        os._exit(7)          # no exception to send back: the worker just dies

    def process(self, x):
        return x


@pytest.mark.timeout(60)
def test_workers_dying_in_setup_stop_the_pipeline(no_leaks):
    from shmipc._pipeline_crew import MAX_START_DEATHS

    with Pipeline(range(10)) as p:
        p.stage(ExitInSetup, workers=1)
        with pytest.raises(PipelineError, match="keep dying before their setup finished"):
            list(p.results())
        deaths = p.stats()["stages"][0]["deaths"]
    assert deaths == MAX_START_DEATHS


def held_in_setup(flag):
    """A stage class whose setup waits until `flag` exists (a model loading)."""
    class Held:
        def setup(self):
            while not os.path.exists(flag):
                time.sleep(0.005)

        def process(self, x):
            return x * 2

    return Held


@pytest.mark.timeout(90)
def test_outside_kills_during_setup_do_not_stop_the_pipeline(no_leaks, tmp_path):
    """F7 (Pipeline): SIGKILLs from outside landing on workers in setup are
    not the stage's fault: they are replaced, however many there are, and
    the run completes once the kills stop."""
    import threading

    from shmipc._pipeline_crew import MAX_START_DEATHS

    flag = str(tmp_path / "go")
    killed: set[int] = set()
    want = MAX_START_DEATHS + 4
    with Pipeline(range(20)) as p:
        p.stage(held_in_setup(flag), workers=2, name="held")
        it = p.results()                # the workers start (and wait in setup)

        def killer():
            deadline = time.monotonic() + 60
            try:
                while len(killed) < want and time.monotonic() < deadline:
                    for pid in p.worker_pids()["held"]:
                        if pid not in killed and len(killed) < want:
                            os.kill(pid, signal.SIGKILL)
                            killed.add(pid)
                    time.sleep(0.005)       # replacements come from the parent's loop
            finally:
                open(flag, "w").close()

        t = threading.Thread(target=killer)
        t.start()
        try:
            out = list(it)
        finally:
            t.join(70)
        assert len(killed) == want
        assert out == [2 * x for x in range(20)]
        # every kill landed in setup (the flag is made after the last); the
        # run may end before the parent notices the last worker killed while
        # the other, started after it, did all the items: at most one of the
        # two workers' deaths goes uncounted
        assert p.stats()["stages"][0]["deaths"] >= want - 1


@pytest.mark.timeout(120)
def test_close_from_another_thread_during_results_raises_one_clear_error(no_leaks):
    """F3: close() from another thread while results() runs: the loop raises
    PipelineError naming the pipeline (never a raw error about an internal
    ring, never a silent end that looks like an exhausted source)."""
    import threading

    outcomes = []
    for i in range(12):
        p = Pipeline(range(10 ** 7)).stage(identity, 2, name="ident")
        first = threading.Event()
        box = {}

        def consume():
            n = 0
            try:
                for _ in p.results():
                    n += 1
                    if n == 1 + 50 * (i % 4):
                        first.set()
                box["r"] = f"ended silently after {n}"
            except Exception as exc:
                box["r"] = exc
            finally:
                first.set()

        t = threading.Thread(target=consume)
        t.start()
        assert first.wait(30)
        p.close()
        t.join(30)
        assert not t.is_alive()
        outcomes.append(box["r"])
    for r in outcomes:
        assert isinstance(r, PipelineError), outcomes
        assert "closed while results() was running" in str(r) and "ident" in str(r), str(r)
        assert r.__cause__ is None and (r.__context__ is None or r.__suppress_context__)  # no ring error shown


@pytest.mark.timeout(60)
def test_close_in_the_loop_body_then_next_raises(no_leaks):
    """The same rule in one thread: close() inside the loop, then asking for
    more, raises; breaking out after close() is a normal end."""
    with Pipeline(range(1000)).stage(identity) as p:
        it = p.results()
        assert next(it) == 0
        p.close()
        with pytest.raises(PipelineError, match="closed while results"):
            next(it)
    with Pipeline(range(1000)).stage(identity) as p:
        for x in p.results():
            p.close()
            break
    assert p.closed


# ---------------------------------------------------------------- backpressure
@pytest.mark.timeout(60)
def test_infinite_source_is_read_only_as_fast_as_results_drain(no_leaks):
    read = []

    def source():
        for i in itertools.count():
            read.append(i)
            yield np.full(1024, i % 251, dtype=np.uint8)

    with Pipeline(source(), max_inflight=64, ring_capacity=1 << 16) as p:
        p.stage(invert, workers=2)
        results = p.results()
        for n, arr in enumerate(results, 1):
            assert arr[0] == 255 - ((n - 1) % 251)
            if n % 100 == 0:
                # read but not yielded: at most max_inflight (plus the one being yielded)
                assert len(read) - n <= 64 + 1, (len(read), n)
            if n == 2000:
                break
        # (no "stalled consumer" check here: the source is read by this thread,
        # inside results(), so nothing can read it while we do not iterate)
        stats = p.stats()
    assert stats["fed"] <= 2000 + 65
    assert p.closed


# ---------------------------------------------------------------- closing early
class _StopHere(Exception):
    pass


@pytest.mark.timeout(60)
def test_close_stops_busy_workers_promptly(no_leaks):
    holder = {}

    def source():
        yield from range(10)
        # both slow workers have each taken an item (and sit in time.sleep(60)):
        # then the source fails, which closes the pipeline
        p = holder["p"]
        deadline = time.monotonic() + 20
        while p.stats()["stages"][1]["items_taken"] < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        holder["busy"] = p.stats()["stages"][1]["items_taken"]
        holder["pids"] = [pid for pids in p.worker_pids().values() for pid in pids]
        holder["t0"] = time.monotonic()
        raise _StopHere

    p = holder["p"] = Pipeline(source(), stop_timeout=0.5)
    p.stage(add_one, workers=1)
    p.stage(slow_forever, workers=2, ordered=False)
    it = p.results()
    with pytest.raises(_StopHere):
        next(it)
    assert holder["busy"] >= 2
    assert len(holder["pids"]) == 3
    assert time.monotonic() - holder["t0"] < 5
    assert not any(pid_alive(pid) for pid in holder["pids"])
    assert p.closed
    with pytest.raises(StopIteration):
        next(it)


@pytest.mark.timeout(60)
def test_break_out_of_loop_closes_pipeline(no_leaks):
    with Pipeline(itertools.count(), stop_timeout=0.5) as p:
        p.stage(double, workers=2)
        t0 = time.monotonic()
        for n, _ in enumerate(p.results()):
            if n == 500:
                break
        pids = [pid for pids in p.worker_pids().values() for pid in pids]
    assert p.closed
    assert time.monotonic() - t0 < 10
    assert not any(pid_alive(pid) for pid in pids)


@pytest.mark.timeout(60)
def test_results_twice_and_stage_after_start_are_errors(no_leaks):
    with Pipeline(range(3)) as p:
        p.stage(double)
        it = p.results()
        with pytest.raises(ValueError, match="only once"):
            p.results()
        with pytest.raises(ValueError, match="before results"):
            p.stage(add_one)
        assert list(it) == [0, 2, 4]


# ---------------------------------------------------------------- errors
@pytest.mark.timeout(60)
def test_on_error_raise_re_raises_in_order_with_traceback(no_leaks):
    got = []
    with Pipeline(range(1, 100)) as p:
        p.stage(fail_on_multiples_of_seven, workers=3)
        with pytest.raises(ValueError, match="bad item 7") as info:
            for x in p.results():
                got.append(x)
    assert got == [1, 2, 3, 4, 5, 6]         # everything before the failing item
    assert "(item 6 in stage 'fail_on_multiples_of_seven')" in info.value.__notes__
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_on_multiples_of_seven" in str(info.value.__cause__)
    assert p.closed


@pytest.mark.timeout(60)
def test_on_error_skip(no_leaks):
    with Pipeline(range(1, 100), on_error="skip") as p:
        p.stage(fail_on_multiples_of_seven, workers=2)
        p.stage(add_one, workers=1)
        out = list(p.results())
    assert out == [x + 1 for x in range(1, 100) if x % 7]
    assert p.errors == []


@pytest.mark.timeout(60)
def test_on_error_collect_per_stage(no_leaks):
    with Pipeline(range(1, 50)) as p:
        p.stage(fail_on_multiples_of_seven, workers=2, on_error="collect")
        out = list(p.results())
    assert out == [x for x in range(1, 50) if x % 7]
    assert sorted(f.seq for f in p.errors) == [x - 1 for x in range(7, 50, 7)]
    assert all(isinstance(f, StageFailure) for f in p.errors)
    assert all(isinstance(f.exception, ValueError) for f in p.errors)
    assert all(f.stage == "fail_on_multiples_of_seven" for f in p.errors)
    assert all("bad item" in f.traceback for f in p.errors)


@pytest.mark.timeout(60)
def test_eof_error_from_a_stage_is_an_item_error_not_a_shutdown(no_leaks):
    with Pipeline(range(10), on_error="collect") as p:
        p.stage(raise_eof_on_odd, workers=2)
        out = list(p.results())
        deaths = p.stats()["stages"][0]["deaths"]
    assert out == [0, 2, 4, 6, 8]
    assert sorted(f.seq for f in p.errors) == [1, 3, 5, 7, 9]
    assert all(isinstance(f.exception, EOFError) for f in p.errors)
    assert deaths == 0


@pytest.mark.timeout(60)
def test_unpicklable_exception_comes_back_as_text(no_leaks):
    with Pipeline(range(3)) as p:
        p.stage(raise_unpicklable)
        with pytest.raises(PipelineError, match="Unpicklable") as info:
            list(p.results())
    assert "raise_unpicklable" in str(info.value.__cause__)


@pytest.mark.timeout(60)
def test_source_exception_propagates_and_closes(no_leaks):
    def source():
        yield 1
        yield 2
        raise KeyError("source broke")

    with Pipeline(source()) as p:
        p.stage(double)
        with pytest.raises(KeyError, match="source broke"):
            list(p.results())
    assert p.closed


@pytest.mark.timeout(60)
def test_message_too_large_names_the_source_item(no_leaks):
    big = b"x" * (1 << 16)
    with Pipeline([b"ok", big], ring_capacity=1 << 14) as p:
        p.stage(len)
        with pytest.raises(shmipc.MessageTooLarge) as info:
            list(p.results())
    assert "source item 1" in "".join(getattr(info.value, "__notes__", []))


@pytest.mark.timeout(60)
def test_unpicklable_source_item_names_the_item(no_leaks):
    import threading

    with Pipeline([1, 2, threading.Lock()]) as p:
        p.stage(double)
        with pytest.raises(TypeError, match="pickle") as info:
            list(p.results())
    assert "source item 2" in "".join(getattr(info.value, "__notes__", []))


def test_bad_arguments_name_the_values():
    with pytest.raises(TypeError, match="iterable"):
        Pipeline(5)
    with pytest.raises(ValueError, match="on_error"):
        Pipeline([], on_error="ignore")
    with pytest.raises(ValueError, match="ring_capacity.*1000"):
        Pipeline([], ring_capacity=1000)
    p = Pipeline([])
    with pytest.raises(ValueError, match="workers.*0"):
        p.stage(double, workers=0)
    with pytest.raises(ValueError, match="retries.*-1"):
        p.stage(double, retries=-1)
    with pytest.raises(TypeError, match="callable"):
        p.stage(42)
    with pytest.raises(ValueError, match="at least one stage"):
        p.results()
    # (10**9 used to be accepted, then died in results() with a MemoryError)
    p.stage(double, workers=4000)
    with pytest.raises(ValueError, match="workers=97 would make 4097 .* at most 4096"):
        p.stage(double, workers=97)
    with pytest.raises(ValueError, match="at most 4096"):
        p.stage(double, workers=10**9)
    p.close()


@pytest.mark.timeout(60)
def test_a_range_too_long_for_len_is_a_source_like_any_other(no_leaks):
    """range(10**20) has no len() (OverflowError), which the pipeline took
    for a broken source; it is an iterable like an infinite generator."""
    with Pipeline(range(10**20)) as p:
        p.stage(double)
        out = []
        for x in p.results():
            out.append(x)
            if len(out) == 5:
                break
    assert out == [0, 2, 4, 6, 8]


# ---------------------------------------------------------------- worker death
@pytest.mark.timeout(60)
def test_worker_killed_mid_item_fails_that_item_and_is_replaced(no_leaks):
    with Pipeline(range(30), on_error="collect") as p:
        p.stage(kill_self_on, workers=2)
        p.stage(add_one, workers=1)
        out = list(p.results())
        deaths = p.stats()["stages"][0]["deaths"]
    assert out == [x + 1 for x in range(30) if x != 7]
    assert deaths == 1
    assert len(p.errors) == 1
    err = p.errors[0]
    assert err.seq == 7
    assert isinstance(err.exception, shmipc.WorkerLost)
    assert err.exception.exitcode == -signal.SIGKILL


@pytest.mark.timeout(60)
def test_worker_killed_mid_item_raises_worker_lost(no_leaks):
    got = []
    with Pipeline(range(30)) as p:
        p.stage(kill_self_on, workers=2)
        with pytest.raises(shmipc.WorkerLost, match="SIGKILL"):
            for x in p.results():
                got.append(x)
    assert got == list(range(7))


@pytest.mark.timeout(60)
def test_retries_rerun_the_item_of_a_killed_worker(test_dir, no_leaks):
    with Pipeline(range(30)) as p:
        p.stage(double, workers=1)
        p.stage(kill_self_once_on, workers=2, retries=1)
        out = list(p.results())
        deaths = p.stats()["stages"][1]["deaths"]
    assert out == [x for x in range(0, 60, 2)]          # item 7 is 14 after double: not killed
    assert deaths == 0
    with Pipeline(range(30)) as p:
        p.stage(kill_self_once_on, workers=2, retries=1)
        p.stage(double, workers=1)
        out = list(p.results())
        deaths = p.stats()["stages"][0]["deaths"]
    assert out == [2 * x for x in range(30)]
    assert deaths == 1
    assert p.errors == []


@pytest.mark.timeout(60)
def test_sigkill_from_outside_mid_item(test_dir, no_leaks):
    parked = test_dir / "parked"
    killed = []

    def source():
        for i in range(20):
            if i == 10:
                # the worker holding item 3 parks; kill it from here (the parent)
                deadline = time.monotonic() + 20
                while not parked.exists() and time.monotonic() < deadline:
                    time.sleep(0.01)
                pid = int(parked.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            yield i

    with Pipeline(source(), on_error="collect") as p:
        p.stage(park_on_three, workers=3)
        out = list(p.results())
    assert out == [x for x in range(20) if x != 3]
    assert [f.seq for f in p.errors] == [3]
    assert p.errors[0].exception.pid == killed[0]


_PIPELINE_UNDER_TEST = None


def die_unseen_on_five(x):
    """Simulate a worker SIGKILLed between taking item 5 and writing its slot:
    mark our slot idle again, then die, so the parent cannot tell what was lost."""
    if x == 5:
        from shmipc._pipeline_sched import S_BUSY, S_READY, SLOT_WORDS

        slots = _PIPELINE_UNDER_TEST._slots.words      # the slot table (shmipc._slots)
        for k in range(len(slots) // SLOT_WORDS):
            if slots[k * SLOT_WORDS] == S_BUSY and slots[k * SLOT_WORDS + 1] == 5:
                slots[k * SLOT_WORDS] = S_READY
        os.kill(os.getpid(), signal.SIGKILL)
    return x


@pytest.mark.timeout(60)
def test_item_lost_without_a_trace_fails_instead_of_hanging(no_leaks):
    global _PIPELINE_UNDER_TEST
    with Pipeline(range(10), on_error="collect") as p:
        p.stage(die_unseen_on_five, workers=2)
        _PIPELINE_UNDER_TEST = p          # inherited by the forked workers
        t0 = time.monotonic()
        out = list(p.results())
    _PIPELINE_UNDER_TEST = None
    assert out == [x for x in range(10) if x != 5]
    assert [f.seq for f in p.errors] == [5]
    assert isinstance(p.errors[0].exception, shmipc.WorkerLost)
    assert time.monotonic() - t0 < 15


@pytest.mark.timeout(60)
def test_item_lost_without_a_trace_does_not_stall_an_infinite_source(no_leaks):
    global _PIPELINE_UNDER_TEST
    with Pipeline(itertools.count(), on_error="collect", max_inflight=8) as p:
        p.stage(die_unseen_on_five, workers=2)
        _PIPELINE_UNDER_TEST = p
        out = []
        for x in p.results():
            out.append(x)
            if len(out) == 50:
                break
    _PIPELINE_UNDER_TEST = None
    assert out == [x for x in range(51) if x != 5]
    assert [f.seq for f in p.errors] == [5]


def _fill(ring) -> int:
    """Fill `ring` with filler messages until a put would block; returns how many."""
    n = 0
    while True:
        try:
            ring.put_nowait(b"filler" * 100)
        except queue.Full:
            return n
        n += 1


_GATE = None             # a file: while it exists, gated_double waits (inherited by the workers)


def gated_double(x):
    while _GATE is not None and os.path.exists(_GATE):
        time.sleep(0.001)
    return 2 * x


@contextlib.contextmanager
def _gate_shut():
    """gated_double waits while the block runs."""
    with open(_GATE, "w"):
        pass
    try:
        yield
    finally:
        os.unlink(_GATE)


def _drain(ring, n: int) -> None:
    """Take the `n` filler messages back out of a stash ring that a blocked
    worker waits to put into. Call it with the gate shut (_gate_shut), from
    before anything lets a worker go: a worker let go must not finish its
    item, and take the first message of its stash (a filler, still), before
    all of them are out."""
    for _ in range(n):
        assert ring.get(timeout=10) == b"filler" * 100


@pytest.fixture
def gate(tmp_path):
    global _GATE
    _GATE = str(tmp_path / "gate")
    yield
    _GATE = None


def _in_the_window(p, j: int) -> bool:
    """Worker j of stage 0 has taken an item and is blocked writing its copy
    to its stash ring: between the take and its slot write."""
    s = p._stages[0]
    return bool(s.stashes) and (s.stashes[j].stats(recover=False)["producers_waiting"] >= 1
            and p._slots.words[(s.slot_base + j) * SLOT_WORDS] == S_READY)


class _Helper(threading.Thread):
    """Runs `fn` beside the test's results() loop over pipeline `p`; if it
    fails, closes `p` (so results() ends at once) and check() re-raises."""

    def __init__(self, fn, p):
        super().__init__(daemon=True)
        self.fn, self.p, self.exc = fn, p, None

    def run(self):
        try:
            self.fn()
        except BaseException as exc:     # noqa: BLE001 (re-raised in join)
            self.exc = exc
            self.p.close()

    def check(self):
        assert not self.is_alive(), "the helper thread did not finish"
        if self.exc is not None:
            raise self.exc


def _results_beside(p, attack) -> tuple[list, _Helper]:
    """list(p.results()) with `attack` running in a helper thread; if the
    helper failed (and so closed p), its error is raised, not the close's."""
    helper = _Helper(attack, p)
    helper.start()
    try:
        out = list(p.results())
    except PipelineError:
        helper.join(30)
        helper.check()
        raise
    helper.join(30)
    return out, helper


@pytest.mark.timeout(60)
def test_worker_killed_between_taking_an_item_and_writing_it_down_gets_it_retried(no_leaks, gate):
    # The worker's stash ring is filled first, so the worker that takes item 0
    # blocks copying it there: after the take, before its slot says it holds
    # the item. SIGKILLed there, it leaves the item claimed in the stage's
    # ring, and the parent takes it back and retries it (before: lost without
    # a trace, failed with WorkerLost once the pipeline had been quiet for 1 s).
    state = {}

    def source():
        s = p._stages[0]
        state["filler"] = _fill(s.stashes[0])
        yield from range(20)

    def attack():
        s = p._stages[0]
        wait_until(lambda: _in_the_window(p, 0), what="worker 0 blocked between take and slot write")
        pid = s.pids[0]
        # (shut from the kill on: the worker started in its place may get the
        # retried item, stash it in the room the parent made, and finish it)
        with _gate_shut():
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: s.deaths == 1 and s.ring.stats(recover=False)["recoveries"],
                       what="the parent took the item back")
            _drain(s.stashes[0], state["filler"] - 1)   # (the parent read one as the dead worker's copy)
        stats = s.ring.stats()
        state["killed"], state["ring"] = pid, (stats["recoveries"], stats["lost"])

    with Pipeline(source(), retries=1, on_error="collect") as p:
        p.stage(gated_double, workers=1, ring_capacity=1 << 16)
        out, helper = _results_beside(p, attack)
    assert p.errors == []
    assert out == [2 * x for x in range(20)]
    helper.check()
    assert p._sched.retried == 1
    assert state["ring"] == (1, 0)      # (recoveries, lost): handed back, not lost


@pytest.mark.timeout(60)
def test_a_death_is_settled_later_while_a_live_process_holds_the_stage_rings_consumer_side(no_leaks, gate):
    # As the test above, but when the worker dies its stage ring's consumer
    # side is held by a live process (its lock word names one): the parent
    # cannot look at the ring's claims, so it leaves the death unsettled
    # (no retry, no WorkerLost) and settles it at a later reap, once the
    # consumer side is free: the item is then retried.
    blocker = fork_child(time.sleep, 60)
    state = {}

    def source():
        state["filler"] = _fill(p._stages[0].stashes[0])
        yield from range(20)

    def attack():
        s = p._stages[0]
        wait_until(lambda: _in_the_window(p, 0), what="worker 0 blocked between take and slot write")
        poke(s.ring, "cons.lock", "<Q", ident(blocker))
        with _gate_shut():                          # (as in the test above)
            os.kill(s.pids[0], signal.SIGKILL)
            wait_until(lambda: s.deaths == 1 and p._unsettled, what="the death left unsettled")
            state["unsettled"] = (p._sched.retried, len(p.errors))     # nothing decided yet
            _drain(s.stashes[0], state["filler"] - 1)   # (the parent read one as the dead worker's copy)
        poke(s.ring, "cons.lock", "<Q", 0)
        wait_until(lambda: p._sched.retried == 1, what="the item retried once the ring could be read")

    try:
        with Pipeline(source(), retries=1, on_error="collect") as p:
            p.stage(gated_double, workers=1, ring_capacity=1 << 16)
            out, helper = _results_beside(p, attack)
    finally:
        os.kill(blocker, signal.SIGKILL)
        wait_child(blocker)
    assert p.errors == []
    assert out == [2 * x for x in range(20)]
    helper.check()
    assert state["unsettled"] == (0, 0)


@pytest.mark.timeout(60)
def test_live_worker_between_take_and_slot_write_is_not_failed_when_another_dies_idle(no_leaks, gate):
    # Worker 0 is held in the same window (its stash ring full) for longer than
    # the parent's quiet time, while worker 1, idle, is killed. Before, the
    # parent saw an idle death, every ring empty and no worker busy, and failed
    # worker 0's item with WorkerLost although worker 0 still had it; now the
    # record worker 0 holds claimed keeps the pipeline from looking quiet.
    # Both stash rings start full, so each worker blocks on its first item (else
    # worker 1 may take all ten before worker 0 starts); worker 1 is let go first.
    state = {}

    def source():
        state["filler"] = [_fill(ring) for ring in p._stages[0].stashes]
        yield from range(10)

    def attack():
        s = p._stages[0]
        wait_until(lambda: _in_the_window(p, 0) and _in_the_window(p, 1), what="both workers in the window")
        with _gate_shut():
            _drain(s.stashes[1], state["filler"][1])
        base1 = (s.slot_base + 1) * SLOT_WORDS
        wait_until(lambda: s.ring.qsize() == 0
                   and p._slots.words[base1] == S_READY and p._sched.ncomplete == 9,
                   what="worker 0 in the window, the other items done, worker 1 idle")
        os.kill(s.pids[1], signal.SIGKILL)
        wait_until(lambda: s.deaths == 1, what="the parent noticed the death")
        reaped = time.monotonic()
        # the time under test: the parent's quiet rule acted after QUIET_S
        wait_until(lambda: time.monotonic() > reaped + QUIET_S + 0.5 or p.errors,
                   what="the quiet time passed")
        with _gate_shut():
            _drain(s.stashes[0], state["filler"][0])
        state["done"] = True

    with Pipeline(source(), on_error="collect", retries=1) as p:
        p.stage(gated_double, workers=2, ring_capacity=1 << 16)
        out, helper = _results_beside(p, attack)
    assert p.errors == []
    assert out == [2 * x for x in range(10)]
    helper.check()
    assert state.get("done")


def yield_three_but_die_on_four(x):
    for i in range(3):
        if x == 4 and i == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        yield (x, i)


@pytest.mark.timeout(60)
def test_generator_worker_killed_after_some_outputs(no_leaks):
    with Pipeline(range(8), on_error="collect", retries=2) as p:
        p.stage(yield_three_but_die_on_four, workers=2)
        p.stage(identity, workers=2)
        out = list(p.results())
    # the output sent before the death stays ((4, 1) was still held back: a
    # generator stage sends each output when the next one exists); the item is
    # not retried (that would send (4, 0) twice) and fails with WorkerLost
    expected = [(x, i) for x in range(8) for i in range(3) if not (x == 4 and i >= 1)]
    assert out == expected
    assert [f.seq for f in p.errors] == [4]
    assert isinstance(p.errors[0].exception, shmipc.WorkerLost)


@pytest.mark.timeout(60)
def test_retried_item_in_a_later_stage_with_zero_copy(test_dir, no_leaks):
    arrays = [np.full(1000, i, dtype=np.int32) for i in range(20)]
    with Pipeline(arrays) as p:
        p.stage(identity, workers=1)
        p.stage(kill_self_once_on_array_seven, workers=2, retries=1, zero_copy=True)
        out = list(p.results())
        deaths = p.stats()["stages"][1]["deaths"]
    assert deaths == 1
    assert [int(a[0]) for a in out] == list(range(20))
    assert all((a == a[0]).all() and a.shape == (1000,) for a in out)


def kill_self_once_on_array_seven(a):
    if a[0] == 7:
        kill_self_once_on(7)
    return a


class Offset:
    """A stage given as an object: each worker gets its own (forked) copy."""

    def __init__(self, offset):
        self.offset = offset

    def process(self, x):
        return x + self.offset


@pytest.mark.timeout(60)
def test_object_with_process_as_stage(no_leaks):
    with Pipeline(range(10)) as p:
        p.stage(Offset(100), workers=2)
        assert list(p.results()) == list(range(100, 110))


# ---------------------------------------------------------------- signals and parents
def _run_slow_pipeline_until_interrupted(pid_file: str) -> None:
    holder = {}

    def source():
        yield from range(2)
        # both workers have taken an item (and sit in slow_forever): only then
        # say so, so that the Ctrl-C lands on busy workers
        p = holder["p"]
        deadline = time.monotonic() + 20
        while p.stats()["stages"][0]["items_taken"] < 2:
            if time.monotonic() > deadline:
                os._exit(3)
            time.sleep(0.005)
        with open(pid_file + ".tmp", "w") as f:
            f.write(" ".join(str(pid) for pids in p.worker_pids().values() for pid in pids))
        os.rename(pid_file + ".tmp", pid_file)
        yield from itertools.count(2)

    try:
        with Pipeline(source(), stop_timeout=0.5) as p:
            holder["p"] = p
            p.stage(slow_forever, workers=2)
            for _ in p.results():
                pass
    except KeyboardInterrupt:
        os._exit(42)
    os._exit(1)


@pytest.mark.timeout(60)
def test_ctrl_c_in_parent_stops_everything(tmp_path):
    pid_file = str(tmp_path / "pids")
    child = fork_child(_run_slow_pipeline_until_interrupted, pid_file)
    deadline = time.monotonic() + 20
    while not os.path.exists(pid_file) or not open(pid_file).read():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    workers = [int(x) for x in open(pid_file).read().split()]       # written once both are busy
    os.kill(child, signal.SIGINT)
    assert wait_child(child, timeout=20) == 42
    deadline = time.monotonic() + 5
    while any(pid_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(pid_alive(pid) for pid in workers)


def _run_pipeline_forever(pid_file: str) -> None:
    with Pipeline(itertools.count()) as p:
        p.stage(slow_forever, workers=2)
        it = p.results()
        with open(pid_file, "w") as f:
            f.write(" ".join(str(pid) for pids in p.worker_pids().values() for pid in pids))
        for _ in it:
            pass


@pytest.mark.timeout(60)
def test_workers_die_with_the_parent(tmp_path):
    pid_file = str(tmp_path / "pids")
    child = fork_child(_run_pipeline_forever, pid_file)
    deadline = time.monotonic() + 20
    while not os.path.exists(pid_file) or not open(pid_file).read():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    workers = [int(x) for x in open(pid_file).read().split()]
    os.kill(child, signal.SIGKILL)
    assert wait_child(child, timeout=10) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(pid_alive(pid) for pid in workers)


@pytest.mark.timeout(60)
def test_pipeline_run_from_a_thread(no_leaks):
    import threading

    got = {}

    def run():
        # workers started from a thread other than the main one (their
        # parent-death signal would follow that thread) work and stop as usual
        with Pipeline(range(200)) as p:
            p.stage(double, workers=2)
            got["out"] = list(p.results())

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive()
    assert got["out"] == [2 * x for x in range(200)]


# ---------------------------------------------------------------- progress
@pytest.mark.timeout(60)
def test_progress_shows_rate_and_ring_fill(capsys, monkeypatch, no_leaks):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):          # the plain stderr line, to read it back
        if name == "tqdm":
            raise ImportError("hidden for the test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    with Pipeline(range(500)) as p:
        p.stage(double, workers=2)
        p.stage(add_one, workers=1)
        out = list(p.results(progress=True, desc="test"))
    assert out == [2 * x + 1 for x in range(500)]
    err = capsys.readouterr().err
    assert "test: 500/500" in err
    assert "it/s" in err
    assert "double=" in err and "add_one=" in err and "out=" in err


# ---------------------------------------------------------------- hardening (issue 9)
class DieRightAfterSending:
    """A stage that SIGKILLs its own worker at the first line the worker runs
    after its result for item `victim` was committed to the output ring (the
    instant between delivering a result and marking its slot done). A trace
    function watches the ring's message count; no timing involved."""

    victim = 10                   # item 5, doubled by the stage before

    def setup(self):
        import sys

        out = _PIPELINE_UNDER_TEST._out
        self.armed = None

        def tracer(frame, event, arg):
            if self.armed is not None and out.stats()["messages_in"] > self.armed:
                os.kill(os.getpid(), signal.SIGKILL)
            return tracer

        frame = sys._getframe().f_back
        while frame is not None:          # the worker loop's frames, already running
            frame.f_trace = tracer
            frame = frame.f_back
        sys.settrace(tracer)

    def process(self, x):
        if x == self.victim:
            self.armed = _PIPELINE_UNDER_TEST._out.stats()["messages_in"]
        return x * 10


@pytest.mark.timeout(60)
def test_worker_killed_after_delivering_its_result_settles_the_item_once(no_leaks):
    global _PIPELINE_UNDER_TEST
    with Pipeline(range(12), on_error="collect") as p:
        p.stage(double, workers=1)
        p.stage(DieRightAfterSending, workers=1)
        _PIPELINE_UNDER_TEST = p          # inherited by the forked workers
        out = list(p.results())
        stats = p.stats()
    _PIPELINE_UNDER_TEST = None
    # the result was delivered before the death: it is yielded, once, and the
    # item is not also failed; no result is lost from the end of the run
    assert stats["stages"][1]["deaths"] == 1
    assert out == [20 * x for x in range(12)]
    assert p.errors == []
    assert stats["completed"] == 12


class DieRightAfterForwarding(DieRightAfterSending):
    """The same instant in a middle stage: the output went to the next stage's ring."""

    victim = 5

    def setup(self):
        import sys

        nxt = _PIPELINE_UNDER_TEST._stages[1].ring
        self.armed = None

        def tracer(frame, event, arg):
            if self.armed is not None and nxt.stats()["messages_in"] > self.armed:
                os.kill(os.getpid(), signal.SIGKILL)
            return tracer

        frame = sys._getframe().f_back
        while frame is not None:
            frame.f_trace = tracer
            frame = frame.f_back
        sys.settrace(tracer)

    def process(self, x):
        if x == self.victim:
            self.armed = _PIPELINE_UNDER_TEST._stages[1].ring.stats()["messages_in"]
        return x * 10


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ordered", [True, False])
def test_worker_killed_after_forwarding_settles_the_item_exactly_once(ordered, no_leaks):
    global _PIPELINE_UNDER_TEST
    with Pipeline(range(12), on_error="collect") as p:
        p.stage(DieRightAfterForwarding, workers=1, ordered=ordered)
        p.stage(add_one, workers=1)
        _PIPELINE_UNDER_TEST = p
        out = list(p.results())
        stats = p.stats()
    _PIPELINE_UNDER_TEST = None
    assert stats["stages"][0]["deaths"] == 1
    # item 5 yields its result or fails with WorkerLost: exactly one of the two
    got = sorted(out)
    failed = [f.seq for f in p.errors]
    assert all(isinstance(f.exception, shmipc.WorkerLost) for f in p.errors)
    assert sorted([(x - 1) // 10 for x in got] + failed) == list(range(12))
    assert stats["completed"] == 12


class DoubleAndSayReady:
    """double, as a class stage whose setup() leaves a marker: the worker is
    past its start-up once the marker exists."""

    def setup(self):
        path = os.path.join(os.environ["PIPELINE_TEST_DIR"], f"ready-{os.getpid()}")
        open(path, "w").close()

    def process(self, x):
        return 2 * x


@pytest.mark.timeout(60)
def test_killing_idle_workers_replaces_them_and_goes_on(test_dir, no_leaks):
    import threading

    kills = []
    stop = threading.Event()
    # held by the source from handing out an item until it is asked for the
    # next one (the item is in the ring by then), and by the killer from its
    # "idle" check to its kill: no item can reach the ring in between, so the
    # killed worker is really idle (it held no item to lose)
    gate = threading.Lock()

    def killer(p):
        # five times: wait until the stage's worker is past its setup, holds
        # no item and is asleep in its ring (idle), then SIGKILL it
        from shmipc._slots import READY

        s = p._stages[0]
        deadline = time.monotonic() + 30
        while len(kills) < 5 and not stop.is_set() and time.monotonic() < deadline:
            if gate.acquire(timeout=0.05):
                try:
                    pids = p.worker_pids().get("DoubleAndSayReady", [])
                    # Idle, read in this order with the gate held (nothing
                    # enters the ring meanwhile): every item fed was taken,
                    # every item taken was answered (one result each), and
                    # only then the slot says READY, so the worker got past
                    # its last item and has nothing left to take. Neither
                    # the ring nor the slot alone says so: the slot is still
                    # READY just after a take (BUSY comes after), and the
                    # ring's consumers_waiting keeps one count for each
                    # worker killed asleep (a dead waiter cannot take its
                    # count back: see shm_wake), so after the first kill it
                    # would be >= 1 while the next worker is busy.
                    if (pids and pids[0] not in kills and (test_dir / f"ready-{pids[0]}").exists()
                            and s.ring.stats()["messages_in"] == s.ring.stats()["messages_out"]
                            == p._out.stats()["messages_in"]
                            and p._slots.state(s.slot_base) == READY
                            and _process_state(pids[0]) == "S"):
                        os.kill(pids[0], signal.SIGKILL)
                        kills.append(pids[0])
                finally:
                    gate.release()
            time.sleep(0.005)

    def source(p):
        # a live source that keeps the pipeline running until the kills are done
        i = 0
        deadline = time.monotonic() + 30
        while (len(kills) < 5 or i < 20) and time.monotonic() < deadline:
            time.sleep(0.01)
            with gate:
                yield i
            i += 1

    holder = {}
    with Pipeline(_LateSource(holder, source)) as p:
        holder["p"] = p
        p.stage(DoubleAndSayReady, workers=1)
        it = p.results()
        t = threading.Thread(target=killer, args=(p,))
        t.start()
        try:
            out = list(it)
        finally:
            stop.set()
            t.join()
        deaths = p.stats()["stages"][0]["deaths"]
    assert len(kills) == 5
    assert out == [2 * x for x in range(len(out))] and len(out) >= 20
    assert deaths == 5


def _process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ("S": asleep; "" if gone)."""
    try:
        return proc_stat(pid)[0]
    except (OSError, IndexError):
        return ""


class _LateSource:
    """An iterable whose generator is made on first use (it needs the pipeline)."""

    def __init__(self, holder, make):
        self.holder, self.make, self.it = holder, make, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.it is None:
            self.it = self.make(self.holder["p"])
        return next(self.it)


@pytest.mark.timeout(60)
def test_results_of_a_slow_live_source_arrive_promptly(no_leaks):
    produced = {}

    def source():
        for i in range(80):
            time.sleep(0.02)                  # a live source: one item per ~20 ms
            produced[i] = time.monotonic()
            yield i

    late = []
    with Pipeline(source()) as p:
        p.stage(double, workers=2)
        for n, x in enumerate(p.results()):
            assert x == 2 * n
            late.append(time.monotonic() - produced[n])
    assert len(late) == 80
    assert max(late) < 1.0, f"results came up to {max(late):.2f} s after their items"


class BadOnLoad:
    """Pickles fine; unpickling it raises (here: a ValueError, which must not
    be taken for a closed ring)."""

    def __init__(self, n):
        self.n = n

    def __reduce__(self):
        return (_refuse_to_load, (self.n,))


def _refuse_to_load(n):
    raise ValueError(f"cannot rebuild object {n}")


class CodedError(Exception):
    def __init__(self, msg, code):
        super().__init__(msg)
        self.code = code


def make_bad_result(x):
    return BadOnLoad(x) if x == 4 else x


def raise_coded_on_six(x):
    if x == 6:
        raise CodedError("six is bad", 6)
    return x


def raise_value_error_on_two(x):
    if x == 2:
        raise ValueError("two is bad")
    return x


@pytest.mark.timeout(60)
def test_stage_value_error_is_an_item_error_not_a_closed_ring(no_leaks):
    with Pipeline(range(8), on_error="collect") as p:
        p.stage(raise_value_error_on_two, workers=2)
        p.stage(identity, workers=1)
        out = list(p.results())
        deaths = sum(s["deaths"] for s in p.stats()["stages"])
    assert out == [x for x in range(8) if x != 2]
    assert [(f.seq, type(f.exception)) for f in p.errors] == [(2, ValueError)]
    assert deaths == 0


@pytest.mark.timeout(60)
def test_anything_that_fails_to_pickle_or_unpickle_fails_only_its_item(no_leaks):
    import threading

    source = [0, 1, threading.Lock(), 3, 4, BadOnLoad(5), 6, 7]
    with Pipeline(source, on_error="collect") as p:
        p.stage(identity, workers=2)              # item 5 cannot be unpickled here
        p.stage(make_bad_result, workers=1)       # item 4's result cannot be unpickled by the parent
        p.stage(raise_coded_on_six, workers=1)    # an exception that does not rebuild
        out = list(p.results())
        deaths = sum(s["deaths"] for s in p.stats()["stages"])
    assert out == [0, 1, 3, 7]
    failures = {f.seq: f for f in p.errors}
    assert sorted(failures) == [2, 4, 5, 6]
    assert deaths == 0
    for seq, f in failures.items():
        assert f"item {seq}" in str(f.exception) + "".join(getattr(f.exception, "__notes__", [])), f
    assert "CodedError" in str(failures[6].exception)
    assert "cannot rebuild object 5" in str(failures[5].exception)


def kill_self_on_array_seven(a):
    """SIGKILL our worker on the array of 7s, while it holds the array in the
    ring (zero_copy: the record stays claimed until the call returns)."""
    if a[0] == 7:
        os.kill(os.getpid(), signal.SIGKILL)
    return int(a[0])


@pytest.mark.timeout(60)
def test_room_held_by_a_killed_zero_copy_worker_is_given_back(no_leaks):
    # 4 KiB items in a 16 KiB ring: the dead worker's claimed record sits at the
    # tail, and only a producer that waits makes the ring give its room back
    arrays = [np.full(512, i, dtype=np.int64) for i in range(40)]
    with Pipeline(arrays, on_error="collect", ring_capacity=1 << 14) as p:
        p.stage(kill_self_on_array_seven, workers=2, zero_copy=True)
        out = list(p.results())
    assert out == [i for i in range(40) if i != 7]
    assert [f.seq for f in p.errors] == [7]


def forge_output(x, how):
    """Item 3 first puts a forged message into the parent's output ring (as
    a process writing into the arena could)."""
    if x == 3:
        import gc

        from shmipc import _pipeline_worker
        from shmipc._wire import K_RESULT, pack

        w = next(o for o in gc.get_objects() if type(o) is _pipeline_worker.StageWorker)
        d, m = pack(1)
        w.out.put({"no_tuple": 5, "kind": (99, 3, 0, (), d, m), "credit": (K_RESULT, 3, 10**12, (), d, m),
                   "path": (K_RESULT, 3, 0, 5, d, m), "error": (2, 3, 0, (), 5, None),
                   "seq": (K_RESULT, "3", 0, (), d, m)}[how])
    return x * 10


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["no_tuple", "kind", "credit", "path", "error", "seq"])
def test_a_forged_output_message_fails_only_its_item(how, no_leaks, capfd):
    """A malformed message in the output ring (wrong shape, kind, credit,
    path, error data) fails the item it names with CorruptMessage under the
    stage's on_error, and no other; one that names no item is dropped and
    reported. Before, it ended the whole run with a TypeError (or, a credit
    of 10**12, asked for a 10**12-bit int)."""
    import functools

    from shmipc.errors import CorruptMessage

    fn = functools.partial(forge_output, how=how)
    with Pipeline(range(8), on_error="collect") as p:
        p.stage(fn, workers=1)
        got = list(p)
        errors = p.errors
    if how in ("no_tuple", "seq"):          # names no item: the real result of item 3 stands
        assert got == [x * 10 for x in range(8)] and not errors
        assert "an output message was lost" in capfd.readouterr().err
    else:
        assert got == [x * 10 for x in range(8) if x != 3]
        assert [(e.seq, type(e.exception)) for e in errors] == [(3, CorruptMessage)]



def swallow_next_input(x):
    """Item 3 first takes the next record out of its own stage's ring and
    drops it, as a hostile write of the ring's read position would: that
    item is never run, and no worker dies."""
    if x == 3:
        import gc

        from shmipc import _pipeline_worker

        w = next(o for o in gc.get_objects() if type(o) is _pipeline_worker.StageWorker)
        assert w.inring.get(timeout=20)[0] == 4
    return x * 10


@pytest.mark.timeout(60)
def test_an_input_record_lost_without_a_death_fails_its_item(no_leaks):
    """An item whose record vanished from a ring (no worker died, so nothing
    said an item might be lost) fails with CorruptMessage once no ring holds
    it, no worker has it and nothing has moved for QUIET_S. Before, the
    pipeline waited for it for ever."""
    from shmipc.errors import CorruptMessage

    t0 = time.monotonic()
    with Pipeline(range(8), on_error="collect") as p:
        p.stage(swallow_next_input, workers=1)
        got = list(p)
        errors = p.errors
        deaths = p.stats()["stages"][0]["deaths"]
    assert got == [x * 10 for x in range(8) if x != 4]
    assert [(e.seq, type(e.exception)) for e in errors] == [(4, CorruptMessage)]
    assert "nothing has moved for" in str(errors[0].exception) and deaths == 0
    assert QUIET_S <= time.monotonic() - t0 < QUIET_S + 20
    with Pipeline(range(8)) as p:             # on_error="raise": the run ends with it
        p.stage(swallow_next_input, workers=1)
        with pytest.raises(CorruptMessage, match="item 4 was lost"):
            list(p)


def slow_at_one(x):
    if x == 1:
        time.sleep(QUIET_S * 2.5)
    return x + 1


def slow_source(n):
    for x in range(n):
        if x == n - 1:
            time.sleep(QUIET_S * 1.5)          # every item fed so far is done: nothing outstanding
        yield x


@pytest.mark.timeout(60)
def test_slow_items_and_slow_sources_are_not_taken_for_lost(no_leaks):
    """The check for lost items runs all the time now: an item running
    longer than QUIET_S (its worker holds it) and a source that pauses for
    longer (nothing outstanding) are waited for."""
    with Pipeline(slow_source(5)) as p:
        p.stage(slow_at_one, workers=1)
        p.stage(slow_at_one, workers=2)
        assert list(p) == [x + 2 for x in range(5)]
        assert p.stats()["lost"] == 0
