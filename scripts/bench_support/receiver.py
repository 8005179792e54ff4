"""The delivery-report receiver: counts the gateway's callbacks, answers 200 to each.

Run by scripts/bench in its own process (it must not share the gateway's event loop; it does
share the machine's cores): `python receiver.py PORT`. `GET /count` returns
`{"count": N, "malformed": M}`; a callback is malformed when it lacks `id` or `ptt`.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

from aiohttp import web

COUNTS = {"count": 0, "malformed": 0}


async def callback(request: web.Request) -> web.Response:
    query = request.rel_url.query
    if "id" in query and "ptt" in query:
        COUNTS["count"] += 1
    else:
        COUNTS["malformed"] += 1
    return web.Response(text="OK")


async def count(_: web.Request) -> web.Response:
    return web.Response(text=json.dumps(COUNTS), content_type="application/json")


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_get("/count", count)
    app.router.add_get("/dlr/{user}", callback)
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
