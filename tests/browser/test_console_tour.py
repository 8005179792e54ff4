"""The seeds' walk through the control panel, in chromium, against the real gateway process:
log in, add an API user, give it a quota and see the account's credits move, set its alert
and receive it by e-mail once sends cross it, 5 IP restrictions and a 6th refused, a
callback tested then receiving the delivery report, an SMS sent from the console reaching
"delivered", the outgoing list filtered and exported, log out. Every page is checked with
axe-core and photographed (tests/browser/conftest.py)."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from playwright.async_api import Browser, Page, expect

from gateway.config import Config
from gateway.service import Management
from gateway.store import open_store
from tests.browser.conftest import accessibility_violations, csp_violations, screenshot
from tests.serverproc import ServerProcess, free_port, servers, wait_for

ACCOUNT = "sms-tour-1"
SENDER = "TOUR"
OWNER = "owner@example.com"
OWNER_PASSWORD = "a long console password"
API_LOGIN = "shop"


class Inbox:
    def __init__(self) -> None:
        self.mails: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails.append((list(envelope.rcpt_tos), envelope.content))
        return "250 OK"


@pytest.fixture
def inbox() -> Any:
    handler = Inbox()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[list[dict[str, str]], str]]:
    """A callback receiver on 127.0.0.1: the query of every request it got."""
    calls: list[dict[str, str]] = []

    async def record(request: web.Request) -> web.Response:
        calls.append(dict(request.query))
        return web.Response(text="thanks")

    app = web.Application()
    app.router.add_get("/dlr", record)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield calls, f"http://127.0.0.1:{port}/dlr"
    finally:
        await runner.cleanup()


async def prepare(db: Path) -> None:
    """The seeds' account (200 credits, a sender) and its owner's console user."""
    config = Config().replace({"store.path": str(db)})
    store = open_store(db, "cli")
    await store.open()
    try:
        manage = Management(store, config)
        await manage.create_account(ACCOUNT, 200)
        await manage.add_sender(ACCOUNT, SENDER)
        await manage.create_console_user(OWNER, OWNER_PASSWORD, operator=False,
                                          accounts=[ACCOUNT])
    finally:
        await store.close()


async def check(page: Page, name: str) -> None:
    """No serious or critical accessibility violation; a screenshot for the tour."""
    violations = await accessibility_violations(page)
    assert violations == [], (name, violations)
    await screenshot(page, name)


async def submit(page: Page, button: str) -> None:
    async with page.expect_navigation():
        await page.get_by_role("button", name=button, exact=True).click()


async def test_the_seeds_walk_through_the_console(browser: Browser, tmp_path: Path,
                                                  inbox: Any, receiver: Any) -> None:
    sink, smtp_port = inbox
    calls, callback_url = receiver
    db = tmp_path / "gateway.sqlite3"
    await prepare(db)
    env = {"HTTP2SMS_SMTP_HOST": "127.0.0.1", "HTTP2SMS_SMTP_PORT": str(smtp_port),
           "HTTP2SMS_ALERTS_POLL_SECONDS": "0.1", "HTTP2SMS_OPERATOR_FAILURE_RATIO": "0",
           "HTTP2SMS_OPERATOR_RETRY_RATIO": "0"}
    async with servers() as started:
        server = await ServerProcess.start(db, env=env)
        started.append(server)
        context = await browser.new_context(viewport={"width": 1200, "height": 900},
                                            accept_downloads=True)
        page = await context.new_page()
        refused = csp_violations(page)
        base = f"{server.base}/console/a/{ACCOUNT}"

        # Log in: the bare address leads to the console, then to its login form.
        await page.goto(server.base + "/")
        assert "/console/login" in page.url
        await check(page, "01-login")
        await page.get_by_label("E-mail").fill(OWNER)
        await page.get_by_label("Password").fill(OWNER_PASSWORD)
        await submit(page, "Log in")
        assert page.url.endswith(f"/console/a/{ACCOUNT}/")
        assert await page.locator("#credits-left").inner_text() == "200"

        # API users > Actions > Add, the 8-alphanumeric rule said as one types.
        await page.get_by_role("link", name="API users").click()
        await page.locator("details.actions > summary").click()
        await page.get_by_label("Login").fill(API_LOGIN)
        await page.get_by_label("Password").fill("abc")
        assert "at least 8" in await page.locator(".live-check").inner_text()
        await page.get_by_label("Password").fill("shop1234")
        assert await page.locator(".live-check").inner_text() == "fits the rule"
        await submit(page, "Add")
        assert "API user shop added" in await page.locator(".flash").inner_text()
        await check(page, "02-api-users")

        # The user's `...` menu > Quota: 150 of the 200 credits, 50 left on the account.
        await page.locator("details.menu summary").first.click()
        await page.get_by_role("link", name="Quota").click()
        await page.get_by_label("Activate the quota").check()
        await page.get_by_label("New quota (credits)").fill("150")
        assert "150 credits will move from the account (50 left)" in \
            await page.locator("#quota-moves").inner_text()
        await submit(page, "Save the quota")
        assert "150 credits moved from the account, 50 left" in \
            await page.locator(".flash").inner_text()
        await check(page, "03-api-user")
        # The dialog counts in credits as the gateway does, and a quota switched off gives
        # all of its credits back (nothing saved here).
        await page.get_by_label("New quota (credits)").fill("149.7")
        assert "0.3 credits will go back to the account (50.3 left)" in \
            await page.locator("#quota-moves").inner_text()
        await page.get_by_label("Activate the quota").uncheck()
        assert "150 credits will go back to the account (200 left)" in \
            await page.locator("#quota-moves").inner_text()
        await page.get_by_label("Activate the quota").check()

        # Limit: an e-mail when the quota falls below 149.5.
        await page.get_by_label("Activate the alert").check()
        await page.get_by_label("Threshold (credits)").fill("149.5")
        await page.get_by_label("E-mail", exact=True).check()
        await page.get_by_label("E-mail address").fill(OWNER)
        await submit(page, "Save the alert")
        assert "Alert saved" in await page.locator(".flash").inner_text()

        # Restrictions: 5 addresses, then a 6th (the suggested own address) refused.
        for n in range(5):
            await page.get_by_label(f"Address {n + 1}", exact=True).fill(f"203.0.113.{n + 1}")
        await submit(page, "Save the restrictions")
        assert "IP restrictions saved" in await page.locator(".flash").inner_text()
        await submit(page, "Add my address (127.0.0.1)")
        assert "at most 5 addresses" in await page.locator("#ip-error").inner_text()

        # Callback: tested (the receiver's answer shown), then saved.
        await page.get_by_label("Callback URL").fill(callback_url)
        await submit(page, "Send a test callback")
        assert "answered: HTTP 200" in await page.locator("#test-result").inner_text()
        assert calls and calls[0]["id"] == "0" and calls[0]["tag"] == "test"
        await submit(page, "Save the callback")
        assert "Callback saved" in await page.locator(".flash").inner_text()

        # The account's credits moved: 50 left, 150 held by the quota.
        await page.goto(f"{base}/")
        assert await page.locator("#credits-left").inner_text() == "50"
        assert await page.locator("#credits-held").inner_text() == "150"

        # Send an SMS to two numbers: the live counter, then the ids.
        await page.goto(f"{base}/send")
        await page.get_by_label("API user").select_option(API_LOGIN)
        await page.get_by_label("Sender").select_option(SENDER)
        await page.get_by_label("Recipients").fill("+33612345678, +33612345679")
        await page.get_by_label("Message").fill("Hello from the console")
        await expect(page.locator("#counter")).to_contain_text("2 recipients")
        counter = await page.locator("#counter").inner_text()
        assert "GSM, 1 SMS part per recipient, 2 recipients: 2 credits" in counter, counter
        await check(page, "04-send")
        await submit(page, "Send")
        links = page.locator("#sent a")
        assert await links.count() == 2
        first_id = await links.first.inner_text()

        # The message reaches "delivered"; the callback receives its report.
        await links.first.click()

        async def delivered() -> bool:
            await page.reload()
            return await page.locator("#outcome").inner_text() == "delivered"

        await wait_for(delivered, timeout=20, interval=0.2, what="delivered")
        await check(page, "05-message")
        await wait_for(lambda: _async(any(c.get("id") == first_id and c.get("dlr") == "1"
                                          for c in calls)),
                       timeout=20, what="the delivery report")

        # The quota fell from 150 to 148, below the alert's 149.5: an e-mail.
        await wait_for(lambda: _async(bool(sink.mails)), timeout=20, what="the alert e-mail")
        rcpt, content = sink.mails[0]
        assert rcpt == [OWNER] and b"threshold" in content.lower()

        # Outgoing SMS: filtered by recipient, exported as CSV.
        await page.goto(f"{base}/outgoing")
        await page.get_by_label("Recipient").fill("+33612345679")
        await submit(page, "Filter")
        assert await page.locator("tbody tr").count() == 1
        await check(page, "06-outgoing")
        async with page.expect_download() as info:
            await page.get_by_role("link", name="Export as CSV").click()
        download = await info.value
        rows = list(csv.reader(io.StringIO(Path(await download.path()).read_text())))
        assert [r[4] for r in rows[1:]] == ["+33612345679"]

        for tab, name in (("Senders", "07-senders"), ("Ledger", "08-ledger"),
                          ("Account", "09-account")):
            await page.get_by_role("link", name=tab, exact=True).click()
            await page.wait_for_load_state()
            await check(page, name)

        # Readable on a phone.
        await page.set_viewport_size({"width": 390, "height": 844})
        await page.goto(f"{base}/users")
        await check(page, "10-phone-api-users")

        await submit(page, "Log out")
        assert "/console/login" in page.url
        await page.goto(f"{base}/")
        assert "/console/login" in page.url
        await context.close()
        assert refused == []  # nothing of the pages was blocked by their own CSP
        assert await server.stop() == 0


async def _async(value: bool) -> bool:
    await asyncio.sleep(0)
    return value


async def test_an_operator_s_pages(browser: Browser, tmp_path: Path) -> None:
    db = tmp_path / "gateway.sqlite3"
    await prepare(db)
    store = open_store(db, "cli")
    await store.open()
    try:
        await Management(store, Config().replace({"store.path": str(db)})).create_console_user(
            "ops@example.com", OWNER_PASSWORD, operator=True, accounts=[])
    finally:
        await store.close()
    async with servers() as started:
        server = await ServerProcess.start(db)
        started.append(server)
        context = await browser.new_context(viewport={"width": 1200, "height": 900})
        page = await context.new_page()
        refused = csp_violations(page)
        await page.goto(server.base + "/console/")
        # A refused login says why, next to the form, and is no less accessible.
        await page.get_by_label("E-mail").fill("ops@example.com")
        await page.get_by_label("Password").fill("not the password")
        await submit(page, "Log in")
        assert "Wrong e-mail or password" in await page.locator(".error").inner_text()
        await check(page, "11-login-refused")
        await page.get_by_label("Password").fill(OWNER_PASSWORD)
        await submit(page, "Log in")

        await page.get_by_label("Name").fill("sms-new-1")
        await page.get_by_label("Credits", exact=True).fill("abc")
        await submit(page, "Create")
        assert await page.locator("#f-credits-error").count() == 1
        await page.get_by_label("Credits", exact=True).fill("30")
        await submit(page, "Create")
        assert "Account sms-new-1 created" in await page.locator(".flash").inner_text()
        await page.get_by_label("Credits to add to sms-new-1").fill("20")
        async with page.expect_navigation():
            await page.get_by_role("row", name="sms-new-1").get_by_role("button").click()
        assert "sms-new-1: 50 credits left" in await page.locator(".flash").inner_text()
        await check(page, "12-operator-accounts")

        await page.get_by_role("link", name="Console users").click()
        await page.get_by_label("E-mail").fill("new-owner@example.com")
        await page.get_by_label("Password").fill("twelve chars!")
        await page.get_by_label("Accounts", exact=True).select_option("sms-new-1")
        await submit(page, "Add")
        assert "Console user new-owner@example.com added" in \
            await page.locator(".flash").inner_text()
        await check(page, "13-operator-console-users")
        await context.close()
        assert refused == []  # nothing of the pages was blocked by their own CSP
        assert await server.stop() == 0
