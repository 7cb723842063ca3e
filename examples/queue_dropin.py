"""Switch a multiprocessing program to shmipc by changing one import.

The program below is ordinary multiprocessing code: worker processes take
image-sized numpy arrays from a JoinableQueue, send a checksum back through a
Queue, and report to the parent over a Pipe when they stop. The only line
that differs between the two runs is where the context comes from::

    ctx = multiprocessing.get_context(method)     # pipes and a feeder thread
    ctx = shmipc.get_context(method)              # shared-memory rings

Processes, locks and everything else stay multiprocessing's; Queue,
JoinableQueue, SimpleQueue and Pipe become shmipc's, with the same methods
and exceptions.

Run:  .venv/bin/python examples/queue_dropin.py [--method spawn] [--items 2000]
It runs the program with both contexts and prints the time each took.
"""
from __future__ import annotations

import argparse
import multiprocessing
import time

import numpy as np

import shmipc


def worker(tasks, results, report) -> None:
    """Checksum arrays until a None arrives; then tell the parent how many."""
    done = 0
    while True:
        item = tasks.get()
        if item is None:
            tasks.task_done()
            break
        index, image = item
        results.put((index, int(image.sum(dtype=np.uint64))))
        tasks.task_done()
        done += 1
    report.send(done)
    report.close()


def run(ctx, items: int, nworkers: int = 2) -> float:
    """The multiprocessing program; `ctx` is the only thing that varies."""
    tasks, results = ctx.JoinableQueue(maxsize=64), ctx.Queue()
    report_in, report_out = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=worker, args=(tasks, results, report_out)) for _ in range(nworkers)]
    for p in procs:
        p.start()
    report_out.close()                  # the workers hold their own copies
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(16, 224, 224, 3), dtype=np.uint8)   # 150 KB each
    sums = [int(image.sum(dtype=np.uint64)) for image in images]
    t0 = time.perf_counter()
    expected = {}
    for i in range(items):
        # a different array object per put: multiprocessing pickles it later,
        # in its feeder thread, so changing one in place would change what is sent
        image = images[i % len(images)]
        expected[i] = sums[i % len(images)]
        tasks.put((i, image))
        while not results.empty():      # keep the result queue drained as we go
            index, checksum = results.get()
            assert expected.pop(index) == checksum
    for _ in procs:
        tasks.put(None)
    tasks.join()
    while expected:
        index, checksum = results.get(timeout=30)
        assert expected.pop(index) == checksum
    elapsed = time.perf_counter() - t0
    counts = [report_in.recv() for _ in procs]
    assert sum(counts) == items, counts
    for p in procs:
        p.join()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default=None, choices=["fork", "spawn", "forkserver"],
                        help="start method (default: multiprocessing's default)")
    parser.add_argument("--items", type=int, default=2000, help="arrays to send (default 2000)")
    args = parser.parse_args()
    for name, ctx in (("multiprocessing", multiprocessing.get_context(args.method)),
                      ("shmipc", shmipc.get_context(args.method))):
        seconds = run(ctx, args.items)
        print(f"{name:16s} {args.items} arrays of 150 KB in {seconds:6.3f} s "
              f"({args.items / seconds:8.0f} arrays/s)")


if __name__ == "__main__":
    main()
