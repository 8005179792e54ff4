"""The dispatcher: from committed sends to the operator, and from its reports to the store.

Three loops, each working in batches so that the operator side keeps up with the group-
committed send side:

- hand-over: messages committed for immediate delivery (given by `on_commit`, which only
  queues in memory so the send path never waits), and at start the messages a previous run
  left queued or in flight, go to the operator; then one `mark_sent` per batch.
- deferred: sleeps on the clock until the earliest `deferred_until` (woken early when a
  nearer one is committed) and hands over what is due. Deferred messages stay in the store
  only, so they survive restarts and never fill memory.
- reports: the operator's state updates are buffered and applied with one `apply_updates`
  transaction per batch (a batch is whatever arrived while the previous one committed);
  when that queued callbacks, the callback worker is woken.

In a delivery worker process (`follow_store`), commits happen in another process, so there
is no `on_commit`: the hand-over loop keeps reading the store past the newest message it has
seen, whenever `poke` says something was committed and at least every `poll_seconds`.

Delivery is at least once: a crash between the operator taking a message and `mark_sent`
committing hands it over again at the next start.

Logs: per-message events (`message_submitted`, `message_resumed`, `message_state`) are at
debug level, and only built when debug is on, so a busy gateway pays nothing for them;
trouble with a batch is logged once per batch with its message id ranges (`ids`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

import structlog

from gateway.clock import Clock, sleep_until
from gateway.logs import id_ranges
from gateway.metrics import Metrics
from gateway.operators import Operator, OperatorUnavailable
from gateway.records import AppliedUpdates, OutgoingMessage, SendOutcome, StateUpdate
from gateway.store import DeliveryStore

log = structlog.get_logger("gateway.delivery")


class Dispatcher:
    def __init__(self, store: DeliveryStore, clock: Clock, operator: Operator, *,
                 max_batch: int = 1000, retry_seconds: float = 5.0,
                 on_callbacks: Callable[[], None] | None = None,
                 metrics: Metrics | None = None, follow_store: bool = False,
                 poll_seconds: float = 1.0) -> None:
        self._store = store
        self._metrics = metrics or Metrics()
        self._clock = clock
        self.operator = operator
        self._max_batch = max(1, max_batch)
        self._retry_seconds = retry_seconds
        self._on_callbacks = on_callbacks
        self._ready: deque[OutgoingMessage] = deque()
        self._ready_wake = asyncio.Event()
        self._next_deferred: float | None = None
        self._deferred_wake = asyncio.Event()
        self._reports: list[StateUpdate] = []
        self._reports_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._operator_stopped = False
        # Messages with a higher id reach us through on_commit; the others by recovery.
        self._live_after: int | None = None
        self._started_at_id = 0
        # Set once the messages stored before the start are read back. The deferred loop
        # waits for it: a deferred message it marked sent meanwhile would look like one
        # to resume, and go to the operator twice.
        self._recovered = asyncio.Event()
        self._follow = follow_store
        self._poll = poll_seconds
        self._tasks: list[asyncio.Task[None]] = []
        self._report_task: asyncio.Task[None] | None = None
        self.submitted = 0
        self.applied = 0

    # -- inputs ------------------------------------------------------------------------

    def on_commit(self, outcomes: Sequence[SendOutcome]) -> None:
        """After-commit hook of the send path: queue in memory, never wait."""
        if self._live_after is None or self._stopping.is_set():
            return  # the store has them; the next start recovers them
        nearest: float | None = None
        for outcome in outcomes:
            if not outcome.accepted:
                continue
            for message in outcome.messages:
                if message.id <= self._live_after:
                    continue
                if message.deferred_until is None:
                    self._ready.append(message)
                elif nearest is None or message.deferred_until < nearest:
                    nearest = message.deferred_until
        if self._ready:
            self._ready_wake.set()
        if nearest is not None and (self._next_deferred is None
                                    or nearest < self._next_deferred):
            self._next_deferred = nearest
            self._deferred_wake.set()

    def poke(self) -> None:
        """Another process committed sends: look in the store (`follow_store` mode)."""
        self._ready_wake.set()
        self._deferred_wake.set()

    def report(self, updates: Sequence[StateUpdate]) -> None:
        """The operator's report sink."""
        self._reports.extend(updates)
        self._reports_wake.set()

    @property
    def backlog(self) -> int:
        """Messages waiting for the operator plus reports waiting for the store."""
        return len(self._ready) + len(self._reports)

    @property
    def waiting_hand_over(self) -> int:
        """Committed messages waiting in memory for the operator."""
        return len(self._ready)

    @property
    def waiting_reports(self) -> int:
        """Operator reports waiting in memory for the store."""
        return len(self._reports)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        # Read before anything can be committed (services start before requests are
        # served), so no message is both recovered and handed over live.
        self._started_at_id = await self._store.last_message_id()
        # Following the store, every message is read from it: none is "recovered".
        self._live_after = None if self._follow else self._started_at_id
        self._next_deferred = await self._store.next_deferred_at()
        await self.operator.start(self.report)
        self._report_task = asyncio.create_task(self._report_loop(), name="delivery-reports")
        self._tasks = [
            asyncio.create_task(self._hand_over_loop(self._live_after),
                                name="delivery-hand-over"),
            asyncio.create_task(self._deferred_loop(), name="delivery-deferred"),
        ]

    async def stop(self) -> None:
        """Finish the batch in hand, stop the operator, then store the reports received."""
        self._stopping.set()
        self._recovered.set()
        self._ready_wake.set()
        self._deferred_wake.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.operator.stop()
        self._operator_stopped = True
        self._reports_wake.set()
        if self._report_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._report_task
            self._report_task = None

    # -- hand-over ---------------------------------------------------------------------

    async def _hand_over_loop(self, recover_upto: int | None) -> None:
        """`recover_upto` None: follow the store for good (delivery worker process)."""
        cursor = 0
        recovering = True
        while not self._stopping.is_set():
            worked = False
            in_hand: Sequence[OutgoingMessage] = ()
            try:
                if self._ready:
                    in_hand = [self._ready.popleft()
                               for _ in range(min(self._max_batch, len(self._ready)))]
                    await self._hand_over(in_hand)
                    in_hand = ()  # taken: a later failure must not hand these over again
                    worked = True
                # Alternating with live messages: a large backlog must not stall new sends.
                if recovering and not self._stopping.is_set():
                    newest = await self._store.last_message_id() \
                        if recover_upto is None else 0
                    page = await self._store.undelivered(after_id=cursor,
                                                         limit=self._max_batch)
                    if recover_upto is None:
                        # Sent after our start: by our own deferred loop, not to resume.
                        mine = [m for m in page
                                if m.sent_at is None or m.id <= self._started_at_id]
                    else:
                        mine = [m for m in page if m.id <= recover_upto]
                    recovering = recover_upto is None or len(mine) == self._max_batch
                    if page and recover_upto is None:
                        cursor = page[-1].id
                    if mine:
                        cursor = max(cursor, mine[-1].id)
                        in_hand = mine
                        await self._hand_over(mine)
                        in_hand = ()
                        worked = True
                    if not self._recovered.is_set() and (
                            len(page) < self._max_batch or cursor >= self._started_at_id):
                        self._recovered.set()
                    if not recovering:
                        log.info("delivery_recovered", upto=recover_upto)
                    elif recover_upto is None and len(page) < self._max_batch:
                        # A short page holds every undelivered message up to `newest`
                        # (read before it): never scan the settled ones below it again.
                        cursor = max(cursor, newest)
                        worked = bool(self._ready)  # caught up: wait for a poke
            except Exception as exc:
                # Not taken by the operator: back to the front of the queue, to be tried
                # again after the pause rather than left waiting for a restart.
                log.error("hand_over_failed", error=str(exc), messages=len(in_hand),
                          ids=id_ranges(m.id for m in in_hand))
                self._ready.extendleft(reversed(in_hand))
                await self._pause()
                continue
            if not worked:
                if recovering and recover_upto is None:
                    # Look again now and then even unpoked: a commit by a process that
                    # does not poke us (the command-line tool) must still go out.
                    await sleep_until(self._clock, self._clock.now() + self._poll,
                                      self._ready_wake)
                else:
                    await self._ready_wake.wait()
                self._ready_wake.clear()

    async def _hand_over(self, messages: Sequence[OutgoingMessage]) -> bool:
        """Give messages to the operator; False if they may still look untaken in the store."""
        fresh = [m for m in messages if m.sent_at is None]
        taken = [m for m in messages if m.sent_at is not None]
        if taken:
            if not await self._retrying(self.operator.resume, taken):
                return False
            _log_each("message_resumed", taken)
        if not fresh:
            return True
        if not await self._retrying(self.operator.submit, fresh, timed=True):
            return False
        self.submitted += len(fresh)
        _log_each("message_submitted", fresh)
        # The operator has them now: keep trying to record it rather than hand them over
        # again (deferred ones stay due until marked). Only a stop before it succeeds
        # leaves them to be handed over once more at the next start.
        while True:
            try:
                await self._store.mark_sent([m.id for m in fresh], at=self._clock.now())
                return True
            except Exception as exc:
                log.error("mark_sent_failed", error=str(exc), messages=len(fresh),
                          ids=id_ranges(m.id for m in fresh))
                if not await self._pause():
                    return False

    async def _retrying(self, call: Callable[[Sequence[OutgoingMessage]], Awaitable[None]],
                        messages: Sequence[OutgoingMessage], *, timed: bool = False) -> bool:
        """Run an operator call until it succeeds; False if the gateway stops first."""
        while True:
            started = time.perf_counter()
            try:
                await call(messages)
            except OperatorUnavailable as exc:
                log.warning("operator_unavailable", error=str(exc), messages=len(messages),
                            ids=id_ranges(m.id for m in messages),
                            retry_in=self._retry_seconds)
            else:
                # Successful calls only: a link that refuses at once would otherwise pull
                # the latency down just when the operator is in trouble.
                if timed:
                    self._metrics.operator_submit_seconds.observe(
                        time.perf_counter() - started)
                return True
            if not await self._pause():
                return False

    async def _pause(self) -> bool:
        """Wait `retry_seconds` on the clock; False if the gateway stops meanwhile."""
        if self._stopping.is_set():
            return False
        waits = {asyncio.ensure_future(self._clock.sleep(self._retry_seconds)),
                 asyncio.ensure_future(self._stopping.wait())}
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()
        return not self._stopping.is_set()

    # -- deferred ----------------------------------------------------------------------

    async def _deferred_loop(self) -> None:
        await self._recovered.wait()
        while not self._stopping.is_set():
            if self._follow:
                # No on_commit to lower the hint: read the nearest time at each poke.
                try:
                    stored = await self._store.next_deferred_at()
                except Exception as exc:
                    log.error("deferred_scan_failed", error=str(exc))
                    stored = None
                if stored is not None and (self._next_deferred is None
                                           or stored < self._next_deferred):
                    self._next_deferred = stored
            due_at = self._next_deferred
            if due_at is not None and due_at <= self._clock.now():
                try:
                    batch = await self._store.due_deferred(self._clock.now(),
                                                           self._max_batch)
                    if batch:
                        # Until marked sent they stay due: pause rather than resubmit.
                        if not await self._hand_over(batch) and not await self._pause():
                            return
                        continue
                    # on_commit only ever lowers the hint: keep a nearer time it set
                    # while the store was being read.
                    self._next_deferred = None
                    stored = await self._store.next_deferred_at()
                    if stored is not None and (self._next_deferred is None
                                               or stored < self._next_deferred):
                        self._next_deferred = stored
                    continue
                except Exception as exc:
                    log.error("deferred_scan_failed", error=str(exc))
                    if not await self._pause():
                        return
                    continue
            if self._follow:
                polled = self._clock.now() + self._poll
                due_at = polled if due_at is None else min(due_at, polled)
            await sleep_until(self._clock, due_at, self._deferred_wake)

    # -- reports -----------------------------------------------------------------------

    async def _report_loop(self) -> None:
        while True:
            if not self._reports:
                if self._operator_stopped:
                    return
                await self._reports_wake.wait()
                self._reports_wake.clear()
                continue
            batch = self._reports[: self._max_batch]
            del self._reports[: self._max_batch]
            try:
                applied = await self._store.apply_updates(batch)
            except Exception as exc:
                log.error("apply_updates_failed", error=str(exc), updates=len(batch),
                          ids=id_ranges(u.message_id for u in batch))
                if self._stopping.is_set():
                    # Not lost: the messages are not final, so the next start resumes them.
                    return
                self._reports[:0] = batch
                await self._pause()
                continue
            self.applied += len(batch)
            self._metrics.finals(applied.finals)
            _log_states(batch, applied)
            if applied.callbacks and self._on_callbacks is not None:
                self._on_callbacks()


def _debug() -> bool:
    # Asked once per batch: a disabled debug call still costs microseconds through
    # structlog's proxy, which adds up over a thousand messages.
    return bool(log.is_enabled_for(logging.DEBUG))


def _log_each(event: str, messages: Sequence[OutgoingMessage]) -> None:
    if _debug():
        for message in messages:
            log.debug(event, message_id=message.id)


def _log_states(batch: Sequence[StateUpdate], applied: AppliedUpdates) -> None:
    if not _debug():
        return
    ignored = set(applied.ignored)
    for position, update in enumerate(batch):
        if position in ignored:
            log.debug("message_state_ignored", message_id=update.message_id,
                      ptt=update.ptt, dlr=update.dlr)
        else:
            log.debug("message_state", message_id=update.message_id, ptt=update.ptt,
                      dlr=update.dlr, final=update.final)
