"""Plan the measurements of `shmipc bench` and run each in a fresh process.

Every measurement runs in its own forked process, in its own process group,
with its stdout/stderr going to a log file (so a noisy transport cannot
garble the progress bar). The runner waits for its JSON result with a hard
deadline: a transport that hangs is killed (with the whole group: its peer
too) and reported as "timeout", and the run goes on.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

from shmipc.bench.transports import PoolSuite, Transport, get_transports

__all__ = ["Options", "Spec", "plan", "run", "DEFAULT_SIZES", "WORKLOADS", "DEFAULT_WORKLOADS", "parse_size"]

DEFAULT_SIZES = [64, 1 << 10, 64 << 10, 1 << 20]
WORKLOADS = ("throughput", "pingpong", "pool", "numpy", "ray")
# "ray" only when asked for: Ray's start-up alone costs ~20 s
DEFAULT_WORKLOADS = ("throughput", "pingpong", "pool", "numpy")
RAY_TIMEOUT = 300.0
PINGPONG_SIZE = 64
NUMPY_BYTES = 1 << 20


# Bounds on what one run may ask for (each checked with a clear error before
# anything runs): the bench keeps at least 16 messages of each size in
# memory, a round's end is a timestamp, and each pool worker is a process.
MAX_SIZE = 64 << 20
MAX_SECONDS = 3600.0                # per round
MAX_TIMEOUT = 86400.0               # per measurement
MAX_PROCESSES = 64
MAX_REPEAT = 1000
MAX_BUSY = 64                       # --busy loops
BUSY_START_S = 30.0                 # how long the busy loops may take to start


def parse_size(text: str) -> int:
    """'64', '1k', '64KiB', '1M' -> bytes.

    Raises:
        ValueError: not a size, not positive, or above MAX_SIZE.
    """
    s = text.strip().lower().replace("ib", "").replace("b", "")
    mult = 1
    if s and s[-1] in "kmg":
        mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[s[-1]]
        s = s[:-1]
    try:
        value = int(float(s) * mult)
    except (ValueError, OverflowError):         # (nan; inf, 1e400)
        raise ValueError(f"not a message size: {text!r} (use e.g. 64, 1k, 64k, 1M)") from None
    if value <= 0:
        raise ValueError(f"message size must be positive, got {text!r}")
    if value > MAX_SIZE:
        raise ValueError(f"message size must be at most {MAX_SIZE} bytes (64M), got {text!r} = {value}")
    return value


@dataclass
class Options:
    """What `shmipc bench` runs (see ``shmipc bench --help``)."""

    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    transports: list[str] | None = None
    workloads: list[str] = field(default_factory=lambda: list(DEFAULT_WORKLOADS))
    repeat: int = 3
    seconds: float = 0.2            # per round
    timeout: float | None = None    # per measurement; None: derived from repeat and seconds
    processes: int = 2              # Pool.map workers
    progress: bool = True
    verify: str = "full"            # or "stamps" (see workloads._receive_round)
    pin: str | None = None          # "same": both processes on one CPU; "split": on two
    busy: int = 0                   # CPU-bound loops run beside the measurements (see busy_loops)

    def cpus(self) -> tuple[int, int] | None:
        """(CPU of the sender, CPU of the receiver) for `pin`, or None."""
        if self.pin is None:
            return None
        usable = sorted(os.sched_getaffinity(0))
        return (usable[0], usable[0]) if self.pin == "same" else (usable[0], usable[1])

    def check(self) -> None:
        """Raises ValueError naming the bad option."""
        if not 1 <= self.repeat <= MAX_REPEAT:
            raise ValueError(f"--repeat must be between 1 and {MAX_REPEAT}, got {self.repeat}")
        if not 0 < self.seconds <= MAX_SECONDS:
            raise ValueError(f"round duration must be > 0 s and at most {MAX_SECONDS:g} s, got {self.seconds}")
        if self.timeout is not None and not 0 < self.timeout <= MAX_TIMEOUT:
            raise ValueError(f"--timeout must be > 0 s and at most {MAX_TIMEOUT:g} s, got {self.timeout}")
        for w in self.workloads:
            if w not in WORKLOADS:
                raise ValueError(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
        for s in self.sizes:
            if not 0 < s <= MAX_SIZE:
                raise ValueError(f"message sizes must be positive and at most {MAX_SIZE}, got {s}")
        if self.verify not in ("full", "stamps"):
            raise ValueError(f"verify must be 'full' or 'stamps', got {self.verify!r}")
        if not 1 <= self.processes <= MAX_PROCESSES:
            raise ValueError(f"--processes must be between 1 and {MAX_PROCESSES}, got {self.processes}")
        if self.pin not in (None, "same", "split"):
            raise ValueError(f"--pin must be 'same' or 'split', got {self.pin!r}")
        if not 0 <= self.busy <= MAX_BUSY:
            raise ValueError(f"--busy must be between 0 and {MAX_BUSY}, got {self.busy}")
        if self.pin == "split" and len(os.sched_getaffinity(0)) < 2:
            raise ValueError(f"--pin split needs 2 usable CPUs, this process may use "
                             f"{len(os.sched_getaffinity(0))}")

    @property
    def quick(self) -> bool:
        """A quick run: one round (what ``shmipc bench --quick`` asks for)."""
        return self.repeat == 1

    def measurement_timeout(self, workload: str = "") -> float:
        if self.timeout is not None:
            return self.timeout
        if workload == "ray":           # Ray's start-up, then every run on both sides
            return RAY_TIMEOUT
        if workload == "pool":          # four comparisons, a calibration, ~1 s rounds for mp on a busy machine
            return 60.0 + self.repeat * 15.0
        return 20.0 + self.repeat * (self.seconds * 3 + 2.0)


@dataclass
class Spec:
    """One measurement: a transport under one workload at one size."""

    workload: str
    transport: Transport
    size: int
    pool_kind: str = ""

    @property
    def label(self) -> str:
        what = self.pool_kind if self.workload in ("pool", "ray") else _fmt_size(self.size)
        return f"{self.workload} {what} {self.transport.name}"


def _fmt_size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def plan(options: Options) -> list[Spec]:
    """The measurements, in the order they run and are printed."""
    options.check()
    transports = get_transports(options.transports)
    specs: list[Spec] = []
    for workload in WORKLOADS:
        if workload not in options.workloads:
            continue
        chosen = [t for t in transports if workload in t.workloads]
        if workload == "throughput":
            for size in options.sizes:
                specs.extend(Spec(workload, t, size) for t in chosen
                             if t.min_size <= size <= t.max_size)
        elif workload == "pingpong":
            specs.extend(Spec(workload, t, PINGPONG_SIZE) for t in chosen)
        elif workload == "numpy":
            specs.extend(Spec(workload, t, NUMPY_BYTES) for t in chosen)
        elif workload == "pool" and chosen:
            # one measurement: shmipc's pools and the standard library's, alternating
            specs.append(Spec(workload, PoolSuite(), 0, "suite"))
        elif workload == "ray":
            from shmipc.bench.ray import RaySuite      # does not import Ray

            specs.append(Spec(workload, RaySuite(), 0, "suite"))
    return specs


def workload_unavailable(workload: str) -> str | None:
    """None if `workload` can run here, else why not (one line)."""
    import importlib.util

    if workload == "numpy" and importlib.util.find_spec("numpy") is None:
        return "numpy is not installed (pip install numpy)"
    if workload == "ray":
        from shmipc.bench.ray import unavailable

        return unavailable()
    return None


def _best(workload: str, rounds: list[dict]) -> dict:
    if not rounds:
        return {}
    if workload == "pingpong":
        return min(rounds, key=lambda r: r["median_us"])
    key = "items_per_s" if workload == "pool" else "msgs_per_s"
    return max(rounds, key=lambda r: r[key])


class _Skip(Exception):
    """The transport turned out to be unusable in the measurement process."""


def _child(spec: Spec, options: Options, tmpdir: str, log_path: str, result_fd: int,
           parent: int) -> None:
    """The body of a measurement process; never returns."""
    payload: dict[str, Any]
    try:
        os.setpgid(0, 0)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        # the Python-level streams too: they may be wrappers around other
        # descriptors (pytest's capture, a notebook's)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # if this measurement hangs, its log says where (shown with the timeout)
        import faulthandler

        faulthandler.dump_traceback_later(max(options.measurement_timeout(spec.workload) - 1.0, 0.5), exit=False, file=2)
        from shmipc._proc import die_with_parent

        die_with_parent(parent)
        # numpy's BLAS would start a thread pool, and forking the peer with
        # threads running is unsafe (3.12+ warns); nothing here needs BLAS
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        from shmipc.bench.workloads import measure

        reason = spec.transport.unavailable()
        if reason is not None:
            payload = {"status": "skipped", "reason": reason}
            raise _Skip
        if spec.workload == "ray":
            # shared-memory runs first, then Ray's start (in this process
            # only: the runner never imports Ray); refuses a running Ray
            from shmipc.bench import ray

            payload = {"rounds": [], "records": ray.records(ray.measure(quick=options.quick,
                                                                         repeat=options.repeat))}
        else:
            payload = measure(spec.transport, spec.workload, spec.size, options.repeat, options.seconds,
                              tmpdir, spec.pool_kind or "ints", options.processes, options.verify,
                              options.cpus())
        payload["status"] = "ok"
    except _Skip:
        pass
    except BaseException as exc:       # reported, never raised: this is a child process
        payload = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
    try:
        data = json.dumps(payload).encode()
        while data:
            data = data[os.write(result_fd, data):]
    finally:
        os._exit(0)


def run_one(spec: Spec, options: Options, tmpdir: str, index: int = 0) -> dict:
    """Run one measurement in a fresh forked process; returns its record."""
    record: dict[str, Any] = {
        "workload": spec.workload, "transport": spec.transport.name, "shmipc": spec.transport.shmipc,
        "reference": spec.transport.reference,
        "size": spec.size, "pool_kind": spec.pool_kind or None, "note": spec.transport.note,
        "status": "", "reason": "", "rounds": [], "best": {},
    }
    reason = workload_unavailable(spec.workload) or spec.transport.unavailable(load=False)
    if reason is not None:
        record.update(status="skipped", reason=reason)
        return record
    log_path = os.path.join(tmpdir, f"measurement-{index}.log")
    timeout = options.measurement_timeout(spec.workload)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(spec, options, tmpdir, log_path, w, os.getppid())
    os.close(w)
    try:
        os.setpgid(pid, pid)       # also done by the child: whichever runs first
    except OSError:
        pass
    data = b""
    started = time.monotonic()
    try:
        while True:
            left = started + timeout - time.monotonic()
            if left <= 0:
                record.update(status="timeout", reason=f"no result within {timeout:.0f} s: killed")
                break
            ready, _, _ = select.select([r], [], [], min(left, 0.5))
            if ready:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(r)
        _kill_group(pid)
    record["elapsed_s"] = round(time.monotonic() - started, 3)
    if record["status"] != "timeout":
        try:
            payload = json.loads(data)
        except ValueError:
            payload = {"status": "error", "reason": "the measurement process died without a result"}
        record.update(payload)
    if record["status"] != "ok":
        tail = _tail(log_path)
        if tail:
            record["log"] = tail
    record["best"] = _best(spec.workload, record["rounds"])
    record["load_after"] = _loadavg()
    return record


# measured side by side: round k of every transport at one size, then round
# k+1, so that a ratio between two rows compares rounds run under the same
# load and CPU placement (on a shared 2-CPU machine both change within
# seconds, and one row measured a minute after another can differ 2x)
INTERLEAVED = ("throughput", "pingpong", "numpy")


def _steps(specs: list[Spec], repeat: int) -> list[tuple[int, Spec, int, bool]]:
    """The runs, in order: (index of the spec, spec, rounds to run, whether
    this is its last run). Specs of an INTERLEAVED workload at one size run a
    round at a time, taking turns; the others run all their rounds at once."""
    steps: list[tuple[int, Spec, int, bool]] = []
    group: list[tuple[int, Spec]] = []

    def flush() -> None:
        for r in range(repeat):
            steps.extend((i, spec, 1, r == repeat - 1) for i, spec in group)
        group.clear()

    for index, spec in enumerate(specs):
        if group and (group[0][1].workload, group[0][1].size) != (spec.workload, spec.size):
            flush()
        if spec.workload in INTERLEAVED and repeat > 1:
            group.append((index, spec))
        else:
            flush()
            steps.append((index, spec, repeat, True))
    flush()
    return steps


def _merge_round(record: dict | None, new: dict) -> dict:
    """The record of a spec run a round at a time, with `new` (one more
    round's record) added: its rounds appended, its status if not ok."""
    if record is None:
        return new
    record["rounds"].extend(new["rounds"])
    record["elapsed_s"] = round(record.get("elapsed_s", 0) + new.get("elapsed_s", 0), 3)
    record["load_after"] = new.get("load_after")
    if new["status"] != "ok":
        for key in ("status", "reason", "log"):
            if key in new:
                record[key] = new[key]
    return record


def _expand(record: dict) -> list[dict]:
    """The pool measurement (shmipc/bench/pools.py) brings several records."""
    subs = record.pop("records", None)
    if not subs or record["status"] != "ok":
        return [record]
    out = []
    for sub in subs:
        one = dict(record)
        one["note"] = "shmipc/bench/pools.py"
        one.update(sub)
        out.append(one)
    return out


def _kill_group(pid: int) -> None:
    """Kill what is left of a measurement (its peers included) and reap it."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _tail(path: str, limit: int = 2000) -> str:
    """What explains a failure from a measurement's log: faulthandler's dump
    (innermost frames first: where it hung), else the end of the output."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - (64 << 10)))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    dump = text.rfind("Timeout (")
    if dump >= 0:
        return "\n".join(text[dump:].splitlines()[:12])
    return text[-limit:].strip()


def run(options: Options, on_record: Callable[[dict], None] | None = None) -> dict:
    """Run every planned measurement; returns the full report (as JSON-ready
    data: machine, options, records).

    Raises:
        ValueError: invalid options (unknown transport, bad size, ...).
    """
    from shmipc.bench.report import machine

    specs = plan(options)
    report: dict[str, Any] = {
        "machine": machine(),
        "options": {"sizes": options.sizes, "workloads": options.workloads, "repeat": options.repeat,
                    "seconds_per_round": options.seconds, "processes": options.processes, "pin": options.pin,
                    "busy": options.busy,
                    "transports": [t.name for t in get_transports(options.transports)]},
        "records": [],
    }
    tmpdir = tempfile.mkdtemp(prefix="shmipc-bench-")
    started = time.monotonic()
    current = {"now": ""}
    try:
        ended: list[tuple[int, int]] = []
        with busy_loops(options.busy, ended=ended):
            _run_steps(specs, options, tmpdir, report, current, on_record)
        if ended:
            report["busy_ended"] = [{"pid": pid, "status": status} for pid, status in ended]
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    report["machine"]["load_after"] = _loadavg()
    loads = [r["load_after"][0] for r in report["records"] if r.get("load_after")]
    loads += [x[0] for x in (report["machine"].get("load_before"), report["machine"]["load_after"]) if x]
    report["machine"]["load_max"] = max(loads, default=None)
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    return report


def _run_steps(specs: list[Spec], options: Options, tmpdir: str, report: dict, current: dict,
               on_record: Callable[[dict], None] | None) -> None:
    """run()'s measurements, their records appended to report["records"]."""
    steps = _steps(specs, options.repeat)

    def labelled() -> Any:
        # the label is set as an item is taken, so the bar names the
        # measurement running now
        for step in steps:
            current["now"] = step[1].label
            yield step

    items: Any = labelled()
    if options.progress:
        try:
            import tqdm

            tqdm.tqdm.monitor_interval = 0     # no monitor thread: we fork
        except ImportError:
            pass
        from shmipc.progress import track

        items = track(items, total=len(steps), desc="bench", status=lambda: dict(current))
    one_round = replace(options, repeat=1)
    partial: dict[int, dict] = {}
    for index, spec, rounds, last in items:
        if rounds == options.repeat:
            record = run_one(spec, options, tmpdir, index)
        else:
            # one round of several measured side by side (see _steps)
            record = partial.get(index)
            if record is None or record["status"] == "ok":
                record = partial[index] = _merge_round(record, run_one(spec, one_round, tmpdir, index))
            if not last:
                continue
            record["best"] = _best(spec.workload, record["rounds"])
        for one in _expand(record):
            report["records"].append(one)
            if on_record is not None:
                on_record(one)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# One busy loop: dies with the bench (even SIGKILLed), says it runs, spins.
# It ignores SIGINT: a Ctrl-C at a terminal reaches the whole process group,
# and the bench stops the loops itself (without a traceback from each).
_BUSY_LOOP = ("import signal, sys\n"
              "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
              "from shmipc._proc import die_with_parent\n"
              "die_with_parent(int(sys.argv[1]))\n"
              "sys.stdout.write('r')\n"
              "sys.stdout.flush()\n"
              "while True:\n"
              "    pass\n")
BUSY_LOOP_LABEL = "shmipc-bench-busy-loop"     # in each loop's command line (ps, tests)


@contextlib.contextmanager
def busy_loops(n: int, start_timeout: float = BUSY_START_S,
               ended: list[tuple[int, int]] | None = None) -> Iterator[list[int]]:
    """Keep `n` CPU-bound Python loops running for the block (``shmipc bench
    --busy N``), pinned round-robin to the CPUs this process may use: the
    other work of a busy machine, made the same in every run (``--busy 2`` on
    two cores: both busy). Yields their pids once every loop runs; kills and
    reaps them when the block ends, and the kernel kills them if this process
    dies first (PR_SET_PDEATHSIG). `ended`, if given, gets ``(pid, exit
    status)`` of each loop found ended when the block ends (killed from
    outside: the block did not run beside it to its end).

    Raises:
        RuntimeError: a loop exited, or did not start within `start_timeout`.
    """
    procs: list[subprocess.Popen] = []
    try:
        if n > 0:
            import shmipc

            cpus = sorted(os.sched_getaffinity(0))
            env = dict(os.environ)
            root = os.path.dirname(os.path.dirname(os.path.abspath(shmipc.__file__)))
            env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
            for i in range(n):
                proc = subprocess.Popen([sys.executable, "-c", _BUSY_LOOP, str(os.getpid()), BUSY_LOOP_LABEL],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env)
                procs.append(proc)
                try:
                    os.sched_setaffinity(proc.pid, {cpus[i % len(cpus)]})
                except OSError:
                    pass            # it already exited: reported below
            deadline = time.monotonic() + start_timeout
            for i, proc in enumerate(procs):
                assert proc.stdout is not None
                left = deadline - time.monotonic()
                ready = select.select([proc.stdout], [], [], max(left, 0.0))[0]
                said = os.read(proc.stdout.fileno(), 1) if ready else b""
                if said != b"r":
                    why = (f"exited with status {proc.poll()}" if ready else
                           f"did not start within {start_timeout:g} s")
                    raise RuntimeError(f"--busy: busy loop {i + 1} of {n} (pid {proc.pid}) {why}")
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            status = proc.poll()
            if status is not None and ended is not None:
                ended.append((proc.pid, status))
            proc.kill()
        for proc in procs:
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
