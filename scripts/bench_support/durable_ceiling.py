"""The durable ceiling: the bare aiohttp app of ceiling.py, plus one SQLite row per request.

Each request's row (login, recipient, message) is on disk before its answer, as a send is in
the gateway: rows wait for a group commit, one transaction of every row that arrived while the
previous one ran, in WAL mode with `synchronous=FULL`, on the event loop's thread. Besides
reading the query string, nothing else: no authentication, no rules, no credits, no delivery.
So gateway/durable ceiling shows what the gateway's own work costs on top of reading a request
and storing it durably on this machine and disk.
Run by `scripts/bench --durable-ceiling`: `python durable_ceiling.py PORT DB`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import time
from collections.abc import AsyncIterator

from aiohttp import web
from serve import run

PATH = "/cgi-bin/sms/http2sms.cgi"
ROWS: web.AppKey[Rows] = web.AppKey("rows")


class Rows:
    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS sends (id INTEGER PRIMARY KEY, "
                        "login TEXT, receiver TEXT, body TEXT, created_at REAL)")
        self.waiting: list[tuple[tuple[str, str, str, float], asyncio.Future[int]]] = []
        self.wake = asyncio.Event()

    async def store(self, login: str, receiver: str, body: str) -> int:
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.waiting.append(((login, receiver, body, time.time()), done))
        self.wake.set()
        return await done

    async def commit_forever(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.waiting = self.waiting, []
            try:
                self.db.execute("BEGIN IMMEDIATE")
                first = self.db.execute(
                    "SELECT COALESCE(MAX(id), 0) + 1 FROM sends").fetchone()[0]
                self.db.executemany(
                    "INSERT INTO sends (id, login, receiver, body, created_at) "
                    "VALUES (?,?,?,?,?)", [(first + n, *row) for n, (row, _) in enumerate(batch)])
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:
                # The batch's requests fail (HTTP 500, counted by wrk) and the next batch
                # starts clean: a run must not hang on one bad commit.
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for n, (_, done) in enumerate(batch):
                if not done.done():  # its request may have been cancelled meanwhile
                    done.set_result(first + n)
            # Let the answered requests' connections bring the next batch in.
            await asyncio.sleep(0)


async def answer(request: web.Request) -> web.Response:
    query = request.query
    row_id = await request.app[ROWS].store(query.get("login", ""), query.get("to", ""),
                                           query.get("message", ""))
    return web.Response(body=b"OK\n1000\n%d" % row_id, content_type="text/plain",
                        charset="utf-8")


def main(port: int, path: str) -> None:
    app = web.Application()

    async def start(app: web.Application) -> AsyncIterator[None]:
        app[ROWS] = Rows(path)
        committer = asyncio.create_task(app[ROWS].commit_forever())
        yield
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        app[ROWS].db.close()

    app.cleanup_ctx.append(start)
    app.router.add_route("GET", PATH, answer)
    run(app, port)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
