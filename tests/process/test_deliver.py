"""`http2sms deliver`: delivery workers on their own (issue 20). On PostgreSQL several share
the work and never submit a message nor send a callback twice; on SQLite one delivers, the
next one waits for the store's delivery lock; SIGTERM stops them cleanly."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from gateway.cli import DEMO_ACCOUNT, DEMO_LOGIN
from gateway.records import SendOrder
from gateway.store import open_store
from tests import dbrows
from tests.conftest import ledger_identity
from tests.serverproc import (
    ServerProcess,
    demo_params,
    free_port,
    prepare_store,
    servers,
    store_totals,
    wait_for,
)
from tests.store.test_postgresql import end_lock_sessions

DEBUG = {"HTTP2SMS_LOG_LEVEL": "debug"}


async def queue_messages(db: Path | str, count: int, *, per_commit: int = 500) -> list[int]:
    """`count` single-part messages committed as the send path commits them."""
    store = open_store(db, "cli")
    await store.open()
    ids: list[int] = []
    try:
        account = await store.get_account(DEMO_ACCOUNT)
        user = await store.get_user(DEMO_ACCOUNT, DEMO_LOGIN)
        for start in range(0, count, per_commit):
            orders = [SendOrder(account_id=account.id, user_id=user.id, login=DEMO_LOGIN,
                                sender="S", body=f"queued {n}", coding=1, parts=1, klass=1,
                                no_stop=True, tag="", recipients=(f"+3361{n:07d}",),
                                costs=(100,))
                      for n in range(start, min(count, start + per_commit))]
            outcomes = await store.commit_sends(orders, at=time.time())
            ids += [i for outcome in outcomes for i in outcome.ids]
    finally:
        await store.close()
    return ids


def submitted(worker: ServerProcess) -> Counter[int]:
    """How many times this worker gave each message to the operator (debug log)."""
    return Counter(json.loads(line)["message_id"]
                   for line in worker.events("message_submitted"))


@asynccontextmanager
async def callback_receiver() -> AsyncIterator[tuple[str, Counter[tuple[int, int]]]]:
    """A local HTTP receiver: (its URL, how many callbacks it got per (message id, ptt))."""
    received: Counter[tuple[int, int]] = Counter()

    async def hit(request: web.Request) -> web.Response:
        received[int(request.query["id"]), int(request.query["ptt"])] += 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/dlr", hit)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/dlr", received
    finally:
        await runner.cleanup()


@pytest.mark.soak
async def test_two_deliver_workers_share_10000_messages_each_submitted_and_called_back_once(
        postgres_url: str) -> None:
    count = 10_000
    # Small claims, so that the two workers' claims interleave all along.
    env = {**DEBUG, "HTTP2SMS_OPERATOR_MAX_BATCH": "100"}
    async with servers() as started, callback_receiver() as (url, received):
        await prepare_store(postgres_url, credits=count, callback=url)
        workers = list(await asyncio.gather(ServerProcess.deliver(postgres_url, env=env),
                                            ServerProcess.deliver(postgres_url, env=env)))
        started += workers
        for worker in workers:
            (line,) = worker.events("deliver_starting")
            assert json.loads(line)["mode"] == "shared"
        ids = await queue_messages(postgres_url, count)
        assert len(ids) == count

        async def settled() -> bool:
            _, counts = await store_totals(postgres_url)
            return counts["queued"] + counts["sent"] + counts["outbox_pending"] == 0
        await wait_for(settled, timeout=240, interval=0.5,
                       what="every message final and every callback sent")

        shares = [submitted(worker) for worker in workers]
        # Each message went to the operator exactly once, and both workers took part.
        assert shares[0] + shares[1] == Counter({i: 1 for i in ids})
        assert all(shares), [sum(share.values()) for share in shares]
        # Each callback queued was sent once: none missing, none twice.
        queued = Counter((row["message_id"], json.loads(row["payload"])["ptt"])
                         for row in dbrows.query(
                             postgres_url, "SELECT message_id, payload FROM outbox "
                             "WHERE kind = 'callback' AND state = 'done'"))
        assert len({m for m, _ in queued}) == count
        assert received == queued
        assert not dbrows.query(postgres_url, "SELECT outbox_id FROM outbox_attempts "
                                "GROUP BY outbox_id HAVING COUNT(*) > 1")
        totals, _ = await store_totals(postgres_url)
        ledger_identity(totals)
        for worker in workers:
            assert await worker.stop() == 0
            assert worker.events("deliver_stopped")


async def test_deliver_workers_wait_for_a_gateway_delivering_alone(postgres_url: str) -> None:
    """A gateway delivering itself frees every claim at its start: `deliver` workers (which
    hold the delivery name shared) wait while it runs, and say why; once it stops they
    deliver what it stored."""
    async with servers() as started:
        await prepare_store(postgres_url, credits=1000)
        gateway = await ServerProcess.start(postgres_url, env={"HTTP2SMS_LOG_LEVEL": "info"})
        started.append(gateway)
        # Its worker holds delivery once ready; a `deliver` started before would win instead
        # (whichever takes the name first delivers), which is not this test's case.
        await gateway.wait_event("delivery_worker_ready", 20)
        worker = await ServerProcess.deliver(postgres_url, wait_ready=False)
        started.append(worker)
        line = await worker.wait_event("delivery_elsewhere", 20)
        assert "server.delivery = false" in json.loads(line)["reason"]
        assert await gateway.stop() == 0
        await worker.wait_event("deliver_ready", 20)
        (sent,) = await queue_messages(postgres_url, 1)

        async def final() -> bool:
            return dbrows.query(postgres_url, "SELECT state FROM messages WHERE id = ?",
                                (sent,))[0]["state"] == "final"
        await wait_for(final, timeout=20, what="the worker to deliver")
        assert await worker.stop() == 0


async def test_deliver_on_sqlite_delivers_alone_and_the_next_one_waits(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite3"
    await prepare_store(db, credits=1000)
    async with servers() as started:
        first = await ServerProcess.deliver(db, env=DEBUG)
        started.append(first)
        (line,) = first.events("deliver_starting")
        assert json.loads(line)["mode"] == "alone"
        assert "one process delivers at a time" in json.loads(line)["detail"]
        second = await ServerProcess.deliver(db, env=DEBUG, wait_ready=False)
        started.append(second)
        await second.wait_event("delivery_elsewhere", 20)
        assert not second.events("deliver_ready")

        ids = await queue_messages(db, 20)

        async def all_final(expected: int) -> bool:
            rows = dbrows.query(str(db), "SELECT COUNT(*) AS n FROM messages "
                                "WHERE state = 'final'")
            return rows[0]["n"] == expected
        await wait_for(lambda: all_final(20), timeout=20, what="the first worker to deliver")
        assert submitted(first) == Counter({i: 1 for i in ids}) and not submitted(second)

        # SIGTERM: the first stops cleanly, the second takes over.
        assert await first.stop() == 0
        assert first.events("deliver_stopped")
        await second.wait_event("deliver_ready", 20)
        more = await queue_messages(db, 5)
        await wait_for(lambda: all_final(25), timeout=20, what="the second worker to deliver")
        assert submitted(second) == Counter({i: 1 for i in more})
        assert await second.stop() == 0


async def test_a_gateway_without_delivery_takes_sends_and_a_deliver_worker_delivers(
        tmp_path: Path) -> None:
    """`server.delivery = false`: the gateway is ready without any delivery of its own."""
    db = tmp_path / "store.sqlite3"
    await prepare_store(db, credits=1000)
    async with servers() as started:
        gateway = await ServerProcess.start(db, env={"HTTP2SMS_SERVER_DELIVERY": "0"})
        started.append(gateway)
        worker = await ServerProcess.deliver(db)
        started.append(worker)
        async with aiohttp.ClientSession() as session:
            async with session.get(gateway.base + "/readyz") as resp:
                assert resp.status == 200, await resp.text()
            async with session.get(gateway.send_url, params=demo_params()) as resp:
                assert (await resp.text()).startswith("OK")

        async def final() -> bool:
            rows = dbrows.query(str(db), "SELECT state FROM messages")
            return [r["state"] for r in rows] == ["final"]
        await wait_for(final, timeout=20, what="the worker to deliver the send")
        assert not gateway.events("delivery_worker_started")
        assert await gateway.stop() == 0 and await worker.stop() == 0


async def test_a_deliver_worker_whose_lock_connection_ends_stops_delivering(
        postgres_url: str) -> None:
    """The database ends the session holding the worker's delivery lock (a failover, an
    administrator): the lock is gone, and a gateway delivering alone could take it and
    free every claim. The worker stops at once with status 1, for its supervisor to start
    it again, rather than deliver beside that gateway."""
    async with servers() as started:
        await prepare_store(postgres_url, credits=1000)
        worker = await ServerProcess.deliver(postgres_url)
        started.append(worker)
        assert await end_lock_sessions(postgres_url) == 1
        assert await worker.wait_exit(20) == 1
        (line,) = worker.events("delivery_lock_lost")
        assert json.loads(line)["reason"]


async def test_a_gateway_s_delivery_worker_whose_lock_connection_ends_is_started_again(
        postgres_url: str) -> None:
    """The same for the worker a gateway starts: it stops, and the gateway starts a new
    one, which takes the lock again and delivers."""
    async with servers() as started:
        await prepare_store(postgres_url, credits=1000)
        gateway = await ServerProcess.start(postgres_url, env={"HTTP2SMS_LOG_LEVEL": "info"})
        started.append(gateway)
        await gateway.wait_event("delivery_worker_ready", 20)
        assert await end_lock_sessions(postgres_url) == 1
        await gateway.wait_event("delivery_lock_lost", 20)
        async def started_again() -> bool:
            return len(gateway.events("delivery_worker_ready")) == 2
        await wait_for(started_again, timeout=20, what="a new delivery worker")
        (sent,) = await queue_messages(postgres_url, 1)

        async def final() -> bool:
            return dbrows.query(postgres_url, "SELECT state FROM messages WHERE id = ?",
                                (sent,))[0]["state"] == "final"
        await wait_for(final, timeout=20, what="the new worker to deliver")
        assert await gateway.stop() == 0


async def test_a_deliver_worker_runs_the_retention_purge(tmp_path: Path) -> None:
    """With gateways that do not deliver, `deliver` is where the purge runs: without it,
    nothing was ever erased nor deleted."""
    db = tmp_path / "store.sqlite3"
    await prepare_store(db, credits=1000)
    ids = await queue_messages(db, 3)
    old = time.time() - 500 * 86400
    dbrows.query(str(db), "UPDATE messages SET state = 'final', created_at = ? "
                 "WHERE id IN (?, ?, ?)", (old, *ids))
    async with servers() as started:
        worker = await ServerProcess.deliver(db, env={"HTTP2SMS_RETENTION_INTERVAL_SECONDS": "1"})
        started.append(worker)

        async def deleted() -> bool:
            return dbrows.query(str(db), "SELECT COUNT(*) AS n FROM messages")[0]["n"] == 0

        await wait_for(deleted, timeout=20, what="the purge to delete the old messages")
        assert worker.events("purge_done")
        assert await worker.stop() == 0
