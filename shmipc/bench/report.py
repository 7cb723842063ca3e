"""Turn `shmipc bench` records into text tables, JSON and a chart.

Ratios are always figures of the same run: for throughput ``shmipc / peer``
(how many times more messages per second), for round trips ``peer / shmipc``
of the median (how many times shorter shmipc's round trip is). "ring x" uses
the plain ``Ring.put/get`` figure; "best x" the best shmipc variant of that
workload (batched or zero-copy where it applies).
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Iterable

from shmipc.errors import WorkerLost

__all__ = ["machine", "format_report", "write_json", "plot", "markdown_tables", "markdown_summary"]

WORKLOAD_TITLES = {
    "throughput": "One-way throughput, parent -> forked child",
    "pingpong": "Ping-pong round trip, 64 B",
    "numpy": "numpy float64 arrays of 1 MiB, parent -> forked child",
    "pool": "Pool.map",
    "ray": "The same pipeline and pool on shmipc and on a local Ray",
}
_BY_KIND = ("pool", "ray")      # workloads whose records are grouped by pool_kind, not size


def _version(dist: str) -> str | None:
    try:
        from importlib import metadata

        return metadata.version(dist)
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    import shmipc

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "load_before": load,
        "versions": {
            "shmipc": shmipc.__version__,
            "numpy": _version("numpy"),
            "pyzmq": _version("pyzmq"),
            "faster-fifo": _version("faster-fifo"),
            "tqdm": _version("tqdm"),
            "matplotlib": _version("matplotlib"),
        },
    }


def _human(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}" if x / scale < 100 else f"{x / scale:.0f} {unit}"
    return f"{x:.3g}"


def _mb(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _size(n: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _groups(records: list[dict]) -> list[tuple[tuple, list[dict]]]:
    """Records grouped by (workload, size/pool kind), in run order."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        key = (r["workload"], r["pool_kind"] if r["workload"] in _BY_KIND else r["size"])
        groups.setdefault(key, []).append(r)
    return list(groups.items())


def _metric(r: dict) -> float | None:
    """The figure ratios are taken of (higher is better)."""
    b = r.get("best") or {}
    if r["status"] != "ok" or not b:
        return None
    if r["workload"] == "pingpong":
        return 1.0 / b["median_us"] if b.get("median_us") else None
    return b.get("items_per_s") if r["workload"] in _BY_KIND else b.get("msgs_per_s")


def _refs(rows: list[dict]) -> tuple[float | None, float | None]:
    """(plain shmipc figure, best shmipc figure) of a group."""
    plain = next((_metric(r) for r in rows if r["transport"] in
                  ("shmipc.ring", "shmipc.Pool", "shmipc.ProcessPoolExecutor")), None)
    best = max((m for r in rows if r["shmipc"] and (m := _metric(r)) is not None), default=None)
    return plain, best


def _ratio(num: float | None, den: float | None) -> str:
    if num is None or not den:
        return "-"
    return f"{num / den:.1f}x" if num / den < 100 else f"{num / den:.0f}x"


def _mean_us(b: dict) -> float:
    """A ping-pong round's mean round trip (older reports hold only its inverse)."""
    if "mean_us" in b:
        return b["mean_us"]
    return 1e6 / b["round_trips_per_s"] if b.get("round_trips_per_s") else float("nan")


def _figure(r: dict) -> str:
    """A record's headline figure, with its unit."""
    b = r.get("best") or {}
    if r["workload"] == "pingpong":
        return f"median {b['median_us']:.2f} us"
    if r["workload"] in _BY_KIND:
        return f"{_human(b['items_per_s'])} items/s"
    if r.get("size", 0) >= 4096:
        return f"{_mb(b['mb_per_s'])} MB/s"
    return f"{_human(b['msgs_per_s'])} msgs/s"


def _table_rows(key: tuple, rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    workload = key[0]
    plain, best = _refs(rows)
    if workload == "pingpong":
        # the mean, not a rate: a median of 1.5 us next to "36 k round trips/s"
        # (the mean's inverse, pulled up by rare 50 us wake-ups) reads as a contradiction
        head = ["transport", "median us", "mean us", "p99 us", "ring x", "best x"]
    elif workload == "pool":
        head = ["pool", "items/s", "MB/s", "shmipc x", ""]
    elif workload == "ray":
        head = ["transport", "items/s", "start s", "shmipc x"]
    else:
        head = ["transport", "msgs/s", "MB/s", "ring x", "best x"]
    # how close each row gets to the machine's floors (the C ring, memcpy)
    floors = [(r["transport"], _metric(r)) for r in rows if r.get("reference") and _metric(r)]
    head += [f"of {name}" for name, _ in floors]
    out = []
    for r in rows:
        b = r.get("best") or {}
        if r["status"] != "ok":
            why = r["status"] if r["status"] != "skipped" else "skipped"
            reason = r.get("reason", "")
            out.append([r["transport"], f"{why}: {reason[:90]}"])       # a note, not figures
            continue
        m = _metric(r)
        mine = r["shmipc"]
        if workload == "pingpong":
            cells = [f"{b['median_us']:.2f}", f"{_mean_us(b):.2f}", f"{b['p99_us']:.2f}"]
        elif workload == "pool":
            cells = [_human(b["items_per_s"]), _mb(b["mb_per_s"])]
        elif workload == "ray":
            cells = [_human(b["items_per_s"]), f"{b['start_s']:.2f}"]
        else:
            cells = [_human(b["msgs_per_s"]), _mb(b["mb_per_s"])]
        if workload == "pool":
            cells += ["" if mine or r.get("reference") else _ratio(best, m),
                      f"chunksize={r['chunksize']}" if r.get("chunksize") else ""]
        elif workload == "ray":
            cells += ["" if mine else _ratio(best, m)]
        elif r.get("reference"):
            cells += ["", ""]
        else:
            cells += ["" if mine else _ratio(plain, m), "" if mine else _ratio(best, m)]
        cells += [f"{m / f:.0%}" if m is not None else "" for _, f in floors]
        out.append([r["transport"]] + cells)
    return head, out


def _title(key: tuple, options: dict, rows: list[dict]) -> str:
    workload, what = key
    title = WORKLOAD_TITLES.get(workload, workload)
    processes = options.get("processes", 2)
    if workload == "throughput":
        title += f", {_size(what)} messages"
    elif workload == "pool" and rows and rows[0].get("title"):
        title = f"{rows[0]['title']}, {processes} workers"
    elif workload == "ray" and rows and rows[0].get("title"):
        title = f"{rows[0]['title']}: shmipc vs local Ray"
    elif workload == "pool":
        title = f"Pool.map with {processes} workers, " + (
            "small ints (x*x)" if what == "ints" else "100 KiB bytes (crc32)")
    rounds = options.get("repeat", 1)
    secs = options.get("seconds_per_round", 0)
    if workload in _BY_KIND and rows and rows[0].get("title"):
        return f"{title}   [best of {rounds} run{'s' if rounds != 1 else ''}]"
    return f"{title}   [best of {rounds} round{'s' if rounds != 1 else ''} of {secs:g} s]"


def _render(head: list[str], rows: list[list[str]]) -> list[str]:
    """Align a table; a row of two cells is a name and a note spanning the rest."""
    full = [r for r in rows if len(r) == len(head)]
    widths = [max([len(head[i])] + [len(r[i]) for r in full]) for i in range(len(head))]
    widths[0] = max([widths[0]] + [len(r[0]) for r in rows])
    lines = ["  " + "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i])
                              for i, h in enumerate(head)).rstrip()]
    for r in rows:
        if len(r) != len(head):
            lines.append("  " + r[0].ljust(widths[0]) + "  " + r[1])
            continue
        lines.append("  " + "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                                      for i, c in enumerate(r)).rstrip())
    return lines


def _machine_line(m: dict) -> str:
    v = m.get("versions", {})
    peers = ", ".join(f"{k} {x}" for k, x in v.items() if x and k != "shmipc")
    return (f"{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['python']}, "
            f"{m['platform']}; shmipc {v.get('shmipc')}" + (f"; {peers}" if peers else ""))


_PIN = {"same": "both processes of each measurement on one CPU (--pin same)",
        "split": "the two processes of each measurement on two different CPUs (--pin split)"}


def _busy_phrase(report: dict) -> str | None:
    """What the --busy loops did, for the header (None: no --busy)."""
    n = report["options"].get("busy")
    if not n:
        return None
    beside = ("started beside the measurements (not all lasted: see the warning)" if report.get("busy_ended")
              else "ran beside every measurement")
    return f"{n} CPU-bound loop{'s' if n != 1 else ''} {beside}, pinned one per CPU in turn (--busy {n})"


def load_warning(report: dict) -> str | None:
    """A warning when the load average during the run exceeded the usable
    cores (other work competed with the measurements), else None."""
    m = report["machine"]
    peak = m.get("load_max")
    if peak is None:
        loads = [x[0] for x in (m.get("load_before"), m.get("load_after")) if x]
        peak = max(loads, default=None)
    cores = m.get("usable_cores") or m.get("cores") or 1
    if peak is None or peak <= cores:
        return None
    return (f"WARNING: the load average reached {peak:.1f} during the run, on {cores} usable cores: other "
            "work competed with the measurements, so the figures are lower and noisier than on a quiet "
            "machine (compare ratios of the same run, or rerun when the machine is quiet)")


def busy_warning(report: dict) -> str | None:
    """A warning when busy loops (--busy) ended before the run did (killed
    from outside): the claim that they ran beside every measurement would be
    false for the measurements after that. None otherwise."""
    ended = report.get("busy_ended")
    if not ended:
        return None
    which = ", ".join(f"pid {e['pid']} ({WorkerLost.describe(e['status'])})" for e in ended)
    n = report["options"].get("busy")
    return (f"WARNING: {len(ended)} of the {n} busy loops ended before the run did: {which}; "
            "the measurements after that ran beside fewer loops")


def run_warnings(report: dict) -> list[str]:
    """Every warning about how the run went (load, busy loops)."""
    return [w for w in (load_warning(report), busy_warning(report)) if w]


def format_report(report: dict) -> str:
    """The text tables `shmipc bench` prints."""
    m = report["machine"]
    lines = [f"shmipc bench  {m['date']}", f"machine: {_machine_line(m)}",
             f"load average before/after: {m.get('load_before')} / {m.get('load_after')}"
             "  (figures are the best of the rounds; a busy machine lowers them)",
             *run_warnings(report),
             *([f"pinned: {_PIN[pin]}"] if (pin := report["options"].get("pin")) else []),
             *([f"busy: {busy}"] if (busy := _busy_phrase(report)) else []),
             "ring x: the plain shmipc.ring (put/get) figure over this transport's; best x: the best "
             "shmipc variant's; for round trips, this transport's median over shmipc's",
             *(["of c-ring: this row's rate over a C ring of the same design (sem_t + spin, no Python; its receiver "
                "verifies every message as the Python receivers do); "
                "of memcpy: over one process copying each message once from a Python loop (no IPC; two "
                "processes on two cores, or a zero-copy receive, can exceed it)"]
               if any(r.get("reference") for r in report["records"] if r["workload"] != "pool") else []),
             *(["of floor: this pool's rate over the machine's floor for that map: the CPU any pool must "
                "spend on it (the calls and the cheapest encoding both ways for ints; two copies of every byte, "
                "the first by the parent alone, for bytes), measured in one process, spread over the CPUs the "
                "parent and its workers can use at once (shmipc/bench/pools.py)"]
               if any(r.get("reference") for r in report["records"] if r["workload"] == "pool") else []), ""]
    ray_line = ray_init_line(report)
    for key, rows in _groups(report["records"]):
        if key[0] == "ray" and ray_line:
            lines.append(ray_line)          # once, before the first Ray table
            ray_line = None
        lines.append(_title(key, report["options"], rows))
        reasons = {r.get("reason", "") for r in rows}
        if all(r["status"] == "skipped" for r in rows) and len(reasons) == 1:
            lines += [f"  skipped: {reasons.pop()}", ""]        # one line, not one per transport
            continue
        head, body = _table_rows(key, rows)
        lines.extend(_render(head, body))
        lines.append("")
    lines.extend(_summary(report))
    return "\n".join(lines)


def ray_init_line(report: dict) -> str | None:
    """Ray's start-up (not counted in any row), or None when Ray did not run."""
    r = next((r for r in report["records"] if r["workload"] == "ray" and r.get("ray_init_s") is not None),
             None)
    if r is None:
        return None
    return (f"ray_init_s: {r['ray_init_s']:.1f} s  (Ray {r.get('ray_version')}: ray.init(num_cpus=2, "
            "include_dashboard=False), not counted in the rows below)")


def _summary(report: dict) -> list[str]:
    """One line per workload: best shmipc against best peer (or, when only one
    side was measured, that side's best figure)."""
    out = ["Summary (best shmipc figure / best peer figure, same run):"]
    for key, rows in _groups(report["records"]):
        what = _size(key[1]) if key[0] == "throughput" else (key[1] if key[0] in _BY_KIND else "")
        label = f"{key[0] + ' ' + what:<25}"
        measured = [r for r in rows if _metric(r) is not None]
        mine = [r for r in measured if r["shmipc"]]
        peers = [r for r in measured if not r["shmipc"] and not r.get("reference")]
        if mine and peers:
            best = max(mine, key=_metric)
            peer = max(peers, key=_metric)
            paired = _paired(best, peer) if key[0] == "pool" else None
            out.append(f"  {label} {_ratio(_metric(best), _metric(peer)):>7} vs {peer['transport']}"
                       f"  ({best['transport']} {_figure(best)}, {peer['transport']} {_figure(peer)})"
                       + (f"; {_ratio(paired[0], 1.0)}, median of {paired[1]} rounds run side by side"
                          if paired else ""))
        elif measured:
            one = max(measured, key=_metric)
            out.append(f"  {label} {one['transport']} {_figure(one)}  (no "
                       f"{'peer' if one['shmipc'] else 'shmipc transport'} measured to compare with)")
        elif not all(r["status"] == "skipped" for r in rows):        # skips: one line below
            out.append(f"  {label} nothing measured (see above)")
    bad = [r for r in report["records"] if r["status"] in ("error", "timeout")]
    # one line per reason: "numpy is not installed" once, not once per transport
    by_reason: dict[str, list[str]] = {}
    for r in report["records"]:
        if r["status"] == "skipped" and r["transport"] not in by_reason.setdefault(r["reason"], []):
            by_reason[r["reason"]].append(r["transport"])
    for why, names in by_reason.items():
        whole = {r["workload"] for r in report["records"] if r["status"] == "skipped" and r["reason"] == why}
        ran = {r["workload"] for r in report["records"] if r["status"] != "skipped"}
        if why.startswith("numpy is not installed") and not whole & ran:
            out.append(f"Skipped: the {', '.join(sorted(whole))} workload: {why}")
        else:
            out.append(f"Skipped: {', '.join(names)}: {why}")
    for r in bad:
        out.append(f"FAILED {r['workload']} {r['transport']} size={r['size']}: {r['status']}: {r['reason']}")
        # the end of the measurement's own output: for a hang, where it hung
        out.extend("    | " + line for line in (r.get("log") or "").splitlines()[-12:])
    out.extend(run_warnings(report))
    out.append(f"Total time: {report.get('elapsed_s', 0):.0f} s")
    return out


def markdown_tables(report: dict) -> str:
    """The same tables in Markdown (for the README)."""
    out = []
    ray_line = ray_init_line(report)
    for key, rows in _groups(report["records"]):
        if key[0] == "ray" and ray_line:
            out.append(f"{ray_line}\n")
            ray_line = None
        head, body = _table_rows(key, rows)
        head = [h for h in head if h] or head
        out.append(f"**{_title(key, report['options'], rows)}**\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        for r in body:
            r = r + [""] * (len(head) - len(r))
            out.append("| " + " | ".join(r[:len(head)]) + " |")
        out.append("")
    return "\n".join(out)


def markdown_summary(report: dict) -> str:
    """One Markdown matrix: a row per transport, a column per workload (its
    headline figure), then the pools; for the README."""
    cols: list[tuple[tuple, str]] = []
    cells: dict[str, dict[tuple, str]] = {}
    order: list[str] = []
    pools = []
    for key, rows in _groups(report["records"]):
        workload, what = key
        if workload == "pool":
            pools.append((key, rows))
            continue
        if workload == "ray":           # its own tables (markdown_tables), not a column of this matrix
            continue
        if workload == "throughput":
            label = f"{_size(what)} msgs/s" if what < 4096 else f"{_size(what)} MB/s"
        elif workload == "pingpong":
            label = "64 B round trip, median us"
        else:
            label = "numpy 1 MiB MB/s"
        cols.append((key, label))
        for r in rows:
            if r["transport"] not in order:
                order.append(r["transport"])
            b = r.get("best") or {}
            if r["status"] != "ok" or not b:
                text = r["status"]
            elif workload == "pingpong":
                text = f"{b['median_us']:.1f}"
            elif workload == "throughput" and what < 4096:
                text = _human(b["msgs_per_s"])
            else:
                text = _mb(b["mb_per_s"])
            cells.setdefault(r["transport"], {})[key] = f"**{text}**" if r["shmipc"] else text
    out = ["| transport | " + " | ".join(label for _, label in cols) + " |",
           "|---|" + "---:|" * len(cols)]
    from shmipc.bench.transports import TRANSPORTS

    known = [t.name for t in TRANSPORTS]
    order.sort(key=lambda n: known.index(n) if n in known else len(known))
    for name in order:
        out.append(f"| {name} | " + " | ".join(cells.get(name, {}).get(key, "") for key, _ in cols) + " |")
    if pools:
        out += ["", "| pool workload | shmipc | standard library | shmipc x | floor x |",
                "|---|---:|---:|---:|---:|"]
        for key, rows in pools:
            mine = [r for r in rows if r["shmipc"] and _metric(r)]
            theirs = [r for r in rows if not r["shmipc"] and not r.get("reference") and _metric(r)]
            floor = next((r for r in rows if r.get("reference") and _metric(r)), None)
            if not mine or not theirs:
                continue
            title = rows[0].get("title") or key[1]
            a, b = mine[0], max(theirs, key=_metric)       # the strongest baseline (a tuned one)
            # floor x: the machine's floor over that baseline, the best any pool could do
            out.append(f"| {title} | {_human(a['best']['items_per_s'])} items/s | "
                       f"{_human(b['best']['items_per_s'])} items/s ({b['transport']}) | "
                       f"{_ratio(_metric(a), _metric(b))} | "
                       f"{_ratio(_metric(floor), _metric(b)) if floor else ''} |")
    return "\n".join(out) + "\n"


def _find(report: dict, workload: str, transport: str, size: int | None = None) -> dict | None:
    for r in report["records"]:
        if (r["workload"] == workload and r["transport"] == transport and r["status"] == "ok"
                and (size is None or r["size"] == size) and r.get("best")):
            return r
    return None


def _round_rate(x: dict) -> float | None:
    """A round's rate: messages (throughput) or items (pools) a second."""
    return x.get("msgs_per_s") or x.get("items_per_s")


def _round_ratios(a: dict, b: dict) -> list[float]:
    """Row `a`'s rate over row `b`'s, round by round (rounds with no rate
    left out). Throughput rows of one size, and the pools of one table, take
    turns round by round: round k of each ran side by side."""
    out = []
    for x, y in zip(a.get("rounds") or [], b.get("rounds") or []):
        rx, ry = _round_rate(x), _round_rate(y)
        if rx and ry:
            out.append(rx / ry)
    return out


def paired_ratio(a: dict, b: dict) -> float | None:
    """The median over rounds of row `a`'s rate over row `b`'s in the same
    round (throughput rows of one size take turns round by round, so round
    k of each ran side by side: on a noisy machine a steadier ratio than
    best against best, whose two rounds may lie a minute apart). None if
    the two have no round in common."""
    q = _round_ratios(a, b)
    return statistics.median(q) if q else None


def _paired(a: dict, b: dict) -> tuple[float, int] | None:
    """(paired_ratio, how many rounds), or None with fewer than two rounds
    in common (one round: it is the best-against-best figure)."""
    q = _round_ratios(a, b)
    return (statistics.median(q), len(q)) if len(q) >= 2 else None


def _paired_note(a: dict, b: dict, percent: bool = True, times: bool = False) -> str:
    """"; <ratio> as the median of the N rounds run side by side" (see
    paired_ratio), to follow a best-against-best figure; "" with fewer than two rounds.
    The ratio as a percentage, a plain number, or (`times`) as "1.5x"."""
    paired = _paired(a, b)
    if paired is None:
        return ""
    median, n = paired
    text = _ratio(median, 1.0) if times else f"{median:.0%}" if percent else f"{median:.2f}"
    return f"; {text} as the median of the {n} rounds run side by side"


def prose(report: dict) -> list[str]:
    """The README's sentences about this run, each made from its figures
    (never copied by hand): shmipc's main rows against their tuned peers."""
    out = []

    def tp(transport: str, size: int) -> dict | None:
        return _find(report, "throughput", transport, size)

    for size in (64, 1 << 20):
        pairs = ([("shmipc.ring", "os.pipe", "`Ring.put`/`get`", "`os.pipe` with length framing"),
                  ("shmipc.ring+batch", "os.pipe+batch", "`put_many`/`get_many`",
                   "a pipe writing each batch with one `write()`")] if size < 4096 else
                 [("shmipc.ring+view", "os.pipe+readinto", "`put` and a zero-copy `get_view`",
                   "a pipe read with `readinto` into a preallocated buffer"),
                  ("shmipc.ring", "os.pipe", "`Ring.put`/`get`", "`os.pipe` read into new bytes")])
        for mine, peer, how, theirs in pairs:
            a, b = tp(mine, size), tp(peer, size)
            if a and b:
                unit = (f"{_human(a['best']['msgs_per_s'])} msgs/s" if size < 4096
                        else f"{_mb(a['best']['mb_per_s'])} MB/s")
                out.append(f"{_size(size)} messages, {how}: {unit}, {_ratio(_metric(a), _metric(b))} "
                           f"{theirs}.")
        floor = tp("memcpy", size)
        best = max((r for r in report["records"] if r["workload"] == "throughput" and r["size"] == size
                    and r["shmipc"] and _metric(r)), key=_metric, default=None)
        c_ring, plain = tp("c-ring", size), tp("shmipc.ring+view" if size >= 4096 else "shmipc.ring", size)
        if c_ring and plain:
            out.append(f"{_size(size)} messages, `{plain['transport']}` reached "
                       f"{_metric(plain) / _metric(c_ring):.0%} of a C ring of the same design "
                       f"(`shmipc/bench/c_ring.c`: no Python, no encoding), best round against best round"
                       f"{_paired_note(plain, c_ring)}.")
        if floor and best and size >= 4096:
            out.append(f"{_size(size)} messages, the best shmipc row ({best['transport']}) reached "
                       f"{_metric(best) / _metric(floor):.0%} of what one process copying each message "
                       f"once (`memcpy`) does.")
    for size in sorted({r["size"] for r in report["records"] if r["workload"] == "throughput"}):
        batch, single = tp("shmipc.ring+batch", size), tp("shmipc.ring", size)
        if batch and single and size >= 64 << 10:
            # (messages this large are taken one a call: there is nothing to batch)
            out.append(f"{_size(size)} messages, `put_many`/`get_many` against `put`/`get`: "
                       f"{_metric(batch) / _metric(single):.2f} best against best"
                       f"{_paired_note(batch, single, percent=False)}.")
    a, b = _find(report, "pingpong", "shmipc.ring"), _find(report, "pingpong", "os.pipe")
    if a and b:
        out.append(f"A 64 B round trip: {a['best']['median_us']:.2f} us median against "
                   f"{b['best']['median_us']:.1f} us for `os.pipe` ({_ratio(_metric(a), _metric(b))}).")
    a, b = _find(report, "throughput", "shmipc.Queue", 64), _find(report, "throughput", "mp.Queue", 64)
    if a and b:
        out.append(f"`shmipc.Queue` moved 64 B messages {_ratio(_metric(a), _metric(b))} as fast as "
                   f"`multiprocessing.Queue`.")
    # (in the order the pool workload ran them: shmipc/bench/pools.py's COMPARISONS)
    for kind in dict.fromkeys(r.get("pool_kind") for r in report["records"] if r["workload"] == "pool"):
        rows = [r for r in report["records"] if r["workload"] == "pool" and r.get("pool_kind") == kind
                and _metric(r)]
        mine = next((r for r in rows if r["shmipc"]), None)
        peers = [r for r in rows if not r["shmipc"] and not r.get("reference")]
        floor = next((r for r in rows if r.get("reference")), None)
        for theirs in peers:            # every baseline, the default and the tuned one
            how = f" with chunksize={theirs['chunksize']}" if theirs.get("chunksize") else ""
            if mine:
                # (best against best, then round by round: on a busy machine the best
                # rounds of two rows are often minutes of luck apart)
                out.append(f"`{mine.get('title', kind)}`: {_ratio(_metric(mine), _metric(theirs))} "
                           f"`{theirs['transport']}`{how}{_paired_note(mine, theirs, times=True)}.")
        if mine and floor and peers:
            strongest = max(peers, key=_metric)
            out.append(f"`{mine.get('title', kind)}`: {_metric(mine) / _metric(floor):.0%} of the machine's "
                       f"floor for that map (the CPU any pool must spend on it, spread over the CPUs); no pool "
                       f"could beat `{strongest['transport']}` by more than "
                       f"{_ratio(_metric(floor), _metric(strongest))} in this run.")
    return out


def readme_section(report: dict, command: str) -> str:
    """The README's performance section, from this run alone: the machine,
    how it was measured, generated sentences, the summary matrix, the chart
    (docs/bench.png) and the command that regenerated it."""
    m = report["machine"]
    o = report["options"]
    v = m.get("versions", {})
    peers = ", ".join(f"{k} {x}" for k, x in v.items() if x and k in ("numpy", "pyzmq", "faster-fifo"))
    rounds = o.get("repeat", 1)
    lines = [
        "## Performance", "",
        f"Measured by `shmipc bench` on {m['date']}: {m['cpu']}, {m['cores']} cores, {m['python']}, "
        f"Linux{'; ' + peers if peers else ''}. Each figure is the best of {rounds} round"
        f"{'s' if rounds != 1 else ''} of {o.get('seconds_per_round', 0):g} s, parent -> forked child, "
        "each round in a fresh process, the rows of one size taking turns round by round (so rows "
        "compared with each other ran under the same load); every receiver checks every message it gets (count and "
        "content). The pipe baselines are tuned as a careful user would: a kernel buffer as large as "
        "shmipc's ring (`F_SETPIPE_SZ`, up to `/proc/sys/fs/pipe-max-size`), buffered reads, one "
        "`write()` per batch for the batched row, `readinto` a preallocated buffer for large messages. "
        "The pools get the same list inputs on both sides and every result is checked in order. "
        f"Load average {m.get('load_before')} before, {m.get('load_after')} after."
        + (f" Busy run: {busy}." if (busy := _busy_phrase(report)) else ""),
    ]
    for warning in run_warnings(report):
        lines += ["", f"**{warning}**"]
    sentences = prose(report)
    if sentences:
        lines += ["", "In this run (sentences generated from the figures below):", ""]
        lines += [f"* {s}" for s in sentences]
    lines += ["", "**Bold**: shmipc. The full tables, with ratios to every peer, are in "
              "[docs/bench.md](docs/bench.md), every round's raw figures in [docs/bench.json](docs/bench.json).",
              "", markdown_summary(report).rstrip(), "",
              "![throughput against message size, log scales](docs/bench.png)", "",
              "This section is written by the run itself; regenerate it (and docs/bench.*) with "
              "`make readme-bench`, which runs:", "", "```sh", command, "```"]
    return "\n".join(lines) + "\n"


README_START = "<!-- perf:start -->"
README_END = "<!-- perf:end -->"


def rewrite_marked_section(path: str, start_marker: str, end_marker: str, section: str) -> None:
    """Replace the text of the file at `path` from `start_marker` to
    `end_marker` (both included) with `section`, which carries them again;
    written aside, then renamed over the file. The README's generated
    sections (performance, CPython's tests, joblib) all go through here.

    Raises:
        ValueError: the markers are missing (nothing is written then).
    """
    with open(path) as f:
        text = f.read()
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{path} has no {start_marker} ... {end_marker} section to rewrite")
    text = text[:start] + section + text[end + len(end_marker):]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def rewrite_marked_section_or_exit(path: str, start_marker: str, end_marker: str, section: str) -> None:
    """:func:`rewrite_marked_section` for the command-line tools that write
    a README section (`section` carries the markers; trailing newlines are
    dropped). A file without the markers (a README edited by hand) ends the
    program with the reason.

    Raises:
        SystemExit: the markers are missing (nothing is written then).
    """
    try:
        rewrite_marked_section(path, start_marker, end_marker, section.rstrip("\n"))
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


def update_readme(path: str, section: str) -> None:
    """Replace the text between the perf markers of the README at `path`.

    Raises:
        ValueError: the markers are missing (nothing is written then).
    """
    rewrite_marked_section(path, README_START, README_END, README_START + "\n" + section + README_END)


def write_json(report: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")


def plot(report: dict, path: str) -> None:
    """Throughput (MB/s and msgs/s) against message size, log scales, one line
    per transport.

    Raises:
        ImportError: matplotlib is not installed (named in the message).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install matplotlib (or shmipc[bench])") from None
    series: dict[str, list[tuple[int, float, float]]] = {}
    mine: dict[str, bool] = {}
    floors: set[str] = set()           # the machine's floors (c-ring, memcpy): drawn apart
    for r in report["records"]:
        if r["workload"] != "throughput" or r["status"] != "ok":
            continue
        b = r["best"]
        series.setdefault(r["transport"], []).append((r["size"], b["mb_per_s"], b["msgs_per_s"]))
        mine[r["transport"]] = r["shmipc"]
        if r.get("reference"):
            floors.add(r["transport"])
    if not series:
        raise ValueError("no throughput figures to plot (was the throughput workload run?)")
    from shmipc.bench.transports import TRANSPORTS

    order = [t.name for t in TRANSPORTS]
    palette = list(plt.get_cmap("tab10").colors) + list(plt.get_cmap("Dark2").colors)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for name in sorted(series, key=lambda n: order.index(n) if n in order else len(order)):
        points = sorted(series[name])
        xs = [p[0] for p in points]
        color = palette[(order.index(name) if name in order else len(order)) % len(palette)]
        if name in floors:
            style = dict(linewidth=1.6, marker="^", linestyle=":", color="black" if name == "c-ring" else "gray")
        elif mine[name]:
            style = dict(linewidth=2.4, marker="o", color=color)
        else:
            style = dict(linewidth=1.3, marker="s", linestyle="--", color=color)
        label = f"{name} (machine limit)" if name in floors else name
        axes[0].plot(xs, [p[1] for p in points], label=label, **style)
        axes[1].plot(xs, [p[2] for p in points], label=label, **style)
    for ax, ylabel in zip(axes, ("MB/s (higher is better)", "messages/s (higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("message size (bytes)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    sizes = sorted({p[0] for pts in series.values() for p in pts})
    for ax in axes:
        ax.set_xticks(sizes)
        ax.set_xticklabels([_size(s) for s in sizes])
    axes[1].legend(fontsize=8, loc="best")
    m = report["machine"]
    fig.suptitle(f"shmipc bench, parent -> forked child — {m['cpu']}, {m['cores']} cores, "
                 f"{m['python']}, {m['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_records(records: Iterable[dict], file: Any = None) -> None:
    """One line per record as it completes (for --verbose)."""
    out = file or sys.stderr
    for r in records:
        out.write(json.dumps({k: r[k] for k in ("workload", "transport", "size", "status", "best")}) + "\n")
