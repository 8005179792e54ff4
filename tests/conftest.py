"""Shared fixtures: a real gateway app on a real SQLite file, driven over real HTTP."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway import app as gateway_app
from gateway import http_parser, passwords, webapp
from gateway.clock import ManualClock
from gateway.config import Config
from gateway.service import Management
from gateway.store import Store, open_store
from tests import postgres

SEND_PATH = "/cgi-bin/sms/http2sms.cgi"
ACCOUNT = "sms-test-1"
LOGIN = "alice"
PASSWORD = "secret123"
SENDER = "ACME"


def pytest_configure(config: pytest.Config) -> None:
    """Hash passwords at the cheapest scrypt cost, here and in every process a test starts
    (they inherit the variable): the real cost made the suite 140 s instead of 79 s.
    Tests about the cost itself ask for `real_hash_cost`. A cost set by the caller is kept,
    e.g. HTTP2SMS_TEST_SCRYPT_N=16384 to run the suite at the real one."""
    os.environ.setdefault(passwords.TEST_N_VARIABLE, "2")


@pytest.fixture(scope="session")
def postgres_server() -> Any:
    """The URL of the session's throwaway PostgreSQL cluster (tests/postgres.py), started
    by the first test that needs it; skips that test under HTTP2SMS_TEST_POSTGRES=0."""
    postgres.skip_unless_enabled()
    cluster = postgres.Cluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


# Databases of finished tests, dropped when the next one is made (see fresh_database) or
# with the throwaway cluster.
_finished_databases: list[str] = []


@pytest.fixture
async def postgres_url(postgres_server: str) -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    url = await postgres.fresh_database(postgres_server, _finished_databases)
    yield url
    _finished_databases.append(url)


@pytest.fixture
def real_hash_cost(monkeypatch: pytest.MonkeyPatch) -> int:
    """New hashes in this process at the production cost; servers started as processes need
    `env={passwords.TEST_N_VARIABLE: ""}` as well."""
    monkeypatch.setattr(passwords, "_n", passwords.REAL_N)
    return passwords.REAL_N


@pytest.fixture(autouse=True)
def _parser_as_started() -> Any:
    """Each test starts with the process's default request parser: the harness sets it for
    the whole process, as `gateway.server.serve` does (server.raw_url_bytes_always), and
    servers of later tests that build no gateway app would otherwise inherit it."""
    http_parser.install()
    yield
    http_parser.install()


@pytest.fixture
def store_backend(request: pytest.FixtureRequest) -> str:
    """The backend of the `config` fixture's store: SQLite, unless a conftest parametrizes
    it (tests/http runs on both, see its conftest)."""
    return str(getattr(request, "param", "sqlite"))


@pytest.fixture
def config(tmp_path: Path, store_backend: str, request: pytest.FixtureRequest) -> Config:
    if store_backend == "postgresql":
        store = str(request.getfixturevalue("postgres_url"))
    else:
        store = str(tmp_path / "gateway.sqlite3")
    return Config().replace({
        "store.path": store,
        "server.allow_private_ips": True,
        # The tests' callback receivers listen on 127.0.0.1.
        "callbacks.allow_private_targets": True,
        "log.format": "json",
        "admin.token": "test-admin-token-0123456789",
        # Tests drive delivery explicitly; a real network's delays would only slow them.
        "operator.min_delay": 0.0,
        "operator.max_delay": 0.0,
        # Every message is delivered, so no refund moves credits behind a test's back; tests
        # of failures use the simulator's magic numbers (+336123990NN).
        "operator.failure_ratio": 0.0,
        "operator.retry_ratio": 0.0,
    })


@dataclass
class Harness:
    """A running gateway and its test client."""

    client: TestClient
    gateway: gateway_app.Gateway
    manage: Management

    async def send(self, method: str = "GET", **params: Any) -> tuple[int, str]:
        query = {"account": ACCOUNT, "login": LOGIN, "password": PASSWORD, "from": SENDER,
                 "to": "+33612345678", "message": "Hello"}
        query.update({k: v for k, v in params.items() if v is not None})
        query = {k: v for k, v in query.items() if v is not ...}
        if method == "POST":
            resp = await self.client.post(SEND_PATH, data=query)
        else:
            resp = await self.client.get(SEND_PATH, params=query)
        return resp.status, await resp.text()

    async def balance(self, account: str = ACCOUNT) -> int:
        return (await self.gateway.store.get_account(account)).balance

    async def quota(self, login: str = LOGIN, account: str = ACCOUNT) -> int:
        return (await self.gateway.store.get_user(account, login)).quota_left


HarnessFactory = Callable[..., Any]


@pytest.fixture
async def make_harness(aiohttp_client: Any, config: Config
                       ) -> AsyncIterator[Callable[..., Any]]:
    """Build a gateway (optionally with a manual clock) with one account, sender and user."""

    async def make(*, credits: Any = 1000, clock: ManualClock | None = None,
                   seed: bool = True, cfg: Config | None = None,
                   server_kwargs: dict[str, Any] | None = None) -> Harness:
        cfg = cfg or config
        # The request parser as the process runner installs it; building an app does not.
        http_parser.install(always=cfg.server.raw_url_bytes_always)
        gateway = gateway_app.build(cfg, clock=clock)
        app = webapp.create_app(gateway)
        client = await aiohttp_client(app, server_kwargs=server_kwargs)
        manage = Management(gateway.store, cfg, gateway.clock)
        if seed:
            await manage.create_account(ACCOUNT, credits)
            await manage.add_sender(ACCOUNT, SENDER)
            await manage.create_user(ACCOUNT, LOGIN, PASSWORD)
        return Harness(client, gateway, manage)

    yield make


@pytest.fixture
async def harness(make_harness: Callable[..., Any]) -> Harness:
    return await make_harness()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = open_store(tmp_path / "store.sqlite3", "cli")
    await s.open()
    yield s
    await s.close()


def ledger_identity(totals: dict[str, int]) -> None:
    """purchased = balances + quotas + spent, and the ledger agrees with the tables."""
    assert totals["purchased"] == totals["balances"] + totals["quotas"] + totals["spent"], totals
    assert totals["ledger_balances"] == totals["balances"], totals
    assert totals["ledger_quotas"] == totals["quotas"], totals


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0) -> None:
    """Wait (in real time, briefly) for background work to reach a state."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the gateway")
        await asyncio.sleep(0.01)


__all__ = ["ACCOUNT", "LOGIN", "PASSWORD", "SENDER", "SEND_PATH", "Harness", "eventually", "web"]


def deferred_ahead(days: float, *, at: float | None = None, time_of_day: str | None = None,
                   tz: str = "Europe/Paris") -> str:
    """`deferred` (hhmmddMMYYYY) `days` after `at` (now), within `[send] max_deferral_days`;
    `time_of_day` ("hhmm") replaces the hour and minute."""
    when = datetime.fromtimestamp((time.time() if at is None else at) + days * 86400,
                                  ZoneInfo(tz)).strftime("%H%M%d%m%Y")
    return when if time_of_day is None else time_of_day + when[4:]
