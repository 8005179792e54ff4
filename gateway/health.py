"""Liveness, readiness and metrics endpoints for whoever runs the gateway.

`/healthz` and `/readyz` are on the public listener, where load balancers look. `/metrics`
needs the admin token and goes where the admin API goes: the public listener, or only the
admin listener when `admin.host` gives it one (so that a split-off admin side keeps account
names and traffic figures off the public address).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from gateway.admin_auth import Denied
from gateway.metrics import CONTENT_TYPE, merge_expositions
from gateway.store import StoreError
from gateway.web_ip import caller_ip

if TYPE_CHECKING:
    from gateway.app import Gateway

log = structlog.get_logger("gateway.health")

# The gateway whose health the public app's routes report, given by `setup`.
GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway")

READY_TIMEOUT = 5.0

# A readiness answer is shared by the probes that arrive while it is worked out and reused
# for this long: probes are unauthenticated, and 64 at once, each with its own checks, took
# about 40% of the sends away. Each answer's write probe is a committed write: this bounds
# them too.
RESULT_REUSE_SECONDS = 1.0
# The monitoring endpoints, which the in-flight limit neither counts nor refuses.
PATHS = ("/healthz", "/readyz", "/metrics")


class Readiness:
    """One gateway's readiness answer, worked out at most about once per second."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self._current: asyncio.Future[tuple[bool, dict[str, Any]]] | None = None
        self._at = 0.0
        # The store's write probe: one at a time, as a write stuck on a lock outlives the
        # answer that gave up waiting for it; the next answer waits for that one again.
        self._probe: asyncio.Future[None] | None = None

    async def result(self) -> tuple[bool, dict[str, Any]]:
        now = asyncio.get_running_loop().time()
        current = self._current
        if current is None or (current.done() and now - self._at >= RESULT_REUSE_SECONDS):
            self._at = now
            current = self._current = asyncio.ensure_future(self._check())
        # Shielded: a probe that hangs up must not cancel the answer the others wait for.
        return await asyncio.shield(current)

    async def _check(self) -> tuple[bool, dict[str, Any]]:
        self.gateway.metrics.readiness_checks.inc()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self.gateway.store.check_writable())
            self._probe.add_done_callback(_ignore_result)
        try:
            return await check_readiness(self.gateway, self._probe)
        finally:
            self._at = asyncio.get_running_loop().time()


READINESS = web.AppKey("readiness", Readiness)


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready to take sends: the store is writable, the operator is up, queues keep up."""
    ready, checks = await request.app[READINESS].result()
    return web.json_response({"status": "ready" if ready else "not ready", "checks": checks},
                             status=200 if ready else 503)


async def check_readiness(gateway: Gateway, probe: asyncio.Future[None]
                          ) -> tuple[bool, dict[str, Any]]:
    """(ready, what was checked); `probe`: the store's write probe (`check_writable`)."""
    checks: dict[str, Any] = {}
    ready = True
    # Not wait_for: a write stuck on a lock must finish (and roll back) on its own time,
    # while the probe answers now.
    done, _ = await asyncio.wait({probe}, timeout=READY_TIMEOUT)
    if not done:
        checks["store"] = f"not writable: no write lock within {READY_TIMEOUT:g} s"
        ready = False
    elif probe.exception() is not None:
        checks["store"] = f"not writable: {probe.exception()}"
        ready = False
    else:
        checks["store"] = "writable"
    delivering_elsewhere = False
    if gateway.worker is not None:
        status = await gateway.worker.status()
        connected = status is not None and status.operator_connected
        checks["operator"] = "connected" if connected else (
            _disconnected(status.operator_detail) if status is not None
            else "delivery worker not answering")
        delivering_elsewhere = status is not None and not status.delivering
    else:
        # No delivery in this process (and no worker): nothing to wait for.
        link = gateway.dispatcher.operator.link_status() if gateway.dispatcher else None
        connected = link is None or link.up
        checks["operator"] = "connected" if connected else _disconnected(
            link.detail if link else "")
    ready = ready and bool(connected)
    guard = gateway.delivery_guard
    if delivering_elsewhere or (guard is not None and not guard.delivering):
        checks["delivery"] = "another gateway delivers from this store"
        ready = False
    try:
        counts = await gateway.store.counts()
        backlog = counts["queued"] + counts["outbox_pending"]
        limit = gateway.config.metrics.max_backlog
        checks["backlog"] = {"messages": counts["queued"], "outbox": counts["outbox_pending"],
                             "limit": limit}
        if backlog > limit:
            ready = False
    except StoreError as exc:
        checks["backlog"] = f"unknown: {exc}"
        ready = False
    return ready, checks


def _disconnected(detail: str) -> str:
    """The operator link down, with its reason (SMPP: "wrong password (ESME_RINVPASWD)")."""
    return f"disconnected: {detail}" if detail else "disconnected"


def _ignore_result(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()


async def metrics(request: web.Request) -> web.Response:
    return await scrape(request, request.app[GATEWAY])


async def scrape(request: web.Request, gateway: Gateway) -> web.Response:
    # The admin API's own check, so that guesses here count there too (and are throttled).
    try:
        access = await gateway.admin_auth.check(request.headers.get("Authorization", ""),
                                                caller_ip(request))
    except Denied as denied:
        headers = {"WWW-Authenticate": "Bearer"} if denied.status == 401 else \
            {"Retry-After": str(denied.retry_after)} if denied.retry_after else None
        return web.json_response({"message": "missing or wrong admin token"
                                  if denied.status in (401, 404) else denied.message},
                                 status=401 if denied.status == 404 else denied.status,
                                 headers=headers)
    if not access.everything:
        # Metrics span every account: a token limited to some may not read them.
        return web.json_response({"message": "this token is limited to some accounts; "
                                  "metrics need a token for all accounts"}, status=403)
    backlog = gateway.metrics.backlog
    # Gauges read at scrape time: counting rows on every change would cost the hot path.
    try:
        counts = await gateway.store.counts()
        for queue in ("queued", "deferred", "sent", "outbox_pending", "outbox_dead"):
            backlog.labels(queue).set(counts[queue])
    except StoreError as exc:
        log.warning("metrics_backlog_unavailable", error=str(exc))
    dispatcher = gateway.dispatcher
    if dispatcher is not None:
        backlog.labels("handover").set(dispatcher.waiting_hand_over)
        backlog.labels("reports").set(dispatcher.waiting_reports)
    if gateway.worker is None:
        return web.Response(body=gateway.metrics.exposition(),
                            headers={"Content-Type": CONTENT_TYPE})
    # Delivery and callback figures live in the worker process: one scrape shows both.
    status = await gateway.worker.status()
    if status is None:
        log.warning("metrics_worker_unavailable")
        body = gateway.metrics.exposition()
    else:
        backlog.labels("handover").set(status.waiting_hand_over)
        backlog.labels("reports").set(status.waiting_reports)
        body = merge_expositions(gateway.metrics.exposition(), status.metrics.encode())
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def setup(app: web.Application, gateway: Gateway) -> None:
    """The public listener's routes, reading `gateway`."""
    app[GATEWAY] = gateway
    app[READINESS] = Readiness(gateway)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if not gateway.config.admin.host:
        app.router.add_get("/metrics", metrics)


def setup_admin(app: web.Application, gateway: Gateway) -> None:
    """`/metrics` on the separate admin listener."""
    app.router.add_get("/metrics", _bound(gateway))


def _bound(gateway: Gateway) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return await scrape(request, gateway)

    return handler
