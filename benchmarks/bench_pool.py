"""Pool and ProcessPoolExecutor: shmipc against the standard library, same run.

What it measures (2 workers by default, fork start method, best of
`repeat` runs on already started pools, so worker start-up is excluded; the
shmipc and standard-library runs alternate, so both see the same load):

* ``Pool.map(f, range(200_000))`` with ``f(x) = x + 1``, default chunksize:
  shmipc.Pool vs multiprocessing.Pool (target: >= 1.5x).
* ``Pool.map(len, blobs)`` over 2,000 distinct 100 KiB bytes objects
  (200 MB of arguments through the pool): shmipc.Pool vs multiprocessing.Pool
  (target: >= 5x).
* ``ProcessPoolExecutor.map(f, range(200_000), chunksize=1000)``:
  shmipc.ProcessPoolExecutor vs concurrent.futures.ProcessPoolExecutor
  (target: >= 3x).

Every result is checked (a wrong answer aborts the run). Run it::

    .venv/bin/python benchmarks/bench_pool.py [--processes 2] [--repeat 5] [--json]

or call :func:`run` (used by ``shmipc bench``), which returns one dict per
comparison: name, shmipc_s, stdlib_s, speedup, target.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import sys
import time
from typing import Any, Callable

if __package__ in (None, ""):       # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shmipc  # noqa: E402

__all__ = ["run", "main", "inc"]

N_INTS = 200_000
N_BLOBS = 2_000
BLOB_SIZE = 100 * 1024


def inc(x: int) -> int:
    """The benchmark's task: f(x) = x + 1."""
    return x + 1


def _best_pair(a: Callable[[], Any], b: Callable[[], Any], check: Callable[[Any], bool],
               repeat: int) -> tuple[float, float]:
    """Best-of-`repeat` times of a and b, run alternately (a, b, a, b, ...) so
    that both see the same machine load; every result is checked."""
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, fn in enumerate((a, b)):
            t0 = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - t0
            if not check(out):
                raise AssertionError(f"{fn} returned a wrong result")
            best[i] = min(best[i], elapsed)
    return best[0], best[1]


def _blobs() -> list[bytes]:
    # distinct contents, so nothing can be deduplicated or cached
    return [i.to_bytes(4, "little") * (BLOB_SIZE // 4) for i in range(N_BLOBS)]


def run(processes: int = 2, repeat: int = 3, context: str = "fork") -> list[dict[str, Any]]:
    """Run the three comparisons; returns one row per comparison."""
    ctx = multiprocessing.get_context(context)
    ints = range(N_INTS)
    want_ints = N_INTS * (N_INTS + 1) // 2
    blobs = _blobs()
    rows = []

    def ints_ok(out: Any) -> bool:
        return len(out) == N_INTS and sum(out) == want_ints

    def blobs_ok(out: Any) -> bool:
        return len(out) == N_BLOBS and all(n == BLOB_SIZE for n in out)

    timings: dict[str, tuple[float, float]] = {}
    with shmipc.Pool(processes, context=context) as mine, ctx.Pool(processes) as theirs:
        mine.map(inc, range(1000))                               # warm up
        theirs.map(inc, range(1000))
        timings["pool_map_int"] = _best_pair(
            lambda: mine.map(inc, ints), lambda: theirs.map(inc, ints), ints_ok, repeat)
        timings["pool_map_100k"] = _best_pair(
            lambda: mine.map(len, blobs), lambda: theirs.map(len, blobs), blobs_ok, repeat)
    with shmipc.ProcessPoolExecutor(processes, mp_context=context) as mine_ex, \
            concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as theirs_ex:
        list(mine_ex.map(inc, range(1000), chunksize=100))
        list(theirs_ex.map(inc, range(1000), chunksize=100))
        timings["executor_map"] = _best_pair(
            lambda: list(mine_ex.map(inc, ints, chunksize=1000)),
            lambda: list(theirs_ex.map(inc, ints, chunksize=1000)), ints_ok, repeat)
    names = {
        "pool_map_int": ("Pool.map(x+1, range(200_000))", 1.5),
        "pool_map_100k": ("Pool.map(len, 2000 x 100 KiB bytes)", 5.0),
        "executor_map": ("ProcessPoolExecutor.map(x+1, 200_000, chunksize=1000)", 3.0),
    }
    for key, (label, target) in names.items():
        mine_s, theirs_s = timings[key]
        rows.append({"name": key, "label": label, "shmipc_s": mine_s, "stdlib_s": theirs_s,
                     "speedup": theirs_s / mine_s, "target": target,
                     "processes": processes, "context": context})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'benchmark':56} {'shmipc':>10} {'stdlib':>10} {'speedup':>8} {'target':>7}"]
    for r in rows:
        mark = "" if r["speedup"] >= r["target"] else "  (below target)"
        lines.append(f"{r['label']:56} {r['shmipc_s'] * 1e3:8.1f}ms {r['stdlib_s'] * 1e3:8.1f}ms "
                     f"{r['speedup']:7.2f}x {r['target']:6.1f}x{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--context", default="fork", choices=multiprocessing.get_all_start_methods())
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = run(args.processes, args.repeat, args.context)
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
