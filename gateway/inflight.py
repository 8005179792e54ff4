"""The in-flight limit: past a number of requests at once, 503 instead of a queue.

A middleware for any of the gateway's web apps; the public app's also drains at shutdown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection

from aiohttp import web

from gateway.connections import GuardedConnection, connection_of
from gateway.metrics import Metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class InflightLimit:
    """Past `limit` requests at once, answer 503 at once instead of queueing without bound.

    A request counts once its body is in: a client sending its body slowly (or never)
    holds its connection, which the connection guard (`gateway.connections`) caps per
    address and closes past `server.body_timeout_seconds`, never a place of this limit.
    On a guarded connection a request also counts under its client address, up to
    `server.max_inflight_per_address` (beyond: 429). The paths in `unlimited` (the health
    endpoints) are neither counted nor refused: a load balancer must see the process
    alive and ready when it is busy.

    It also drains the app at shutdown. aiohttp's own shutdown stops reading every
    connection at once, so a request whose body is still arriving could never finish;
    `drain` first waits for the requests being read and in flight, while new requests on
    open keep-alive connections get 503 and the connection closed.
    """

    def __init__(self, limit: int, metrics: Metrics | None = None, *,
                 unlimited: Collection[str] = ()) -> None:
        self.limit = limit
        self.inflight = 0
        self.reading = 0
        self.draining = False
        self.unlimited = frozenset(unlimited)
        self._metrics = metrics or Metrics()
        self._idle = asyncio.Event()
        self._idle.set()

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            conn = connection_of(request)
            if conn is None:
                return await self._serve(request, handler, None)
            try:
                return await self._serve(request, handler, conn)
            finally:
                conn.request_ended()

        self.middleware = middleware

    async def _serve(self, request: web.Request, handler: Handler,
                     conn: GuardedConnection | None) -> web.StreamResponse:
        if self.draining:
            response = web.json_response(
                {"message": "the gateway is shutting down, retry later"}, status=503,
                headers={"Retry-After": "1"})
            response.force_close()
            return response
        oversize = False
        if request.can_read_body:
            if conn is not None:
                conn.request_began(body=True)
            if (request.content_length or 0) > request.client_max_size:
                # Refused by the handler's own read, in the app's own words (the admin
                # API's JSON), after at most the limit's worth of bytes and under the
                # guard's body deadline; counted like any request meanwhile.
                oversize = True
            elif not await self._read_body(request):
                return _cut_off()
        if conn is not None and not oversize:
            conn.body_read()
        if request.path in self.unlimited:
            return await handler(request)
        if self.inflight >= self.limit:
            self._metrics.overloaded.inc()
            return web.json_response({"message": "the gateway is overloaded, retry later"},
                                     status=503, headers={"Retry-After": "1"})
        if conn is not None and not conn.request_entered():
            return web.json_response(
                {"message": "too many requests at once from your address, retry later"},
                status=429, headers={"Retry-After": "1"})
        self.inflight += 1
        self._idle.clear()
        self._metrics.inflight.inc()
        try:
            return await handler(request)
        except ConnectionError:
            if not oversize:
                raise
            return _cut_off()
        finally:
            self.inflight -= 1
            self._metrics.inflight.dec()
            self._check_idle()
            if conn is not None:
                conn.request_left()

    async def _read_body(self, request: web.Request) -> bool:
        """Read the whole body (aiohttp keeps it for the handler); False if cut off."""
        self.reading += 1
        self._idle.clear()
        self._metrics.reading.inc()
        try:
            await request.read()
        except ConnectionError:
            return False
        finally:
            self.reading -= 1
            self._metrics.reading.dec()
            self._check_idle()
        return True

    def _check_idle(self) -> None:
        if self.inflight == 0 and self.reading == 0:
            self._idle.set()

    async def drain(self, timeout: float) -> bool:
        """Refuse new requests; wait up to `timeout` for those in flight. True if none left."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, timeout))
        except TimeoutError:
            return False
        return True


def _cut_off() -> web.Response:
    """The answer to a request whose body never came: the guard closed the connection at its
    deadline (or the client left), so nobody reads it, and aiohttp logs nothing."""
    response = web.Response(status=408)
    response.force_close()
    return response


def inflight_limit(limit: int, metrics: Metrics | None = None
                   ) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The middleware of an `InflightLimit` (for apps that never drain, e.g. the admin's)."""
    return InflightLimit(limit, metrics).middleware


INFLIGHT = web.AppKey("inflight", InflightLimit)
