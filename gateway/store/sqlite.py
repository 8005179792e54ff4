"""The SQLite backend: the embedded default store, one file in WAL mode.

One writer connection serialises every write transaction (SQLite allows one writer anyway);
a second connection serves reads so they never queue behind a commit's fsync. The send path
writes in batches: `commit_sends` takes many requests and commits them together (group
commit), which is what makes durable sends cheap.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import stat
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager, suppress
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

import aiosqlite
import structlog

from gateway import retention
from gateway.records import (
    UNSET,
    Account,
    AdminToken,
    AppliedUpdates,
    ClaimBounds,
    ConsoleSession,
    ConsoleUser,
    IncomingMessage,
    IncomingPart,
    LedgerEntry,
    Message,
    MessageEvent,
    MessageFilter,
    MessageStats,
    OperatorReport,
    OutboxAttempt,
    OutboxItem,
    OutboxResult,
    OutgoingMessage,
    PurgeStep,
    SendContext,
    SendOrder,
    SendOutcome,
    SentMessage,
    StateUpdate,
    StoreStats,
    User,
    UserChanges,
)
from gateway.retention import AccountRetention
from gateway.store import (
    Conflict,
    Counters,
    Held,
    NotFound,
    OverCreditLimit,
    PurgedRows,
    Role,
    StoreUnavailable,
    Taken,
    Topic,
    rules,
)
from gateway.store.rows import CLAIMABLE as _CLAIMABLE
from gateway.store.rows import DELIVERED, INCOMING_LOOKBACK
from gateway.store.rows import MESSAGE_COLUMNS as _MESSAGE_COLUMNS
from gateway.store.rows import OUTGOING_COLUMNS as _OUTGOING_COLUMNS
from gateway.store.rows import SPENDABLE as _SPENDABLE
from gateway.store.rows import USER_COLUMNS as _USER_COLUMNS
from gateway.store.rows import message as _message
from gateway.store.rows import outgoing as _outgoing
from gateway.store.rows import user as _user
from gateway.store.writer import Conn, Turn, Writer
from gateway.store.writer import begin as begin_write

# Added to a query on messages of one unsettled state: SQLite only uses the partial index
# `messages_pending` (WHERE state <> 'final') when the query repeats its condition. Without
# it, these queries read every message ever sent: with a million stored, the delivery
# worker spent more than a core on them.
_PENDING = "AND state <> 'final'"

# When a message a dispatcher may claim (`_CLAIMABLE`) is due (see `messages_due_*`,
# migration 0004: SQLite uses those indexes only for these very expressions).
_DUE_DEFERRED = "max(deferred_until, claimed_until)"


def _part_rows(sent: Sequence[SentMessage]) -> list[tuple[str, int, int]]:
    return [(reference, m.message_id, part)
            for m in sent for part, reference in enumerate(m.references, 1)]


T = TypeVar("T")


class _Reads(Protocol):
    """What a lookup uses of a connection: a transaction's `Conn`, or the aiosqlite read
    connection (typed with its own cursors and awaitables, so not a `Conn`)."""

    def execute_fetchall(self, sql: str, params: Sequence[Any] = ...,
                         /) -> Awaitable[Iterable[Any]]: ...


def _marks(n: int) -> str:
    return ",".join("?" * n)


# sqlite3 keeps the statements it prepared, by their text (`Writer`: the last 256). A
# multi-row statement written for each batch size has a text per size, so it was prepared
# again on nearly every run (1,119 texts for batches of 1 to 139 in tests/test_store.py).
# Preparing a row of VALUES costs 2.5-4 µs, as much as running it, inside the write lock.
# Batches are therefore cut in power-of-two chunks and IN lists padded to a power of two
# (74 texts): under scripts/bench the delivery worker went from 3,800-4,000 callbacks/s to
# 4,200-5,100 on the same CPU, and peak RSS from 163 MB to 143 MB.
_CHUNK_MAX = 128
_IN_MAX = 16384


def _chunks(rows: Sequence[T], most: int) -> Iterator[Sequence[T]]:
    """`rows` in runs whose lengths are powers of two, the longest first, none over `most`."""
    top = 1 << (min(most, _CHUNK_MAX).bit_length() - 1)
    start = 0
    while start < len(rows):
        size = min(top, 1 << ((len(rows) - start).bit_length() - 1))
        yield rows[start:start + size]
        start += size


def _in(values: Sequence[Any]) -> tuple[str, list[Any]]:
    """Marks and parameters of `IN (...)` for `values`, padded to a power of two with the
    last value: a repeated value changes nothing in an IN list. Lists longer than `_IN_MAX`
    (batch sizes set far above the defaults) are left as they are, within SQLite's limit."""
    if not values:
        return "", []
    size = 1 << (len(values) - 1).bit_length()
    if size > _IN_MAX:
        size = len(values)
    return _marks(size), [*values, *[values[-1]] * (size - len(values))]


def _unavailable(exc: BaseException) -> bool:
    """The database, not the request, is at fault: full, locked, read-only, broken.

    Integrity errors are the caller's (a duplicate), programming errors are ours.
    """
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.IntegrityError | sqlite3.ProgrammingError)


# SQLite's default limit of parameters in one statement (since 3.32).
_MAX_VARIABLES = 32766


async def _insert(db: Conn, head: str, row: str, rows: Sequence[Sequence[Any]]) -> None:
    """`head VALUES row, row, ...`: many rows per statement (a few statements, see
    `_chunks`) rather than executemany.

    executemany runs the statement once per row, and the sqlite3 module lets go of the GIL
    and takes it back around each run: from a thread, under scripts/bench, a 1,000-row
    executemany held SQLite's write lock for about 100 ms. One statement, run once, is
    also the cheaper one on the event loop's thread (see writer.py).
    """
    if not rows:
        return
    for chunk in _chunks(rows, _MAX_VARIABLES // max(1, row.count("?"))):
        await db.execute(f"{head} VALUES {','.join([row] * len(chunk))}",
                         [value for each in chunk for value in each])


async def _update(db: Conn, sql: str, row: str, rows: Sequence[Sequence[Any]]) -> None:
    """`sql` is an UPDATE ... FROM (VALUES {}) AS v ...: like `_insert`, a few runs for all
    the rows.

    Each target row must appear once in `rows`: with two, SQLite picks either.
    """
    if not rows:
        return
    for chunk in _chunks(rows, _MAX_VARIABLES // max(1, row.count("?"))):
        await db.execute(sql.format(",".join([row] * len(chunk))),
                         [value for each in chunk for value in each])

# A table's next id: past its rows and past every id the purge deleted. SQLite gives a
# rowid table MAX(id) + 1: once the purge deleted every row, ids would start again at 1 (an
# old id naming a new message, and the purge's erasure, which walks on from the last id it
# erased, never reaching the new ones).
_DELETED_THROUGH = "{table}_deleted_through"
_NEXT_ID = ("SELECT max(COALESCE(MAX(id), 0), COALESCE((SELECT CAST(value AS INTEGER) "
            "FROM meta WHERE key = '" + _DELETED_THROUGH + "'), 0)) + 1 FROM {table}")


async def _keep_incoming(db: Conn, owner: tuple[int, str], reference: str, sender: str,
                         receiver: str, body: str, at: float) -> int:
    cursor = await db.execute(
        "INSERT INTO incoming_messages (id, account_id, reference, sender, receiver, body, "
        f"tag, created_at) VALUES (({_NEXT_ID.format(table='incoming_messages')}), "
        "?, ?, ?, ?, ?, ?, ?)", (owner[0], reference, sender, receiver, body, owner[1], at))
    return int(cursor.lastrowid or 0)


async def _add_part(db: Conn, part: IncomingPart, owner: tuple[int, str] | None) -> int | None:
    """Keep one part; keep its message once whole (see DeliveryStore.add_incoming_parts)."""
    key = (part.sender, part.receiver, part.group, part.total)
    where = "sender = ? AND receiver = ? AND group_ref = ? AND total = ?"
    found = await db.execute_fetchall(
        f"SELECT reference, incoming_id FROM incoming_parts WHERE {where} AND seq = ?",
        (*key, part.seq))
    if found and found[0][0] == part.reference:  # sent again
        return None if found[0][1] is None else int(found[0][1])
    if found:  # another message took up the same reference: the older one's parts go
        await db.execute(f"DELETE FROM incoming_parts WHERE {where}", key)
    await db.execute(
        "INSERT INTO incoming_parts (sender, receiver, group_ref, total, seq, reference, body, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (*key, part.seq, part.reference,
                                                        part.body, part.created_at))
    rows = await db.execute_fetchall(
        f"SELECT seq, body, reference FROM incoming_parts WHERE {where} "
        "AND incoming_id IS NULL ORDER BY seq", key)
    text = rules.whole_text(part.total, [(int(r[0]), r[1]) for r in rows])
    if text is None:
        return None
    new_id = 0 if owner is None else await _keep_incoming(
        db, owner, rows[0][2], part.sender, part.receiver, text, part.created_at)
    await db.execute(f"UPDATE incoming_parts SET incoming_id = ? WHERE {where} "
                     "AND incoming_id IS NULL", (new_id, *key))
    return new_id


async def _check_integers(db: Conn, plan: rules.UpdatePlan) -> None:
    """Refunds stay within `credits.MAX_CREDITS` (see `rules.top_up`); should one ever
    overflow SQLite's integers, which silently become floats, its transaction fails
    rather than store an inexact balance."""
    accounts, users = plan.account_refunds(), plan.quota_refunds()
    marks, params = _in(sorted(accounts))
    user_marks, user_params = _in(sorted(users))
    rows = await db.execute_fetchall(
        f"SELECT 'account', id FROM accounts WHERE id IN ({marks or 'NULL'}) "
        "AND typeof(balance) <> 'integer' "
        f"UNION ALL SELECT 'user', id FROM users WHERE id IN ({user_marks or 'NULL'}) "
        "AND typeof(quota_left) <> 'integer'", [*params, *user_params])
    if rows:
        # Which ones: a store hit by an old overflow holds a balance that is no integer,
        # and every refund to it fails until an operator corrects it.
        named = ", ".join(f"{kind} id {row_id}" for kind, row_id in rows)
        raise OverCreditLimit(f"refund: a balance or quota would overflow the store, or is "
                              f"no integer ({named})")


# How many due outbox items a claim looks at, per item it may take (see claim_outbox).
CLAIM_WINDOW = 4


log = structlog.get_logger("gateway.store")

# The store holds password hashes, callback URLs with their secrets, message texts (one-time
# codes) and phone numbers: the folder the gateway creates and the files in it are its
# user's alone. SQLite gives the -wal, -shm and journal files the database file's mode.
FOLDER_MODE = 0o700
FILE_MODE = 0o600


def create_private(path: Path) -> None:
    """The store's folder (0700) and an empty database file (0600), unless they exist: an
    empty file is an empty SQLite database. Modes of existing ones are left as they are
    (see `exposed`)."""
    with suppress(FileExistsError):
        # parents=True: folders above get the default mode, the store's own FOLDER_MODE.
        path.parent.mkdir(mode=FOLDER_MODE, parents=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)


def exposed(path: Path) -> list[tuple[str, int]]:
    """The store's folder and files that its group or others may access: (path, mode)."""
    found = []
    for each in (path.parent, path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        try:
            mode = stat.S_IMODE(each.stat().st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            found.append((str(each), mode))
    return found


# How each role tunes the backend (see `gateway.store.open_store`): (write turn, sync
# each commit). The send process goes first for the write lock and the delivery worker
# yields to it (`writer.WriteTurn`). The worker does not fsync its own commits: each one
# would hold the write lock that sends wait for (about 1 ms). The send process's next
# commit syncs the shared log with the worker's in it; a power cut before that loses
# only records that are redone: a report not stored leaves its message to be resumed, a
# callback result not stored means the callback goes again (both are at least once).
_ROLES: dict[Role, tuple[Turn | None, bool]] = {
    "send": ("first", True),
    "delivery": ("yield", False),
    "cli": (None, True),
}


class SQLiteStore:
    # One writer: a second batch in flight would only wait for the first's turn.
    concurrent_commits = 1

    def __init__(self, path: str | Path, *, role: Role = "cli",
                 busy_timeout: float | None = None) -> None:
        """Built by `gateway.store.open_store`; `busy_timeout` None: 10 seconds."""
        write_turn, sync_each_commit = _ROLES[role]
        if busy_timeout is None:
            busy_timeout = 10.0
        self._write_turn = write_turn
        # The gateway's start (the send role) says when the store is open to others.
        self._warn_exposed = role == "send"
        self.path = str(path)
        self._synchronous = "FULL" if sync_each_commit else "NORMAL"
        # Seconds a statement waits for another process's lock before failing (locked).
        self._busy_ms = max(0, int(busy_timeout * 1000))
        self._writer: Writer | None = None
        self._reader: aiosqlite.Connection | None = None
        # One transaction at a time on the writer connection: statements of two
        # transactions must never interleave on it.
        self._write_lock: Any = None
        # Send settings by (account, login), valid for one settings version of their
        # account: a read per request would cost a thread round trip on the send path.
        self._contexts: dict[tuple[str, str], SendContext] = {}
        # The keys of the contexts cached per account id, and the newest settings version
        # seen per account id: a newer one drops that account's contexts, and only them.
        self._keys_by_account: dict[int, set[tuple[str, str]]] = {}
        self._versions: dict[int, int] = {}

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        self._write_lock = asyncio.Lock()
        try:
            if self.path != ":memory:":
                create_private(Path(self.path))
        except OSError as exc:
            raise StoreUnavailable(f"cannot open the store {self.path}: {exc}") from exc
        try:
            self._writer = Writer(self.path, busy_timeout=self._busy_ms / 1000,
                                  synchronous=self._synchronous, turn=self._write_turn)
            await self._writer.open()
            await self._migrate()
            # From here on the writer waits for the lock in `begin`, not in SQLite.
            await self._writer.execute("PRAGMA busy_timeout = 0")
            self._reader = await self._connect_reader()
        except sqlite3.Error as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open the store {self.path}: {exc}") from exc
        if self._warn_exposed and self.path != ":memory:":
            for where, mode in exposed(Path(self.path)):
                log.warning("store_open_to_others", path=where, mode=f"{mode:04o}",
                            fix=f"chmod {'700' if Path(where).is_dir() else '600'} {where}")

    async def _connect_reader(self) -> aiosqlite.Connection:
        """The read-only connection; the writer set up the file (WAL, migrations)."""
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            await conn.execute("PRAGMA query_only = ON")
        except BaseException:
            await conn.close()  # else its thread outlives the failed open
            raise
        return conn

    async def close(self) -> None:
        if self._reader is not None:
            with suppress(sqlite3.Error, ValueError):
                await self._reader.close()
        if self._writer is not None:
            with suppress(sqlite3.Error):
                await self._writer.close()
        self._reader = self._writer = None

    @asynccontextmanager
    async def exclusive(self, name: str, *, wait: bool = False,
                        shared: bool = False) -> AsyncIterator[Held]:
        """A lock on a file next to the store, `<path>-<name>.lock` (flock, LOCK_SH when
        `shared`): the kernel lets go of it when its holder dies, and never while it lives
        (it is never lost). In memory there is no one to share with."""
        if not name.replace("-", "").isalnum():
            raise ValueError(f"a lock name is letters, digits and dashes: {name!r}")
        if self.path == ":memory:":
            yield Held(name)
            return
        try:
            fd = os.open(f"{self.path}-{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
        except OSError as exc:
            raise StoreUnavailable(f"cannot lock {name!r} on {self.path}: {exc}") from exc
        try:
            while True:
                try:
                    fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not wait:
                        raise Taken(f"{name!r} is held by another process on the store "
                                    f"{self.path}") from None
                await asyncio.sleep(0.1)
            yield Held(name)
        finally:
            os.close(fd)

    @asynccontextmanager
    async def wake_ups(self, callbacks: Mapping[Topic, Callable[[], None]]
                       ) -> AsyncIterator[None]:
        """None: the processes of one machine poke each other, and poll."""
        yield

    async def _migrate(self) -> None:
        assert self._writer is not None
        await self._writer.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
            "name TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)")
        done = {row[0] for row in await self._writer.execute_fetchall(
            "SELECT version FROM schema_migrations")}
        folder = resources.files("gateway.store") / "migrations"
        scripts = sorted(item.name for item in folder.iterdir() if item.name.endswith(".sql"))
        for name in scripts:
            version = int(name.split("_", 1)[0])
            if version in done:
                continue
            sql = (folder / name).read_text(encoding="utf-8")
            # executescript would commit on its own; wrapping the script keeps a failed
            # migration from leaving half a schema behind.
            try:
                await self._writer.executescript(
                    f"BEGIN IMMEDIATE;\n{sql}\nINSERT INTO schema_migrations (version, name) "
                    f"VALUES ({version}, '{name}');\nCOMMIT;")
            except sqlite3.Error:
                if self._writer.in_transaction:
                    await self._writer.execute("ROLLBACK")
                raise

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Writer]:
        if self._writer is None:
            raise StoreUnavailable("the store is closed")
        async with self._write_lock:
            db = self._writer
            # The statement runs on the connection's thread whatever happens to us: if we
            # are cancelled while it waits for the lock, finish and undo it before letting
            # another transaction near the connection.
            wait = self._busy_ms / 1000
            begin = asyncio.ensure_future(db.run(lambda conn: begin_write(conn, wait)))
            try:
                await asyncio.shield(begin)
            except asyncio.CancelledError:
                with suppress(Exception):
                    await begin
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        await db.execute("ROLLBACK")
                raise
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"cannot write to the store: {exc}") from exc
            try:
                yield db
                await db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        await db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.IntegrityError):
                    raise Conflict(str(exc)) from exc
                if _unavailable(exc):
                    raise StoreUnavailable(f"cannot write to the store: {exc}") from exc
                raise

    async def _transaction(self, body: Callable[[Conn], Coroutine[Any, Any, T]], *,
                           yield_for: float | None = None) -> T:
        """A transaction of the busy paths: run whole, at once, on the loop (see writer.py).

        The rare ones (admin changes) use `_tx`, a statement per trip from the event loop.
        """
        if self._writer is None:
            raise StoreUnavailable("the store is closed")
        if yield_for is not None:
            # Given way before the lock of this process's connection: the delivery
            # worker's own transactions go on meanwhile.
            await self._writer.give_way(yield_for)
            yield_for = 0.0
        async with self._write_lock:
            try:
                return await self._writer.transaction(body, yield_for=yield_for)
            except sqlite3.IntegrityError as exc:
                raise Conflict(str(exc)) from exc
            except sqlite3.Error as exc:
                if _unavailable(exc):
                    raise StoreUnavailable(f"cannot write to the store: {exc}") from exc
                raise

    async def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        if self._reader is None:
            raise StoreUnavailable("the store is closed")
        try:
            return list(await self._reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            if _unavailable(exc):
                raise StoreUnavailable(f"cannot read the store: {exc}") from exc
            raise

    async def check_writable(self) -> None:
        """Readiness: prove a write transaction can start and commit."""
        async def body(db: Conn) -> Any:
            await db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('ready', '1')")

        return await self._transaction(body)

    # -- accounts and senders --------------------------------------------------------

    async def _account_id(self, db: _Reads, name: str) -> int:
        rows = list(await db.execute_fetchall("SELECT id FROM accounts WHERE name = ?",
                                              (name,)))
        if not rows:
            raise NotFound(f"unknown account {name!r}")
        return int(rows[0][0])

    async def create_account(self, name: str, balance: int, *, at: float) -> Account:
        async with self._tx() as db:
            try:
                cur = await db.execute(
                    "INSERT INTO accounts (name, balance, created_at) VALUES (?, ?, ?)",
                    (name, balance, at))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"account {name!r} already exists") from exc
            account_id = cur.lastrowid
            assert account_id is not None  # set by any INSERT
            if balance:
                await self._ledger(db, at, account_id, None, None, "purchase", "outside",
                                   "account", balance, "initial credits")
        return await self.get_account(name)

    async def get_account(self, name: str) -> Account:
        rows = await self._read(
            "SELECT a.id, a.name, a.balance, a.callback_url, a.stop_clause, "
            "(SELECT group_concat(sender, char(10)) FROM "
            "  (SELECT sender FROM senders WHERE account_id = a.id ORDER BY sender)), "
            "(SELECT COALESCE(SUM(quota_left), 0) FROM users WHERE account_id = a.id "
            "   AND quota_active), "
            "(SELECT COUNT(*) FROM users WHERE account_id = a.id AND quota_active) "
            "FROM accounts a WHERE a.name = ?", (name,))
        if not rows:
            raise NotFound(f"unknown account {name!r}")
        r = rows[0]
        senders = tuple(r[5].split("\n")) if r[5] else ()
        return Account(r[0], r[1], r[2], r[3], r[4], senders, r[6], r[7])

    async def list_accounts(self) -> list[str]:
        return [r[0] for r in await self._read("SELECT name FROM accounts ORDER BY name")]

    async def credit_account(self, name: str, amount: int, *, at: float) -> Account:
        async with self._tx() as db:
            account_id = await self._account_id(db, name)
            (holdings,), = await db.execute_fetchall(
                "SELECT a.balance + (SELECT COALESCE(SUM(quota_left), 0) FROM users "
                "  WHERE account_id = a.id AND quota_active) "
                "+ (SELECT COALESCE(SUM(credits), 0) FROM messages "
                f"  WHERE account_id = a.id {_PENDING}) FROM accounts a WHERE a.id = ?",
                (account_id,))
            rules.top_up(holdings, amount)
            await db.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?",
                             (amount, account_id))
            await self._ledger(db, at, account_id, None, None, "purchase", "outside", "account",
                               amount, "top-up")
            await self._evaluate_alerts(db, [account_id], at)
        return await self.get_account(name)

    async def update_account(self, name: str, *, callback_url: Any = UNSET,
                             stop_clause: Any = UNSET, at: float | None = None) -> Account:
        async with self._tx() as db:
            account_id = await self._account_id(db, name)
            if callback_url is not UNSET:
                await db.execute("UPDATE accounts SET callback_url = ? WHERE id = ?",
                                 (callback_url, account_id))
                await self._follow_callback_urls(db, account_id,
                                                 time.time() if at is None else at)
            if stop_clause is not UNSET:
                await db.execute("UPDATE accounts SET stop_clause = ? WHERE id = ?",
                                 (stop_clause, account_id))
        return await self.get_account(name)

    async def add_sender(self, account: str, sender: str) -> None:
        async with self._tx() as db:
            account_id = await self._account_id(db, account)
            try:
                await db.execute("INSERT INTO senders (account_id, sender) VALUES (?, ?)",
                                 (account_id, sender))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"sender {sender!r} is already declared") from exc

    async def remove_sender(self, account: str, sender: str) -> None:
        async with self._tx() as db:
            account_id = await self._account_id(db, account)
            cur = await db.execute("DELETE FROM senders WHERE account_id = ? AND sender = ?",
                                   (account_id, sender))
            if cur.rowcount == 0:
                raise NotFound(f"unknown sender {sender!r}")

    # -- API users -------------------------------------------------------------------

    async def create_user(self, account: str, login: str, password_hash: str, *,
                          at: float) -> User:
        async with self._tx() as db:
            account_id = await self._account_id(db, account)
            try:
                await db.execute(
                    "INSERT INTO users (account_id, login, password_hash, created_at) "
                    "VALUES (?, ?, ?, ?)", (account_id, login, password_hash, at))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"user {login!r} already exists in {account!r}") from exc
        return await self.get_user(account, login)

    async def _fetch_user(self, db: _Reads, account: str, login: str) -> User:
        rows = list(await db.execute_fetchall(
            f"SELECT {_USER_COLUMNS} FROM users u JOIN accounts a ON a.id = u.account_id "
            "WHERE a.name = ? AND u.login = ?", (account, login)))
        if not rows:
            await self._account_id(db, account)
            raise NotFound(f"unknown user {login!r} in {account!r}")
        return _user(rows[0])

    async def get_user(self, account: str, login: str) -> User:
        assert self._reader is not None
        return await self._fetch_user(self._reader, account, login)

    async def list_users(self, account: str) -> list[str]:
        rows = await self._read(
            "SELECT u.login FROM users u JOIN accounts a ON a.id = u.account_id "
            "WHERE a.name = ? ORDER BY u.login", (account,))
        if not rows:
            assert self._reader is not None
            await self._account_id(self._reader, account)
        return [r[0] for r in rows]

    async def update_user(self, account: str, login: str, changes: UserChanges, *,
                          at: float, check: Callable[[User], None] | None = None) -> User:
        given = changes.given()
        async with self._tx() as db:
            user = await self._fetch_user(db, account, login)
            if check is not None:
                check(user)
            if "quota" in given:
                await self._set_quota(db, user, given.pop("quota"), at)
            columns = {
                "password_hash": "password_hash", "callback_url": "callback_url",
                "alert_threshold": "alert_threshold", "alert_support": "alert_support",
                "alert_email": "alert_email", "alert_number": "alert_number",
            }
            for key, column in columns.items():
                if key in given:
                    await db.execute(f"UPDATE users SET {column} = ? WHERE id = ?",
                                     (given[key], user.id))
            if "ip_restrictions" in given:
                await db.execute("UPDATE users SET ip_restrictions = ? WHERE id = ?",
                                 (json.dumps(list(given["ip_restrictions"])), user.id))
            if "callback_url" in given:
                await self._follow_callback_urls(db, user.account_id, at)
            threshold = given.get("alert_threshold", user.alert_threshold)
            if threshold != user.alert_threshold:
                # The same threshold sent back (a GET body PUT back) changes nothing.
                (spendable,), = await db.execute_fetchall(
                    f"SELECT {_SPENDABLE} FROM users u JOIN accounts a ON a.id = u.account_id "
                    "WHERE u.id = ?", (user.id,))
                await db.execute("UPDATE users SET alert_armed = ? WHERE id = ?",
                                 (int(rules.armed_on_new_threshold(spendable, threshold)),
                                  user.id))
            await self._evaluate_alerts(db, [user.account_id], at)
            return await self._fetch_user(db, account, login)

    async def _set_quota(self, db: Conn, user: User, quota: int | None,
                         at: float) -> None:
        """Move credits between the account and the user's quota, as OVH does."""
        balance = (await db.execute_fetchall("SELECT balance FROM accounts WHERE id = ?",
                                             (user.account_id,)))[0][0]
        if quota is None:
            if user.quota_active:
                await self._move_quota(db, user, -user.quota_left, at)
                await db.execute(
                    "UPDATE users SET quota_active = 0, quota_left = 0 WHERE id = ?", (user.id,))
            return
        delta = rules.quota_move(quota, user.quota_left if user.quota_active else 0, balance)
        await self._move_quota(db, user, delta, at)
        await db.execute("UPDATE users SET quota_active = 1, quota_left = ? WHERE id = ?",
                         (quota, user.id))

    async def _move_quota(self, db: Conn, user: User, delta: int,
                          at: float) -> None:
        if delta == 0:
            return
        await db.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?",
                         (delta, user.account_id))
        source, target = ("account", "quota") if delta > 0 else ("quota", "account")
        await self._ledger(db, at, user.account_id, user.id, user.login, "quota", source,
                           target, abs(delta), "quota change")

    async def delete_user(self, account: str, login: str, *, at: float) -> None:
        async with self._tx() as db:
            user = await self._fetch_user(db, account, login)
            if user.quota_active and user.quota_left:
                await self._move_quota(db, user, -user.quota_left, at)
            await db.execute("DELETE FROM users WHERE id = ?", (user.id,))
            # Row ids can be reused by the next user created, in any account: nothing may
            # keep pointing at this one (its messages keep their login).
            await db.execute("UPDATE messages SET user_id = NULL WHERE user_id = ?", (user.id,))
            await db.execute("UPDATE outbox SET user_id = NULL WHERE user_id = ?", (user.id,))
            # Its pending callbacks now go where its messages' next ones would: the account's.
            await self._follow_callback_urls(db, user.account_id, at)
            await self._evaluate_alerts(db, [user.account_id], at)

    # -- the send path ---------------------------------------------------------------

    async def send_context(self, account: str, login: str, *,
                           fresh: bool = False) -> SendContext | None:
        """The user's send settings, from memory when its account's settings have not
        changed.

        A cached context may be stale by the time it is used (the CLI of another process can
        change a password at any moment); `commit_sends` refuses orders whose account's
        settings version is no longer current, and the send path checks them again. A
        change to one account leaves the contexts of the others cached and current.
        """
        cached = None if fresh else self._contexts.get((account, login))
        if cached is not None:
            return cached
        rows = await self._read(
            f"SELECT {_USER_COLUMNS}, a.stop_clause, "
            "(SELECT group_concat(sender, char(10)) FROM senders WHERE account_id = a.id), "
            "a.settings_version "
            "FROM users u JOIN accounts a ON a.id = u.account_id "
            "WHERE a.name = ? AND u.login = ?", (account, login))
        if not rows:
            return None
        row = rows[0]
        senders = frozenset(row[15].split("\n")) if row[15] else frozenset()
        context = SendContext(_user(row), row[14], senders, int(row[16]))
        account_id = context.user.account_id
        if self._note_settings_version(account_id, context.version) \
                and len(self._contexts) < 100_000:
            key = (account, login)
            previous = self._contexts.get(key)
            if previous is not None and previous.user.account_id != account_id:
                self._keys_by_account[previous.user.account_id].discard(key)
            self._contexts[key] = context
            self._keys_by_account.setdefault(account_id, set()).add(key)
        return context

    def _note_settings_version(self, account_id: int, version: int | None) -> bool:
        """Record the account's version as read (None: the account is gone); True when
        it is the newest seen, so a context read at it may be cached."""
        known = self._versions.get(account_id)
        if known is not None and version is not None and version <= known:
            return version == known
        for key in self._keys_by_account.pop(account_id, ()):
            del self._contexts[key]
        if version is None:
            self._versions.pop(account_id, None)
            return False
        self._versions[account_id] = version
        return True

    async def commit_sends(self, orders: Sequence[SendOrder], *,
                           at: float) -> list[SendOutcome]:
        """Charge and store a batch of sends in one transaction.

        Balances are read once, the orders decided in order (`rules.decide_sends`), and the
        writes go out as a few executemany calls: each statement costs a thread hop, so the
        number of statements does not grow with the batch.
        """
        async def body(db: Conn) -> Any:
            account_ids = sorted({o.account_id for o in orders})
            user_ids = sorted({o.user_id for o in orders if o.user_id is not None})
            marks, params = _in(account_ids)
            balances: dict[int, int] = {}
            versions: dict[int, int] = {}
            for account_id, balance, version in await db.execute_fetchall(
                    f"SELECT id, balance, settings_version FROM accounts WHERE id IN ({marks})",
                    params):
                balances[account_id] = balance
                versions[account_id] = version
            for account_id in account_ids:
                self._note_settings_version(account_id, versions.get(account_id))
            quotas: dict[int, int | None] = {}
            if user_ids:
                marks, params = _in(user_ids)
                for uid, active, left in await db.execute_fetchall(
                        "SELECT id, quota_active, quota_left FROM users "
                        f"WHERE id IN ({marks})", params):
                    quotas[uid] = left if active else None
            (next_id,) = (await db.execute_fetchall(_NEXT_ID.format(table="messages")))[0]

            decided = rules.decide_sends(orders, rules.Funds(balances, quotas), at=at,
                                         first_id=next_id, versions=versions)
            outcomes = decided.outcomes
            if decided.accepted:
                messages: list[tuple[Any, ...]] = []
                events: list[tuple[Any, ...]] = []
                ledger: list[tuple[Any, ...]] = []
                for sent in decided.accepted:
                    order, deferred, state = sent.order, sent.deferred_until, sent.state
                    event = "deferred" if deferred else "accepted"
                    for message_id, receiver, cost in zip(sent.ids, order.recipients,
                                                          order.costs, strict=True):
                        messages.append((
                            message_id, order.account_id, order.user_id, order.login,
                            order.kind, order.sender, receiver, order.body, order.coding,
                            order.parts, order.klass, int(order.no_stop), order.tag, cost,
                            sent.charged_to, at, deferred, state, at))
                        events.append((message_id, at, event))
                    ledger.append((at, order.account_id, order.user_id, order.login,
                                   sent.ledger_kind, sent.charged_to, order.total,
                                   sent.reference))
                await _insert(
                    db, "INSERT INTO messages (id, account_id, user_id, login, kind, sender, "
                    "receiver, body, coding, parts, class, no_stop, tag, credits, charged_to, "
                    "created_at, deferred_until, state, dlr, updated_at)",
                    "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,0,?)", messages)
                await _insert(db, "INSERT INTO message_events (message_id, at, ptt, dlr, note)",
                              "(?,?,NULL,0,?)", events)
                await _insert(
                    db, "INSERT INTO ledger (at, account_id, user_id, login, kind, source, "
                    "target, amount, reference)", "(?,?,?,?,?,?,'spent',?,?)", ledger)
                if decided.balances:
                    await db.executemany("UPDATE accounts SET balance = ? WHERE id = ?",
                                         [(v, k) for k, v in decided.balances.items()])
                if decided.quotas:
                    await db.executemany("UPDATE users SET quota_left = ? WHERE id = ?",
                                         [(v, k) for k, v in decided.quotas.items()])
                # Every account with a send accepted, charged to its balance or a quota.
                touched = sorted({sent.order.account_id for sent in decided.accepted})
                if await self._evaluate_alerts(db, touched, at):
                    outcomes = [replace(o, alert_queued=True) if o.accepted else o
                                for o in outcomes]
            return outcomes

        return await self._transaction(body)

    async def _evaluate_alerts(self, db: Conn, account_ids: Iterable[int],
                               at: float) -> int:
        """Fire the low-credit alerts crossed by this transaction, and re-arm the others
        (`rules.evaluate_alerts`).

        Runs inside every transaction that moves credits, under the write lock, so
        concurrent sends that cross a threshold together see one armed flag and fire
        exactly one alert. Returns how many alerts it queued.
        """
        ids = list(account_ids)
        if not ids:
            return 0
        marks, ids = _in(ids)
        watched = await db.execute_fetchall(
            f"SELECT u.id, u.account_id, a.name, u.login, u.alert_threshold, u.alert_support, "
            f"u.alert_email, u.alert_number, u.alert_armed, {_SPENDABLE}, u.quota_active "
            "FROM users u JOIN accounts a ON a.id = u.account_id "
            f"WHERE u.account_id IN ({marks}) AND u.alert_threshold IS NOT NULL", ids)
        if not watched:
            return 0
        plan = rules.evaluate_alerts(rules.Watch._make(r) for r in watched)
        flags = [(0, uid) for uid in plan.disarm] + [(1, uid) for uid in plan.rearm]
        if flags:
            await db.executemany("UPDATE users SET alert_armed = ? WHERE id = ?", flags)
        if plan.items:
            await db.executemany(
                "INSERT INTO outbox (kind, account_id, user_id, target, payload, created_at, "
                "next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(i.kind, i.account_id, i.user_id, i.target, json.dumps(i.payload), at, at)
                 for i in plan.items])
        return len(plan.items)

    async def _ledger(self, db: Conn, at: float, account_id: int,
                      user_id: int | None, login: str | None, kind: str, source: str,
                      target: str, amount: int, reference: str) -> None:
        await db.execute(
            "INSERT INTO ledger (at, account_id, user_id, login, kind, source, target, amount, "
            "reference) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (at, account_id, user_id, login, kind, source, target, amount, reference))

    # -- delivery --------------------------------------------------------------------

    async def mark_sent(self, ids: Sequence[int], *, at: float,
                        references: Sequence[SentMessage] = ()) -> None:
        """The operator took these messages; `references` name their parts for reports."""
        if not ids:
            return
        async def body(db: Conn) -> Any:
            for start in range(0, len(ids), _IN_MAX):
                marks, chunk = _in(ids[start:start + _IN_MAX])
                await db.execute(
                    "UPDATE messages SET state = 'sent', sent_at = ?, updated_at = ? "
                    f"WHERE id IN ({marks}) AND state IN ('queued', 'deferred')",
                    (at, at, *chunk))
            await _insert(db, "INSERT OR REPLACE INTO message_parts (reference, message_id, "
                          "part)", "(?,?,?)", _part_rows(references))

        return await self._transaction(body)

    async def apply_updates(self, updates: Sequence[StateUpdate]) -> AppliedUpdates:
        """Record state changes; queue their callbacks and refunds in the same transaction.

        Returns how many callbacks were queued and which messages became final. Updates to
        a message already final are ignored: a late or duplicated report must not change a
        settled outcome.
        """
        if not updates:
            return AppliedUpdates()

        async def body(db: Conn) -> Any:
            return await self._apply_updates(db, updates)

        return await self._transaction(body)

    async def _apply_updates(self, db: Conn, updates: Sequence[StateUpdate]
                             ) -> AppliedUpdates:
        """`apply_updates` inside the caller's transaction."""
        if not updates:
            return AppliedUpdates()
        marks, params = _in(sorted({u.message_id for u in updates}))
        rows = await db.execute_fetchall(
            "SELECT m.id, m.state, m.account_id, m.user_id, m.charged_to, m.credits, "
            "m.tag, m.login, COALESCE(u.callback_url, a.callback_url), u.quota_active, "
            "COALESCE(m.deferred_until, m.created_at) "
            "FROM messages m JOIN accounts a ON a.id = m.account_id "
            "LEFT JOIN users u ON u.id = m.user_id AND u.account_id = m.account_id "
            f"WHERE m.id IN ({marks})", params)
        plan = rules.plan_updates(updates, {r[0]: rules.Pending._make(r) for r in rows})
        await _update(
            db, "UPDATE messages SET ptt = v.column2, dlr = v.column3, state = v.column4, "
            "sent_at = COALESCE(sent_at, v.column5), "
            "delivered_at = COALESCE(delivered_at, v.column6), updated_at = v.column7 "
            "FROM (VALUES {}) AS v WHERE messages.id = v.column1",
            "(?,?,?,?,?,?,?)", plan.changes)
        await _insert(db, "INSERT INTO message_events (message_id, at, ptt, dlr, note)",
                      "(?,?,?,?,?)",
                      [(u.message_id, u.at, u.ptt, u.dlr, u.note) for u in plan.applied])
        await _insert(
            db, "INSERT INTO outbox (kind, message_id, account_id, user_id, target, "
            "payload, created_at, next_attempt_at)", "(?,?,?,?,?,?,?,?)",
            [("callback", c.message_id, c.account_id, c.user_id, c.target,
              json.dumps(c.payload), c.at, c.at) for c in plan.callbacks])
        refunds = plan.refunds
        if refunds:
            await db.executemany(
                "INSERT INTO ledger (at, account_id, user_id, login, kind, source, target, "
                "amount, reference) VALUES (?, ?, ?, ?, 'refund', 'spent', ?, ?, ?)",
                [(r.at, r.account_id, r.user_id, r.login, r.pool, r.amount, r.reference)
                 for r in refunds])
            await db.executemany("UPDATE accounts SET balance = balance + ? WHERE id = ?",
                                 [(v, k) for k, v in plan.account_refunds().items()])
            await db.executemany("UPDATE users SET quota_left = quota_left + ? "
                                 "WHERE id = ?",
                                 [(v, k) for k, v in plan.quota_refunds().items()])
            await _check_integers(db, plan)
            await self._evaluate_alerts(db, sorted({r.account_id for r in refunds}),
                                        refunds[-1].at)
        return AppliedUpdates(len(plan.callbacks), tuple(plan.finals), tuple(plan.ignored))

    # -- delivery by claims ----------------------------------------------------------
    #
    # A dispatcher claims due messages before handing them to the operator, as the outbox
    # workers claim their items: `claimed_until` is a lease, so a claimed message is not
    # claimed again until it runs out or the message is marked sent, and a dispatcher that
    # crashed frees its claims when their leases end. Nothing here depends on the order in
    # which ids commit, so several committers (and several dispatchers) are safe.

    async def claim_messages(self, *, now: float, lease: float,
                             limit: int) -> list[OutgoingMessage]:
        """Take up to `limit` due messages and hold them until `now + lease`; one
        transaction per batch.

        Deferred messages that are due first, oldest first, up to half the batch (so that
        neither kind waits behind the other's backlog), then queued ones by id (a message
        released by a "try later" after the others). A queued message is due whatever its
        acceptance time: comparing that with this clock would make clocks disagreeing by
        a second hold messages back.
        """
        if limit <= 0:
            return []
        returning = f"RETURNING {_OUTGOING_COLUMNS}"
        async def body(db: Conn) -> Any:
            deferred = await db.execute_fetchall(
                "UPDATE messages SET claimed_until = ? WHERE id IN (SELECT id FROM messages "
                f"WHERE state = 'deferred' AND {_DUE_DEFERRED} <= ? "
                f"ORDER BY {_DUE_DEFERRED}, id LIMIT ?) {returning}",
                (now + lease, now, max(1, limit // 2)))
            queued = await db.execute_fetchall(
                "UPDATE messages SET claimed_until = ? WHERE id IN (SELECT id FROM messages "
                "WHERE state = 'queued' AND claimed_until <= ? "
                f"ORDER BY claimed_until, id LIMIT ?) {returning}",
                (now + lease, now, limit - len(deferred)))
            return [*deferred, *queued]

        # RETURNING gives no order: by id (rows compare by their first column).
        return [_outgoing(r) for r in sorted(await self._transaction(body))]

    async def release_messages(self, until: Sequence[tuple[int, float]]) -> None:
        """End claims early: (message id, when it may be claimed again) — the operator's
        "try later", or a batch it never answered."""
        if not until:
            return
        async def body(db: Conn) -> Any:
            await _update(
                db, "UPDATE messages SET claimed_until = v.column2 FROM (VALUES {}) AS v "
                f"WHERE messages.id = v.column1 AND {_CLAIMABLE}", "(?,?)",
                list({mid: (mid, at) for mid, at in until}.values()))

        await self._transaction(body)

    async def free_claims(self) -> int:
        """End every claim: for a dispatcher that knows it is the only one on this store,
        at its start, when all claims are a previous run's. Returns how many it freed."""
        async def body(db: Conn) -> Any:
            cur = await db.execute(
                f"UPDATE messages SET claimed_until = 0 WHERE {_CLAIMABLE} "
                "AND claimed_until > 0")
            return cur.rowcount

        return int(await self._transaction(body))

    async def next_due_at(self) -> float | None:
        """When the next message falls due (maybe already): a dispatcher sleeps until then."""
        rows = await self._read(
            "SELECT (SELECT MIN(claimed_until) FROM messages WHERE state = 'queued'), "
            f"(SELECT MIN({_DUE_DEFERRED}) FROM messages WHERE state = 'deferred')")
        due = [at for at in rows[0] if at is not None] if rows else []
        return min(due) if due else None

    async def in_flight(self, *, after_id: int, limit: int) -> list[OutgoingMessage]:
        """Messages the operator took and has not settled, by id: read at a start, to be
        resumed (their reports awaited), never submitted again."""
        rows = await self._read(
            f"SELECT {_OUTGOING_COLUMNS} FROM messages WHERE state = 'sent' {_PENDING} "
            "AND id > ? ORDER BY id LIMIT ?", (after_id, limit))
        return [_outgoing(r) for r in rows]

    async def apply_reports(self, reports: Sequence[OperatorReport]) -> AppliedUpdates:
        """`apply_updates` for reports naming the operator's references.

        A report whose reference names no part is left out (in `ignored`, like a report
        on a settled message, and in `unmatched`): it belongs to a message the store has
        not recorded as taken (yet: its `mark_sent` may still be on its way).
        The references are read in the transaction, on the writer's connection: a read on
        the reader's went through its thread, and that trip cost the delivery worker more
        CPU than the read itself (the batch is one indexed lookup of its references).
        """
        if not reports:
            return AppliedUpdates()
        owners: dict[str, int] = {}
        parts: dict[int, int] = {}
        names = sorted({r.reference for r in reports})

        async def body(db: Conn) -> tuple[AppliedUpdates, list[int]]:
            for start in range(0, len(names), _IN_MAX):
                marks, chunk = _in(names[start:start + _IN_MAX])
                for reference, message_id, count in await db.execute_fetchall(
                        "SELECT p.reference, p.message_id, m.parts FROM message_parts p "
                        "JOIN messages m ON m.id = p.message_id "
                        f"WHERE p.reference IN ({marks})", chunk):
                    owners[reference] = message_id
                    parts[message_id] = count
            known = [p for p, r in enumerate(reports) if r.reference in owners]
            # A part's "delivered" of a long message: counted, and standing for the message
            # only as its last part's (rules.part_delivery_stands).
            merged = [p for p in known if reports[p].ptt == DELIVERED and reports[p].final
                      and parts[owners[reports[p].reference]] > 1]
            left_out: list[int] = []
            for position in merged:
                report = reports[position]
                message_id = owners[report.reference]
                # `<reference>#<n>` names a part carried by the submit of `<reference>`
                # (SMPP's message_payload): delivered with it.
                cursor = await db.execute(
                    "UPDATE message_parts SET delivered = 1 WHERE (reference = ? OR "
                    "reference BETWEEN ? AND ?) AND delivered = 0",
                    (report.reference, f"{report.reference}#", f"{report.reference}#\uffff"))
                new = cursor.rowcount > 0
                count = parts[message_id]
                if new:
                    rows = await db.execute_fetchall(
                        "UPDATE messages SET parts_delivered = parts_delivered + ? "
                        "WHERE id = ? RETURNING parts_delivered",
                        (cursor.rowcount, message_id))
                    count = int(rows[0][0]) if rows else 0
                if not rules.part_delivery_stands(parts[message_id], count, new):
                    left_out.append(position)
            standing = [p for p in known if p not in set(left_out)] if left_out else known
            applied = await self._apply_updates(db, [
                StateUpdate(owners[r.reference], r.ptt, r.dlr, r.final, r.billed, r.at,
                            r.note)
                for r in map(reports.__getitem__, standing)])
            return AppliedUpdates(applied.callbacks, applied.finals,
                                  tuple(standing[p] for p in applied.ignored)), left_out

        applied, left_out = await self._transaction(body)
        unmatched = tuple(p for p, r in enumerate(reports) if r.reference not in owners)
        ignored = sorted(set(applied.ignored).union(unmatched, left_out))
        return AppliedUpdates(applied.callbacks, applied.finals, tuple(ignored), unmatched,
                              tuple(owners.get(r.reference, 0) for r in reports))

    # -- incoming messages -----------------------------------------------------------

    async def _incoming_owner(self, handset: str, number: str) -> tuple[int, str] | None:
        """The account (and tag) a message from `handset` to `number` answers, see
        DeliveryStore.add_incoming. Read before the write, on the reader: the reply lookup
        reads messages newest first by id, at most INCOMING_LOOKBACK of them (no index on
        recipients, which every send would pay), and one answering nothing reads them all,
        which must not hold the write lock."""
        newest = (await self._read("SELECT max(id) FROM messages"))[0][0] or 0
        rows = await self._read(
            "SELECT account_id, tag FROM messages WHERE id > ? AND receiver = ? "
            "AND sender = ? ORDER BY id DESC LIMIT 1",
            (newest - INCOMING_LOOKBACK, handset, number))
        if not rows:
            rows = await self._read(
                "SELECT account_id, '' FROM senders WHERE sender = ? "
                "ORDER BY account_id LIMIT 1", (number,))
        return (int(rows[0][0]), rows[0][1]) if rows else None

    async def add_incoming(self, messages: Sequence[IncomingMessage]) -> list[int]:
        """See DeliveryStore."""
        if not messages:
            return []
        owners = [await self._incoming_owner(m.sender, m.receiver) for m in messages]

        async def body(db: Conn) -> list[int]:
            ids: list[int] = []
            for message, owner in zip(messages, owners, strict=True):
                if owner is None:
                    ids.append(0)
                    continue
                kept = await db.execute_fetchall(
                    "SELECT id FROM incoming_messages WHERE reference = ? AND created_at >= ? "
                    "AND sender = ? AND receiver = ? AND body = ? ORDER BY id LIMIT 1",
                    (message.reference, message.created_at - rules.INCOMING_REPEAT_SECONDS,
                     message.sender, message.receiver, message.body))
                if kept:  # sent again
                    ids.append(int(kept[0][0]))
                    continue
                ids.append(await _keep_incoming(db, owner, message.reference, message.sender,
                                                message.receiver, message.body,
                                                message.created_at))
            return ids

        return await self._transaction(body)

    async def add_incoming_parts(self, parts: Sequence[IncomingPart]) -> list[int | None]:
        """See DeliveryStore."""
        if not parts:
            return []
        owners = [await self._incoming_owner(p.sender, p.receiver) for p in parts]

        async def body(db: Conn) -> list[int | None]:
            await db.execute("DELETE FROM incoming_parts WHERE created_at < ?",
                             (max(p.created_at for p in parts) - rules.INCOMING_PARTS_SECONDS,))
            return [await _add_part(db, part, owner)
                    for part, owner in zip(parts, owners, strict=True)]

        return await self._transaction(body)

    async def list_incoming(self, account: str, *, limit: int,
                            before_id: int | None = None) -> list[IncomingMessage]:
        assert self._reader is not None
        account_id = await self._account_id(self._reader, account)
        rows = await self._read(
            "SELECT id, account_id, reference, sender, receiver, body, tag, created_at "
            "FROM incoming_messages WHERE account_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (account_id, before_id if before_id is not None else 1 << 62, limit))
        return [IncomingMessage(*row) for row in rows]

    # -- outbox ----------------------------------------------------------------------

    @staticmethod
    async def _follow_callback_urls(db: Conn, account_id: int, at: float) -> None:
        """Point the account's pending callbacks at the URL a new one would get (its user's,
        else the account's), or cancel them (dead) when there is none any more.

        Run in the transaction that changes a callback URL: queued retries must not go on
        calling a URL that was replaced or cleared, perhaps because it leaked a secret.
        An attempt already under way finishes with the URL it started with.
        """
        await db.execute(
            "UPDATE outbox SET target = v.url FROM (SELECT o.id, COALESCE("
            "NULLIF(u.callback_url, ''), NULLIF(a.callback_url, ''), '') AS url "
            "FROM outbox o JOIN accounts a ON a.id = o.account_id "
            "LEFT JOIN users u ON u.id = o.user_id AND u.account_id = o.account_id "
            "WHERE o.kind = 'callback' AND o.state = 'pending' AND o.account_id = ?) AS v "
            "WHERE outbox.id = v.id AND outbox.target <> v.url", (account_id,))
        cancelled = "cancelled: no callback URL any more"
        await db.execute(
            "INSERT INTO outbox_attempts (outbox_id, at, ok, detail) SELECT id, ?, 0, ? "
            "FROM outbox WHERE kind = 'callback' AND state = 'pending' AND account_id = ? "
            "AND target = ''", (at, cancelled, account_id))
        await db.execute(
            "UPDATE outbox SET state = 'dead', done_at = ?, last_error = ? "
            "WHERE kind = 'callback' AND state = 'pending' AND account_id = ? "
            "AND target = ''", (at, cancelled, account_id))

    async def enqueue_outbox(self, kind: str, *, account_id: int, user_id: int | None,
                             target: str, payload: dict[str, Any], at: float,
                             message_id: int | None = None) -> int:
        async with self._tx() as db:
            cur = await db.execute(
                "INSERT INTO outbox (kind, message_id, account_id, user_id, target, payload, "
                "created_at, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (kind, message_id, account_id, user_id, target, json.dumps(payload), at, at))
            return int(cur.lastrowid or 0)

    async def claim_outbox(self, kinds: Sequence[str], *, now: float, lease: float,
                           limit: int, bounds: ClaimBounds | None = None,
                           skip_targets: Sequence[str] = (),
                           skip_accounts: Sequence[int] = (), deep: bool = False,
                           results: Sequence[OutboxResult] = ()) -> list[OutboxItem]:
        """Record `results`, then take due items and push their next attempt past a lease.

        One transaction for both: a worker finishing and starting attempts all the time
        takes the write lock once per step, not twice.

        If the gateway dies mid-attempt, the item becomes due again when the lease ends,
        so nothing claimed is ever lost. `bounds` caps the items taken per key (a host)
        and per account, and `skip_targets` and `skip_accounts` leave out those the
        caller is already full of, so one slow endpoint's or one account's backlog cannot
        fill a claim and starve the others.

        Only the first `CLAIM_WINDOW` times `limit` due items (oldest first) are looked at:
        ranking every pending item by target made a claim cost grow with the backlog
        (25 ms per claim at 7,700 pending callbacks, 2.6 ms at 130), and a slow claim holds
        the write lock that every send waits for. For the same reason skipped targets are
        left out of the window in Python: left to SQL, they made it read past the whole
        backlog of a busy target. `deep` does read past them (and past skipped accounts),
        for the odd claim that must find other items behind a busy backlog.
        """
        where = (f"state = 'pending' AND kind IN ({_marks(len(kinds))}) "
                 "AND next_attempt_at <= ?")
        params: list[Any] = [*kinds, now]
        if deep and skip_targets:
            marks, skip = _in(skip_targets)
            where += f" AND target NOT IN ({marks})"
            params.extend(skip)
        if deep and skip_accounts:
            marks, skip = _in(skip_accounts)
            where += f" AND account_id NOT IN ({marks})"
            params.extend(skip)
        params.append(limit * CLAIM_WINDOW)
        skipped = set(skip_targets)
        async def body(db: Conn) -> Any:
            if results:
                await self._record_results(db, results)
            if limit <= 0:
                return []
            due = await db.execute_fetchall(
                f"SELECT id, kind, target, account_id FROM outbox WHERE {where} "
                "ORDER BY next_attempt_at, id LIMIT ?", params)
            chosen = rules.choose_claims(due, limit=limit, bounds=bounds, skip=skipped)
            if not chosen:
                return []
            marks, chosen = _in(chosen)
            rows = await db.execute_fetchall(
                "UPDATE outbox SET next_attempt_at = ?, attempts = attempts + 1 "
                f"WHERE id IN ({marks}) "
                "RETURNING id, kind, message_id, account_id, user_id, target, payload, "
                "created_at, attempts", (now + lease, *chosen))
            return rows

        rows = await self._transaction(body)
        items = [OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8])
                 for r in rows]
        items.sort(key=lambda item: item.id)
        return items

    async def outbox_status(self, item_id: int) -> tuple[str, int, str] | None:
        """(state, attempts, detail of the latest attempt) of one outbox item."""
        rows = await self._read(
            "SELECT o.state, o.attempts, COALESCE((SELECT t.detail FROM outbox_attempts t "
            "WHERE t.outbox_id = o.id ORDER BY t.id DESC LIMIT 1), '') FROM outbox o "
            "WHERE o.id = ?", (item_id,))
        if not rows:
            return None
        state, attempts, detail = rows[0]
        return str(state), int(attempts), str(detail)

    async def next_outbox_at(self, kinds: Sequence[str], *,
                             skip_targets: Sequence[str] = ()) -> float | None:
        sql = ("SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending' "
               f"AND kind IN ({_marks(len(kinds))})")
        params = list(kinds)
        if skip_targets:
            marks, skip = _in(skip_targets)
            sql += f" AND target NOT IN ({marks})"
            params.extend(skip)
        rows = await self._read(sql, params)
        return rows[0][0] if rows else None

    async def record_outbox_results(self, results: Sequence[OutboxResult]) -> None:
        if not results:
            return
        async def body(db: Conn) -> Any:
            await self._record_results(db, results)

        return await self._transaction(body)

    @staticmethod
    async def _record_results(db: Conn,
                              results: Sequence[OutboxResult]) -> None:
        await _insert(db, "INSERT INTO outbox_attempts (outbox_id, at, ok, detail)",
                      "(?,?,?,?)", [(r.item_id, r.at, int(r.ok), r.detail[:500])
                                    for r in results])
        # A claimed item has one result per claim, so each appears once here.
        await _update(
            db, "UPDATE outbox SET state = 'done', done_at = v.column2, last_error = '' "
            "FROM (VALUES {}) AS v WHERE outbox.id = v.column1", "(?,?)",
            [(r.item_id, r.at) for r in results if r.ok])
        failed = [r for r in results if not r.ok]
        if failed:
            # Not an item cancelled meanwhile (see `_follow_callback_urls`): it stays so.
            await db.executemany(
                "UPDATE outbox SET next_attempt_at = ?, last_error = ? "
                "WHERE id = ? AND state = 'pending'",
                [(r.next_attempt_at, r.detail[:500], r.item_id) for r in failed
                 if r.next_attempt_at is not None])
            await db.executemany(
                "UPDATE outbox SET state = 'dead', done_at = ?, last_error = ? "
                "WHERE id = ? AND state = 'pending'",
                [(r.at, r.detail[:500], r.item_id) for r in failed
                 if r.next_attempt_at is None])

    # -- reading back ----------------------------------------------------------------

    async def get_message(self, message_id: int) -> Message:
        rows = await self._read(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages m JOIN accounts a ON a.id = m.account_id "
            "WHERE m.id = ?", (message_id,))
        if not rows:
            raise NotFound(f"unknown message {message_id}")
        return _message(rows[0])

    async def message_events(self, message_id: int) -> list[MessageEvent]:
        rows = await self._read(
            "SELECT at, ptt, dlr, note FROM message_events WHERE message_id = ? ORDER BY id",
            (message_id,))
        return [MessageEvent(*r) for r in rows]

    async def message_attempts(self, message_id: int) -> list[OutboxAttempt]:
        rows = await self._read(
            "SELECT o.id, o.kind, o.target, o.state, t.at, t.ok, t.detail FROM outbox o "
            "JOIN outbox_attempts t ON t.outbox_id = o.id WHERE o.message_id = ? "
            "ORDER BY t.id", (message_id,))
        return [OutboxAttempt(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6]) for r in rows]

    async def list_messages(self, where: MessageFilter, *, limit: int,
                            before_id: int | None = None) -> list[Message]:
        clauses = ["m.account_id = ?"]
        params: list[Any] = [where.account_id]
        for column, value in (("m.user_id", where.user_id), ("m.login", where.login),
                              ("m.tag", where.tag), ("m.ptt", where.ptt),
                              ("m.receiver", where.receiver), ("m.sender", where.sender),
                              ("m.kind", where.kind)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if where.created_from is not None:
            clauses.append("m.created_at >= ?")
            params.append(where.created_from)
        if where.created_to is not None:
            clauses.append("m.created_at <= ?")
            params.append(where.created_to)
        if before_id is not None:
            clauses.append("m.id < ?")
            params.append(before_id)
        rows = await self._read(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages m JOIN accounts a ON a.id = m.account_id "
            f"WHERE {' AND '.join(clauses)} ORDER BY m.id DESC LIMIT ?", (*params, limit))
        return [_message(r) for r in rows]

    async def list_ledger(self, account: str, *, limit: int,
                          after_id: int = 0) -> list[LedgerEntry]:
        assert self._reader is not None
        account_id = await self._account_id(self._reader, account)
        rows = await self._read(
            "SELECT id, at, account_id, login, kind, source, target, amount, reference "
            "FROM ledger WHERE account_id = ? AND id > ? ORDER BY id LIMIT ?",
            (account_id, after_id, limit))
        return [LedgerEntry(*r) for r in rows]

    async def ledger_totals(self) -> dict[str, int]:
        """The pools the ledger says exist, next to what the tables hold."""
        rows = await self._read(
            "SELECT "
            "(SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE source = 'outside'), "
            "(SELECT COALESCE(SUM(CASE WHEN target = 'spent' THEN amount ELSE -amount END), 0)"
            "   FROM ledger WHERE 'spent' IN (source, target)), "
            "(SELECT COALESCE(SUM(balance), 0) FROM accounts), "
            "(SELECT COALESCE(SUM(quota_left), 0) FROM users WHERE quota_active), "
            "(SELECT COALESCE(SUM(CASE WHEN target = 'account' THEN amount ELSE -amount END), 0)"
            "   FROM ledger WHERE 'account' IN (source, target)), "
            "(SELECT COALESCE(SUM(CASE WHEN target = 'quota' THEN amount ELSE -amount END), 0)"
            "   FROM ledger WHERE 'quota' IN (source, target))")
        purchased, spent, balances, quotas, ledger_accounts, ledger_quotas = rows[0]
        return {"purchased": purchased, "spent": spent, "balances": balances,
                "quotas": quotas, "ledger_balances": ledger_accounts,
                "ledger_quotas": ledger_quotas}

    async def counts(self) -> dict[str, int]:
        rows = await self._read(
            "SELECT "
            f"(SELECT COUNT(*) FROM messages WHERE state = 'queued' {_PENDING}), "
            f"(SELECT COUNT(*) FROM messages WHERE state = 'deferred' {_PENDING}), "
            f"(SELECT COUNT(*) FROM messages WHERE state = 'sent' {_PENDING}), "
            "(SELECT COUNT(*) FROM outbox WHERE state = 'pending'), "
            "(SELECT COUNT(*) FROM outbox WHERE state = 'dead')")
        queued, deferred, sent, pending, dead = rows[0]
        return {"queued": queued, "deferred": deferred, "sent": sent,
                "outbox_pending": pending, "outbox_dead": dead}

    # -- admin API tokens ------------------------------------------------------------

    async def create_token(self, name: str, key: str, digest: str,
                           accounts: Sequence[str] | None, *, at: float) -> AdminToken:
        async with self._tx() as db:
            account_ids = [await self._account_id(db, account)
                           for account in sorted(set(accounts or ()))]
            try:
                cur = await db.execute(
                    "INSERT INTO admin_tokens (name, key, digest, all_accounts, created_at) "
                    "VALUES (?, ?, ?, ?, ?)", (name, key, digest, accounts is None, at))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"token {name!r} already exists") from exc
            await db.executemany(
                "INSERT INTO admin_token_accounts (token_id, account_id) VALUES (?, ?)",
                [(cur.lastrowid, account_id) for account_id in account_ids])
        found = await self._tokens("t.name = ?", (name,))
        return found[0]

    async def find_token(self, key: str) -> AdminToken | None:
        found = await self._tokens("t.key = ?", (key,))
        return found[0] if found else None

    async def list_tokens(self) -> list[AdminToken]:
        return await self._tokens("1", ())

    async def has_tokens(self) -> bool:
        return bool(await self._read("SELECT 1 FROM admin_tokens LIMIT 1"))

    async def token_used(self, token_id: int, *, at: float) -> None:
        async with self._tx() as db:
            await db.execute("UPDATE admin_tokens SET last_used_at = ? WHERE id = ?",
                             (at, token_id))

    async def revoke_token(self, name: str) -> None:
        async with self._tx() as db:
            cur = await db.execute("DELETE FROM admin_tokens WHERE name = ?", (name,))
            if not cur.rowcount:
                raise NotFound(f"unknown token {name!r}")

    async def _tokens(self, where: str, params: Sequence[Any]) -> list[AdminToken]:
        rows = await self._read(
            "SELECT t.id, t.name, t.key, t.digest, t.all_accounts, t.created_at, "
            "t.last_used_at, (SELECT group_concat(name, char(10)) FROM "
            "  (SELECT a.name FROM admin_token_accounts ta JOIN accounts a "
            "   ON a.id = ta.account_id WHERE ta.token_id = t.id ORDER BY a.name)) "
            f"FROM admin_tokens t WHERE {where} ORDER BY t.name", params)
        return [AdminToken(r[0], r[1], r[2], r[3],
                           None if r[4] else tuple(r[7].split("\n")) if r[7] else (),
                           r[5], r[6]) for r in rows]

    # -- console users and sessions ----------------------------------------------------

    async def create_console_user(self, email: str, password_hash: str, *, operator: bool,
                                  accounts: Sequence[str], at: float) -> ConsoleUser:
        async with self._tx() as db:
            account_ids = [await self._account_id(db, account)
                           for account in sorted(set(accounts))]
            try:
                cur = await db.execute(
                    "INSERT INTO console_users (email, password_hash, operator, created_at) "
                    "VALUES (?, ?, ?, ?)", (email, password_hash, operator, at))
            except sqlite3.IntegrityError as exc:
                raise Conflict(f"console user {email!r} already exists") from exc
            await db.executemany(
                "INSERT INTO console_user_accounts (user_id, account_id) VALUES (?, ?)",
                [(cur.lastrowid, account_id) for account_id in account_ids])
        found = await self._console_users("u.email = ?", (email,))
        return found[0]

    async def get_console_user(self, email: str) -> ConsoleUser | None:
        found = await self._console_users("u.email = ?", (email,))
        return found[0] if found else None

    async def list_console_users(self) -> list[ConsoleUser]:
        return await self._console_users("1", ())

    async def delete_console_user(self, email: str) -> None:
        async with self._tx() as db:
            cur = await db.execute("DELETE FROM console_users WHERE email = ?", (email,))
            if not cur.rowcount:
                raise NotFound(f"unknown console user {email!r}")

    async def set_console_password(self, email: str, password_hash: str) -> None:
        async with self._tx() as db:
            cur = await db.execute("UPDATE console_users SET password_hash = ? WHERE email = ?",
                                   (password_hash, email))
            if not cur.rowcount:
                raise NotFound(f"unknown console user {email!r}")
            # A new password closes every session opened with the old one.
            await db.execute("DELETE FROM console_sessions WHERE user_id = "
                             "(SELECT id FROM console_users WHERE email = ?)", (email,))

    async def create_console_session(self, digest: str, email: str, csrf: str, *,
                                     at: float) -> None:
        async with self._tx() as db:
            cur = await db.execute(
                "INSERT INTO console_sessions (digest, user_id, csrf, created_at, last_seen_at) "
                "SELECT ?, id, ?, ?, ? FROM console_users WHERE email = ?",
                (digest, csrf, at, at, email))
            if not cur.rowcount:
                raise NotFound(f"unknown console user {email!r}")

    async def find_console_session(self, digest: str) -> ConsoleSession | None:
        rows = await self._read(
            "SELECT u.email, s.csrf, s.created_at, s.last_seen_at FROM console_sessions s "
            "JOIN console_users u ON u.id = s.user_id WHERE s.digest = ?", (digest,))
        if not rows:
            return None
        email, csrf, created_at, last_seen_at = rows[0]
        user = await self.get_console_user(email)
        if user is None:
            return None
        return ConsoleSession(digest, user, csrf, created_at, last_seen_at)

    async def touch_console_session(self, digest: str, *, at: float) -> None:
        async with self._tx() as db:
            await db.execute("UPDATE console_sessions SET last_seen_at = ? WHERE digest = ?",
                             (at, digest))

    async def delete_console_sessions(self, *, digest: str | None = None,
                                      idle_before: float | None = None) -> None:
        async with self._tx() as db:
            if digest is not None:
                await db.execute("DELETE FROM console_sessions WHERE digest = ?", (digest,))
            if idle_before is not None:
                await db.execute("DELETE FROM console_sessions WHERE last_seen_at < ?",
                                 (idle_before,))

    async def _console_users(self, where: str, params: Sequence[Any]) -> list[ConsoleUser]:
        rows = await self._read(
            "SELECT u.id, u.email, u.password_hash, u.operator, u.created_at, "
            "(SELECT group_concat(name, char(10)) FROM "
            "  (SELECT a.name FROM console_user_accounts ua JOIN accounts a "
            "   ON a.id = ua.account_id WHERE ua.user_id = u.id ORDER BY a.name)) "
            f"FROM console_users u WHERE {where} ORDER BY u.email", params)
        return [ConsoleUser(r[0], r[1], r[2], bool(r[3]),
                            tuple(r[5].split("\n")) if r[5] else (), r[4]) for r in rows]

    # -- the console's account chart -----------------------------------------------------

    async def message_stats(self, account: str, *, since: float, period: float,
                            count: int) -> list[MessageStats]:
        rows = await self._read(
            "SELECT CAST((m.created_at - ?) / ? AS INTEGER) AS bucket, "
            "SUM(m.state = 'final' AND m.dlr = 1), SUM(m.state = 'final' AND m.dlr <> 1), "
            "SUM(m.state <> 'final'), SUM(CASE WHEN m.dlr = 16 THEN 0 ELSE m.credits END) "
            "FROM messages m JOIN accounts a ON a.id = m.account_id "
            "WHERE a.name = ? AND m.created_at >= ? AND m.created_at < ? "
            "GROUP BY bucket", (since, period, account, since, since + period * count))
        return rules.stats_series(rows, since, period, count)

    # -- the whole store as tables (gateway.store.copy) -------------------------------

    async def _schema(self, db: _Reads) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        """(columns, primary key) of every table of the installation's data."""
        found = {}
        for (table,) in await db.execute_fetchall(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite%' ORDER BY name"):
            if table in _BOOKKEEPING:
                continue
            info = list(await db.execute_fetchall(f'PRAGMA table_info("{table}")'))
            columns = tuple(r[1] for r in info)
            key = tuple(r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5]))
            found[str(table)] = (columns, key or ("rowid",))
        return found

    async def table_columns(self) -> dict[str, tuple[str, ...]]:
        if self._reader is None:
            raise StoreUnavailable("the store is closed")
        return {t: columns for t, (columns, _) in (await self._schema(self._reader)).items()}

    @asynccontextmanager
    async def read_tables(self) -> AsyncIterator[_SQLiteSource]:
        """A read transaction on a connection of its own: one snapshot (WAL) throughout."""
        conn = await self._connect_reader()
        try:
            await conn.execute("BEGIN")
            yield _SQLiteSource(conn, await self._schema(conn))
        finally:
            with suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            await conn.close()

    @asynccontextmanager
    async def write_tables(self) -> AsyncIterator[_SQLiteSink]:
        async with self._tx() as db:
            yield _SQLiteSink(db, await self._schema(db))

    # -- data over time: retention, erasure, space, backups, exports (MaintenanceStore) -----

    async def retention_settings(self) -> list[AccountRetention]:
        rows = await self._read("SELECT id, name, retention_days, personal_data_days "
                                "FROM accounts ORDER BY id")
        return [AccountRetention(*row) for row in rows]

    async def set_retention(self, account: str, *, messages_days: Any = UNSET,
                            personal_data_days: Any = UNSET) -> AccountRetention:
        async with self._tx() as db:
            account_id = await self._account_id(db, account)
            if messages_days is not UNSET:
                await db.execute("UPDATE accounts SET retention_days = ? WHERE id = ?",
                                 (messages_days, account_id))
            if personal_data_days is not UNSET:
                await db.execute("UPDATE accounts SET personal_data_days = ? WHERE id = ?",
                                 (personal_data_days, account_id))
            (row,) = await db.execute_fetchall(
                "SELECT id, name, retention_days, personal_data_days FROM accounts "
                "WHERE id = ?", (account_id,))
        return AccountRetention(*row)

    async def erase_due(self, account_id: int, what: PurgedRows, *, before: float,
                        limit: int) -> PurgeStep:
        table, number = _PURGED[what]

        async def body(db: Conn) -> PurgeStep:
            found = await db.execute_fetchall(
                "SELECT erased_through FROM purge_progress WHERE account_id = ? AND what = ?",
                (account_id, what))
            through = found[0][0] if found else 0
            state = "state" if what == "messages" else "'final'"
            rows = await db.execute_fetchall(
                f"SELECT id, created_at, {state}, {number} FROM {table} "
                "WHERE account_id = ? AND id > ? ORDER BY id LIMIT ?",
                (account_id, through, limit))
            plan = rules.erasure(rows, before, limit)
            if what == "messages":
                # Held messages that became final since: erased now, held no more.
                # CROSS JOIN: SQLite takes the (few) held messages first; with JOIN it
                # read every message of the account by its index, at each batch.
                finals = await db.execute_fetchall(
                    "SELECT h.message_id, m.created_at, m.state, m.receiver FROM purge_held h "
                    "CROSS JOIN messages m ON m.id = h.message_id WHERE m.account_id = ? "
                    "AND m.state = 'final' LIMIT ?", (account_id, limit))
                plan.erase.extend((r[0], retention.mask_number(r[3])) for r in finals)
                if finals:
                    marks, params = _in([r[0] for r in finals])
                    await db.execute(f"DELETE FROM purge_held WHERE message_id IN ({marks})",
                                     params)
                await _insert(db, "INSERT OR IGNORE INTO purge_held (message_id)", "(?)",
                              [(i,) for i in plan.hold])
            await _update(db, f"UPDATE {table} SET body = '', {number} = v.column2 "
                          f"FROM (VALUES {{}}) AS v WHERE {table}.id = v.column1",
                          "(?,?)", plan.erase)
            if plan.last_id > through:
                await db.execute(
                    "INSERT INTO purge_progress (account_id, what, erased_through) "
                    "VALUES (?, ?, ?) ON CONFLICT (account_id, what) "
                    "DO UPDATE SET erased_through = excluded.erased_through",
                    (account_id, what, plan.last_id))
            return PurgeStep(erased=len(plan.erase), last_id=plan.last_id, done=plan.done,
                             held=len(plan.hold))

        return await self._transaction(body, yield_for=PURGE_GIVE_WAY)

    async def delete_due(self, account_id: int, what: PurgedRows, *, before: float,
                         after_id: int, limit: int) -> PurgeStep:
        table, _ = _PURGED[what]

        async def body(db: Conn) -> PurgeStep:
            state = "state" if what == "messages" else "'final'"
            rows = await db.execute_fetchall(
                f"SELECT id, created_at, {state} FROM {table} "
                "WHERE account_id = ? AND id > ? ORDER BY id LIMIT ?",
                (account_id, after_id, limit))
            plan = rules.deletion(rows, before, limit)
            if plan.delete:
                await db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                    "SET value = max(CAST(value AS INTEGER), excluded.value)",
                    (_DELETED_THROUGH.format(table=table), max(plan.delete)))
                marks, params = _in(plan.delete)
                if what == "messages":
                    for child in ("message_events", "message_parts", "purge_held"):
                        await db.execute(f"DELETE FROM {child} WHERE message_id IN ({marks})",
                                         params)
                await db.execute(f"DELETE FROM {table} WHERE id IN ({marks})", params)
            return PurgeStep(deleted=len(plan.delete), last_id=plan.last_id or after_id,
                             done=plan.done, held=plan.held)

        return await self._transaction(body, yield_for=PURGE_GIVE_WAY)

    async def delete_outbox_due(self, before: Mapping[int, float | None],
                                default_before: float | None, *, after_id: int,
                                limit: int) -> PurgeStep:
        async def body(db: Conn) -> PurgeStep:
            rows = await db.execute_fetchall(
                "SELECT id, account_id, created_at, state FROM outbox WHERE id > ? "
                "ORDER BY id LIMIT ?", (after_id, limit))
            plan = rules.outbox_deletion(rows, before, default_before, limit)
            if plan.delete:
                marks, params = _in(plan.delete)
                await db.execute(f"DELETE FROM outbox_attempts WHERE outbox_id IN ({marks})",
                                 params)
                await db.execute(f"DELETE FROM outbox WHERE id IN ({marks})", params)
            return PurgeStep(deleted=len(plan.delete), last_id=plan.last_id or after_id,
                             done=plan.done)

        return await self._transaction(body, yield_for=PURGE_GIVE_WAY)

    async def delete_parts_due(self, *, before: float, limit: int) -> PurgeStep:
        async def body(db: Conn) -> PurgeStep:
            cursor = await db.execute(
                "DELETE FROM incoming_parts WHERE rowid IN (SELECT rowid FROM incoming_parts "
                "WHERE created_at < ? LIMIT ?)", (before, limit))
            return PurgeStep(deleted=cursor.rowcount, done=cursor.rowcount < limit)

        return await self._transaction(body, yield_for=PURGE_GIVE_WAY)

    async def purge_preview(self, account_id: int, *, erase_before: float | None,
                            delete_before: float | None) -> dict[str, int]:
        found: dict[str, int] = {}
        for what, (table, _number) in _PURGED.items():
            final = "AND state = 'final'" if what == "messages" else ""
            through = await self._read(
                "SELECT erased_through FROM purge_progress WHERE account_id = ? AND what = ?",
                (account_id, what))
            rows = await self._read(
                f"SELECT COALESCE(SUM(created_at < ? AND id > ? {final}), 0), "
                f"COALESCE(SUM(created_at < ? {final}), 0) FROM {table} WHERE account_id = ?",
                (erase_before if erase_before is not None else float("-inf"),
                 through[0][0] if through else 0,
                 delete_before if delete_before is not None else float("-inf"), account_id))
            found[f"{what}_to_erase"], found[f"{what}_to_delete"] = rows[0]
        return found

    async def erase_number(self, account_id: int, number: str, *,
                           limit: int) -> PurgeStep:
        """The rows are found on the read connection, a page at a time, and erased in
        transactions of at most `limit`: no index by number, and the scan must not hold
        the write lock."""
        erased = held = 0
        for what, (table, column) in _PURGED.items():
            state = "state" if what == "messages" else "'final'"
            after = 0
            while True:
                page = await self._read(
                    f"SELECT id, {column}, {state} FROM {table} WHERE account_id = ? "
                    "AND id > ? ORDER BY id LIMIT ?", (account_id, after, _SCAN_PAGE))
                if not page:
                    break
                after = page[-1][0]
                matching = [row for row in page if row[1] == number]
                held += sum(1 for row in matching if row[2] != "final")
                ids = [row[0] for row in matching if row[2] == "final"]
                for start in range(0, len(ids), limit):
                    erased += await self._erase_ids(table, column, number,
                                                    ids[start:start + limit])

        async def parts(db: Conn) -> None:
            await db.execute(_ERASE_PARTS, (number, account_id))

        await self._transaction(parts, yield_for=PURGE_GIVE_WAY)
        return PurgeStep(erased=erased, held=held)

    async def _erase_ids(self, table: str, column: str, number: str,
                         ids: Sequence[int]) -> int:
        masked = retention.mask_number(number)

        async def body(db: Conn) -> int:
            marks, params = _in(ids)
            cursor = await db.execute(
                f"UPDATE {table} SET body = '', {column} = ? WHERE id IN ({marks}) "
                f"AND {column} = ?", [masked, *params, number])
            return cursor.rowcount

        return await self._transaction(body, yield_for=PURGE_GIVE_WAY)

    async def reclaim_space(self, *, pages: int) -> int:
        """Only a store created with incremental auto-vacuum can give pages back while in
        use (see docs/retention.md); others reuse their free pages for new rows."""
        if self.path == ":memory:" or (await self._read("PRAGMA auto_vacuum"))[0][0] != 2:
            return 0

        async def body(db: Conn) -> int:
            (before,), = await db.execute_fetchall("PRAGMA freelist_count")
            # Each step of the statement frees one page, and sqlite3 steps a statement
            # without result columns once: one run per page.
            for _ in range(min(pages, before)):
                await db.execute("PRAGMA incremental_vacuum(1)")
            (after,), = await db.execute_fetchall("PRAGMA freelist_count")
            return int(before - after)

        return await self._transaction(body, yield_for=PURGE_GIVE_WAY)

    async def store_stats(self) -> StoreStats:
        (page_size,), = await self._read("PRAGMA page_size")
        (pages,), = await self._read("PRAGMA page_count")
        (free,), = await self._read("PRAGMA freelist_count")
        (vacuum,), = await self._read("PRAGMA auto_vacuum")
        rows = {table: (await self._read(f"SELECT count(*) FROM {table}"))[0][0]
                for table in _TABLES}
        oldest = await self._read("SELECT created_at FROM messages ORDER BY id LIMIT 1")
        wal = 0
        with suppress(OSError):
            wal = os.path.getsize(f"{self.path}-wal")
        return StoreStats(
            backend="sqlite", size_bytes=pages * page_size, free_bytes=free * page_size,
            rows=rows, oldest_message_at=oldest[0][0] if oldest else None,
            details={"path": self.path, "wal_bytes": wal,
                     "auto_vacuum": {0: "none", 1: "full", 2: "incremental"}.get(vacuum,
                                                                                str(vacuum))})

    async def export_messages(self, account_id: int, *, created_from: float,
                              created_to: float, login: str | None, after_id: int,
                              limit: int) -> list[Message]:
        params: list[Any] = [account_id, after_id, created_from, created_to]
        by_login = ""
        if login is not None:
            by_login = "AND m.login = ?"
            params.append(login)
        rows = await self._read(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages m JOIN accounts a ON a.id = m.account_id "
            "WHERE m.account_id = ? AND m.id > ? AND m.created_at >= ? AND m.created_at <= ? "
            f"{by_login} ORDER BY m.id LIMIT ?", (*params, limit))
        return [_message(r) for r in rows]

    async def backup(self, path: str) -> None:
        """`VACUUM INTO` on a connection of its own: one read transaction, so the copy is
        the store as one commit left it, while writers go on (WAL: readers block no one)."""
        if self.path == ":memory:":
            raise StoreUnavailable("an in-memory store has nothing to back up")

        def copy() -> None:
            # Created empty first, with the store's own mode: a copy holds as much personal
            # data as the store (VACUUM INTO writes into an empty file).
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             FILE_MODE))
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                conn.execute("VACUUM INTO ?", (path,))
            finally:
                conn.close()

        try:
            await asyncio.to_thread(copy)
        except (sqlite3.Error, OSError) as exc:
            raise StoreUnavailable(f"cannot back up the store to {path}: {exc}") from exc


# Tables of the store's own bookkeeping, never copied: its migrations, its counters.
_BOOKKEEPING = frozenset({"schema_migrations", "meta"})


def _known(schema: dict[str, tuple[tuple[str, ...], tuple[str, ...]]], table: str,
           columns: Sequence[str]) -> tuple[str, str]:
    """`table` and `columns` quoted for SQL, once checked against the schema: names come
    from the other store, never from SQL text."""
    if table not in schema or not set(columns) <= set(schema[table][0]):
        raise StoreUnavailable(f"no table {table!r} with columns {list(columns)} here")
    return f'"{table}"', ", ".join(f'"{c}"' for c in columns)


class _SQLiteSource:
    def __init__(self, conn: aiosqlite.Connection,
                 schema: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]) -> None:
        self._conn = conn
        self._schema = schema

    async def rows(self, table: str, columns: Sequence[str], *,
                   batch: int) -> AsyncIterator[list[tuple[Any, ...]]]:
        name, listed = _known(self._schema, table, columns)
        key = ", ".join(f'"{c}"' for c in self._schema[table][1])
        cursor = await self._conn.execute(f"SELECT {listed} FROM {name} ORDER BY {key}")
        try:
            while rows := await cursor.fetchmany(batch):
                yield [tuple(r) for r in rows]
        finally:
            await cursor.close()

    async def count(self, table: str) -> int:
        name, _ = _known(self._schema, table, ())
        rows = list(await self._conn.execute_fetchall(f"SELECT COUNT(*) FROM {name}"))
        return int(rows[0][0])

    async def counters(self) -> Counters:
        rows = list(await self._conn.execute_fetchall(
            "SELECT (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'settings_version'), "
            f"({_NEXT_ID.format(table='messages')}), "
            f"({_NEXT_ID.format(table='incoming_messages')})"))
        return Counters(int(rows[0][0] or 0), int(rows[0][1]), int(rows[0][2]))


class _SQLiteSink:
    def __init__(self, db: Writer,
                 schema: dict[str, tuple[tuple[str, ...], tuple[str, ...]]]) -> None:
        self._db = db
        self._schema = schema

    async def filled(self) -> list[str]:
        found = []
        for table in sorted(self._schema):
            name, _ = _known(self._schema, table, ())
            if await self._db.execute_fetchall(f"SELECT 1 FROM {name} LIMIT 1"):
                found.append(table)
        return found

    async def add_rows(self, table: str, columns: Sequence[str],
                       rows: Sequence[Sequence[Any]]) -> None:
        name, listed = _known(self._schema, table, columns)
        await self._db.executemany(
            f"INSERT INTO {name} ({listed}) VALUES ({_marks(len(columns))})", rows)

    async def set_settings_versions(self, versions: Sequence[tuple[int, int]]) -> None:
        await self._db.executemany("UPDATE accounts SET settings_version = ? WHERE id = ?",
                                   [(v, i) for i, v in versions])

    async def set_counters(self, counters: Counters) -> None:
        # Message and incoming message ids go past the rows copied and past the source's
        # next ids (which may be past them: its newest rows deleted by the purge); the
        # settings versions' counter goes past every version copied, and past the source's.
        for table, next_id in (("messages", counters.next_message_id),
                               ("incoming_messages", counters.next_incoming_id)):
            await self._db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                "SET value = max(CAST(value AS INTEGER), excluded.value)",
                (_DELETED_THROUGH.format(table=table), next_id - 1))
        await self._db.execute(
            "INSERT INTO meta (key, value) VALUES ('settings_version', max(?, "
            "(SELECT COALESCE(MAX(settings_version), 0) FROM accounts), "
            "COALESCE((SELECT CAST(value AS INTEGER) FROM meta "
            "  WHERE key = 'settings_version'), 0))) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (counters.settings_version,))


# How long a purge transaction gives way to waiting sends (see `Writer.transaction`): at
# most this long, then it takes its turn, holding the lock for one batch (a few ms).
PURGE_GIVE_WAY = 0.05
# Of what the purge walks: its table and the column holding the other party's number.
_PURGED: dict[PurgedRows, tuple[str, str]] = {
    "messages": ("messages", "receiver"),
    "incoming": ("incoming_messages", "sender"),
}
# The parts of the account's long messages from a number, kept after their message was
# whole (to know a part sent again): they hold its text too (erase_number). By the parts'
# primary key (sender first), each part's message by its own.
_ERASE_PARTS = ("DELETE FROM incoming_parts WHERE sender = ? AND incoming_id IN "
                "(SELECT id FROM incoming_messages WHERE id = incoming_parts.incoming_id "
                "AND account_id = ?)")
# Rows read per page when looking for a number (erase_number).
_SCAN_PAGE = 5000
# The tables `store_stats` counts.
_TABLES = ("accounts", "users", "senders", "messages", "message_events", "message_parts",
           "incoming_messages", "outbox", "outbox_attempts", "ledger", "admin_tokens")
