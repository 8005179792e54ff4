"""The retention purge: erases personal data and deletes old messages, in small batches.

It runs in the delivery worker's process (`server.delivery_worker`, else wherever delivery
runs): that process already runs the gateway's background loops over the store (claims
and their leases, callbacks), and its store role yields the write lock to the send
process (`writer.WriteTurn`) and does not fsync its commits, which is what a purge that
must never delay a send wants. `http2sms purge` runs the same passes at once.

A pass goes account by account (each with its own days, `gateway.retention`): erase the
personal data due, delete the messages and incoming messages due, then the parts of long
incoming messages kept over a day, then the finished outbox items due, then give the free
pages back (SQLite). Every store call is one transaction of at most `[retention]
batch_size` rows, with a pause between two in which sends take the
lock; one pass at a time across every process and node (`exclusive("purge")`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import structlog

from gateway import retention
from gateway.clock import Clock
from gateway.config import RetentionConfig
from gateway.metrics import Metrics
from gateway.records import PurgeStep
from gateway.retention import AccountRetention, Retention
from gateway.store import MaintenanceStore, PurgedRows, StoreError, Taken, rules

log = structlog.get_logger("gateway.purge")

# Free pages given back per transaction (4 KiB each): a few milliseconds of the lock.
RECLAIM_PAGES = 256
# The first background pass waits this long after the start at most: not in the middle of
# the start, not a whole interval later.
FIRST_PASS_SECONDS = 60.0
LOCK_NAME = "purge"
# The share of the time the purge's batches take at most (see Purger._pause): on a machine
# whose cores the sends need, the purge takes a fifth of one at most.
DUTY = 0.2


@dataclass
class PurgeReport:
    """What one pass did: rows erased and deleted by table, those held back (due but not
    final), pages given back, and how long it took."""

    erased: dict[str, int] = field(default_factory=dict)
    deleted: dict[str, int] = field(default_factory=dict)
    held: int = 0
    pages_freed: int = 0
    seconds: float = 0.0
    # False: another process was purging; this pass did nothing.
    ran: bool = True

    def count(self, kind: str, table: str, rows: int) -> None:
        if not rows:
            return
        tally = self.erased if kind == "erased" else self.deleted
        tally[table] = tally.get(table, 0) + rows

    def as_dict(self) -> dict[str, object]:
        return {"erased": dict(self.erased), "deleted": dict(self.deleted),
                "held": self.held, "pages_freed": self.pages_freed,
                "seconds": round(self.seconds, 3), "ran": self.ran}


_TABLES: dict[PurgedRows, str] = {"messages": "messages", "incoming": "incoming_messages"}


class Purger:
    """Passes of the purge, and the background loop that runs one every interval."""

    def __init__(self, store: MaintenanceStore, clock: Clock, settings: RetentionConfig, *,
                 metrics: Metrics | None = None) -> None:
        self._store = store
        self._clock = clock
        self._settings = settings
        self._metrics = metrics
        self._defaults = Retention(personal_data_days=settings.personal_data_days,
                                   messages_days=settings.messages_days)
        self._task: asyncio.Task[None] | None = None
        self.passes = 0

    # -- the background loop (a `Service` of the gateway) -----------------------------

    async def start(self) -> None:
        if self._settings.interval_seconds > 0:
            self._task = asyncio.create_task(self._loop(), name="purge")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        await self._clock.sleep(min(FIRST_PASS_SECONDS, self._settings.interval_seconds))
        while True:
            try:
                await self.run()
            except StoreError as exc:
                log.error("purge_failed", error=str(exc))
            except Exception as exc:  # a loop that died would stop the retention silently
                log.error("purge_failed", error=repr(exc), exc_info=True)
            await self._clock.sleep(self._settings.interval_seconds)

    # -- passes ---------------------------------------------------------------------------

    def policy(self, account: AccountRetention) -> retention.Cutoffs:
        return retention.cutoffs(self._clock.now(),
                                 retention.effective(self._defaults, account))

    async def preview(self) -> list[dict[str, object]]:
        """What a pass would erase and delete now, by account (`http2sms purge --dry-run`)."""
        found: list[dict[str, object]] = []
        for account in await self._store.retention_settings():
            cut = self.policy(account)
            counts = await self._store.purge_preview(account.account_id,
                                                     erase_before=cut.erase_before,
                                                     delete_before=cut.delete_before)
            found.append({"account": account.account, **counts})
        return found

    async def run(self) -> PurgeReport:
        """One pass over every account; nothing if another process is purging."""
        report = PurgeReport()
        started = time.monotonic()
        try:
            async with self._store.exclusive(LOCK_NAME):
                await self._pass(report)
        except Taken:
            report.ran = False
            log.info("purge_elsewhere", reason="another process is purging this store")
            return report
        report.seconds = time.monotonic() - started
        self.passes += 1
        log.info("purge_done", erased=report.erased, deleted=report.deleted,
                 held=report.held, pages_freed=report.pages_freed,
                 seconds=round(report.seconds, 3))
        return report

    async def _pass(self, report: PurgeReport) -> None:
        limit = self._settings.batch_size
        outbox_before: dict[int, float | None] = {}
        for account in await self._store.retention_settings():
            cut = self.policy(account)
            outbox_before[account.account_id] = cut.delete_before
            for what in ("messages", "incoming"):
                if cut.erase_before is not None:
                    await self._batches(report, "erased", _TABLES[what], partial(
                        self._erase, account.account_id, what, cut.erase_before, limit))
                if cut.delete_before is not None:
                    await self._batches(report, "deleted", _TABLES[what], partial(
                        self._store.delete_due, account.account_id, what,
                        before=cut.delete_before, limit=limit))
        # The parts of long incoming messages hold texts and numbers of no account yet:
        # kept a day at most (their message is then whole, or never will be).
        await self._batches(report, "deleted", "incoming_parts", partial(
            self._parts, self._clock.now() - rules.INCOMING_PARTS_SECONDS, limit))
        default = retention.cutoffs(self._clock.now(), self._defaults).delete_before
        await self._batches(report, "deleted", "outbox", partial(
            self._store.delete_outbox_due, outbox_before, default, limit=limit))
        while freed := await self._store.reclaim_space(pages=RECLAIM_PAGES):
            report.pages_freed += freed
            await self._pause()

    async def _erase(self, account_id: int, what: PurgedRows, before: float, limit: int, *,
                     after_id: int) -> PurgeStep:
        # The store keeps the erasure's place itself (erased rows stay).
        return await self._store.erase_due(account_id, what, before=before, limit=limit)

    async def _parts(self, before: float, limit: int, *, after_id: int) -> PurgeStep:
        # Deleted rows are gone: each batch takes the oldest left, no place to keep.
        return await self._store.delete_parts_due(before=before, limit=limit)

    async def _batches(self, report: PurgeReport, kind: str, table: str,
                       step: Callable[..., Awaitable[PurgeStep]]) -> None:
        """`step(after_id=...)` until it says nothing due is left."""
        after = 0
        while True:
            began = time.monotonic()
            done = await step(after_id=after)
            took = time.monotonic() - began
            rows = done.erased if kind == "erased" else done.deleted
            report.count(kind, table, rows)
            report.held += done.held
            if rows and self._metrics is not None:
                self._metrics.purged.labels(kind, table).inc(rows)
            if done.done:
                return
            after = done.last_id
            await self._pause(took)

    async def _pause(self, took: float = 0.0) -> None:
        """Room for sends after a batch that took `took` seconds: at least the setting's
        pause, and long enough that the purge's batches (their waits for the lock
        included) fill at most `DUTY` of the time, however slow the machine is."""
        # Real time, not the gateway's clock: this is room for sends, not a retention delay.
        await asyncio.sleep(max(self._settings.batch_pause_seconds,
                                took * (1 - DUTY) / DUTY))
