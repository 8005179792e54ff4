"""The delivery worker: the operator, its reports and the callbacks in a process of their own.

One Python process runs on one CPU core. Under a burst the send path and the delivery side
(handing messages to the operator, storing its reports, calling the users' callback URLs)
competed for that core: callbacks alone took a quarter of it. With `server.delivery_worker`
on, `http2sms serve` starts this worker as a child process (`gateway.worker_process`, its
process main: this module is the parent's side), so the two sides use two cores
and meet only in the store, which both processes already share safely (SQLite's write lock,
lease-based claims of messages and outbox items).

The link is the child's standard input and output, so it needs no port, no file and no
secret on a command line:

- stdin, parent to child: first one line of JSON, the settings; then single bytes: `p`
  (pokes: sends were committed, look in the store now) and `s` (a status request).
  End of file means the parent is gone or stopping: the worker finishes what it holds and
  exits. So a parent killed with SIGKILL does not leave a worker behind.
- stdout, child to parent: one JSON line per status request: whether it delivers (not
  while another worker holds the store), the operator's link status, the reports and
  messages waiting in memory, and the worker's metrics (Prometheus text).

The parent side, `DeliveryWorker`, is one of the gateway's services: it starts the child,
pokes it after each commit, asks its status for `/readyz` and `/metrics`, starts it again
if it dies, and stops it by closing its stdin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import deque
from dataclasses import dataclass

import structlog

from gateway.config import Config, to_dict
from gateway.restarts import RestartDelay

log = structlog.get_logger("gateway.worker")

POKE = b"p"
STATUS = b"s"
# A status answer larger than this is not a status answer.
MAX_STATUS_BYTES = 16 * 1024 * 1024
# Pokes closer together than this are sent as one, at the end of the gap: under load a
# commit ends every millisecond or so, and a poke each (a write waking the worker) was 2.9%
# of the send process's CPU (py-spy, scripts/bench), for a worker that was awake already.
POKE_GAP = 0.005


@dataclass(frozen=True)
class WorkerStatus:
    operator_connected: bool
    waiting_hand_over: int
    waiting_reports: int
    metrics: str
    # Why the operator is not connected (SMPP: "wrong password (ESME_RINVPASWD)"...).
    operator_detail: str = ""
    # False while the worker waits for another one (another gateway's) to let go of the
    # store: this gateway does not deliver.
    delivering: bool = True


class DeliveryWorker:
    """Runs the worker process for the gateway; a `Service` of `gateway.app.Gateway`."""

    def __init__(self, config: Config, *, restart_seconds: float = 1.0,
                 stop_seconds: float | None = None) -> None:
        self._config = config
        self._restart_seconds = restart_seconds
        self._stop_seconds = stop_seconds if stop_seconds is not None \
            else config.server.shutdown_grace_seconds
        self._process: asyncio.subprocess.Process | None = None
        self._answers: deque[asyncio.Future[WorkerStatus]] = deque()
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._poked_at = -POKE_GAP
        self._poke_later: asyncio.TimerHandle | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    async def start(self) -> None:
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="delivery-worker")

    async def stop(self) -> None:
        """Close the worker's stdin, give it `stop_seconds` to finish, then kill it."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), self._stop_seconds)
        except TimeoutError:
            log.warning("delivery_worker_killed", pid=process.pid,
                        after_seconds=self._stop_seconds)
        finally:
            # Also when our own stop is cut short (the grace period is over): what the
            # worker had not finished is resumed from the store at the next start.
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await asyncio.shield(process.wait())
        await self._forget(process)

    def kill(self) -> None:
        """At once (the shutdown's grace period is over): the store keeps what it missed."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
        if self.running and self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                self._process.kill()

    def poke(self, *_: object) -> None:
        """After each commit: tell the worker that new messages are in the store, at once
        or, when the last poke is less than `POKE_GAP` old, at the end of the gap."""
        if self._poke_later is not None:
            return  # the poke at the end of the gap tells of this commit too
        loop = asyncio.get_running_loop()
        wait = self._poked_at + POKE_GAP - loop.time()
        if wait > 0:
            self._poke_later = loop.call_later(wait, self._poke_now)
            return
        self._poke_now()

    def _poke_now(self) -> None:
        self._poke_later = None
        self._poked_at = asyncio.get_running_loop().time()
        process = self._process
        if process is None or process.stdin is None or process.stdin.is_closing():
            return
        # One unread poke is enough to wake it; never let pokes pile up behind a busy worker.
        if process.stdin.transport.get_write_buffer_size() == 0:
            with contextlib.suppress(ConnectionError, RuntimeError):
                process.stdin.write(POKE)

    async def status(self, timeout: float = 2.0) -> WorkerStatus | None:
        """The worker's status, or None if it is not running or does not answer in time."""
        process = self._process
        if not self.running or process is None or process.stdin is None:
            return None
        answer: asyncio.Future[WorkerStatus] = asyncio.get_running_loop().create_future()
        self._answers.append(answer)
        try:
            process.stdin.write(STATUS)
            return await asyncio.wait_for(asyncio.shield(answer), timeout)
        except (TimeoutError, ConnectionError, RuntimeError, WorkerGone):
            return None

    async def _spawn(self) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.worker_process",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            limit=MAX_STATUS_BYTES)
        assert process.stdin is not None
        # Settings through the pipe, not the command line or the environment: they hold
        # the admin token and the SMTP password.
        process.stdin.write(json.dumps(to_dict(self._config)).encode() + b"\n")
        self._process = process
        self.starts += 1
        self._reader = asyncio.create_task(self._read_answers(process),
                                           name="delivery-worker-answers")
        log.info("delivery_worker_started", pid=process.pid)

    async def _read_answers(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        with contextlib.suppress(ValueError, ConnectionError):  # ValueError: line too long
            while line := await process.stdout.readline():
                if not self._answers:
                    continue
                answer = self._answers.popleft()
                try:
                    data = json.loads(line)
                    status = WorkerStatus(bool(data["operator_connected"]),
                                          int(data["waiting_hand_over"]),
                                          int(data["waiting_reports"]), str(data["metrics"]),
                                          str(data.get("operator_detail", "")),
                                          bool(data.get("delivering", True)))
                except (ValueError, KeyError, TypeError) as exc:
                    if not answer.done():
                        answer.set_exception(WorkerGone(f"bad status: {exc}"))
                    continue
                if not answer.done():
                    answer.set_result(status)

    async def _supervise(self) -> None:
        """Start the worker again whenever it dies: delivery resumes from the store."""
        restarts = RestartDelay(self._restart_seconds)
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        while True:
            process = self._process
            assert process is not None
            code = await process.wait()
            await self._forget(process)
            wait = restarts.after(loop.time() - started_at)
            log.error("delivery_worker_exited", pid=process.pid, code=code, restart_in=wait)
            await asyncio.sleep(wait)
            started_at = loop.time()
            try:
                await self._spawn()
            except OSError as exc:
                log.error("delivery_worker_start_failed", error=str(exc))
                self._process = process  # its wait() returns at once: try again later

    async def _forget(self, process: asyncio.subprocess.Process) -> None:
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._reader, 1.0)
            self._reader = None
        while self._answers:
            answer = self._answers.popleft()
            if not answer.done():
                answer.set_exception(WorkerGone(f"worker {process.pid} exited"))


class WorkerGone(Exception):
    pass
