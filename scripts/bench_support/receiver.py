"""The delivery-report receiver: counts the gateway's callbacks, answers 200 to each.

Run by scripts/bench in its own process (it must not share the gateway's event loop; it does
share the machine's cores): `python receiver.py PORT`. `GET /count` returns
`{"count": N, "malformed": M}`; a callback is malformed when it lacks `id` or `ptt`.

It stands for the user's server, which in production runs on another machine, so it is
kept as cheap as it can be: a bare asyncio protocol on llhttp (httptools, which the gateway
already depends on) instead of an aiohttp app. As an aiohttp app it took a quarter of a core
at 4,000 callbacks/s away from the gateway under test on a 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import cast

import httptools

COUNTS = {"count": 0, "malformed": 0}
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nOK"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def is_report(query: bytes) -> bool:
    keys = {field.partition(b"=")[0] for field in query.split(b"&")}
    return b"id" in keys and b"ptt" in keys


class Receiver(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.close()

    # llhttp callbacks
    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        assert self.transport is not None
        path, _, query = self.url.partition(b"?")
        if path.startswith(b"/dlr/"):
            COUNTS["count" if is_report(query) else "malformed"] += 1
            self.transport.write(OK)
        elif path == b"/count":
            body = json.dumps(COUNTS).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        else:
            self.transport.write(NOT_FOUND)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Receiver, "127.0.0.1", port, reuse_address=True)
    print("listening", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(int(sys.argv[1])))
