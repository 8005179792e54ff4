"""`http2sms store copy`: a whole installation from one store to another, any backends.

The copy reads a snapshot of the source (one read transaction) and writes the target in one
transaction, table by table, `batch` rows at a time: memory stays the same for a million
messages as for ten, and a copy that fails half-way leaves the target empty, to be run
again. It goes only into an empty store: merging two installations would mix their ids.

Rows keep their ids, so references between tables (a message's events, an outbox item's
message, a token's accounts) hold as they are; the target's counters are then set past
what the rows use (`TableSink.set_counters`), so the next send, ledger entry or settings
version gets a new id. Afterwards the copy checks, on both sides, that the rows counted
are the rows copied and that the ledger holds: purchased = balances + quotas + spent
(`check`, pure).

Run it with every gateway on the source stopped: a send committed during the copy would be
in the source and not in the target (the check then says so).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.store import Store, StoreError, rules

# Tables in an order where every row's references come before it. A table the copy does
# not know (added by a later migration) is copied too, after these, by name.
TABLE_ORDER = (
    "accounts", "senders", "users", "admin_tokens", "admin_token_accounts", "messages",
    "message_events", "message_parts", "incoming_messages", "incoming_parts", "outbox",
    "outbox_attempts", "ledger", "console_users", "console_user_accounts", "console_sessions",
    "purge_progress", "purge_held",
)

BATCH = 5000


class CopyRefused(StoreError):
    """The copy cannot start: the target holds data, or the schemas differ."""


@dataclass(frozen=True)
class TableCount:
    table: str
    source: int
    copied: int
    target: int


@dataclass(frozen=True)
class CopyReport:
    tables: tuple[TableCount, ...]
    source_totals: dict[str, int]
    target_totals: dict[str, int]
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


def table_order(tables: Sequence[str]) -> list[str]:
    """`tables` in the order they are copied: the known ones first (TABLE_ORDER), then
    any other by name."""
    known = [t for t in TABLE_ORDER if t in tables]
    return known + sorted(set(tables) - set(TABLE_ORDER))


def schema_differences(source: dict[str, tuple[str, ...]],
                       target: dict[str, tuple[str, ...]]) -> list[str]:
    """What keeps rows of `source` from going into `target` as they are (empty: nothing)."""
    found = []
    for table in sorted(set(source) | set(target)):
        if table not in target:
            found.append(f"table {table} is missing on the target")
        elif table not in source:
            found.append(f"table {table} is missing on the source")
        elif set(source[table]) != set(target[table]):
            odd = sorted(set(source[table]) ^ set(target[table]))
            found.append(f"table {table} differs in columns: {', '.join(odd)}")
    return found


def check(tables: Sequence[TableCount], source_totals: dict[str, int],
          target_totals: dict[str, int]) -> list[str]:
    """Everything that shows the target is not the source (empty: it is)."""
    found = [f"{t.table}: {t.source} rows in the source, {t.copied} copied, {t.target} in "
             "the target" for t in tables if not t.source == t.copied == t.target]
    for side, totals in (("source", source_totals), ("target", target_totals)):
        found += [f"{side}: {problem}" for problem in rules.ledger_problems(totals)]
    if source_totals != target_totals:
        found.append(f"the ledger totals differ: source {source_totals}, target "
                     f"{target_totals}")
    return found


async def copy_store(source: Store, target: Store, *, batch: int = BATCH,
                     progress: Callable[[str, int], None] | None = None) -> CopyReport:
    """Copy every row of `source` into the empty `target` (both open), then check both.

    `progress(table, rows)` is called after each batch written, with the table's rows so
    far. Raises CopyRefused (nothing written) if the target holds rows or the schemas
    differ."""
    if batch < 1:
        raise ValueError("a batch is at least one row")
    columns = await source.table_columns()
    differences = schema_differences(columns, await target.table_columns())
    if differences:
        raise CopyRefused("the stores' schemas differ (is one of them from another version "
                          f"of the gateway?): {'; '.join(differences)}")
    order = table_order(list(columns))
    copied: dict[str, int] = {}
    source_counts: dict[str, int] = {}
    async with target.write_tables() as sink, source.read_tables() as snapshot:
        filled = await sink.filled()
        if filled:
            raise CopyRefused("the target store is not empty (a copy goes only into a new "
                              f"store): {', '.join(filled)} hold rows")
        for table in order:
            copied[table] = 0
            source_counts[table] = await snapshot.count(table)
            async for rows in snapshot.rows(table, columns[table], batch=batch):
                await sink.add_rows(table, columns[table], rows)
                copied[table] += len(rows)
                if progress is not None:
                    progress(table, copied[table])
        if "accounts" in columns:
            async for versions in snapshot.rows("accounts", ("id", "settings_version"),
                                                batch=batch):
                await sink.set_settings_versions([(int(i), int(v)) for i, v in versions])
        await sink.set_counters(await snapshot.counters())
    async with target.read_tables() as written:
        counts = tuple([TableCount(table, source_counts[table], copied[table],
                                   await written.count(table)) for table in order])
    source_totals = await source.ledger_totals()
    target_totals = await target.ledger_totals()
    return CopyReport(counts, source_totals, target_totals,
                      tuple(check(counts, source_totals, target_totals)))
