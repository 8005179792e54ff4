"""The real gateway process on the test SMSC: a SIGKILL between a receipt and its commit
loses nothing (the receipt is answered only once committed, so the SMSC sends it again)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.serverproc import (
    ServerProcess,
    demo_params,
    prepare_store,
    read_db,
    servers,
    wait_for,
)
from tests.smsc import Smsc


@pytest.fixture
async def smsc() -> AsyncIterator[Smsc]:
    server = Smsc()
    await server.start()
    yield server
    await server.stop()


def smpp_env(smsc: Smsc) -> dict[str, str]:
    return {"HTTP2SMS_OPERATOR_KIND": "smpp", "HTTP2SMS_OPERATOR_SMPP_HOST": "127.0.0.1",
            "HTTP2SMS_OPERATOR_SMPP_PORT": str(smsc.port),
            "HTTP2SMS_OPERATOR_SMPP_SYSTEM_ID": "gateway",
            "HTTP2SMS_OPERATOR_SMPP_PASSWORD": "secret",
            "HTTP2SMS_OPERATOR_SMPP_RECONNECT_FIRST_SECONDS": "0.05",
            "HTTP2SMS_OPERATOR_SMPP_RECONNECT_MAX_SECONDS": "0.5",
            # One process: the one killed is the one holding the receipt.
            "HTTP2SMS_SERVER_DELIVERY_WORKER": "0"}


def ptt_of(db: Path, message_id: int) -> int | None:
    rows = read_db(db, "SELECT ptt FROM messages WHERE id = ?", (message_id,))
    return rows[0][0] if rows else None


async def test_a_sigkill_between_a_receipt_and_its_commit_loses_no_receipt(
        tmp_path: Path, smsc: Smsc) -> None:
    db = tmp_path / "kill.sqlite3"
    await prepare_store(db, credits=100)
    async with servers() as started, aiohttp.ClientSession() as session:
        # Its own process group: the SIGKILL below takes the gateway and its delivery worker
        # (which holds the receipt) at once, as a crash of the machine would. Killing the
        # gateway alone left the worker to commit the receipt itself once the lock was free,
        # and to hold the delivery lock while the restarted gateway waited for it.
        server = await ServerProcess.start(db, env=smpp_env(smsc), preexec_fn=os.setpgrp)
        started.append(server)
        async with session.get(server.send_url, params=demo_params()) as resp:
            body = await resp.text()
        message_id = int(body.split("\n")[2])

        async def sent() -> bool:
            return ptt_of(db, message_id) == 3
        await wait_for(sent, timeout=15, what="the message to be sent")
        reference = smsc.submitted[0].message_id

        # Hold the store's write lock: the receipt arrives but cannot be committed.
        lock = sqlite3.connect(db, timeout=10, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            smsc.owe_receipt(reference, "DELIVRD")
            await asyncio.sleep(0.5)
            assert reference in smsc.pending_receipts  # not answered: not committed
            os.killpg(server.proc.pid, signal.SIGKILL)
            assert await server.wait_exit(10) == -signal.SIGKILL
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert ptt_of(db, message_id) == 3 and reference in smsc.pending_receipts

        restarted = await ServerProcess.start(db, env=smpp_env(smsc))
        started.append(restarted)

        async def delivered() -> bool:
            return ptt_of(db, message_id) == 4
        await wait_for(delivered, timeout=15, what="the receipt to be applied")
        await wait_for(lambda: _true(not smsc.pending_receipts), timeout=5,
                       what="the receipt to be answered")
        assert await restarted.stop() == 0


async def _true(value: bool) -> bool:
    return value
