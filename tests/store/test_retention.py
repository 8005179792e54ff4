"""Retention on every backend: the purge erases and deletes at the right day, in batches,
keeps the ledger whole, and erasure by number, exports and stats work (MaintenanceStore).

Time is a `ManualClock`: the purge's days pass in an instant.
"""

from __future__ import annotations

import json
from dataclasses import replace
from zoneinfo import ZoneInfo

import pytest

from gateway.clock import ManualClock
from gateway.config import Config, RetentionConfig
from gateway.hooks.callbacks import callback_params
from gateway.metrics import Metrics
from gateway.purge import Purger
from gateway.records import (
    IncomingMessage,
    IncomingPart,
    OutboxResult,
    SendOrder,
    StateUpdate,
)
from gateway.retention import DAY
from gateway.service import Management
from gateway.store import NotFound, Store
from tests.conftest import ledger_identity

# The contract suite's fixtures: a fresh database of each backend (F811: tests take them).
from tests.store.test_contract import (  # noqa: F401
    T0,
    Opener,
    account_with_user,
    database_url,
    order,
    stores,
)

CALLBACK = "http://203.0.113.7/cb"
UTC = ZoneInfo("UTC")


def purger(store: Store, clock: ManualClock, batch: int = 3, **days: int) -> Purger:
    settings = RetentionConfig(batch_size=batch, batch_pause_seconds=0, **days)
    return Purger(store, clock, settings, metrics=Metrics())


async def sent_and_final(store: Store, user_order: SendOrder, count: int, *,
                         at: float) -> list[int]:
    """`count` messages to +336123000NN, delivered at once."""
    (outcome,) = await store.commit_sends([replace(user_order, recipients=tuple(
        f"+336123{n:05d}" for n in range(count)), costs=(100,) * count)], at=at)
    await store.apply_updates([StateUpdate.from_ptt(i, 4, at + 1) for i in outcome.ids])
    return list(outcome.ids)


async def test_texts_erased_then_messages_deleted_at_their_day(stores: Opener) -> None:  # noqa: F811
    store = await stores("delivery")
    user = await account_with_user(store, 100_000)
    await store.update_account("acme", callback_url=CALLBACK, at=T0)
    ids = await sent_and_final(store, order(user, 100), 7, at=T0)
    (queued,) = (await store.commit_sends([order(user, 100)], at=T0 + 2))[0].ids
    (reply,) = await store.add_incoming([IncomingMessage(
        0, 0, "ref", "+33612300000", "ACME", "STOP", "", T0 + 3)])
    ledger_before = await store.list_ledger("acme", limit=1000)
    clock = ManualClock(T0)
    purge = purger(store, clock)

    clock.advance(90 * DAY - 10)  # 90 days from T0 not yet over for any of them
    assert (await purge.run()).erased == {}
    assert (await store.get_message(ids[0])).body == "hello"

    clock.advance(20)
    report = await purge.run()
    assert report.erased == {"messages": 7, "incoming_messages": 1}
    assert report.held == 1  # the queued message keeps its text: it is still to be sent
    erased = await store.get_message(ids[0])
    assert (erased.body, erased.receiver) == ("", "+33612****00")
    assert (erased.state, erased.ptt, erased.parts, erased.credits, erased.login) == \
        ("final", 4, 1, 100, "alice")
    assert (await store.get_message(queued)).body == "hello"
    (incoming,) = await store.list_incoming("acme", limit=10)
    assert (incoming.id, incoming.body, incoming.sender) == (reply, "", "+33612****00")
    # The callbacks of erased messages carry neither text nor number.
    items = await store.claim_outbox(("callback",), now=clock.now(), lease=60, limit=100)
    assert len(items) == 7
    for item in items:
        sent = json.dumps(callback_params(item.payload, UTC))
        assert "hello" not in sent and "33612" not in sent
    await store.record_outbox_results([OutboxResult(i.id, clock.now(), True, "200")
                                       for i in items])
    # Final later: erased at the next pass, not forgotten behind the place the purge keeps.
    await store.apply_updates([StateUpdate.from_ptt(queued, 4, clock.now())])
    assert (await purge.run()).erased == {"messages": 1}
    assert (await store.get_message(queued)).body == ""
    assert (await purge.run()).erased == {}  # nothing twice

    clock.advance(310 * DAY)  # 400 days and 10 s after T0
    report = await purge.run()
    assert report.deleted == {"messages": 8, "incoming_messages": 1, "outbox": 7}
    for message_id in (*ids, queued):
        with pytest.raises(NotFound):
            await store.get_message(message_id)
        assert await store.message_events(message_id) == []
    assert await store.list_incoming("acme", limit=10) == []
    assert [await store.outbox_status(i.id) for i in items] == [None] * len(items)
    # The ledger is the accounts' books: kept whole, references and all.
    assert await store.list_ledger("acme", limit=1000) == ledger_before
    ledger_identity(await store.ledger_totals())
    stats = await store.store_stats()
    assert stats.rows["messages"] == 0 and stats.rows["ledger"] == len(ledger_before)
    assert stats.oldest_message_at is None


async def test_an_account_keeps_its_own_days(stores: Opener) -> None:  # noqa: F811
    store = await stores("delivery")
    alice = await account_with_user(store, 100_000)
    bob = await account_with_user(store, 100_000, name="bob", login="bob")
    management = Management(store, Config())
    kept = await management.set_retention("bob", messages_days=10)
    assert (kept.messages_days, kept.personal_data_days) == (10, None)
    view = await management.retention_of("bob")
    assert (view["appliedRetentionDays"], view["appliedPersonalDataDays"]) == (10, 10)
    alice_ids = await sent_and_final(store, order(alice, 100), 2, at=T0)
    bob_ids = await sent_and_final(store, order(bob, 100), 5, at=T0)
    clock = ManualClock(T0 + 11 * DAY)
    preview = {row["account"]: row for row in await purger(store, clock).preview()}
    assert preview["bob"]["messages_to_delete"] == 5
    assert preview["acme"]["messages_to_delete"] == 0
    report = await purger(store, clock, batch=2).run()
    assert report.deleted == {"messages": 5}
    assert [(await store.get_message(i)).body for i in alice_ids] == ["hello"] * 2
    for message_id in bob_ids:
        with pytest.raises(NotFound):
            await store.get_message(message_id)
    ledger_identity(await store.ledger_totals())


async def test_erasure_by_number_says_how_many(stores: Opener) -> None:  # noqa: F811
    store = await stores("cli")
    user = await account_with_user(store, 100_000)
    ids = await sent_and_final(store, order(user, 100), 3, at=T0)  # +33612300000..2
    again = await sent_and_final(store, order(user, 100), 1, at=T0 + 5)  # +33612300000
    management = Management(store, Config())
    done = await management.erase_number("acme", "+33612300000")
    assert (done.erased, done.held) == (2, 0)
    assert [(await store.get_message(i)).body for i in (*ids, *again)] == \
        ["", "hello", "hello", ""]
    assert (await management.erase_number("acme", "+33612300000")).erased == 0


async def test_erasure_by_number_erases_the_parts_of_its_long_messages(
        stores: Opener) -> None:  # noqa: F811
    """The parts of a long message are kept after it is whole (to know one sent again):
    they hold its text and number too. Another account's stay."""
    store = await stores("cli")
    await account_with_user(store, 1000)
    await store.add_sender("acme", "ACME")
    await store.create_account("beta", 0, at=T0)
    await store.add_sender("beta", "BETA")
    for receiver in ("ACME", "BETA"):
        found = await store.add_incoming_parts([
            IncomingPart(f"fp-{receiver}-{seq}", "+33611111111", receiver, 7, 2, seq, body, T0)
            for seq, body in ((1, "my code "), (2, "is 1234"))])
        assert found[1]
    done = await Management(store, Config()).erase_number("acme", "+33611111111")
    assert done.erased == 1
    async with store.read_tables() as snapshot:
        left = [row async for rows in snapshot.rows(
            "incoming_parts", ("receiver", "body"), batch=10) for row in rows]
    assert sorted(left) == [("BETA", "is 1234"), ("BETA", "my code ")]


async def test_the_purge_deletes_parts_of_long_incoming_messages_after_a_day(
        stores: Opener) -> None:  # noqa: F811
    """Whole or not, a part held its text and number: not longer than it can be used."""
    store = await stores("delivery")
    await account_with_user(store, 1000)
    await store.add_sender("acme", "ACME")
    await store.add_incoming_parts([
        IncomingPart(f"fp-{seq}", "+33611111111", "ACME", 7, 2, seq, body, T0)
        for seq, body in ((1, "my code "), (2, "is 1234"))])
    await store.add_incoming_parts([IncomingPart(f"fp-{n}", "+33611111111", "ACME", n, 2, 1,
                                                 "waits", T0 + n) for n in (8, 9, 10, 11)])
    clock = ManualClock(T0 + DAY + 9.5)
    report = await purger(store, clock).run()
    assert report.deleted == {"incoming_parts": 4}
    async with store.read_tables() as snapshot:
        left = [row async for rows in snapshot.rows(
            "incoming_parts", ("group_ref", "body"), batch=10) for row in rows]
    assert sorted(left) == [(10, "waits"), (11, "waits")]


async def test_the_ids_of_deleted_messages_are_never_given_again(
        stores: Opener) -> None:  # noqa: F811
    """Once the purge deleted every message, SQLite's MAX(id) + 1 started again at 1: a
    client's old id named a new message, and the erasure, walking on from the ids it had
    erased, never reached the new ones."""
    store = await stores("delivery")
    user = await account_with_user(store, 100_000)
    await store.add_sender("acme", "ACME")
    ids = await sent_and_final(store, order(user, 100), 3, at=T0)
    (reply,) = await store.add_incoming([IncomingMessage(
        0, 0, "ref", "+33612300000", "ACME", "STOP", "", T0)])
    later = T0 + 401 * DAY
    clock = ManualClock(later)
    purge = purger(store, clock)
    assert (await purge.run()).deleted == {"messages": 3, "incoming_messages": 1}
    new = await sent_and_final(store, order(user, 100), 1, at=later)
    assert new[0] > max(ids)
    (again,) = await store.add_incoming([IncomingMessage(
        0, 0, "ref-2", "+33612300000", "ACME", "START", "", later)])
    assert again > reply
    clock.advance(91 * DAY)
    assert (await purge.run()).erased == {"messages": 1, "incoming_messages": 1}
    assert (await store.get_message(new[0])).body == ""


async def test_an_export_reads_pages_by_id_in_its_time_range(stores: Opener) -> None:  # noqa: F811
    store = await stores("cli")
    user = await account_with_user(store, 100_000)
    early = await sent_and_final(store, order(user, 100), 3, at=T0)
    late = await sent_and_final(store, order(user, 100), 4, at=T0 + DAY)
    page = await store.export_messages(user.account_id, created_from=T0 + 10,
                                       created_to=T0 + 2 * DAY, login=None, after_id=0,
                                       limit=3)
    assert [m.id for m in page] == late[:3]
    rest = await store.export_messages(user.account_id, created_from=T0 + 10,
                                       created_to=T0 + 2 * DAY, login="alice",
                                       after_id=page[-1].id, limit=3)
    assert [m.id for m in rest] == late[3:]
    assert await store.export_messages(user.account_id, created_from=T0,
                                       created_to=T0 + 2 * DAY, login="bob", after_id=0,
                                       limit=3) == []
    assert early
