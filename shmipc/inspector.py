"""`shmipc inspect PID`: a process's shared mappings and its shmipc rings, live.

The mappings come from ``/proc/PID/maps`` as the kernel reports them. For each
shared mapping that holds an shmipc arena (an anonymous arena shows as
``/memfd:shmipc (deleted)``, a named one as ``/dev/shm/NAME``) the arena is
mapped into this process through ``/proc/PID/map_files/START-END`` (or the
matching ``/proc/PID/fd/N``, or the file itself) and each ring region is
attached to read its live counters (``Ring.stats()``).

Nothing is written to the inspected process's memory: a mapping is only
opened as an arena after its first 8 bytes were read and found to be the
arena magic (``Arena.from_file`` would otherwise format an all-zero file),
and attaching a ring only reads its header.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Mapping", "read_maps", "inspect_process", "format_inspection", "run_inspect", "InspectError"]


class InspectError(Exception):
    """The process cannot be inspected (missing, or not permitted)."""


@dataclass
class Mapping:
    """One line of /proc/PID/maps."""

    start: int
    end: int
    perms: str
    offset: int
    dev: str
    inode: int
    path: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def shared(self) -> bool:
        return self.perms[3:4] == "s"

    @property
    def backing(self) -> str:
        return self.path or "[anonymous]"


def _parse_maps_line(line: str) -> Mapping | None:
    parts = line.split(None, 5)
    if len(parts) < 5:
        return None
    start, _, end = parts[0].partition("-")
    try:
        return Mapping(int(start, 16), int(end, 16), parts[1], int(parts[2], 16), parts[3],
                       int(parts[4]), parts[5].strip() if len(parts) > 5 else "")
    except ValueError:
        return None


def read_maps(pid: int) -> list[Mapping]:
    """The mappings of `pid`.

    Raises:
        InspectError: no such process, or no permission to read its maps.
    """
    if pid <= 0:
        raise InspectError(f"invalid pid {pid}: must be a positive process id")
    path = f"/proc/{pid}/maps"
    try:
        # file names are bytes, not always UTF-8: decoded as os.fsdecode
        # does, so they still compare equal to os.readlink's
        with open(path, errors="surrogateescape") as f:
            text = f.read()
    except FileNotFoundError:
        raise InspectError(f"no process with pid {pid} (no {path})") from None
    except PermissionError:
        hint = "" if os.geteuid() == 0 else " (or run as root)"
        raise InspectError(f"no permission to read {path}: inspect a process of your own user"
                           f"{hint}") from None
    except ProcessLookupError:
        raise InspectError(f"process {pid} exited") from None
    if not text and not os.path.exists(f"/proc/{pid}"):
        raise InspectError(f"process {pid} exited")
    return [m for m in map(_parse_maps_line, text.splitlines()) if m is not None]


def read_resident(pid: int) -> dict[int, int]:
    """Resident bytes (Rss) of each mapping of `pid`, by start address, from
    /proc/PID/smaps; empty if it cannot be read."""
    out: dict[int, int] = {}
    try:
        with open(f"/proc/{pid}/smaps", errors="surrogateescape") as f:
            start = None
            for line in f:
                if line.startswith("Rss:"):
                    if start is not None:
                        out[start] = int(line.split()[1]) * 1024
                elif "-" in line.split(None, 1)[0] and not line.split(None, 1)[0].endswith(":"):
                    head = line.split(None, 1)[0]
                    try:
                        start = int(head.split("-", 1)[0], 16)
                    except ValueError:
                        start = None
    except (OSError, ValueError, IndexError):
        return {}
    return out


def guess_owner(regions: list[dict[str, Any]]) -> str:
    """Which shmipc API made an arena, judged from its region names (arenas
    do not record their maker); says so when it cannot tell."""
    names = {r["name"] for r in regions}
    rings = {r["name"] for r in regions if r["kind"] == "ring"}
    if {"results", "slots"} <= names and any(n.startswith("tasks") and n[5:].isdigit() for n in names):
        return "a Pool or ProcessPoolExecutor (judged from its region names)"
    if names == {"bigtasks", "bigresults"}:     # mapped only while large messages move (shmipc._footprint)
        return "the big-message rings of a Pool or ProcessPoolExecutor (judged from its region names)"
    if any(n.startswith("pipeline.") for n in names):
        return "a Pipeline (judged from its region names)"
    if "a>b" in rings and rings <= {"a>b", "b>a"}:
        return "a Pipe (judged from its region names)"
    if "#0" in rings and rings <= {"#0", "bulk"} and names - rings <= {"tasks_done", "bulk_lost"}:
        what = "a JoinableQueue" if "tasks_done" in names else "a Queue or SimpleQueue"
        return f"{what} (judged from its region names)"
    return "not known (an arena of your own, or one whose maker cannot be told from its region names)"


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = " ".join(f.read().replace(b"\0", b" ").decode(errors="replace").split())
        if cmd:
            return cmd if len(cmd) <= 100 else cmd[:97] + "..."
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _candidate_paths(pid: int, m: Mapping) -> list[str]:
    """Paths that open the file behind mapping `m`, best first."""
    paths = [f"/proc/{pid}/map_files/{m.start:x}-{m.end:x}"]
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        fds = []
    for fd in fds:
        link = f"/proc/{pid}/fd/{fd}"
        try:
            st = os.stat(link)
        except OSError:
            continue
        if st.st_ino == m.inode and os.readlink(link) == m.path:
            paths.append(link)
    if m.path.startswith("/") and not m.path.endswith(" (deleted)"):
        paths.append(m.path)
    return paths


def _open_arena(pid: int, m: Mapping) -> tuple[Any, str]:
    """Map the arena behind `m` into this process: (Arena, path used).

    Raises:
        InspectError: it cannot be opened, or it is not an arena.
    """
    from shmipc.arena import MAGIC, Arena

    errors = []
    for path in _candidate_paths(pid, m):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror}")
            continue
        try:
            head = os.pread(fd, 8, 0)
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror}")
            continue
        finally:
            os.close(fd)
        if head != MAGIC:
            raise InspectError("not an shmipc arena (no arena magic at offset 0)")
        try:
            # /proc's map_files and fd entries are symbolic links by nature
            return Arena.from_file(path, follow_symlinks=True), path
        except Exception as exc:       # CorruptArena, PermissionError, ...
            errors.append(f"{path}: {type(exc).__name__}: {exc}")
    raise InspectError("cannot open it: " + "; ".join(errors))


def _allocated(path: str) -> int | None:
    """Bytes of memory the shared file really holds (tmpfs pages written by
    any process), or None if it cannot be told."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def _looks_like_arena(m: Mapping) -> bool:
    """Shared and file-backed (memfd, /dev/shm, a file): worth reading 8 bytes of."""
    return m.shared and m.offset == 0 and m.inode != 0 and not m.path.startswith("[") and bool(m.path)


def inspect_process(pid: int, show_all: bool = False) -> dict[str, Any]:
    """Everything `shmipc inspect` shows, as JSON-ready data.

    Raises:
        InspectError: no such process, or no permission.
    """
    maps = read_maps(pid)
    resident = read_resident(pid)
    shown = maps if show_all else [m for m in maps if m.shared]
    arenas = []
    seen: set[tuple[str, int]] = set()
    for m in maps:
        if not _looks_like_arena(m) or (m.dev, m.inode) in seen:
            continue
        seen.add((m.dev, m.inode))
        entry: dict[str, Any] = {"mapping": f"{m.start:x}-{m.end:x}", "backing": m.backing, "regions": []}
        try:
            arena, via = _open_arena(pid, m)
        except InspectError as exc:
            if "not an shmipc arena" in str(exc) and not m.path.startswith("/memfd:shmipc"):
                continue                   # some other shared file: not ours, not listed
            entry["error"] = str(exc)
            arenas.append(entry)
            continue
        try:
            entry.update(via=via, size=arena.size, resident=resident.get(m.start), allocated=_allocated(via))
            used = arena.info()["used"]                # the header, read-only
            for region in arena.regions():
                info: dict[str, Any] = {"name": region.name, "kind": region.kind,
                                        "offset": region.offset, "size": region.size}
                if region.kind == "ring":
                    try:
                        ring = arena.ring(name=region.name)
                        try:
                            info["stats"] = ring.stats(recover=False)
                        finally:
                            ring.close()
                    except Exception as exc:
                        info["error"] = f"{type(exc).__name__}: {exc}"
                entry["regions"].append(info)
            entry["used"] = used
            entry["owner"] = guess_owner(entry["regions"])
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            arena.close()
        arenas.append(entry)
    return {
        "pid": pid,
        "process": _process_name(pid),
        "time": time.time(),
        "mappings": [dict(asdict(m), size=m.size, shared=m.shared, resident=resident.get(m.start))
                     for m in shown],
        "arenas": arenas,
    }


# ---------------------------------------------------------------- text
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def shown(text: str) -> str:
    """`text` made safe to print to a terminal: each character that is not
    printable (control characters such as ESC, BEL and newline, bidi
    overrides, bytes that are not UTF-8) becomes an escape (``\\n``,
    ``\\x1b``, ``\\u202e``); printable text, spaces and backslashes
    included, is unchanged. Region names come from shared memory, which any
    process that can write the arena can forge; mapping paths and command
    lines come from the file system and the inspected process.
    """
    if text.isprintable():
        return text
    out = []
    for c in text:
        code = ord(c)
        if c.isprintable():
            out.append(c)
        elif c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif 0xDC80 <= code <= 0xDCFF:        # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def _shown_all(value: Any) -> Any:
    """`value` (inspect_process's data) with every string in it passed
    through :func:`shown`: every field, so a new one is safe too."""
    if isinstance(value, str):
        return shown(value)
    if isinstance(value, dict):
        return {k: _shown_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shown_all(v) for v in value]
    return value


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _table(head: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    """Align columns: text in the first and last column left, figures right."""
    widths = [max([len(head[i])] + [len(r[i]) for r in rows]) for i in range(len(head))]
    last = len(head) - 1

    def fmt(row: list[str]) -> str:
        cells = [c.ljust(w) if i in (0, last) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return (indent + "  ".join(cells)).rstrip()

    return [fmt(head)] + [fmt(r) for r in rows]


def format_inspection(data: dict[str, Any], previous: dict[str, Any] | None = None) -> str:
    """The text `shmipc inspect` prints; with `previous` (the last refresh of
    --watch) message rates are shown too. Every string is shown escaped
    (see :func:`shown`); the JSON output needs no such step (json.dumps
    escapes every control and non-ASCII character)."""
    data = _shown_all(data)
    previous = _shown_all(previous) if previous else None
    lines = [f"process {data['pid']}: {data['process']}"]
    maps = data["mappings"]
    lines.append(f"{len(maps)} {'shared ' if all(m['shared'] for m in maps) else ''}mapping"
                 f"{'s' if len(maps) != 1 else ''} (from /proc/{data['pid']}/maps)")
    if maps:
        lines += _table(["address", "perms", "virtual", "resident", "backing"],
                        [[f"{m['start']:x}-{m['end']:x}", m["perms"], _bytes(m["size"]),
                          "?" if m.get("resident") is None else _bytes(m["resident"]),
                          m["path"] or "[anonymous]"] for m in maps])
    arenas = data["arenas"]
    if not arenas:
        lines.append("no shmipc arena mapped")
    dt = data["time"] - previous["time"] if previous else 0.0
    before: dict[tuple[str, str], dict] = {}
    if previous:
        for a in previous["arenas"]:
            for r in a.get("regions", []):
                if "stats" in r:
                    before[(a["backing"], r["name"])] = r["stats"]
    for a in arenas:
        lines.append("")
        if "error" in a and not a.get("regions"):
            lines.append(f"arena {a['backing']} at {a['mapping']}: {a['error']}")
            continue
        memory = [f"{_bytes(a['size'])} of address space"]
        if a.get("resident") is not None:
            memory.append(f"{_bytes(a['resident'])} resident in this process")
        if a.get("allocated") is not None:
            memory.append(f"{_bytes(a['allocated'])} of memory in use by all processes")
        lines.append(f"arena {a['backing']} at {a['mapping']} (opened via {a['via']})")
        lines.append(f"  made by: {a.get('owner', 'not known')}")
        lines.append(f"  memory: {', '.join(memory)}; regions handed out up to {_bytes(a.get('used', 0))}, "
                     f"{len(a['regions'])} region{'s' if len(a['regions']) != 1 else ''}")
        blocks = [r for r in a["regions"] if r["kind"] != "ring"]
        rings = [r for r in a["regions"] if r["kind"] == "ring"]
        if rings:
            head = ["ring", "capacity", "P/C", "msgs in", "msgs out", "depth", "used", "high water",
                    "waiting P/C", "blocked s P/C", "recov", "lost", "state"]
            if previous:
                head.insert(5, "out/s")
            rows = []
            for r in rings:
                s = r.get("stats")
                if s is None:
                    rows.append([r["name"], _bytes(r["size"]), "", "", "", "", "", "", "", "", "", "",
                                 "error: " + r.get("error", "?")] + ([""] if previous else []))
                    continue
                row = [r["name"], _bytes(s["capacity"]), f"{s['producers']}/{s['consumers']}",
                       f"{s['messages_in']:,}", f"{s['messages_out']:,}", f"{s['qsize']:,}",
                       # the ring samples its high water mark once per lap: never show
                       # it below what is in use right now
                       _bytes(s["bytes_used"]), _bytes(max(s["high_water"], s["bytes_used"])),
                       f"{s['producers_waiting']}/{s['consumers_waiting']}",
                       f"{s['producer_blocked_s']:.1f}/{s['consumer_blocked_s']:.1f}",
                       str(s["recoveries"]), str(s["lost"]), "shut down" if s["shutdown"] else "open"]
                if previous:
                    old = before.get((a["backing"], r["name"]))
                    rate = (s["messages_out"] - old["messages_out"]) / dt if old and dt > 0 else 0.0
                    row.insert(5, f"{rate:,.0f}")
                rows.append(row)
            lines += _table(head, rows)
        if blocks:
            lines.append("  blocks: " + ", ".join(f"{b['name']} ({_bytes(b['size'])})" for b in blocks))
        if "error" in a:
            lines.append(f"  error: {a['error']}")
    return "\n".join(lines)


MAX_INTERVAL = 86400.0          # --watch refresh period, seconds
PID_LIMIT = 1 << 22             # the kernel's PID_MAX_LIMIT: pid_max is at most this, every pid below it


def run_inspect(pid: int, watch: bool = False, interval: float = 1.0, show_all: bool = False,
                as_json: bool = False, out: Any = None) -> int:
    """The `shmipc inspect` command; returns the exit status (1: no such
    process, or it cannot be read; 2: an invalid pid or interval)."""
    out = out or sys.stdout
    if not 0 < pid < PID_LIMIT:   # a bad argument, like a pid that is not a number (argparse: 2)
        # (the hard limit, not /proc/sys/kernel/pid_max: lowering it leaves
        # the processes with larger pids running)
        print(f"shmipc inspect: error: invalid pid {pid}: a process id is between 1 and {PID_LIMIT - 1}",
              file=sys.stderr)
        return 2
    if not 0 < interval <= MAX_INTERVAL:           # (nan, inf: time.sleep refuses them)
        print(f"shmipc inspect: error: --interval must be > 0 and at most {MAX_INTERVAL:g} s, got {interval}",
              file=sys.stderr)
        return 2
    try:
        data = inspect_process(pid, show_all)
    except InspectError as exc:
        print(f"shmipc inspect: error: {exc}", file=sys.stderr)
        return 1
    previous = None
    clear = watch and out.isatty()
    try:
        while True:
            if as_json:
                out.write(json.dumps(data) + "\n")
            else:
                if clear:
                    out.write("\x1b[H\x1b[2J")
                out.write(format_inspection(data, previous) + "\n")
                if watch:
                    out.write(f"-- {time.strftime('%H:%M:%S')}, every {interval:g} s, Ctrl-C to stop\n")
                    if not clear:
                        out.write("\n")
            out.flush()
            if not watch:
                return 0
            time.sleep(interval)
            previous = data
            try:
                data = inspect_process(pid, show_all)
            except InspectError as exc:
                out.write(f"{exc}: stopped watching\n")
                return 0
    except KeyboardInterrupt:
        return 0
