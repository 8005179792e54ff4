"""The real gateway process for tests: `python -m gateway serve` on a real SQLite file.

Tests start it with `ServerProcess.start`, talk to it over real HTTP on 127.0.0.1 and stop it
with a signal. Its output goes to a pipe that a task drains (a pipe, not a file: a test may
limit the size of the files the process writes). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from gateway import passwords
from gateway.cli import DEMO_ACCOUNT, DEMO_LOGIN, DEMO_PASSWORD, DEMO_SENDER, ensure_demo
from gateway.config import Config
from gateway.service import Management
from gateway.store import open_store

SEND_PATH = "/cgi-bin/sms/http2sms.cgi"
T = TypeVar("T")

# Settings of every test server unless a test overrides them: quiet JSON logs, a quick
# simulated network, private addresses allowed (callbacks go to 127.0.0.1).
BASE_ENV = {
    "HTTP2SMS_LOG_FORMAT": "json",
    "HTTP2SMS_LOG_LEVEL": "warning",
    "HTTP2SMS_OPERATOR_MIN_DELAY": "0",
    "HTTP2SMS_OPERATOR_MAX_DELAY": "0.05",
    "HTTP2SMS_SERVER_ALLOW_PRIVATE_IPS": "1",
    # The tests' callback receivers listen on 127.0.0.1.
    "HTTP2SMS_CALLBACKS_ALLOW_PRIVATE_TARGETS": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def demo_params(**extra: str) -> dict[str, str]:
    params = {"account": DEMO_ACCOUNT, "login": DEMO_LOGIN, "password": DEMO_PASSWORD,
              "from": DEMO_SENDER, "to": "+33612345678", "message": "Hello", "noStop": "1"}
    params.update(extra)
    return params


async def prepare_store(db: Path | str, *, credits: int = 0, callback: str | None = None) -> None:
    """The demo account and user (as `serve --demo` makes them), topped up, with a callback."""
    config = Config().replace({"store.path": str(db), "server.allow_private_ips": True,
                               "callbacks.allow_private_targets": True})
    await ensure_demo(config)
    store = open_store(db, "cli")
    await store.open()
    try:
        manage = Management(store, config)
        if credits:
            await manage.credit_account(DEMO_ACCOUNT, credits)
        if callback is not None:
            await manage.update_user(DEMO_ACCOUNT, DEMO_LOGIN, callback_url=callback)
    finally:
        await store.close()


async def wait_for(check: Callable[[], Awaitable[T | None]], *, timeout: float,
                   interval: float = 0.05, what: str = "condition") -> T:
    """Poll `check` until it returns something other than None or False; bounded."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


def process_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """The environment of a gateway process under test: BASE_ENV, then `env`. The
    developer's own HTTP2SMS_* settings must not leak into a test; the suite's cheap
    hashing cost (conftest.py) must."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("HTTP2SMS_") or k == passwords.TEST_N_VARIABLE}
    full_env.update(BASE_ENV)
    full_env.update(env or {})
    return full_env


@dataclass
class ServerProcess:
    db: Path | str
    port: int
    proc: asyncio.subprocess.Process
    output: bytearray = field(default_factory=bytearray)
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, db: Path | str, *, env: Mapping[str, str] | None = None,
                    port: int | None = None, wait_ready: bool = True,
                    ready_timeout: float = 30.0, host: str = "127.0.0.1",
                    preexec_fn: Callable[[], None] | None = None,
                    args: Sequence[str] = ()) -> ServerProcess:
        """`http2sms serve`, with `args` after the command (e.g. `--processes 2`)."""
        port = port or free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--db", str(db), "serve", "--host", host,
            "--port", str(port), *args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=process_env(env), preexec_fn=preexec_fn)
        server = cls(db, port, proc)
        server._reader = asyncio.create_task(server._drain())
        if wait_ready:
            try:
                await server.wait_ready(ready_timeout)
            except BaseException:
                await server.kill()
                raise
        return server

    async def _drain(self) -> None:
        assert self.proc.stdout is not None
        while chunk := await self.proc.stdout.read(65536):
            self.output += chunk

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def send_url(self) -> str:
        return self.base + SEND_PATH

    @property
    def log(self) -> str:
        return self.output.decode("utf-8", "replace")

    async def wait_ready(self, timeout: float = 30.0) -> None:
        async with aiohttp.ClientSession() as session:
            async def up() -> bool:
                if self.proc.returncode is not None:
                    raise AssertionError(f"the gateway exited with {self.proc.returncode}:\n"
                                         f"{self.log[-3000:]}")
                try:
                    async with session.get(self.base + "/healthz") as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(up, timeout=timeout, what="the gateway to listen")

    async def wait_exit(self, timeout: float) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)
        return code

    async def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then the exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            await self.wait_exit(10)
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def events(self, name: str) -> list[str]:
        """The JSON log lines of one event."""
        return [line for line in self.log.splitlines() if f'"event": "{name}"' in line]

    @classmethod
    async def deliver(cls, db: Path | str, *, env: Mapping[str, str] | None = None,
                      wait_ready: bool = True, ready_timeout: float = 30.0) -> ServerProcess:
        """`http2sms deliver` (no listener: `port` is 0), logging at info level at least,
        ready once it logs `deliver_ready`."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "--db", str(db), "deliver",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=process_env({"HTTP2SMS_LOG_LEVEL": "info", **(env or {})}))
        worker = cls(db, 0, proc)
        worker._reader = asyncio.create_task(worker._drain())
        if wait_ready:
            try:
                await worker.wait_event("deliver_ready", ready_timeout)
            except BaseException:
                await worker.kill()
                raise
        return worker

    async def wait_event(self, name: str, timeout: float) -> str:
        """The first log line of event `name`, once logged; fails if the process exits."""
        async def logged() -> str | None:
            found = self.events(name)
            if found:
                return found[0]
            if self.proc.returncode is not None:
                raise AssertionError(f"the process exited with {self.proc.returncode}:\n"
                                     f"{self.log[-3000:]}")
            return None

        return await wait_for(logged, timeout=timeout, what=f"the event {name}")


@contextlib.asynccontextmanager
async def servers() -> AsyncIterator[list[ServerProcess]]:
    """Collects the processes a test starts and kills whatever is left, whatever happens."""
    started: list[ServerProcess] = []
    try:
        yield started
    finally:
        for server in started:
            await server.kill()


def read_db(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A read through a plain sqlite3 connection (WAL: safe while the gateway runs)."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


async def store_totals(db: Path | str) -> tuple[dict[str, int], dict[str, int]]:
    """(ledger_totals, counts) of a store file."""
    store = open_store(db, "cli")
    await store.open()
    try:
        return await store.ledger_totals(), await store.counts()
    finally:
        await store.close()
