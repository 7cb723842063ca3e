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

The machine's floor under the ints and the bytes rows (:func:`floor_rounds`,
the ``floor`` row of their tables): the CPU that any process pool must spend
on that map, measured in this process, spread over the CPUs its processes
can use at once (a pool takes at least that long, however well its
processes overlap; on 2 cores with 2 workers, the total over 2).

* ints: the calls (``list(map(inc, chunk))``), the arguments encoded in the
  parent and rebuilt as ints in a worker, the results encoded in a worker
  and rebuilt in the parent, and freeing them, with the cheapest codec known
  (``codec="int64"``: native int64s, what shmipc uses; ``"pickle"``, what
  multiprocessing uses, costs more: benchmarks/bench_pool_floor.py shows both).
* bytes: two copies of every byte, into shared memory (a 4 MiB buffer written
  round and round, as a task ring is) and out of it into a bytes object of
  the worker's own. The first is made by the parent alone (only the parent
  can read its own objects: a pipe's ``write`` is that copy too), from one
  thread in every pool compared here, so it is a bound of its own.

So each table shows how close to the machine's limit each pool gets, and the
floor's ratio to multiprocessing is the best ratio any pool could reach in
that run.
"""
from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import pickle
import statistics
import time
from typing import Any, Callable

__all__ = ["run", "inc", "fingerprint", "floor_rounds", "N_INTS", "N_BLOBS", "BLOB_SIZE",
           "COMPARISONS", "TUNED", "FLOOR", "FLOOR_OF"]

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
FLOOR = "floor"                     # the machine's floor under a comparison (floor_rounds)
# comparison -> the floor under it (executor_map_large is a round-trip row: no floor)
FLOOR_OF = {"pool_map_int": "ints", "executor_map": "ints",
            "pool_map_100k": "bytes", "executor_map_blobs": "bytes"}
FLOOR_CHUNKS = 8                    # the ints in mp.Pool's default chunks for 2 workers
RING_BYTES = 4 << 20                # the bytes floor's stand-in for a task ring


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
    """`repeat` timed runs of each function, alternating; every result checked.
    Each result is freed before the next run starts its clock: rebinding
    `out` inside the timed span would charge each side with freeing the
    other's 200,000 results."""
    times: tuple[list[float], ...] = tuple([] for _ in fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            out = fn()
            times[i].append(time.perf_counter() - t0)
            _check(out, expected, names[i])
            del out
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
            del out                     # (freed outside the next run's clock, as in _rounds)
            if took < best_t:
                best, best_t = chunksize, took
    return best


def _cpu(fn: Callable[[], Any]) -> float:
    """Process CPU seconds of one call, what it returned freed (the load of
    other processes inflates CPU time far less than wall time)."""
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def _int_parts(codec: str) -> dict[str, Callable[[], Any]]:
    """What any pool spends on ``map(inc, list of N_INTS ints)``, part by part."""
    if codec == "int64":
        from shmipc._ring import pack_int64_list as encode, unpack_int64_list as decode
    elif codec == "pickle":
        encode, decode = functools.partial(pickle.dumps, protocol=5), pickle.loads
    else:
        raise ValueError(f"codec must be 'int64' or 'pickle', got {codec!r}")
    ints = list(range(N_INTS))
    size = -(-N_INTS // FLOOR_CHUNKS)
    chunks = [ints[i: i + size] for i in range(0, N_INTS, size)]
    results = [[x + 1 for x in c] for c in chunks]
    args_sent = [encode(c) for c in chunks]
    results_sent = [encode(r) for r in results]
    return {
        "workers: the calls, list(map(inc, chunk))": lambda: _each(lambda c: list(map(inc, c)), chunks),
        "parent: encode the arguments": lambda: _each(encode, chunks),
        "workers: rebuild the arguments (and free them)": lambda: _each(decode, args_sent),
        "workers: encode the results": lambda: _each(encode, results),
        "parent: rebuild the results (and free them)": lambda: _each(decode, results_sent),
    }


def _each(fn: Callable[[Any], Any], items: list) -> None:
    """fn(item) for each item, each result freed before the next call: a
    floor must be a lower bound, so the memory is reused (no page faults),
    as the cheapest pool would."""
    for item in items:
        fn(item)


def _bytes_parts(data: list[bytes]) -> dict[str, Callable[[], Any]]:
    """The two copies any pool makes of ``map(fingerprint, data)``'s bytes."""
    ring = memoryview(bytearray(RING_BYTES))
    size = len(data[0])
    slots = [(i * size) % (RING_BYTES - size) for i in range(len(data))]

    def copy_in() -> None:              # the parent: each blob into the ring, round and round
        for at, blob in zip(slots, data):
            ring[at: at + size] = blob

    def copy_out() -> None:             # a worker: out of the ring into a bytes object of its own
        for at in slots:
            bytes(ring[at: at + size])  # (freed at once, as a worker's is: memory reused, no page faults)

    return {"parent: copy into shared memory": copy_in, "workers: copy out of it": copy_out}


def floor_rounds(processes: int = 2, repeat: int = 3, codec: str = "int64",
                 data: list[bytes] | None = None) -> dict[str, list[dict[str, float]]]:
    """The floors under the ints and the bytes maps (see the module
    docstring), `repeat` times: ``{"ints": rounds, "bytes": rounds}``, each
    round ``{part: CPU seconds, ..., "floor_s": the least wall time any pool
    of `processes` workers could take}``: the workers' parts over the
    workers, everything over the CPUs the parent and workers can use at once
    (``min(usable CPUs, processes + 1)``), and for bytes the parent's copy;
    whichever is largest. `data`: the blobs (else blobs()).

    Raises:
        ValueError: `processes` < 1, `repeat` < 1, an unknown codec, or
            `data` empty or of mixed sizes (or larger than half the ring).
    """
    if processes < 1 or repeat < 1:
        raise ValueError(f"processes and repeat must be at least 1, got {processes} and {repeat}")
    data = data if data is not None else blobs()
    sizes = {len(b) for b in data}
    if len(sizes) != 1 or not 0 < len(data[0]) <= RING_BYTES // 2:
        raise ValueError(f"data must be bytes objects of one size between 1 and {RING_BYTES // 2} bytes, "
                         f"got {len(data)} of sizes {sorted(sizes)[:5]}")
    ints, copies = _int_parts(codec), _bytes_parts(data)
    # the parent and the workers together run on at most this many CPUs at once
    lanes = min(len(os.sched_getaffinity(0)), processes + 1)
    out: dict[str, list[dict[str, float]]] = {"ints": [], "bytes": []}
    for _ in range(repeat):
        for kind, parts in (("ints", ints), ("bytes", copies)):
            cost = {what: _cpu(fn) for what, fn in parts.items()}
            parent = sum(v for what, v in cost.items() if what.startswith("parent"))
            workers = sum(cost.values()) - parent
            cost["floor_s"] = max(workers / processes, (parent + workers) / lanes,
                                  # the parent writes every byte from one thread (as every pool
                                  # compared here does): that alone bounds the bytes map
                                  parent if kind == "bytes" else 0.0)
            out[kind].append(cost)
    return out


def paired_speedup(mine: list[float], theirs: list[float]) -> float:
    """The median over rounds of their time over mine in the same round (the
    sides take turns round by round, see _rounds): on a busy machine a
    steadier figure than best against best."""
    return statistics.median(t / m for m, t in zip(mine, theirs))


def run(processes: int = 2, repeat: int = 3, context: str = "fork") -> list[dict[str, Any]]:
    """Run the comparisons; one row each: name, label, every round's seconds
    for both sides (``shmipc_rounds_s``, ``stdlib_rounds_s``), the best of
    each (``shmipc_s``, ``stdlib_s``), ``speedup`` (best over best) and
    ``speedup_median`` (paired_speedup); for the
    Pool.map rows also ``tuned_rounds_s``, ``tuned_s``, ``tuned_chunksize``,
    ``speedup_tuned`` and ``speedup_tuned_median`` (against multiprocessing
    with that chunksize); for
    the rows with a floor (FLOOR_OF) ``floor_rounds_s``, ``floor_s`` and
    ``floor_speedup`` (the floor against the strongest standard-library row:
    the best ratio any pool could reach in this run)."""
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
    floors = floor_rounds(processes, repeat, data=data)     # (before the pools: no process of theirs runs)
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
               "speedup": min(theirs_t) / min(mine_t), "speedup_median": paired_speedup(mine_t, theirs_t),
               "processes": processes, "context": context}
        if more:
            row.update({"tuned_rounds_s": more[0], "tuned_s": min(more[0]), "tuned_chunksize": tuned[name],
                        "speedup_tuned": min(more[0]) / min(mine_t),
                        "speedup_tuned_median": paired_speedup(mine_t, more[0])})
        if name in FLOOR_OF:
            row["floor_rounds_s"] = [f["floor_s"] for f in floors[FLOOR_OF[name]]]
            row["floor_s"] = min(row["floor_rounds_s"])
            # the best ratio any pool could reach against the strongest baseline, in this run
            row["floor_speedup"] = min(row.get("tuned_s", row["stdlib_s"]), row["stdlib_s"]) / row["floor_s"]
        rows.append(row)
    return rows
