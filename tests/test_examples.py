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
