"""The `shmipc` command (also ``python -m shmipc``).

    shmipc bench [--quick] [--sizes 64,1k,64k,1M] [--transports shmipc,os.pipe,...]
                 [--workloads throughput,pingpong,pool,numpy,ray] [--repeat N] [--pin same|split]
                 [--json FILE] [--plot FILE.png] [--markdown FILE] [--readme README.md]
    shmipc demo [--children N] [--messages M]
    shmipc inspect PID [--watch] [--interval S]
    shmipc --version

Exit status: 0 on success, 1 when a measurement failed or timed out (or
the demo saw a wrong message, or the process to inspect does not exist or
cannot be read), 2 for bad arguments (an invalid pid included: outside
1..4194303), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from typing import Any, Callable, Sequence

__all__ = ["main", "build_parser"]

QUICK_SECONDS = 0.1
DEFAULT_SECONDS = 0.2
DEFAULT_REPEAT = 3
README_MAX = 16 << 20           # bytes: a larger --readme is refused (it is read whole, and rewritten)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def version() -> str:
    """The installed distribution's version (the package's own when run from a checkout)."""
    try:
        from importlib import metadata

        return metadata.version("shmipc")
    except Exception:            # not installed as a distribution
        import shmipc

        return shmipc.__version__


def _kind(st: os.stat_result) -> str:
    """What a file that is not a regular file is, for an error message."""
    from shmipc._arena_files import file_type

    return f"a {file_type(st)}"


def check_output_path(path: str, option: str) -> None:
    """Fail before measuring if `path` cannot be written: it must be a
    regular file, or missing in a writable directory. A FIFO would block the
    write after the whole run (for ever if nothing reads it), and a device
    (/dev/null, a disk) is no place for a report.

    Raises:
        ValueError: naming the option, the path and why.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"{option} {path}: no such directory {folder}") from None
        if not os.access(folder, os.W_OK):
            raise ValueError(f"{option} {path}: not writable (directory {folder})") from None
        return
    except OSError as exc:              # a component that is a file, a loop of links, no permission
        raise ValueError(f"{option} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{option} {path}: is {_kind(st)}, not a regular file")
    if not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path}: not writable")


def read_readme(path: str) -> str:
    """The text of the README that --readme rewrites, read before measuring.

    It must be a regular file of at most README_MAX bytes: a FIFO is never
    opened (open() would wait for a writer), /dev/zero never read (it has no
    end).

    Raises:
        ValueError: naming --readme, the path and why.
    """
    too_large = f"--readme {path}: larger than {README_MAX >> 20} MiB, not a README"
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"--readme {path}: is {_kind(st)}, not a regular file")
        if st.st_size > README_MAX:
            raise ValueError(too_large)
        # O_NONBLOCK does nothing to a regular file; should a FIFO replace
        # this one after the stat, open() returns at once and fstat refuses it
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"--readme {path}: is {_kind(st)}, not a regular file")
            data = f.read(README_MAX + 1)          # (it may have grown since the stat)
    except OSError as exc:                  # missing, unreadable
        raise ValueError(f"--readme {path}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > README_MAX:
        raise ValueError(too_large)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--readme {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmipc", description="shmipc: shared-memory IPC between a parent and its forked workers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    b = sub.add_parser(
        "bench", help="compare shmipc with pipes and multiprocessing on this machine",
        description="Measure shmipc against os.pipe (tuned as a careful user would: a buffer as large "
                    "as the ring, one write() per batch, readinto a preallocated buffer), "
                    "multiprocessing (Pipe, Queue, SimpleQueue, Pool, ProcessPoolExecutor) and, when "
                    "installed, faster-fifo and pyzmq, each between a parent and a forked child, in "
                    "fresh processes, in the same run, beside a memcpy floor. Every receiver verifies "
                    "what it got; optional peers and numpy are skipped with a reason when missing. "
                    "Default run ~1 minute; --quick ~20 s.")
    b.add_argument("--quick", action="store_true", help="one short round per measurement (~20 s)")
    b.add_argument("--sizes", type=_csv, default=None, metavar="LIST",
                   help="message sizes for the throughput workload, e.g. 64,1k,64k,1M (default)")
    b.add_argument("--transports", type=_csv, default=None, metavar="LIST",
                   help="transport names or prefixes, e.g. shmipc,os.pipe,mp (default: all)")
    b.add_argument("--workloads", type=_csv, default=None, metavar="LIST",
                   help="throughput,pingpong,pool,numpy,ray (default: all but ray, which starts a local Ray: ~5-20 s)")
    b.add_argument("--repeat", type=int, default=None, metavar="N",
                   help=f"timed rounds per measurement; the best is reported (default {DEFAULT_REPEAT}, "
                        "1 with --quick)")
    b.add_argument("--seconds", type=float, default=None, metavar="S",
                   help=f"duration of one round (default {DEFAULT_SECONDS}, {QUICK_SECONDS} with --quick)")
    b.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="hard limit for one measurement; a transport that hangs is killed and reported")
    b.add_argument("--processes", type=int, default=2, metavar="N", help="Pool.map workers (default 2)")
    b.add_argument("--pin", choices=("same", "split"), default=None,
                   help="pin the two processes of each measurement to the same CPU (as a busy machine's "
                        "scheduler may place them) or to two different CPUs (default: the scheduler decides; "
                        "pools are never pinned)")
    b.add_argument("--busy", type=int, default=0, metavar="N",
                   help="run N CPU-bound loops (pinned one per CPU in turn) beside every measurement, as other "
                        "work on a busy machine would: --busy 2 on two cores keeps both busy (default 0)")
    b.add_argument("--json", metavar="FILE", help="write every figure (all rounds) as JSON")
    b.add_argument("--plot", metavar="FILE.png", help="draw throughput against message size (matplotlib)")
    b.add_argument("--markdown", metavar="FILE", help="write the tables as Markdown")
    b.add_argument("--readme", metavar="README.md",
                   help="rewrite the performance section of this README (between its perf markers) "
                        "from this run: figures and sentences are generated, never copied")
    b.add_argument("--list", action="store_true", help="list the transports and exit")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    d = sub.add_parser(
        "demo", help="the seed example at scale, narrated",
        description="The parent makes an anonymous shared arena, forks N children, and they "
                    "exchange typed messages through rings guarded by process-shared semaphores; "
                    "every message is verified and the rate is printed.")
    d.add_argument("--children", type=int, default=2, metavar="N", help="children to fork (default 2)")
    d.add_argument("--messages", type=int, default=200_000, metavar="M",
                   help="typed messages to send (default 200000)")
    d.add_argument("--quiet", action="store_true", help="only the summary lines")

    i = sub.add_parser(
        "inspect", help="show a process's shared mappings and its shmipc rings, live",
        description="List the shared mappings of process PID (from /proc/PID/maps) and, for each "
                    "shmipc arena among them, its regions and the live counters of its rings.")
    i.add_argument("pid", type=int, help="the process to inspect")
    i.add_argument("--watch", action="store_true", help="refresh until Ctrl-C")
    i.add_argument("--interval", type=float, default=1.0, metavar="S", help="--watch refresh period (default 1 s)")
    i.add_argument("--all", action="store_true", help="list every mapping, not only shared ones")
    i.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    return parser


def _bench(args: argparse.Namespace, argv: list[str]) -> int:
    from shmipc.bench import TRANSPORTS, WORKLOADS, Options, format_report, get_transports, parse_size, run
    from shmipc.bench import markdown_tables, plot, write_json
    from shmipc.bench.report import markdown_summary

    if args.list:
        for t in get_transports():
            why = t.unavailable()
            print(f"{t.name:<20} {t.note}" + (f"  [{why}]" if why else ""))
        return 0
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else DEFAULT_REPEAT)
    seconds = args.seconds if args.seconds is not None else (QUICK_SECONDS if args.quick else DEFAULT_SECONDS)
    try:
        # "--workloads ," gives an empty list: it ran nothing and exited 0
        # (and an empty --transports ran every transport)
        for option, given, known in (
                ("--sizes", args.sizes, "give message sizes such as 64,1k,64k,1M"),
                ("--transports", args.transports, "known: " + ", ".join(t.name for t in TRANSPORTS)),
                ("--workloads", args.workloads, "known: " + ", ".join(WORKLOADS))):
            if given is not None and not given:
                raise ValueError(f"{option} lists nothing; {known}")
        options = Options(repeat=repeat, seconds=seconds, timeout=args.timeout, processes=args.processes,
                          progress=not args.no_progress, pin=args.pin, busy=args.busy)
        if args.sizes is not None:
            options.sizes = [parse_size(s) for s in args.sizes]
        if args.transports is not None:
            options.transports = args.transports
            get_transports(args.transports)          # unknown names fail before anything runs
        if args.workloads is not None:
            options.workloads = args.workloads
        options.check()
        for option, path in (("--json", args.json), ("--markdown", args.markdown), ("--plot", args.plot),
                             ("--readme", args.readme)):
            if path:
                check_output_path(path, option)
        if args.readme:
            from shmipc.bench.report import README_END, README_START

            text = read_readme(args.readme)
            if README_START not in text or README_END not in text:
                raise ValueError(f"--readme {args.readme}: no {README_START} ... {README_END} section")
        if args.plot:
            import importlib.util

            if importlib.util.find_spec("matplotlib") is None:
                raise ValueError("--plot needs matplotlib (pip install matplotlib)")
    except ValueError as exc:
        print(f"shmipc bench: error: {exc}", file=sys.stderr)
        return 2
    try:
        report = run(options)
    except RuntimeError as exc:         # --busy loops that would not start
        print(f"shmipc bench: error: {exc}", file=sys.stderr)
        return 1
    print(format_report(report))
    unwritten = 0

    def output(option: str, path: str, write: Callable[[], Any], done: str,
               errors: tuple[type[Exception], ...] = (OSError,)) -> None:
        # a full disk or a vanished directory after the run: said, and the
        # other outputs are still written (the figures are printed above)
        nonlocal unwritten
        try:
            write()
        except errors as exc:
            unwritten += 1
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            print(f"shmipc bench: error: {option} {path}: could not write it ({why})", file=sys.stderr)
        else:
            print(done)             # (stdout failing is not this file's failure: see main)

    if args.json:
        output("--json", args.json, lambda: write_json(report, args.json), f"wrote {args.json}")
    if args.markdown:
        def write_markdown() -> None:
            with open(args.markdown, "w") as f:
                f.write(markdown_summary(report) + "\n" + markdown_tables(report))
        output("--markdown", args.markdown, write_markdown, f"wrote {args.markdown}")
    if args.plot:
        try:
            output("--plot", args.plot, lambda: plot(report, args.plot), f"wrote {args.plot}")
        except (ValueError, ImportError) as exc:     # no throughput figures; a broken matplotlib
            print(f"shmipc bench: no plot: {exc}", file=sys.stderr)
    if args.readme:
        from shmipc.bench.report import readme_section, update_readme

        import shlex

        command = ".venv/bin/shmipc " + " ".join(shlex.quote(a) for a in argv)
        output("--readme", args.readme, lambda: update_readme(args.readme, readme_section(report, command)),
               f"wrote the performance section of {args.readme}", (OSError, ValueError))  # (markers gone meanwhile)
    if unwritten:
        return 1
    failed = [r for r in report["records"] if r["status"] in ("error", "timeout")]
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `shmipc` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "bench":
            return _bench(args, list(argv) if argv is not None else sys.argv[1:])
        if args.command == "demo":
            from shmipc.demo import check_arguments, run_demo

            try:
                check_arguments(args.children, args.messages)
            except ValueError as exc:
                print(f"shmipc demo: error: {exc}", file=sys.stderr)
                return 2
            return run_demo(args.children, args.messages, quiet=args.quiet)
        if args.command == "inspect":
            from shmipc.inspector import run_inspect

            return run_inspect(args.pid, watch=args.watch, interval=args.interval,
                               show_all=args.all, as_json=args.json)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:          # `shmipc bench | head`
        return 0
    except OSError as exc:
        if exc.errno not in _OUTPUT_ERRORS:
            raise
        # stdout on a full disk (`> /dev/full`): one line, not a traceback;
        # stdout then goes nowhere, so the exit's flush has nothing to fail on
        print(f"shmipc: error: cannot write the output: {exc.strerror}", file=sys.stderr)
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass
        return 1
    return 2


_OUTPUT_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)


if __name__ == "__main__":
    sys.exit(main())
