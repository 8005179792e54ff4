"""Data over time on a real store: the CLI's retention, purge, stats, erasure, exports,
backups and restores; the purge and a backup while a real gateway takes sends; an export of
200,000 messages in bounded memory."""

from __future__ import annotations

import asyncio
import csv
import fcntl
import io
import json
import os
import re
import resource
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from click.testing import Result

from gateway.cli import DEMO_ACCOUNT
from gateway.retention import DAY
from gateway.store import backup
from tests.cli_in_process import invoke
from tests.conftest import ledger_identity
from tests.serverproc import ServerProcess, demo_params, prepare_store, servers, store_totals

NOW = time.time()


def run(db: Path | str, *args: str) -> Result:
    return invoke("--db", str(db), *args)


def ok_json(db: Path | str, *args: str) -> Any:
    result = run(db, *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def prefill(db: Path, count: int, *, created_at: float, spacing: float = 0.001,
            receiver: str = "+336{:08d}") -> None:
    """`count` final messages of the demo account from `created_at` on, each with its
    history and a done callback, written with SQL (fast: no HTTP, no send path). They are
    charged to nobody: the ledger identity counts credits, not messages."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        (account_id, user_id), = conn.execute(
            "SELECT a.id, u.id FROM accounts a JOIN users u ON u.account_id = a.id "
            "WHERE a.name = ?", (DEMO_ACCOUNT,))
        (first,), = conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM messages")
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO messages (id, account_id, user_id, login, sender, receiver, body, "
            "coding, parts, class, no_stop, tag, credits, charged_to, created_at, state, ptt, "
            "dlr, sent_at, delivered_at, updated_at) VALUES (?, ?, ?, 'demo', 'DEMO', ?, "
            "'Your code is 123456', 1, 1, 1, 1, 'old', 100, 'account', ?, 'final', 4, 1, "
            "?, ?, ?)",
            ((first + n, account_id, user_id, receiver.format(n % 100_000_000),
              created_at + n * spacing, created_at + n * spacing + 1,
              created_at + n * spacing + 5, created_at + n * spacing + 5)
             for n in range(count)))
        last = first + count - 1
        conn.execute("INSERT INTO message_events (message_id, at, ptt, dlr, note) "
                     "SELECT id, delivered_at, 4, 1, 'Delivered' FROM messages "
                     "WHERE id BETWEEN ? AND ?", (first, last))
        conn.execute("INSERT INTO outbox (kind, message_id, account_id, user_id, target, "
                     "payload, created_at, next_attempt_at, attempts, state, done_at) "
                     "SELECT 'callback', id, account_id, user_id, 'http://127.0.0.1:9/', "
                     "json_object('id', id, 'ptt', 4, 'dlr', 1, 'at', delivered_at), "
                     "delivered_at, delivered_at, 1, 'done', delivered_at FROM messages "
                     "WHERE id BETWEEN ? AND ?", (first, last))
        conn.execute("COMMIT")
    finally:
        conn.close()


# -- the commands ----------------------------------------------------------------------------

def test_retention_days_purge_stats_erasure_and_export(tmp_path: Path) -> None:
    db = tmp_path / "data.sqlite3"
    asyncio.run(prepare_store(db, credits=100))
    prefill(db, 5, created_at=NOW - 500 * DAY)  # due for deletion
    prefill(db, 4, created_at=NOW - 100 * DAY, receiver="+3361234567{}")  # for erasure
    prefill(db, 3, created_at=NOW - 1 * DAY, receiver="+3361234567{}")  # kept whole

    view = ok_json(db, "account", "set", DEMO_ACCOUNT, "--retention-days", "450")
    assert (view["retentionDays"], view["appliedRetentionDays"],
            view["appliedPersonalDataDays"]) == (450, 450, 90)
    assert view["name"] == DEMO_ACCOUNT
    view = ok_json(db, "account", "set", DEMO_ACCOUNT, "--retention-days", "default",
                   "--personal-data-days", "30")
    assert (view["retentionDays"], view["personalDataDays"]) == (None, 30)
    bad = run(db, "account", "set", DEMO_ACCOUNT, "--retention-days", "-1")
    assert bad.exit_code == 2 and "retentionDays" in bad.stderr
    ok_json(db, "account", "set", DEMO_ACCOUNT, "--personal-data-days", "default")

    (preview,) = ok_json(db, "purge", "--dry-run")
    assert (preview["messages_to_erase"], preview["messages_to_delete"]) == (9, 5)
    stats = ok_json(db, "store", "stats")
    assert stats["rows"]["messages"] == 12 and stats["backend"] == "sqlite"
    assert stats["ledger"] == "holds"
    assert stats["auto_vacuum"] == "incremental"  # a store created by this version

    report = ok_json(db, "purge")
    assert report["erased"] == {"messages": 9} and report["deleted"] == {
        "messages": 5, "outbox": 5}
    assert ok_json(db, "purge", "--dry-run") == []
    stats = ok_json(db, "store", "stats")
    assert stats["rows"]["messages"] == 7 and stats["rows"]["message_events"] == 7

    erased = ok_json(db, "message", "erase", DEMO_ACCOUNT, "--receiver", "+33612345671")
    assert erased == {"erased": 1}  # the recent one: the older is erased already
    bad = run(db, "message", "erase", DEMO_ACCOUNT, "--receiver", "nobody")
    assert bad.exit_code == 2

    day = time.strftime("%Y-%m-%d", time.gmtime(NOW - 1 * DAY))
    out = run(db, "message", "export", DEMO_ACCOUNT, "--from", "2000-01-01", "--to", day)
    assert out.exit_code == 0, out.stderr
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert [r["receiver"] for r in rows] == [
        "+33612****70", "+33612****71", "+33612****72", "+33612****73",
        "+33612345670", "+33612****71", "+33612345672"]
    out = run(db, "message", "export", DEMO_ACCOUNT, "--from", day, "--to", day,
              "--format", "jsonl", "--login", "nobody")
    assert out.exit_code == 0 and out.stdout == ""


def test_the_purge_gives_the_free_pages_back(tmp_path: Path) -> None:
    db = tmp_path / "space.sqlite3"
    asyncio.run(prepare_store(db))
    prefill(db, 3000, created_at=NOW - 500 * DAY)
    before = ok_json(db, "store", "stats")
    report = ok_json(db, "purge")
    assert report["deleted"]["messages"] == 3000 and report["pages_freed"] > 0
    after = ok_json(db, "store", "stats")
    assert after["free_bytes"] == 0 and after["size_bytes"] < before["size_bytes"]
    assert after["oldest_message"] is None and after["ledger"] == "holds"


def test_a_backup_is_checked_and_a_restore_refuses_what_it_would_overwrite(
        tmp_path: Path) -> None:
    db = tmp_path / "live.sqlite3"
    asyncio.run(prepare_store(db, credits=100))
    prefill(db, 10, created_at=NOW - DAY)
    copy = tmp_path / "backup.sqlite3"
    done = ok_json(db, "backup", str(copy))
    assert (done["messages"], done["integrity"], done["ledger"]) == (10, "ok", "holds")
    assert copy.stat().st_mode & 0o077 == 0  # as private as the store
    assert run(db, "backup", str(copy)).exit_code == 2  # exists: not without --force
    assert ok_json(db, "backup", str(copy), "--force")["messages"] == 10

    refused = run(db, "restore", str(copy))
    assert refused.exit_code == 2 and "--force" in refused.stderr
    target = tmp_path / "restored.sqlite3"
    restored = ok_json(target, "restore", str(copy))
    assert restored["messages"] == 10
    assert ok_json(target, "store", "stats")["rows"]["messages"] == 10
    # A store a gateway runs on (it holds the delivery lock) is never overwritten.
    fd = os.open(f"{target}-{backup.IN_USE_LOCK}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        refused = run(target, "restore", str(copy), "--force")
        assert refused.exit_code == 2 and "in use" in refused.stderr
    finally:
        os.close(fd)
    assert ok_json(target, "restore", str(copy), "--force")["messages"] == 10

    # A damaged copy is refused before anything is replaced.
    broken = tmp_path / "broken.sqlite3"
    broken.write_bytes(copy.read_bytes()[:8192])
    refused = run(target, "restore", str(broken), "--force")
    assert refused.exit_code == 2 and "broken" in refused.stderr
    assert ok_json(target, "store", "stats")["rows"]["messages"] == 10


def test_backup_on_postgresql_says_to_use_pg_dump(postgres_url: str) -> None:
    refused = run(postgres_url, "backup", "/tmp/never-written.sqlite3")
    assert refused.exit_code == 2 and "pg_dump" in refused.stderr
    assert not Path("/tmp/never-written.sqlite3").exists()
    refused = run(postgres_url, "restore", "/tmp/never-read.sqlite3")
    assert refused.exit_code == 2 and "pg_restore" in refused.stderr
    stats = ok_json(postgres_url, "store", "stats")
    assert stats["backend"] == "postgresql" and "messages" in stats["rows"]


# -- under load --------------------------------------------------------------------------------

async def send_load(server: ServerProcess, requests: int, concurrency: int,
                    answered: list[tuple[float, list[int]]] | None = None) -> None:
    """`requests` sends, `concurrency` at a time; each answer's time and ids noted."""
    queue = iter(range(requests))

    async def worker(session: aiohttp.ClientSession) -> None:
        for n in queue:
            params = demo_params(to=f"+3361{n % 10_000_000:07d}")
            async with session.get(server.send_url, params=params) as resp:
                body = await resp.text()
            assert resp.status == 200 and body.startswith("OK"), body
            if answered is not None:
                answered.append((time.monotonic(), [int(x) for x in body.split("\n")[2:]]))

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


def p99_ms(server: ServerProcess) -> float:
    """From the send events' duration_ms. Two processes share the log's pipe, so a line
    may hold another's event too: the events are found as objects, not as lines."""
    durations = sorted(float(found) for found in re.findall(
        r'\{[^{}]*"duration_ms": ([0-9.]+)[^{}]*"event": "send"[^{}]*\}', server.log))
    assert len(durations) >= 100
    return durations[int(len(durations) * 0.99)]


def old_messages(db: Path) -> int:
    """The prefilled messages the purge has not touched yet (neither erased nor deleted)."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        return int(conn.execute("SELECT count(*) FROM messages WHERE tag = 'old' "
                                "AND body <> ''").fetchone()[0])
    finally:
        conn.close()


LOAD_ENV = {"HTTP2SMS_LOG_LEVEL": "info", "HTTP2SMS_RETENTION_BATCH_PAUSE_SECONDS": "0.005"}


async def test_the_purge_leaves_sends_no_more_than_50_ms_slower_at_p99(tmp_path: Path) -> None:
    db = tmp_path / "load.sqlite3"
    await prepare_store(db, credits=100_000)
    prefill(db, 60_000, created_at=NOW - 500 * DAY)
    async with servers() as started:
        # The same load without the purge, then with it working through 60,000 messages.
        quiet = await ServerProcess.start(db, env={
            **LOAD_ENV, "HTTP2SMS_RETENTION_INTERVAL_SECONDS": "0"})
        started.append(quiet)
        await send_load(quiet, 1500, 8)
        assert await quiet.stop() == 0
        without = p99_ms(quiet)
        assert old_messages(db) == 60_000

        busy = await ServerProcess.start(db, env={
            **LOAD_ENV, "HTTP2SMS_RETENTION_INTERVAL_SECONDS": "0.2"})
        started.append(busy)
        await asyncio.sleep(0.3)  # the first pass begins
        await send_load(busy, 1500, 8)
        touched_during_load = 60_000 - old_messages(db)
        assert await busy.stop() == 0
        with_purge = p99_ms(busy)
    assert touched_during_load > 0, "the purge did not run during the load"
    print(f"p99 send duration: {without:.1f} ms without the purge, {with_purge:.1f} ms with "
          f"it ({touched_during_load} messages erased or deleted during the load)")
    assert with_purge <= without + 50


async def test_a_backup_taken_during_sends_restores_every_send_answered_before_it(
        tmp_path: Path) -> None:
    db = tmp_path / "live.sqlite3"
    await prepare_store(db, credits=100_000)
    prefill(db, 20_000, created_at=NOW - DAY)
    copy = tmp_path / "backup.sqlite3"
    answered: list[tuple[float, list[int]]] = []
    async with servers() as started:
        server = await ServerProcess.start(db)
        started.append(server)
        load = asyncio.create_task(send_load(server, 2000, 8, answered))
        while len(answered) < 300:
            await asyncio.sleep(0.01)
        began = time.monotonic()
        before = [i for at, ids in answered if at < began for i in ids]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--db", str(db), "backup", str(copy), "--json",
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert not load.done(), "the backup must be taken while sends go on"
        await load
        assert await server.stop() == 0
    assert json.loads(out)["ledger"] == "holds"
    restored = tmp_path / "restored.sqlite3"
    assert (await asyncio.to_thread(run, restored, "restore", str(copy))).exit_code == 0
    totals, _ = await store_totals(restored)
    ledger_identity(totals)
    conn = sqlite3.connect(restored)
    try:
        found = {row[0] for row in conn.execute("SELECT id FROM messages WHERE tag = ''")}
    finally:
        conn.close()
    assert before and set(before) <= found


def test_an_export_of_200000_messages_runs_in_bounded_memory(tmp_path: Path) -> None:
    db = tmp_path / "export.sqlite3"
    asyncio.run(prepare_store(db))
    prefill(db, 200_000, created_at=NOW - 10 * DAY, spacing=1.0)

    def export_rss_mb(to: str) -> tuple[float, int]:
        """Peak RSS of an export in a process of its own, and the lines it wrote."""
        out = tmp_path / "export.csv"
        script = ("import resource, sys; from gateway.cli import main; rc = main(sys.argv[1:]); "
                  "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
                  "sys.exit(rc)")
        with out.open("wb") as sink:
            done = subprocess.run(
                [sys.executable, "-c", script, "--db", str(db), "message", "export",
                 DEMO_ACCOUNT, "--from", "2000-01-01", "--to", to],
                stdout=sink, stderr=subprocess.PIPE, timeout=240, check=False)
        assert done.returncode == 0, done.stderr.decode()
        with out.open("rb") as written:
            lines = sum(1 for _ in written)
        return int(done.stderr.decode().split()[-1]) / 1024, lines

    first_day = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(NOW - 10 * DAY + 999))
    small, small_lines = export_rss_mb(first_day)
    large, large_lines = export_rss_mb("2100-01-01")
    assert (small_lines, large_lines) == (1001, 200_001)
    print(f"peak RSS: {small:.0f} MB exporting 1,000 messages, {large:.0f} MB exporting "
          f"200,000")
    # All 200,000 held at once would take hundreds of MB; a page at a time, a few more.
    assert large - small < 25
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_a_backup_never_takes_the_name_of_the_store_or_of_its_files(tmp_path: Path) -> None:
    db = tmp_path / "live.sqlite3"
    asyncio.run(prepare_store(db, credits=100))
    prefill(db, 10, created_at=NOW - DAY)
    inode = db.stat().st_ino
    for name in (db, Path(f"{db}-wal"), tmp_path / "." / "live.sqlite3"):
        refused = run(db, "backup", str(name), "--force")
        assert refused.exit_code == 2 and "the store itself" in refused.stderr, refused.stderr
    assert db.stat().st_ino == inode  # never replaced
    assert ok_json(db, "store", "stats")["rows"]["messages"] == 10


def test_a_backup_is_on_disk_before_it_is_done(tmp_path: Path, monkeypatch: Any) -> None:
    db = tmp_path / "live.sqlite3"
    asyncio.run(prepare_store(db, credits=100))
    synced: list[str] = []
    fsync = os.fsync

    def noted(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", noted)
    copy = tmp_path / "backup.sqlite3"
    ok_json(db, "backup", str(copy))
    # VACUUM INTO does not sync: the copy, and the folder holding its name, are.
    assert str(copy) in synced and str(tmp_path) in synced
    synced.clear()
    ok_json(tmp_path / "restored.sqlite3", "restore", str(copy))
    assert str(tmp_path / "restored.sqlite3") in synced and str(tmp_path) in synced


def test_a_restore_refuses_a_store_open_in_another_process(tmp_path: Path) -> None:
    """A gateway that does not deliver (server.delivery = false) or a command holds no
    delivery lock, but has the store open: replacing it would lose what it writes."""
    db = tmp_path / "live.sqlite3"
    asyncio.run(prepare_store(db, credits=100))
    copy = tmp_path / "backup.sqlite3"
    ok_json(db, "backup", str(copy))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
         "c.execute('SELECT count(*) FROM accounts').fetchall(); print('open', flush=True); "
         "sys.stdin.read()", str(db)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        inode = db.stat().st_ino
        refused = run(db, "restore", str(copy), "--force")
        assert refused.exit_code == 2 and "open in another process" in refused.stderr
        assert db.stat().st_ino == inode
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(10)
    assert ok_json(db, "restore", str(copy), "--force")["messages"] == 0


def test_a_restore_over_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "live.sqlite3"
    asyncio.run(prepare_store(db, credits=100))
    copy = tmp_path / "backup.sqlite3"
    ok_json(db, "backup", str(copy))
    folder = tmp_path / "a-folder"
    folder.mkdir()
    refused = run(folder, "restore", str(copy), "--force")
    assert refused.exit_code == 2 and "cannot open the store" in refused.stderr
    assert folder.is_dir()


def test_a_restore_of_the_store_from_itself_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "live.sqlite3"
    asyncio.run(prepare_store(db, credits=100))
    inode = db.stat().st_ino
    refused = run(db, "restore", str(db), "--force")
    assert refused.exit_code == 2 and "the store itself" in refused.stderr
    assert db.stat().st_ino == inode
