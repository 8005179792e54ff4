"""The SQLite store on its own: migrations, durability settings, failures at start, and its
write lock shared with other connections (busy timeout, the sends' turn)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from gateway.config import StoreConfig
from gateway.records import (
    IncomingMessage,
    IncomingPart,
    OperatorReport,
    SendContext,
    SendOrder,
    UserChanges,
)
from gateway.store import NotFound, Role, Store, StoreUnavailable, open_store
from gateway.store.writer import WriteTurn
from tests.serverproc import wait_for


async def test_migrations_are_applied_once(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    for _ in range(2):
        store = open_store(path, "cli")
        await store.open()
        assert store._writer is not None
        rows = await store._writer.execute_fetchall("SELECT version FROM schema_migrations")
        assert [r[0] for r in rows] == sorted(r[0] for r in rows) and len(rows) >= 1
        mode = await store._writer.execute_fetchall("PRAGMA journal_mode")
        sync = await store._writer.execute_fetchall("PRAGMA synchronous")
        assert (mode[0][0], sync[0][0]) == ("wal", 2)  # 2 = FULL
        await store.close()


async def test_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    store = open_store(path, "cli")
    with pytest.raises(StoreUnavailable, match="cannot open the store"):
        await store.open()


async def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = open_store(blocker / "sub" / "db.sqlite3", "cli")
    with pytest.raises((StoreUnavailable, OSError)):
        await store.open()


async def test_commit_sends_decides_in_order(store: Store) -> None:
    account = await store.create_account("a", 300, at=1.0)
    user = await store.create_user("a", "u", "x", at=1.0)

    def order(n: int) -> SendOrder:
        return SendOrder(account_id=account.id, user_id=user.id, login="u", sender="S",
                         body="b", coding=1, parts=1, klass=1, no_stop=True, tag="",
                         recipients=tuple(f"+3361234567{i}" for i in range(n)),
                         costs=(100,) * n)

    outcomes = await store.commit_sends([order(2), order(2), order(1)], at=2.0)
    assert [o.accepted for o in outcomes] == [True, False, True]
    assert [o.ids for o in outcomes] == [(1, 2), (), (3,)]
    assert outcomes[1].reason == "credits" and outcomes[1].credit_left == 100
    assert (await store.get_account("a")).balance == 0


async def test_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="unknown account"):
        await store.get_user("nope", "u")
    await store.create_account("a", 0, at=1.0)
    with pytest.raises(NotFound, match="unknown user"):
        await store.get_user("a", "u")


async def test_cached_send_settings_go_stale_on_change_from_another_process(
        tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    server, cli = open_store(path, "cli"), open_store(path, "cli")
    await server.open()
    await cli.open()
    try:
        account = await cli.create_account("a", 1000, at=1.0)
        await cli.create_user("a", "u", "hash1", at=1.0)
        first = await server.send_context("a", "u")
        assert first is not None and await server.send_context("a", "u") is first  # cached
        await cli.commit_sends([], at=2.0)
        order = SendOrder(account_id=account.id, user_id=first.user.id, login="u", sender="S",
                          body="b", coding=1, parts=1, klass=1, no_stop=True, tag="",
                          recipients=("+33612345678",), costs=(100,),
                          settings_version=first.version)
        assert (await server.commit_sends([order], at=3.0))[0].accepted
        # Credits moving do not touch the settings...
        again = await server.send_context("a", "u")
        assert again is first
        # ...a new password does, whichever process writes it.
        await cli.update_user("a", "u", UserChanges(password_hash="hash2"), at=4.0)
        outcome = (await server.commit_sends([order], at=5.0))[0]
        assert (outcome.accepted, outcome.reason) == (False, "stale")
        fresh = await server.send_context("a", "u")
        assert fresh is not None and fresh.user.password_hash == "hash2"
        assert fresh.version > first.version
    finally:
        await server.close()
        await cli.close()


async def test_a_change_drops_the_cached_settings_of_its_account_only(tmp_path: Path) -> None:
    """Users deleted and created again on one account made every cached send context stale
    (one settings version for the store): now only that account's contexts are read again."""
    path = tmp_path / "shared.sqlite3"
    server, cli = open_store(path, "send"), open_store(path, "cli")
    await server.open()
    await cli.open()
    try:
        for name in ("a", "b"):
            await cli.create_account(name, 1000, at=1.0)
            await cli.create_user(name, "u", "hash1", at=1.0)
        a_first, b_first = [await server.send_context(n, "u") for n in ("a", "b")]
        assert a_first is not None and b_first is not None
        await cli.delete_user("a", "u", at=2.0)
        await cli.create_user("a", "u", "hash2", at=2.0)

        def order(context: SendContext) -> SendOrder:
            return SendOrder(account_id=context.user.account_id, user_id=context.user.id,
                             login="u", sender="S", body="b", coding=1, parts=1, klass=1,
                             no_stop=True, tag="", recipients=("+33612345678",),
                             costs=(100,), settings_version=context.version)

        assert (await server.commit_sends([order(b_first)], at=3.0))[0].accepted
        assert await server.send_context("b", "u") is b_first
        # Account a's change is seen when its own send commits: refused as stale, and
        # its context alone is read again.
        outcome = (await server.commit_sends([order(a_first)], at=3.0))[0]
        assert outcome.reason == "stale"
        assert await server.send_context("b", "u") is b_first
        a_again = await server.send_context("a", "u")
        assert a_again is not None and a_again.user.password_hash == "hash2"
        assert a_again.version > a_first.version
    finally:
        await server.close()
        await cli.close()


async def test_the_queries_of_the_busy_paths_never_read_every_message(tmp_path: Path) -> None:
    """What the delivery worker and the probes ask all the time must use an index: a query
    that reads every row made a store of a million messages cost the worker a core."""
    import sqlite3

    store = open_store(tmp_path / "plans.sqlite3", "cli")
    await store.open()
    statements: list[str] = []
    try:
        assert store._reader is not None
        assert store._writer is not None
        await store._reader.set_trace_callback(statements.append)
        await store._writer.run(lambda conn: conn.set_trace_callback(statements.append))
        await store.counts()
        await store.next_due_at()
        await store.claim_messages(now=1e12, lease=60.0, limit=10)
        await store.next_outbox_at(("callback",))
        await store.in_flight(after_id=10, limit=10)
        await store.apply_reports([OperatorReport.from_ptt("1.1", 4, 1.0)])
        await store._reader.set_trace_callback(None)
        await store._writer.run(lambda conn: conn.set_trace_callback(None))
    finally:
        await store.close()
    queries = [s for s in statements if s.lstrip().upper().startswith(
        ("SELECT", "UPDATE MESSAGES SET CLAIMED_UNTIL"))]
    assert len(queries) >= 6, statements
    with sqlite3.connect(tmp_path / "plans.sqlite3") as db:
        for query in queries:
            plan = " | ".join(row[3] for row in db.execute("EXPLAIN QUERY PLAN " + query))
            # A SCAN of a table without an index is a read of every row.
            assert not any(step.startswith("SCAN ") and "INDEX" not in step
                           and step != "SCAN CONSTANT ROW"
                           for step in plan.split(" | ")), (query, plan)


async def test_an_incoming_message_reads_no_messages_under_the_write_lock(
        tmp_path: Path) -> None:
    """Which account a message from a handset answers is a read of the last messages sent
    (all of them for one answering nothing, no index on recipients): it must not hold the
    write lock, which every send waits for."""
    store = open_store(tmp_path / "incoming.sqlite3", "cli")
    await store.open()
    written: list[str] = []
    try:
        assert store._writer is not None
        await store._writer.run(lambda conn: conn.set_trace_callback(written.append))
        ids = await store.add_incoming([IncomingMessage(0, 0, "r", "+33611111111", "NOBODY",
                                                        "who?", "", 1.0)])
        parts = await store.add_incoming_parts([IncomingPart("p", "+33611111111", "NOBODY",
                                                             1, 2, 1, "a", 1.0)])
        await store._writer.run(lambda conn: conn.set_trace_callback(None))
    finally:
        await store.close()
    assert ids == [0] and parts == [None]
    assert written and not [s for s in written if "FROM messages" in s], written


async def test_several_reports_of_one_message_in_a_batch_apply_in_order(
        store: Store) -> None:
    """One batch may hold a message's acceptance, a retry and its delivery: the message
    ends as the last says, with the first time it was sent and the time it was delivered;
    every report is in its history, and its callbacks are queued in order."""
    from gateway.records import StateUpdate

    account = await store.create_account("a", 1000, at=1.0)
    await store.update_account("a", callback_url="http://127.0.0.1:9/dlr")
    user = await store.create_user("a", "u", "x", at=1.0)
    order = SendOrder(account_id=account.id, user_id=user.id, login="u", sender="S",
                      body="b", coding=1, parts=1, klass=1, no_stop=True, tag="",
                      recipients=("+33612345670", "+33612345671"), costs=(100, 100))
    (outcome,) = await store.commit_sends([order], at=2.0)
    first, second = outcome.ids
    applied = await store.apply_updates([
        StateUpdate.from_ptt(first, 3, 10.0), StateUpdate.from_ptt(second, 3, 11.0),
        StateUpdate.from_ptt(first, 25, 12.0), StateUpdate.from_ptt(first, 4, 13.0)])
    assert applied.callbacks == 4 and not applied.ignored
    message = await store.get_message(first)
    assert (message.state, message.ptt, message.sent_at, message.delivered_at) == \
        ("final", 4, 10.0, 13.0)
    other = await store.get_message(second)
    assert (other.state, other.ptt, other.sent_at, other.delivered_at) == \
        ("sent", 3, 11.0, None)
    assert [e.ptt for e in await store.message_events(first)] == [None, 3, 25, 4]
    items = await store.claim_outbox(("callback",), now=100.0, lease=60.0, limit=10)
    assert [(i.message_id, i.payload["ptt"]) for i in items] == \
        [(first, 3), (second, 3), (first, 25), (first, 4)]


def test_chunks_are_powers_of_two_longest_first_and_keep_every_row() -> None:
    from gateway.store.sqlite import _chunks

    for n in range(300):
        for most in (1, 3, 100, 128, 10_000):
            rows = list(range(n))
            chunks = [list(c) for c in _chunks(rows, most)]
            assert [r for c in chunks for r in c] == rows
            sizes = [len(c) for c in chunks]
            assert all(s & (s - 1) == 0 and s <= min(most, 128) for s in sizes), (n, sizes)
            assert sizes == sorted(sizes, reverse=True)
    assert [len(c) for c in _chunks(list(range(39)), 128)] == [32, 4, 2, 1]


def test_in_lists_are_padded_to_a_power_of_two_with_the_same_values() -> None:
    from gateway.store.sqlite import _in

    assert _in([]) == ("", [])
    for n in range(1, 70):
        marks, params = _in(list(range(n)))
        assert marks.count("?") == len(params) >= n
        assert len(params) & (len(params) - 1) == 0 and len(params) < 2 * n
        assert set(params) == set(range(n))
    # Past _IN_MAX, padding could cross SQLite's limit of 32,766 parameters: none.
    marks, params = _in(list(range(20_000)))
    assert len(params) == marks.count("?") == 20_000


async def test_batches_of_every_size_use_a_few_statement_texts(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """sqlite3 keeps 256 prepared statements by their text. Written out for each batch
    size, a multi-row statement was prepared again on nearly every run, which cost as much
    as running it; cut in power-of-two chunks, each statement has a few texts."""
    from gateway.records import StateUpdate
    from gateway.store.writer import Direct

    texts: set[str] = set()
    real_execute, real_fetchall = Direct.execute, Direct.execute_fetchall

    async def execute(self: Direct, sql: str, params: object = ()) -> object:
        texts.add(sql)
        return await real_execute(self, sql, params)  # type: ignore[arg-type]

    async def fetchall(self: Direct, sql: str, params: object = ()) -> object:
        texts.add(sql)
        return await real_fetchall(self, sql, params)  # type: ignore[arg-type]

    account = await store.create_account("a", 10**9, at=1.0)
    await store.update_account("a", callback_url="http://127.0.0.1:9/dlr")
    user = await store.create_user("a", "u", "x", at=1.0)
    monkeypatch.setattr(Direct, "execute", execute)
    monkeypatch.setattr(Direct, "execute_fetchall", fetchall)
    for n in range(1, 140):
        order = SendOrder(account_id=account.id, user_id=user.id, login="u", sender="S",
                          body="b", coding=1, parts=1, klass=1, no_stop=True, tag="",
                          recipients=tuple(f"+336123{i:05d}" for i in range(n)),
                          costs=(1,) * n)
        (outcome,) = await store.commit_sends([order], at=2.0)
        assert outcome.accepted and len(outcome.ids) == n
        await store.mark_sent(outcome.ids, at=3.0)
        applied = await store.apply_updates(
            [StateUpdate.from_ptt(i, 4, 4.0) for i in outcome.ids])
        assert applied.callbacks == n and len(applied.finals) == n
        items = await store.claim_outbox(("callback",), now=100.0, lease=60.0, limit=n)
        assert sorted(i.message_id for i in items) == sorted(outcome.ids)
    monkeypatch.undo()
    # Without chunks: a text per size for each multi-row statement, 1,119 in all (now 74).
    assert len(texts) < 100, sorted(texts)


@contextlib.contextmanager
def write_locked(path: str | Path) -> Iterator[None]:
    """Another connection holds the write lock of the file (BEGIN IMMEDIATE) meanwhile."""
    holder = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        holder.execute("BEGIN IMMEDIATE")
        yield
    finally:
        if holder.in_transaction:
            holder.rollback()
        holder.close()


# -- the store's own wait for another connection's write lock ---------------------------

async def test_a_write_waits_for_another_connection_s_lock_and_goes_soon_after(
        tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite3"
    store = open_store(StoreConfig(str(path), busy_timeout_seconds=5), "send")
    await store.open()
    try:
        released: list[float] = []
        with write_locked(path):
            write = asyncio.ensure_future(store.check_writable())
            done, _ = await asyncio.wait({write}, timeout=0.2)
            assert not done, "wrote while another connection held the lock"
            released.append(time.monotonic())
        await asyncio.wait_for(write, 5)
        waited = time.monotonic() - released[0]
        assert waited < 0.1, waited
    finally:
        await store.close()


async def test_a_write_gives_up_at_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.sqlite3"
    store = open_store(StoreConfig(str(path), busy_timeout_seconds=0.1), "send")
    await store.open()
    try:
        with write_locked(path):
            began = time.monotonic()
            write = asyncio.ensure_future(store.check_writable())
            # Not wait_for: a write that waits on must be let through by the release.
            done, _ = await asyncio.wait({write}, timeout=5)
            elapsed = time.monotonic() - began
        assert done, "still waiting for the lock after 5 s"
        with pytest.raises(StoreUnavailable, match="locked"):
            write.result()
        assert 0.1 <= elapsed < 1, elapsed
        await store.check_writable()  # the lock is free: writes go again
    finally:
        await store.close()


# -- sends go first for the write lock --------------------------------------------------

def test_the_write_turn_flag_is_seen_by_others_and_lowered_by_its_holder(
        tmp_path: Path) -> None:
    sender, worker = (WriteTurn(str(tmp_path / "turn.lock")) for _ in range(2))
    try:
        assert not worker.is_up()
        assert sender.raise_flag()
        assert worker.is_up() and not worker.raise_flag()
        sender.lower_flag()
        assert not worker.is_up()
    finally:
        sender.close()
        worker.close()


@contextlib.asynccontextmanager
async def turn_store(tmp_path: Path, role: Role,
                     busy_timeout: float = 5) -> AsyncIterator[tuple[Store, WriteTurn]]:
    """A store opened for `role` (the send process goes first, the delivery worker yields),
    and the other side's view of the flag."""
    path = tmp_path / "turn.sqlite3"
    store = open_store(StoreConfig(str(path), busy_timeout_seconds=busy_timeout), role)
    await store.open()
    other = WriteTurn(f"{path}-write-turn.lock")
    try:
        yield store, other
    finally:
        other.close()
        await store.close()


async def test_a_waiting_send_raises_the_flag_and_lowers_it_once_written(
        tmp_path: Path) -> None:
    async with turn_store(tmp_path, "send") as (store, observer):
        assert not observer.is_up()
        with write_locked(tmp_path / "turn.sqlite3"):
            write = asyncio.ensure_future(store.check_writable())

            async def flag_up() -> bool:
                return observer.is_up()

            await wait_for(flag_up, timeout=5, interval=0.005,
                           what="the flag while the send waits")
        await asyncio.wait_for(write, 5)
        assert not observer.is_up()


async def test_the_worker_writes_only_once_the_flag_is_down(tmp_path: Path) -> None:
    async with turn_store(tmp_path, "delivery") as (store, sender):
        assert sender.raise_flag()
        write = asyncio.ensure_future(store.check_writable())
        done, _ = await asyncio.wait({write}, timeout=0.2)
        assert not done, "wrote while a send waited for the lock"
        sender.lower_flag()
        await asyncio.wait_for(write, 1)


async def test_a_flag_left_up_holds_the_worker_back_no_longer_than_its_busy_timeout(
        tmp_path: Path) -> None:
    async with turn_store(tmp_path, "delivery", busy_timeout=0.2) as (store, stuck):
        assert stuck.raise_flag()
        began = time.monotonic()
        await asyncio.wait_for(store.check_writable(), 5)  # the lock itself is free
        assert 0.2 <= time.monotonic() - began < 2
