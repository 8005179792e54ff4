"""Delivery through the whole gateway: operator states, history, refunds, deferred sends,
recovery after a restart and draining a large backlog."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.clock import ManualClock
from gateway.config import Config
from gateway.delivery import Dispatcher
from gateway.operators.base import (
    LinkStatus,
    OperatorSink,
    OperatorUnavailable,
    SubmitResult,
    Taken,
)
from gateway.operators.simulated import reference
from gateway.service import Management
from gateway.store import (
    OperatorReport,
    OutgoingMessage,
    SendOrder,
    SentMessage,
    StateUpdate,
)
from gateway.store.sqlite import SQLiteStore
from tests.conftest import ACCOUNT, LOGIN, PASSWORD, SENDER, Harness, eventually, ledger_identity

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

class CountingStore(SQLiteStore):
    """The real store, counting the delivery transactions."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.calls: dict[str, int] = {"mark_sent": 0, "apply_updates": 0}

    async def mark_sent(self, ids: Sequence[int], *, at: float,
                        references: Sequence[SentMessage] = ()) -> None:
        self.calls["mark_sent"] += 1
        await super().mark_sent(ids, at=at, references=references)

    async def apply_updates(self, updates: Sequence[StateUpdate]) -> int:
        self.calls["apply_updates"] += 1
        return await super().apply_updates(updates)


async def seed_queued(config: Config, count: int, *, per_order: int = 1000) -> list[int]:
    """Commit `count` messages straight into the store, as a stopped gateway leaves them."""
    store = SQLiteStore(config.store.path)
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
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT (SELECT COUNT(*) FROM messages), "
            "(SELECT COUNT(*) FROM (SELECT message_id FROM message_events WHERE ptt = 3 "
            "  GROUP BY message_id HAVING COUNT(*) = 1)), "
            "(SELECT COUNT(*) FROM messages WHERE state = 'final')").fetchone()


async def test_a_10000_message_backlog_drains_in_batches(make_harness: Any,
                                                         config: Config) -> None:
    config.operator.max_batch = 1000
    await seed_queued(config, 10_000)
    store = CountingStore(config.store.path)
    started = time.monotonic()
    from gateway import app as gateway_app

    gateway = gateway_app.build(config, store=store)
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
    store = SQLiteStore(config.store.path)
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
    store = SQLiteStore(config.store.path)
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

