"""The throwaway PostgreSQL cluster of the tests (scripts/postgres), and fresh databases on it.

Started once per pytest session, the first time a test asks for a PostgreSQL database, and
stopped at the session's end; should pytest die without cleaning up, the watcher that
scripts/postgres leaves behind stops it when this process is gone. HTTP2SMS_TEST_POSTGRES=0
skips the PostgreSQL half of the tests (for a developer without PostgreSQL);
HTTP2SMS_TEST_POSTGRES_URL names a server of one's own instead (its `postgres` database is
used to create and drop the tests' databases).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "postgres"
ENABLED = os.environ.get("HTTP2SMS_TEST_POSTGRES", "1") != "0"
_names = itertools.count(1)


class Cluster:
    def __init__(self) -> None:
        self.url: str | None = os.environ.get("HTTP2SMS_TEST_POSTGRES_URL")
        self._folder: str | None = None

    def start(self) -> str:
        if self.url is None:
            self._folder = tempfile.mkdtemp(prefix="h2s-pg.")
            done = subprocess.run([str(SCRIPT), "start", self._folder, str(os.getpid())],
                                  capture_output=True, text=True, timeout=600, check=False)
            if done.returncode:
                raise RuntimeError(f"scripts/postgres failed: {done.stderr}")
            self.url = done.stdout.strip().splitlines()[-1]
        return self.url

    def stop(self) -> None:
        if self._folder is not None:
            subprocess.run([str(SCRIPT), "stop", self._folder], timeout=60, check=False)
            self._folder = None


def database_url(server: str, name: str) -> str:
    """`server`'s URL with `name` as its database."""
    parts = urlsplit(server)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def fresh_database(server: str, done: list[str]) -> str:
    """A new empty database on `server`, by URL; each test gets its own.

    The databases of tests that ended (`done`) are dropped first, here rather than at
    their test's end: fixtures that stop the gateway (aiohttp's client) may be torn down
    after the database's, and a database dropped under a running gateway fills the log
    with its errors.
    """
    name = f"h2s_{os.getpid()}_{next(_names)}"
    conn = await asyncpg.connect(server)
    try:
        while done:
            old = urlsplit(done.pop()).path.lstrip("/")
            await conn.execute(f'DROP DATABASE IF EXISTS "{old}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await conn.close()
    return database_url(server, name)


def skip_unless_enabled() -> None:
    if not ENABLED:
        pytest.skip("PostgreSQL tests are off (HTTP2SMS_TEST_POSTGRES=0)")
