"""tests/cpython/run.py's report logic, without running CPython's tests:
merging reports, the gate, and the README section it rewrites."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402


def _run(method, impl, cls, outcomes):
    results = [{"test": f"{cls}.test_{i}", "outcome": o, "detail": ""} for i, o in enumerate(outcomes)]
    return {"suite": "futures" if cls.startswith("ProcessPool") else "mp", "method": method,
            "impl": impl, "class": cls, "counts": run._count(results), "results": results}


def _report(*runs, date="2026-11-30 04:00 UTC"):
    return {"python": "Python 3.11.7 (main)", "date": date, "runs": list(runs)}


def test_merge_later_reports_replace_earlier_runs():
    first = _report(_run("fork", "shmipc", "TestWait", ["failed"]),
                    _run("fork", "stdlib", "TestWait", ["passed"]))
    second = _report(_run("fork", "shmipc", "TestWait", ["passed"]), date="2026-11-30 05:00 UTC")
    merged = run.merge_reports([first, second])
    by_impl = {r["impl"]: r["counts"] for r in merged["runs"]}
    assert by_impl == {"shmipc": {"passed": 1, "failed": 0, "skipped": 0, "excluded": 0},
                       "stdlib": {"passed": 1, "failed": 0, "skipped": 0, "excluded": 0}}
    assert merged["date"] == "2026-11-30 05:00 UTC"
    with pytest.raises(SystemExit, match="different interpreters"):
        run.merge_reports([first, dict(second, python="Python 3.13.0")])


def test_gate_ignores_listed_failures_and_the_standard_library():
    report = _report(_run("spawn", "shmipc", "WithProcessesTestQueue", ["failed"]),
                     _run("spawn", "stdlib", "WithProcessesTestQueue", ["failed"]),
                     _run("fork", "shmipc-executor", "ProcessPoolForkWaitTest", ["passed", "failed"]))
    known = [("shmipc", "WithProcessesTestQueue.test_0")]
    assert run.unexpected_failures(report, known) == [
        ("shmipc-executor", "fork", "ProcessPoolForkWaitTest.test_1")]


def test_readme_section_has_a_row_per_class_and_a_column_per_method(tmp_path):
    report = _report(
        _run("fork", "stdlib", "ProcessPoolForkWaitTest", ["passed", "passed"]),
        _run("fork", "shmipc-executor", "ProcessPoolForkWaitTest", ["passed", "failed"]),
        _run("spawn", "shmipc-executor", "ProcessPoolSpawnWaitTest", ["passed", "excluded"]))
    section = run.render_readme(report)
    rows = [line for line in section.splitlines() if line.startswith("| futures")]
    assert rows == ["| futures | ProcessPool*WaitTest | 2/0/0 | **1/1/0** | 1/0/0 +1x |"]
    assert "fork: stdlib | fork: shmipc executor | spawn: shmipc executor" in section
    assert "NOT LISTED in known_failures.txt" in section       # test_1 is no known failure
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{run.README_START}\nold\n{run.README_END}\nafter\n")
    run.rewrite_readme(str(readme), section)
    text = readme.read_text()
    assert text.startswith("before\n" + run.README_START) and text.endswith(run.README_END + "\nafter\n")
    assert "old" not in text and rows[0] in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- cpython-tests:start -->"):
        run.rewrite_readme(str(readme), section)
