"""Shared test helpers: forking children with a hard deadline, and resource snapshots."""
from __future__ import annotations

import os
import signal
import struct
import time
import traceback
from typing import Any, Callable

import pytest

# make soak: SHMIPC_SOAK=N runs the kill-fuzz tests N times longer
SOAK = max(1, int(os.environ.get("SHMIPC_SOAK") or 1))

START_METHODS = ["fork", "spawn", "forkserver"]


def fork_child(fn: Callable[..., Any], *args: Any) -> int:
    """Fork a child that runs fn(*args) and exits 0, or 1 (with the traceback
    on stderr) if it raised. The child never returns into pytest."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            fn(*args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int, timeout: float = 30.0) -> int:
    """Wait for a forked child; SIGKILL it (and fail) if it outlives `timeout`.
    Returns its exit code, negative for a signal, like Popen.returncode."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {pid} still running after {timeout} s (killed)")
        time.sleep(0.005)


def region_of(ring):
    """The ring's region in its arena: (buffer, offset of the ring header)."""
    region = next(r for r in ring.arena.regions() if r.name == ring.name)
    return ring.arena.buf, region.offset


def poke(ring, field, fmt, value):
    """Write `value` (struct format `fmt`) into `ring`'s header field (a name
    of _ring._layout()): hostile values, or the state a killed process leaves."""
    from shmipc import _ring

    buf, base = region_of(ring)
    struct.pack_into(fmt, buf, base + _ring._layout()[field], value)


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name: [0] is the
    state, field N of proc(5) is [N - 3]. Raises OSError if it is gone."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def ident(pid):
    """A live process's ring identity: its pid and start-time token."""
    return (int(proc_stat(pid)[19]) % 0xFFFFFFFF + 1) << 32 | pid


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "the condition") -> None:
    """Poll a real condition (ring.stats(), a file, a pid) until it holds;
    fail the test, naming `what`, after `timeout` seconds. The way tests
    wait for a state instead of sleeping and hoping it was reached."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not reached within {timeout} s")
        time.sleep(0.002)


def wait_until_asleep(stats: Callable[[], dict], side: str = "consumers", n: int = 1,
                      timeout: float = 10.0) -> None:
    """Wait until at least `n` of a ring's `side` ("consumers" or
    "producers") sleep on it. `stats` returns the ring's stats() (a Queue's
    or a Connection end's will do). A waiter is counted just before it
    sleeps on the semaphore, after its last look at the ring: whatever the
    test does next must wake it."""
    key = f"{side}_waiting"
    wait_until(lambda: stats()[key] >= n, timeout, f"{n} {side} asleep on the ring ({key})")


def hold_until(path: str, limit: float = 60.0) -> bool:
    """A task that holds its worker until the test creates `path` (False
    after `limit` seconds without it): the test decides when the worker is
    free again. Module-level, so any start method's worker can import it."""
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def touch_then_sleep(flag: str, seconds: float, value: Any = None) -> Any:
    """A task that says it has started (creates the file `flag`), then
    sleeps: the test waits for the file instead of guessing when a worker is
    busy. Module-level, so any start method's worker can import it."""
    with open(flag, "a"):
        pass
    time.sleep(seconds)
    return value


def pending_signals(pid: int) -> set[int]:
    """Signals sent to `pid` and not yet delivered (/proc SigPnd | ShdPnd):
    a process killed while it waits for a CPU still looks alive, but its
    SIGKILL is pending here. Empty if the process is gone."""
    mask = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")):
                    mask |= int(line.split()[1], 16)
    except OSError:
        return set()
    return {sig for sig in range(1, 65) if mask >> (sig - 1) & 1}


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def processes_with(marker: str) -> list[int]:
    """Pids of the processes whose command line contains `marker`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


def _descendants(root: int) -> set[int]:
    """`root` and every process below it (from /proc/*/stat)."""
    parent_of: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        parent_of[int(entry)] = int(data[data.rfind(b")") + 2:].split()[1])
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent_of.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def is_resource_tracker(pid: int) -> bool:
    """Whether `pid` is multiprocessing's resource tracker (a child of the
    test process once anything used spawn or forkserver): not part of the
    tree the kill tests attack. Killed, it is relaunched with a warning
    ("resource_tracker: process died unexpectedly") in whatever later test
    next uses it. A process already gone counts as one: nothing to kill."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"resource_tracker" in f.read()
    except OSError:
        return True


def children_tree(pid: int) -> list[int]:
    """Every process below `pid`, from /proc's per-thread children lists:
    quick enough (no walk of all of /proc) for a kill storm to hit what a
    pool or a pipeline forks as soon as it shows up."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def kill_storm(until: Callable[[], bool], fork_server: bool = False) -> int:
    """SIGKILL every process below this one as soon as it shows up, until
    `until()`; the kills. Multiprocessing's resource tracker is spared, and
    its fork server too unless `fork_server` (the helper of forkserver pools,
    which a storm at a fork pool would only hit by the way)."""
    kills = 0
    while not until():
        for pid in children_tree(os.getpid()):
            if not is_resource_tracker(pid) and (fork_server or not is_fork_server(pid)):
                try:
                    os.kill(pid, signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
        time.sleep(0.0005)
    return kills


def _used_by_others(names: set[str], ours: set[int]) -> set[str]:
    """Those of the /dev/shm `names` that a process outside `ours` has mapped
    or open: another program's (a multiprocessing semaphore is mapped by the
    program that made it), not this test's. Matched by inode: glibc maps a
    semaphore under a temporary name before linking it to its real one."""
    inodes: dict[int, str] = {}
    for n in names:
        try:
            inodes[os.stat(f"/dev/shm/{n}").st_ino] = n
        except FileNotFoundError:
            pass
    found: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            with open(f"/proc/{entry}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6 and parts[5].startswith("/dev/shm/") and int(parts[4]) in inodes:
                        found.add(inodes[int(parts[4])])
        except (OSError, ValueError):
            pass
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if st.st_ino in inodes and os.readlink(f"/proc/{entry}/fd/{fd}").startswith("/dev/shm/"):
                found.add(inodes[st.st_ino])
    return found


def shm_created_since(before: set[str]) -> set[str]:
    """/dev/shm entries that appeared after the snapshot `before` and belong
    to this test: the machine is shared, so an entry that a process outside
    this test's process tree has mapped or open is another program's and is
    not counted."""
    mine = shm_entries() - before
    # shmipc and multiprocessing make files there, never directories: a
    # directory (joblib's memmapping folders, say) is another program's
    mine = {n for n in mine if not os.path.isdir(f"/dev/shm/{n}")}
    if mine:
        mine -= _used_by_others(mine, _descendants(os.getpid()))
    return mine


def is_fork_server(pid: int) -> bool:
    """Whether `pid` is multiprocessing's fork server: process-wide and long
    lived (as its resource tracker); a test that kills it gets a new one
    from multiprocessing at the next forkserver start (which reaps the one
    killed: until then it is a zombie, known by its pid alone)."""
    import multiprocessing.forkserver as fs

    if pid == getattr(fs._forkserver, "_forkserver_pid", None):
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.forkserver" in f.read()
    except OSError:
        return False


def live_children() -> set[int]:
    """Pids of this process's children that have not been reaped, but for
    multiprocessing's fork server (see is_fork_server)."""
    me = os.getpid()
    kids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2:].split()
        if int(fields[1]) == me and not is_fork_server(int(entry)):
            kids.add(int(entry))
    return kids


@pytest.fixture
def no_leaks(request):
    """Fail the test if it leaves open fds, /dev/shm entries (its own, see
    shm_created_since) or children behind. Not checked when the test itself
    failed: its traceback keeps its locals (arenas, rings) alive, and a
    second report of the same failure would only hide the first."""
    import gc

    fds, shm, kids = open_fds(), shm_entries(), live_children()
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        return
    gc.collect()
    deadline = time.monotonic() + 3
    while True:
        extra_fds = open_fds() - fds - {_fork_server_fd()}
        extra_shm = shm_created_since(shm)
        extra_kids = live_children() - kids
        if not (extra_fds or extra_shm or extra_kids) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
        gc.collect()
    assert not extra_shm, f"/dev/shm entries left behind: {sorted(extra_shm)}"
    assert not extra_kids, f"child processes left behind: {[(p, _cmdline(p)) for p in sorted(extra_kids)]}"
    details = {fd: _fd_target(fd) for fd in extra_fds}
    assert not extra_fds, f"file descriptors left open: {details}"


def _fork_server_fd() -> int:
    """The descriptor by which multiprocessing keeps its fork server alive
    (a new one each time the server is restarted), or -1."""
    import multiprocessing.forkserver as fs

    fd = getattr(fs._forkserver, "_forkserver_alive_fd", None)
    return fd if isinstance(fd, int) else -1


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return "?"


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (item.rep_call ...), for
    fixtures that must know whether the test itself failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)


@pytest.fixture(autouse=True)
def _no_open_views(request):
    """Debug builds (make debug): every zero-copy view a test opens is
    released, and every ring it maps is unmapped (after a collection: a ring
    left to the garbage collector counts as released once it is collected)."""
    import gc

    from shmipc import _ring

    before = _ring.debug_counters()
    yield
    call = getattr(request.node, "rep_call", None)
    if call is not None and (call.failed or hasattr(call, "wasxfail")):
        return          # its traceback (kept for the report) holds frames that hold rings
    if _ring.DEBUG:
        after = _ring.debug_counters()
        if after["rings_open"] != before["rings_open"] or after["views_open"] != before["views_open"]:
            # a pool's or queue's background thread may drop its last reference
            # a moment after the test ends: collect, and give it a bounded while
            deadline = time.monotonic() + 3
            while True:
                gc.collect()
                after = _ring.debug_counters()
                if (after["rings_open"] <= before["rings_open"] and after["views_open"] == before["views_open"]) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        assert after["views_open"] == before["views_open"], "a zero-copy view was never released"
        assert after["rings_open"] <= before["rings_open"], \
            f"rings left mapped: {after['rings_open'] - before['rings_open']} more than before the test"


@pytest.fixture(params=["multiprocessing", "shmipc"])
def impl(request):
    """The module under test, for one test body run against both (as uvloop
    runs one body against two loops): both expose Queue, Pipe, ..."""
    import multiprocessing

    import shmipc

    return multiprocessing if request.param == "multiprocessing" else shmipc


@pytest.fixture(params=START_METHODS)
def ctx(request):
    """A multiprocessing context of each start method."""
    import multiprocessing

    return multiprocessing.get_context(request.param)
