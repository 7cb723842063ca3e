"""`shmipc demo`: the classic C seed example, at scale and narrated.

The seed: ``mmap(MAP_SHARED|MAP_ANONYMOUS)`` before ``fork()``, a ``sem_t``
with ``pshared=1`` inside the mapping, parent and child exchanging data under
it. Here the parent makes an anonymous shared arena, two rings in it (each
ring's process-shared semaphores live in the arena too), forks N children and
streams typed messages to them; each child answers every message with a
digest of what it received, and the parent checks every answer against what
it sent. Nothing goes through a pipe.
"""
from __future__ import annotations

import os
import sys
import time
import zlib
from typing import Any, Callable

__all__ = ["run_demo", "check_arguments", "make_message", "digest"]

TYPES = ("int", "float", "str", "bytes", "tuple", "dict", "ndarray")
WINDOW = 2048                 # messages in flight: the results ring always has room for them
TIMEOUT = 30.0                # a get that waits this long means something is stuck
PROGRESS_EVERY = 1.0          # seconds between progress lines on long runs


def make_message(seq: int, np: Any) -> Any:
    """The message number `seq`: its type rotates through TYPES; each one
    carries `seq` so the child can name it in its answer."""
    kind = TYPES[seq % (len(TYPES) if np is not None else len(TYPES) - 1)]
    if kind == "int":
        return seq
    if kind == "float":
        return seq + 0.25
    if kind == "str":
        return f"message {seq} \u2192 shared memory"
    if kind == "bytes":
        return seq.to_bytes(8, "little") * 8
    if kind == "tuple":
        return (seq, "tuple", 1.5)
    if kind == "dict":
        return {"seq": seq, "tags": ["a", "b"]}
    return np.arange(seq, seq + 32, dtype=np.int64)


def seq_of(msg: Any) -> int:
    """The sequence number a message carries (see make_message)."""
    if isinstance(msg, bool):
        raise TypeError("bool is not a demo message")
    if isinstance(msg, int):
        return msg
    if isinstance(msg, float):
        return int(msg - 0.25)
    if isinstance(msg, str):
        return int(msg.split()[1])
    if isinstance(msg, bytes):
        return int.from_bytes(msg[:8], "little")
    if isinstance(msg, tuple):
        return msg[0]
    if isinstance(msg, dict):
        return msg["seq"]
    return int(msg[0])


def digest(msg: Any) -> int:
    """A checksum of a message's type and value, computed the same way on
    both sides."""
    if hasattr(msg, "tobytes"):
        data = b"ndarray" + str(msg.dtype).encode() + msg.tobytes()
    else:
        data = type(msg).__name__.encode() + repr(msg).encode()
    return zlib.crc32(data)


def _child(index: int, tasks: Any, results: Any, parent: int) -> None:
    """A worker: answer every task with (seq, type, digest, child index)
    until the tasks ring is shut down and drained. Never returns."""
    code = 0
    try:
        from shmipc._proc import die_with_parent

        die_with_parent(parent)
        count = 0
        while True:
            try:
                batch = tasks.get_many(256, timeout=TIMEOUT)
            except EOFError:
                break
            answers = [(seq_of(m), type(m).__name__, digest(m), index) for m in batch]
            results.put_many(answers, timeout=TIMEOUT)
            count += len(batch)
        results.put(("done", index, count, os.getpid()), timeout=TIMEOUT)
    except BaseException as exc:
        try:
            results.put(("error", index, f"{type(exc).__name__}: {exc}", os.getpid()), timeout=1)
        except BaseException:
            pass
        code = 1
    os._exit(code)


MAX_CHILDREN = 256          # a demo, not a fork bomb: each child is a process
MAX_MESSAGES = 10 ** 8      # (20 minutes or more here; the demo keeps a byte a message)


def check_arguments(children: int, messages: int) -> None:
    """Raises ValueError naming the numbers if run_demo cannot take them
    (`shmipc demo` says so before anything runs)."""
    if not 1 <= children <= MAX_CHILDREN or not 1 <= messages <= MAX_MESSAGES:
        raise ValueError(f"--children ({children}) must be between 1 and {MAX_CHILDREN}, "
                         f"--messages ({messages}) between 1 and {MAX_MESSAGES}")


def run_demo(children: int = 2, messages: int = 200_000, quiet: bool = False,
             out: Any = None, progress_every: float = PROGRESS_EVERY) -> int:
    """Run the demo; returns 0 when every message was answered correctly.
    Unless `quiet`, a line every `progress_every` seconds tells how far it got.

    Raises:
        ValueError: children or messages below 1, or above MAX_CHILDREN and
            MAX_MESSAGES.
    """
    check_arguments(children, messages)
    out = out or sys.stdout
    say: Callable[[str], None] = (lambda s: None) if quiet else (lambda s: print(s, file=out, flush=True))
    import shmipc

    try:
        import numpy as np
    except ImportError:
        np = None
    me = os.getpid()
    arena = shmipc.Arena(16 << 20)
    say(f"[parent {me}] made an anonymous shared arena of {arena.size >> 20} MiB (a memfd mapped "
        "MAP_SHARED): memory that the children forked below inherit")
    tasks = arena.ring(1 << 20, name="tasks", producers="one", consumers="many")
    results = arena.ring(1 << 20, name="results", producers="many", consumers="one")
    say(f"[parent {me}] made two rings inside it: 'tasks' (parent -> children, {tasks.capacity >> 10} KiB) "
        f"and 'results' (children -> parent); each keeps its process-shared semaphores "
        "(sem_t, pshared=1) in the arena, so a waiting process sleeps and is woken across processes")
    kinds = TYPES if np is not None else TYPES[:-1]
    pids = []
    sys.stdout.flush()
    sys.stderr.flush()
    for index in range(children):
        pid = os.fork()
        if pid == 0:
            _child(index, tasks, results, me)
        pids.append(pid)
    expected = {}
    seen = bytearray(messages)
    by_type: dict[str, int] = {}
    by_child = [0] * children
    wrong: list[str] = []
    sent = received = 0
    t0 = time.perf_counter()
    next_progress = t0 + progress_every
    tty = bool(getattr(out, "isatty", lambda: False)())
    try:
        # (inside the try: output that fails here, `| head -1` or a full
        # disk, must not leave the children waiting)
        say(f"[parent {me}] forked {children} child{'ren' if children != 1 else ''}: "
            f"pids {', '.join(map(str, pids))}")
        say(f"[parent {me}] sending {messages:,} typed messages ({', '.join(kinds)}): "
            "bytes, str, numbers and arrays are encoded natively, the rest pickled; "
            "every child answers each one with a checksum")
        while received < messages:
            if not quiet and time.perf_counter() >= next_progress:
                # a long run is not silent: answered so far, and the rate
                now = time.perf_counter()
                next_progress = now + progress_every
                line = (f"[parent {me}] {received:,} of {messages:,} answered ({received / messages:.0%}), "
                        f"{received / (now - t0):,.0f} messages/s")
                print(("\r" + line) if tty else line, end="" if tty else "\n", file=out, flush=True)
            # keep at most WINDOW messages in flight, so neither ring can fill
            # up while both sides wait on each other
            if sent < messages and sent - received < WINDOW:
                batch = []
                while (sent + len(batch) < messages and sent - received + len(batch) < WINDOW
                       and len(batch) < 256):
                    msg = make_message(sent + len(batch), np)
                    expected[sent + len(batch)] = (type(msg).__name__, digest(msg))
                    batch.append(msg)
                tasks.put_many(batch, timeout=TIMEOUT)
                sent += len(batch)
            if sent < messages and sent - received < WINDOW:
                answers = results.get_many(1024, block=False) if not results.empty() else []
            else:
                answers = results.get_many(1024, timeout=TIMEOUT)
            for answer in answers:
                if answer[0] == "error":
                    wrong.append(f"child {answer[1]} (pid {answer[3]}) failed: {answer[2]}")
                    raise RuntimeError(wrong[-1])
                seq, kind, check, child = answer
                want = expected.pop(seq, None)
                if want is None:
                    wrong.append(f"answer for message {seq} that was not sent or came twice")
                elif want != (kind, check):
                    wrong.append(f"message {seq}: the child saw {kind} with checksum {check:#x}, "
                                 f"the parent sent {want[0]} with checksum {want[1]:#x}")
                else:
                    seen[seq] = 1
                    by_type[kind] = by_type.get(kind, 0) + 1
                    by_child[child] += 1
                received += 1
        elapsed = time.perf_counter() - t0
        if tty and not quiet and elapsed >= progress_every:
            print(file=out)                 # end the progress line
        tasks.shutdown()
        say(f"[parent {me}] all {messages:,} sent; shut the 'tasks' ring down: the children "
            "drain it, see EOFError and say goodbye")
        goodbyes = 0
        while goodbyes < children:
            answer = results.get(timeout=TIMEOUT)
            if answer[0] == "done":
                goodbyes += 1
                say(f"[child {answer[3]}] handled {answer[2]:,} messages, exiting")
            elif answer[0] == "error":
                wrong.append(f"child {answer[1]} (pid {answer[3]}) failed: {answer[2]}")
                goodbyes += 1
    except BaseException:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        raise
    finally:
        exits = []
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            exits.append(os.waitstatus_to_exitcode(status))
        stats_t, stats_r = tasks.stats(), results.stats()
        arena.close()
    missing = messages - sum(seen)
    say(f"[parent {me}] every child exited (exit codes {exits})")
    print(f"verified {sum(seen):,} of {messages:,} messages "
          f"({', '.join(f'{k} {v:,}' for k, v in sorted(by_type.items()))}); "
          f"per child: {', '.join(f'{n:,}' for n in by_child)}", file=out)
    print(f"rate: {messages / elapsed:,.0f} messages/s answered ({2 * messages / elapsed:,.0f} "
          f"ring messages/s both ways) in {elapsed:.2f} s with {children} "
          f"child{'ren' if children != 1 else ''} on {os.cpu_count()} cores", file=out)
    say(f"'tasks' ring: high water {stats_t['high_water']:,} B, consumers slept "
        f"{stats_t['consumer_sleeps']:,} times on its semaphore; 'results' ring: producers slept "
        f"{stats_r['producer_sleeps']:,} times, the parent {stats_r['consumer_sleeps']:,} times")
    if wrong or missing or any(exits):
        for line in wrong[:10]:
            print(f"WRONG: {line}", file=out)
        if missing:
            print(f"MISSING: {missing} messages were never answered", file=out)
        return 1
    print("OK: every message arrived once, intact, with its type", file=out)
    return 0
