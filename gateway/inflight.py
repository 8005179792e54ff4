"""The in-flight limit: past a number of requests at once, 503 instead of a queue.

A middleware for any of the gateway's web apps; the public app's also drains at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from gateway.metrics import Metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InflightLimit:
    """Past `limit` requests at once, answer 503 at once instead of queueing without bound.

    It also drains the app at shutdown. aiohttp's own shutdown stops reading every
    connection at once, so a request whose body is still arriving could never finish;
    `drain` first waits for the requests in flight, while new requests on open keep-alive
    connections get 503 and the connection closed.
    """

    def __init__(self, limit: int, metrics: Metrics | None = None) -> None:
        self.limit = limit
        self.inflight = 0
        self.draining = False
        self._metrics = metrics or Metrics()
        self._idle = asyncio.Event()
        self._idle.set()

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._serve(request, handler)

        self.middleware = middleware

    async def _serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.draining:
            response = web.json_response(
                {"message": "the gateway is shutting down, retry later"}, status=503,
                headers={"Retry-After": "1"})
            response.force_close()
            return response
        if self.inflight >= self.limit:
            self._metrics.overloaded.inc()
            return web.json_response({"message": "the gateway is overloaded, retry later"},
                                     status=503, headers={"Retry-After": "1"})
        self.inflight += 1
        self._idle.clear()
        self._metrics.inflight.inc()
        try:
            return await handler(request)
        finally:
            self.inflight -= 1
            self._metrics.inflight.dec()
            if self.inflight == 0:
                self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests; wait up to `timeout` for those in flight. True if none left."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        except TimeoutError:
            return False
        return True


def inflight_limit(limit: int, metrics: Metrics | None = None
                   ) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware of an `InflightLimit` (for apps that never drain, e.g. the admin's)."""
    return InflightLimit(limit, metrics).middleware


INFLIGHT = web.AppKey("inflight", InflightLimit)
