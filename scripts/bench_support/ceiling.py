"""The framework ceiling: a bare aiohttp app answering the send URL with a constant body.

Same framework, same event loop (uvloop when installed), same access-log setting and the same
URL as the gateway, so the ratio gateway/ceiling is what the gateway's own work costs.
Run by scripts/bench: `python ceiling.py PORT`.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from aiohttp import web

PATH = "/cgi-bin/sms/http2sms.cgi"
BODY = b"OK\n1000\n1"


async def answer(_: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="text/plain", charset="utf-8")


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_route("GET", PATH, answer)
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


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(main(int(sys.argv[1])))
