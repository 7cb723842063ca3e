"""The parent's side of one zygote (see :mod:`shmipc._zygote` for the
child's): its process, the command pipe (parent -> zygote), the event pipe
(zygote -> parent) and the socket over which it hands over a spare's pipe
ends. Used by :class:`shmipc._workers.Supervisor`, which owns the protocol's
sequencing (spawn, go, released; spare; quit).
"""
from __future__ import annotations

import os
import select
import signal
import socket
import time
from typing import Any

from shmipc._proc import pid_alive
from shmipc._waiting import EXIT_POLL_S
from shmipc._zygote import _CMD, _EVT, _SPARE_MSG

__all__ = ["_ZygoteLink", "_pidfd_running"]


class _ZygoteLink:
    """The parent's side of one zygote: its process, command pipe, event pipe
    and the socket it hands a spare's pipe ends over. The first zygote is our
    child (a multiprocessing Process: `proc`); a spare is a child of the
    zygote that forked it, so it is watched and signalled through a pidfd."""

    def __init__(self, proc: Any, pid: int, cmd_w: int, evt_r: int, sock: Any) -> None:
        self.proc = proc
        self.pid = pid
        self.cmd_w = cmd_w
        self.evt_r = evt_r
        self.sock = sock
        self.pidfd = -1
        if proc is None:
            try:
                self.pidfd = os.pidfd_open(pid)
            except (AttributeError, OSError):
                self.pidfd = -1
        self.buf = b""
        self.eof = False            # every writer of the event pipe is gone
        self.exitcode: int | None = None    # once closed: how our child zygote ended (None: unknown)

    def exited(self) -> bool:
        if self.proc is not None:
            return self.proc.exitcode is not None
        if self.pidfd >= 0:
            return not _pidfd_running(self.pidfd)
        return not pid_alive(self.pid)

    def alive(self) -> bool:
        return not self.eof and not self.exited() and pid_alive(self.pid)

    def kill(self) -> None:
        try:
            if self.proc is not None:
                if self.proc.exitcode is None:
                    self.proc.kill()
            elif self.pidfd >= 0:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except Exception:
            pass

    def send(self, cmd: int, arg: int) -> None:
        """Raises OSError if the zygote is gone."""
        os.write(self.cmd_w, _CMD.pack(cmd, arg))

    def read(self, timeout: float) -> list[tuple[int, int, int, int]]:
        """Events the zygote reported, waiting up to `timeout` for the first."""
        out: list[tuple[int, int, int, int]] = []
        if self.eof:
            return out
        try:
            ready, _, _ = select.select([self.evt_r], [], [], timeout)
        except InterruptedError:
            ready = []
        if not ready:
            return out
        try:
            data = os.read(self.evt_r, 4096)
        except BlockingIOError:
            data = None
        if data == b"":
            self.eof = True
        elif data:
            self.buf += data
        while len(self.buf) >= _EVT.size:
            out.append(_EVT.unpack_from(self.buf))
            self.buf = self.buf[_EVT.size:]
        return out

    def receive_spare(self, timeout: float) -> "_ZygoteLink | None":
        """The spare this zygote forked on _CMD_SPARE: its pid and pipe ends."""
        try:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return None
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, _SPARE_MSG.size, 3)
        except (OSError, ValueError):
            return None
        if len(msg) != _SPARE_MSG.size or len(fds) != 3:
            for fd in fds:
                os.close(fd)
            return None
        (pid,) = _SPARE_MSG.unpack(msg)
        return _ZygoteLink(None, pid, fds[0], fds[1], socket.socket(fileno=fds[2]))

    def close(self, kill: bool, timeout: float = 1.0) -> None:
        """Close our ends and wait for the zygote to exit (SIGKILLed first if
        `kill`); our child is reaped."""
        if kill:
            self.kill()
        for fd in (self.cmd_w, self.evt_r):
            if fd >= 0:
                os.close(fd)
        self.cmd_w = self.evt_r = -1
        self.eof = True
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            # (not proc.join(): its sentinel pipe is inherited by our workers
            # and spare, so it reads EOF only once they are gone too)
            for wait, last in ((timeout, False), (1.0, True)):
                deadline = time.monotonic() + wait
                while self.proc.exitcode is None and time.monotonic() < deadline:
                    time.sleep(EXIT_POLL_S)
                if self.proc.exitcode is not None or last:
                    break
                self.proc.kill()
            if self.proc.exitcode is not None:
                self.exitcode = self.proc.exitcode
                self.proc.close()
            return
        deadline = time.monotonic() + timeout
        while not self.exited() and time.monotonic() < deadline:
            time.sleep(EXIT_POLL_S)
        if not self.exited():
            self.kill()
            deadline = time.monotonic() + 1.0
            while not self.exited() and time.monotonic() < deadline:
                time.sleep(EXIT_POLL_S)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _pidfd_running(fd: int) -> bool:
    try:
        ready, _, _ = select.select([fd], [], [], 0)
    except (OSError, ValueError):
        return False
    return not ready
