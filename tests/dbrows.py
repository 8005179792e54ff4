"""Rows read (or written) behind the gateway's back, on either backend, for tests that check
what the store holds: a bare path is an SQLite file, a postgresql:// URL a database.

Synchronous, as the checks polled in lambdas are: on PostgreSQL the query runs on an event
loop of its own in a thread, so it may be called from a test's running loop. Parameters
are written `?`, as sqlite3 wants them; they become `$1, $2...` for PostgreSQL.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any

import asyncpg

from gateway.store import parse_url


def _numbered(sql: str) -> str:
    counter = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


async def _postgres(url: str, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        return [dict(r) for r in await conn.fetch(_numbered(sql), *params)]
    finally:
        await conn.close()


def query(where: str, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """The rows of `sql` (or none for a statement without results), committed."""
    scheme, location = parse_url(where)
    if scheme == "sqlite":
        with closing(sqlite3.connect(location)) as db, db:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute(sql, params).fetchall()]
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _postgres(where, sql, params)).result()
