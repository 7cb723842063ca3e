"""A hypothesis model of the pipeline's scheduler (shmipc._pipeline_sched),
with no process: simulated workers follow the worker protocol of
shmipc._pipeline_worker step by step (take held, stash, slot, release,
progress word, put, done) over FIFO "rings", and may be killed between any
two steps; the simulated parent feeds, drains the output ring and, when it
notices a death, drains the output ring, takes back what the dead worker
held claimed in its ring, and asks the scheduler what the dead slot lost,
as Pipeline does. Random programs check that:

  * every item finishes exactly once (fed == completed, never more);
  * no result is yielded twice, and a result is missing only below a node
    that a killed worker held or whose stage raised; then the item has an
    error, so nothing vanishes silently;
  * an item that nothing touched yields exactly its results, in path order,
    and no error; ordered pipelines yield items in source order;
  * nothing stays outstanding once everything is quiet, also for items
    taken by a worker killed before it could write its slot (its claim is
    handed back): the parent's quiet-time rule, kept for garbage in shared
    memory, never has anything to fail.
"""
from __future__ import annotations

from collections import defaultdict, deque
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmipc._pipeline_sched import (F_COMPLETE, F_END, F_FUNC, F_LAST, F_NONE, F_PART, S_BUSY, S_DONE,
                                    S_READY, Raise, Scheduler, SlotRecord, StageRule, MAX_CREDIT, MAX_PATH,
                                    is_envelope, output_problem)
from shmipc.errors import WorkerLost

K_RESULT, K_DONE, K_ERROR = 0, 1, 2


def n_outputs(seq: int, path: tuple) -> int:
    """How many outputs a generator stage makes of node (seq, path)."""
    return (seq + 2 * len(path) + sum(path)) % 3


def raises(stage: int, seq: int, path: tuple) -> int | None:
    """None, or after how many outputs the stage raises for this node."""
    h = (seq * 7 + stage * 3 + sum(path) * 5 + len(path)) % 11
    return None if h else seq % 2


def expected_leaves(kinds: list[str], seq: int) -> list[tuple]:
    nodes = [()]
    for s, kind in enumerate(kinds):
        nxt = []
        for path in nodes:
            fail = raises(s, seq, path)
            if kind == "func":
                if fail is None:
                    nxt.append(path)
            else:
                n = n_outputs(seq, path)
                k = n if fail is None else min(fail, n)
                nxt.extend(path + (i,) for i in range(k))
        nodes = nxt
    return sorted(nodes)


class Sim:
    """Rings, workers and a parent, stepped by hypothesis' choices."""

    def __init__(self, kinds, workers, retries, ordered, n_items, max_inflight, zero_copy=False):
        self.kinds = kinds
        self.zero_copy = zero_copy             # workers hold their input claimed until done
        self.nstages = len(kinds)
        self.retries = retries
        self.rings = [deque() for _ in kinds]
        self.out = deque()
        self.errors = []
        self.sched = Scheduler([StageRule(f"s{i}", "collect", retries[i]) for i in range(len(kinds))],
                               ordered, max_inflight, self.errors)
        self.n_items = n_items
        # observe every share the scheduler counts (the fast path counts a
        # whole item without this call): each item's must add up to exactly 1
        self.shares: dict[int, Fraction] = defaultdict(Fraction)
        add_credit = self.sched._add_credit

        def counted(seq, e):
            assert self.sched.is_outstanding(seq), f"a share counted for finished item {seq}"
            self.shares[seq] += Fraction(1, 1 << e)
            add_credit(seq, e)

        self.sched._add_credit = counted
        self.results = []                          # (seq, path) in the order yielded
        self.workers = []                          # [stage, slot record dict, stash, steps generator]
        for s, n in enumerate(workers):
            for _ in range(n):
                self.workers.append(self.new_worker(s))
        self.dead = []                             # killed, not yet noticed
        self.touched = set()                       # (seq, node path): held by a killed worker
        self.raised = set()                        # (seq, node path): its stage raised
        self.untraced = set()                      # seqs taken by a killed worker that left no trace
        self.kills = 0

    def new_worker(self, stage):
        w = {"stage": stage, "slot": [S_READY, 0, 0, 0, ()], "stash": None, "holding": None,
             "claim": None, "final_to_parent": False}
        w["steps"] = self.steps(w)
        return w

    # --------------------------------------------------------- the worker protocol
    def steps(self, w):
        s = w["stage"]
        slot = w["slot"]
        ring = self.rings[s]
        nxt = self.rings[s + 1] if s + 1 < self.nstages else None
        while True:
            if not ring:
                yield "idle"
                continue
            w["last"] = "took"
            w["final_to_parent"] = False
            env = ring.popleft()
            w["holding"] = env
            w["claim"] = env                           # its record stays claimed in the ring
            yield "took"
            if self.retries[s]:
                w["stash"] = env
                yield "stashed"
            seq, e, path, value = env
            slot[1:5] = [seq, e, 0, path]
            slot[0] = S_BUSY
            yield "busy"
            if not self.zero_copy:
                w["claim"] = None                      # written down: the ring forgets it
                yield "released"
            sent = 0

            def put(kind, credit, p, inflight):
                nonlocal sent
                slot[3] = sent * 8 + inflight
                yield "inflight"
                if kind is None:
                    nxt.append((seq, credit, p, p))
                else:
                    self.out.append((kind, seq, credit, p, (s, p)))
                    w["final_to_parent"] = inflight != F_PART
                w["last"] = "put"
                yield "put"
                w["last"] = ""
                sent += 1
                slot[3] = sent * 8 + (F_NONE if inflight == F_PART else F_COMPLETE)
                yield "sent"

            fail = raises(s, seq, path)
            last_kind = None if nxt is not None else K_RESULT
            if self.kinds[s] == "func":
                if fail is None:
                    yield from put(last_kind, e, path, F_FUNC)
                else:
                    self.raised.add((seq, path))
                    yield from put(K_ERROR, e, path, F_END)
            else:
                n = n_outputs(seq, path)
                k = n if fail is None else min(fail, n)
                if fail is not None:
                    self.raised.add((seq, path))
                if k == 0:
                    yield from put(K_ERROR if fail is not None else K_DONE, e, path, F_END)
                else:
                    for i in range(k - 1):
                        yield from put(last_kind, e + sent + 1, path + (sent,), F_PART)
                    if fail is None:
                        yield from put(last_kind, e + sent, path + (sent,), F_LAST)
                    else:
                        yield from put(last_kind, e + sent + 1, path + (sent,), F_PART)
                        yield from put(K_ERROR, e + sent, path, F_END)
            slot[0] = S_DONE
            yield "done"
            if self.zero_copy:
                w["claim"] = None
                yield "released"
            w["stash"] = None
            yield "unstashed"
            slot[0] = S_READY
            w["holding"] = None
            yield "ready"

    # --------------------------------------------------------- the parent
    def feed(self):
        sched = self.sched
        if sched.exhausted or not sched.can_admit():
            return
        if sched.next_seq == self.n_items:
            sched.exhausted = True
            return
        seq = sched.admit()
        self.rings[0].append((seq, 0, (), ()))

    def drain(self, limit):
        """Handle up to `limit` output messages (-1: all), then take what is ready."""
        sched = self.sched
        while self.out and limit:
            limit -= 1
            kind, seq, credit, path, value = self.out.popleft()
            if kind == K_RESULT:
                taken = sched.result(seq, credit, path, (seq, path))
            elif kind == K_DONE:
                taken = sched.done(seq, credit, path)
            else:
                taken = sched.error(value[0], seq, credit, path, ValueError(f"item {seq}"))
            if not taken:
                # dropped as late: only what descends from a killed worker's node
                # (or belongs to an item failed as lost without a trace)
                assert seq in self.untraced or any(
                    s == seq and path[:len(p)] == p for s, p in self.touched), (seq, path, kind)
        for item in sched.take_ready():
            assert type(item) is not Raise, "collect never raises"
            self.results.append(item)

    def reap(self):
        if not self.dead:
            return
        self.drain(-1)
        for w in self.dead:
            s = w["stage"]
            state, seq, e, progress, path = w["slot"]
            rec = SlotRecord(state, seq, e, progress // 8, progress % 8, path)
            stashed = w["stash"]
            if stashed is None and w["claim"] is not None and state not in (S_BUSY, S_DONE):
                stashed = w["claim"]               # taken back from the ring (Pipeline._reap)

            def lost(seq, s=s):
                return WorkerLost(0, -9, task=f"item {seq} of stage s{s}")

            env = self.sched.worker_lost(s, rec, stashed, lost)
            if env is not None:
                self.rings[s].append(env)          # Pipeline requeues it
            self.workers.append(self.new_worker(s))
        self.dead = []
        self.drain(-1)

    def kill(self, w):
        self.workers.remove(w)
        self.kills += 1
        env = w["holding"]
        state, progress = w["slot"][0], w["slot"][3]
        finished = (state == S_DONE or (state == S_BUSY and progress % 8 == F_COMPLETE)
                    or w["final_to_parent"])
        if env is not None and not finished:
            # a node the scheduler may have to fail as lost; a finished one
            # (or one whose last message went to the parent: the parent drains
            # before judging) must lose nothing
            seq, _, path, _ = env
            self.touched.add((seq, path))
            if state != S_BUSY and w["stash"] is None and w["claim"] is None:
                self.untraced.add(seq)
        self.dead.append(w)

    def quiet(self):
        return (not self.out and not self.dead and not any(self.rings)
                and all(w["holding"] is None for w in self.workers))


@pytest.mark.timeout(120)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_scheduler_counts_every_share_exactly_once(data):
    kinds = data.draw(st.lists(st.sampled_from(["func", "gen"]), min_size=1, max_size=3), label="kinds")
    workers = data.draw(st.lists(st.integers(1, 2), min_size=len(kinds), max_size=len(kinds)))
    retries = data.draw(st.lists(st.integers(0, 2), min_size=len(kinds), max_size=len(kinds)))
    ordered = data.draw(st.booleans(), label="ordered")
    n_items = data.draw(st.integers(0, 10), label="items")
    sim = Sim(kinds, workers, retries, ordered, n_items, data.draw(st.integers(1, 6)),
              data.draw(st.booleans(), label="zero_copy"))
    # one draw for the whole program (a draw per step costs ~1 ms)
    program = data.draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 11)), min_size=150,
                                 max_size=400),
                         label="program")
    for action, arg in program:
        if sim.sched.finished:
            break
        if action == 0:
            sim.feed()
        elif action == 1:
            sim.drain(arg % 3 + 1)
        elif action == 2:
            sim.reap()
        elif action == 3 and sim.workers and sim.kills < 6:
            sim.kill(sim.workers[arg % len(sim.workers)])
        elif action == 4 and sim.kills < 6:
            # the instant that matters most: just after a put, before it is noted
            putting = [w for w in sim.workers if w.get("last") == "put"]
            if putting:
                sim.kill(putting[arg % len(putting)])
                if arg % 2:
                    sim.reap()            # noticed before the next stage took its output
        elif sim.workers:
            next(sim.workers[arg % len(sim.workers)]["steps"])
    # run to quiet: no more kills
    for _ in range(2000):
        if sim.sched.finished:
            break
        sim.feed()
        sim.reap()
        for w in list(sim.workers):
            next(w["steps"])
        sim.drain(-1)
        if sim.quiet() and sim.sched.outstanding:
            # the parent's quiet-time rule: only items lost without a trace may remain
            stuck = {seq for seq in range(sim.sched.next_seq) if sim.sched.is_outstanding(seq)}
            assert stuck <= sim.untraced, (stuck, sim.untraced)
            sim.sched.fail_outstanding(lambda seq: WorkerLost(0, None, task=f"item {seq}"))
            sim.drain(-1)
    sched = sim.sched
    assert sched.finished, "the run did not finish"
    assert not sim.untraced, f"items lost without a trace: {sorted(sim.untraced)}"
    assert sched.next_seq == n_items == sched.ncomplete
    results = sim.results
    assert len(results) == len(set(results)), "a result was yielded twice"
    failed = {f.seq for f in sim.errors}
    by_seq: dict[int, list[tuple]] = {}
    for seq, path in results:
        by_seq.setdefault(seq, []).append(path)
    if ordered:
        assert [seq for seq, _ in results] == sorted(seq for seq, _ in results)
        for paths in by_seq.values():
            assert paths == sorted(paths)
    for seq, total in sim.shares.items():
        assert total == 1 or seq in sim.untraced, f"item {seq}: shares add up to {total}"
    troubled = sim.touched | sim.raised
    for seq in range(n_items):
        want = expected_leaves(kinds, seq)
        got = sorted(by_seq.get(seq, []))
        assert set(got) <= set(want), (seq, got, want)
        missing = set(want) - set(got)
        if missing:
            assert seq in failed, f"item {seq} lost {sorted(missing)} without an error"
            for leaf in missing:
                assert any(s == seq and leaf[:len(p)] == p for s, p in troubled), (seq, leaf, troubled)
        if seq in sim.untraced or any(s == seq for s, _ in troubled):
            continue
        assert got == want and seq not in failed, (seq, got, want)


def test_slot_records_from_shared_memory_are_checked():
    words = [S_BUSY, 3, 1, 2 * 8 + F_PART, 2, 0, 1] + [0] * 25
    rec = SlotRecord.from_words(words)
    assert (rec.seq, rec.credit, rec.sent, rec.inflight, rec.path) == (3, 1, 2, F_PART, (0, 1))
    assert SlotRecord.from_words([9] + words[1:]) is None          # unknown state
    assert SlotRecord.from_words(words[:4] + [99] + words[5:]) is None   # path too long
    assert SlotRecord.from_words([S_BUSY, -1] + words[2:]) is None  # negative seq
    assert SlotRecord.from_words([S_BUSY, 3, 1, 7] + words[4:]) is None  # unknown in-flight kind
    assert SlotRecord.from_words([S_BUSY, 3, 1, 8 + F_COMPLETE] + words[4:]).inflight == F_COMPLETE
    assert SlotRecord.from_words([S_BUSY, 3, MAX_CREDIT + 1] + words[3:]) is None     # a forged credit


def test_output_messages_from_shared_memory_are_checked():
    """Each field of a message from the output ring, with the number in the
    reason; a credit beyond MAX_CREDIT too (as it is, `1 << credit` would
    allocate up to 2**credit bits)."""
    good = (0, 3, 2, (0, 1), b"x", None)
    assert output_problem(good) is None
    assert output_problem((2, 3, 0, (), (0, None, "text", "tb"), None)) is None
    assert output_problem((3, -1, 0, (), (0, None, "setup failed", "tb"), None)) is None   # K_FATAL: no item
    assert "item number is -1" in output_problem((2, -1, 0, (), (0, None, "text", "tb"), None))
    bad = [(5, "is int, not a tuple of 6"), (good[:5], "is tuple of length 5"),
           ((9,) + good[1:], "kind is 9"), ((True,) + good[1:], "kind is True"),
           ((0, -1) + good[2:], "item number is -1"), ((0, "3") + good[2:], "item number is '3'"),
           ((0, 3, MAX_CREDIT + 1) + good[3:], f"credit {MAX_CREDIT + 1} (0 to {MAX_CREDIT})"),
           ((0, 3, -2) + good[3:], "credit -2"), ((0, 3, 2, [0]) + good[4:], "path [0]"),
           ((0, 3, 2, (0, -1)) + good[4:], "path (0, -1)"),
           ((0, 3, 2, (0,) * (MAX_PATH + 1)) + good[4:], "path (0, 0"),
           ((2, 3, 0, (), 5, None), "error message carries int"),
           ((3, 3, 0, (), (0, None, 7, "tb"), None), "error message carries tuple")]
    for msg, why in bad:
        assert why in (output_problem(msg) or ""), (msg, output_problem(msg))
    assert not is_envelope((3, MAX_CREDIT + 1, (), b"", None)) and is_envelope((3, MAX_CREDIT, (), b"", None))
    assert not is_envelope((3, 0, (-1,), b"", None))


def test_a_damaged_message_fails_all_of_its_item_once():
    errors: list = []
    sched = Scheduler([StageRule("s", "collect", 0)], True, 8, errors)
    a, b = sched.admit(), sched.admit()
    sched.exhausted = True
    assert sched.result(a, 1, (0,), "half")            # half of a arrived
    assert sched.fail_item(0, a, ValueError("damaged"))
    assert not sched.fail_item(0, a, ValueError("again"))        # settled: counted as dropped
    assert sched.result(b, 0, (), "b")
    assert [str(e.exception) for e in errors] == ["damaged"] and sched.dropped == 1
    assert sched.take_ready() == ["half", "b"] and sched.finished


def test_a_dead_workers_delivered_result_is_not_counted_again():
    """Issue 9: killed after delivering, before marking done: one result, no error."""
    errors: list = []
    sched = Scheduler([StageRule("s", "collect", 0)], True, 8, errors)
    seq = sched.admit()
    sched.exhausted = True
    assert sched.result(seq, 0, (), "r")
    rec = SlotRecord(S_BUSY, seq, 0, 0, F_FUNC, ())
    assert sched.worker_lost(0, rec, None, lambda s: WorkerLost(1, -9)) is None
    assert sched.take_ready() == ["r"] and errors == [] and sched.ncomplete == 1
    assert sched.finished


def test_an_undecidable_put_fails_the_node_and_drops_what_comes_later():
    errors: list = []
    sched = Scheduler([StageRule("a", "collect", 0), StageRule("b", "collect", 0)], True, 8, errors)
    seq = sched.admit()
    sched.exhausted = True
    # stage a (a generator) sent output 0, and died putting output 1 (its last)
    assert sched.result(seq, 1, (0,), "x0")
    rec = SlotRecord(S_BUSY, seq, 0, 1, F_LAST, ())
    sched.worker_lost(0, rec, None, lambda s: WorkerLost(1, -9, task=f"item {s}"))
    assert sched.ncomplete == 1 and [f.seq for f in errors] == [seq]
    assert not sched.result(seq, 1, (1,), "x1")      # it had been committed after all: dropped
    assert sched.dropped == 1
    assert sched.take_ready() == ["x0"]


def test_retry_only_what_sent_nothing():
    errors: list = []
    sched = Scheduler([StageRule("a", "collect", 1)], False, 8, errors)
    seq = sched.admit()
    env = (seq, 0, (), 5, None)
    busy = SlotRecord(S_BUSY, seq, 0, 0, F_NONE, ())
    assert sched.worker_lost(0, busy, env, lambda s: WorkerLost(1, -9)) == env
    assert sched.worker_lost(0, busy, env, lambda s: WorkerLost(1, -9)) is None   # retries used up
    assert len(errors) == 1 and sched.retried == 1 and sched.ncomplete == 1


@pytest.mark.parametrize("state", [S_READY, S_DONE])
def test_idle_or_finished_worker_loses_nothing(state):
    errors: list = []
    sched = Scheduler([StageRule("a", "collect", 0)], True, 8, errors)
    seq = sched.admit()
    rec = SlotRecord(state, seq, 0, 0, F_NONE, ())
    assert sched.worker_lost(0, rec, None, lambda s: WorkerLost(1, -9)) is None
    assert errors == [] and sched.is_outstanding(seq)


def test_a_lost_node_arriving_later_does_not_finish_its_item_early():
    """A middle stage's worker died just after forwarding node (1,): nothing of
    it reached the parent yet, so the node fails as lost; when its result
    arrives after all it is dropped, and the sibling node (0,) still counts."""
    errors: list = []
    rules = [StageRule(n, "collect", 0) for n in "abc"]
    sched = Scheduler(rules, True, 8, errors)
    seq = sched.admit()
    sched.exhausted = True
    rec = SlotRecord(S_BUSY, seq, 1, 0, F_FUNC, (1,))     # stage b, node (1,), share 1/2
    assert sched.worker_lost(1, rec, None, lambda s: WorkerLost(1, -9, task=f"item {s}")) is None
    assert [f.seq for f in errors] == [seq] and sched.is_outstanding(seq)
    assert not sched.result(seq, 1, (1,), "late")          # voided: dropped
    assert sched.is_outstanding(seq)
    assert sched.result(seq, 1, (0,), "sibling")
    assert not sched.is_outstanding(seq) and sched.take_ready() == ["sibling"]
    assert sched.dropped == 1
