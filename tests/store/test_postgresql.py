"""The PostgreSQL backend's own details, beyond the contract (tests/store/test_contract.py)."""

from __future__ import annotations

import asyncio
from importlib import resources

import asyncpg
import pytest

from gateway.store import StoreUnavailable, open_store
from tests import postgres


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


def test_every_sqlite_migration_has_its_postgresql_dialect() -> None:
    """A migration added for SQLite alone would leave PostgreSQL stores a schema behind:
    each number has its file in both folders."""
    def numbers(package: str) -> list[int]:
        folder = resources.files(package) / "migrations"
        return sorted(int(item.name.split("_", 1)[0]) for item in folder.iterdir()
                      if item.name.endswith(".sql"))

    assert numbers("gateway.store.postgresql") == numbers("gateway.store")
