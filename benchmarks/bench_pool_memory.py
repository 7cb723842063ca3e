"""A pool's memory footprint: address space and resident shared memory of the
parent and of each worker, read from /proc, for shmipc.Pool and
multiprocessing.Pool side by side (issue 11: a ``shmipc.Pool(2)`` mapped
~560 MiB of shared memory in every process and kept every page a large
message had touched).

Phases, the same for both pools: just started; after mapping 200,000 ints;
after mapping 2,000 x 100 KiB bytes; after a 40 MiB argument and a 40 MiB
result; then after the pool has been idle for 2 s (shmipc gives its ring
pages back after 1 s). Every result is checked.

Columns: ``shm map`` is the shmipc shared memory (memfd arenas) mapped by the
process (multiprocessing maps none); ``VmSize`` all its address space (a
thread's malloc arena reserves 64 MiB of it: the parent's bookkeeping or
handler threads); ``RssShmem`` the shared pages it has resident; ``RSS`` all.

Run it::

    .venv/bin/python benchmarks/bench_pool_memory.py [--processes 2] [--json]
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

import shmipc  # noqa: E402
from shmipc.bench.pools import blobs, fingerprint, inc  # noqa: E402

MiB = 1 << 20
BIG = 40 * MiB


def make_bytes(n: int) -> bytes:
    return b"r" * n


def footprint(pid: int) -> dict[str, int]:
    """MiB figures of one process, from /proc/PID/status and /proc/PID/maps."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmSize", "VmRSS", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    shm = 0
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if "memfd:shmipc" in line:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                shm += end - start
    out["shm_mapped"] = shm
    return out


def measure(kind: str, processes: int) -> list[dict[str, Any]]:
    """The phases for one pool kind ("shmipc" or "mp"); one row per phase."""
    rows = []
    # the pool first: its forked workers must not inherit the inputs (their
    # pages would count in every worker's RSS)
    pool = (shmipc.Pool(processes, context="fork") if kind == "shmipc"
            else multiprocessing.get_context("fork").Pool(processes))
    with pool:
        ints = list(range(200_000))
        data = blobs()
        def pids() -> list[int]:
            workers = (pool._engine.worker_pids().values() if kind == "shmipc" else [w.pid for w in pool._pool])
            return [os.getpid(), *sorted(workers)]

        def snap(phase: str) -> None:
            rows.append({"pool": kind, "phase": phase, "processes": [footprint(p) for p in pids()]})

        assert pool.map(inc, range(10)) == list(range(1, 11))
        snap("started")
        assert pool.map(inc, ints) == [x + 1 for x in ints]
        snap("after 200k ints")
        assert pool.map(fingerprint, data) == [fingerprint(b) for b in data]
        snap("after 2000 x 100 KiB")
        assert pool.apply(len, (make_bytes(BIG),)) == BIG
        assert len(pool.apply(make_bytes, (BIG,))) == BIG
        snap("after 40 MiB arg+result")
        time.sleep(2.0)         # (a measurement of what idleness does: nothing to wait for but time)
        snap("idle 2 s")
        del data, ints
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'pool':7} {'phase':24} {'process':8} {'shm map':>9} {'VmSize':>9} {'RssShmem':>9} {'RSS':>9}"]
    for r in rows:
        for i, p in enumerate(r["processes"]):
            who = "parent" if i == 0 else f"worker{i}"
            lines.append(f"{r['pool']:7} {r['phase']:24} {who:8} {p['shm_mapped'] / MiB:8.1f}M "
                         f"{p['VmSize'] / MiB:8.1f}M {p['RssShmem'] / MiB:8.1f}M {p['VmRSS'] / MiB:8.1f}M")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    rows = measure("shmipc", args.processes) + measure("mp", args.processes)
    print(json.dumps(rows, indent=2) if args.json else _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
