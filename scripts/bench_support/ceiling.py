"""The framework ceiling: a bare aiohttp app answering the send URL with a constant body.

Same framework, same event loop (uvloop when installed), same access-log setting and the same
URL as the gateway, so the ratio gateway/ceiling is what the gateway's own work costs.
Run by scripts/bench: `python ceiling.py PORT`.
"""

from __future__ import annotations

import sys

from aiohttp import web
from serve import run

PATH = "/cgi-bin/sms/http2sms.cgi"
BODY = b"OK\n1000\n1"


async def answer(_: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="text/plain", charset="utf-8")


if __name__ == "__main__":
    app = web.Application()
    app.router.add_route("GET", PATH, answer)
    run(app, int(sys.argv[1]))
