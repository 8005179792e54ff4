"""The simulated operator: a network inside the gateway, for development and tests.

Each message follows a plan drawn from a `random.Random` seeded with `operator.seed` and the
message id, so its outcome does not depend on batching, on other traffic or on restarts:
accepted (ptt 3), a random delay, sometimes one or two temporary failures, then delivered
(ptt 4) or a failure from the ptt table. A message still open at the end of its validity
period expires (ptt 8).

A recipient ending in `99` and a known three-digit ptt code (`+33612399023`) always reaches
that ptt, so clients can test their handling of any outcome.

On the interface (`gateway.operators.base`): it takes every message it is given, naming
each part `<message id>.<part>`, and reports a message's states under its first part's
reference (the gateway finds the message by any of them), except "delivered", reported
for each part as a real network does: the store counts a long message delivered when
every part is. Its reports leave in batches, at most one every `REPORT_BATCH_SECONDS`:
one schedule for all the messages, whose due states go out together, as a real network's
receipts come in bursts. Its link is up from `start` to `stop`. It produces inbound
messages only when asked (`receive`), for tests and development.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gateway import ptt
from gateway.clock import Clock, sleep_until
from gateway.config import SimulatedOperatorConfig
from gateway.operators.base import (
    Acknowledgement,
    Inbound,
    LinkStatus,
    OperatorSink,
    SubmitResult,
    Taken,
)
from gateway.records import OperatorReport, OutgoingMessage

ACCEPTED = 3
DELIVERED = 4
EXPIRED = 8
# Expiry is decided by the validity period, not drawn: a drawn 8 would expire a message
# long before its time.
FAILURE_CODES: tuple[int, ...] = tuple(c for c in ptt.FINAL_FAILURE_CODES if c != EXPIRED)
RETRY_CODES: tuple[int, ...] = ptt.INTERMEDIATE_CODES

_MAGIC = re.compile(r"99(\d{3})$")

# The shortest time between two batches of reports. Every batch is a transaction of the
# store (and a fsync) in the gateway: at thousands of messages a second, a wake-up for each
# due time gave batches of about 20 reports and 350 transactions a second in the delivery
# worker; the states are at most this late, their times (`at`) stay the planned ones.
REPORT_BATCH_SECONDS = 0.025


@dataclass(frozen=True, slots=True)
class Step:
    """One state a message reaches, `after` seconds after it was handed to the network."""

    after: float
    ptt: int
    dlr: int


def magic_ptt(receiver: str) -> int | None:
    """The ptt forced by a `...99NNN` recipient, or None for an ordinary number."""
    match = _MAGIC.search(receiver)
    if match is None:
        return None
    code = int(match.group(1))
    return code if ptt.lookup(code) is not None else None


def _dlr(code: int) -> int:
    known = ptt.lookup(code)
    assert known is not None
    return int(known.dlr)


def plan(receiver: str, rng: random.Random, config: SimulatedOperatorConfig, *,
         resumed: bool = False) -> list[Step]:
    """The states a message goes through, before the validity period is applied.

    `resumed` leaves out the acceptance, which was already reported before a restart.
    """
    def delay() -> float:
        return rng.uniform(config.min_delay, max(config.min_delay, config.max_delay))

    steps: list[Step] = []
    forced = magic_ptt(receiver)
    if forced is not None:
        if not resumed:
            steps.append(Step(0.0, ACCEPTED, int(ptt.Dlr.WAITING)))
        if forced != ACCEPTED:
            steps.append(Step(delay(), forced, _dlr(forced)))
        return steps

    retries = rng.randint(1, 2) if rng.random() < config.retry_ratio else 0
    if not resumed:
        # A message that will have to be retried is one the network stores ("buffered").
        steps.append(Step(0.0, ACCEPTED, int(ptt.Dlr.BUFFERED if retries else ptt.Dlr.WAITING)))
    at = 0.0
    for _ in range(retries):
        at += delay()
        code = rng.choice(RETRY_CODES)
        steps.append(Step(at, code, _dlr(code)))
    at += delay()
    final = rng.choice(FAILURE_CODES) if rng.random() < config.failure_ratio else DELIVERED
    steps.append(Step(at, final, _dlr(final)))
    return steps


def timeline(steps: Sequence[Step], start: float,
             deadline: float) -> list[tuple[float, int, int]]:
    """Absolute (time, ptt, dlr) events: the plan cut at the deadline, where it expires."""
    if start >= deadline:
        return [(start, EXPIRED, _dlr(EXPIRED))]
    events: list[tuple[float, int, int]] = []
    for step in steps:
        at = start + step.after
        if at >= deadline:
            break
        events.append((at, step.ptt, step.dlr))
    last = ptt.lookup(events[-1][1]) if events else None
    if last is None or not last.final:
        events.append((deadline, EXPIRED, _dlr(EXPIRED)))
    return events


def reference(message_id: int, part: int = 1) -> str:
    """The simulated network's reference for one part of a message."""
    return f"{message_id}.{part}"


def message_rng(seed: int, message_id: int) -> random.Random:
    return random.Random(f"{seed}:{message_id}")


class SimulatedOperator:
    """Plays each message's timeline on the clock and reports the states in batches."""

    def __init__(self, config: SimulatedOperatorConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._validity = config.validity_hours * 3600.0
        self._events: list[tuple[float, int, str, int, int]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._wake_at = float("inf")  # when the network loop wakes up next on its own
        self._sink: OperatorSink | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, sink: OperatorSink) -> None:
        self._sink = sink
        self._task = asyncio.create_task(self._run(), name="simulated-operator")

    async def stop(self) -> None:
        # Planned states are not persisted: after a restart the messages are resumed.
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, messages: Sequence[OutgoingMessage]) -> Sequence[SubmitResult]:
        self._schedule(messages, resumed=False)
        # Spelled out for one part, the usual case: a generator per message costs a
        # microsecond, at thousands of messages a second.
        return [Taken(m.id, (f"{m.id}.1",) if m.parts == 1 else
                      tuple(reference(m.id, part) for part in range(1, m.parts + 1)))
                for m in messages]

    async def resume(self, messages: Sequence[OutgoingMessage]) -> None:
        self._schedule(messages, resumed=True)

    @property
    def in_flight(self) -> int:
        return len(self._events)

    def link_status(self) -> LinkStatus:
        """Up from `start` to `stop`; a crashed network loop counts as down."""
        if self._task is None:
            return LinkStatus(False, "stopped")
        if self._task.done():
            return LinkStatus(False, "network loop ended")
        return LinkStatus(True)

    def receive(self, sender: str, receiver: str, body: str) -> Acknowledgement:
        """A handset sends `body` to the gateway's `receiver` number, now."""
        assert self._sink is not None, "not started"
        return self._sink.inbound([Inbound(f"in-{next(self._seq)}", sender, receiver, body,
                                           self._clock.now())])

    def _schedule(self, messages: Sequence[OutgoingMessage], *, resumed: bool) -> None:
        now = self._clock.now()
        first = float("inf")
        for message in messages:
            steps = plan(message.receiver, message_rng(self._config.seed, message.id),
                         self._config, resumed=resumed)
            # Validity counts from when the message was meant to leave.
            deadline = (message.deferred_until or message.created_at) + self._validity
            name = f"{message.id}.1"  # see `reference`
            for at, code, dlr in timeline(steps, now, deadline):
                first = min(first, at)
                heapq.heappush(self._events, (at, next(self._seq), name, code, dlr))
                if code == DELIVERED:
                    # A long message is delivered when every part is (the store merges).
                    for part in range(2, message.parts + 1):
                        heapq.heappush(self._events, (at, next(self._seq),
                                                      reference(message.id, part), code, dlr))
        if first < self._wake_at:
            self._wake.set()

    async def _run(self) -> None:
        events = self._events
        reported_at = float("-inf")  # when the last batch left
        while True:
            now = self._clock.now()
            if now >= reported_at + REPORT_BATCH_SECONDS:
                due: list[OperatorReport] = []
                while events and events[0][0] <= now:
                    at, _, name, code, dlr = heapq.heappop(events)
                    due.append(_report(name, code, dlr, at))
                if due and self._sink is not None:
                    # Not awaited: planned states are not persisted anyway (see `stop`).
                    self._sink.reports(due)
                    reported_at = now
            wake_at = max(events[0][0], reported_at + REPORT_BATCH_SECONDS) \
                if events else None
            # A submit wakes us only when it brings a state due before then (`_schedule`).
            self._wake_at = float("inf") if wake_at is None else wake_at
            await sleep_until(self._clock, wake_at, self._wake)


def _report(name: str, code: int, dlr: int, at: float) -> OperatorReport:
    report = OperatorReport.from_ptt(name, code, at)
    if report.dlr == dlr:
        return report
    return OperatorReport(name, code, dlr, report.final, report.billed, at,
                          f"{report.note} (buffered)")
