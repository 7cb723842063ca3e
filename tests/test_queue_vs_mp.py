"""Queue, JoinableQueue, SimpleQueue and Pipe: one test body against
multiprocessing and shmipc for what tests/test_queues.py and
tests/test_connection.py do not already compare: JoinableQueue's counting
across a real child, closed-object errors, one-way pipe ends, draining a
closed pipe, send_bytes argument types. Where shmipc differs on purpose the
test says so and asserts shmipc's behaviour (an exception that is a subclass
of the stdlib's); a mismatch that is a bug is xfail(strict=True) with its
reason. (issue 12: one test body against both wherever behaviour should match)"""
from __future__ import annotations

import multiprocessing
import queue

import pytest

import shmipc


def _queues(impl):
    """What makes the queues: multiprocessing's must come from the (fork)
    context the child is started with; shmipc's work with any."""
    return multiprocessing.get_context("fork") if impl is multiprocessing else shmipc


def take_and_mark_done(q, n, out):
    """Take n items, task_done() each, report their sum."""
    total = 0
    for _ in range(n):
        total += q.get(timeout=30)
        q.task_done()
    out.put(total)


def send_all_then_close(conn, items):
    for item in items:
        conn.send(item)
    conn.close()


# ------------------------------------------------------------ JoinableQueue
@pytest.mark.timeout(60)
def test_joinable_queue_counts_work_done_in_a_child(impl):
    kit = _queues(impl)
    q, out = kit.JoinableQueue(), kit.Queue()
    assert q.join() is None                             # nothing put: returns at once
    for i in range(50):
        q.put(i)
    child = multiprocessing.get_context("fork").Process(target=take_and_mark_done, args=(q, 50, out))
    child.start()
    q.join()                                            # returns once the child marked all 50 done
    assert out.get(timeout=30) == sum(range(50))
    child.join(30)
    assert child.exitcode == 0
    with pytest.raises(ValueError, match="task_done\\(\\) called too many times"):
        q.task_done()


@pytest.mark.timeout(30)
def test_task_done_without_a_get(impl):
    q = _queues(impl).JoinableQueue()
    with pytest.raises(ValueError, match="task_done\\(\\) called too many times"):
        q.task_done()
    q.put(1)
    assert q.get(timeout=5) == 1
    q.task_done()
    q.join()


# ------------------------------------------------------------ closed queues
@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["Queue", "JoinableQueue"])
def test_put_and_get_on_a_closed_queue_raise_value_error(impl, kind):
    """multiprocessing raises ValueError("Queue ... is closed"); shmipc raises
    RingClosed, on purpose a subclass of ValueError (and of ShmipcError),
    with the same message shape."""
    q = getattr(_queues(impl), kind)()
    q.close()
    q.close()                                           # twice is fine
    for call in (lambda: q.put(1), lambda: q.get(timeout=1)):
        with pytest.raises(ValueError, match="^Queue <.*> is closed$|^JoinableQueue <.*> is closed$") as info:
            call()
        if impl is shmipc:
            assert isinstance(info.value, shmipc.RingClosed)


@pytest.mark.timeout(30)
def test_join_thread_before_close_is_an_assertion_error(impl):
    q = _queues(impl).Queue()
    with pytest.raises(AssertionError, match="not closed"):
        q.join_thread()
    q.cancel_join_thread()
    q.put(1)
    q.close()
    q.join_thread()


@pytest.mark.timeout(30)
def test_get_on_a_closed_simple_queue(impl):
    """multiprocessing raises OSError('handle is closed'); shmipc raises
    HandleClosed, both an OSError and a RingClosed (a ValueError)."""
    q = _queues(impl).SimpleQueue()
    q.put(1)
    q.close()
    with pytest.raises(OSError, match="is closed") as info:
        q.get()
    if impl is shmipc:
        assert isinstance(info.value, shmipc.RingClosed)
    with pytest.raises(OSError, match="is closed"):
        q.get_many(1) if impl is shmipc else q.get()


@pytest.mark.timeout(30)
def test_empty_on_a_closed_simple_queue_is_an_os_error(impl):
    """Used or not: SimpleQueue.close() closes its reader at once."""
    q = _queues(impl).SimpleQueue()
    q.close()
    with pytest.raises(OSError, match="is closed"):
        q.empty()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["Queue", "JoinableQueue"])
def test_empty_on_a_closed_queue(impl, kind):
    """A Queue's close() is a no-op until the queue was used (put on):
    empty() still answers; once used, empty() after close() raises OSError
    (CPython 3.13's test_closed_queue_empty_exceptions)."""
    kit = _queues(impl)
    q = getattr(kit, kind)()
    q.close()
    q.join_thread()
    assert q.empty() is True
    q = getattr(kit, kind)()
    q.put("foo")
    q.close()
    q.join_thread()
    with pytest.raises(OSError, match="is closed") as info:
        q.empty()
    if impl is shmipc:
        assert isinstance(info.value, shmipc.RingClosed)


# ------------------------------------------------------------ Pipe
@pytest.mark.timeout(30)
def test_one_way_pipe_ends(impl):
    reader, writer = impl.Pipe(duplex=False)
    try:
        assert (reader.readable, reader.writable, writer.readable, writer.writable) == (True, False, False, True)
        with pytest.raises(OSError, match="connection is write-only"):
            writer.recv()
        with pytest.raises(OSError, match="connection is read-only"):
            reader.send(1)
        writer.send({"k": [1, 2]})
        assert reader.recv() == {"k": [1, 2]}
    finally:
        reader.close()
        writer.close()


@pytest.mark.timeout(60)
def test_a_closed_pipe_is_drained_then_eof(impl):
    a, b = impl.Pipe()
    child = multiprocessing.get_context("fork").Process(target=send_all_then_close, args=(a, [1, "two", b"3"]))
    child.start()
    a.close()                                           # the child holds the only writer now
    assert [b.recv(), b.recv(), b.recv()] == [1, "two", b"3"]
    with pytest.raises(EOFError):
        b.recv()
    assert b.poll(0)                                    # EOF is "readable", as for a socket
    child.join(30)
    assert child.exitcode == 0
    b.close()


@pytest.mark.timeout(30)
def test_send_to_a_closed_peer_is_a_broken_pipe(impl):
    a, b = impl.Pipe()
    b.close()
    with pytest.raises(BrokenPipeError):
        a.send(1)
    a.close()


@pytest.mark.timeout(30)
def test_send_bytes_takes_bytes_like_objects_only(impl):
    a, b = impl.Pipe()
    try:
        a.send_bytes(bytearray(b"ab"))
        a.send_bytes(memoryview(b"cd"))
        a.send_bytes(b"abcdef", 2, 3)
        assert [b.recv_bytes(), b.recv_bytes(), b.recv_bytes()] == [b"ab", b"cd", b"cde"]
        with pytest.raises(TypeError):
            a.send_bytes("a str is not bytes")
        a.send_bytes(b"x" * 10)
        small = bytearray(4)
        with pytest.raises(multiprocessing.BufferTooShort) as info:
            b.recv_bytes_into(small)
        assert info.value.args[0] == b"x" * 10          # the message, as multiprocessing hands it back
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_unpicklable_object_fails_its_send_only(impl):
    class Unpicklable:
        def __reduce__(self):
            raise TypeError("refuses to be pickled")

    a, b = impl.Pipe()
    try:
        with pytest.raises(TypeError, match="refuses to be pickled"):
            a.send(Unpicklable())
        a.send("next")
        assert b.recv() == "next"                       # nothing half-sent before it
    finally:
        a.close()
        b.close()


@pytest.mark.timeout(30)
def test_queue_empty_and_full_exceptions_are_the_queue_modules(impl):
    q = _queues(impl).Queue(maxsize=1)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    q.put(1)
    with pytest.raises(queue.Full):
        q.put(2, block=False)
    assert q.get(timeout=5) == 1
