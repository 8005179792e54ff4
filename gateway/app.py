"""Assembling the gateway: the store, the send path, the background services, the web apps."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol
from zoneinfo import ZoneInfo

import structlog
from aiohttp import web

from gateway import admin, health, iprules
from gateway.clock import Clock, SystemClock
from gateway.config import Config
from gateway.credits import RateTable
from gateway.delivery import Dispatcher
from gateway.hooks.alerts import AlertService
from gateway.hooks.callbacks import CallbackHandler
from gateway.hooks.outbox import OutboxWorker, RetryPolicy
from gateway.metrics import Metrics
from gateway.operators import create as create_operator
from gateway.passwords import VerificationCache
from gateway.security import LoginGuard, Throttle
from gateway.send import handler as send_handler
from gateway.send.batcher import GroupCommitter
from gateway.send.pipeline import SendPipeline, SendSettings
from gateway.store import SendOutcome, Store
from gateway.store.sqlite import SQLiteStore

log = structlog.get_logger("gateway.app")


class Service(Protocol):
    """A background part of the gateway (operator, delivery, callbacks, alerts)."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


@dataclass
class Gateway:
    config: Config
    store: Store
    clock: Clock
    committer: GroupCommitter
    pipeline: SendPipeline
    services: list[Service] = field(default_factory=list)
    # Called with every committed batch; the delivery side subscribes here.
    after_commit: list[Callable[[list[SendOutcome]], Awaitable[None] | None]] = \
        field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    dispatcher: Dispatcher | None = None
    callbacks: OutboxWorker | None = None
    alerts: AlertService | None = None

    async def start(self) -> None:
        await self.store.open()
        self.committer.start()
        for service in self.services:
            await service.start()

    async def stop(self) -> None:
        for service in reversed(self.services):
            try:
                await service.stop()
            except Exception as exc:  # keep stopping the others
                log.error("service_stop_failed", service=type(service).__name__,
                          error=str(exc))
        await self.committer.stop()
        await self.store.close()


GATEWAY = web.AppKey("gateway", Gateway)


def build(config: Config, *, store: Store | None = None, clock: Clock | None = None) -> Gateway:
    store = store or SQLiteStore(config.store.path)
    clock = clock or SystemClock()
    hooks: list[Callable[[list[SendOutcome]], Awaitable[None] | None]] = []

    async def after_commit(outcomes: object) -> None:
        for hook in hooks:
            result = hook(list(outcomes))  # type: ignore[call-overload]
            if result is not None:
                await result

    metrics = Metrics(per_account_labels=config.metrics.per_account_labels)
    committer = GroupCommitter(store, clock, max_batch=config.store.max_batch,
                               on_committed=after_commit, metrics=metrics)
    settings = SendSettings(
        tz=ZoneInfo(config.send.timezone),
        rates=RateTable.from_config(config.send.default_rate, config.rates),
        stop_clause=config.send.stop_clause,
        reply_sender=config.send.reply_sender,
        max_recipients=config.send.max_recipients,
    )
    security = config.security
    pipeline = SendPipeline(
        store, committer, settings, VerificationCache(),
        guard=LoginGuard(security.max_failures, security.lockout_seconds),
        throttle=Throttle(security.user_rate_per_second, security.user_burst), clock=clock,
        metrics=metrics)
    gateway = Gateway(config, store, clock, committer, pipeline, after_commit=hooks,
                      metrics=metrics)
    add_delivery(gateway, settings.tz)
    add_alerts(gateway, settings)
    return gateway


def add_delivery(gateway: Gateway, tz: ZoneInfo) -> None:
    """The operator, the dispatcher feeding it and the delivery-report callback worker."""
    config, store, clock = gateway.config, gateway.store, gateway.clock
    cb = config.callbacks
    callbacks = OutboxWorker(
        store, clock, CallbackHandler(cb, tz),
        RetryPolicy(first_retry=cb.first_retry_seconds, max_retry=cb.max_retry_seconds,
                    give_up_after=cb.give_up_after_hours * 3600.0, jitter=cb.jitter_ratio),
        max_concurrency=cb.max_concurrency, per_key=cb.per_host_concurrency,
        # Longer than any attempt can take, or a slow one would be claimed twice.
        lease=3 * cb.timeout_seconds + 60.0, name="callbacks")
    dispatcher = Dispatcher(store, clock, create_operator(config.operator, clock),
                            max_batch=config.operator.max_batch, on_callbacks=callbacks.wake)
    # Started in this order and stopped in reverse: the dispatcher's last reports still
    # reach the callback worker.
    gateway.services += [callbacks, dispatcher]
    gateway.after_commit.append(dispatcher.on_commit)
    gateway.dispatcher = dispatcher
    gateway.callbacks = callbacks


def add_alerts(gateway: Gateway, settings: SendSettings) -> None:
    """The low-credit alert worker: mail over SMTP, SMS through the committer."""
    alerts = AlertService(gateway.config, gateway.store, gateway.clock,
                          gateway.committer.submit, settings.rates, settings.tz)
    # After the dispatcher: started once it can deliver alert SMS, stopped before it.
    gateway.services.append(alerts)
    gateway.after_commit.append(alerts.on_commit)
    gateway.alerts = alerts


def create_app(gateway: Gateway) -> web.Application:
    """The public web app: the send URL (and, unless split off, the admin API)."""
    config = gateway.config
    app = web.Application(client_max_size=config.server.max_request_bytes,
                          middlewares=[inflight_limit(config.server.max_inflight,
                                                      gateway.metrics)])
    app[GATEWAY] = gateway
    app[send_handler.PIPELINE] = gateway.pipeline
    app[send_handler.TRUSTED_PROXIES] = iprules.parse_networks(config.server.trusted_proxies)
    send_handler.setup(app)
    health.setup(app)
    admin.setup(app, gateway)  # /1.0: the admin API, or only its public routes

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.stop()

    app.cleanup_ctx.append(lifecycle)
    return app


def inflight_limit(limit: int, metrics: Metrics | None = None
                   ) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Past `limit` requests at once, answer 503 at once instead of queueing without bound."""
    inflight = 0
    metrics = metrics or Metrics()

    @web.middleware
    async def middleware(request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                         ) -> web.StreamResponse:
        nonlocal inflight
        if inflight >= limit:
            metrics.overloaded.inc()
            return web.json_response({"message": "the gateway is overloaded, retry later"},
                                     status=503, headers={"Retry-After": "1"})
        inflight += 1
        metrics.inflight.inc()
        try:
            return await handler(request)
        finally:
            inflight -= 1
            metrics.inflight.dec()

    return middleware


def ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.server.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.server.tls_cert, config.server.tls_key)
    return context


async def serve(config: Config, *, ready: Callable[[str], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM; the access log stays off because URLs carry passwords."""
    import signal

    gateway = build(config)
    app = create_app(gateway)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=config.server.shutdown_grace_seconds)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port,
                       ssl_context=ssl_context(config), reuse_address=True)
    await site.start()
    try:
        # Its own listener when admin.host is set; None when the admin API shares this one.
        admin_runner = await admin.start_listener(gateway)
    except BaseException:
        await runner.cleanup()
        raise
    scheme = "https" if config.server.tls_cert else "http"
    url = f"{scheme}://{config.server.host}:{config.server.port}"
    log.info("listening", url=url, store=config.store.path)
    if ready is not None:
        ready(url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting_down")
    if admin_runner is not None:
        await admin_runner.cleanup()
    await runner.cleanup()
    log.info("stopped")
