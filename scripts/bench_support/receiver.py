"""The delivery-report receiver: counts the gateway's callbacks, answers 200 to each.

Run by scripts/bench in its own process (it must not share the gateway's event loop; it does
share the machine's cores): `python receiver.py PORT`. `GET /count` returns
`{"count": N, "malformed": M}`; a callback is malformed when it lacks `id` or `ptt`.
"""

from __future__ import annotations

import json
import sys

from aiohttp import web
from serve import run

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


if __name__ == "__main__":
    app = web.Application()
    app.router.add_get("/count", count)
    app.router.add_get("/dlr/{user}", callback)
    run(app, int(sys.argv[1]))
