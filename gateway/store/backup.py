"""Backups of an SQLite store, checked before they count, and restoring one.

`http2sms backup FILE` has the running store write a consistent copy of itself
(`MaintenanceStore.backup`: `VACUUM INTO`, one read transaction while sends go on), then
checks the copy here before it takes the name FILE: SQLite's `integrity_check`, and the
ledger identity (`rules.ledger_problems`) on the copy opened as a store. A backup that
fails a check is not kept.

`http2sms restore FILE` refuses a store in use (a gateway holds its `delivery` lock) and a
target that exists unless forced; it copies FILE next to the target (SQLite's backup API),
checks the copy the same way, and only then puts it in the target's place, removing the
target's write-ahead log first: an old log applied to the restored file would corrupt it.

PostgreSQL stores are backed up with PostgreSQL's own tools (README: pg_dump, PITR).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

from gateway.store import StoreError, rules
from gateway.store.sqlite import FILE_MODE, SQLiteStore

# The lock every running gateway holds on its store (the delivery worker's, or the
# one-process gateway's DeliveryGuard): see gateway.delivery_guard.
IN_USE_LOCK = "delivery"


class BackupFailed(StoreError):
    """A copy that is not a sound store: kept nowhere."""


@dataclass(frozen=True)
class Checked:
    """What a copy that passed its checks holds."""

    path: str
    size_bytes: int
    messages: int
    accounts: int
    purchased: int


async def check(path: str) -> Checked:
    """SQLite's integrity check, then the ledger identity, on the store at `path`."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise BackupFailed(f"{path} is not a readable SQLite store: {exc}") from exc
    if result != ["ok"]:
        raise BackupFailed(f"{path} fails SQLite's integrity check: {'; '.join(result[:5])}")
    store = SQLiteStore(path)
    await store.open()
    try:
        totals = await store.ledger_totals()
        stats = await store.store_stats()
    finally:
        await store.close()
    problems = rules.ledger_problems(totals)
    if problems:
        raise BackupFailed(f"{path}: the ledger identity does not hold: {'; '.join(problems)}")
    return Checked(path=path, size_bytes=os.path.getsize(path),
                   messages=stats.rows["messages"], accounts=stats.rows["accounts"],
                   purchased=totals["purchased"])


def partial_name(path: str) -> str:
    """Where a copy is written before its checks: next to its final name, same disk."""
    return f"{path}.partial"


def in_use(path: str) -> bool:
    """Whether a gateway runs on the SQLite store at `path` (it holds the delivery lock)."""
    lock = f"{path}-{IN_USE_LOCK}.lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def restore(source: str, target: str, *, force: bool = False) -> Checked:
    """Put a checked copy of the backup `source` in the place of the store `target`."""
    if not Path(source).is_file():
        raise StoreError(f"no backup at {source}")
    if in_use(target):
        raise StoreError(f"the store {target} is in use by a running gateway: stop it first")
    if Path(target).exists() and not force:
        raise StoreError(f"{target} exists: restoring would overwrite it (--force to do so)")
    copy = partial_name(target)
    _remove(copy)
    try:
        Path(target).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _copy(source, copy)
        checked = await check(copy)
        # The target's log and shared memory belong to the file being replaced.
        for leftover in (f"{target}-wal", f"{target}-shm"):
            _remove(leftover)
        os.replace(copy, target)
    except BaseException:
        _remove(copy)
        raise
    return Checked(target, checked.size_bytes, checked.messages, checked.accounts,
                   checked.purchased)


def _copy(source: str, target: str) -> None:
    """SQLite's backup API, page by page: a consistent copy even of a file in WAL mode."""
    try:
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         FILE_MODE))
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(target)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
    except (sqlite3.Error, OSError) as exc:
        raise BackupFailed(f"cannot copy {source}: {exc}") from exc


def _remove(path: str) -> None:
    with suppress(FileNotFoundError):
        os.remove(path)
