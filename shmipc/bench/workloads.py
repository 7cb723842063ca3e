"""The workloads of `shmipc bench`, run inside one measurement process.

Each measurement process (forked fresh by the runner) opens the transport,
forks its peer, runs ``rounds`` timed rounds of ``seconds`` each and returns a
dict of figures; the runner keeps the best round.

How receivers verify (so no transport can win by dropping or mangling data):
the sender cycles through a pool of P distinct messages (P a power of two);
message ``i`` is ``pool[i % P]``, whose first and last 8 bytes hold ``i % P``
and whose body is fixed random bytes. The receiver compares every message it
gets, byte for byte, with the one it expects next (a memcmp, in place for
views and arrays: see _equal_buffer), so a lost, reordered, truncated or corrupted
message is an error. A zero-length message ends a round; the receiver then
reports its count, which must equal the sender's. (``verify="stamps"``, used
by benchmarks/bench_ring.py for zero-copy receives, checks every message's
length and stamps and every byte of one message in FULL_EVERY.)

Timing: a throughput round runs from the sender's first send to the moment
the receiver has the end marker (both read CLOCK_MONOTONIC, which all
processes share), so data still buffered in a transport when the sender
stops is counted only once it is delivered. A ping-pong round times every
round trip on the sender's side.
"""
from __future__ import annotations

import itertools
import json
import os
import random
import select
import signal
import struct
import time
from typing import Any

from shmipc.bench.transports import BATCH, Endpoint, Transport

__all__ = ["measure", "message_pool", "VerifyError"]

_STAMP = struct.Struct("<Q")
POOL_BYTES = 16 << 20           # the message pool stays below this
HANDSHAKE_TIMEOUT = 30.0
FULL_EVERY = 16                 # verify="stamps": every byte of one message in this many


class VerifyError(AssertionError):
    """A receiver got something other than what was sent."""


def message_pool(size: int, seed: int = 5) -> list[bytes]:
    """P distinct messages of `size` bytes, each stamped with its index at
    both ends (see the module docstring)."""
    count = 16
    while count < 1024 and count * 2 * size <= POOL_BYTES:
        count *= 2
    body = random.Random(seed).randbytes(size)
    pool = []
    for k in range(count):
        stamp = _STAMP.pack(k)
        if size >= 16:
            pool.append(stamp + body[8:size - 8] + stamp)
        else:
            pool.append((stamp + body)[:size] if size else b"")
    # (messages under 8 bytes cannot all differ; the count check still holds)
    return pool


def array_pool(nbytes: int, seed: int = 5) -> list[Any]:
    """Like message_pool, for float64 numpy arrays of `nbytes` bytes."""
    import numpy as np

    n = max(nbytes // 8, 2)
    count = 16
    rng = np.random.default_rng(seed)
    body = rng.random(n)
    pool = []
    for k in range(count):
        a = body.copy()
        a[0] = a[-1] = float(k)
        pool.append(a)
    return pool


# ---------------------------------------------------------------- helpers
def _send_line(fd: int, obj: Any) -> None:
    data = (json.dumps(obj) + "\n").encode()
    while data:
        data = data[os.write(fd, data):]


class _LineReader:
    """Read newline-terminated JSON from a pipe with a deadline."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def read(self, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {what} from the peer process within {timeout:.0f} s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise EOFError(f"the peer process exited before sending its {what}")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def _equal_buffer(view: Any, expected: bytes) -> bool:
    """Compare a buffer (memoryview, ndarray) with the expected bytes, in
    place: ``bytes.startswith`` takes any contiguous buffer and compares
    with one memcmp, as the C ring's receiver does. Here: 3.0 us at 64 KiB
    and 40-50 us at 1 MiB, against 4.4 / 78-106 us copying to bytes first
    and 15 / 59 us for numpy's == and all()."""
    n = view.nbytes if hasattr(view, "nbytes") else len(view)
    return n == len(expected) and expected.startswith(view)


# ---------------------------------------------------------------- one-way throughput
def _stamps_equal(buf: Any, expected: bytes) -> bool:
    """Same length and the same 8-byte stamps at both ends."""
    mv = buf if isinstance(buf, bytes) else memoryview(buf).cast("B")
    return (len(mv) == len(expected) and bytes(mv[:8]) == expected[:8]
            and bytes(mv[-8:]) == expected[-8:])


def _receive_round(ep: Endpoint, mode: str, kind: str, pool: list, objects: bool,
                   verify: str = "full") -> int:
    """Receive and verify one round; returns the count before the end marker.

    `verify` "full" compares every byte of every message; "stamps" checks
    every message's length and both stamps and every byte of one message in
    FULL_EVERY (for measuring a zero-copy receive, where reading all the data
    would be the dominant cost of the receiver and not of the transport).

    Raises:
        VerifyError: a message differs from the expected one.
    """
    count_per_cycle = len(pool)
    cycles = 0
    if kind == "bytes" and mode == "single" and verify == "full":
        recv = ep.recv
        while True:
            for exp in pool:
                m = recv()
                if m != exp:
                    return _mismatch(m, exp, pool, cycles)
            cycles += 1
    if kind == "bytes" and mode == "batch" and verify == "full":
        assert ep.recv_many is not None
        recv_many = ep.recv_many
        # a whole batch is compared with its expected slice in one list ==
        # (item by item in C, ~10 ns a 64 B message, where a Python loop
        # costs ~80: more than the ring's own put_many + get_many); a batch
        # that differs (the end marker, a fault) is then gone through item
        # by item to say where
        count = len(pool)
        doubled = pool + pool
        i = n = 0
        while True:
            got = recv_many()
            k = len(got)
            if k == 1:
                # (large messages come one a call: compared as the single
                # receiver compares, without a slice of the expected list,
                # whose cost would be the verification's, not the ring's)
                if got[0] == pool[i]:
                    n += 1
                    i = (i + 1) % count
                    continue
            elif k <= count and got == doubled[i:i + k]:
                n += k
                i = (i + k) % count
                continue
            for m in got:
                exp = pool[i]
                if m != exp:
                    if len(m) == 0:
                        return n
                    raise VerifyError(f"message {n}: got {len(m)} bytes that differ from the "
                                      f"{len(exp)} sent")
                n += 1
                i = (i + 1) % count
    # views and numpy arrays: compare buffers in place
    np = None
    if kind == "numpy":
        import numpy as np
    raw = [memoryview(a).cast("B").tobytes() if kind == "numpy" else a for a in pool]
    n = 0
    while True:
        for i in range(count_per_cycle):
            if mode == "batch":
                raise ValueError("verify='stamps' is not implemented for batches")
            if mode == "view":
                assert ep.recv_view is not None
                with ep.recv_view(timeout=60) as v:
                    nb = v.nbytes if hasattr(v, "nbytes") else len(v)
                    if nb == 0:
                        return n
                    if kind == "numpy" and not objects:      # raw bytes: the array over them, no copy
                        v = np.frombuffer(v, np.float64)  # type: ignore[union-attr]
                    if kind == "numpy" and not (isinstance(v, np.ndarray) and v.dtype == np.float64):  # type: ignore[union-attr]
                        raise VerifyError(f"message {n}: got {type(v).__name__} instead of a float64 array")
                    if verify == "full" or n % FULL_EVERY == 0:
                        ok = _equal_buffer(v, raw[i])
                    else:
                        ok = _stamps_equal(v, raw[i])
            else:
                m = ep.recv_obj() if (kind == "numpy" and objects) else ep.recv()
                if kind == "numpy" and not objects:
                    m = np.frombuffer(m, np.float64)
                nb = m.nbytes if hasattr(m, "nbytes") else len(m)
                if nb == 0:
                    return n
                if kind == "numpy" and not (isinstance(m, np.ndarray) and m.dtype == np.float64
                                            and m.shape == pool[i].shape):
                    raise VerifyError(f"message {n}: got {type(m).__name__} {getattr(m, 'shape', '')} "
                                      f"instead of a float64 array of shape {pool[i].shape}")
                if verify == "full" or n % FULL_EVERY == 0:
                    ok = _equal_buffer(m, raw[i])
                else:
                    ok = _stamps_equal(m, raw[i])
            if not ok:
                raise VerifyError(f"message {n}: content differs from what was sent")
            n += 1


def _mismatch(m: Any, exp: bytes, pool: list, cycles: int) -> int:
    index = next(i for i, p in enumerate(pool) if p is exp)
    n = cycles * len(pool) + index
    if len(m) == 0:
        return n
    stamp = _STAMP.unpack(m[:8])[0] if len(m) >= 8 else None
    raise VerifyError(f"message {n}: got {len(m)} bytes stamped {stamp}, expected {len(exp)} bytes "
                      f"stamped {index} (a message was lost, reordered or corrupted)")


def _send_round(ep: Endpoint, mode: str, kind: str, pool: list, objects: bool,
                seconds: float) -> tuple[int, float]:
    """Send pool messages cyclically for `seconds`, then the end marker.
    Returns (messages sent, start time)."""
    size = _nbytes(pool[0])
    stride = max(1, min(len(pool), 16384 // max(size, 1)))
    if kind == "numpy":
        items = pool if objects else [memoryview(a).cast("B") for a in pool]
        send = ep.send_obj if objects else ep.send
        end: Any = items[0][:0]
    else:
        items, send, end = pool, ep.send, b""
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    if mode == "batch":
        assert ep.send_many is not None
        send_many = ep.send_many
        step = min(BATCH, len(items))
        chunks = [items[j:j + step] for j in range(0, len(items), step)]
        for chunk in itertools.cycle(chunks):
            send_many(chunk)
            n += len(chunk)
            if time.perf_counter() >= deadline:
                break
    else:
        chunks = [items[j:j + stride] for j in range(0, len(items), stride)]
        for chunk in itertools.cycle(chunks):
            for m in chunk:
                send(m)
            n += len(chunk)
            if time.perf_counter() >= deadline:
                break
    send(end)
    return n, t0


def _nbytes(m: Any) -> int:
    return m.nbytes if hasattr(m, "nbytes") else len(m)


# ---------------------------------------------------------------- the floor
def _memcpy_round(pool: list, seconds: float) -> dict:
    """Copy the pool's messages, one after another, into one buffer for
    `seconds`, from a Python loop as the transports are driven: the floor
    that one copy per message puts under any transport (see bench.Memcpy)."""
    size = _nbytes(pool[0])
    buf = memoryview(bytearray(size))
    stride = max(1, min(len(pool), 16384 // max(size, 1)))
    chunks = [pool[j:j + stride] for j in range(0, len(pool), stride)]
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    for chunk in itertools.cycle(chunks):
        for m in chunk:
            buf[:] = m
        n += len(chunk)
        if time.perf_counter() >= deadline:
            break
    dt = time.perf_counter() - t0
    if bytes(buf[:8]) != bytes(chunk[-1][:8]):
        raise VerifyError("memcpy left the wrong bytes in the buffer")
    return {"messages": n, "seconds": dt, "msgs_per_s": n / dt, "mb_per_s": n * size / dt / 1e6}


def _c_ring_rounds(size: int, rounds: int, seconds: float, tmpdir: str,
                   cpus: tuple[int, int] | None, verify: str = "full") -> list[dict]:
    """Run the C ring floor (transports.CRing): a warm-up, then `rounds`
    rounds, each a fresh pair of processes. Its receiver verifies as the
    Python receivers do (`verify`: every byte, or stamps and every byte of
    one message in FULL_EVERY), so the floor does the same work per message."""
    import subprocess

    from shmipc.bench.transports import LARGE, build_c_ring

    binary = build_c_ring(tmpdir)
    mode = "view" if size >= LARGE else "copy"
    out = []
    for r in range(rounds + 1):
        args = [binary, str(size), str(min(seconds, 0.05) if r == 0 else seconds), mode, verify]
        if cpus is not None:
            args += [str(cpus[0]), str(cpus[1])]
        done = subprocess.run(args, capture_output=True, text=True, timeout=60 + seconds * 10)
        if done.returncode != 0:
            raise VerifyError(f"the C ring failed: {done.stderr.strip()[-300:]}")
        figures = json.loads(done.stdout)
        n, dt = figures["messages"], figures["seconds"]
        if r:
            out.append({"messages": n, "seconds": dt, "msgs_per_s": n / dt, "mb_per_s": n * size / dt / 1e6})
    return out


# ---------------------------------------------------------------- ping-pong
def _echo(ep: Endpoint) -> int:
    """Send back every message until the end marker; returns the count."""
    recv, send = ep.recv, ep.send
    n = 0
    while True:
        m = recv()
        send(m)
        if len(m) == 0:
            return n
        n += 1


def _pingpong_round(ep: Endpoint, pool: list, seconds: float) -> dict:
    from array import array

    recv, send, clock = ep.recv, ep.send, time.perf_counter_ns
    samples = array("q")
    append = samples.append
    deadline = time.perf_counter_ns() + int(seconds * 1e9)
    n = 0
    while True:
        for exp in pool:
            t = clock()
            send(exp)
            m = recv()
            t2 = clock()
            append(t2 - t)
            if m != exp:
                raise VerifyError(f"round trip {n}: the echo differs from what was sent")
            n += 1
        if t2 >= deadline:
            break
    send(b"")
    if len(recv()) != 0:
        raise VerifyError("the echo of the end marker is not empty")
    ordered = sorted(samples)
    return {
        "round_trips": n,
        "median_us": ordered[len(ordered) // 2] / 1e3,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] / 1e3,
        "min_us": ordered[0] / 1e3,
        "mean_us": sum(samples) / len(samples) / 1e3,
        "round_trips_per_s": n / (sum(samples) / 1e9),
    }


# ---------------------------------------------------------------- pool.map
def _pool_records(processes: int, rounds: int) -> list[dict]:
    """Run shmipc/bench/pools.py; one record per pool per comparison, with
    every round's figure, and a reference record (``floor``) for each
    comparison that has a machine floor."""
    from shmipc.bench.pools import COMPARISONS, FLOOR, LARGE_MAPS, N_BLOBS, N_INTS, N_LARGE, TUNED, run

    counts = {"pool_map_int": N_INTS, "pool_map_100k": N_BLOBS, "executor_map": N_INTS,
              "executor_map_blobs": N_BLOBS, "executor_map_large": N_LARGE * LARGE_MAPS}
    records = []
    for row in run(processes=processes, repeat=rounds):
        label, item_bytes, mine, theirs = COMPARISONS[row["name"]]
        n = counts[row["name"]]
        sides = [(mine, row["shmipc_rounds_s"], True, None), (theirs, row["stdlib_rounds_s"], False, None)]
        if "tuned_rounds_s" in row:     # multiprocessing with the chunksize that suited it best
            sides.append((TUNED, row["tuned_rounds_s"], False, row["tuned_chunksize"]))
        if "floor_rounds_s" in row:     # the machine's floor: a reference row, not a peer
            sides.append((FLOOR, row["floor_rounds_s"], False, None))
        for transport, times, is_shmipc, chunksize in sides:
            figures = [{"items": n, "seconds": s, "items_per_s": n / s, "mb_per_s": n * item_bytes / s / 1e6}
                       for s in times]
            record = {"transport": transport, "shmipc": is_shmipc, "reference": transport == FLOOR,
                      "pool_kind": row["name"], "title": label, "rounds": figures,
                      "best": max(figures, key=lambda f: f["items_per_s"]), "status": "ok"}
            if chunksize is not None:
                record["chunksize"] = chunksize
            records.append(record)
    return records


# ---------------------------------------------------------------- entry point
def measure(transport: Transport, workload: str, size: int, rounds: int, seconds: float,
            tmpdir: str, pool_kind: str = "ints", processes: int = 2, verify: str = "full",
            cpus: tuple[int, int] | None = None) -> dict:
    """Run one measurement in this (fresh) process and return its figures:
    ``{"rounds": [...]}``, one dict per round. With `cpus` (sender's CPU,
    receiver's CPU) both processes are pinned (``--pin``; not for pools).

    Raises:
        VerifyError: a receiver got wrong data. TimeoutError / EOFError: the
        peer process hung or died.
    """
    if workload == "pool":
        return {"rounds": [], "records": _pool_records(processes, rounds)}
    kind = "numpy" if workload == "numpy" else "bytes"
    pool: list = array_pool(size) if kind == "numpy" else message_pool(size)
    if transport.mode == "cring":
        return {"rounds": _c_ring_rounds(size, rounds, seconds, tmpdir, cpus, verify)}
    if transport.mode == "memcpy":
        return {"rounds": [_memcpy_round(pool, min(seconds, 0.05) if r == 0 else seconds)
                           for r in range(rounds + 1)][1:]}
    objects = transport.objects
    channel = transport.open(size, tmpdir)
    ready_r, ready_w = os.pipe()
    result_r, result_w = os.pipe()
    parent = os.getpid()
    if cpus is not None:
        os.sched_setaffinity(0, {cpus[0]})
    pid = os.fork()
    if pid == 0:                                            # the peer: receives / echoes
        code = 0
        try:
            from shmipc._proc import die_with_parent

            die_with_parent(parent)
            if cpus is not None:
                os.sched_setaffinity(0, {cpus[1]})
            os.close(ready_r)
            os.close(result_r)
            ep = channel.side("b")
            for _ in range(rounds + 1):                     # +1: the warm-up round
                _send_line(ready_w, {"ready": True})
                try:
                    if workload == "pingpong":
                        n = _echo(ep)
                    else:
                        n = _receive_round(ep, transport.mode, kind, pool, objects, verify)
                    _send_line(result_w, {"count": n, "t_end": time.perf_counter()})
                except Exception as exc:
                    _send_line(result_w, {"error": f"{type(exc).__name__}: {exc}"})
                    code = 1
                    break
            ep.close()
        except BaseException as exc:
            try:
                _send_line(result_w, {"error": f"{type(exc).__name__}: {exc}"})
            except Exception:
                pass
            code = 1
        os._exit(code)
    os.close(ready_w)
    os.close(result_w)
    ready = _LineReader(ready_r)
    results = _LineReader(result_r)
    out: list[dict] = []
    previous_handler = _watch_peer(pid)
    ep = channel.side("a")
    warmup = min(seconds, 0.05)
    try:
        # round 0 warms up (connections, page faults of fresh buffers) and is
        # verified like the others but not reported
        for round_no in range(rounds + 1):
            ready.read(HANDSHAKE_TIMEOUT, "ready signal")
            duration = warmup if round_no == 0 else seconds
            if workload == "pingpong":
                try:
                    stats = _pingpong_round(ep, pool, duration)
                except Exception as exc:
                    _raise_peer_error(results, exc)
                    raise
                reply = results.read(HANDSHAKE_TIMEOUT, "result")
                if "error" in reply:
                    raise VerifyError(f"echo side: {reply['error']}")
                if reply["count"] != stats["round_trips"]:
                    raise VerifyError(f"echo side saw {reply['count']} messages, "
                                      f"{stats['round_trips']} were sent")
                if round_no:
                    out.append(stats)
                continue
            try:
                sent, t0 = _send_round(ep, transport.mode, kind, pool, objects, duration)
            except Exception as exc:
                # the receiver may have stopped on purpose (it found a wrong
                # message): its verdict explains the broken channel
                _raise_peer_error(results, exc)
                raise
            reply = results.read(max(60.0, seconds * 20), "result")
            if "error" in reply:
                raise VerifyError(f"receiver: {reply['error']}")
            if reply["count"] != sent:
                raise VerifyError(f"receiver got {reply['count']} messages, {sent} were sent")
            dt = reply["t_end"] - t0
            nbytes = _nbytes(pool[0])
            if round_no:
                out.append({"messages": sent, "seconds": dt, "msgs_per_s": sent / dt,
                            "mb_per_s": sent * nbytes / dt / 1e6})
        ep.close()
    except PeerExited as exc:
        _raise_peer_error(results, exc)      # the peer's own account, when it gave one
        raise
    finally:
        signal.signal(signal.SIGCHLD, previous_handler)
        _reap(pid)
        channel.close()
        os.close(ready_r)
        os.close(result_r)
    return {"rounds": out}


class PeerExited(EOFError):
    """The peer process of a measurement exited (or was killed) before its rounds were done."""


def _watch_peer(pid: int) -> Any:
    """Make the death of the peer `pid` interrupt whatever this process waits
    in (a put on a full ring, a write to a full pipe, a read), at once,
    rather than after the measurement's timeout. Returns the previous SIGCHLD
    handler, to restore.

    A peer that exits with status 0 has finished its rounds: not an error
    (its last result may still be in the pipe)."""

    def on_child_exit(signum: int, frame: Any) -> None:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or (info.si_code == os.CLD_EXITED and info.si_status == 0):
            return
        if info.si_code == os.CLD_EXITED:
            how = f"exited with status {info.si_status}"
        else:
            try:
                how = f"was killed by {signal.Signals(info.si_status).name}"
            except ValueError:
                how = f"was killed by signal {info.si_status}"
        raise PeerExited(f"the peer process {pid} {how} before the measurement was done")

    return signal.signal(signal.SIGCHLD, on_child_exit)


def _raise_peer_error(results: _LineReader, exc: BaseException) -> None:
    """If the peer reported an error, raise it (chained to `exc`)."""
    if isinstance(exc, VerifyError):
        return
    try:
        reply = results.read(2.0, "result")
    except Exception:
        return
    if isinstance(reply, dict) and "error" in reply:
        raise VerifyError(f"receiver: {reply['error']}") from exc


def _reap(pid: int, timeout: float = 10.0) -> None:
    """Wait for the peer; kill it if it does not exit in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.002)
    try:
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    os.waitpid(pid, 0)
