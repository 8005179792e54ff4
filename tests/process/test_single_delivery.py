"""Two gateways on one store, with and without delivery workers: one delivers, the other
waits (issue 19, point 21). Each submitted every message left queued, so each SMS went
twice."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import aiohttp

from gateway.cli import DEMO_ACCOUNT, DEMO_LOGIN
from gateway.records import SendOrder
from gateway.store import open_store
from tests.serverproc import (
    ServerProcess,
    demo_params,
    prepare_store,
    read_db,
    servers,
    wait_for,
)

ONE_PROCESS = {
    "HTTP2SMS_SERVER_DELIVERY_WORKER": "0",
    "HTTP2SMS_LOG_LEVEL": "debug",
    # Messages stay a while at the operator: the second gateway starts while they do.
    "HTTP2SMS_OPERATOR_MIN_DELAY": "1",
    "HTTP2SMS_OPERATOR_MAX_DELAY": "2",
}


async def queue_messages(db: Path, count: int) -> list[int]:
    """Messages committed and not delivered, as a gateway stopped mid-way leaves them."""
    store = open_store(db, "cli")
    await store.open()
    try:
        account = await store.get_account(DEMO_ACCOUNT)
        user = await store.get_user(DEMO_ACCOUNT, DEMO_LOGIN)
        orders = [SendOrder(account_id=account.id, user_id=user.id, login=DEMO_LOGIN,
                            sender="S", body=f"queued {n}", coding=1, parts=1, klass=1,
                            no_stop=True, tag="", recipients=(f"+336123456{n:02d}",),
                            costs=(100,)) for n in range(count)]
        outcomes = await store.commit_sends(orders, at=time.time())
    finally:
        await store.close()
    return [i for outcome in outcomes for i in outcome.ids]


def handed_over(server: ServerProcess) -> Counter[int]:
    """How many times this gateway gave each message to the operator."""
    found: Counter[int] = Counter()
    for event in ("message_submitted", "message_resumed"):
        for line in server.events(event):
            found[json.loads(line)["message_id"]] += 1
    return found


async def readyz(server: ServerProcess) -> tuple[int, dict[str, object]]:
    async with aiohttp.ClientSession() as session, \
            session.get(server.base + "/readyz") as resp:
        return resp.status, (await resp.json())["checks"]


async def test_two_gateways_on_one_store_submit_each_message_once(tmp_path: Path) -> None:
    db = tmp_path / "shared.sqlite3"
    await prepare_store(db, credits=1000)
    queued = await queue_messages(db, 40)
    async with servers() as started:
        first, second = await asyncio.gather(ServerProcess.start(db, env=ONE_PROCESS),
                                             ServerProcess.start(db, env=ONE_PROCESS))
        started += [first, second]
        async def all_final() -> bool:
            (pending,), = read_db(db, "SELECT COUNT(*) FROM messages WHERE state <> 'final'")
            return pending == 0
        await wait_for(all_final, timeout=30, what="every message to be final")
        # Each message went to the operator once, from either gateway.
        assert handed_over(first) + handed_over(second) == Counter({i: 1 for i in queued})

        standby = [s for s in started if s.events("delivery_elsewhere")]
        assert len(standby) == 1, [s.log[-2000:] for s in started]
        (waiting,) = standby
        (delivering,) = [s for s in started if s is not waiting]
        assert not handed_over(waiting)
        status, checks = await readyz(waiting)
        assert status == 503 and checks["delivery"] == \
            "another gateway delivers from this store", checks
        status, checks = await readyz(delivering)
        assert status == 200 and "delivery" not in checks, checks

        async with aiohttp.ClientSession() as session:
            for n in range(5):
                async with session.get(delivering.send_url, params=demo_params(
                        to=f"+336123457{n:02d}")) as resp:
                    assert (await resp.text()).startswith("OK")
        await wait_for(all_final, timeout=30, what="every message to be final")
        ids = [i for (i,) in read_db(db, "SELECT id FROM messages")]
        assert set(queued) <= set(ids) and len(ids) == 45
        assert not handed_over(waiting)
        assert handed_over(delivering) == Counter({i: 1 for i in ids})

        # The one delivering stops: the other takes over, and delivers what it is sent.
        assert await delivering.stop() == 0

        async def took_over() -> bool:
            return bool(waiting.events("delivery_taken_over"))
        await wait_for(took_over, timeout=10, what="the standby to take over")
        status, checks = await readyz(waiting)
        assert status == 200, checks
        async with aiohttp.ClientSession() as session, \
                session.get(waiting.send_url, params=demo_params()) as resp:
            body = await resp.text()
        assert body.startswith("OK")
        (new_id,) = [int(i) for i in body.split("\n")[2:]]
        await wait_for(all_final, timeout=30, what="the new message to be final")
        assert handed_over(waiting) == Counter({new_id: 1})
        assert await waiting.stop() == 0


async def test_two_gateways_with_delivery_workers_one_delivers_the_other_says_why(
        tmp_path: Path) -> None:
    """The default mode: the second gateway's worker waits for the store's delivery lock,
    says so as a warning, and its gateway answers /readyz at once with the reason (it
    read no status request while it waited: each probe took the 2 s status timeout and
    said "delivery worker not answering")."""
    db = tmp_path / "shared.sqlite3"
    await prepare_store(db, credits=1000)
    worker_mode = {"HTTP2SMS_SERVER_DELIVERY_WORKER": "1"}
    async with servers() as started:
        first = await ServerProcess.start(db, env=worker_mode)
        started.append(first)

        async def first_ready() -> bool:
            return (await readyz(first))[0] == 200
        await wait_for(first_ready, timeout=20, what="the first gateway to be ready")
        second = await ServerProcess.start(db, env=worker_mode)
        started.append(second)

        async def second_waits() -> bool:
            return bool(second.events("delivery_elsewhere"))
        await wait_for(second_waits, timeout=20, what="the second worker to wait")
        (line,) = second.events("delivery_elsewhere")
        assert json.loads(line)["level"] == "warning"
        assert not second.events("delivery_worker_waiting")
        began = time.monotonic()
        status, checks = await readyz(second)
        assert time.monotonic() - began < 1.5
        assert status == 503 and checks["delivery"] == \
            "another gateway delivers from this store", checks
        assert checks["operator"] != "delivery worker not answering", checks
        assert (await readyz(first))[0] == 200

        # A send to the second one is stored, and delivered by the first one's worker.
        async with aiohttp.ClientSession() as session, \
                session.get(second.send_url, params=demo_params()) as resp:
            assert (await resp.text()).startswith("OK")

        async def all_final() -> bool:
            (pending,), = read_db(db, "SELECT COUNT(*) FROM messages WHERE state <> 'final'")
            return pending == 0
        await wait_for(all_final, timeout=30, what="the message to be final")

        # The first one stops: the second one's worker takes over.
        assert await first.stop() == 0

        async def second_ready() -> bool:
            return (await readyz(second))[0] == 200
        await wait_for(second_ready, timeout=20, what="the second gateway to take over")
        assert second.events("delivery_taken_over")
        assert await second.stop() == 0
        assert not second.events("delivery_worker_killed")


async def test_a_send_accepted_by_the_standby_is_delivered_by_the_active_gateway(
        tmp_path: Path) -> None:
    """The active gateway's dispatcher slept until its own next commit: a send the standby
    accepted waited, charged, for as long as nobody sent to the active one."""
    db = tmp_path / "shared.sqlite3"
    await prepare_store(db, credits=1000)
    async with servers() as started:
        first = await ServerProcess.start(db, env=ONE_PROCESS)
        started.append(first)

        async def recovered() -> bool:
            return bool(first.events("delivery_recovered"))
        await wait_for(recovered, timeout=10, what="the first gateway to deliver")
        second = await ServerProcess.start(db, env=ONE_PROCESS)
        started.append(second)
        assert second.events("delivery_elsewhere") and not first.events("delivery_elsewhere")
        async with aiohttp.ClientSession() as session, \
                session.get(second.send_url, params=demo_params()) as resp:
            body = await resp.text()
        assert body.startswith("OK"), body
        (new_id,) = [int(i) for i in body.split("\n")[2:]]

        async def delivered() -> bool:
            return handed_over(first) == Counter({new_id: 1})
        await wait_for(delivered, timeout=15, what="the active gateway to deliver it")
        assert not handed_over(second)
