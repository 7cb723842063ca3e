"""Starting and supervising worker processes (used by Pool, ProcessPoolExecutor
and pipelines).

A :class:`Supervisor` keeps numbered *slots*, each run by one worker process
executing ``target(slot, *args)``. It starts workers, tells you when one exits
(and with which exit code: negative = killed by that signal), starts
replacements, and stops them all. It never forks while threads of the calling
process may run:

* ``fork``: the first ``start()`` forks one helper process, the *zygote*,
  from the caller (do that before starting your own threads; the threads of
  objects registered with :func:`register_pausable`, such as other pools'
  bookkeeping threads, are stopped for the moment of that fork). Every worker,
  including replacements started later from any thread, is forked by the
  zygote, which is single-threaded. The zygote reaps its workers and reports
  their exit codes through a pipe (control only; no data goes through it).
* ``spawn`` / ``forkserver``: workers are ``multiprocessing`` processes of that
  context (which fork+exec, or ask the fork server), so starting one from a
  thread is safe; the target and its arguments must then be picklable, and the
  target importable, as with multiprocessing.

Lifetimes: every worker ignores SIGINT (Ctrl-C goes to the parent only, so
the terminal does not fill with child tracebacks) and is killed when its
parent dies: workers get the kernel's parent-death signal from the zygote
(fork) or the fork server (forkserver), both single-threaded and gone within
0.25 s of the caller. That signal follows the *thread* that started a
process, so it is used towards the caller only for processes started from the
main thread or from a thread marked with :func:`mark_thread_long_lived`; the
zygote also watches getppid(). A target can call :func:`parent_alive` in its
idle loop as a further line of defence (spawn workers started from a
short-lived thread rely on it).

Typical use (one thread calls the Supervisor's methods at a time)::

    sup = Supervisor(work, (arena,), context="fork", name="mypool")
    sup.start(range(4))                     # slots 0..3
    while running:
        for ev in sup.wait(0.05):           # WorkerExit(slot, pid, exitcode)
            handle(ev); sup.spawn(ev.slot)  # a replacement in the same slot
    sup.stop()                              # SIGTERM, then SIGKILL; reaps everything

Invariants:
  * every pid in ``pids()`` is a live or not-yet-reported child of the
    zygote (fork) or of this process (others); each exits is reported once by
    ``poll``/``wait`` and then forgotten, so nothing is left as a zombie;
  * ``stop()`` returns only after every worker (and the zygote) was reaped.
"""
from __future__ import annotations

import errno
import multiprocessing
import multiprocessing.connection
import os
import select
import signal
import struct
import sys
import threading
import time
import traceback
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from shmipc._proc import die_with_parent, pid_alive

__all__ = ["Supervisor", "WorkerExit", "resolve_start_method", "parent_alive",
           "mark_thread_long_lived", "unmark_thread_long_lived", "register_pausable",
           "threads_paused"]

# zygote <- parent commands, and zygote -> parent events: fixed records, written
# with one write() each (smaller than PIPE_BUF, hence atomic)
_CMD = struct.Struct("<ii")          # command, argument
_EVT = struct.Struct("<iiii")        # kind, slot, pid, exitcode
_CMD_SPAWN, _CMD_SIGNAL, _CMD_QUIT = 1, 2, 3
_EVT_STARTED, _EVT_EXITED, _EVT_SPAWN_FAILED = 1, 2, 3
_START_TIMEOUT = 10.0


class WorkerExit(NamedTuple):
    """A worker process ended: ``exitcode`` < 0 means killed by signal -exitcode
    (multiprocessing's convention); None if it could not be determined."""

    slot: int
    pid: int
    exitcode: int | None


def resolve_start_method(context: Any = None) -> str:
    """The start method named by `context`: None (multiprocessing's default),
    a method name, or a context object (multiprocessing's or shmipc's).

    Raises:
        ValueError: an unknown start method name.
        TypeError: something that is neither a name nor a context.
    """
    if context is None:
        return multiprocessing.get_start_method()
    if isinstance(context, str):
        method = context
    elif hasattr(context, "get_start_method"):
        method = context.get_start_method()
    else:
        raise TypeError(f"context must be None, a start method name or a multiprocessing "
                        f"context, not {type(context).__name__}")
    if method not in multiprocessing.get_all_start_methods():
        raise ValueError(f"unknown start method {method!r}; this platform has "
                         f"{multiprocessing.get_all_start_methods()}")
    return method


def parent_alive(parent_pid: int) -> bool:
    """True while `parent_pid` lives: for a worker's idle loop (the kernel's
    parent-death signal is the first line of defence, this the second)."""
    return pid_alive(parent_pid)


_long_lived_threads: set[int] = set()
_pausable: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register_pausable(obj: Any) -> None:
    """Register an object that runs threads of its own and can stop them for
    a moment: ``obj._pause_for_fork() -> bool`` (True if it stopped its
    threads; they must be gone, not merely idle) and ``obj._resume_after_fork()``.
    Before forking a zygote, every registered object is paused, so the fork
    happens with no shmipc thread running (Python 3.12+ warns about forking a
    process with threads, and such forks can deadlock). Held weakly."""
    _pausable.add(obj)


@contextmanager
def threads_paused() -> Iterator[None]:
    """Stop the threads of every registered pausable object for the block."""
    paused = []
    try:
        for obj in list(_pausable):
            try:
                if obj._pause_for_fork():
                    paused.append(obj)
            except Exception:
                pass
        yield
    finally:
        for obj in paused:
            try:
                obj._resume_after_fork()
            except Exception:
                traceback.print_exc()


def mark_thread_long_lived() -> None:
    """Declare that the calling thread outlives every worker it starts (e.g.
    a pool's bookkeeping thread), so workers it starts may use the kernel's
    parent-death signal, which follows the starting *thread*."""
    _long_lived_threads.add(threading.get_ident())


def unmark_thread_long_lived() -> None:
    """Undo mark_thread_long_lived() (call it as the thread ends: idents are reused)."""
    _long_lived_threads.discard(threading.get_ident())


def _outlives_children() -> bool:
    return (threading.current_thread() is threading.main_thread()
            or threading.get_ident() in _long_lived_threads)


def _exit_code_of(status: int) -> int:
    try:
        return os.waitstatus_to_exitcode(status)
    except ValueError:
        return -1


def _run_target(target: Callable[..., Any], slot: int, args: tuple) -> int:
    """Run a worker's target in the worker; return its exit code."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        target(slot, *args)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    return code


def _process_entry(target: Callable[..., Any], slot: int, args: tuple, parent_pid: int,
                   method: str, pdeathsig: bool) -> None:
    """Entry of a spawn/forkserver worker (a multiprocessing Process target)."""
    # Under forkserver our parent is the fork server (single-threaded; it exits
    # when the caller does). Under spawn it is the caller, and the kernel sends
    # the parent-death signal when the *thread* that started us ends: only ask
    # for it when that thread outlives us (see Supervisor.spawn).
    if method != "spawn":
        die_with_parent(os.getppid())
        _release_forkserver()
    elif pdeathsig:
        die_with_parent(parent_pid)
    code = _run_target(target, slot, args)
    if code:
        sys.exit(code)


def _release_forkserver() -> None:
    """Close this worker's copy of the fork server's "alive" pipe.

    The fork server exits when every holder of that pipe is gone, and it
    hands a copy to each process it starts: so our workers would keep it
    (and, through its death signal, themselves) alive after the parent
    died. Without the copy, the parent's death ends the fork server (unless
    other processes of the parent still hold it), which ends the workers.
    """
    try:
        from multiprocessing import forkserver

        server = forkserver._forkserver
        fd = getattr(server, "_forkserver_alive_fd", None)
        if fd is not None:
            os.close(fd)
            server._forkserver_alive_fd = None
    except Exception:
        pass            # another Python's layout: the idle-loop check still applies


def _zygote_main(cmd_r: int, evt_w: int, close_fds: tuple, parent_pid: int, pdeathsig: bool,
                 target: Callable[..., Any], args: tuple, name: str,
                 wake: Callable[[], Any] | None = None) -> None:
    """The zygote: forks workers on request, reaps them, reports exit codes.

    Single-threaded by construction (a fresh fork), so its forks are safe.
    Exits when told to, or when the parent closes the command pipe (the parent
    died or stopped us), after stopping and reaping every worker.
    """
    # the death signal follows the thread that forked us: trust it only if that
    # thread lives as long as the process; getppid() below covers the rest
    if pdeathsig:
        die_with_parent(parent_pid)
    elif os.getppid() != parent_pid:
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    me = os.getpid()
    children: dict[int, tuple[int, int]] = {}      # pid -> (slot, pidfd or -1)
    buf = b""

    def report(kind: int, slot: int, pid: int, code: int) -> None:
        try:
            os.write(evt_w, _EVT.pack(kind, slot, pid, code))
        except OSError:
            pass            # parent gone: the death signal will follow

    def reap(block: bool) -> None:
        for pid in list(children):
            try:
                done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                done, status = pid, -1
            if done == pid:
                slot, pidfd = children.pop(pid)
                if pidfd >= 0:
                    os.close(pidfd)
                report(_EVT_EXITED, slot, pid, _exit_code_of(status) if status != -1 else -1)
                if wake is not None:
                    try:
                        wake()
                    except Exception:
                        pass                # best effort: the parent also polls

    def fork_worker(slot: int) -> None:
        try:
            pid = os.fork()
        except OSError as exc:
            report(_EVT_SPAWN_FAILED, slot, 0, exc.errno or -1)
            return
        if pid == 0:                                   # the worker
            code = 1
            try:
                os.close(cmd_r)
                os.close(evt_w)
                for _, pidfd in children.values():
                    if pidfd >= 0:
                        os.close(pidfd)
                die_with_parent(me)
                try:
                    multiprocessing.current_process().name = f"{name}-{slot}"
                except Exception:
                    pass
                code = _run_target(target, slot, args)
            finally:
                os._exit(code)
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = -1                                  # poll instead
        children[pid] = (slot, pidfd)
        report(_EVT_STARTED, slot, pid, 0)

    def stop_children(grace: float) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while children and time.monotonic() < deadline:
            reap(False)
            time.sleep(0.005)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        reap(True)

    quit_now = False
    grace = 1.0
    while not quit_now:
        fds = [cmd_r] + [pidfd for _, pidfd in children.values() if pidfd >= 0]
        polling = any(pidfd < 0 for _, pidfd in children.values())
        try:
            ready, _, _ = select.select(fds, [], [], 0.05 if polling else 0.25)
        except InterruptedError:
            ready = []
        if os.getppid() != parent_pid:                  # the parent process died
            break
        if cmd_r in ready:
            try:
                data = os.read(cmd_r, 4096)
            except OSError:
                data = b""
            if not data:                                # the parent is gone or closed us
                break
            buf += data
            while len(buf) >= _CMD.size:
                cmd, arg = _CMD.unpack_from(buf)
                buf = buf[_CMD.size:]
                if cmd == _CMD_SPAWN:
                    fork_worker(arg)
                elif cmd == _CMD_SIGNAL:
                    for pid in children:
                        try:
                            os.kill(pid, arg)
                        except ProcessLookupError:
                            pass
                elif cmd == _CMD_QUIT:
                    grace = arg / 1000.0
                    quit_now = True
                    break
        reap(False)
    stop_children(grace)
    os.close(evt_w)


class Supervisor:
    """Starts workers in numbered slots, reports their exits, starts
    replacements, stops them all. See the module docstring.

    Args:
        target: ``target(slot, *args)`` runs in each worker; the worker exits
            with 0 when it returns, the code of a SystemExit, or 1 (traceback
            printed) on another exception.
        args: extra arguments for `target` (pickled for spawn/forkserver).
        context: None (multiprocessing's default start method), "fork",
            "spawn", "forkserver" or a multiprocessing/shmipc context.
        name: process name prefix, for ps and tracebacks.
        wake: (fork only) called in the zygote right after it reported a
            worker's exit, to wake a parent that sleeps on something other
            than the event pipe (the pool posts a message into the ring its
            bookkeeping thread waits on). Inherited by fork, never pickled.

    Raises:
        ValueError / TypeError: an invalid context.
    """

    # set before anything can raise, so __del__/stop are safe after a failed __init__
    _zygote: Any = None
    _cmd_w: int = -1
    _evt_r: int = -1
    _stopped: bool = False

    def __init__(self, target: Callable[..., Any], args: tuple = (), *, context: Any = None,
                 name: str = "shmipc-worker", wake: Callable[[], Any] | None = None) -> None:
        if not callable(target):
            raise TypeError(f"target must be callable, not {type(target).__name__}")
        self.start_method = resolve_start_method(context)
        self.target = target
        self.args = tuple(args)
        self.name = name
        self._wake = wake
        self._ctx = multiprocessing.get_context(self.start_method)
        self._lock = threading.RLock()
        self._pids: dict[int, int] = {}                 # slot -> pid
        self._procs: dict[int, Any] = {}                # slot -> Process (spawn/forkserver)
        self._pending: list[WorkerExit] = []            # exits read while waiting for a start
        self._evt_buf = b""
        self._owner_pid = os.getpid()

    # ------------------------------------------------------------ starting
    def start(self, slots: Iterable[int]) -> dict[int, int]:
        """Start one worker for each slot (the zygote first, under fork).

        Returns {slot: pid}.

        Raises:
            ValueError: a slot already has a live worker, or the supervisor
                was stopped.
            OSError: the worker could not be started.
        """
        with self._lock:
            if self.start_method == "fork" and self._zygote is None:
                self._start_zygote()
            return {slot: self.spawn(slot) for slot in slots}

    def _start_zygote(self) -> None:
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        self._cmd_w, self._evt_r = cmd_w, evt_r
        proc = self._ctx.Process(
            target=_zygote_main, name=f"{self.name}-zygote", daemon=True,
            args=(cmd_r, evt_w, (cmd_w, evt_r), os.getpid(), _outlives_children(),
                  self.target, self.args, self.name, self._wake))
        try:
            with threads_paused():          # no shmipc thread runs while we fork
                proc.start()
        except BaseException:
            os.close(cmd_w)
            os.close(evt_r)
            self._cmd_w = self._evt_r = -1
            raise
        finally:
            os.close(cmd_r)
            os.close(evt_w)
        self._zygote = proc

    def spawn(self, slot: int) -> int:
        """Start a worker in `slot` (after its previous one exited); returns its pid.

        Raises:
            ValueError: the slot has a live worker, or the supervisor was stopped.
            OSError: the worker could not be started (or the zygote is gone).
        """
        if not isinstance(slot, int) or slot < 0:
            raise ValueError(f"slot must be a non-negative int, got {slot!r}")
        with self._lock:
            if self._stopped:
                raise ValueError("the supervisor was stopped")
            if slot in self._pids:
                raise ValueError(f"slot {slot} still has worker pid {self._pids[slot]}")
            if self.start_method == "fork":
                if self._zygote is None:
                    self._start_zygote()
                pid = self._zygote_spawn(slot)
            else:
                proc = self._ctx.Process(
                    target=_process_entry, name=f"{self.name}-{slot}", daemon=True,
                    args=(self.target, slot, self.args, os.getpid(), self.start_method,
                          _outlives_children()))
                proc.start()
                self._procs[slot] = proc
                pid = proc.pid
            self._pids[slot] = pid
            return pid

    def _zygote_spawn(self, slot: int) -> int:
        try:
            os.write(self._cmd_w, _CMD.pack(_CMD_SPAWN, slot))
        except OSError as exc:
            raise OSError(exc.errno, f"the worker zygote is gone: {exc.strerror}") from None
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            for kind, evslot, pid, code in self._read_events(max(deadline - time.monotonic(), 0)):
                if kind == _EVT_STARTED and evslot == slot:
                    return pid
                if kind == _EVT_SPAWN_FAILED and evslot == slot:
                    raise OSError(code, f"the zygote could not fork a worker: {os.strerror(code)}")
            if time.monotonic() >= deadline or not self._zygote.is_alive():
                raise OSError(errno.ECHILD, f"the worker zygote (pid {self._zygote.pid}) did not start "
                                            f"a worker for slot {slot} (exit code {self._zygote.exitcode})")

    def _read_events(self, timeout: float) -> list[tuple[int, int, int, int]]:
        """Read zygote events (waiting up to `timeout`); exits are queued in
        _pending, everything read is returned."""
        out: list[tuple[int, int, int, int]] = []
        if self._evt_r < 0:
            return out
        try:
            ready, _, _ = select.select([self._evt_r], [], [], timeout)
        except InterruptedError:
            ready = []
        if not ready:
            return out
        try:
            data = os.read(self._evt_r, 4096)
        except BlockingIOError:
            data = None
        if data == b"":                 # the zygote exited
            os.close(self._evt_r)
            self._evt_r = -1
        elif data:
            self._evt_buf += data
        while len(self._evt_buf) >= _EVT.size:
            event = _EVT.unpack_from(self._evt_buf)
            self._evt_buf = self._evt_buf[_EVT.size:]
            out.append(event)
            kind, slot, pid, code = event
            if kind == _EVT_EXITED:
                self._pending.append(WorkerExit(slot, pid, code))
        return out

    # ------------------------------------------------------------ watching
    def pids(self) -> dict[int, int]:
        """{slot: pid} of the workers not yet reported as exited."""
        with self._lock:
            return dict(self._pids)

    def poll(self) -> list[WorkerExit]:
        """Exits since the last call (without waiting); those workers are reaped."""
        return self.wait(0)

    def wait(self, timeout: float | None) -> list[WorkerExit]:
        """Wait up to `timeout` seconds (None: until one happens) for worker
        exits; return them (possibly none)."""
        with self._lock:
            if self.start_method == "fork":
                if not self._pending:
                    self._read_events(timeout)
                    if self._evt_r < 0 and self._pids:
                        # the zygote died (killed): its workers got SIGKILL with it
                        for slot, pid in list(self._pids.items()):
                            if not pid_alive(pid):
                                self._pending.append(WorkerExit(slot, pid, -signal.SIGKILL))
                exits, self._pending = self._pending, []
            else:
                procs = list(self._procs.values())
                if timeout != 0 and procs:
                    multiprocessing.connection.wait([p.sentinel for p in procs], timeout)
                exits = []
                for slot, proc in list(self._procs.items()):
                    if proc.exitcode is not None:
                        exits.append(WorkerExit(slot, proc.pid, proc.exitcode))
                        del self._procs[slot]
                        proc.close()
            for ev in exits:
                if self._pids.get(ev.slot) == ev.pid:
                    del self._pids[ev.slot]
            return exits

    def kill(self, slot: int, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the worker in `slot` (if it lives)."""
        with self._lock:
            pid = self._pids.get(slot)
        if pid is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    # ------------------------------------------------------------ stopping
    def stop(self, timeout: float = 1.0) -> list[WorkerExit]:
        """Stop every worker: SIGTERM, then SIGKILL after `timeout` seconds;
        reap them and the zygote. Idempotent. Returns the exits not yet
        reported."""
        if os.getpid() != self._owner_pid:
            return []               # a forked copy never stops its parent's workers
        with self._lock:
            if self._stopped:
                return []
            self._stopped = True
            exits: list[WorkerExit] = []
            if self._zygote is not None:
                # the zygote sends SIGTERM, waits a second, then SIGKILL, and reaps
                try:
                    os.write(self._cmd_w, _CMD.pack(_CMD_QUIT, int(timeout * 1000)))
                except OSError:
                    pass
                os.close(self._cmd_w)
                self._cmd_w = -1
                deadline = time.monotonic() + timeout + 2.0
                while self._evt_r >= 0 and time.monotonic() < deadline:
                    self._read_events(0.05)
                self._zygote.join(max(deadline - time.monotonic(), 0.1))
                if self._zygote.exitcode is None:
                    self._zygote.kill()
                    self._zygote.join(1.0)
                self._zygote.close() if self._zygote.exitcode is not None else None
                self._zygote = None
                if self._evt_r >= 0:
                    os.close(self._evt_r)
                    self._evt_r = -1
                exits, self._pending = self._pending, []
            else:
                for proc in self._procs.values():
                    if proc.exitcode is None:
                        proc.terminate()
                deadline = time.monotonic() + timeout
                for proc in self._procs.values():
                    proc.join(max(deadline - time.monotonic(), 0))
                for slot, proc in self._procs.items():
                    if proc.exitcode is None:
                        proc.kill()
                        proc.join()
                    exits.append(WorkerExit(slot, proc.pid, proc.exitcode))
                    proc.close()
                self._procs.clear()
            self._pids.clear()
            return exits

    @property
    def stopped(self) -> bool:
        return self._stopped

    def __del__(self) -> None:
        try:
            self.stop(0.2)
        except Exception:
            pass

    def __repr__(self) -> str:
        return (f"<shmipc Supervisor {self.name} {self.start_method} "
                f"{'stopped' if self._stopped else f'{len(self._pids)} workers'}>")
