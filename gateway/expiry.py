"""The gateway's end for messages the operator took and never settles.

A real network may never send a message's final report (an SMSC that loses receipts, or
one asked for none): the message would stay `sent` for ever, its callback never called.
An operator that says so (`expiry`, gateway.operators.base) gets its taken messages
settled by the gateway once `after_seconds` passed since they were taken: at the
operator's ptt (SMPP: 8, expired), with its DLR and callback like any final state. A report
that comes later finds the message final and is ignored.

The dispatcher runs `Expirer.run`: every `every` seconds on the clock it reads the messages
in flight (a read, page by page) and settles the overdue ones. Several dispatchers on one
store may settle the same message: the store applies the first final state only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import structlog

from gateway.clock import Clock
from gateway.logs import id_ranges
from gateway.operators.base import Expiry
from gateway.records import OutgoingMessage, StateUpdate
from gateway.store import DeliveryStore

log = structlog.get_logger("gateway.expiry")

# How often the messages in flight are looked at: an expiry is hours after the validity
# period (SMPP: receipt_grace_hours), a few minutes late is nothing, and each look reads
# every message in flight (on the reader, page by page: no write waits for it).
EVERY_SECONDS = 300.0

Settle = Callable[[Sequence[StateUpdate]], Awaitable[None]]


def overdue(messages: Sequence[OutgoingMessage], now: float,
            expiry: Expiry) -> list[StateUpdate]:
    """The final states of the messages taken at least `expiry.after_seconds` ago."""
    return [StateUpdate.from_ptt(m.id, expiry.ptt, now, expiry.note) for m in messages
            if m.sent_at is not None and m.sent_at + expiry.after_seconds <= now]


class Expirer:
    def __init__(self, store: DeliveryStore, clock: Clock, expiry: Expiry, settle: Settle,
                 *, page: int = 1000, every: float = EVERY_SECONDS) -> None:
        self._store = store
        self._clock = clock
        self._expiry = expiry
        self._settle = settle
        self._page = page
        self._every = every

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            waits = {asyncio.ensure_future(self._clock.sleep(self._every)),
                     asyncio.ensure_future(stopping.wait())}
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
            if stopping.is_set():
                return
            try:
                await self.once()
            except Exception as exc:  # tried again at the next look
                log.error("expiry_failed", error=str(exc))

    async def once(self) -> int:
        """Settle the overdue messages in flight now; how many were found."""
        cursor, found = 0, 0
        while True:
            page = await self._store.in_flight(after_id=cursor, limit=self._page)
            if not page:
                return found
            cursor = page[-1].id
            updates = overdue(page, self._clock.now(), self._expiry)
            if updates:
                found += len(updates)
                log.warning("messages_expired", messages=len(updates), ptt=self._expiry.ptt,
                            ids=id_ranges(u.message_id for u in updates))
                await self._settle(updates)
