"""Backups of an SQLite store, checked before they count, and restoring one.

`http2sms backup FILE` has the running store write a consistent copy of itself
(`MaintenanceStore.backup`: `VACUUM INTO`, one read transaction while sends go on), then
checks the copy here before it takes the name FILE: SQLite's `integrity_check`, and the
ledger identity (`rules.ledger_problems`) on the copy opened as a store. A backup that
fails a check is not kept.

A backup never takes the name of the store or of its files, and is synced to disk (with
its folder) before the command says it is done.

`http2sms restore FILE` refuses a store in use (a gateway holds its `delivery` lock, or any
process has it open: SQLite's own lock, held until the file is replaced) and a target that
exists unless forced; it copies FILE next to the target (SQLite's backup API),
checks the copy the same way, and only then puts it in the target's place, removing the
target's write-ahead log first: an old log applied to the restored file would corrupt it.

PostgreSQL stores are backed up with PostgreSQL's own tools (README: pg_dump, PITR).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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


def refuse_own_files(file: str, store: str) -> None:
    """A backup never takes the name of the store it copies, nor of its log, shared memory
    or locks: replacing the file a gateway writes to (`--force`) would leave it writing to
    a deleted file, and the old log applied to the copy."""
    if store == ":memory:":
        return
    named = os.path.realpath(file)
    own = os.path.realpath(store)
    if named == own or named.startswith(f"{own}-") or (
            os.path.exists(file) and os.path.exists(store) and os.path.samefile(file, store)):
        raise StoreError(f"{file} is the store itself or one of its files: a backup goes "
                         "elsewhere")


def make_durable(path: str) -> None:
    """`path` and its folder's entry for it on disk before a command says it is done:
    `VACUUM INTO` does not sync what it writes, and a rename is in the folder."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


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


# SQLite's lock bytes (its file format, "the lock-byte page"): every connection to a store
# in WAL mode holds a read lock in the SHARED range for as long as it is open, idle or not.
_PENDING_BYTE = 0x40000000
_SHARED_FIRST = _PENDING_BYTE + 2
_SHARED_SIZE = 510


@contextmanager
def _unopened(path: str) -> Iterator[None]:
    """Holds the store at `path` against every SQLite connection, or raises StoreError if
    one is open: any process on it (a gateway that does not deliver, a command), not only
    the one holding the delivery lock. Held until the file is replaced: a connection
    opened meanwhile would write to the file about to be deleted."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        yield
        return
    except OSError as exc:
        raise StoreError(f"cannot open the store {path}: {exc}") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, _SHARED_SIZE, _SHARED_FIRST)
        except OSError:
            raise StoreError(f"the store {path} is open in another process (a gateway or a "
                             "command): stop it first") from None
        yield
    finally:
        os.close(fd)


async def restore(source: str, target: str, *, force: bool = False) -> Checked:
    """Put a checked copy of the backup `source` in the place of the store `target`."""
    if not Path(source).is_file():
        raise StoreError(f"no backup at {source}")
    if Path(target).exists() and os.path.samefile(source, target):
        # Read through a connection of this process, the store would lose the lock that
        # keeps others out while it is replaced (POSIX locks go with any close).
        raise StoreError(f"{source} is the store itself: nothing to restore")
    if in_use(target):
        raise StoreError(f"the store {target} is in use by a running gateway: stop it first")
    if Path(target).exists() and not force:
        raise StoreError(f"{target} exists: restoring would overwrite it (--force to do so)")
    with _unopened(target):
        return await _restore(source, target)


async def _restore(source: str, target: str) -> Checked:
    copy = partial_name(target)
    _remove(copy)
    try:
        Path(target).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _copy(source, copy)
        checked = await check(copy)
        # The target's log and shared memory belong to the file being replaced.
        for leftover in (f"{target}-wal", f"{target}-shm"):
            _remove(leftover)
        make_durable(copy)
        os.replace(copy, target)
        make_durable(target)
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
