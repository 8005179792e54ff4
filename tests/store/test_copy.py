"""`http2sms store copy`: an installation moved between backends, whole, and checked."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import ManualClock
from gateway.config import Config, RetentionConfig
from gateway.metrics import Metrics
from gateway.purge import Purger
from gateway.records import (
    IncomingMessage,
    IncomingPart,
    OutboxResult,
    SentMessage,
    StateUpdate,
)
from gateway.retention import DAY
from gateway.service import Management
from gateway.store import Store, open_store
from gateway.store import copy as copy_module
from tests.cli_in_process import invoke
from tests.conftest import ledger_identity
from tests.store.test_contract import T0, account_with_user, order, report


async def populate(store: Store) -> None:
    """An installation with something in every table, made through the service layer and
    the send and delivery paths."""
    manage = Management(store, Config())
    await manage.create_account("acme", 500)
    await manage.add_sender("acme", "ACME")
    await manage.create_user("acme", "alice", "secret123")
    await manage.create_user("acme", "quota", "secret123")
    await manage.update_user("acme", "quota", quota=50, alert_threshold=45,
                             alert_email="ops@example.com", ip_restrictions=["8.8.8.8"])
    await manage.create_user("acme", "gone", "secret123")
    await manage.update_account("acme", callback_url="http://cb.example/dlr")
    bob = await account_with_user(store, 300, name="bob", login="bob")
    await manage.credit_account("bob", "12.5")
    await manage.create_token("ops", None)
    await manage.create_token("acme-only", ["acme"])
    alice = await store.get_user("acme", "alice")
    quota = await store.get_user("acme", "quota")
    for at in range(3):
        await store.commit_sends([order(alice, 10, recipients=2), order(quota, 3),
                                  replace(order(bob, 1), tag="promo", parts=2)], at=T0 + at)
    sent = [m.id for m in await store.claim_messages(now=T0 + 5, lease=30, limit=4)]
    await store.mark_sent(sent, at=T0 + 6,
                          references=[SentMessage(i, (f"r{i}", f"r{i}#2")) for i in sent])
    await store.apply_reports([report(f"r{sent[0]}", 4), report(f"r{sent[1]}", 23)])
    await store.apply_updates([StateUpdate.from_ptt(sent[2], 4, T0 + 7)])
    await store.add_incoming([IncomingMessage(0, 0, "in1", "+33612300000", "ACME", "STOP",
                                              "", T0 + 8)])
    # The first part of a long message from a handset, waiting for its second.
    await store.add_incoming_parts([IncomingPart("in2", "+33612300001", "ACME", 7, 2, 1,
                                                 "first half ", T0 + 8)])
    await manage.create_console_user("owner@example.com", "a long console password",
                                     operator=False, accounts=["acme"])
    await store.create_console_session("d" * 64, "owner@example.com", "c" * 32, at=T0 + 8)
    (callback, *_) = await store.claim_outbox(["callback"], now=T0 + 9, lease=30, limit=10)
    await store.record_outbox_results([OutboxResult(callback.id, T0 + 10, False, "timeout",
                                                    T0 + 70)])
    # The purge's place: acme's messages erased up to a message still waiting (held).
    acme = await store.get_account("acme")
    await store.erase_due(acme.id, "messages", before=T0 + 100, limit=100)
    await manage.delete_user("acme", "gone")
    await manage.update_user("acme", "quota", quota=None)  # credits back to the account


def normal(value: Any) -> Any:
    """A value as both backends hold it: SQLite keeps booleans as integers."""
    return int(value) if isinstance(value, bool) else value


async def tables(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the store at `url`, columns by name."""
    store = open_store(url, "cli")
    await store.open()
    try:
        found = {}
        async with store.read_tables() as snapshot:
            for table, columns in sorted((await store.table_columns()).items()):
                listed = sorted(columns)
                found[table] = [tuple(normal(row[columns.index(c)]) for c in listed)
                                for rows in [r async for r in snapshot.rows(
                                    table, columns, batch=7)] for row in rows]
                found[table].sort(key=repr)
        return found
    finally:
        await store.close()


async def copy(source: str, target: str, *args: str) -> Any:
    return await asyncio.to_thread(invoke, "--json", "store", "copy", source, target,
                                   "--batch", "3", *args)


async def test_an_installation_goes_to_postgresql_and_back_whole(
        tmp_path: Path, postgres_url: str) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'before.sqlite3'}"
    store = open_store(sqlite_url, "cli")
    await store.open()
    try:
        await populate(store)
    finally:
        await store.close()
    before = await tables(sqlite_url)
    assert all(before.values()), [t for t, rows in before.items() if not rows]

    there = await copy(sqlite_url, postgres_url)
    assert there.exit_code == 0, there.output
    result = json.loads(there.output)
    assert result["ok"] and result["problems"] == []
    assert result["tables"]["messages"] == {"source": 12, "copied": 12, "target": 12}
    ledger_identity(result["target"])
    assert await tables(postgres_url) == before

    back_url = f"sqlite:///{tmp_path / 'after.sqlite3'}"
    back = await copy(postgres_url, back_url)
    assert back.exit_code == 0, back.output
    assert await tables(back_url) == before


async def test_a_store_that_holds_data_is_refused_and_left_as_it_is(
        tmp_path: Path, postgres_url: str) -> None:
    source = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    for url in (source, postgres_url):
        store = open_store(url, "cli")
        await store.open()
        try:
            await store.create_account("acme" if url == source else "other", 100, at=T0)
        finally:
            await store.close()
    before = await tables(postgres_url)
    refused = await copy(source, postgres_url)
    assert refused.exit_code == 2
    assert "not empty" in refused.output and "accounts" in refused.output
    assert await tables(postgres_url) == before


async def max_id(url: str, table: str) -> int:
    store = open_store(url, "cli")
    await store.open()
    try:
        async with store.read_tables() as snapshot:
            return max([row[0] async for rows in snapshot.rows(table, ("id",), batch=100)
                        for row in rows], default=0)
    finally:
        await store.close()


def ends(tmp_path: Path, postgres_url: str, direction: str) -> tuple[str, str]:
    """The source and target URLs of a copy `direction` ("to_postgresql", "to_sqlite")."""
    sqlite_url = f"sqlite:///{tmp_path / 'source.sqlite3'}"
    return (sqlite_url, postgres_url) if direction == "to_postgresql" \
        else (postgres_url, sqlite_url)


@pytest.mark.parametrize("direction", ["to_postgresql", "to_sqlite"])
async def test_the_copied_store_serves_sends_with_new_ids(
        tmp_path: Path, postgres_url: str, direction: str) -> None:
    source, target = ends(tmp_path, postgres_url, direction)
    store = open_store(source, "cli")
    await store.open()
    try:
        await populate(store)
        context = await store.send_context("acme", "alice", fresh=True)
        assert context is not None
        old_version = context.version
    finally:
        await store.close()
    last = {t: await max_id(source, t) for t in ("messages", "ledger", "outbox", "accounts")}
    assert (await copy(source, target)).exit_code == 0

    copied = open_store(target, "send")
    await copied.open()
    try:
        context = await copied.send_context("acme", "alice")
        assert context is not None and context.version == old_version
        (outcome,) = await copied.commit_sends(
            [replace(order(context.user, 10), settings_version=context.version)], at=T0 + 60)
        assert outcome.accepted and outcome.ids[0] > last["messages"]
        (entry,) = [e for e in await copied.list_ledger("acme", limit=1000)
                    if e.id > last["ledger"]]
        assert (entry.kind, entry.amount) == ("send", 10)
        await copied.add_sender("acme", "NEWONE")  # a new settings version, never an old one
        moved = await copied.send_context("acme", "alice", fresh=True)
        assert moved is not None and moved.version > old_version
        item = await copied.enqueue_outbox("callback", account_id=context.user.account_id,
                                           user_id=None, target="http://x.example/",
                                           payload={}, at=T0 + 61)
        assert item > last["outbox"]
        assert (await copied.create_account("new", 100, at=T0 + 62)).id > last["accounts"]
        ledger_identity(await copied.ledger_totals())
    finally:
        await copied.close()


async def test_every_table_has_its_place_in_the_copy_order(tmp_path: Path) -> None:
    """A table a migration adds is placed after the tables it refers to: by name it could
    come before them and break its foreign keys on the target."""
    store = open_store(f"sqlite:///{tmp_path / 'schema.sqlite3'}", "cli")
    await store.open()
    try:
        tables = set(await store.table_columns())
    finally:
        await store.close()
    assert tables <= set(copy_module.TABLE_ORDER), sorted(tables - set(copy_module.TABLE_ORDER))


@pytest.mark.parametrize("direction", ["to_postgresql", "to_sqlite"])
async def test_incoming_message_ids_deleted_by_the_purge_are_never_given_again(
        tmp_path: Path, postgres_url: str, direction: str) -> None:
    """The source's purge deleted every incoming message: the target's next one must not
    take an id a client may still hold (the copy carries the source's next id)."""
    source, target = ends(tmp_path, postgres_url, direction)
    store = open_store(source, "cli")
    await store.open()
    try:
        await account_with_user(store, 100)
        await store.add_sender("acme", "ACME")
        ids = [(await store.add_incoming([IncomingMessage(
            0, 0, f"in{n}", "+33612300000", "ACME", "STOP", "", T0)]))[0] for n in range(3)]
        purge = Purger(store, ManualClock(T0 + 401 * DAY),
                       RetentionConfig(batch_pause_seconds=0), metrics=Metrics())
        assert (await purge.run()).deleted.get("incoming_messages") == 3
    finally:
        await store.close()
    assert (await copy(source, target)).exit_code == 0

    copied = open_store(target, "delivery")
    await copied.open()
    try:
        (new,) = await copied.add_incoming([IncomingMessage(
            0, 0, "in-new", "+33612300000", "ACME", "START", "", T0 + 402 * DAY)])
        assert new > max(ids)
    finally:
        await copied.close()
