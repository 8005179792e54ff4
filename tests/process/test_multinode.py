"""Several gateway processes on one PostgreSQL database: a send on any node is charged once
and seen by all, and a crossing alerts once, however the nodes interleave (issue 20)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from gateway.cli import DEMO_ACCOUNT, DEMO_LOGIN
from gateway.config import Config
from gateway.service import Management
from gateway.store import open_store
from tests import dbrows
from tests.cli_in_process import invoke
from tests.conftest import ledger_identity
from tests.serverproc import (
    ServerProcess,
    demo_params,
    prepare_store,
    servers,
    store_totals,
    wait_for,
)


async def manage(url: str, **fields: Any) -> None:
    store = open_store(url, "cli")
    await store.open()
    try:
        await Management(store, Config()).update_user(DEMO_ACCOUNT, DEMO_LOGIN, **fields)
    finally:
        await store.close()


async def send_through(nodes: list[ServerProcess], count: int) -> list[int]:
    """`count` sends at once, alternating between the nodes: each answer's status."""
    async with aiohttp.ClientSession() as session:
        async def one(n: int) -> int:
            node = nodes[n % len(nodes)]
            async with session.get(node.send_url, params=demo_params(
                    to=f"+336{n:08d}", contentType="application/json")) as resp:
                assert resp.status == 200, await resp.text()
                return int(json.loads(await resp.text())["status"])

        return list(await asyncio.gather(*(one(n) for n in range(count))))


async def two_nodes(url: str, started: list[ServerProcess]) -> list[ServerProcess]:
    # Started together: the second migrates (finding nothing to do) while the first does.
    nodes = await asyncio.gather(ServerProcess.start(url), ServerProcess.start(url))
    started.extend(nodes)
    return list(nodes)


async def test_two_nodes_charge_a_quota_exactly_once(postgres_url: str) -> None:
    """200 concurrent sends split between two gateways against a quota of 50 single-part
    messages: exactly 50 accepted, and purchased = balances + quotas + spent."""
    async with servers() as started:
        await prepare_store(postgres_url, credits=1000)
        await manage(postgres_url, quota=50)
        nodes = await two_nodes(postgres_url, started)
        statuses = await send_through(nodes, 200)
        assert statuses.count(100) == 50, sorted(set(statuses))
        totals, _ = await store_totals(postgres_url)
        ledger_identity(totals)
        assert totals["spent"] == 50 * 100 and totals["quotas"] == 0
        for node in nodes:
            assert await node.stop() == 0


async def test_concurrent_crossings_through_two_nodes_alert_once(postgres_url: str) -> None:
    async with servers() as started:
        await prepare_store(postgres_url)  # the demo account's 1,000 credits
        await manage(postgres_url, alert_threshold=950, alert_support="mail",
                     alert_email="ops@example.com")
        nodes = await two_nodes(postgres_url, started)
        statuses = await send_through(nodes, 100)
        assert statuses.count(100) == 100
        alerts = dbrows.query(postgres_url,
                              "SELECT id FROM outbox WHERE kind LIKE 'alert%'")
        assert len(alerts) == 1
        for node in nodes:
            assert await node.stop() == 0


async def test_a_node_killed_mid_load_loses_nothing_and_the_other_finishes(
        postgres_url: str) -> None:
    """SIGKILL one of two nodes under load: every send it answered 100 is stored, and the
    other node (its delivery worker waiting for the `delivery` lock) delivers them all."""
    env = {"HTTP2SMS_OPERATOR_MIN_DELAY": "0.2", "HTTP2SMS_OPERATOR_MAX_DELAY": "1.0"}
    accepted: set[int] = set()
    async with servers() as started:
        await prepare_store(postgres_url, credits=100_000)
        doomed = await ServerProcess.start(postgres_url, env=env)
        started.append(doomed)
        survivor = await ServerProcess.start(postgres_url, env=env)
        started.append(survivor)
        stop = asyncio.Event()

        async def sender(session: aiohttp.ClientSession, worker: int) -> None:
            for n in range(100_000):
                if stop.is_set():
                    return
                try:
                    async with session.get(doomed.send_url, params=demo_params(
                            to=f"+336{worker:02d}{n:06d}",
                            contentType="application/json")) as resp:
                        answer = json.loads(await resp.text())
                except (TimeoutError, aiohttp.ClientError, ValueError):
                    return  # the node died under this request
                if answer.get("status") == 100:
                    accepted.update(int(i) for i in answer["SmsIds"])
                if len(accepted) >= 300:
                    stop.set()

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            senders = [asyncio.create_task(sender(session, w)) for w in range(16)]
            await asyncio.wait_for(stop.wait(), 60)
            doomed.proc.kill()
            await doomed.wait_exit(10)
            await asyncio.wait_for(asyncio.gather(*senders), 30)
        stored = {r["id"] for r in dbrows.query(postgres_url, "SELECT id FROM messages")}
        assert accepted <= stored, sorted(accepted - stored)[:10]
        _, counts = await store_totals(postgres_url)
        assert counts["queued"] + counts["sent"] > 0, "nothing left to take over: kill earlier"

        async def settled() -> bool:
            _, now = await store_totals(postgres_url)
            return now["queued"] + now["sent"] == 0

        await wait_for(settled, timeout=60, interval=0.25, what="the survivor to deliver")
        totals, _ = await store_totals(postgres_url)
        ledger_identity(totals)
        assert await survivor.stop() == 0


ADMIN_TOKEN = "multinode-admin-token-0123456789"


async def test_a_change_through_one_node_the_cli_or_the_admin_api_reaches_the_other_at_once(
        postgres_url: str) -> None:
    """A change made on node A (its admin API) or with the command line is seen by node B's
    very next send: B caches its send contexts, and the account's settings version
    refuses a commit checked against an old one."""
    env = {"HTTP2SMS_ADMIN_TOKEN": ADMIN_TOKEN}
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with servers() as started, aiohttp.ClientSession() as session:
        await prepare_store(postgres_url, credits=1000)
        node_a, node_b = await asyncio.gather(ServerProcess.start(postgres_url, env=env),
                                              ServerProcess.start(postgres_url, env=env))
        started += [node_a, node_b]
        user_url = f"{node_a.base}/1.0/sms/{DEMO_ACCOUNT}/users/{DEMO_LOGIN}"

        async def send_b(**params: str) -> dict[str, Any]:
            async with session.get(node_b.send_url, params=demo_params(
                    contentType="application/json", **params)) as resp:
                return dict(json.loads(await resp.text()))

        assert (await send_b())["status"] == 100  # B caches the user's context now

        # The password, through A's admin API.
        async with session.put(user_url, json={"password": "newpass123"},
                               headers=admin) as resp:
            assert resp.status == 200, await resp.text()
        assert (await send_b())["status"] == 401
        assert (await send_b(password="newpass123"))["status"] == 100

        # The IP allowlist, through the command line.
        changed = await asyncio.to_thread(
            invoke, "--db", postgres_url, "user", "set", DEMO_ACCOUNT, DEMO_LOGIN,
            "--ips", "8.8.8.8", env={"HTTP2SMS_SERVER_ALLOW_PRIVATE_IPS": "1"})
        assert changed.exit_code == 0, changed.stderr
        assert await send_b(password="newpass123") == {
            "status": 401, "message": "The IP address 127.0.0.1 is not allowed for this user"}
        changed = await asyncio.to_thread(
            invoke, "--db", postgres_url, "user", "set", DEMO_ACCOUNT, DEMO_LOGIN,
            "--ips", "")
        assert changed.exit_code == 0, changed.stderr
        assert (await send_b(password="newpass123"))["status"] == 100

        # A quota of one message, through A's admin API: B sends one, then refuses.
        async with session.put(user_url, json={"quotaInformations": {"quotaLeft": 1}},
                               headers=admin) as resp:
            assert resp.status == 200, await resp.text()
        assert (await send_b(password="newpass123"))["status"] == 100
        refused = await send_b(password="newpass123")
        assert refused["status"] != 100, refused
        totals, _ = await store_totals(postgres_url)
        ledger_identity(totals)
        assert totals["quotas"] == 0
        for node in (node_a, node_b):
            assert await node.stop() == 0


async def test_the_listening_line_names_the_database_of_store_url_without_its_password(
        postgres_url: str) -> None:
    """Only HTTP2SMS_STORE_URL set: the line showed `store.path` (var/gateway.sqlite3), a
    store the gateway did not use; with --db it showed the URL whole, password included."""
    scheme, _, rest = postgres_url.partition("://")
    user, _, after = rest.partition("@")
    with_password = f"{scheme}://{user}:s3cret-pw@{after}"
    async with servers() as started:
        node = await ServerProcess.start("", env={"HTTP2SMS_STORE_URL": with_password,
                                                  "HTTP2SMS_LOG_LEVEL": "info"})
        started.append(node)
        (line,) = node.events("listening")
        assert json.loads(line)["store"].startswith(f"{scheme}://{user}:***@")
        assert await node.stop() == 0
        assert "s3cret-pw" not in node.log
