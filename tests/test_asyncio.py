"""asyncio: awaiting gets and puts on shmipc queues, pipes and rings, with
plain asyncio.run, real processes (fork and spawn): cancellation loses no
message, a dead peer ends the await, close wakes it."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import queue
import signal
import time

import pytest

import shmipc
from shmipc import aio

METHODS = ["fork", "spawn"]


class _Ticker:
    """A task that counts how often the event loop let it run, every
    `interval` seconds: a loop blocked by a call shows as missing ticks.
    Made inside a running loop."""

    def __init__(self, interval: float) -> None:
        self.ticks = 0
        self.task = asyncio.create_task(self._run(interval))

    async def _run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.ticks += 1


# ---------------------------------------------------------------- children
def echo_upper(conn):
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(msg.upper() if isinstance(msg, str) else msg)


def square_worker(tasks, results):
    while True:
        item = tasks.get()
        if item is None:
            return
        results.put((item, item * item))


def drain_slowly(q, n, go):
    assert go.recv() == "go"
    for _ in range(n):
        q.get()


def send_then_hang(conn, ready):
    conn.send("hello")
    ready.send("sent")
    time.sleep(60)


# ---------------------------------------------------------------- pipes
@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_recv_async_and_send_async_with_a_child(method):
    ctx = multiprocessing.get_context(method)
    a, b = shmipc.Pipe(capacity=1 << 12)
    p = ctx.Process(target=echo_upper, args=(b,))
    p.start()
    b.close()

    async def main():
        ticker = _Ticker(0.001)
        words = [f"word{i}" * 20 for i in range(300)]     # more than the ring holds
        sender = asyncio.create_task(_send_all(a, words))
        got = [await a.recv_async() for _ in words]
        await sender
        big = b"z" * 50_000                                # chunked: larger than the ring
        await a.send_async(big)
        assert await a.recv_async() == big
        await a.send_async(None)
        ticker.task.cancel()
        return got, ticker.ticks

    got, ticks = asyncio.run(main())
    assert got == [f"WORD{i}" * 20 for i in range(300)]
    assert ticks > 0            # the loop kept running while we awaited
    a.close()
    p.join(20)
    assert p.exitcode == 0


async def _send_all(conn, items):
    for item in items:
        await conn.send_async(item)


@pytest.mark.timeout(60)
def test_send_bytes_async_and_recv_bytes_async():
    a, b = shmipc.Pipe(capacity=1 << 12)

    async def main():
        small, pickled, big = b"abc", b"\x80\x04K\x07.", bytes(range(256)) * 100
        reader = asyncio.create_task(_recv_bytes_n(b, 3))
        for buf in (small, pickled, big):
            await a.send_bytes_async(buf)
        assert await asyncio.wait_for(reader, 20) == [small, pickled, big]
        await a.send_bytes_async(bytearray(b"0123456789"), 2, 5)
        assert await b.recv_bytes_async() == b"23456"
        await a.send_bytes_async(pickled)
        assert await b.recv_async() == 7        # recv unpickles it, as multiprocessing
        # a bytearray goes pickled (a bytearray record is a chunk of a large message)
        await a.send_async(bytearray(b"xyz"))
        got = await b.recv_async()
        assert type(got) is bytearray and got == bytearray(b"xyz")
        await a.send_async(bytearray(b"uvw"))
        assert pickle.loads(await b.recv_bytes_async()) == bytearray(b"uvw")

    asyncio.run(main())
    a.close(), b.close()


async def _recv_bytes_n(conn, n):
    return [await conn.recv_bytes_async() for _ in range(n)]


@pytest.mark.timeout(60)
def test_chunked_message_between_two_tasks_of_one_loop():
    """Writer and reader of a message larger than the ring in one loop: the
    writer awaits room, the reader must not block the loop."""
    a, b = shmipc.Pipe(capacity=1 << 12)

    async def main():
        big = {"blob": bytes(range(256)) * 400}
        reader = asyncio.create_task(b.recv_async())
        await asyncio.sleep(0)
        await a.send_async(big)
        return big, await asyncio.wait_for(reader, 20)

    big, got = asyncio.run(main())
    assert got == big
    a.close(), b.close()


async def _cancel_patterns(await_one, put, n):
    """Cancel awaits at every stage -- parked on the descriptor, woken but
    not yet resumed, never started -- around `n` puts; return what the
    awaits that completed got, and how many were cancelled."""
    got, cancelled = [], 0
    for i in range(n):
        stage = i % 3
        task = asyncio.create_task(await_one())
        if stage == 0:                      # parked on the descriptor
            for _ in range(3):
                await asyncio.sleep(0)
            task.cancel()
            put(i)
        elif stage == 1:                    # woken by the put, cancelled before it resumes
            for _ in range(3):
                await asyncio.sleep(0)
            put(i)
            await asyncio.sleep(0)
            task.cancel()
        else:                               # cancelled before it ever ran
            put(i)
            task.cancel()
        try:
            got.append(await task)
        except asyncio.CancelledError:
            cancelled += 1
    return got, cancelled


@pytest.mark.timeout(60)
def test_cancelled_recv_async_loses_no_message():
    a, b = shmipc.Pipe()

    async def main():
        got, cancelled = await _cancel_patterns(b.recv_async, a.send, 60)
        while b.poll(0):
            got.append(await b.recv_async())
        return got, cancelled

    got, cancelled = asyncio.run(main())
    assert got == list(range(60))
    assert cancelled >= 20                  # stage 2 always cancels
    a.close(), b.close()


@pytest.mark.timeout(60)
def test_recv_async_raises_eof_when_the_writer_is_killed():
    ctx = multiprocessing.get_context("fork")
    a, b = shmipc.Pipe()
    ready_r, ready_w = multiprocessing.Pipe(duplex=False)
    p = ctx.Process(target=send_then_hang, args=(b, ready_w))
    p.start()
    b.close()
    assert ready_r.recv() == "sent"

    async def main():
        assert await a.recv_async() == "hello"
        waiter = asyncio.create_task(a.recv_async())
        await asyncio.sleep(0.05)
        assert not waiter.done()
        os.kill(p.pid, signal.SIGKILL)
        with pytest.raises(EOFError):
            await asyncio.wait_for(waiter, 10)

    asyncio.run(main())
    p.join(10)
    a.close()


@pytest.mark.timeout(60)
def test_close_wakes_recv_async_and_get_async():
    a, b = shmipc.Pipe()
    q = shmipc.Queue()

    async def main():
        w1 = asyncio.create_task(b.recv_async())
        w2 = asyncio.create_task(q.get_async())
        await asyncio.sleep(0.05)
        b.close()
        q.close()
        with pytest.raises(OSError):
            await asyncio.wait_for(w1, 10)
        with pytest.raises(ValueError):
            await asyncio.wait_for(w2, 10)

    asyncio.run(main())
    a.close()


@pytest.mark.timeout(60)
def test_send_async_to_a_closed_reader_raises_broken_pipe():
    a, b = shmipc.Pipe(capacity=1 << 12)

    async def main():
        while True:                         # fill the ring
            try:
                a._send_ring.put(b"x" * 100, False)
            except queue.Full:
                break
        sender = asyncio.create_task(a.send_async("no room"))
        await asyncio.sleep(0.02)
        assert not sender.done()
        b.close()
        with pytest.raises(BrokenPipeError):
            await asyncio.wait_for(sender, 10)

    asyncio.run(main())
    a.close()


@pytest.mark.timeout(60)
def test_two_awaits_on_one_end_share_the_descriptor():
    a, b = shmipc.Pipe()

    async def main():
        w1 = asyncio.create_task(b.recv_async())
        w2 = asyncio.create_task(b.recv_async())
        await asyncio.sleep(0.01)
        a.send("one")
        done, pending = await asyncio.wait({w1, w2}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1 and done.pop().result() == "one"
        a.send("two")
        (last,) = pending
        assert await asyncio.wait_for(last, 10) == "two"

    asyncio.run(main())
    a.close(), b.close()


# ---------------------------------------------------------------- queues
@pytest.mark.timeout(90)
@pytest.mark.parametrize("method", METHODS)
def test_queue_get_async_from_worker_processes(method):
    ctx = multiprocessing.get_context(method)
    tasks, results = shmipc.Queue(), shmipc.Queue()
    procs = [ctx.Process(target=square_worker, args=(tasks, results)) for _ in range(2)]
    for p in procs:
        p.start()

    async def main():
        for i in range(100):
            await tasks.put_async(i)
        got = dict([await results.get_async(timeout=20) for _ in range(100)])
        with pytest.raises(queue.Empty):
            await results.get_async(timeout=0.05)
        for _ in procs:
            await tasks.put_async(None)
        return got

    got = asyncio.run(main())
    assert got == {i: i * i for i in range(100)}
    for p in procs:
        p.join(20)
        assert p.exitcode == 0


@pytest.mark.timeout(60)
def test_queue_put_async_waits_for_room():
    ctx = multiprocessing.get_context("fork")
    q = shmipc.Queue(maxsize=3)
    go_r, go_w = multiprocessing.Pipe(duplex=False)
    p = ctx.Process(target=drain_slowly, args=(q, 6, go_r))
    p.start()

    async def main():
        for i in range(3):
            await q.put_async(i)
        with pytest.raises(queue.Full):
            await q.put_async("late", timeout=0.05)
        putter = asyncio.create_task(q.put_async(3))
        await asyncio.sleep(0.02)
        assert not putter.done()
        go_w.send("go")
        await asyncio.wait_for(putter, 10)
        for i in range(4, 6):
            await q.put_async(i, timeout=10)

    asyncio.run(main())
    p.join(20)
    assert p.exitcode == 0


@pytest.mark.timeout(60)
def test_cancelled_get_async_loses_no_message():
    q = shmipc.Queue()

    async def main():
        got, cancelled = await _cancel_patterns(q.get_async, q.put, 60)
        while True:
            try:
                got.append(q.get_nowait())
            except queue.Empty:
                return got, cancelled

    got, cancelled = asyncio.run(main())
    assert got == list(range(60))
    assert cancelled >= 20


@pytest.mark.timeout(60)
def test_large_queue_message_put_async_and_get_async_in_one_loop():
    q = shmipc.Queue(capacity=1 << 12)
    big = list(range(20_000))

    async def main():
        await q.put_async(big)
        await q.put_async("small")
        return await q.get_async(timeout=20), await q.get_async(timeout=20)

    assert asyncio.run(main()) == (big, "small")
    q.close()
    q.join_thread()


@pytest.mark.timeout(60)
def test_simple_queue_get_async():
    q = shmipc.SimpleQueue()

    async def main():
        waiter = asyncio.create_task(q.get_async())
        await asyncio.sleep(0.01)
        q.put("x")
        return await asyncio.wait_for(waiter, 10)

    assert asyncio.run(main()) == "x"


# ---------------------------------------------------------------- rings
@pytest.mark.timeout(60)
def test_ring_get_and_put_async():
    arena = shmipc.Arena(shmipc.Arena.size_for(rings=[1 << 12]))
    ring = arena.ring(1 << 12, producers="one", consumers="one")

    async def main():
        with pytest.raises(queue.Empty):
            await aio.ring_get(ring, timeout=0.02)
        n = 0
        while True:
            try:
                ring.put(b"y" * 200, False)
                n += 1
            except queue.Full:
                break
        with pytest.raises(queue.Full):
            await aio.ring_put(ring, b"z" * 200, timeout=0.02)
        putter = asyncio.create_task(aio.ring_put(ring, b"z" * 200, timeout=10))
        got = [await aio.ring_get(ring, timeout=10) for _ in range(n)]
        await putter
        assert await aio.ring_get(ring, timeout=10) == b"z" * 200
        return got, n

    got, n = asyncio.run(main())
    assert n > 0 and got == [b"y" * 200] * n
    ring.close()
    arena.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("then", ["recv_async", "recv", "recv_bytes", "poll", "new loop"])
def test_a_cancelled_chunked_recv_async_leaves_its_message_to_the_next_receive(then):
    """A message larger than the ring is read in a thread. An await
    cancelled just as that read finished (a wait_for timeout) dropped the
    message (231 of 300 arrived under 0.1-3 ms timeouts); a plain recv()
    or poll() after a cancelled one ignored the read under way and read
    the ring beside its thread; asyncio.run cancelled the read with the
    loop, and the next loop's recv_async raised a bare CancelledError.
    The read now belongs to the connection: whatever receives next gets
    the message, in order, once."""
    cap = 1 << 16
    a, b = shmipc.Pipe(capacity=cap)
    big = bytes(range(256)) * (cap // 64)

    async def cancel_as_the_read_ends():
        import threading

        sender = threading.Thread(target=b.send, args=(("big", big),))
        sender.start()
        waiter = asyncio.create_task(a.recv_async())
        while a._frame_read is None:
            await asyncio.sleep(0)
        a._frame_read.result(30)        # the read is over, its result on its way to the loop...
        waiter.cancel()                 # ...when the timeout fires
        with pytest.raises(asyncio.CancelledError):
            await waiter
        sender.join(30)
        await b.send_async(("small", 1))

    asyncio.run(cancel_as_the_read_ends())
    if then == "recv_async":
        async def two():
            return [await a.recv_async(), await a.recv_async()]
        got = asyncio.run(two())
    elif then == "recv":
        got = [a.recv(), a.recv()]
    elif then == "recv_bytes":
        got = [pickle.loads(a.recv_bytes()), pickle.loads(a.recv_bytes())]
    elif then == "poll":
        assert a.poll(30)
        got = [a.recv(), a.recv()]
    else:
        async def cut_short():       # cancelled mid read, in a loop that then ends
            sender = asyncio.create_task(b.send_async(("big", big)))
            waiter = asyncio.create_task(a.recv_async())
            while a._frame_read is None:
                await asyncio.sleep(0)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            await sender            # (the read goes on without the await)

        got = [asyncio.run(asyncio.wait_for(a.recv_async(), 30)) for _ in range(2)]
        asyncio.run(cut_short())
        got += [asyncio.run(asyncio.wait_for(a.recv_async(), 30))]
        assert got.pop() == ("big", big)
    assert got == [("big", big), ("small", 1)]
    assert not a.poll(0)
    a.close()
    b.close()


def _put_when_told(q, go):
    go.recv()
    (q.put if hasattr(q, "put") else q.send)("after the close")
    go.recv()               # (holds the queue's descriptors until the test ends)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["Queue", "Pipe"])
def test_closing_from_another_thread_leaves_the_loop_idle(kind):
    """A get_async/recv_async waiting while another thread closes the queue
    or pipe end: the reader was removed from the loop after the descriptor
    was closed, which epoll cannot do any more while a forked peer still
    holds it; the descriptor stayed readable and the idle loop used 1.00 s
    of CPU a second, for ever. The loop now closes the descriptor itself,
    after removing its reader."""
    import threading

    ctx = multiprocessing.get_context("fork")
    go_here, go_there = ctx.Pipe()
    if kind == "Queue":
        mine = shmipc.Queue()
        mine.fileno()
        peer = ctx.Process(target=_put_when_told, args=(mine, go_there))
    else:
        mine, theirs = shmipc.Pipe()
        peer = ctx.Process(target=_put_when_told, args=(theirs, go_there))
    peer.start()

    fd = mine.fileno()
    what = os.readlink(f"/proc/self/fd/{fd}")       # (pipe:[inode] or socket:[inode])

    async def main():
        waiter = asyncio.create_task(mine.get_async() if kind == "Queue" else mine.recv_async())
        await asyncio.sleep(0.05)
        closer = threading.Thread(target=mine.close)
        closer.start()
        closer.join()           # (this loop's thread waits: close cannot wait for it)
        with pytest.raises((shmipc.RingClosed, OSError, ValueError)):
            await asyncio.wait_for(waiter, 10)
        go_here.send("put")     # the peer writes: its end of the descriptor turns readable
        await asyncio.sleep(0.2)
        cpu = time.process_time()
        await asyncio.sleep(1.0)
        return time.process_time() - cpu

    try:
        used = asyncio.run(main())
    finally:
        go_here.send("end")
        peer.join(10)
    assert used < 0.3, f"the idle loop used {used:.2f} s of CPU in 1 s"
    try:
        still = os.readlink(f"/proc/self/fd/{fd}")
    except FileNotFoundError:
        still = None
    assert still != what, f"the descriptor {fd} ({what}) was never closed"


def _say_then_put(q, go, size):
    go.send("start")
    q.put(b"q" * size)
    go.recv()               # (holds on until the test ends)


@pytest.mark.timeout(60)
def test_a_stalled_large_queue_message_stalls_neither_the_loop_nor_the_timeout():
    """get_async read a message larger than half the ring in the loop's
    own thread: with its writer stopped half way (SIGSTOP), the whole loop
    stood still until the writer died, past get_async's timeout and
    wait_for's. The read is now the queue's, in a thread: the await times
    out on time, the loop runs meanwhile, and once the writer goes on, the
    next get (here a plain get) collects the whole message."""
    cap, size = 1 << 14, 64 << 20
    q = shmipc.Queue(capacity=cap)
    ctx = multiprocessing.get_context("fork")
    go_here, go_there = ctx.Pipe()
    writer = ctx.Process(target=_say_then_put, args=(q, go_there, size))
    writer.start()
    assert go_here.poll(30) and go_here.recv() == "start"

    async def main():
        ticker = _Ticker(0.01)
        first = asyncio.create_task(q.get_async())
        for _ in range(10_000):
            if q._big_read is not None:
                break
            await asyncio.sleep(0.001)
        os.kill(writer.pid, signal.SIGSTOP)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert not q._big_read.done(), "the message was read before the writer stopped"
        start, before = time.monotonic(), ticker.ticks
        with pytest.raises(queue.Empty):
            await q.get_async(timeout=0.3)
        waited = time.monotonic() - start
        ticker.task.cancel()
        return waited, ticker.ticks - before

    try:
        waited, ticked = asyncio.run(main())
        assert waited < 5, f"get_async(timeout=0.3) returned after {waited:.1f} s"
        assert ticked >= 5, f"the loop ran {ticked} times while it waited"
        assert not q.empty()                        # (the message being read counts)
        os.kill(writer.pid, signal.SIGCONT)
        assert q.get(timeout=30) == b"q" * size     # collected whole, once
        assert q.empty() and q._big_read is None
        go_here.send("end")
    finally:
        os.kill(writer.pid, signal.SIGCONT)
        writer.join(10)
        if writer.exitcode is None:
            writer.kill()
    q.close()


def _send_small_sync(conn, n):
    for i in range(n):
        conn.send(("proc", i))
    conn.close()


@pytest.mark.timeout(90)
def test_coroutines_and_processes_sending_on_one_end_keep_every_message_whole():
    """Two coroutines of one loop (one sending messages larger than the ring,
    one small ones, with send_async and send_bytes_async) and a child
    process (blocking send) share one sending end: no record of one lands
    inside another's chunked message, so every message arrives, whole and
    in its sender's order."""
    import threading

    r, w = shmipc.Pipe(duplex=False, capacity=1 << 13)
    big = w._send_ring.max_message_size * 3
    nbig, nsmall, nproc = 12, 300, 300
    child = multiprocessing.get_context("fork").Process(target=_send_small_sync, args=(w, nproc))
    child.start()
    received = []
    reader = threading.Thread(target=lambda: received.extend(r.recv() for _ in range(nbig + nsmall + nproc)))
    reader.start()

    async def big_sender():
        for i in range(nbig):
            if i % 2:
                await w.send_async(("big", i, bytes([i]) * big))
            else:
                await w.send_bytes_async(pickle.dumps(("big", i, bytes([i]) * big)))

    async def small_sender():
        for i in range(nsmall):
            if i % 3:
                await w.send_async(("small", i))
            else:
                await w.send_bytes_async(pickle.dumps(("small", i)))     # a marked pickle: two records
            if i % 10 == 0:
                await asyncio.sleep(0)

    async def main():
        await asyncio.gather(big_sender(), small_sender())

    asyncio.run(main())
    reader.join(60)
    child.join(30)
    assert not reader.is_alive() and child.exitcode == 0
    by = {"big": [], "small": [], "proc": []}
    for msg in received:
        by[msg[0]].append(msg)
    assert [m[1] for m in by["big"]] == list(range(nbig))
    assert all(m[2] == bytes([m[1]]) * big for m in by["big"])
    assert [m[1] for m in by["small"]] == list(range(nsmall))
    assert [m[1] for m in by["proc"]] == list(range(nproc))
    w.close()
    r.close()


@pytest.mark.timeout(60)
def test_a_blocking_send_inside_a_held_async_message_raises_runtime_error():
    """A coroutine calls the blocking send while another coroutine of the
    same loop is in the middle of a chunked send_async on that end: it gets
    RuntimeError (its record once landed inside the chunked message, and a
    fragment of it was delivered); the chunked message arrives whole."""
    import threading

    r, w = shmipc.Pipe(duplex=False, capacity=1 << 13)
    big = os.urandom(100_000)
    got, may_read = [], threading.Event()
    reader = threading.Thread(target=lambda: (may_read.wait(30), got.extend([r.recv_bytes(), r.recv()])))
    reader.start()

    async def other():
        while not w._send_ring._holds_producers():       # the chunked send holds the end now
            await asyncio.sleep(0.001)
        for attempt in (lambda: w.send("x"), lambda: w.send_bytes(b"y" * 10), lambda: w.send_bytes(big)):
            with pytest.raises(RuntimeError, match="middle of a message"):
                attempt()
        may_read.set()

    async def main():
        await asyncio.gather(w.send_bytes_async(big), other())
        await w.send_async("after")

    asyncio.run(main())
    reader.join(30)
    assert got == [big, "after"]
    r.close(), w.close()


def _send_one(conn, how, msg):
    getattr(conn, how)(msg)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how, msg, first, then, expected", [
    ("send", bytearray(b"a" * 100_000), "recv_async", "recv_bytes", pickle.dumps(bytearray(b"a" * 100_000), 5)),
    ("send", b"b" * 100_000, "recv_bytes_async", "recv", b"b" * 100_000),
    ("send_bytes", pickle.dumps(b"c" * 100_000, 2), "recv_async", "recv_bytes", pickle.dumps(b"c" * 100_000, 2)),
    ("send", bytearray(b"d" * 100_000), "recv_bytes_async", "recv", bytearray(b"d" * 100_000)),
], ids=["bytearray-as-bytes", "bytes-as-object", "pickle-as-bytes", "bytearray-as-object"])
def test_a_timed_out_async_read_is_collected_as_the_collecting_receive_asks(how, msg, first, then, expected):
    """A chunked message whose read a recv_async (or recv_bytes_async) began
    and left when it timed out -- its writer stopped midway -- is collected
    by the other kind of receive exactly as that receive gives it: it once
    came converted from the first kind's result (a bytearray's pickle as raw
    bytes, a pickle re-pickled, bytes unpickled: UnpicklingError)."""
    r, w = shmipc.Pipe(duplex=False, capacity=1 << 13)
    proc = multiprocessing.get_context("fork").Process(target=_send_one, args=(w, how, msg))
    proc.start()
    deadline = time.monotonic() + 30
    while r.stats()["recv"]["producers_waiting"] < 1:     # its first chunks in, waiting for room
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGSTOP)

    async def first_receive():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(getattr(r, first)(), 0.3)

    try:
        asyncio.run(first_receive())
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    got = getattr(r, then)()
    assert type(got) is type(expected) and got == expected
    proc.join(30)
    assert proc.exitcode == 0
    w.close(), r.close()
