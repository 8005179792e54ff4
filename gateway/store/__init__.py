"""The store: what the gateway persists through, by role, and the factory that opens one.

A caller depends on the role it uses, never on a backend: the send path on `SendStore`,
delivery on `DeliveryStore`, the callbacks and alerts on `OutboxStore`, the management
service on `ManagementStore`, the lists and ledger on `ReadStore`, the admin API's tokens on
`TokenStore`, the purge, backups and exports on `MaintenanceStore`. `open_store` picks the
backend from a URL (SQLite embedded, PostgreSQL for multi-node deployments) and tunes it
for the process that asks (`Role`). The records
the roles take and return live in `gateway.records`; the decisions a transaction makes (who
pays, refunds, which alert fires, which outbox items a claim takes) in `gateway.store.rules`,
shared by every backend.

What every backend guarantees is written on each role below, and checked by one contract
suite, `tests/store/test_contract.py`, that every backend runs (see docs/store.md).
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from gateway.records import UNSET

if TYPE_CHECKING:  # for annotations only: callers import the records from gateway.records
    from gateway.records import (
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


class StoreError(Exception):
    """Base of the errors a backend raises for callers to turn into answers."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class NotEnoughCredits(StoreError):
    pass


class OverCreditLimit(Conflict):
    """A change that would leave an account holding more than `credits.MAX_CREDITS`."""


class StoreUnavailable(StoreError):
    """The database cannot be opened or written (disk full, locked, corrupt)."""


class Taken(StoreError):
    """An `exclusive` name another holder (maybe another process) has now."""


class Held:
    """A name held with `exclusive`, and whether it still is."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lost = asyncio.Event()
        self.reason = ""
        self.released = False

    def lose(self, reason: str) -> bool:
        """Mark the lock lost (the backend does, when it learns it): `lost` is set. False
        if it was lost already, or let go of (the block ended)."""
        if self.released or self.lost.is_set():
            return False
        self.reason = reason
        self.lost.set()
        return True


# Who opens the store, for `open_store` to tune it: the send process (its writes go first
# when a delivery worker competes for the write lock), the delivery worker (its writes can
# be redone, and they give way to sends), the command line and everyone else.
Role = Literal["send", "delivery", "cli"]


class StoreSettings(Protocol):
    """What `open_store` reads of the `[store]` settings."""

    @property
    def location(self) -> str:
        """A URL or a bare path (`store.url`, else `store.path`)."""
    @property
    def busy_timeout_seconds(self) -> float: ...


# What another process's commits may wake this one for: messages to deliver, outbox items
# (callbacks, alerts) to send.
Topic = Literal["messages", "outbox"]


class StoreLifecycle(Protocol):
    """What every role shares: opening, closing, readiness, store-wide locks, wake-ups."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def check_writable(self) -> None:
        """Raise StoreUnavailable unless a write transaction can commit now."""

    def exclusive(self, name: str, *, wait: bool = False, shared: bool = False
                  ) -> AbstractAsyncContextManager[Held]:
        """Hold the store-wide lock `name` for the block: one holder at a time across
        every process (and node) using the store, released when the holder dies.

        `shared`: any number of shared holders at once, but never together with an
        exclusive one (a reader-writer lock across processes).
        Taken already: raises `Taken`, or with `wait` waits until it is free. The `Held`
        it gives tells when the lock is lost without the holder letting go (PostgreSQL:
        its connection to the database ended, and another node may take it now): the
        holder must stop acting as the one holder at once.
        """
        ...

    def wake_ups(self, callbacks: Mapping[Topic, Callable[[], None]]
                 ) -> AbstractAsyncContextManager[None]:
        """While in the block, `callbacks[topic]()` runs soon after another store instance
        (another process, another node) commits work of that topic. Never instead of
        polling: a wake-up may be missed (a connection lost meanwhile: each callback runs
        once when it is back, for what it missed) or come for nothing.

        PostgreSQL: LISTEN on a connection of its own. SQLite: none (one machine, where
        the processes poke each other).
        """
        ...


class SendStore(StoreLifecycle, Protocol):
    """The send path: read what a request is checked against, commit sends.

    Guarantees:
    - Atomic charge: an order is accepted only if what pays for it (the user's active
      quota, else the account's balance) covers its total when its transaction commits,
      and is charged in that same transaction. Concurrent commits, from any number of
      processes, never spend a credit twice nor refuse an affordable order because of
      another one's rollback; at every commit, purchased = balances + quotas + spent.
    - Exactly one alert per crossing: the transaction that takes a user's spendable
      credits below its threshold queues that user's alert (and disarms it) in its own
      commit; concurrent crossings see one armed flag, so one alert, never two.
    - An order checked at a settings version (`SendOrder.settings_version`) commits only
      if its account's version is still that one; otherwise it is refused as "stale".
      Versions are per account (a change to one never makes another's orders stale)
      and never reused.
    - Message ids are unique and grow within one commit (one order's recipients get
      consecutive ids). Across accounts, concurrent commits' ids need NOT become visible
      in id order: a reader may see id 12 before id 11 commits (PostgreSQL hands out ids
      before the commit). Readers that follow new messages of several accounts must not
      treat "the highest id seen" as "all below it are seen". Within one account they
      do (see `ReadStore`).

    `concurrent_commits`: how many `commit_sends` a caller may have in flight at once to
    gain anything (SQLite: 1, its single writer takes them in turn; PostgreSQL: more,
    it commits them side by side). More is always correct, only not faster.
    """

    concurrent_commits: int

    async def send_context(self, account: str, login: str, *,
                           fresh: bool = False) -> SendContext | None:
        """The send settings of a user, possibly cached; `fresh` reads the database."""
    async def commit_sends(self, orders: Sequence[SendOrder], *,
                           at: float) -> list[SendOutcome]:
        """Decide and store `orders` in one transaction, in their order (`rules.decide`)."""
        ...


class DeliveryStore(StoreLifecycle, Protocol):
    """Delivery: what to hand to the operator, and the operator's reports.

    Guarantees:
    - `apply_updates` is one transaction: state changes, their events, callbacks and the
      refunds of final failures that were not billed commit together or not at all.
    - A message already final ignores later updates: a late or duplicated report never
      changes a settled outcome, nor refunds twice.
    """

    async def mark_sent(self, ids: Sequence[int], *, at: float,
                        references: Sequence[SentMessage] = ()) -> None: ...
    async def apply_updates(self, updates: Sequence[StateUpdate]) -> AppliedUpdates: ...
    # Delivery by claims (see SQLiteStore for the rules).
    async def claim_messages(self, *, now: float, lease: float,
                             limit: int) -> list[OutgoingMessage]:
        """Due messages not taken by the operator and not claimed by a live lease, claimed
        for `lease` seconds: a message is handed to one claimer at a time, whatever order
        the ids committed in; a claimer that dies frees its claims when the lease ends."""
        ...
    async def release_messages(self, until: Sequence[tuple[int, float]]) -> None: ...
    async def free_claims(self) -> int: ...
    async def next_due_at(self) -> float | None: ...
    async def in_flight(self, *, after_id: int, limit: int) -> list[OutgoingMessage]: ...
    async def apply_reports(self, reports: Sequence[OperatorReport]) -> AppliedUpdates:
        """`apply_updates` for reports that name the operator's reference of a part."""
        ...
    async def add_incoming(self, messages: Sequence[IncomingMessage]) -> list[int]:
        """Keep messages from handsets for the account each one answers (their
        `account_id` and `id` are ignored): the account of the newest message sent to
        that handset from the number it wrote to (among the last INCOMING_LOOKBACK
        messages), else the account that declared that number as a sender; that lookup is
        a read before the write. Returns each one's new id, 0 for one no account claims
        (not kept). One with the reference, numbers and text of one kept at most
        rules.INCOMING_REPEAT_SECONDS before is that one sent again: not kept twice, its
        id returned."""
        ...
    async def add_incoming_parts(self, parts: Sequence[IncomingPart]) -> list[int | None]:
        """Keep parts of long messages from handsets, each committed when this returns;
        the part that makes its message whole keeps that message, as `add_incoming`
        would, with the parts' text in order. Returns for each part None while its message
        waits for parts, else its message's id (0: no account claims it). A part with the
        numbers, group, total, number and reference of one kept is that one sent again
        (nothing changes); with another reference, a new message took up the group: the
        older one's parts go. Parts wait rules.INCOMING_PARTS_SECONDS at most."""
        ...


class OutboxStore(StoreLifecycle, Protocol):
    """The outbox: callbacks and alerts written with the change they report.

    Guarantees:
    - A claim is handed out once: while its lease runs, no other claim (from this or
      any other process) returns the same item. When the lease ends unanswered, the
      item is due again: nothing claimed is lost.
    - Results and the next claim commit together when given together.
    - A pending callback goes to the URL its message's next callback would get: the
      transaction that changes a user's or an account's callback URL (or deletes a user)
      re-points them, and cancels them (dead) when no URL is left.
    """

    async def claim_outbox(self, kinds: Sequence[str], *, now: float, lease: float,
                           limit: int, bounds: ClaimBounds | None = None,
                           skip_targets: Sequence[str] = (),
                           skip_accounts: Sequence[int] = (), deep: bool = False,
                           results: Sequence[OutboxResult] = ()) -> list[OutboxItem]: ...
    async def next_outbox_at(self, kinds: Sequence[str], *,
                             skip_targets: Sequence[str] = ()) -> float | None: ...
    async def record_outbox_results(self, results: Sequence[OutboxResult]) -> None: ...
    async def enqueue_outbox(self, kind: str, *, account_id: int, user_id: int | None,
                             target: str, payload: dict[str, Any], at: float,
                             message_id: int | None = None) -> int: ...
    async def outbox_status(self, item_id: int) -> tuple[str, int, str] | None:
        """(state, attempts, detail of the latest attempt) of one outbox item."""


class ManagementStore(StoreLifecycle, Protocol):
    """Accounts, users and senders. All amounts are hundredths of a credit.

    Guarantees:
    - No lost update: concurrent top-ups and quota moves on one account all count;
      each is one transaction that reads and writes the balance under the write lock
      (or a row lock), and writes its ledger entry with it.
    - A quota move never takes more than the account holds (NotEnoughCredits).
    - An account never holds more than `credits.MAX_CREDITS`, its balance, quotas and
      messages not yet final together (`rules.top_up`): a top-up beyond it, or a quota
      above it, is refused (OverCreditLimit) and changes nothing.
    - Every change that moves credits re-evaluates the alerts of the account in its
      transaction (see `SendStore`).
    """

    async def create_account(self, name: str, balance: int, *, at: float) -> Account: ...
    async def get_account(self, name: str) -> Account: ...
    async def list_accounts(self) -> list[str]: ...
    async def credit_account(self, name: str, amount: int, *, at: float) -> Account: ...
    async def update_account(self, name: str, *, callback_url: Any = UNSET,
                             stop_clause: Any = UNSET, at: float | None = None) -> Account:
        """A new or cleared `callback_url` applies to the pending callbacks too (see
        `OutboxStore`); `at` (default: now) is when those cleared are cancelled."""
    async def add_sender(self, account: str, sender: str) -> None: ...
    async def remove_sender(self, account: str, sender: str) -> None: ...
    async def create_user(self, account: str, login: str, password_hash: str, *,
                          at: float) -> User: ...
    async def get_user(self, account: str, login: str) -> User: ...
    async def list_users(self, account: str) -> list[str]: ...
    async def update_user(self, account: str, login: str, changes: UserChanges, *,
                          at: float, check: Callable[[User], None] | None = None) -> User:
        """`check` sees the user as the update's own transaction reads it, and may raise
        to refuse: a rule across fields holds even against a concurrent update."""
        ...
    async def delete_user(self, account: str, login: str, *, at: float) -> None: ...


class ReadStore(StoreLifecycle, Protocol):
    """Reading back: messages, their history, the ledger, totals. Never writes.

    Guarantees:
    - Within one account, ids of ledger entries, messages and incoming messages become
      visible in id order: a page read with `after_id` (or `before_id`) never passes over
      an entry that commits later with a lower id. Every transaction that writes them
      draws their ids with the account's row locked (SQLite: the write lock) until it
      commits, so the next one on that account draws after that commit. Across accounts
      there is no such order: a cursor over several accounts must not be an id.
    """

    async def get_message(self, message_id: int) -> Message: ...
    async def message_events(self, message_id: int) -> list[MessageEvent]: ...
    async def message_attempts(self, message_id: int) -> list[OutboxAttempt]: ...
    async def list_messages(self, where: MessageFilter, *, limit: int,
                            before_id: int | None = None) -> list[Message]: ...
    async def list_ledger(self, account: str, *, limit: int,
                          after_id: int = 0) -> list[LedgerEntry]: ...
    async def list_incoming(self, account: str, *, limit: int,
                            before_id: int | None = None) -> list[IncomingMessage]:
        """The account's incoming messages, newest first."""
        ...
    async def ledger_totals(self) -> dict[str, int]: ...
    async def counts(self) -> dict[str, int]: ...


class TokenStore(StoreLifecycle, Protocol):
    """The admin API's tokens: their digests and scopes, never their secrets.

    Guarantees:
    - A revoked token is gone for the next lookup, in every process: lookups are not cached.
    - A token's name and key are unique (Conflict); its accounts exist when it is created
      (NotFound), and a token for all accounts (`accounts` None) covers later ones too.
    """

    async def create_token(self, name: str, key: str, digest: str,
                           accounts: Sequence[str] | None, *, at: float) -> AdminToken: ...
    async def find_token(self, key: str) -> AdminToken | None: ...
    async def list_tokens(self) -> list[AdminToken]: ...
    async def has_tokens(self) -> bool: ...
    async def token_used(self, token_id: int, *, at: float) -> None: ...
    async def revoke_token(self, name: str) -> None:
        """NotFound when no token has that name."""


class ConsoleStore(StoreLifecycle, Protocol):
    """The web console's users and sessions, and the figures of its account page.

    Guarantees:
    - A console user's e-mail is unique (Conflict); its accounts exist when it is created
      (NotFound). Deleting it, or changing its password, ends its sessions.
    - A session is found by the digest of its token; a deleted one is gone for the next
      lookup, in every process.
    """

    async def create_console_user(self, email: str, password_hash: str, *, operator: bool,
                                  accounts: Sequence[str], at: float) -> ConsoleUser: ...
    async def get_console_user(self, email: str) -> ConsoleUser | None: ...
    async def list_console_users(self) -> list[ConsoleUser]: ...
    async def delete_console_user(self, email: str) -> None:
        """NotFound when no console user has that e-mail."""
    async def set_console_password(self, email: str, password_hash: str) -> None:
        """NotFound when no console user has that e-mail."""
    async def create_console_session(self, digest: str, email: str, csrf: str, *,
                                     at: float) -> None: ...
    async def find_console_session(self, digest: str) -> ConsoleSession | None: ...
    async def touch_console_session(self, digest: str, *, at: float) -> None: ...
    async def delete_console_sessions(self, *, digest: str | None = None,
                                      idle_before: float | None = None) -> None: ...
    async def message_stats(self, account: str, *, since: float, period: float,
                            count: int) -> list[MessageStats]:
        """`count` periods of `period` seconds from `since`: the account's messages
        created in each, by outcome, and the credits they cost (refunds left out)."""
        ...


@dataclass(frozen=True)
class Counters:
    """Where a store's own counters stand, beyond the ids of its rows: the last settings
    version handed out, and the next message and incoming message ids (a gap left by a send
    rolled back, or by the purge's deletions, is kept, so an id is never handed out twice)."""

    settings_version: int
    next_message_id: int
    next_incoming_id: int = 1


class TableSource(Protocol):
    """A snapshot of a whole store, table by table (`CopyStore.read_tables`)."""

    def rows(self, table: str, columns: Sequence[str], *,
             batch: int) -> AsyncIterator[list[tuple[Any, ...]]]:
        """The table's rows (`columns`, in that order), `batch` at a time, by primary key."""
        ...
    async def count(self, table: str) -> int: ...
    async def counters(self) -> Counters: ...


class TableSink(Protocol):
    """One transaction that fills an empty store table by table (`CopyStore.write_tables`)."""

    async def filled(self) -> list[str]:
        """The tables that hold rows already (a copy goes only into an empty store)."""
    async def add_rows(self, table: str, columns: Sequence[str],
                       rows: Sequence[Sequence[Any]]) -> None: ...
    async def set_settings_versions(self, versions: Sequence[tuple[int, int]]) -> None:
        """(account id, settings version) pairs, as the source had them: the triggers
        gave the accounts new versions as their users and senders came in."""
    async def set_counters(self, counters: Counters) -> None:
        """Every counter past what the rows use (and at least `counters`), so the next
        id or version handed out is new."""


class CopyStore(StoreLifecycle, Protocol):
    """A whole store as tables, for `gateway.store.copy` to move between backends. Not a
    role of the running gateway: the copy runs with every gateway stopped."""

    async def table_columns(self) -> dict[str, tuple[str, ...]]:
        """Every table of the schema that holds the installation's data (not the store's
        bookkeeping: migrations, counters), with its columns."""
    def read_tables(self) -> AbstractAsyncContextManager[TableSource]: ...
    def write_tables(self) -> AbstractAsyncContextManager[TableSink]:
        """Committed when the block ends without an error, else nothing is written."""

# What the purge walks: an account's messages or its incoming messages.
PurgedRows = Literal["messages", "incoming"]


class MaintenanceStore(StoreLifecycle, Protocol):
    """Data over time: retention and the purge, erasure, space, backups and exports.

    Guarantees:
    - Every purge method is one short transaction of at most `limit` rows (SQLite: in the
      write lane, giving way to sends like the delivery worker's): the purge never holds
      the write lock long, whatever it has to go through.
    - Erasure keeps a message's id, account, login, state, ptt, parts and credits; its text
      becomes '' and its number masked (`retention.mask_number`). Only final messages are
      erased or deleted: a message still to be sent keeps its text.
    - The ledger is never touched: its references to deleted messages stay as text.
    """

    async def retention_settings(self) -> list[AccountRetention]:
        """Every account's own retention days (None: the server's), by account id."""
        ...
    async def set_retention(self, account: str, *, messages_days: Any = UNSET,
                            personal_data_days: Any = UNSET) -> AccountRetention:
        """Change an account's own days (None: back to the server's). NotFound."""
        ...
    async def erase_due(self, account_id: int, what: PurgedRows, *, before: float,
                        limit: int) -> PurgeStep:
        """Erase the personal data of up to `limit` of the account's rows created before
        `before`, continuing where the last call stopped (the store keeps the place)."""
        ...
    async def delete_due(self, account_id: int, what: PurgedRows, *, before: float,
                         after_id: int, limit: int) -> PurgeStep:
        """Delete up to `limit` of the account's final rows created before `before` with
        ids above `after_id` (messages with their history and parts)."""
        ...
    async def delete_outbox_due(self, before: Mapping[int, float | None],
                                default_before: float | None, *, after_id: int,
                                limit: int) -> PurgeStep:
        """Delete finished outbox items (and their attempts) created before their
        account's time in `before` (else `default_before`; None: kept)."""
        ...
    async def delete_parts_due(self, *, before: float, limit: int) -> PurgeStep:
        """Delete up to `limit` parts of long incoming messages kept since before `before`
        (whole or not: a part waits a day at most, `rules.INCOMING_PARTS_SECONDS`); `done`
        once none is left."""
        ...
    async def purge_preview(self, account_id: int, *, erase_before: float | None,
                            delete_before: float | None) -> dict[str, int]:
        """How many of the account's rows the purge would erase and delete now."""
        ...
    async def erase_number(self, account_id: int, number: str, *,
                           limit: int) -> PurgeStep:
        """Erase the personal data of every final message of the account to `number` and
        of its incoming messages from it, in transactions of at most `limit` rows; those
        not final yet are counted in `held`, not erased. The parts kept of its long
        messages from it, once whole, are deleted (they hold the text too)."""
        ...
    async def reclaim_space(self, *, pages: int) -> int:
        """Give up to `pages` free pages back to the file system (SQLite's incremental
        vacuum, in one short transaction); the pages given back. 0 where it means nothing."""
        ...
    async def store_stats(self) -> StoreStats: ...
    async def export_messages(self, account_id: int, *, created_from: float,
                              created_to: float, login: str | None, after_id: int,
                              limit: int) -> list[Message]:
        """One page of the account's messages in the time range, by id upwards from
        `after_id` (keyset pagination: a long export holds no transaction open)."""
        ...
    async def backup(self, path: str) -> None:
        """Write a consistent copy of the store to `path` while it is in use. A backend
        that leaves backups to its own tools raises StoreError saying which."""
        ...


class Store(SendStore, DeliveryStore, OutboxStore, ManagementStore, ReadStore, TokenStore,
            ConsoleStore, CopyStore, MaintenanceStore, Protocol):
    """Every role: what a backend implements, and what the assembly passes around."""


# Backends by URL scheme, imported only when asked for (as uvicorn's loops and protocols):
# a gateway on SQLite never loads a PostgreSQL driver.
_BACKENDS: dict[str, str] = {
    "sqlite": "gateway.store.sqlite:SQLiteStore",
    "postgresql": "gateway.store.postgresql:PostgreSQLStore",
    "postgres": "gateway.store.postgresql:PostgreSQLStore",  # libpq's other spelling
}


def parse_url(url: str) -> tuple[str, str]:
    """(scheme, location) of a store URL; a bare path is an SQLite file.

    As SQLAlchemy spells them: `sqlite:///var/g.sqlite3` is relative to the working
    folder, `sqlite:////srv/g.sqlite3` absolute, `sqlite:///:memory:` in memory. A
    malformed URL is StoreUnavailable, a store error every caller already answers with
    one clear line.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "sqlite", url
    scheme = scheme.lower().split("+", 1)[0]
    if scheme == "sqlite":
        if not rest.startswith("/"):
            raise StoreUnavailable(
                f"a sqlite URL names a file after three slashes (sqlite:///relative.db, "
                f"sqlite:////absolute.db): {url!r}")
        rest = rest[1:]
        if not rest:
            raise StoreUnavailable(f"a sqlite URL needs a file: {url!r}")
    return scheme, rest


def shown(url: str) -> str:
    """A store URL fit for logs and messages: its password, if any, left out."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


def open_store(where: str | os.PathLike[str] | StoreSettings, role: Role) -> Store:
    """The store at `where` (a URL, a bare path, or the `[store]` settings), tuned for
    `role`; call `await store.open()` before use and `close()` after.

    Role-specific tuning (SQLite: who goes first for the write lock, whether each
    commit is synced) is decided here, from `role`, so no caller knows a backend's knobs.
    """
    if isinstance(where, str | os.PathLike):
        url, busy_timeout = os.fspath(where), None
    else:
        url, busy_timeout = where.location, where.busy_timeout_seconds
    scheme, location = parse_url(url)
    target = _BACKENDS.get(scheme)
    if target is None:
        raise StoreUnavailable(f"no store backend for {scheme!r} URLs "
                               f"(known: {', '.join(sorted(_BACKENDS))})")
    module, _, name = target.partition(":")
    backend: Callable[..., Store] = getattr(importlib.import_module(module), name)
    return backend(location, role=role, busy_timeout=busy_timeout)


__all__ = [
    "Conflict", "ConsoleStore", "CopyStore", "Counters", "DeliveryStore", "Held",
    "MaintenanceStore", "ManagementStore", "NotEnoughCredits", "NotFound",
    "OutboxStore", "OverCreditLimit", "PurgedRows", "ReadStore", "Role", "SendStore", "Store",
    "StoreError", "StoreLifecycle", "StoreSettings", "StoreUnavailable", "TableSink",
    "TableSource", "Taken", "TokenStore", "Topic",
    "open_store", "parse_url", "shown",
]
