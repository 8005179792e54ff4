"""The dispatcher: from committed sends to the operator, and from its reports to the store.

Three tasks, each working in batches so that the operator side keeps up with the group-
committed send side:

- recovery, once at start: the messages a previous run left with the operator (sent, not
  final) are resumed: their reports awaited, never submitted again. When this dispatcher
  is the only one on its store (`exclusive`: the SQLite deployments, where one process
  delivers), it first frees every claim, which can only be a previous run's: its messages
  go out at once rather than when their leases end.
- hand-over: claims due messages (queued, or deferred and due) with a lease, one
  transaction per batch (`claim_messages`), gives them to the operator and records its
  answers: taken ones are marked sent with their references (one `mark_sent` per batch),
  "try later" ones are released until their time, refused ones are settled at their final
  ptt (refunded when not billed, like any failure). A batch the operator answered only in
  part (it failed half-way) re-sends only the messages it did not take. A claim is held
  until `lease_seconds` after it was made: a dispatcher that dies holding one frees it
  then, and the message is claimed again. So correctness comes from claims, not from
  message ids committing in order: with several committers a lower id may commit after a
  higher one, and several dispatchers may share a store without submitting a message
  twice.
  An operator that paces its submits gives a `batch_hint` (gateway.operators.base): its
  batches are claimed that big, and the next one while one is on its way (PIPELINE_DEPTH),
  so that each is recorded (and its reports applied) as soon as it is answered, and the
  operator's window never drains between two of them.
  The loop sleeps until the store's next due time (`next_due_at`: a deferred time, a
  "try later", a lease running out), or until woken: by `on_commit` (the send path's
  after-commit hook, in the same process; it only sets an event, so the send path never
  waits), by `poke` (another process committed, `follow_store` mode), and it reads the
  store's next due time every `poll_seconds` (a commit by a process that pokes no one: the
  command-line tool, or another gateway on the store, a standby in one-process mode, whose
  accepted sends would otherwise wait for this one's next commit). The committed messages
  themselves are not handed over from memory any more: they would still need a claim,
  which is a write, and the claim returns them for the same price.
- reports: the operator's reports name its references; they are buffered and applied with
  one `apply_reports` transaction per batch (a batch is whatever arrived while the
  previous one committed); when that queued callbacks, the callback worker is woken. The
  `Acknowledgement` returned to the operator for a call completes once all of that call's
  reports are committed. A report can arrive before the `mark_sent` recording its
  reference has committed (the network answers fast, and a chunk is recorded only once
  all of it is answered): such a report is held back, in order, until every claim made
  before it arrived has been recorded (or came back empty), and applied again then. A
  reference still unknown after that belongs to no message this dispatcher handed over:
  it is logged, and acknowledged (the network would otherwise redeliver it for ever).
  Unless dispatchers share the store (`http2sms deliver` workers on PostgreSQL): a
  network that sends a receipt to any bind of an account sends some of another worker's
  here, possibly before that worker has recorded its chunk. Such a report is tried again
  every `ELSEWHERE_RETRY_SECONDS` for `elsewhere_wait` seconds after its arrival
  (`ELSEWHERE_WAIT_SECONDS` for shared workers), unacknowledged, before it counts as
  unknown.

Messages an operator took and never settles end at its `expiry` (gateway.expiry), when it
gives one: an expiry task settles them as it settles refusals.

Inbound messages (replies, STOP) go to `on_inbound` and are acknowledged once it returns
(the assembly keeps them: `gateway.incoming`); without one, each is logged.

Delivery is at least once: a crash between the operator taking a message and `mark_sent`
committing hands it over again once its claim is freed. Several dispatchers on one store
never submit a message twice, but each resumes at its start what is in flight: for a
network that redelivers pending receipts (SMPP) that is only waiting; the simulator replays
those messages' plans, so their states may be reported twice (a final one only counts
once).

Logs: per-message events (`message_submitted`, `message_resumed`, `message_state`) are at
debug level, and only built when debug is on, so a busy gateway pays nothing for them;
trouble with a batch is logged once per batch with its message id ranges (`ids`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from gateway.clock import Clock, sleep_until
from gateway.expiry import Expirer
from gateway.logs import id_ranges
from gateway.metrics import Metrics
from gateway.operators.base import (
    Acknowledgement,
    Inbound,
    Later,
    Operator,
    Refused,
    SubmitResult,
    Taken,
    batch_hint,
    expiry,
)
from gateway.records import (
    AppliedUpdates,
    OperatorReport,
    OutgoingMessage,
    SendOutcome,
    SentMessage,
    StateUpdate,
)
from gateway.store import DeliveryStore, StoreError, StoreUnavailable

log = structlog.get_logger("gateway.delivery")

# How long a claim holds a message: longer than a submit can take, or a slow one would be
# claimed (and submitted) again by another dispatcher.
LEASE_SECONDS = 60.0
# Chunks handed over at once to an operator that gives a batch hint, so that the ones
# before are recorded and the next ones claimed while one is on its way. On a quiet machine
# two left the SMPP window drained now and then (the 10,000-message burst at a 500/s cap
# averaged 435-465/s), four keep it within 2% of the cap (488-494/s). On a machine short of
# CPU the burst stays below (405-423/s with the old dispatcher's 351-375/s, load 7 on two
# cores): the gateway and the test SMSC then wait for a core, not for the dispatcher.
PIPELINE_DEPTH = 4
# How long a report with an unknown reference waits for another dispatcher sharing the
# store to record its message (see the module doc), and how often it is tried meanwhile.
# A chunk is recorded once all of it is answered (about a second of traffic for SMPP).
ELSEWHERE_WAIT_SECONDS = 10.0
ELSEWHERE_RETRY_SECONDS = 0.5

T = TypeVar("T")
InboundHandler = Callable[[Sequence[Inbound]], Awaitable[None]]


@dataclass(slots=True)
class _Ticket:
    """One sink call: its acknowledgement completes when its last report is committed."""

    left: int
    done: Acknowledgement


# A report waiting for the store: its sink call's ticket, the number of the last claim
# made when it arrived (its message, if handed over here, is in that claim or an earlier
# one), and when it arrived (monotonic). A tuple: thousands a second are made.
_Queued = tuple[OperatorReport, _Ticket, int, float]


class Dispatcher:
    def __init__(self, store: DeliveryStore, clock: Clock, operator: Operator, *,
                 max_batch: int = 1000, retry_seconds: float = 5.0,
                 on_callbacks: Callable[[], None] | None = None,
                 metrics: Metrics | None = None, follow_store: bool = False,
                 poll_seconds: float = 1.0, lease_seconds: float = LEASE_SECONDS,
                 exclusive: bool = False, on_inbound: InboundHandler | None = None,
                 elsewhere_wait: float = 0.0) -> None:
        """`elsewhere_wait`: seconds a report with an unknown reference waits for another
        dispatcher sharing the store and the network's account (see the module doc)."""
        self._store = store
        self._metrics = metrics or Metrics()
        self._clock = clock
        self.operator = operator
        self._max_batch = max(1, max_batch)
        self._retry_seconds = retry_seconds
        self._lease = lease_seconds
        self._exclusive = exclusive
        self._elsewhere_wait = elsewhere_wait
        self._on_callbacks = on_callbacks
        self._on_inbound = on_inbound or _log_inbound
        self._wake = asyncio.Event()
        self._in_hand = 0
        self._reports: list[_Queued] = []
        self._held: list[_Queued] = []
        # Reports waiting for another dispatcher sharing the store to record their
        # message (see the module doc), and the timer that tries them again.
        self._elsewhere: list[_Queued] = []
        self._elsewhere_retry: asyncio.TimerHandle | None = None
        # Reports the store refuses for good (not for being unavailable): logged, kept
        # unacknowledged (the network sends them again after a restart), never retried.
        self._aside: list[_Queued] = []
        # How many reports at the head of the queue go one per batch: a batch the store
        # refused for good is taken apart to find the report(s) it refuses.
        self._isolating = 0
        self._reports_wake = asyncio.Event()
        # Claims numbered as they start, and those whose hand-over is not recorded yet: a
        # report with an unknown reference may belong to any of them made before it
        # arrived (see the module doc).
        self._claims = 0
        self._unrecorded: set[int] = set()
        # A connector that paces its submits (it gives a batch hint) gets the next chunks
        # claimed while one is on its way: its window never drains between two chunks.
        self._depth = PIPELINE_DEPTH if batch_hint(operator) else 1
        self._stopping = asyncio.Event()
        self._operator_stopped = False
        # Set once the messages in flight at the start are resumed. The hand-over waits
        # for it: a message it marked sent meanwhile would look like one to resume.
        self._recovered = asyncio.Event()
        self._follow = follow_store
        self._poll = poll_seconds
        self._tasks: list[asyncio.Task[None]] = []
        self._report_task: asyncio.Task[None] | None = None
        self._inbound_tasks: set[asyncio.Task[None]] = set()
        self.submitted = 0
        self.applied = 0

    # -- inputs ------------------------------------------------------------------------

    def on_commit(self, outcomes: Sequence[SendOutcome]) -> None:
        """After-commit hook of the send path: wake the hand-over, never wait.

        Following the store, it is ignored: the commits come from another process, which
        pokes."""
        if self._follow or self._stopping.is_set():
            return
        if any(outcome.accepted and outcome.ids for outcome in outcomes):
            self._wake.set()

    def poke(self) -> None:
        """Another process committed sends: look in the store (`follow_store` mode)."""
        self._wake.set()

    def reports(self, reports: Sequence[OperatorReport]) -> Acknowledgement:
        """The operator's sink for delivery reports (see `gateway.operators.base`)."""
        done: Acknowledgement = asyncio.get_running_loop().create_future()
        if not reports:
            done.set_result(None)
            return done
        ticket = _Ticket(len(reports), done)
        mark, arrived = self._claims, time.monotonic()
        self._reports.extend([(report, ticket, mark, arrived) for report in reports])
        self._reports_wake.set()
        return done

    def inbound(self, messages: Sequence[Inbound]) -> Acknowledgement:
        """The operator's sink for inbound messages: acknowledged once handled."""
        done: Acknowledgement = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._handle_inbound(messages, done))
        self._inbound_tasks.add(task)
        task.add_done_callback(self._inbound_tasks.discard)
        return done

    async def _handle_inbound(self, messages: Sequence[Inbound], done: Acknowledgement) -> None:
        try:
            await self._on_inbound(messages)
        except Exception as exc:
            log.error("inbound_failed", error=str(exc), messages=len(messages))
            done.cancel()  # not acknowledged: the network sends them again
            return
        if not done.done():
            done.set_result(None)

    @property
    def backlog(self) -> int:
        """Messages in hand for the operator plus reports waiting for the store."""
        return self.waiting_hand_over + self.waiting_reports

    @property
    def waiting_hand_over(self) -> int:
        """Messages claimed and not yet answered by the operator and recorded."""
        return self._in_hand

    @property
    def waiting_reports(self) -> int:
        """Operator reports waiting in memory for the store."""
        return len(self._reports) + len(self._held) + len(self._elsewhere)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        await self.operator.start(self)
        self._report_task = asyncio.create_task(self._report_loop(), name="delivery-reports")
        self._tasks = [
            asyncio.create_task(self._recover(), name="delivery-recovery"),
            asyncio.create_task(self._hand_over_loop(), name="delivery-hand-over"),
        ]
        expires = expiry(self.operator)
        if expires is not None:
            expirer = Expirer(self._store, self._clock, expires, self._settle_refusals,
                              page=self._max_batch)
            self._tasks.append(asyncio.create_task(expirer.run(self._stopping),
                                                   name="delivery-expiry"))

    async def stop(self) -> None:
        """Finish the batch in hand, stop the operator, then store the reports received."""
        self._stopping.set()
        self._recovered.set()
        self._wake.set()
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
        for task in list(self._inbound_tasks):
            task.cancel()
        if self._elsewhere_retry is not None:
            self._elsewhere_retry.cancel()
            self._elsewhere_retry = None
        # Not stored: not acknowledged, so a network that cares sends them again.
        for queued in (*self._reports, *self._held, *self._elsewhere, *self._aside):
            queued[1].done.cancel()

    # -- recovery ----------------------------------------------------------------------

    async def _recover(self) -> None:
        try:
            if self._exclusive:
                while True:
                    try:
                        freed = await self._store.free_claims()
                        break
                    except Exception as exc:
                        log.error("free_claims_failed", error=str(exc))
                        if not await self._pause():
                            return
                if freed:
                    log.info("delivery_claims_freed", messages=freed)
            cursor = 0
            while not self._stopping.is_set():
                try:
                    page = await self._store.in_flight(after_id=cursor, limit=self._max_batch)
                except Exception as exc:
                    log.error("recovery_failed", error=str(exc))
                    if not await self._pause():
                        return
                    continue
                if not page:
                    break
                if not await self._resume(page):
                    return
                cursor = page[-1].id
            log.info("delivery_recovered", upto=cursor)
        finally:
            self._recovered.set()

    async def _resume(self, messages: Sequence[OutgoingMessage]) -> bool:
        while True:
            try:
                await self.operator.resume(messages)
            except Exception as exc:
                log.warning("operator_resume_failed", error=str(exc), messages=len(messages),
                            ids=id_ranges(m.id for m in messages),
                            retry_in=self._retry_seconds)
                if not await self._pause():
                    return False
                continue
            _log_each("message_resumed", messages)
            return True

    # -- hand-over ---------------------------------------------------------------------

    async def _hand_over_loop(self) -> None:
        await self._recovered.wait()
        hint = batch_hint(self.operator)
        size = min(self._max_batch, hint) if hint else self._max_batch
        depth = self._depth
        running: set[asyncio.Task[None]] = set()
        try:
            while not self._stopping.is_set():
                if len(running) >= depth:
                    await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                    continue
                # Cleared before looking, so that a commit while we look is not slept
                # through.
                self._wake.clear()
                self._claims += 1
                claim = self._claims
                self._unrecorded.add(claim)
                handed = False
                due_at: float | None = None
                try:
                    batch = await self._store.claim_messages(
                        now=self._clock.now(), lease=self._lease, limit=size)
                    if batch:
                        task = asyncio.create_task(self._hand_over_claimed(claim, batch),
                                                   name="delivery-hand-over-chunk")
                        running.add(task)
                        task.add_done_callback(running.discard)
                        handed = True
                        continue
                    due_at = await self._store.next_due_at()
                except Exception as exc:
                    log.error("hand_over_failed", error=str(exc))
                    await self._pause()
                    continue
                finally:
                    if not handed:
                        self._claim_recorded(claim)
                await self._sleep(due_at)
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    async def _hand_over_claimed(self, claim: int,
                                 batch: Sequence[OutgoingMessage]) -> None:
        try:
            await self._hand_over(batch, claim)
        except Exception as exc:
            log.error("hand_over_failed", error=str(exc))
            await self._pause()
        finally:
            # Also when it failed: the reports held back for it would otherwise wait,
            # unacknowledged, for ever.
            self._claim_recorded(claim)
            self._wake.set()  # a place is free: claim the next chunk

    def _claim_recorded(self, claim: int) -> None:
        """A claim's hand-over is recorded (or recorded nothing): the reports held back
        only for claims up to it go back to the queue."""
        if claim not in self._unrecorded:
            return
        self._unrecorded.discard(claim)
        if not self._held:
            return
        oldest = min(self._unrecorded, default=self._claims + 1)
        ready = [queued for queued in self._held if queued[2] < oldest]
        if ready:
            self._held = [queued for queued in self._held if queued[2] >= oldest]
            self._reports[:0] = ready
            self._reports_wake.set()

    async def _sleep(self, due_at: float | None) -> None:
        """Until `due_at` or a wake; meanwhile every `poll_seconds` a read of the store's
        next due time, for the messages committed by a process that wakes no one: another
        gateway on the store (a standby in one-process mode), the command-line tool."""
        while True:
            polled = self._clock.now() + self._poll
            if await sleep_until(self._clock,
                                 polled if due_at is None else min(due_at, polled), self._wake):
                return
            if self._stopping.is_set() or (due_at is not None
                                           and due_at <= self._clock.now()):
                return
            try:
                due_at = await self._store.next_due_at()
            except Exception:
                return  # the claim finds out, and logs it
            if due_at is not None and due_at <= self._clock.now():
                return

    async def _hand_over(self, messages: Sequence[OutgoingMessage], claim: int) -> None:
        """Submit claimed messages and record each answer."""
        self._in_hand += len(messages)
        try:
            await self._submit_and_record(messages, claim)
        finally:
            self._in_hand -= len(messages)

    async def _submit_and_record(self, messages: Sequence[OutgoingMessage],
                                 claim: int) -> None:
        started = time.perf_counter()
        results: Sequence[SubmitResult] = ()
        try:
            results = await self.operator.submit(messages)
        except Exception as exc:
            log.warning("operator_unavailable", error=str(exc), messages=len(messages),
                        ids=id_ranges(m.id for m in messages), retry_in=self._retry_seconds)
        else:
            # Answered calls only: a link that refuses at once would otherwise pull the
            # latency down just when the operator is in trouble.
            self._metrics.operator_submit_seconds.observe(time.perf_counter() - started)
        now = self._clock.now()
        claimed = {m.id for m in messages}
        taken: list[SentMessage] = []
        later: dict[int, float] = {}
        refused: list[StateUpdate] = []
        for result in results:
            if result.message_id not in claimed:
                continue  # not ours to record (a connector's mistake)
            claimed.discard(result.message_id)
            if isinstance(result, Taken):
                taken.append(SentMessage(result.message_id, result.references))
            elif isinstance(result, Later):
                later[result.message_id] = now + max(0.0, result.retry_after)
            elif isinstance(result, Refused):
                try:
                    update = StateUpdate.from_ptt(result.message_id, result.ptt, now,
                                                  result.note)
                except ValueError as exc:
                    log.error("operator_refusal_unknown", error=str(exc),
                              message_id=result.message_id)
                    later[result.message_id] = now + self._retry_seconds
                    continue
                if not update.final:
                    # Recorded, it would leave the message sent with no reference: never
                    # claimed again, nor settled, its credits held. A connector's mistake,
                    # read as "try later".
                    log.error("operator_refusal_not_final", ptt=result.ptt,
                              message_id=result.message_id)
                    later[result.message_id] = now + self._retry_seconds
                    continue
                refused.append(update)
        # Not answered (the batch failed half-way, or at once): tried again, and only them.
        for message_id in claimed:
            later[message_id] = now + self._retry_seconds
        if later and results:
            log.warning("operator_try_later", messages=len(later), ids=id_ranges(later))
        if taken:
            self.submitted += len(taken)
            if _debug():
                for sent in taken:
                    log.debug("message_submitted", message_id=sent.message_id,
                              references=list(sent.references))
            await self._record(
                "mark_sent", taken,
                lambda: self._store.mark_sent([t.message_id for t in taken], at=now,
                                              references=taken))
        self._claim_recorded(claim)  # its references are known: the reports for them apply
        if refused:
            await self._settle_refusals(refused)
        if later:
            # Failing this only delays them to the end of their lease.
            await self._record("release", list(later),
                               lambda: self._store.release_messages(list(later.items())),
                               tries=1)

    async def _settle_refusals(self, refused: Sequence[StateUpdate]) -> None:
        """Record the operator's refusals; when the store refuses the batch for good (a row
        it cannot update), each one on its own, so one such row stops no other message."""
        applied = await self._record("refusals", refused,
                                     lambda: self._store.apply_updates(refused), lasting=True)
        if applied is not None:
            self._settled(applied)
            return
        if len(refused) == 1 or self._stopping.is_set():
            return
        for update in refused:
            one = await self._record("refusals", [update],
                                     functools.partial(self._store.apply_updates, [update]),
                                     lasting=True)
            if one is not None:
                self._settled(one)
            elif self._stopping.is_set():
                return

    async def _record(self, what: str, items: Sequence[object],
                      write: Callable[[], Awaitable[T]], *, tries: int | None = None,
                      lasting: bool = False) -> T | None:
        """Keep trying a write about what the operator answered rather than hand the
        messages over again; only a stop (or `tries`) gives up, leaving them to their claim's
        end, and with `lasting` an error that trying again cannot cure (a StoreError other
        than StoreUnavailable). Returns the write's result, None if given up."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await write()
            except Exception as exc:
                lasts = lasting and isinstance(exc, StoreError) \
                    and not isinstance(exc, StoreUnavailable)
                log.error(f"{what}_failed", error=str(exc), messages=len(items),
                          **({"ids": id_ranges(_message_ids(items)),
                              "retry": "at the claim's end"} if lasts else {}))
                if lasts or (tries is not None and attempt >= tries) \
                        or not await self._pause():
                    return None

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

    # -- reports -----------------------------------------------------------------------

    async def _report_loop(self) -> None:
        while True:
            if not self._reports:
                if self._operator_stopped:
                    return
                await self._reports_wake.wait()
                self._reports_wake.clear()
                continue
            size = 1 if self._isolating else self._max_batch
            batch = self._reports[:size]
            del self._reports[:size]
            self._isolating = max(0, self._isolating - len(batch))
            # Claims not recorded when the store looks: a report that arrived after the
            # last of them started may still name one of their messages.
            oldest = min(self._unrecorded, default=self._claims + 1)
            try:
                applied = await self._store.apply_reports([q[0] for q in batch])
            except Exception as exc:
                if self._stopping.is_set():
                    log.error("apply_reports_failed", error=str(exc), reports=len(batch))
                    # Not lost: not acknowledged, and the messages are not final, so the
                    # next start resumes them.
                    for _, ticket, _, _ in batch:
                        ticket.done.cancel()
                    return
                if isinstance(exc, StoreError) and not isinstance(exc, StoreUnavailable):
                    # Refused for good (a row the store cannot update): retrying the batch
                    # would hold every report behind it for ever.
                    if len(batch) > 1:
                        log.error("apply_reports_failed", error=str(exc), reports=len(batch),
                                  retry="one report at a time")
                        self._isolating += len(batch)
                        self._reports[:0] = batch
                    else:
                        report = batch[0][0]
                        log.error("report_set_aside", error=str(exc),
                                  reference=report.reference, ptt=report.ptt,
                                  hint="not acknowledged: the network sends it again after "
                                       "a restart")
                        self._aside.extend(batch)
                    continue
                log.error("apply_reports_failed", error=str(exc), reports=len(batch))
                self._reports[:0] = batch
                await self._pause()
                continue
            self._settled(applied)
            _log_states(batch, applied)
            retry: list[_Queued] = []
            elsewhere: list[_Queued] = []
            retried: set[int] = set()
            unknown: list[str] = []
            waited_since = time.monotonic() - self._elsewhere_wait
            for position in applied.unmatched:
                queued = batch[position]
                if queued[2] >= oldest:
                    retry.append(queued)
                    retried.add(position)
                elif queued[3] > waited_since:
                    elsewhere.append(queued)
                    retried.add(position)
                else:
                    unknown.append(queued[0].reference)
            if elsewhere:
                self._wait_elsewhere(elsewhere)
            if unknown:
                log.warning("reports_unmatched", reports=len(unknown), references=unknown[:10],
                            hint="no message in the store has them, every hand-over "
                                 "before them recorded: acknowledged, dropped")
            if retry:
                now_oldest = min(self._unrecorded, default=self._claims + 1)
                ready = [queued for queued in retry if queued[2] < now_oldest]
                if ready:
                    self._reports[:0] = ready  # recorded meanwhile: at once
                self._held.extend(queued for queued in retry if queued[2] >= now_oldest)
            if retried:
                batch = [q for p, q in enumerate(batch) if p not in retried]
            self.applied += len(batch)
            _acknowledge(batch)

    def _wait_elsewhere(self, reports: list[_Queued]) -> None:
        """Try `reports` again in a while: another dispatcher may record their message."""
        self._elsewhere.extend(reports)
        if self._elsewhere_retry is None:
            self._elsewhere_retry = asyncio.get_running_loop().call_later(
                ELSEWHERE_RETRY_SECONDS, self._retry_elsewhere)

    def _retry_elsewhere(self) -> None:
        self._elsewhere_retry = None
        if self._elsewhere:
            self._reports.extend(self._elsewhere)
            self._elsewhere = []
            self._reports_wake.set()

    def _settled(self, applied: AppliedUpdates) -> None:
        self._metrics.finals(applied.finals)
        if applied.callbacks and self._on_callbacks is not None:
            self._on_callbacks()


async def _log_inbound(messages: Sequence[Inbound]) -> None:
    for message in messages:
        log.info("inbound_received", reference=message.reference, sender=message.sender,
                 receiver=message.receiver, length=len(message.body))


def _message_ids(items: Sequence[object]) -> list[int]:
    return [item.message_id for item in items if isinstance(item, StateUpdate)]


def _acknowledge(done: Sequence[_Queued]) -> None:
    """Count committed reports off their tickets; a sink call's reports are adjacent."""
    last: _Ticket | None = None
    count = 0
    for _, ticket, _, _ in done:
        if ticket is last:
            count += 1
            continue
        if last is not None:
            _count_off(last, count)
        last, count = ticket, 1
    if last is not None:
        _count_off(last, count)


def _count_off(ticket: _Ticket, count: int) -> None:
    ticket.left -= count
    if ticket.left <= 0 and not ticket.done.done():
        ticket.done.set_result(None)


def _debug() -> bool:
    # Asked once per batch: a disabled debug call still costs microseconds through
    # structlog's proxy, which adds up over a thousand messages.
    return bool(log.is_enabled_for(logging.DEBUG))


def _log_each(event: str, messages: Sequence[OutgoingMessage]) -> None:
    if _debug():
        for message in messages:
            log.debug(event, message_id=message.id)


def _log_states(batch: Sequence[_Queued], applied: AppliedUpdates) -> None:
    if not _debug():
        return
    ignored = set(applied.ignored)
    unmatched = set(applied.unmatched)  # logged by the caller
    for position, (report, _, _, _) in enumerate(batch):
        message_id = applied.message_ids[position] if applied.message_ids else 0
        if position in unmatched:
            continue
        if position in ignored:
            log.debug("message_state_ignored", message_id=message_id,
                      reference=report.reference, ptt=report.ptt, dlr=report.dlr)
        else:
            log.debug("message_state", message_id=message_id, reference=report.reference,
                      ptt=report.ptt, dlr=report.dlr, final=report.final)
