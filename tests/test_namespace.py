"""``import shmipc as multiprocessing``: every top-level name and context
member multiprocessing has, with compatible signatures, imported lazily; and
programs from the multiprocessing documentation run unchanged but for the
import, under fork, forkserver and spawn."""
from __future__ import annotations

import inspect
import multiprocessing
import pickle
import subprocess
import sys
import textwrap
import threading

import pytest

import shmipc
from conftest import START_METHODS

# shmipc's own versions of multiprocessing's names (all others are the same object)
OWN = {"Queue", "SimpleQueue", "JoinableQueue", "Pipe", "Pool", "get_context"}


def _compatible(ours, theirs) -> None:
    """Every parameter of multiprocessing's callable is accepted by ours, by
    the same name, kind and default, and positional ones in the same place."""
    # what help() and IDEs show: Pool's __new__ forwards *args/**kwargs (to
    # dispatch cluster=), so Pool sets __signature__ to its __init__'s
    mine = inspect.signature(ours).parameters
    for i, (name, param) in enumerate(inspect.signature(theirs).parameters.items()):
        assert name in mine, f"{ours} lacks parameter {name!r} of {theirs}"
        assert mine[name].kind == param.kind, (ours, name)
        assert mine[name].default == param.default, (ours, name)
        if param.kind is param.POSITIONAL_OR_KEYWORD:
            assert list(mine).index(name) == i, (ours, name)
    extra = [p for n, p in mine.items() if n not in inspect.signature(theirs).parameters]  # noqa
    for param in extra:     # shmipc's additions are optional
        assert param.default is not param.empty or param.kind in (param.VAR_KEYWORD,
                                                                   param.VAR_POSITIONAL), (ours, param)


def test_every_multiprocessing_name_is_there():
    for name in multiprocessing.__all__:
        assert name in shmipc.__all__, name
        ours, theirs = getattr(shmipc, name), getattr(multiprocessing, name)
        if name in OWN:
            _compatible(ours, theirs)
        else:
            assert ours is theirs, name
    for sub in ("connection", "managers", "shared_memory", "sharedctypes", "pool", "dummy"):
        assert getattr(shmipc, sub).__name__.endswith(sub)
    assert shmipc.connection.Listener is multiprocessing.connection.Listener
    assert shmipc.context.BaseContext is multiprocessing.context.BaseContext
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        shmipc.nonesuch


@pytest.mark.parametrize("method", START_METHODS)
def test_context_offers_every_member(method):
    theirs = multiprocessing.get_context(method)
    ours = shmipc.get_context(method)
    assert isinstance(ours, multiprocessing.context.BaseContext)
    for name in dir(theirs):
        if name.startswith("_"):
            continue
        assert hasattr(ours, name), name
        if name in OWN:
            _compatible(getattr(ours, name), getattr(theirs, name))
    assert ours.get_start_method() == method
    assert ours.Process is theirs.Process


NAMESPACE_SCRIPT = """
import inspect, multiprocessing, sys
sys.path.insert(0, {tests!r})
import shmipc as mp
from test_namespace import OWN, _compatible, _event_and_value

if __name__ == "__main__":
    mp.set_start_method({method!r})
    for name in multiprocessing.__all__:
        ours, theirs = getattr(mp, name), getattr(multiprocessing, name)
        if name in OWN:
            _compatible(ours, theirs)
        elif callable(theirs) and not isinstance(theirs, type):
            assert inspect.signature(ours) == inspect.signature(theirs), name
    assert mp.get_start_method() == {method!r} == mp.get_context().get_start_method()
    # multiprocessing's primitives with shmipc's queue, in a child of this method
    q, ev, val = mp.Queue(), mp.Event(), mp.Value("i", 0)
    p = mp.Process(target=_event_and_value, args=(q, ev, val))
    p.start()
    assert q.get(timeout=60) == "started"
    ev.set()
    p.join(60)
    assert p.exitcode == 0 and val.value == 42, (p.exitcode, val.value)
    print("ok")
"""


def _event_and_value(q, ev, val):
    q.put("started")
    assert ev.wait(60)
    with val.get_lock():
        val.value = 42


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", START_METHODS)
def test_namespace_under_each_start_method(method, tmp_path):
    """With the start method set through shmipc, every multiprocessing name
    is there with the same signature, and multiprocessing's Event and Value
    work with shmipc's Queue in a child started by that method."""
    import os

    path = tmp_path / "namespace.py"
    path.write_text(NAMESPACE_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)),
                                            method=method))
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                         timeout=100, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.timeout(60)
def test_import_stays_lazy():
    """``import shmipc`` imports neither multiprocessing nor the drop-ins."""
    out = subprocess.run(
        [sys.executable, "-c", "import shmipc, sys; print(sorted(m for m in sys.modules if "
         "m.startswith(('multiprocessing', 'shmipc.queues', 'shmipc.pool', 'concurrent'))))"],
        capture_output=True, text=True, timeout=50, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ------------------------------------------------------------ the documentation's programs
# Verbatim from the multiprocessing documentation (Python 3.11-3.13), with the
# start method chosen in the __main__ block; the test swaps the import.
DOC_PROGRAMS = {
    "process_queue": ("""
        from multiprocessing import Process, Queue

        def f(q):
            q.put([42, None, 'hello'])

        if __name__ == '__main__':
            q = Queue()
            p = Process(target=f, args=(q,))
            p.start()
            print(q.get())    # prints "[42, None, 'hello']"
            p.join()
        """, "[42, None, 'hello']\n"),
    "pipe": ("""
        from multiprocessing import Process, Pipe

        def f(conn):
            conn.send([42, None, 'hello'])
            conn.close()

        if __name__ == '__main__':
            parent_conn, child_conn = Pipe()
            p = Process(target=f, args=(child_conn,))
            p.start()
            print(parent_conn.recv())   # prints "[42, None, 'hello']"
            p.join()
        """, "[42, None, 'hello']\n"),
    "lock": ("""
        from multiprocessing import Process, Lock

        def f(l, i):
            l.acquire()
            try:
                print('hello world', i)
            finally:
                l.release()

        if __name__ == '__main__':
            lock = Lock()

            for num in range(10):
                Process(target=f, args=(lock, num)).start()
        """, "".join(f"hello world {i}\n" for i in range(10))),
    "value_array": ("""
        from multiprocessing import Process, Value, Array

        def f(n, a):
            n.value = 3.1415927
            for i in range(len(a)):
                a[i] = -a[i]

        if __name__ == '__main__':
            num = Value('d', 0.0)
            arr = Array('i', range(10))

            p = Process(target=f, args=(num, arr))
            p.start()
            p.join()

            print(num.value)
            print(arr[:])
        """, "3.1415927\n[0, -1, -2, -3, -4, -5, -6, -7, -8, -9]\n"),
    "manager": ("""
        from multiprocessing import Process, Manager

        def f(d, l):
            d[1] = '1'
            d['2'] = 2
            d[0.25] = None
            l.reverse()

        if __name__ == '__main__':
            with Manager() as manager:
                d = manager.dict()
                l = manager.list(range(10))

                p = Process(target=f, args=(d, l))
                p.start()
                p.join()

                print(d)
                print(l)
        """, "{1: '1', '2': 2, 0.25: None}\n[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]\n"),
    "pool": ("""
        from multiprocessing import Pool

        def f(x):
            return x*x

        if __name__ == '__main__':
            with Pool(5) as p:
                print(p.map(f, [1, 2, 3]))
        """, "[1, 4, 9]\n"),
    "context_queue": ("""
        import multiprocessing as mp

        def foo(q):
            q.put('hello')

        if __name__ == '__main__':
            ctx = mp.get_context(METHOD)
            q = ctx.Queue()
            p = ctx.Process(target=foo, args=(q,))
            p.start()
            print(q.get())
            p.join()
        """, "hello\n"),
}


# the documentation's "Using a pool of workers" program: its output has pids
# and an unordered part, so it is checked line by line
POOL_OF_WORKERS = """
    from multiprocessing import Pool, TimeoutError
    import time
    import os

    def f(x):
        return x*x

    if __name__ == '__main__':
        # start 4 worker processes
        with Pool(processes=4) as pool:

            # print "[0, 1, 4,..., 81]"
            print(pool.map(f, range(10)))

            # print same numbers in arbitrary order
            for i in pool.imap_unordered(f, range(10)):
                print(i)

            # evaluate "f(20)" asynchronously
            res = pool.apply_async(f, (20,))      # runs in *only* one process
            print(res.get(timeout=1))             # prints "400"

            # evaluate "os.getpid()" asynchronously
            res = pool.apply_async(os.getpid, ()) # runs in *only* one process
            print(res.get(timeout=1))             # prints the PID of that process

            # launching multiple evaluations asynchronously *may* use more processes
            multiple_results = [pool.apply_async(os.getpid, ()) for i in range(4)]
            print([res.get(timeout=1) for res in multiple_results])

            # make a single worker sleep for 10 seconds
            res = pool.apply_async(time.sleep, (10,))
            try:
                print(res.get(timeout=1))
            except TimeoutError:
                print("We lacked patience and got a multiprocessing.TimeoutError")

            print("For the moment, the pool remains available for more work")

        # exiting the 'with'-block has stopped the pool
        print("Now the pool is closed and no longer available")
    """


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", START_METHODS)
def test_documentation_pool_of_workers_runs_unchanged(method, tmp_path):
    path = tmp_path / "pool_of_workers.py"
    path.write_text(_as_shmipc(POOL_OF_WORKERS, method))
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                         timeout=100, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    squares = [i * i for i in range(10)]
    assert lines[0] == str(squares), out.stdout
    assert sorted(int(x) for x in lines[1:11]) == squares, out.stdout
    assert lines[11] == "400", out.stdout
    pid = int(lines[12])
    pids = eval(lines[13])                       # a list of 4 ints
    assert pid > 0 and len(pids) == 4 and all(isinstance(p, int) for p in pids), out.stdout
    assert lines[14:] == ["We lacked patience and got a multiprocessing.TimeoutError",
                          "For the moment, the pool remains available for more work",
                          "Now the pool is closed and no longer available"], out.stdout


def _as_shmipc(source: str, method: str) -> str:
    """The program with its multiprocessing import swapped for shmipc's and
    the start method set first thing in __main__."""
    source = textwrap.dedent(source)
    source = source.replace("from multiprocessing import", "from shmipc import")
    source = source.replace("import multiprocessing as mp", "import shmipc as mp")
    source = source.replace("METHOD", repr(method))
    return source.replace("if __name__ == '__main__':\n",
                          "if __name__ == '__main__':\n"
                          f"    import shmipc; shmipc.set_start_method({method!r})\n", 1)


def _run(path, tmp_path):
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                         timeout=100, cwd=tmp_path)
    lines = out.stdout.splitlines(True)
    if "hello world" in out.stdout:         # the Lock program's children print in any order
        lines.sort(key=lambda line: int(line.split()[-1]))
    return out, "".join(lines)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", START_METHODS)
@pytest.mark.parametrize("program", sorted(DOC_PROGRAMS))
def test_documentation_program_runs_unchanged(program, method, tmp_path):
    if program == "lock" and method != "fork":
        pytest.skip("the documentation's Lock program does not join its children: under spawn "
                    "and forkserver the parent may exit and unlink its semaphore before a child "
                    "attaches (FileNotFoundError), with multiprocessing too")
    source, expected = DOC_PROGRAMS[program]
    path = tmp_path / f"{program}.py"
    path.write_text(_as_shmipc(source, method))
    out, got = _run(path, tmp_path)
    assert out.returncode == 0, out.stderr
    assert got == expected, out.stderr


# ------------------------------------------------------------ errors as multiprocessing raises them
def _refuse_to_load(kind):
    raise {"unpickling": pickle.UnpicklingError, "attribute": AttributeError}[kind](
        f"this {kind} message does not load here")


class LoadsBadly:
    """Pickles fine; unpickling raises the error named `kind`."""

    def __init__(self, kind):
        self.kind = kind

    def __reduce__(self):
        return _refuse_to_load, (self.kind,)


def _channels(impl):
    """(name, put, get) for a Queue, a SimpleQueue and a Pipe of `impl`."""
    mod = multiprocessing if impl == "multiprocessing" else shmipc
    q, sq = mod.Queue(), mod.SimpleQueue()
    a, b = mod.Pipe()
    return [("Queue", q.put, lambda: q.get(timeout=10)), ("SimpleQueue", sq.put, sq.get),
            ("Pipe", a.send, b.recv)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("impl", ["multiprocessing", "shmipc"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_a_message_that_does_not_unpickle_raises_the_original_error(impl, size):
    """multiprocessing's Queue.get/Connection.recv raise the error unpickling
    raised; shmipc raises UndecodableMessage, which is also that error's type
    (so `except pickle.UnpicklingError` holds), and the channel goes on. A
    large message (over half of shmipc's ring, sent in chunks) the same."""
    padding = bytes(40 << 20) if size == "large" else b""        # > half of the 32 MiB default ring
    for name, put, get in _channels(impl):
        for kind, error in (("unpickling", pickle.UnpicklingError), ("attribute", AttributeError)):
            # from a thread: a large message does not fit in a pipe's buffer
            sender = threading.Thread(target=put, args=((LoadsBadly(kind), padding),))
            sender.start()
            with pytest.raises(error, match=f"this {kind} message does not load") as info:
                get()
            sender.join()
            if impl == "shmipc":
                assert isinstance(info.value, shmipc.errors.UndecodableMessage), (name, info.value)
                assert isinstance(info.value.__cause__, error), name
            put(("next", 1))
            assert get() == ("next", 1), name


# ------------------------------------------------------------ types
@pytest.mark.timeout(300)
def test_lazy_names_are_typed_for_mypy(tmp_path):
    """Every lazily loaded name (shmipc's own and multiprocessing's) has a real
    type for a type checker, not Any; so do the context's factories.
    (mypy is not a dependency: skipped where it is not installed.)"""
    api = pytest.importorskip("mypy.api")
    names = sorted(set(shmipc._LAZY) | set(shmipc._FROM_MULTIPROCESSING))
    lines = ["import shmipc", "ctx = shmipc.get_context('spawn')"]
    lines += [f"reveal_type(shmipc.{name})" for name in names]
    calls = {"shmipc.Queue()": "shmipc.queues.Queue", "shmipc.Pipe()": "Connection",
             "shmipc.Pool()": "shmipc.pool.Pool", "ctx.Queue()": "shmipc.queues.Queue",
             "ctx.SimpleQueue()": "shmipc.queues.SimpleQueue", "ctx.Pipe()": "Connection",
             "ctx.Pool()": "shmipc.pool.Pool", "ctx.Lock()": "multiprocessing.synchronize.Lock",
             "shmipc.ProcessPoolExecutor()": "shmipc.futures.ProcessPoolExecutor"}
    lines += [f"reveal_type({call})" for call in calls]
    path = tmp_path / "uses_shmipc.py"
    path.write_text("\n".join(lines) + "\n")
    out, err, _status = api.run([str(path), "--follow-imports=silent", "--cache-dir",
                                 str(tmp_path / "cache"), "--python-executable", sys.executable])
    revealed = [line.split("Revealed type is ", 1)[1].strip('"') for line in out.splitlines()
                if "Revealed type is" in line]
    assert len(revealed) == len(names) + len(calls), (out, err)
    for name, typ in zip(names, revealed):
        assert typ != "Any", f"shmipc.{name} is Any to mypy"
    for (call, expected), typ in zip(calls.items(), revealed[len(names):]):
        assert expected in typ, (call, typ)
