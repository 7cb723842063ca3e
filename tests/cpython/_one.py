"""Run CPython's own tests of one class against the standard library or shmipc
(one process per class; started by tests/cpython/run.py, which reads what it
writes).

Set by environment variables (so that spawn and forkserver children, which
import this script again as ``__mp_main__``, rebuild the same test classes):

    SHMIPC_CPY_SUITE    "mp" (test._test_multiprocessing) or "futures"
                        (test.test_concurrent_futures)
    SHMIPC_CPY_IMPL     "stdlib"; "shmipc" (shmipc's queues, pipes, pool and
                        context where multiprocessing's were); for futures
                        also "shmipc-executor" (shmipc.ProcessPoolExecutor in
                        place of the standard one)
    SHMIPC_CPY_METHOD   fork, forkserver or spawn
    SHMIPC_CPY_TESTDIR  another copy of the interpreter's ``test`` package
                        to look in for modules this build lacks (Debian's
                        libpython3.X-testsuite)

Usage: python _one.py CLASS RESULTS_FILE [EXCLUDED_FILE], or
python _one.py --list (the classes there are). Each finished test
appends one JSON line {"test", "outcome", "detail"} to RESULTS_FILE;
a "start" line comes first, so a test that hangs (and is killed by the
faulthandler watchdog) is known.
"""
from __future__ import annotations

import os
import sys
import types

SUITE = os.environ.get("SHMIPC_CPY_SUITE", "mp")
IMPL = os.environ.get("SHMIPC_CPY_IMPL", "stdlib")
METHOD = os.environ.get("SHMIPC_CPY_METHOD", "fork")
TESTDIR = os.environ.get("SHMIPC_CPY_TESTDIR")

import test  # noqa: E402  (the interpreter's own test package)

if TESTDIR and TESTDIR not in test.__path__:
    test.__path__.append(TESTDIR)       # modules this build lacks come from there

import multiprocessing  # noqa: E402
import multiprocessing.connection  # noqa: E402


def _shim(base: types.ModuleType, name: str, **overrides: object) -> types.ModuleType:
    """A module that is `base` except for `overrides`."""
    mod = types.ModuleType(name)
    mod.__dict__.update(base.__dict__)
    mod.__dict__.update(overrides)
    return mod


def _install_mp() -> None:
    """test._test_multiprocessing's classes, built into this module's globals
    as CPython's test_multiprocessing_<method>.py does; for shmipc, with
    shmipc's Queue, JoinableQueue, SimpleQueue, Pipe, Pool, connection.wait
    and get_context wherever the tests take multiprocessing's."""
    from test import _test_multiprocessing as tm

    if IMPL == "shmipc":
        import shmipc
        import shmipc.connection

        connection = _shim(multiprocessing.connection, "multiprocessing.connection",
                           Pipe=shmipc.Pipe, wait=shmipc.connection.wait)
        tm.multiprocessing = _shim(
            multiprocessing, "multiprocessing", Queue=shmipc.Queue,
            JoinableQueue=shmipc.JoinableQueue, SimpleQueue=shmipc.SimpleQueue,
            Pipe=shmipc.Pipe, Pool=shmipc.Pool, get_context=shmipc.get_context,
            connection=connection)
        mixin = tm.ProcessesMixin
        mixin.Queue = staticmethod(shmipc.Queue)
        mixin.JoinableQueue = staticmethod(shmipc.JoinableQueue)
        mixin.Pipe = staticmethod(shmipc.Pipe)
        mixin.Pool = staticmethod(shmipc.Pool)
        mixin.connection = connection
        # TestIgnoreEINTR sends "CONN_MAX_SIZE bytes [that] must block" (the
        # OS pipe or socket buffer's size plus one), to signal the sender in
        # the middle of a blocked send. A shmipc Pipe buffers its whole ring
        # (32 MiB by default), so that send returns at once and the sender
        # exits before the signal: the same premise for shmipc is a message
        # larger than the ring
        from shmipc.queues import DEFAULT_CAPACITY

        tm.TestIgnoreEINTR.CONN_MAX_SIZE = max(tm.TestIgnoreEINTR.CONN_MAX_SIZE,
                                               2 * DEFAULT_CAPACITY + 1)
    tm.install_tests_in_module_dict(globals(), METHOD)


def _install_futures() -> None:
    """test.test_concurrent_futures' process-pool classes for METHOD, with
    mp_context=shmipc.get_context(METHOD), or shmipc.ProcessPoolExecutor."""
    import importlib

    import test.test_concurrent_futures as tcf

    if hasattr(tcf, "ExecutorMixin"):       # 3.11: one module
        util, modules = tcf, [tcf]
    else:                                   # 3.12+: a package, the mixins in its util
        util = importlib.import_module("test.test_concurrent_futures.util")
        modules = [importlib.import_module(f"test.test_concurrent_futures.{name}")
                   for name in ("test_as_completed", "test_deadlock", "test_init",
                                "test_process_pool", "test_shutdown", "test_wait")]
    if IMPL in ("shmipc", "shmipc-executor"):
        import shmipc

        def get_context(self):      # what the tests pass as mp_context
            return shmipc.get_context(self.ctx)

        util.ExecutorMixin.get_context = get_context
        if IMPL == "shmipc-executor":
            for mixin in (util.ProcessPoolForkMixin, util.ProcessPoolSpawnMixin,
                          util.ProcessPoolForkserverMixin):
                mixin.executor_type = shmipc.ProcessPoolExecutor
            for module in modules:
                if hasattr(module, "futures"):
                    module.futures = _shim(module.futures, "concurrent.futures",
                                           ProcessPoolExecutor=shmipc.ProcessPoolExecutor)
    prefix = {"fork": "ProcessPoolFork", "spawn": "ProcessPoolSpawn",
              "forkserver": "ProcessPoolForkserver"}[METHOD]
    for module in modules:
        for name, value in vars(module).items():
            if not (isinstance(value, type) and name.startswith(prefix) and name.endswith("Test")):
                continue
            if METHOD == "fork" and name.startswith("ProcessPoolForkserver"):
                continue
            globals()[name] = value     # its module's setUpModule runs around it


if SUITE == "mp":
    _install_mp()
else:
    _install_futures()


def classes() -> list[str]:
    """The test classes this module holds for SUITE and METHOD."""
    import unittest

    return sorted(name for name, value in globals().items()
                  if isinstance(value, type) and issubclass(value, unittest.TestCase))


def _excluded(path: str | None) -> list[tuple[str, str]]:
    """[(Class.test pattern, reason)] of the exclusion file for IMPL (lines
    ``impl  Class.test-pattern  reason``; fnmatch patterns, so that one line
    covers the fork, forkserver and spawn variants of a class)."""
    out: list[tuple[str, str]] = []
    if not path:
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            impl, pattern, reason = (line.split(None, 2) + [""])[:3]
            if impl == IMPL:
                out.append((pattern, reason.strip()))
    return out


# tests that cannot run when the test module comes from SHMIPC_CPY_TESTDIR,
# for the standard library and shmipc alike
_NEEDS_OWN_TESTDIR = {
    "test_interpreter_shutdown": "runs a fresh interpreter in isolated mode (-I), which cannot "
                                 "import the test module taken from SHMIPC_CPY_TESTDIR",
}


def main() -> int:
    import faulthandler
    import fnmatch
    import gc
    import json
    import unittest

    if sys.argv[1] == "--list":
        print("\n".join(classes()))
        return 0
    class_name, results = sys.argv[1], sys.argv[2]
    excluded = _excluded(sys.argv[3] if len(sys.argv) > 3 else None)
    per_test_timeout = float(os.environ.get("SHMIPC_CPY_TEST_TIMEOUT", "180"))
    out = open(results, "a", buffering=1)

    def record(test: unittest.TestCase, outcome: str, detail: str = "") -> None:
        name = ".".join(test.id().split(".")[-2:])       # Class.test_method
        out.write(json.dumps({"test": name, "outcome": outcome, "detail": detail[-3000:]}) + "\n")

    class Result(unittest.TextTestResult):
        def startTest(self, test):
            record(test, "start")
            faulthandler.dump_traceback_later(per_test_timeout, exit=True)
            super().startTest(test)

        def stopTest(self, test):
            faulthandler.cancel_dump_traceback_later()
            super().stopTest(test)
            # a failed test leaves its executor or pool unreferenced only in
            # reference cycles (its traceback's frames): collect them now, so
            # that their workers exit (as the standard executor's do once it
            # is collected) instead of outliving the class, where they keep
            # the resource tracker (and forkserver) that tearDownModule waits
            # for alive until the class timeout
            gc.collect()

        def addSuccess(self, test):
            super().addSuccess(test)
            record(test, "passed")

        def addFailure(self, test, err):
            super().addFailure(test, err)
            record(test, "failed", self.failures[-1][1])

        def addError(self, test, err):
            super().addError(test, err)
            record(test, "failed", self.errors[-1][1])

        def addSkip(self, test, reason):
            super().addSkip(test, reason)
            record(test, "excluded" if reason.startswith("excluded:") else "skipped", reason)

        def addExpectedFailure(self, test, err):
            super().addExpectedFailure(test, err)
            record(test, "skipped", "expected failure")

        def addUnexpectedSuccess(self, test):
            super().addUnexpectedSuccess(test)
            record(test, "passed")

    cls = globals()[class_name]
    for attr in dir(cls):
        if not attr.startswith("test"):
            continue
        for pattern, reason in excluded:
            if fnmatch.fnmatchcase(f"{class_name}.{attr}", pattern):
                setattr(cls, attr, unittest.skip(f"excluded: {reason}")(getattr(cls, attr)))
                break
        if TESTDIR and attr in _NEEDS_OWN_TESTDIR:
            setattr(cls, attr, unittest.skip(_NEEDS_OWN_TESTDIR[attr])(getattr(cls, attr)))
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(cls)
    module_suite = unittest.TestSuite([suite])
    # setUpModule / tearDownModule of this module run around the class
    runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=0, resultclass=Result)
    runner.run(module_suite)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
