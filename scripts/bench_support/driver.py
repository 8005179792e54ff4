"""scripts/bench: the burst benchmark of the send path (see docs/benchmark.md).

Starts, on 127.0.0.1 only: a delivery-report receiver; a bare aiohttp app answering the send
URL with a constant body (the framework ceiling); then the real gateway on a fresh SQLite
store with N API users (IP allowlists, active quotas, callbacks to the receiver), the
simulated operator and the callbacks running. wrk drives each with the same load; the
gateway runs again after the store is pre-filled with stored messages. One table, then a
PASS/FAIL line per target of issue 7.

Exit status: 0 when every request got its expected answer (a missed target only prints
FAIL); 1 when a request failed (transport error, non-200, a body not starting with OK) or a
process crashed; 2 when the benchmark could not run (wrk missing, bad options).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # its sibling modules, also when a test loads it by path
    sys.path.insert(0, str(HERE))

import kannel  # noqa: E402

ROOT = HERE.parent.parent
PYTHON = sys.executable
HOST = "127.0.0.1"
SENDER = "BENCH"
PASSWORD = "Bench2024load"
QUOTA_PER_USER = 10_000_000          # credits: far more than any run can spend
PREFILL_RECIPIENTS = 500             # recipients per order (the send URL's maximum)
PREFILL_ORDERS = 20                  # orders per commit_sends batch

# Targets of issue 7.
TARGET_RATIO = 0.50
TARGET_P99_MS = 25.0
TARGET_FULL_STORE_LOSS = 0.15
TARGET_CALLBACKS = 2000.0
TARGET_RSS_MB = 250.0
# Targets of issue 20: PostgreSQL against SQLite in the same session.
TARGET_PG_RATIO = 0.70
TARGET_PG_P99 = 2.0
# Targets of issue 24.
TARGET_PEER_TIMES = 2.0             # sends/s against Kannel's, no callbacks
TARGET_PEER_TIMES_CALLBACKS = 1.5   # the same with callbacks to the receiver
TARGET_WORKER_SHARE = 1 / 3         # delivery worker CPU per message / the send process's

WORKER = "delivery worker"
NO_CALLBACKS = "sqlite, no callbacks"


class BenchError(Exception):
    """Something failed in a way that makes the run invalid (exit 1)."""


class CannotRun(Exception):
    """The benchmark cannot start at all (exit 2)."""


# -- processes --------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if the driver dies, even by SIGKILL (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stopping: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


class Processes:
    """Every process the driver starts, so that all of them are stopped whatever happens."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.folder / f"{name}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=ROOT,
                                     preexec_fn=_die_with_parent)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 20.0) -> int | None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL. Returns the exit status."""
        proc.stopping = True
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.popen.returncode

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            with contextlib.suppress(Exception):
                self.stop(proc, grace=5.0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_listening(proc: Proc, port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with status {proc.popen.returncode} while "
                             f"starting:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
            return
        time.sleep(0.05)
    raise BenchError(f"{proc.name} did not listen on {HOST}:{port} within {timeout:g} s:\n"
                     f"{proc.tail()}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (all its threads)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent not idle since boot (user, system, irq, steal...)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    ticks = [int(f) for f in fields[:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (the gateway's delivery worker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def run_when_idle(pid: int) -> None:
    """SCHED_IDLE for every thread of a process: it runs only on CPU nothing else wants.
    Threads it starts later inherit the policy."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
            os.sched_setscheduler(int(task.name), os.SCHED_IDLE, os.sched_param(0))


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def http_json(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())


# -- load -------------------------------------------------------------------------------------

@dataclass
class WrkResult:
    requests: int
    seconds: float
    errors: dict[str, int]
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    cpu_seconds: float
    sample: str = ""

    @property
    def failed(self) -> int:
        e = self.errors
        return (e["connect"] + e["read"] + e["write"] + e["timeout"]
                + max(e["status"], e["bad_status"]) + e["bad_body"])

    @property
    def accepted_per_second(self) -> float:
        good = self.requests - self.errors["bad_status"] - self.errors["bad_body"]
        return good / self.seconds if self.seconds else 0.0


def write_lua(folder: Path, users: list[dict[str, str]], args: argparse.Namespace,
              peer: bool = False) -> Path:
    """The load script; `peer`: the same sends through Kannel's sendsms URL."""
    entries = ",\n".join(
        f"  {{account = {json.dumps(u['account'])}, login = {json.dumps(u['login'])}, "
        f"password = {json.dumps(u['password'])}}}" for u in users)
    script = folder / ("kannel.lua" if peer else "load.lua")
    script.write_text(f"USERS = {{\n{entries}\n}}\nSENDER = {json.dumps(SENDER)}\n"
                      f"RECIPIENTS = {args.recipients}\nTHREADS = {args.threads}\n"
                      + ("KANNEL = true\n" if peer else "") + "\n"
                      + (HERE / "load.lua").read_text())
    return script


# Where the next run of wrk starts its rotation of recipients: past every place the runs so
# far took (load.lua's `next`).
_next_recipient = 0


def run_wrk(script: Path, port: int, seconds: float, args: argparse.Namespace,
            folder: Path) -> WrkResult:
    global _next_recipient
    argv = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds:g}s",
            "--timeout", "5s", "--latency", "-s", str(script), f"http://{HOST}:{port}/",
            str(_next_recipient)]
    out_path = folder / "wrk.out"
    with open(out_path, "wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + seconds + 60.0
    status, usage = 0, None
    try:
        while True:
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
            if pid:
                popen.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                popen.kill()
                raise BenchError("wrk did not finish in time")
            time.sleep(0.05)
    finally:
        if popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                popen.kill()
            with contextlib.suppress(ChildProcessError):
                os.waitpid(popen.pid, 0)
            popen.returncode = -9
    text = out_path.read_text(errors="replace")
    match = re.search(r"^BENCH_RESULT (\{.*\})$", text, re.M)
    if popen.returncode != 0 or match is None:
        raise BenchError(f"wrk failed (status {popen.returncode}):\n{text[-2000:]}")
    data = json.loads(match.group(1))
    _next_recipient = int(data["next"])
    sample = re.search(r"^BENCH_SAMPLE (.*)$", text, re.M)
    errors = {k: int(data[k]) for k in ("connect", "read", "write", "status", "timeout",
                                        "bad_status", "bad_body")}
    return WrkResult(
        requests=int(data["requests"]), seconds=data["duration_us"] / 1e6, errors=errors,
        p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000, max_ms=data["max_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
        cpu_seconds=(usage.ru_utime + usage.ru_stime) if usage else 0.0,
        sample=sample.group(1) if sample else "")


# -- the store --------------------------------------------------------------------------------

def gateway_config() -> Any:
    from gateway import config as config_module

    config = config_module.load(None)
    # The allowlists hold 127.0.0.1 and the callbacks go to a receiver on loopback.
    return config.replace({"server.allow_private_ips": True,
                           "callbacks.allow_private_targets": True})


@dataclass
class Store:
    """The store a gateway run uses: an SQLite file, or a database of the throwaway
    PostgreSQL cluster (scripts/postgres, durable settings) the driver started."""

    kind: str                # "sqlite" or "postgresql"
    url: str                 # what `http2sms --db` takes
    path: Path | None = None  # the SQLite file
    cluster: Path | None = None  # the PostgreSQL cluster's folder

    def __str__(self) -> str:
        return self.url

    def postgres_pids(self) -> list[int]:
        """The cluster's server processes (the postmaster's children: one per connection
        and the background workers), whose CPU the sends cost too."""
        if self.cluster is None:
            return []
        try:
            postmaster = int((self.cluster / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [postmaster, *child_pids(postmaster)]


def start_postgres(folder: Path) -> tuple[Path, str]:
    """A throwaway cluster with PostgreSQL's durable defaults (fsync, synchronous_commit on),
    stopped when the driver ends (scripts/postgres's watcher, and `stop_postgres`)."""
    cluster = Path(tempfile.mkdtemp(prefix="http2sms-bench-pg-"))
    done = subprocess.run([str(ROOT / "scripts" / "postgres"), "start", str(cluster),
                           str(os.getpid())], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HTTP2SMS_POSTGRES_DURABLE": "1"}, check=False)
    if done.returncode:
        shutil.rmtree(cluster, ignore_errors=True)
        raise CannotRun(f"cannot start PostgreSQL (scripts/postgres): {done.stderr[-2000:]}")
    return cluster, done.stdout.strip().splitlines()[-1]


def stop_postgres(cluster: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "postgres"), "stop", str(cluster)], timeout=120,
                   check=False, capture_output=True)


def _pg(url: str, *statements: tuple[str, tuple[Any, ...]]) -> list[Any]:
    """Run statements on the PostgreSQL store, in one transaction; the last one's rows."""
    import asyncpg

    async def run() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            rows: list[Any] = []
            async with conn.transaction():
                for sql, params in statements:
                    rows = list(await conn.fetch(sql, *params))
            return rows
        finally:
            await conn.close()

    return asyncio.run(run())


def _pg_plain(url: str, *statements: str) -> None:
    """Statements that cannot run in a transaction (VACUUM, CHECKPOINT)."""
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(url)
        try:
            for sql in statements:
                await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run())


async def create_users(db: Store | Path, n_users: int, receiver_port: int,
                       callbacks: bool = True) -> list[dict[str, Any]]:
    """Accounts (two API users each), a declared sender, users with every check active
    (and a callback URL to the receiver unless `callbacks` is off)."""
    from gateway.service import Management
    from gateway.store import open_store

    config = gateway_config()
    store = open_store(db.url if isinstance(db, Store) else db, "cli")
    await store.open()
    users: list[dict[str, Any]] = []
    try:
        manager = Management(store, config)
        n_accounts = max(1, (n_users + 1) // 2)
        per_account = [0] * n_accounts
        for i in range(n_users):
            per_account[i % n_accounts] += 1
        for a in range(n_accounts):
            account = f"sms-bench-{a + 1}"
            await manager.create_account(account, per_account[a] * QUOTA_PER_USER + 1000)
            await manager.add_sender(account, SENDER)
        for i in range(n_users):
            account = f"sms-bench-{i % n_accounts + 1}"
            login = f"user{i + 1}"
            await manager.create_user(account, login, PASSWORD)
            callback = {"callback_url": f"http://{HOST}:{receiver_port}/dlr/{login}"} \
                if callbacks else {}
            user = await manager.update_user(
                account, login, quota=QUOTA_PER_USER, ip_restrictions=[HOST], **callback)
            users.append({"account": account, "login": login, "password": PASSWORD,
                          "id": user.id, "account_id": user.account_id})
    finally:
        await store.close()
    return users


async def prefill(db: Store, count: int, users: list[dict[str, Any]], *,
                  age: float = 0.0) -> None:
    """Store `count` messages through the store's own write path, then settle them; the
    newest `age` seconds old (--retention: older than the retention).

    commit_sends charges them (ledger, quotas) like real sends; SQL then moves them to a
    final state (ptt 4) with the history and the done callbacks a delivered message has, so
    the simulated operator leaves them alone and the tables have their steady-state shape.
    """
    from gateway.records import SendOrder
    from gateway.store import open_store

    store = open_store(db.url, "cli")
    await store.open()
    first_id = last_id = 0
    try:
        per_batch = PREFILL_RECIPIENTS * PREFILL_ORDERS
        batches = -(-count // per_batch)
        start = time.time() - age - batches * 60.0
        made = 0
        for b in range(batches):
            orders = []
            while made < count and len(orders) < PREFILL_ORDERS:
                size = min(PREFILL_RECIPIENTS, count - made)
                user = users[(made // PREFILL_RECIPIENTS) % len(users)]
                recipients = tuple(f"+336{(made + k) % 100_000_000:08d}" for k in range(size))
                orders.append(SendOrder(
                    account_id=user["account_id"], user_id=user["id"], login=user["login"],
                    sender=SENDER, body=f"Campaign {b}: your order has shipped", coding=1,
                    parts=1, klass=1, no_stop=True, tag="prefill", recipients=recipients,
                    costs=(100,) * size))
                made += size
            outcomes = await store.commit_sends(orders, at=start + b * 60.0)
            for outcome in outcomes:
                if not outcome.accepted:
                    raise BenchError(f"pre-fill refused: {outcome.reason}")
                first_id = first_id or outcome.ids[0]
                last_id = outcome.ids[-1]
    finally:
        await store.close()
    if db.kind == "postgresql":
        await asyncio.to_thread(settle_prefill_postgresql, db.url, first_id, last_id)
        return
    conn = sqlite3.connect(db.url, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        bounds = (first_id, last_id)
        conn.execute(
            "UPDATE messages SET state = 'final', ptt = 4, dlr = 1, sent_at = created_at + 1, "
            "delivered_at = created_at + 5, updated_at = created_at + 5 "
            "WHERE id BETWEEN ? AND ?", bounds)
        for offset, code, dlr, note in ((1, 3, 4, "Accepted by the operator"),
                                        (5, 4, 1, "Delivered")):
            conn.execute(
                "INSERT INTO message_events (message_id, at, ptt, dlr, note) "
                "SELECT id, created_at + ?, ?, ?, ? FROM messages WHERE id BETWEEN ? AND ?",
                (offset, code, dlr, note, *bounds))
            conn.execute(
                "INSERT INTO outbox (kind, message_id, account_id, user_id, target, payload, "
                "created_at, next_attempt_at, attempts, state, done_at) "
                "SELECT 'callback', m.id, m.account_id, m.user_id, u.callback_url, "
                "json_object('id', m.id, 'ptt', ?, 'dlr', ?, 'at', m.created_at + ?, "
                "'tag', m.tag), m.created_at + ?, m.created_at + ?, 1, 'done', "
                "m.created_at + ? FROM messages m JOIN users u ON u.id = m.user_id "
                "WHERE m.id BETWEEN ? AND ?",
                (code, dlr, offset, offset, offset, offset + 0.01, *bounds))
        conn.execute(
            "INSERT INTO outbox_attempts (outbox_id, at, ok, detail) "
            "SELECT id, done_at, 1, 'HTTP 200' FROM outbox WHERE message_id BETWEEN ? AND ?",
            bounds)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("ANALYZE")
    finally:
        conn.close()


def settle_prefill_postgresql(url: str, first_id: int, last_id: int) -> None:
    """`prefill`'s settling, in PostgreSQL's dialect."""
    statements: list[tuple[str, tuple[Any, ...]]] = [(
        "UPDATE messages SET state = 'final', ptt = 4, dlr = 1, sent_at = created_at + 1, "
        "delivered_at = created_at + 5, updated_at = created_at + 5 "
        "WHERE id BETWEEN $1 AND $2", (first_id, last_id))]
    for offset, code, dlr, note in ((1.0, 3, 4, "Accepted by the operator"),
                                    (5.0, 4, 1, "Delivered")):
        statements.append((
            "INSERT INTO message_events (message_id, at, ptt, dlr, note) "
            "SELECT id, created_at + $1, $2, $3, $4 FROM messages WHERE id BETWEEN $5 AND $6",
            (offset, code, dlr, note, first_id, last_id)))
        statements.append((
            "INSERT INTO outbox (kind, message_id, account_id, user_id, target, payload, "
            "created_at, next_attempt_at, attempts, state, done_at) "
            "SELECT 'callback', m.id, m.account_id, m.user_id, u.callback_url, "
            "json_build_object('id', m.id, 'ptt', $1::int, 'dlr', $2::int, "
            "'at', m.created_at + $3, 'tag', m.tag)::text, m.created_at + $3, "
            "m.created_at + $3, 1, 'done', m.created_at + $4 "
            "FROM messages m JOIN users u ON u.id = m.user_id WHERE m.id BETWEEN $5 AND $6",
            (code, dlr, offset, offset + 0.01, first_id, last_id)))
    statements.append((
        "INSERT INTO outbox_attempts (outbox_id, at, ok, detail) "
        "SELECT id, done_at, true, 'HTTP 200' FROM outbox WHERE message_id BETWEEN $1 AND $2",
        (first_id, last_id)))
    _pg(url, *statements)
    _pg_plain(url, "VACUUM ANALYZE", "CHECKPOINT")


def settle_leftovers(db: Store, at: float) -> int:
    """With the gateway stopped: finish what the previous run left (drain timed out), so the
    next run does not replay a callback backlog. Returns how many rows it settled."""
    if db.kind == "postgresql":
        rows = _pg(db.url, (
            "WITH o AS (UPDATE outbox SET state = 'done', done_at = $1 "
            "WHERE state = 'pending' RETURNING 1), m AS (UPDATE messages SET state = 'final', "
            "ptt = 4, dlr = 1, updated_at = $1 WHERE state <> 'final' RETURNING 1) "
            "SELECT (SELECT COUNT(*) FROM o) + (SELECT COUNT(*) FROM m)", (at,)))
        return int(rows[0][0])
    conn = sqlite3.connect(db.url, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        done = conn.execute("UPDATE outbox SET state = 'done', done_at = ? "
                            "WHERE state = 'pending'", (at,)).rowcount
        done += conn.execute("UPDATE messages SET state = 'final', ptt = 4, dlr = 1, "
                             "updated_at = ? WHERE state <> 'final'", (at,)).rowcount
        conn.execute("COMMIT")
    finally:
        conn.close()
    return done


_COUNTS = ("SELECT (SELECT COALESCE(MAX(id), 0) FROM messages), "
           "(SELECT COUNT(*) FROM messages WHERE state <> 'final'), "
           "(SELECT COUNT(*) FROM outbox WHERE state = 'pending'), "
           "(SELECT COUNT(*) FROM outbox WHERE state = 'dead')")


def store_counts(db: Store) -> dict[str, int]:
    """Read-only look at the store while the gateway runs (WAL allows it)."""
    if db.kind == "postgresql":
        row = _pg(db.url, (_COUNTS, ()))[0]
        return {"messages": row[0], "open": row[1], "outbox_pending": row[2],
                "outbox_dead": row[3]}
    conn = sqlite3.connect(f"file:{db.url}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute(_COUNTS).fetchone()
    finally:
        conn.close()
    return {"messages": row[0], "open": row[1], "outbox_pending": row[2], "outbox_dead": row[3]}


# -- phases -----------------------------------------------------------------------------------

@dataclass
class Phase:
    label: str
    load: WrkResult
    warmup: WrkResult | None
    rss_mb: float
    cpu: dict[str, float] = field(default_factory=dict)      # % of one core in the window
    callbacks_per_second: float | None = None
    # --operator smpp: what the test SMSC received and had acknowledged, per second.
    submits_per_second: float | None = None
    receipts_per_second: float | None = None
    backlog: int | None = None
    stored_before: int | None = None
    drain_seconds: float | None = None
    malformed_callbacks: int = 0
    log_problems: list[str] = field(default_factory=list)
    reference: bool = False  # a ceiling, not the gateway: the targets do not read it
    kind: str = ""           # the gateway's store: "sqlite" or "postgresql"
    role: str = ""           # "empty", "processes" (serve --processes 2), "full" (pre-filled)
    peer: bool = False       # Kannel: the row the gateway's are compared with (issue 24)
    serving: tuple[str, ...] = ()  # the processes that serve, when more than the first
    # CPU seconds of each process from the start of the window to the end of the drain, and
    # the accepted sends of the window: issue 24's CPU per message of each process.
    pids: dict[str, int] = field(default_factory=dict)
    cpu_start: dict[str, float] = field(default_factory=dict)
    cpu_to_drain: dict[str, float] = field(default_factory=dict)
    groups: dict[str, list[int]] = field(default_factory=dict)  # summed, as in `cpu`

    def server_cpu_ms(self) -> float:
        """CPU time of the server process per answered request: steadier than req/s when
        other processes compete for the cores."""
        rate = self.load.accepted_per_second
        if self.serving:
            server = sum(self.cpu.get(name, 0.0) for name in self.serving)
        else:
            server = next(iter(self.cpu.values()), 0.0)  # the server is measured first
            server += self.cpu.get(WORKER, 0.0)
        return server * 10 / rate if rate else 0.0

    def cpu_ms_per_message(self) -> dict[str, float]:
        """CPU ms per accepted send of each process, over the window and the drain."""
        sends = self.load.accepted_per_second * self.load.seconds
        return {name: seconds * 1000 / sends for name, seconds in self.cpu_to_drain.items()
                if sends}

    def settle_cpu(self) -> None:
        """After the drain: each process's (or group's) CPU since the window started."""
        self.cpu_to_drain = {name: cpu_seconds(pid) - self.cpu_start[name]
                             for name, pid in self.pids.items()}
        for name, found in self.groups.items():
            self.cpu_to_drain[name] = (sum(cpu_seconds(pid) for pid in found)
                                       - self.cpu_start[name])


def measure(label: str, server: Proc, port: int, script: Path, args: argparse.Namespace,
            folder: Path, receiver: Proc | None = None, receiver_port: int = 0,
            db: Store | None = None, others: tuple[Proc, ...] = ()) -> Phase:
    if args.idle_worker and receiver:
        workers = child_pids(server.pid)[:1]
        if not workers:
            raise BenchError("--idle-worker: the gateway runs no delivery worker "
                             "(server.delivery_worker is off)")
        run_when_idle(workers[0])
    print(f"  {label}: warm-up {args.warmup:g} s ...", flush=True)
    warm = run_wrk(script, port, args.warmup, args, folder) if args.warmup > 0 else None
    if not server.alive():
        raise BenchError(f"{server.name} died during the warm-up:\n{server.tail()}")
    print(f"  {label}: measuring {args.duration:g} s ...", flush=True)
    before_cb = http_json(f"http://{HOST}:{receiver_port}/count") if receiver else None
    smsc_url = f"http://{HOST}:{args.smsc_count_port}/count" \
        if receiver and args.operator == "smpp" else None
    before_smsc = http_json(smsc_url) if smsc_url else None
    pids = {server.name: server.pid}
    # The gateway's delivery worker (server.delivery_worker): its CPU and memory count too.
    for child in child_pids(server.pid)[:1]:
        pids[WORKER] = child
    for other in others:
        pids[other.name] = other.pid
    if receiver:
        pids["receiver"] = receiver.pid
    # The send processes of `serve --processes N` (the children besides a delivery worker)
    # and the PostgreSQL server's processes: their CPU, summed per group.
    groups = {"other gateway processes": child_pids(server.pid)[1:],
              "postgresql": db.postgres_pids() if db is not None else []}
    group0 = {name: sum(cpu_seconds(pid) for pid in found) for name, found in groups.items()}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    busy0 = machine_busy_seconds()
    t0 = time.monotonic()
    load = run_wrk(script, port, args.duration, args, folder)
    t1 = time.monotonic()
    after_cb = http_json(f"http://{HOST}:{receiver_port}/count") if receiver else None
    after_smsc = http_json(smsc_url) if smsc_url else None
    window = t1 - t0
    cpu = {name: (cpu_seconds(pid) - cpu0[name]) / window * 100 for name, pid in pids.items()}
    for name, found in groups.items():
        if found:
            cpu[name] = (sum(cpu_seconds(pid) for pid in found) - group0[name]) / window * 100
    cpu["wrk"] = load.cpu_seconds / window * 100
    # Everything else: other processes, and kernel work not charged to ours.
    cpu["rest of the machine"] = max(
        0.0, (machine_busy_seconds() - busy0) / window * 100 - sum(cpu.values()))
    if not server.alive():
        raise BenchError(f"{server.name} died during the run:\n{server.tail()}")
    # Summed peaks: an upper bound of the gateway's memory (they need not peak together).
    rss = peak_rss_mb(server.pid) + (peak_rss_mb(pids[WORKER]) if WORKER in pids else 0.0)
    found_groups = {name: found for name, found in groups.items() if found}
    phase = Phase(label, load, warm, rss, cpu, pids=pids,
                  cpu_start={**cpu0, **{name: group0[name] for name in found_groups}},
                  groups=found_groups)
    if receiver and before_cb is not None and after_cb is not None:
        phase.callbacks_per_second = (after_cb["count"] - before_cb["count"]) / window
        phase.malformed_callbacks = after_cb["malformed"]
    if before_smsc is not None and after_smsc is not None:
        phase.submits_per_second = (after_smsc["submit_sm"] - before_smsc["submit_sm"]) / window
        phase.receipts_per_second = (after_smsc["receipts"] - before_smsc["receipts"]) / window
    if db is not None:
        phase.backlog = store_counts(db)["outbox_pending"]
    return phase


def drain(db: Store, server: Proc, limit: float) -> float | None:
    """Wait (bounded) until every message is final and every callback done."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        counts = store_counts(db)
        if counts["open"] == 0 and counts["outbox_pending"] == 0:
            return time.monotonic() - start
        if not server.alive():
            raise BenchError(f"{server.name} died while draining:\n{server.tail()}")
        time.sleep(0.25)
    return None


def gateway_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "HTTP2SMS_SERVER_ALLOW_PRIVATE_IPS": "1",
        "HTTP2SMS_CALLBACKS_ALLOW_PRIVATE_TARGETS": "1",  # the receiver is on loopback
        "HTTP2SMS_LOG_LEVEL": args.log_level,
        "HTTP2SMS_OPERATOR_MIN_DELAY": str(args.min_delay),
        "HTTP2SMS_OPERATOR_MAX_DELAY": str(args.max_delay),
    })
    if args.operator == "smpp":
        # The test SMSC on loopback, no throughput cap: what the connector itself makes.
        env.update({
            "HTTP2SMS_OPERATOR_KIND": "smpp",
            "HTTP2SMS_OPERATOR_SMPP_HOST": HOST,
            "HTTP2SMS_OPERATOR_SMPP_PORT": str(args.smsc_port),
            "HTTP2SMS_OPERATOR_SMPP_SYSTEM_ID": "gateway",
            "HTTP2SMS_OPERATOR_SMPP_PASSWORD": "secret",
            "HTTP2SMS_OPERATOR_SMPP_WINDOW": str(args.smpp_window),
        })
    env.pop("HTTP2SMS_ADMIN_TOKEN", None)
    return env


def users_of(db: Store, users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`users` with their ids in `db` (the same names in every store, made in one order)."""
    async def ids() -> list[dict[str, Any]]:
        from gateway.store import open_store

        store = open_store(db.url, "cli")
        await store.open()
        try:
            found = []
            for user in users:
                made = await store.get_user(user["account"], user["login"])
                found.append({**user, "id": made.id, "account_id": made.account_id})
            return found
        finally:
            await store.close()

    return asyncio.run(ids())


def store_mb(db: Store) -> float:
    if db.kind == "postgresql":
        return float(_pg(db.url, ("SELECT pg_database_size(current_database())", ()))[0][0]) \
            / 1024 / 1024
    assert db.path is not None
    return db.path.stat().st_size / 1024 / 1024


def http2sms_argv() -> list[str]:
    http2sms = Path(PYTHON).parent / "http2sms"
    return [str(http2sms)] if http2sms.exists() else [PYTHON, "-m", "gateway"]


def serve_knows_processes() -> bool:
    """`http2sms serve --processes N` exists in this gateway (it came after this bench)."""
    done = subprocess.run([*http2sms_argv(), "serve", "--help"], capture_output=True,
                          text=True, cwd=ROOT, check=False)
    return "--processes" in done.stdout


def start_gateway(procs: Processes, db: Store, port: int, args: argparse.Namespace,
                  name: str, extra: tuple[str, ...] = ()) -> Proc:
    proc = procs.start(name, [*http2sms_argv(), "--db", db.url, "serve", "--host", HOST,
                              "--port", str(port), *extra], env=gateway_env(args))
    wait_listening(proc, port)
    return proc


def stop_server(procs: Processes, proc: Proc) -> None:
    status = procs.stop(proc)
    if status not in (0, -signal.SIGTERM):
        raise BenchError(f"{proc.name} exited with status {status} when stopped:\n"
                         f"{proc.tail()}")


def log_problems(proc: Proc) -> list[str]:
    try:
        lines = proc.log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line for line in lines
            if re.search(r"\[(error|warning|critical)|Traceback|\"level\": \"(error|warning)",
                         line)]


def measure_kannel(procs: Processes, folder: Path, users: list[dict[str, Any]],
                   args: argparse.Namespace) -> Phase:
    """Kannel under the same load: bearerbox (file store, fake SMSC), fakesmsc, smsbox."""
    ports = kannel.Ports(admin=free_port(), smsbox=free_port(), smsc=free_port(),
                         sendsms=free_port())
    home = folder / "kannel"
    conf = kannel.write_config(home, ports, users, args.log_level)
    bearerbox = procs.start("bearerbox", kannel.bearerbox_argv(conf, args.log_level))
    wait_listening(bearerbox, ports.smsc)
    wait_listening(bearerbox, ports.smsbox)
    fakesmsc = procs.start("fakesmsc", kannel.fakesmsc_argv(ports))
    smsbox = procs.start("smsbox", kannel.smsbox_argv(conf, args.log_level))
    wait_listening(smsbox, ports.sendsms)
    deadline = time.monotonic() + 30.0
    while not kannel.is_ready(kannel.status(ports)):
        if time.monotonic() > deadline or not fakesmsc.alive():
            raise BenchError(f"Kannel's fake SMSC or smsbox did not connect:\n"
                             f"{kannel.status(ports)}\n{fakesmsc.tail()}")
        time.sleep(0.1)
    script = write_lua(folder, users, args, peer=True)
    try:
        phase = measure("Kannel 1.4.5 (peer)", bearerbox, ports.sendsms, script, args,
                        folder, others=(smsbox, fakesmsc))
    finally:
        for proc in (smsbox, fakesmsc, bearerbox):
            procs.stop(proc)
    phase.reference = phase.peer = True
    phase.serving = ("bearerbox", "smsbox", "fakesmsc")
    return phase


def run(args: argparse.Namespace, folder: Path, procs: Processes,
        info: dict[str, Any]) -> list[Phase]:
    """Every phase, in order; what else it learns goes into `info` (read by the report and
    by the clean-up: the PostgreSQL cluster to stop)."""
    phases: list[Phase] = []
    receiver_port = free_port()
    receiver = procs.start("receiver", [PYTHON, str(HERE / "receiver.py"),
                                        str(receiver_port)])
    wait_listening(receiver, receiver_port)
    if args.operator == "smpp":
        args.smsc_port, args.smsc_count_port = free_port(), free_port()
        smsc = procs.start("smsc", [PYTHON, str(HERE / "smsc.py"), str(args.smsc_port),
                                    str(args.smsc_count_port)])
        wait_listening(smsc, args.smsc_count_port)

    kinds = ["sqlite", "postgresql"] if args.store == "both" else [args.store]
    cluster = None
    if "postgresql" in kinds:
        print("Starting a throwaway PostgreSQL cluster (durable settings) ...", flush=True)
        cluster, server_url = start_postgres(folder)
        info["postgres_cluster"] = cluster
    made = 0

    def new_store(kind: str) -> Store:
        nonlocal made
        made += 1
        if kind == "sqlite":
            path = folder / f"gateway-{made}.sqlite3"
            return Store("sqlite", str(path), path=path)
        assert cluster is not None
        name = f"bench_{made}"
        _pg_plain(server_url, f"CREATE DATABASE {name}")
        return Store("postgresql", server_url.replace("/postgres?", f"/{name}?", 1),
                     cluster=cluster)

    print("Preparing the store (accounts, API users) ...", flush=True)
    first = new_store(kinds[0])
    users = asyncio.run(create_users(first, args.users, receiver_port))
    script = write_lua(folder, users, args)

    # 1. The framework ceiling.
    port = free_port()
    ceiling = procs.start("ceiling", [PYTHON, str(HERE / "ceiling.py"), str(port)])
    wait_listening(ceiling, port)
    print("Ceiling: bare aiohttp, constant body", flush=True)
    phases.append(measure("ceiling", ceiling, port, script, args, folder))
    phases[-1].reference = True
    stop_server(procs, ceiling)

    # 1b. The same app storing a row per request durably (--durable-ceiling).
    if args.durable_ceiling:
        port = free_port()
        durable = procs.start("durable-ceiling", [PYTHON, str(HERE / "durable_ceiling.py"),
                                                  str(port), str(folder / "durable.sqlite3")])
        wait_listening(durable, port)
        print("Durable ceiling: bare aiohttp, a group-committed SQLite row per request",
              flush=True)
        phases.append(measure("ceiling, durable", durable, port, script, args, folder))
        phases[-1].reference = True
        stop_server(procs, durable)

    def gateway_run(db: Store, label: str, role: str, name: str,
                    extra: tuple[str, ...] = ()) -> None:
        print(f"Gateway on {label}", flush=True)
        port = free_port()
        gateway = start_gateway(procs, db, port, args, name, extra)
        phase = measure(label, gateway, port, script, args, folder, receiver, receiver_port,
                        db)
        phase.kind, phase.role = db.kind, role
        phase.stored_before = store_counts(db)["messages"] if role == "full" else 0
        phase.drain_seconds = drain(db, gateway, args.drain)
        phase.settle_cpu()
        phase.log_problems = log_problems(gateway)
        phases.append(phase)
        stop_server(procs, gateway)

    # 1c. The peer: Kannel under the same load (issue 24).
    if args.kannel:
        reason = kannel.missing()
        if reason:
            print(f"Kannel: skipped ({reason}; scripts/bench installs it)", flush=True)
        else:
            print("Kannel: bearerbox (file store, fake SMSC) + smsbox", flush=True)
            phases.append(measure_kannel(procs, folder, users, args))

    # 1d. The gateway without callbacks, on an SQLite store of its own, once whatever --store
    # and --rounds: the delivery worker's CPU per message when it only delivers (issue 24).
    quiet = new_store("sqlite")
    asyncio.run(create_users(quiet, args.users, receiver_port, callbacks=False))
    gateway_run(quiet, NO_CALLBACKS, "no-callbacks", "gateway-no-callbacks")

    # 2. The gateway on an empty store, each backend in turn (alternated over --rounds), on
    # a new store each time: one run never inherits another's rows.
    stores: dict[str, Store] = {}
    for round_ in range(1, args.rounds + 1):
        for kind in kinds:
            db = first if round_ == 1 and kind == kinds[0] else new_store(kind)
            if db is not first:
                asyncio.run(create_users(db, args.users, receiver_port))
            stores[kind] = db
            suffix = f" #{round_}" if args.rounds > 1 else ""
            gateway_run(db, f"{kind}, empty store{suffix}", "empty", f"gateway-{kind}")
            if kind == "postgresql" and round_ == args.rounds:
                # 2b. Two send processes (`serve --processes 2`) on the same store.
                if serve_knows_processes():
                    settle_leftovers(db, time.time())
                    gateway_run(db, "postgresql, --processes 2", "processes",
                                "gateway-processes", ("--processes", "2"))
                else:
                    info["processes_skipped"] = True
                    print("SKIP  postgresql, --processes 2: this gateway's `http2sms serve` "
                          "has no --processes option yet", flush=True)

    # 3. The gateway on a store of `prefill` messages.
    if args.prefill > 0:
        for kind in kinds:
            db = stores[kind]
            left = settle_leftovers(db, time.time())
            if left:
                print(f"  settled {left:,} messages/callbacks the runs left unfinished",
                      flush=True)
            print(f"Pre-filling {args.prefill:,} messages ({kind}) ...", flush=True)
            started = time.monotonic()
            asyncio.run(prefill(db, args.prefill, users_of(db, users)))
            info[f"prefill_seconds_{kind}"] = time.monotonic() - started
            info[f"db_mb_{kind}"] = store_mb(db)
            stored = store_counts(db)["messages"]
            print(f"  pre-filled in {info[f'prefill_seconds_{kind}']:.1f} s; the store holds "
                  f"{stored:,} messages ({info[f'db_mb_{kind}']:.0f} MB)", flush=True)
            gateway_run(db, f"{kind}, {args.prefill:,} stored", "full", f"gateway-full-{kind}")
    if not receiver.alive():
        raise BenchError(f"the callback receiver died:\n{receiver.tail()}")
    return phases


# -- --retention: sends while the purge works through a full store (issue 23) -----------------
#
# The store is pre-filled with --prefill messages (1,000,000) older than [retention]
# messages_days, each delivered with its history and its done callback. Runs then alternate,
# each on a freshly started gateway under the same wrk load: without the purge
# (retention.interval_seconds = 0), then with it (a pass begins half a second after the start
# and goes on through the measured window). Last, the gateway runs without load until the
# purge has gone through every pre-filled message: the time to purge them.

RETENTION_LOSS = 0.10       # sends/s lost to the purge at most (issue 23)
# Old enough for the default retention (400 days), whatever the pre-fill's own spread.
RETENTION_AGE = 500 * 86400.0


@dataclass
class Round:
    """One run of --retention."""

    label: str
    phase: Phase
    erased: int   # pre-filled messages whose text went during the run (or deleted whole)
    deleted: int  # pre-filled messages deleted during the run


def retention_untouched(db: Path) -> tuple[int, int]:
    """(pre-filled messages still whole, pre-filled messages left at all): read-only."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute("SELECT COALESCE(SUM(body <> ''), 0), COUNT(*) FROM messages "
                           "WHERE tag = 'prefill'").fetchone()
    finally:
        conn.close()
    return int(row[0]), int(row[1])


def retention_env(args: argparse.Namespace, purge: bool) -> dict[str, str]:
    env = gateway_env(args)
    env["HTTP2SMS_RETENTION_INTERVAL_SECONDS"] = "0.5" if purge else "0"
    return env


def start_retention_gateway(procs: Processes, db: Path, args: argparse.Namespace, name: str,
                            purge: bool) -> tuple[Proc, int]:
    http2sms = Path(PYTHON).parent / "http2sms"
    argv = [str(http2sms)] if http2sms.exists() else [PYTHON, "-m", "gateway"]
    port = free_port()
    proc = procs.start(name, [*argv, "--db", str(db), "serve", "--host", HOST,
                              "--port", str(port)], env=retention_env(args, purge))
    wait_listening(proc, port)
    return proc, port


def run_retention(args: argparse.Namespace, folder: Path, procs: Processes) -> bool:
    receiver_port = free_port()
    receiver = procs.start("receiver", [PYTHON, str(HERE / "receiver.py"),
                                        str(receiver_port)])
    wait_listening(receiver, receiver_port)
    path = folder / "gateway.sqlite3"
    db = Store("sqlite", str(path), path=path)
    print("Preparing the store (accounts, API users) ...", flush=True)
    users = asyncio.run(create_users(db, args.users, receiver_port))
    script = write_lua(folder, users, args)
    print(f"Pre-filling {args.prefill:,} messages older than the retention ...", flush=True)
    started = time.monotonic()
    asyncio.run(prefill(db, args.prefill, users, age=RETENTION_AGE))
    print(f"  pre-filled in {time.monotonic() - started:.1f} s "
          f"({path.stat().st_size / 1024 / 1024:.0f} MB)", flush=True)

    rounds: list[Round] = []
    purging_seconds = 0.0
    for n in range(args.rounds):
        for purge in (False, True):
            label = f"{'with' if purge else 'without'} purge #{n + 1}"
            print(f"Gateway, {label}", flush=True)
            whole_before, stored_before = retention_untouched(path)
            proc, port = start_retention_gateway(procs, path, args,
                                                 f"gateway-{n}-{int(purge)}", purge)
            t0 = time.monotonic()
            phase = measure(label, proc, port, script, args, folder, receiver,
                            receiver_port, db)
            whole_after, stored_after = retention_untouched(path)
            phase.drain_seconds = drain(db, proc, args.drain)
            if purge:
                purging_seconds += time.monotonic() - t0
            stop_server(procs, proc)
            rounds.append(Round(label, phase, whole_before - whole_after,
                                stored_before - stored_after))

    print("Gateway, no load, until the purge has gone through every pre-filled message",
          flush=True)
    proc, _ = start_retention_gateway(procs, path, args, "gateway-purge", True)
    t0 = time.monotonic()
    while retention_untouched(path)[1] > 0:
        if not proc.alive():
            raise BenchError(f"the gateway died while purging:\n{proc.tail()}")
        if time.monotonic() - t0 > args.purge_limit:
            break
        time.sleep(1.0)
    rest_seconds = time.monotonic() - t0
    left = retention_untouched(path)[1]
    stop_server(procs, proc)
    return retention_report(rounds, args, purging_seconds, rest_seconds, left)


def retention_report(rounds: list[Round], args: argparse.Namespace, purging_seconds: float,
                     rest_seconds: float, left: int) -> bool:
    print()
    print(f"Results: {args.prefill:,} pre-filled messages older than the retention, "
          f"{args.connections} connections, {args.duration:g} s after a {args.warmup:g} s "
          f"warm-up, {args.users} API users")
    header = (f"{'run':<24}{'sends/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'erased':>10}"
              f"{'deleted':>10}{'errors':>8}")
    print(header)
    print("-" * len(header))
    for r in rounds:
        load = r.phase.load
        print(f"{r.label:<24}{load.accepted_per_second:>9,.0f}{load.p50_ms:>8.1f}"
              f"{load.p99_ms:>8.1f}{r.erased:>10,}{r.deleted:>10,}{load.failed:>8}")
    without = [r.phase.load.accepted_per_second for r in rounds if "without" in r.label]
    with_purge = [r.phase.load.accepted_per_second for r in rounds if "with " in r.label]
    ratio = (sum(with_purge) / len(with_purge)) / (sum(without) / len(without)) \
        if without and sum(without) else 0.0
    print()
    verdict = "PASS" if ratio >= 1 - RETENTION_LOSS else "FAIL"
    print(f"{verdict}  sends/s with the purge at {ratio:.0%} of those without "
          f"(target: at least {1 - RETENTION_LOSS:.0%})")
    if left:
        print(f"FAIL  {left:,} pre-filled messages still stored after {rest_seconds:.0f} s "
              "more without load")
    else:
        print(f"time to purge {args.prefill:,} messages: {purging_seconds + rest_seconds:.0f} s "
              f"({purging_seconds:.0f} s of it under load, then {rest_seconds:.0f} s alone)")
    return all(r.phase.load.failed == 0 for r in rounds)


def add_retention_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--retention", action="store_true",
                        help="the retention benchmark instead (issue 23): alternated runs "
                        "with and without the purge on a store of --prefill old messages, "
                        "then the time to purge them")
    parser.add_argument("--purge-limit", type=float, default=1800.0,
                        help="--retention: most seconds to wait for the purge to finish")


# -- report -----------------------------------------------------------------------------------

def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(phases: list[Phase], info: dict[str, Any], args: argparse.Namespace) -> bool:
    """Print the table and the targets; return True when every request succeeded."""
    ceiling = phases[0].load.accepted_per_second
    peer = next((p.load.accepted_per_second for p in phases if p.peer), None)
    width = max(28, *(len(p.label) + 2 for p in phases))  # the longest label fits
    header = (f"{'run':<{width}}{'sends/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'ratio':>7}"
              f"{'x Kannel':>9}{'callbacks/s':>13}{'cb backlog':>11}{'peak RSS MB':>12}"
              f"{'CPU ms/req':>11}"
              f"{'errors':>8}")
    print()
    print(f"Results: {args.connections} connections, {args.duration:g} s after a "
          f"{args.warmup:g} s warm-up, {args.users} API users, {args.recipients:,} recipients, "
          f"wrk -t{args.threads}, "
          f"{os.cpu_count()} CPU cores shared by every process")
    print(header)
    print("-" * len(header))
    for p in phases:
        rate = p.load.accepted_per_second
        ratio = rate / ceiling if ceiling else 0.0
        times = rate / peer if peer and not p.reference else None
        print(f"{p.label:<{width}}{rate:>9,.0f}{p.load.p50_ms:>8.1f}{p.load.p99_ms:>8.1f}"
              f"{ratio:>7.0%}{fmt(times, '.2f'):>9}{fmt(p.callbacks_per_second, ',.0f'):>13}"
              f"{fmt(p.backlog, ',d'):>11}{p.rss_mb:>12.0f}{p.server_cpu_ms():>11.2f}"
              f"{p.load.failed:>8}")
    print()
    print("CPU in the measured window (% of one core; the machine has "
          f"{(os.cpu_count() or 1) * 100}%):")
    for p in phases:
        parts = ", ".join(f"{name} {value:.0f}%" for name, value in p.cpu.items())
        extra = ""
        if p.drain_seconds is not None:
            extra = f"; drained {p.drain_seconds:.1f} s after the load"
        elif p.callbacks_per_second is not None:
            extra = f"; not drained within {args.drain:g} s"
        print(f"  {p.label:<{width - 2}} {parts}{extra}")
    print("CPU per accepted send, from the window's start to the end of its drain "
          "(ms of one core):")
    for p in phases:
        per = p.cpu_ms_per_message()
        if per:
            parts = ", ".join(f"{name} {value:.3f}" for name, value in per.items()
                              if name not in ("receiver", "wrk"))
            print(f"  {p.label:<{width - 2}} {parts}")
    if any(p.submits_per_second is not None for p in phases):
        print("SMPP (the test SMSC, in the measured window):")
        for p in phases:
            if p.submits_per_second is not None:
                print(f"  {p.label:<{width - 2}} submit_sm/s {p.submits_per_second:,.0f}, "
                      f"receipts/s {fmt(p.receipts_per_second, ',.0f')}")
    for kind in ("sqlite", "postgresql"):
        if f"prefill_seconds_{kind}" in info:
            print(f"  pre-fill of {args.prefill:,} messages ({kind}): "
                  f"{info[f'prefill_seconds_{kind}']:.1f} s, store "
                  f"{info[f'db_mb_{kind}']:.0f} MB")
    if info.get("processes_skipped"):
        print("SKIP  postgresql, --processes 2: this gateway's `http2sms serve` has no "
              "--processes option yet")

    ok = True
    for p in phases:
        for name, result in (("warm-up", p.warmup), ("run", p.load)):
            if result is not None and result.failed:
                ok = False
                print(f"ERROR {p.label} ({name}): {result.failed} failed requests "
                      f"{result.errors}; first: {result.sample}")
        if p.malformed_callbacks:
            print(f"WARN  {p.label}: {p.malformed_callbacks} callbacks without id or ptt")
        if p.log_problems:
            print(f"WARN  {p.label}: {len(p.log_problems)} warning/error log lines, e.g.:")
            for line in p.log_problems[:5]:
                print(f"        {line[:200]}")

    # Issue 7's targets read the rows with callbacks, as before the row without them.
    gateways = [p for p in phases if not p.reference and p.role != "no-callbacks"]
    if gateways:
        print()
        print("Targets (issue 7; informative: a FAIL does not change the exit status):")
        empty = gateways[0]
        same = [g for g in gateways if g.kind == empty.kind and g.role in ("empty", "full")]
        gateways = [empty, *[g for g in same if g.role == "full"]]
        ratio = empty.load.accepted_per_second / ceiling if ceiling else 0.0
        verdict(ratio >= TARGET_RATIO, f"accepted durable sends/s >= 50% of the ceiling: "
                f"{ratio:.0%} ({empty.load.accepted_per_second:,.0f} / {ceiling:,.0f})")
        p99s = ", ".join(f"{g.load.p99_ms:.1f} ms ({g.label})" for g in gateways)
        verdict(all(g.load.p99_ms <= TARGET_P99_MS for g in gateways),
                f"p99 <= {TARGET_P99_MS:g} ms at {args.connections} connections: {p99s}")
        if len(gateways) > 1:
            full = gateways[1]
            kept = full.load.accepted_per_second / empty.load.accepted_per_second \
                if empty.load.accepted_per_second else 0.0
            verdict(kept >= 1 - TARGET_FULL_STORE_LOSS,
                    f"with {full.stored_before:,} stored messages, throughput within 15% of "
                    f"the empty store: {kept:.0%} ({full.load.accepted_per_second:,.0f} / "
                    f"{empty.load.accepted_per_second:,.0f})")
        else:
            print("SKIP  full-store throughput (--prefill 0)")
        cb = empty.callbacks_per_second or 0.0
        verdict(cb >= TARGET_CALLBACKS and ratio >= TARGET_RATIO,
                f"callbacks delivered >= {TARGET_CALLBACKS:,.0f}/s while sending, send path "
                f"still >= 50% of the ceiling: {cb:,.0f}/s at {ratio:.0%}")
        rss = max(g.rss_mb for g in gateways)
        verdict(rss <= TARGET_RSS_MB, f"peak RSS <= {TARGET_RSS_MB:g} MB: {rss:.0f} MB")
        postgresql_targets(phases)
        issue24(phases, peer)
    print()
    print("Every request answered as expected." if ok else
          "Some requests FAILED unexpectedly (see ERROR above): exit status 1.")
    return ok


def postgresql_targets(phases: list[Phase]) -> None:
    """Issue 20's targets: PostgreSQL against SQLite measured in the same session (each
    backend's empty-store runs summed over the rounds), and PostgreSQL pre-filled."""
    def empty(kind: str) -> list[Phase]:
        return [p for p in phases if p.kind == kind and p.role == "empty"]

    pg, lite = empty("postgresql"), empty("sqlite")
    if not pg:
        return
    print()
    print("Targets (issue 20, PostgreSQL; informative):")

    def rate(runs: list[Phase]) -> float:
        return sum(p.load.requests for p in runs) / sum(p.load.seconds for p in runs)

    def p99(runs: list[Phase]) -> float:
        return sorted(p.load.p99_ms for p in runs)[len(runs) // 2]  # the median run's

    if lite:
        ratio = rate(pg) / rate(lite)
        verdict(ratio >= TARGET_PG_RATIO,
                f"PostgreSQL sends/s >= {TARGET_PG_RATIO:.0%} of SQLite's: {ratio:.0%} "
                f"({rate(pg):,.0f} / {rate(lite):,.0f}, {len(pg)} alternated run(s) each)")
        times = p99(pg) / p99(lite)
        verdict(times <= TARGET_PG_P99, f"PostgreSQL p99 <= {TARGET_PG_P99:g}x SQLite's: "
                f"{times:.1f}x ({p99(pg):.1f} ms / {p99(lite):.1f} ms)")
    else:
        print("SKIP  PostgreSQL against SQLite (--store both compares them)")
    full = [p for p in phases if p.kind == "postgresql" and p.role == "full"]
    if full:
        kept = full[0].load.accepted_per_second / pg[-1].load.accepted_per_second
        verdict(kept >= 1 - TARGET_FULL_STORE_LOSS,
                f"PostgreSQL with {full[0].stored_before:,} stored messages within 15% of "
                f"the empty store: {kept:.0%}")


def issue24(phases: list[Phase], peer: float | None) -> None:
    """The targets of issue 24: Kannel as the peer, and the delivery worker's CPU. The row
    without callbacks runs on SQLite, so the row with them is SQLite's empty store (its
    runs summed over --rounds)."""
    quiet = next((p for p in phases if p.role == "no-callbacks"), None)
    called = [p for p in phases if p.kind == "sqlite" and p.role == "empty"]
    if quiet is None and peer is None:
        return
    print()
    print("Targets (issue 24; informative):")
    if peer:
        if quiet is not None:
            times = quiet.load.accepted_per_second / peer
            verdict(times >= TARGET_PEER_TIMES,
                    f"accepted durable sends/s >= {TARGET_PEER_TIMES:g}x Kannel's: "
                    f"{times:.2f}x ({quiet.load.accepted_per_second:,.0f} / {peer:,.0f})")
        if called:
            seconds = sum(p.load.seconds for p in called)
            rate = sum(p.load.accepted_per_second * p.load.seconds for p in called) / seconds
            counted = [p.callbacks_per_second for p in called
                       if p.callbacks_per_second is not None]
            callbacks = sum(counted) / len(counted) if counted else None
            verdict(rate / peer >= TARGET_PEER_TIMES_CALLBACKS,
                    f"with callbacks, sends/s >= {TARGET_PEER_TIMES_CALLBACKS:g}x Kannel's: "
                    f"{rate / peer:.2f}x, {fmt(callbacks, ',.0f')} callbacks/s")
        else:
            print("SKIP  with callbacks against Kannel (no SQLite empty-store row)")
    else:
        print("SKIP  sends/s against Kannel (no Kannel row)")
    if quiet is not None:
        per = quiet.cpu_ms_per_message()
        send, work = per.get("gateway-no-callbacks"), per.get(WORKER)
        if send and work is not None:
            verdict(work <= send * TARGET_WORKER_SHARE,
                    f"delivery worker CPU per message <= 1/3 of the send process's "
                    f"(no callbacks): {work:.3f} / {send:.3f} ms = {work / send:.2f}")
        else:
            print("SKIP  delivery worker CPU per message (no delivery worker)")


def verdict(passed: bool, text: str) -> None:
    print(f"{'PASS' if passed else 'FAIL'}  {text}")


def fsync_ms(folder: Path, rounds: int = 30) -> tuple[float, float]:
    """Median and 90th percentile of a 4 KiB write + fsync where the store lives."""
    path = folder / "fsync.probe"
    times = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for _ in range(rounds):
            os.write(fd, b"x" * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    times.sort()
    return times[len(times) // 2], times[int(len(times) * 0.9)]


def describe_machine(args: argparse.Namespace, folder: Path) -> None:
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"NOTE  load average {load:.1f} before starting: other processes are using "
              "the CPU and will lower the figures: rerun on a quiet machine")
    import aiohttp

    try:
        import uvloop
        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (uvloop not installed)"
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    overrides = sorted(k for k in os.environ if k.startswith("HTTP2SMS_"))
    print(f"Machine: {os.cpu_count()} cores {model}; {platform.system()} "
          f"{platform.release()}")
    print(f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, {loop}, "
          f"SQLite {sqlite3.sqlite_version}, {wrk.splitlines()[0] if wrk else 'wrk'}")
    p50, p90 = fsync_ms(folder)
    print(f"fsync of the store's disk: p50 {p50:.1f} ms, p90 {p90:.1f} ms "
          f"(every accepted send waits for one, shared by its group commit)")
    print(f"Simulated operator delays {args.min_delay:g}-{args.max_delay:g} s; "
          f"gateway log level {args.log_level}"
          + (f"; environment overrides: {', '.join(overrides)}" if overrides else ""))
    if args.idle_worker:
        print("Delivery worker under SCHED_IDLE (--idle-worker): it runs only on CPU that "
              "nothing else wants. A diagnostic of the send process's own bound, not a "
              "deployment setting")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description="Burst benchmark of the send path (issue 7): "
        "framework ceiling vs the gateway, empty and pre-filled store. See docs/benchmark.md.")
    parser.add_argument("--duration", type=float, help="measured seconds per run (15)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds before each run (5)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (64)")
    parser.add_argument("--threads", type=int, default=1,
                        help="wrk threads (1: wrk shares the cores with everything else)")
    parser.add_argument("--users", type=int, default=8, help="API users sending (8)")
    parser.add_argument("--recipients", type=int, default=100_000,
                        help="distinct recipient numbers the sends rotate over (100000: more "
                        "than the gateway's cache of checked numbers holds, so every send "
                        "checks its number anew, as in an OTP storm; 99 repeats numbers, as "
                        "a load test might)")
    parser.add_argument("--prefill", type=int,
                        help="messages stored before the last run (1000000; 0 skips it)")
    parser.add_argument("--min-delay", type=float, default=0.05,
                        help="simulated operator's shortest delay between states (0.05 s)")
    parser.add_argument("--max-delay", type=float, default=0.2,
                        help="simulated operator's longest delay between states (0.2 s)")
    parser.add_argument("--drain", type=float,
                        help="most seconds to wait for callbacks to finish after a run (60)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 s runs, 1 s warm-up, 20,000 pre-filled messages")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"],
                        help="the gateway's log level (warning; info, the default in "
                        "production, also writes a line per send)")
    parser.add_argument("--durable-ceiling", action="store_true",
                        help="also measure the ceiling app reading the query and storing "
                        "each request's row in SQLite before answering (group commit, "
                        "synchronous=FULL), without the gateway's checks")
    parser.add_argument("--idle-worker", action="store_true",
                        help="run the gateway's delivery worker under SCHED_IDLE (Linux), so "
                        "that it gets only CPU nothing else wants: what the send process "
                        "makes when delivery and callbacks cost it nothing (a diagnostic)")
    parser.add_argument("--operator", choices=["simulated", "smpp"], default="simulated",
                        help="the network: the built-in simulator (default), or the SMPP "
                        "connector bound to the tests' SMSC (tests/smsc.py) in its own "
                        "process, which answers at once and sends a receipt for each "
                        "message; adds submit_sm/s and receipts/s")
    parser.add_argument("--smpp-window", type=int, default=50,
                        help="--operator smpp: operator.smpp.window (50)")
    parser.add_argument("--store", choices=["sqlite", "postgresql", "both"], default="sqlite",
                        help="the gateway's store: SQLite (default), PostgreSQL (a throwaway "
                        "cluster with durable settings, started and removed by the bench; "
                        "adds a run of `serve --processes 2`), or both, alternated")
    # One option for both modes: argparse refuses an option defined twice.
    parser.add_argument("--rounds", type=int, default=None,
                        help="empty-store runs of each store, alternated (1); with "
                        "--retention, pairs of runs without and with the purge (2)")
    parser.add_argument("--no-kannel", dest="kannel", action="store_false",
                        help="skip the Kannel peer row (issue 24; scripts/bench installs "
                        "Debian's kannel and kannel-extras for it when missing)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_retention_arguments(parser)
    args = parser.parse_args(argv)
    quick = {"duration": 3.0, "warmup": 1.0, "prefill": 20_000, "drain": 20.0}
    full = {"duration": 15.0, "warmup": 5.0, "prefill": 1_000_000, "drain": 60.0}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds is None:
        args.rounds = 2 if args.retention else 1
    if args.duration <= 0 or args.duration > 3600 or args.warmup < 0 or args.warmup > 600:
        parser.error("--duration must be in (0, 3600] and --warmup in [0, 600]")
    if not 1 <= args.threads <= args.connections <= 10_000:
        parser.error("need 1 <= --threads <= --connections <= 10000")
    if not 1 <= args.users <= 1000 or not 0 <= args.prefill <= 100_000_000:
        parser.error("--users must be in [1, 1000] and --prefill in [0, 100000000]")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be in [1, 20]")
    if not 1 <= args.recipients <= 9_900_000:  # the +3361 numbers load.lua can make
        parser.error("--recipients must be in [1, 9900000]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (scripts/bench installs it: apt-get install wrk)",
              file=sys.stderr)
        return 2

    def terminate(signum: int, _: Any) -> None:
        raise KeyboardInterrupt(signum)

    # Our handler, not asyncio.run's: a Ctrl-C must stop the run wherever it is.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, terminate)
    folder = Path(tempfile.mkdtemp(prefix="http2sms-bench-"))
    procs = Processes(folder)
    interrupted = False
    info: dict[str, Any] = {}
    try:
        describe_machine(args, folder)
        if args.retention:
            return 0 if run_retention(args, folder, procs) else 1
        phases = run(args, folder, procs, info)
        ok = report(phases, info, args)
        if args.json:
            write_json(Path(args.json), phases, info, args)
        return 0 if ok else 1
    except BenchError as exc:
        print(f"\nbench: FAILED: {exc}", file=sys.stderr)
        return 1
    except CannotRun as exc:
        print(f"\nbench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping its processes", file=sys.stderr)
        interrupted = True
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()
        if info.get("postgres_cluster"):
            stop_postgres(info["postgres_cluster"])
        shutil.rmtree(folder, ignore_errors=True)
        if interrupted:
            # A store connection's thread may still be open mid-transaction: do not wait.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)


def write_json(path: Path, phases: list[Phase], info: dict[str, Any],
               args: argparse.Namespace) -> None:
    path.write_text(json.dumps({"options": vars(args), "info": info, "phases": [
        {"label": p.label, "accepted_per_second": p.load.accepted_per_second,
         "p50_ms": p.load.p50_ms, "p90_ms": p.load.p90_ms, "p99_ms": p.load.p99_ms,
         "max_ms": p.load.max_ms, "requests": p.load.requests, "errors": p.load.errors,
         "callbacks_per_second": p.callbacks_per_second, "callback_backlog": p.backlog,
         "peak_rss_mb": p.rss_mb, "cpu_percent": p.cpu,
         "server_cpu_ms_per_request": p.server_cpu_ms(), "stored_before": p.stored_before,
         "drain_seconds": p.drain_seconds, "submits_per_second": p.submits_per_second,
         "receipts_per_second": p.receipts_per_second,
         "cpu_ms_per_message": p.cpu_ms_per_message()} for p in phases]}, indent=2,
        default=str))


if __name__ == "__main__":
    sys.exit(main())
