"""The examples run as a user would run them, and say what they claim."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str, *args: str, timeout: float = 120) -> str:
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.timeout(150)
def test_seed_semaphore():
    out = run_example("seed_semaphore.py", "--children", "3", "--messages", "20000")
    assert "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]" in out
    assert "sent 60,000 typed messages; every one verified" in out


@pytest.mark.timeout(60)
def test_file_mapping():
    out = run_example("file_mapping.py")
    assert "the file after unmap:  b'HELLO, mapped world\\n'" in out
    assert "the file, unchanged:   b'HELLO, mapped world\\n'" in out
    assert "['entry 0', 'entry 1', 'entry 2']" in out


def readme_snippets() -> list[tuple[int, str]]:
    """Every ```python block of README.md, with the line it starts on."""
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().splitlines()
    blocks, current, start = [], None, 0
    for number, line in enumerate(lines, 1):
        if current is None and line.strip() == "```python":
            current, start = [], number + 1
        elif current is not None and line.strip() == "```":
            blocks.append((start, "\n".join(current) + "\n"))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def test_readme_has_snippets():
    assert len(readme_snippets()) >= 3


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start,code", readme_snippets(), ids=lambda v: f"line{v}" if isinstance(v, int) else "")
def test_readme_snippet_runs_as_written(start, code, tmp_path):
    """Each README snippet, run as is by a fresh interpreter in an empty
    directory (as a user pasting it into a file would)."""
    script = tmp_path / "snippet.py"
    script.write_text(code)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=80,
                          cwd=tmp_path)
    assert done.returncode == 0, f"README.md line {start}:\n{done.stderr}"
    if "np.arange(10)" in code:                       # the quick start says what it prints
        assert done.stdout.strip() == "{'id': 1} b'raw' [0 1 2 3 4 5 6 7 8 9]"


@pytest.mark.timeout(120)
def test_pool_crash_example():
    out = run_example("pool_crash.py")
    assert "map returned all 400 results" in out
    assert "the map failed with WorkerLost" in out and "the pool still works: sum = 328350" in out


@pytest.mark.timeout(120)
def test_queue_dropin_example():
    out = run_example("queue_dropin.py")
    assert "multiprocessing  2000 arrays" in out and "shmipc           2000 arrays" in out


@pytest.mark.timeout(120)
def test_pipeline_images_example():
    out = run_example("pipeline_images.py", "-n", "60")
    assert "results identical" in out


@pytest.mark.timeout(120)
def test_asyncio_web_example():
    """The asyncio server (localhost only) answers every request right, its
    event loop ticking meanwhile."""
    out = run_example("asyncio_web.py", "--requests", "100", "--workers", "2")
    assert "100 concurrent requests answered by 2 worker processes" in out
    assert "every answer checked" in out


def test_every_example_is_run_by_a_test():
    """An example nobody runs rots: each must be run by a test here or in the
    test file of its optional dependency (ray, joblib/sklearn)."""
    texts = ""
    for name in ("test_examples.py", "test_ray.py", "test_joblib.py"):
        path = os.path.join(ROOT, "tests", name)
        if os.path.exists(path):
            with open(path) as f:
                texts += f.read()
    untested = [name for name in sorted(os.listdir(os.path.join(ROOT, "examples")))
                if name.endswith(".py") and f'"{name}"' not in texts]
    assert not untested, f"examples no test runs: {untested}"


def test_example_docstrings_give_commands_that_work():
    """Each example's docstring says how to run it from the set-up venv (a
    bare `python` has no shmipc after `make`)."""
    for name in sorted(os.listdir(os.path.join(ROOT, "examples"))):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(ROOT, "examples", name)) as f:
            text = f.read()
        doc = text.split('"""')[1]
        if name in ("seed_semaphore.py", "file_mapping.py", "queue_dropin.py", "pool_crash.py",
                    "pipeline_images.py", "asyncio_web.py"):
            assert f".venv/bin/python examples/{name}" in doc, name
        for line in doc.splitlines():
            if f"examples/{name}" in line:
                assert ".venv/bin/python examples/" in line, (name, line)
