"""Admin API tokens: a short bootstrap token refused at start, guessing throttled per address,
tokens scoped to accounts, revoked at once, stored as digests, managed with the CLI."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import config as config_module
from gateway import tokens
from gateway.clock import ManualClock
from gateway.config import Config, ConfigError
from tests.cli_in_process import invoke
from tests.conftest import ACCOUNT, Harness
from tests.serverproc import ServerProcess, servers
from tests.test_admin_api import AUTH, TOKEN, assert_error, call

OTHER = "sms-other-1"


def bearer(text: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {text}"}


# -- the bootstrap token's length -----------------------------------------------------------

@pytest.mark.parametrize("source", ["env", "file"])
def test_a_short_admin_token_is_refused_naming_the_setting(tmp_path: Path, source: str) -> None:
    short = "s3cret-but-23-chars-xyz"
    assert len(short) == config_module.ADMIN_TOKEN_MIN_LENGTH - 1
    path = tmp_path / "gateway.toml"
    path.write_text(f'[admin]\ntoken = "{short if source == "file" else ""}"\n')
    env = {"HTTP2SMS_ADMIN_TOKEN": short} if source == "env" else {}
    with pytest.raises(ConfigError) as caught:
        config_module.load(path, env=env)
    message = str(caught.value)
    assert "admin.token" in message and "24" in message
    assert ("HTTP2SMS_ADMIN_TOKEN" in message) == (source == "env")
    assert short not in message  # a secret, even a refused one, is not echoed
    # 24 characters, or none (the API then depends on the store's tokens), are accepted.
    assert config_module.load(path, env={"HTTP2SMS_ADMIN_TOKEN": short + "z"}).admin.token
    assert config_module.load(None, env={"HTTP2SMS_ADMIN_TOKEN": ""}).admin.token == ""
    with pytest.raises(ConfigError, match=r"admin\.token"):
        Config().replace({"admin.token": "t0ken"})


async def test_the_real_process_refuses_to_start_with_a_short_token(tmp_path: Path) -> None:
    async with servers() as started:
        server = await ServerProcess.start(tmp_path / "g.sqlite3", wait_ready=False,
                                           env={"HTTP2SMS_ADMIN_TOKEN": "12345"})
        started.append(server)
        assert await server.wait_exit(60) == 2
        assert "admin.token" in server.log and "at least 24 characters" in server.log
        assert "12345" not in server.log.replace(str(server.port), "")


# -- guessing -------------------------------------------------------------------------------

async def test_guessing_the_token_against_the_real_process_is_locked_per_address(
        tmp_path: Path) -> None:
    """The attack: wrong tokens as fast as one address can send them, many at once. At
    most max_failures are checked; then the address is refused without a check, the right
    token included, while another address still gets in."""
    async with servers() as started:
        server = await ServerProcess.start(tmp_path / "g.sqlite3", env={
            "HTTP2SMS_ADMIN_TOKEN": TOKEN, "HTTP2SMS_SECURITY_MAX_FAILURES": "5",
            "HTTP2SMS_SECURITY_LOCKOUT_SECONDS": "300"})
        started.append(server)
        url = server.base + "/1.0/sms"
        async with aiohttp.ClientSession() as session:
            async def guess(n: int) -> int:
                async with session.get(url, headers=bearer(f"guess-{n:032d}")) as resp:
                    return resp.status

            statuses = await asyncio.gather(*(guess(n) for n in range(200)))
            assert statuses.count(401) <= 5, statuses
            assert statuses.count(429) >= 195
            async with session.get(url, headers=AUTH) as resp:
                assert resp.status == 429
                assert int(resp.headers["Retry-After"]) > 0
                assert "too many" in (await resp.json())["message"]
        # Another address: the lock is the attacker's alone.
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=other) as session, \
                session.get(url, headers=AUTH) as resp:
            assert resp.status == 200
            assert await resp.json() == []
        assert server.events("admin_token_lockout")


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
