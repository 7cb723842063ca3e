"""joblib's backends compared: shmipc (``import shmipc.joblib``) against
loky (joblib's default) and multiprocessing, on the same Parallel calls.

Measures the wall time of one ``Parallel(n_jobs=N)(...)`` call, after a
warm-up call (so that pools that are kept between calls -- loky's and
shmipc's -- are already started; joblib's multiprocessing backend starts a
pool per call, and that cost is part of its figure):

* small: 20,000 calls of a function on an int (scheduling and messaging cost);
* large-N: 16 numpy arrays of N MB each, summed in the workers (argument
  transfer cost; loky and multiprocessing memory-map arrays above 1 MB
  through temporary files, shmipc sends them through shared memory);
* result-N: 16 tasks each returning an N MB array (result transfer).

Run: python benchmarks/bench_joblib.py [--jobs 2] [--repeat 3] [--json]
Prints the best of --repeat runs per case, and the ratio to loky.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
from joblib import Parallel, delayed, parallel_config

import shmipc.joblib  # noqa: F401  (registers the "shmipc" backend)

BACKENDS = ("loky", "multiprocessing", "shmipc")


def inc(x):
    return x + 1


def array_sum(a):
    return float(a.sum())


def make_array(mb):
    return np.ones(mb * (1 << 20) // 8)


def cases(jobs):
    arrays = {mb: [np.full(mb * (1 << 20) // 8, i, dtype=np.float64) for i in range(16)]
              for mb in (1, 16)}
    return {
        "small: 20k int tasks": lambda: Parallel()(delayed(inc)(i) for i in range(20_000)),
        "large-1: 16 x 1 MB args": lambda: Parallel()(delayed(array_sum)(a) for a in arrays[1]),
        "large-16: 16 x 16 MB args": lambda: Parallel()(delayed(array_sum)(a) for a in arrays[16]),
        "result-16: 16 x 16 MB results": lambda: Parallel()(delayed(make_array)(16) for _ in range(16)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table: dict[str, dict[str, float]] = {}
    for name, run in cases(args.jobs).items():
        for backend in BACKENDS:
            with parallel_config(backend=backend, n_jobs=args.jobs):
                run()                                   # warm-up
                best = float("inf")
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    run()
                    best = min(best, time.perf_counter() - t)
            table.setdefault(name, {})[backend] = best
    if args.json:
        print(json.dumps(table, indent=1))
        return
    print(f"joblib backends, n_jobs={args.jobs}, best of {args.repeat} (seconds; x = loky / backend)")
    print(f"{'case':34}" + "".join(f"{b:>22}" for b in BACKENDS))
    for name, row in table.items():
        cells = "".join(f"{row[b]:>12.3f} ({row['loky'] / row[b]:>5.2f}x)" for b in BACKENDS)
        print(f"{name:34}{cells}")
    shmipc.joblib._shutdown()


if __name__ == "__main__":
    main()
