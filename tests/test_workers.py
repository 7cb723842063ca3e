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
