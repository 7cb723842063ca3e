"""The price of the cluster path on one machine: the same Pipeline and Pool
code on shmipc's shared memory and on a local Ray instance.

A command line over shmipc/bench/ray.py (which ``shmipc bench --workloads
ray`` also runs; see there for what is measured). Run::

    .venv/bin/python benchmarks/bench_ray.py            # the table
    .venv/bin/python benchmarks/bench_ray.py --quick    # fewer, smaller runs
    .venv/bin/python benchmarks/bench_ray.py --json
"""
from __future__ import annotations

import argparse
import json
import sys

from shmipc.bench.ray import UNAVAILABLE, format_table, measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller runs")
    ap.add_argument("--repeat", type=int, default=None, help="runs per measurement (best kept)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    try:
        report = measure(quick=args.quick, repeat=args.repeat)
    except ImportError:
        sys.exit(f"bench_ray {UNAVAILABLE}")
    print(json.dumps(report, indent=2) if args.json else format_table(report))


if __name__ == "__main__":
    main()
