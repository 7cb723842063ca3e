"""Hostile files and segments (issue 9): arena headers and region tables with
random and targeted values, truncated files, huge claimed sizes, and paths
that are not files at all, opened with ``Arena.from_file`` and
``Arena.attach`` in forked children.

Each case must end in an exception of an expected type (CorruptArena,
ValueError, OSError) or in an arena whose table reads back, never in a
signal death, a hang, a MemoryError (the children run under RLIMIT_DATA) or
a write to a file that is not an arena (bytes, size and mtime compared).

The children report each case over a pipe before and after running it; a
child that dies mid-case names the case, and the next child goes on after it.
Figures (cases, outcomes) are printed with -s.
"""
from __future__ import annotations

import json
import os
import queue
import random
import resource
import select
import signal
import socket
import stat
import struct
import time
import uuid
from collections import Counter

import pytest

import shmipc
from shmipc.arena import (DATA_START, ENTRY, ENTRY_SIZE, MAGIC, MAX_REGIONS, META_MAX,
                          MIN_SIZE, TABLE_OFFSET)

SEED = int(os.environ.get("SHMIPC_FUZZ_SEED") or 20261130)
RANDOM_CASES = int(os.environ.get("SHMIPC_FUZZ_CASES") or 1200)
CASE_STALL_S = 15.0          # a case that makes no progress for this long is a hang
EXPECTED = (shmipc.CorruptArena, ValueError, OSError)

# header fields: (name, offset, struct format)
HEADER_FIELDS = [("magic", 0, "8s"), ("version", 8, "<I"), ("flags", 12, "<I"), ("size", 16, "<Q"),
                 ("used", 24, "<Q"), ("nregions", 32, "<I"), ("max_regions", 36, "<I"), ("creator", 40, "<I")]
# region entry fields, relative to the entry
ENTRY_FIELDS = [("kind", 64, "<I"), ("flags", 68, "<I"), ("offset", 72, "<Q"), ("size", 80, "<Q"),
                ("meta_len", 88, "<I")]
HOSTILE_META = [
    b"", b"{", b"[]", b"null", b"1e999", b'"x"', b"{}" + b" " * 300,
    b'{"dtype": "S999999999999"}', b'{"dtype": "<f8", "producers": "one", "consumers": 7}',
    b'{"dtype": [["a", "<i4", [1000000000]]]}', b'{"dtype": [["a", "O"]]}', b'{"dtype": 5}',
    b'{"dtype": {"a": 1}}', b'{"dtype": [["a"]]}', b'{"dtype": [[1, 2, 3, 4, 5]]}',
    b'{"dtype": "V0"}', b'{"dtype": "(2,3)f8"}', b'{"dtype": "' + b"[" * 200 + b'"}',
    json.dumps({"dtype": [["f%d" % i, "<i8"] for i in range(40)]}).encode()[:META_MAX],
    b'{"dtype": "<i4", "x": "' + b"\xff\xfe" + b'"}', b'{"a": ' * 100 + b"1" + b"}" * 100,
]


def _u(fmt: str) -> list[int]:
    bits = struct.calcsize(fmt) * 8
    top = (1 << bits) - 1
    values = {0, 1, 2, 63, 64, 255, 4096, DATA_START - 1, DATA_START, DATA_START + 64,
              MIN_SIZE, 1 << 20, (1 << 20) + 1, 1 << 31, top >> 1, top - 1, top}
    return sorted(v for v in values if v <= top)


def build_template(path: str) -> tuple[bytes, int]:
    """A valid arena with two rings (one with a dtype, one holding a message)
    and a block: (its bytes, its size)."""
    size = shmipc.Arena.size_for(rings=[1024, 4096], blocks=[64])
    with shmipc.Arena.from_file(path, size=size) as arena:
        arena.ring(1024, name="records", dtype=[("a", "<i4"), ("b", "<f8")])
        arena.ring(4096, name="msgs").put(b"hello")
        arena.block(64, name="flags")[:4] = b"flag"
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data, size


class Edit:
    """A file's content as edits of the template (cases stay small in memory)."""

    def __init__(self, patches: tuple = (), length: int | None = None) -> None:
        self.patches = patches
        self.length = length

    def __call__(self, template: bytes) -> bytes:
        b = bytearray(template)
        for offset, raw in self.patches:
            b[offset: offset + len(raw)] = raw
        return bytes(b if self.length is None else b[: self.length])


def make_cases(template: bytes, rng: random.Random) -> list[tuple]:
    """(label, kind, payload) triples. kind 'bytes': payload is an Edit of
    the template; 'sparse': (Edit, file length); 'special': a name run by
    run_case."""
    cases: list[tuple] = []
    n = len(template)

    def patched(offset: int, raw: bytes) -> Edit:
        return Edit(((offset, raw),))

    for name, off, fmt in HEADER_FIELDS:
        if fmt == "8s":
            for v in (b"\0" * 8, b"SHMIPCAX", b"shmipcar", MAGIC[:7] + b"\0"):
                cases.append((f"header.{name}={v!r}", "bytes", patched(off, v)))
            continue
        for v in _u(fmt):
            cases.append((f"header.{name}={v}", "bytes", patched(off, struct.pack(fmt, v))))
    for i in (0, 1, 2, 3, MAX_REGIONS - 1):
        base = TABLE_OFFSET + i * ENTRY_SIZE
        for name, off, fmt in ENTRY_FIELDS:
            for v in _u(fmt):
                cases.append((f"entry{i}.{name}={v}", "bytes", patched(base + off, struct.pack(fmt, v))))
        for raw in (b"\xff" * 64, b"a" * 64, b"\0" * 64, b"#0" + b"\0" * 62, b"\xc3" + b"\0" * 63,
                    b"records\0", b"msgs\0"):
            cases.append((f"entry{i}.name={raw[:10]!r}", "bytes", patched(base, raw)))
        for meta in HOSTILE_META:
            edit = Edit(((base + ENTRY.size, meta), (base + 88, struct.pack("<I", len(meta)))))
            cases.append((f"entry{i}.meta={meta[:30]!r}", "bytes", edit))
    # a region table claiming every entry, and one pointing both rings at one region
    cases.append(("header.nregions=max with empty entries", "bytes", patched(32, struct.pack("<I", MAX_REGIONS))))
    first = ENTRY.unpack_from(template, TABLE_OFFSET)
    alias = ENTRY.pack(b"msgs", first[1], 0, first[3], first[4], 0)
    cases.append(("entry1 aliases entry0's region", "bytes", patched(TABLE_OFFSET + ENTRY_SIZE, alias)))
    # truncations
    for length in sorted({0, 1, 7, 8, 63, 64, 100, TABLE_OFFSET + ENTRY_SIZE, DATA_START - 1, DATA_START,
                          DATA_START + 100, MIN_SIZE - 1, MIN_SIZE, n // 2, n - 4096, n - 1}):
        cases.append((f"truncated to {length}", "bytes", Edit((), length)))
    # a huge claimed size: in the header only, and in a sparse file that has it
    for claimed in (1 << 40, (1 << 63) - 4096, n + 4096):
        cases.append((f"header.size={claimed}, file {n}", "bytes", patched(16, struct.pack("<Q", claimed))))
    big = patched(16, struct.pack("<Q", 1 << 40))
    cases.append(("sparse file of 1 TiB, header says so", "sparse", (big, 1 << 40)))
    cases.append(("sparse file of 1 TiB, valid header of a small arena", "sparse", (Edit(), 1 << 40)))
    # random: a few bytes or words anywhere in the header and the table
    for k in range(RANDOM_CASES):
        patches = []
        what = rng.random()
        if what < 0.4:
            for _ in range(rng.randint(1, 8)):
                patches.append((rng.randrange(0, TABLE_OFFSET + 4 * ENTRY_SIZE), bytes([rng.randrange(256)])))
        elif what < 0.8:
            for _ in range(rng.randint(1, 3)):
                off = rng.randrange(0, TABLE_OFFSET + 4 * ENTRY_SIZE - 8) & ~3
                value = rng.choice([0, 1, rng.getrandbits(64), rng.getrandbits(20), (1 << 64) - 1, n, DATA_START])
                patches.append((off, value.to_bytes(8, "little")))
        else:
            patches.append((rng.randrange(0, DATA_START), rng.randbytes(64)))
        length = rng.randrange(0, n) if rng.random() < 0.1 else None
        cases.append((f"random #{k}", "bytes", Edit(tuple(patches), length)))
    for special in ("symlink to an arena", "dangling symlink", "symlink to a non-arena", "fifo",
                    "directory", "/dev/zero", "/dev/zero with size", "/dev/null with size", "empty file",
                    "empty file with size", "unix socket", "non-arena with size", "zeros with size",
                    "another user's arena"):
        cases.append((special, "special", special))
    return cases


def snapshot(path: str):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    data = b""
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            f.seek(0)
            data = f.read(1 << 22)
    return st.st_mode, st.st_size, st.st_mtime_ns, data


def exercise(arena) -> None:
    """Use everything the table offers: a correct arena reads back."""
    try:
        if hasattr(arena, "info"):          # (absent before issue 9: the fuzz also runs on old code)
            arena.info()
        for region in list(arena.regions()):
            if region.kind == "ring":
                ring = arena.ring(name=region.name)
                ring.stats()
                try:
                    ring.get(timeout=0)
                except queue.Empty:
                    pass
                ring.close()
            elif not region.name.startswith("#"):     # unnamed blocks cannot be found by name
                arena.block(name=region.name)
    finally:
        arena.close()


def run_case(case, template: bytes, workdir: str, shm_name: str) -> str:
    """Run one case in this (forked) process. Returns the outcome's name;
    raises AssertionError on a finding."""
    label, kind, payload = case
    path = os.path.join(workdir, "case.arena")
    opened_as_arena = False
    outcomes = []

    def attempt(open_fn, watched):
        nonlocal opened_as_arena
        before = snapshot(watched) if watched else None
        was_arena = before is not None and before[3][:8] == MAGIC
        try:
            arena = open_fn()
        except MemoryError:
            raise AssertionError(f"{label}: MemoryError (unbounded allocation)")
        except EXPECTED as exc:
            outcomes.append(type(exc).__name__)
            if watched:
                assert snapshot(watched) == before, f"{label}: {watched} modified by a failed open"
            return
        try:
            exercise(arena)
            outcomes.append("arena")
            opened_as_arena = True
        except MemoryError:
            raise AssertionError(f"{label}: MemoryError (unbounded allocation)")
        except EXPECTED as exc:
            outcomes.append(f"arena then {type(exc).__name__}")
        if watched and not was_arena:
            assert snapshot(watched) == before, f"{label}: {watched}, not an arena, was modified"

    if kind in ("bytes", "sparse"):
        edit, length = (payload, None) if kind == "bytes" else payload
        data = edit(template)
        length = len(data) if length is None else length
        with open(path, "wb") as f:
            f.write(data)
            f.truncate(length)
        attempt(lambda: shmipc.Arena.from_file(path), path)
        attempt(lambda: shmipc.Arena.from_file(path, size=1 << 20), path)
        attempt(lambda: shmipc.Arena.from_file(path, private=True), path)
        if kind == "bytes":
            shm_path = f"/dev/shm/{shm_name}"
            fd = os.open(shm_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
            try:
                attempt(lambda: shmipc.Arena.attach(shm_name), shm_path)
            finally:
                os.unlink(shm_path)
        os.unlink(path)
        return "/".join(outcomes)
    target = os.path.join(workdir, "target")
    try:
        if "symlink" in payload:
            if payload == "symlink to an arena":
                with shmipc.Arena.from_file(target, size=MIN_SIZE):
                    pass
            elif payload == "symlink to a non-arena":
                with open(target, "wb") as f:
                    f.write(b"precious")
            os.symlink(target, path)
            watched = target if os.path.exists(target) else None
            attempt(lambda: shmipc.Arena.from_file(path, size=1 << 20), watched)
            attempt(lambda: shmipc.Arena.from_file(path), watched)
            assert os.path.lexists(target) == (payload != "dangling symlink"), f"{label}: target created"
            os.symlink(target, f"/dev/shm/{shm_name}")
            try:
                attempt(lambda: shmipc.Arena.attach(shm_name), watched)
            finally:
                os.unlink(f"/dev/shm/{shm_name}")
        elif payload == "fifo":
            os.mkfifo(path)
            attempt(lambda: shmipc.Arena.from_file(path, size=1 << 20), path)
            attempt(lambda: shmipc.Arena.from_file(path, private=True), path)
            os.mkfifo(f"/dev/shm/{shm_name}")
            try:
                attempt(lambda: shmipc.Arena.attach(shm_name), None)
            finally:
                os.unlink(f"/dev/shm/{shm_name}")
        elif payload == "directory":
            os.mkdir(path)
            attempt(lambda: shmipc.Arena.from_file(path, size=1 << 20), None)
            attempt(lambda: shmipc.Arena.from_file(path, private=True, size=1 << 20), None)
            os.mkdir(f"/dev/shm/{shm_name}")
            try:
                attempt(lambda: shmipc.Arena.attach(shm_name), None)
            finally:
                os.rmdir(f"/dev/shm/{shm_name}")
            os.rmdir(path)
        elif payload == "/dev/zero":
            attempt(lambda: shmipc.Arena.from_file("/dev/zero"), None)
        elif payload == "/dev/zero with size":
            attempt(lambda: shmipc.Arena.from_file("/dev/zero", size=1 << 20), None)
            assert opened_as_arena, f"{label}: /dev/zero should map as a fresh arena"
        elif payload == "/dev/null with size":
            attempt(lambda: shmipc.Arena.from_file("/dev/null", size=1 << 20), None)
        elif payload in ("empty file", "empty file with size"):
            open(path, "wb").close()
            size = 1 << 20 if payload.endswith("size") else None
            attempt(lambda: shmipc.Arena.from_file(path, size=size), path)
            attempt(lambda: shmipc.Arena.from_file(path, size=size, raw=False, private=True), path)
        elif payload == "unix socket":
            s = socket.socket(socket.AF_UNIX)
            try:
                s.bind(path)
                attempt(lambda: shmipc.Arena.from_file(path, size=1 << 20), None)
            finally:
                s.close()
        elif payload == "non-arena with size":
            with open(path, "wb") as f:
                f.write(b"precious data, not an arena")
            attempt(lambda: shmipc.Arena.from_file(path, size=1 << 20), path)
        elif payload == "zeros with size":
            with open(path, "wb") as f:
                f.write(bytes(MIN_SIZE + 100))
            attempt(lambda: shmipc.Arena.from_file(path, size=1 << 20), path)
            attempt(lambda: shmipc.Arena.from_file(path), path)
        elif payload == "another user's arena":
            if os.geteuid() != 0:
                return "skipped (not root)"
            with shmipc.Arena.from_file(path, size=MIN_SIZE):
                pass
            os.chown(path, 65534, 65534)
            attempt(lambda: shmipc.Arena.from_file(path), path)
            assert outcomes[-1] == "PermissionError", f"{label}: {outcomes}"
        else:
            raise AssertionError(f"unknown special case {payload}")
    finally:
        for p in (path, target):
            if os.path.lexists(p) and not os.path.isdir(p):
                os.unlink(p)
    return "/".join(outcomes)


def child_main(cases, template: bytes, start: int, out: int, workdir: str, shm_name: str) -> None:
    soft = 1 << 30          # private memory beyond the parent's: a forged size must not allocate it
    used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (used + soft, resource.RLIM_INFINITY))
    for i in range(start, len(cases)):
        os.write(out, f"S {i}\n".encode())
        try:
            outcome = run_case(cases[i], template, workdir, shm_name)
            os.write(out, f"R {i} {outcome}\n".encode())
        except AssertionError as exc:
            os.write(out, f"F {i} {str(exc)[:300]!r}\n".encode())
        except BaseException as exc:
            os.write(out, f"F {i} unexpected {type(exc).__name__}: {str(exc)[:200]!r}\n".encode())
    os.write(out, b"D\n")


@pytest.mark.timeout(240)
def test_hostile_files_and_segments(tmp_path, no_leaks):
    t0 = time.monotonic()
    template, size = build_template(str(tmp_path / "template.arena"))
    cases = make_cases(template, random.Random(SEED))
    shm_name = f"shmipc-hostile-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    outcomes: Counter = Counter()
    findings: list[str] = []
    start, children = 0, 0
    while start < len(cases):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                child_main(cases, template, start, w, str(tmp_path), shm_name)
            finally:
                os._exit(0)
        children += 1
        os.close(w)
        current, buf, done = None, b"", False
        while True:
            ready, _, _ = select.select([r], [], [], CASE_STALL_S)
            if not ready:
                findings.append(f"case {current} {cases[current][0] if current is not None else ''}: hang")
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                tag, _, rest = line.decode().partition(" ")
                if tag == "S":
                    current = int(rest)
                elif tag == "R":
                    i, _, outcome = rest.partition(" ")
                    outcomes[outcome] += 1
                elif tag == "F":
                    i, _, msg = rest.partition(" ")
                    findings.append(f"case {i} {cases[int(i)][0]}: {msg}")
                    outcomes["FINDING"] += 1
                elif tag == "D":
                    done = True
        os.close(r)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        if done:
            break
        if code < 0 and current is not None:
            findings.append(f"case {current} {cases[current][0]}: killed by signal {-code}")
        start = (current if current is not None else start) + 1
    for leftover in (f"/dev/shm/{shm_name}",):
        if os.path.lexists(leftover):
            os.unlink(leftover) if not os.path.isdir(leftover) else os.rmdir(leftover)
    elapsed = time.monotonic() - t0
    print(f"\nhostile files: {len(cases)} cases ({RANDOM_CASES} random, seed {SEED}) in "
          f"{children} child(ren), {elapsed:.1f} s; outcomes:")
    for outcome, count in outcomes.most_common():
        print(f"  {count:6d}  {outcome}")
    print(f"  findings: {len(findings)}")
    assert not findings, "\n".join(findings[:30])
    assert sum(outcomes.values()) == len(cases)
    assert any("arena" == o.split("/")[0] for o in outcomes), "no case opened as an arena: the fuzz is vacuous"
