"""Delivery through the whole gateway: operator states, history, refunds, deferred sends,
recovery after a restart and draining a large backlog."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest

from gateway import delivery
from gateway.app import delivery_services
from gateway.clock import ManualClock, SystemClock
from gateway.config import Config, SmppSettings
from gateway.delivery import Dispatcher
from gateway.metrics import Metrics
from gateway.operators.base import (
    Inbound,
    Later,
    LinkStatus,
    OperatorSink,
    OperatorUnavailable,
    Refused,
    SubmitResult,
    Taken,
)
from gateway.operators.simulated import reference
from gateway.operators.smpp.connector import SmppOperator
from gateway.records import (
    AppliedUpdates,
    OperatorReport,
    OutgoingMessage,
    SendOrder,
    SentMessage,
    StateUpdate,
)
from gateway.service import Management
from gateway.store import OverCreditLimit, Store, open_store
from tests import dbrows
from tests.conftest import ACCOUNT, LOGIN, PASSWORD, SENDER, Harness, eventually, ledger_identity
from tests.smsc import Smsc

T0 = 1_700_000_000.0
PARIS = ZoneInfo("Europe/Paris")



def ids_of(body: str) -> list[int]:
    lines = body.split("\n")
    assert lines[0] == "OK", body
    return [int(line) for line in lines[2:]]


async def final(h: Harness, *ids: int) -> None:
    async def done() -> bool:
        return all([(await h.gateway.store.get_message(i)).state == "final" for i in ids])
    await eventually(done)


async def history(h: Harness, message_id: int) -> list[tuple[int | None, int]]:
    return [(e.ptt, e.dlr) for e in await h.gateway.store.message_events(message_id)]


def deferred_param(at: float) -> tuple[str, float]:
    """`deferred` for the minute at or before `at`, and that minute as a timestamp."""
    when = datetime.fromtimestamp(at, PARIS).replace(second=0, microsecond=0)
    return when.strftime("%H%M%d%m%Y"), when.timestamp()


# -- states and history --------------------------------------------------------------------

async def test_a_message_is_accepted_then_delivered_with_its_history(make_harness: Any
                                                                     ) -> None:
    h: Harness = await make_harness()
    (message_id,) = ids_of((await h.send())[1])
    await final(h, message_id)
    message = await h.gateway.store.get_message(message_id)
    assert (message.ptt, message.dlr, message.state) == (4, 1, "final")
    assert message.sent_at is not None and message.delivered_at is not None
    assert await history(h, message_id) == [(None, 0), (3, 4), (4, 1)]
    notes = [e.note for e in await h.gateway.store.message_events(message_id)]
    assert notes == ["accepted", "Accepted by the operator", "Delivered"]


async def test_magic_numbers_end_in_their_ptt(make_harness: Any) -> None:
    h: Harness = await make_harness()
    codes = [4, 5, 6, 20, 21, 23, 27, 28, 29, 33, 39, 73, 76, 202]
    to = ",".join(f"+33612399{code:03d}" for code in codes)
    ids = ids_of((await h.send(to=to, noStop="1"))[1])
    await final(h, *ids)
    expected_dlr = {4: 1, 20: 16, 23: 16, 28: 16, 29: 16, 76: 16, 202: 16}
    for message_id, code in zip(ids, codes, strict=True):
        message = await h.gateway.store.get_message(message_id)
        assert (message.ptt, message.dlr) == (code, expected_dlr.get(code, 2)), code
        assert (await history(h, message_id))[-1] == (code, expected_dlr.get(code, 2))


async def test_a_retrying_magic_number_stays_until_it_expires(make_harness: Any) -> None:
    clock = ManualClock(T0)
    h: Harness = await make_harness(clock=clock)
    (message_id,) = ids_of((await h.send(to="+33612399025"))[1])

    async def in_state(code: int) -> bool:
        return (await h.gateway.store.get_message(message_id)).ptt == code
    await eventually(lambda: in_state(25))
    assert (await h.gateway.store.get_message(message_id)).state == "sent"
    clock.advance(47 * 3600)
    await asyncio.sleep(0.05)
    assert await in_state(25)
    clock.advance(3600)
    await final(h, message_id)
    assert await history(h, message_id) == [(None, 0), (3, 4), (25, 8), (8, 2)]
    assert (await h.gateway.store.message_events(message_id))[-1].at == T0 + 48 * 3600


# -- refunds -------------------------------------------------------------------------------

async def test_a_not_billed_failure_is_refunded_to_the_account(make_harness: Any) -> None:
    h: Harness = await make_harness(credits=10)
    ids = ids_of((await h.send(to="+33612399023,+33612399027", noStop="1"))[1])
    assert await h.balance() == 800
    await final(h, *ids)
    # 23 (invalid number) is not billed; 27 (handset incompatible) is.
    assert await h.balance() == 900
    refunds = [e for e in await h.gateway.store.list_ledger(ACCOUNT, limit=50)
               if e.kind == "refund"]
    assert [(e.source, e.target, e.amount, e.login) for e in refunds] == \
        [("spent", "account", 100, LOGIN)]
    assert refunds[0].reference == f"sms:{ids[0]} ptt 23"
    ledger_identity(await h.gateway.store.ledger_totals())


async def test_a_not_billed_failure_is_refunded_to_the_quota(make_harness: Any) -> None:
    h: Harness = await make_harness(credits=100)
    await h.manage.update_user(ACCOUNT, LOGIN, quota=5)
    ids = ids_of((await h.send(to="+33612399076,+33612399004", noStop="1"))[1])
    assert (await h.quota(), await h.balance()) == (300, 9500)
    await final(h, *ids)
    assert (await h.quota(), await h.balance()) == (400, 9500)
    ledger_identity(await h.gateway.store.ledger_totals())


# -- deferred sends ------------------------------------------------------------------------

async def test_deferred_messages_go_at_their_time(make_harness: Any) -> None:
    clock = ManualClock(T0)
    h: Harness = await make_harness(clock=clock)
    later, later_at = deferred_param(T0 + 3 * 3600)
    sooner, sooner_at = deferred_param(T0 + 3600)
    _, body = await h.send(deferred=later)
    assert body.startswith("OK")
    (late_id,) = ids_of(body)
    # A nearer deferred time committed afterwards still wakes the dispatcher in time.
    (soon_id,) = ids_of((await h.send(deferred=sooner))[1])

    async def state(message_id: int) -> str:
        return (await h.gateway.store.get_message(message_id)).state
    clock.advance(sooner_at - T0 - 1)
    await asyncio.sleep(0.05)
    assert (await state(soon_id), await state(late_id)) == ("deferred", "deferred")
    clock.advance(1)
    await final(h, soon_id)
    assert await state(late_id) == "deferred"
    sent = (await h.gateway.store.get_message(soon_id)).sent_at
    assert sent == sooner_at
    clock.advance(later_at - sooner_at)
    await final(h, late_id)
    assert await history(h, late_id) == [(None, 0), (3, 4), (4, 1)]
    assert (await h.gateway.store.message_events(late_id))[1].at == later_at


async def test_deferred_messages_survive_a_restart(make_harness: Any, config: Config) -> None:
    clock = ManualClock(T0)
    first: Harness = await make_harness(clock=clock)
    code, due_at = deferred_param(T0 + 2 * 3600)
    (message_id,) = ids_of((await first.send(deferred=code))[1])
    await first.client.close()  # stops the gateway

    clock.advance(due_at - T0 + 60)  # the time passes while the gateway is down
    second: Harness = await make_harness(clock=clock, seed=False)
    await final(second, message_id)
    message = await second.gateway.store.get_message(message_id)
    assert (message.ptt, message.sent_at) == (4, clock.now())


async def test_a_deferred_message_waits_across_a_restart(make_harness: Any) -> None:
    clock = ManualClock(T0)
    first: Harness = await make_harness(clock=clock)
    code, due_at = deferred_param(T0 + 2 * 3600)
    (message_id,) = ids_of((await first.send(deferred=code))[1])
    await first.client.close()

    second: Harness = await make_harness(clock=clock, seed=False)
    await asyncio.sleep(0.05)
    assert (await second.gateway.store.get_message(message_id)).state == "deferred"
    clock.advance(due_at - T0)
    await final(second, message_id)


# -- recovery and throughput ---------------------------------------------------------------

class CountingStore:
    """The real store, counting the delivery transactions."""

    def __init__(self, path: str) -> None:
        self._store = open_store(path, "send")
        self.calls: dict[str, int] = {"mark_sent": 0, "apply_updates": 0}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def mark_sent(self, ids: Sequence[int], *, at: float,
                        references: Sequence[SentMessage] = ()) -> None:
        self.calls["mark_sent"] += 1
        await self._store.mark_sent(ids, at=at, references=references)

    async def apply_updates(self, updates: Sequence[StateUpdate]) -> AppliedUpdates:
        self.calls["apply_updates"] += 1
        return await self._store.apply_updates(updates)


async def seed_queued(config: Config, count: int, *, per_order: int = 1000) -> list[int]:
    """Commit `count` messages straight into the store, as a stopped gateway leaves them."""
    store = open_store(config.store.path, "cli")
    await store.open()
    try:
        manage = Management(store, config)
        await manage.create_account(ACCOUNT, count + 100)
        await manage.add_sender(ACCOUNT, SENDER)
        await manage.create_user(ACCOUNT, LOGIN, PASSWORD)
        user = await store.get_user(ACCOUNT, LOGIN)
        orders = [SendOrder(user.account_id, user.id, LOGIN, SENDER, "backlog", 1, 1, 1, True,
                            "", tuple(f"+336{i + n:08d}" for n in range(per_order)),
                            (100,) * per_order)
                  for i in range(0, count, per_order)]
        outcomes = await store.commit_sends(orders, at=time.time())
        return [i for outcome in outcomes for i in outcome.ids]
    finally:
        await store.close()


def delivery_counts(path: str) -> tuple[int, int, int]:
    """(messages, messages accepted exactly once, messages final)."""
    (row,) = dbrows.query(
        path, "SELECT (SELECT COUNT(*) FROM messages) AS messages, "
        "(SELECT COUNT(*) FROM (SELECT message_id FROM message_events WHERE ptt = 3 "
        "  GROUP BY message_id HAVING COUNT(*) = 1) AS once) AS once, "
        "(SELECT COUNT(*) FROM messages WHERE state = 'final') AS final")
    return row["messages"], row["once"], row["final"]


async def test_a_10000_message_backlog_drains_in_batches(make_harness: Any,
                                                         config: Config) -> None:
    config = config.replace({"operator.max_batch": 1000})
    await seed_queued(config, 10_000)
    store = CountingStore(config.store.path)
    started = time.monotonic()
    from gateway import app as gateway_app

    gateway = gateway_app.build(config, store=cast(Store, store))
    await gateway.start()
    try:
        # Live sends while the backlog drains go out once each, like the backlog.
        live = await asyncio.gather(*(gateway.committer.submit(SendOrder(
            1, 1, LOGIN, SENDER, "live", 1, 1, 1, True, "", (f"+3361111{n:04d}",), (100,)))
            for n in range(50)))

        async def drained() -> bool:
            counts = await store.counts()
            return counts["queued"] == counts["sent"] == 0
        await eventually(drained, timeout=30)
        elapsed = time.monotonic() - started
    finally:
        await gateway.stop()
    assert all(outcome.accepted for outcome in live)
    assert delivery_counts(config.store.path) == (10_050, 10_050, 10_050)
    assert elapsed < 20, elapsed
    # 10,050 messages: a few dozen transactions, not one per message.
    assert store.calls["mark_sent"] <= 70, store.calls
    assert store.calls["apply_updates"] <= 120, store.calls


async def test_messages_in_flight_at_a_stop_are_resumed_not_resent(
        make_harness: Any, config: Config) -> None:
    ids = await seed_queued(config, 4, per_order=2)
    store = open_store(config.store.path, "cli")
    await store.open()
    # The operator had these two.
    await store.mark_sent(ids[:2], at=time.time(),
                          references=[SentMessage(i, (reference(i),)) for i in ids[:2]])
    await store.close()

    h: Harness = await make_harness(seed=False)
    await final(h, *ids)
    assert [len(await history(h, i)) for i in ids] == [2, 2, 3, 3]
    assert await history(h, ids[0]) == [(None, 0), (4, 1)]


# -- the operator interface ----------------------------------------------------------------

class FlakyOperator:
    """Another implementation of the operator interface: down at first, then delivers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.sink: OperatorSink | None = None

    async def start(self, sink: OperatorSink) -> None:
        self.sink = sink

    async def stop(self) -> None:
        self.sink = None

    async def submit(self, messages: Sequence[OutgoingMessage]) -> Sequence[SubmitResult]:
        self.calls += 1
        if self.calls <= self.failures:
            raise OperatorUnavailable("link down")
        assert self.sink is not None
        self.sink.reports([OperatorReport.from_ptt(f"F{m.id}", 4, T0) for m in messages])
        return [Taken(m.id, (f"F{m.id}",)) for m in messages]

    async def resume(self, messages: Sequence[OutgoingMessage]) -> None:
        pass

    def link_status(self) -> LinkStatus:
        return LinkStatus(self.calls > self.failures)


async def test_messages_wait_while_the_operator_is_unavailable(config: Config) -> None:
    ids = await seed_queued(config, 3, per_order=3)
    store = open_store(config.store.path, "cli")
    await store.open()
    clock = ManualClock(T0)
    operator = FlakyOperator(failures=2)
    dispatcher = Dispatcher(store, clock, operator, retry_seconds=5.0)
    await dispatcher.start()
    try:
        await eventually(lambda: _true(operator.calls == 1))
        assert (await store.counts())["queued"] == 3
        clock.advance(5)
        await eventually(lambda: _true(operator.calls == 2))
        clock.advance(5)

        async def delivered() -> bool:
            return all([(await store.get_message(i)).ptt == 4 for i in ids])
        await eventually(delivered)
        assert operator.calls == 3
    finally:
        await dispatcher.stop()
        await store.close()


async def _true(value: bool) -> bool:
    return value


@pytest.mark.parametrize("kind", ["simulated"])
def test_the_default_operator_is_the_simulator(config: Config, kind: str) -> None:
    from gateway import app as gateway_app

    assert config.operator.kind == kind
    gateway = gateway_app.build(config)
    assert gateway.dispatcher is not None
    assert type(gateway.dispatcher.operator).__name__ == "SimulatedOperator"



# -- the operator interface, version 2 -------------------------------------------------------

class ScriptedOperator:
    """An operator answering each message as `answer` says; None: the link drops there, and
    neither that message nor the rest of the batch is answered."""

    def __init__(self, answer: Callable[[OutgoingMessage], SubmitResult | None]) -> None:
        self.answer = answer
        self.calls: list[list[int]] = []
        self.failures = 0  # calls to fail at once, before answering anything
        self.delay = 0.0   # seconds each call takes
        self.sink: OperatorSink | None = None

    async def start(self, sink: OperatorSink) -> None:
        self.sink = sink

    async def stop(self) -> None:
        pass

    async def submit(self, messages: Sequence[OutgoingMessage]) -> Sequence[SubmitResult]:
        self.calls.append([m.id for m in messages])
        await asyncio.sleep(self.delay)  # let others run meanwhile, as a network would
        if self.failures:
            self.failures -= 1
            raise OperatorUnavailable("link down")
        results: list[SubmitResult] = []
        for message in messages:
            result = self.answer(message)
            if result is None:
                break
            results.append(result)
        return results

    async def resume(self, messages: Sequence[OutgoingMessage]) -> None:
        pass

    def link_status(self) -> LinkStatus:
        return LinkStatus(True)

    @property
    def submitted(self) -> list[int]:
        return [i for call in self.calls for i in call]


def take(message: OutgoingMessage) -> Taken:
    return Taken(message.id, (f"R{message.id}",))


@contextlib.asynccontextmanager
async def dispatching(config: Config, operator: ScriptedOperator, *,
                      clock: ManualClock | SystemClock | None = None,
                      store: Store | None = None,
                      **options: Any) -> AsyncIterator[tuple[Dispatcher, Store]]:
    store = store or open_store(config.store.path, "delivery")
    await store.open()
    dispatcher = Dispatcher(store, clock or ManualClock(T0), operator, retry_seconds=5.0,
                            **options)
    await dispatcher.start()
    try:
        yield dispatcher, store
    finally:
        await dispatcher.stop()
        await store.close()


async def states(store: Store, ids: Sequence[int]) -> list[str]:
    return [(await store.get_message(i)).state for i in ids]


async def stays(check: Callable[[], bool]) -> None:
    """A bounded chance for background work to make `check` false: it must not."""
    with contextlib.suppress(AssertionError):
        await eventually(lambda: not check(), timeout=0.3)
    assert check()


async def test_each_message_is_taken_tried_later_or_refused(config: Config) -> None:
    a, b, c = await seed_queued(config, 3, per_order=3)
    throttled: set[int] = set()

    def answer(message: OutgoingMessage) -> SubmitResult:
        if message.id == b and b not in throttled:
            throttled.add(b)
            return Later(b, 30.0, "throttled")
        if message.id == c:
            return Refused(c, 23)  # final, not billed
        return take(message)

    operator = ScriptedOperator(answer)
    clock = ManualClock(T0)
    before = await balance(config)
    async with dispatching(config, operator, clock=clock) as (_, store):
        async def answered() -> bool:
            return await states(store, [a, b, c]) == ["sent", "queued", "final"]
        await eventually(answered)
        assert operator.calls == [[a, b, c]]
        refused = await store.get_message(c)
        assert (refused.ptt, refused.dlr) == (23, 16)
        assert (await store.get_account(ACCOUNT)).balance == before + 100  # refunded
        # Tried again after the delay the operator asked for, not before.
        clock.advance(29)
        await stays(lambda: len(operator.calls) == 1)
        clock.advance(1)
        await eventually(lambda: len(operator.calls) == 2)
        assert operator.calls[1] == [b]

        async def all_sent() -> bool:
            return await states(store, [a, b]) == ["sent", "sent"]
        await eventually(all_sent)


async def test_a_refusal_at_a_ptt_that_is_not_final_is_tried_again_later(
        config: Config) -> None:
    """A connector's Refused at a non-final ptt (1: retrying) left the message sent with no
    reference, never claimed again, its credits held: it is taken as "try later"."""
    (a,) = await seed_queued(config, 1, per_order=1)
    refused: set[int] = set()

    def answer(message: OutgoingMessage) -> SubmitResult:
        if not refused:
            refused.add(message.id)
            return Refused(message.id, 1)
        return take(message)

    operator = ScriptedOperator(answer)
    clock = ManualClock(T0)
    async with dispatching(config, operator, clock=clock) as (_, store):
        async def released() -> bool:  # queued again, due after retry_seconds
            return await store.next_due_at() == T0 + 5
        await eventually(released)
        assert await states(store, [a]) == ["queued"]
        assert (await store.get_message(a)).ptt is None
        clock.advance(5)
        await eventually(lambda: operator.calls == [[a], [a]])

        async def sent() -> bool:
            return await states(store, [a]) == ["sent"]
        await eventually(sent)


async def balance(config: Config) -> int:
    store = open_store(config.store.path, "send")
    await store.open()
    try:
        return (await store.get_account(ACCOUNT)).balance
    finally:
        await store.close()


async def test_a_batch_failing_half_way_resends_only_what_was_not_taken(
        config: Config) -> None:
    ids = await seed_queued(config, 4, per_order=4)
    dropped: set[int] = set()

    def answer(message: OutgoingMessage) -> SubmitResult | None:
        if message.id == ids[2] and not dropped:
            dropped.add(message.id)
            return None  # the link drops after the first two answers
        return take(message)

    operator = ScriptedOperator(answer)
    clock = ManualClock(T0)
    async with dispatching(config, operator, clock=clock) as (_, store):
        async def first_two() -> bool:
            return await states(store, ids) == ["sent", "sent", "queued", "queued"]
        await eventually(first_two)
        operator.failures = 1  # and the next try fails outright
        clock.advance(5)
        await eventually(lambda: len(operator.calls) == 2)
        clock.advance(5)

        async def all_sent() -> bool:
            return await states(store, ids) == ["sent"] * 4
        await eventually(all_sent)
        assert operator.calls == [ids, ids[2:], ids[2:]]


class GatedStore:
    """The real store, applying reports only once `gate` is set."""

    def __init__(self, path: str) -> None:
        self._store = open_store(path, "delivery")
        self.gate = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def apply_reports(self, reports: Sequence[OperatorReport]) -> AppliedUpdates:
        await self.gate.wait()
        return await self._store.apply_reports(reports)


async def test_reports_find_their_message_by_reference_and_are_acknowledged_after_commit(
        config: Config) -> None:
    (a,) = await seed_queued(config, 1, per_order=1)
    operator = ScriptedOperator(lambda m: Taken(m.id, (f"R{m.id}.1", f"R{m.id}.2")))
    gated = GatedStore(config.store.path)
    async with dispatching(config, operator, store=cast(Store, gated)) as (_, store):
        async def sent() -> bool:
            return await states(store, [a]) == ["sent"]
        await eventually(sent)
        assert operator.sink is not None
        # A receipt for the second part finds the message.
        ack = operator.sink.reports([OperatorReport.from_ptt(f"R{a}.2", 4, T0)])
        await stays(lambda: not ack.done())  # not committed yet: not acknowledged
        gated.gate.set()
        await asyncio.wait_for(ack, 5)
        # Acknowledged: committed.
        assert (await store.get_message(a)).ptt == 4
        # A receipt naming no message is acknowledged too (else redelivered for ever).
        stray = operator.sink.reports([OperatorReport.from_ptt("nobody", 4, T0)])
        await asyncio.wait_for(stray, 5)
        assert await history_of(store, a) == [(None, 0), (4, 1)]


class SlowClaimStore:
    """The real store, its claims held until `gate` is set; counts the reports applied."""

    def __init__(self, path: str) -> None:
        self._store = open_store(path, "delivery")
        self.gate = asyncio.Event()
        self.claiming = asyncio.Event()
        self.applies = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim_messages(self, **kwargs: Any) -> Sequence[OutgoingMessage]:
        self.claiming.set()
        await self.gate.wait()
        return cast(Sequence[OutgoingMessage], await self._store.claim_messages(**kwargs))

    async def apply_reports(self, reports: Sequence[OperatorReport]) -> AppliedUpdates:
        self.applies += 1
        return await self._store.apply_reports(reports)


async def test_a_stray_report_during_an_empty_claim_is_still_acknowledged(
        config: Config) -> None:
    """A report naming no known reference, arriving while a claim ran, was held for the
    hand-over's recording; the claim found nothing, so nothing ever let it go: never
    acknowledged (an SMPP window stalls on it), whatever the claims after."""
    operator = ScriptedOperator(take)
    slow = SlowClaimStore(config.store.path)
    async with dispatching(config, operator, store=cast(Store, slow)) as (dispatcher, _):
        assert operator.sink is not None
        await asyncio.wait_for(slow.claiming.wait(), 5)
        stray = operator.sink.reports([OperatorReport.from_ptt("nobody", 4, T0)])
        await eventually(lambda: slow.applies == 1)  # applied, unmatched, held back
        slow.gate.set()  # the claim comes back empty
        await asyncio.wait_for(stray, 5)
        assert dispatcher.waiting_reports == 0


class PoisonedStore:
    """The real store; a batch of reports naming `poison` fails as a store whose balance is
    no integer does (the old overflow bug), every time."""

    def __init__(self, path: str, poison: str) -> None:
        self._store = open_store(path, "delivery")
        self.poison = poison
        self.applies = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def apply_reports(self, reports: Sequence[OperatorReport]) -> AppliedUpdates:
        self.applies += 1
        if any(report.reference == self.poison for report in reports):
            raise OverCreditLimit("refund: a balance or quota would overflow the store")
        return await self._store.apply_reports(reports)

    async def apply_updates(self, updates: Sequence[StateUpdate]) -> AppliedUpdates:
        self.applies += 1
        if any(f"R{update.message_id}" == self.poison for update in updates):
            raise OverCreditLimit("refund: a balance or quota would overflow the store")
        return await self._store.apply_updates(updates)


async def test_a_report_the_store_always_refuses_does_not_stop_the_others(
        config: Config) -> None:
    """A batch failing for good was put back and tried again for ever: no report of any
    message was stored after it. The failing one is found and set aside, unacknowledged."""
    a, b = await seed_queued(config, 2, per_order=2)
    operator = ScriptedOperator(take)
    poisoned = PoisonedStore(config.store.path, poison=f"R{a}")
    async with dispatching(config, operator, store=cast(Store, poisoned)) as (_, store):
        async def sent() -> bool:
            return await states(store, [a, b]) == ["sent", "sent"]
        await eventually(sent)
        assert operator.sink is not None
        ok_before = operator.sink.reports([OperatorReport.from_ptt("nobody", 4, T0)])
        bad = operator.sink.reports([OperatorReport.from_ptt(f"R{a}", 4, T0)])
        ok_after = operator.sink.reports([OperatorReport.from_ptt(f"R{b}", 4, T0)])
        await asyncio.wait_for(asyncio.gather(ok_before, ok_after), 5)
        assert await states(store, [a, b]) == ["sent", "final"]
        applies = poisoned.applies
        await stays(lambda: poisoned.applies == applies)  # not tried again in a loop
        assert not bad.done()  # not stored: not acknowledged


async def test_a_refusal_the_store_always_refuses_does_not_stop_delivery(
        config: Config) -> None:
    """The operator's refusals were recorded in one write tried again until the gateway
    stopped: one refund the store refused for good stopped all delivery."""
    a, b = await seed_queued(config, 2, per_order=2)
    operator = ScriptedOperator(lambda m: Refused(m.id, 23))
    poisoned = PoisonedStore(config.store.path, poison=f"R{a}")
    async with dispatching(config, operator, store=cast(Store, poisoned)) as (_, store):
        async def b_settled() -> bool:
            return await states(store, [b]) == ["final"]
        await eventually(b_settled)
        assert await states(store, [a]) == ["queued"]  # left to its claim's end
        applies = poisoned.applies
        await stays(lambda: poisoned.applies == applies)  # not tried again in a loop


@pytest.mark.sqlite_only  # a balance that is no integer: SQLite's dynamic typing only
async def test_a_refund_to_a_balance_that_is_no_integer_names_the_account(
        config: Config) -> None:
    """Stores hit by the old overflow bug hold such balances: the error says which."""
    (a,) = await seed_queued(config, 1, per_order=1)
    with sqlite3.connect(config.store.path) as db:
        (account_id,) = db.execute("SELECT account_id FROM messages WHERE id = ?",
                                   (a,)).fetchone()
        db.execute("UPDATE accounts SET balance = 1.5 WHERE id = ?", (account_id,))
    store = open_store(config.store.path, "delivery")
    await store.open()
    try:
        with pytest.raises(OverCreditLimit, match=f"account id {account_id}"):
            await store.apply_updates([StateUpdate.from_ptt(a, 23, T0)])
    finally:
        await store.close()


async def history_of(store: Store, message_id: int) -> list[tuple[int | None, int]]:
    return [(e.ptt, e.dlr) for e in await store.message_events(message_id)]


async def test_a_report_before_its_message_is_recorded_as_taken_still_applies(
        config: Config) -> None:
    ids = await seed_queued(config, 3, per_order=3)
    acks: list[asyncio.Future[None]] = []

    class Eager(ScriptedOperator):
        async def submit(self, messages: Sequence[OutgoingMessage]
                         ) -> Sequence[SubmitResult]:
            # The network reports before the gateway has recorded what it took.
            assert self.sink is not None
            acks.append(self.sink.reports(
                [OperatorReport.from_ptt(f"R{m.id}", code, T0)
                 for m in messages for code in (3, 4)]))
            await asyncio.sleep(0.05)
            return await super().submit(messages)

    async with dispatching(config, Eager(take)) as (_, store):
        async def delivered() -> bool:
            return await states(store, ids) == ["final"] * 3
        await eventually(delivered)
        for message_id in ids:
            assert await history_of(store, message_id) == [(None, 0), (3, 4), (4, 1)]
        await asyncio.wait_for(acks[0], 5)


class SlowFirstMarkStore:
    """The real store; the first mark_sent (the first chunk's) commits only after `others`
    more have, as a write stuck behind others on a loaded machine. Claims wait for `ready`
    (the link bound: else every message is told to try later, five seconds on)."""

    def __init__(self, path: str, others: int) -> None:
        self._store = open_store(path, "delivery")
        self.ready = asyncio.Event()
        self.others = others
        self.marked = 0
        self.first_marked = False
        self.first_waiting = asyncio.Event()
        self._calls = 0
        self._others_done = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim_messages(self, **kwargs: Any) -> Sequence[OutgoingMessage]:
        await self.ready.wait()
        return cast(Sequence[OutgoingMessage], await self._store.claim_messages(**kwargs))

    async def mark_sent(self, *args: Any, **kwargs: Any) -> None:
        self._calls += 1
        first = self._calls == 1
        if first:
            self.first_waiting.set()
            await asyncio.wait_for(self._others_done.wait(), 20)
        await self._store.mark_sent(*args, **kwargs)
        if first:
            self.first_marked = True
            return
        self.marked += 1
        if self.marked >= self.others:
            self._others_done.set()


async def test_receipts_before_a_slow_chunk_is_recorded_are_never_dropped(
        config: Config) -> None:
    """The SMSC sends each receipt before its submit_sm_resp; the first chunk's mark_sent
    commits after ten others. Its receipts, unmatched until then, were tried again once per
    chunk recorded meanwhile, at most six times, then acknowledged and dropped as naming no
    message: messages delivered per the SMSC stayed sent (ptt 3) for ever (the bench's
    reports_unmatched warnings)."""
    ids = await seed_queued(config, 24, per_order=24)
    smsc = Smsc()
    await smsc.start()
    smsc.auto_receipt, smsc.receipt_first = "DELIVRD", True
    # A window of 2: chunks of 2 messages, 4 of them in flight (PIPELINE_DEPTH).
    operator = SmppOperator(SmppSettings(host="127.0.0.1", port=smsc.port,
                                         system_id="gateway", password="secret", window=2,
                                         reconnect_first_seconds=0.05,
                                         reconnect_max_seconds=0.2), SystemClock())
    slow = SlowFirstMarkStore(config.store.path, others=10)
    try:
        async with dispatching(config, cast(Any, operator), clock=SystemClock(),
                               store=cast(Store, slow)) as (dispatcher, store):
            assert await operator.wait_bound(5), operator.link_status()
            slow.ready.set()
            await asyncio.wait_for(slow.first_waiting.wait(), 10)
            # A reference no message has, meanwhile: held back with the others, then
            # acknowledged (dropped) once every chunk before it is recorded.
            stray = dispatcher.reports([OperatorReport.from_ptt("nobody", 4, time.time())])

            async def delivered() -> bool:
                return await states(store, ids) == ["final"] * len(ids)
            await eventually(lambda: slow.first_marked, timeout=20)
            await eventually(delivered, timeout=20)
            for message_id in ids:
                assert (await store.get_message(message_id)).ptt == 4, message_id
            await eventually(lambda: smsc.receipts_acknowledged == len(ids))
            await asyncio.wait_for(stray, 5)
            assert dispatcher.waiting_reports == 0
    finally:
        await smsc.stop()


async def test_a_receipt_for_a_message_another_shared_worker_has_not_recorded_waits_for_it(
        config: Config) -> None:
    """`http2sms deliver` workers share the store and one SMSC account: the network may send
    this worker the receipt of a message another worker submitted and has not recorded yet
    (a chunk is recorded once all of it is answered). It was acknowledged and dropped as
    soon as this worker's own claims were recorded, and the message stayed sent."""
    (message_id,) = await seed_queued(config, 1, per_order=1)
    other = open_store(config.store.path, "delivery")
    await other.open()
    try:
        # The other worker's claim, submitted and not yet recorded.
        assert [m.id for m in await other.claim_messages(now=time.time(), lease=60.0,
                                                         limit=10)] == [message_id]
        async with dispatching(config, ScriptedOperator(take), clock=SystemClock(),
                               elsewhere_wait=delivery.ELSEWHERE_WAIT_SECONDS
                               ) as (dispatcher, store):
            acknowledged = dispatcher.reports([OperatorReport.from_ptt("theirs", 4,
                                                                       time.time())])
            await eventually(lambda: len(dispatcher._elsewhere) == 1)
            assert not acknowledged.done()
            await other.mark_sent([message_id], at=time.time(),
                                  references=[SentMessage(message_id, ("theirs",))])
            await asyncio.wait_for(acknowledged, 5)
            message = await store.get_message(message_id)
            assert (message.state, message.ptt) == ("final", 4)
            assert dispatcher.waiting_reports == 0
    finally:
        await other.close()


async def test_only_workers_sharing_the_store_wait_for_each_others_receipts(
        config: Config) -> None:
    store = open_store(config.store.path, "delivery")
    await store.open()
    try:
        for shared, wait in ((True, delivery.ELSEWHERE_WAIT_SECONDS), (False, 0.0)):
            _, dispatcher = delivery_services(config, store, SystemClock(), Metrics(),
                                              ZoneInfo(config.send.timezone),
                                              follow_store=True, shared=shared)
            assert dispatcher._elsewhere_wait == wait
    finally:
        await store.close()


async def test_a_shared_workers_unknown_receipt_is_dropped_after_its_wait(
        config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "ELSEWHERE_RETRY_SECONDS", 0.05)
    await seed_queued(config, 0)
    async with dispatching(config, ScriptedOperator(take), clock=SystemClock(),
                           elsewhere_wait=0.3) as (dispatcher, _):
        started = time.monotonic()
        await asyncio.wait_for(dispatcher.reports([OperatorReport.from_ptt(
            "nobody", 4, time.time())]), 5)
        # Acknowledged (the network would send it for ever), after its wait, not before.
        assert time.monotonic() - started >= 0.3
        assert dispatcher.waiting_reports == 0


async def test_inbound_messages_are_handed_on_and_acknowledged(config: Config) -> None:
    received: list[Inbound] = []

    async def keep(messages: Sequence[Inbound]) -> None:
        received.extend(messages)

    operator = ScriptedOperator(take)
    async with dispatching(config, operator, on_inbound=keep):
        assert operator.sink is not None
        stop = Inbound("in-1", "+33612345678", "36180", "STOP", T0)
        await asyncio.wait_for(operator.sink.inbound([stop]), 5)
        assert received == [stop]


# -- claims ----------------------------------------------------------------------------------

async def test_two_dispatchers_on_one_store_never_submit_a_message_twice(
        config: Config) -> None:
    ids = await seed_queued(config, 300, per_order=100)
    operators = [ScriptedOperator(take), ScriptedOperator(take)]
    for operator in operators:
        operator.delay = 0.01
    async with (dispatching(config, operators[0], clock=SystemClock(), max_batch=7)
                as (_, one),
                dispatching(config, operators[1], clock=SystemClock(), max_batch=7)):
        async def drained() -> bool:
            return (await one.counts())["queued"] == 0
        await eventually(drained, timeout=20)
    submitted = operators[0].submitted + operators[1].submitted
    assert sorted(submitted) == ids  # each once
    assert operators[0].submitted and operators[1].submitted  # both had a share


@pytest.mark.parametrize("exclusive", [False, True], ids=["shared", "exclusive"])
async def test_a_crashed_dispatchers_claims_are_handed_over_when_their_lease_ends(
        config: Config, exclusive: bool) -> None:
    ids = await seed_queued(config, 2, per_order=2)
    store = open_store(config.store.path, "send")
    await store.open()
    # A dispatcher claimed them, then died before the operator answered.
    assert sorted(m.id for m in await store.claim_messages(now=T0, lease=60.0, limit=10)) == ids
    await store.close()
    operator = ScriptedOperator(take)
    clock = ManualClock(T0 + 1)
    async with dispatching(config, operator, clock=clock, exclusive=exclusive):
        if exclusive:
            # Alone on its store, it knows every claim is a previous run's.
            await eventually(lambda: operator.submitted == ids)
            return
        await stays(lambda: operator.submitted == [])
        clock.advance(58)
        await stays(lambda: operator.submitted == [])
        clock.advance(1)
        await eventually(lambda: operator.submitted == ids)


async def test_a_lower_id_committed_after_a_higher_one_is_still_delivered(
        config: Config) -> None:
    ids = await seed_queued(config, 10, per_order=10)
    late = ids[4]
    (row,) = dbrows.query(config.store.path, "SELECT * FROM messages WHERE id = ?", (late,))
    dbrows.query(config.store.path, "DELETE FROM messages WHERE id = ?", (late,))
    operator = ScriptedOperator(take)
    async with dispatching(config, operator, clock=SystemClock(), follow_store=True,
                           poll_seconds=60) as (dispatcher, _):
        await eventually(lambda: len(operator.submitted) == 9)
        # Its transaction commits only now.
        dbrows.query(config.store.path, f"INSERT INTO messages ({', '.join(row)}) "
                     f"VALUES ({', '.join('?' * len(row))})", list(row.values()))
        dispatcher.poke()
        await eventually(lambda: late in operator.submitted)
    assert sorted(operator.submitted) == ids


async def test_messages_in_flight_across_the_upgrade_to_claims_still_find_their_reports(
        tmp_path: Path) -> None:
    """A store of the version before references: its sent messages were the simulator's."""
    path = tmp_path / "before.sqlite3"
    folder = resources.files("gateway.store") / "migrations"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT "
                   "NOT NULL, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)")
        for name in sorted(item.name for item in folder.iterdir() if item.name.endswith(".sql")):
            version = int(name.split("_", 1)[0])
            if version < 4:
                db.executescript((folder / name).read_text(encoding="utf-8"))
                db.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)",
                           (version, name))
        db.execute("INSERT INTO accounts (id, name, balance, created_at) VALUES (1, 'a', 0, 1)")
        db.execute("INSERT INTO messages (id, account_id, login, sender, receiver, body, coding, "
                   "parts, class, no_stop, credits, charged_to, created_at, state, updated_at) "
                   "VALUES (7, 1, 'u', 'S', '+33612345678', 'b', 1, 1, 1, 1, 0, 'account', 1, "
                   "'sent', 1)")
        db.commit()
    store = open_store(path, "send")
    await store.open()
    try:
        applied = await store.apply_reports([OperatorReport.from_ptt(reference(7), 4, 2.0)])
        assert applied.unmatched == () and [f.message_id for f in applied.finals] == [7]
    finally:
        await store.close()
