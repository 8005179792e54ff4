"""Copying the write-ahead log back into the store file, away from the write lock.

In WAL mode every commit appends its pages to the log, and a checkpoint copies them into
the store file so that the log can start over. By default SQLite runs that checkpoint inside
the COMMIT that takes the log past 1,000 pages: while that transaction still holds the
write lock, and, in the send process, on the event loop. A checkpoint does not need the
write lock, so a thread of its own (`Checkpointer`) runs it every few tenths of a second
on a connection of its own, and writers keep SQLite's automatic checkpoint only as a
fallback for a log far larger than the thread lets it grow (`FALLBACK_PAGES`).

A passive checkpoint copies what no reader still needs and never waits: commits go on while
it runs. It syncs the log before copying and the store file after, so a commit, durable
once in the log, stays durable when the log starts over.
"""

from __future__ import annotations

import sqlite3
import threading

import structlog

log = structlog.get_logger("gateway.store")

# A writer checkpoints by itself past this many log pages (SQLite's default is 1,000): only
# when the checkpointing thread is stopped, failing or too slow. 16 MB with 4 KiB pages.
FALLBACK_PAGES = 4000


class Checkpointer:
    """A thread running `PRAGMA wal_checkpoint(PASSIVE)` on the store every `interval` s."""

    def __init__(self, path: str, interval: float) -> None:
        self.path = path
        self.interval = interval
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._failing = False

    def start(self) -> None:
        # Connected here, not in the thread: a store that cannot be opened fails its start.
        self._conn = sqlite3.connect(self.path, isolation_level=None,
                                     check_same_thread=False)
        # FULL: the store file is synced before the log may start over (see the docstring).
        self._conn.execute("PRAGMA synchronous = FULL")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="store-checkpoints",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def run_once(self) -> tuple[int, int]:
        """One passive checkpoint: (pages in the log, pages of it now in the store file)."""
        if self._conn is None:
            raise sqlite3.ProgrammingError("the checkpointer is stopped")
        # (busy, log, checkpointed): busy when another checkpoint runs; nothing to do then.
        _busy, pages, copied = self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return pages, copied

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.run_once()
            except sqlite3.Error as exc:
                # Writers fall back to checkpointing by themselves: log the change of state
                # once, not every interval.
                if not self._failing:
                    log.error("checkpoint_failed", error=str(exc))
                self._failing = True
            else:
                if self._failing:
                    log.info("checkpoint_recovered")
                self._failing = False
