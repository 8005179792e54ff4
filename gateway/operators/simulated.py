"""The simulated operator: a network inside the gateway, for development and tests.

Each message follows a plan drawn from a `random.Random` seeded with `operator.seed` and the
message id, so its outcome does not depend on batching, on other traffic or on restarts:
accepted (ptt 3), a random delay, sometimes one or two temporary failures, then delivered
(ptt 4) or a failure from the ptt table. A message still open at the end of its validity
period expires (ptt 8).

A recipient ending in `99` and a known three-digit ptt code (`+33612399023`) always reaches
that ptt, so clients can test their handling of any outcome.
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
from gateway.operators import ReportSink
from gateway.records import OutgoingMessage, StateUpdate

ACCEPTED = 3
DELIVERED = 4
EXPIRED = 8
# Expiry is decided by the validity period, not drawn: a drawn 8 would expire a message
# long before its time.
FAILURE_CODES: tuple[int, ...] = tuple(c for c in ptt.FINAL_FAILURE_CODES if c != EXPIRED)
RETRY_CODES: tuple[int, ...] = ptt.INTERMEDIATE_CODES

_MAGIC = re.compile(r"99(\d{3})$")


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


def message_rng(seed: int, message_id: int) -> random.Random:
    return random.Random(f"{seed}:{message_id}")


class SimulatedOperator:
    """Plays each message's timeline on the clock and reports the states in batches."""

    def __init__(self, config: SimulatedOperatorConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._validity = config.validity_hours * 3600.0
        self._events: list[tuple[float, int, int, int, int]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._sink: ReportSink | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, reports: ReportSink) -> None:
        self._sink = reports
        self._task = asyncio.create_task(self._run(), name="simulated-operator")

    async def stop(self) -> None:
        # Planned states are not persisted: after a restart the messages are resumed.
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def submit(self, messages: Sequence[OutgoingMessage]) -> None:
        self._schedule(messages, resumed=False)

    async def resume(self, messages: Sequence[OutgoingMessage]) -> None:
        self._schedule(messages, resumed=True)

    @property
    def in_flight(self) -> int:
        return len(self._events)

    @property
    def connected(self) -> bool:
        """Up from `start` to `stop`; a crashed network loop counts as down."""
        return self._task is not None and not self._task.done()

    def _schedule(self, messages: Sequence[OutgoingMessage], *, resumed: bool) -> None:
        now = self._clock.now()
        for message in messages:
            steps = plan(message.receiver, message_rng(self._config.seed, message.id),
                         self._config, resumed=resumed)
            # Validity counts from when the message was meant to leave.
            deadline = (message.deferred_until or message.created_at) + self._validity
            for at, code, dlr in timeline(steps, now, deadline):
                heapq.heappush(self._events, (at, next(self._seq), message.id, code, dlr))
        if messages:
            self._wake.set()

    async def _run(self) -> None:
        while True:
            now = self._clock.now()
            due: list[StateUpdate] = []
            while self._events and self._events[0][0] <= now:
                at, _, message_id, code, dlr = heapq.heappop(self._events)
                due.append(_update(message_id, code, dlr, at))
            if due and self._sink is not None:
                self._sink(due)
            await sleep_until(self._clock, self._events[0][0] if self._events else None,
                              self._wake)


def _update(message_id: int, code: int, dlr: int, at: float) -> StateUpdate:
    update = StateUpdate.from_ptt(message_id, code, at)
    if update.dlr == dlr:
        return update
    return StateUpdate(message_id, code, dlr, update.final, update.billed, at,
                       f"{update.note} (buffered)")
