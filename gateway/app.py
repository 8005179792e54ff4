"""Assembling the gateway: the store, the send path, the background services.

Below the web edges (`gateway.webapp` mounts them) and the process runner (`gateway.server`),
which it does not know: building a gateway changes no process-wide state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol
from zoneinfo import ZoneInfo

import structlog

from gateway.admin_auth import AdminAuth
from gateway.clock import Clock, SystemClock
from gateway.config import Config
from gateway.credits import RateTable
from gateway.delivery import ELSEWHERE_WAIT_SECONDS, Dispatcher
from gateway.delivery_guard import DeliveryGuard
from gateway.hooks.alerts import AlertService
from gateway.hooks.callbacks import CallbackHandler
from gateway.hooks.outbox import OutboxWorker, RetryPolicy
from gateway.incoming import IncomingKeeper
from gateway.metrics import Metrics
from gateway.operators import create as create_operator
from gateway.passwords import VerificationCache
from gateway.purge import Purger
from gateway.records import SendOutcome
from gateway.security import LoginGuard, Throttle
from gateway.send.batcher import GroupCommitter
from gateway.send.pipeline import SendPipeline, SendSettings
from gateway.store import Store, StoreUnavailable, open_store, shown
from gateway.wakeups import WakeUps
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
    # Who may use the admin API and /metrics: one guard against guessing for both.
    admin_auth: AdminAuth
    services: list[Service] = field(default_factory=list)
    # Called with every committed batch; the delivery side subscribes here.
    after_commit: list[Callable[[list[SendOutcome]], Awaitable[None] | None]] = \
        field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    dispatcher: Dispatcher | None = None
    # One-process delivery: delivers only while no other gateway does on the store.
    delivery_guard: DeliveryGuard | None = None
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
                raise StoreUnavailable(f"cannot start on the store "
                                       f"{shown(self.config.store.location)}: "
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


def build(config: Config, *, store: Store | None = None, clock: Clock | None = None,
          delivery_worker: bool = False, delivery: bool = True) -> Gateway:
    """The gateway; `delivery_worker` runs delivery in a child process (see `gateway.worker`),
    no `delivery` leaves it to other processes (`http2sms deliver`)."""
    store = store or open_store(config.store, "send")
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
        max_deferral=config.send.max_deferral_days * 86400.0,
    )
    security = config.security
    pipeline = SendPipeline(
        store, committer, settings,
        VerificationCache(queue_size=security.verification_queue,
                          per_owner=security.verification_queue_per_address),
        guard=LoginGuard(security.max_failures, security.lockout_seconds,
                         ipv6_prefix=security.ipv6_prefix,
                         login_failure_budget=security.login_failure_budget,
                         login_slow_seconds=security.login_slow_seconds,
                         shared_address_users=security.shared_address_users),
        throttle=Throttle(security.user_rate_per_second, security.user_burst), clock=clock,
        metrics=metrics)
    # A short admin.token never gets here: loading the settings refuses it.
    admin_auth = AdminAuth(config.admin.token, store, clock, config.security)
    gateway = Gateway(config, store, clock, committer, pipeline, admin_auth,
                      after_commit=hooks, metrics=metrics)
    if delivery and delivery_worker:
        add_delivery_worker(gateway)
    elif delivery:
        add_delivery(gateway, settings.tz)
    add_alerts(gateway, settings)
    add_wake_ups(gateway)
    return gateway


def delivery_services(config: Config, store: Store, clock: Clock, metrics: Metrics,
                      tz: ZoneInfo, *, follow_store: bool = False, shared: bool = False
                      ) -> tuple[OutboxWorker, Dispatcher]:
    """The delivery-report callback worker and the dispatcher feeding the operator.

    `follow_store`: the sends are committed by another process (see `gateway.worker`).
    `shared`: other dispatchers deliver from the store at the same time (`http2sms deliver`
    on PostgreSQL), so the claims found at the start may be theirs, alive.
    """
    cb = config.callbacks
    callbacks = OutboxWorker(
        store, clock, CallbackHandler(cb, tz, metrics=metrics, own_ports=own_ports(config)),
        RetryPolicy(first_retry=cb.first_retry_seconds, max_retry=cb.max_retry_seconds,
                    give_up_after=cb.give_up_after_hours * 3600.0, jitter=cb.jitter_ratio),
        max_concurrency=cb.max_concurrency, per_key=cb.per_host_concurrency,
        account_share=cb.account_share,
        # Longer than any attempt can take, or a slow one would be claimed twice.
        lease=cb.lease_seconds or 3 * cb.timeout_seconds + 60.0, name="callbacks")
    return callbacks, _dispatcher(config, store, clock, metrics, callbacks, follow_store,
                                  shared=shared)


def _dispatcher(config: Config, store: Store, clock: Clock, metrics: Metrics,
                callbacks: OutboxWorker, follow_store: bool, *,
                shared: bool = False) -> Dispatcher:
    return Dispatcher(store, clock, create_operator(config.operator, clock, metrics),
                      max_batch=config.operator.max_batch, on_callbacks=callbacks.wake,
                      metrics=metrics, follow_store=follow_store,
                      # One delivering process per store (the worker's lock, or the one-
                      # process gateway's DeliveryGuard): claims left at its start are a
                      # previous run's. Shared: they end with their lease, and a receipt
                      # may be for another worker's message, not recorded yet.
                      exclusive=not shared, on_inbound=IncomingKeeper(store),
                      elsewhere_wait=ELSEWHERE_WAIT_SECONDS if shared else 0.0)


def own_ports(config: Config) -> frozenset[int]:
    """The ports this gateway listens on: a callback must never reach them on this machine
    (a callback to its own send URL would send an SMS per delivery report, in a loop)."""
    ports = {config.server.port}
    if config.admin.host and config.admin.port:
        ports.add(config.admin.port)
    return frozenset(ports)


def add_delivery(gateway: Gateway, tz: ZoneInfo) -> None:
    """The operator, the dispatcher feeding it and the callback worker, in this process;
    the dispatcher runs while no other gateway delivers from the store (`DeliveryGuard`)."""
    callbacks, dispatcher = delivery_services(gateway.config, gateway.store, gateway.clock,
                                              gateway.metrics, tz)

    def follower() -> Dispatcher:
        return _dispatcher(gateway.config, gateway.store, gateway.clock, gateway.metrics,
                           callbacks, follow_store=True)

    def running(taken_over: Dispatcher) -> None:
        gateway.dispatcher = taken_over

    guard = DeliveryGuard(gateway.store, dispatcher, follower, running)
    # Started in this order and stopped in reverse: the dispatcher's last reports still
    # reach the callback worker. The retention purge runs where delivery runs (see
    # gateway.purge); its own lock keeps it to one process per store.
    purger = Purger(gateway.store, gateway.clock, gateway.config.retention,
                    metrics=gateway.metrics)
    gateway.services += [callbacks, guard, purger]
    gateway.after_commit.append(guard.on_commit)
    gateway.dispatcher = dispatcher
    gateway.callbacks = callbacks
    gateway.delivery_guard = guard


def add_delivery_worker(gateway: Gateway) -> None:
    """The same services in a child process (`server.delivery_worker`), poked per commit."""
    worker = DeliveryWorker(gateway.config)
    gateway.services.append(worker)
    gateway.after_commit.append(worker.poke)
    gateway.worker = worker


def add_wake_ups(gateway: Gateway) -> None:
    """Other nodes' sends wake the delivery here, their callbacks and alerts the outbox
    workers here (PostgreSQL; see `gateway.wakeups`). Started last, stopped first."""
    messages: list[Callable[[], None]] = []
    outbox: list[Callable[[], None]] = []
    if gateway.worker is not None:
        messages.append(gateway.worker.poke)
    if gateway.delivery_guard is not None:
        messages.append(gateway.delivery_guard.poke)
    if gateway.callbacks is not None:
        outbox.append(gateway.callbacks.wake)
    if gateway.alerts is not None:
        outbox.append(gateway.alerts.worker.wake)
    gateway.services.append(WakeUps(gateway.store, {"messages": messages, "outbox": outbox}))


def add_alerts(gateway: Gateway, settings: SendSettings) -> None:
    """The low-credit alert worker: mail over SMTP, SMS through the committer."""
    alerts = AlertService(gateway.config, gateway.store, gateway.clock,
                          gateway.committer.submit, settings.rates, settings.tz,
                          metrics=gateway.metrics)
    # After the dispatcher: started once it can deliver alert SMS, stopped before it.
    gateway.services.append(alerts)
    gateway.after_commit.append(alerts.on_commit)
    gateway.alerts = alerts
