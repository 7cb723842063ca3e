"""The floor under the pool workloads of ``shmipc/bench/pools.py`` on this
machine: the CPU that any pool must spend per item, measured in one process,
next to multiprocessing.Pool's wall time in the same run.

What a process pool cannot avoid, for ``Pool.map(inc, list of 200_000 ints)``:
the call itself (``list(map(inc, chunk))`` in the workers), the arguments
encoded in the parent and decoded in a worker, the results encoded in a
worker and decoded in the parent (pickle here: what both pools use), and
freeing what was decoded. On P cores that CPU takes at least total / P of
wall time, however well the work overlaps; ``best ratio`` is
multiprocessing's time divided by that bound: no pool built on pickle can
beat mp.Pool by more on this machine, in this run. For the 2,000 x 100 KiB
bytes map the floor is two copies of every byte: into shared memory (here a
4 MiB buffer written round and round, as a task ring is) and out of it into
the worker's own bytes object; the parent makes the first copy from
one thread, so that copy alone is a bound too.

Run it::

    .venv/bin/python benchmarks/bench_pool_floor.py [--processes 2] [--repeat 5] [--json]

Each figure is the best of `repeat` runs (process CPU time: the load other
processes put on the machine inflates it less than wall time; uptime is
printed).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import sys
import time
from typing import Any, Callable

if __package__ in (None, ""):       # run as a script from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shmipc.bench.pools import N_INTS, blobs, fingerprint, inc  # noqa: E402

__all__ = ["floor", "main"]


def _cpu(fn: Callable[[], Any], repeat: int) -> float:
    """Best process CPU seconds of `repeat` calls."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def floor(processes: int = 2, repeat: int = 5, chunks: int = 8) -> dict[str, Any]:
    """The per-part CPU of the int and bytes maps, their sum, the bound it puts
    on wall time over `processes` cores, and mp.Pool's wall time (tuned
    chunksize for the bytes: 15; default for ints) measured in the same run."""
    ints = list(range(N_INTS))
    size = -(-N_INTS // chunks)
    parts = [ints[i: i + size] for i in range(0, N_INTS, size)]
    results = [[x + 1 for x in p] for p in parts]
    args_pickled = [pickle.dumps(p, 5) for p in parts]
    results_pickled = [pickle.dumps(r, 5) for r in results]
    out: dict[str, Any] = {"processes": processes, "n_ints": N_INTS, "load": os.getloadavg()}
    cost = {
        "serial [x + 1 for x in ints] (no pool at all)": _cpu(lambda: [x + 1 for x in ints], repeat),
        "workers: list(map(inc, chunk))": _cpu(lambda: [list(map(inc, p)) for p in parts], repeat),
        "parent: pickle the arguments": _cpu(lambda: [pickle.dumps(p, 5) for p in parts], repeat),
        "workers: unpickle the arguments (and free them)": _cpu(
            lambda: [pickle.loads(s) for s in args_pickled], repeat),
        "workers: pickle the results": _cpu(lambda: [pickle.dumps(r, 5) for r in results], repeat),
        "parent: unpickle the results": _cpu(lambda: [pickle.loads(s) for s in results_pickled], repeat),
    }
    pool_cpu = sum(v for k, v in cost.items() if not k.startswith("serial"))
    out["int_parts_s"] = cost
    out["int_pool_cpu_s"] = pool_cpu
    out["int_bound_s"] = pool_cpu / processes
    data = blobs()
    ring = memoryview(bytearray(4 << 20))           # as large as a pool's task ring
    slots = [(i * len(data[0])) % (len(ring) - len(data[0])) for i in range(len(data))]

    def copy_in() -> None:              # the parent: each blob into the ring, round and round
        for at, b in zip(slots, data):
            ring[at: at + len(b)] = b

    def copy_out() -> None:             # a worker: out of the ring into a bytes object of its own
        n = len(data[0])
        for at in slots:
            bytes(ring[at: at + n])     # (freed at once, as a worker's is: memory reused, no page faults)

    copy_in_s, copy_out_s = _cpu(copy_in, repeat), _cpu(copy_out, repeat)
    out["bytes_copy_in_s"] = copy_in_s
    out["bytes_copy_out_s"] = copy_out_s
    # the parent writes every byte from one thread (one ring writer at a time):
    # that alone bounds the map, whatever the workers do
    out["bytes_bound_s"] = max(copy_in_s, (copy_in_s + copy_out_s) / processes)
    ctx = multiprocessing.get_context("fork")
    want_ints = [x + 1 for x in ints]
    want_blobs = [fingerprint(b) for b in data]
    with ctx.Pool(processes) as pool:
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
    out["int_best_ratio"] = min(walls_i) / out["int_bound_s"]
    out["bytes_best_ratio"] = min(walls_b) / out["bytes_bound_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    r = floor(args.processes, args.repeat)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"load average {r['load']}, {r['processes']} cores")
    print(f"Pool.map(inc, list of {r['n_ints']:,} ints): CPU a pool cannot avoid (pickle as the codec)")
    for k, v in r["int_parts_s"].items():
        print(f"  {k:52} {v * 1e3:7.1f} ms")
    print(f"  {'sum for a pool (all but the serial line)':52} {r['int_pool_cpu_s'] * 1e3:7.1f} ms"
          f" -> at least {r['int_bound_s'] * 1e3:.1f} ms on {r['processes']} cores")
    print(f"  mp.Pool in this run: {r['mp_pool_int_s'] * 1e3:.1f} ms -> best possible ratio "
          f"{r['int_best_ratio']:.2f}x")
    print("Pool.map(fingerprint, 2000 x 100 KiB): two copies of 200 MB")
    print(f"  into a 4 MiB ring {r['bytes_copy_in_s'] * 1e3:.1f} ms, out of it {r['bytes_copy_out_s'] * 1e3:.1f} ms"
          f" -> at least {r['bytes_bound_s'] * 1e3:.1f} ms (the parent copies in alone) on "
          f"{r['processes']} cores; mp.Pool (chunksize 15) {r['mp_pool_bytes_tuned_s'] * 1e3:.1f} ms -> "
          f"best possible ratio {r['bytes_best_ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
