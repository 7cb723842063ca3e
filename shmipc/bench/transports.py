"""The transports `shmipc bench` compares, behind one small interface.

A :class:`Transport` is opened in the measurement process *before* it forks
its peer (so anything that must be inherited, such as an arena, a pipe or a
semaphore, exists on both sides); after the fork each process calls
``channel.side("a")`` or ``channel.side("b")`` and gets an :class:`Endpoint`:
``a`` sends on the forward path and receives on the backward one, ``b`` the
other way round. Things that must not cross a fork (a zmq context and its I/O
thread) are made in ``side()``.

Each adapter uses the peer's natural API for the job: ``send_bytes`` on
multiprocessing connections, length framing over ``os.pipe``, ``put``/``get``
on queues (which pickle), and for shmipc three variants of the ring: plain
``put``/``get``, ``put_many``/``get_many`` and ``get_view`` (zero-copy
receive). In-flight data is bounded for every transport (ring capacity, queue
``maxsize``, zmq high-water marks) so a sender cannot "win" by buffering
without limit.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import struct
from typing import Any, Callable

__all__ = ["Transport", "Channel", "Endpoint", "TRANSPORTS", "get_transports", "ring_capacity_for"]

_FRAME = struct.Struct("<Q")
BATCH = 256                      # messages per put_many / get_many call
IO_TIMEOUT = 60.0                # seconds a single blocking call may take before it is a hang


def ring_capacity_for(size: int) -> int:
    """A ring capacity (power of two, >= 1 MiB) that takes messages of `size`
    bytes: one message may use at most half the ring."""
    need = 2 * (size + 4096)
    cap = 1 << 20
    while cap < need:
        cap <<= 1
    return cap


def _bounded_count(size: int, budget: int = 32 << 20, most: int = 10_000) -> int:
    """How many messages of `size` bytes fit in `budget` bytes (at least 4)."""
    return max(4, min(most, budget // max(size, 1)))


class Endpoint:
    """One process's end of a channel.

    ``send(msg)`` / ``recv() -> msg`` always exist; ``send_many(list)`` /
    ``recv_many() -> list`` and ``recv_view()`` (a context manager giving a
    read-only buffer) exist where the transport has them. ``objects`` says
    whether any picklable object (a numpy array) can be sent as is; otherwise
    only bytes-like messages are carried.
    """

    objects = True

    def __init__(self, send: Callable[[Any], Any], recv: Callable[[], Any],
                 close: Callable[[], None] | None = None) -> None:
        self.send = send
        self.recv = recv
        self._close = close
        self.send_obj = send                      # any object (a numpy array)
        self.recv_obj = recv
        self.send_many: Callable[[list], Any] | None = None
        self.recv_many: Callable[[], list] | None = None
        self.recv_view: Callable[[], Any] | None = None

    def close(self) -> None:
        if self._close is not None:
            self._close()


class Channel:
    """A transport opened for one measurement (see the module docstring)."""

    def side(self, which: str) -> Endpoint:
        raise NotImplementedError

    def close(self) -> None:
        """Release what open() made, in the process that made it."""


class Transport:
    """A named way to move messages between a parent and a forked child.

    Attributes:
        name: the label in tables, JSON and plots ("shmipc.ring", "os.pipe").
        shmipc: True for shmipc's own transports (the numerators of ratios).
        mode: "single" (send/recv), "batch" (send_many/recv_many) or "view"
            (send/recv_view).
        requires: modules that must import for the transport to run.
        objects: carries arbitrary objects (else only bytes-like messages).
    """

    name = ""
    shmipc = False
    mode = "single"
    requires: tuple[str, ...] = ()
    objects = True
    note = ""
    workloads: tuple[str, ...] = ("throughput", "pingpong", "numpy")
    reference = False           # a machine floor (memcpy), not a peer to compare with
    min_size = 0                # throughput sizes outside [min_size, max_size] are not measured
    max_size = 1 << 62

    def unavailable(self, load: bool = True) -> str | None:
        """None if the transport can run here, else why not (e.g. not installed).

        With ``load=False`` only look for the modules without importing them
        (the runner's process stays free of their side effects, such as
        threads, and the measurement process does the real import).
        """
        for module in self.requires:
            try:
                if load:
                    importlib.import_module(module)
                elif importlib.util.find_spec(module) is None:
                    return f"not available ({module} is not installed)"
            except Exception as exc:   # ImportError, or a broken install of an optional peer
                return f"not available ({module}: {type(exc).__name__}: {exc})"
        return None

    def open(self, size: int, tmpdir: str) -> Channel:
        """Make a channel for messages of up to `size` bytes."""
        raise NotImplementedError


# ---------------------------------------------------------------- shmipc ring
class _RingChannel(Channel):
    def __init__(self, size: int, mode: str) -> None:
        import shmipc

        cap = ring_capacity_for(size)
        self.mode = mode
        self.arena = shmipc.Arena(2 * cap + (4 << 20))
        self.fwd = self.arena.ring(cap, producers="one", consumers="one")
        self.back = self.arena.ring(cap, producers="one", consumers="one")

    def side(self, which: str) -> Endpoint:
        out, inp = (self.fwd, self.back) if which == "a" else (self.back, self.fwd)
        ep = Endpoint(out.put, inp.get)
        ep.send_many = out.put_many
        ep.recv_many = functools.partial(inp.get_many, BATCH)     # (in C: no Python frame a call)
        ep.recv_view = inp.get_view
        return ep

    def close(self) -> None:
        self.arena.close()


class ShmipcRing(Transport):
    name = "shmipc.ring"
    shmipc = True
    requires = ("shmipc._ring",)
    note = "Ring.put/get, one producer and one consumer"

    def open(self, size: int, tmpdir: str) -> Channel:
        return _RingChannel(size, self.mode)


class ShmipcRingBatch(ShmipcRing):
    name = "shmipc.ring+batch"
    mode = "batch"
    note = f"Ring.put_many/get_many in batches of up to {BATCH} messages"
    workloads = ("throughput",)
    # measured at every size: batching pays for small messages, and a batch
    # of large ones must never be slower than single puts (issue 11)


class ShmipcRingView(ShmipcRing):
    name = "shmipc.ring+view"
    mode = "view"
    note = "Ring.put / zero-copy Ring.get_view (messages of 64 KiB and more)"
    workloads = ("throughput", "numpy")
    # a view saves a copy; for small messages the context manager costs more
    # than the copy it saves, so the variant is only measured where it is used
    min_size = 64 << 10


# ---------------------------------------------------------------- shmipc drop-ins
class _QueueChannel(Channel):
    """Two queues, one per direction (any class with put/get)."""

    def __init__(self, make: Callable[[], Any], put_kw: dict | None = None,
                 get_kw: dict | None = None) -> None:
        self.fwd = make()
        self.back = make()
        self.put_kw = put_kw or {}
        self.get_kw = get_kw or {}

    def side(self, which: str) -> Endpoint:
        out, inp = (self.fwd, self.back) if which == "a" else (self.back, self.fwd)
        put, get = out.put, inp.get
        if self.put_kw or self.get_kw:
            pkw, gkw = self.put_kw, self.get_kw
            return Endpoint(lambda m: put(m, **pkw), lambda: get(**gkw), lambda: _flush(out))
        return Endpoint(put, get, lambda: _flush(out))

    def close(self) -> None:
        for q in (self.fwd, self.back):
            closer = getattr(q, "close", None)
            if closer is not None:
                try:
                    closer()
                except Exception:
                    pass


def _flush(q: Any) -> None:
    """Let a queue with a feeder thread (multiprocessing.Queue) deliver what
    it buffered before the process exits."""
    if hasattr(q, "join_thread"):
        q.close()
        q.join_thread()


class ShmipcQueue(Transport):
    name = "shmipc.Queue"
    shmipc = True
    requires = ("shmipc.queues",)
    note = "shmipc.Queue put/get"

    def open(self, size: int, tmpdir: str) -> Channel:
        import shmipc

        cap = ring_capacity_for(size)
        return _QueueChannel(lambda: shmipc.Queue(capacity=cap))


class _ConnChannel(Channel):
    """A duplex multiprocessing-style Pipe (send_bytes/recv_bytes for bytes)."""

    def __init__(self, pair: tuple[Any, Any]) -> None:
        self.a, self.b = pair

    def side(self, which: str) -> Endpoint:
        mine, other = (self.a, self.b) if which == "a" else (self.b, self.a)
        try:
            other.close()
        except Exception:
            pass
        ep = Endpoint(mine.send_bytes, mine.recv_bytes, mine.close)
        ep.send_obj = mine.send
        ep.recv_obj = mine.recv
        return ep

    def close(self) -> None:
        for c in (self.a, self.b):
            try:
                c.close()
            except Exception:
                pass


class ShmipcPipe(Transport):
    name = "shmipc.Pipe"
    shmipc = True
    requires = ("shmipc.connection",)
    note = "shmipc.Pipe send_bytes/recv_bytes (send/recv for arrays)"

    def open(self, size: int, tmpdir: str) -> Channel:
        import shmipc

        return _ConnChannel(shmipc.Pipe(duplex=True, capacity=ring_capacity_for(size)))


# ---------------------------------------------------------------- peers
LARGE = 64 << 10                 # messages this big are read into a preallocated buffer (+readinto)


def pipe_max_size() -> int:
    """The largest pipe buffer an unprivileged process may ask for."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def tuned_pipe(size: int) -> tuple[int, int, int]:
    """An os.pipe() whose kernel buffer is as large as the shmipc ring for
    messages of `size` bytes, or as large as /proc/sys/fs/pipe-max-size
    allows (F_SETPIPE_SZ), as a careful user would make it: (read fd, write
    fd, buffer bytes actually granted)."""
    import fcntl

    r, w = os.pipe()
    want = min(ring_capacity_for(size), pipe_max_size())
    while want >= 1 << 16:
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, want)
            break
        except OSError:              # over the user's pipe-pages quota: ask for less
            want >>= 1
    return r, w, fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)


class _OsPipeChannel(Channel):
    """Two os.pipe()s carrying 8-byte length-prefixed frames, tuned as a
    careful user would: kernel buffers as large as the ring (or the system's
    maximum), a buffered reader as large, one write() per message or per
    batch, and (``+readinto``) large messages read into a preallocated buffer."""

    def __init__(self, size: int, mode: str = "single") -> None:
        self.mode = mode
        fr, fw, self.pipe_bytes = tuned_pipe(size)
        br, bw, _ = tuned_pipe(size)
        self.fwd, self.back = (fr, fw), (br, bw)
        self._open = {fr, fw, br, bw}      # this process's fds not closed yet (never one closed twice)

    def side(self, which: str) -> Endpoint:
        (fr, fw), (br, bw) = self.fwd, self.back
        if which == "a":
            rfd, wfd, unused = br, fw, (fr, bw)
        else:
            rfd, wfd, unused = fr, bw, (br, fw)
        for fd in unused:
            os.close(fd)
        self._open.clear()                 # from here on the endpoint owns rfd and wfd
        if self.mode == "view":
            # unbuffered: each payload goes from the kernel straight into the
            # preallocated buffer (a buffered reader would copy it twice)
            reader = open(rfd, "rb", buffering=0)
        else:
            reader = open(rfd, "rb", buffering=max(self.pipe_bytes, 1 << 16))
        read, readinto = reader.read, reader.readinto
        head_buf = memoryview(bytearray(8))

        def read_exactly(view: memoryview) -> None:
            got, n = 0, len(view)
            while got < n:
                k = readinto(view[got:])
                if not k:
                    raise EOFError("pipe closed" if got == 0 else "pipe closed mid-frame")
                got += k
        pack, unpack, write, writev = _FRAME.pack, _FRAME.unpack, os.write, os.writev

        def send(msg: Any) -> None:
            n = len(msg) if not isinstance(msg, memoryview) else msg.nbytes
            if n <= 4096:
                data = pack(n) + bytes(msg)
                done = write(wfd, data)
                if done == len(data):
                    return
                _write_all(wfd, memoryview(data)[done:])
                return
            view = memoryview(msg).cast("B")
            done = writev(wfd, [pack(n), view])
            if done < n + 8:
                if done < 8:
                    _write_all(wfd, memoryview(pack(n))[done:])
                    done = 8
                _write_all(wfd, view[done - 8:])

        def send_many(msgs: list) -> None:
            # one write() per batch: the frames joined in one buffer first
            parts = []
            for m in msgs:
                parts.append(pack(len(m)))
                parts.append(m)
            data = b"".join(parts)
            done = write(wfd, data)
            if done < len(data):
                _write_all(wfd, memoryview(data)[done:])

        def recv() -> bytes:
            head = read(8)
            if len(head) != 8:
                raise EOFError("pipe closed")
            (n,) = unpack(head)
            data = read(n)
            if len(data) != n:
                raise EOFError("pipe closed mid-frame")
            return data

        def recv_many() -> list:
            # up to BATCH frames, stopping after an empty one (the end
            # marker); the sender writes whole batches, so this never waits
            # for frames that are not coming
            out = []
            for _ in range(BATCH):
                m = recv()
                out.append(m)
                if not m:
                    break
            return out

        into = {"buf": memoryview(bytearray(0))}

        class _View:
            """recv_view(): the next message read into a buffer allocated once
            and reused (valid until the next receive, like a ring view)."""

            def __init__(self, timeout: float | None = None) -> None:
                pass

            def __enter__(self) -> memoryview:
                read_exactly(head_buf)
                (n,) = unpack(head_buf)
                buf = into["buf"]
                if len(buf) < n:
                    buf = into["buf"] = memoryview(bytearray(n))
                view = buf[:n]
                read_exactly(view)
                return view

            def __exit__(self, *exc: object) -> None:
                pass

        def close() -> None:
            reader.close()
            os.close(wfd)

        ep = Endpoint(send, recv, close)
        ep.objects = False
        ep.send_many = send_many
        ep.recv_many = recv_many
        ep.recv_view = _View
        return ep

    def close(self) -> None:
        for fd in self._open:
            os.close(fd)
        self._open.clear()


def _write_all(fd: int, view: memoryview) -> None:
    while len(view):
        view = view[os.write(fd, view):]


class OsPipe(Transport):
    name = "os.pipe"
    objects = False
    note = "os.pipe, 8-byte length framing, kernel buffer as large as the ring (F_SETPIPE_SZ), buffered reads"

    def open(self, size: int, tmpdir: str) -> Channel:
        return _OsPipeChannel(size, self.mode)


class OsPipeBatch(OsPipe):
    name = "os.pipe+batch"
    mode = "batch"
    note = f"os.pipe with one write() per batch of {BATCH} frames (as shmipc.ring+batch)"
    workloads = ("throughput",)


class OsPipeReadinto(OsPipe):
    name = "os.pipe+readinto"
    mode = "view"
    note = "os.pipe, messages read into one preallocated buffer with readinto (as shmipc.ring+view)"
    workloads = ("throughput", "numpy")
    min_size = ShmipcRingView.min_size


def c_compiler() -> list[str] | None:
    """The compiler Python's extensions are built with (sysconfig's CC), if it is here."""
    import shlex
    import shutil
    import sysconfig

    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")
    return cc if cc and shutil.which(cc[0]) else None


def build_c_ring(tmpdir: str) -> str:
    """Compile c_ring.c (next to this module) into `tmpdir` once; its path.

    Raises:
        RuntimeError: no compiler, or the compilation failed (its output in the message).
    """
    import subprocess

    binary = os.path.join(tmpdir, "c_ring")
    if os.path.exists(binary):
        return binary
    cc = c_compiler()
    if cc is None:
        raise RuntimeError("no C compiler (sysconfig's CC) to build the C ring floor")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "c_ring.c")
    done = subprocess.run([*cc, "-O2", "-o", binary + ".tmp", source, "-lpthread"],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"building the C ring failed: {done.stderr.strip()[-500:]}")
    os.replace(binary + ".tmp", binary)
    return binary


class CRing(Transport):
    """Not a transport: a floor. A C single-producer single-consumer ring of
    the same design as shmipc's (shared memory made before fork, cached
    indices, a bounded spin, then a process-shared sem_t), compiled with the
    compiler Python's extensions use: what the machine gives the design with
    no Python in the way. The receiver copies messages under 64 KiB out (as
    Ring.get) and reads larger ones in place (as get_view), and verifies each
    as the Python receivers do (the run's ``verify``): a floor that skipped
    the comparison would be one for a different job."""

    name = "c-ring"
    mode = "cring"
    reference = True
    note = "C SPSC ring, sem_t + spin, same design (shmipc/bench/c_ring.c, built with sysconfig's CC)"
    workloads = ("throughput",)

    def unavailable(self, load: bool = True) -> str | None:
        if not os.path.exists(os.path.join(os.path.dirname(os.path.abspath(__file__)), "c_ring.c")):
            return "not available (c_ring.c is not installed next to shmipc.bench)"
        if c_compiler() is None:
            return "not available (no C compiler: sysconfig's CC)"
        return None


class Memcpy(Transport):
    """Not a transport: the floor of the machine. One process copies each
    message into a buffer from a Python loop (``buf[:n] = msg``, a memcpy):
    what one copy per message costs with no other process involved. A ring
    copies twice (in and out, on two cores at once), a view once."""

    name = "memcpy"
    mode = "memcpy"
    reference = True
    note = "one process, buf[:n] = msg per message (a memcpy from a Python loop): no IPC, the floor"
    workloads = ("throughput",)


class MpPipe(Transport):
    name = "mp.Pipe"
    note = "multiprocessing.Pipe send_bytes/recv_bytes (send/recv for arrays)"

    def open(self, size: int, tmpdir: str) -> Channel:
        import multiprocessing

        return _ConnChannel(multiprocessing.get_context("fork").Pipe(duplex=True))


class MpQueue(Transport):
    name = "mp.Queue"
    note = "multiprocessing.Queue put/get (pickle, feeder thread), maxsize bounds bytes in flight"

    def open(self, size: int, tmpdir: str) -> Channel:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        # unbounded for small messages (its usual use); bounded for large
        # ones, or the feeder thread would queue gigabytes of references
        maxsize = 0 if size <= 4096 else _bounded_count(size)
        return _QueueChannel(lambda: ctx.Queue(maxsize))


class MpSimpleQueue(Transport):
    name = "mp.SimpleQueue"
    note = "multiprocessing.SimpleQueue put/get (pickle, pipe + lock)"

    def open(self, size: int, tmpdir: str) -> Channel:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        return _QueueChannel(ctx.SimpleQueue)


class FasterFifo(Transport):
    name = "faster-fifo"
    requires = ("faster_fifo",)
    note = "faster_fifo.Queue put/get, buffer as large as the shmipc ring"

    def open(self, size: int, tmpdir: str) -> Channel:
        import faster_fifo

        cap = ring_capacity_for(size)
        return _QueueChannel(lambda: faster_fifo.Queue(max_size_bytes=cap),
                             {"timeout": IO_TIMEOUT}, {"timeout": IO_TIMEOUT})


class _ZmqChannel(Channel):
    def __init__(self, size: int, tmpdir: str) -> None:
        self.address = f"ipc://{tmpdir}/zmq-{os.getpid()}-{id(self)}"
        self.hwm = _bounded_count(size, most=1000)

    def side(self, which: str) -> Endpoint:
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.SNDHWM, self.hwm)
        sock.setsockopt(zmq.RCVHWM, self.hwm)
        sock.setsockopt(zmq.LINGER, 5000)
        if which == "b":
            sock.bind(self.address)
        else:
            sock.connect(self.address)

        def close() -> None:
            sock.close()
            ctx.term()

        ep = Endpoint(sock.send, sock.recv, close)
        ep.objects = False
        return ep


class Zmq(Transport):
    name = "pyzmq"
    requires = ("zmq",)
    objects = False
    note = "pyzmq PAIR over ipc:// in a temporary directory"

    def open(self, size: int, tmpdir: str) -> Channel:
        return _ZmqChannel(size, tmpdir)


# ---------------------------------------------------------------- worker pools
class PoolTransport(Transport):
    """A process pool: selects the pool workload (shmipc/bench/pools.py),
    which measures shmipc's pools and the standard library's together."""

    workloads = ("pool",)


class ShmipcPool(PoolTransport):
    name = "shmipc.Pool"
    shmipc = True
    requires = ("shmipc.pool",)
    note = "shmipc.Pool.map and shmipc.ProcessPoolExecutor.map"


class MpPool(PoolTransport):
    name = "mp.Pool"
    note = "multiprocessing.Pool.map and concurrent.futures.ProcessPoolExecutor.map (fork context)"


class PoolSuite(PoolTransport):
    """Runs shmipc/bench/pools.py (shmipc.Pool and ProcessPoolExecutor against
    the standard library's, alternating) in one measurement process; its rows
    become records of shmipc.Pool, mp.Pool, ..."""

    name = "pools"
    requires = ("shmipc.pool",)
    note = "shmipc/bench/pools.py (also benchmarks/bench_pool.py)"


TRANSPORTS: list[Transport] = [
    ShmipcRing(), ShmipcRingBatch(), ShmipcRingView(), ShmipcQueue(), ShmipcPipe(), ShmipcPool(),
    OsPipe(), OsPipeBatch(), OsPipeReadinto(), MpPipe(), MpQueue(), MpSimpleQueue(), FasterFifo(), Zmq(),
    MpPool(), CRing(), Memcpy(),
]


def get_transports(names: list[str] | None = None) -> list[Transport]:
    """The transports to run, in table order; `names` selects by name or by
    prefix ("shmipc" selects every shmipc transport).

    Raises:
        ValueError: a name that matches no transport (the known ones listed).
    """
    if not names:
        return list(TRANSPORTS)
    chosen: list[Transport] = []
    for name in names:
        hits = [t for t in TRANSPORTS if t.name == name or t.name.startswith(name + ".")
                or t.name.startswith(name + "+")]
        if not hits:
            known = ", ".join(t.name for t in TRANSPORTS)
            raise ValueError(f"unknown transport {name!r}; known: {known}")
        chosen.extend(t for t in hits if t not in chosen)
    return [t for t in TRANSPORTS if t in chosen]
