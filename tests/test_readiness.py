"""Readiness descriptors: Connection.fileno() and Queue.fileno() with the
standard library's multiprocessing.connection.wait, select and selectors,
mixed with sockets and pipes; fd passing with multiprocessing.reduction;
real processes under fork and spawn."""
from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import select
import selectors
import signal
import socket
import tempfile
import time
from multiprocessing import reduction

import pytest

import shmipc

METHODS = ["fork", "spawn"]


# ---------------------------------------------------------------- children
def send_after_go(conn, go_fd_holder, items):
    """Wait for the parent's go (a byte on a pipe), then send `items`."""
    go = go_fd_holder.recv()
    assert go == "go"
    for item in items:
        conn.send(item)
    conn.close()


def send_all_and_exit(conn, n):
    for i in range(n):
        conn.send(i)
    conn.close()


def send_then_sleep(conn, ready_w):
    conn.send("last words")
    ready_w.send("sent")
    time.sleep(60)


def put_after_go(q, go, items):
    assert go.recv() == "go"
    for item in items:
        q.put(item)


def reader_selects(conn, report):
    """In the child: wait on conn.fileno() with select, receive 5 messages."""
    got = []
    while len(got) < 5:
        r, _, _ = select.select([conn.fileno()], [], [], 10)
        assert r, "nothing became readable"
        got.append(conn.recv())
    report.send(got)


def receive_fd_and_write(conn, data):
    meta = conn.recv()
    fd = reduction.recv_handle(conn)
    os.write(fd, data + meta.encode())
    os.close(fd)
    conn.send("done")


# ---------------------------------------------------------------- helpers
def go_pipe():
    return multiprocessing.Pipe()


# ---------------------------------------------------------------- tests
@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_stdlib_wait_mixes_shmipc_ends_sockets_and_pipes(method):
    ctx = multiprocessing.get_context(method)
    readers, procs, gos = [], [], []
    for i in range(3):
        r, w = shmipc.Pipe(duplex=False)
        go_r, go_w = multiprocessing.Pipe(duplex=False)
        p = ctx.Process(target=send_after_go, args=(w, go_r, [(i, k) for k in range(5)]))
        p.start()
        w.close()
        readers.append(r)
        procs.append(p)
        gos.append(go_w)
    s1, s2 = socket.socketpair()
    os_r, os_w = os.pipe()
    try:
        objs = readers + [s1, os_r]
        # nothing ready: the timeout is honoured
        t = time.monotonic()
        assert multiprocessing.connection.wait(objs, timeout=0.2) == []
        assert time.monotonic() - t >= 0.15
        s2.send(b"x")
        assert multiprocessing.connection.wait(objs, timeout=10) == [s1]
        s1.recv(1)
        for go in gos:
            go.send("go")
        got, open_readers = [], list(readers)
        while open_readers:
            for r in multiprocessing.connection.wait(open_readers + [os_r], timeout=10):
                assert r in open_readers, "the OS pipe was never written"
                try:
                    got.append(r.recv())
                except EOFError:
                    open_readers.remove(r)
        assert sorted(got) == [(i, k) for i in range(3) for k in range(5)]
        os.write(os_w, b"y")
        # every reader is at EOF (its writer closed): readable, as the pipe
        assert multiprocessing.connection.wait(objs, timeout=10) == readers + [os_r]
    finally:
        for p in procs:
            p.join(20)
        s1.close(), s2.close(), os.close(os_r), os.close(os_w)
        for r in readers:
            r.close()
    assert all(p.exitcode == 0 for p in procs)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_messages_sent_before_anyone_polled_are_readable(method):
    """The writer sends everything and exits before the reader's first
    fileno(): the backlog must still make the descriptor readable (the
    first message of a ring's life is always announced)."""
    ctx = multiprocessing.get_context(method)
    r, w = shmipc.Pipe(duplex=False)
    p = ctx.Process(target=send_all_and_exit, args=(w, 20))
    p.start()
    w.close()
    p.join(30)
    assert p.exitcode == 0
    got = []
    while True:
        assert multiprocessing.connection.wait([r], timeout=10) == [r]
        try:
            got.append(r.recv())
        except EOFError:
            break
    assert got == list(range(20))
    r.close()


@pytest.mark.timeout(60)
def test_selector_registered_once_stays_exact():
    """A selector registered once (as an event loop does): readable exactly
    while something is to receive, across many messages."""
    a, b = shmipc.Pipe()
    sel = selectors.DefaultSelector()
    sel.register(b, selectors.EVENT_READ)
    try:
        assert sel.select(0.05) == []
        for round_ in range(20):
            for i in range(round_ % 4 + 1):
                a.send((round_, i))
            got = []
            while True:
                events = sel.select(0 if got else 10)
                if not events:
                    break
                assert events[0][0].fileobj is b
                got.append(b.recv())
            assert got == [(round_, i) for i in range(round_ % 4 + 1)]
        a.close()
        assert [key.fileobj for key, _ in sel.select(10)] == [b]     # EOF is readable
        with pytest.raises(EOFError):
            b.recv()
    finally:
        sel.close()
        b.close()


@pytest.mark.timeout(60)
def test_writer_killed_makes_the_descriptor_readable():
    ctx = multiprocessing.get_context("fork")
    r, w = shmipc.Pipe(duplex=False)
    ready_r, ready_w = multiprocessing.Pipe(duplex=False)
    p = ctx.Process(target=send_then_sleep, args=(w, ready_w))
    p.start()
    w.close()
    assert ready_r.recv() == "sent"
    assert multiprocessing.connection.wait([r], timeout=10) == [r]
    assert r.recv() == "last words"
    assert multiprocessing.connection.wait([r], timeout=0.1) == []
    os.kill(p.pid, signal.SIGKILL)
    t = time.monotonic()
    assert multiprocessing.connection.wait([r], timeout=10) == [r]
    assert time.monotonic() - t < 5
    with pytest.raises(EOFError):
        r.recv()
    p.join(10)
    r.close()


@pytest.mark.timeout(60)
def test_unpolled_reader_costs_one_readiness_byte():
    """Nobody polls: 1000 sends leave exactly one readiness byte out (the
    first message's), so the put path takes no system call."""
    a, b = shmipc.Pipe()
    for i in range(1000):
        a.send(i)
    peek = b._sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    assert peek == b"R"
    assert [b.recv() for _ in range(1000)] == list(range(1000))
    # the first fileno() finds the ring empty and takes the byte out
    fd = b.fileno()
    assert select.select([fd], [], [], 0)[0] == []
    a.send("x")
    assert select.select([fd], [], [], 10)[0] == [fd]
    a.close(), b.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_fd_passing_interleaved_with_messages(method):
    """A message, then a descriptor, as multiprocessing users do: the
    readiness byte of the message never stands in front of the fd."""
    ctx = multiprocessing.get_context(method)
    a, b = shmipc.Pipe()
    with tempfile.TemporaryFile() as f:
        p = ctx.Process(target=receive_fd_and_write, args=(b, b"payload:"))
        p.start()
        b.close()
        a.send("meta")
        reduction.send_handle(a, f.fileno(), p.pid)
        assert multiprocessing.connection.wait([a], timeout=20) == [a]
        assert a.recv() == "done"
        p.join(20)
        assert p.exitcode == 0
        f.seek(0)
        assert f.read() == b"payload:meta"
    a.close()


@pytest.mark.timeout(60)
def test_fd_passing_after_the_reader_polled():
    a, b = shmipc.Pipe()
    b.fileno()                      # b keeps readiness exact from now on
    r_fd, w_fd = os.pipe()
    try:
        for i in range(3):
            a.send(("fd follows", i))
            reduction.send_handle(a, w_fd, os.getpid())
            assert multiprocessing.connection.wait([b], timeout=10) == [b]
            assert b.recv() == ("fd follows", i)
            got = reduction.recv_handle(b)
            os.write(got, b"%d" % i)
            os.close(got)
        assert os.read(r_fd, 10) == b"012"
    finally:
        os.close(r_fd), os.close(w_fd)
        a.close(), b.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_pickled_end_keeps_its_descriptor(method):
    """The reader end travels to a spawn/fork child and is waited on there
    with select on its fileno()."""
    ctx = multiprocessing.get_context(method)
    a, b = shmipc.Pipe()
    rep_r, rep_w = multiprocessing.Pipe(duplex=False)
    p = ctx.Process(target=reader_selects, args=(b, rep_w))
    p.start()
    b.close()
    for i in range(5):
        a.send(i)
    assert rep_r.poll(20)
    assert rep_r.recv() == list(range(5))
    p.join(20)
    assert p.exitcode == 0
    a.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", METHODS)
def test_queue_descriptor_with_stdlib_wait(method):
    ctx = multiprocessing.get_context(method)
    q = shmipc.Queue()
    go_r, go_w = multiprocessing.Pipe(duplex=False)
    p = ctx.Process(target=put_after_go, args=(q, go_r, list(range(30))))
    p.start()
    s1, s2 = socket.socketpair()
    try:
        assert multiprocessing.connection.wait([q, s1], timeout=0.1) == []
        assert multiprocessing.connection.wait([q._reader], timeout=0) == []
        go_w.send("go")
        got = []
        while len(got) < 30:
            ready = multiprocessing.connection.wait([q, s1], timeout=10)
            assert ready == [q]
            got.append(q.get_nowait())
        assert got == list(range(30))
        assert multiprocessing.connection.wait([q, s1], timeout=0.05) == []
        assert not q._reader.poll(0)
        q.put("again")
        # one reader object, as multiprocessing's (code compares wait's answer with it)
        assert q._reader is q._reader
        assert multiprocessing.connection.wait([q._reader], timeout=10) == [q._reader]
        assert q._reader.poll(10)
        assert q._reader.recv() == "again"
    finally:
        p.join(20)
        s1.close(), s2.close()
    assert p.exitcode == 0


@pytest.mark.timeout(60)
def test_simplex_pipe_and_closed_end():
    r, w = shmipc.Pipe(duplex=False)
    assert isinstance(w.fileno(), int)          # the writer has one too, as multiprocessing's
    w.send(1)
    assert multiprocessing.connection.wait([r], timeout=10) == [r]
    assert r.recv() == 1
    r.close()
    with pytest.raises(OSError):
        r.fileno()
    with pytest.raises(BrokenPipeError):
        w.send(2)
    w.close()


@pytest.mark.timeout(60)
def test_shmipc_wait_counts_messages_received_ahead():
    from shmipc.connection import wait

    a, b = shmipc.Pipe()
    a.send("x")
    assert b.poll(10)                           # taken ahead by poll
    assert wait([b], timeout=0) == [b]
    assert multiprocessing.connection.wait([b], timeout=0) == [b]
    assert b.recv() == "x"
    assert wait([b], timeout=0.05) == []
    a.close(), b.close()
