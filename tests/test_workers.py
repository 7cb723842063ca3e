"""The Supervisor (shmipc._workers): starting workers in slots, reporting their
exits with exit codes, replacing them, stopping everything; and the zygote is
no single point of failure: killed or stopped, its workers live on (their
exits still seen) and the next spawn comes from a new zygote.

Every test has a hard timeout; every wait is for a state, with a deadline."""
from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from shmipc._proc import pid_alive
from shmipc._workers import Supervisor, WorkerExit


@pytest.fixture(scope="module", autouse=True)
def _mp_helpers_running():
    """multiprocessing's resource tracker (spawn starts it on first use) is
    started before the leak checks look."""
    import multiprocessing.resource_tracker

    multiprocessing.resource_tracker.ensure_running()


def idle(slot, seconds=30.0):
    """A worker target: sleep (a 'task' that runs until killed)."""
    time.sleep(seconds)


def exit_with(slot, code):
    sys.exit(code)


def wait_exits(sup, n, timeout=10.0):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += sup.wait(0.05)
    return out


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_start_report_replace_stop(no_leaks, method):
    sup = Supervisor(idle, (), context=method, name="t-sup")
    try:
        pids = sup.start(range(2))
        assert sorted(pids) == [0, 1] and all(pid_alive(p) for p in pids.values())
        os.kill(pids[1], signal.SIGKILL)
        assert wait_exits(sup, 1) == [WorkerExit(1, pids[1], -signal.SIGKILL)]
        new = sup.spawn(1)
        assert new != pids[1] and sup.pids() == {0: pids[0], 1: new}
        with pytest.raises(ValueError, match="still has worker"):
            sup.spawn(1)
    finally:
        sup.stop(0.5)
    assert not any(pid_alive(p) for p in (pids[0], new))
    assert sup.stop() == []                     # idempotent


@pytest.mark.timeout(60)
def test_exit_codes(no_leaks):
    sup = Supervisor(exit_with, (3,), context="fork")
    try:
        pid = sup.start([0])[0]
        assert wait_exits(sup, 1) == [WorkerExit(0, pid, 3)]
    finally:
        sup.stop(0.5)


@pytest.mark.timeout(60)
def test_zygote_killed_workers_live_on_and_a_new_zygote_serves(no_leaks):
    sup = Supervisor(idle, (), context="fork")
    try:
        pids = sup.start(range(2))
        zygote, spare = sup.helper_pids()
        os.kill(zygote, signal.SIGKILL)
        assert wait_for(lambda: not sup.wait(0.01) and sup.helper_pids() == [spare])
        assert all(pid_alive(p) for p in pids.values())          # not killed with it
        # an orphan's exit is still seen (through its pidfd; only the zygote knew the code)
        os.kill(pids[0], signal.SIGKILL)
        assert wait_exits(sup, 1) == [WorkerExit(0, pids[0], None)]
        new = sup.spawn(0)
        # the spare took over (and forked a spare of its own): nothing was
        # forked from this (possibly multi-threaded) process
        assert sup.zygotes_replaced == 1 and sup.zygotes_forked_late == 0
        assert sup.helper_pids()[0] == spare and len(sup.helper_pids()) == 2
        os.kill(new, signal.SIGKILL)
        assert wait_exits(sup, 1) == [WorkerExit(0, new, -signal.SIGKILL)]    # from the new zygote
    finally:
        sup.stop(0.5)
    assert not pid_alive(pids[1])               # the orphan was stopped too


@pytest.mark.timeout(60)
def test_stopped_zygote_is_replaced_on_spawn(no_leaks):
    sup = Supervisor(idle, (), context="fork")
    sup.zygote_timeout = 0.5
    try:
        pids = sup.start([0])
        zygote = sup.helper_pids()[0]
        os.kill(zygote, signal.SIGSTOP)
        t0 = time.monotonic()
        new = sup.spawn(1)                      # the stopped zygote does not answer: replaced
        assert time.monotonic() - t0 < 5
        assert pid_alive(new) and sup.zygotes_replaced == 1 and sup.zygotes_forked_late == 0
        assert not pid_alive(zygote)
        assert pid_alive(pids[0])               # its worker lives on
    finally:
        sup.stop(0.5)


@pytest.mark.timeout(60)
def test_zygote_and_spare_both_killed(no_leaks):
    """Both helpers lost at once: the next one is forked from this process."""
    sup = Supervisor(idle, (), context="fork")
    try:
        pids = sup.start([0])
        helpers = sup.helper_pids()
        assert len(helpers) == 2
        for pid in helpers:
            os.kill(pid, signal.SIGKILL)
        assert wait_for(lambda: not any(pid_alive(h) for h in helpers))
        new = sup.spawn(1)
        assert pid_alive(new) and pid_alive(pids[0])
        assert sup.zygotes_replaced == 1 and sup.zygotes_forked_late == 1
        assert wait_for(lambda: len(sup.helper_pids()) == 2)        # and it has a spare again
    finally:
        sup.stop(0.5)


@pytest.mark.timeout(60)
def test_spare_killed_is_replaced(no_leaks):
    sup = Supervisor(idle, (), context="fork")
    try:
        sup.start([0])
        zygote, spare = sup.helper_pids()
        os.kill(spare, signal.SIGKILL)
        assert wait_for(lambda: not sup.wait(0.01) and len(sup.helper_pids()) == 2
                        and spare not in sup.helper_pids())
        assert sup.helper_pids()[0] == zygote and sup.zygotes_forked_late == 0
    finally:
        sup.stop(0.5)


@pytest.mark.timeout(60)
def test_stopped_zygote_with_an_unreported_exit_is_replaced(no_leaks):
    """A worker of a stopped zygote dies: nobody reaps or reports it, so the
    supervisor notices (pidfd) and, after zygote_timeout, replaces the zygote."""
    sup = Supervisor(idle, (), context="fork")
    sup.zygote_timeout = 0.5
    try:
        pids = sup.start(range(2))
        zygote = sup.helper_pids()[0]
        os.kill(zygote, signal.SIGSTOP)
        os.kill(pids[0], signal.SIGKILL)
        assert wait_exits(sup, 1) == [WorkerExit(0, pids[0], None)]
        assert not pid_alive(zygote) and pid_alive(pids[1])
    finally:
        sup.stop(0.5)


@pytest.mark.timeout(60)
def test_forked_copy_never_stops_the_parents_workers(no_leaks):
    from conftest import fork_child, wait_child

    sup = Supervisor(idle, (), context="fork")
    try:
        pid = sup.start([0])[0]
        assert wait_child(fork_child(sup.stop), 20) == 0
        assert pid_alive(pid) and sup.helper_pids()
    finally:
        sup.stop(0.5)


@pytest.mark.timeout(60)
def test_spare_request_to_a_stopped_zygote_never_stalls_wait(no_leaks):
    """The spare is lost and the zygote is stopped: asking it for a new spare
    must not block wait() (the pool's bookkeeping thread); after
    zygote_timeout without an answer the zygote is replaced."""
    sup = Supervisor(idle, (), context="fork")
    sup.zygote_timeout = 0.5
    try:
        pids = sup.start([0])
        zygote, spare = sup.helper_pids()
        os.kill(zygote, signal.SIGSTOP)
        os.kill(spare, signal.SIGKILL)
        slowest = 0.0
        deadline = time.monotonic() + 10
        while pid_alive(zygote) and time.monotonic() < deadline:
            t0 = time.monotonic()
            sup.wait(0)
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.01)
        assert not pid_alive(zygote)            # replaced: it never answered
        assert slowest < 0.4, slowest
        assert pid_alive(pids[0])
        assert pid_alive(sup.spawn(1)) and sup.zygotes_forked_late == 1
    finally:
        sup.stop(0.5)


# ---------------------------------------------------------------- the zygote protocol, raw
# These drive a zygote (shmipc._zygote._zygote_main) through its pipes the way
# the Supervisor does, so each step of the protocol is checked on its own:
# SPAWN -> STARTED (the worker waits at its gate) -> GO -> RELEASED (it runs);
# a worker's exit -> EXITED with its code; SPARE -> a spare's pid and pipe ends
# over the socket; QUIT -> every worker stopped, the event pipe at EOF.
def note_and_idle(slot, fd):
    """A worker target: say that it runs (on a pipe), then idle."""
    os.write(fd, b"%d" % slot)
    time.sleep(30)


class RawZygote:
    def __init__(self, target, args, wake=None):
        import socket

        from shmipc._zygote import _zygote_main

        cmd_r, self.cmd_w = os.pipe()
        self.evt_r, evt_w = os.pipe()
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                _zygote_main(cmd_r, evt_w, theirs.fileno(), (self.cmd_w, self.evt_r, self.sock.fileno()),
                             parent, False, target, args, "t-raw", wake)
                code = 0
            finally:
                os._exit(code)
        os.close(cmd_r)
        os.close(evt_w)
        theirs.close()
        self.buf = b""

    def send(self, cmd, arg=0):
        from shmipc._zygote import _CMD

        os.write(self.cmd_w, _CMD.pack(cmd, arg))

    def event(self, timeout=10.0):
        """The next (kind, slot, pid, code), or None at EOF / timeout."""
        import select

        from shmipc._zygote import _EVT

        deadline = time.monotonic() + timeout
        while len(self.buf) < _EVT.size:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.evt_r], [], [], left)[0]:
                return None
            data = os.read(self.evt_r, 4096)
            if not data:
                return None
            self.buf += data
        ev, self.buf = _EVT.unpack_from(self.buf), self.buf[_EVT.size:]
        return ev

    def close(self):
        os.close(self.cmd_w)            # the zygote quits when its command pipe closes
        os.waitpid(self.pid, 0)
        os.close(self.evt_r)
        self.sock.close()


def readable(fd, timeout):
    import select

    return bool(select.select([fd], [], [], timeout)[0])


@pytest.mark.timeout(60)
def test_zygote_protocol_gate_release_exit_quit(no_leaks):
    from shmipc._zygote import (_CMD_GO, _CMD_QUIT, _CMD_SPAWN, _EVT_EXITED, _EVT_RELEASED,
                                _EVT_STARTED)

    note_r, note_w = os.pipe()
    z = RawZygote(note_and_idle, (note_w,))
    try:
        z.send(_CMD_SPAWN, 3)
        kind, slot, pid, _ = z.event()
        assert (kind, slot) == (_EVT_STARTED, 3) and pid_alive(pid)
        # gated: it does not run its target until the parent says GO
        assert not readable(note_r, 0.3)
        z.send(_CMD_GO, pid)
        assert z.event() == (_EVT_RELEASED, 3, pid, 0)
        assert readable(note_r, 10) and os.read(note_r, 16) == b"3"
        os.kill(pid, signal.SIGKILL)
        assert z.event() == (_EVT_EXITED, 3, pid, -signal.SIGKILL)     # reaped and reported
        # a second worker, then QUIT: it is stopped (SIGTERM), reported, and the pipe ends
        z.send(_CMD_SPAWN, 4)
        kind, _, pid2, _ = z.event()
        z.send(_CMD_GO, pid2)
        assert z.event()[0] == _EVT_RELEASED
        z.send(_CMD_QUIT, 500)
        assert z.event() == (_EVT_EXITED, 4, pid2, -signal.SIGTERM)
        assert z.event() is None                                        # EOF: the zygote is gone
        assert not pid_alive(pid2)
    finally:
        z.close()
        os.close(note_r)
        os.close(note_w)


@pytest.mark.timeout(60)
def test_a_worker_whose_zygote_dies_before_go_never_runs(no_leaks):
    """The gate: a zygote lost between STARTED and GO leaves no worker the
    parent does not know of (it exits at its gate without running)."""
    from shmipc._zygote import _CMD_SPAWN, _EVT_STARTED

    note_r, note_w = os.pipe()
    z = RawZygote(note_and_idle, (note_w,))
    try:
        z.send(_CMD_SPAWN, 0)
        kind, _, pid, _ = z.event()
        assert kind == _EVT_STARTED and pid_alive(pid)
        os.kill(z.pid, signal.SIGKILL)
        assert wait_for(lambda: not pid_alive(pid))     # gone without running its target
        assert not readable(note_r, 0)
    finally:
        z.close()
        os.close(note_r)
        os.close(note_w)


@pytest.mark.timeout(60)
def test_zygote_hands_over_a_spare_with_its_pipes(no_leaks):
    import socket

    from shmipc._zygote import _CMD, _CMD_QUIT, _CMD_SPARE, _SPARE_MSG

    z = RawZygote(idle, ())
    fds = []
    try:
        z.send(_CMD_SPARE)
        assert readable(z.sock, 10)
        msg, fds, _, _ = socket.recv_fds(z.sock, _SPARE_MSG.size, 3)
        (spare,) = _SPARE_MSG.unpack(msg)
        assert len(fds) == 3 and spare != z.pid and pid_alive(spare)
        # the spare obeys its own command pipe: QUIT, and its event pipe ends
        os.write(fds[0], _CMD.pack(_CMD_QUIT, 0))
        assert readable(fds[1], 10) and os.read(fds[1], 64) == b""
        assert wait_for(lambda: not pid_alive(spare))   # (reaped by the zygote)
    finally:
        for fd in fds:
            os.close(fd)
        z.close()


def write_byte_to(fd):
    os.write(fd, b"w")


@pytest.mark.timeout(60)
def test_supervisor_wake_runs_in_the_zygote_after_each_exit(no_leaks):
    """wake= is called right after an exit is reported (the pool posts into
    the ring its bookkeeping thread sleeps on); inherited by fork, never pickled."""
    import functools

    r, w = os.pipe()
    sup = Supervisor(idle, (), context="fork", wake=functools.partial(write_byte_to, w))
    try:
        pid = sup.start([0])[0]
        assert not readable(r, 0)
        os.kill(pid, signal.SIGKILL)
        assert readable(r, 10) and os.read(r, 1) == b"w"
        assert wait_exits(sup, 1) == [WorkerExit(0, pid, -signal.SIGKILL)]
    finally:
        sup.stop(0.5)
        os.close(r)
        os.close(w)


@pytest.mark.timeout(60)
def test_supervisor_kill_and_bad_arguments(no_leaks):
    with pytest.raises(TypeError, match="callable"):
        Supervisor(3)
    with pytest.raises(ValueError, match="start method"):
        Supervisor(idle, context="nonesuch")
    sup = Supervisor(idle, (), context="fork")
    try:
        pid = sup.start([0])[0]
        with pytest.raises(ValueError, match="non-negative"):
            sup.spawn(-1)
        sup.kill(0, signal.SIGTERM)
        assert wait_exits(sup, 1) == [WorkerExit(0, pid, -signal.SIGTERM)]
        sup.kill(0)                                     # no worker in the slot: nothing happens
    finally:
        sup.stop(0.5)
    with pytest.raises(ValueError, match="stopped"):
        sup.spawn(0)


# ---------------------------------------------------------------- the runtime's rules
def test_startup_guard_counts_only_deaths_by_the_workers_own_hand():
    from shmipc._runtime import MAX_STARTUP_DEATHS, StartupGuard, killed_from_outside

    assert killed_from_outside(-signal.SIGKILL) and killed_from_outside(-signal.SIGTERM)
    assert killed_from_outside(None)                    # reaped by a helper that died: unknown
    assert not killed_from_outside(-signal.SIGSEGV) and not killed_from_outside(-signal.SIGABRT)
    assert not killed_from_outside(0) and not killed_from_outside(1)
    g = StartupGuard()
    for _ in range(3 * MAX_STARTUP_DEATHS):
        assert not g.died_starting(10, -signal.SIGKILL)     # never trips on outside kills...
    assert g.respawn_delay() > 0                            # ...but replacements slow down
    assert g.respawn_delay() <= 1.0
    g.ready()
    assert g.respawn_delay() == 0
    trips = [g.died_starting(11, 1) for _ in range(MAX_STARTUP_DEATHS)]
    assert trips == [False] * (MAX_STARTUP_DEATHS - 1) + [True]
    assert "pid 11, exited with code 1" in g.last
    waits = [g.trip() for _ in range(8)]
    assert waits[:3] == [1.0, 2.0, 4.0] and waits[-1] == 30.0   # back-off doubles, capped
    assert g.deaths == 0
    g.ready()
    assert g.trip() == 1.0                                  # a worker got ready: back to the start


def test_next_message_watches_the_parent_and_the_stop_flag():
    import queue

    from shmipc._runtime import GONE, next_message

    def empty(timeout):
        raise queue.Empty

    calls = []

    def once(timeout):
        calls.append(timeout)
        if len(calls) == 1:
            raise queue.Empty
        return "msg"

    assert next_message(once, os.getpid()) == "msg" and len(calls) == 2
    assert next_message(empty, os.getpid(), stop=lambda: True) is GONE
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    assert next_message(empty, dead) is GONE                # the parent is gone


def test_check_retries_names_the_value():
    from shmipc._runtime import check_retries

    assert check_retries(0) == 0 and check_retries(3) == 3
    for bad in (-1, True, 1.5, "2", None):
        with pytest.raises(ValueError, match="retries must be an int >= 0"):
            check_retries(bad)


def test_slot_table_records_share_their_header():
    """One slot table for pool and pipeline workers: a zeroed record says
    STARTING (a worker that dies before writing anything died starting);
    reset() zeroes one record only."""
    from shmipc._slots import BUSY, STARTING, W_SEQ, W_STATE, SlotTable

    block = bytearray(SlotTable.nbytes(3, 8))
    assert len(block) == 3 * 64 and SlotTable.nbytes(0, 8) == 64      # at least one record
    table = SlotTable(block, 8)
    assert [table.state(k) for k in range(3)] == [STARTING] * 3
    for k in range(3):
        table.words[k * 8 + W_SEQ] = 40 + k
        table.set_state(k, BUSY)
    table.reset(1)
    assert [table.state(k) for k in range(3)] == [BUSY, STARTING, BUSY]
    assert list(table.row(1)) == [0] * 8 and table.row(2)[W_SEQ] == 42 and table.row(2)[W_STATE] == BUSY
    table.release()


@pytest.mark.timeout(60)
def test_a_broken_executor_stays_broken_as_concurrent_futures(no_leaks):
    """The pool retries after the start-up guard's back-off (F7); the
    executor does not: concurrent.futures' executors stay broken."""
    import concurrent.futures as cf

    import shmipc

    with shmipc.ProcessPoolExecutor(2, initializer=exit_with, initargs=(0, 3)) as ex:
        with pytest.raises(cf.process.BrokenProcessPool):
            ex.submit(abs, -1).result(timeout=30)
        engine = ex._engine
        assert wait_for(lambda: time.monotonic() > engine._retry_at)    # the pool's back-off is over
        with pytest.raises(cf.process.BrokenProcessPool, match="died while starting"):
            ex.submit(abs, -1)
