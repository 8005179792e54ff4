"""`open_store`: a URL or a bare path, the [store] settings, a role."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.config import StoreConfig
from gateway.store import StoreUnavailable, open_store, parse_url, shown
from tests.cli_in_process import invoke


@pytest.mark.parametrize(("url", "parsed"), [
    ("var/gateway.sqlite3", ("sqlite", "var/gateway.sqlite3")),
    ("/srv/gateway.sqlite3", ("sqlite", "/srv/gateway.sqlite3")),
    ("sqlite:///var/gateway.sqlite3", ("sqlite", "var/gateway.sqlite3")),
    ("sqlite:////srv/gateway.sqlite3", ("sqlite", "/srv/gateway.sqlite3")),
    ("sqlite:///:memory:", ("sqlite", ":memory:")),
    ("SQLite:///g.db", ("sqlite", "g.db")),
    ("postgresql://u@db/gateway", ("postgresql", "u@db/gateway")),
])
def test_urls_and_bare_paths(url: str, parsed: tuple[str, str]) -> None:
    assert parse_url(url) == parsed


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite://host/g.db"])
def test_a_sqlite_url_without_a_file_is_refused(url: str) -> None:
    with pytest.raises(StoreUnavailable, match="sqlite URL"):
        parse_url(url)


def test_a_scheme_without_a_backend_is_refused() -> None:
    with pytest.raises(StoreUnavailable, match="no store backend for 'mysql'"):
        open_store("mysql://u@db/gateway", "send")


async def test_the_same_database_by_path_url_or_settings(tmp_path: Path) -> None:
    path = tmp_path / "g.sqlite3"
    first = open_store(path, "cli")
    await first.open()
    try:
        await first.create_account("acme", 100, at=1.0)
    finally:
        await first.close()
    for where in (f"sqlite:///{path}", StoreConfig(str(path), busy_timeout_seconds=1.0)):
        store = open_store(where, "send")
        await store.open()
        try:
            assert await store.list_accounts() == ["acme"]
        finally:
            await store.close()


def test_store_url_wins_over_path_and_passwords_are_not_shown() -> None:
    assert StoreConfig("a.sqlite3").location == "a.sqlite3"
    assert StoreConfig("a.sqlite3", url="postgresql://g@db/x").location == "postgresql://g@db/x"
    assert shown("postgresql://gw:s3cret@db:5432/x") == "postgresql://gw:***@db:5432/x"
    assert shown("postgresql://gw@db/x") == "postgresql://gw@db/x"
    assert shown("var/g.sqlite3") == "var/g.sqlite3"


async def test_postgresql_by_url_or_settings(postgres_url: str) -> None:
    first = open_store(postgres_url, "cli")
    await first.open()
    try:
        await first.create_account("acme", 100, at=1.0)
    finally:
        await first.close()
    store = open_store(StoreConfig("ignored.sqlite3", busy_timeout_seconds=1.0,
                                   url=postgres_url), "send")
    await store.open()
    try:
        assert await store.list_accounts() == ["acme"]
    finally:
        await store.close()


async def test_the_cli_runs_on_postgresql_with_db_or_the_environment(postgres_url: str) -> None:
    made = await asyncio.to_thread(invoke, "--db", postgres_url, "--json", "account",
                                   "create", "sms-pg-1", "--credits", "200")
    assert made.exit_code == 0, made.output
    listed = await asyncio.to_thread(invoke, "--json", "account", "list",
                                     env={"HTTP2SMS_STORE_URL": postgres_url})
    assert listed.exit_code == 0, listed.output
    assert "sms-pg-1" in listed.stdout
