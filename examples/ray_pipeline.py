"""The same Pipeline and Pool code on this machine's shared memory or on a
Ray cluster: one flag.

What it shows: a log-analysis job written once. A generator stage splits
batches of raw log text into parsed records (some lines are malformed and
dropped, some batches are empty), a class stage (``setup()`` once per
worker, then ``process()`` per record) classifies them, and a Pool
summarises each service's latencies. ``--cluster`` is the only difference
between the runs: without it shmipc forks workers and moves the items
through shared-memory rings; with ``--cluster ray`` the same stages run as
Ray actors (on a local Ray instance it starts, or on the cluster that
``RAY_ADDRESS`` names), with ``--cluster ray://head:10001`` on a remote
cluster through Ray Client. The results, and the digest printed over all of
them, are identical; only "ran on" and the time differ.

Run::

    .venv/bin/python examples/ray_pipeline.py                  # shared memory
    .venv/bin/python examples/ray_pipeline.py --cluster ray    # Ray (pip install 'shmipc[ray]')
    .venv/bin/python examples/ray_pipeline.py -n 2000 --cluster ray --progress
"""
from __future__ import annotations

import argparse
import hashlib
import random
import re
import time

import shmipc

SERVICES = ("auth", "billing", "search", "upload")
LEVELS = ("DEBUG", "INFO", "WARN", "ERROR")


def log_batches(n: int, seed: int = 7):
    """`n` batches of raw log text, deterministic for a seed (a stand-in for
    files or a message queue: any iterable works, even an endless one)."""
    rng = random.Random(seed)
    for b in range(n):
        lines = []
        for _ in range(rng.randrange(0, 12)):
            if rng.random() < 0.05:
                lines.append("#### garbled line ####")
                continue
            lines.append(f"2026-11-30T01:{b % 60:02d}:{rng.randrange(60):02d} {rng.choice(LEVELS)} "
                         f"{rng.choice(SERVICES)} latency_ms={rng.lognormvariate(3, 0.8):.1f} "
                         f"user={rng.randrange(10_000)}")
        yield "\n".join(lines)


LINE = re.compile(r"(\S+) (DEBUG|INFO|WARN|ERROR) (\w+) latency_ms=([\d.]+) user=(\d+)")


def parse(batch: str):
    """Stage 1, a generator: one batch in, 0..n parsed records out."""
    for line in batch.splitlines():
        m = LINE.fullmatch(line)
        if m is not None:
            yield (m[3], m[2], float(m[4]), int(m[5]))


class Classify:
    """Stage 2, a class: setup() once per worker (a table that would be a
    model or a database connection in real life), process() per record."""

    def setup(self) -> None:
        self.buckets = [(10.0, "fast"), (50.0, "ok"), (200.0, "slow")]

    def process(self, record: tuple) -> tuple:
        service, level, latency, user = record
        bucket = next((name for limit, name in self.buckets if latency < limit), "timeout")
        return (service, level, bucket, latency, user % 7 == 0)


def summarize(service: str, latencies: list) -> tuple:
    """Pool task: one service's latency summary."""
    s = sorted(latencies)
    return (service, len(s), round(s[len(s) // 2], 1), round(s[int(len(s) * 0.99)], 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--batches", type=int, default=400, help="batches of log text (default 400)")
    ap.add_argument("--cluster", default=None,
                    help="None: shared memory on this machine; 'ray', 'ray://host:port': Ray")
    ap.add_argument("--progress", action="store_true", help="show a progress bar")
    args = ap.parse_args()

    if args.cluster is not None:
        # not needed (the first Pipeline or Pool would do it): timed apart,
        # because starting a local Ray instance takes seconds
        from shmipc.cluster import connect

        started = time.perf_counter()
        connect(args.cluster)
        print(f"connected to Ray in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    pipeline = shmipc.Pipeline(log_batches(args.batches), cluster=args.cluster, max_inflight=64)
    pipeline.stage(parse, workers=1)
    pipeline.stage(Classify, workers=1)
    records = list(pipeline.results(progress=args.progress))

    by_service: dict[str, list] = {}
    for service, _level, _bucket, latency, _flag in records:
        by_service.setdefault(service, []).append(latency)
    with shmipc.Pool(2, cluster=args.cluster) as pool:
        summary = pool.starmap(summarize, sorted(by_service.items()))
    elapsed = time.perf_counter() - started

    digest = hashlib.sha256(repr((records, summary)).encode()).hexdigest()[:16]
    print(f"ran on: {'shared memory (this machine)' if args.cluster is None else args.cluster}")
    print(f"{args.batches} batches -> {len(records)} records")
    for service, count, median, p99 in summary:
        print(f"  {service:8} {count:6} records  median {median:7.1f} ms  p99 {p99:7.1f} ms")
    print(f"results digest: {digest}")
    print(f"time: {elapsed:.2f} s")


if __name__ == "__main__":
    main()
