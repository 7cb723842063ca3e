"""What runs in the processes a :class:`shmipc._workers.Supervisor` starts.

* :class:`_Zygote`: under fork, the single-threaded helper that forks the
  workers, reaps them and reports their exit codes to the parent through a
  pipe (the protocol below);
* every worker's start: it ignores SIGINT, runs its target, and outlives the
  helper that forked it (the zygote, or multiprocessing's fork server) while
  dying with the pool's parent (see _survive_helper_death).

The parent's side of all this is :mod:`shmipc._workers` (which imports this
module, never the reverse).
"""
from __future__ import annotations

import multiprocessing
import os
import select
import signal
import struct
import sys
import threading
import time
import traceback
from typing import Any, Callable

from shmipc._proc import die_with_parent, pid_alive
from shmipc._waiting import EXIT_POLL_S, PARENT_WATCH_S, ZYGOTE_IDLE_S, ZYGOTE_POLL_S

# zygote <- parent commands, and zygote -> parent events: fixed records, written
# with one write() each (smaller than PIPE_BUF, hence atomic)
_CMD = struct.Struct("<ii")          # command, argument
_EVT = struct.Struct("<iiii")        # kind, slot, pid, exitcode
_CMD_SPAWN, _CMD_SIGNAL, _CMD_QUIT, _CMD_GO, _CMD_SPARE = 1, 2, 3, 4, 5
_SPARE_MSG = struct.Struct("<i")     # a spare zygote's pid, sent with its pipe ends (SCM_RIGHTS)
_EVT_STARTED, _EVT_EXITED, _EVT_SPAWN_FAILED, _EVT_RELEASED = 1, 2, 3, 4


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
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Under spawn, Supervisor.spawn started us with SIGINT blocked, so a
    # Ctrl-C that came while we imported and unpickled is still pending:
    # ignoring it first, then unblocking it, discards it (no traceback)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if method != "spawn":
        _survive_helper_death(parent_pid)       # the fork server's death costs us nothing
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


# ---------------------------------------------------------------------- helper deaths
# A worker is forked by a helper (the zygote, or multiprocessing's fork server),
# but must live exactly as long as the pool's *parent*: a helper killed by the
# OOM killer or a stray kill must cost no task. So the kernel's parent-death
# signal towards the helper is a catchable one; its handler checks the pool's
# parent: dead -> the worker dies at once; alive -> the worker carries on, and a
# small watchdog thread (started only then) kills it when the parent dies.
_HELPER_DIED = signal.SIGRTMIN + 3 if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2
_watched_parent = 0                     # the pool's parent, in a worker
_watchdog_started = False


def _survive_helper_death(parent_pid: int) -> None:
    """In a worker just forked by a helper: outlive the helper, die with `parent_pid`."""
    global _watched_parent, _watchdog_started
    _watched_parent = parent_pid
    _watchdog_started = False
    signal.signal(_HELPER_DIED, _on_helper_died)
    helper = os.getppid()
    die_with_parent(helper, _HELPER_DIED)   # exits at once if the helper is already gone
    if not pid_alive(parent_pid):
        os._exit(1)


def _on_helper_died(signum: int, frame: Any) -> None:
    if not pid_alive(_watched_parent):
        os.kill(os.getpid(), signal.SIGKILL)    # as if the parent-death signal were SIGKILL
    _start_parent_watchdog()


def _start_parent_watchdog() -> None:
    global _watchdog_started
    if _watchdog_started:
        return
    _watchdog_started = True
    threading.Thread(target=_watch_parent, args=(_watched_parent,), name="shmipc-parent-watch",
                     daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    """Kill this worker when `parent_pid` exits (its helper, which the kernel
    would have told us about, is gone)."""
    try:
        fd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        fd = -1
    while True:
        if fd >= 0:
            try:
                select.select([fd], [], [])
            except InterruptedError:
                continue
        else:
            time.sleep(PARENT_WATCH_S)
        if not pid_alive(parent_pid):
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------- the zygote
def _zygote_main(cmd_r: int, evt_w: int, sock: int, close_fds: tuple, parent_pid: int,
                 pdeathsig: bool, target: Callable[..., Any], args: tuple, name: str,
                 wake: Callable[[], Any] | None = None) -> None:
    """Entry of the first zygote process (see :class:`_Zygote`)."""
    # the death signal follows the thread that forked us: trust it only if that
    # thread lives as long as the process; the loop's getppid() check covers the rest
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
    _Zygote(cmd_r, evt_w, sock, _open_pidfd(parent_pid), parent_pid, target, args, name, wake).run()


def _open_pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return -1


class _Zygote:
    """The zygote: forks workers on request, reaps them, reports exit codes.

    Single-threaded by construction (a fresh fork), so its forks are safe.
    Exits when told to, or when the parent closes the command pipe or dies,
    after stopping and reaping every worker.

    A worker is *gated*: it waits on a pipe until the parent, told of it
    (_EVT_STARTED), lets it go (_CMD_GO), and exits at once if the zygote
    dies before that. So a worker runs only if the parent accepted it: a
    zygote killed (or stopped, then killed by the parent) mid-spawn never
    leaves behind a worker the parent does not know of, serving a slot that
    the parent gave to a replacement.

    On request (_CMD_SPARE) it forks a *spare*: another zygote, as pristine
    as itself, with pipes of its own whose far ends it hands to the parent
    over `sock` (SCM_RIGHTS). The parent keeps it idle and promotes it when
    this one is lost, so a new zygote never has to be forked from the
    (multi-threaded) parent. A spare watches the parent through a pidfd, not
    getppid() (its parent is this zygote, which it outlives).
    """

    def __init__(self, cmd_r: int, evt_w: int, sock: int, parent_fd: int, parent_pid: int,
                 target: Callable[..., Any], args: tuple, name: str,
                 wake: Callable[[], Any] | None) -> None:
        self.cmd_r = cmd_r
        self.evt_w = evt_w
        self.sock = sock                                    # to hand the parent a spare's fds
        self.parent_fd = parent_fd                          # pidfd of the parent, or -1
        self.parent_pid = parent_pid
        self.spares: set[int] = set()                       # spares forked here (reaped, not reported)
        self.target = target
        self.args = args
        self.name = name
        self.wake = wake
        self.children: dict[int, tuple[int, int]] = {}      # pid -> (slot, pidfd or -1)
        self.gates: dict[int, int] = {}                     # pid -> write end of its gate
        self.buf = b""
        self.grace = 1.0

    def run(self) -> None:
        while True:
            fds = [self.cmd_r] + [pidfd for _, pidfd in self.children.values() if pidfd >= 0]
            if self.parent_fd >= 0:
                fds.append(self.parent_fd)
            polling = any(pidfd < 0 for _, pidfd in self.children.values())
            try:
                ready, _, _ = select.select(fds, [], [], ZYGOTE_POLL_S if polling else ZYGOTE_IDLE_S)
            except InterruptedError:
                ready = []
            if self.parent_fd in ready or not pid_alive(self.parent_pid):     # the parent died
                break
            if self.cmd_r in ready and not self._read_commands():
                break
            self._reap(False)
        self._stop_children(self.grace)
        os.close(self.evt_w)

    def _read_commands(self) -> bool:
        """Run the commands waiting in the pipe; False when it is time to quit."""
        try:
            data = os.read(self.cmd_r, 4096)
        except OSError:
            data = b""
        if not data:                                    # the parent is gone or closed us
            return False
        self.buf += data
        while len(self.buf) >= _CMD.size:
            cmd, arg = _CMD.unpack_from(self.buf)
            self.buf = self.buf[_CMD.size:]
            if cmd == _CMD_SPAWN:
                self._fork_worker(arg)
            elif cmd == _CMD_GO:
                self._release(arg)
            elif cmd == _CMD_SPARE:
                self._fork_spare()
            elif cmd == _CMD_SIGNAL:
                self._signal_all(arg)
            elif cmd == _CMD_QUIT:
                self.grace = arg / 1000.0
                return False
        return True

    def _report(self, kind: int, slot: int, pid: int, code: int) -> None:
        try:
            os.write(self.evt_w, _EVT.pack(kind, slot, pid, code))
        except OSError:
            pass            # parent gone: the death signal will follow

    def _signal_all(self, sig: int) -> None:
        for pid in self.children:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def _reap(self, block: bool) -> None:
        for pid in list(self.spares):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done == pid:
                self.spares.discard(pid)
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                done, status = pid, -1
            if done != pid:
                continue
            slot, pidfd = self.children.pop(pid)
            if pidfd >= 0:
                os.close(pidfd)
            gate = self.gates.pop(pid, -1)
            if gate >= 0:
                os.close(gate)
            self._report(_EVT_EXITED, slot, pid, _exit_code_of(status) if status != -1 else -1)
            if self.wake is not None:
                try:
                    self.wake()
                except Exception:
                    pass                # best effort: the parent also polls

    def _fork_worker(self, slot: int) -> None:
        gate_r, gate_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(gate_r)
            os.close(gate_w)
            self._report(_EVT_SPAWN_FAILED, slot, 0, exc.errno or -1)
            return
        if pid == 0:                                   # the worker
            code = 1
            try:
                for fd in ([self.cmd_r, self.evt_w, gate_w] + [fd for _, fd in self.children.values()]
                           + list(self.gates.values())):
                    if fd >= 0:
                        os.close(fd)
                _survive_helper_death(self.parent_pid)
                if os.read(gate_r, 1) != b"g":          # the zygote died before the parent accepted us
                    os._exit(1)
                os.close(gate_r)
                try:
                    multiprocessing.current_process().name = f"{self.name}-{slot}"
                except Exception:
                    pass
                code = _run_target(self.target, slot, self.args)
            finally:
                os._exit(code)
        os.close(gate_r)
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = -1                                  # poll instead
        self.children[pid] = (slot, pidfd)
        self.gates[pid] = gate_w
        self._report(_EVT_STARTED, slot, pid, 0)

    def _fork_spare(self) -> None:
        """Fork a spare zygote and hand the parent its pid and pipe ends."""
        import socket

        try:
            cmd_r, cmd_w = os.pipe()
            evt_r, evt_w = os.pipe()
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            return                                      # the parent times out: no spare
        try:
            pid = os.fork()
        except OSError:
            pid = -1
        if pid == 0:                                    # the spare
            code = 0
            try:
                for fd in ([self.cmd_r, self.evt_w, self.sock, cmd_w, evt_r]
                           + [fd for _, fd in self.children.values()] + list(self.gates.values())):
                    if fd >= 0:
                        os.close(fd)
                mine.close()
                _Zygote(cmd_r, evt_w, theirs.detach(), self.parent_fd, self.parent_pid, self.target,
                        self.args, self.name, self.wake).run()
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        theirs.close()
        os.close(cmd_r)
        os.close(evt_w)
        if pid > 0:
            self.spares.add(pid)
            try:
                with socket.socket(fileno=os.dup(self.sock)) as out:
                    socket.send_fds(out, [_SPARE_MSG.pack(pid)], [cmd_w, evt_r, mine.fileno()])
            except OSError:
                pass                                    # the parent is gone or times out
        os.close(cmd_w)
        os.close(evt_r)
        mine.close()

    def _release(self, pid: int) -> None:
        """The parent accepted worker `pid` (and tracks it from now on): let
        it run, then say so. (If we die before letting it run, it exits at
        its gate: the parent sees a worker that died while starting.)"""
        gate = self.gates.pop(pid, -1)
        if gate < 0:
            return
        try:
            os.write(gate, b"g")
        except OSError:
            pass                                        # it died already: reaped later
        os.close(gate)
        self._report(_EVT_RELEASED, self.children.get(pid, (-1, -1))[0], pid, 0)

    def _stop_children(self, grace: float) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            self._reap(False)
            time.sleep(EXIT_POLL_S)
        self._signal_all(signal.SIGKILL)
        self._reap(True)
