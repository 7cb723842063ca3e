"""joblib on shmipc's Pool (``import shmipc.joblib``), driven by joblib's own
calls: results, errors with their remote traceback, timeouts, generators,
large numpy arguments, a killed worker, the start methods."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np
import pytest

joblib = pytest.importorskip("joblib")
import shmipc.joblib  # noqa: E402,F401  (registers the backend)
from joblib import Parallel, delayed  # noqa: E402

from conftest import START_METHODS  # noqa: E402


def square(x):
    return x * x


def fail_on_three(x):
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def total(arr):
    return float(arr.sum()), arr.shape


def die_on_two(x):
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def pid_of(_):
    return os.getpid()


@pytest.fixture(autouse=True)
def _stop_idle_pools():
    yield
    shmipc.joblib._shutdown()       # no worker of one test outlives it


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", START_METHODS)
def test_results_in_order_under_each_start_method(method):
    with joblib.parallel_config(backend="shmipc", n_jobs=2, context=method):
        assert Parallel()(delayed(square)(i) for i in range(50)) == [i * i for i in range(50)]


@pytest.mark.timeout(60)
def test_backend_is_used_and_workers_are_reused():
    with joblib.parallel_config(backend="shmipc", n_jobs=2):
        backend = Parallel()._backend
        assert type(backend).__name__ == "ShmipcBackend"
        first = set(Parallel()(delayed(pid_of)(i) for i in range(20)))
        second = set(Parallel()(delayed(pid_of)(i) for i in range(20)))
    assert os.getpid() not in first
    assert first & second, "the second call should reuse the first call's workers"


@pytest.mark.timeout(60)
def test_an_error_reaches_the_caller_with_its_traceback():
    with joblib.parallel_config(backend="shmipc", n_jobs=2):
        with pytest.raises(ValueError, match="bad item 3") as info:
            Parallel()(delayed(fail_on_three)(i) for i in range(10))
        # as with loky: the worker's traceback is the exception's cause
        assert "fail_on_three" in str(info.value.__cause__)
        # the backend goes on after an error
        assert Parallel()(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]


@pytest.mark.timeout(60)
def test_timeout_raises_and_stops_the_work():
    with joblib.parallel_config(backend="shmipc", n_jobs=2):
        t = time.monotonic()
        with pytest.raises(multiprocessing.TimeoutError):       # what joblib raises
            Parallel(timeout=0.5)(delayed(time.sleep)(s) for s in (0.01, 30, 30))
        assert time.monotonic() - t < 20
        assert Parallel()(delayed(square)(i) for i in range(3)) == [0, 1, 4]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("return_as", ["generator", "generator_unordered"])
def test_generators(return_as):
    with joblib.parallel_config(backend="shmipc", n_jobs=2):
        out = Parallel(return_as=return_as)(delayed(square)(i) for i in range(30))
        assert not isinstance(out, list)
        got = list(out)
    expected = [i * i for i in range(30)]
    assert (got if return_as == "generator" else sorted(got)) == expected


@pytest.mark.timeout(60)
def test_large_numpy_arguments():
    arrays = [np.full((1000, 1000), i, dtype=np.float64) for i in range(4)]     # 8 MB each
    with joblib.parallel_config(backend="shmipc", n_jobs=2):
        out = Parallel()(delayed(total)(a) for a in arrays)
    assert out == [(float(i) * 1e6, (1000, 1000)) for i in range(4)]


@pytest.mark.timeout(60)
def test_a_killed_worker_fails_the_call_and_the_backend_recovers():
    with joblib.parallel_config(backend="shmipc", n_jobs=2):
        with pytest.raises(shmipc.WorkerLost):
            Parallel(batch_size=1)(delayed(die_on_two)(i) for i in range(5))
        assert Parallel()(delayed(square)(i) for i in range(5)) == [0, 1, 4, 9, 16]


@pytest.mark.timeout(60)
def test_n_jobs_one_runs_in_this_process():
    with joblib.parallel_config(backend="shmipc", n_jobs=1):
        assert set(Parallel()(delayed(pid_of)(i) for i in range(3))) == {os.getpid()}


def nested_sum(n):
    # a Parallel call inside a worker: joblib runs it in that worker, sequentially
    with joblib.parallel_config(backend="shmipc", n_jobs=2):
        return sum(Parallel()(delayed(square)(i) for i in range(n)))


@pytest.mark.timeout(60)
def test_backend_by_name_and_nested_calls():
    out = Parallel(n_jobs=2, backend="shmipc")(delayed(nested_sum)(n) for n in range(1, 6))
    assert out == [sum(i * i for i in range(n)) for n in range(1, 6)]


@pytest.mark.timeout(60)
def test_pre_dispatch_and_auto_batching_keep_the_order():
    with joblib.parallel_config(backend="shmipc", n_jobs=2):
        out = Parallel(batch_size="auto", pre_dispatch="2*n_jobs")(
            delayed(square)(i) for i in range(3000))
    assert out == [i * i for i in range(3000)]


@pytest.mark.timeout(300)
def test_sklearn_example_runs_unchanged():
    """examples/sklearn_joblib.py: scikit-learn's n_jobs on shmipc gives the
    same scores as on loky."""
    pytest.importorskip("sklearn")
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "examples", "sklearn_joblib.py")],
                         capture_output=True, text=True, timeout=280, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "identical results on shmipc and loky: True" in out.stdout
