"""A worker is SIGKILLed in the middle of Pool.map, and the map still completes.

What it shows:

* ``shmipc.Pool(retries=1)``: the chunk the dead worker was running is run
  again on another worker; the chunks queued behind it never ran and simply
  go elsewhere; a replacement worker starts in the dead one's place.
* Without retries the same death fails only that chunk, with
  ``shmipc.WorkerLost`` naming the signal, and the pool stays usable.
* ``multiprocessing.Pool`` in the same situation hangs forever (CPython
  gh-66587); run with ``--stdlib`` to see it (a 10 s timeout stops the wait).

Run::

    .venv/bin/python examples/pool_crash.py [--stdlib]
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import shmipc  # noqa: E402


def work(x: int) -> int:
    time.sleep(0.005)                   # long enough to be caught mid-task
    return x * x


def kill_a_busy_worker(pool: shmipc.Pool) -> int:
    """SIGKILL one worker of `pool` while it runs a task (its slot in the
    pool's slot table says so); returns its pid."""
    time.sleep(0.1)
    while True:
        for slot, pid in sorted(pool._engine.busy_workers().items()):
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.001)


def main() -> None:
    n = 400
    with shmipc.Pool(2, retries=1) as pool:
        result = pool.map_async(work, range(n), chunksize=10)
        pid = kill_a_busy_worker(pool)
        squares = result.get(timeout=60)
        assert squares == [x * x for x in range(n)]
        stats = pool.statistics()
        print(f"retries=1: worker {pid} was SIGKILLed mid-map; map returned all {len(squares)} "
              f"results; {stats['worker_deaths']} death, {stats['tasks_retried']} chunk re-run; "
              f"workers now {sorted(pool._engine._pids.values())}")

    with shmipc.Pool(2) as pool:
        result = pool.map_async(work, range(n), chunksize=10)
        pid = kill_a_busy_worker(pool)
        try:
            result.get(timeout=60)
        except shmipc.WorkerLost as exc:
            print(f"retries=0: the map failed with WorkerLost: {exc}")
        print(f"           and the pool still works: sum = {sum(pool.map(work, range(100)))}")

    if "--stdlib" in sys.argv:
        with multiprocessing.get_context("fork").Pool(2) as pool:
            result = pool.map_async(work, range(n), chunksize=10)
            time.sleep(0.2)
            os.kill(pool._pool[0].pid, signal.SIGKILL)
            try:
                result.get(timeout=10)
            except multiprocessing.TimeoutError:
                print("multiprocessing.Pool: still waiting after 10 s (it would wait forever)")


if __name__ == "__main__":
    main()
