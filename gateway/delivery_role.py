"""The delivery role in a process of its own: the store's delivery lock, and what runs
while this process holds it.

Two processes deliver this way: the gateway's delivery worker (`gateway.worker_process`,
a child that answers its parent over pipes) and `http2sms deliver` (`gateway.deliver_process`,
alone, with its own signals). Both open the store in the delivery role, wait for its
`delivery` lock, run the same services under it and stop when the lock goes. That part is
written here once: a process that delivers runs the callbacks, the dispatcher (with its
expiry) and the retention purge, whichever process it is. What differs (how each is told to
stop, what it says when ready) stays in its main.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Collection
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from gateway.app import delivery_services
from gateway.clock import SystemClock
from gateway.config import Config
from gateway.delivery import Dispatcher
from gateway.metrics import Metrics
from gateway.purge import Purger
from gateway.server import spare_the_start_up_heap
from gateway.store import Held, StoreError, StoreLifecycle, Taken, open_store

log = structlog.get_logger("gateway.worker")


class DeliveryLost(StoreError):
    """The store's delivery lock went while this worker delivered (PostgreSQL: its
    connection ended, and another worker may deliver already): it stops at once rather
    than deliver beside it. Whoever started it starts it again (the gateway after
    `restart_seconds`, systemd or the container's restart policy for `deliver`)."""


class DeliveryRole:
    """The store opened in the delivery role, its delivery lock, and the delivery services
    run under it.

    `open()`, then `run()`, then `close()` (even when `run` raised). `shared` (`http2sms
    deliver` on PostgreSQL): the lock is held shared, side by side with other such workers.
    """

    def __init__(self, config: Config, metrics: Metrics, *, shared: bool = False) -> None:
        self._config = config
        self._metrics = metrics
        self._shared = shared
        # The delivery role: its writes give way to the sends' and are not synced on their
        # own (see `gateway.store.open_store`).
        self.store = open_store(config.store, "delivery")
        self._held = contextlib.AsyncExitStack()
        # Set once the services run: what answers for the delivery (pokes, status).
        self.dispatcher: Dispatcher | None = None

    async def open(self) -> None:
        await self.store.open()

    async def run(self, until: Collection[asyncio.Future[Any]], *,
                  on_ready: Callable[[Dispatcher], None],
                  on_stop: Callable[[], None] | None = None) -> None:
        """Wait for the store's delivery lock, then deliver until one of `until` is done.

        One of `until` done while waiting for the lock: return at once, with nothing of
        ours to finish. `on_ready` is called once the services run, `on_stop` when one of
        `until` ends their run. Raises DeliveryLost if the lock went meanwhile (after
        stopping the services).
        """
        holding = asyncio.create_task(hold_delivery(self.store, self._held,
                                                    shared=self._shared))
        await asyncio.wait({holding, *until}, return_when=asyncio.FIRST_COMPLETED)
        if not holding.done():
            # Told to stop while another worker delivers: nothing of ours to finish.
            holding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holding
            return
        held = holding.result()
        losing = asyncio.create_task(held.lost.wait())
        config, clock = self._config, SystemClock()
        callbacks, dispatcher = delivery_services(config, self.store, clock, self._metrics,
                                                  ZoneInfo(config.send.timezone),
                                                  follow_store=True, shared=self._shared)
        # The retention purge runs where delivery runs (gateway.purge): with gateways that
        # do not deliver (server.delivery = false), in `deliver` or nowhere. Its writes
        # give way to the sends', and its own lock keeps it to one process per store.
        purger = Purger(self.store, clock, config.retention, metrics=self._metrics)
        try:
            await callbacks.start()
            await dispatcher.start()
            await purger.start()
            self.dispatcher = dispatcher
            on_ready(dispatcher)
            spare_the_start_up_heap()  # full collections paused this process up to 30 ms too
            await asyncio.wait({*until, losing}, return_when=asyncio.FIRST_COMPLETED)
            if on_stop is not None and any(task.done() for task in until):
                on_stop()
        finally:
            losing.cancel()
            await purger.stop()
            await dispatcher.stop()
            await callbacks.stop()
        lost(held)

    async def close(self) -> None:
        # The store before the lock: the next holder finds every write of ours committed.
        await self.store.close()
        await self._held.aclose()


def lost(held: Held) -> None:
    """Raise DeliveryLost if the delivery lock went while this worker held it."""
    if held.lost.is_set():
        log.error("delivery_lock_lost", reason=held.reason,
                  detail="this worker stopped delivering; it is started again")
        raise DeliveryLost(f"the store's delivery lock was lost: {held.reason}")


async def hold_delivery(store: StoreLifecycle, holder: contextlib.AsyncExitStack, *,
                        shared: bool = False) -> Held:
    """Wait until no other delivery worker runs on this store, then keep it that way
    until `holder` closes. `shared` (`http2sms deliver` on PostgreSQL): wait only for a
    worker delivering alone; other shared ones deliver side by side.

    A worker whose parent was killed finishes its batch after a new gateway has started.
    Had both run at once, the old one could mark sent a message the new one had already
    passed over, and that message would wait for the next restart. The store's
    `exclusive("delivery")` lock, held until this worker stops (or dies), makes the new
    worker wait instead. So does a second gateway's worker on the same store, for as
    long as the first gateway runs.
    """
    try:
        return await holder.enter_async_context(store.exclusive("delivery", shared=shared))
    except Taken:
        log.warning("delivery_elsewhere", reason=(
            "a gateway delivering alone (server.delivery true) delivers from this store; "
            "this worker waits for it to stop (set server.delivery = false on the gateways "
            "when `http2sms deliver` workers deliver)") if shared else (
            "another gateway's delivery worker (or this gateway's previous one, finishing) "
            "delivers from this store; this one waits to take over and is not ready "
            "meanwhile"))
        held = await holder.enter_async_context(store.exclusive("delivery", wait=True,
                                                                shared=shared))
        log.warning("delivery_taken_over", reason="the delivery worker that held this store "
                    "stopped; this one delivers now")
        return held
