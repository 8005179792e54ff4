"""The simulated operator on its own: its pure planning rules, then its timing on a manual clock."""

from __future__ import annotations

import asyncio
import itertools
import types
from collections import Counter
from collections.abc import Sequence

import pytest
from structlog.testing import capture_logs

from gateway import ptt
from gateway.clock import ManualClock
from gateway.config import ConfigError, OperatorConfig, SimulatedOperatorConfig, SmppSettings
from gateway.operators import create
from gateway.operators.base import Acknowledgement, Inbound, LinkStatus, Taken
from gateway.operators.simulated import (
    FAILURE_CODES,
    RETRY_CODES,
    SimulatedOperator,
    Step,
    magic_ptt,
    message_rng,
    plan,
    reference,
    timeline,
)
from gateway.operators.smpp.connector import SmppOperator
from gateway.records import OperatorReport, OutgoingMessage

T0 = 1_700_000_000.0


def cfg(**changes: float) -> SimulatedOperatorConfig:
    return SimulatedOperatorConfig(**{"min_delay": 10.0, "max_delay": 20.0, "retry_ratio": 0.1,
                                      "failure_ratio": 0.05, "validity_hours": 48.0, **changes})


def outgoing(message_id: int, receiver: str = "+33612345678", *, created_at: float = T0,
             deferred_until: float | None = None, parts: int = 1) -> OutgoingMessage:
    return OutgoingMessage(message_id, "ACME", receiver, "hi", 1, 1, created_at,
                           deferred_until, parts=parts)


def _done() -> Acknowledgement:
    done: Acknowledgement = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


# -- magic numbers -------------------------------------------------------------------------

@pytest.mark.parametrize(("receiver", "expected"), [
    ("+33612399023", 23),
    ("+33612399004", 4),
    ("+33612399001", 1),
    ("+33612399202", 202),
    ("+33612345678", None),
    ("+33612399999", None),   # 999 is no ptt: an ordinary number
    ("+33612399007", None),   # neither is 7
    ("+3361239902", None),    # 99 followed by two digits only
    ("+33699023123", None),   # 99NNN not at the end
])
def test_magic_ptt(receiver: str, expected: int | None) -> None:
    assert magic_ptt(receiver) == expected


@pytest.mark.parametrize("code", [4, 5, 20, 23, 27, 28, 39, 76, 202])
def test_a_magic_final_code_is_reached_whatever_the_seed(code: int) -> None:
    for seed in range(20):
        steps = plan(f"+336123990{code:02d}" if code < 100 else f"+33612399{code}",
                     message_rng(seed, 7), cfg())
        assert [(s.ptt, s.dlr) for s in steps] == [(3, 4), (code, int(ptt.PTTS[code].dlr))]
        assert 10.0 <= steps[1].after <= 20.0


def test_a_magic_intermediate_code_stays_until_the_message_expires() -> None:
    steps = plan("+33612399024", message_rng(0, 1), cfg())
    assert [(s.ptt, s.dlr) for s in steps] == [(3, 4), (24, 8)]
    events = timeline(steps, T0, T0 + 48 * 3600)
    assert [(code, dlr) for _, code, dlr in events] == [(3, 4), (24, 8), (8, 2)]
    assert events[-1][0] == T0 + 48 * 3600


# -- the random mix ------------------------------------------------------------------------

def test_outcomes_follow_the_configured_mix() -> None:
    config = cfg(retry_ratio=0.2, failure_ratio=0.1)
    plans = [plan("+33612345678", message_rng(42, i), config) for i in range(5000)]
    finals = Counter(p[-1].ptt for p in plans)
    delivered = finals[4] / len(plans)
    retried = sum(1 for p in plans if len(p) > 2) / len(plans)
    assert 0.87 <= delivered <= 0.93, delivered
    assert 0.17 <= retried <= 0.23, retried
    assert set(finals) - {4} <= set(FAILURE_CODES)
    assert len(set(finals) - {4}) >= 8  # failures are drawn from the whole table
    assert 8 not in finals             # expiry comes from the validity period only
    for p in plans:
        assert p[0].ptt == 3 and p[0].after == 0.0
        retries = p[1:-1]
        assert 0 <= len(retries) <= 2
        assert all(s.ptt in RETRY_CODES and s.dlr == 8 for s in retries)
        # Accepted "buffered" exactly when the network will have to retry.
        assert p[0].dlr == (8 if retries else 4)
        assert all(b.after - a.after >= 10.0 for a, b in itertools.pairwise(p))
        assert p[-1].after <= 20.0 * len(p)
        assert ptt.PTTS[p[-1].ptt].final


def test_not_billed_failures_are_part_of_the_mix() -> None:
    config = cfg(failure_ratio=1.0)
    finals = {plan("+33612345678", message_rng(1, i), config)[-1].ptt for i in range(500)}
    assert {20, 23, 28, 29, 76, 202} <= finals
    assert all(ptt.PTTS[c].dlr is (ptt.Dlr.NOT_BILLED if not ptt.PTTS[c].billed
                                   else ptt.Dlr.FAILED) for c in finals)


def test_a_plan_depends_only_on_the_seed_and_the_message() -> None:
    config = cfg(failure_ratio=0.5, retry_ratio=0.5)
    first = [plan("+33612345678", message_rng(7, i), config) for i in range(200)]
    again = [plan("+33612345678", message_rng(7, i), config) for i in reversed(range(200))]
    assert first == list(reversed(again))
    other_seed = [plan("+33612345678", message_rng(8, i), config) for i in range(200)]
    assert first != other_seed


def test_a_resumed_plan_is_not_accepted_again() -> None:
    config = cfg(retry_ratio=0.0, failure_ratio=0.0)
    assert [s.ptt for s in plan("+33612345678", message_rng(0, 3), config,
                                resumed=True)] == [4]
    assert plan("+33612399003", message_rng(0, 3), config, resumed=True) == []


# -- validity ------------------------------------------------------------------------------

def test_timeline_expires_what_the_deadline_cuts() -> None:
    steps = [Step(0.0, 3, 4), Step(50.0, 1, 8), Step(150.0, 4, 1)]
    assert timeline(steps, T0, T0 + 100) == [(T0, 3, 4), (T0 + 50, 1, 8), (T0 + 100, 8, 2)]
    assert timeline(steps, T0, T0 + 1000)[-1] == (T0 + 150, 4, 1)


def test_a_message_past_its_validity_expires_at_once() -> None:
    assert timeline([Step(0.0, 3, 4), Step(5.0, 4, 1)], T0 + 10, T0 + 10) == \
        [(T0 + 10, 8, 2)]


# -- the running simulator -----------------------------------------------------------------

class Reports:
    """An operator sink recording what the simulator says."""

    def __init__(self) -> None:
        self.updates: list[OperatorReport] = []
        self.inbound_messages: list[Inbound] = []
        self.batches = 0
        self.arrived = asyncio.Event()

    def reports(self, reports: Sequence[OperatorReport]) -> Acknowledgement:
        self.updates.extend(reports)
        self.batches += 1
        self.arrived.set()
        return _done()

    def inbound(self, messages: Sequence[Inbound]) -> Acknowledgement:
        self.inbound_messages.extend(messages)
        return _done()

    def of(self, message_id: int) -> list[int]:
        return [u.ptt for u in self.updates if u.reference == reference(message_id)]

    async def settle(self) -> None:
        # Let the simulator's task run what the clock has made due.
        for _ in range(5):
            await asyncio.sleep(0)


async def started(config: OperatorConfig, clock: ManualClock) -> tuple[SimulatedOperator,
                                                                        Reports]:
    operator = create(config, clock)
    assert isinstance(operator, SimulatedOperator)
    reports = Reports()
    await operator.start(reports)
    return operator, reports


async def test_states_arrive_on_the_clock() -> None:
    clock = ManualClock(T0)
    operator, reports = await started(cfg(retry_ratio=0.0, failure_ratio=0.0), clock)
    try:
        await operator.submit([outgoing(1), outgoing(2, "+33612399023")])
        await reports.settle()
        assert (reports.of(1), reports.of(2)) == ([3], [3])
        assert all(u.at == T0 for u in reports.updates)
        clock.advance(9.9)
        await reports.settle()
        assert (reports.of(1), reports.of(2)) == ([3], [3])
        clock.advance(10.1)
        await reports.settle()
        assert (reports.of(1), reports.of(2)) == ([3, 4], [3, 23])
        final = [u for u in reports.updates if u.final]
        assert all(T0 + 10 <= u.at <= T0 + 20 for u in final)
        assert {(u.ptt, u.dlr, u.billed) for u in final} == {(4, 1, True), (23, 16, False)}
        assert operator.in_flight == 0
    finally:
        await operator.stop()


async def test_a_stuck_message_expires_after_the_validity_period() -> None:
    clock = ManualClock(T0)
    operator, reports = await started(cfg(validity_hours=1.0), clock)
    try:
        await operator.submit([outgoing(1, "+33612399001")])
        clock.advance(30)
        await reports.settle()
        assert reports.of(1) == [3, 1]
        clock.advance(3600)
        await reports.settle()
        assert reports.of(1) == [3, 1, 8]
        assert reports.updates[-1].at == T0 + 3600
        assert (reports.updates[-1].dlr, reports.updates[-1].final) == (2, True)
    finally:
        await operator.stop()


async def test_validity_of_a_deferred_message_counts_from_its_time() -> None:
    clock = ManualClock(T0 + 7200)
    operator, reports = await started(cfg(validity_hours=1.0), clock)
    try:
        await operator.submit([outgoing(1, "+33612399003", created_at=T0,
                                        deferred_until=T0 + 7200),
                               outgoing(2, "+33612399003", created_at=T0)])
        await reports.settle()
        # Created two hours ago with one hour of validity: expired without being accepted.
        assert (reports.of(1), reports.of(2)) == ([3], [8])
        clock.advance(3600)
        await reports.settle()
        assert reports.of(1) == [3, 8]
    finally:
        await operator.stop()


async def test_many_messages_are_reported_in_few_batches() -> None:
    clock = ManualClock(T0)
    operator, reports = await started(cfg(min_delay=5.0, max_delay=5.0), clock)
    try:
        await operator.submit([outgoing(i) for i in range(1, 2001)])
        await reports.settle()
        clock.advance(3600)
        await reports.settle()
        assert sum(1 for u in reports.updates if u.final) == 2000
        assert reports.batches <= 10
    finally:
        await operator.stop()


async def test_reports_leave_in_batches_and_keep_their_planned_times() -> None:
    clock = ManualClock(T0)
    operator = SimulatedOperator(
        cfg(min_delay=0.0, max_delay=1.0, retry_ratio=0.0, failure_ratio=0.0), clock,
        batch_seconds=0.3)
    reports = Reports()
    await operator.start(reports)
    try:
        await operator.submit([outgoing(i) for i in range(1, 201)])
        await reports.settle()
        assert (reports.batches, len(reports.updates)) == (1, 200)  # the acceptances
        clock.advance(0.01)
        await operator.submit([outgoing(201)])
        clock.advance(0.2)  # states due: they wait for the batch interval (0.3 s)
        await reports.settle()
        assert reports.batches == 1
        clock.advance(0.9)  # past it on the clock: everything due so far, together
        await reports.settle()
        assert reports.batches == 2
        finals = [u for u in reports.updates if u.final]
        assert sorted(int(u.reference.split(".")[0]) for u in finals) == list(range(1, 202))
        # Each report keeps its planned time, not the time its batch left.
        assert len({u.at for u in finals}) > 100
        assert all(T0 < u.at <= T0 + 1.01 for u in finals)
        assert next(u.at for u in reports.updates if u.reference == "201.1") == T0 + 0.01
        # A clock that stands still: the interval passes in real time.
        reports.arrived.clear()
        await operator.submit([outgoing(202)])
        await reports.settle()
        assert reports.batches == 2
        await asyncio.wait_for(reports.arrived.wait(), 5)
        assert (reports.batches, reports.updates[-1].reference) == (3, "202.1")
    finally:
        await operator.stop()


async def test_it_takes_each_message_with_a_reference_per_part() -> None:
    clock = ManualClock(T0)
    operator, reports = await started(cfg(), clock)
    try:
        results = await operator.submit([outgoing(1), outgoing(2, parts=3)])
        assert results == [Taken(1, ("1.1",)), Taken(2, ("2.1", "2.2", "2.3"))]
        await reports.settle()
        # States come under the first part's reference.
        assert {u.reference for u in reports.updates} == {"1.1", "2.1"}
    finally:
        await operator.stop()


async def test_its_link_is_up_from_start_to_stop() -> None:
    clock = ManualClock(T0)
    operator = create(cfg(), clock)
    assert operator.link_status() == LinkStatus(False, "stopped")
    sink = Reports()
    await operator.start(sink)
    assert operator.link_status().up
    await operator.stop()
    assert not operator.link_status().up


async def test_it_hands_inbound_messages_to_the_gateway_when_asked() -> None:
    clock = ManualClock(T0)
    operator, reports = await started(cfg(), clock)
    try:
        assert isinstance(operator, SimulatedOperator)
        await operator.receive("+33612345678", "36180", "STOP")
        (message,) = reports.inbound_messages
        assert (message.sender, message.receiver, message.body, message.at) == \
            ("+33612345678", "36180", "STOP", T0)
    finally:
        await operator.stop()


class SmppStub(OperatorConfig, frozen=True, tag="smpp"):
    """Settings of a kind that has no connector."""


def test_an_unknown_operator_kind_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="smpp"):
        create(SmppStub(), ManualClock())


async def test_a_receipt_without_id_is_logged_without_the_message_s_text() -> None:
    """A receipt's `text:` field holds the message's first characters (a one-time code)."""
    operator = SmppOperator(SmppSettings(), ManualClock(0))
    operator._sink = object()  # type: ignore[assignment]  # never called: no id to match
    pdu = types.SimpleNamespace(
        short_message=b"sub:001 dlvrd:001 stat:DELIVRD err:000 text:Your code is 123456",
        receipted_message_id=None, message_state=None)
    with capture_logs() as logged:
        await operator._receipt(pdu)  # type: ignore[arg-type]
    assert [e["event"] for e in logged] == ["smpp_receipt_without_id"]
    assert "123456" not in str(logged) and "stat:DELIVRD" in logged[0]["text"]
