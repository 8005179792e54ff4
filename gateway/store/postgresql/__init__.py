"""The PostgreSQL backend: several gateway nodes on one database (asyncpg, a pool per store).

SQLite gives serializability for free through its single writer; PostgreSQL at READ
COMMITTED does not, so every read-decide-write here runs under row locks taken in one
fixed order:

1. the `accounts` rows the transaction touches, `FOR UPDATE`, by id;
2. then what hangs off them: users (quotas, alert flags), messages (reports), outbox.

Every transaction that moves an account's credits, quotas, alert flags or send settings
takes its account's row first (the settings triggers of migration 0005 update that row as
well), so what a rule in `gateway.store.rules` reads under the lock is what is there when
its transaction commits: one account's changes are serialized as on SQLite, different
accounts' run side by side. Claims take rows `FOR UPDATE SKIP LOCKED` with leases; the
store-wide names of `exclusive` are session advisory locks, let go when their holder's
connection ends (the holder died). Message ids come in blocks from `allocate_message_ids`
(migration 0001), consecutive within one order, never `MAX(id) + 1`.

A transaction that loses a deadlock (PostgreSQL aborts one of two) is run again whole.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, Protocol, TypeVar

import asyncpg
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
    PurgedRows,
    Role,
    StoreError,
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

log = structlog.get_logger("gateway.store")

T = TypeVar("T")


class Conn(Protocol):
    """What the store uses of an asyncpg connection (asyncpg ships no type hints)."""

    async def execute(self, query: str, *args: Any) -> str: ...
    async def executemany(self, command: str, args: Iterable[Sequence[Any]]) -> None: ...
    async def fetch(self, query: str, *args: Any) -> list[Any]: ...
    async def fetchrow(self, query: str, *args: Any) -> Any: ...
    async def fetchval(self, query: str, *args: Any) -> Any: ...
    def transaction(self) -> AbstractAsyncContextManager[Any]: ...

_DUE_DEFERRED = "GREATEST(deferred_until, claimed_until)"

# How many due outbox items a claim looks at (and locks), per item it may take.
CLAIM_WINDOW = 4

# The first key of every advisory lock the gateway takes (the second: the name's hash),
# so that other applications' advisory locks on the same database never collide with ours.
_LOCK_SPACE = 0x48325320  # "H2S "
_MIGRATION_LOCK = 0

# How often the connection holding an `exclusive` lock is checked, when nothing says it
# ended: the longest a holder may go on after a silent cut, before it learns it.
LOCK_CHECK_SECONDS = 2.0

# The channels of the wake-ups (LISTEN/NOTIFY), by topic. A notification's payload is the
# id of the store instance that committed (`PostgreSQLStore._instance`): its own are
# ignored, its process knows of them already.
CHANNELS: dict[Topic, str] = {"messages": "http2sms_messages", "outbox": "http2sms_outbox"}
# A listener whose connection ended connects again after this long; a live one checks its
# connection this often (a cut without a word is noticed by no one else).
LISTEN_RETRY_SECONDS = 1.0
LISTEN_CHECK_SECONDS = 10.0

# Connections per store, by role: the send process commits batches from many requests,
# the delivery worker a few transactions at a time, the CLI one.
_POOL_SIZES: dict[Role, int] = {"send": 10, "delivery": 4, "cli": 4}

# The delivery worker does not wait for its commits to reach the disk: each is redone if
# lost (a report not stored leaves its message to be resumed, a callback result not
# stored sends the callback again), as its SQLite role does not sync its own commits.
_SERVER_SETTINGS: dict[Role, dict[str, str]] = {
    "send": {}, "delivery": {"synchronous_commit": "off"}, "cli": {},
}

# Group commits the send process keeps in flight (SendStore.concurrent_commits). Measured
# in docs/benchmark.md; each holds one of the pool's connections while it commits.
_CONCURRENT_COMMITS = 2

# A deadlock costs one of its transactions; it runs again, up to this many times.
_RETRIES = 5

# The database, not the request, is at fault: down, restarting, out of connections. The
# client's errors are in too: a connection the server cut in the middle of an exchange
# leaves asyncpg's protocol unusable ("cannot switch to state ...", InternalClientError)
# or closed (InterfaceError); the pool replaces it on release.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresConnectionError, asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError, asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError, asyncpg.ReadOnlySQLTransactionError,
    asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError,
)
_RETRIED: tuple[type[BaseException], ...] = (
    asyncpg.DeadlockDetectedError, asyncpg.SerializationError,
)


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """`rows` as `width` columns: arrays for `unnest`."""
    return [list(column) for column in zip(*rows, strict=True)] if rows else \
        [[] for _ in range(width)]


# Everything an accepted batch of sends writes, in one statement (one round trip, where a
# statement per table cost one each): its messages, their first event, its ledger entries,
# the new balances and quotas, and the wake-up of the other nodes' delivery (delivered at
# the commit, never before: `n`, joined to the messages so that it runs). Rows come as
# column arrays ($2-$18 messages, $19-$25 ledger, $26-$29 balances and quotas); $1 is the
# time of the commit, $30 the id of the store instance committing. It answers whether a
# user of the accounts charged ($31) watches its credits (an alert threshold): only then
# are the alerts evaluated, in another statement (a round trip saved on every other
# commit). Its snapshot is taken with the accounts locked, so a threshold set meanwhile
# is seen.
_STORE_SENDS = """
WITH n AS MATERIALIZED (
    SELECT pg_notify('http2sms_messages', $30::text)
), m AS (
    INSERT INTO messages (id, account_id, user_id, login, kind, sender, receiver, body,
        coding, parts, class, no_stop, tag, credits, charged_to, created_at, deferred_until,
        state, dlr, updated_at)
    SELECT r.id, r.account_id, r.user_id, r.login, r.kind, r.sender, r.receiver, r.body,
        r.coding, r.parts, r.class, r.no_stop, r.tag, r.credits, r.charged_to, $1,
        r.deferred_until, r.state, 0, $1
    FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::text[],
        $8::text[], $9::text[], $10::int[], $11::int[], $12::int[], $13::bool[], $14::text[],
        $15::bigint[], $16::text[], $17::float8[], $18::text[])
        AS r(id, account_id, user_id, login, kind, sender, receiver, body, coding, parts,
             class, no_stop, tag, credits, charged_to, deferred_until, state)
        CROSS JOIN n
    RETURNING id, state
), e AS (
    INSERT INTO message_events (message_id, at, ptt, dlr, note)
    SELECT id, $1, NULL, 0, CASE WHEN state = 'deferred' THEN 'deferred' ELSE 'accepted' END
    FROM m
), l AS (
    INSERT INTO ledger (at, account_id, user_id, login, kind, source, target, amount,
        reference)
    SELECT $1, r.account_id, r.user_id, r.login, r.kind, r.source, 'spent', r.amount,
        r.reference
    FROM unnest($19::bigint[], $20::bigint[], $21::text[], $22::text[], $23::text[],
        $24::bigint[], $25::text[]) WITH ORDINALITY
        AS r(account_id, user_id, login, kind, source, amount, reference, n)
    ORDER BY r.n
), b AS (
    UPDATE accounts SET balance = r.balance
    FROM unnest($26::bigint[], $27::bigint[]) AS r(id, balance) WHERE accounts.id = r.id
), q AS (
    UPDATE users SET quota_left = r.quota
    FROM unnest($28::bigint[], $29::bigint[]) AS r(id, quota) WHERE users.id = r.id
)
SELECT EXISTS (SELECT 1 FROM users WHERE account_id = ANY($31::bigint[])
               AND alert_threshold IS NOT NULL)
"""

# The accounts of a batch of sends locked (by id), then the rows of its users (by id), in
# one statement, one round trip. The users' rows are locked too, and not only read: at READ
# COMMITTED a statement reads a row it locks as last committed (once the lock is granted),
# any other row as it was when the statement began, maybe before a quota change that
# committed while this one waited for its account.
_LOCK_SENDS = """
WITH a AS MATERIALIZED (
    SELECT id, balance, settings_version FROM accounts WHERE id = ANY($1::bigint[])
    ORDER BY id FOR UPDATE
), u AS MATERIALIZED (
    SELECT id, quota_active, quota_left FROM users WHERE id = ANY($2::bigint[])
    ORDER BY id FOR UPDATE
)
SELECT true, id, balance, settings_version, NULL::boolean FROM a
UNION ALL SELECT false, id, quota_left, NULL::bigint, quota_active FROM u
"""


async def _keep_session(_conn: Any) -> None:
    """What a connection given back to the pool needs undone: nothing. The store leaves no
    session state on its pool's connections (its settings are per transaction, its
    advisory locks and LISTENs have connections of their own, the migrations' lock is let
    go of by hand), and asyncpg's default reset (UNLISTEN, RESET ALL...) cost a round trip
    on every release, one per group commit. A transaction left open is still rolled back
    (asyncpg does that before calling this)."""


def _lose(held: Held, reason: str) -> None:
    if held.lose(reason):
        log.error("store_lock_lost", name=held.name, reason=reason)


def _count(status: str) -> int:
    """Rows a command changed, from its status ("UPDATE 3")."""
    return int(status.rsplit(" ", 1)[-1])


def _migrations() -> list[tuple[int, str, str]]:
    folder = resources.files("gateway.store.postgresql") / "migrations"
    found = []
    for item in folder.iterdir():
        if item.name.endswith(".sql"):
            found.append((int(item.name.split("_", 1)[0]), item.name,
                          item.read_text(encoding="utf-8")))
    return sorted(found)


async def _keep_incoming(db: Conn, owner: tuple[int, str], reference: str, sender: str,
                         receiver: str, body: str, at: float) -> int:
    return int(await db.fetchval(
        "INSERT INTO incoming_messages (account_id, reference, sender, receiver, body, tag, "
        "created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        owner[0], reference, sender, receiver, body, owner[1], at))


async def _add_part(db: Conn, part: IncomingPart, owner: tuple[int, str] | None) -> int | None:
    """As the SQLite store's: keep one part, and its message once whole."""
    key = (part.sender, part.receiver, part.group, part.total)
    where = "sender = $1 AND receiver = $2 AND group_ref = $3 AND total = $4"
    found = await db.fetchrow(
        f"SELECT reference, incoming_id FROM incoming_parts WHERE {where} AND seq = $5",
        *key, part.seq)
    if found is not None and found[0] == part.reference:  # sent again
        return None if found[1] is None else int(found[1])
    if found is not None:  # another message took up the same reference
        await db.execute(f"DELETE FROM incoming_parts WHERE {where}", *key)
    await db.execute(
        "INSERT INTO incoming_parts (sender, receiver, group_ref, total, seq, reference, body, "
        "created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", *key, part.seq,
        part.reference, part.body, part.created_at)
    rows = await db.fetch(
        f"SELECT seq, body, reference FROM incoming_parts WHERE {where} "
        "AND incoming_id IS NULL ORDER BY seq", *key)
    text = rules.whole_text(part.total, [(int(r[0]), r[1]) for r in rows])
    if text is None:
        return None
    new_id = 0 if owner is None else await _keep_incoming(
        db, owner, rows[0][2], part.sender, part.receiver, text, part.created_at)
    await db.execute(f"UPDATE incoming_parts SET incoming_id = $5 WHERE {where} "
                     "AND incoming_id IS NULL", *key, new_id)
    return new_id


class PostgreSQLStore:
    # Group commits in flight at once (by account, see gateway.send.batcher): one's round
    # trips and WAL flush overlap the other's, and their flushes are shared.
    concurrent_commits = _CONCURRENT_COMMITS

    def __init__(self, location: str, *, role: Role = "cli",
                 busy_timeout: float | None = None) -> None:
        """Built by `gateway.store.open_store` from a `postgresql://` URL (`location`: what
        follows the scheme); `busy_timeout` None: 10 seconds to get a connection or a lock.
        """
        self.dsn = f"postgresql://{location}"
        self._role = role
        self._timeout = 10.0 if busy_timeout is None else busy_timeout
        self._pool: Any = None  # an asyncpg.Pool
        self._contexts: dict[tuple[str, str], SendContext] = {}
        self._keys_by_account: dict[int, set[tuple[str, str]]] = {}
        self._versions: dict[int, int] = {}
        self._ids_conn: Any = None  # an asyncpg.Connection, see _message_ids
        self._ids_lock = asyncio.Lock()
        # Names this store's notifications, so that its own listeners pass them over.
        self._instance = secrets.token_hex(8)

    def __repr__(self) -> str:
        return f"PostgreSQLStore(role={self._role!r})"  # never the URL: it may hold a password

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        try:
            try:
                self._pool = await asyncpg.create_pool(
                    self.dsn, min_size=1, max_size=_POOL_SIZES[self._role],
                    timeout=self._timeout, command_timeout=None, reset=_keep_session,
                    server_settings={"application_name": f"http2sms-{self._role}",
                                     **_SERVER_SETTINGS[self._role]})
            except ValueError as exc:
                # asyncpg's parsing of the URL (a port that is not a number, a broken
                # IPv6 host): its message names the part, never the password.
                raise StoreUnavailable(f"cannot open the PostgreSQL store: a malformed "
                                       f"URL ({exc})") from None
            await self._migrate()
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open the PostgreSQL store: {exc}") from exc

    async def close(self) -> None:
        ids, self._ids_conn = self._ids_conn, None
        if ids is not None:
            ids.terminate()
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._timeout)
            except (TimeoutError, *_UNAVAILABLE, asyncpg.PostgresError):
                pool.terminate()

    async def _migrate(self) -> None:
        """Apply the migrations not yet applied, each in its transaction, under an advisory
        lock: nodes starting at once take turns, and the later ones find nothing to do."""
        assert self._pool is not None
        async with self._pool.acquire() as conn:
            await conn.execute("SELECT pg_advisory_lock($1, $2)", _LOCK_SPACE, _MIGRATION_LOCK)
            try:
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                    "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
                done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
                for version, name, sql in _migrations():
                    if version in done:
                        continue
                    async with conn.transaction():
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                            version, name)
                    log.info("store_migrated", version=version, name=name)
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1, $2)", _LOCK_SPACE,
                                   _MIGRATION_LOCK)

    @asynccontextmanager
    async def exclusive(self, name: str, *, wait: bool = False,
                        shared: bool = False) -> AsyncIterator[Held]:
        """A session advisory lock (shared when `shared`) on a connection of its own, held
        for the block: the server lets go of it when the connection ends, so a holder that
        dies lets go.

        The connection ending under a live holder (the database restarted or failed over,
        an administrator ended the session, the network cut it) lets go of the lock too:
        another node may take it at once. The holder learns it from `Held.lost`, set as
        soon as the client sees the connection close, or when it fails to answer a check
        (every LOCK_CHECK_SECONDS) for a connection cut silently."""
        if not name.replace("-", "").isalnum():
            raise ValueError(f"a lock name is letters, digits and dashes: {name!r}")
        try:
            conn = await asyncpg.connect(self.dsn, timeout=self._timeout)
        except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
            raise StoreUnavailable(f"cannot lock {name!r}: {exc}") from exc
        held = Held(name)
        watch: asyncio.Task[None] | None = None
        try:
            try:
                take = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
                while not await conn.fetchval(f"SELECT {take}($1, hashtext($2))",
                                              _LOCK_SPACE, name):
                    if not wait:
                        raise Taken(f"{name!r} is held by another process on the store")
                    await asyncio.sleep(0.1)
            except (asyncpg.PostgresError, *_UNAVAILABLE) as exc:
                raise StoreUnavailable(f"cannot lock {name!r}: {exc}") from exc
            conn.add_termination_listener(
                lambda _conn: _lose(held, "its connection to the database ended"))
            watch = asyncio.create_task(self._watch_lock(conn, held), name=f"lock-{name}")
            yield held
        finally:
            held.released = True  # let go of on purpose from here: not lost
            if watch is not None:
                watch.cancel()
                with suppress(asyncio.CancelledError):
                    await watch
            # Closing the session releases its locks; no unlock to forget on any path.
            try:
                await asyncio.wait_for(conn.close(), self._timeout)
            except (TimeoutError, *_UNAVAILABLE, asyncpg.PostgresError):
                conn.terminate()

    async def _watch_lock(self, conn: Any, held: Held) -> None:
        """Check the lock's connection every LOCK_CHECK_SECONDS: a connection cut without
        a word (a network partition) is noticed by no one else."""
        while not (held.lost.is_set() or held.released):
            with suppress(TimeoutError):
                await asyncio.wait_for(held.lost.wait(), LOCK_CHECK_SECONDS)
                return
            try:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), self._timeout)
            except (TimeoutError, *_UNAVAILABLE, asyncpg.PostgresError) as exc:
                _lose(held, f"its connection to the database does not answer: {exc}")
                conn.terminate()

    @asynccontextmanager
    async def wake_ups(self, callbacks: Mapping[Topic, Callable[[], None]]
                       ) -> AsyncIterator[None]:
        """LISTEN on the topics' channels (CHANNELS), on a connection of its own, connected
        again whenever it ends (each callback then runs once, for what it missed)."""
        listening = asyncio.create_task(self._listen(dict(callbacks)), name="store-wake-ups")
        try:
            yield
        finally:
            listening.cancel()
            with suppress(asyncio.CancelledError):
                await listening

    async def _listen(self, callbacks: dict[Topic, Callable[[], None]]) -> None:
        missed = False
        while True:
            conn: Any = None
            ended = asyncio.Event()
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=self._timeout,
                    server_settings={"application_name": f"http2sms-{self._role}-wake-ups"})
                conn.add_termination_listener(lambda _conn, event=ended: event.set())
                for topic, callback in callbacks.items():
                    await conn.add_listener(CHANNELS[topic], self._woken(callback))
                if missed:
                    log.info("store_wake_ups_back")
                    for callback in callbacks.values():
                        callback()
                missed = True
                while not ended.is_set():
                    with suppress(TimeoutError):
                        await asyncio.wait_for(ended.wait(), LISTEN_CHECK_SECONDS)
                        break
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), self._timeout)
                log.warning("store_wake_ups_lost", retry_in=LISTEN_RETRY_SECONDS)
            except (TimeoutError, asyncpg.PostgresError, *_UNAVAILABLE) as exc:
                missed = True
                log.warning("store_wake_ups_failed", error=str(exc),
                            retry_in=LISTEN_RETRY_SECONDS)
            finally:
                if conn is not None:
                    conn.terminate()
            await asyncio.sleep(LISTEN_RETRY_SECONDS)

    def _woken(self, callback: Callable[[], None]) -> Callable[[Any, int, str, str], None]:
        def notified(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            if payload != self._instance:
                callback()

        return notified

    def _acquire(self) -> Any:
        if self._pool is None:
            raise StoreUnavailable("the store is closed")
        return self._pool.acquire(timeout=self._timeout)

    async def _transaction(self, body: Callable[[Conn], Coroutine[Any, Any, T]]) -> T:
        """Run `body` in one transaction, again whole if it lost a deadlock."""
        for attempt in range(_RETRIES):
            try:
                async with self._acquire() as conn, conn.transaction():
                    return await body(conn)
            except _RETRIED:
                if attempt == _RETRIES - 1:
                    raise
                await asyncio.sleep(0.01 * (attempt + 1))
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise Conflict(str(exc)) from exc
            except _UNAVAILABLE as exc:
                raise StoreUnavailable(f"cannot write to the store: {exc}") from exc
        raise AssertionError("unreachable")

    async def _read(self, sql: str, *params: Any) -> list[Any]:
        try:
            async with self._acquire() as conn:
                return list(await conn.fetch(sql, *params))
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot read the store: {exc}") from exc

    async def check_writable(self) -> None:
        async def body(db: Conn) -> None:
            await db.execute("INSERT INTO meta (key, value) VALUES ('ready', '1') "
                             "ON CONFLICT (key) DO UPDATE SET value = excluded.value")

        await self._transaction(body)

    # -- accounts and senders --------------------------------------------------------

    @staticmethod
    async def _lock_account(db: Conn, name: str) -> int:
        """The account's id, its row locked until the transaction ends (see the module)."""
        account_id = await db.fetchval("SELECT id FROM accounts WHERE name = $1 FOR UPDATE",
                                       name)
        if account_id is None:
            raise NotFound(f"unknown account {name!r}")
        return int(account_id)

    @staticmethod
    async def _lock_accounts(db: Conn, account_ids: Iterable[int]) -> list[Any]:
        """(id, balance, settings_version) of the accounts, locked in id order."""
        return list(await db.fetch(
            "SELECT id, balance, settings_version FROM accounts WHERE id = ANY($1::bigint[]) "
            "ORDER BY id FOR UPDATE", sorted(set(account_ids))))

    async def create_account(self, name: str, balance: int, *, at: float) -> Account:
        async def body(db: Conn) -> None:
            try:
                account_id = await db.fetchval(
                    "INSERT INTO accounts (name, balance, created_at) VALUES ($1, $2, $3) "
                    "RETURNING id", name, balance, at)
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(f"account {name!r} already exists") from exc
            if balance:
                await self._ledger(db, at, account_id, None, None, "purchase", "outside",
                                   "account", balance, "initial credits")

        await self._transaction(body)
        return await self.get_account(name)

    async def get_account(self, name: str) -> Account:
        rows = await self._read(
            "SELECT a.id, a.name, a.balance, a.callback_url, a.stop_clause, "
            "(SELECT string_agg(sender, E'\\n' ORDER BY sender) FROM senders "
            "  WHERE account_id = a.id), "
            "(SELECT COALESCE(SUM(quota_left), 0)::bigint FROM users WHERE account_id = a.id "
            "   AND quota_active), "
            "(SELECT COUNT(*) FROM users WHERE account_id = a.id AND quota_active) "
            "FROM accounts a WHERE a.name = $1", name)
        if not rows:
            raise NotFound(f"unknown account {name!r}")
        r = rows[0]
        senders = tuple(r[5].split("\n")) if r[5] else ()
        return Account(r[0], r[1], r[2], r[3], r[4], senders, r[6], r[7])

    async def list_accounts(self) -> list[str]:
        return [r[0] for r in await self._read("SELECT name FROM accounts ORDER BY name")]

    async def credit_account(self, name: str, amount: int, *, at: float) -> Account:
        async def body(db: Conn) -> None:
            account_id = await self._lock_account(db, name)
            holdings = await db.fetchval(
                "SELECT a.balance + (SELECT COALESCE(SUM(quota_left), 0) FROM users "
                "  WHERE account_id = a.id AND quota_active) "
                "+ (SELECT COALESCE(SUM(credits), 0) FROM messages "
                "  WHERE account_id = a.id AND state <> 'final') FROM accounts a WHERE a.id = $1",
                account_id)
            rules.top_up(int(holdings), amount)
            await db.execute("UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                             amount, account_id)
            await self._ledger(db, at, account_id, None, None, "purchase", "outside", "account",
                               amount, "top-up")
            await self._evaluate_alerts(db, [account_id], at)

        await self._transaction(body)
        return await self.get_account(name)

    async def update_account(self, name: str, *, callback_url: Any = UNSET,
                             stop_clause: Any = UNSET, at: float | None = None) -> Account:
        async def body(db: Conn) -> None:
            account_id = await self._lock_account(db, name)
            if callback_url is not UNSET:
                await db.execute("UPDATE accounts SET callback_url = $1 WHERE id = $2",
                                 callback_url, account_id)
                await self._follow_callback_urls(db, account_id,
                                                 time.time() if at is None else at)
            if stop_clause is not UNSET:
                await db.execute("UPDATE accounts SET stop_clause = $1 WHERE id = $2",
                                 stop_clause, account_id)

        await self._transaction(body)
        return await self.get_account(name)

    async def add_sender(self, account: str, sender: str) -> None:
        async def body(db: Conn) -> None:
            account_id = await self._lock_account(db, account)
            try:
                await db.execute("INSERT INTO senders (account_id, sender) VALUES ($1, $2)",
                                 account_id, sender)
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(f"sender {sender!r} is already declared") from exc

        await self._transaction(body)

    async def remove_sender(self, account: str, sender: str) -> None:
        async def body(db: Conn) -> None:
            account_id = await self._lock_account(db, account)
            status = await db.execute(
                "DELETE FROM senders WHERE account_id = $1 AND sender = $2", account_id, sender)
            if _count(status) == 0:
                raise NotFound(f"unknown sender {sender!r}")

        await self._transaction(body)

    # -- API users -------------------------------------------------------------------

    async def create_user(self, account: str, login: str, password_hash: str, *,
                          at: float) -> User:
        async def body(db: Conn) -> None:
            account_id = await self._lock_account(db, account)
            try:
                await db.execute(
                    "INSERT INTO users (account_id, login, password_hash, created_at) "
                    "VALUES ($1, $2, $3, $4)", account_id, login, password_hash, at)
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(f"user {login!r} already exists in {account!r}") from exc

        await self._transaction(body)
        return await self.get_user(account, login)

    @staticmethod
    async def _fetch_user(db: Conn, account: str, login: str) -> User:
        row = await db.fetchrow(
            f"SELECT {_USER_COLUMNS} FROM users u JOIN accounts a ON a.id = u.account_id "
            "WHERE a.name = $1 AND u.login = $2", account, login)
        if row is None:
            if await db.fetchval("SELECT id FROM accounts WHERE name = $1", account) is None:
                raise NotFound(f"unknown account {account!r}")
            raise NotFound(f"unknown user {login!r} in {account!r}")
        return _user(row)

    async def get_user(self, account: str, login: str) -> User:
        try:
            async with self._acquire() as conn:
                return await self._fetch_user(conn, account, login)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot read the store: {exc}") from exc

    async def list_users(self, account: str) -> list[str]:
        rows = await self._read(
            "SELECT a.id, u.login FROM accounts a LEFT JOIN users u ON u.account_id = a.id "
            "WHERE a.name = $1 ORDER BY u.login", account)
        if not rows:
            raise NotFound(f"unknown account {account!r}")
        return [r[1] for r in rows if r[1] is not None]

    async def update_user(self, account: str, login: str, changes: UserChanges, *,
                          at: float, check: Callable[[User], None] | None = None) -> User:
        given = changes.given()

        async def body(db: Conn) -> User:
            await self._lock_account(db, account)
            user = await self._fetch_user(db, account, login)
            if check is not None:
                check(user)
            todo = dict(given)
            if "quota" in todo:
                await self._set_quota(db, user, todo.pop("quota"), at)
            for column in ("password_hash", "callback_url", "alert_threshold",
                           "alert_support", "alert_email", "alert_number"):
                if column in todo:
                    await db.execute(f"UPDATE users SET {column} = $1 WHERE id = $2",
                                     todo[column], user.id)
            if "ip_restrictions" in todo:
                await db.execute("UPDATE users SET ip_restrictions = $1 WHERE id = $2",
                                 json.dumps(list(todo["ip_restrictions"])), user.id)
            if "callback_url" in todo:
                await self._follow_callback_urls(db, user.account_id, at)
            threshold = todo.get("alert_threshold", user.alert_threshold)
            if threshold != user.alert_threshold:
                spendable = await db.fetchval(
                    f"SELECT {_SPENDABLE} FROM users u JOIN accounts a ON a.id = u.account_id "
                    "WHERE u.id = $1", user.id)
                await db.execute("UPDATE users SET alert_armed = $1 WHERE id = $2",
                                 rules.armed_on_new_threshold(spendable, threshold), user.id)
            await self._evaluate_alerts(db, [user.account_id], at)
            return await self._fetch_user(db, account, login)

        return await self._transaction(body)

    async def _set_quota(self, db: Conn, user: User, quota: int | None, at: float) -> None:
        """Move credits between the account and the user's quota, as OVH does; the
        account's row is locked by the caller."""
        balance = await db.fetchval("SELECT balance FROM accounts WHERE id = $1",
                                    user.account_id)
        if quota is None:
            if user.quota_active:
                await self._move_quota(db, user, -user.quota_left, at)
                await db.execute(
                    "UPDATE users SET quota_active = false, quota_left = 0 WHERE id = $1",
                    user.id)
            return
        delta = rules.quota_move(quota, user.quota_left if user.quota_active else 0, balance)
        await self._move_quota(db, user, delta, at)
        await db.execute("UPDATE users SET quota_active = true, quota_left = $1 WHERE id = $2",
                         quota, user.id)

    async def _move_quota(self, db: Conn, user: User, delta: int, at: float) -> None:
        if delta == 0:
            return
        await db.execute("UPDATE accounts SET balance = balance - $1 WHERE id = $2",
                         delta, user.account_id)
        source, target = ("account", "quota") if delta > 0 else ("quota", "account")
        await self._ledger(db, at, user.account_id, user.id, user.login, "quota", source,
                           target, abs(delta), "quota change")

    async def delete_user(self, account: str, login: str, *, at: float) -> None:
        async def body(db: Conn) -> None:
            await self._lock_account(db, account)
            user = await self._fetch_user(db, account, login)
            if user.quota_active and user.quota_left:
                await self._move_quota(db, user, -user.quota_left, at)
            await db.execute("DELETE FROM users WHERE id = $1", user.id)
            await db.execute("UPDATE messages SET user_id = NULL WHERE user_id = $1", user.id)
            await db.execute("UPDATE outbox SET user_id = NULL WHERE user_id = $1", user.id)
            await self._follow_callback_urls(db, user.account_id, at)
            await self._evaluate_alerts(db, [user.account_id], at)

        await self._transaction(body)

    # -- the send path ---------------------------------------------------------------

    async def send_context(self, account: str, login: str, *,
                           fresh: bool = False) -> SendContext | None:
        """The user's send settings, from memory while its account's version holds (see
        SQLiteStore.send_context: `commit_sends` refuses orders checked at an old one)."""
        cached = None if fresh else self._contexts.get((account, login))
        if cached is not None:
            return cached
        rows = await self._read(
            f"SELECT {_USER_COLUMNS}, a.stop_clause, "
            "(SELECT string_agg(sender, E'\\n') FROM senders WHERE account_id = a.id), "
            "a.settings_version "
            "FROM users u JOIN accounts a ON a.id = u.account_id "
            "WHERE a.name = $1 AND u.login = $2", account, login)
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
        """Charge and store a batch of sends in one transaction, its accounts' rows locked
        (by id) from the read of their balances and versions to the commit."""
        account_ids = sorted({o.account_id for o in orders})
        user_ids = sorted({o.user_id for o in orders if o.user_id is not None})

        async def body(db: Conn) -> list[SendOutcome]:
            return await self._commit_sends(db, orders, at, account_ids, user_ids)

        return await self._transaction(body)

    async def _message_ids(self, count: int) -> int:
        """The first of `count` consecutive new message ids.

        Taken on a connection of its own, in a transaction of its own (see
        allocate_message_ids, migration 0001): in the send's transaction the counter's row
        would stay locked until that commit, and every send would wait for the one before.
        Ids of a send that then rolls back are never used: ids may have gaps, never twins.
        """
        async with self._ids_lock:
            for attempt in (1, 2):
                if self._ids_conn is None or self._ids_conn.is_closed():
                    self._ids_conn = await asyncpg.connect(self.dsn, timeout=self._timeout)
                try:
                    return int(await self._ids_conn.fetchval(
                        "SELECT allocate_message_ids($1)", count))
                except _UNAVAILABLE:
                    self._ids_conn.terminate()
                    self._ids_conn = None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    async def _commit_sends(self, db: Conn, orders: Sequence[SendOrder], at: float,
                            account_ids: list[int], user_ids: list[int]) -> list[SendOutcome]:
        balances: dict[int, int] = {}
        versions: dict[int, int] = {}
        quotas: dict[int, int | None] = {}
        for is_account, row_id, amount, version, active in await db.fetch(
                _LOCK_SENDS, account_ids, user_ids):
            if is_account:
                balances[row_id] = amount
                versions[row_id] = version
            else:
                quotas[row_id] = amount if active else None
        for account_id in account_ids:
            self._note_settings_version(account_id, versions.get(account_id))
        funds = rules.Funds(balances, quotas)
        decided = rules.decide_sends(orders, funds, at=at, first_id=1, versions=versions)
        if not decided.accepted:
            return decided.outcomes
        # Ids for the accepted orders only, then the same (pure) decision with them.
        wanted = sum(len(sent.ids) for sent in decided.accepted)
        decided = rules.decide_sends(orders, funds, at=at,
                                     first_id=await self._message_ids(wanted),
                                     versions=versions)
        outcomes = decided.outcomes
        messages: list[tuple[Any, ...]] = []
        ledger: list[tuple[Any, ...]] = []
        for sent in decided.accepted:
            order, deferred, state = sent.order, sent.deferred_until, sent.state
            for message_id, receiver, cost in zip(sent.ids, order.recipients, order.costs,
                                                  strict=True):
                messages.append((
                    message_id, order.account_id, order.user_id, order.login, order.kind,
                    order.sender, receiver, order.body, order.coding, order.parts,
                    order.klass, bool(order.no_stop), order.tag, cost, sent.charged_to,
                    deferred, state))
            ledger.append((order.account_id, order.user_id, order.login, sent.ledger_kind,
                           sent.charged_to, order.total, sent.reference))
        touched = sorted({sent.order.account_id for sent in decided.accepted})
        watched = await db.fetchval(
            _STORE_SENDS, at, *_columns(messages, 17), *_columns(ledger, 7),
            list(decided.balances), list(decided.balances.values()), list(decided.quotas),
            list(decided.quotas.values()), self._instance, touched)
        if watched and await self._evaluate_alerts(db, touched, at):
            outcomes = [replace(o, alert_queued=True) if o.accepted else o for o in outcomes]
        return outcomes

    async def _evaluate_alerts(self, db: Conn, account_ids: Iterable[int], at: float) -> int:
        """Fire the low-credit alerts crossed by this transaction and re-arm the others
        (`rules.evaluate_alerts`), the accounts' rows locked by the caller: concurrent
        crossings, from any node, see one armed flag."""
        ids = sorted(set(account_ids))
        if not ids:
            return 0
        watched = await db.fetch(
            f"SELECT u.id, u.account_id, a.name, u.login, u.alert_threshold, u.alert_support, "
            f"u.alert_email, u.alert_number, u.alert_armed, {_SPENDABLE}, u.quota_active "
            "FROM users u JOIN accounts a ON a.id = u.account_id "
            "WHERE u.account_id = ANY($1::bigint[]) AND u.alert_threshold IS NOT NULL", ids)
        if not watched:
            return 0
        plan = rules.evaluate_alerts(rules.Watch._make(tuple(r)) for r in watched)
        flags = [(False, uid) for uid in plan.disarm] + [(True, uid) for uid in plan.rearm]
        if flags:
            await db.executemany("UPDATE users SET alert_armed = $1 WHERE id = $2", flags)
        if plan.items:
            await db.executemany(
                "INSERT INTO outbox (kind, account_id, user_id, target, payload, created_at, "
                "next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                [(i.kind, i.account_id, i.user_id, i.target, json.dumps(i.payload), at, at)
                 for i in plan.items])
            await self._notify(db, "outbox")
        return len(plan.items)

    async def _notify(self, db: Conn, topic: Topic) -> None:
        """Wake the other nodes' listeners of `topic` when this transaction commits."""
        await db.execute("SELECT pg_notify($1, $2)", CHANNELS[topic], self._instance)

    @staticmethod
    async def _ledger(db: Conn, at: float, account_id: int, user_id: int | None,
                      login: str | None, kind: str, source: str, target: str, amount: int,
                      reference: str) -> None:
        await db.execute(
            "INSERT INTO ledger (at, account_id, user_id, login, kind, source, target, amount, "
            "reference) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            at, account_id, user_id, login, kind, source, target, amount, reference)

    # -- delivery --------------------------------------------------------------------

    async def mark_sent(self, ids: Sequence[int], *, at: float,
                        references: Sequence[SentMessage] = ()) -> None:
        if not ids:
            return

        async def body(db: Conn) -> None:
            await db.execute(
                "UPDATE messages SET state = 'sent', sent_at = $1, updated_at = $1 "
                f"WHERE id = ANY($2::bigint[]) AND {_CLAIMABLE}", at, list(ids))
            parts = [(reference, m.message_id, part)
                     for m in references for part, reference in enumerate(m.references, 1)]
            if parts:
                await db.executemany(
                    "INSERT INTO message_parts (reference, message_id, part) "
                    "VALUES ($1, $2, $3) ON CONFLICT (reference) DO UPDATE "
                    "SET message_id = excluded.message_id, part = excluded.part", parts)

        await self._transaction(body)

    async def apply_updates(self, updates: Sequence[StateUpdate]) -> AppliedUpdates:
        """State changes, their callbacks and refunds in one transaction; the accounts'
        rows locked first (by id), then the messages' (by id), as every writer does."""
        if not updates:
            return AppliedUpdates()

        async def body(db: Conn) -> AppliedUpdates:
            return await self._apply_updates(db, updates)

        return await self._transaction(body)

    @staticmethod
    async def _lock_messages(db: Conn, ids: Sequence[int]) -> None:
        """The messages' accounts locked (by id), then the messages (by id)."""
        accounts = [r[0] for r in await db.fetch(
            "SELECT DISTINCT account_id FROM messages WHERE id = ANY($1::bigint[])", ids)]
        await PostgreSQLStore._lock_accounts(db, accounts)
        await db.execute("SELECT 1 FROM messages WHERE id = ANY($1::bigint[]) ORDER BY id "
                         "FOR UPDATE", ids)

    async def _apply_updates(self, db: Conn, updates: Sequence[StateUpdate]
                             ) -> AppliedUpdates:
        """`apply_updates` inside the caller's transaction (which may hold the locks
        already: taken again, in the same order, they cost nothing).

        Only the accounts of the messages an update may refund (`rules.may_refund`) are
        locked: the messages' own locks keep a report applied twice from acting twice, and
        a batch of reports holding every account's row until its commit held up the sends
        of all those accounts (docs/benchmark.md, 7 December)."""
        if not updates:
            return AppliedUpdates()
        ids = sorted({u.message_id for u in updates})
        refunding = sorted({u.message_id for u in updates if rules.may_refund(u)})
        locked: set[int] = set()
        if refunding:
            locked = {r[0] for r in await db.fetch(
                "SELECT DISTINCT account_id FROM messages WHERE id = ANY($1::bigint[])",
                refunding)}
            await self._lock_accounts(db, locked)
        rows = await db.fetch(
            "SELECT m.id, m.state, m.account_id, m.user_id, m.charged_to, m.credits, "
            "m.tag, m.login, COALESCE(u.callback_url, a.callback_url), u.quota_active, "
            "COALESCE(m.deferred_until, m.created_at) "
            "FROM messages m JOIN accounts a ON a.id = m.account_id "
            "LEFT JOIN users u ON u.id = m.user_id AND u.account_id = m.account_id "
            "WHERE m.id = ANY($1::bigint[]) ORDER BY m.id FOR UPDATE OF m", ids)
        plan = rules.plan_updates(updates,
                                  {r[0]: rules.Pending._make(tuple(r)) for r in rows})
        if plan.changes:
            await db.executemany(
                "UPDATE messages SET ptt = $2, dlr = $3, state = $4, "
                "sent_at = COALESCE(sent_at, $5), delivered_at = COALESCE(delivered_at, $6),"
                " updated_at = $7 WHERE id = $1", plan.changes)
        if plan.applied:
            await db.executemany(
                "INSERT INTO message_events (message_id, at, ptt, dlr, note) "
                "VALUES ($1, $2, $3, $4, $5)",
                [(u.message_id, u.at, u.ptt, u.dlr, u.note) for u in plan.applied])
        if plan.callbacks:
            await db.executemany(
                "INSERT INTO outbox (kind, message_id, account_id, user_id, target, "
                "payload, created_at, next_attempt_at) "
                "VALUES ('callback', $1, $2, $3, $4, $5, $6, $6)",
                [(c.message_id, c.account_id, c.user_id, c.target, json.dumps(c.payload),
                  c.at) for c in plan.callbacks])
            await self._notify(db, "outbox")
        refunds = plan.refunds
        if not {r.account_id for r in refunds} <= locked:
            raise AssertionError("a refund planned without its account locked")
        if refunds:
            await db.executemany(
                "INSERT INTO ledger (at, account_id, user_id, login, kind, source, target, "
                "amount, reference) VALUES ($1, $2, $3, $4, 'refund', 'spent', $5, $6, $7)",
                [(r.at, r.account_id, r.user_id, r.login, r.pool, r.amount, r.reference)
                 for r in refunds])
            await db.executemany("UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                                 [(v, k) for k, v in plan.account_refunds().items()])
            await db.executemany("UPDATE users SET quota_left = quota_left + $1 "
                                 "WHERE id = $2",
                                 [(v, k) for k, v in plan.quota_refunds().items()])
            await self._evaluate_alerts(db, {r.account_id for r in refunds},
                                        refunds[-1].at)
        return AppliedUpdates(len(plan.callbacks), tuple(plan.finals), tuple(plan.ignored))


    async def claim_messages(self, *, now: float, lease: float,
                             limit: int) -> list[OutgoingMessage]:
        """As SQLiteStore.claim_messages; rows another claimer holds are skipped (SKIP
        LOCKED), and each row is checked again once locked, so no two claims share one."""
        if limit <= 0:
            return []
        returning = f"RETURNING {_OUTGOING_COLUMNS}"

        async def body(db: Conn) -> list[Any]:
            deferred = await db.fetch(
                "UPDATE messages SET claimed_until = $1 WHERE id IN (SELECT id FROM messages "
                f"WHERE state = 'deferred' AND {_DUE_DEFERRED} <= $2 "
                f"ORDER BY {_DUE_DEFERRED}, id LIMIT $3 FOR UPDATE SKIP LOCKED) {returning}",
                now + lease, now, max(1, limit // 2))
            queued = await db.fetch(
                "UPDATE messages SET claimed_until = $1 WHERE id IN (SELECT id FROM messages "
                "WHERE state = 'queued' AND claimed_until <= $2 "
                f"ORDER BY claimed_until, id LIMIT $3 FOR UPDATE SKIP LOCKED) {returning}",
                now + lease, now, limit - len(deferred))
            return [tuple(r) for r in (*deferred, *queued)]

        return [_outgoing(r) for r in sorted(await self._transaction(body))]

    async def release_messages(self, until: Sequence[tuple[int, float]]) -> None:
        if not until:
            return
        rows = sorted({mid: (mid, at) for mid, at in until}.values())

        async def body(db: Conn) -> None:
            await db.executemany(
                f"UPDATE messages SET claimed_until = $2 WHERE id = $1 AND {_CLAIMABLE}", rows)

        await self._transaction(body)

    async def free_claims(self) -> int:
        async def body(db: Conn) -> int:
            return _count(await db.execute(
                f"UPDATE messages SET claimed_until = 0 WHERE {_CLAIMABLE} "
                "AND claimed_until > 0"))

        return await self._transaction(body)

    async def next_due_at(self) -> float | None:
        rows = await self._read(
            "SELECT (SELECT MIN(claimed_until) FROM messages WHERE state = 'queued'), "
            f"(SELECT MIN({_DUE_DEFERRED}) FROM messages WHERE state = 'deferred')")
        due = [at for at in rows[0] if at is not None] if rows else []
        return min(due) if due else None

    async def in_flight(self, *, after_id: int, limit: int) -> list[OutgoingMessage]:
        rows = await self._read(
            f"SELECT {_OUTGOING_COLUMNS} FROM messages WHERE state = 'sent' "
            "AND id > $1 ORDER BY id LIMIT $2", after_id, limit)
        return [_outgoing(tuple(r)) for r in rows]

    async def apply_reports(self, reports: Sequence[OperatorReport]) -> AppliedUpdates:
        """As SQLiteStore.apply_reports: references never change once recorded (nor does a
        message's count of parts), so they are read before the write. A part's "delivered"
        of a long message is counted and stands for the message only as the last part's
        (rules.part_delivery_stands), in one transaction with the state changes: the
        accounts' rows locked, then the messages' (by id), then their parts are counted,
        each by one conditional statement (a part counts once, however many report it)."""
        if not reports:
            return AppliedUpdates()
        names = sorted({r.reference for r in reports})
        owners: dict[str, int] = {}
        parts: dict[int, int] = {}
        for reference, message_id, count in await self._read(
                "SELECT p.reference, p.message_id, m.parts FROM message_parts p "
                "JOIN messages m ON m.id = p.message_id WHERE p.reference = ANY($1::text[])",
                names):
            owners[reference] = message_id
            parts[message_id] = count
        known = [p for p, r in enumerate(reports) if r.reference in owners]
        merged = [p for p in known if reports[p].ptt == DELIVERED and reports[p].final
                  and parts[owners[reports[p].reference]] > 1]

        async def body(db: Conn) -> tuple[AppliedUpdates, list[int]]:
            left_out: list[int] = []
            if merged:
                await self._lock_messages(
                    db, sorted({owners[reports[p].reference] for p in known}))
            for position in merged:
                report = reports[position]
                message_id = owners[report.reference]
                count = parts[message_id]
                # `<reference>#<n>` names a part carried by the submit of `<reference>`
                # (SMPP's message_payload): delivered with it. Exact names, not a range of
                # them, whose order would hang on the database's collation.
                named = [report.reference,
                         *(f"{report.reference}#{n}" for n in range(1, count + 1))]
                row = await db.fetchrow(
                    "WITH p AS (UPDATE message_parts SET delivered = true "
                    "WHERE reference = ANY($1::text[]) AND message_id = $2 "
                    "AND NOT delivered RETURNING 1) "
                    "UPDATE messages SET parts_delivered = parts_delivered + "
                    "(SELECT count(*) FROM p) WHERE id = $2 AND EXISTS (SELECT 1 FROM p) "
                    "RETURNING parts_delivered", named, message_id)
                new = row is not None
                delivered = int(row[0]) if new else 0
                if not rules.part_delivery_stands(count, delivered, new):
                    left_out.append(position)
            dropped = set(left_out)
            standing = [p for p in known if p not in dropped]
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
        """As SQLiteStore._incoming_owner: a read before the write, so that a message
        answering nothing (which reads the last INCOMING_LOOKBACK messages) holds no lock."""
        newest = (await self._read("SELECT max(id) FROM messages"))[0][0] or 0
        rows = await self._read(
            "SELECT account_id, tag FROM messages WHERE id > $1 AND receiver = $2 "
            "AND sender = $3 ORDER BY id DESC LIMIT 1", newest - INCOMING_LOOKBACK, handset,
            number)
        if not rows:
            rows = await self._read("SELECT account_id, '' FROM senders WHERE sender = $1 "
                                    "ORDER BY account_id LIMIT 1", number)
        return (int(rows[0][0]), rows[0][1]) if rows else None

    async def add_incoming(self, messages: Sequence[IncomingMessage]) -> list[int]:
        """As SQLiteStore.add_incoming. The accounts found are locked (by id) before
        anything is written, as every writer does, and the references: a message sent
        again on two links at once is kept once."""
        if not messages:
            return []
        owners = [await self._incoming_owner(m.sender, m.receiver) for m in messages]

        async def body(db: Conn) -> list[int]:
            for reference in sorted({m.reference for m in messages}):
                await db.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                                 _LOCK_SPACE, f"incoming:{reference}")
            await self._lock_accounts(db, {o[0] for o in owners if o is not None})
            ids: list[int] = []
            for message, owner in zip(messages, owners, strict=True):
                if owner is None:
                    ids.append(0)
                    continue
                kept = await db.fetchval(
                    "SELECT id FROM incoming_messages WHERE reference = $1 AND created_at >= $2 "
                    "AND sender = $3 AND receiver = $4 AND body = $5 ORDER BY id LIMIT 1",
                    message.reference, message.created_at - rules.INCOMING_REPEAT_SECONDS,
                    message.sender, message.receiver, message.body)
                ids.append(int(kept) if kept is not None else await _keep_incoming(
                    db, owner, message.reference, message.sender, message.receiver,
                    message.body, message.created_at))
            return ids

        return await self._transaction(body)

    async def add_incoming_parts(self, parts: Sequence[IncomingPart]) -> list[int | None]:
        """As SQLiteStore.add_incoming_parts. Each message's parts are taken in turn (an
        advisory lock on its numbers and group, in order, then the accounts): two parts
        of one message committed at once would otherwise each see the other missing."""
        if not parts:
            return []
        owners = [await self._incoming_owner(p.sender, p.receiver) for p in parts]

        async def body(db: Conn) -> list[int | None]:
            for key in sorted({(p.sender, p.receiver, p.group, p.total) for p in parts}):
                await db.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                                 _LOCK_SPACE, "incoming-part:" + json.dumps(key))
            await self._lock_accounts(db, {o[0] for o in owners if o is not None})
            await db.execute("DELETE FROM incoming_parts WHERE created_at < $1",
                             max(p.created_at for p in parts) - rules.INCOMING_PARTS_SECONDS)
            return [await _add_part(db, part, owner)
                    for part, owner in zip(parts, owners, strict=True)]

        return await self._transaction(body)

    async def list_incoming(self, account: str, *, limit: int,
                            before_id: int | None = None) -> list[IncomingMessage]:
        rows = await self._read("SELECT id FROM accounts WHERE name = $1", account)
        if not rows:
            raise NotFound(f"unknown account {account!r}")
        found = await self._read(
            "SELECT id, account_id, reference, sender, receiver, body, tag, created_at "
            "FROM incoming_messages WHERE account_id = $1 AND id < $2 ORDER BY id DESC "
            "LIMIT $3", rows[0][0], before_id if before_id is not None else 1 << 62, limit)
        return [IncomingMessage(*r) for r in found]

    # -- outbox ----------------------------------------------------------------------

    @staticmethod
    async def _follow_callback_urls(db: Conn, account_id: int, at: float) -> None:
        """As SQLiteStore._follow_callback_urls, the account's row locked by the caller."""
        await db.execute(
            "UPDATE outbox SET target = v.url FROM (SELECT o.id, COALESCE("
            "NULLIF(u.callback_url, ''), NULLIF(a.callback_url, ''), '') AS url "
            "FROM outbox o JOIN accounts a ON a.id = o.account_id "
            "LEFT JOIN users u ON u.id = o.user_id AND u.account_id = o.account_id "
            "WHERE o.kind = 'callback' AND o.state = 'pending' AND o.account_id = $1) AS v "
            "WHERE outbox.id = v.id AND outbox.target <> v.url", account_id)
        cancelled = "cancelled: no callback URL any more"
        await db.execute(
            "INSERT INTO outbox_attempts (outbox_id, at, ok, detail) SELECT id, $1, false, $2 "
            "FROM outbox WHERE kind = 'callback' AND state = 'pending' AND account_id = $3 "
            "AND target = ''", at, cancelled, account_id)
        await db.execute(
            "UPDATE outbox SET state = 'dead', done_at = $1, last_error = $2 "
            "WHERE kind = 'callback' AND state = 'pending' AND account_id = $3 "
            "AND target = ''", at, cancelled, account_id)

    async def enqueue_outbox(self, kind: str, *, account_id: int, user_id: int | None,
                             target: str, payload: dict[str, Any], at: float,
                             message_id: int | None = None) -> int:
        async def body(db: Conn) -> int:
            await self._notify(db, "outbox")
            return int(await db.fetchval(
                "INSERT INTO outbox (kind, message_id, account_id, user_id, target, payload, "
                "created_at, next_attempt_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) "
                "RETURNING id", kind, message_id, account_id, user_id, target,
                json.dumps(payload), at))

        return await self._transaction(body)

    async def claim_outbox(self, kinds: Sequence[str], *, now: float, lease: float,
                           limit: int, bounds: ClaimBounds | None = None,
                           skip_targets: Sequence[str] = (),
                           skip_accounts: Sequence[int] = (), deep: bool = False,
                           results: Sequence[OutboxResult] = ()) -> list[OutboxItem]:
        """As SQLiteStore.claim_outbox. The window of due items is locked (SKIP LOCKED:
        another node's window is passed over, not waited for) until the claim commits."""
        where = "state = 'pending' AND kind = ANY($1::text[]) AND next_attempt_at <= $2"
        params: list[Any] = [list(kinds), now]
        if deep and skip_targets:
            params.append(list(skip_targets))
            where += f" AND NOT (target = ANY(${len(params)}::text[]))"
        if deep and skip_accounts:
            params.append(list(skip_accounts))
            where += f" AND NOT (account_id = ANY(${len(params)}::bigint[]))"
        params.append(limit * CLAIM_WINDOW)
        skipped = set(skip_targets)

        async def body(db: Conn) -> list[Any]:
            if results:
                await self._record_results(db, results)
            if limit <= 0:
                return []
            due = await db.fetch(
                f"SELECT id, kind, target, account_id FROM outbox WHERE {where} "
                f"ORDER BY next_attempt_at, id LIMIT ${len(params)} FOR UPDATE SKIP LOCKED",
                *params)
            chosen = rules.choose_claims((tuple(r) for r in due), limit=limit, bounds=bounds,
                                         skip=skipped)
            if not chosen:
                return []
            return list(await db.fetch(
                "UPDATE outbox SET next_attempt_at = $1, attempts = attempts + 1 "
                "WHERE id = ANY($2::bigint[]) "
                "RETURNING id, kind, message_id, account_id, user_id, target, payload, "
                "created_at, attempts", now + lease, chosen))

        rows = await self._transaction(body)
        items = [OutboxItem(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8])
                 for r in rows]
        items.sort(key=lambda item: item.id)
        return items

    async def outbox_status(self, item_id: int) -> tuple[str, int, str] | None:
        rows = await self._read(
            "SELECT o.state, o.attempts, COALESCE((SELECT t.detail FROM outbox_attempts t "
            "WHERE t.outbox_id = o.id ORDER BY t.id DESC LIMIT 1), '') FROM outbox o "
            "WHERE o.id = $1", item_id)
        if not rows:
            return None
        state, attempts, detail = rows[0]
        return str(state), int(attempts), str(detail)

    async def next_outbox_at(self, kinds: Sequence[str], *,
                             skip_targets: Sequence[str] = ()) -> float | None:
        rows = await self._read(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE state = 'pending' "
            "AND kind = ANY($1::text[]) AND NOT (target = ANY($2::text[]))",
            list(kinds), list(skip_targets))
        return rows[0][0] if rows else None

    async def record_outbox_results(self, results: Sequence[OutboxResult]) -> None:
        if not results:
            return

        async def body(db: Conn) -> None:
            await self._record_results(db, results)

        await self._transaction(body)

    @staticmethod
    async def _record_results(db: Conn, results: Sequence[OutboxResult]) -> None:
        await db.executemany(
            "INSERT INTO outbox_attempts (outbox_id, at, ok, detail) VALUES ($1, $2, $3, $4)",
            [(r.item_id, r.at, r.ok, r.detail[:500]) for r in results])
        done = [(r.item_id, r.at) for r in results if r.ok]
        if done:
            await db.executemany(
                "UPDATE outbox SET state = 'done', done_at = $2, last_error = '' WHERE id = $1",
                done)
        failed = [r for r in results if not r.ok]
        retry = [(r.next_attempt_at, r.detail[:500], r.item_id) for r in failed
                 if r.next_attempt_at is not None]
        dead = [(r.at, r.detail[:500], r.item_id) for r in failed if r.next_attempt_at is None]
        # Not an item cancelled meanwhile (see `_follow_callback_urls`): it stays so.
        if retry:
            await db.executemany(
                "UPDATE outbox SET next_attempt_at = $1, last_error = $2 "
                "WHERE id = $3 AND state = 'pending'", retry)
        if dead:
            await db.executemany(
                "UPDATE outbox SET state = 'dead', done_at = $1, last_error = $2 "
                "WHERE id = $3 AND state = 'pending'", dead)

    # -- reading back ----------------------------------------------------------------

    async def get_message(self, message_id: int) -> Message:
        rows = await self._read(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages m JOIN accounts a ON a.id = m.account_id "
            "WHERE m.id = $1", message_id)
        if not rows:
            raise NotFound(f"unknown message {message_id}")
        return _message(rows[0])

    async def message_events(self, message_id: int) -> list[MessageEvent]:
        rows = await self._read(
            "SELECT at, ptt, dlr, note FROM message_events WHERE message_id = $1 ORDER BY id",
            message_id)
        return [MessageEvent(*r) for r in rows]

    async def message_attempts(self, message_id: int) -> list[OutboxAttempt]:
        rows = await self._read(
            "SELECT o.id, o.kind, o.target, o.state, t.at, t.ok, t.detail FROM outbox o "
            "JOIN outbox_attempts t ON t.outbox_id = o.id WHERE o.message_id = $1 "
            "ORDER BY t.id", message_id)
        return [OutboxAttempt(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6]) for r in rows]

    async def list_messages(self, where: MessageFilter, *, limit: int,
                            before_id: int | None = None) -> list[Message]:
        params: list[Any] = [where.account_id]
        clauses = ["m.account_id = $1"]

        def add(condition: str, value: Any) -> None:
            params.append(value)
            clauses.append(condition.format(f"${len(params)}"))

        for column, value in (("m.user_id", where.user_id), ("m.login", where.login),
                              ("m.tag", where.tag), ("m.ptt", where.ptt),
                              ("m.receiver", where.receiver), ("m.sender", where.sender),
                              ("m.kind", where.kind)):
            if value is not None:
                add(f"{column} = {{}}", value)
        if where.created_from is not None:
            add("m.created_at >= {}", float(where.created_from))
        if where.created_to is not None:
            add("m.created_at <= {}", float(where.created_to))
        if before_id is not None:
            add("m.id < {}", before_id)
        params.append(limit)
        rows = await self._read(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages m JOIN accounts a ON a.id = m.account_id "
            f"WHERE {' AND '.join(clauses)} ORDER BY m.id DESC LIMIT ${len(params)}", *params)
        return [_message(r) for r in rows]

    async def list_ledger(self, account: str, *, limit: int,
                          after_id: int = 0) -> list[LedgerEntry]:
        rows = await self._read("SELECT id FROM accounts WHERE name = $1", account)
        if not rows:
            raise NotFound(f"unknown account {account!r}")
        found = await self._read(
            "SELECT id, at, account_id, login, kind, source, target, amount, reference "
            "FROM ledger WHERE account_id = $1 AND id > $2 ORDER BY id LIMIT $3",
            rows[0][0], after_id, limit)
        return [LedgerEntry(*r) for r in found]

    async def ledger_totals(self) -> dict[str, int]:
        rows = await self._read(
            "SELECT "
            "(SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE source = 'outside')::bigint, "
            "(SELECT COALESCE(SUM(CASE WHEN target = 'spent' THEN amount ELSE -amount END), 0)"
            "   FROM ledger WHERE 'spent' IN (source, target))::bigint, "
            "(SELECT COALESCE(SUM(balance), 0) FROM accounts)::bigint, "
            "(SELECT COALESCE(SUM(quota_left), 0) FROM users WHERE quota_active)::bigint, "
            "(SELECT COALESCE(SUM(CASE WHEN target = 'account' THEN amount ELSE -amount END), 0)"
            "   FROM ledger WHERE 'account' IN (source, target))::bigint, "
            "(SELECT COALESCE(SUM(CASE WHEN target = 'quota' THEN amount ELSE -amount END), 0)"
            "   FROM ledger WHERE 'quota' IN (source, target))::bigint")
        purchased, spent, balances, quotas, ledger_accounts, ledger_quotas = rows[0]
        return {"purchased": purchased, "spent": spent, "balances": balances,
                "quotas": quotas, "ledger_balances": ledger_accounts,
                "ledger_quotas": ledger_quotas}

    async def counts(self) -> dict[str, int]:
        rows = await self._read(
            "SELECT "
            "(SELECT COUNT(*) FROM messages WHERE state = 'queued'), "
            "(SELECT COUNT(*) FROM messages WHERE state = 'deferred'), "
            "(SELECT COUNT(*) FROM messages WHERE state = 'sent'), "
            "(SELECT COUNT(*) FROM outbox WHERE state = 'pending'), "
            "(SELECT COUNT(*) FROM outbox WHERE state = 'dead')")
        queued, deferred, sent, pending, dead = rows[0]
        return {"queued": queued, "deferred": deferred, "sent": sent,
                "outbox_pending": pending, "outbox_dead": dead}

    # -- admin API tokens ------------------------------------------------------------

    async def create_token(self, name: str, key: str, digest: str,
                           accounts: Sequence[str] | None, *, at: float) -> AdminToken:
        async def body(db: Conn) -> None:
            account_ids = [await _account_id(db, account)
                           for account in sorted(set(accounts or ()))]
            try:
                token_id = await db.fetchval(
                    "INSERT INTO admin_tokens (name, key, digest, all_accounts, created_at) "
                    "VALUES ($1, $2, $3, $4, $5) RETURNING id",
                    name, key, digest, accounts is None, at)
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(f"token {name!r} already exists") from exc
            if account_ids:
                await db.executemany(
                    "INSERT INTO admin_token_accounts (token_id, account_id) VALUES ($1, $2)",
                    [(token_id, account_id) for account_id in account_ids])

        await self._transaction(body)
        found = await self._tokens("t.name = $1", name)
        return found[0]

    async def find_token(self, key: str) -> AdminToken | None:
        found = await self._tokens("t.key = $1", key)
        return found[0] if found else None

    async def list_tokens(self) -> list[AdminToken]:
        return await self._tokens("true")

    async def has_tokens(self) -> bool:
        return bool(await self._read("SELECT 1 FROM admin_tokens LIMIT 1"))

    async def token_used(self, token_id: int, *, at: float) -> None:
        async def body(db: Conn) -> None:
            await db.execute("UPDATE admin_tokens SET last_used_at = $1 WHERE id = $2",
                             at, token_id)

        await self._transaction(body)

    async def revoke_token(self, name: str) -> None:
        async def body(db: Conn) -> None:
            if not _count(await db.execute("DELETE FROM admin_tokens WHERE name = $1", name)):
                raise NotFound(f"unknown token {name!r}")

        await self._transaction(body)

    async def _tokens(self, where: str, *params: Any) -> list[AdminToken]:
        rows = await self._read(
            "SELECT t.id, t.name, t.key, t.digest, t.all_accounts, t.created_at, "
            "t.last_used_at, (SELECT string_agg(a.name, E'\\n' ORDER BY a.name) "
            "  FROM admin_token_accounts ta JOIN accounts a ON a.id = ta.account_id "
            "  WHERE ta.token_id = t.id) "
            f"FROM admin_tokens t WHERE {where} ORDER BY t.name", *params)
        return [AdminToken(r[0], r[1], r[2], r[3],
                           None if r[4] else tuple(r[7].split("\n")) if r[7] else (),
                           r[5], r[6]) for r in rows]

    # -- console users and sessions ----------------------------------------------------

    async def create_console_user(self, email: str, password_hash: str, *, operator: bool,
                                  accounts: Sequence[str], at: float) -> ConsoleUser:
        async def body(db: Conn) -> None:
            account_ids = [await _account_id(db, account) for account in sorted(set(accounts))]
            try:
                user_id = await db.fetchval(
                    "INSERT INTO console_users (email, password_hash, operator, created_at) "
                    "VALUES ($1, $2, $3, $4) RETURNING id", email, password_hash, operator, at)
            except asyncpg.UniqueViolationError as exc:
                raise Conflict(f"console user {email!r} already exists") from exc
            if account_ids:
                await db.executemany(
                    "INSERT INTO console_user_accounts (user_id, account_id) VALUES ($1, $2)",
                    [(user_id, account_id) for account_id in account_ids])

        await self._transaction(body)
        found = await self._console_users("u.email = $1", email)
        return found[0]

    async def get_console_user(self, email: str) -> ConsoleUser | None:
        found = await self._console_users("u.email = $1", email)
        return found[0] if found else None

    async def list_console_users(self) -> list[ConsoleUser]:
        return await self._console_users("true")

    async def delete_console_user(self, email: str) -> None:
        async def body(db: Conn) -> None:
            if not _count(await db.execute("DELETE FROM console_users WHERE email = $1",
                                           email)):
                raise NotFound(f"unknown console user {email!r}")

        await self._transaction(body)

    async def set_console_password(self, email: str, password_hash: str) -> None:
        async def body(db: Conn) -> None:
            user_id = await db.fetchval(
                "UPDATE console_users SET password_hash = $1 WHERE email = $2 RETURNING id",
                password_hash, email)
            if user_id is None:
                raise NotFound(f"unknown console user {email!r}")
            # A new password closes every session opened with the old one.
            await db.execute("DELETE FROM console_sessions WHERE user_id = $1", user_id)

        await self._transaction(body)

    async def create_console_session(self, digest: str, email: str, csrf: str, *,
                                     at: float) -> None:
        async def body(db: Conn) -> None:
            if not _count(await db.execute(
                    "INSERT INTO console_sessions (digest, user_id, csrf, created_at, "
                    "last_seen_at) SELECT $1, id, $2, $3, $3 FROM console_users "
                    "WHERE email = $4", digest, csrf, at, email)):
                raise NotFound(f"unknown console user {email!r}")

        await self._transaction(body)

    async def find_console_session(self, digest: str) -> ConsoleSession | None:
        rows = await self._read(
            "SELECT u.email, s.csrf, s.created_at, s.last_seen_at FROM console_sessions s "
            "JOIN console_users u ON u.id = s.user_id WHERE s.digest = $1", digest)
        if not rows:
            return None
        email, csrf, created_at, last_seen_at = rows[0]
        user = await self.get_console_user(email)
        if user is None:
            return None
        return ConsoleSession(digest, user, csrf, created_at, last_seen_at)

    async def touch_console_session(self, digest: str, *, at: float) -> None:
        async def body(db: Conn) -> None:
            await db.execute("UPDATE console_sessions SET last_seen_at = $1 WHERE digest = $2",
                             at, digest)

        await self._transaction(body)

    async def delete_console_sessions(self, *, digest: str | None = None,
                                      idle_before: float | None = None) -> None:
        async def body(db: Conn) -> None:
            if digest is not None:
                await db.execute("DELETE FROM console_sessions WHERE digest = $1", digest)
            if idle_before is not None:
                await db.execute("DELETE FROM console_sessions WHERE last_seen_at < $1",
                                 idle_before)

        await self._transaction(body)

    async def _console_users(self, where: str, *params: Any) -> list[ConsoleUser]:
        rows = await self._read(
            "SELECT u.id, u.email, u.password_hash, u.operator, u.created_at, "
            "(SELECT string_agg(a.name, E'\\n' ORDER BY a.name) "
            "  FROM console_user_accounts ua JOIN accounts a ON a.id = ua.account_id "
            "  WHERE ua.user_id = u.id) "
            f"FROM console_users u WHERE {where} ORDER BY u.email", *params)
        return [ConsoleUser(r[0], r[1], r[2], bool(r[3]),
                            tuple(r[5].split("\n")) if r[5] else (), r[4]) for r in rows]

    # -- the console's account chart -----------------------------------------------------

    async def message_stats(self, account: str, *, since: float, period: float,
                            count: int) -> list[MessageStats]:
        rows = await self._read(
            "SELECT floor((m.created_at - $1) / $2)::bigint AS bucket, "
            "count(*) FILTER (WHERE m.state = 'final' AND m.dlr = 1), "
            "count(*) FILTER (WHERE m.state = 'final' AND m.dlr <> 1), "
            "count(*) FILTER (WHERE m.state <> 'final'), "
            "COALESCE(SUM(CASE WHEN m.dlr = 16 THEN 0 ELSE m.credits END), 0) "
            "FROM messages m JOIN accounts a ON a.id = m.account_id "
            "WHERE a.name = $3 AND m.created_at >= $1 AND m.created_at < $4 "
            "GROUP BY bucket", since, period, account, since + period * count)
        return rules.stats_series(rows, since, period, count)

    # -- the whole store as tables (gateway.store.copy) -------------------------------

    @staticmethod
    async def _schema(db: Conn) -> dict[str, _Table]:
        """Columns, their types and the primary key of every table of the installation's
        data, in the current schema."""
        columns: dict[str, list[str]] = {}
        types: dict[str, dict[str, str]] = {}
        for table, column, kind in await db.fetch(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"):
            if table not in _BOOKKEEPING:
                columns.setdefault(table, []).append(column)
                types.setdefault(table, {})[column] = kind
        keys = {table: tuple(key) for table, key in await db.fetch(
            "SELECT c.relname, array_agg(a.attname ORDER BY array_position("
            "i.indkey::int2[], a.attnum)) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indisprimary AND c.relnamespace = current_schema()::regnamespace "
            "GROUP BY c.relname")}
        return {table: _Table(tuple(listed), keys.get(table) or tuple(listed), types[table])
                for table, listed in columns.items()}

    async def table_columns(self) -> dict[str, tuple[str, ...]]:
        try:
            async with self._acquire() as conn:
                return {t: v.columns for t, v in (await self._schema(conn)).items()}
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"cannot read the store: {exc}") from exc

    @asynccontextmanager
    async def read_tables(self) -> AsyncIterator[_PostgreSQLSource]:
        """One REPEATABLE READ transaction: one snapshot throughout."""
        async with self._acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                             readonly=True):
            yield _PostgreSQLSource(conn, await self._schema(conn))

    @asynccontextmanager
    async def write_tables(self) -> AsyncIterator[_PostgreSQLSink]:
        async with self._acquire() as conn, conn.transaction():
            yield _PostgreSQLSink(conn, await self._schema(conn))

    # -- data over time: retention, erasure, space, backups, exports (MaintenanceStore) -----

    async def retention_settings(self) -> list[AccountRetention]:
        rows = await self._read("SELECT id, name, retention_days, personal_data_days "
                                "FROM accounts ORDER BY id")
        return [AccountRetention(*row) for row in rows]

    async def set_retention(self, account: str, *, messages_days: Any = UNSET,
                            personal_data_days: Any = UNSET) -> AccountRetention:
        async def body(db: Conn) -> Any:
            account_id = await self._lock_account(db, account)
            if messages_days is not UNSET:
                await db.execute("UPDATE accounts SET retention_days = $1 WHERE id = $2",
                                 messages_days, account_id)
            if personal_data_days is not UNSET:
                await db.execute("UPDATE accounts SET personal_data_days = $1 WHERE id = $2",
                                 personal_data_days, account_id)
            return await db.fetchrow("SELECT id, name, retention_days, personal_data_days "
                                     "FROM accounts WHERE id = $1", account_id)

        return AccountRetention(*await self._transaction(body))

    async def erase_due(self, account_id: int, what: PurgedRows, *, before: float,
                        limit: int) -> PurgeStep:
        table, number = _PURGED[what]
        state = "state" if what == "messages" else "'final'"

        async def body(db: Conn) -> PurgeStep:
            # One purge at a time per account and kind (the purge's own lock makes it so
            # already): the place is read under its row's lock.
            through = await db.fetchval(
                "SELECT erased_through FROM purge_progress WHERE account_id = $1 "
                "AND what = $2 FOR UPDATE", account_id, what) or 0
            rows = await db.fetch(
                f"SELECT id, created_at, {state}, {number} FROM {table} "
                "WHERE account_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                account_id, through, limit)
            plan = rules.erasure([tuple(r) for r in rows], before, limit)
            if what == "messages":
                finals = await db.fetch(
                    "SELECT h.message_id, m.receiver FROM purge_held h "
                    "JOIN messages m ON m.id = h.message_id WHERE m.account_id = $1 "
                    "AND m.state = 'final' LIMIT $2", account_id, limit)
                plan.erase.extend((r[0], retention.mask_number(r[1])) for r in finals)
                await db.execute("DELETE FROM purge_held WHERE message_id = ANY($1::bigint[])",
                                 [r[0] for r in finals])
                await db.execute("INSERT INTO purge_held (message_id) SELECT unnest($1::bigint[]) "
                                 "ON CONFLICT DO NOTHING", plan.hold)
                # In id order, as every transaction that locks messages takes them.
                await db.execute("SELECT 1 FROM messages WHERE id = ANY($1::bigint[]) "
                                 "ORDER BY id FOR UPDATE", [i for i, _ in plan.erase])
            ids, masked = _columns(plan.erase, 2)
            await db.execute(
                f"UPDATE {table} t SET body = '', {number} = v.masked "
                "FROM unnest($1::bigint[], $2::text[]) AS v(id, masked) WHERE t.id = v.id",
                ids, masked)
            if plan.last_id > through:
                await db.execute(
                    "INSERT INTO purge_progress (account_id, what, erased_through) "
                    "VALUES ($1, $2, $3) ON CONFLICT (account_id, what) "
                    "DO UPDATE SET erased_through = excluded.erased_through",
                    account_id, what, plan.last_id)
            return PurgeStep(erased=len(plan.erase), last_id=plan.last_id, done=plan.done,
                             held=len(plan.hold))

        return await self._transaction(body)

    async def delete_due(self, account_id: int, what: PurgedRows, *, before: float,
                         after_id: int, limit: int) -> PurgeStep:
        table, _ = _PURGED[what]
        state = "state" if what == "messages" else "'final'"

        async def body(db: Conn) -> PurgeStep:
            rows = await db.fetch(
                f"SELECT id, created_at, {state} FROM {table} "
                "WHERE account_id = $1 AND id > $2 ORDER BY id LIMIT $3",
                account_id, after_id, limit)
            plan = rules.deletion([tuple(r) for r in rows], before, limit)
            if plan.delete:
                if what == "messages":
                    await db.execute("SELECT 1 FROM messages WHERE id = ANY($1::bigint[]) "
                                     "ORDER BY id FOR UPDATE", plan.delete)
                    for child in ("message_events", "message_parts", "purge_held"):
                        await db.execute(f"DELETE FROM {child} "
                                         "WHERE message_id = ANY($1::bigint[])", plan.delete)
                await db.execute(f"DELETE FROM {table} WHERE id = ANY($1::bigint[])",
                                 plan.delete)
            return PurgeStep(deleted=len(plan.delete), last_id=plan.last_id or after_id,
                             done=plan.done, held=plan.held)

        return await self._transaction(body)

    async def delete_outbox_due(self, before: Mapping[int, float | None],
                                default_before: float | None, *, after_id: int,
                                limit: int) -> PurgeStep:
        async def body(db: Conn) -> PurgeStep:
            rows = await db.fetch(
                "SELECT id, account_id, created_at, state FROM outbox WHERE id > $1 "
                "ORDER BY id LIMIT $2", after_id, limit)
            plan = rules.outbox_deletion([tuple(r) for r in rows], before, default_before,
                                         limit)
            if plan.delete:
                await db.execute("DELETE FROM outbox_attempts "
                                 "WHERE outbox_id = ANY($1::bigint[])", plan.delete)
                # Finished items only: a claim never takes them, no lock to wait for.
                await db.execute("DELETE FROM outbox WHERE id = ANY($1::bigint[]) "
                                 "AND state IN ('done', 'dead')", plan.delete)
            return PurgeStep(deleted=len(plan.delete), last_id=plan.last_id or after_id,
                             done=plan.done)

        return await self._transaction(body)

    async def delete_parts_due(self, *, before: float, limit: int) -> PurgeStep:
        async def body(db: Conn) -> PurgeStep:
            deleted = _count(await db.execute(
                "DELETE FROM incoming_parts WHERE ctid = ANY(ARRAY(SELECT ctid FROM "
                "incoming_parts WHERE created_at < $1 LIMIT $2))", before, limit))
            return PurgeStep(deleted=deleted, done=deleted < limit)

        return await self._transaction(body)

    async def purge_preview(self, account_id: int, *, erase_before: float | None,
                            delete_before: float | None) -> dict[str, int]:
        found: dict[str, int] = {}
        for what, (table, _number) in _PURGED.items():
            final = "AND state = 'final'" if what == "messages" else ""
            through = await self._read(
                "SELECT erased_through FROM purge_progress WHERE account_id = $1 "
                "AND what = $2", account_id, what)
            rows = await self._read(
                f"SELECT count(*) FILTER (WHERE created_at < $1 AND id > $2 {final}), "
                f"count(*) FILTER (WHERE created_at < $3 {final}) FROM {table} "
                "WHERE account_id = $4",
                erase_before if erase_before is not None else float("-inf"),
                through[0][0] if through else 0,
                delete_before if delete_before is not None else float("-inf"), account_id)
            found[f"{what}_to_erase"], found[f"{what}_to_delete"] = rows[0]
        return found

    async def erase_number(self, account_id: int, number: str, *,
                           limit: int) -> PurgeStep:
        """As SQLiteStore.erase_number: found a page at a time, erased by `limit`."""
        erased = held = 0
        masked = retention.mask_number(number)
        for what, (table, column) in _PURGED.items():
            state = "state" if what == "messages" else "'final'"
            after = 0
            while True:
                page = await self._read(
                    f"SELECT id, {state} FROM {table} WHERE account_id = $1 AND id > $2 "
                    f"AND {column} = $3 ORDER BY id LIMIT $4",
                    account_id, after, number, _SCAN_PAGE)
                if not page:
                    break
                after = page[-1][0]
                held += sum(1 for row in page if row[1] != "final")
                ids = [row[0] for row in page if row[1] == "final"]
                for start in range(0, len(ids), limit):
                    chunk = ids[start:start + limit]

                    sql = (f"UPDATE {table} SET body = '', {column} = $1 "
                           f"WHERE id = ANY($2::bigint[]) AND {column} = $3")

                    async def body(db: Conn, sql: str = sql, chunk: list[int] = chunk) -> int:
                        return _count(await db.execute(sql, masked, chunk, number))

                    erased += await self._transaction(body)

        async def parts(db: Conn) -> None:
            # The parts of its long messages, kept after each was whole: its text too.
            await db.execute(
                "DELETE FROM incoming_parts p WHERE p.sender = $1 AND EXISTS (SELECT 1 "
                "FROM incoming_messages i WHERE i.id = p.incoming_id AND i.account_id = $2)",
                number, account_id)

        await self._transaction(parts)
        return PurgeStep(erased=erased, held=held)

    async def reclaim_space(self, *, pages: int) -> int:
        """Autovacuum gives dead rows' space back to new rows (see docs/retention.md)."""
        return 0

    async def store_stats(self) -> StoreStats:
        size = (await self._read("SELECT pg_database_size(current_database())"))[0][0]
        rows = {table: (await self._read(f"SELECT count(*) FROM {table}"))[0][0]
                for table in _TABLES}
        oldest = await self._read("SELECT created_at FROM messages ORDER BY id LIMIT 1")
        stats = await self._read(
            "SELECT relname, n_dead_tup, last_autovacuum, last_vacuum FROM pg_stat_user_tables "
            "WHERE relname = ANY($1::text[]) ORDER BY relname", list(_TABLES))
        return StoreStats(
            backend="postgresql", size_bytes=int(size), free_bytes=0, rows=rows,
            oldest_message_at=oldest[0][0] if oldest else None,
            details={"dead_rows": {r[0]: int(r[1]) for r in stats},
                     "last_autovacuum": {r[0]: r[2].isoformat() if r[2] else None
                                         for r in stats}})

    async def export_messages(self, account_id: int, *, created_from: float,
                              created_to: float, login: str | None, after_id: int,
                              limit: int) -> list[Message]:
        by_login = "AND m.login = $6" if login is not None else ""
        rows = await self._read(
            f"SELECT {_MESSAGE_COLUMNS} FROM messages m JOIN accounts a ON a.id = m.account_id "
            "WHERE m.account_id = $1 AND m.id > $2 AND m.created_at >= $3 "
            f"AND m.created_at <= $4 {by_login} ORDER BY m.id LIMIT $5",
            account_id, after_id, created_from, created_to, limit,
            *([login] if login is not None else []))
        return [_message(r) for r in rows]

    async def backup(self, path: str) -> None:
        raise StoreError("a PostgreSQL store is backed up with pg_dump (or continuous "
                         "archiving for point-in-time recovery): see the README")


# Tables of the store's own bookkeeping, never copied: its migrations, its counters.
_BOOKKEEPING = frozenset({"schema_migrations", "meta", "message_ids"})


@dataclass(frozen=True)
class _Table:
    columns: tuple[str, ...]
    key: tuple[str, ...]
    types: dict[str, str]


def _known(schema: dict[str, _Table], table: str, columns: Sequence[str]) -> tuple[str, str]:
    """`table` and `columns` quoted for SQL, once checked against the schema: names come
    from the other store, never from SQL text."""
    if table not in schema or not set(columns) <= set(schema[table].columns):
        raise StoreUnavailable(f"no table {table!r} with columns {list(columns)} here")
    return f'"{table}"', ", ".join(f'"{c}"' for c in columns)


# What a value of another backend becomes in a column of each type: SQLite keeps booleans
# as integers, and may hold an integer in a REAL column.
def _as_integer(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise StoreUnavailable(f"{value!r} is no integer")
    return int(value)


_CONVERT: dict[str, Callable[[Any], Any]] = {
    "boolean": bool, "bigint": _as_integer, "integer": _as_integer, "smallint": _as_integer,
    "double precision": float, "real": float, "text": str,
}


class _PostgreSQLSource:
    def __init__(self, conn: Any, schema: dict[str, _Table]) -> None:
        self._conn = conn
        self._schema = schema

    async def rows(self, table: str, columns: Sequence[str], *,
                   batch: int) -> AsyncIterator[list[tuple[Any, ...]]]:
        name, listed = _known(self._schema, table, columns)
        key = ", ".join(f'"{c}"' for c in self._schema[table].key)
        rows: list[tuple[Any, ...]] = []
        async for row in self._conn.cursor(f"SELECT {listed} FROM {name} ORDER BY {key}",
                                           prefetch=batch):
            rows.append(tuple(row))
            if len(rows) == batch:
                yield rows
                rows = []
        if rows:
            yield rows

    async def count(self, table: str) -> int:
        name, _ = _known(self._schema, table, ())
        return int(await self._conn.fetchval(f"SELECT COUNT(*) FROM {name}"))

    async def counters(self) -> Counters:
        row = await self._conn.fetchrow(
            "SELECT (SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END "
            "FROM settings_version), (SELECT next_id FROM message_ids)")
        incoming = await self._conn.fetchval(
            "SELECT pg_get_serial_sequence('incoming_messages', 'id')")
        # The identity's next value, read without drawing one (nextval would be a write).
        after = await self._conn.fetchval(
            f"SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END "
            f"FROM {incoming}")
        return Counters(int(row[0]), int(row[1]), int(after))


class _PostgreSQLSink:
    def __init__(self, conn: Any, schema: dict[str, _Table]) -> None:
        self._conn = conn
        self._schema = schema

    async def filled(self) -> list[str]:
        found = []
        for table in sorted(self._schema):
            name, _ = _known(self._schema, table, ())
            if await self._conn.fetchval(f"SELECT EXISTS (SELECT 1 FROM {name})"):
                found.append(table)
        return found

    async def add_rows(self, table: str, columns: Sequence[str],
                       rows: Sequence[Sequence[Any]]) -> None:
        _known(self._schema, table, columns)
        types = self._schema[table].types
        convert = [_CONVERT.get(types[c], lambda v: v) for c in columns]
        try:
            records = [tuple(None if v is None else f(v) for f, v in zip(convert, row,
                                                                          strict=True))
                       for row in rows]
        except (TypeError, ValueError, StoreUnavailable) as exc:
            raise StoreUnavailable(f"a row of {table} does not fit this store: {exc}") from exc
        # COPY: the fastest way in, one round trip per batch.
        await self._conn.copy_records_to_table(table, records=records, columns=list(columns))

    async def set_settings_versions(self, versions: Sequence[tuple[int, int]]) -> None:
        await self._conn.execute(
            "UPDATE accounts SET settings_version = v.version FROM unnest($1::bigint[], "
            "$2::bigint[]) AS v(id, version) WHERE accounts.id = v.id",
            [i for i, _ in versions], [v for _, v in versions])

    async def set_counters(self, counters: Counters) -> None:
        """The identity sequences past their tables' ids, the message ids past the
        messages' and the source's counter, the settings versions past every version."""
        for table, shape in self._schema.items():
            if "id" not in shape.columns:
                continue
            sequence = await self._conn.fetchval("SELECT pg_get_serial_sequence($1, 'id')",
                                                 f'"{table}"')
            if sequence is not None:
                # Incoming message ids also past the source's next one: its newest incoming
                # messages may have been deleted by the purge, and an id is never given twice.
                floor = counters.next_incoming_id if table == "incoming_messages" else 1
                await self._conn.execute(
                    f'SELECT setval($1, GREATEST(COALESCE(MAX(id), 0) + 1, $2), false) '
                    f'FROM "{table}"', sequence, floor)
        await self._conn.execute(
            "UPDATE message_ids SET next_id = GREATEST(next_id, $1, "
            "(SELECT COALESCE(MAX(id), 0) + 1 FROM messages))", counters.next_message_id)
        await self._conn.execute(
            "SELECT setval('settings_version', GREATEST($1, 1, "
            "(SELECT COALESCE(MAX(settings_version), 0) FROM accounts), "
            "(SELECT last_value FROM settings_version)))", counters.settings_version)


async def _account_id(db: Conn, account: str) -> int:
    """The id of the account named `account`; NotFound when there is none."""
    account_id = await db.fetchval("SELECT id FROM accounts WHERE name = $1", account)
    if account_id is None:
        raise NotFound(f"unknown account {account!r}")
    return int(account_id)


# Of what the purge walks: its table and the column holding the other party's number.
_PURGED: dict[PurgedRows, tuple[str, str]] = {
    "messages": ("messages", "receiver"),
    "incoming": ("incoming_messages", "sender"),
}
# Rows read per page when looking for a number (erase_number).
_SCAN_PAGE = 5000
# The tables `store_stats` counts.
_TABLES = ("accounts", "users", "senders", "messages", "message_events", "message_parts",
           "incoming_messages", "outbox", "outbox_attempts", "ledger", "admin_tokens")
