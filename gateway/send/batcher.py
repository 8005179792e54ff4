"""Group commit: concurrent sends share one transaction and one fsync.

While a batch commits, new orders queue up; the next batch takes them all. Under load the
batches grow by themselves, so each durable send costs a fraction of an fsync; with a single
caller a batch is one order and nothing waits for a timer.

The store says how many batches may commit at once (`SendStore.concurrent_commits`):
SQLite has one writer, so one; PostgreSQL commits concurrent transactions side by side and
flushes their WAL together, so a commit's round trips and flush overlap the next one's.
Orders go to a lane by account, one batch in flight per lane: an account's orders commit
one batch after the other in the order they came, as with one lane, and two batches in
flight never wait for each other's account rows (a batch locks every account it charges
until its commit, so two batches sharing accounts would only queue on the database).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

import structlog

from gateway.clock import Clock
from gateway.metrics import Metrics
from gateway.records import SendOrder, SendOutcome
from gateway.store import SendStore

log = structlog.get_logger("gateway.batcher")


class ShuttingDown(RuntimeError):
    """The committer is stopping or stopped: nothing can be committed any more."""

Committed = Callable[[Sequence[SendOutcome]], Awaitable[None] | None]
Pending = list[tuple[SendOrder, asyncio.Future[SendOutcome]]]


def lane_of(order: SendOrder, lanes: int) -> int:
    """The lane of an order: by account, so one account's orders stay in one lane."""
    return order.account_id % lanes


class GroupCommitter:
    def __init__(self, store: SendStore, clock: Clock, *, max_batch: int = 512,
                 on_committed: Committed | None = None, metrics: Metrics | None = None) -> None:
        self._store = store
        self._clock = clock
        self._max_batch = max_batch
        self._on_committed = on_committed
        self._metrics = metrics or Metrics()
        self.lanes = max(1, store.concurrent_commits)
        self._pending: list[Pending] = [[] for _ in range(self.lanes)]
        self._wake = [asyncio.Event() for _ in range(self.lanes)]
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.batches = 0
        self.in_flight = 0
        self.most_in_flight = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(lane), name=f"group-commit-{lane}")
                       for lane in range(self.lanes)]

    async def stop(self) -> None:
        """Commit what is already queued, then stop."""
        if not self._tasks:
            return
        self._closing = True
        for wake in self._wake:
            wake.set()
        await asyncio.gather(*self._tasks)
        self._tasks = []

    async def submit(self, order: SendOrder) -> SendOutcome:
        if self._closing or not self._tasks or any(task.done() for task in self._tasks):
            raise ShuttingDown("the gateway is not taking sends")
        future: asyncio.Future[SendOutcome] = asyncio.get_running_loop().create_future()
        lane = lane_of(order, self.lanes)
        self._pending[lane].append((order, future))
        self._wake[lane].set()
        # A caller cancelled (a client that hung up) cancels only this future: the order
        # stays in its batch and `_commit` skips settling a future already done. So the
        # commit goes on without asyncio.shield, whose extra future and callbacks were 2.8%
        # of the send process under scripts/bench (py-spy).
        return await future

    async def _run(self, lane: int) -> None:
        pending, wake = self._pending[lane], self._wake[lane]
        while True:
            await wake.wait()
            wake.clear()
            while pending:
                batch = pending[: self._max_batch]
                del pending[: self._max_batch]
                await self._commit(batch)
            if self._closing:
                return

    async def _commit(self, batch: Pending) -> None:
        started = time.perf_counter()
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            outcomes = await self._store.commit_sends([order for order, _ in batch],
                                                      at=self._clock.now())
        except Exception as exc:
            log.error("commit_failed", error=str(exc), batch=len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self.in_flight -= 1
        self._metrics.commit_seconds.observe(time.perf_counter() - started)
        self._metrics.commit_batch.observe(len(batch))
        self.batches += 1
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)
        if self._on_committed is not None:
            try:
                result = self._on_committed(outcomes)
                if result is not None:
                    await result
            except Exception as exc:  # the sends are committed: never fail them now
                log.error("after_commit_failed", error=str(exc))
