"""The store's write connection, and how a transaction takes SQLite's write lock.

A transaction of the busy paths (`transaction`: group commits, delivery updates, outbox
claims) runs on the event loop's own thread, start to finish, once the lock is taken. Its
statements are bounded batches (a few ms of SQL at most), so the loop is paused for no
longer than the commit itself. Why not in a thread: a thread has to win the GIL back from
the busy event loop after every statement, and CPython gives it back only every 5 ms
(`sys.getswitchinterval`). In `scripts/bench` a group commit, run in the writer's thread,
took 14 ms on average and held SQLite's lock all that time, so the two processes waited for
each other; run here, 4.5 ms, and 2,000 sends/s became 2,800 (p99 90 ms to 45 ms).

Transactions are still written as coroutines over a connection, like every other
transaction of the store: they get a connection (`Direct`) whose methods never suspend, so
the coroutine runs to its end in a single step (`_run_to_end`).

The write lock is waited for with short sleeps of the event loop (`transaction`): SQLite's
own busy handler sleeps up to 100 ms between tries, and would block the loop besides.

The other transactions (admin changes, migrations: rare, possibly long) keep to the
writer's thread, one trip per statement (`execute`...), so that a long one never stalls the
event loop.

Sends go first (`WriteTurn`): SQLite gives its lock to whoever tries first once it is free,
and the delivery worker, chaining its transactions, often won against a send process
whose retries wait for a busy event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from queue import SimpleQueue
from typing import Any, Literal, Protocol, TypeVar

T = TypeVar("T")
# Who goes first for the write lock: see WriteTurn.
Turn = Literal["first", "yield"]

# Pauses between two tries to take the write lock from another process.
LOCK_RETRY_FIRST = 0.0001
LOCK_RETRY_MAX = 0.001
# The same from the event loop: its timers are at best to the millisecond (uvloop).
LOOP_RETRY_MAX = 0.002


class Conn(Protocol):
    """What transactions use of a connection: aiosqlite's shape, in either thread."""

    @property
    def in_transaction(self) -> bool: ...
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor: ...
    async def executemany(self, sql: str,
                          params: Iterable[Sequence[Any]]) -> sqlite3.Cursor: ...
    async def execute_fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]: ...


def _try_begin(conn: sqlite3.Connection, deadline: float) -> bool:
    """BEGIN IMMEDIATE once: True if the write lock is ours, False if another process holds
    it and `deadline` (monotonic) has not passed; any other failure, or a late one, raises."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        return True
    except sqlite3.OperationalError as exc:
        if not _busy(exc) or time.monotonic() >= deadline:
            raise
    return False


def begin(conn: sqlite3.Connection, wait: float) -> None:
    """BEGIN IMMEDIATE, waiting up to `wait` seconds for another process's write lock.

    The thread sleeps between tries; `Writer.transaction` sleeps the event loop instead."""
    deadline = time.monotonic() + wait
    pause = LOCK_RETRY_FIRST
    while not _try_begin(conn, deadline):
        time.sleep(pause)
        pause = min(pause * 2, LOCK_RETRY_MAX)


class WriteTurn:
    """A flag the send process raises while it waits for SQLite's write lock.

    Under scripts/bench a group commit that waited long had waited through 2.6 of the
    delivery worker's transactions in a row. With the worker starting none while the flag
    is up, a commit waits for one at most: the commits' p99 wait went from about 20 ms to
    11 ms, the sends' p99 from 41-43 ms to 31-35 ms and sends/s from 2,940-3,110 to
    3,380-3,460 (scripts/bench --duration 8 --warmup 3 --prefill 0); callbacks/s went from
    4,450-5,230 to 4,000-4,770, still more than two per send.

    The flag is a lock (flock) on a file next to the store: the kernel lowers it if the
    process holding it dies. A process that yields waits for it no longer than its own
    busy timeout, so a stuck flag slows the worker and never stops it.
    """

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def raise_flag(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # another sender has it up already
        return True

    def lower_flag(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def is_up(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return False

    def close(self) -> None:
        os.close(self._fd)


def _busy(exc: sqlite3.OperationalError) -> bool:
    return exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY  # or an extended code


class Direct:
    """The connection as a transaction running at once (`Writer.transaction`) sees it."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @property
    def in_transaction(self) -> bool:
        return self._conn.in_transaction

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, params)

    async def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return self._conn.executemany(sql, params)

    async def execute_fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._conn.execute(sql, params).fetchall()


def _run_to_end(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (it only awaits `Direct`) in one step."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    coroutine.close()
    raise RuntimeError("a store transaction awaited something other than its connection")


class Writer:
    def __init__(self, path: str, *, busy_timeout: float, synchronous: str,
                 turn: Turn | None = None) -> None:
        """`turn`: "first" raises the `WriteTurn` flag while waiting for the lock (the send
        process), "yield" waits while it is up (the delivery worker); None ignores it."""
        self.path = path
        self.busy_timeout = busy_timeout
        self._synchronous = synchronous
        self._turn_role = turn if path != ":memory:" else None
        self._turn: WriteTurn | None = None
        self._jobs: SimpleQueue[tuple[asyncio.Future[Any], Callable[[], Any]] | None] = \
            SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        if self._turn_role is not None:
            self._turn = WriteTurn(self.path + "-write-turn.lock")
        self._thread = threading.Thread(target=self._serve, name="store-writer", daemon=True)
        self._thread.start()
        try:
            await self._call(self._connect)
        except BaseException:
            await self.close()
            raise

    def _connect(self) -> None:
        # 256 prepared statements kept, not 128: the store's multi-row statements take a few
        # texts each (see sqlite.py, `_chunks`), and they must all stay in.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               cached_statements=256)
        try:
            # SQLite waits for the lock only while migrating; afterwards `begin` does.
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            # Before WAL, which writes the file's first page: a new store (an empty file)
            # is created with incremental auto-vacuum, so the purge can give its free pages
            # back while in use. An existing store is left as it is (only a VACUUM could
            # change it: see docs/retention.md), and not even read here, which another
            # process's lock could make fail.
            if self.path != ":memory:" and _empty(self.path):
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchall()
            if mode and mode[0][0] != "wal" and self.path != ":memory:":
                raise sqlite3.OperationalError(f"cannot switch to WAL mode ({mode[0][0]})")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    async def close(self) -> None:
        if self._turn is not None:
            self._turn.close()
            self._turn = None
        if self._thread is None:
            return
        conn = self._conn

        def close() -> None:
            if conn is not None:
                conn.close()

        try:
            await self._call(close)
        finally:
            self._jobs.put(None)
            self._conn = None
            self._thread = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            future, call = job
            try:
                result = call()
            except BaseException as exc:
                _settle(future, None, exc)
            else:
                _settle(future, result, None)

    async def _call(self, call: Callable[[], T]) -> T:
        if self._thread is None:
            raise sqlite3.ProgrammingError("the store's writer is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.put((future, call))
        return await future

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("the store's writer is closed")
        return self._conn

    async def run(self, call: Callable[[sqlite3.Connection], T]) -> T:
        return await self._call(lambda: call(self._connection()))

    async def transaction(self, body: Callable[[Conn], Coroutine[Any, Any, T]], *,
                          yield_for: float | None = None) -> T:
        """BEGIN IMMEDIATE, `body`, COMMIT (ROLLBACK on error), on the event loop's thread.

        Only the wait for the lock suspends; from BEGIN to COMMIT nothing does, so a
        cancelled caller never leaves half a transaction behind.

        `yield_for`: how long a yielding process gives way to the sends' raised flag
        before it competes for the lock like anyone (default: its whole busy timeout).
        Under a steady load of sends the flag is up nearly all the time; a background
        job that gave way for good would never run (the retention purge did not).
        """
        conn = self._connection()
        deadline = time.monotonic() + self.busy_timeout
        give_way_until = deadline if yield_for is None \
            else min(deadline, time.monotonic() + yield_for)
        pause = LOCK_RETRY_FIRST
        turn = self._turn
        flag_up = False
        try:
            while True:
                # A send waiting for the lock (flag up): let it have it, up to our deadline.
                yielding = turn is not None and self._turn_role == "yield" \
                    and time.monotonic() < give_way_until and turn.is_up()
                if not yielding:
                    if _try_begin(conn, deadline):
                        break
                    if turn is not None and self._turn_role == "first" and not flag_up:
                        flag_up = turn.raise_flag()
                await asyncio.sleep(pause)
                pause = min(pause * 2, LOOP_RETRY_MAX)
        finally:
            if flag_up and turn is not None:
                turn.lower_flag()
        try:
            result = _run_to_end(body(Direct(conn)))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def give_way(self, seconds: float) -> None:
        """Wait while the sends' flag is up, `seconds` at most: a background job (the
        retention purge) calls it before it takes the connection, so that its wait holds
        up none of this process's own transactions."""
        turn = self._turn
        if turn is None or self._turn_role != "yield":
            return
        until = time.monotonic() + seconds
        pause = LOCK_RETRY_FIRST
        while time.monotonic() < until and turn.is_up():
            await asyncio.sleep(pause)
            pause = min(pause * 2, LOOP_RETRY_MAX)

    # -- from the event loop, a statement at a time (see the module docstring) --------------

    @property
    def in_transaction(self) -> bool:
        return self._conn is not None and self._conn.in_transaction

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return await self.run(lambda conn: conn.execute(sql, params))

    async def executemany(self, sql: str, params: Iterable[Sequence[Any]]) -> sqlite3.Cursor:
        return await self.run(lambda conn: conn.executemany(sql, params))

    async def execute_fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await self.run(lambda conn: conn.execute(sql, params).fetchall())

    async def executescript(self, script: str) -> None:
        await self.run(lambda conn: conn.executescript(script))


def _empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:
        return True  # not there yet: SQLite creates it


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    def settle() -> None:
        if future.done():
            return  # the caller was cancelled; the work is done all the same
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is waiting
        future.get_loop().call_soon_threadsafe(settle)
