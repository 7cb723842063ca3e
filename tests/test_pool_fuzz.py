"""Kill fuzz over a pool's whole process tree (issue 9, "no single point of failure").

While a Pool (map, imap, imap_unordered, apply_async) or a ProcessPoolExecutor
(submit, map) works, a killer thread picks, at random instants, any process of
the pool's tree -- a worker, an orphaned worker, or the zygote -- and SIGKILLs
it, or SIGSTOPs it and SIGCONTs it a little later. Then:

* every task completes with the right result, or fails with WorkerLost naming
  a worker the killer killed (only tasks of killed workers are lost);
* the pool stays usable afterwards (all its slots filled, a clean map right);
* nothing leaks: no fd, no /dev/shm entry, no child process, and no process
  of the tree (orphans included) outlives the pool;
* kills and recoveries actually happened (zygotes replaced, workers replaced);
  the zygote and its spare are both killed at random (zygote_kills counts
  both), so a replacement forked from the parent (both lost) happens too.

CI budget: well under 90 s; SHMIPC_SOAK=N runs each phase N times longer.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
import threading
import time

import pytest

import shmipc
from conftest import SOAK

PHASE_SECONDS = 12.0 * SOAK


def work(x):
    time.sleep(random.random() * 0.004)
    return x, hashlib.sha256(str(x).encode()).hexdigest()


def expected(x):
    return x, hashlib.sha256(str(x).encode()).hexdigest()


def _stat(pid):
    """(ppid, start time) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    if fields[0] == b"Z":
        return None
    return int(fields[1]), int(fields[19])


def _pidfd_target(fd):
    """The pid a pidfd of this process refers to (from /proc/self/fdinfo)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class Killer(threading.Thread):
    """Kills or stops random processes of one engine's tree until stopped.

    A process is signalled only through a pidfd opened after checking that
    the pid still is the process first seen in the tree (same start time),
    so a recycled pid (another user's process) is never hit."""

    def __init__(self, engine, seed):
        super().__init__(name="fuzz-killer", daemon=True)
        self.engine = engine
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.known = {}                 # pid -> (role, start time) as first seen
        self.killed_workers = set()
        self.kills = {"worker": 0, "zygote": 0}
        self.stops = {"worker": 0, "zygote": 0}
        self.stopped = {}               # pid -> (pidfd, resume at)

    def tree(self):
        """The live tree as the pool sees it (workers, orphans included, and
        the zygote); each process is identified once, when first seen."""
        me = os.getpid()
        sup = self.engine._sup
        workers = list(self.engine._pids.values())
        current = []
        zygotes = {pid for pid, (role, _) in self.known.items() if role == "zygote"}
        for link in (sup._link, sup._spare):     # the serving zygote and its spare
            if link is None:
                continue
            if link.pid not in self.known:
                # ours: a child of this process, of a zygote, or orphaned (its zygote died)
                st = _stat(link.pid)
                if st is not None and st[0] in zygotes | {me, 1}:
                    self.known[link.pid] = ("zygote", st[1])
                    zygotes.add(link.pid)
            if link.pid in self.known:
                current.append(link.pid)
        for pid in workers:
            if pid not in self.known:
                st = _stat(pid)
                if st is None or st[0] not in zygotes | {me}:
                    continue
                self.known[pid] = ("worker", st[1])
            current.append(pid)
        return current

    def signal(self, pid, sig):
        role, start = self.known[pid]
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None
        st = _stat(pid)
        if st is None or st[1] != start:
            os.close(fd)
            return None
        if _pidfd_target(fd) != pid:
            os.close(fd)
            return None
        try:
            signal.pidfd_send_signal(fd, sig)
        except OSError:
            os.close(fd)
            return None
        return fd

    def run(self):
        while not self.stop_event.wait(self.rng.uniform(0.01, 0.06)):
            self.resume_due()
            pids = self.tree()
            if not pids:
                continue
            pid = self.rng.choice(sorted(pids))
            role = self.known[pid][0]
            if pid in self.stopped:
                continue
            if self.rng.random() < 0.8:
                first = pid not in self.killed_workers
                if role == "worker":
                    self.killed_workers.add(pid)        # before the kill: its loss may be seen at once
                fd = self.signal(pid, signal.SIGKILL)
                if fd is None:
                    if role == "worker" and first:
                        self.killed_workers.discard(pid)
                    continue
                os.close(fd)
                self.kills[role] += 1
            else:
                fd = self.signal(pid, signal.SIGSTOP)
                if fd is not None:
                    self.stops[role] += 1
                    self.stopped[pid] = (fd, time.monotonic() + self.rng.uniform(0.05, 0.5))
        self.resume_due(everything=True)

    def resume_due(self, everything=False):
        now = time.monotonic()
        for pid, (fd, when) in list(self.stopped.items()):
            if everything or now >= when:
                try:
                    signal.pidfd_send_signal(fd, signal.SIGCONT)
                except OSError:
                    pass
                os.close(fd)
                del self.stopped[pid]


def _check_lost(exc, killer):
    assert isinstance(exc, shmipc.WorkerLost), repr(exc)
    assert exc.pid in killer.killed_workers, (exc.pid, killer.known.get(exc.pid), sorted(killer.killed_workers))


def _pool_round(p, rng, killer, counts, base):
    op = rng.choice(["map", "imap", "imap_unordered", "apply_async"])
    items = list(range(base, base + rng.randint(20, 120)))
    if op == "map":
        try:
            got = p.map(work, items, chunksize=rng.choice([1, 3, 10]))
            assert got == [expected(x) for x in items]
            counts["ok"] += len(items)
        except shmipc.WorkerLost as exc:        # the first lost chunk fails the whole map
            _check_lost(exc, killer)
            counts["lost"] += 1
    elif op == "apply_async":
        results = [(x, p.apply_async(work, (x,))) for x in items]
        for x, r in results:
            try:
                assert r.get(timeout=60) == expected(x)
                counts["ok"] += 1
            except shmipc.WorkerLost as exc:
                _check_lost(exc, killer)
                counts["lost"] += 1
    else:
        it = getattr(p, op)(work, items)
        seen = set()
        for _ in items:
            try:
                x, digest = it.next(timeout=60)
                assert (x, digest) == expected(x) and x not in seen
                seen.add(x)
                counts["ok"] += 1
            except shmipc.WorkerLost as exc:
                _check_lost(exc, killer)
                counts["lost"] += 1
        with pytest.raises(StopIteration):
            it.next(timeout=60)
    return len(items)


def _executor_round(ex, rng, killer, counts, base):
    items = list(range(base, base + rng.randint(20, 120)))
    if rng.random() < 0.5:
        futures = [(x, ex.submit(work, x)) for x in items]
        for x, f in futures:
            exc = f.exception(timeout=60)
            if exc is None:
                assert f.result() == expected(x)
                counts["ok"] += 1
            else:
                _check_lost(exc, killer)
                counts["lost"] += 1
    else:
        try:
            got = list(ex.map(work, items, chunksize=rng.choice([1, 4])))
            assert got == [expected(x) for x in items]
            counts["ok"] += len(items)
        except shmipc.WorkerLost as exc:        # map raises at the first lost chunk
            _check_lost(exc, killer)
            counts["lost"] += 1
    return len(items)


def _fuzz(make, round_, seed):
    rng = random.Random(seed)
    counts = {"ok": 0, "lost": 0, "rounds": 0}
    pool = make()
    engine = pool._engine
    switch = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)           # the killer thread gets the GIL promptly
    engine._sup.zygote_timeout = 1.0        # a stopped zygote is replaced after 1 s
    killer = Killer(engine, seed)
    try:
        killer.start()
        deadline = time.monotonic() + PHASE_SECONDS
        base = 0
        while time.monotonic() < deadline:
            base += round_(pool, rng, killer, counts, base)
            counts["rounds"] += 1
    finally:
        killer.stop_event.set()
        killer.join(10)
        sys.setswitchinterval(switch)
    # the pool stays usable: every slot has a worker again, a clean run is right
    n = engine._processes
    deadline = time.monotonic() + 20
    while len(engine._pids) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(engine._pids) == n, engine._pids
    items = list(range(200))
    if isinstance(pool, shmipc.Pool):
        assert pool.map(work, items) == [expected(x) for x in items]
    else:
        assert list(pool.map(work, items, chunksize=5)) == [expected(x) for x in items]
    stats = engine.statistics()
    sup = engine._sup
    tree = set(killer.known)
    if isinstance(pool, shmipc.Pool):
        pool.close()
        pool.join()
    else:
        pool.shutdown(wait=True)
    # no process of the tree (orphans included) outlives the pool
    deadline = time.monotonic() + 5
    while any(_stat(pid) is not None and _stat(pid)[1] == killer.known[pid][1] for pid in tree) \
            and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = [pid for pid in tree if _stat(pid) is not None and _stat(pid)[1] == killer.known[pid][1]]
    assert not alive, alive
    report = dict(counts, worker_kills=killer.kills["worker"], zygote_kills=killer.kills["zygote"],
                  worker_stops=killer.stops["worker"], zygote_stops=killer.stops["zygote"],
                  zygotes_replaced=sup.zygotes_replaced, forked_from_parent=sup.zygotes_forked_late,
                  worker_deaths=stats["worker_deaths"], processes_seen=len(tree))
    print(f"\nkill fuzz ({type(pool).__name__}): {report}")
    # kills and recoveries really happened
    assert killer.kills["worker"] > 0 and killer.kills["zygote"] > 0, report
    assert sup.zygotes_replaced > 0 and stats["worker_deaths"] > 0, report
    assert counts["ok"] > 0, report
    return report


@pytest.mark.timeout(120 * SOAK)
def test_kill_fuzz_pool_tree(no_leaks):
    _fuzz(lambda: shmipc.Pool(3, context="fork"), _pool_round, seed=9)


@pytest.mark.timeout(120 * SOAK)
def test_kill_fuzz_executor_tree(no_leaks):
    _fuzz(lambda: shmipc.ProcessPoolExecutor(3, mp_context="fork"), _executor_round, seed=99)
