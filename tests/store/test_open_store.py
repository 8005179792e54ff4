"""`open_store`: a URL or a bare path, the [store] settings, a role."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import StoreConfig
from gateway.store import StoreUnavailable, open_store, parse_url


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
    with pytest.raises(ValueError, match="sqlite URL"):
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
