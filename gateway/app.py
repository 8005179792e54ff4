"""Assembling the gateway: the store, the send path, the background services, the web apps."""

from __future__ import annotations

import asyncio
import gc
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol
from zoneinfo import ZoneInfo

import structlog
from aiohttp import web

from gateway import admin, health, http_parser, iprules
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
from gateway.store import SendOutcome, Store, StoreUnavailable
from gateway.store.sqlite import SQLiteStore
from gateway.worker import DeliveryWorker

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
    worker: DeliveryWorker | None = None

    async def start(self) -> None:
        await self.store.open()
        started: list[Service] = []
        try:
            # Fail at start, not at the first send: a store another process keeps locked,
            # or one on a full or read-only disk, is refused here.
            try:
                await self.store.check_writable()
            except StoreUnavailable as exc:
                raise StoreUnavailable(f"cannot start on the store {self.config.store.path}: "
                                       f"{exc}") from exc
            self.committer.start()
            for service in self.services:
                await service.start()
                started.append(service)
        except BaseException:
            # Undo what started, or its tasks and the store's threads keep the process alive.
            for service in reversed(started):
                with suppress(Exception):
                    await service.stop()
            with suppress(Exception):
                await self.committer.stop()
            await self.store.close()
            raise

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


def build(config: Config, *, store: Store | None = None, clock: Clock | None = None,
          delivery_worker: bool = False) -> Gateway:
    """The gateway; `delivery_worker` runs delivery in a child process (see `serve`)."""
    store = store or SQLiteStore(config.store.path,
                                 busy_timeout=config.store.busy_timeout_seconds,
                                 write_turn="first" if delivery_worker else None)
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
    if delivery_worker:
        add_delivery_worker(gateway)
    else:
        add_delivery(gateway, settings.tz)
    add_alerts(gateway, settings)
    return gateway


def delivery_services(config: Config, store: Store, clock: Clock, metrics: Metrics,
                      tz: ZoneInfo, *, follow_store: bool = False
                      ) -> tuple[OutboxWorker, Dispatcher]:
    """The delivery-report callback worker and the dispatcher feeding the operator.

    `follow_store`: the sends are committed by another process (see `gateway.worker`).
    """
    cb = config.callbacks
    callbacks = OutboxWorker(
        store, clock, CallbackHandler(cb, tz, metrics=metrics),
        RetryPolicy(first_retry=cb.first_retry_seconds, max_retry=cb.max_retry_seconds,
                    give_up_after=cb.give_up_after_hours * 3600.0, jitter=cb.jitter_ratio),
        max_concurrency=cb.max_concurrency, per_key=cb.per_host_concurrency,
        # Longer than any attempt can take, or a slow one would be claimed twice.
        lease=cb.lease_seconds or 3 * cb.timeout_seconds + 60.0, name="callbacks")
    dispatcher = Dispatcher(store, clock, create_operator(config.operator, clock),
                            max_batch=config.operator.max_batch, on_callbacks=callbacks.wake,
                            metrics=metrics, follow_store=follow_store,
                            # A SQLite store has one delivering process (the worker holds a
                            # lock for it): claims left at its start are a previous run's.
                            exclusive=True)
    return callbacks, dispatcher


def add_delivery(gateway: Gateway, tz: ZoneInfo) -> None:
    """The operator, the dispatcher feeding it and the callback worker, in this process."""
    callbacks, dispatcher = delivery_services(gateway.config, gateway.store, gateway.clock,
                                              gateway.metrics, tz)
    # Started in this order and stopped in reverse: the dispatcher's last reports still
    # reach the callback worker.
    gateway.services += [callbacks, dispatcher]
    gateway.after_commit.append(dispatcher.on_commit)
    gateway.dispatcher = dispatcher
    gateway.callbacks = callbacks


def add_delivery_worker(gateway: Gateway) -> None:
    """The same services in a child process (`server.delivery_worker`), poked per commit."""
    worker = DeliveryWorker(gateway.config)
    gateway.services.append(worker)
    gateway.after_commit.append(worker.poke)
    gateway.worker = worker


def add_alerts(gateway: Gateway, settings: SendSettings) -> None:
    """The low-credit alert worker: mail over SMTP, SMS through the committer."""
    alerts = AlertService(gateway.config, gateway.store, gateway.clock,
                          gateway.committer.submit, settings.rates, settings.tz,
                          metrics=gateway.metrics)
    # After the dispatcher: started once it can deliver alert SMS, stopped before it.
    gateway.services.append(alerts)
    gateway.after_commit.append(alerts.on_commit)
    gateway.alerts = alerts


def create_app(gateway: Gateway) -> web.Application:
    """The public web app: the send URL (and, unless split off, the admin API)."""
    config = gateway.config
    # Raw non-ASCII bytes in the send URL, as OVH takes them.
    http_parser.install(always=config.server.raw_url_bytes_always)
    limiter = InflightLimit(config.server.max_inflight, gateway.metrics)
    app = web.Application(client_max_size=config.server.max_request_bytes,
                          middlewares=[limiter.middleware])
    app[GATEWAY] = gateway
    app[INFLIGHT] = limiter
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


def ssl_context(config: Config) -> ssl.SSLContext | None:
    if not config.server.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.server.tls_cert, config.server.tls_key)
    return context


def spare_the_start_up_heap() -> None:
    """Leave what start-up allocated (modules, tables, the app) out of the collector's passes.

    It lives as long as the process, yet each full collection walked all of it again: under
    scripts/bench the send process paused up to 31-54 ms in each of them, about every 2 s,
    which put every request in flight at that moment into the p99. Frozen, the full passes
    took 39 ms in all instead of 164-200 over a run, and p99 went from 50-67 ms to 36-43 ms
    (three runs each, alternating).
    """
    gc.collect()
    gc.freeze()


async def serve(config: Config, *, ready: Callable[[str], None] | None = None) -> None:
    """Run until SIGINT/SIGTERM; the access log stays off because URLs carry passwords."""
    import signal

    grace = config.server.shutdown_grace_seconds
    signals = asyncio.Queue[int]()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signals.put_nowait, sig)
    gateway = build(config, delivery_worker=config.server.delivery_worker)
    app = create_app(gateway)
    # `shut_down` drains the requests itself; aiohttp then only cancels what is left.
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=min(1.0, grace / 4),
                           max_line_size=config.server.max_url_bytes)
    await runner.setup()
    admin_runner: web.AppRunner | None = None
    try:
        site = web.TCPSite(runner, config.server.host, config.server.port,
                           ssl_context=ssl_context(config), reuse_address=True)
        await site.start()
        # Its own listener when admin.host is set; None when the admin API shares this one.
        admin_runner = await admin.start_listener(gateway)
    except BaseException:
        await runner.cleanup()
        raise
    scheme = "https" if config.server.tls_cert else "http"
    url = f"{scheme}://{config.server.host}:{config.server.port}"
    log.info("listening", url=url, store=config.store.path)
    spare_the_start_up_heap()
    if ready is not None:
        ready(url)
    await signals.get()
    log.info("shutting_down", grace_seconds=grace)
    clean = await shut_down(runner, gateway, grace, admin_runner=admin_runner, hurry=signals)
    log.info("stopped", clean=clean)


# The share of the grace period that requests in flight get to finish.
DRAIN_SHARE = 0.75


async def shut_down(runner: web.AppRunner, gateway: Gateway, grace: float, *,
                    admin_runner: web.AppRunner | None = None,
                    hurry: asyncio.Queue[int] | None = None) -> bool:
    """Stop accepting, let requests in flight finish, stop the gateway: all within `grace`.

    Requests get 3/4 of the grace period, the services' flush the rest. Past the grace
    period (or at a second signal) what still runs is cut. That is safe: an answered send
    is already committed, and deliveries and callbacks resume from the store at the next
    start. Returns False when something had to be cut.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max(0.0, grace)
    runners = [r for r in (admin_runner, runner) if r is not None]
    for each in runners:
        for site in list(each.sites):
            await site.stop()

    async def drain() -> None:
        limiter = runner.app[INFLIGHT]
        if not await limiter.drain(grace * DRAIN_SHARE):
            log.warning("shutdown_requests_cut", requests=limiter.inflight)
        # The public app's cleanup stops the gateway, so it goes last.
        for each in runners:
            await each.cleanup()

    work = asyncio.ensure_future(drain())
    second = asyncio.ensure_future(hurry.get()) if hurry is not None else None
    try:
        await asyncio.wait({work} if second is None else {work, second},
                           timeout=max(0.0, deadline - loop.time()),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        if second is not None:
            second.cancel()
    if work.done():
        if not work.cancelled() and work.exception() is not None:
            log.error("shutdown_failed", error=str(work.exception()))
            return False
        return True
    hurried = second is not None and second.done() and not second.cancelled()
    log.warning("shutdown_cut", grace_seconds=grace,
                reason="second signal" if hurried else "grace period over")
    work.cancel()
    if gateway.worker is not None:
        gateway.worker.kill()
    # Stopping services may take a moment to notice the cancellation; do not wait long.
    await asyncio.wait({work}, timeout=1.0)
    with suppress(Exception):
        await asyncio.wait_for(gateway.store.close(), 1.0)
    return False
