"""What the readiness descriptor costs a Pipe's send/recv (issue 10).

Three variants of the same one-way stream (a child process sends N small
messages through a shmipc Pipe, the parent receives and checks each), run
interleaved in one process so the ratios share the machine's state:

* ``before``    -- the sender's ring has no notify descriptor
                   (``_set_notify(-1)``): the put path as it was before
                   readiness existed, but for one never-taken branch;
* ``unarmed``   -- the default: nobody polls, so after the first message
                   a put costs one relaxed load of ``wait.ready_signalled``
                   (the first message's byte stays out);
* ``armed``     -- the receiver waits with ``select`` on ``fileno()``
                   before every recv (as an event loop would), so it
                   re-arms whenever it empties the ring and the sender
                   sends a byte per burst.

Plus a single-process put/get loop on one ring (no processes, no waiting:
the put path's own cost), ``before`` vs ``unarmed``.

Prints a table and, with --json, the raw figures. Usage:
    .venv/bin/python benchmarks/bench_readiness.py [--messages N] [--repeat R] [--json]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import select
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import shmipc  # noqa: E402


def _sender(conn, n: int, notify: bool) -> None:
    if not notify:
        conn._send_ring._set_notify(-1)
    payload = b"m" * 48
    for _ in range(n):
        conn.send_bytes(payload)
    conn.send_bytes(b"end")
    conn.close()


def stream(variant: str, n: int) -> float:
    """Messages per second received, for one variant."""
    ctx = multiprocessing.get_context("fork")
    r, w = shmipc.Pipe(duplex=False)
    p = ctx.Process(target=_sender, args=(w, n, variant != "before"))
    p.start()
    w.close()
    fd = r.fileno() if variant == "armed" else -1
    got = 0
    t0 = time.perf_counter()
    while True:
        if fd >= 0:
            select.select([fd], [], [], 10)
        m = r.recv_bytes()
        if m == b"end":
            break
        if len(m) != 48:
            raise AssertionError(f"bad message of {len(m)} bytes")
        got += 1
    dt = time.perf_counter() - t0
    p.join()
    r.close()
    if got != n:
        raise AssertionError(f"received {got} of {n}")
    return n / dt


def local_loop(variant: str, n: int) -> float:
    """put+get pairs per second on one ring in one process."""
    arena = shmipc.Arena(shmipc.Arena.size_for(rings=[1 << 20]))
    ring = arena.ring(1 << 20, producers="one", consumers="one")
    rfd, wfd = os.pipe2(os.O_NONBLOCK)
    if variant != "before":
        ring._set_notify(wfd, False)
    payload = b"m" * 48
    t0 = time.perf_counter()
    for _ in range(n):
        ring.put(payload)
        if ring.get() is None:
            raise AssertionError
    dt = time.perf_counter() - t0
    if variant != "before":
        assert os.read(rfd, 100) == b"R"        # one byte for the whole run
    ring.close()
    arena.close()
    os.close(rfd), os.close(wfd)
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, list[float]] = {}
    for rep in range(args.repeat):
        # interleaved, in alternating order: drift and warm-up hit every variant alike
        order = 1 if rep % 2 == 0 else -1
        for variant in ("before", "unarmed", "armed")[::order]:
            results.setdefault(f"pipe {variant}", []).append(stream(variant, args.messages))
        for variant in ("before", "unarmed")[::order]:
            results.setdefault(f"ring {variant}", []).append(local_loop(variant, args.messages))
    results = {k: results[k] for k in ("pipe before", "pipe unarmed", "pipe armed",
                                       "ring before", "ring unarmed")}
    med = {k: statistics.median(v) for k, v in results.items()}
    if args.json:
        print(json.dumps({"messages": args.messages, "repeat": args.repeat, "results": results,
                          "median": med}, indent=1))
        return
    print(f"{args.messages} messages of 48 bytes, median of {args.repeat} interleaved runs "
          f"(load {os.getloadavg()[0]:.1f})")
    print(f"{'variant':<16}{'msgs/s':>14}{'vs before':>12}")
    for k, v in med.items():
        base = med["pipe before"] if k.startswith("pipe") else med["ring before"]
        print(f"{k:<16}{v:>14,.0f}{v / base:>12.3f}")


if __name__ == "__main__":
    main()
