"""The store's files are the gateway user's alone (issue 19, point 15): it holds password
hashes, callback URLs with their secrets, message texts and phone numbers."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import aiohttp

from tests.serverproc import ServerProcess, demo_params, prepare_store, servers, wait_for


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_new_store_is_created_private_whatever_the_umask(tmp_path: Path) -> None:
    db = tmp_path / "fresh" / "var" / "gateway.sqlite3"
    old = os.umask(0o022)  # the usual umask, inherited by the gateway
    try:
        async with servers() as started:
            server = await ServerProcess.start(db)
            started.append(server)
            # Files SQLite makes once the store is used: the log and its index.
            async with aiohttp.ClientSession() as session, \
                    session.get(server.base + "/readyz") as resp:
                assert resp.status in (200, 503)

            async def wal_files() -> bool:
                return Path(f"{db}-wal").exists() and Path(f"{db}-shm").exists()
            await wait_for(wal_files, timeout=10, what="the -wal and -shm files")
            assert mode(db.parent) == 0o700
            for each in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                assert mode(each) == 0o600, (each, oct(mode(each)))
            for lock in db.parent.glob("*.lock"):
                assert mode(lock) == 0o600, lock
            assert not server.events("store_open_to_others")
            assert await server.stop() == 0
    finally:
        os.umask(old)


async def test_a_store_readable_by_others_is_named_in_the_log_at_start(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    db = folder / "gateway.sqlite3"
    await prepare_store(db, credits=5)
    db.chmod(0o644)
    async with servers() as started:
        server = await ServerProcess.start(db)
        started.append(server)
        async with aiohttp.ClientSession() as session, \
                session.get(server.send_url, params=demo_params()) as resp:
            assert (await resp.text()).startswith("OK")
        assert await server.stop() == 0
    warned = {(event["path"], event["mode"])
              for event in map(json.loads, server.events("store_open_to_others"))}
    assert (str(folder), "0755") in warned and (str(db), "0644") in warned
    # SQLite gave the -wal the database's mode: named too when it was there at start.
    assert all(mode_text in ("0755", "0644") for _, mode_text in warned)
