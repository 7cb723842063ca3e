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


@pytest.mark.timeout(60)
def test_readme_quick_start_runs():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0, done.stderr
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
