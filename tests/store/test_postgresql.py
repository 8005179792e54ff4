"""The PostgreSQL backend's own details, beyond the contract (tests/store/test_contract.py)."""

from __future__ import annotations

import asyncio
from importlib import resources

import asyncpg
import pytest

from gateway.clock import SystemClock
from gateway.delivery import Dispatcher
from gateway.delivery_guard import DeliveryGuard
from gateway.operators.base import LinkStatus, Taken
from gateway.records import OutgoingMessage, StateUpdate, UserChanges
from gateway.store import StoreUnavailable, open_store, postgresql, rules
from gateway.wakeups import WakeUps
from tests import postgres
from tests.store.test_contract import T0, account_with_user, order


async def terminate_sessions(url: str) -> int:
    """End every other session on the database, as a server restart or failover does."""
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
    finally:
        await conn.close()


async def test_lost_connections_fail_as_unavailable_then_reconnect(postgres_url: str) -> None:
    """A database restart cuts the pool's connections: a call meanwhile fails as
    StoreUnavailable (a send answers 503, nothing charged), and the store reconnects by
    itself for the next ones."""
    store = open_store(postgres_url, "send")
    await store.open()
    try:
        await store.create_account("acme", 100, at=1.0)
        assert await terminate_sessions(postgres_url) >= 1
        outcomes = []
        for _ in range(3):
            try:
                outcomes.append(await store.list_accounts())
            except StoreUnavailable:
                outcomes.append(None)
        assert outcomes[-1] == ["acme"]
        await store.check_writable()
    finally:
        await store.close()


async def test_nodes_starting_together_migrate_once(postgres_url: str) -> None:
    stores = [open_store(postgres_url, "send") for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        conn = await asyncpg.connect(postgres_url)
        try:
            versions = [r[0] for r in await conn.fetch(
                "SELECT version FROM schema_migrations ORDER BY version")]
        finally:
            await conn.close()
        assert versions == sorted(set(versions)) and versions[:6] == [1, 2, 3, 4, 5, 6]
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_an_unreachable_database_is_unavailable(postgres_server: str) -> None:
    store = open_store(postgres.database_url(postgres_server, "no_such_database"), "cli")
    with pytest.raises(StoreUnavailable):
        await store.open()


@pytest.mark.parametrize("url", ["postgresql://u:s3cret@127.0.0.1:abc/db",
                                 "postgresql://u:s3cret@[::1/db"])
async def test_a_malformed_url_is_unavailable_without_its_password(url: str) -> None:
    """A clear one-line error (the CLI's), not a traceback, and no password in it."""
    with pytest.raises(StoreUnavailable) as refused:
        await open_store(url, "cli").open()
    assert "s3cret" not in str(refused.value)


def test_every_sqlite_migration_has_its_postgresql_dialect() -> None:
    """A migration added for SQLite alone would leave PostgreSQL stores a schema behind:
    each number has its file in both folders."""
    def numbers(package: str) -> list[int]:
        folder = resources.files(package) / "migrations"
        return sorted(int(item.name.split("_", 1)[0]) for item in folder.iterdir()
                      if item.name.endswith(".sql"))

    assert numbers("gateway.store.postgresql") == numbers("gateway.store")


async def end_lock_sessions(url: str) -> int:
    """End the sessions holding advisory locks, as a failover or an administrator does."""
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_locks "
            "WHERE locktype = 'advisory' AND granted AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"))
    finally:
        await conn.close()


async def test_a_holder_whose_lock_connection_ends_learns_it_lost_the_lock(
        postgres_url: str) -> None:
    """The server lets go of an advisory lock when its session ends: the holder must not
    go on as the one holder while another node takes the name."""
    a, b = open_store(postgres_url, "delivery"), open_store(postgres_url, "delivery")
    await a.open()
    await b.open()
    try:
        async with a.exclusive("delivery") as held:
            assert not held.lost.is_set()
            assert await end_lock_sessions(postgres_url) == 1
            await asyncio.wait_for(held.lost.wait(), 5)
            assert "connection" in held.reason
            async with b.exclusive("delivery") as other:  # the name is free: b takes it
                assert not other.lost.is_set()
        assert not other.lost.is_set()  # let go of on purpose: not lost
    finally:
        await a.close()
        await b.close()


class FakeDispatcher:
    def __init__(self, started: list[FakeDispatcher]) -> None:
        self.started = started
        self.stopped = asyncio.Event()
        self.pokes = 0

    async def start(self) -> None:
        self.started.append(self)

    async def stop(self) -> None:
        self.stopped.set()

    def poke(self) -> None:
        self.pokes += 1


async def test_a_gateway_that_loses_the_delivery_lock_stops_delivering_and_stands_by(
        postgres_url: str) -> None:
    store = open_store(postgres_url, "send")
    await store.open()
    started: list[FakeDispatcher] = []
    first = FakeDispatcher(started)
    taken_back = asyncio.Event()
    guard = DeliveryGuard(store, first, lambda: FakeDispatcher(started),  # type: ignore[arg-type]
                          lambda _dispatcher: taken_back.set())
    try:
        await guard.start()
        assert guard.delivering and started == [first]
        await end_lock_sessions(postgres_url)
        await asyncio.wait_for(first.stopped.wait(), 5)
        # Nobody else holds the name: it takes it back, with a dispatcher that follows
        # the store.
        await asyncio.wait_for(taken_back.wait(), 5)
        assert len(started) == 2 and guard.delivering
        guard.poke()  # another node's sends: to the dispatcher delivering now
        assert (first.pokes, started[1].pokes) == (0, 1)
    finally:
        await guard.stop()
        await store.close()
    assert started[1].stopped.is_set()


async def waiting_for_locks(conn: asyncpg.Connection, count: int) -> None:
    """Until `count` other sessions wait for a lock (what the test set up to happen).
    `conn` outside a transaction: within one, the server's statistics stay as first read."""
    for _ in range(500):
        waiting = await conn.fetchval(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock'")
        if waiting >= count:
            return
        await asyncio.sleep(0.01)  # a state of the server's, with no event to wait for
    raise AssertionError(f"fewer than {count} sessions wait for a lock")


async def test_a_ledger_page_never_skips_an_entry_that_commits_later_with_a_lower_id(
        postgres_url: str) -> None:
    """Ledger ids come from a sequence, drawn before commit: had two transactions on one
    account drawn ids side by side, the lower one committing last, a reader paging with
    `after_id` would have passed over it for good. An account's ledger entries are drawn
    with its row locked until the commit, so they become visible in id order: the second
    transaction waits for the first, lower id, to commit."""
    store = open_store(postgres_url, "cli")
    await store.open()
    blocker = await asyncpg.connect(postgres_url)
    watcher = await asyncpg.connect(postgres_url)
    try:
        await store.create_account("acme", 1000, at=T0)
        alice = await store.create_user("acme", "alice", "x", at=T0)
        # Above the credits: disarmed, so the top-up below re-arms it (a write to alice's
        # row, after its ledger entry is written).
        await store.update_user("acme", "alice", UserChanges(alert_threshold=1500), at=T0)
        (seen,) = await store.list_ledger("acme", limit=10)
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM users WHERE id = $1 FOR UPDATE", alice.id)
            first = asyncio.create_task(store.credit_account("acme", 1000, at=T0 + 1))
            await waiting_for_locks(watcher, 1)  # its entry drawn, not committed
            second = asyncio.create_task(store.credit_account("acme", 5, at=T0 + 2))
            await waiting_for_locks(watcher, 2)
            assert await store.list_ledger("acme", limit=10, after_id=seen.id) == []
        await asyncio.gather(first, second)
        page = await store.list_ledger("acme", limit=10, after_id=seen.id)
        assert [e.amount for e in page] == [1000, 5]
    finally:
        await blocker.close()
        await watcher.close()
        await store.close()


async def test_deliveries_apply_beside_a_send_holding_the_account_refunds_wait_for_it(
        postgres_url: str) -> None:
    """A report that cannot refund locks its message, not its account: it no longer waits
    for (nor holds up) the sends committing on that account. A refund still takes the
    account's row first, so it waits for the send's commit and adds to what it left."""
    store = open_store(postgres_url, "send")
    await store.open()
    blocker = await asyncpg.connect(postgres_url)
    watcher = await asyncpg.connect(postgres_url)
    try:
        alice = await account_with_user(store, 10)
        bob = await account_with_user(store, 10, name="other", login="bob")
        (sent,) = await store.commit_sends([order(alice, 2, recipients=3)], at=T0 + 1)
        (elsewhere,) = await store.commit_sends([order(bob, 2)], at=T0 + 1)
        delivered = StateUpdate.from_ptt(sent.ids[0], 4, T0 + 2)
        failed = StateUpdate.from_ptt(sent.ids[1], 23, T0 + 2)  # final, not billed
        assert not rules.may_refund(delivered) and rules.may_refund(failed)
        async with blocker.transaction():
            await blocker.execute("SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
                                  alice.account_id)
            await asyncio.wait_for(store.apply_updates([delivered]), 10)
            # In one batch with another account's refund: only that account is locked.
            await asyncio.wait_for(store.apply_updates([
                StateUpdate.from_ptt(sent.ids[2], 4, T0 + 2),
                StateUpdate.from_ptt(elsewhere.ids[0], 23, T0 + 2)]), 10)
            refund = asyncio.create_task(store.apply_updates([failed]))
            await waiting_for_locks(watcher, 1)
            assert not refund.done()
            await blocker.execute("UPDATE accounts SET balance = balance - 1 WHERE id = $1",
                                  alice.account_id)
        await refund
        assert (await store.get_account("acme")).balance == 4 - 1 + 2
        assert (await store.get_account("other")).balance == 10
        assert (await store.get_message(sent.ids[0])).state == "final"
    finally:
        await blocker.close()
        await watcher.close()
        await store.close()


async def test_claims_racing_on_one_window_take_each_outbox_item_once(
        postgres_url: str) -> None:
    """Outbox claims read their window without locks, so racing claims of two nodes choose
    the same items: each item is still taken by one of them only, and none is left."""
    nodes = [open_store(postgres_url, "delivery") for _ in range(2)]
    for node in nodes:
        await node.open()
    try:
        alice = await account_with_user(nodes[0], 10)
        queued = {await nodes[0].enqueue_outbox(
            "callback", account_id=alice.account_id, user_id=alice.id,
            target=f"http://example.test/{n % 3}", payload={"n": n}, at=T0 + n / 1000)
            for n in range(300)}

        async def claim(node: postgresql.PostgreSQLStore) -> list[int]:
            taken: list[int] = []
            while items := await node.claim_outbox(("callback",), now=T0 + 10, lease=600,
                                                   limit=7):
                taken.extend(i.id for i in items)
            return taken

        claims = await asyncio.gather(*(claim(node) for node in nodes for _ in range(3)))
        taken = [item for claimed in claims for item in claimed]
        assert sorted(taken) == sorted(queued)
    finally:
        for node in nodes:
            await node.close()


# -- wake-ups between nodes (LISTEN/NOTIFY) ---------------------------------------------


async def test_another_node_s_commits_wake_this_one_s_listeners(postgres_url: str) -> None:
    here, there = open_store(postgres_url, "delivery"), open_store(postgres_url, "send")
    await here.open()
    await there.open()
    messages, outbox = asyncio.Event(), asyncio.Event()
    try:
        async with here.wake_ups({"messages": messages.set, "outbox": outbox.set}):
            user = await account_with_user(there, 1000)
            await listening(postgres_url)
            await there.commit_sends([order(user, 10)], at=T0)
            await asyncio.wait_for(messages.wait(), 5)
            await there.enqueue_outbox("callback", account_id=user.account_id, user_id=None,
                                       target="http://x.example/", payload={}, at=T0)
            await asyncio.wait_for(outbox.wait(), 5)
    finally:
        await here.close()
        await there.close()


async def listening(url: str, count: int = 1) -> None:
    """Until `count` wake-up connections listen (a state of the server's: no event)."""
    conn = await asyncpg.connect(url)
    try:
        for _ in range(500):
            if await conn.fetchval("SELECT COUNT(*) FROM pg_stat_activity WHERE "
                                   "application_name LIKE '%-wake-ups' AND state = 'idle' "
                                   "AND query LIKE 'LISTEN%'") >= count:
                return
            await asyncio.sleep(0.01)
    finally:
        await conn.close()
    raise AssertionError("no wake-up connection listens")


async def test_a_listener_that_lost_its_connection_comes_back_and_wakes_for_what_it_missed(
        postgres_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgresql, "LISTEN_RETRY_SECONDS", 0.05)
    here, there = open_store(postgres_url, "delivery"), open_store(postgres_url, "send")
    await here.open()
    await there.open()
    woken = asyncio.Event()
    try:
        async with here.wake_ups({"messages": woken.set}):
            user = await account_with_user(there, 1000)
            await listening(postgres_url)
            conn = await asyncpg.connect(postgres_url)
            try:
                assert await conn.fetchval(
                    "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name LIKE '%-wake-ups'") == 1
            finally:
                await conn.close()
            await asyncio.wait_for(woken.wait(), 5)  # back: what it may have missed
            woken.clear()
            await listening(postgres_url)
            await there.commit_sends([order(user, 10)], at=T0)
            await asyncio.wait_for(woken.wait(), 5)
    finally:
        await here.close()
        await there.close()


class TakingOperator:
    """Takes every message, and says when it took one."""

    def __init__(self) -> None:
        self.took = asyncio.Event()
        self.ids: list[int] = []

    async def start(self, sink: object) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def submit(self, messages: list[OutgoingMessage]) -> list[Taken]:
        self.ids += [m.id for m in messages]
        self.took.set()
        return [Taken(m.id, (f"R{m.id}",)) for m in messages]

    async def resume(self, messages: list[OutgoingMessage]) -> None:
        pass

    def link_status(self) -> LinkStatus:
        return LinkStatus(True)


async def test_a_send_committed_on_another_node_is_delivered_before_the_next_poll(
        postgres_url: str) -> None:
    """The delivering node polls the store every hour here: only the wake-up can bring it
    the message committed by the other node's store."""
    here, there = open_store(postgres_url, "delivery"), open_store(postgres_url, "send")
    await here.open()
    await there.open()
    operator = TakingOperator()
    dispatcher = Dispatcher(here, SystemClock(), operator,  # type: ignore[arg-type]
                            follow_store=True, poll_seconds=3600.0)
    wake_ups = WakeUps(here, {"messages": [dispatcher.poke]})
    try:
        user = await account_with_user(there, 1000)
        await dispatcher.start()
        await wake_ups.start()
        await listening(postgres_url)
        assert not operator.took.is_set()
        (outcome,) = await there.commit_sends([order(user, 10)], at=T0)
        await asyncio.wait_for(operator.took.wait(), 5)
        assert operator.ids == list(outcome.ids)
    finally:
        await wake_ups.stop()
        await dispatcher.stop()
        await here.close()
        await there.close()
