"""shmipc.bench: options, planning, the verifying receivers (a transport that
drops, reorders or corrupts messages is caught), the hard timeout, reports.

Every measurement here runs for real: a fresh forked measurement process and
its forked peer, moving data through real shared memory or pipes. Rounds are
kept very short; no figure is asserted, only counts and outcomes.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import proc_stat, processes_with
from shmipc.bench import Options, format_report, get_transports, markdown_tables, parse_size, plan, plot
from shmipc.bench.runner import BUSY_LOOP_LABEL, Spec, busy_loops, run_one
from shmipc.bench.transports import Endpoint, OsPipe, ShmipcRing, Transport, _OsPipeChannel
from shmipc.bench.workloads import message_pool


# ---------------------------------------------------------------- options
def test_parse_size():
    assert parse_size("64") == 64
    assert parse_size("1k") == 1024
    assert parse_size("64KiB") == 64 << 10
    assert parse_size("1M") == 1 << 20
    assert parse_size("1MiB") == 1 << 20
    assert parse_size("64M") == 64 << 20
    for bad in ("", "abc", "0", "-5", "1x", "nan", "inf", "1e400", "-inf", "65M", "3G"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_transport_selection_by_name_and_prefix():
    names = [t.name for t in get_transports(["shmipc"])]
    assert names[:3] == ["shmipc.ring", "shmipc.ring+batch", "shmipc.ring+view"]
    assert all(n.startswith("shmipc") for n in names)
    assert [t.name for t in get_transports(["os.pipe"])] == ["os.pipe", "os.pipe+batch", "os.pipe+readinto"]
    assert {t.name for t in get_transports(["mp"])} == {"mp.Pipe", "mp.Queue", "mp.SimpleQueue", "mp.Pool"}
    with pytest.raises(ValueError, match="unknown transport 'nope'.*os.pipe"):
        get_transports(["nope"])


def test_plan_uses_each_variant_where_it_applies():
    specs = plan(Options(sizes=[64, 1 << 20], workloads=["throughput", "pingpong"]))
    by = {(s.workload, s.size, s.transport.name) for s in specs}
    assert ("throughput", 64, "shmipc.ring+batch") in by
    assert ("throughput", 1 << 20, "shmipc.ring+batch") in by          # batched is measured at every size (never slower than single)
    assert ("throughput", 1 << 20, "shmipc.ring+view") in by
    assert ("throughput", 64, "shmipc.ring+view") not in by            # views are for large ones
    assert ("throughput", 64, "shmipc.ring") in by and ("throughput", 1 << 20, "shmipc.ring") in by
    assert all(s.size == 64 for s in specs if s.workload == "pingpong")
    assert not any(s.transport.name.endswith(("+batch", "+view")) for s in specs if s.workload == "pingpong")


@pytest.mark.parametrize("field,value,match", [
    ("repeat", 0, "--repeat"), ("seconds", 0.0, "round duration"), ("workloads", ["x"], "unknown workload"),
    ("sizes", [0], "positive"), ("processes", 0, "--processes"),
    # values no run can honour: each used to start the run and fail every row
    # (a round's end past time_t, a timeout already passed), crash on nan, or
    # start 100,000 pool workers
    ("repeat", 10 ** 20, "between 1 and 1000"), ("seconds", float("inf"), "at most 3600"),
    ("seconds", float("nan"), "round duration"), ("timeout", -1.0, "--timeout"),
    ("timeout", float("nan"), "--timeout"), ("timeout", 1e300, "at most 86400"),
    ("sizes", [1 << 40], "at most 67108864"), ("processes", 100_000, "between 1 and 64"),
])
def test_bad_options_are_named(field, value, match):
    options = Options()
    setattr(options, field, value)
    with pytest.raises(ValueError, match=match):
        options.check()


def test_message_pool_is_stamped_and_distinct():
    for size in (16, 64, 1 << 20):
        pool = message_pool(size)
        assert len(pool) & (len(pool) - 1) == 0 and len(pool) >= 16
        assert all(len(m) == size for m in pool)
        assert len(set(pool)) == len(pool)
        assert pool[5][:8] == pool[5][-8:] == (5).to_bytes(8, "little")


# ---------------------------------------------------------------- real measurements
def _opts(**kw) -> Options:
    base = dict(repeat=2, seconds=0.03, progress=False, timeout=60)
    base.update(kw)
    return Options(**base)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["shmipc.ring", "shmipc.ring+batch", "os.pipe", "os.pipe+batch",
                                       "mp.Pipe", "memcpy"])
def test_throughput_measurement_counts_every_message(tmp_path, transport, no_leaks):
    t = get_transports([transport])[0]
    record = run_one(Spec("throughput", t, 1024), _opts(), str(tmp_path))
    assert record["status"] == "ok", record
    assert len(record["rounds"]) == 2
    for r in record["rounds"]:
        assert r["messages"] > 0 and r["msgs_per_s"] > 0
        assert r["mb_per_s"] == pytest.approx(r["msgs_per_s"] * 1024 / 1e6)
    assert record["best"] == max(record["rounds"], key=lambda r: r["msgs_per_s"])


def test_rows_at_one_size_are_measured_side_by_side_round_by_round():
    # the ratio between two rows compares rounds run under the same load:
    # round 1 of every transport at a size, then round 2, ...; pools run whole
    from shmipc.bench.runner import _steps

    from shmipc.bench.transports import PoolSuite

    specs = [Spec("throughput", t, size) for size in (64, 1024) for t in (ShmipcRing(), OsPipe())]
    specs.append(Spec("pool", PoolSuite(), 0, "suite"))
    steps = _steps(specs, 3)
    order = [(s.workload, s.size, s.transport.name, rounds, last) for _, s, rounds, last in steps]
    assert order[:6] == [("throughput", 64, "shmipc.ring", 1, False), ("throughput", 64, "os.pipe", 1, False),
                         ("throughput", 64, "shmipc.ring", 1, False), ("throughput", 64, "os.pipe", 1, False),
                         ("throughput", 64, "shmipc.ring", 1, True), ("throughput", 64, "os.pipe", 1, True)]
    assert order[6][:2] == ("throughput", 1024) and len(order) == 13
    assert order[-1][0] == "pool" and order[-1][3:] == (3, True)
    assert [s.workload for _, s, rounds, _ in _steps(specs, 1)] == [s.workload for s in specs]


@pytest.mark.timeout(120)
def test_interleaved_rounds_make_one_record_per_row(tmp_path, no_leaks):
    from shmipc.bench import run

    seen = []
    report = run(_opts(sizes=[1024], transports=["shmipc.ring+batch", "os.pipe+batch"],
                       workloads=["throughput"], repeat=3), on_record=seen.append)
    assert [r["transport"] for r in report["records"]] == ["shmipc.ring+batch", "os.pipe+batch"]
    assert seen == report["records"]
    for r in report["records"]:
        assert r["status"] == "ok", r
        assert len(r["rounds"]) == 3 and all(x["messages"] > 0 for x in r["rounds"])
        assert r["best"] == max(r["rounds"], key=lambda x: x["msgs_per_s"])


def test_a_failed_round_ends_its_row_and_keeps_the_rounds_before():
    from shmipc.bench.runner import _merge_round

    ok = {"status": "ok", "reason": "", "rounds": [{"msgs_per_s": 1.0}], "elapsed_s": 1.0}
    record = _merge_round(None, dict(ok, rounds=[{"msgs_per_s": 2.0}]))
    record = _merge_round(record, ok)
    record = _merge_round(record, {"status": "timeout", "reason": "no result within 9 s", "rounds": [],
                                   "elapsed_s": 9.0, "log": "where"})
    assert record["status"] == "timeout" and record["log"] == "where"
    assert record["rounds"] == [{"msgs_per_s": 2.0}, {"msgs_per_s": 1.0}] and record["elapsed_s"] == 11.0


@pytest.mark.timeout(60)
def test_zero_copy_view_and_numpy(tmp_path, no_leaks):
    pytest.importorskip("numpy")
    for name in ("shmipc.ring+view", "os.pipe+readinto"):
        record = run_one(Spec("throughput", get_transports([name])[0], 1 << 20), _opts(), str(tmp_path))
        assert record["status"] == "ok", (name, record)
    for name in ("shmipc.ring+view", "os.pipe", "os.pipe+readinto", "mp.Queue"):
        record = run_one(Spec("numpy", get_transports([name])[0], 1 << 20), _opts(repeat=1), str(tmp_path))
        assert record["status"] == "ok", (name, record)
        assert record["best"]["messages"] > 0


@pytest.mark.timeout(60)
def test_pingpong_reports_latency(tmp_path, no_leaks):
    record = run_one(Spec("pingpong", ShmipcRing(), 64), _opts(), str(tmp_path))
    assert record["status"] == "ok", record
    best = record["best"]
    assert best["round_trips"] > 0
    assert 0 < best["min_us"] <= best["median_us"] <= best["p99_us"]
    assert best == min(record["rounds"], key=lambda r: r["median_us"])


@pytest.mark.timeout(240)
def test_pool_workload_keeps_every_round_of_both_sides(tmp_path, no_leaks):
    from shmipc.bench.runner import _expand
    from shmipc.bench.transports import PoolSuite

    record = run_one(Spec("pool", PoolSuite(), 0, "suite"), _opts(repeat=2, timeout=200), str(tmp_path))
    assert record["status"] == "ok", record
    records = _expand(record)
    assert {r["transport"] for r in records} == {"shmipc.Pool", "mp.Pool", "mp.Pool (tuned)", "floor",
                                                 "shmipc.ProcessPoolExecutor", "cf.ProcessPoolExecutor"}
    # Pool.map ints and bytes: shmipc, mp default, mp tuned; the executor maps: shmipc, cf; and the
    # machine's floor under each map that has one (not the latency row, executor_map_large)
    assert sorted((r["pool_kind"], r["transport"]) for r in records) == sorted(
        [(k, t) for k in ("pool_map_int", "pool_map_100k")
         for t in ("shmipc.Pool", "mp.Pool", "mp.Pool (tuned)", "floor")]
        + [(k, t) for k in ("executor_map", "executor_map_blobs", "executor_map_large")
           for t in ("shmipc.ProcessPoolExecutor", "cf.ProcessPoolExecutor")]
        + [("executor_map", "floor"), ("executor_map_blobs", "floor")])
    for r in records:
        assert len(r["rounds"]) == 2 and all(x["items_per_s"] > 0 for x in r["rounds"])
        assert r["best"] == max(r["rounds"], key=lambda x: x["items_per_s"])
        assert (r.get("chunksize", 0) > 0) == (r["transport"] == "mp.Pool (tuned)")
        assert r["reference"] == (r["transport"] == "floor") and not (r["reference"] and r["shmipc"])
    # the ints' floor is the same under the Pool's and the executor's map (so are the bytes')
    floors = {r["pool_kind"]: r["rounds"] for r in records if r["reference"]}
    assert floors["pool_map_int"] == floors["executor_map"]
    assert [x["seconds"] for x in floors["pool_map_100k"]] == [x["seconds"] for x in floors["executor_map_blobs"]]


def test_pool_floor_is_the_cpu_any_pool_spends_over_the_workers():
    """The floor's parts are measured (CPU time, each > 0) and combined as
    documented: ints, their sum over the workers; bytes, the parent's copy or
    both copies over the workers, whichever is larger. Bad arguments are named."""
    from shmipc.bench.pools import floor_rounds

    data = [bytes([i]) * 4096 for i in range(64)]
    lanes = min(len(os.sched_getaffinity(0)), 3 + 1)       # 3 workers and the parent, on these CPUs
    for codec in ("int64", "pickle"):
        got = floor_rounds(processes=3, repeat=2, codec=codec, data=data)
        assert len(got["ints"]) == len(got["bytes"]) == 2
        for r in got["ints"]:
            parts = {k: v for k, v in r.items() if k != "floor_s"}
            assert len(parts) == 5 and all(v > 0 for v in parts.values()), r
            workers = sum(v for k, v in parts.items() if k.startswith("workers:"))
            assert r["floor_s"] == pytest.approx(max(workers / 3, sum(parts.values()) / lanes))
        for r in got["bytes"]:
            copy_in, copy_out = r["parent: copy into shared memory"], r["workers: copy out of it"]
            assert copy_in > 0 and copy_out > 0
            assert r["floor_s"] == pytest.approx(max(copy_in, copy_out / 3, (copy_in + copy_out) / lanes))
    with pytest.raises(ValueError, match="codec must be 'int64' or 'pickle', got 'json'"):
        floor_rounds(codec="json", data=data)
    with pytest.raises(ValueError, match="at least 1, got 0 and 3"):
        floor_rounds(processes=0, data=data)
    with pytest.raises(ValueError, match=r"one size between 1 and 2097152 bytes, got 0 of sizes \[\]"):
        floor_rounds(data=[])
    with pytest.raises(ValueError, match=r"got 2 of sizes \[1, 2\]"):
        floor_rounds(data=[b"x", b"yy"])
    with pytest.raises(ValueError, match=r"got 1 of sizes \[4194304\]"):
        floor_rounds(data=[bytes(4 << 20)])


def test_pool_results_are_checked_item_by_item():
    """Order and content: a reordered or mixed-up result list is caught,
    where a length-and-sum check would pass it."""
    from shmipc.bench.pools import WrongResults, _check, blobs, fingerprint

    expected = [x + 1 for x in range(1000)]
    _check(list(expected), expected, "pool")
    swapped = list(expected)
    swapped[10], swapped[20] = swapped[20], swapped[10]           # same length, same sum
    with pytest.raises(WrongResults, match="2 of 1000 results differ, the first at index 10"):
        _check(swapped, expected, "pool")
    with pytest.raises(WrongResults, match="999 results, expected 1000"):
        _check(expected[:-1], expected, "pool")
    data = blobs()[:300]
    prints = [fingerprint(b) for b in data]
    assert len(set(prints)) == len(prints)                        # every blob tells itself apart
    assert prints[7] == (100 * 1024, 7, 7)


def test_pool_inputs_are_the_same_lists_for_both_sides():
    import inspect

    from shmipc.bench import pools

    source = inspect.getsource(pools.run)
    assert "ints = list(range(N_INTS))" in source
    assert "range(N_INTS)" not in source.replace("list(range(N_INTS))", "")


def test_pipe_baseline_is_tuned_as_a_careful_user_would():
    """The pipe gets a kernel buffer as large as the ring (or the system's
    maximum), not the default 64 KiB."""
    import fcntl

    from shmipc.bench.transports import pipe_max_size, ring_capacity_for, tuned_pipe

    for size in (64, 1 << 20):
        r, w, granted = tuned_pipe(size)
        try:
            assert granted == fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
            assert granted >= min(ring_capacity_for(size), pipe_max_size()) // 2
            assert granted > 64 << 10 or pipe_max_size() <= 64 << 10
        finally:
            os.close(r)
            os.close(w)


def _receive_batch(channel, result_w):
    got = channel.side("b").recv_many()
    os.write(result_w, json.dumps([m.hex() for m in got]).encode())


@pytest.mark.timeout(60)
def test_pipe_batch_writes_once_per_batch(tmp_path, monkeypatch):
    """os.pipe+batch: a batch of frames is one write() (counted by a spy
    around os.write), and the receiver gets the same messages back."""
    from conftest import fork_child, wait_child

    from shmipc.bench.transports import OsPipeBatch

    channel = OsPipeBatch().open(64, str(tmp_path))
    result_r, result_w = os.pipe()
    pid = fork_child(_receive_batch, channel, result_w)
    os.close(result_w)
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    a = channel.side("a")
    monkeypatch.undo()
    try:
        msgs = message_pool(64)[:16] + [b""]
        a.send_many(msgs)
        assert writes == [16 * (8 + 64) + 8]
        assert wait_child(pid) == 0
        got = json.loads(os.read(result_r, 1 << 20))
        assert [bytes.fromhex(m) for m in got] == msgs
    finally:
        a.close()
        os.close(result_r)


@pytest.mark.timeout(60)
def test_pinned_measurement(tmp_path, no_leaks):
    options = _opts(repeat=1, pin="same")
    assert options.cpus()[0] == options.cpus()[1]
    record = run_one(Spec("pingpong", ShmipcRing(), 64), options, str(tmp_path))
    assert record["status"] == "ok", record
    if len(os.sched_getaffinity(0)) >= 2:
        split = _opts(pin="split").cpus()
        assert split[0] != split[1]
    with pytest.raises(ValueError, match="--pin"):
        _opts(pin="elsewhere").check()


@pytest.mark.timeout(60)
def test_busy_loops_run_pinned_one_per_cpu_and_are_gone_after(no_leaks):
    cpus = sorted(os.sched_getaffinity(0))
    with busy_loops(2) as pids:
        assert len(pids) == 2
        for i, pid in enumerate(pids):
            assert os.sched_getaffinity(pid) == {cpus[i % len(cpus)]}
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert BUSY_LOOP_LABEL.encode() in f.read()
            # each said it runs its loop: it is runnable, not asleep
            assert proc_stat(pid)[0] == "R"
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)                     # killed and reaped
    with busy_loops(0) as none:
        assert none == []


@pytest.mark.timeout(60)
def test_a_busy_loop_that_cannot_start_is_an_error_and_none_is_left(monkeypatch):
    monkeypatch.setattr("sys.executable", "/bin/false")    # every "loop" exits at once
    with pytest.raises(RuntimeError, match=r"--busy: busy loop 1 of 2 \(pid \d+\) exited with status"):
        with busy_loops(2):
            pass
    with pytest.raises(ValueError, match="--busy must be between 0 and 64, got 65"):
        _opts(busy=65).check()


@pytest.mark.timeout(120)
def test_a_busy_run_is_measured_and_says_so(tmp_path, no_leaks):
    options = _opts(repeat=1, busy=2, sizes=[64], workloads=["throughput"], transports=["shmipc.ring"])
    from shmipc.bench import run

    report = run(options)
    assert report["options"]["busy"] == 2
    assert report["records"] and all(r["status"] == "ok" for r in report["records"]), report["records"]
    assert "busy: 2 CPU-bound loops ran beside every measurement" in format_report(report)
    assert "busy_ended" not in report and "busy loops ended" not in format_report(report)


@pytest.mark.timeout(120)
def test_a_busy_loop_killed_during_the_run_is_reported(no_leaks):
    """A loop killed from outside mid-run: the report must not claim that
    every measurement ran beside all the loops."""
    from shmipc.bench import run
    from shmipc.bench.report import readme_section

    options = _opts(repeat=1, busy=2, sizes=[64, 1024], workloads=["throughput"], transports=["shmipc.ring"])
    killed: list[int] = []

    def kill_one(record: dict) -> None:
        if not killed:                          # after the first measurement
            pid = processes_with(BUSY_LOOP_LABEL)[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    report = run(options, on_record=kill_one)
    assert {r["size"] for r in report["records"]} == {64, 1024}
    assert all(r["status"] == "ok" for r in report["records"]), report["records"]
    assert report["busy_ended"] == [{"pid": killed[0], "status": -signal.SIGKILL}]
    want = f"WARNING: 1 of the 2 busy loops ended before the run did: pid {killed[0]} (killed by SIGKILL)"
    assert want in format_report(report)
    assert want in readme_section(report, "shmipc bench --busy 2")
    assert "ran beside every measurement" not in format_report(report) + readme_section(report, "")
    assert processes_with(BUSY_LOOP_LABEL) == []


# ---------------------------------------------------------------- cheating transports are caught
class _Faulty(Transport):
    """An os.pipe that drops, duplicates or corrupts one message in `every`."""

    objects = False

    def __init__(self, fault: str, mode: str = "single", every: int = 300) -> None:
        self.name = f"faulty-{fault}"
        self.fault = fault
        # "batch1": batches handed to the receiver one message a call, as a
        # ring's get_many hands large messages
        self.one_a_call = mode == "batch1"
        self.mode = "batch" if self.one_a_call else mode
        self.every = every

    def open(self, size, tmpdir):
        channel = _OsPipeChannel(size, self.mode)
        fault, every = self.fault, self.every
        side = channel.side

        def faulty_side(which):
            ep = side(which)
            if which != "a":
                if self.one_a_call:
                    held: list = []
                    recv_many = ep.recv_many

                    def one_a_call():
                        if not held:
                            held.extend(recv_many())
                        return [held.pop(0)]
                    ep.recv_many = one_a_call
                return ep
            send = ep.send
            count = [0]

            def bad_send(msg):
                count[0] += 1
                if count[0] % every == 0 and len(msg):
                    if fault == "drop":
                        return
                    if fault == "duplicate":
                        send(msg)
                    if fault == "corrupt":
                        msg = bytearray(msg)
                        msg[len(msg) // 2] ^= 0xFF
                send(msg)

            def bad_send_many(msgs):
                msgs = list(msgs)
                for j, msg in enumerate(msgs):
                    count[0] += 1
                    if count[0] % every == 0 and len(msg):
                        if fault == "drop":
                            del msgs[j]
                        elif fault == "duplicate":
                            msgs.insert(j, msg)
                        else:
                            msgs[j] = bytes([msg[0] ^ 0xFF]) + msg[1:]
                        break
                ep.send_many(msgs)

            faulty = Endpoint(bad_send, ep.recv, ep.close)
            faulty.objects = False
            faulty.send_many = bad_send_many
            faulty.recv_many = ep.recv_many
            return faulty

        channel.side = faulty_side
        return channel


@pytest.mark.timeout(60)
# (a fault every `every` messages: a 0.1 s round carries ~100 messages of 1 MiB)
@pytest.mark.parametrize("mode, size, every", [("single", 256, 300), ("batch", 256, 300), ("batch1", 256, 300),
                                               ("view", 256, 300), ("view", 1 << 20, 20)])
@pytest.mark.parametrize("fault", ["drop", "duplicate", "corrupt"])
def test_receiver_catches_a_faulty_transport(tmp_path, fault, mode, size, every, no_leaks):
    # batches are compared whole first, views in place: a fault anywhere is still found
    record = run_one(Spec("throughput", _Faulty(fault, mode, every), size), _opts(repeat=1, seconds=0.1),
                     str(tmp_path))
    assert record["status"] == "error", record
    assert "message" in record["reason"] and "VerifyError" in record["reason"], record["reason"]


class _Hangs(Transport):
    """A transport whose receiver never returns: the runner must kill it."""

    name = "hangs"

    def open(self, size, tmpdir):
        return _HangsChannel()


class _HangsChannel:
    def side(self, which):
        return Endpoint(lambda m: None, lambda: time.sleep(3600))

    def close(self):
        pass


@pytest.mark.timeout(60)
def test_a_hanging_transport_is_killed_and_reported(tmp_path, no_leaks):
    t0 = time.monotonic()
    record = run_one(Spec("pingpong", _Hangs(), 64), _opts(timeout=2.0), str(tmp_path))
    assert record["status"] == "timeout"
    assert "2 s" in record["reason"]
    assert time.monotonic() - t0 < 15
    assert "_pingpong_round" in record["log"]          # where it hung, from faulthandler
    assert "_pingpong_round" in format_report({"machine": _fake_report()["machine"], "options": {},
                                               "records": [record]})


class _Missing(Transport):
    name = "missing"
    requires = ("shmipc_no_such_module_xyz",)


def test_a_missing_transport_is_skipped(tmp_path):
    record = run_one(Spec("throughput", _Missing(), 64), _opts(), str(tmp_path))
    assert record["status"] == "skipped"
    assert "not available" in record["reason"] and "shmipc_no_such_module_xyz" in record["reason"]


class _Broken(Transport):
    name = "broken"
    requires = ("shmipc_test_broken_peer",)


@pytest.mark.timeout(60)
def test_a_broken_install_is_skipped_by_the_measurement_process(tmp_path, monkeypatch):
    """Found but failing on import (a broken optional peer): skipped, with
    the reason; the runner's own process never imports it."""
    import sys

    (tmp_path / "shmipc_test_broken_peer.py").write_text("raise RuntimeError('broken install')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    record = run_one(Spec("throughput", _Broken(), 64), _opts(), str(tmp_path))
    assert record["status"] == "skipped", record
    assert "broken install" in record["reason"]
    assert "shmipc_test_broken_peer" not in sys.modules


# ---------------------------------------------------------------- reports
def _fake_report() -> dict:
    def rec(workload, transport, mine, size, best, status="ok", reason=""):
        return {"workload": workload, "transport": transport, "shmipc": mine, "size": size,
                "pool_kind": "ints" if workload == "pool" else None, "note": "", "status": status,
                "reason": reason, "rounds": [best] if best else [], "best": best or {}}

    tp = lambda m, size: {"messages": 1, "seconds": 1.0, "msgs_per_s": m, "mb_per_s": m * size / 1e6}
    records = []
    for size in (64, 1 << 20):
        records.append(rec("throughput", "shmipc.ring", True, size, tp(8e6 / size * 64, size)))
        records.append(rec("throughput", "os.pipe", False, size, tp(1e6 / size * 64, size)))
        records.append(rec("throughput", "pyzmq", False, size, None, "skipped", "not available (zmq)"))
    records.append(rec("pingpong", "shmipc.ring", True, 64,
                       {"round_trips": 10, "median_us": 1.0, "p99_us": 2.0, "min_us": 0.9, "round_trips_per_s": 1e6}))
    records.append(rec("pingpong", "os.pipe", False, 64,
                       {"round_trips": 10, "median_us": 50.0, "p99_us": 80.0, "min_us": 9, "round_trips_per_s": 2e4}))
    records.append(rec("pingpong", "mp.Queue", False, 64, None, "timeout", "no result within 20 s: killed"))
    from shmipc.bench.report import machine

    return {"machine": dict(machine(), load_after=[0.0, 0.0, 0.0]),
            "options": {"repeat": 3, "seconds_per_round": 0.2}, "records": records, "elapsed_s": 1.0}


def test_load_warning_when_the_load_exceeds_the_cores():
    from shmipc.bench.report import load_warning

    report = _fake_report()
    cores = report["machine"]["usable_cores"]
    report["machine"].update(load_before=[0.1, 0, 0], load_after=[0.2, 0, 0], load_max=cores - 0.5)
    assert load_warning(report) is None and "WARNING" not in format_report(report)
    report["machine"]["load_max"] = cores + 1.5
    assert f"reached {cores + 1.5:.1f}" in load_warning(report)
    assert format_report(report).count("WARNING: the load average") == 2     # top and summary


def test_memcpy_row_is_a_floor_not_a_peer():
    report = _fake_report()
    report["records"].insert(2, {"workload": "throughput", "transport": "memcpy", "shmipc": False,
                                 "reference": True, "size": 64, "pool_kind": None, "note": "",
                                 "status": "ok", "reason": "",
                                 "rounds": [], "best": {"messages": 1, "seconds": 1.0, "msgs_per_s": 16e6,
                                                        "mb_per_s": 16e6 * 64 / 1e6}})
    text = format_report(report)
    assert "of memcpy" in text
    assert "50%" in text                     # shmipc.ring 8 M of memcpy's 16 M
    assert "vs memcpy" not in text           # never the peer a ratio is taken against


def test_pool_floor_is_a_reference_row_not_a_baseline():
    """The pool tables show each row's share of the machine's floor; the floor
    is never the baseline a shmipc x, a summary line, the README matrix or a
    sentence compares with, and the best ratio it leaves is said."""
    from shmipc.bench.report import markdown_summary, prose

    report = _fake_report()
    report["options"]["processes"] = 2

    def pool(transport, mine, per_s, reference=False, chunksize=None):
        best = {"items": 1000, "seconds": 1000 / per_s, "items_per_s": per_s, "mb_per_s": per_s * 8 / 1e6}
        r = {"workload": "pool", "transport": transport, "shmipc": mine, "reference": reference, "size": 0,
             "pool_kind": "pool_map_int", "title": "Pool.map(x+1, list of 200_000 ints)", "note": "",
             "status": "ok", "reason": "", "rounds": [best], "best": best}
        if chunksize:
            r["chunksize"] = chunksize
        return r

    report["records"] += [pool("shmipc.Pool", True, 6e6), pool("mp.Pool", False, 4e6),
                          pool("mp.Pool (tuned)", False, 5e6, chunksize=50000),
                          pool("floor", False, 20e6, reference=True)]
    text = format_report(report)
    table = text[text.index("Pool.map(x+1"):].split("\n\n")[0].splitlines()
    assert table[1].rstrip().endswith("of floor"), table
    shmipc_row = next(line for line in table if line.strip().startswith("shmipc.Pool"))
    floor_row = next(line for line in table if line.strip().startswith("floor"))
    assert shmipc_row.rstrip().endswith("30%")              # 6 M of the floor's 20 M
    assert floor_row.rstrip().endswith("100%") and "x" not in floor_row.split("floor", 1)[1]
    assert "of floor: this pool's rate over the machine's floor" in text
    assert "pool pool_map_int" in text and "1.2x vs mp.Pool (tuned)" in text      # never "vs floor"
    assert "vs floor" not in text
    md = markdown_summary(report)
    assert "| 6 M items/s | 5 M items/s (mp.Pool (tuned)) | 1.2x | 4.0x |" in md, md
    said = prose(report)
    assert not any("`floor`" in s for s in said), said
    assert any("30% of the machine's floor" in s and "by more than 4.0x" in s for s in said), said


@pytest.mark.timeout(120)
def test_bench_without_numpy_skips_in_one_line(tmp_path):
    """A plain install (no numpy): the numpy workload is skipped with one
    reason, zero-copy receivers of bytes still run, and nothing fails."""
    import subprocess
    import sys

    script = ("import sys; sys.modules['numpy'] = None\n"      # as if numpy were not installed
              "from shmipc.cli import main\n"
              "sys.exit(main(['bench', '--quick', '--no-progress', '--seconds', '0.03', '--sizes', '64k',\n"
              "               '--transports', 'shmipc.ring,os.pipe', '--workloads', 'throughput,numpy']))\n")
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=110,
                          cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "Skipped: the numpy workload: numpy is not installed" in out
    assert out.count("numpy is not installed") == 2            # the table's line, the summary's
    view = next(line for line in out.splitlines() if line.strip().startswith("shmipc.ring+view"))
    assert "M" in view or "k" in view or any(c.isdigit() for c in view.split()[1]), view
    assert "FAILED" not in out and "Error" not in out
    assert time.monotonic() - t0 < 100


def test_report_tables_ratios_and_failures():
    text = format_report(_fake_report())
    assert "One-way throughput, parent -> forked child, 64 B messages" in text
    assert "best of 3 rounds of 0.2 s" in text
    assert "8.0x" in text                      # 8 M vs 1 M msgs/s
    assert "50.0x" in text                     # 1 us vs 50 us median
    assert "pyzmq" in text and "skipped" in text
    assert "FAILED pingpong mp.Queue" in text
    assert "cores" in text and "Python" in text      # (was `a and b or c`: passed on "CPython" alone)
    md = markdown_tables(_fake_report())
    assert "| transport | msgs/s | MB/s | ring x | best x |" in md


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "chart.png"
    plot(_fake_report(), str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = _fake_report()
    report["records"] = [r for r in report["records"] if r["workload"] != "throughput"]
    with pytest.raises(ValueError, match="no throughput"):
        plot(report, str(path))


def test_json_round_trip(tmp_path):
    from shmipc.bench import write_json

    path = tmp_path / "r.json"
    write_json(_fake_report(), str(path))
    data = json.loads(path.read_text())
    assert {r["transport"] for r in data["records"]} >= {"shmipc.ring", "os.pipe"}
    assert data["machine"]["cores"] == os.cpu_count()


# ---------------------------------------------------------------- a peer that dies
class _ReceiverDies(ShmipcRing):
    """A shmipc ring whose receiving process exits at its first receive: the
    sender soon blocks on a full ring, and must learn at once."""

    name = "receiver-dies"

    def open(self, size, tmpdir):
        channel = super().open(size, tmpdir)
        side = channel.side

        def dying_side(which):
            ep = side(which)
            if which == "b":
                ep.recv = lambda: os._exit(3)
            return ep

        channel.side = dying_side
        return channel


@pytest.mark.timeout(60)
def test_a_dead_peer_fails_the_measurement_at_once(tmp_path, no_leaks):
    t0 = time.monotonic()
    record = run_one(Spec("throughput", _ReceiverDies(), 64), _opts(repeat=1, seconds=0.5, timeout=40.0),
                     str(tmp_path))
    assert record["status"] == "error", record
    assert "exited with status 3" in record["reason"], record["reason"]
    assert time.monotonic() - t0 < 10                   # not the 40 s measurement timeout


def test_readme_section_is_generated_from_the_run(tmp_path, capsys):
    """The README's figures and sentences come from the report (8 M vs 1 M
    msgs/s in the fake run: the sentence says 8.0x), between the markers only."""
    from shmipc.bench.report import prose, readme_section, update_readme
    from shmipc.cli import main

    report = _fake_report()
    sentences = prose(report)
    assert any("64 B messages, `Ring.put`/`get`: 8 M msgs/s, 8.0x `os.pipe`" in s for s in sentences), sentences
    assert any("round trip: 1.00 us median against 50.0 us" in s for s in sentences), sentences
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nintro\n<!-- perf:start -->\nold figures\n<!-- perf:end -->\n\n## after\n")
    update_readme(str(readme), readme_section(report, ".venv/bin/shmipc bench --readme README.md"))
    text = readme.read_text()
    assert text.startswith("# x\n\nintro\n<!-- perf:start -->\n## Performance")
    assert "old figures" not in text and text.endswith("<!-- perf:end -->\n\n## after\n")
    assert "8.0x `os.pipe`" in text and "--readme README.md" in text
    bare = tmp_path / "bare.md"
    bare.write_text("# no markers\n")
    assert main(["bench", "--readme", str(bare), "--no-progress"]) == 2      # before any measurement
    assert "no <!-- perf:start -->" in capsys.readouterr().err


def test_prose_gives_the_median_of_side_by_side_rounds_beside_best_against_best():
    # best against best pairs round 2 of one row with round 3 of the other;
    # the paired figure divides within each round: 0.5, 2.0, 1.0 -> median 1.0
    from shmipc.bench.report import paired_ratio, prose

    def rec(transport, rates, mine=True):
        rounds = [{"messages": 1, "seconds": 1.0, "msgs_per_s": m, "mb_per_s": m} for m in rates]
        return {"workload": "throughput", "transport": transport, "shmipc": mine, "size": 1 << 20,
                "pool_kind": None, "note": "", "status": "ok", "reason": "", "rounds": rounds,
                "best": max(rounds, key=lambda r: r["msgs_per_s"], default={}), "reference": transport == "c-ring"}

    single, batch = rec("shmipc.ring", [100, 400, 50]), rec("shmipc.ring+batch", [50, 800, 50])
    view, c_ring = rec("shmipc.ring+view", [100, 100, 300]), rec("c-ring", [200, 50, 300], mine=False)
    assert paired_ratio(batch, single) == 1.0 and paired_ratio(view, c_ring) == 1.0
    assert paired_ratio(view, rec("c-ring", [])) is None
    report = {"records": [single, batch, view, c_ring]}
    sentences = prose(report)
    assert any("`put_many`/`get_many` against `put`/`get`: 2.00 best against best; 1.00 as the median "
               "of the 3 rounds run side by side." in s for s in sentences), sentences
    assert any("reached 100% of a C ring" in s and "best round against best round; 100% as the median "
               "of the 3 rounds" in s for s in sentences), sentences


def test_pool_ratios_give_the_median_of_side_by_side_rounds_too():
    """A pool's best round against a baseline's best is luck on a busy
    machine (their best rounds may be minutes apart): the sentences and the
    summary line also give the median of the per-round ratios (the pools
    of one table take turns round by round). Here the bests say 1.0x,
    round by round shmipc was 2.0x, 2.0x and 0.5x: median 2.0x."""
    from shmipc.bench.report import prose

    def pool(transport, mine, rates, chunksize=None):
        rounds = [{"items": 1000, "seconds": 1000 / r, "items_per_s": r, "mb_per_s": r * 8 / 1e6} for r in rates]
        r = {"workload": "pool", "transport": transport, "shmipc": mine, "reference": False, "size": 0,
             "pool_kind": "pool_map_int", "title": "Pool.map(x+1, list of 200_000 ints)", "note": "",
             "status": "ok", "reason": "", "rounds": rounds, "best": max(rounds, key=lambda x: x["items_per_s"])}
        if chunksize:
            r["chunksize"] = chunksize
        return r

    report = _fake_report()
    report["records"] = [pool("shmipc.Pool", True, [8e6, 6e6, 4e6]), pool("mp.Pool", False, [4e6, 3e6, 8e6])]
    said = prose(report)
    assert any("`Pool.map(x+1, list of 200_000 ints)`: 1.0x `mp.Pool`; 2.0x as the median of the 3 rounds "
               "run side by side." in s for s in said), said
    text = format_report(report)
    line = next(x for x in text.splitlines() if x.strip().startswith("pool pool_map_int"))
    assert "1.0x vs mp.Pool" in line and line.endswith("; 2.0x, median of 3 rounds run side by side"), line
    # one round each (an old report): no median is claimed
    report["records"] = [pool("shmipc.Pool", True, [8e6]), pool("mp.Pool", False, [4e6])]
    assert any(s.endswith("2.0x `mp.Pool`.") for s in prose(report)), prose(report)
    assert format_report(report).count("median of") == 0


@pytest.mark.timeout(120)
def test_c_ring_floor_is_measured_and_verified(tmp_path):
    """The C ring of the same design builds with Python's compiler, moves and
    checks every message, in copy and in view mode, as the Python receivers
    do (verify "full": every byte; "stamps": stamps, and one in 16 fully)."""
    from shmipc.bench.transports import CRing, c_compiler

    if c_compiler() is None:
        pytest.skip("no C compiler")
    for size, verify in ((64, "full"), (1 << 20, "full"), (1 << 20, "stamps")):
        opts = _opts(repeat=2)
        opts.verify = verify
        record = run_one(Spec("throughput", CRing(), size), opts, str(tmp_path))
        assert record["status"] == "ok", record
        assert len(record["rounds"]) == 2 and record["best"]["messages"] > 0
        assert record["reference"] is True


@pytest.mark.timeout(30)
def test_pin_split_needs_two_cpus():
    """--pin split in a process allowed one CPU: a clear error before measuring."""
    import subprocess
    import sys

    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "from shmipc.cli import main\n"
            "raise SystemExit(main(['bench', '--pin', 'split', '--no-progress']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=25)
    assert done.returncode == 2, done.stderr
    assert "--pin split needs 2 usable CPUs, this process may use 1" in done.stderr


# ---------------------------------------------------------------- the ray workload (no Ray started here:
# tests/test_ray.py covers Ray itself)
def _ray_measure_report() -> dict:
    """What shmipc.bench.ray.measure() returns, with made-up figures."""
    return {"ray_init_s": 7.25, "ray_version": "2.x", "rows": [
        {"workload": "pipeline, 2 stages, 1 KiB items", "items": 1000, "shmipc_start_s": 0.05,
         "ray_start_s": 1.5, "shmipc": 40_000.0, "ray": 800.0, "ratio": 50.0},
        {"workload": "pool.map, 2 workers, tiny tasks", "items": 20_000, "shmipc_start_s": 0.02,
         "ray_start_s": 2.0, "shmipc": 300_000.0, "ray": 20_000.0, "ratio": 15.0}]}


def test_ray_rows_become_records_that_the_report_prints(tmp_path):
    from shmipc.bench import write_json
    from shmipc.bench.ray import RaySuite, records
    from shmipc.bench.runner import _expand

    # as run_one builds it around the measurement process's payload
    spec = Spec("ray", RaySuite(), 0, "suite")
    record = {"workload": "ray", "transport": spec.transport.name, "shmipc": False, "reference": False,
              "size": 0, "pool_kind": "suite", "note": spec.transport.note, "status": "ok", "reason": "",
              "rounds": [], "best": {}, "records": records(_ray_measure_report())}
    got = _expand(record)
    assert [(r["transport"], r["shmipc"], r["pool_kind"]) for r in got] == [
        ("shmipc", True, "pipeline, 2 stages, 1 KiB items"), ("ray", False, "pipeline, 2 stages, 1 KiB items"),
        ("shmipc", True, "pool.map, 2 workers, tiny tasks"), ("ray", False, "pool.map, 2 workers, tiny tasks")]
    assert got[1]["best"] == {"items": 1000, "items_per_s": 800.0, "start_s": 1.5}
    assert all(r["note"] == "shmipc/bench/ray.py" and r["ray_init_s"] == 7.25 for r in got)
    report = _fake_report()
    report["records"] = got
    text = format_report(report)
    lines = text.splitlines()
    assert sum(line.startswith("ray_init_s: 7.2 s") for line in lines) == 1      # once, on its own line
    assert "pipeline, 2 stages, 1 KiB items: shmipc vs local Ray" in text
    ray_row = next(line for line in lines if line.strip().startswith("ray ") and "800" in line)
    assert "1.50" in ray_row and "50.0x" in ray_row, ray_row          # start s, shmipc / ray
    assert "15.0x vs ray" in text                                    # the summary line
    md = markdown_tables(report)
    assert "ray_init_s: 7.2 s" in md and "| transport | items/s | start s | shmipc x |" in md
    path = tmp_path / "r.json"
    write_json(report, str(path))
    assert json.loads(path.read_text())["records"][3]["best"]["items_per_s"] == 20_000.0


def test_ray_workload_is_opt_in_and_skipped_in_one_line_without_ray(tmp_path, monkeypatch):
    import sys

    from shmipc.bench.ray import RaySuite
    from shmipc.bench.runner import _loadavg, workload_unavailable

    assert "ray" not in Options().workloads                     # ~20 s of Ray start-up: opt-in
    specs = plan(_opts(workloads=["ray"]))
    assert [(s.workload, type(s.transport)) for s in specs] == [("ray", RaySuite)]
    assert _opts(timeout=None).measurement_timeout("ray") >= 300
    monkeypatch.setitem(sys.modules, "ray", None)               # as if Ray were not installed
    assert workload_unavailable("ray") == "needs Ray: pip install 'shmipc[ray]'"
    record = run_one(specs[0], _opts(workloads=["ray"]), str(tmp_path))     # skipped before any fork
    assert record["status"] == "skipped" and record["reason"] == "needs Ray: pip install 'shmipc[ray]'"
    report = _fake_report()
    report["records"] = [record]
    report["machine"]["load_after"] = _loadavg()
    text = format_report(report)
    assert "  skipped: needs Ray: pip install 'shmipc[ray]'" in text
    assert "FAILED" not in text and "ray_init_s" not in text


@pytest.mark.timeout(240)
def test_pool_floor_script_prints_both_codecs_and_the_best_ratios(tmp_path):
    """benchmarks/bench_pool_floor.py runs from a checkout and reports the
    floors' parts (pickle and int64), mp.Pool's times and the best ratios."""
    import json
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "benchmarks", "bench_pool_floor.py")
    out = subprocess.run([sys.executable, script, "--repeat", "1", "--json"], capture_output=True, text=True,
                         timeout=200, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    for codec in ("pickle", "int64"):
        parts = got[f"ints_{codec}"]
        assert len(parts) == 6 and all(v > 0 for v in parts.values()), parts
        assert got[f"int_best_ratio_{codec}"] == pytest.approx(got["mp_pool_int_s"] / parts["floor_s"])
    assert got["bytes_best_ratio"] == pytest.approx(got["mp_pool_bytes_tuned_s"] / got["bytes"]["floor_s"])
    bad = subprocess.run([sys.executable, script, "--repeat", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--repeat must be at least 1, got 2 and 0" in bad.stderr


def test_pool_script_table_gives_the_median_of_paired_rounds_beside_the_best():
    """benchmarks/bench_pool.py's table: best against best, then the median
    of the per-round ratios (here the bests say 1.00x, round by round the
    standard library took 2x, 2x and 0.5x shmipc's time: median 2.00x);
    the floor's best ratio and the target as before."""
    import importlib.util

    from shmipc.bench.pools import paired_speedup

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_pool.py")
    spec = importlib.util.spec_from_file_location("bench_pool_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    mine, theirs, tuned = [0.010, 0.020, 0.040], [0.020, 0.040, 0.020], [0.030, 0.030, 0.030]
    assert paired_speedup(mine, theirs) == 2.0 and paired_speedup(mine, tuned) == 1.5
    row = {"name": "pool_map_int", "label": "Pool.map(x+1, ints)", "shmipc_s": 0.010, "stdlib_s": 0.020,
           "speedup": 2.0, "speedup_median": paired_speedup(mine, theirs), "tuned_s": 0.030,
           "tuned_chunksize": 50000, "speedup_tuned": 3.0, "speedup_tuned_median": paired_speedup(mine, tuned),
           "floor_speedup": 2.5}
    head, line = script._table([row]).splitlines()
    assert head.split() == ["benchmark", "shmipc", "stdlib", "speedup", "median", "tuned", "stdlib", "speedup",
                            "median", "floor", "target"]
    cells = line[len(row["label"]):].split(None, 10)
    assert cells == ["10.0ms", "20.0ms", "2.00x", "2.00x", "30.0ms", "(chunksize=50000)", "3.00x", "1.50x",
                     "2.50x", "3.0x", "(below target; so is the floor)"], line
