"""The price of the cluster path on one machine: the same Pipeline and Pool
code on shmipc's shared memory and on a local Ray instance (the ``ray``
workload of ``shmipc bench``, and benchmarks/bench_ray.py).

What it measures, per row: the start (construction to the first result:
workers started, for a pool a first map of 4 tasks) and then the steady
rate in items per second (after the first result, to the last). Ray's own
start-up is not in either: it is reported on its own line, once.

  * pipeline: ``Pipeline(source).stage(touch).stage(passthrough)``, one
    worker per stage, numpy uint8 items of SIZE bytes, results in source
    order, count and checksum checked (the workload of bench_pipeline.py);
  * pool.map: ``Pool(2).map(inc, range(N))`` with multiprocessing's default
    chunksize (tiny tasks: the per-task cost dominates);
  * pool.apply_async: N ``apply_async(inc, (i,))`` calls, then every get():
    one round trip per task.

The shared-memory runs come first, in this process, before Ray is started
(forking a process that runs Ray's threads is not safe); then
``ray.init(num_cpus=2, include_dashboard=False)``, timed, and the Ray runs.
The best of `repeat` runs is kept. ``shmipc bench --workloads ray`` runs
measure() in its own forked measurement process, so the process that runs
the bench never imports Ray::

    from shmipc.bench.ray import measure, format_table
    report = measure(quick=True)   # {'ray_init_s': ..., 'rows': [{'workload': ..., 'shmipc': ..., 'ray': ...}]}
"""
from __future__ import annotations

import importlib.util
import sys
import time
from typing import Any, Callable

from shmipc.bench.transports import Transport

DEFAULT_SIZES = (1 << 10, 64 << 10)


def touch(a):
    a[0]            # read the item, as any stage would
    return a


def passthrough(a):
    return a


def inc(x: int) -> int:
    return x + 1


def _source(size: int, n: int):
    import numpy as np

    arrays = [np.full(size, i, dtype=np.uint8) for i in range(4)]
    for i in range(n):
        yield arrays[i % 4]


def run_pipeline(cluster: str | None, size: int, n: int) -> tuple[float, float]:
    """(seconds to the first result, items/s after it) for n items of `size`
    bytes through the two-stage pipeline."""
    import shmipc

    started = time.perf_counter()
    p = shmipc.Pipeline(_source(size, n), cluster=cluster)
    p.stage(touch).stage(passthrough)
    count = total = 0
    first = 0.0
    for a in p.results():
        if not count:
            first = time.perf_counter()
        count += 1
        total += int(a[0])
    end = time.perf_counter()
    want = sum(i % 4 for i in range(n))
    if count != n or total != want:
        raise AssertionError(f"pipeline on {cluster or 'shm'}: {count} results (want {n}), checksum {total} (want {want})")
    return first - started, (n - 1) / (end - first)


def run_pool(cluster: str | None, n: int, one_by_one: bool) -> tuple[float, float]:
    """(seconds to start the pool and get a first result, items/s of
    map(inc, range(n)) -- or of n apply_async calls -- after that)."""
    import shmipc

    started = time.perf_counter()
    with shmipc.Pool(2, cluster=cluster) as pool:
        pool.map(inc, range(4), chunksize=1)     # both workers up
        ready = time.perf_counter()
        if one_by_one:
            got = [r.get(timeout=300) for r in [pool.apply_async(inc, (i,)) for i in range(n)]]
        else:
            got = pool.map(inc, range(n))
        end = time.perf_counter()
    if got != list(range(1, n + 1)):
        raise AssertionError(f"pool on {cluster or 'shm'}: wrong results")
    return ready - started, n / (end - ready)


def _workloads(quick: bool, sizes: tuple[int, ...]) -> list[tuple[str, int, Callable[[str | None], tuple[float, float]]]]:
    n_pipe = 1000 if quick else 5000
    n_map = 20_000 if quick else 200_000
    n_apply = 500 if quick else 3000
    out: list[tuple[str, int, Callable[[str | None], tuple[float, float]]]] = []
    for size in sizes:
        out.append((f"pipeline, 2 stages, {_size(size)} items", n_pipe,
                    lambda c, size=size: run_pipeline(c, size, n_pipe)))
    out.append(("pool.map, 2 workers, tiny tasks", n_map, lambda c: run_pool(c, n_map, False)))
    out.append(("pool.apply_async, 2 workers, one by one", n_apply, lambda c: run_pool(c, n_apply, True)))
    return out


def _best(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return min(r[0] for r in runs), max(r[1] for r in runs)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB" if n >= 1 << 10 else f"{n} B"


def measure(quick: bool = False, repeat: int | None = None, sizes: tuple[int, ...] = DEFAULT_SIZES) -> dict[str, Any]:
    """Run every workload on shared memory, then start Ray and run them on
    it. Returns {'ray_init_s', 'ray_version', 'rows': [{'workload', 'items',
    'shmipc' (items/s), 'ray' (items/s), 'ratio' (shmipc / ray)}]}.

    Raises:
        ImportError: Ray is not installed.
        RuntimeError: Ray is already initialised in this process (the
            shared-memory runs must fork before Ray's threads exist).
    """
    import ray

    if ray.is_initialized():
        raise RuntimeError("measure() starts its own Ray, after the shared-memory runs: "
                           "call it from a process where Ray is not initialised")
    repeat = repeat or (1 if quick else 3)
    work = _workloads(quick, sizes)
    shm = [_best([fn(None) for _ in range(repeat)]) for _, _, fn in work]
    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - started
    # the stage and task functions travel by value, as a script's would: a
    # Ray worker need not be able to import this module by name
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        on_ray = [_best([fn("ray") for _ in range(repeat)]) for _, _, fn in work]
    finally:
        ray.shutdown()
    rows = []
    for (name, n, _), (a_start, a_rate), (b_start, b_rate) in zip(work, shm, on_ray):
        rows.append({"workload": name, "items": n, "shmipc_start_s": a_start, "ray_start_s": b_start,
                     "shmipc": a_rate, "ray": b_rate, "ratio": a_rate / b_rate})
    return {"ray_init_s": init_s, "ray_version": ray.__version__, "rows": rows}


def format_table(report: dict[str, Any]) -> str:
    """The report of measure() as one Markdown-style table, after a line
    with Ray's start-up time."""
    head = ("workload", "items", "start: shmipc", "start: Ray", "shmipc items/s", "local Ray items/s",
            "shmipc / Ray")
    body = [(r["workload"], f"{r['items']:,}", f"{r['shmipc_start_s']:.2f} s", f"{r['ray_start_s']:.2f} s",
             f"{r['shmipc']:,.0f}", f"{r['ray']:,.0f}", f"{r['ratio']:.1f}x") for r in report["rows"]]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    lines = [f"Ray {report['ray_version']}: ray.init(num_cpus=2, include_dashboard=False) took "
             f"{report['ray_init_s']:.1f} s (not counted below)",
             "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in body:
        lines.append("| " + row[0].ljust(widths[0]) + " | "
                     + " | ".join(c.rjust(w) for c, w in zip(row[1:], widths[1:])) + " |")
    return "\n".join(lines)


UNAVAILABLE = "needs Ray: pip install 'shmipc[ray]'"


def unavailable() -> str | None:
    """None if Ray is installed (looked for, not imported), else why not."""
    return UNAVAILABLE if importlib.util.find_spec("ray") is None else None


def records(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of measure() as `shmipc bench` records: per row one record
    for transport "shmipc" and one for "ray", each with items/s and the start
    in seconds (``best``), Ray's start-up and version alongside."""
    out = []
    for row in report["rows"]:
        for transport, is_shmipc in (("shmipc", True), ("ray", False)):
            figures = {"items": row["items"], "items_per_s": row[transport],
                       "start_s": row[f"{transport}_start_s"]}
            out.append({"transport": transport, "shmipc": is_shmipc, "pool_kind": row["workload"],
                        "title": row["workload"], "rounds": [figures], "best": figures, "status": "ok",
                        "note": "shmipc/bench/ray.py", "ray_init_s": report["ray_init_s"],
                        "ray_version": report["ray_version"]})
    return out


class RaySuite(Transport):
    """The ``ray`` workload's one measurement: measure() in a fresh process;
    its rows become records of "shmipc" and "ray"."""

    name = "shmipc+ray"
    workloads = ("ray",)
    note = "shmipc/bench/ray.py (also benchmarks/bench_ray.py)"

    def unavailable(self, load: bool = True) -> str | None:
        # never imports Ray, even with load=True: measure() must import it
        # itself, after its shared-memory runs have forked their workers
        return unavailable()
