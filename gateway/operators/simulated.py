"""The simulated operator: a network inside the gateway, for development and tests.

Each message follows a plan drawn from `operator.seed` and the message id alone (`Draws`),
so its outcome does not depend on batching, on other traffic or on restarts:
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
import hashlib
import heapq
import itertools
import re
import struct
import time
from collections.abc import Sequence
from typing import NamedTuple, TypeVar

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

# The shortest time between two batches of reports, on the clock or in real time, whichever
# passes first (a manual clock may stand still, and due states must still leave). Every
# batch is a transaction of the store (and a fsync) in the gateway: at thousands of
# messages a second, a wake-up for each due time gave batches of about 20 reports and 350
# transactions a second in the delivery worker; the states are at most this late, their
# times (`at`) stay the planned ones.
REPORT_BATCH_SECONDS = 0.05


T = TypeVar("T")


class Step(NamedTuple):
    """One state a message reaches, `after` seconds after it was handed to the network."""

    after: float
    ptt: int
    dlr: int


class Draws:
    """The random draws of one message's plan: uniform numbers read from SHA-512 digests of
    the seed and the message id, eight to a digest.

    A `random.Random` seeded for each message gave the same guarantee (a plan depends on
    the seed and the id only) but its seeding alone, which fills the Mersenne Twister's
    2.5 KB of state, cost 5-7 µs a message; a plan needs at most nine numbers.
    """

    __slots__ = ("_digests", "_key", "_used", "_values")

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._digests = 0
        self._values: tuple[int, ...] = ()
        self._used = 8

    def random(self) -> float:
        """In [0, 1), with 53 random bits like `random.random`."""
        if self._used == 8:
            self._values = _EIGHT.unpack(hashlib.sha512(
                self._key if not self._digests else b"%b/%d" % (self._key, self._digests)
            ).digest())
            self._digests += 1
            self._used = 0
        value = self._values[self._used]
        self._used += 1
        return (value >> 11) * _TWO_TO_MINUS_53

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()

    def randint(self, a: int, b: int) -> int:
        return a + int(self.random() * (b - a + 1))

    def choice(self, options: Sequence[T]) -> T:
        return options[int(self.random() * len(options))]


_EIGHT = struct.Struct("<8Q")
_TWO_TO_MINUS_53 = 2.0 ** -53


def magic_ptt(receiver: str) -> int | None:
    """The ptt forced by a `...99NNN` recipient, or None for an ordinary number."""
    if receiver[-5:-3] != "99":  # what the pattern needs, checked first: most numbers fail it
        return None
    match = _MAGIC.search(receiver)
    if match is None:
        return None
    code = int(match.group(1))
    return code if ptt.lookup(code) is not None else None


def _dlr(code: int) -> int:
    known = ptt.lookup(code)
    assert known is not None
    return int(known.dlr)


# Looked up once: a plan and its timeline need them for every message.
_DLRS = {code: _dlr(code) for code in (*RETRY_CODES, *FAILURE_CODES, DELIVERED)}
_WAITING, _BUFFERED = int(ptt.Dlr.WAITING), int(ptt.Dlr.BUFFERED)
_EXPIRED_DLR = _dlr(EXPIRED)
_FINAL_CODES = frozenset(code for code, known in ptt.PTTS.items() if known.final)


def plan(receiver: str, rng: Draws, config: SimulatedOperatorConfig, *,
         resumed: bool = False) -> list[Step]:
    """The states a message goes through, before the validity period is applied.

    `resumed` leaves out the acceptance, which was already reported before a restart.
    """
    low = config.min_delay
    high = max(low, config.max_delay)

    def delay() -> float:
        return low + (high - low) * rng.random()

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
        steps.append(Step(0.0, ACCEPTED, _BUFFERED if retries else _WAITING))
    at = 0.0
    for _ in range(retries):
        at += delay()
        code = rng.choice(RETRY_CODES)
        steps.append(Step(at, code, _DLRS[code]))
    at += delay()
    final = rng.choice(FAILURE_CODES) if rng.random() < config.failure_ratio else DELIVERED
    steps.append(Step(at, final, _DLRS[final]))
    return steps


def timeline(steps: Sequence[Step], start: float,
             deadline: float) -> list[tuple[float, int, int]]:
    """Absolute (time, ptt, dlr) events: the plan cut at the deadline, where it expires."""
    if start >= deadline:
        return [(start, EXPIRED, _EXPIRED_DLR)]
    events: list[tuple[float, int, int]] = []
    for after, code, dlr in steps:
        at = start + after
        if at >= deadline:
            break
        events.append((at, code, dlr))
    if not events or events[-1][1] not in _FINAL_CODES:
        events.append((deadline, EXPIRED, _EXPIRED_DLR))
    return events


def reference(message_id: int, part: int = 1) -> str:
    """The simulated network's reference for one part of a message."""
    return f"{message_id}.{part}"


def message_rng(seed: int, message_id: int) -> Draws:
    return Draws(b"%d:%d" % (seed, message_id))


class SimulatedOperator:
    """Plays each message's timeline on the clock and reports the states in batches."""

    def __init__(self, config: SimulatedOperatorConfig, clock: Clock, *,
                 batch_seconds: float = REPORT_BATCH_SECONDS) -> None:
        self._config = config
        self._clock = clock
        self._batch_seconds = batch_seconds
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
        config, seed, events, seq = self._config, self._config.seed, self._events, self._seq
        push = heapq.heappush
        for message in messages:
            steps = plan(message.receiver, message_rng(seed, message.id), config,
                         resumed=resumed)
            # Validity counts from when the message was meant to leave.
            deadline = (message.deferred_until or message.created_at) + self._validity
            name = f"{message.id}.1"  # see `reference`
            for at, code, dlr in timeline(steps, now, deadline):
                if at < first:
                    first = at
                push(events, (at, next(seq), name, code, dlr))
                if code == DELIVERED:
                    # A long message is delivered when every part is (the store merges).
                    for part in range(2, message.parts + 1):
                        push(events, (at, next(seq), reference(message.id, part), code, dlr))
        if first < self._wake_at:
            self._wake.set()

    async def _run(self) -> None:
        events = self._events
        # When the last batch left, on the clock and in real time (time.monotonic).
        reported_at = reported_real = float("-inf")
        while True:
            now = self._clock.now()
            if events and events[0][0] <= now:
                wait = reported_real + self._batch_seconds - time.monotonic()
                if wait > 0 and now < reported_at + self._batch_seconds:
                    # What falls due meanwhile leaves with them; a submit need not wake us.
                    self._wake_at = float("-inf")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(sleep_until(
                            self._clock, reported_at + self._batch_seconds, asyncio.Event()),
                            wait)
                    continue
                due: list[OperatorReport] = []
                while events and events[0][0] <= now:
                    at, _, name, code, dlr = heapq.heappop(events)
                    due.append(_report(name, code, dlr, at))
                if self._sink is not None:
                    # Not awaited: planned states are not persisted anyway (see `stop`).
                    self._sink.reports(due)
                    reported_at, reported_real = now, time.monotonic()
            wake_at = events[0][0] if events else None
            # A submit wakes us only when it brings a state due before then (`_schedule`).
            self._wake_at = float("inf") if wake_at is None else wake_at
            await sleep_until(self._clock, wake_at, self._wake)


def _report(name: str, code: int, dlr: int, at: float) -> OperatorReport:
    known = _REPORTS.get((code, dlr))
    if known is None:
        report = OperatorReport.from_ptt(name, code, at)
        if report.dlr != dlr:
            report = OperatorReport(name, code, dlr, report.final, report.billed, at,
                                    f"{report.note} (buffered)")
        # What a report of (code, dlr) says besides its reference and time: the same for
        # every message, so looked up once (two reports a message).
        known = _REPORTS[(code, dlr)] = (report.final, report.billed, report.note)
    return OperatorReport(name, code, dlr, known[0], known[1], at, known[2])


_REPORTS: dict[tuple[int, int], tuple[bool, bool, str]] = {}
