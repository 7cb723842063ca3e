"""Arenas: nameless, file-backed, named; region tables; close; bad input."""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import stat
import subprocess
import sys
import textwrap
import uuid

import pytest

import shmipc
from shmipc.arena import DATA_START, MAX_REGIONS, MIN_SIZE
from conftest import fork_child, shm_entries, wait_child


def unique_name() -> str:
    return f"shmipc-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.mark.timeout(20)
def test_anonymous_arena_is_shared_with_forked_children(no_leaks):
    with shmipc.Arena(1 << 20) as arena:
        ring = arena.ring(4096)
        block = arena.block(64, name="flags")

        def child():
            block[0] = 7
            ring.put(b"from child")

        assert wait_child(fork_child(child)) == 0
        assert ring.get(timeout=5) == b"from child" and block[0] == 7
        assert arena.kind == "anonymous" and arena.size == 1 << 20


@pytest.mark.timeout(20)
@pytest.mark.parametrize("size, exc", [(0, ValueError), (MIN_SIZE - 1, ValueError), (1.5, TypeError), ("1", TypeError),
                                       (10 ** 30, ValueError)])        # (was an OverflowError from C)
def test_bad_sizes(size, exc):
    with pytest.raises(exc, match="size"):
        shmipc.Arena(size)


@pytest.mark.timeout(20)
def test_named_arena_attach_by_unrelated_process(no_leaks):
    name = unique_name()
    with shmipc.Arena.named(name, 1 << 20) as arena:
        info = os.stat(f"/dev/shm/{name}")
        assert stat.S_IMODE(info.st_mode) == 0o600
        ring = arena.ring(4096, name="tasks")
        ring.put({"hello": "world"})
        code = textwrap.dedent(f"""
            import shmipc
            a = shmipc.Arena.attach({name!r})
            r = a.ring(name="tasks")
            msg = r.get(timeout=5)
            r.put(msg["hello"].upper())
            a.close()
        """)
        subprocess.run([sys.executable, "-c", code], check=True, timeout=30, cwd=os.path.dirname(shmipc.__path__[0]))
        assert ring.get(timeout=5) == "WORLD"
        with pytest.raises(FileExistsError, match=name):
            shmipc.Arena.named(name, 1 << 20)
    assert name not in shm_entries()           # the owner unlinked it on close
    with pytest.raises(FileNotFoundError, match=name):
        shmipc.Arena.attach(name)


@pytest.mark.timeout(20)
def test_forked_child_closing_a_named_arena_does_not_unlink_it(no_leaks):
    name = unique_name()
    arena = shmipc.Arena.named(name, 1 << 20)
    assert wait_child(fork_child(arena.close)) == 0
    assert name in shm_entries()
    other = shmipc.Arena.attach(name)
    other.close()
    arena.close()
    assert name not in shm_entries()


@pytest.mark.timeout(20)
def test_file_arena_writes_reach_the_file(tmp_path, no_leaks):
    path = tmp_path / "arena.bin"
    with shmipc.Arena.from_file(path, size=1 << 20) as arena:
        ring = arena.ring(4096, name="persist")
        ring.put(b"kept in the file")
        arena.buf[-5:] = b"tail!"
    assert path.stat().st_size == 1 << 20
    assert path.read_bytes()[-5:] == b"tail!"
    with shmipc.Arena.from_file(path) as again:                   # attaches: header is valid
        assert again.ring(name="persist").get(timeout=1) == b"kept in the file"


@pytest.mark.timeout(20)
def test_private_file_mapping_never_reaches_the_file(tmp_path, no_leaks):
    path = tmp_path / "data.bin"
    path.write_bytes(b"A" * 8192)
    with shmipc.Arena.from_file(path, private=True, raw=True) as arena:
        assert bytes(arena.buf[:4]) == b"AAAA"
        arena.buf[:4] = b"BBBB"
        assert bytes(arena.buf[:4]) == b"BBBB"
    assert path.read_bytes() == b"A" * 8192
    with pytest.raises(ValueError, match="beyond the end"):
        shmipc.Arena.from_file(path, size=1 << 20, private=True, raw=True)
    with pytest.raises(shmipc.CorruptArena, match="not an shmipc arena"):
        shmipc.Arena.from_file(path, size=1 << 20, private=True)
    with pytest.raises(FileNotFoundError):
        shmipc.Arena.from_file(tmp_path / "missing", private=True)


@pytest.mark.timeout(20)
def test_raw_file_mapping_and_foreign_files(tmp_path, no_leaks):
    path = tmp_path / "foreign.bin"
    path.write_bytes(b"not an arena" + bytes(MIN_SIZE))
    with pytest.raises(shmipc.CorruptArena, match="raw=True"):
        shmipc.Arena.from_file(path)
    with shmipc.Arena.from_file(path, raw=True) as raw:
        assert bytes(raw.buf[:12]) == b"not an arena"
        raw.buf[:3] = b"NOT"
        with pytest.raises(ValueError, match="raw mapping"):
            raw.ring(4096)
    assert path.read_bytes()[:3] == b"NOT"
    with pytest.raises(ValueError, match="give a size"):
        shmipc.Arena.from_file(tmp_path / "empty.bin")


@pytest.mark.timeout(20)
def test_a_raw_mapping_of_an_arena_file_has_no_rings(tmp_path, no_leaks):
    """raw=True maps the bytes as they are: ring() and block() used to work
    on it when the file happened to be an arena, writing into the file
    that the docstring says raw mode leaves alone."""
    path = tmp_path / "arena.bin"
    with shmipc.Arena.from_file(path, size=1 << 20) as arena:
        arena.ring(4096, name="r").put(b"kept")
    before = path.read_bytes()
    with shmipc.Arena.from_file(path, raw=True) as raw:
        for call in (lambda: raw.ring(4096), lambda: raw.ring(name="r"), lambda: raw.block(64),
                     raw.info, lambda: list(raw.regions())):
            with pytest.raises(ValueError, match="raw mapping"):
                call()
    assert path.read_bytes() == before
    with pytest.raises(FileNotFoundError, match="empty"):
        shmipc.Arena.from_file("")


@pytest.mark.parametrize("rings, blocks, match", [
    ([-1], [], "power of two"), ([0], [], "power of two"), ([1000], [], "power of two"),
    ([1 << 60], [], "power of two"), ([], [0], "positive"), ([], [-5], "positive"),
    ([1 << 40] * 200, [], "at most"),
])
def test_size_for_refuses_what_ring_and_block_would(rings, blocks, match):
    with pytest.raises(ValueError, match=match):
        shmipc.Arena.size_for(rings=rings, blocks=blocks)


def test_an_arena_on_dev_zero_cannot_be_pickled(no_leaks):
    """Each shared mapping of /dev/zero is memory of its own: the receiver
    of a pickled /dev/zero arena used to map and format an empty arena of
    its own, silently ("no ring named 'r'")."""
    with shmipc.Arena.from_file("/dev/zero", size=1 << 20) as arena:
        arena.ring(4096, name="r").put(1)
        with pytest.raises(TypeError, match="/dev/zero"):
            pickle.dumps(arena)


@pytest.mark.timeout(60)
def test_a_pickled_file_arena_is_the_same_file_even_once_unlinked(tmp_path):
    """A file arena used to pickle as its path alone. Unlinked after it
    was made (a common pattern), the receiver then created a new empty
    arena file there and left it behind; replaced, it opened another
    file. Now an arena whose path still names its file travels by path,
    checked again (device and inode) when it is opened; one whose file
    was unlinked or replaced travels as its file descriptor."""
    path = tmp_path / "arena.bin"
    arena = shmipc.Arena.from_file(path, size=1 << 20)
    try:
        arena.ring(4096, name="r").put(b"one")
        by_path = pickle.dumps(arena)
        os.unlink(path)
        with pytest.raises(FileNotFoundError, match="removed"):
            pickle.loads(by_path)
        assert not path.exists()
        (tmp_path / "other.bin").write_bytes(b"x")
        os.rename(tmp_path / "other.bin", path)            # another file under the name
        with pytest.raises(FileNotFoundError, match="replaced"):
            pickle.loads(by_path)
        assert path.read_bytes() == b"x"
        p = mp.get_context("spawn").Process(target=_pickled_arena_child, args=(arena, "r"))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        ring = arena.ring(name="r")
        assert ring.get(timeout=5) == b"one" and ring.get(timeout=5) == p.pid
    finally:
        arena.close()
    assert path.read_bytes() == b"x"


@pytest.mark.timeout(20)
def test_dev_zero_shared_mapping_is_an_anonymous_shared_arena(no_leaks):
    with shmipc.Arena.from_file("/dev/zero", size=1 << 20) as arena:
        ring = arena.ring(4096)
        assert wait_child(fork_child(ring.put, "through /dev/zero")) == 0
        assert ring.get(timeout=5) == "through /dev/zero"
    with pytest.raises(ValueError, match="size"):
        shmipc.Arena.from_file("/dev/zero")


@pytest.mark.timeout(20)
def test_corrupt_headers_are_reported(tmp_path):
    path = tmp_path / "arena.bin"
    with shmipc.Arena.from_file(path, size=1 << 20) as arena:
        arena.ring(4096, name="r")
    data = bytearray(path.read_bytes())
    cases = {
        "version": (8, (99).to_bytes(4, "little")),
        "allocation mark": (24, (10 << 20).to_bytes(8, "little")),
        "region table": (32, (500).to_bytes(4, "little")),
    }
    for what, (offset, value) in cases.items():
        bad = bytearray(data)
        bad[offset: offset + len(value)] = value
        path.write_bytes(bad)
        with pytest.raises(shmipc.CorruptArena, match=what):
            shmipc.Arena.from_file(path)
    bad = bytearray(data)
    entry = 64
    bad[entry + 72: entry + 80] = (1 << 40).to_bytes(8, "little")      # region offset way out
    path.write_bytes(bad)
    with pytest.raises(shmipc.CorruptArena, match="outside"):
        shmipc.Arena.from_file(path)
    bad = bytearray(data)
    bad[DATA_START: DATA_START + 8] = b"garbage!"                      # the ring's magic
    path.write_bytes(bad)
    with shmipc.Arena.from_file(path) as arena:
        with pytest.raises(shmipc.CorruptArena, match="magic"):
            arena.ring(name="r")


@pytest.mark.timeout(20)
def test_region_table(no_leaks):
    with shmipc.Arena(4 << 20) as arena:
        a = arena.ring(4096, name="a", producers="one")
        arena.ring(8192)
        arena.block(100, name="b")
        regions = list(arena.regions())
        assert [(r.name, r.kind) for r in regions] == [("a", "ring"), ("#1", "ring"), ("b", "block")]
        assert all(r.offset % 64 == 0 for r in regions)
        assert regions[0].meta == {"producers": "one", "consumers": "many"}
        assert a.name == "a" and a.arena is arena
        with pytest.raises(KeyError):
            arena.block(name="a")                      # a ring, not a block
        with pytest.raises(ValueError, match="size"):
            arena.block(0)


@pytest.mark.timeout(20)
def test_arena_table_fills_up_cleanly(no_leaks):
    with shmipc.Arena(16 << 20) as arena:
        for i in range(MAX_REGIONS):
            arena.block(64)
        with pytest.raises(shmipc.ArenaFull, match=str(MAX_REGIONS)):
            arena.block(64)


@pytest.mark.timeout(20)
def test_views_outlive_close_without_crashing(no_leaks):
    arena = shmipc.Arena(1 << 20)
    ring = arena.ring(4096)
    ring.put(b"abc")
    view_cm = ring.get_view()
    view = view_cm.__enter__()
    arena.close()                        # the mapping stays until the view is released
    assert bytes(view) == b"abc"
    with pytest.raises(ValueError, match="closed"):
        ring.put(b"x")
    view_cm.__exit__(None, None, None)
    with pytest.raises(ValueError):
        bytes(view)                      # released: an exception, not a segfault


def _pickled_arena_child(arena, name):
    arena.ring(name=name).put(os.getpid())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_anonymous_arena_passes_to_spawned_children_by_fd(method):
    with shmipc.Arena(1 << 20) as arena:
        arena.ring(4096, name="r")
        p = mp.get_context(method).Process(target=_pickled_arena_child, args=(arena, "r"))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        assert arena.ring(name="r").get(timeout=5) == p.pid
