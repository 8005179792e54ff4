"""Low-credit alerts: crossings fire once, re-arm on the way back up, and reach a real SMTP
server (aiosmtpd) or the account's own message history, durably."""

from __future__ import annotations

import asyncio
import email
import io
import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from email import policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
from aiosmtpd.controller import Controller

from gateway import logs
from gateway.clock import ManualClock
from gateway.config import Config
from gateway.hooks.alerts import (
    Mailer,
    NoAlertConfigured,
    Notice,
    build_mail,
    send_test_alert,
)
from gateway.hooks.outbox import AttemptFailed
from gateway.records import MessageFilter, OutboxItem, SendOrder, StateUpdate, UserChanges
from gateway.service import ValidationError
from gateway.store import NotFound, Store, open_store
from tests import dbrows
from tests.cli_in_process import invoke
from tests.conftest import ACCOUNT, LOGIN, Harness, ledger_identity

EMAIL = "ops@example.com"
NUMBER = "+33698765432"


# -- a real SMTP server ----------------------------------------------------------------------

class Inbox:
    """aiosmtpd handler keeping what it receives; refuses RCPT for `refuse`."""

    def __init__(self) -> None:
        self.mails: list[tuple[str, list[str], EmailMessage]] = []
        self.refuse: set[str] = set()

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.refuse:
            return "550 5.1.1 no such mailbox"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.original_content or envelope.content,
                                           policy=policy.default)
        self.mails.append((envelope.mail_from, list(envelope.rcpt_tos), message))
        return "250 Message accepted for delivery"


class Sink:
    def __init__(self, port: int) -> None:
        self.port = port
        self.inbox = Inbox()
        self._controller: Controller | None = None

    @property
    def mails(self) -> list[tuple[str, list[str], EmailMessage]]:
        return self.inbox.mails

    def start(self) -> None:
        self._controller = Controller(self.inbox, hostname="127.0.0.1", port=self.port)
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def down_sink() -> Iterator[Sink]:
    """A port with nothing listening yet; the test starts the server when it wants."""
    server = Sink(free_port())
    yield server
    server.stop()


def smtp_to(config: Config, port: int) -> Config:
    return config.replace({"smtp.host": "127.0.0.1", "smtp.port": port,
                           "smtp.timeout_seconds": 5.0})


# -- helpers ---------------------------------------------------------------------------------

async def until(check: Callable[[], Any], timeout: float = 5.0) -> None:
    """Wait for background work (worker, operator) without sleeping a fixed time."""
    async def poll() -> None:
        while True:
            result = check()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


def outbox(config: Config, kind: str | None = None) -> list[dict[str, Any]]:
    rows = dbrows.query(
        config.store.path, "SELECT id, kind, target, payload, state, attempts, last_error "
        "FROM outbox WHERE kind LIKE 'alert%' ORDER BY id")
    items = [{**r, "payload": json.loads(r["payload"])} for r in rows]
    return [i for i in items if kind is None or i["kind"] == kind]


async def set_alert(h: Harness, threshold: Any, support: str = "mail", **extra: Any) -> None:
    fields: dict[str, Any] = {"alert_threshold": threshold, "alert_support": support}
    if support in ("mail", "both"):
        fields["alert_email"] = EMAIL
    if support in ("sms", "both"):
        fields["alert_number"] = NUMBER
    await h.manage.update_user(ACCOUNT, LOGIN, **fields, **extra)


async def sent_ok(h: Harness, **params: Any) -> None:
    status, body = await h.send(**params)
    assert status == 200 and body.startswith("OK"), body


def text_of(message: EmailMessage) -> str:
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    return str(body.get_content())


# -- the mail --------------------------------------------------------------------------------

async def test_mail_reaches_the_smtp_server_with_recipient_and_content(
        make_harness: Any, config: Config, sink: Sink) -> None:
    # Only the crossing commit's own wake-up can send it.
    config = config.replace({"alerts.poll_seconds": 60})
    h = await make_harness(credits=101, cfg=smtp_to(config, sink.port))
    await set_alert(h, 100)
    await sent_ok(h)                       # 100 left: at the threshold is not below it
    assert outbox(config) == []
    await sent_ok(h)                       # 99 left: crossed
    (item,) = outbox(config)
    assert (item["kind"], item["target"]) == ("alert_mail", EMAIL)
    assert item["payload"] == {"account": ACCOUNT, "login": LOGIN, "credits_left": 9900,
                               "threshold": 10000, "quota": False}

    await until(lambda: sink.mails)
    mail_from, rcpt, message = sink.mails[0]
    assert (mail_from, rcpt) == (config.smtp.sender, [EMAIL])
    assert message["To"] == EMAIL and message["From"] == config.smtp.sender
    assert message["Subject"] == f"Low SMS credits: {ACCOUNT} / {LOGIN}"
    assert message.get_content_type() == "text/plain"
    text = text_of(message)
    for line in (f"Account:       {ACCOUNT}", f"API user:      {LOGIN}",
                 f"Credits left:  99 (the balance of account {ACCOUNT})",
                 "Threshold:     100",
                 f"Top up with: http2sms account credit {ACCOUNT} <amount>"):
        assert line in text, text
    assert "--quota" not in text  # the account's own balance: its top-up is the fix
    await until(lambda: outbox(config)[0]["state"] == "done")
    assert len(sink.mails) == 1


async def test_quota_alert_says_the_quota_and_two_decimals(
        make_harness: Any, config: Config, sink: Sink) -> None:
    h = await make_harness(credits=200, cfg=smtp_to(config, sink.port))
    await set_alert(h, "49.5", quota=50)
    await sent_ok(h)
    await until(lambda: sink.mails)
    text = text_of(sink.mails[0][2])
    assert f"Credits left:  49 (the quota of user {LOGIN})" in text
    assert "Threshold:     49.5" in text
    # Topping up the account alone would not end a quota's alert: the mail says what does.
    assert f"http2sms user set {ACCOUNT} {LOGIN} --quota <amount>" in text
    assert "only after they have risen back above the threshold" in text


async def test_crossing_twice_without_rearming_sends_one_alert_rearm_sends_another(
        make_harness: Any, config: Config, sink: Sink) -> None:
    h = await make_harness(credits=101, cfg=smtp_to(config, sink.port))
    await set_alert(h, 100)
    await sent_ok(h)
    await sent_ok(h)                                  # 99: fires
    assert len(outbox(config)) == 1
    await h.manage.credit_account(ACCOUNT, "0.5")     # 99.5: still below, not re-armed
    await sent_ok(h)                                  # 98.5: below again, no new alert
    assert not (await h.gateway.store.get_user(ACCOUNT, LOGIN)).alert_armed
    assert len(outbox(config)) == 1

    await h.manage.credit_account(ACCOUNT, "1.5")     # 100: at the threshold, not above it
    assert not (await h.gateway.store.get_user(ACCOUNT, LOGIN)).alert_armed
    await sent_ok(h)                                  # 99: no new alert
    assert len(outbox(config)) == 1

    await h.manage.credit_account(ACCOUNT, "1.5")     # 100.5: risen above it, re-armed
    assert (await h.gateway.store.get_user(ACCOUNT, LOGIN)).alert_armed
    assert len(outbox(config)) == 1
    await sent_ok(h)                                  # 99.5: fires again
    items = outbox(config)
    assert [i["payload"]["credits_left"] for i in items] == [9900, 9950]

    await until(lambda: len(sink.mails) == 2)
    await until(lambda: all(i["state"] == "done" for i in outbox(config)))
    assert len(sink.mails) == 2


async def test_refund_rearms(make_harness: Any, config: Config, sink: Sink) -> None:
    h = await make_harness(credits=101, cfg=smtp_to(config, sink.port))
    await set_alert(h, "99.5")
    await sent_ok(h)
    # The simulator answers ptt 23 (invalid number, not billed) for this one: refunded.
    await sent_ok(h, to="+33612399023")               # 99: fires; the refund brings 100
    assert len(outbox(config)) == 1

    async def armed() -> bool:
        return (await h.gateway.store.get_user(ACCOUNT, LOGIN)).alert_armed
    await until(armed)
    assert await h.balance() == 10000
    await sent_ok(h)                                  # 99 again: a new crossing
    assert len(outbox(config)) == 2
    await until(lambda: len(sink.mails) == 2)


# Small batches: the sends after the crossing commit in later transactions, which must
# see the alert as fired; large ones: the crossing happens inside one group commit.
@pytest.mark.parametrize("max_batch", [3, 512])
async def test_hundred_concurrent_sends_crossing_together_send_one_alert(
        make_harness: Any, config: Config, sink: Sink, max_batch: int) -> None:
    config = config.replace({"store.max_batch": max_batch})
    h = await make_harness(credits=150, cfg=smtp_to(config, sink.port))
    await set_alert(h, 100)
    results = await asyncio.gather(*(h.send(message=f"m{i}") for i in range(100)))
    assert all(body.startswith("OK") for _, body in results)
    assert await h.balance() == 5000
    assert len(outbox(config)) == 1
    await until(lambda: outbox(config)[0]["state"] == "done")
    await asyncio.sleep(0.05)  # room for a wrong second mail to show up
    assert len(sink.mails) == 1
    ledger_identity(await h.gateway.store.ledger_totals())


async def test_mail_refused_by_the_server_is_permanent(config: Config, sink: Sink) -> None:
    sink.inbox.refuse.add("nobody@example.com")
    cfg = smtp_to(config, sink.port)
    notice = Notice(ACCOUNT, LOGIN, 900, 1000)
    message = build_mail(notice, to="nobody@example.com", smtp=cfg.smtp, top_up_hint="",
                         at=0.0, tz=ZoneInfo("UTC"))
    with pytest.raises(AttemptFailed) as failed:
        await Mailer(cfg.smtp).send(message, "nobody@example.com")
    assert failed.value.permanent and "550" in failed.value.detail
    assert "nobody" not in failed.value.detail


# -- SMTP down, restarts ---------------------------------------------------------------------

async def test_smtp_down_then_up_delivers_the_queued_mail(
        make_harness: Any, config: Config, down_sink: Sink) -> None:
    clock = ManualClock()
    h = await make_harness(credits=101, clock=clock, cfg=smtp_to(config, down_sink.port))
    await set_alert(h, 100)
    await sent_ok(h)
    await sent_ok(h)          # fires while nothing listens: the send is answered anyway

    await until(lambda: outbox(config) and outbox(config)[0]["last_error"])
    (item,) = outbox(config)
    assert (item["state"], item["attempts"]) == ("pending", 1)
    assert "cannot connect to the SMTP server" in item["last_error"]

    down_sink.start()
    assert h.gateway.alerts is not None
    # Past the first retry (5 s, stretched by up to 20% of jitter).
    clock.advance(config.callbacks.first_retry_seconds * 1.5)
    h.gateway.alerts.worker.wake()
    await until(lambda: down_sink.mails)
    await until(lambda: outbox(config)[0]["state"] == "done")
    assert outbox(config)[0]["attempts"] == 2
    assert down_sink.mails[0][1] == [EMAIL]


async def test_restart_neither_repeats_nor_forgets_an_alert(
        make_harness: Any, config: Config, down_sink: Sink) -> None:
    clock = ManualClock()
    cfg = smtp_to(config, down_sink.port)
    h = await make_harness(credits=101, clock=clock, cfg=cfg)
    await set_alert(h, 100)
    await sent_ok(h)
    await sent_ok(h)
    await until(lambda: outbox(config)[0]["attempts"] == 1 and outbox(config)[0]["last_error"])
    await h.client.close()    # the gateway stops with the alert still owed

    down_sink.start()
    again = await make_harness(clock=ManualClock(clock.now() + 60), seed=False, cfg=cfg)
    await until(lambda: down_sink.mails)          # not forgotten
    await sent_ok(again)                          # still below: the fired state was kept
    assert len(outbox(config)) == 1
    await until(lambda: outbox(config)[0]["state"] == "done")
    assert len(down_sink.mails) == 1


# -- the SMS ---------------------------------------------------------------------------------

async def test_sms_alert_is_charged_delivered_and_in_the_history(
        make_harness: Any, config: Config) -> None:
    h = await make_harness(credits=101)
    await set_alert(h, 100, support="sms")
    await sent_ok(h)
    await sent_ok(h)
    store = h.gateway.store
    account = await store.get_account(ACCOUNT)

    async def alert_messages() -> list[Any]:
        return [m for m in await store.list_messages(MessageFilter(account_id=account.id),
                                                     limit=10) if m.kind == "alert"]
    await until(alert_messages)
    (sms,) = await alert_messages()
    (item,) = outbox(config)
    assert (sms.sender, sms.receiver, sms.login) == (config.alerts.sms_sender, NUMBER, LOGIN)
    assert (sms.charged_to, sms.credits, sms.tag) == ("account", 100, f"alert-{item['id']}")
    assert ACCOUNT in sms.body and "99 left" in sms.body and "STOP" not in sms.body
    assert await h.balance() == 9800                  # 2 sends + the alert SMS
    ledger = await store.list_ledger(ACCOUNT, limit=10)
    assert [(e.kind, e.source, e.amount) for e in ledger if e.kind == "alert"] == \
        [("alert", "account", 100)]
    ledger_identity(await store.ledger_totals())
    # The user's login filter shows it too: it is part of that user's story.
    by_login = await store.list_messages(MessageFilter(account_id=account.id, login=LOGIN),
                                         limit=10)
    assert sms.id in [m.id for m in by_login]

    async def delivered() -> bool:
        return (await store.get_message(sms.id)).ptt == 4
    await until(delivered)
    await until(lambda: outbox(config)[0]["state"] == "done")
    assert await h.balance() == 9800                  # the alert SMS crossed nothing new
    assert len(outbox(config)) == 1


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    # Put back exactly what was there: later tests may rely on structlog's defaults.
    before = structlog.get_config()
    stream = io.StringIO()
    logs.configure("json", "debug", stream=stream)
    yield stream
    structlog.configure(**before)


async def test_unpaid_sms_alert_is_logged_and_the_mail_still_goes(
        make_harness: Any, config: Config, sink: Sink, log_stream: io.StringIO) -> None:
    config = config.replace({"smtp.password": "smtp-Secret-42"})
    h = await make_harness(credits=50, cfg=smtp_to(config, sink.port))
    # The whole balance goes to the quota: nothing is left to pay for an alert SMS.
    await set_alert(h, "49.5", support="both", quota=50)
    await sent_ok(h)
    await until(lambda: len(outbox(config)) == 2
                and all(i["state"] != "pending" for i in outbox(config)))
    states = {i["kind"]: (i["state"], i["attempts"], i["last_error"]) for i in outbox(config)}
    assert states["alert_mail"][0] == "done"
    assert states["alert_sms"][:2] == ("dead", 1)
    assert "cannot pay" in states["alert_sms"][2]
    assert len(sink.mails) == 1
    account = await h.gateway.store.get_account(ACCOUNT)
    assert account.balance == 0
    history = await h.gateway.store.list_messages(MessageFilter(account_id=account.id),
                                                  limit=10)
    assert [m.kind for m in history] == ["api"]
    ledger_identity(await h.gateway.store.ledger_totals())
    events = [json.loads(line) for line in log_stream.getvalue().splitlines() if line]
    unpaid = [e for e in events if e["event"] == "alert_sms_unpaid"]
    assert [(e["account"], e["login"]) for e in unpaid] == [(ACCOUNT, LOGIN)]
    text = log_stream.getvalue()
    assert "smtp-Secret-42" not in text and EMAIL not in text


async def test_a_retried_sms_alert_is_not_sent_twice(make_harness: Any,
                                                     config: Config) -> None:
    h = await make_harness(credits=101)
    await set_alert(h, 100, support="sms")
    await sent_ok(h)
    await sent_ok(h)
    await until(lambda: outbox(config)[0]["state"] == "done")
    assert h.gateway.alerts is not None
    row = outbox(config)[0]
    item = OutboxItem(row["id"], "alert_sms", None, 1, 1, NUMBER, row["payload"], 0.0, 2)
    # As after a crash between the SMS commit and the recorded result.
    detail = await h.gateway.alerts.handler.handle(item)
    assert detail.startswith("sent as SMS")
    assert await h.balance() == 9800


# -- the crossing rules in the store ---------------------------------------------------------

def order(account_id: int, user_id: int | None, cost: int = 100) -> SendOrder:
    return SendOrder(account_id=account_id, user_id=user_id, login="u", sender="S", body="b",
                     coding=1, parts=1, klass=1, no_stop=True, tag="",
                     recipients=("+33612345678",), costs=(cost,))


async def alert_items(store: Store) -> list[OutboxItem]:
    return await store.claim_outbox(("alert_mail", "alert_sms"), now=1e12, lease=1.0,
                                    limit=1000)


async def test_store_hundred_transactions_crossing_fire_once(store: Store) -> None:
    account = await store.create_account("a", 15000, at=1.0)
    user = await store.create_user("a", "u", "x", at=1.0)
    await store.update_user("a", "u", UserChanges(alert_threshold=10000, alert_email=EMAIL),
                            at=1.0)
    # One transaction each, all racing: the armed flag is read and cleared under the lock.
    outcomes = await asyncio.gather(*(store.commit_sends([order(account.id, user.id)], at=2.0)
                                      for _ in range(100)))
    assert all(o[0].accepted for o in outcomes)
    # The crossing commit says so: the alert service wakes on that alone.
    assert [o[0].alert_queued for o in outcomes].count(True) == 1
    (item,) = await alert_items(store)
    assert item.payload["credits_left"] == 9900


async def test_store_setting_a_threshold_is_not_a_crossing(store: Store) -> None:
    account = await store.create_account("a", 5000, at=1.0)
    user = await store.create_user("a", "u", "x", at=1.0)
    changed = await store.update_user(
        "a", "u", UserChanges(alert_threshold=10000, alert_support="sms",
                              alert_number=NUMBER), at=1.0)
    assert not changed.alert_armed                  # below already: nothing to announce
    await store.commit_sends([order(account.id, user.id)], at=2.0)
    assert await alert_items(store) == []
    await store.credit_account("a", 6000, at=3.0)   # 109: at or above, armed
    assert (await store.get_user("a", "u")).alert_armed
    await store.commit_sends([order(account.id, user.id, 1000)], at=4.0)
    (item,) = await alert_items(store)
    assert (item.kind, item.target, item.payload["credits_left"]) == ("alert_sms", NUMBER,
                                                                      9900)
    # Clearing the threshold stops alerts; setting it again above the credits arms it.
    await store.update_user("a", "u", UserChanges(alert_threshold=None), at=5.0)
    assert (await store.get_user("a", "u")).alert_armed
    await store.update_user("a", "u", UserChanges(alert_threshold=9000), at=6.0)
    assert (await store.get_user("a", "u")).alert_armed


async def test_store_quota_moves_cross_and_rearm(store: Store) -> None:
    account = await store.create_account("a", 20000, at=1.0)
    await store.create_user("a", "u", "x", at=1.0)
    await store.create_user("a", "other", "x", at=1.0)
    await store.update_user("a", "u", UserChanges(alert_threshold=10000, alert_email=EMAIL),
                            at=1.0)
    # Another user's quota takes credits from the account that `u` spends from.
    await store.update_user("a", "other", UserChanges(quota=15000), at=2.0)
    (item,) = await alert_items(store)
    assert (item.payload["credits_left"], item.payload["quota"]) == (5000, False)
    await store.delete_user("a", "other", at=3.0)   # the quota returns: back above, re-armed
    assert (await store.get_user("a", "u")).alert_armed
    # u's own quota: its spendable is the quota from now on.
    await store.update_user("a", "u", UserChanges(quota=5000), at=4.0)
    (item,) = await alert_items(store)
    assert (item.payload["credits_left"], item.payload["quota"]) == (5000, True)
    assert (await store.get_account("a")).balance == 15000
    await store.update_user("a", "u", UserChanges(quota=10000), at=5.0)
    assert not (await store.get_user("a", "u")).alert_armed    # at the threshold: not above
    await store.update_user("a", "u", UserChanges(quota=10050), at=5.0)
    assert (await store.get_user("a", "u")).alert_armed
    assert account.id == item.account_id


async def test_store_refund_rearms_and_the_state_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite3"
    store = open_store(path, "cli")
    await store.open()
    account = await store.create_account("a", 10100, at=1.0)
    user = await store.create_user("a", "u", "x", at=1.0)
    await store.update_user("a", "u", UserChanges(alert_threshold=10000, alert_email=EMAIL),
                            at=1.0)
    (outcome,) = await store.commit_sends([order(account.id, user.id, 200)], at=2.0)
    assert len(await alert_items(store)) == 1
    await store.close()

    store = open_store(path, "cli")
    await store.open()
    try:
        assert not (await store.get_user("a", "u")).alert_armed
        await store.commit_sends([order(account.id, user.id, 50)], at=3.0)
        assert await alert_items(store) == []     # fired state kept across the restart
        # Not billed (ptt 23): refunded, 98.5 -> 100.5, back above the threshold.
        await store.apply_updates([StateUpdate.from_ptt(outcome.ids[0], 23, 4.0)])
        assert (await store.get_user("a", "u")).alert_armed
        await store.commit_sends([order(account.id, user.id, 200)], at=5.0)
        assert len(await alert_items(store)) == 1
    finally:
        await store.close()


# -- `http2sms alert test` -------------------------------------------------------------------

async def run_cli(db: str, *args: str, port: int) -> tuple[int, str, str]:
    env = {"HTTP2SMS_SMTP_HOST": "127.0.0.1", "HTTP2SMS_SMTP_PORT": str(port),
           "HTTP2SMS_SMTP_TIMEOUT_SECONDS": "5"}
    result = await asyncio.wait_for(asyncio.to_thread(invoke, "--db", db, *args, env=env), 30)
    return result.exit_code, result.stdout, result.stderr


async def test_cli_alert_test_sends_through_every_channel(
        make_harness: Any, config: Config, sink: Sink) -> None:
    # The gateway notices the CLI's queued SMS at once.
    config = config.replace({"alerts.poll_seconds": 0.05})
    h = await make_harness(credits=500, cfg=smtp_to(config, sink.port))
    await set_alert(h, 100, support="both")
    db = config.store.path

    code, out, err = await run_cli(db, "alert", "test", ACCOUNT, LOGIN, "--json",
                                   port=sink.port)
    assert code == 0, (out, err)
    reports = {r["channel"]: r for r in json.loads(out)}
    assert (reports["mail"]["ok"], reports["mail"]["target"]) == (True, EMAIL)
    assert (reports["sms"]["ok"], reports["sms"]["target"]) == (True, NUMBER)
    assert reports["sms"]["detail"].startswith("sent as SMS")
    (_, rcpt, message), = sink.mails
    assert rcpt == [EMAIL] and message["Subject"].startswith("[test] ")
    assert "499" not in text_of(message) and "Credits left:  500" in text_of(message)
    account = await h.gateway.store.get_account(ACCOUNT)
    (sms,) = await h.gateway.store.list_messages(MessageFilter(account_id=account.id),
                                                 limit=5)
    assert (sms.kind, sms.receiver, sms.credits) == ("alert", NUMBER, 100)
    assert account.balance == 49900

    # A channel that fails: exit 1, and the line says which and why.
    await h.manage.update_user(ACCOUNT, LOGIN, alert_support="mail")
    code, out, err = await run_cli(db, "alert", "test", ACCOUNT, LOGIN, port=free_port())
    assert code == 1, (out, err)
    assert f"mail to {EMAIL}: FAILED: cannot connect to the SMTP server" in out

    # Bad input: exit 2, one line on stderr.
    await h.manage.update_user(ACCOUNT, LOGIN, alert_threshold=None)
    code, out, err = await run_cli(db, "alert", "test", ACCOUNT, LOGIN, port=sink.port)
    assert code == 2 and err.startswith("error: no low-credit alert configured"), err
    assert len(sink.mails) == 1


async def test_test_alert_input_errors_and_an_sms_nobody_sends(
        make_harness: Any, config: Config) -> None:
    h = await make_harness(credits=500)
    store, cfg = h.gateway.store, h.gateway.config
    with pytest.raises(NotFound):
        await send_test_alert(store, cfg, ACCOUNT, "nobody")
    with pytest.raises(NoAlertConfigured):
        await send_test_alert(store, cfg, ACCOUNT, LOGIN)
    await set_alert(h, 100, support="sms")
    # This gateway's poll does not run within the wait: the report says it is queued.
    assert h.gateway.alerts is not None
    await h.gateway.alerts.stop()
    (report,) = await send_test_alert(store, cfg, ACCOUNT, LOGIN, wait=0.0)
    assert (report.channel, report.ok) == ("sms", False)
    assert "queued as outbox item" in report.detail
    assert outbox(config)[0]["payload"]["test"] is True


async def test_concurrent_updates_cannot_combine_into_an_alert_without_its_address(
        make_harness: Any) -> None:
    # Each update is valid on the user it read: mail (the address is there), and no address
    # (the alert goes by SMS). Together they would make a mail alert with no address.
    h = await make_harness()
    await h.manage.update_user(ACCOUNT, LOGIN, alert_threshold=100, alert_support="sms",
                               alert_number=NUMBER, alert_email=EMAIL)
    results = await asyncio.gather(
        h.manage.update_user(ACCOUNT, LOGIN, alert_support="mail"),
        h.manage.update_user(ACCOUNT, LOGIN, alert_email=None), return_exceptions=True)
    refused = [r for r in results if isinstance(r, ValidationError)]
    assert len(refused) == 1, results  # the second to commit sees the first's change
    user = await h.gateway.store.get_user(ACCOUNT, LOGIN)
    assert user.alert_email or user.alert_support == "sms", user


async def test_the_same_threshold_sent_back_does_not_rearm_the_alert(
        make_harness: Any) -> None:
    h = await make_harness(credits=100)
    await h.manage.update_user(ACCOUNT, LOGIN, quota=10, alert_threshold=5,
                               alert_support="mail", alert_email=EMAIL)
    for _ in range(6):
        await sent_ok(h)
    assert (await h.gateway.store.get_user(ACCOUNT, LOGIN)).alert_armed is False  # fired
    await h.manage.update_user(ACCOUNT, LOGIN, quota=5)  # back to the threshold, not above
    # What a client that reads the user and PUTs it back with one change sends:
    await h.manage.update_user(ACCOUNT, LOGIN, alert_threshold=5, callback_url=None)
    assert (await h.gateway.store.get_user(ACCOUNT, LOGIN)).alert_armed is False
    await h.manage.update_user(ACCOUNT, LOGIN, alert_threshold=4)  # a new one: armed
    assert (await h.gateway.store.get_user(ACCOUNT, LOGIN)).alert_armed is True
