"""The floor under the pool workloads of ``shmipc/bench/pools.py`` on this
machine, part by part: the CPU that any pool must spend per item, measured
in one process, next to multiprocessing.Pool's wall time in the same run.
``shmipc bench`` shows the same floor as the ``floor`` row of its pool
tables (one definition: :func:`shmipc.bench.pools.floor_rounds`).

What a process pool cannot avoid, for ``Pool.map(inc, list of 200_000 ints)``:
the call itself (``list(map(inc, chunk))`` in the workers), the arguments
encoded in the parent and rebuilt in a worker, the results encoded in a
worker and rebuilt in the parent, and freeing them; with pickle (what
multiprocessing uses) and with native int64s (what shmipc uses, the
cheapest codec known). Spread over the CPUs the parent and P workers can
use at once (P on P cores), that CPU takes at least total / CPUs of wall
time, however well the work overlaps; ``best ratio`` is multiprocessing's
time divided by that bound: no pool can beat mp.Pool by more on this
machine, in this run. For the 2,000 x 100 KiB bytes map the floor is two
copies of every byte: into shared memory (a 4 MiB buffer written round and
round, as a task ring is) and out of it into the worker's own bytes object;
the parent makes the first copy from one thread, so that copy alone is a
bound too.

Run it::

    .venv/bin/python benchmarks/bench_pool_floor.py [--processes 2] [--repeat 5] [--json]

Each part is the best of `repeat` runs (process CPU time: the load other
processes put on the machine inflates it less than wall time; the load
average is printed).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from typing import Any

if __package__ in (None, ""):       # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shmipc.bench.pools import N_INTS, blobs, fingerprint, floor_rounds, inc  # noqa: E402

__all__ = ["floor", "main"]

CODECS = ("pickle", "int64")


def _best(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each part's (and the floor's) best of the rounds."""
    return {k: min(r[k] for r in rounds) for k in rounds[0]}


def floor(processes: int = 2, repeat: int = 5) -> dict[str, Any]:
    """The floors' parts (best of `repeat`) for each codec, and mp.Pool's wall
    time on the same maps in the same run (default chunksize for the ints,
    15 for the bytes), with the best ratio each floor leaves."""
    data = blobs()
    out: dict[str, Any] = {"processes": processes, "n_ints": N_INTS, "load": os.getloadavg()}
    for codec in CODECS:
        rounds = floor_rounds(processes, repeat, codec=codec, data=data)
        out[f"ints_{codec}"] = _best(rounds["ints"])
        out["bytes"] = _best(rounds["bytes"])
    ints = list(range(N_INTS))
    want_ints = [x + 1 for x in ints]
    want_blobs = [fingerprint(b) for b in data]
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        pool.map(inc, ints[:1000])
        walls_i, walls_b = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            got = pool.map(inc, ints)
            walls_i.append(time.perf_counter() - t0)
            assert got == want_ints
            t0 = time.perf_counter()
            got_b = pool.map(fingerprint, data, 15)
            walls_b.append(time.perf_counter() - t0)
            assert got_b == want_blobs
    out["mp_pool_int_s"] = min(walls_i)
    out["mp_pool_bytes_tuned_s"] = min(walls_b)
    for codec in CODECS:
        out[f"int_best_ratio_{codec}"] = min(walls_i) / out[f"ints_{codec}"]["floor_s"]
    out["bytes_best_ratio"] = min(walls_b) / out["bytes"]["floor_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.processes < 1 or args.repeat < 1:
        parser.error(f"--processes and --repeat must be at least 1, got {args.processes} and {args.repeat}")
    r = floor(args.processes, args.repeat)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"load average {r['load']}, {r['processes']} workers, {len(os.sched_getaffinity(0))} usable CPUs")
    for codec in CODECS:
        parts = r[f"ints_{codec}"]
        print(f"Pool.map(inc, list of {r['n_ints']:,} ints): CPU a pool cannot avoid ({codec} as the codec)")
        for k, v in parts.items():
            if k != "floor_s":
                print(f"  {k:52} {v * 1e3:7.1f} ms")
        print(f"  -> at least {parts['floor_s'] * 1e3:.1f} ms; mp.Pool in this run "
              f"{r['mp_pool_int_s'] * 1e3:.1f} ms -> best possible ratio {r[f'int_best_ratio_{codec}']:.2f}x")
    b = r["bytes"]
    copy_in, copy_out = (v for k, v in b.items() if k != "floor_s")
    print("Pool.map(fingerprint, 2000 x 100 KiB): two copies of 200 MB")
    print(f"  into a 4 MiB ring {copy_in * 1e3:.1f} ms, out of it {copy_out * 1e3:.1f} ms"
          f" -> at least {b['floor_s'] * 1e3:.1f} ms (the parent copies in alone);"
          f" mp.Pool (chunksize 15) {r['mp_pool_bytes_tuned_s'] * 1e3:.1f} ms -> "
          f"best possible ratio {r['bytes_best_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
