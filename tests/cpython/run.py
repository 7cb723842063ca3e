"""Run CPython's own multiprocessing and concurrent.futures tests against the
standard library and against shmipc, and report per test class.

    python tests/cpython/run.py [--methods fork,forkserver,spawn] [--suites mp,futures]
                                [--classes Name,...] [--out build/cpython-tests]
                                [--readme README.md] [--gate]
    python tests/cpython/run.py --from a.json,b.json [--out ...] [--readme README.md]

The tests come from the interpreter's own ``test`` package:
``test._test_multiprocessing`` (the classes that exercise Queue,
JoinableQueue, SimpleQueue, Pipe/Connection, connection.wait and Pool) and
``test.test_concurrent_futures`` (the process-pool classes). Some builds
lack the latter (Debian's and pyenv's 3.11 and 3.12 among them); then it is
taken from Debian's ``libpython3.X-testsuite`` (``/usr/lib/python3.X/test``)
if installed (``make cpython-tests`` installs it where apt-get works), and
the suite is skipped with a message otherwise.

Each (suite, implementation, start method, class) runs in a process of its
own (tests/cpython/_one.py), so a hang or a crash costs one class, with a
per-test watchdog. Implementations: ``stdlib``; ``shmipc`` (shmipc's Queue,
JoinableQueue, SimpleQueue, Pipe, Pool, connection.wait and get_context
where the tests use multiprocessing's; for futures, the standard executor with
``mp_context=shmipc.get_context(method)``); ``shmipc-executor`` (futures only:
``shmipc.ProcessPoolExecutor`` in place of the standard one).

Tests listed in tests/cpython/excluded.txt (only tests that read private
attributes of the standard library's implementation) are skipped for shmipc
and counted apart. Writes <out>.json (every test's outcome, failures with
their tracebacks) and <out>.md (the table), and prints the table.
Exit status 0 whatever the outcomes (a report), 2 on a usage error; with
``--gate``, 1 when a test fails for shmipc that tests/cpython/known_failures.txt
does not list (the known gaps, each with its reason), so CI catches regressions.

``--readme README.md`` rewrites the README's section between
``<!-- cpython-tests:start -->`` and ``<!-- cpython-tests:end -->`` with one
row per test class and a column per start method and implementation (the
table is generated, never edited by hand). ``--from`` merges the JSON
reports of earlier runs (e.g. one start method each) instead of running.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ONE = os.path.join(HERE, "_one.py")
EXCLUDED = os.path.join(HERE, "excluded.txt")
KNOWN_FAILURES = os.path.join(HERE, "known_failures.txt")
METHODS = ("fork", "forkserver", "spawn")

# the classes of test._test_multiprocessing whose subject shmipc provides
MP_CLASSES = (
    "WithProcessesTestQueue",
    "TestSimpleQueue",
    "WithProcessesTestConnection",
    "WithProcessesTestPoll",
    "WithProcessesTestPollEintr",
    "WithProcessesTestPicklingConnections",
    "TestWait",
    "TestTimeouts",
    "TestIgnoreEINTR",
    "WithProcessesTestPool",
    "WithProcessesTestPoolWorkerErrors",
    "WithProcessesTestPoolWorkerLifetime",
    "TestPoolNotLeakOnFailure",
    "TestInitializers",
)

IMPLS = {"mp": ("stdlib", "shmipc"), "futures": ("stdlib", "shmipc", "shmipc-executor")}


def _has_module(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def find_testdir(python: str) -> str | None:
    """Where test.test_concurrent_futures can come from for `python`: None if
    its own test package has it (or nothing has it), else Debian's copy."""
    if _has_module(python, "test.test_concurrent_futures"):
        return None
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    path = f"/usr/lib/python{version}/test"
    if glob.glob(os.path.join(path, "test_concurrent_futures*")):
        return path
    return ""       # nowhere


def _env(suite: str, impl: str, method: str, testdir: str | None) -> dict:
    env = dict(os.environ, SHMIPC_CPY_SUITE=suite, SHMIPC_CPY_IMPL=impl, SHMIPC_CPY_METHOD=method)
    if testdir:
        env["SHMIPC_CPY_TESTDIR"] = testdir
    root = os.path.dirname(os.path.dirname(HERE))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def list_classes(python: str, suite: str, method: str, testdir: str | None) -> list[str]:
    out = subprocess.run([python, ONE, "--list"], capture_output=True, text=True,
                         env=_env(suite, "stdlib", method, testdir), cwd=HERE, timeout=300)
    if out.returncode:
        raise RuntimeError(f"cannot load the {suite} tests:\n{out.stderr}")
    names = out.stdout.split()
    if suite == "mp":
        return [name for name in MP_CLASSES if name in names]
    return names


def run_class(python: str, suite: str, impl: str, method: str, cls: str, testdir: str | None,
              class_timeout: float) -> list[dict]:
    """Run one class in a fresh process; one dict per test. A test that was
    started but never finished (hang, crash) is reported as failed."""
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl", delete=False) as f:
        path = f.name
    try:
        try:
            proc = subprocess.run([python, ONE, cls, path, EXCLUDED], capture_output=True,
                                  text=True, env=_env(suite, impl, method, testdir), cwd=HERE,
                                  timeout=class_timeout)
            tail = proc.stderr[-3000:]
        except subprocess.TimeoutExpired as exc:
            err = exc.stderr or b""
            tail = f"class timed out after {class_timeout} s\n" + (
                err.decode(errors="replace") if isinstance(err, bytes) else err)[-3000:]
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
    finally:
        os.unlink(path)
    results: dict[str, dict] = {}
    for line in lines:
        if line["outcome"] == "start":
            results[line["test"]] = {"test": line["test"], "outcome": "failed",
                                     "detail": "did not finish (hang or crash):\n" + tail}
        else:
            results[line["test"]] = line
    if not results:
        results[cls] = {"test": cls, "outcome": "failed", "detail": "class did not run:\n" + tail}
    return list(results.values())


def _count(results: list[dict]) -> dict:
    counts = {"passed": 0, "failed": 0, "skipped": 0, "excluded": 0}
    for r in results:
        counts[r["outcome"]] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--suites", default="mp,futures")
    parser.add_argument("--impls", default="stdlib,shmipc,shmipc-executor")
    parser.add_argument("--classes", default="", help="only these classes (comma-separated)")
    parser.add_argument("--class-timeout", type=float, default=1200)
    parser.add_argument("--out", default=os.path.join("build", "cpython-tests"))
    parser.add_argument("--gate", action="store_true",
                        help="exit 1 if a test fails for shmipc that known_failures.txt does not list")
    parser.add_argument("--readme", default="",
                        help="rewrite this file's <!-- cpython-tests:start/end --> section")
    parser.add_argument("--from", dest="merge", default="",
                        help="merge these JSON reports (comma-separated) instead of running")
    args = parser.parse_args(argv)
    if os.sep in args.python:       # the classes run with cwd=tests/cpython
        args.python = os.path.abspath(args.python)
    if args.merge:
        report = merge_reports([load_report(path) for path in args.merge.split(",") if path])
    else:
        report = run_all(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=1)
    table = render(report)
    with open(args.out + ".md", "w") as f:
        f.write(table)
    print(table)
    if args.readme:
        rewrite_readme(args.readme, render_readme(report))
        print(f"rewrote the CPython tests section of {args.readme}")
    if args.gate:
        unexpected = unexpected_failures(report, load_patterns(KNOWN_FAILURES))
        if unexpected:
            print("FAILED: tests failing for shmipc that known_failures.txt does not list:")
            for impl, method, test in unexpected:
                print(f"  {impl} / {method}: {test}")
            return 1
        print("gate: every shmipc failure is a known gap listed in known_failures.txt")
    return 0


def run_all(args: argparse.Namespace) -> dict:
    """Run every selected (suite, method, class, implementation); the report."""
    methods = [m for m in args.methods.split(",") if m]
    only = set(filter(None, args.classes.split(",")))
    report: dict = {"python": subprocess.run([args.python, "-VV"], capture_output=True,
                                             text=True).stdout.strip(),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": []}
    testdir = find_testdir(args.python)
    for suite in args.suites.split(","):
        if suite == "futures" and testdir == "":
            print("SKIPPED futures: this interpreter has no test.test_concurrent_futures and "
                  "no /usr/lib/python3.X/test copy (install libpython3.X-testsuite)", flush=True)
            report["skipped_futures"] = True
            continue
        for method in methods:
            classes = [c for c in list_classes(args.python, suite, method, testdir)
                       if not only or c in only]
            for cls in classes:
                for impl in IMPLS[suite]:
                    if impl not in args.impls.split(","):
                        continue
                    t = time.monotonic()
                    results = run_class(args.python, suite, impl, method, cls, testdir,
                                        args.class_timeout)
                    counts = _count(results)
                    print(f"{suite:7} {method:10} {impl:15} {cls:45} "
                          + " ".join(f"{k} {v}" for k, v in counts.items())
                          + f"  ({time.monotonic() - t:.0f} s)", flush=True)
                    report["runs"].append({"suite": suite, "method": method, "impl": impl,
                                           "class": cls, "counts": counts, "results": results,
                                           "seconds": round(time.monotonic() - t, 1)})
    return report


def load_report(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def merge_reports(reports: list[dict]) -> dict:
    """One report of several runs' (same interpreter): a later report's
    (suite, method, impl, class) replaces an earlier one's."""
    if not reports:
        raise SystemExit("--from: no report given")
    runs: dict[tuple, dict] = {}
    for rep in reports:
        if rep["python"] != reports[0]["python"]:
            raise SystemExit(f"--from: reports of different interpreters: "
                             f"{reports[0]['python']!r} and {rep['python']!r}")
        for run in rep["runs"]:
            runs[(run["suite"], run["method"], run["impl"], run["class"])] = run
    return {"python": reports[0]["python"],
            "date": max((r.get("date", "") for r in reports), default=""),
            "runs": list(runs.values())}


def load_patterns(path: str) -> list[tuple[str, str]]:
    """(implementation, fnmatch pattern) pairs of a list file like
    excluded.txt: '#' comments, one 'impl  Class.test  reason' a line."""
    pairs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                impl, pattern = line.split(None, 2)[:2]
                pairs.append((impl, pattern))
    return pairs


def unexpected_failures(report: dict, known: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """The shmipc failures of a report that no known pattern covers."""
    from fnmatch import fnmatchcase

    out = []
    for run in report["runs"]:
        if run["impl"] == "stdlib":
            continue
        for r in run["results"]:
            if r["outcome"] == "failed" and not any(
                    impl == run["impl"] and fnmatchcase(r["test"], pattern) for impl, pattern in known):
                out.append((run["impl"], run["method"], r["test"]))
    return sorted(out)


def render(report: dict) -> str:
    """A Markdown table: one row per (suite, class, start method), columns
    passed/failed/skipped(/excluded) per implementation, then totals."""
    impls = ["stdlib", "shmipc", "shmipc-executor"]
    rows: dict[tuple, dict] = {}
    totals = {impl: {"passed": 0, "failed": 0, "skipped": 0, "excluded": 0} for impl in impls}
    for run in report["runs"]:
        key = (run["suite"], run["class"], run["method"])
        rows.setdefault(key, {})[run["impl"]] = run["counts"]
        for k, v in run["counts"].items():
            totals[run["impl"]][k] += v
    used = [i for i in impls if any(i in r for r in rows.values())]

    def cell(c: dict | None) -> str:
        if c is None:
            return ""
        s = f"{c['passed']}/{c['failed']}/{c['skipped']}"
        return s + (f" (+{c['excluded']} excl.)" if c["excluded"] else "")

    lines = [f"CPython's tests, {report['python']}: passed/failed/skipped per class",
             "", "| suite | class | method | " + " | ".join(used) + " |",
             "|---|---|---|" + "---|" * len(used)]
    for (suite, cls, method), cells in sorted(rows.items()):
        lines.append(f"| {suite} | {cls} | {method} | "
                     + " | ".join(cell(cells.get(i)) for i in used) + " |")
    lines.append("| **total** | | | " + " | ".join(cell(totals[i]) for i in used) + " |")
    failed = [(run["impl"], run["method"], r["test"]) for run in report["runs"]
              if run["impl"] != "stdlib" for r in run["results"] if r["outcome"] == "failed"]
    if failed:
        lines += ["", "Failing for shmipc:", ""]
        lines += [f"- {impl} / {method}: {test}" for impl, method, test in sorted(failed)]
    return "\n".join(lines) + "\n"


README_START = "<!-- cpython-tests:start -->"
README_END = "<!-- cpython-tests:end -->"
_PREFIXES = ("ProcessPoolForkserver", "ProcessPoolFork", "ProcessPoolSpawn")


def _generic(cls: str) -> str:
    """A futures class without its start method (ProcessPoolForkWaitTest ->
    ProcessPool*WaitTest): one README row for the three methods."""
    for prefix in _PREFIXES:
        if cls.startswith(prefix):
            return "ProcessPool*" + cls[len(prefix):]
    return cls


def _reasons(path: str) -> dict[tuple[str, str], str]:
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                impl, pattern, reason = (line.split(None, 2) + [""])[:3]
                out[(impl, pattern)] = reason
    return out


def render_readme(report: dict) -> str:
    """The README section: one row per test class, for each start method the
    stdlib's and shmipc's passed/failed/skipped, totals, and every shmipc
    failure with the reason known_failures.txt gives."""
    from fnmatch import fnmatchcase

    impls = ("stdlib", "shmipc", "shmipc-executor")
    methods = [m for m in METHODS if any(r["method"] == m for r in report["runs"])]
    cells: dict[tuple, dict] = {}
    totals: dict[tuple, dict] = {}
    for run in report["runs"]:
        key = (run["suite"], _generic(run["class"]))
        cells.setdefault(key, {})[(run["method"], run["impl"])] = run["counts"]
        tot = totals.setdefault((run["method"], run["impl"]),
                                {"passed": 0, "failed": 0, "skipped": 0, "excluded": 0})
        for k, v in run["counts"].items():
            tot[k] += v
    cols = [(m, i) for m in methods for i in impls if (m, i) in totals]

    def cell(c: dict | None) -> str:
        if c is None:
            return ""
        text = f"{c['passed']}/{c['failed']}/{c['skipped']}"
        if c["failed"]:
            text = f"**{text}**"
        return text + (f" +{c['excluded']}x" if c["excluded"] else "")

    short = {"stdlib": "stdlib", "shmipc": "shmipc", "shmipc-executor": "shmipc executor"}
    lines = [README_START, "",
             f"Run on {report['python'].split(' (')[0]}, {report.get('date', '')}: "
             "passed/failed/skipped per CPython test class (`+Nx`: tests not run for shmipc "
             "because they read the standard library's private attributes, each listed with "
             "its reason in [tests/cpython/excluded.txt](tests/cpython/excluded.txt)). "
             "*stdlib*: the standard library's own objects; *shmipc*: shmipc's Queue, "
             "SimpleQueue, JoinableQueue, Pipe, Pool and context in their place (for "
             "concurrent.futures: the standard executor with `mp_context=shmipc.get_context(method)`); "
             "*shmipc executor*: `shmipc.ProcessPoolExecutor` in place of the standard one.", "",
             "| suite | class | " + " | ".join(f"{m}: {short[i]}" for m, i in cols) + " |",
             "|---|---|" + "---:|" * len(cols)]
    for (suite, cls), row in sorted(cells.items()):
        lines.append(f"| {suite} | {cls} | " + " | ".join(cell(row.get(c)) for c in cols) + " |")
    lines.append("| **total** | | " + " | ".join(cell(totals[c]) for c in cols) + " |")
    reasons = _reasons(KNOWN_FAILURES)
    failed: dict[tuple[str, str], list[str]] = {}
    for run in report["runs"]:
        if run["impl"] == "stdlib":
            continue
        for r in run["results"]:
            if r["outcome"] == "failed":
                why = next((reason for (impl, pattern), reason in reasons.items()
                            if impl == run["impl"] and fnmatchcase(r["test"], pattern)),
                           "NOT LISTED in known_failures.txt: a regression")
                name = f"{short[run['impl']]}: `{_generic(r['test'].split('.')[0])}.{r['test'].split('.', 1)[1]}`"
                failed.setdefault((name, why), []).append(run["method"])
    if failed:
        lines += ["", "Failing for shmipc, with the reason "
                  "([tests/cpython/known_failures.txt](tests/cpython/known_failures.txt); "
                  "the deliberate differences are explained in [docs/differences.md](docs/differences.md)):", ""]
        for (name, why), on in sorted(failed.items()):
            lines.append(f"- {name} ({', '.join(m for m in METHODS if m in on)}): {why}")
    lines += ["", "Regenerate with `make readme-cpython-tests` (all three start methods and "
              f"implementations, {_minutes(report)} min of test classes in this run), which runs "
              "`tests/cpython/run.py --readme README.md`.", "", README_END]
    return "\n".join(lines) + "\n"


def _minutes(report: dict) -> str:
    seconds = sum(run.get("seconds", 0) for run in report["runs"])
    return f"{max(1, round(seconds / 60))}"


def rewrite_readme(path: str, section: str) -> None:
    """Replace the marked section of `path` with `section` (markers included).

    Raises:
        SystemExit: the file lacks the markers (a README edited by hand).
    """
    from shmipc.bench.report import rewrite_marked_section_or_exit

    rewrite_marked_section_or_exit(path, README_START, README_END, section)


if __name__ == "__main__":
    sys.exit(main())
