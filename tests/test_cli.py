"""The `shmipc` command, run for real in subprocesses: bench (tiny settings),
demo, and inspect against a live child process that holds an arena."""
from __future__ import annotations

import errno
import io
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from conftest import proc_stat, processes_with, wait_until
from shmipc.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shmipc_cmd(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmipc", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------- bench
@pytest.mark.timeout(120)
def test_bench_quick_end_to_end(tmp_path):
    import importlib.util

    out_json, out_png, out_md = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "r.md"
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    plot_args = ["--plot", str(out_png)] if has_matplotlib else []
    proc = shmipc_cmd("bench", "--quick", "--sizes", "64,4k", "--seconds", "0.03",
                      "--json", str(out_json), *plot_args, "--markdown", str(out_md),
                      "--no-progress", timeout=110)
    report = json.loads(out_json.read_text())
    records = report["records"]
    core = [r for r in records if r["transport"] in
            ("shmipc.ring", "shmipc.ring+batch", "os.pipe", "mp.Pipe", "mp.Queue", "mp.SimpleQueue", "mp.Pool")]
    assert core and all(r["status"] == "ok" for r in core), [(r["transport"], r["reason"]) for r in core]
    failed = [r for r in records if r["status"] in ("error", "timeout")]
    assert proc.returncode == (1 if failed else 0), proc.stderr
    assert {r["workload"] for r in records} == {"throughput", "pingpong", "pool", "numpy"}
    assert {r["size"] for r in records if r["workload"] == "throughput"} == {64, 4096}
    for r in records:
        if r["status"] == "ok":
            assert len(r["rounds"]) == 1 and r["best"]
    out = proc.stdout
    assert "One-way throughput, parent -> forked child, 64 B messages" in out
    assert "Ping-pong round trip" in out and "Pool.map" in out and "numpy" in out
    assert "machine:" in out and "cores" in out and "Summary" in out
    assert "x vs " in out                                     # a ratio line of the summary
    if has_matplotlib:
        assert out_png.read_bytes()[:4] == b"\x89PNG"
    assert "| transport |" in out_md.read_text()
    assert report["machine"]["cores"] == os.cpu_count()


def test_bench_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    """--plot is checked before anything runs: no minute of measuring lost."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["bench", "--plot", "x.png"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_bench_selected_transports_only():
    proc = shmipc_cmd("bench", "--transports", "shmipc.ring,os.pipe", "--workloads", "pingpong",
                      "--repeat", "2", "--seconds", "0.03", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("  ")]
    names = {line.split()[0] for line in lines}
    assert {"shmipc.ring", "os.pipe"} <= names and "mp.Pipe" not in names
    assert "best of 2 rounds" in proc.stdout
    assert "pingpong" in proc.stdout and "vs os.pipe" in proc.stdout


def _none_left(marker: str, timeout: float) -> None:
    """Wait (up to `timeout` s) until no process has `marker` in its command line."""
    wait_until(lambda: not processes_with(marker), timeout, f"no process with {marker!r} left")
    assert processes_with(marker) == []


@pytest.mark.timeout(60)
def test_bench_ctrl_c_stops_everything(tmp_path):
    """Ctrl-C during a measurement: exit 130, and no measurement process or
    peer is left running (they live in their own process group)."""
    marker = str(tmp_path / "ctrl-c-marker.json")   # in the command line of every fork
    proc = subprocess.Popen([sys.executable, "-m", "shmipc", "bench", "--no-progress", "--json", marker,
                             "--workloads", "throughput", "--seconds", "0.5", "--repeat", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        wait_until(lambda: len(processes_with(marker)) >= 3, 20, "the CLI, a measurement and its peer running")
        assert len(processes_with(marker)) >= 3
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    _none_left(marker, 5)
    assert not os.path.exists(marker)                 # no report from an interrupted run


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (0 if it is gone)."""
    try:
        fields = proc_stat(pid)
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bench_with_busy_loops(**popen: Any) -> tuple[subprocess.Popen, str]:
    """`shmipc bench --busy 2` started, once both its loops run; returns it
    and the marker in each loop's command line."""
    from shmipc.bench.runner import BUSY_LOOP_LABEL

    proc = subprocess.Popen([sys.executable, "-m", "shmipc", "bench", "--no-progress", "--busy", "2",
                             "--workloads", "throughput", "--seconds", "0.5", "--repeat", "20"],
                            cwd=ROOT, **popen)
    return proc, f"\0{proc.pid}\0{BUSY_LOOP_LABEL}"


@pytest.mark.timeout(60)
def test_bench_ctrl_c_at_a_terminal_stops_the_busy_loops_quietly():
    """A Ctrl-C at a terminal reaches the whole process group, busy loops
    included: exit 130, no loop left, and no KeyboardInterrupt traceback from
    each loop (before, one per loop)."""
    proc, loops = _bench_with_busy_loops(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         start_new_session=True)
    try:
        # each loop past its start-up (Python's SIGINT handler is installed
        # then): 0.3 s of CPU each, by then in its `while True`
        wait_until(lambda: len(processes_with(loops)) == 2
                   and all(_cpu_seconds(pid) >= 0.3 for pid in processes_with(loops)), 30,
                   "both busy loops past their start-up")
        assert len(processes_with(loops)) == 2
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "KeyboardInterrupt" not in err and "Traceback" not in err, err
    _none_left(loops, 10)


@pytest.mark.timeout(60)
def test_bench_killed_leaves_no_busy_loop():
    """SIGKILL of `shmipc bench --busy 2` (no finally runs): the kernel kills
    its busy loops with it."""
    proc, loops = _bench_with_busy_loops(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(processes_with(loops)) == 2, 30, "both busy loops running")
        assert len(processes_with(loops)) == 2
    finally:
        proc.kill()
        proc.wait()
    _none_left(loops, 10)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args,message", [
    (["--transports", "carrier-pigeon"], "unknown transport 'carrier-pigeon'"),
    (["--sizes", "huge"], "not a message size: 'huge'"),
    (["--repeat", "0"], "--repeat must be between 1 and 1000"),
    (["--sizes", "inf"], "not a message size: 'inf'"),
    (["--seconds", "inf"], "round duration must be > 0 s and at most 3600 s"),
    (["--timeout", "nan"], "--timeout must be > 0 s"),
    (["--processes", "100000"], "--processes must be between 1 and 64"),
    (["--workloads", "everything"], "unknown workload 'everything'"),
    (["--busy", "-1"], "--busy must be between 0 and 64, got -1"),
])
def test_bench_bad_arguments_exit_2(args, message):
    proc = shmipc_cmd("bench", *args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_bench_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("shmipc.ring", "os.pipe", "mp.Queue", "faster-fifo", "pyzmq"):
        assert name in out


def test_help_and_missing_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "bench" in capsys.readouterr().out


# ---------------------------------------------------------------- demo
@pytest.mark.timeout(60)
def test_demo_verifies_every_message():
    proc = shmipc_cmd("demo", "--children", "3", "--messages", "5000")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "anonymous shared arena" in out and "forked 3 children" in out
    assert "verified 5,000 of 5,000 messages" in out
    assert "messages/s" in out and "OK:" in out
    assert out.count("handled") == 3


@pytest.mark.timeout(30)
@pytest.mark.timeout(60)
@pytest.mark.parametrize("args", [["--children", "0"], ["--children", "100000"], ["--messages", "-5"],
                                  ["--messages", "100000000000000000000000"]])
def test_demo_bad_arguments(args):
    """Refused before anything is forked (100,000 children used to be
    forked; 10**23 messages ended in an OverflowError traceback)."""
    proc = shmipc_cmd("demo", *args)
    assert proc.returncode == 2, proc.stderr
    assert "must be between 1 and" in proc.stderr and args[1] in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.timeout(60)
def test_demo_whose_output_fails_after_the_fork_leaves_no_child():
    """`shmipc demo | head -2`, deterministically: the first line written
    after the fork fails. It was written outside the block that stops the
    children on an error, so they were left running (until they noticed
    their parent's death). Now they are killed and reaped before the error
    goes on."""
    from conftest import live_children
    from shmipc.demo import run_demo

    class FailsAfter(io.StringIO):
        def __init__(self, writes: int) -> None:
            super().__init__()
            self.writes = writes

        def write(self, s: str) -> int:
            if self.writes == 0:
                raise BrokenPipeError(errno.EPIPE, "Broken pipe")
            self.writes -= 1
            return super().write(s)

    before = live_children()
    out = FailsAfter(4)                     # the two lines before the fork (print: text, then newline)
    with pytest.raises(BrokenPipeError):
        run_demo(2, 1000, out=out)
    assert "made two rings" in out.getvalue() and "] forked" not in out.getvalue()
    assert live_children() - before == set()


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "inf", "1e300"])
def test_inspect_bad_interval_exits_2(interval, capsys):
    """nan and inf used to reach time.sleep and end in a traceback."""
    assert main(["inspect", str(os.getpid()), "--watch", "--interval", interval]) == 2
    assert "--interval must be > 0 and at most 86400 s" in capsys.readouterr().err


# ---------------------------------------------------------------- inspect
HOLDER = textwrap.dedent("""
    import sys, time, shmipc
    arena = shmipc.Arena(8 << 20)
    tasks = arena.ring(1 << 16, name="tasks")
    spare = arena.ring(1 << 12)
    state = arena.block(4096, name="state")
    for i in range(123):
        tasks.put(b"x" * 100)
    for i in range(23):
        tasks.get()
    print("ready", flush=True)
    if sys.argv[1] == "busy":
        i = 0
        while True:
            tasks.put(i); tasks.get(); i += 1
            if i % 1000 == 0:
                time.sleep(0.001)
    time.sleep(60)
""")


@pytest.fixture
def holder(request):
    """A live child process holding an anonymous arena with two rings."""
    mode = getattr(request, "param", "idle")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, mode], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.timeout(60)
def test_inspect_live_process(holder):
    proc = shmipc_cmd("inspect", str(holder.pid))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"process {holder.pid}" in out
    assert "/memfd:shmipc (deleted)" in out and "rw-s" in out
    tasks = next(line for line in out.splitlines() if line.strip().startswith("tasks"))
    assert "123" in tasks.split() and "100" in tasks.split()       # messages in / depth
    assert "#1" in out                                            # the unnamed ring too
    assert "blocks: state" in out

    proc = shmipc_cmd("inspect", str(holder.pid), "--json")
    data = json.loads(proc.stdout)
    arena = next(a for a in data["arenas"] if a["backing"] == "/memfd:shmipc (deleted)")
    rings = {r["name"]: r for r in arena["regions"] if r["kind"] == "ring"}
    stats = rings["tasks"]["stats"]
    assert (stats["messages_in"], stats["messages_out"], stats["qsize"]) == (123, 23, 100)
    assert rings["#1"]["stats"]["messages_in"] == 0
    mapping = next(m for m in data["mappings"] if m["path"] == "/memfd:shmipc (deleted)")
    assert mapping["size"] == 8 << 20 and mapping["shared"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("holder", ["busy"], indirect=True)
def test_inspect_watch_refreshes_until_ctrl_c(holder):
    watcher = subprocess.Popen([sys.executable, "-m", "shmipc", "inspect", str(holder.pid), "--watch",
                                "--interval", "0.3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        # Ctrl-C once three refreshes were printed (not after a fixed sleep:
        # on a loaded machine the interpreter may still be starting)
        seen = b""
        deadline = time.monotonic() + 40
        while seen.count(f"process {holder.pid}".encode()) < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([watcher.stdout], [], [], 0.5)
            if ready:
                chunk = os.read(watcher.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk
        watcher.send_signal(signal.SIGINT)
        rest, err_bytes = watcher.communicate(timeout=20)
        out, err = (seen + rest).decode(), err_bytes.decode()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == 0, err
    assert out.count(f"process {holder.pid}") >= 3
    assert "out/s" in out                          # rates once there is a previous refresh
    assert "Ctrl-C to stop" in out


@pytest.mark.timeout(30)
def test_inspect_missing_process():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    result = shmipc_cmd("inspect", str(proc.pid))
    assert result.returncode == 1
    assert f"no process with pid {proc.pid}" in result.stderr


@pytest.mark.timeout(30)
def test_inspect_process_without_arenas():
    result = shmipc_cmd("inspect", str(os.getpid()))
    assert result.returncode == 0
    assert "no shmipc arena mapped" in result.stdout


def test_inspect_refuses_non_arena_memory(tmp_path):
    """A shared mapping that is not an arena is never opened as one (which
    would format it)."""
    import mmap

    from shmipc.inspector import inspect_process

    path = tmp_path / "zeros"
    path.write_bytes(bytes(1 << 16))
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 1 << 16)
        try:
            data = inspect_process(os.getpid())
            assert any(mp["path"] == str(path) for mp in data["mappings"])
            assert not any(a["backing"] == str(path) for a in data["arenas"])
            assert m[:8] == bytes(8)
        finally:
            m.close()
    assert path.read_bytes() == bytes(1 << 16)


def test_inspect_no_permission_is_a_clear_error(monkeypatch, capsys):
    import builtins

    from shmipc import inspector

    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/4242/maps":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert inspector.run_inspect(4242) == 1
    err = capsys.readouterr().err
    assert "no permission to read /proc/4242/maps" in err


def test_inspect_opens_an_arena_through_the_fd_when_map_files_fails(no_leaks):
    """Without access to /proc/PID/map_files (no CAP_SYS_ADMIN), the arena is
    found through the process's open descriptor for the same file."""
    import shmipc
    from shmipc.inspector import _open_arena, read_maps

    arena = shmipc.Arena(1 << 20)
    arena.ring(4096, name="r").put(b"hello")
    try:
        m = next(m for m in read_maps(os.getpid()) if m.path == "/memfd:shmipc (deleted)"
                 and m.size == arena.size)
        m.start, m.end = 0x1000, 0x2000            # map_files has no such entry
        seen, via = _open_arena(os.getpid(), m)
        try:
            assert via.startswith(f"/proc/{os.getpid()}/fd/")
            assert seen._attach_ring("r").stats()["messages_in"] == 1
        finally:
            seen.close()
    finally:
        arena.close()


# ---------------------------------------------------------------- issue 14: a newcomer's first hour
def test_version(capsys):
    from shmipc.cli import version

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"shmipc {version()}"


@pytest.mark.parametrize("option", ["--json", "--markdown", "--plot"])
def test_bench_output_paths_are_checked_before_measuring(option, capsys, tmp_path):
    """A path that cannot be written fails at once (exit 2), not with a
    traceback after the whole run."""
    t0 = time.monotonic()
    assert main(["bench", option, "/nonexistent/dir/x.out", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{option} /nonexistent/dir/x.out: no such directory /nonexistent/dir" in err
    assert main(["bench", option, str(tmp_path), "--no-progress"]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert time.monotonic() - t0 < 5


def test_bench_readme_that_cannot_be_read_fails_before_measuring(capsys, tmp_path):
    """A missing or binary --readme used to end in a traceback (exit 1)."""
    t0 = time.monotonic()
    missing = tmp_path / "missing.md"
    assert main(["bench", "--readme", str(missing), "--no-progress"]) == 2
    assert f"--readme {missing}: cannot read it (No such file or directory)" in capsys.readouterr().err
    binary = tmp_path / "binary.md"
    binary.write_bytes(b"\xff\xfe<!-- perf:start -->")
    assert main(["bench", "--readme", str(binary), "--no-progress"]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert time.monotonic() - t0 < 5


@pytest.mark.timeout(60)
def test_bench_output_that_cannot_be_written_after_the_run_is_said_and_the_rest_written(capsys, monkeypatch,
                                                                                        tmp_path):
    """A write that fails after the run (a full disk) used to end in a
    traceback, and the outputs after it were never written. (/dev/full made
    it fail; a device is now refused before measuring, so the full disk is
    simulated.)"""
    import shmipc.bench

    def full_disk(report: dict, path: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(shmipc.bench, "write_json", full_disk)
    out = tmp_path / "report.md"
    assert main(["bench", "--workloads", "pingpong", "--transports", "os.pipe", "--repeat", "1",
                 "--seconds", "0.03", "--no-progress", "--json", str(tmp_path / "r.json"),
                 "--markdown", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"--json {tmp_path / 'r.json'}: could not write it (No space left on device)" in err
    assert "Traceback" not in err
    assert "| transport |" in out.read_text()


@pytest.fixture
def no_measuring(monkeypatch):
    """`shmipc bench` run in this process fails the test if it gets as far
    as measuring."""
    import shmipc.bench

    def run(options: Any) -> dict:
        raise AssertionError("the bench started measuring")

    monkeypatch.setattr(shmipc.bench, "run", run)


@pytest.mark.parametrize("option", ["--json", "--markdown", "--plot"])
@pytest.mark.parametrize("target", ["fifo", "/dev/null"])
def test_bench_output_that_is_not_a_regular_file_is_refused_before_measuring(option, target, tmp_path, capsys,
                                                                              no_measuring):
    """A FIFO passed the checks: the whole run was measured, then writing
    it blocked until a reader came (for ever if none); a device took the
    report. Now only a regular file, or a new one in a writable directory."""
    path = str(tmp_path / "fifo") if target == "fifo" else target
    if target == "fifo":
        os.mkfifo(path)
    t0 = time.monotonic()
    assert main(["bench", option, path, "--no-progress"]) == 2
    kind = "a FIFO" if target == "fifo" else "a character device"
    assert f"{option} {path}: is {kind}, not a regular file" in capsys.readouterr().err
    assert time.monotonic() - t0 < 1


def _limit_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("target", ["fifo", "/dev/zero"])
def test_bench_readme_that_is_not_a_regular_file_is_refused_before_reading(target, tmp_path):
    """--readme FIFO waited in open() for a writer, before anything was
    measured, for ever; --readme /dev/zero read until memory ran out (a
    MemoryError traceback under a 2 GiB limit). Now both are refused at once
    (exit 2), neither opened. A child process: unfixed, it would hang or
    eat memory."""
    path = str(tmp_path / "README.md") if target == "fifo" else target
    if target == "fifo":
        os.mkfifo(path)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "shmipc", "bench", "--readme", path, "--no-progress"],
                          capture_output=True, text=True, timeout=10, cwd=ROOT, preexec_fn=_limit_memory)
    assert proc.returncode == 2, proc.stderr
    kind = "a FIFO" if target == "fifo" else "a character device"
    assert f"--readme {path}: is {kind}, not a regular file" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert time.monotonic() - t0 < 5                   # (an interpreter's start on a busy machine)


def test_bench_readme_over_16_mib_is_refused(tmp_path, capsys, no_measuring):
    """A README is read whole (and rewritten): one over 16 MiB is refused
    before anything is read or measured."""
    from shmipc.bench.report import README_END, README_START

    path = tmp_path / "README.md"
    path.write_text(f"{README_START}\n{README_END}\n")
    os.truncate(path, (16 << 20) + 1)                # (sparse: NUL bytes, valid UTF-8)
    assert main(["bench", "--readme", str(path), "--no-progress"]) == 2
    assert f"--readme {path}: larger than 16 MiB, not a README" in capsys.readouterr().err


@pytest.mark.parametrize("option,message", [
    ("--workloads", "--workloads lists nothing; known: throughput, pingpong, pool, numpy, ray"),
    ("--transports", "--transports lists nothing; known: shmipc.ring, "),
    ("--sizes", "--sizes lists nothing; give message sizes such as 64,1k,64k,1M"),
])
@pytest.mark.parametrize("value", [",", ""])
def test_bench_empty_lists_are_bad_arguments(option, message, value, capsys, no_measuring):
    """`--workloads ,` measured nothing and exited 0 with an empty summary;
    `--transports ,` ran every transport; `--sizes ,` no throughput."""
    assert main(["bench", option, value, "--no-progress"]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_bench_one_transport_still_has_a_summary():
    proc = shmipc_cmd("bench", "--transports", "os.pipe", "--workloads", "pingpong", "--repeat", "1",
                      "--seconds", "0.03", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.split("Summary", 1)[1]
    assert "pingpong" in summary and "os.pipe median" in summary and "no shmipc transport measured" in summary


@pytest.mark.timeout(60)
def test_demo_shows_progress_on_long_runs():
    import io

    from shmipc.demo import run_demo

    out = io.StringIO()
    assert run_demo(2, 20_000, out=out, progress_every=0.01) == 0
    lines = [line for line in out.getvalue().splitlines() if "answered (" in line]
    assert lines and "of 20,000 answered" in lines[0] and "messages/s" in lines[0]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pid", ["0", "-5", "abc", str(1 << 22), "99999999999999999999999"])
def test_inspect_invalid_pids_exit_2(pid):
    """Every kind of invalid pid is a bad argument (2), out of the kernel's
    range too (it was 1, "no process"); a pid with no process is 1."""
    result = shmipc_cmd("inspect", "--", pid)
    assert result.returncode == 2, result.stderr
    assert "pid" in result.stderr
    if pid.isdigit():
        assert f"invalid pid {pid}: a process id is between 1 and 4194303" in result.stderr


def test_inspect_no_root_hint_for_root(monkeypatch, capsys):
    import builtins

    from shmipc import inspector

    real_open = builtins.open

    def fake_open(path, *args, **kwargs):
        if str(path) == "/proc/4242/maps":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    assert inspector.run_inspect(4242) == 1
    err = capsys.readouterr().err
    assert ("run as root" in err) == (os.geteuid() != 0)


@pytest.mark.timeout(60)
def test_inspect_shows_resident_apart_and_who_made_each_arena(holder):
    proc = shmipc_cmd("inspect", str(holder.pid))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "virtual" in out and "resident" in out
    assert "of address space" in out and "resident in this process" in out
    assert "made by: " in out
    data = json.loads(shmipc_cmd("inspect", str(holder.pid), "--json").stdout)
    arena = next(a for a in data["arenas"] if a["backing"] == "/memfd:shmipc (deleted)")
    assert 0 < arena["resident"] < arena["size"]
    assert arena["used"] <= arena["size"]
    assert "not known" in arena["owner"]          # an arena of the user's own: said so


POOL_HOLDER = textwrap.dedent("""
    import time, shmipc
    pool = shmipc.Pool(1)
    assert pool.map(abs, [-1, -2]) == [1, 2]
    q = shmipc.Queue()
    q.put(b"x" * 1000)
    print("ready", flush=True)
    time.sleep(60)
""")


@pytest.mark.timeout(60)
def test_inspect_names_pools_and_queues_and_high_water_is_never_below_used():
    proc = subprocess.Popen([sys.executable, "-c", POOL_HOLDER], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "ready"
        data = json.loads(shmipc_cmd("inspect", str(proc.pid), "--json").stdout)
        text = shmipc_cmd("inspect", str(proc.pid)).stdout
    finally:
        proc.kill()
        proc.wait(10)
    owners = [a["owner"] for a in data["arenas"]]
    assert any("Pool" in o for o in owners) and any("Queue" in o for o in owners), owners
    queue_line = next(line for line in text.splitlines() if line.strip().startswith("#0"))
    cells = queue_line.split()
    used, high = " ".join(cells[7:9]), " ".join(cells[9:11])
    assert used == "1.0 KiB" and high == "1.0 KiB", queue_line


FORGED_HOLDER = textwrap.dedent("""
    import mmap, sys, time, shmipc
    # names as a process that can write the arena could forge them
    arena = shmipc.Arena(shmipc.Arena.size_for(rings=[1024, 1024], blocks=[64]))
    arena.ring(1024, name="\\x1b[2J\\x1b[31mFAKE\\x1b[0m\\nrecov lost")
    arena.ring(1024, name="plain")
    arena.block(64, name="\\x1b]0;pwned-title\\x07blk")
    with open(sys.argv[3], "w+b") as f:          # a shared file mapping with a hostile name
        f.truncate(4096)
        shared = mmap.mmap(f.fileno(), 4096)
    print("ready", flush=True)
    time.sleep(60)
""")


@pytest.mark.timeout(60)
def test_inspect_shows_forged_names_and_paths_escaped(tmp_path):
    """Region names (from shared memory), the backing file's path and the
    command line were printed raw: a name carrying ESC [2J cleared the
    screen, ESC ] 0; ... BEL set the terminal's title, and a newline forged
    a table line. Now each is shown escaped; plain names are unchanged, and
    the JSON output (json.dumps escapes them) gives the names exactly."""
    backing = tmp_path / "\x1b[1mbold\x1b[0m\nfile"
    # the forged argument early in the command line: inspect shows its first 100 characters
    proc = subprocess.Popen([sys.executable, "-c", "import sys; exec(sys.argv[2])", "\x1b[2Jargv", FORGED_HOLDER,
                             str(backing)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout.readline().strip() == "ready"
        text = subprocess.run([sys.executable, "-m", "shmipc", "inspect", str(proc.pid)],
                              capture_output=True, timeout=50, cwd=ROOT)
        as_json = shmipc_cmd("inspect", str(proc.pid), "--json", timeout=50)
    finally:
        proc.kill()
        proc.wait(10)
    assert text.returncode == 0, text.stderr
    assert b"\x1b" not in text.stdout and b"\x07" not in text.stdout
    out = text.stdout.decode()
    assert "\\x1b[2J\\x1b[31mFAKE\\x1b[0m\\nrecov lost" in out
    assert "blocks: \\x1b]0;pwned-title\\x07blk (64 B)" in out
    assert not any(line.startswith("recov lost") for line in out.splitlines())
    assert "\\x1b[2Jargv" in out                      # the command line
    assert "\\x1b[1mbold\\x1b[0m" in out                # the mapped file (maps escapes its newline)
    assert "  plain " in out                           # plain names as they are

    assert as_json.returncode == 0, as_json.stderr
    assert "\x1b" not in as_json.stdout and "\x07" not in as_json.stdout
    names = {r["name"] for a in json.loads(as_json.stdout)["arenas"] for r in a.get("regions", [])}
    assert {"\x1b[2J\x1b[31mFAKE\x1b[0m\nrecov lost", "\x1b]0;pwned-title\x07blk", "plain"} <= names


@pytest.mark.timeout(30)
def test_inspect_a_mapped_file_whose_name_is_not_utf8(tmp_path):
    """A process that maps a file whose name is not UTF-8 made inspect end
    in a UnicodeDecodeError traceback reading /proc/PID/maps; the byte is
    now shown as \\xff."""
    import mmap

    path = os.path.join(os.fsencode(tmp_path), b"bad\xffname")
    with open(path, "w+b") as f:
        f.truncate(4096)
        m = mmap.mmap(f.fileno(), 4096)
        try:
            result = shmipc_cmd("inspect", str(os.getpid()))
        finally:
            m.close()
    assert result.returncode == 0, result.stderr
    assert "bad\\xffname" in result.stdout
