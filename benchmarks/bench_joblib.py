"""joblib's backends compared: shmipc (``import shmipc.joblib``) against
loky (joblib's default) and multiprocessing, on the same Parallel calls.

Measures the wall time of one ``Parallel(n_jobs=N)(...)`` call, after a
warm-up call (so that pools that are kept between calls -- loky's and
shmipc's -- are already started; joblib's multiprocessing backend starts a
pool per call, and that cost is part of its figure):

* small: 20,000 calls of a function on an int (scheduling and messaging cost);
* large-N: 16 numpy arrays of N MB each, summed in the workers (argument
  transfer cost; loky and multiprocessing memory-map arrays above 1 MB
  through temporary files, as joblib does by default; shmipc sends them
  through shared memory);
* result-16: 16 tasks each returning a 16 MB array (result transfer).

Every call's results are checked (values, order, shapes) on every backend
and every round; a wrong result aborts the run. All backends run in the same
process, one after the other, case by case, so the ratios compare
measurements taken minutes apart at most; the load average is printed.

Run: python benchmarks/bench_joblib.py [--jobs 2] [--repeat 3] [--json FILE]
                                       [--readme README.md]
Prints the best of --repeat runs per case and backend, and loky's time
divided by each backend's (above 1: faster than loky). ``--readme``
rewrites the README's section between ``<!-- joblib:start -->`` and
``<!-- joblib:end -->``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import joblib
import numpy as np
from joblib import Parallel, delayed, parallel_config

import shmipc.joblib  # noqa: F401  (registers the "shmipc" backend)

BACKENDS = ("loky", "multiprocessing", "shmipc")
README_START = "<!-- joblib:start -->"
README_END = "<!-- joblib:end -->"
ITEMS = 16


def inc(x):
    return x + 1


def array_sum(a):
    return float(a.sum())


def make_array(mb, i):
    return np.full(mb * (1 << 20) // 8, float(i))


def cases() -> dict:
    """name -> (run, check): run() makes the Parallel call, check(result)
    raises AssertionError unless every item is right, in order."""
    arrays = {mb: [np.full(mb * (1 << 20) // 8, i, dtype=np.float64) for i in range(ITEMS)]
              for mb in (1, 16)}

    def check_small(out):
        assert out == list(range(1, 20_001)), "small: wrong results"

    def check_sums(mb):
        n = mb * (1 << 20) // 8

        def check(out):
            assert out == [float(i) * n for i in range(ITEMS)], f"large-{mb}: wrong sums"
        return check

    def check_arrays(out):
        assert len(out) == ITEMS, "result-16: wrong count"
        for i, a in enumerate(out):
            assert a.shape == (16 * (1 << 20) // 8,) and a[0] == a[-1] == float(i), f"result-16: item {i}"

    return {
        "small: 20k int tasks": (lambda: Parallel()(delayed(inc)(i) for i in range(20_000)), check_small),
        "large-1: 16 x 1 MB args": (lambda: Parallel()(delayed(array_sum)(a) for a in arrays[1]),
                                    check_sums(1)),
        "large-16: 16 x 16 MB args": (lambda: Parallel()(delayed(array_sum)(a) for a in arrays[16]),
                                      check_sums(16)),
        "result-16: 16 x 16 MB results": (lambda: Parallel()(delayed(make_array)(16, i) for i in range(ITEMS)),
                                          check_arrays),
    }


def measure(jobs: int, repeat: int) -> dict:
    """{case: {backend: best seconds}} with every result checked."""
    table: dict[str, dict[str, float]] = {}
    for name, (run, check) in cases().items():
        for backend in BACKENDS:
            with parallel_config(backend=backend, n_jobs=jobs):
                check(run())                            # warm-up, checked too
                best = float("inf")
                for _ in range(repeat):
                    t = time.perf_counter()
                    out = run()
                    best = min(best, time.perf_counter() - t)
                    check(out)
                    del out
            table.setdefault(name, {})[backend] = best
    return table


def render(table: dict, meta: dict) -> str:
    """The Markdown section: seconds per case and backend, and the ratio to loky."""
    lines = [README_START, "",
             f"Measured by `benchmarks/bench_joblib.py --jobs {meta['jobs']} --repeat {meta['repeat']}` "
             f"on {meta['date']}: {meta['cpus']} CPUs, CPython {meta['python']}, joblib "
             f"{meta['joblib']}, numpy {meta['numpy']}; best of {meta['repeat']} calls after a "
             f"warm-up call, every result checked; load average {meta['load_before']} before, "
             f"{meta['load_after']} after. *x loky*: loky's time divided by the backend's (above 1: "
             "faster than joblib's default).", "",
             "| case | loky s | multiprocessing s | shmipc s | shmipc x loky | multiprocessing x loky |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in table.items():
        lines.append(f"| {name} | {row['loky']:.3f} | {row['multiprocessing']:.3f} | "
                     f"**{row['shmipc']:.3f}** | **{row['loky'] / row['shmipc']:.2f}x** | "
                     f"{row['loky'] / row['multiprocessing']:.2f}x |")
    if max(meta["load_before"] + meta["load_after"]) > meta["cpus"]:
        lines += ["", f"(The load average exceeded the {meta['cpus']} CPUs during the run: other "
                  "work competed with it; compare the ratios, or rerun on a quiet machine.)"]
    lines += ["", "Regenerate with `make readme-joblib` (`benchmarks/bench_joblib.py --readme README.md`).",
              "", README_END]
    return "\n".join(lines) + "\n"


def rewrite_readme(path: str, section: str) -> None:
    """Replace the marked section of `path` with `section` (markers included).

    Raises:
        SystemExit: the file lacks the markers (a README edited by hand).
    """
    from shmipc.bench.report import rewrite_marked_section_or_exit

    rewrite_marked_section_or_exit(path, README_START, README_END, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default="", help="also write the figures to this file")
    parser.add_argument("--readme", default="", help="rewrite this file's joblib section")
    args = parser.parse_args()
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        table = measure(args.jobs, args.repeat)
    finally:
        shmipc.joblib._shutdown()
    meta = {"jobs": args.jobs, "repeat": args.repeat, "cpus": os.cpu_count(),
            "python": platform.python_version(), "joblib": joblib.__version__,
            "numpy": np.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_before": load_before, "load_after": [round(x, 2) for x in os.getloadavg()]}
    print(f"joblib backends, n_jobs={args.jobs}, best of {args.repeat} (seconds; x = loky / backend)")
    print(f"{'case':34}" + "".join(f"{b:>24}" for b in BACKENDS))
    for name, row in table.items():
        print(f"{name:34}" + "".join(f"{row[b]:>14.3f} ({row['loky'] / row[b]:>5.2f}x)" for b in BACKENDS))
    print(f"load average {meta['load_before']} before, {meta['load_after']} after; every result checked")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "seconds": table}, f, indent=1)
    if args.readme:
        rewrite_readme(args.readme, render(table, meta))
        print(f"rewrote the joblib section of {args.readme}")


if __name__ == "__main__":
    main()
