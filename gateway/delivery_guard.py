"""One gateway delivers from a store at a time, in one-process mode too.

The delivery worker (`server.delivery_worker`) holds the store's `exclusive("delivery")`
name while it runs. Without a worker the dispatcher runs in the gateway's own process, and
two such gateways on one store both handed the same messages to the operator: each one
recovers the messages left queued or in flight at its start, and each one hands over the
deferred messages that fall due. `DeliveryGuard` wraps the dispatcher and starts it only
once it holds the name.

A gateway that finds the name taken is a standby: it says so in its log and its `/readyz`
(not ready: a load balancer should send it nothing), and waits for the name. The sends it
accepts meanwhile are stored; the gateway delivering finds them at its next look at the
store (every `poll_seconds` of its dispatcher: it is woken by its own commits only). Taking
over while requests are served,
it delivers with a dispatcher that follows the store (as the delivery worker does), poked
at each of its commits: it finds every message queued, its own and the others', and none
is missed between reading the store and the first commit seen.

A gateway that loses the name without letting go of it (on PostgreSQL: its connection to
the database ended, and another gateway may hold the name a moment later) stops its
dispatcher at once and becomes a standby again: two gateways never deliver side by side
for longer than it takes to learn it (`Held.lost`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence

import structlog

from gateway.delivery import Dispatcher
from gateway.records import SendOutcome
from gateway.store import Held, StoreLifecycle, StoreUnavailable, Taken

log = structlog.get_logger("gateway.delivery")

LOCK_NAME = "delivery"
# A standby that cannot reach the store to wait for the name tries again after this long.
RETRY_SECONDS = 1.0


class DeliveryGuard:
    """A `Service` around the dispatcher: it delivers only while it holds the store's
    `exclusive("delivery")`.

    `dispatcher` delivers when the name is free at the start (services start before any
    request is served); `follower()` builds the store-following dispatcher of a takeover.
    `on_dispatcher` is told which dispatcher runs (the gateway's health and metrics read it).
    """

    def __init__(self, store: StoreLifecycle, dispatcher: Dispatcher,
                 follower: Callable[[], Dispatcher],
                 on_dispatcher: Callable[[Dispatcher], None] | None = None) -> None:
        self._store = store
        self._first = dispatcher
        self._follower = follower
        self._on_dispatcher = on_dispatcher
        self._held = contextlib.AsyncExitStack()
        self._running: Dispatcher | None = None
        self._follows = False
        self._waiting: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None

    @property
    def delivering(self) -> bool:
        """This gateway delivers; False while another one holds delivery on the store."""
        return self._running is not None

    async def start(self) -> None:
        try:
            held = await self._held.enter_async_context(self._store.exclusive(LOCK_NAME))
        except Taken:
            log.warning("delivery_elsewhere", reason="another gateway delivers from this "
                        "store; this one waits to take over and is not ready meanwhile")
            self._waiting = asyncio.create_task(self._take_over(), name="delivery-standby")
            return
        try:
            await self._first.start()
        except BaseException:
            await self._held.aclose()
            raise
        self._running = self._first
        self._watch(held)

    async def _take_over(self) -> None:
        while True:
            try:
                held = await self._held.enter_async_context(
                    self._store.exclusive(LOCK_NAME, wait=True))
                break
            except StoreUnavailable as exc:
                log.error("delivery_standby_failed", error=str(exc), retry_in=RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
        dispatcher = self._follower()
        try:
            await dispatcher.start()
        except Exception as exc:
            # Not ready stays the answer of /readyz; the next start tries again.
            log.error("delivery_take_over_failed", error=str(exc))
            await self._held.aclose()
            return
        except BaseException:
            await self._held.aclose()
            raise
        self._running, self._follows = dispatcher, True
        if self._on_dispatcher is not None:
            self._on_dispatcher(dispatcher)
        log.warning("delivery_taken_over", reason="the gateway delivering from this store "
                    "stopped; this one delivers now")
        self._watch(held)

    def _watch(self, held: Held) -> None:
        self._watching = asyncio.create_task(self._stand_by_when_lost(held),
                                             name="delivery-lock")

    async def _stand_by_when_lost(self, held: Held) -> None:
        await held.lost.wait()
        log.error("delivery_lock_lost", reason=f"{held.reason}: another gateway may deliver "
                  "now; this one stops delivering and waits to take over again")
        running, self._running = self._running, None
        try:
            if running is not None:
                await running.stop()
        except Exception as exc:
            log.error("delivery_stop_failed", error=str(exc))
        finally:
            await self._held.aclose()
        self._waiting = asyncio.create_task(self._take_over(), name="delivery-standby")

    def on_commit(self, outcomes: Sequence[SendOutcome]) -> None:
        """After-commit hook: to the dispatcher delivering, if it is ours."""
        running = self._running
        if running is None:
            return  # stored: whoever delivers next finds them
        if self._follows:
            running.poke()
        else:
            running.on_commit(outcomes)

    def poke(self) -> None:
        """Another node committed sends: the dispatcher delivering, if it is ours, looks
        in the store."""
        if self._running is not None:
            self._running.poke()

    async def stop(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
            self._watching = None
        if self._waiting is not None:
            self._waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._waiting
            self._waiting = None
        running, self._running = self._running, None
        try:
            if running is not None:
                await running.stop()
        finally:
            # Released once its last reports are stored: the next holder starts from there.
            await self._held.aclose()
