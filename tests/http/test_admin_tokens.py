"""Admin API tokens on the real app: guessing throttled per address, tokens scoped to
accounts, revoked at once, stored as digests, managed with the CLI in-process."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from gateway import tokens
from gateway.admin import api as admin_api
from gateway.clock import ManualClock
from gateway.config import Config
from tests.cli_in_process import invoke
from tests.conftest import ACCOUNT, Harness

OTHER = "sms-other-1"
# The harness's admin.token (tests/conftest.py).
TOKEN = "test-admin-token-0123456789"


def bearer(text: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {text}"}


AUTH = bearer(TOKEN)


class Answer:
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body


async def call(h: Harness, method: str, path: str, body: Any = None, *,
               headers: dict[str, str] | None = None) -> Answer:
    resp = await h.client.request(method, path, headers=AUTH if headers is None else headers,
                                  json=body)
    text = await resp.text()
    return Answer(resp.status, json.loads(text) if text else None)


def assert_error(answer: Answer, status: int) -> None:
    assert answer.status == status, answer.body
    assert isinstance(answer.body["message"], str) and answer.body["message"]


# -- guessing -------------------------------------------------------------------------------

async def test_the_lock_holds_for_lockout_seconds_then_lifts(make_harness: Any,
                                                             config: Config) -> None:
    clock = ManualClock()
    cfg = config.replace({"security.max_failures": 4, "security.lockout_seconds": 60,
                          "server.trusted_proxies": ["127.0.0.1"]})
    h: Harness = await make_harness(cfg=cfg, clock=clock)
    attacker = {"X-Forwarded-For": "203.0.113.9"}
    for n in range(4):
        answer = await call(h, "GET", "/1.0/sms", headers={**attacker, **bearer(f"x{n}")})
        assert_error(answer, 401)
    for headers in (bearer("x5"), AUTH, bearer(TOKEN + "x")):
        assert_error(await call(h, "GET", "/1.0/sms", headers={**attacker, **headers}), 429)
    # Another address is not concerned.
    assert (await call(h, "GET", "/1.0/sms",
                       headers={"X-Forwarded-For": "198.51.100.7", **AUTH})).status == 200
    # A request with no token at all is no guess: 401, counted nowhere.
    assert_error(await call(h, "GET", "/1.0/sms", headers={"X-Forwarded-For": "198.51.100.8"}),
                 401)
    clock.advance(61)
    assert (await call(h, "GET", "/1.0/sms", headers={**attacker, **AUTH})).status == 200


async def test_metrics_and_the_admin_api_see_the_same_caller(make_harness: Any,
                                                              config: Config,
                                                              aiohttp_client: Any) -> None:
    """One caller address (gateway/web_ip.py) for every edge, on either listener: guesses
    at /metrics and at /1.0 from one forwarded address count together."""
    cfg = config.replace({"security.max_failures": 4,
                          "server.trusted_proxies": ["127.0.0.1"]})
    h: Harness = await make_harness(cfg=cfg)
    admin = await aiohttp_client(admin_api.create_admin_app(h.gateway))
    attacker = {"X-Forwarded-For": "203.0.113.9"}
    for n, (client, path) in enumerate([(h.client, "/metrics"), (h.client, "/1.0/sms"),
                                        (admin, "/metrics"), (admin, "/1.0/sms")]):
        resp = await client.get(path, headers={**attacker, **bearer(f"x{n}")})
        assert resp.status == 401, (path, await resp.text())
    for client, path in [(h.client, "/metrics"), (h.client, "/1.0/sms"), (admin, "/metrics"),
                         (admin, "/1.0/sms")]:
        assert (await client.get(path, headers={**attacker, **AUTH})).status == 429, path
        assert (await client.get(path, headers={"X-Forwarded-For": "198.51.100.7",
                                                **AUTH})).status == 200, path


async def test_a_right_token_does_not_clear_the_count(make_harness: Any,
                                                      config: Config) -> None:
    """Whoever holds one token cannot guess at another between two of its own requests."""
    h: Harness = await make_harness(cfg=config.replace({"security.max_failures": 3}))
    _, scoped = await h.manage.create_token("mine", [ACCOUNT])
    for n in range(3):
        assert_error(await call(h, "GET", "/1.0/sms", headers=bearer(f"guess{n}")), 401)
        if n < 2:
            assert (await call(h, "GET", "/1.0/sms", headers=bearer(scoped))).status == 200
    assert_error(await call(h, "GET", "/1.0/sms", headers=bearer(scoped)), 429)


# -- scopes ---------------------------------------------------------------------------------

async def test_a_token_for_some_accounts_sees_only_those(harness: Harness) -> None:
    h = harness
    await h.manage.create_account(OTHER, 50)
    await h.manage.create_user(OTHER, "bob", "secret456")
    token, text = await h.manage.create_token("acme-robot", [ACCOUNT])
    assert token.accounts == (ACCOUNT,)
    mine = bearer(text)

    answer = await call(h, "GET", "/1.0/sms", headers=mine)
    assert answer.status == 200 and answer.body == [ACCOUNT]
    assert (await call(h, "GET", f"/1.0/sms/{ACCOUNT}", headers=mine)).status == 200
    assert (await call(h, "GET", f"/1.0/sms/{ACCOUNT}/users", headers=mine)).status == 200

    # Another account is as absent as one that does not exist: same status, same message.
    missing = await call(h, "GET", "/1.0/sms/sms-nope-1", headers=mine)
    assert_error(missing, 404)
    for method, path, body in [
            ("GET", f"/1.0/sms/{OTHER}", None),
            ("PUT", f"/1.0/sms/{OTHER}", {"stopClause": "STOP"}),
            ("POST", f"/1.0/sms/{OTHER}/credits", {"amount": 1000}),
            ("GET", f"/1.0/sms/{OTHER}/ledger", None),
            ("GET", f"/1.0/sms/{OTHER}/senders", None),
            ("POST", f"/1.0/sms/{OTHER}/senders", {"sender": "EVIL"}),
            ("GET", f"/1.0/sms/{OTHER}/users", None),
            ("POST", f"/1.0/sms/{OTHER}/users", {"login": "mallory", "password": "pass12345"}),
            ("GET", f"/1.0/sms/{OTHER}/users/bob", None),
            ("PUT", f"/1.0/sms/{OTHER}/users/bob", {"password": "owned1234"}),
            ("DELETE", f"/1.0/sms/{OTHER}/users/bob", None),
            ("GET", f"/1.0/sms/{OTHER}/users/bob/outgoing", None)]:
        answer = await call(h, method, path, body, headers=mine)
        assert_error(answer, 404)
        assert answer.body["message"] == f"unknown account {OTHER!r}", (method, path)
    other = await h.gateway.store.get_account(OTHER)
    assert other.balance == 5000 and other.senders == () and other.stop_clause is None
    assert await h.gateway.store.list_users(OTHER) == ["bob"]
    # Creating accounts is across accounts: a token for all of them only.
    assert_error(await call(h, "POST", "/1.0/sms", {"name": "sms-new-1"}, headers=mine), 403)
    assert OTHER in (await call(h, "GET", "/1.0/sms")).body


async def test_a_token_for_all_accounts_covers_later_ones(harness: Harness) -> None:
    _, text = await harness.manage.create_token("ops", None)
    answer = await call(harness, "POST", "/1.0/sms", {"name": "sms-new-1"}, headers=bearer(text))
    assert answer.status == 201
    answer = await call(harness, "GET", "/1.0/sms", headers=bearer(text))
    assert answer.body == ["sms-new-1", ACCOUNT]


async def test_tokens_alone_enable_the_admin_api(make_harness: Any, config: Config) -> None:
    h: Harness = await make_harness(cfg=config.replace({"admin.token": ""}))
    assert "disabled" in (await call(h, "GET", "/1.0/sms")).body["message"]
    _, text = await h.manage.create_token("ops", None)
    assert (await call(h, "GET", "/1.0/sms", headers=bearer(text))).status == 200
    assert_error(await call(h, "GET", "/1.0/sms"), 401)  # the old bootstrap token: no more
    wrong = text[:-1] + ("B" if text.endswith("A") else "A")
    assert_error(await call(h, "GET", "/1.0/sms", headers=bearer(wrong)), 401)


async def test_a_revoked_token_is_refused_at_once(harness: Harness) -> None:
    h = harness
    _, text = await h.manage.create_token("robot", [ACCOUNT])
    assert (await call(h, "GET", f"/1.0/sms/{ACCOUNT}", headers=bearer(text))).status == 200
    db = h.gateway.config.store.path
    result = await asyncio.to_thread(invoke, "--db", db, "token", "revoke", "robot")
    assert result.exit_code == 0, result.output
    assert_error(await call(h, "GET", f"/1.0/sms/{ACCOUNT}", headers=bearer(text)), 401)


@pytest.mark.sqlite_only  # reads the store's files
async def test_tokens_are_stored_as_digests(harness: Harness) -> None:
    h = harness
    token, text = await h.manage.create_token("robot", [ACCOUNT])
    key, secret = text[4:16], text[17:]
    assert tokens.split(text) == (key, secret) and token.key == key
    assert token.digest == hashlib.sha256(f"{key}:{secret}".encode()).hexdigest()
    assert (await call(h, "GET", "/1.0/sms", headers=bearer(text))).status == 200
    await h.gateway.store.close()  # everything on disk, in the file and its log
    path = Path(h.gateway.config.store.path)
    stored = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
    assert secret.encode() not in stored and text.encode() not in stored
    assert token.digest.encode() in stored
    await h.gateway.store.open()


async def test_last_use_is_recorded(harness: Harness) -> None:
    token, text = await harness.manage.create_token("robot", [ACCOUNT])
    assert token.last_used_at is None
    await call(harness, "GET", "/1.0/sms", headers=bearer(text))
    [listed] = await harness.gateway.store.list_tokens()
    assert listed.last_used_at is not None


# -- the command line -----------------------------------------------------------------------

def test_cli_creates_lists_and_revokes_tokens(tmp_path: Path) -> None:
    db = str(tmp_path / "g.sqlite3")
    assert invoke("--db", db, "account", "create", ACCOUNT).exit_code == 0
    assert invoke("--db", db, "account", "create", OTHER).exit_code == 0

    made = invoke("--db", db, "--json", "token", "create", "robot", "--account", ACCOUNT,
                  "--account", OTHER)
    assert made.exit_code == 0, made.output
    shown = json.loads(made.stdout)
    assert shown["name"] == "robot" and shown["accounts"] == sorted([ACCOUNT, OTHER])
    secret = shown["token"]
    assert tokens.split(secret) is not None and shown["key"] == secret[4:16]

    made = invoke("--db", db, "token", "create", "ops", "--all")
    assert made.exit_code == 0 and "accounts: all" in made.stdout
    assert "token: h2s_" in made.stdout

    listed = invoke("--db", db, "token", "list")
    assert listed.exit_code == 0
    assert "name=ops" in listed.stdout and "name=robot" in listed.stdout
    assert secret not in listed.stdout and secret[17:] not in listed.stdout
    assert "digest" not in listed.stdout
    rows = json.loads(invoke("--db", db, "token", "list", "--json").stdout)
    assert [r["name"] for r in rows] == ["ops", "robot"] and rows[0]["accounts"] == "all"

    for args in (["robot", "--all"],                      # taken
                 ["new", "--account", "sms-nope-1"],      # no such account
                 ["new"],                                 # neither --account nor --all
                 ["new", "--all", "--account", ACCOUNT],  # both
                 ["bad name!", "--all"]):
        refused = invoke("--db", db, "token", "create", *args)
        assert refused.exit_code == 2, (args, refused.output)
        assert refused.stderr.startswith("error: ")
    assert [r["name"] for r in json.loads(
        invoke("--db", db, "token", "list", "--json").stdout)] == ["ops", "robot"]

    revoked = invoke("--db", db, "token", "revoke", "robot")
    assert revoked.exit_code == 0 and revoked.stdout.strip() == "revoked robot"
    assert invoke("--db", db, "token", "revoke", "robot").exit_code == 2
    assert [r["name"] for r in json.loads(
        invoke("--db", db, "token", "list", "--json").stdout)] == ["ops"]


async def test_metrics_take_the_same_throttled_check(make_harness: Any, config: Config,
                                                     tmp_path: Path) -> None:
    """/metrics took admin.token with no throttle: a second door for guessing it. It now asks
    the admin API's check, so guesses there count here, and a scoped token may not read the
    metrics of every account."""
    h: Harness = await make_harness(cfg=config.replace({"security.max_failures": 3}))
    statuses = [(await h.client.get("/metrics", headers=bearer(f"wrong-{i}"))).status
                for i in range(4)]
    assert statuses == [401, 401, 401, 429]
    resp = await h.client.get("/metrics", headers=AUTH)
    assert resp.status == 429 and resp.headers["Retry-After"]  # locked: unchecked
    assert (await call(h, "GET", "/1.0/sms")).status == 429  # one count for both doors

    other: Harness = await make_harness(cfg=config.replace(
        {"store.path": str(tmp_path / "other.sqlite3")}))
    _, scoped = await other.manage.create_token("robot", [ACCOUNT])
    _, everything = await other.manage.create_token("prometheus", None)
    assert (await other.client.get("/metrics", headers=bearer(scoped))).status == 403
    assert (await other.client.get("/metrics", headers=bearer(everything))).status == 200
