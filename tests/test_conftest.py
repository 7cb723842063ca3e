"""The suite's own leak check (conftest.no_leaks) counts only what a test made."""
from __future__ import annotations

import os
import time

import pytest

from conftest import shm_created_since, shm_entries


def _other_program(name: str, ready_w: int, hold_r: int) -> None:
    """In a grandchild reparented away from this test: make a POSIX
    semaphore (mapped, as multiprocessing's are) and hold it until told."""
    import posix_ipc

    sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX)
    os.write(ready_w, b"x")
    os.read(hold_r, 1)                  # returns when the test closes its end
    sem.unlink()
    sem.close()


@pytest.mark.timeout(30)
def test_leak_check_ignores_another_programs_entries_and_counts_our_own():
    import posix_ipc

    before = shm_entries()
    other, mine = f"/shmipc-test-other-{os.getpid()}", f"/shmipc-test-mine-{os.getpid()}"
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if os.fork() == 0:          # the grandchild: no longer below this test once its parent exits
                try:
                    os.close(ready_r)
                    os.close(hold_w)
                    _other_program(other, ready_w, hold_r)
                finally:
                    os._exit(0)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    os.waitpid(pid, 0)
    try:
        assert os.read(ready_r, 1) == b"x"
        shm = posix_ipc.SharedMemory(mine, posix_ipc.O_CREX, size=4096)
        os.close(shm.fd)                # left behind, mapped by nobody: a leak of this test's
        try:
            found = shm_created_since(before)
            assert "shmipc-test-mine-" + str(os.getpid()) in found
            assert "sem.shmipc-test-other-" + str(os.getpid()) not in found
            assert os.path.exists("/dev/shm/sem.shmipc-test-other-" + str(os.getpid()))
        finally:
            shm.unlink()
    finally:
        os.close(hold_w)                # the other program unlinks its semaphore and exits
        os.close(ready_r)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/dev/shm/sem{other.replace('/', '.')}") and time.monotonic() < deadline:
            time.sleep(0.01)
