"""The same Pool and Pipeline test bodies on shared memory (cluster=None) and
on a local Ray instance (cluster="ray") that this module starts once
(``ray.init(num_cpus=2, include_dashboard=False)``) and shuts down at the
end, checking that none of Ray's processes outlive it.

Stage and task functions are module-level; Ray's workers get them pickled
by value (this file is not importable from their sys.path).
"""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import shmipc
from shmipc.pipeline import PipelineError, RemoteTraceback, StageFailure

from conftest import live_children

pytestmark = pytest.mark.timeout(180)     # a loaded 2-core machine starts an actor in seconds


# ---------------------------------------------------------------- Ray, once per module
@pytest.fixture(scope="module")
def ray_instance():
    """A local Ray instance for this module; afterwards every process it
    started (gcs, raylet, workers, actors) must be gone."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'shmipc[ray]')")
    import ray.cloudpickle

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process by someone else")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    request_cleanup = ray.cloudpickle.unregister_pickle_by_value
    before = live_children()
    # ray.init installs a SIGTERM handler (sys.exit) that outlives ray.shutdown:
    # later tests' forked children would inherit it and exit by SystemExit
    # instead of dying by the signal their test expects
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
    started = time.monotonic()
    ray.init(num_cpus=2, include_dashboard=False)
    print(f"\nray.init took {time.monotonic() - started:.1f} s", file=sys.stderr)
    ours = live_children() - before
    try:
        yield ray
    finally:
        ray.shutdown()
        request_cleanup(sys.modules[__name__])
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        # wait (bounded) for Ray's processes to exit: none may be left behind
        deadline = time.monotonic() + 20
        while True:
            left = [pid for pid in ours if _alive(pid)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"Ray processes still running after ray.shutdown(): {left}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    state = data[data.rfind(b")") + 2:].split()[0]
    if state == b"Z":
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        return False
    return True


@pytest.fixture(autouse=True)
def ray_cpus_given_back(request):
    """After a Ray test, every CPU comes back (bounded wait: killing an actor
    is asynchronous): no worker of a closed pool or pipeline is left alive."""
    yield
    if "cluster" not in request.fixturenames or request.getfixturevalue("cluster") is None:
        return
    import ray

    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2:
        if time.monotonic() > deadline:
            pytest.fail(f"Ray CPUs still held 30 s after the test: {ray.available_resources()}")
        time.sleep(0.05)


@pytest.fixture(scope="module", params=[None, "ray"], ids=["shm", "ray"])
def cluster(request):
    """Each test body runs once on shared memory and once on Ray. Module
    scope groups the runs: every shared-memory one first, so none forks a
    process in which Ray's threads are running (3.12+ warns; it can deadlock)."""
    if request.param == "ray":
        request.getfixturevalue("ray_instance")
    return request.param


# ---------------------------------------------------------------- functions the workers run
def square(x):
    return x * x


def add(a, b):
    return a + b


def fail_on_three(x):
    if x == 3:
        raise KeyError(f"no {x}")
    return x


def kill_self_once(x, directory):
    """SIGKILL our own worker on item 5, the first time only (a marker file)."""
    if x == 5:
        try:
            fd = os.open(os.path.join(directory, "killed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return x
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def split(x):
    """A generator stage: odd items fan out to two outputs, even ones to one, 6 to none."""
    if x == 6:
        return
    yield x
    if x % 2:
        yield x + 100


class Scale:
    """A class stage: setup() runs once per worker before any item."""

    def setup(self):
        self.factor = 10

    def process(self, x):
        return x * self.factor

    def teardown(self):
        self.factor = None


def fail_on_four(x):
    if x == 4:
        raise ValueError("four")
    return x


class ParkOnce:
    """On item 3 the first time: write our pid for the test to find, then
    wait (bounded) to be killed. The replacement worker handles it normally."""

    def __init__(self, directory):
        self.directory = directory

    def process(self, x):
        path = os.path.join(self.directory, "parked")
        if x == 3 and not os.path.exists(path):
            with open(path + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.rename(path + ".tmp", path)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:      # the test kills us here
                time.sleep(0.01)
            raise RuntimeError("not killed within 60 s")
        return x + 1


def _kill_when_parked(directory, killed):
    """The test's side: wait for the parked worker's pid, then SIGKILL it."""
    path = os.path.join(directory, "parked")
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    with open(path) as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGKILL)
    killed.append(pid)


# ---------------------------------------------------------------- Pool
def test_pool_map_imap_results_and_order(cluster):
    with shmipc.Pool(2, cluster=cluster) as pool:
        assert pool.map(square, range(20)) == [x * x for x in range(20)]
        assert pool.map(square, range(20), chunksize=3) == [x * x for x in range(20)]
        assert list(pool.imap(square, range(20))) == [x * x for x in range(20)]
        assert list(pool.imap(square, iter(range(20)), chunksize=4)) == [x * x for x in range(20)]
        assert sorted(pool.imap_unordered(square, range(20))) == [x * x for x in range(20)]
        assert pool.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert pool.apply_async(add, (2, 3)).get(timeout=30) == 5
        assert pool.map(square, []) == []


def set_marker(value):
    os.environ["SHMIPC_TEST_INIT"] = value


def marker_and_pid(_):
    return os.environ.get("SHMIPC_TEST_INIT"), os.getpid()


def test_pool_initializer_and_maxtasksperchild(cluster):
    with shmipc.Pool(1, initializer=set_marker, initargs=("ready",), maxtasksperchild=2,
                     cluster=cluster) as pool:
        got = pool.map(marker_and_pid, range(6), chunksize=1)
    assert {marker for marker, _ in got} == {"ready"}     # replacements ran it too
    assert len({pid for _, pid in got}) == 3               # a fresh worker every 2 tasks


def test_pool_error_is_the_workers_with_its_traceback(cluster):
    with shmipc.Pool(2, cluster=cluster) as pool:
        with pytest.raises(KeyError, match="no 3") as err:
            pool.map(fail_on_three, range(8))
        assert "fail_on_three" in str(err.value.__cause__)
        it = pool.imap(fail_on_three, range(5))
        assert [next(it), next(it), next(it)] == [0, 1, 2]
        with pytest.raises(KeyError):
            next(it)
        assert next(it) == 4
        # the pool is still usable
        assert pool.map(square, range(3)) == [0, 1, 4]


def test_pool_killed_worker_costs_a_retry(cluster, tmp_path):
    with shmipc.Pool(2, retries=1, cluster=cluster) as pool:
        args = [(x, str(tmp_path)) for x in range(10)]
        assert pool.starmap(kill_self_once, args, chunksize=1) == list(range(10))
        stats = pool.statistics()
        assert (tmp_path / "killed").exists()
        assert stats["worker_deaths"] >= 1 and stats["tasks_retried"] >= 1, stats
        assert pool.map(square, range(4)) == [0, 1, 4, 9]


def test_pool_killed_worker_without_retries_costs_its_task(cluster, tmp_path):
    with shmipc.Pool(2, cluster=cluster) as pool:
        results = [pool.apply_async(kill_self_once, (x, str(tmp_path))) for x in range(8)]
        for x, r in enumerate(results):
            if x == 5:
                with pytest.raises(shmipc.WorkerLost):
                    r.get(timeout=60)
            else:
                assert r.get(timeout=60) == x
        assert pool.statistics()["tasks_lost"] == 1
        assert pool.map(square, range(4)) == [0, 1, 4, 9]


def sleep_long(x):
    time.sleep(30)
    return x


def test_pool_terminate_fails_pending_results(cluster):
    pool = shmipc.Pool(1, cluster=cluster)
    running = pool.apply_async(sleep_long, (1,))
    queued = pool.apply_async(square, (2,))
    pool.terminate()
    for r in (running, queued):
        with pytest.raises(ValueError):
            r.get(timeout=20)
    pool.join()


# ---------------------------------------------------------------- Pipeline
def test_pipeline_generator_then_class_stage(cluster):
    want = []
    for x in range(10):
        want += [] if x == 6 else ([x * 10, (x + 100) * 10] if x % 2 else [x * 10])
    with shmipc.Pipeline(range(10), cluster=cluster) as p:
        p.stage(split, workers=1)
        p.stage(Scale, workers=1)
        assert list(p.results()) == want
    assert p.closed


def test_pipeline_unordered_and_progress(cluster, capsys):
    p = shmipc.Pipeline(range(30), cluster=cluster)
    p.stage(square, workers=2, ordered=False)
    got = list(p.results(progress=True, desc="squares"))
    assert sorted(got) == [x * x for x in range(30)]
    assert "squares" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["raise", "skip", "collect"])
def test_pipeline_error_policy(cluster, policy):
    p = shmipc.Pipeline(range(8), cluster=cluster, on_error=policy)
    p.stage(fail_on_four)
    if policy == "raise":
        got = []
        with pytest.raises(ValueError, match="four") as err:
            for r in p.results():
                got.append(r)
        assert got == [0, 1, 2, 3]          # the results before it, in order
        assert isinstance(err.value.__cause__, RemoteTraceback)
        assert p.closed
        return
    assert list(p.results()) == [x for x in range(8) if x != 4]
    if policy == "collect":
        [failure] = p.errors
        assert isinstance(failure, StageFailure)
        assert (failure.stage, failure.seq) == ("fail_on_four", 4)
        assert isinstance(failure.exception, ValueError)
    else:
        assert p.errors == []


def test_pipeline_killed_worker_with_retries_1(cluster, tmp_path):
    """A worker SIGKILLed (by this test, from the pid it reported) while
    processing item 3: the item is retried on a replacement, nothing is lost."""
    p = shmipc.Pipeline(range(8), cluster=cluster, retries=1)
    p.stage(ParkOnce(str(tmp_path)), workers=2, name="park")
    it = p.results()         # the workers are started: a thread is safe from here on
    killed: list = []
    killer = threading.Thread(target=_kill_when_parked, args=(str(tmp_path), killed))
    killer.start()
    try:
        assert list(it) == [x + 1 for x in range(8)]
    finally:
        killer.join(70)
    assert killed, "the worker never parked"
    assert p.stats()["stages"][0]["deaths"] >= 1


def test_pipeline_killed_worker_without_retries_is_worker_lost(cluster, tmp_path):
    p = shmipc.Pipeline(range(6), cluster=cluster, on_error="collect")
    p.stage(ParkOnce(str(tmp_path)), name="park")
    it = p.results()
    killed: list = []
    killer = threading.Thread(target=_kill_when_parked, args=(str(tmp_path), killed))
    killer.start()
    try:
        assert list(it) == [x + 1 for x in range(6) if x != 3]
    finally:
        killer.join(70)
    [failure] = p.errors
    assert isinstance(failure.exception, shmipc.WorkerLost) and failure.seq == 3
    assert failure.exception.pid == killed[0]


def test_pipeline_infinite_source_closed_early(cluster):
    p = shmipc.Pipeline(itertools.count(), cluster=cluster, max_inflight=16)
    p.stage(square)
    got = []
    for r in p.results():
        got.append(r)
        if len(got) == 10:
            break
    assert got == [x * x for x in range(10)]
    assert p.closed
    assert p.stats()["fed"] <= 10 + 16     # backpressure: the source was read only as needed


def test_pipeline_setup_failure_is_a_pipeline_error(cluster):
    class BadSetup:
        def setup(self):
            raise OSError("no model file")

        def process(self, x):
            return x

    p = shmipc.Pipeline(range(3), cluster=cluster)
    p.stage(BadSetup)
    with pytest.raises(PipelineError, match="no model file"):
        list(p.results())


# ---------------------------------------------------------------- the cluster argument
def test_bad_cluster_values_are_named():
    with pytest.raises(ValueError, match="'spark'"):
        shmipc.Pool(2, cluster="spark")
    with pytest.raises(ValueError, match="'spark'"):
        shmipc.Pipeline(range(3), cluster="spark")
    with pytest.raises(TypeError, match="int"):
        shmipc.Pool(2, cluster=1)


def test_import_shmipc_does_not_import_ray():
    code = ("import sys, shmipc; shmipc.Pool; shmipc.Pipeline; import shmipc.cluster; "
            "assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- the example
def _run_example(*args, env=None):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "examples", "ray_pipeline.py"), *args],
                          capture_output=True, text=True, timeout=100, cwd=root, env=env)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-8000:]}"
    return done.stdout


def test_example_gives_identical_results_on_both(ray_instance):
    """examples/ray_pipeline.py run as a user would, once on shared memory and
    once with --cluster ray (pointed by RAY_ADDRESS at this module's instance,
    to spare a second Ray start-up)."""
    local = _run_example("-n", "100")
    env = dict(os.environ, RAY_ADDRESS=ray_instance.get_runtime_context().gcs_address)
    on_ray = _run_example("-n", "100", "--cluster", "ray", env=env)
    assert "ran on: shared memory" in local and "ran on: ray" in on_ray
    same = [line for line in local.splitlines() if not line.startswith(("ran on", "time"))]
    assert same == [line for line in on_ray.splitlines()
                    if not line.startswith(("ran on", "time", "connected"))]
    assert any(line.startswith("results digest: ") for line in same)
