"""The pool workload of `shmipc bench` and benchmarks/bench_pool.py (one
definition, so both report the same thing).

Three comparisons, 2 workers by default, fork start method, on pools that are
already started (worker start-up is excluded); shmipc's and the standard
library's runs alternate, so both see the same machine load:

* ``Pool.map(inc, ints)`` over a *list* of 200,000 ints (``inc(x) = x + 1``),
  default chunksize: shmipc.Pool vs multiprocessing.Pool;
* ``Pool.map(fingerprint, blobs)`` over 2,000 distinct 100 KiB bytes objects
  (200 MB of arguments): shmipc.Pool vs multiprocessing.Pool;
* ``ProcessPoolExecutor.map(inc, ints, chunksize=1000)``:
  shmipc.ProcessPoolExecutor vs concurrent.futures.ProcessPoolExecutor.

Both sides get the same inputs (the same list objects). Every result list is
compared, item by item, with the expected one: order and content (a blob's
fingerprint is its length and the index stamped at both of its ends, so a
reordered, truncated or mixed-up argument shows). Every round's time is kept.
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from typing import Any, Callable

__all__ = ["run", "inc", "fingerprint", "N_INTS", "N_BLOBS", "BLOB_SIZE", "COMPARISONS"]

N_INTS = 200_000
N_BLOBS = 2_000
BLOB_SIZE = 100 * 1024

# name: (label, bytes per item, shmipc's name, the standard library's name)
COMPARISONS = {
    "pool_map_int": ("Pool.map(x+1, list of 200_000 ints)", 8, "shmipc.Pool", "mp.Pool"),
    "pool_map_100k": ("Pool.map(fingerprint, 2000 x 100 KiB bytes)", BLOB_SIZE, "shmipc.Pool", "mp.Pool"),
    "executor_map": ("ProcessPoolExecutor.map(x+1, 200_000 ints, chunksize=1000)", 8,
                     "shmipc.ProcessPoolExecutor", "cf.ProcessPoolExecutor"),
}


def inc(x: int) -> int:
    """The int workload's task: x + 1."""
    return x + 1


def fingerprint(blob: bytes) -> tuple[int, int, int]:
    """The bytes workload's task: (length, stamp at the start, stamp at the end)."""
    return len(blob), int.from_bytes(blob[:8], "little"), int.from_bytes(blob[-8:], "little")


def blobs() -> list[bytes]:
    """N_BLOBS distinct blobs, blob i stamped with i at both ends."""
    out = []
    for i in range(N_BLOBS):
        stamp = i.to_bytes(8, "little")
        out.append(stamp + (i % 251).to_bytes(1, "little") * (BLOB_SIZE - 16) + stamp)
    return out


class WrongResults(AssertionError):
    """A pool returned something other than the expected list."""


def _check(got: Any, expected: list, who: str) -> None:
    got = list(got)
    if got == expected:
        return
    if len(got) != len(expected):
        raise WrongResults(f"{who} returned {len(got)} results, expected {len(expected)}")
    first = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
    bad = sum(1 for a, b in zip(got, expected) if a != b)
    raise WrongResults(f"{who}: {bad} of {len(expected)} results differ, the first at index {first}: "
                       f"{got[first]!r} instead of {expected[first]!r}")


def _rounds(pair: tuple[Callable[[], Any], Callable[[], Any]], expected: list, names: tuple[str, str],
            repeat: int) -> tuple[list[float], list[float]]:
    """`repeat` timed runs of each of a pair, alternating; every result checked."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for i, fn in enumerate(pair):
            t0 = time.perf_counter()
            out = fn()
            times[i].append(time.perf_counter() - t0)
            _check(out, expected, names[i])
    return times


def run(processes: int = 2, repeat: int = 3, context: str = "fork") -> list[dict[str, Any]]:
    """Run the three comparisons; one row each: name, label, every round's
    seconds for both sides (``shmipc_rounds_s``, ``stdlib_rounds_s``), the best
    of each (``shmipc_s``, ``stdlib_s``), ``speedup`` (best over best)."""
    import shmipc

    ctx = multiprocessing.get_context(context)
    ints = list(range(N_INTS))                  # a list for both: neither side gets a range to slice
    want_ints = [x + 1 for x in ints]
    data = blobs()
    want_blobs = [fingerprint(b) for b in data]
    timings: dict[str, tuple[list[float], list[float]]] = {}
    with shmipc.Pool(processes, context=context) as mine, ctx.Pool(processes) as theirs:
        _check(mine.map(inc, ints[:1000]), want_ints[:1000], "shmipc.Pool")     # warm up
        _check(theirs.map(inc, ints[:1000]), want_ints[:1000], "mp.Pool")
        timings["pool_map_int"] = _rounds(
            (lambda: mine.map(inc, ints), lambda: theirs.map(inc, ints)), want_ints,
            ("shmipc.Pool", "mp.Pool"), repeat)
        timings["pool_map_100k"] = _rounds(
            (lambda: mine.map(fingerprint, data), lambda: theirs.map(fingerprint, data)), want_blobs,
            ("shmipc.Pool", "mp.Pool"), repeat)
    with shmipc.ProcessPoolExecutor(processes, mp_context=context) as mine_ex, \
            concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as theirs_ex:
        _check(mine_ex.map(inc, ints[:1000], chunksize=100), want_ints[:1000], "shmipc.ProcessPoolExecutor")
        _check(theirs_ex.map(inc, ints[:1000], chunksize=100), want_ints[:1000], "cf.ProcessPoolExecutor")
        timings["executor_map"] = _rounds(
            (lambda: list(mine_ex.map(inc, ints, chunksize=1000)),
             lambda: list(theirs_ex.map(inc, ints, chunksize=1000))), want_ints,
            ("shmipc.ProcessPoolExecutor", "cf.ProcessPoolExecutor"), repeat)
    rows = []
    for name, (label, _item_bytes, _mine, _theirs) in COMPARISONS.items():
        mine_t, theirs_t = timings[name]
        rows.append({"name": name, "label": label, "shmipc_rounds_s": mine_t, "stdlib_rounds_s": theirs_t,
                     "shmipc_s": min(mine_t), "stdlib_s": min(theirs_t),
                     "speedup": min(theirs_t) / min(mine_t), "processes": processes, "context": context})
    return rows
