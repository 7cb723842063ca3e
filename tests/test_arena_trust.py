"""Arenas and hostile peers (issue 9): names, truncation, other users' segments
and files, failed opens that must leave nothing behind, reapers that must only
remove their own segment and must survive being killed, the re-entrant lock.

Every test uses real shared memory, files and processes. Where the old code
died of a signal the victim runs in a forked child, so a regression shows up as
a failed assertion on its exit code instead of killing pytest."""
from __future__ import annotations

import os
import select
import signal
import stat
import threading
import time
import uuid

import pytest

import shmipc
from shmipc.arena import DATA_START, HEADER, MAGIC, MIN_SIZE
from conftest import fork_child, live_children, open_fds, shm_entries, wait_child
from conftest import wait_until as wait_for

NOBODY = 65534
SMALL = shmipc.Arena.size_for(rings=[4096])
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make files owned by another user")


def unique_name() -> str:
    return f"shmipc-trust-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def children_of(pid: int) -> set[int]:
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            fields = data[data.rfind(b")") + 2:].split()
            if int(fields[1]) == pid and fields[0] != b"Z":
                kids.add(int(entry))
    return kids


def reapers_of(pid: int) -> set[int]:
    found = set()
    for kid in children_of(pid):
        try:
            with open(f"/proc/{kid}/cmdline", "rb") as f:
                if b"shmipc-reaper" in f.read():
                    found.add(kid)
        except OSError:
            pass
    return found


def stop_child(pid: int) -> None:
    """SIGKILL and reap a forked child if a failed test left it running."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def remove_shm(name: str) -> None:
    try:
        os.unlink(f"/dev/shm/{name}")
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------- 1. names
def _named_with(name):
    try:
        shmipc.Arena.named(name, MIN_SIZE)
    except ValueError as exc:
        assert repr(name) in str(exc) or name.replace("\0", "\\x00") in str(exc), exc
        os._exit(0)
    os._exit(3)


def _attach_with(name):
    try:
        shmipc.Arena.attach(name)
    except ValueError:
        os._exit(0)
    os._exit(3)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("name", ["a\0b", "\0", "x" * 300, "a/b", ".", "..", "/", "bad\udcff"])
def test_invalid_segment_names_raise_valueerror_never_crash(name, no_leaks):
    # old code: a NUL reached shm_open and segfaulted the process
    assert wait_child(fork_child(_named_with, name)) == 0
    assert wait_child(fork_child(_attach_with, name)) == 0


# ---------------------------------------------------------------- 2. truncation
def _truncate_memfd_then_read():
    arena = shmipc.Arena(1 << 20)
    ring = arena.ring(4096, name="r")
    ring.put(b"before")
    try:
        os.ftruncate(arena.fd, 0)            # what a hostile peer holding the fd would do
    except PermissionError:
        pass
    try:
        os.ftruncate(arena.fd, 1 << 30)
    except PermissionError:
        pass
    assert os.fstat(arena.fd).st_size == 1 << 20
    assert ring.get(timeout=5) == b"before"  # SIGBUS here on the old code
    arena.buf[-1] = 1
    arena.close()


@pytest.mark.timeout(30)
def test_memfd_arena_is_sealed_against_shrinking_and_growing():
    assert wait_child(fork_child(_truncate_memfd_then_read)) == 0


def _attach_truncated(name, out):
    try:
        shmipc.Arena.attach(name)
    except shmipc.CorruptArena as exc:
        os.write(out, str(exc).encode())
        os._exit(0)
    os._exit(3)


@pytest.mark.timeout(30)
def test_attach_to_a_truncated_named_segment_raises(no_leaks):
    name = unique_name()
    with shmipc.Arena.named(name, 1 << 20) as arena:
        arena.ring(4096, name="r")
        os.truncate(f"/dev/shm/{name}", MIN_SIZE + 4096)     # a same-user peer shrank it
        r, w = os.pipe()
        code = wait_child(fork_child(_attach_truncated, name, w))
        os.close(w)
        msg = os.read(r, 1000).decode()
        os.close(r)
        assert code == 0 and str(1 << 20) in msg, msg
        # the owner notices too, at the next call that reads the table
        with pytest.raises(shmipc.CorruptArena, match="truncated"):
            arena.ring(name="r")


# ---------------------------------------------------------------- 3. other users
def _make_foreign_segment(name: str) -> None:
    """A valid arena segment, then handed to another user (as if that user made it)."""
    arena = shmipc.Arena.named(name, SMALL, unlink_on_close=False)
    arena.ring(4096, name="r").put({"from": "nobody"})
    arena.close()
    os.chown(f"/dev/shm/{name}", NOBODY, NOBODY)


@needs_root
@pytest.mark.timeout(30)
def test_attach_refuses_another_users_segment_unless_asked(no_leaks):
    name = unique_name()
    _make_foreign_segment(name)
    try:
        with pytest.raises(PermissionError, match="allow_other_users"):
            shmipc.Arena.attach(name)
        with shmipc.Arena.attach(name, allow_other_users=True) as arena:
            assert arena.allow_pickle is False          # opting in to the owner does not run its code
            assert [r.name for r in arena.regions()] == ["r"]
        with shmipc.Arena.attach(name, allow_other_users=True, allow_pickle=True) as arena:
            assert arena.ring(name="r").get(timeout=5) == {"from": "nobody"}
    finally:
        remove_shm(name)


@needs_root
@pytest.mark.timeout(30)
def test_from_file_refuses_another_users_file_unless_asked(tmp_path, no_leaks):
    path = tmp_path / "theirs.arena"
    with shmipc.Arena.from_file(path, size=SMALL) as arena:
        arena.ring(4096, name="r")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(PermissionError, match="allow_other_users"):
        shmipc.Arena.from_file(path)
    with shmipc.Arena.from_file(path, allow_other_users=True) as arena:
        assert arena.allow_pickle is False
        assert [r.name for r in arena.regions()] == ["r"]


_native_ring = pytest.mark.skipif(not hasattr(shmipc._ring.Ring, "allow_pickle"),
                                  reason="the ring has no allow_pickle switch yet (ring engineer)")


@_native_ring
@pytest.mark.timeout(30)
def test_a_ring_can_refuse_pickled_messages(no_leaks):
    with shmipc.Arena(1 << 20) as arena:
        arena.ring(4096, name="r").put(["a", "list", "is", "pickled"])
        native = arena.ring(name="r", allow_pickle=False)
        native_put = arena.ring(name="r")
        native_put.put(b"bytes are native")
        with pytest.raises(shmipc.CorruptMessage, match="pickle"):
            native.get(timeout=5)
        assert native.get(timeout=5) == b"bytes are native"


@pytest.mark.timeout(30)
def test_native_only_is_refused_loudly_when_the_ring_cannot_do_it(no_leaks):
    with shmipc.Arena(1 << 20) as arena:
        arena.ring(4096, name="r")
        if hasattr(shmipc._ring.Ring, "allow_pickle"):
            assert arena.ring(name="r", allow_pickle=False).allow_pickle is False
        else:
            with pytest.raises(shmipc.ShmipcError, match="allow_pickle"):
                arena.ring(name="r", allow_pickle=False)


# ---------------------------------------------------------------- 4. files not ours
def _snapshot(path):
    st = os.lstat(path)
    data = open(path, "rb").read() if stat.S_ISREG(st.st_mode) else b""
    return st.st_size, st.st_mtime_ns, data


@pytest.mark.timeout(30)
def test_from_file_never_writes_a_file_that_is_not_an_arena(tmp_path, no_leaks):
    small = tmp_path / "small.dat"
    small.write_bytes(b"precious data")
    zeros = tmp_path / "zeros.dat"
    zeros.write_bytes(bytes(8) + b"precious data after zeros" + bytes(MIN_SIZE))
    for path in (small, zeros):
        before = _snapshot(path)
        with pytest.raises(shmipc.CorruptArena, match="not an shmipc arena"):
            shmipc.Arena.from_file(path, size=1 << 20)
        with pytest.raises(shmipc.CorruptArena, match="not an shmipc arena"):
            shmipc.Arena.from_file(path)
        assert _snapshot(path) == before, f"{path.name} was modified"
    # asked explicitly: it becomes an arena
    with shmipc.Arena.from_file(zeros, overwrite=True) as arena:
        arena.ring(1024, name="r")
    with shmipc.Arena.from_file(zeros) as arena:
        assert [r.name for r in arena.regions()] == ["r"]


@pytest.mark.timeout(30)
def test_from_file_does_not_follow_symlinks_by_default(tmp_path, no_leaks):
    victim = tmp_path / "victim.dat"
    victim.write_bytes(b"x" * 100)
    link = tmp_path / "planted"
    link.symlink_to(victim)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "would-be-created")
    before = _snapshot(victim)
    with pytest.raises(OSError, match="symbolic link"):
        shmipc.Arena.from_file(link, size=1 << 20)
    with pytest.raises(OSError, match="symbolic link"):
        shmipc.Arena.from_file(dangling, size=1 << 20)
    assert _snapshot(victim) == before
    assert not (tmp_path / "would-be-created").exists()
    with shmipc.Arena.from_file(tmp_path / "real.arena", size=SMALL) as arena:
        arena.ring(4096, name="r")
    (tmp_path / "link.arena").symlink_to(tmp_path / "real.arena")
    with shmipc.Arena.from_file(tmp_path / "link.arena", follow_symlinks=True) as arena:
        assert [r.name for r in arena.regions()] == ["r"]


# ---------------------------------------------------------------- 5. failed opens leave nothing
@pytest.mark.timeout(60)
def test_failed_named_and_attach_leave_no_fd_entry_or_process(no_leaks):
    name = unique_name()
    fds, shm, kids = open_fds(), shm_entries(), live_children()

    def unchanged():
        return open_fds() == fds and shm_entries() == shm and live_children() == kids

    failures = 0
    with pytest.raises(ValueError):
        shmipc.Arena.named(name, 100)                       # bad size
    failures += 1
    with pytest.raises((OSError, ValueError)):
        shmipc.Arena.named(name, 1 << 50)                   # cannot be mapped: after the entry exists
    failures += 1
    with pytest.raises(FileNotFoundError):
        shmipc.Arena.attach(name)
    failures += 1
    with shmipc.Arena.named(name, MIN_SIZE):
        with pytest.raises(FileExistsError):
            shmipc.Arena.named(name, MIN_SIZE)              # existing name
        failures += 1
    wait_for(unchanged, what="nothing left after the good arena closed")
    path = f"/dev/shm/{name}"
    hostile = [
        b"",                                                # empty
        bytes(MIN_SIZE - 1),                                # too small
        b"garbage!" + bytes(MIN_SIZE),                      # no magic
        HEADER.pack(MAGIC, 1, 0, 1 << 40, DATA_START, 0, 255, 1) + bytes(MIN_SIZE),   # claims 1 TiB
        HEADER.pack(MAGIC, 1, 0, MIN_SIZE, DATA_START, 999, 255, 1) + bytes(MIN_SIZE - HEADER.size),
    ]
    try:
        for data in hostile:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.write(fd, data)
            os.close(fd)
            with pytest.raises((shmipc.CorruptArena, ValueError)):
                shmipc.Arena.attach(name)
            failures += 1
            os.unlink(path)
    finally:
        remove_shm(name)
    wait_for(unchanged, what="fds, /dev/shm entries and children back to before")
    assert failures == 4 + len(hostile)


# ---------------------------------------------------------------- 6. reapers
@pytest.mark.timeout(60)
def test_old_owners_reaper_never_removes_a_new_owners_segment(no_leaks):
    name = unique_name()
    for _ in range(10):
        old = shmipc.Arena.named(name, SMALL)
        old.unlink()                                        # hand the name over early
        new = shmipc.Arena.named(name, SMALL)
        new.ring(4096, name="r").put(b"new owner")
        old.close()
        assert name in shm_entries(), "the old owner's reaper removed the new owner's segment"
        with shmipc.Arena.attach(name) as peer:
            assert peer.ring(name="r").get(timeout=5) == b"new owner"
        new.close()
        assert name not in shm_entries()


def _hand_over_owner(name, rounds, to_parent, from_parent):
    for _ in range(rounds):
        os.read(from_parent, 1)
        arena = shmipc.Arena.named(name, SMALL)
        os.write(to_parent, b"c")                           # created
        os.read(from_parent, 1)
        arena.close()                                       # a normal close
        os.write(to_parent, b"d")                           # closed (its reaper is done)


@pytest.mark.timeout(60)
def test_a_name_taken_over_right_after_a_normal_close_survives(no_leaks):
    # the old owner's reaper removed the name after close() had unlinked it,
    # deleting the next owner's segment in most hand-overs
    name = unique_name()
    rounds, lost = 10, 0
    to_parent_r, to_parent_w = os.pipe()
    from_parent_r, from_parent_w = os.pipe()
    owner = fork_child(_hand_over_owner, name, rounds, to_parent_w, from_parent_r)
    try:
        for _ in range(rounds):
            os.write(from_parent_w, b"g")
            assert os.read(to_parent_r, 1) == b"c"
            os.write(from_parent_w, b"g")
            deadline = time.monotonic() + 10
            while True:                                     # take the name the moment it is free
                try:
                    mine = shmipc.Arena.named(name, SMALL)
                    break
                except FileExistsError:
                    assert time.monotonic() < deadline, "the old owner never released the name"
            assert os.read(to_parent_r, 1) == b"d"
            if name not in shm_entries():
                lost += 1
            mine.close()
        assert wait_child(owner) == 0
        assert lost == 0, f"the old owner's reaper removed the new owner's segment in {lost} of {rounds} hand-overs"
    finally:
        stop_child(owner)
        for fd in (to_parent_r, to_parent_w, from_parent_r, from_parent_w):
            os.close(fd)
        remove_shm(name)


def _own_and_wait(name, ready_w, go_r):
    arena = shmipc.Arena.named(name, MIN_SIZE)
    os.write(ready_w, b"1")
    os.read(go_r, 1)                                        # killed while waiting here
    arena.close()


@pytest.mark.timeout(60)
def test_killing_the_reaper_then_the_owner_leaves_no_segment(no_leaks):
    name = unique_name()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    owner = fork_child(_own_and_wait, name, ready_w, go_r)
    try:
        assert os.read(ready_r, 1) == b"1"
        assert name in shm_entries()
        wait_for(lambda: len(reapers_of(owner)) == 1, what="the owner's reaper")
        (first,) = reapers_of(owner)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: reapers_of(owner) - {first}, what="a replacement reaper")
        os.kill(owner, signal.SIGKILL)
        assert wait_child(owner) == -signal.SIGKILL
        wait_for(lambda: name not in shm_entries(), what="the segment removed after its owner's death")
    finally:
        stop_child(owner)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
        remove_shm(name)


@pytest.mark.timeout(60)
def test_reaper_of_a_sigkilled_owner_spares_a_segment_that_replaced_it(no_leaks):
    name = unique_name()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    owner = fork_child(_own_and_wait, name, ready_w, go_r)
    try:
        assert os.read(ready_r, 1) == b"1"
        wait_for(lambda: len(reapers_of(owner)) == 1, what="the owner's reaper")
        (reaper,) = reapers_of(owner)
        os.kill(reaper, signal.SIGSTOP)                     # hold it until the name changed hands
        os.unlink(f"/dev/shm/{name}")
        with shmipc.Arena.named(name, MIN_SIZE) as mine:
            os.kill(owner, signal.SIGKILL)
            assert wait_child(owner) == -signal.SIGKILL
            os.kill(reaper, signal.SIGCONT)
            wait_for(lambda: not os.path.exists(f"/proc/{reaper}/cmdline")
                     or b"shmipc-reaper" not in open(f"/proc/{reaper}/cmdline", "rb").read(),
                     what="the old reaper's exit")
            assert name in shm_entries(), "the dead owner's reaper removed someone else's segment"
            assert [r.name for r in mine.regions()] == []
    finally:
        stop_child(owner)
        for fd in (ready_r, ready_w, go_r, go_w):
            os.close(fd)
        remove_shm(name)


# ---------------------------------------------------------------- 7. the lock
@pytest.mark.timeout(30)
def test_lock_is_reentrant_and_still_excludes_other_threads_and_processes(no_leaks):
    with shmipc.Arena(1 << 20) as arena:
        done = threading.Event()

        def nested():
            with arena.lock():
                block = arena.block(64, name="counter")       # deadlocked on the old code
                with arena.lock():
                    block[0] += 1
                arena.ring(4096)
            done.set()

        t = threading.Thread(target=nested, daemon=True)
        t.start()
        assert done.wait(10), "arena.block() under arena.lock() deadlocked"
        t.join()
        block = arena.block(name="counter")
        assert block[0] == 1
        # the outer holder still excludes a forked process after an inner exit
        r, w = os.pipe()
        with arena.lock():
            with arena.lock():
                pass

            def child():
                with arena.lock():
                    os.write(w, b"x")

            pid = fork_child(child)
            # a bounded check that nothing happens: the child must still be waiting
            assert select.select([r], [], [], 0.3)[0] == [], "another process entered while we held the lock"
        assert os.read(r, 1) == b"x"
        assert wait_child(pid) == 0
        os.close(r)
        os.close(w)
        del block


# ---------------------------------------------------------------- 9. public info
@pytest.mark.timeout(20)
def test_info_reports_the_validated_header(no_leaks):
    with shmipc.Arena(1 << 20) as arena:
        arena.ring(4096, name="r")
        info = arena.info()
        assert info["size"] == 1 << 20 and info["regions"] == 1 and info["used"] > DATA_START
        assert info["free"] == info["size"] - info["used"] and info["kind"] == "anonymous"
        assert info["creator_pid"] == os.getpid() and info["max_regions"] == 255


# ---------------------------------------------------------------- 8. two creators at once (F11)
def _open_at_once(path: str, go_r: int, out_w: int, who: int) -> None:
    """Wait for the go byte, open (or create) the arena, put `who` into its
    ring "r" (made by whoever comes first), report "ok" or the error."""
    os.read(go_r, 1)
    try:
        arena = shmipc.Arena.from_file(path, SMALL)
        try:
            try:
                ring = arena.ring(4096, name="r")
            except FileExistsError:
                ring = arena.ring(name="r")
            ring.put(who)
        finally:
            arena.close()
        result = "ok"
    except Exception as exc:                    # noqa: BLE001 - reported to the parent
        result = f"{type(exc).__name__}: {exc}"
    os.write(out_w, (result + "\n").encode())


@pytest.mark.timeout(60)
def test_two_processes_creating_the_same_file_arena_at_once_share_it(tmp_path, no_leaks):
    """F11: both calls of from_file(path, size) on a path that does not exist
    yet succeed and open the same arena, whoever creates it: the other never
    sees a half-made file ("is not an shmipc arena") nor a raw
    FileExistsError, and nothing is formatted twice (both messages arrive).
    No temporary file is left in the directory."""
    races = 20
    for i in range(races):
        path = str(tmp_path / f"a{i}")
        go_r, go_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            pids = [fork_child(_open_at_once, path, go_r, out_w, who) for who in (1, 2)]
            os.write(go_w, b"xx")                   # both released together
            assert [wait_child(pid, 30) for pid in pids] == [0, 0]
            os.close(out_w)
            out_w = -1
            results = sorted(os.read(out_r, 65536).decode().split("\n")[:2])
        finally:
            for fd in (go_r, go_w, out_r, out_w):
                if fd >= 0:
                    os.close(fd)
        assert results == ["ok", "ok"], f"race {i}: {results}"
        arena = shmipc.Arena.from_file(path)
        try:
            assert sorted(arena.ring(name="r").get_many(10, timeout=5)) == [1, 2], f"race {i}: re-formatted"
        finally:
            arena.close()
    assert sorted(os.listdir(tmp_path)) == sorted(f"a{i}" for i in range(races))
