"""Server-side request forgery through callback URLs, against the real process.

`python -m gateway serve` and its delivery worker: callback URLs naming this machine in
every disguise reach no receiver under the default policy, and a callback to the gateway's
own send URL sends no second SMS even with private targets allowed. The set-time check is
in tests/test_callbacks.py, the client's own (names resolving to loopback, the address
connected to) in tests/test_http_client.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.cli import DEMO_ACCOUNT, DEMO_LOGIN, DEMO_PASSWORD, DEMO_SENDER
from gateway.config import Config
from gateway.records import UserChanges
from gateway.service import Management
from gateway.store import open_store
from tests.serverproc import (
    ServerProcess,
    demo_params,
    free_port,
    prepare_store,
    read_db,
    servers,
    wait_for,
)

# This machine, as a URL can name it: each reaches a receiver listening on 127.0.0.1.
DISGUISES = ["127.0.0.1", "localhost", "127.1", "2130706433", "0x7f000001",
             "[::ffff:127.0.0.1]", "017700000001"]


class Receiver:
    """An internal service on 127.0.0.1: counts whatever reaches it."""

    def __init__(self) -> None:
        self.calls = 0
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        return web.Response(text="ok")

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


async def callbacks_settled(db: Path, ids: list[int], count: int) -> list[tuple[str, str]]:
    """(state, last error) of the callbacks of `ids`, once `count` of them are dead."""
    marks = ",".join("?" * len(ids))

    async def dead() -> list[tuple[str, str]] | None:
        rows = [(str(state), str(error)) for state, error in read_db(
            db, f"SELECT state, last_error FROM outbox WHERE kind = 'callback' "
                f"AND message_id IN ({marks}) ORDER BY id", tuple(ids))]
        return rows if [r[0] for r in rows].count("dead") >= count else None

    return await wait_for(dead, timeout=20, what="the callbacks to be refused")


async def send(session: aiohttp.ClientSession, server: ServerProcess,
               **params: str) -> list[int]:
    async with session.get(server.send_url, params=demo_params(**params)) as resp:
        body = await resp.text()
    assert resp.status == 200 and body.startswith("OK\n"), body
    return [int(i) for i in body.split("\n")[2:]]


async def test_callbacks_to_this_machine_in_any_disguise_reach_nothing(tmp_path: Path) -> None:
    db = tmp_path / "ssrf.sqlite3"
    async with Receiver() as receiver, servers() as started, \
            aiohttp.ClientSession() as session:
        await prepare_store(db)
        # Set with private targets allowed (as before this rule, or by an operator since
        # turned strict): the gateway must refuse them when it connects.
        store = open_store(db, "cli")
        await store.open()
        try:
            manage = Management(store, Config().replace(
                {"store.path": str(db), "callbacks.allow_private_targets": True}))
            logins = []
            for n, host in enumerate(DISGUISES):
                login = f"user{n}"
                await manage.create_user(DEMO_ACCOUNT, login, DEMO_PASSWORD)
                await store.update_user(DEMO_ACCOUNT, login, UserChanges(
                    callback_url=f"http://{host}:{receiver.port}/dlr?token=s3cr3t"), at=0.0)
                logins.append(login)
        finally:
            await store.close()
        server = await ServerProcess.start(
            db, env={"HTTP2SMS_CALLBACKS_ALLOW_PRIVATE_TARGETS": "0",
                     "HTTP2SMS_OPERATOR_FAILURE_RATIO": "0",
                     "HTTP2SMS_OPERATOR_RETRY_RATIO": "0"})
        started.append(server)
        ids = [i for login in logins
               for i in await send(session, server, login=login, password=DEMO_PASSWORD)]
        rows = await callbacks_settled(db, ids, 2 * len(ids))  # sent, then delivered
        assert len(rows) == 2 * len(DISGUISES)
        for state, error in rows:
            assert state == "dead"
            assert error.startswith("target refused: ") and "is not a public address " \
                "(callbacks.allow_private_targets" in error, error
        await asyncio.sleep(0.2)
        assert receiver.calls == 0
        assert "s3cr3t" not in server.log


async def test_a_callback_to_the_gateway_s_own_send_url_sends_no_second_sms(
        tmp_path: Path) -> None:
    db = tmp_path / "loop.sqlite3"
    port = free_port()
    loop = (f"http://127.0.0.1:{port}/cgi-bin/sms/http2sms.cgi?account={DEMO_ACCOUNT}"
            f"&login={DEMO_LOGIN}&password={DEMO_PASSWORD}&from={DEMO_SENDER}"
            "&to=%2B33612345678&message=loop&noStop=1")
    async with servers() as started, aiohttp.ClientSession() as session:
        await prepare_store(db, callback=loop)  # private targets allowed, as in BASE_ENV
        server = await ServerProcess.start(db, port=port, env={
            "HTTP2SMS_OPERATOR_FAILURE_RATIO": "0", "HTTP2SMS_OPERATOR_RETRY_RATIO": "0"})
        started.append(server)
        ids = await send(session, server)
        (balance,), = read_db(db, "SELECT balance FROM accounts")
        rows = await callbacks_settled(db, ids, 2)
        assert rows == [("dead", "target refused: the gateway's own listener")] * 2
        assert read_db(db, "SELECT COUNT(*) FROM messages") == [(1,)]
        assert read_db(db, "SELECT balance FROM accounts") == [(balance,)]
