"""Pipeline throughput: shmipc.Pipeline against the same pipeline on multiprocessing queues.

What it measures: items per second through a two-stage pipeline (one worker
per stage by default) that does almost no work per item, so the cost of moving
items dominates: the parent reads a source of numpy uint8 arrays of SIZE bytes,
stage 1 reads one byte of each item and passes it on, stage 2 passes it on, the
parent receives every result and checks count and checksum.

  * shmipc: ``Pipeline(source).stage(touch).stage(passthrough)``: rings in one
    shared arena, results in source order (the harder job: a reorder buffer).
  * shmipc zero-copy: the same with ``zero_copy=True`` stages (inputs are
    read-only arrays over the ring, valid during the call: one copy less per hop).
  * multiprocessing: the classic hand-built version: ``multiprocessing.Queue``
    (maxsize 64) between the stages, a feeder thread in the parent putting the
    source, worker processes looping on ``get``/``put``, results in completion
    order.

Each measurement runs in a fresh interpreter (``--one``), times everything
from the pipeline's construction to the last result (worker start included),
and the best of ``repeat`` runs is kept. Run::

    .venv/bin/python benchmarks/bench_pipeline.py            # the table
    .venv/bin/python benchmarks/bench_pipeline.py --quick    # fewer, smaller runs
    .venv/bin/python benchmarks/bench_pipeline.py --json

From code (``shmipc bench`` can call it)::

    from benchmarks.bench_pipeline import measure
    rows = measure(sizes=[65536], quick=True)   # [{'size': 65536, 'ratio': ..., ...}]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

DEFAULT_SIZES = (1 << 10, 64 << 10, 1 << 20)
MP_QUEUE_MAXSIZE = 64
TARGET_BYTES = 1 << 30          # data moved per measurement (each hop), bounded by items below
MIN_ITEMS, MAX_ITEMS = 2_000, 100_000


# ---------------------------------------------------------------- the work
def touch(a):
    a[0]            # read the item, as any stage would
    return a


def passthrough(a):
    return a


def _source(size: int, n: int):
    import numpy as np

    arrays = [np.full(size, i, dtype=np.uint8) for i in range(4)]
    for i in range(n):
        yield arrays[i & 3]


def _expected_checksum(n: int) -> int:
    return sum(i & 3 for i in range(n))


def run_shmipc(size: int, n: int, workers: int, zero_copy: bool = False) -> tuple[float, int, int]:
    import shmipc

    t0 = time.perf_counter()
    count = checksum = 0
    with shmipc.Pipeline(_source(size, n), ring_capacity=max(4 << 20, 8 * size)) as p:
        p.stage(touch, workers=workers, zero_copy=zero_copy)
        p.stage(passthrough, workers=workers, zero_copy=zero_copy)
        for a in p.results():
            count += 1
            checksum += int(a[0])
    return time.perf_counter() - t0, count, checksum


def _mp_stage(fn, q_in, q_out) -> None:
    while True:
        item = q_in.get()
        if item is None:
            return
        q_out.put(fn(item))


def run_multiprocessing(size: int, n: int, workers: int) -> tuple[float, int, int]:
    import multiprocessing as mp
    import threading

    ctx = mp.get_context("fork")
    t0 = time.perf_counter()
    q0, q1, q2 = (ctx.Queue(MP_QUEUE_MAXSIZE) for _ in range(3))
    procs = [ctx.Process(target=_mp_stage, args=(touch, q0, q1)) for _ in range(workers)]
    procs += [ctx.Process(target=_mp_stage, args=(passthrough, q1, q2)) for _ in range(workers)]
    for proc in procs:
        proc.start()

    def feed() -> None:
        for item in _source(size, n):
            q0.put(item)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    count = checksum = 0
    for _ in range(n):
        a = q2.get(timeout=60)
        count += 1
        checksum += int(a[0])
    feeder.join()
    for _ in range(workers):
        q0.put(None)
    for _ in range(workers):
        q1.put(None)
    for proc in procs:
        proc.join(10)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    elapsed = time.perf_counter() - t0
    for q in (q0, q1, q2):
        q.close()
        q.join_thread()
    return elapsed, count, checksum


def run_shmipc_zero_copy(size: int, n: int, workers: int) -> tuple[float, int, int]:
    return run_shmipc(size, n, workers, zero_copy=True)


RUNNERS = {"shmipc": run_shmipc, "shmipc_zero_copy": run_shmipc_zero_copy,
           "multiprocessing": run_multiprocessing}


# ---------------------------------------------------------------- driving
def items_for(size: int, quick: bool = False) -> int:
    n = max(MIN_ITEMS, min(MAX_ITEMS, TARGET_BYTES // size))
    return max(1000, n // 4) if quick else n


def run_one(impl: str, size: int, n: int, workers: int = 1, timeout: float = 300.0) -> dict[str, Any]:
    """One measurement in a fresh interpreter; returns its figures.

    Raises:
        RuntimeError: the run failed, timed out, or returned wrong results.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--one", impl, str(size), str(n), str(workers)]
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{impl} at {size} B x {n} did not finish in {timeout} s") from None
    if done.returncode != 0:
        raise RuntimeError(f"{impl} at {size} B x {n} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    if row["count"] != n or row["checksum"] != _expected_checksum(n):
        raise RuntimeError(f"{impl} at {size} B: got {row['count']} items, checksum {row['checksum']}; "
                           f"expected {n}, {_expected_checksum(n)}")
    return row


def measure(sizes: Any = DEFAULT_SIZES, items: int | None = None, workers: int = 1, repeat: int = 2,
            quick: bool = False) -> list[dict[str, Any]]:
    """Measure the pipelines at each item size (best of `repeat` fresh runs,
    interleaved so that a busy moment on the machine hits all of them).

    Returns one dict per size: size, items, workers_per_stage, and for each
    implementation (shmipc, shmipc_zero_copy, mp) ``<impl>_items_s`` and
    ``<impl>_mb_s``; ``ratio`` = shmipc / mp, ``ratio_zero_copy`` =
    shmipc_zero_copy / mp.
    """
    rows = []
    for size in sizes:
        n = items or items_for(size, quick)
        best: dict[str, float] = {}
        for _ in range(1 if quick else repeat):
            for impl in RUNNERS:
                row = run_one(impl, size, n, workers)
                best[impl] = min(best.get(impl, float("inf")), row["seconds"])
        out: dict[str, Any] = {"size": size, "items": n, "workers_per_stage": workers}
        for impl, key in (("shmipc", "shmipc"), ("shmipc_zero_copy", "shmipc_zero_copy"),
                          ("multiprocessing", "mp")):
            out[f"{key}_items_s"] = n / best[impl]
            out[f"{key}_mb_s"] = n / best[impl] * size / 1e6
        out["ratio"] = out["shmipc_items_s"] / out["mp_items_s"]
        out["ratio_zero_copy"] = out["shmipc_zero_copy_items_s"] / out["mp_items_s"]
        rows.append(out)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'item size':>10} {'items':>7} {'shmipc it/s':>12} {'zero-copy it/s':>15} {'mp it/s':>9} "
             f"{'shmipc MB/s':>12} {'mp MB/s':>8} {'speed-up':>9} {'zero-copy':>10}"]
    for r in rows:
        size = r["size"]
        label = f"{size >> 20} MiB" if size >= 1 << 20 else (f"{size >> 10} KiB" if size >= 1024 else f"{size} B")
        lines.append(f"{label:>10} {r['items']:>7} {r['shmipc_items_s']:>12,.0f} "
                     f"{r['shmipc_zero_copy_items_s']:>15,.0f} {r['mp_items_s']:>9,.0f} "
                     f"{r['shmipc_mb_s']:>12,.0f} {r['mp_mb_s']:>8,.0f} {r['ratio']:>8.1f}x "
                     f"{r['ratio_zero_copy']:>9.1f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default=",".join(str(s) for s in DEFAULT_SIZES),
                    help="item sizes in bytes, comma-separated")
    ap.add_argument("--items", type=int, default=None, help="items per run (default: by size)")
    ap.add_argument("--workers", type=int, default=1, help="workers per stage")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", nargs=4, metavar=("IMPL", "SIZE", "N", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        impl, size, n, workers = args.one[0], int(args.one[1]), int(args.one[2]), int(args.one[3])
        import numpy  # noqa: F401  (imported before the clock starts, for both)
        import shmipc.pipeline  # noqa: F401
        seconds, count, checksum = RUNNERS[impl](size, n, workers)
        print(json.dumps({"impl": impl, "size": size, "seconds": seconds, "count": count,
                          "checksum": checksum}))
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = measure(sizes, args.items, args.workers, args.repeat, args.quick)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"two-stage pipeline, {args.workers} worker(s) per stage, {os.cpu_count()} CPUs; "
              f"best of {1 if args.quick else args.repeat} fresh runs, worker start included")
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
