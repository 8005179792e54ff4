"""`http2sms serve --processes N`: N send processes on one port (SO_REUSEPORT) under a
supervisor (issue 20). Sends through the port are spread on the processes and all charged;
SIGTERM stops every process; a process that dies is started again; one that cannot start
stops the group."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path

import aiohttp

from tests import dbrows
from tests.conftest import ledger_identity
from tests.serverproc import (
    ServerProcess,
    demo_params,
    prepare_store,
    servers,
    store_totals,
    wait_for,
)

INFO = {"HTTP2SMS_LOG_LEVEL": "info"}


async def group(db: Path | str, started: list[ServerProcess], processes: int = 2
                ) -> tuple[ServerProcess, list[int]]:
    """A `serve --processes N` once every process listens, and the pids of its processes."""
    server = await ServerProcess.start(db, env=INFO, args=["--processes", str(processes)])
    started.append(server)
    line = await server.wait_event("processes_ready", 30)
    pids = json.loads(line)["pids"]
    assert len(pids) == processes
    return server, pids


async def send_many(server: ServerProcess, count: int) -> list[int]:
    """`count` sends, each on a connection of its own (the kernel spreads connections)."""
    connector = aiohttp.TCPConnector(force_close=True, limit=16)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(n: int) -> int:
            async with session.get(server.send_url, params=demo_params(
                    to=f"+336{n:08d}", contentType="application/json")) as resp:
                return int(json.loads(await resp.text())["status"])

        return list(await asyncio.gather(*(one(n) for n in range(count))))


def alive(pid: int) -> bool:
    """Running: not gone, and not a zombie waiting for a parent that does not reap it."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


async def test_sends_spread_on_the_processes_and_sigterm_stops_them_all(
        tmp_path: Path) -> None:
    await spread_and_stop(tmp_path / "store.sqlite3")


async def test_sends_spread_on_the_processes_on_postgresql(postgres_url: str) -> None:
    await spread_and_stop(postgres_url)


async def spread_and_stop(db: Path | str) -> None:
    """200 sends on connections of their own: all charged, both processes served some;
    SIGTERM stops both and the delivery worker."""
    await prepare_store(db, credits=1000)
    async with servers() as started:
        server, pids = await group(db, started)
        statuses = await send_many(server, 200)
        assert statuses == [100] * 200
        (worker_line,) = server.events("delivery_worker_started")
        worker_pid = json.loads(worker_line)["pid"]
        assert await server.stop() == 0
        # Each process says what it served when it stops: both served, 200 in all.
        served = [json.loads(line)["send_requests"] for line in server.events("stopped")]
        assert len(served) == 2 and sum(served) == 200 and min(served) > 0, served
        assert json.loads(server.events("processes_stopped")[0])["codes"] == [0, 0]
        assert not any(alive(pid) for pid in [*pids, worker_pid])
    (count,) = dbrows.query(str(db), "SELECT COUNT(*) AS n FROM messages")
    assert count["n"] == 200
    totals, _ = await store_totals(db)
    ledger_identity(totals)


async def test_a_process_that_dies_is_started_again(tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite3"
    await prepare_store(db, credits=1000)
    async with servers() as started:
        server, pids = await group(db, started)
        os.kill(pids[1], signal.SIGKILL)
        line = await server.wait_event("process_exited", 10)
        assert json.loads(line)["pid"] == pids[1]

        async def restarted() -> bool:
            return len(server.events("process_started")) == 3 and \
                len(server.events("listening")) == 3
        await wait_for(restarted, timeout=30, what="the process to start again")
        assert await send_many(server, 50) == [100] * 50
        assert await server.stop() == 0


async def test_a_process_that_cannot_listen_stops_the_group(tmp_path: Path) -> None:
    """The port taken by a socket without SO_REUSEPORT: no process can listen, and the
    supervisor stops with status 1 rather than start them again for ever."""
    db = tmp_path / "store.sqlite3"
    await prepare_store(db)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with servers() as started:
            server = await ServerProcess.start(db, env=INFO, port=port, wait_ready=False,
                                               args=["--processes", "2"])
            started.append(server)
            assert await server.wait_exit(60) == 1
            assert server.events("processes_failed")
            assert "cannot listen" in server.log


async def test_the_processes_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    """SIGKILL to the supervisor: each process sees its standard input close and stops as
    on SIGTERM, and takes its delivery worker with it; none is left listening."""
    db = tmp_path / "store.sqlite3"
    await prepare_store(db, credits=1000)
    async with servers() as started:
        server, pids = await group(db, started)
        (worker_line,) = server.events("delivery_worker_started")
        everyone = [*pids, json.loads(worker_line)["pid"]]
        server.proc.kill()
        await server.wait_exit(10)

        async def all_gone() -> bool:
            return not any(alive(pid) for pid in everyone)
        await wait_for(all_gone, timeout=30, what="the processes to stop")
