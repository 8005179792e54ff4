"""Serving a small aiohttp app for the benchmark until SIGINT/SIGTERM (shared by its helpers).

The same event loop (uvloop when installed) and access-log setting as the gateway, so the
helpers cost what an aiohttp app costs and nothing more.
"""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web


async def _serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    print("listening", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def run(app: web.Application, port: int) -> None:
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(_serve(app, port))
