"""The web console on the real app over real HTTP, on both backends: logging in, the
session cookie and headers, CSRF, another account's pages, the brute-force guard, and the
forms refusing what the service refuses with its message."""

from __future__ import annotations

import asyncio
import csv
import io
import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
from aiohttp import web

from gateway import passwords
from gateway.clock import ManualClock
from gateway.config import Config
from gateway.console import views
from gateway.console.views import CSP
from gateway.webapp import create_admin_listener_app
from tests.cli_in_process import invoke
from tests.conftest import ACCOUNT, LOGIN, PASSWORD, SENDER, Harness

OWNER = "owner@example.com"
OWNER_PASSWORD = "correct horse battery"
OTHER = "sms-other-1"
_CSRF = re.compile(r'name="_csrf" value="([^"]+)"')


class Console:
    """A browser's view of the console: its cookies, the CSRF token of the last page."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.csrf = ""

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str]:
        resp = await self.h.client.get(path, allow_redirects=True, **kwargs)
        text = await resp.text()
        found = _CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return resp.status, text

    async def post(self, path: str, data: dict[str, Any] | list[tuple[str, str]], *,
                   csrf: bool = True) -> tuple[int, str]:
        items = list(data.items()) if isinstance(data, dict) else list(data)
        if csrf:
            items.append(("_csrf", self.csrf))
        resp = await self.h.client.post(path, data=items, allow_redirects=True)
        text = await resp.text()
        found = _CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return resp.status, text

    async def login(self, email: str = OWNER, password: str = OWNER_PASSWORD) -> tuple[int, str]:
        await self.get("/console/login")
        return await self.post("/console/login", {"email": email, "password": password})


async def owner(h: Harness, *, operator: bool = False) -> Console:
    await h.manage.create_console_user(OWNER, OWNER_PASSWORD, operator=operator,
                                       accounts=[] if operator else [ACCOUNT])
    console = Console(h)
    status, text = await console.login()
    assert status == 200 and "Log out" in text, text
    return console


async def test_login_sets_a_strict_http_only_cookie_and_pages_have_the_headers(
        harness: Harness) -> None:
    await harness.manage.create_console_user(OWNER, OWNER_PASSWORD, operator=False,
                                             accounts=[ACCOUNT])
    resp = await harness.client.get("/", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/console/"
    resp = await harness.client.get("/console/", allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"].startswith("/console/login")
    resp = await harness.client.get("/console/login")
    token = _CSRF.search(await resp.text())
    assert token is not None
    resp = await harness.client.post("/console/login", allow_redirects=False, data={
        "email": "Owner@Example.com", "password": OWNER_PASSWORD, "_csrf": token.group(1)})
    assert resp.status == 303
    cookie = resp.headers.getall("Set-Cookie")
    session = next(c for c in cookie if c.startswith("h2s_console="))
    assert "HttpOnly" in session and "SameSite=Strict" in session
    assert "Path=/console/" in session
    assert "Secure" not in session  # plain HTTP here; Secure under TLS (request.secure)
    resp = await harness.client.get(f"/console/a/{ACCOUNT}/")
    assert resp.status == 200
    assert resp.headers["Content-Security-Policy"] == CSP
    assert "unsafe-inline" not in CSP
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["Cache-Control"] == "no-store"
    text = await resp.text()
    assert "Credits left" in text and "<svg" in text and "<script>" not in text
    assert 'style="' not in text  # the CSP refuses inline styles: there are none


async def test_the_root_redirect_leaves_other_requests_to_the_root_as_they_were(
        harness: Harness) -> None:
    resp = await harness.client.get("/?account=x", allow_redirects=False)
    assert resp.status == 404
    resp = await harness.client.post("/", data={"account": "x"}, allow_redirects=False)
    assert resp.status == 404
    status, body = await harness.send()
    assert status == 200 and body.startswith("OK"), body


async def test_an_api_user_s_password_does_not_open_the_console(harness: Harness) -> None:
    console = Console(harness)
    status, text = await console.login(LOGIN, PASSWORD)
    assert status == 401 and "Wrong e-mail or password" in text


async def test_repeated_wrong_passwords_lock_the_login_even_with_the_right_one(
        make_harness: Any, config: Config) -> None:
    h: Harness = await make_harness(cfg=config.replace({"security.max_failures": 3}))
    await h.manage.create_console_user(OWNER, OWNER_PASSWORD, operator=False,
                                       accounts=[ACCOUNT])
    console = Console(h)
    for _ in range(3):
        status, text = await console.login(OWNER, "wrong password!")
        assert status == 401
    status, text = await console.login()
    assert status == 401 and "Too many failed logins" in text


async def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(
        harness: Harness) -> None:
    console = await owner(harness)
    status, text = await console.post(f"/console/a/{ACCOUNT}/users",
                                      {"login": "bob", "password": "abcd1234"}, csrf=False)
    assert status == 403 and "expired" in text
    assert await harness.gateway.store.list_users(ACCOUNT) == [LOGIN]
    status, _ = await console.post(f"/console/a/{ACCOUNT}/users",
                                   {"login": "bob", "password": "abcd1234", "_csrf": "forged"},
                                   csrf=False)
    assert status == 403
    status, _ = await console.post(f"/console/a/{ACCOUNT}/users",
                                   {"login": "bob", "password": "abcd1234"})
    assert status == 200
    assert await harness.gateway.store.list_users(ACCOUNT) == [LOGIN, "bob"]


async def test_another_account_answers_404_as_if_it_did_not_exist(harness: Harness) -> None:
    await harness.manage.create_account(OTHER, 100)
    await harness.manage.create_user(OTHER, "carol", "abcd1234")
    console = await owner(harness)
    for path in (f"/console/a/{OTHER}/", f"/console/a/{OTHER}/users",
                 f"/console/a/{OTHER}/users/carol", "/console/a/nope/users",
                 "/console/console-users"):
        status, text = await console.get(path)
        assert status == 404, path
        assert OTHER not in text.split("<main", 1)[1] or path.endswith("nope/users")
    status, _ = await console.post(f"/console/a/{OTHER}/users/carol/delete",
                                   {"confirm": "carol"})
    assert status == 404
    assert await harness.gateway.store.list_users(OTHER) == ["carol"]
    # Its messages too: an id of another account is not found.
    await harness.manage.add_sender(OTHER, "OTHR")
    _, body = await harness.send(account=OTHER, login="carol", password="abcd1234",
                                 **{"from": "OTHR"})
    other_id = re.search(r"\d+", body.split("\n", 2)[2]).group(0)  # type: ignore[union-attr]
    status, _ = await console.get(f"/console/a/{ACCOUNT}/outgoing/{other_id}")
    assert status == 404


async def test_forms_refuse_with_the_service_s_message_next_to_the_field(
        harness: Harness) -> None:
    console = await owner(harness)
    status, text = await console.post(f"/console/a/{ACCOUNT}/users",
                                      {"login": "bob", "password": "short"})
    assert status == 400
    assert 'id="f-password-error">at least 8 characters<' in text
    status, text = await console.post(f"/console/a/{ACCOUNT}/users/{LOGIN}/alert",
                                      {"alertActive": "1", "alertThreshold": "10",
                                       "support": "mail", "alertEmail": ""})
    assert status == 400 and 'id="f-alertEmail-error">needed when support is mail<' in text
    status, text = await console.post(f"/console/a/{ACCOUNT}/senders", {"sender": "x" * 20})
    assert status == 400 and "up to 11 letters and digits" in text
    status, text = await console.post(f"/console/a/{ACCOUNT}/users/{LOGIN}/quota",
                                      {"quotaStatus": "1", "quotaLeft": "5000"})
    assert status == 400 and 'id="f-quotaLeft-error"' in text


async def test_the_seeds_quota_moves_credits_from_the_account(make_harness: Any) -> None:
    h: Harness = await make_harness(credits=200)
    console = await owner(h)
    status, text = await console.post(f"/console/a/{ACCOUNT}/users/{LOGIN}/quota",
                                      {"quotaStatus": "1", "quotaLeft": "150"})
    assert status == 200
    assert "150 credits moved from the account, 50 left" in text
    assert await h.balance() == 5000 and await h.quota() == 15000
    status, text = await console.get(f"/console/a/{ACCOUNT}/")
    assert 'id="credits-left">50<' in text and 'id="credits-held">150<' in text
    status, text = await console.post(f"/console/a/{ACCOUNT}/users/{LOGIN}/quota", {})
    assert "150 credits moved back to the account, 200 left" in text


async def test_five_ip_restrictions_and_a_sixth_refused(harness: Harness) -> None:
    console = await owner(harness)
    five = [("ipRestrictions", f"203.0.113.{n}") for n in range(1, 6)]
    status, _ = await console.post(f"/console/a/{ACCOUNT}/users/{LOGIN}/restrictions", five)
    assert status == 200
    user = await harness.gateway.store.get_user(ACCOUNT, LOGIN)
    assert len(user.ip_restrictions) == 5
    status, text = await console.post(f"/console/a/{ACCOUNT}/users/{LOGIN}/restrictions",
                                      [*five, ("suggest", "203.0.113.6")])
    assert status == 400 and "at most 5 addresses" in text
    user = await harness.gateway.store.get_user(ACCOUNT, LOGIN)
    assert len(user.ip_restrictions) == 5


async def test_sending_from_the_console_uses_the_send_url_s_rules(harness: Harness) -> None:
    console = await owner(harness)
    resp = await harness.client.get(f"/console/a/{ACCOUNT}/count",
                                    params={"message": "ж" * 10,
                                            "to": "+33612345678,+33612345679"})
    count = await resp.json()
    assert count["encoding"] == "Unicode" and count["parts"] == 1
    assert count["credits"] == "2" and count["recipients"] == 2
    status, text = await console.post(f"/console/a/{ACCOUNT}/send", {
        "login": LOGIN, "from": SENDER, "to": "+33612345678", "message": "Hi"})
    assert status == 200 and 'id="sent"' in text
    status, text = await console.post(f"/console/a/{ACCOUNT}/send", {
        "login": LOGIN, "from": SENDER, "to": "0612", "message": "Hi"})
    assert status == 400 and 'id="f-to-error">Invalid to:' in text
    status, text = await console.post(f"/console/a/{ACCOUNT}/send", {
        "login": LOGIN, "from": "NOPE", "to": "+33612345678", "message": "Hi"})
    assert status == 400 and "is not declared on this account" in text
    status, text = await console.get(f"/console/a/{ACCOUNT}/outgoing?receiver=%2B33612345678")
    assert status == 200 and text.count("/outgoing/") >= 1
    resp = await harness.client.get(f"/console/a/{ACCOUNT}/outgoing.csv",
                                    params={"login": LOGIN})
    assert resp.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(await resp.text())))
    assert rows[0][0] == "id" and len(rows) == 2 and rows[1][-1].startswith("Hi")
    resp = await harness.client.get(f"/console/a/{ACCOUNT}/outgoing.csv",
                                    params={"ptt": "x"})
    assert resp.status == 400 and "ptt: an integer" in await resp.text()
    message_id = rows[1][0]
    status, text = await console.get(f"/console/a/{ACCOUNT}/outgoing/{message_id}")
    assert status == 200 and "History" in text and "Callback attempts" in text


async def test_the_session_ends_after_inactivity_and_at_logout(make_harness: Any) -> None:
    clock = ManualClock()
    h: Harness = await make_harness(clock=clock)
    console = await owner(h)
    clock.advance(29 * 60)
    status, text = await console.get(f"/console/a/{ACCOUNT}/users")
    assert status == 200 and "API users" in text
    clock.advance(31 * 60)
    status, text = await console.get(f"/console/a/{ACCOUNT}/users")
    assert "Log in" in text and "Log out" not in text
    await console.login()
    status, text = await console.post("/console/logout", {})
    assert "Log in" in text
    status, text = await console.get(f"/console/a/{ACCOUNT}/users")
    assert "Log out" not in text


async def test_a_session_in_use_stays_open_under_a_short_idle_time(
        make_harness: Any, config: Config) -> None:
    clock = ManualClock()
    h: Harness = await make_harness(
        clock=clock, cfg=config.replace({"console.session_idle_minutes": 0.5}))
    console = await owner(h)
    for _ in range(4):
        clock.advance(20)
        _, text = await console.get(f"/console/a/{ACCOUNT}/users")
        assert "Log out" in text
    clock.advance(31)
    _, text = await console.get(f"/console/a/{ACCOUNT}/users")
    assert "Log out" not in text


async def test_an_operator_creates_accounts_tops_them_up_and_adds_console_users(
        harness: Harness) -> None:
    console = await owner(harness, operator=True)
    status, text = await console.post("/console/accounts", {"name": OTHER, "credits": "10"})
    assert status == 200 and f"Account {OTHER} created" in text
    status, text = await console.post(f"/console/accounts/{OTHER}/credits", {"amount": "-1"})
    assert status == 400 and "must not be negative" in text
    status, text = await console.post(f"/console/accounts/{OTHER}/credits", {"amount": "5"})
    assert status == 200 and (await harness.balance(OTHER)) == 1500
    status, text = await console.get("/console/console-users")
    status, text = await console.post("/console/console-users", {
        "email": "new@example.com", "password": "short", "accounts": OTHER})
    assert status == 400 and "at least 12 characters" in text
    status, text = await console.post("/console/console-users", {
        "email": "new@example.com", "password": "long enough pass", "accounts": OTHER,
        "operator": "1"})
    assert status == 400 and "an operator manages every account" in text
    assert await harness.gateway.store.get_console_user("new@example.com") is None
    status, text = await console.post("/console/console-users", {
        "email": "new@example.com", "password": "long enough pass", "accounts": OTHER})
    assert status == 200
    made = await harness.gateway.store.get_console_user("new@example.com")
    assert made is not None and made.accounts == (OTHER,)


async def test_the_cli_manages_console_users(harness: Harness, config: Config) -> None:
    db = config.store.location

    def run(*args: str, input: str | None = None) -> Any:
        return invoke("--db", db, *args, input=input)

    result = await asyncio.to_thread(run, "console-user", "add", OWNER, "--account", ACCOUNT,
                                     "--password", "-", input="short\n")
    assert result.exit_code != 0 and "at least 12 characters" in result.output
    result = await asyncio.to_thread(run, "console-user", "add", OWNER, "--account", ACCOUNT,
                                     "--password", "-", input=f"{OWNER_PASSWORD}\n")
    assert result.exit_code == 0, result.output
    result = await asyncio.to_thread(run, "--json", "console-user", "list")
    assert OWNER in result.output and "password" not in result.output
    result = await asyncio.to_thread(run, "console-user", "set-password", OWNER,
                                     "--password", "another long one")
    assert result.exit_code == 0, result.output
    console = Console(harness)
    status, _ = await console.login(OWNER, "another long one")
    assert status == 200
    result = await asyncio.to_thread(run, "console-user", "delete", OWNER)
    assert result.exit_code == 0
    status, text = await console.get(f"/console/a/{ACCOUNT}/")
    assert "Log out" not in text


@pytest.mark.sqlite_only
async def test_the_console_follows_the_admin_api_to_its_own_listener(
        make_harness: Any, config: Config, aiohttp_client: Any) -> None:
    h: Harness = await make_harness(cfg=config.replace({"admin.host": "127.0.0.1"}))
    resp = await h.client.get("/console/login")
    assert resp.status == 404
    admin = await aiohttp_client(create_admin_listener_app(h.gateway))
    resp = await admin.get("/console/login")
    assert resp.status == 200


async def test_every_change_is_audited_with_the_console_user_s_email(harness: Harness) -> None:
    console = await owner(harness)
    with structlog.testing.capture_logs() as logs:
        await console.post(f"/console/a/{ACCOUNT}/users", {"login": "bob",
                                                           "password": "abcd1234"})
        await console.get(f"/console/a/{ACCOUNT}/users")
    audit = [e for e in logs if e["event"] == "console_request"]
    assert [(e["method"], e["path"], e["status"], e["by"]) for e in audit] == [
        ("POST", f"/console/a/{ACCOUNT}/users", 303, OWNER)]
    assert "abcd1234" not in repr(logs)


async def test_without_javascript_the_count_button_counts_and_sends_nothing(
        harness: Harness) -> None:
    console = await owner(harness)
    status, text = await console.post(f"/console/a/{ACCOUNT}/send", {
        "login": LOGIN, "from": SENDER, "to": "+33612345678", "message": "ж" * 71,
        "noStop": "1", "action": "count"})
    assert status == 200
    assert "71 characters, Unicode, 2 SMS parts per recipient, 1 recipient: 2 credits" in text
    assert 'id="sent"' not in text and await harness.balance() == 100000


async def test_pages_of_outgoing_senders_and_ledger(harness: Harness,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(views, "PAGE", 2)
    console = await owner(harness)
    # The owner sends as a user whose restrictions would refuse this address on the send
    # URL: they guard the send URL, not a logged-in owner.
    await harness.manage.update_user(ACCOUNT, LOGIN, ip_restrictions=["203.0.113.7"])
    for n in range(3):
        status, text = await console.post(f"/console/a/{ACCOUNT}/send", {
            "login": LOGIN, "from": SENDER, "to": f"+3361234567{n}", "message": f"m{n}"})
        assert status == 200 and 'id="sent"' in text, text
    status, text = await console.get(f"/console/a/{ACCOUNT}/outgoing?login={LOGIN}")
    assert text.count("+3361234567") == 2 and 'rel="next"' in text
    older = re.search(r'href="([^"]+)" rel="next"', text).group(1)  # type: ignore[union-attr]
    status, text = await console.get(older.replace("&amp;", "&"))
    assert text.count("+3361234567") == 1 and 'rel="next"' not in text
    assert f"login={LOGIN}" in older

    status, text = await console.post(f"/console/a/{ACCOUNT}/senders", {"sender": "SHOP"})
    assert status == 200 and "Sender SHOP added" in text
    assert (await harness.gateway.store.get_account(ACCOUNT)).senders == (SENDER, "SHOP")
    status, text = await console.post(f"/console/a/{ACCOUNT}/senders/remove",
                                      {"sender": "SHOP"})
    assert "Sender SHOP removed" in text
    status, text = await console.get(f"/console/a/{ACCOUNT}/ledger")
    assert status == 200 and text.count("<tr>") == 3 and 'rel="next"' in text


async def test_change_password_and_delete_with_confirmation(harness: Harness) -> None:
    console = await owner(harness)
    status, text = await console.post(f"/console/a/{ACCOUNT}/users/{LOGIN}/password",
                                      {"password": "bad pass!"})
    assert status == 400 and "letters and digits only" in text
    status, text = await console.post(f"/console/a/{ACCOUNT}/users/{LOGIN}/password",
                                      {"password": "newpass99"})
    assert status == 200 and "Password changed" in text
    status, body = await harness.send(password="newpass99")
    assert body.startswith("OK"), body
    await harness.manage.update_user(ACCOUNT, LOGIN, quota="30")
    status, text = await console.get(f"/console/a/{ACCOUNT}/users/{LOGIN}")
    assert "Its quota's 30 credits go back to the account" in text
    status, text = await console.post(f"/console/a/{ACCOUNT}/users/{LOGIN}/delete",
                                      {"confirm": "someone"})
    assert status == 400 and f"type {LOGIN} to confirm" in text
    assert await harness.gateway.store.list_users(ACCOUNT) == [LOGIN]
    before = await harness.balance()
    status, text = await console.post(f"/console/a/{ACCOUNT}/users/{LOGIN}/delete",
                                      {"confirm": LOGIN})
    assert status == 200 and f"API user {LOGIN} deleted" in text
    assert await harness.gateway.store.list_users(ACCOUNT) == []
    assert await harness.balance() == before + 3000


async def test_an_operator_deletes_a_console_user_but_not_itself(harness: Harness) -> None:
    await harness.manage.create_console_user("other@example.com", OWNER_PASSWORD,
                                             operator=False, accounts=[ACCOUNT])
    console = await owner(harness, operator=True)
    status, text = await console.get("/console/console-users")
    assert "other@example.com" in text
    for yourself in (OWNER, OWNER.upper(), f" {OWNER}"):
        status, text = await console.post("/console/console-users/delete",
                                          {"email": yourself})
        assert status == 400 and "you cannot delete yourself" in text
    assert await harness.gateway.store.get_console_user(OWNER) is not None
    status, text = await console.post("/console/console-users/delete",
                                      {"email": "other@example.com"})
    assert status == 200 and "Console user other@example.com deleted" in text
    assert await harness.gateway.store.get_console_user("other@example.com") is None


async def test_the_cookie_is_secure_behind_a_trusted_tls_proxy_only(
        make_harness: Any, config: Config) -> None:
    h: Harness = await make_harness(cfg=config.replace(
        {"server.trusted_proxies": ["127.0.0.1"]}))
    await h.manage.create_console_user(OWNER, OWNER_PASSWORD, operator=False,
                                       accounts=[ACCOUNT])
    for proto, secure in (("https", True), ("http", False)):
        resp = await h.client.get("/console/login", headers={"X-Forwarded-Proto": proto})
        assert ("Secure" in resp.headers["Set-Cookie"]) is secure
    untrusted: Harness = await make_harness(seed=False)
    resp = await untrusted.client.get("/console/login", headers={"X-Forwarded-Proto": "https"})
    assert "Secure" not in resp.headers["Set-Cookie"]


async def test_a_link_made_elsewhere_cannot_put_its_words_on_a_console_page(
        harness: Harness) -> None:
    console = await owner(harness)
    status, text = await console.get(
        f"/console/a/{ACCOUNT}/users?done=Session+expired:+call+0800+123+456")
    assert status == 200 and "0800 123 456" not in text and 'class="flash"' not in text
    status, text = await console.post(f"/console/a/{ACCOUNT}/senders", {"sender": "SHOP"})
    assert 'class="flash" role="status">Sender SHOP added<' in text


async def test_a_test_callback_is_sent_for_an_existing_user_only(
        harness: Harness, aiohttp_server: Any) -> None:
    calls: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        calls.append(dict(request.query))
        return web.Response(text="thanks")

    app = web.Application()
    app.router.add_get("/dlr", record)
    url = f"http://127.0.0.1:{(await aiohttp_server(app)).port}/dlr"
    console = await owner(harness)
    await console.get(f"/console/a/{ACCOUNT}/users")
    status, _ = await console.post(f"/console/a/{ACCOUNT}/users/nobody/callback",
                                   {"callBack": url, "action": "test"})
    assert status == 404 and calls == []
    status, text = await console.post(f"/console/a/{ACCOUNT}/users/{LOGIN}/callback",
                                      {"callBack": "ftp://example.com/x", "action": "test"})
    assert status == 400 and 'id="f-callBack-error"' in text and calls == []
    status, text = await console.post(f"/console/a/{ACCOUNT}/users/{LOGIN}/callback",
                                      {"callBack": url, "action": "test"})
    assert status == 200 and "answered: HTTP 200" in text
    assert [c["id"] for c in calls] == ["0"]
    assert (await harness.gateway.store.get_user(ACCOUNT, LOGIN)).callback_url is None


async def test_guesses_on_the_send_url_count_against_console_logins_from_that_address(
        make_harness: Any, config: Config) -> None:
    h: Harness = await make_harness(cfg=config.replace({"security.max_failures": 3}))
    await h.manage.create_console_user(OWNER, OWNER_PASSWORD, operator=False,
                                       accounts=[ACCOUNT])
    for _ in range(3):
        _, body = await h.send(password="wrongpass1")
        assert body.startswith("KO\n401"), body
    status, text = await Console(h).login()
    assert status == 401 and "Too many failed logins" in text


async def test_a_login_ends_the_session_the_browser_held(harness: Harness) -> None:
    console = await owner(harness)
    first = harness.client.session.cookie_jar.filter_cookies(
        harness.client.make_url("/console/"))[views.COOKIE].value
    status, text = await console.login()
    assert status == 200 and "Log out" in text
    second = harness.client.session.cookie_jar.filter_cookies(
        harness.client.make_url("/console/"))[views.COOKIE].value
    assert second != first
    resp = await harness.client.get(f"/console/a/{ACCOUNT}/", allow_redirects=False,
                                    cookies={views.COOKIE: first})
    assert resp.status == 303 and "/console/login" in resp.headers["Location"]


async def test_queries_out_of_range_or_in_other_digits_are_no_internal_error(
        harness: Harness) -> None:
    console = await owner(harness)
    base = f"/console/a/{ACCOUNT}"
    for path, expected in ((f"{base}/outgoing?before=99999999999999999999999", 200),
                           (f"{base}/outgoing?before=%C2%B2", 200),
                           (f"{base}/ledger?after=%C2%B2", 200),
                           (f"{base}/outgoing/%C2%B2", 404),
                           (f"{base}/outgoing/99999999999999999999999", 404),
                           (f"{base}/outgoing?ptt=%C2%B2", 400),
                           (f"{base}/outgoing.csv?ptt=-%C2%B2", 400)):
        status, _ = await console.get(path)
        assert status == expected, path


def _path(template: str, **values: str) -> str:
    for name, value in values.items():
        template = template.replace(f"{{{name}}}", value)
    return f"/console{template}"


async def test_every_form_of_the_route_table_refuses_a_post_without_its_csrf_token(
        harness: Harness) -> None:
    console = await owner(harness, operator=True)
    posts = [path for method, path, _ in views.ROUTES if method == "POST"]
    assert "/logout" in posts and "/a/{account}/users/{login}/{section}" in posts
    for template in posts:
        for section in (("callback", "quota") if "{section}" in template else ("",)):
            path = _path(template, account=ACCOUNT, name=ACCOUNT, login=LOGIN,
                         section=section)
            data = {"callBack": "https://dlr.example.com/", "action": "test"}
            status, _ = await console.post(path, {**data, "_csrf": "forged"}, csrf=False)
            assert status == 403, path
    status, text = await console.get("/console/")
    assert "Log out" in text  # the refused logout left the session open


async def test_every_page_of_another_account_answers_404(harness: Harness) -> None:
    await harness.manage.create_account(OTHER, 100)
    await harness.manage.create_user(OTHER, "carol", "abcd1234")
    await harness.manage.add_sender(OTHER, "OTHR")
    _, body = await harness.send(account=OTHER, login="carol", password="abcd1234",
                                 **{"from": "OTHR"})
    other_id = re.search(r"\d+", body.split("\n", 2)[2]).group(0)  # type: ignore[union-attr]
    balance = await harness.balance(OTHER)
    console = await owner(harness)
    await console.get(f"/console/a/{ACCOUNT}/")
    for method, template, _ in views.ROUTES:
        if "{account}" not in template and "{name}" not in template:
            continue
        path = _path(template, account=OTHER, name=OTHER, login="carol", section="callback",
                     id=other_id)
        if method == "GET":
            status, _ = await console.get(path)
        else:
            status, _ = await console.post(path, {"callBack": "https://dlr.example.com/",
                                                  "action": "test", "confirm": "carol",
                                                  "amount": "5", "sender": "OTHR"})
        assert status == 404, (method, path)
    assert await harness.gateway.store.list_users(OTHER) == ["carol"]
    assert (await harness.gateway.store.get_account(OTHER)).senders == ("OTHR",)
    assert await harness.balance(OTHER) == balance


async def test_operator_pages_are_not_found_by_an_account_owner(harness: Harness) -> None:
    console = await owner(harness)
    await console.get(f"/console/a/{ACCOUNT}/")
    operator_routes = [(method, path) for method, path, handler in views.ROUTES
                       if getattr(handler, "console_operator", False)
                       or path.startswith("/accounts")]
    assert len(operator_routes) == 5
    for method, template in operator_routes:
        path = _path(template, name=ACCOUNT)
        if method == "GET":
            status, _ = await console.get(path)
        else:
            status, _ = await console.post(path, {"name": OTHER, "amount": "5",
                                                  "email": OWNER, "credits": "5",
                                                  "password": OWNER_PASSWORD})
        assert status == 404, (method, path)
    assert await harness.gateway.store.list_accounts() == [ACCOUNT]
    assert await harness.gateway.store.get_console_user(OWNER) is not None


async def test_what_users_typed_is_shown_escaped(harness: Harness) -> None:
    console = await owner(harness)
    markup = '<img src=x onerror="alert(1)">'
    status, text = await console.post(f"/console/a/{ACCOUNT}/send", {
        "login": LOGIN, "from": SENDER, "to": "+33612345678", "message": markup})
    assert status == 200 and markup not in text
    message_id = re.search(r'/outgoing/(\d+)"', text).group(1)  # type: ignore[union-attr]
    status, text = await console.get(f"/console/a/{ACCOUNT}/outgoing/{message_id}")
    assert markup not in text and "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in text


async def test_unknown_e_mails_cost_a_password_check_and_nothing_secret_is_logged(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []
    verify = passwords.verify

    def recording(password: str, stored: str) -> bool:
        checked.append(stored)
        return verify(password, stored)

    monkeypatch.setattr(passwords, "verify", recording)
    await harness.manage.create_console_user(OWNER, OWNER_PASSWORD, operator=False,
                                             accounts=[ACCOUNT])
    console = Console(harness)
    with structlog.testing.capture_logs() as logs:
        for email in ("nobody@example.com", "not an address"):
            status, _ = await console.login(email, OWNER_PASSWORD)
            assert status == 401
        status, _ = await console.login(OWNER, "wrong password!")
        assert status == 401
        status, _ = await console.login()
        assert status == 200
    assert checked[:2] == [passwords.decoy_hash()] * 2 and len(checked) == 4
    token = harness.client.session.cookie_jar.filter_cookies(
        harness.client.make_url("/console/"))[views.COOKIE].value
    assert OWNER_PASSWORD not in repr(logs) and "wrong password!" not in repr(logs)
    assert token not in repr(logs)


async def test_a_login_leads_to_a_console_page_only(harness: Harness) -> None:
    await harness.manage.create_console_user(OWNER, OWNER_PASSWORD, operator=False,
                                             accounts=[ACCOUNT])
    for nxt, expected in ((f"/console/a/{ACCOUNT}/users?login=x", None),
                          ("https://evil.example/", "/console/"),
                          ("//evil.example/", "/console/"),
                          ("/\\evil.example/", "/console/"),
                          ("/console\\..\\..\\/evil.example", "/console/"),
                          ("javascript:alert(1)", "/console/")):
        resp = await harness.client.get("/console/login", params={"next": nxt})
        text = await resp.text()
        token = _CSRF.search(text).group(1)  # type: ignore[union-attr]
        resp = await harness.client.post("/console/login", allow_redirects=False, data={
            "email": OWNER, "password": OWNER_PASSWORD, "_csrf": token, "next": nxt})
        assert resp.status == 303
        assert resp.headers["Location"] == (expected or nxt), nxt


async def test_the_30_days_chart_counts_local_days_across_a_change_of_the_clocks(
        make_harness: Any) -> None:
    paris = ZoneInfo("Europe/Paris")  # the default send.timezone; CEST until 2026-10-25
    sent_at = datetime(2026, 10, 20, 0, 30, tzinfo=paris).timestamp()
    clock = ManualClock(sent_at)
    h: Harness = await make_harness(clock=clock)
    _, body = await h.send()
    assert body.startswith("OK"), body
    clock.advance(datetime(2026, 10, 27, 12, 0, tzinfo=paris).timestamp() - sent_at)
    console = await owner(h)
    _, text = await console.get(f"/console/a/{ACCOUNT}/")
    day = re.search(r"20/10: (\d+) delivered, (\d+) failed, (\d+) pending", text)
    assert day is not None and sum(map(int, day.groups())) == 1, "counted on 19/10"


async def test_console_logins_wait_in_the_send_url_s_password_queue(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = harness.gateway.pipeline.verifier
    ran = verifier.ran
    console = await owner(harness)
    assert verifier.ran == ran + 1  # the login's scrypt ran in the bounded queue
    await console.post("/console/logout", {})

    async def full(*args: Any, **kwargs: Any) -> bool:
        raise passwords.VerificationBusy("too many password checks waiting")

    monkeypatch.setattr(verifier, "verify", full)
    status, text = await console.login()
    assert status == 429 and "Too many logins being checked" in text
    monkeypatch.undo()
    status, text = await console.login()
    assert status == 200 and "Log out" in text  # a busy queue counted no failure
