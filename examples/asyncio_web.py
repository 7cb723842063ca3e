"""An asyncio web server that hands CPU work to worker processes through shmipc
queues and awaits the results, without blocking its event loop and without a
thread per request.

    request --> handler --await tasks.put_async((id, n))--> worker processes
                handler <--future-- dispatcher <--await results.get_async()--

One dispatcher task awaits ``results.get_async()`` (the queue's readiness
descriptor is watched with ``loop.add_reader``) and resolves the future of
the request each result belongs to; handlers only await their future. The
script then plays the client: it sends concurrent HTTP requests over
localhost, checks every answer, and prints the time taken.

Run:  .venv/bin/python examples/asyncio_web.py [--requests 200] [--workers 2]
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing
import time

import shmipc


def fib(n: int) -> int:
    """Deliberately slow: the CPU work the server must not do itself."""
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def worker(tasks: shmipc.Queue, results: shmipc.Queue) -> None:
    """Compute until a None arrives."""
    while (task := tasks.get()) is not None:
        request_id, n = task
        results.put((request_id, fib(n)))


class Server:
    """HTTP/1.0 ``GET /fib/<n>`` answered by worker processes."""

    def __init__(self, tasks: shmipc.Queue, results: shmipc.Queue) -> None:
        self.tasks, self.results = tasks, results
        self.waiting: dict[int, asyncio.Future] = {}
        self.ids = itertools.count()

    async def dispatch(self) -> None:
        """Route each result to the request that asked for it."""
        while True:
            request_id, value = await self.results.get_async()
            fut = self.waiting.pop(request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(value)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = (await reader.readline()).decode()
        while (await reader.readline()) not in (b"\r\n", b""):
            pass                                    # skip the headers
        try:
            n = int(line.split()[1].removeprefix("/fib/"))
            request_id = next(self.ids)
            fut = self.waiting[request_id] = asyncio.get_running_loop().create_future()
            await self.tasks.put_async((request_id, n))
            body, status = str(await fut).encode(), "200 OK"
        except (IndexError, ValueError):
            body, status = b"usage: GET /fib/<n>", "400 Bad Request"
        writer.write(f"HTTP/1.0 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()


async def get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    return response.split(b"\r\n\r\n", 1)[1].decode()


async def main(requests: int, workers: int) -> None:
    tasks, results = shmipc.Queue(), shmipc.Queue()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(tasks, results)) for _ in range(workers)]
    for p in procs:
        p.start()
    server = Server(tasks, results)
    dispatcher = asyncio.create_task(server.dispatch())
    http = await asyncio.start_server(server.handle, "127.0.0.1", 0)
    port = http.sockets[0].getsockname()[1]
    try:
        ticks = 0

        async def heartbeat() -> None:              # proves the loop never stalls
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.create_task(heartbeat())
        ns = [15 + i % 6 for i in range(requests)]
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(get(port, f"/fib/{n}") for n in ns))
        elapsed = time.perf_counter() - t0
        beat.cancel()
        assert answers == [str(fib(n)) for n in ns], "a wrong answer"
        assert await get(port, "/nope") == "usage: GET /fib/<n>"
        print(f"{requests} concurrent requests answered by {workers} worker processes in "
              f"{elapsed:.2f} s; every answer checked; the event loop ticked {ticks} times "
              f"meanwhile (never blocked)")
    finally:
        http.close()
        await http.wait_closed()
        for _ in procs:
            await tasks.put_async(None)
        dispatcher.cancel()
        for p in procs:
            p.join(10)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="asyncio server handing work to shmipc queues")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    asyncio.run(main(args.requests, args.workers))
