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
zygote also watches the caller through a pidfd. A target can wait with
:func:`shmipc._runtime.next_message` for its work, which looks at the
parent between waits, as a further line of defence (spawn workers started
from a short-lived thread rely on it).

What runs inside the processes started here (the zygote, a worker's start)
lives in :mod:`shmipc._zygote`. No helper is a single point of failure: a
worker outlives the zygote or fork server that forked it (the death signal
it gets from that helper is a catchable one: it checks the caller and dies
only if the caller is gone), and a lost or unresponsive zygote is replaced
by its spare at the next spawn (see :class:`Supervisor`).

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
import socket
import threading
import time
from typing import Any, Callable, Iterable, NamedTuple

from shmipc._fork_safety import (forget_mp_child, mark_thread_long_lived, outlives_children,  # noqa: F401
                                  register_pausable, sigint_blocked, threads_paused,
                                  unmark_thread_long_lived)
from shmipc._proc import pid_alive, resolve_start_method
from shmipc._runtime import killed_from_outside
from shmipc._waiting import EXIT_POLL_S, ZYGOTE_EXIT_CHECK_S
from shmipc._zygote_link import _pidfd_running, _ZygoteLink
from shmipc._zygote import (_CMD_GO, _CMD_QUIT, _CMD_SPARE, _CMD_SPAWN, _EVT_EXITED,
                            _EVT_RELEASED, _EVT_SPAWN_FAILED, _EVT_STARTED, _process_entry,
                            _zygote_main)

__all__ = ["Supervisor", "WorkerExit", "resolve_start_method",
           "mark_thread_long_lived", "unmark_thread_long_lived", "register_pausable",
           "threads_paused"]


class WorkerExit(NamedTuple):
    """A worker process ended: ``exitcode`` < 0 means killed by signal -exitcode
    (multiprocessing's convention); None if it could not be determined."""

    slot: int
    pid: int
    exitcode: int | None


_STOP_JOIN_S = 2.0      # stop(): how long a SIGKILLed spawn/forkserver worker's exit status is waited for
_FORK_SERVER_SETTLE_S = 0.2     # a start that failed on the fork server: how long it is given to be seen dead


def _start_failed(slot: int, why: Any, outside: bool = True, code: int = errno.ECHILD) -> OSError:
    """The error of a worker start that failed; ``killed_from_outside`` says
    whether only something done from outside caused it (the zygotes or the
    fork server killed or stopped): Supervisor.spawn's callers never count
    such a failure against the pool or pipeline."""
    error = OSError(code, f"could not start a worker for slot {slot}: {why}")
    error.killed_from_outside = outside     # type: ignore[attr-defined]
    return error


def _fork_server_state(settle: float = 0.0) -> str:
    """How multiprocessing's fork server (a child of this process) is:
    "stopped"; "killed" by a signal it did not raise itself, and not yet
    restarted; else "" (running, exited with a code of its own, or none).
    Looked at without reaping it (WNOWAIT): multiprocessing reaps and
    restarts it at its next start. `settle`: seconds to wait for a running
    server to exit (a killed process closes its descriptors, which a client
    sees at once as EOF, a moment before it can be waited for)."""
    try:
        from multiprocessing import forkserver

        pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    except Exception:
        return ""
    if not isinstance(pid, int) or pid <= 0:
        return ""
    flags = os.WEXITED | os.WSTOPPED | os.WNOHANG | os.WNOWAIT
    deadline = time.monotonic() + settle
    try:
        info = os.waitid(os.P_PID, pid, flags)
        while info is None and time.monotonic() < deadline:
            time.sleep(EXIT_POLL_S)
            info = os.waitid(os.P_PID, pid, flags)
    except OSError:                     # not our child (reaped already)
        return ""
    if info is None:
        return ""                       # running
    if info.si_code == os.CLD_STOPPED:
        return "stopped"
    if info.si_code in (os.CLD_KILLED, os.CLD_DUMPED) and killed_from_outside(-info.si_status):
        return "killed"
    return ""


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

    Under fork, the zygote is no single point of failure: if it dies (or
    does not answer a spawn request within ``zygote_timeout`` seconds, e.g.
    SIGSTOPped, and is then killed), its workers carry on (they die with this
    process, not with the zygote), their exits are seen through pidfds
    (exit code None: only the zygote could reap them), and the next spawn
    is served by its *spare*: an idle zygote it forked (so as pristine as
    itself), promoted, which at once forks a spare of its own
    (``zygotes_replaced`` counts take-overs). Only when both are lost at
    once is a new zygote forked from this process, with its registered
    threads paused (``zygotes_forked_late``): the one fork of a possibly
    multi-threaded process shmipc makes (multiprocessing's fork pools fork
    every replacement worker that way; Python 3.12+ warns about it).

    A zygote that is stopped or stuck is also noticed when a worker of its
    exits and it does not report the exit within ``zygote_timeout``.
    """

    # set before anything can raise, so __del__/stop are safe after a failed __init__
    _link: _ZygoteLink | None = None
    _spare: _ZygoteLink | None = None
    _stopped: bool = False
    zygote_timeout = 3.0            # seconds a zygote may take to answer a spawn request

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
        self._pidfds: dict[int, int] = {}               # slot -> pidfd (fork), -1 if none
        self._started_by: dict[int, _ZygoteLink] = {}   # slot -> the zygote that forked it
        self._pending: list[WorkerExit] = []            # exits read while waiting for a start
        self._owner_pid = os.getpid()
        self._orphaned: set[int] = set()                # forkserver workers whose server died
        self._dead_since: dict[int, float] = {}         # pidfd -> when first seen exited, unreported
        self._last_exit_check = 0.0
        self._spare_retry_at = 0.0
        self._spare_asked: _ZygoteLink | None = None    # the zygote asked for a spare, not answered yet
        self._spare_asked_at = 0.0
        self.zygotes_started = 0                        # forked from this process
        self.zygotes_replaced = 0                       # zygotes that took over from a lost one
        self.zygotes_forked_late = 0                    # ... forked from this process (no live spare)

    # ------------------------------------------------------------ starting
    def start(self, slots: Iterable[int]) -> dict[int, int]:
        """Start one worker for each slot (the zygote first, under fork).

        Returns {slot: pid} of the workers started. A slot whose worker could
        not start only because the zygotes were killed or stopped from
        outside (or were too slow: see spawn) is left out, for the caller to
        start later with a back-off, as it replaces dead workers: kills from
        outside never stop a pool or a pipeline from being made.

        Raises:
            ValueError: a slot already has a live worker, or the supervisor
                was stopped.
            OSError: a worker could not be started by a failure of its own.
        """
        with self._lock:
            if self.start_method == "fork" and self._link is None:
                self._link = self._start_zygote()
                self._keep_spare(now=True)
            started = {}
            for slot in slots:
                try:
                    started[slot] = self.spawn(slot)
                except OSError as exc:
                    if not getattr(exc, "killed_from_outside", False):
                        raise
            return started

    def _start_zygote(self) -> _ZygoteLink:
        cmd_r, cmd_w = os.pipe()
        evt_r, evt_w = os.pipe()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        proc = self._ctx.Process(
            target=_zygote_main, name=f"{self.name}-zygote", daemon=True,
            args=(cmd_r, evt_w, theirs.fileno(), (cmd_w, evt_r, mine.fileno()), os.getpid(),
                  outlives_children(), self.target, self.args, self.name, self._wake))
        try:
            with threads_paused():          # no shmipc thread runs while we fork
                proc.start()
        except BaseException:
            os.close(cmd_w)
            os.close(evt_r)
            mine.close()
            raise
        finally:
            os.close(cmd_r)
            os.close(evt_w)
            theirs.close()
        # The zygote is ours, not multiprocessing's: a plain os.fork() child of
        # this process must not terminate it from multiprocessing's atexit
        # handler (which terminates every daemonic child it knows of), and
        # active_children() must not list it. We stop and reap it ourselves.
        forget_mp_child(proc)
        self.zygotes_started += 1
        return _ZygoteLink(proc, proc.pid, cmd_w, evt_r, mine)

    def _new_zygote(self) -> _ZygoteLink:
        """A zygote to serve from now on: the spare if it lives (promoted),
        else one forked from this process (the first, or when both died)."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.alive():
            return spare
        if spare is not None:
            self._lose_zygote(spare, kill=True)
        link = self._start_zygote()
        if self.zygotes_started > 1:
            self.zygotes_forked_late += 1
        return link

    def _keep_spare(self, now: bool = False) -> None:
        """Have a live spare zygote, forked by the serving one. The request is
        answered later (read at a later call, so the bookkeeping thread never
        waits on it) unless `now`; a zygote that does not answer within
        zygote_timeout is stopped or stuck, and is replaced."""
        spare, link = self._spare, self._link
        if spare is not None and spare.alive():
            return
        if spare is not None:
            self._spare = None
            self._lose_zygote(spare, kill=True)
        if link is None or not link.alive():
            return
        if self._spare_asked is not link:
            if not now and time.monotonic() < self._spare_retry_at:
                return
            self._spare_retry_at = time.monotonic() + 0.1
            try:
                link.send(_CMD_SPARE, 0)
            except OSError:
                return
            self._spare_asked, self._spare_asked_at = link, time.monotonic()
        self._spare = link.receive_spare(self.zygote_timeout if now else 0)
        if self._spare is not None:
            self._spare_asked = None
        elif time.monotonic() - self._spare_asked_at > self.zygote_timeout:
            self._spare_asked = None
            self._lose_zygote(link, kill=True)      # its workers live on; the next spawn replaces it

    def spawn(self, slot: int) -> int:
        """Start a worker in `slot` (after its previous one exited); returns its pid.

        Raises:
            ValueError: the slot has a live worker, or the supervisor was stopped.
            OSError: the worker could not be started.
        """
        if not isinstance(slot, int) or slot < 0:
            raise ValueError(f"slot must be a non-negative int, got {slot!r}")
        with self._lock:
            if self._stopped:
                raise ValueError("the supervisor was stopped")
            if slot in self._pids:
                raise ValueError(f"slot {slot} still has worker pid {self._pids[slot]}")
            if self.start_method == "fork":
                pid = self._zygote_spawn(slot)
            else:
                if self.start_method == "forkserver" and _fork_server_state() == "stopped":
                    # a start would wait for its answer for as long as it is
                    # stopped (a killed one is restarted by multiprocessing)
                    raise _start_failed(slot, "the fork server is stopped")
                proc = self._ctx.Process(
                    target=_process_entry, name=f"{self.name}-{slot}", daemon=True,
                    args=(self.target, slot, self.args, os.getpid(), self.start_method,
                          outlives_children()))
                try:
                    with sigint_blocked():         # the child inherits the mask (see _process_entry)
                        proc.start()
                except (OSError, EOFError) as exc:
                    # multiprocessing's fork server killed mid-request: "unexpected
                    # EOF", a refused connection, a broken pipe; that says nothing
                    # about whether workers can start (as a zygote killed from outside)
                    if self.start_method == "forkserver" and \
                            _fork_server_state(settle=_FORK_SERVER_SETTLE_S) in ("stopped", "killed"):
                        raise _start_failed(slot, f"the fork server was stopped or killed ({exc!r:.100})") from exc
                    raise
                self._procs[slot] = proc
                self._track(slot, proc.pid, None)
                pid = proc.pid
            self._pids[slot] = pid
            return pid

    def _zygote_spawn(self, slot: int) -> int:
        """Ask the zygote for a worker; replace a zygote that is gone or does
        not answer in time (killed, stopped) and ask the new one."""
        last: BaseException | None = None
        # whether a zygote failed by its own hand (an exit code, a fault
        # signal); zygotes killed or stopped from outside, or too slow, say
        # nothing about whether workers can start (see _engine_exits._respawn)
        own_failure = False
        for _attempt in range(3):
            link = self._link
            if link is None or not link.alive():
                if link is not None:
                    self._lose_zygote(link, kill=True)
                first = self.zygotes_started == 0
                link = self._link = self._new_zygote()
                if not first:
                    self.zygotes_replaced += 1
                self._keep_spare(now=True)
            try:
                link.send(_CMD_SPAWN, slot)
            except OSError as exc:
                last = exc
                self._lose_zygote(link, kill=True)
                own_failure = own_failure or not killed_from_outside(link.exitcode)
                continue
            deadline = time.monotonic() + self.zygote_timeout
            started = 0
            while True:
                for kind, evslot, pid, code in self._read_link(link, max(deadline - time.monotonic(), 0)):
                    if kind == _EVT_STARTED and evslot == slot and not started:
                        try:
                            link.send(_CMD_GO, pid)     # (if this fails, the worker never runs)
                        except OSError:
                            break
                        # accepted: tracked from now on, whatever happens to the zygote
                        self._track(slot, pid, link)
                        started = pid
                    elif kind == _EVT_RELEASED and pid == started:
                        return pid
                    elif kind == _EVT_SPAWN_FAILED and evslot == slot:
                        raise OSError(code, f"the zygote could not fork a worker: {os.strerror(code)}")
                if time.monotonic() >= deadline or not link.alive():
                    if started:
                        # not released in time: the zygote is dead or stuck (it
                        # is killed); the worker exits at its gate, and that
                        # exit of a tracked worker is reported as usual
                        self._lose_zygote(link, kill=True)
                        return started
                    break
            last = OSError(errno.ETIMEDOUT, f"the worker zygote (pid {link.pid}) did not start a "
                                            f"worker for slot {slot} within {self.zygote_timeout} s")
            self._lose_zygote(link, kill=True)
        raise _start_failed(slot, last, not own_failure, getattr(last, "errno", None) or errno.ECHILD)

    def _track(self, slot: int, pid: int, link: _ZygoteLink) -> None:
        """Watch a worker the zygote reported: its pidfd tells us it exited
        even if the zygote (which reaps it) is gone by then."""
        try:
            self._pidfds[slot] = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._pidfds[slot] = -1
        self._started_by[slot] = link

    def _untrack(self, slot: int) -> None:
        fd = self._pidfds.pop(slot, -1)
        if fd >= 0:
            os.close(fd)
        self._started_by.pop(slot, None)

    def _read_link(self, link: _ZygoteLink, timeout: float) -> list[tuple[int, int, int, int]]:
        """Events from a zygote; worker exits are queued in _pending."""
        events = link.read(timeout)
        for kind, slot, pid, code in events:
            if kind == _EVT_EXITED:
                self._pending.append(WorkerExit(slot, pid, code))
        return events

    def _lose_zygote(self, link: _ZygoteLink, kill: bool) -> None:
        """The zygote died, or does not answer (then it is killed): read what
        it reported, reap it. Its workers live on (see _survive_helper_death)."""
        if kill:
            link.kill()
        deadline = time.monotonic() + 1.0
        while not link.eof and time.monotonic() < deadline:
            self._read_link(link, 0.05)
        link.close(kill=True)
        if self._link is link:
            self._link = None
        if self._spare is link:
            self._spare = None

    # ------------------------------------------------------------ watching
    def pids(self) -> dict[int, int]:
        """{slot: pid} of the workers not yet reported as exited."""
        with self._lock:
            return dict(self._pids)

    def helper_pids(self) -> list[int]:
        """Pids of the live helper processes: the serving zygote first, then
        its spare (for tests and tools)."""
        with self._lock:
            return [link.pid for link in (self._link, self._spare) if link is not None and link.alive()]

    @property
    def _zygote(self) -> _ZygoteLink | None:
        return self._link

    def poll(self) -> list[WorkerExit]:
        """Exits since the last call (without waiting); those workers are reaped."""
        return self.wait(0)

    def wait(self, timeout: float | None) -> list[WorkerExit]:
        """Wait up to `timeout` seconds (None: until one happens) for worker
        exits; return them (possibly none)."""
        with self._lock:
            if self.start_method == "fork":
                exits = self._wait_fork(timeout)
            else:
                exits = self._wait_processes(timeout)
            out = []
            for ev in exits:
                if self._pids.get(ev.slot) == ev.pid:
                    del self._pids[ev.slot]
                    self._untrack(ev.slot)
                    out.append(ev)
            return out

    def _wait_fork(self, timeout: float | None) -> list[WorkerExit]:
        link = self._link
        if not self._pending:
            # orphans: workers whose zygote is gone; only their pidfd tells their exit
            orphans = {fd: slot for slot, fd in self._pidfds.items()
                       if fd >= 0 and self._started_by.get(slot) is not link}
            fds = list(orphans) + ([link.evt_r] if link is not None and not link.eof else [])
            if timeout != 0 and fds:
                try:
                    select.select(fds, [], [], timeout)
                except InterruptedError:
                    pass
            if link is not None:
                self._read_link(link, 0)
                if not link.alive():
                    self._lose_zygote(link, kill=False)
                elif not self._pending and self._unreported_exit(link):
                    # a worker of this zygote exited and it has not said so in
                    # time: it is stopped or stuck; its workers become orphans
                    self._lose_zygote(link, kill=True)
                else:
                    self._keep_spare()
                orphans = {fd: slot for slot, fd in self._pidfds.items()
                           if fd >= 0 and self._started_by.get(slot) is not self._link}
            if orphans:
                try:
                    ready, _, _ = select.select(list(orphans), [], [], 0)
                except InterruptedError:
                    ready = []
                for fd in ready:
                    slot = orphans[fd]
                    self._pending.append(WorkerExit(slot, self._pids.get(slot, 0), None))
            for slot, pid in list(self._pids.items()):      # no pidfd (old kernels)
                if self._pidfds.get(slot, -1) < 0 and self._started_by.get(slot) is not self._link \
                        and not pid_alive(pid):
                    self._pending.append(WorkerExit(slot, pid, None))
        exits, self._pending = self._pending, []
        return exits

    def _wait_processes(self, timeout: float | None) -> list[WorkerExit]:
        """wait() for spawn/forkserver workers. A forkserver worker whose fork
        server died looks exited to multiprocessing (exit code 255) while it
        still runs: from then on only its pidfd tells (exit code None)."""
        handles = []
        for slot, proc in self._procs.items():
            fd = self._pidfds.get(slot, -1)
            handles.append(fd if slot in self._orphaned else proc.sentinel)
        if timeout != 0 and handles:
            multiprocessing.connection.wait(handles, timeout)
        exits = []
        for slot, proc in list(self._procs.items()):
            fd = self._pidfds.get(slot, -1)
            if slot in self._orphaned:
                if _pidfd_running(fd):
                    continue
                code = None
            elif proc.exitcode is None:
                continue
            elif fd >= 0 and _pidfd_running(fd):
                self._orphaned.add(slot)            # the fork server is gone, the worker is not
                continue
            else:
                code = proc.exitcode
            exits.append(WorkerExit(slot, proc.pid, code))
            del self._procs[slot]
            self._orphaned.discard(slot)
            try:
                proc.close()
            except ValueError:
                pass
        return exits

    def _unreported_exit(self, link: _ZygoteLink) -> bool:
        """True if a worker of `link` exited more than zygote_timeout seconds ago
        and the zygote has not reported it (checked at most every 0.1 s)."""
        now = time.monotonic()
        if now - self._last_exit_check < ZYGOTE_EXIT_CHECK_S:
            return False
        self._last_exit_check = now
        mine = [fd for slot, fd in self._pidfds.items() if fd >= 0 and self._started_by.get(slot) is link]
        try:
            dead = set(select.select(mine, [], [], 0)[0]) if mine else set()
        except InterruptedError:
            dead = set()
        self._dead_since = {fd: self._dead_since.get(fd, now) for fd in dead}
        return any(now - t > self.zygote_timeout for t in self._dead_since.values())

    def kill(self, slot: int, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the worker in `slot` (if it lives)."""
        with self._lock:
            pid = self._pids.get(slot)
            fd = self._pidfds.get(slot, -1)
            if pid is None:
                return
            try:
                if fd >= 0:
                    signal.pidfd_send_signal(fd, sig)
                else:
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
            if self.start_method == "fork":
                link = self._link
                if link is not None:
                    # the zygote sends SIGTERM, waits `timeout`, then SIGKILL, and reaps
                    try:
                        link.send(_CMD_QUIT, int(timeout * 1000))
                    except OSError:
                        pass
                    os.close(link.cmd_w)
                    link.cmd_w = -1
                    deadline = time.monotonic() + timeout + 2.0
                    while not link.eof and time.monotonic() < deadline:
                        self._read_link(link, 0.05)
                    link.close(kill=True, timeout=max(deadline - time.monotonic(), 0.1))
                    self._link = None
                if self._spare is not None:
                    try:
                        self._spare.send(_CMD_QUIT, 0)
                    except OSError:
                        pass
                    self._spare.close(kill=False, timeout=2.0)
                    self._spare = None
                self._stop_orphans(timeout)
                exits, self._pending = self._pending, []
            else:
                for proc in self._procs.values():
                    if proc.exitcode is None:
                        proc.terminate()
                deadline = time.monotonic() + timeout
                for proc in self._procs.values():
                    proc.join(max(deadline - time.monotonic(), 0))
                for proc in self._procs.values():
                    if proc.exitcode is None:
                        proc.kill()
                # bounded: under forkserver the exit status comes from the
                # fork server, which may be stopped (SIGSTOP)
                deadline = time.monotonic() + _STOP_JOIN_S
                for slot, proc in self._procs.items():
                    if proc.exitcode is None:
                        proc.join(max(deadline - time.monotonic(), 0))
                    if proc.exitcode is None:
                        # killed (SIGKILL needs no answer), its status held by a
                        # stopped fork server: no longer waited for
                        forget_mp_child(proc)
                        exits.append(WorkerExit(slot, proc.pid, None))
                        continue
                    exits.append(WorkerExit(slot, proc.pid, proc.exitcode))
                    proc.close()
                self._procs.clear()
                self._stop_orphans(timeout)         # workers of a dead fork server
            for slot in list(self._pidfds):
                self._untrack(slot)
            self._pids.clear()
            return exits

    def _stop_orphans(self, timeout: float) -> None:
        """Workers whose zygote died are not our children: signal them through
        their pidfds (never a recycled pid) and wait for them to exit."""
        live = {slot: fd for slot, fd in self._pidfds.items() if fd >= 0 and _pidfd_running(fd)}
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
            for fd in live.values():
                try:
                    signal.pidfd_send_signal(fd, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + wait
            while live and time.monotonic() < deadline:
                live = {s: fd for s, fd in live.items() if _pidfd_running(fd)}
                if live:
                    time.sleep(EXIT_POLL_S)

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
