"""CPU per callback request: the gateway's client against aiohttp's, on the same receiver.

Run by `scripts/bench-callback-client`. Starts the benchmark's receiver in its own process,
then sends N keep-alive GETs, 64 at once, with each client in turn (uvloop when installed),
and prints the client process's CPU time per request. The receiver's CPU is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from yarl import URL

from gateway.hooks.http_client import HttpClient

HERE = Path(__file__).resolve().parent
QUERY = ("id={}&ptt=13&date=2026-11-29+05%3A00%3A00&description=1&descriptionDlr=success"
         "&dlr=1&tag=")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(name: str, get: Callable[[URL], Awaitable[int]], port: int, count: int,
                  concurrency: int) -> None:
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with slots:
            url = URL(f"http://127.0.0.1:{port}/dlr/u?{QUERY.format(i)}", encoded=True)
            status = await get(url)
            if status != 200:
                raise SystemExit(f"{name}: HTTP {status}")

    await asyncio.gather(*(one(i) for i in range(min(count, 1000))))  # warm-up
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    cpu, elapsed = cpu_seconds() - cpu0, time.perf_counter() - t0
    print(f"{name:28} {cpu / count * 1e6:7.1f} µs CPU/request  {count / elapsed:9,.0f} req/s",
          flush=True)


async def main(args: argparse.Namespace, port: int) -> None:
    ours = HttpClient(timeout=10, max_idle_per_origin=args.concurrency,
                      user_agent="http2sms-gateway")
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=10),
        connector=aiohttp.TCPConnector(limit_per_host=args.concurrency),
        cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)

    async def with_aiohttp(url: URL) -> int:
        async with session.get(url, allow_redirects=False) as response:
            return response.status

    try:
        for _ in range(args.rounds):
            await measure("gateway (http_client.py)", ours.get, port, args.requests,
                          args.concurrency)
            await measure("aiohttp ClientSession", with_aiohttp, port, args.requests,
                          args.concurrency)
    finally:
        await ours.close()
        await session.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="alternate runs of each")
    arguments = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        receiver_port = probe.getsockname()[1]
    receiver = subprocess.Popen([sys.executable, str(HERE / "receiver.py"), str(receiver_port)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=HERE)
    try:
        assert receiver.stdout is not None
        if b"listening" not in receiver.stdout.readline():  # serve.py says so when ready
            raise SystemExit("the receiver did not start")
        try:
            import uvloop
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        except ImportError:
            pass
        asyncio.run(main(arguments, receiver_port))
    finally:
        receiver.terminate()
        receiver.wait(10)
