"""The pool workload of `shmipc bench` and benchmarks/bench_pool.py (one
definition, so both report the same thing).

Five comparisons, 2 workers by default, fork start method, on pools that are
already started (worker start-up is excluded); shmipc's and the standard
library's runs alternate, so both see the same machine load:

* ``Pool.map(inc, ints)`` over a *list* of 200,000 ints (``inc(x) = x + 1``),
  default chunksize: shmipc.Pool vs multiprocessing.Pool, which runs twice:
  with its default chunksize and with the chunksize that suited it best in
  a calibration run just before (``mp.Pool (tuned)``; the chunksize is in
  the row);
* ``Pool.map(fingerprint, blobs)`` over 2,000 distinct 100 KiB bytes objects
  (200 MB of arguments): the same three;
* ``ProcessPoolExecutor.map(inc, ints, chunksize=1000)``:
  shmipc.ProcessPoolExecutor vs concurrent.futures.ProcessPoolExecutor;
* ``ProcessPoolExecutor.map(fingerprint, blobs, chunksize=100)``: the same
  2,000 distinct 100 KiB blobs in 20 chunks of 10 MB, each larger than a
  ring message (shmipc cuts it into pieces; it used to crash shmipc's
  executor): large chunks that carry their data;
* ``ProcessPoolExecutor.map(len, [bytes(102400)] * 100, chunksize=100)``:
  the issue's report, 20 maps a round. Its 100 items are one object, which
  both sides send once (pickle's memo, shmipc's blob table), so a map moves
  100 KiB and takes well under a millisecond: a round-trip latency row
  (submit, a worker, the result back), not a data row.

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

__all__ = ["run", "inc", "fingerprint", "N_INTS", "N_BLOBS", "BLOB_SIZE", "COMPARISONS", "TUNED"]

N_INTS = 200_000
N_BLOBS = 2_000
BLOB_SIZE = 100 * 1024
N_LARGE = 100                       # executor_map_large: items a map (one object)

# name: (label, bytes per item, shmipc's name, the standard library's name)
COMPARISONS = {
    "pool_map_int": ("Pool.map(x+1, list of 200_000 ints)", 8, "shmipc.Pool", "mp.Pool"),
    "pool_map_100k": ("Pool.map(fingerprint, 2000 x 100 KiB bytes)", BLOB_SIZE, "shmipc.Pool", "mp.Pool"),
    "executor_map": ("ProcessPoolExecutor.map(x+1, 200_000 ints, chunksize=1000)", 8,
                     "shmipc.ProcessPoolExecutor", "cf.ProcessPoolExecutor"),
    "executor_map_blobs": ("ProcessPoolExecutor.map(fingerprint, 2000 x 100 KiB bytes, chunksize=100)",
                           BLOB_SIZE, "shmipc.ProcessPoolExecutor", "cf.ProcessPoolExecutor"),
    # (bytes per item: what a map moves, one 100 KiB object for its 100 items)
    "executor_map_large": ("20 x ProcessPoolExecutor.map(len, 100 x one 100 KiB bytes object, chunksize=100)",
                           BLOB_SIZE // N_LARGE, "shmipc.ProcessPoolExecutor", "cf.ProcessPoolExecutor"),
}
BLOB_CHUNK = 100                    # executor_map_blobs: 20 chunks of 10 MB
LARGE_MAPS = 20                     # executor_map_large: maps per timed round
TUNED = "mp.Pool (tuned)"           # multiprocessing.Pool with the chunksize that suited it best


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


def _rounds(fns: tuple[Callable[[], Any], ...], expected: list, names: tuple[str, ...],
            repeat: int) -> tuple[list[float], ...]:
    """`repeat` timed runs of each function, alternating; every result checked."""
    times: tuple[list[float], ...] = tuple([] for _ in fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            out = fn()
            times[i].append(time.perf_counter() - t0)
            _check(out, expected, names[i])
    return times


def _maps(one: Callable[[], Any]) -> list:
    """LARGE_MAPS maps one after another, their results joined (to be checked)."""
    out: list = []
    for _ in range(LARGE_MAPS):
        out += list(one())
    return out


def _tune(pool: Any, fn: Callable, items: list, expected: list, processes: int, passes: int = 2) -> int:
    """The chunksize that suits multiprocessing.Pool best for this map, from
    two runs of each candidate around its default (whose results are
    checked too): a fair baseline is a tuned one."""
    default = -(-len(items) // (processes * 4))
    candidates = sorted({max(1, default // 16), max(1, default // 4), default, default * 2})
    best, best_t = default, float("inf")
    for _ in range(passes):             # (twice each: one run on a busy machine says little)
        for chunksize in candidates:
            t0 = time.perf_counter()
            out = pool.map(fn, items, chunksize)
            took = time.perf_counter() - t0
            _check(out, expected, f"mp.Pool chunksize={chunksize}")
            if took < best_t:
                best, best_t = chunksize, took
    return best


def run(processes: int = 2, repeat: int = 3, context: str = "fork") -> list[dict[str, Any]]:
    """Run the comparisons; one row each: name, label, every round's seconds
    for both sides (``shmipc_rounds_s``, ``stdlib_rounds_s``), the best of
    each (``shmipc_s``, ``stdlib_s``), ``speedup`` (best over best); for the
    Pool.map rows also ``tuned_rounds_s``, ``tuned_s``, ``tuned_chunksize``
    and ``speedup_tuned`` (against multiprocessing with that chunksize)."""
    import shmipc

    ctx = multiprocessing.get_context(context)
    ints = list(range(N_INTS))                  # a list for both: neither side gets a range to slice
    want_ints = [x + 1 for x in ints]
    data = blobs()
    want_blobs = [fingerprint(b) for b in data]
    large = [bytes(BLOB_SIZE)] * N_LARGE         # one object, repeated (as the report)
    want_large = [BLOB_SIZE] * N_LARGE
    timings: dict[str, tuple[list[float], ...]] = {}
    tuned: dict[str, int] = {}
    with shmipc.Pool(processes, context=context) as mine, ctx.Pool(processes) as theirs:
        _check(mine.map(inc, ints[:1000]), want_ints[:1000], "shmipc.Pool")     # warm up
        _check(theirs.map(inc, ints[:1000]), want_ints[:1000], "mp.Pool")
        for name, fn, items, want in (("pool_map_int", inc, ints, want_ints),
                                      ("pool_map_100k", fingerprint, data, want_blobs)):
            k = tuned[name] = _tune(theirs, fn, items, want, processes, passes=1 if repeat == 1 else 2)
            timings[name] = _rounds(
                (lambda: mine.map(fn, items), lambda: theirs.map(fn, items),
                 lambda: theirs.map(fn, items, k)), want, ("shmipc.Pool", "mp.Pool", TUNED), repeat)
    with shmipc.ProcessPoolExecutor(processes, mp_context=context) as mine_ex, \
            concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as theirs_ex:
        _check(mine_ex.map(inc, ints[:1000], chunksize=100), want_ints[:1000], "shmipc.ProcessPoolExecutor")
        _check(theirs_ex.map(inc, ints[:1000], chunksize=100), want_ints[:1000], "cf.ProcessPoolExecutor")
        names = ("shmipc.ProcessPoolExecutor", "cf.ProcessPoolExecutor")
        timings["executor_map"] = _rounds(
            (lambda: list(mine_ex.map(inc, ints, chunksize=1000)),
             lambda: list(theirs_ex.map(inc, ints, chunksize=1000))), want_ints, names, repeat)
        timings["executor_map_blobs"] = _rounds(
            (lambda: list(mine_ex.map(fingerprint, data, chunksize=BLOB_CHUNK)),
             lambda: list(theirs_ex.map(fingerprint, data, chunksize=BLOB_CHUNK))), want_blobs, names, repeat)
        # (well under a millisecond a map: a round is LARGE_MAPS of them, all checked)
        timings["executor_map_large"] = _rounds(
            (lambda: _maps(lambda: mine_ex.map(len, large, chunksize=N_LARGE)),
             lambda: _maps(lambda: theirs_ex.map(len, large, chunksize=N_LARGE))),
            want_large * LARGE_MAPS, names, repeat)
    rows = []
    for name, (label, _item_bytes, _mine, _theirs) in COMPARISONS.items():
        mine_t, theirs_t, *more = timings[name]
        row = {"name": name, "label": label, "shmipc_rounds_s": mine_t, "stdlib_rounds_s": theirs_t,
               "shmipc_s": min(mine_t), "stdlib_s": min(theirs_t),
               "speedup": min(theirs_t) / min(mine_t), "processes": processes, "context": context}
        if more:
            row.update({"tuned_rounds_s": more[0], "tuned_s": min(more[0]), "tuned_chunksize": tuned[name],
                        "speedup_tuned": min(more[0]) / min(mine_t)})
        rows.append(row)
    return rows
