"""The admin REST API (/1.0): every route, its happy path and each of its error answers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import structlog

from gateway import app as gateway_app
from gateway import logs, passwords, ptt, server, webapp
from gateway.admin import api as admin_api
from gateway.clock import ManualClock
from gateway.config import Config
from gateway.records import StateUpdate
from gateway.store import StoreUnavailable
from tests.conftest import ACCOUNT, LOGIN, PASSWORD, SENDER, Harness, ledger_identity

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BASE = f"/1.0/sms/{ACCOUNT}"
USER = f"{BASE}/users/{LOGIN}"


@dataclass
class Answer:
    status: int
    body: Any
    headers: Any
    text: str


async def call(h: Harness, method: str, path: str, body: Any = None, *,
               headers: dict[str, str] | None = None, raw: bytes | None = None,
               params: Any = None) -> Answer:
    resp = await h.client.request(method, path, headers=AUTH if headers is None else headers,
                                  json=body if raw is None else None, data=raw, params=params)
    text = await resp.text()
    parsed = json.loads(text) if text and resp.content_type == "application/json" else None
    return Answer(resp.status, parsed, resp.headers, text)


def assert_error(answer: Answer, status: int, field: str | None = None) -> None:
    assert answer.status == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/json")
    assert isinstance(answer.body["message"], str) and answer.body["message"]
    assert "Traceback" not in answer.text
    if field is not None:
        assert answer.body.get("field") == field, answer.body


def sent_ids(body: str) -> list[int]:
    lines = body.split("\n")
    assert lines[0] == "OK", body
    return [int(x) for x in lines[2:]]


# -- authentication -----------------------------------------------------------------------

@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong"},
    {"Authorization": f"Bearer {TOKEN}x"},
    {"Authorization": f"Basic {TOKEN}"},
    {"Authorization": TOKEN},
    {"Authorization": "Bearer "},
    {"Authorization": "Bearer tést-ünicode"},
])
async def test_missing_or_wrong_token_is_401_json(harness: Harness,
                                                  headers: dict[str, str]) -> None:
    for method, path in [("GET", "/1.0/sms"), ("GET", USER), ("DELETE", USER),
                         ("GET", "/1.0/no/such/route")]:
        answer = await call(harness, method, path, headers=headers)
        assert_error(answer, 401)
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    # Nothing happened behind the refusal.
    assert LOGIN in await harness.gateway.store.list_users(ACCOUNT)


async def test_bearer_scheme_is_case_insensitive(harness: Harness) -> None:
    answer = await call(harness, "GET", "/1.0/sms", headers={"Authorization": f"bearer {TOKEN}"})
    assert answer.status == 200


async def test_disabled_admin_api_answers_404_json(make_harness: Any, config: Config) -> None:
    config = config.replace({"admin.token": ""})
    h: Harness = await make_harness(cfg=config)
    for headers in ({}, {"Authorization": "Bearer "}, AUTH):
        answer = await call(h, "GET", "/1.0/sms", headers=headers)
        assert_error(answer, 404)
        assert "disabled" in answer.body["message"]
    # The public reference data stays available.
    assert (await call(h, "GET", "/1.0/sms/ptts?ptt=4", headers={})).status == 200


async def test_unknown_route_and_method_are_json(harness: Harness) -> None:
    assert_error(await call(harness, "GET", "/1.0/nothing/here"), 404)
    answer = await call(harness, "PATCH", BASE)
    assert_error(answer, 405)
    assert "PUT" in answer.headers["Allow"]


async def test_openapi_is_served_without_token(harness: Harness) -> None:
    answer = await call(harness, "GET", "/1.0/openapi.json", headers={})
    assert answer.status == 200
    assert answer.body["openapi"].startswith("3.")
    assert "/1.0/sms/{account}/users/{login}" in answer.body["paths"]


# -- ptts ---------------------------------------------------------------------------------

async def test_ptts_every_code(harness: Harness) -> None:
    for code, entry in ptt.PTTS.items():
        answer = await call(harness, "GET", "/1.0/sms/ptts", params={"ptt": str(code)},
                            headers={})
        assert answer.status == 200, code
        assert answer.body == ptt.as_api_dict(entry)
        assert answer.body["duration"] in ("permanent", "temporary", "indeterminated")


@pytest.mark.parametrize("raw,status", [
    ("7", 404), ("999", 404), ("-1", 404), ("99999999999999999", 404),
    ("9" * 5000, 404), ("abc", 400), ("4.0", 400), ("", 400), ("٤", 400), ("0x4", 400),
])
async def test_ptts_unknown_or_not_a_number(harness: Harness, raw: str, status: int) -> None:
    answer = await call(harness, "GET", "/1.0/sms/ptts", params={"ptt": raw}, headers={})
    assert_error(answer, status, "ptt" if status == 400 else None)


async def test_ptts_missing_parameter(harness: Harness) -> None:
    assert_error(await call(harness, "GET", "/1.0/sms/ptts", headers={}), 400, "ptt")


# -- accounts -----------------------------------------------------------------------------

async def test_account_list_create_get(harness: Harness) -> None:
    assert (await call(harness, "GET", "/1.0/sms")).body == [ACCOUNT]
    created = await call(harness, "POST", "/1.0/sms", {"name": "sms-new-2", "credits": 12.5})
    assert created.status == 201
    assert created.headers["Location"] == "/1.0/sms/sms-new-2"
    assert created.body == {"name": "sms-new-2", "creditsLeft": 12.5, "creditsHoldByQuota": 0,
                            "userQuantityWithQuota": 0, "callBack": "",
                            "stopClause": "STOP 36111", "senders": []}
    assert (await call(harness, "GET", "/1.0/sms")).body == ["sms-new-2", ACCOUNT]
    got = await call(harness, "GET", "/1.0/sms/sms-new-2")
    assert got.body == created.body
    # credits may be left out.
    assert (await call(harness, "POST", "/1.0/sms", {"name": "sms-empty-3"})).body[
        "creditsLeft"] == 0


async def test_account_get_fields(harness: Harness) -> None:
    await harness.manage.update_user(ACCOUNT, LOGIN, quota=150)
    body = (await call(harness, "GET", BASE)).body
    assert body["creditsLeft"] == 850
    assert body["creditsHoldByQuota"] == 150
    assert body["userQuantityWithQuota"] == 1
    assert body["senders"] == [SENDER]


@pytest.mark.parametrize("body,field", [
    ({"credits": 1}, "name"),
    ({"name": ""}, "name"),
    ({"name": "has space"}, "name"),
    ({"name": 42}, "name"),
    ({"name": ["x"]}, "name"),
    ({"name": "ptts"}, "name"),
    ({"name": "x" * 65}, "name"),
    ({"name": "ok-name", "credits": -1}, "credits"),
    ({"name": "ok-name", "credits": 1.234}, "credits"),
    ({"name": "ok-name", "credits": "lots"}, "credits"),
    ({"name": "ok-name", "credits": "5"}, "credits"),
    ({"name": "ok-name", "credits": True}, "credits"),
    ({"name": "ok-name", "credits": [1]}, "credits"),
    ({"name": "ok-name", "credits": None}, "credits"),
    ({"name": "ok-name", "credits": 1e300}, "credits"),
    ({"name": "ok-name", "credits": "1e999999999"}, "credits"),
    ({"name": "ok-name", "balance": 5}, "balance"),
])
async def test_account_create_invalid(harness: Harness, body: Any, field: str) -> None:
    assert_error(await call(harness, "POST", "/1.0/sms", body), 400, field)
    assert await harness.gateway.store.list_accounts() == [ACCOUNT]


@pytest.mark.parametrize("raw", [b"", b"{", b"[1]", b'"x"', b"null", b"\xff\xfe",
                                 b'{"name": "a", "credits": NaN}',
                                 b'{"name": "a", "credits": Infinity}',
                                 b"[" * 100_000])
async def test_invalid_json_body(harness: Harness, raw: bytes) -> None:
    answer = await call(harness, "POST", "/1.0/sms", raw=raw,
                        headers={**AUTH, "Content-Type": "application/json"})
    assert_error(answer, 413 if len(raw) > 64 * 1024 else 400)
    assert await harness.gateway.store.list_accounts() == [ACCOUNT]


async def test_account_duplicate_is_409(harness: Harness) -> None:
    assert_error(await call(harness, "POST", "/1.0/sms", {"name": ACCOUNT}), 409)


async def test_account_unknown_is_404(harness: Harness) -> None:
    for method, path, body in [
        ("GET", "/1.0/sms/nope", None), ("PUT", "/1.0/sms/nope", {"callBack": ""}),
        ("POST", "/1.0/sms/nope/credits", {"amount": 1}), ("GET", "/1.0/sms/nope/ledger", None),
        ("GET", "/1.0/sms/nope/senders", None), ("POST", "/1.0/sms/nope/senders",
                                                 {"sender": "X1"}),
        ("GET", "/1.0/sms/nope/senders/X1", None), ("DELETE", "/1.0/sms/nope/senders/X1", None),
        ("GET", "/1.0/sms/nope/users", None), ("POST", "/1.0/sms/nope/users",
                                               {"login": "bob", "password": "abcd1234"}),
        ("GET", "/1.0/sms/nope/users/bob", None), ("PUT", "/1.0/sms/nope/users/bob", {}),
        ("DELETE", "/1.0/sms/nope/users/bob", None),
        ("GET", "/1.0/sms/nope/users/bob/outgoing", None),
        ("GET", "/1.0/sms/nope/users/bob/outgoing/1", None),
    ]:
        assert_error(await call(harness, method, path, body), 404)


async def test_account_update(harness: Harness) -> None:
    answer = await call(harness, "PUT", BASE, {"callBack": "https://example.org/dlr",
                                               "stopClause": "STOP 12345"})
    assert answer.status == 200
    assert answer.body["callBack"] == "https://example.org/dlr"
    assert answer.body["stopClause"] == "STOP 12345"
    # null restores the server's default clause; "" removes the callback.
    answer = await call(harness, "PUT", BASE, {"callBack": "", "stopClause": None})
    assert answer.body["callBack"] == ""
    assert answer.body["stopClause"] == "STOP 36111"
    assert (await call(harness, "PUT", BASE, {})).status == 200


@pytest.mark.parametrize("body,field", [
    ({"callBack": "ftp://example.org", "stopClause": "STOP 1"}, "callBack"),
    ({"callBack": 12, "stopClause": "STOP 1"}, "callBack"),
    ({"stopClause": "x" * 41, "callBack": "https://example.org/"}, "stopClause"),
    ({"stopClause": "two\nlines", "callBack": "https://example.org/"}, "stopClause"),
    ({"stopClause": 5}, "stopClause"),
    ({"name": "renamed"}, "name"),
    ({"creditsLeft": 1_000_000}, "creditsLeft"),
])
async def test_account_update_half_invalid_changes_nothing(harness: Harness, body: Any,
                                                           field: str) -> None:
    before = await harness.gateway.store.get_account(ACCOUNT)
    assert_error(await call(harness, "PUT", BASE, body), 400, field)
    assert await harness.gateway.store.get_account(ACCOUNT) == before


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:99999/dlr",   # no such port: every callback would die at once
    "http://[::1/dlr",              # was a 500
    "http://exa mple.org/dlr",
    "http://" + "a" * 64 + ".example.org/",
    "http://host.example:0/dlr",
])
async def test_a_callback_url_no_callback_could_reach_is_refused(harness: Harness,
                                                                url: str) -> None:
    for path in (BASE, USER):
        answer = await call(harness, "PUT", path, {"callBack": url})
        assert_error(answer, 400, "callBack")
        assert url not in json.dumps(answer.body)  # a URL may carry a password
    assert (await harness.gateway.store.get_account(ACCOUNT)).callback_url is None
    assert (await harness.gateway.store.get_user(ACCOUNT, LOGIN)).callback_url is None
    reachable = "http://user:pw@[::1]:8080/dlr?key=1"
    assert (await call(harness, "PUT", USER, {"callBack": reachable})).status == 200


async def test_credit_top_up_writes_the_ledger(harness: Harness) -> None:
    answer = await call(harness, "POST", f"{BASE}/credits", {"amount": 25.5})
    assert answer.status == 200
    assert answer.body["creditsLeft"] == 1025.5
    ledger = (await call(harness, "GET", f"{BASE}/ledger")).body
    assert ledger[-1]["kind"] == "purchase"
    assert ledger[-1]["amount"] == 25.5
    assert (ledger[-1]["from"], ledger[-1]["to"]) == ("outside", "account")
    ledger_identity(await harness.gateway.store.ledger_totals())


@pytest.mark.parametrize("body,field", [
    ({}, "amount"), ({"amount": 0}, "amount"), ({"amount": -5}, "amount"),
    ({"amount": "x"}, "amount"), ({"amount": "5"}, "amount"), ({"amount": 0.001}, "amount"),
    ({"amount": None}, "amount"),
    ({"amount": 5, "note": "x"}, "note"),
])
async def test_credit_invalid(harness: Harness, body: Any, field: str) -> None:
    assert_error(await call(harness, "POST", f"{BASE}/credits", body), 400, field)
    assert await harness.balance() == 100_000


# -- senders ------------------------------------------------------------------------------

async def test_senders(harness: Harness) -> None:
    assert (await call(harness, "GET", f"{BASE}/senders")).body == [SENDER]
    added = await call(harness, "POST", f"{BASE}/senders", {"sender": " Shop & Co "})
    assert added.status == 201
    assert added.body == {"sender": "Shop & Co"}
    assert added.headers["Location"] == f"{BASE}/senders/Shop%20%26%20Co"
    assert (await call(harness, "GET", added.headers["Location"])).body == {
        "sender": "Shop & Co"}
    assert (await call(harness, "GET", f"{BASE}/senders")).body == [SENDER, "Shop & Co"]
    number = await call(harness, "POST", f"{BASE}/senders", {"sender": "+33612345678"})
    assert number.status == 201
    assert (await call(harness, "DELETE", f"{BASE}/senders/%2B33612345678")).status == 204
    deleted = await call(harness, "DELETE", added.headers["Location"])
    assert deleted.status == 204 and deleted.text == ""
    assert (await call(harness, "GET", f"{BASE}/senders")).body == [SENDER]


async def test_sender_errors(harness: Harness) -> None:
    assert_error(await call(harness, "POST", f"{BASE}/senders", {"sender": SENDER}), 409)
    for bad in ("", "way too long sender", 12345, None, ["ACME"], "12"):
        assert_error(await call(harness, "POST", f"{BASE}/senders", {"sender": bad}), 400,
                     "sender")
    assert_error(await call(harness, "POST", f"{BASE}/senders", {}), 400, "sender")
    assert_error(await call(harness, "GET", f"{BASE}/senders/NOPE"), 404)
    assert_error(await call(harness, "DELETE", f"{BASE}/senders/NOPE"), 404)
    assert (await call(harness, "GET", f"{BASE}/senders")).body == [SENDER]


# -- users --------------------------------------------------------------------------------

async def test_passwords_are_hashed_off_the_event_loop(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rotating one user's password through the admin API ran scrypt on the event loop: sends
    fell from 10,841 to 1,362 per 8 s while it ran. Creating a user and changing a password
    now hash in a thread."""
    loop_thread = threading.get_ident()
    threads: list[int] = []
    hash_password = passwords.hash_password

    def recording(password: str, *, n: int | None = None) -> str:
        threads.append(threading.get_ident())
        return hash_password(password, n=n)

    monkeypatch.setattr(passwords, "hash_password", recording)
    created = await call(harness, "POST", f"{BASE}/users",
                         {"login": "bob", "password": "Passw0rdX"})
    assert created.status == 201, created.text
    assert (await call(harness, "PUT", USER, {"password": "Rotated123"})).status == 200
    # An invalid change costs no hash at all.
    assert (await call(harness, "PUT", USER, {"password": "Rotated124",
                                              "callBack": "nope"})).status == 400
    assert len(threads) == 2 and loop_thread not in threads
    _, body = await harness.send(password="Rotated123")
    assert body.startswith("OK"), body


async def test_user_churn_on_one_account_leaves_another_accounts_sends_alone(
        harness: Harness) -> None:
    """Deleting and creating again a user of one account bumped one settings version for the
    whole store: every other account's sends were refused as stale at their commit, checked
    again, and gave 503 after three in a row. Now a change makes only its account's sends
    check again."""
    await harness.manage.create_account("sms-churn-1", 0)
    await harness.manage.create_user("sms-churn-1", "carol", "Carol1234")
    store = harness.gateway.store
    account_id = (await store.get_account(ACCOUNT)).id
    stale: list[int] = []
    commit_sends = store.commit_sends

    async def watching(orders: Any, *, at: float) -> Any:
        outcomes = await commit_sends(orders, at=at)
        stale.extend(order.account_id for order, outcome in zip(orders, outcomes, strict=True)
                     if outcome.reason == "stale")
        return outcomes

    store.commit_sends = watching  # type: ignore[method-assign]
    churn_user = "/1.0/sms/sms-churn-1/users"

    async def churn() -> None:
        for _ in range(20):
            assert (await call(harness, "DELETE", f"{churn_user}/carol")).status == 204
            assert (await call(harness, "POST", churn_user,
                               {"login": "carol", "password": "Carol1234"})).status == 201

    async def sends() -> list[str]:
        answers = []
        for _ in range(8):
            batch = await asyncio.gather(*(harness.send() for _ in range(5)))
            answers += [body for _, body in batch]
        return answers

    _, answers = await asyncio.gather(churn(), sends())
    assert all(body.startswith("OK") for body in answers), answers
    assert account_id not in stale, stale


async def test_user_list_create_get(harness: Harness) -> None:
    assert (await call(harness, "GET", f"{BASE}/users")).body == [LOGIN]
    created = await call(harness, "POST", f"{BASE}/users",
                         {"login": "bob", "password": "Passw0rdX"})
    assert created.status == 201
    assert created.headers["Location"] == f"{BASE}/users/bob"
    expected = {
        "login": "bob",
        "quotaInformations": {"quotaStatus": "inactive", "quotaLeft": 0},
        "alertThresholdInformations": {"alertThreshold": None, "support": "mail",
                                       "alertEmail": "", "alertNumber": ""},
        "ipRestrictions": [],
        "callBack": "",
    }
    assert created.body == expected
    assert (await call(harness, "GET", f"{BASE}/users/bob")).body == expected
    assert (await call(harness, "GET", f"{BASE}/users")).body == [LOGIN, "bob"]
    # The new user can send with its password.
    _, body = await harness.send(login="bob", password="Passw0rdX")
    assert body.startswith("OK"), body


@pytest.mark.parametrize("body,field,status", [
    ({"login": LOGIN, "password": "abcd1234"}, None, 409),
    ({"login": "bob", "password": "short1"}, "password", 400),
    ({"login": "bob", "password": "with space 1"}, "password", 400),
    ({"login": "bob", "password": 12345678}, "password", 400),
    ({"login": "bob"}, "password", 400),
    ({"password": "abcd1234"}, "login", 400),
    ({"login": "b o b", "password": "abcd1234"}, "login", 400),
    ({"login": 7, "password": "abcd1234"}, "login", 400),
    ({"login": "bob", "password": "abcd1234", "quota": 5}, "quota", 400),
])
async def test_user_create_invalid(harness: Harness, body: Any, field: str | None,
                                   status: int) -> None:
    assert_error(await call(harness, "POST", f"{BASE}/users", body), status, field)
    assert await harness.gateway.store.list_users(ACCOUNT) == [LOGIN]


async def test_user_unknown_is_404(harness: Harness) -> None:
    for method, body in [("GET", None), ("PUT", {"callBack": ""}), ("DELETE", None)]:
        assert_error(await call(harness, method, f"{BASE}/users/nobody", body), 404)
    assert_error(await call(harness, "GET", f"{BASE}/users/nobody/outgoing"), 404)


async def test_user_update_every_field(harness: Harness) -> None:
    answer = await call(harness, "PUT", USER, {
        "quotaInformations": {"quotaStatus": "active", "quotaLeft": 150},
        "alertThresholdInformations": {"alertThreshold": 20, "support": "both",
                                       "alertEmail": "ops@example.org",
                                       "alertNumber": "0033612345678"},
        "ipRestrictions": ["127.0.0.1", "::1"],
        "callBack": "https://example.org/dlr",
    })
    assert answer.status == 200, answer.text
    assert answer.body == {
        "login": LOGIN,
        "quotaInformations": {"quotaStatus": "active", "quotaLeft": 150},
        "alertThresholdInformations": {"alertThreshold": 20, "support": "both",
                                       "alertEmail": "ops@example.org",
                                       "alertNumber": "+33612345678"},
        "ipRestrictions": ["127.0.0.1", "::1"],
        "callBack": "https://example.org/dlr",
    }
    assert (await call(harness, "GET", USER)).body == answer.body
    # What GET returns can be PUT back unchanged.
    again = await call(harness, "PUT", USER, answer.body)
    assert again.status == 200 and again.body == answer.body
    # Clearing.
    cleared = await call(harness, "PUT", USER, {
        "alertThresholdInformations": {"alertThreshold": None, "alertEmail": "",
                                       "alertNumber": None},
        "ipRestrictions": [], "callBack": None,
    })
    assert cleared.body["alertThresholdInformations"] == {
        "alertThreshold": None, "support": "both", "alertEmail": "", "alertNumber": ""}
    assert cleared.body["ipRestrictions"] == [] and cleared.body["callBack"] == ""


async def test_quota_moves_keep_the_ledger_identity(harness: Harness) -> None:
    store = harness.gateway.store

    async def quota(body: Any) -> Answer:
        answer = await call(harness, "PUT", USER, {"quotaInformations": body})
        ledger_identity(await store.ledger_totals())
        return answer

    assert (await quota({"quotaStatus": "active", "quotaLeft": 150})).status == 200
    assert (await harness.balance(), await harness.quota()) == (85_000, 15_000)
    # Changing N moves the difference, either way.
    await quota({"quotaLeft": 400})
    assert (await harness.balance(), await harness.quota()) == (60_000, 40_000)
    await quota({"quotaLeft": 100.5})
    assert (await harness.balance(), await harness.quota()) == (89_950, 10_050)
    # Sends draw from the quota.
    await harness.send()
    assert await harness.quota() == 10_050 - 100
    ledger_identity(await store.ledger_totals())
    # "active" alone keeps an active quota as it is.
    await quota({"quotaStatus": "active"})
    assert await harness.quota() == 9_950
    # Deactivating returns what is left.
    answer = await quota({"quotaStatus": "inactive", "quotaLeft": 0})
    assert answer.body["quotaInformations"] == {"quotaStatus": "inactive", "quotaLeft": 0}
    assert await harness.balance() == 99_900
    # "active" alone on an inactive quota activates it at 0.
    answer = await quota({"quotaStatus": "active"})
    assert answer.body["quotaInformations"] == {"quotaStatus": "active", "quotaLeft": 0}
    # More than the account holds is refused, and nothing moves, nor changes alongside.
    answer = await quota({"quotaLeft": 5000})
    assert_error(answer, 409, "quotaLeft")
    assert (await harness.balance(), await harness.quota()) == (99_900, 0)
    before = await store.get_user(ACCOUNT, LOGIN)
    answer = await call(harness, "PUT", USER, {"quotaInformations": {"quotaLeft": 1000.01},
                                               "callBack": "https://example.org/x",
                                               "password": "Another1pass"})
    assert_error(answer, 409, "quotaLeft")
    assert await store.get_user(ACCOUNT, LOGIN) == before
    account = (await call(harness, "GET", BASE)).body
    assert account["creditsLeft"] == 999 and account["userQuantityWithQuota"] == 1
    ledger = (await call(harness, "GET", f"{BASE}/ledger")).body
    quota_moves = [e for e in ledger if e["kind"] == "quota"]
    assert [(e["from"], e["to"], e["amount"]) for e in quota_moves] == [
        ("account", "quota", 150), ("account", "quota", 250), ("quota", "account", 299.5),
        ("quota", "account", 99.5)]
    assert all(e["login"] == LOGIN for e in quota_moves)


@pytest.mark.parametrize("bad,field", [
    ({"alertThresholdInformations": {"alertEmail": "not-an-email"}}, "alertEmail"),
    ({"alertThresholdInformations": {"alertNumber": "0612345678"}}, "alertNumber"),
    ({"alertThresholdInformations": {"alertNumber": 33612345678}}, "alertNumber"),
    ({"alertThresholdInformations": {"support": "pigeon"}}, "support"),
    ({"alertThresholdInformations": {"alertThreshold": [1]}}, "alertThreshold"),
    ({"alertThresholdInformations": {"alertThreshold": 5, "support": "sms"}}, "alertNumber"),
    ({"alertThresholdInformations": {"colour": "red"}}, "alertThresholdInformations.colour"),
    ({"alertThresholdInformations": "high"}, "alertThresholdInformations"),
    ({"ipRestrictions": "127.0.0.1"}, "ipRestrictions"),
    ({"ipRestrictions": ["127.0.0.1"] + [f"10.0.0.{i}" for i in range(1, 6)]},
     "ipRestrictions"),
    ({"ipRestrictions": ["not an ip"]}, "ipRestrictions"),
    ({"ipRestrictions": [1]}, "ipRestrictions"),
    # Never a caller, whatever server.allow_private_ips says (the harness allows private).
    ({"ipRestrictions": ["224.0.0.1"]}, "ipRestrictions"),
    ({"ipRestrictions": ["ff02::1"]}, "ipRestrictions"),
    ({"ipRestrictions": ["fe80::1%eth0"]}, "ipRestrictions"),
    ({"callBack": "javascript:alert(1)"}, "callBack"),
    ({"callBack": ["https://example.org"]}, "callBack"),
    ({"password": "short"}, "password"),
    ({"password": None}, "password"),
    ({"quotaInformations": {"quotaStatus": "maybe"}}, "quotaStatus"),
    ({"quotaInformations": {"quotaLeft": "plenty"}}, "quotaLeft"),
    ({"quotaInformations": {"quotaLeft": "100"}}, "quotaLeft"),
    ({"alertThresholdInformations": {"alertThreshold": "5"}}, "alertThreshold"),
    ({"quotaInformations": {"quotaLeft": -1}}, "quotaLeft"),
    ({"quotaInformations": {"quotaLeft": None}}, "quotaLeft"),
    ({"quotaInformations": {"quotaStatus": "inactive", "quotaLeft": 5}}, "quotaLeft"),
    ({"quotaInformations": {"quotaLeft": 1, "extra": 1}}, "quotaInformations.extra"),
    ({"quotaInformations": [150]}, "quotaInformations"),
    ({"login": "someone-else"}, "login"),
    ({"Password": "abcd12345"}, "Password"),
])
async def test_user_update_half_invalid_changes_nothing(harness: Harness, bad: Any,
                                                        field: str) -> None:
    store = harness.gateway.store
    before_user = await store.get_user(ACCOUNT, LOGIN)
    before_totals = await store.ledger_totals()
    before_ledger = await store.list_ledger(ACCOUNT, limit=1000)
    # A valid quota move, a valid password and a valid callback ride along with the bad field.
    body = {"quotaInformations": {"quotaStatus": "active", "quotaLeft": 300},
            "password": "NewPassw0rd", "callBack": "https://example.org/cb", **bad}
    assert_error(await call(harness, "PUT", USER, body), 400, field)
    assert await store.get_user(ACCOUNT, LOGIN) == before_user
    assert await store.ledger_totals() == before_totals
    assert await store.list_ledger(ACCOUNT, limit=1000) == before_ledger
    _, text = await harness.send()
    assert text.startswith("OK"), "the old password must still work"


async def test_password_change_through_put(harness: Harness) -> None:
    answer = await call(harness, "PUT", USER, {"password": "Brand9New"})
    assert answer.status == 200
    assert "password" not in answer.body
    _, old = await harness.send()
    assert old.startswith("KO\n401")
    _, new = await harness.send(password="Brand9New")
    assert new.startswith("OK")


async def test_delete_user_returns_its_quota(harness: Harness) -> None:
    await call(harness, "PUT", USER, {"quotaInformations": {"quotaLeft": 300}})
    await harness.send()
    assert await harness.balance() == 70_000
    answer = await call(harness, "DELETE", USER)
    assert answer.status == 204 and answer.text == ""
    assert await harness.balance() == 70_000 + 29_900
    assert (await call(harness, "GET", f"{BASE}/users")).body == []
    assert_error(await call(harness, "GET", USER), 404)
    ledger_identity(await harness.gateway.store.ledger_totals())


# -- messages -----------------------------------------------------------------------------

async def test_outgoing_list_filters_and_view(make_harness: Any) -> None:
    clock = ManualClock(start=1_790_000_000.0)   # 2026-09-21T14:13:20Z
    h: Harness = await make_harness(clock=clock)
    await h.manage.add_sender(ACCOUNT, "SHOP")
    ids = sent_ids((await h.send(tag="first"))[1])
    clock.advance(3600)
    ids += sent_ids((await h.send(to="+33612345678,0033698765432", tag="second",
                                  **{"from": "SHOP"}))[1])
    clock.advance(3600)
    ids += sent_ids((await h.send(message="Cześć " * 15, tag="third"))[1])
    assert len(ids) == 4

    async def listed(**params: str) -> list[int]:
        answer = await call(h, "GET", f"{USER}/outgoing", params=params)
        assert answer.status == 200, answer.text
        return answer.body

    assert await listed() == sorted(ids, reverse=True)
    assert await listed(tag="second") == [ids[2], ids[1]]
    assert await listed(sender="SHOP") == [ids[2], ids[1]]
    assert await listed(receiver="+33698765432") == [ids[2]]
    assert await listed(receiver="0033698765432") == [ids[2]]
    # An unencoded "+" arrives as a space.
    raw = await call(h, "GET", f"{USER}/outgoing?receiver=+33698765432")
    assert raw.body == [ids[2]]
    assert await listed(**{"creationDatetime.from": "2026-09-21T15:13:20Z"}) == [
        ids[3], ids[2], ids[1]]
    assert await listed(**{"creationDatetime.to": "2026-09-21T14:13:20Z"}) == [ids[0]]
    assert await listed(**{"creationDatetime.from": "2026-09-21T17:13:20+02:00",
                           "creationDatetime.to": "2026-09-21T15:13:20"}) == [ids[2], ids[1]]
    message = await h.gateway.store.get_message(ids[0])
    if message.ptt is not None:
        assert await listed(ptt=str(message.ptt)) != []
    assert await listed(ptt="9999") == []
    assert await listed(ptt="2147483647") == []
    # Past 32 bits (PostgreSQL's INTEGER column answered 500): refused, named.
    too_big = await call(h, "GET", f"{USER}/outgoing", params={"ptt": "2147483648"})
    assert too_big.status == 400 and "ptt" in str(too_big.body), too_big.text

    view = (await call(h, "GET", f"{USER}/outgoing/{ids[3]}")).body
    assert view["id"] == ids[3]
    assert view["creationDatetime"] == "2026-09-21T16:13:20Z"
    assert view["message"].startswith("Cześć Cześć")
    assert view["messageLength"] == len(view["message"])
    assert view["numberOfSms"] == 2          # UCS-2, 90 characters plus the STOP clause
    assert view["credits"] == 2
    assert view["receiver"] == "+33612345678" and view["sender"] == SENDER
    assert view["tag"] == "third"
    assert set(view) == {"id", "creationDatetime", "credits", "deliveredAt",
                         "deliveryReceipt", "message", "messageLength", "numberOfSms", "ptt",
                         "receiver", "sender", "tag", "sentAt", "history"}
    assert view["history"][0]["date"] == "2026-09-21T16:13:20Z"


async def test_outgoing_state_history(make_harness: Any) -> None:
    clock = ManualClock(start=1_790_000_000.0)
    h: Harness = await make_harness(clock=clock)
    [message_id] = sent_ids((await h.send())[1])
    store = h.gateway.store
    await store.mark_sent([message_id], at=clock.now() + 1)
    await store.apply_updates([StateUpdate.from_ptt(message_id, 4, clock.now() + 2)])
    message = await store.get_message(message_id)
    events = await store.message_events(message_id)
    view = (await call(h, "GET", f"{USER}/outgoing/{message_id}")).body
    # Compared with the store rather than hard-coded: a delivery service may be running too.
    assert view["ptt"] == message.ptt
    assert view["deliveryReceipt"] == message.dlr
    assert view["sentAt"] == admin_api.iso(message.sent_at)
    assert view["deliveredAt"] == admin_api.iso(message.delivered_at)
    assert view["history"] == [{"date": admin_api.iso(e.at), "ptt": e.ptt, "dlr": e.dlr,
                                "description": e.note} for e in events]
    if message.ptt == 4:
        assert view["deliveryReceipt"] == 1
        assert view["deliveredAt"] is not None
        assert view["history"][-1]["ptt"] == 4


async def test_outgoing_pagination(harness: Harness) -> None:
    ids: list[int] = []
    for _ in range(5):
        ids += sent_ids((await harness.send())[1])
    newest_first = sorted(ids, reverse=True)
    seen: list[int] = []
    first = await call(harness, "GET", f"{USER}/outgoing", params={"limit": "2"})
    assert first.body == newest_first[:2]
    assert first.headers["X-Next-Cursor"] == str(newest_first[1])
    seen += first.body
    link = first.headers["Link"]
    while True:
        assert link.endswith('>; rel="next"')
        path = link[1:link.index(">")]
        answer = await call(harness, "GET", path)
        seen += answer.body
        if "Link" not in answer.headers:
            assert "X-Next-Cursor" not in answer.headers
            break
        link = answer.headers["Link"]
    assert seen == newest_first
    # Exactly one full page has no next page.
    exact = await call(harness, "GET", f"{USER}/outgoing", params={"limit": "5"})
    assert exact.body == newest_first and "X-Next-Cursor" not in exact.headers


@pytest.mark.parametrize("params,field", [
    ({"limit": "0"}, "limit"), ({"limit": "1001"}, "limit"), ({"limit": "ten"}, "limit"),
    ({"before": "x"}, "before"), ({"before": "0"}, "before"),
    ({"before": "99999999999999999999"}, "before"),
    ({"ptt": "four"}, "ptt"), ({"receiver": "0612345678"}, "receiver"),
    ({"creationDatetime.from": "yesterday"}, "creationDatetime.from"),
    ({"creationDatetime.to": "2026-13-01T00:00:00Z"}, "creationDatetime.to"),
    ({"page": "2"}, "page"),
])
async def test_outgoing_invalid_parameters(harness: Harness, params: Any, field: str) -> None:
    assert_error(await call(harness, "GET", f"{USER}/outgoing", params=params), 400, field)


async def test_outgoing_repeated_parameter(harness: Harness) -> None:
    answer = await call(harness, "GET", f"{USER}/outgoing?tag=a&tag=b")
    assert_error(answer, 400, "tag")


async def test_outgoing_message_of_someone_else_is_404(harness: Harness) -> None:
    [mine] = sent_ids((await harness.send())[1])
    await harness.manage.create_user(ACCOUNT, "bob", "abcd1234")
    [theirs] = sent_ids((await harness.send(login="bob", password="abcd1234"))[1])
    assert (await call(harness, "GET", f"{USER}/outgoing/{mine}")).status == 200
    assert_error(await call(harness, "GET", f"{USER}/outgoing/{theirs}"), 404)
    assert (await call(harness, "GET", f"{USER}/outgoing")).body == [mine]
    assert_error(await call(harness, "GET", f"{USER}/outgoing/999999"), 404)
    assert_error(await call(harness, "GET", f"{USER}/outgoing/abc"), 400, "id")
    assert_error(await call(harness, "GET", f"{USER}/outgoing/0"), 400, "id")
    assert_error(await call(harness, "GET", f"{USER}/outgoing/{'9' * 30}"), 400, "id")
    # Another account's message, even under the same login.
    await harness.manage.create_account("sms-other-2", 10)
    await harness.manage.create_user("sms-other-2", LOGIN, PASSWORD)
    assert_error(await call(harness, "GET", f"/1.0/sms/sms-other-2/users/{LOGIN}/outgoing/"
                                            f"{mine}"), 404)


# -- ledger -------------------------------------------------------------------------------

async def test_ledger_pagination_and_view(make_harness: Any) -> None:
    clock = ManualClock(start=1_790_000_000.0)
    h: Harness = await make_harness(clock=clock)
    for amount in (1, 2, 3):
        await h.manage.credit_account(ACCOUNT, amount)
    await h.send()
    everything = (await call(h, "GET", f"{BASE}/ledger")).body
    assert everything[0] == {"id": everything[0]["id"], "date": "2026-09-21T14:13:20Z",
                             "kind": "purchase", "login": None, "from": "outside",
                             "to": "account", "amount": 1000, "reference": "initial credits"}
    assert [e["amount"] for e in everything[1:4]] == [1, 2, 3]
    assert everything[-1]["to"] == "spent" and everything[-1]["login"] == LOGIN
    pages: list[Any] = []
    after = None
    while True:
        params = {"limit": "2"} if after is None else {"limit": "2", "after": after}
        answer = await call(h, "GET", f"{BASE}/ledger", params=params)
        pages += answer.body
        after = answer.headers.get("X-Next-Cursor")
        if after is None:
            break
    assert pages == everything
    for params, field in [({"limit": "0"}, "limit"), ({"after": "-1"}, "after"),
                          ({"after": "x"}, "after"), ({"before": "1"}, "before")]:
        assert_error(await call(h, "GET", f"{BASE}/ledger", params=params), 400, field)


# -- failures are JSON, never a stack trace -----------------------------------------------

async def test_unexpected_error_is_500_json_and_logged(harness: Harness,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    async def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(harness.gateway.store, "list_accounts", broken)
    answer = await call(harness, "GET", "/1.0/sms")
    assert answer.status == 500
    assert answer.body == {"message": "internal error"}
    assert "boom" not in answer.text and "Traceback" not in answer.text


async def test_store_unavailable_is_503(harness: Harness,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async def down(*args: Any, **kwargs: Any) -> None:
        raise StoreUnavailable("disk full")

    monkeypatch.setattr(harness.gateway.store, "get_account", down)
    answer = await call(harness, "GET", BASE)
    assert_error(answer, 503)
    assert answer.headers["Retry-After"]


async def test_password_never_in_responses_or_logs(harness: Harness,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    stream = io.StringIO()
    before = structlog.get_config()
    logs.configure("json", "debug", stream=stream)
    try:
        secret = "Sup3rSecretPw"
        texts: list[str] = []

        async def record(*args: Any, **kwargs: Any) -> Answer:
            answer = await call(harness, *args, **kwargs)
            texts.append(answer.text + "".join(f"{k}:{v}" for k, v in answer.headers.items()))
            return answer

        await record("POST", f"{BASE}/users", {"login": "carol", "password": secret})
        await record("POST", f"{BASE}/users", {"login": "carol", "password": secret})  # 409
        await record("GET", f"{BASE}/users/carol")
        await record("PUT", f"{BASE}/users/carol", {"password": secret + "2"})
        await record("PUT", f"{BASE}/users/carol", {"password": secret, "callBack": "nope"})
        await record("PUT", f"{BASE}/users/carol", {"password": secret + "!"})
        await record("POST", f"{BASE}/users", {"login": "dave", "password": secret + " x"})
        await record("PUT", f"{BASE}/users/carol", {"password": secret, "pw": secret})

        async def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("boom")

        monkeypatch.setattr(harness.gateway.store, "update_user", broken)
        assert (await record("PUT", f"{BASE}/users/carol", {"password": secret})).status == 500
    finally:
        structlog.configure(**before)
    logged = stream.getvalue() + caplog.text
    assert "admin_request" in logged and "admin_internal_error" in logged
    for text in [*texts, logged]:
        assert secret not in text
    assert TOKEN not in logged


# -- the admin API on its own listener ----------------------------------------------------

async def test_split_listener(make_harness: Any, config: Config, aiohttp_client: Any) -> None:
    config = config.replace({"admin.host": "127.0.0.1", "admin.port": 0})
    h: Harness = await make_harness(cfg=config)
    # The public listener keeps the send URL and the public reference data only.
    assert_error(await call(h, "GET", "/1.0/sms"), 404)
    assert_error(await call(h, "GET", "/1.0/openapi.json"), 404)
    assert (await call(h, "GET", "/1.0/sms/ptts?ptt=4", headers={})).status == 200
    assert (await h.send())[1].startswith("OK")

    admin = await aiohttp_client(admin_api.create_admin_app(h.gateway))
    resp = await admin.get("/1.0/sms", headers=AUTH)
    assert resp.status == 200 and await resp.json() == [ACCOUNT]
    assert (await admin.get("/1.0/sms")).status == 401
    assert (await admin.get("/1.0/sms/ptts?ptt=4")).status == 200
    assert (await admin.get("/cgi-bin/sms/http2sms.cgi")).status == 404


async def test_start_listener_serves_on_its_own_port(make_harness: Any,
                                                     config: Config) -> None:
    config = config.replace({"admin.host": "127.0.0.1", "admin.port": 0})
    h: Harness = await make_harness(cfg=config)
    runner = await server.start_admin_listener(h.gateway)
    assert runner is not None
    try:
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://{host}:{port}/1.0/sms/{ACCOUNT}",
                                   headers=AUTH) as resp:
                assert resp.status == 200
                assert (await resp.json())["name"] == ACCOUNT
            async with session.get(f"http://{host}:{port}/1.0/sms") as resp:
                assert resp.status == 401
    finally:
        await runner.cleanup()


async def test_no_separate_listener_unless_configured(make_harness: Any,
                                                      config: Config) -> None:
    h: Harness = await make_harness()
    assert await server.start_admin_listener(h.gateway) is None
    # With admin.host but no admin.token the listener runs (tokens made with the CLI may
    # turn the API on at any time); until then it answers that the API is disabled.
    h.gateway.config = config.replace({"admin.host": "127.0.0.1", "admin.token": "",
                                       "admin.port": 0})
    h.gateway.admin_auth.bootstrap = ""
    runner = await server.start_admin_listener(h.gateway)
    assert runner is not None
    try:
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://{host}:{port}/1.0/sms") as resp:
            assert resp.status == 404
            assert "disabled" in (await resp.json())["message"]
    finally:
        await runner.cleanup()


def test_routes_table_matches_the_app(config: Config) -> None:
    app = webapp.create_app(gateway_app.build(config))
    registered = {(r.method, r.resource.canonical) for r in app.router.routes()
                  if r.resource is not None and r.resource.canonical.startswith("/1.0")}
    assert registered == {(m, "/1.0" + p) for m, p, _ in admin_api.ROUTES}
