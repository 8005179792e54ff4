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
# Targets of issue 24.
TARGET_PEER_TIMES = 2.0             # sends/s against Kannel's, no callbacks
TARGET_PEER_TIMES_CALLBACKS = 1.5   # the same with callbacks to the receiver
TARGET_WORKER_SHARE = 1 / 3         # delivery worker CPU per message / the send process's

WORKER = "delivery worker"
NO_CALLBACKS = "gateway, no callbacks"


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


async def create_users(db: Path, n_users: int, receiver_port: int,
                       callbacks: bool = True) -> list[dict[str, Any]]:
    """Accounts (two API users each), a declared sender, users with every check active
    (and a callback URL to the receiver unless `callbacks` is off)."""
    from gateway.service import Management
    from gateway.store import open_store

    config = gateway_config()
    store = open_store(db, "cli")
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


async def prefill(db: Path, count: int, users: list[dict[str, Any]]) -> None:
    """Store `count` messages through the store's own write path, then settle them.

    commit_sends charges them (ledger, quotas) like real sends; SQL then moves them to a
    final state (ptt 4) with the history and the done callbacks a delivered message has, so
    the simulated operator leaves them alone and the tables have their steady-state shape.
    """
    from gateway.records import SendOrder
    from gateway.store import open_store

    store = open_store(db, "cli")
    await store.open()
    first_id = last_id = 0
    try:
        per_batch = PREFILL_RECIPIENTS * PREFILL_ORDERS
        batches = -(-count // per_batch)
        start = time.time() - batches * 60.0
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
    conn = sqlite3.connect(db, isolation_level=None)
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


def settle_leftovers(db: Path, at: float) -> int:
    """With the gateway stopped: finish what the previous run left (drain timed out), so the
    next run does not replay a callback backlog. Returns how many rows it settled."""
    conn = sqlite3.connect(db, isolation_level=None)
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


def store_counts(db: Path) -> dict[str, int]:
    """Read-only look at the store while the gateway runs (WAL allows it)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute(
            "SELECT (SELECT COALESCE(MAX(id), 0) FROM messages), "
            "(SELECT COUNT(*) FROM messages WHERE state <> 'final'), "
            "(SELECT COUNT(*) FROM outbox WHERE state = 'pending'), "
            "(SELECT COUNT(*) FROM outbox WHERE state = 'dead')").fetchone()
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
    peer: bool = False       # Kannel: the row the gateway's are compared with (issue 24)
    serving: tuple[str, ...] = ()  # the processes that serve, when more than the first
    # CPU seconds of each process from the start of the window to the end of the drain, and
    # the accepted sends of the window: issue 24's CPU per message of each process.
    pids: dict[str, int] = field(default_factory=dict)
    cpu_start: dict[str, float] = field(default_factory=dict)
    cpu_to_drain: dict[str, float] = field(default_factory=dict)

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
        """After the drain: each process's CPU since the window started."""
        self.cpu_to_drain = {name: cpu_seconds(pid) - self.cpu_start[name]
                             for name, pid in self.pids.items()}


def measure(label: str, server: Proc, port: int, script: Path, args: argparse.Namespace,
            folder: Path, receiver: Proc | None = None, receiver_port: int = 0,
            db: Path | None = None, others: tuple[Proc, ...] = ()) -> Phase:
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
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    busy0 = machine_busy_seconds()
    t0 = time.monotonic()
    load = run_wrk(script, port, args.duration, args, folder)
    t1 = time.monotonic()
    after_cb = http_json(f"http://{HOST}:{receiver_port}/count") if receiver else None
    after_smsc = http_json(smsc_url) if smsc_url else None
    window = t1 - t0
    cpu = {name: (cpu_seconds(pid) - cpu0[name]) / window * 100 for name, pid in pids.items()}
    cpu["wrk"] = load.cpu_seconds / window * 100
    # Everything else: other processes, and kernel work not charged to ours.
    cpu["rest of the machine"] = max(
        0.0, (machine_busy_seconds() - busy0) / window * 100 - sum(cpu.values()))
    if not server.alive():
        raise BenchError(f"{server.name} died during the run:\n{server.tail()}")
    # Summed peaks: an upper bound of the gateway's memory (they need not peak together).
    rss = peak_rss_mb(server.pid) + (peak_rss_mb(pids[WORKER]) if WORKER in pids else 0.0)
    phase = Phase(label, load, warm, rss, cpu, pids=pids, cpu_start=cpu0)
    if receiver and before_cb is not None and after_cb is not None:
        phase.callbacks_per_second = (after_cb["count"] - before_cb["count"]) / window
        phase.malformed_callbacks = after_cb["malformed"]
    if before_smsc is not None and after_smsc is not None:
        phase.submits_per_second = (after_smsc["submit_sm"] - before_smsc["submit_sm"]) / window
        phase.receipts_per_second = (after_smsc["receipts"] - before_smsc["receipts"]) / window
    if db is not None:
        phase.backlog = store_counts(db)["outbox_pending"]
    return phase


def drain(db: Path, server: Proc, limit: float) -> float | None:
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


def start_gateway(procs: Processes, db: Path, port: int, args: argparse.Namespace,
                  name: str) -> Proc:
    http2sms = Path(PYTHON).parent / "http2sms"
    argv = ([str(http2sms)] if http2sms.exists() else [PYTHON, "-m", "gateway"])
    proc = procs.start(name, [*argv, "--db", str(db), "serve", "--host", HOST, "--port",
                              str(port)], env=gateway_env(args))
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


def run(args: argparse.Namespace, folder: Path, procs: Processes) -> tuple[list[Phase],
                                                                          dict[str, Any]]:
    info: dict[str, Any] = {}
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

    print("Preparing the store (accounts, API users) ...", flush=True)
    db = folder / "gateway.sqlite3"
    users = asyncio.run(create_users(db, args.users, receiver_port))
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

    # 1c. The peer: Kannel under the same load (issue 24).
    if args.kannel:
        reason = kannel.missing()
        if reason:
            print(f"Kannel: skipped ({reason}; scripts/bench installs it)", flush=True)
        else:
            print("Kannel: bearerbox (file store, fake SMSC) + smsbox", flush=True)
            phases.append(measure_kannel(procs, folder, users, args))

    # 1d. The gateway without callbacks, on a store of its own: the delivery worker's CPU per
    # message when it only delivers (issue 24).
    print(f"Gateway, no callbacks ({args.users} API users)", flush=True)
    quiet_db = folder / "gateway-no-callbacks.sqlite3"
    asyncio.run(create_users(quiet_db, args.users, receiver_port, callbacks=False))
    port = free_port()
    gateway = start_gateway(procs, quiet_db, port, args, "gateway-no-callbacks")
    phase = measure(NO_CALLBACKS, gateway, port, script, args, folder, receiver,
                    receiver_port, quiet_db)
    phase.stored_before = 0
    phase.drain_seconds = drain(quiet_db, gateway, args.drain)
    phase.settle_cpu()
    phase.log_problems = log_problems(gateway)
    phases.append(phase)
    stop_server(procs, gateway)

    # 2. The gateway on an empty store.
    print(f"Gateway, empty store ({args.users} API users)", flush=True)
    port = free_port()
    gateway = start_gateway(procs, db, port, args, "gateway")
    phase = measure("gateway, empty store", gateway, port, script, args, folder, receiver,
                    receiver_port, db)
    phase.stored_before = 0
    phase.drain_seconds = drain(db, gateway, args.drain)
    phase.settle_cpu()
    phase.log_problems = log_problems(gateway)
    phases.append(phase)
    stop_server(procs, gateway)

    # 3. The gateway on a store of `prefill` messages.
    if args.prefill > 0:
        left = settle_leftovers(db, time.time())
        if left:
            print(f"  settled {left:,} messages/callbacks the first run left unfinished",
                  flush=True)
        print(f"Pre-filling {args.prefill:,} messages ...", flush=True)
        started = time.monotonic()
        asyncio.run(prefill(db, args.prefill, users))
        info["prefill_seconds"] = time.monotonic() - started
        info["db_mb"] = db.stat().st_size / 1024 / 1024
        stored = store_counts(db)["messages"]
        print(f"  pre-filled in {info['prefill_seconds']:.1f} s; the store holds "
              f"{stored:,} messages ({info['db_mb']:.0f} MB)", flush=True)
        print(f"Gateway, {stored:,} stored messages", flush=True)
        port = free_port()
        gateway = start_gateway(procs, db, port, args, "gateway-full")
        phase = measure(f"gateway, {args.prefill:,} stored", gateway, port, script, args,
                        folder, receiver, receiver_port, db)
        phase.stored_before = stored
        phase.drain_seconds = drain(db, gateway, args.drain)
        phase.settle_cpu()
        phase.log_problems = log_problems(gateway)
        phases.append(phase)
        stop_server(procs, gateway)
    if not receiver.alive():
        raise BenchError(f"the callback receiver died:\n{receiver.tail()}")
    return phases, info


# -- report -----------------------------------------------------------------------------------

def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(phases: list[Phase], info: dict[str, Any], args: argparse.Namespace) -> bool:
    """Print the table and the targets; return True when every request succeeded."""
    ceiling = phases[0].load.accepted_per_second
    peer = next((p.load.accepted_per_second for p in phases if p.peer), None)
    header = (f"{'run':<28}{'sends/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'ratio':>7}"
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
        print(f"{p.label:<28}{rate:>9,.0f}{p.load.p50_ms:>8.1f}{p.load.p99_ms:>8.1f}"
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
        print(f"  {p.label:<26} {parts}{extra}")
    print("CPU per accepted send, from the window's start to the end of its drain "
          "(ms of one core):")
    for p in phases:
        per = p.cpu_ms_per_message()
        if per:
            parts = ", ".join(f"{name} {value:.3f}" for name, value in per.items()
                              if name not in ("receiver", "wrk"))
            print(f"  {p.label:<26} {parts}")
    if any(p.submits_per_second is not None for p in phases):
        print("SMPP (the test SMSC, in the measured window):")
        for p in phases:
            if p.submits_per_second is not None:
                print(f"  {p.label:<26} submit_sm/s {p.submits_per_second:,.0f}, "
                      f"receipts/s {fmt(p.receipts_per_second, ',.0f')}")
    if "prefill_seconds" in info:
        print(f"  pre-fill of {args.prefill:,} messages: {info['prefill_seconds']:.1f} s, "
              f"store file {info['db_mb']:.0f} MB")

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
    gateways = [p for p in phases if not p.reference and p.label != NO_CALLBACKS]
    if gateways:
        print()
        print("Targets (issue 7; informative: a FAIL does not change the exit status):")
        empty = gateways[0]
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
        issue24([p for p in phases if not p.reference], peer)
    print()
    print("Every request answered as expected." if ok else
          "Some requests FAILED unexpectedly (see ERROR above): exit status 1.")
    return ok


def issue24(gateways: list[Phase], peer: float | None) -> None:
    """The targets of issue 24: Kannel as the peer, and the delivery worker's CPU."""
    print()
    print("Targets (issue 24; informative):")
    by_label = {g.label: g for g in gateways}
    quiet = by_label.get(NO_CALLBACKS)
    called = by_label.get("gateway, empty store")
    if peer:
        if quiet is not None:
            times = quiet.load.accepted_per_second / peer
            verdict(times >= TARGET_PEER_TIMES,
                    f"accepted durable sends/s >= {TARGET_PEER_TIMES:g}x Kannel's: "
                    f"{times:.2f}x ({quiet.load.accepted_per_second:,.0f} / {peer:,.0f})")
        if called is not None:
            times = called.load.accepted_per_second / peer
            verdict(times >= TARGET_PEER_TIMES_CALLBACKS,
                    f"with callbacks, sends/s >= {TARGET_PEER_TIMES_CALLBACKS:g}x Kannel's: "
                    f"{times:.2f}x, {fmt(called.callbacks_per_second, ',.0f')} callbacks/s")
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
    parser.add_argument("--no-kannel", dest="kannel", action="store_false",
                        help="skip the Kannel peer row (issue 24; scripts/bench installs "
                        "Debian's kannel and kannel-extras for it when missing)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    quick = {"duration": 3.0, "warmup": 1.0, "prefill": 20_000, "drain": 20.0}
    full = {"duration": 15.0, "warmup": 5.0, "prefill": 1_000_000, "drain": 60.0}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.duration <= 0 or args.duration > 3600 or args.warmup < 0 or args.warmup > 600:
        parser.error("--duration must be in (0, 3600] and --warmup in [0, 600]")
    if not 1 <= args.threads <= args.connections <= 10_000:
        parser.error("need 1 <= --threads <= --connections <= 10000")
    if not 1 <= args.users <= 1000 or not 0 <= args.prefill <= 100_000_000:
        parser.error("--users must be in [1, 1000] and --prefill in [0, 100000000]")
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
    try:
        describe_machine(args, folder)
        phases, info = run(args, folder, procs)
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
         "cpu_ms_per_message": p.cpu_ms_per_message()} for p in phases]}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
