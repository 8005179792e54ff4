"""Low-credit alerts: the mail and the SMS that tell an account owner credits are running out.

The store decides *when* an alert fires (inside the transaction that moves the credits, so
concurrent sends crossing a threshold together fire once) and queues one outbox item per
channel: `alert_mail` (target: the alertEmail) and `alert_sms` (target: the alertNumber).
This module delivers them through the generic outbox worker, so they are durable and retried
like callbacks, and never slow the send that fired them:

- mail goes to the SMTP server of `[smtp]` with aiosmtplib: plain text, short subject;
- SMS goes through the gateway's own send path (the group committer), charged to the account
  and kept in its history as `kind='alert'` messages. An account that cannot pay for it is a
  permanent failure: the item dies with the reason and a warning is logged, while the mail,
  a separate item, still goes.

`send_test_alert` backs `http2sms alert test`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import aiosmtplib
import structlog

from gateway import encoding
from gateway.clock import Clock, SystemClock, sleep_until
from gateway.config import Config, ConfigError, SmtpConfig
from gateway.credits import RateTable, format_credits
from gateway.hooks.outbox import AttemptFailed, OutboxWorker, Result, RetryPolicy
from gateway.metrics import Metrics
from gateway.records import MessageFilter, OutboxItem, SendOrder, SendOutcome
from gateway.store import ManagementStore, OutboxStore, ReadStore, StoreError

log = structlog.get_logger("gateway.alerts")


class AlertStore(OutboxStore, ManagementStore, ReadStore, Protocol):
    """What the alerts use of the store: their outbox items, the user and account they
    are about, and the message an alert SMS became."""

KIND_MAIL = "alert_mail"
KIND_SMS = "alert_sms"
KINDS = (KIND_MAIL, KIND_SMS)
CHANNELS = {KIND_MAIL: "mail", KIND_SMS: "sms"}
SECURITY = ("none", "starttls", "tls")

Submit = Callable[[SendOrder], Awaitable[SendOutcome]]


@dataclass(frozen=True, slots=True)
class Notice:
    """What an alert says, read from its outbox payload (amounts in hundredths)."""

    account: str
    login: str
    credits_left: int
    threshold: int
    # The credits left are the user's quota (else the account's balance).
    quota: bool = False
    test: bool = False

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Notice:
        return cls(str(payload["account"]), str(payload["login"]),
                   int(payload["credits_left"]), int(payload["threshold"]),
                   bool(payload.get("quota", False)), bool(payload.get("test", False)))

    def payload(self) -> dict[str, Any]:
        return {"account": self.account, "login": self.login,
                "credits_left": self.credits_left, "threshold": self.threshold,
                "quota": self.quota, "test": self.test}


# -- the mail --------------------------------------------------------------------------------

def mail_subject(notice: Notice) -> str:
    prefix = "[test] " if notice.test else ""
    return f"{prefix}Low SMS credits: {notice.account} / {notice.login}"


def mail_body(notice: Notice, *, top_up_hint: str, at: float, tz: ZoneInfo) -> str:
    pool = (f"the quota of user {notice.login}" if notice.quota
            else f"the balance of account {notice.account}")
    when = datetime.fromtimestamp(at, tz).strftime("%Y-%m-%d %H:%M:%S %Z")
    hint = top_up_hint.replace("<account>", notice.account).replace("<login>", notice.login)
    if notice.test:
        intro = ("This is a test of the low-credit alert of API user "
                 f"{notice.login} on SMS account {notice.account}; nothing needs doing.")
    else:
        intro = (f"The SMS credits of API user {notice.login} on SMS account "
                 f"{notice.account} fell below the alert threshold.")
    lines = [
        intro,
        "",
        f"Account:       {notice.account}",
        f"API user:      {notice.login}",
        f"Credits left:  {format_credits(notice.credits_left)} ({pool})",
        f"Threshold:     {format_credits(notice.threshold)}",
        f"Date:          {when}",
        "",
        hint,
        *([f"Credits added to account {notice.account} do not reach the quota of "
           f"{notice.login}: raise the",
           f"quota itself (http2sms user set {notice.account} {notice.login} --quota <amount>,",
           "or quotaLeft in the admin API); it is taken from the account."]
          if notice.quota else []),
        "",
        "This alert is sent once each time the credits fall below the threshold; it is sent",
        "again only after they have risen back above the threshold.",
        "",
        "-- ",
        "http2sms-gateway",
    ]
    return "\n".join(lines) + "\n"


def build_mail(notice: Notice, *, to: str, smtp: SmtpConfig, top_up_hint: str, at: float,
               tz: ZoneInfo, message_id: str | None = None) -> EmailMessage:
    message = EmailMessage()
    message["From"] = smtp.sender
    message["To"] = to
    message["Subject"] = mail_subject(notice)
    message["Date"] = format_datetime(datetime.fromtimestamp(at, tz))
    message["Message-ID"] = message_id or make_msgid(domain=_domain(smtp.sender))
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies to this
    message.set_content(mail_body(notice, top_up_hint=top_up_hint, at=at, tz=tz))
    return message


def _domain(address: str) -> str:
    domain = address.rpartition("@")[2].strip(" >")
    return domain or "localhost"


class Mailer:
    """One SMTP delivery per call; failures become `AttemptFailed` with a loggable detail."""

    def __init__(self, config: SmtpConfig) -> None:
        if config.security not in SECURITY:
            raise ConfigError(f"setting smtp.security: one of {', '.join(SECURITY)} "
                              f"(got {config.security!r})")
        self._config = config
        # aiosmtplib's timeout is per step; this bounds a whole delivery, so the outbox
        # lease (longer) can never expire under an attempt still running.
        self.attempt_timeout = 4 * config.timeout_seconds

    async def send(self, message: EmailMessage, to: str) -> str:
        cfg = self._config
        where = f"{cfg.host}:{cfg.port}"
        try:
            async with asyncio.timeout(self.attempt_timeout):
                _, reply = await aiosmtplib.send(
                    # An explicit envelope: recipients are never parsed back out of the
                    # headers, where an odd address could turn into two.
                    message, sender=cfg.sender, recipients=[to],
                    hostname=cfg.host, port=cfg.port,
                    username=cfg.username or None, password=cfg.password or None,
                    use_tls=cfg.security == "tls",
                    # False, not None: "none" must not upgrade on its own to a TLS whose
                    # certificate nobody configured.
                    start_tls=cfg.security == "starttls",
                    timeout=cfg.timeout_seconds)
        # Details carry codes, never the server's text: it often quotes the address.
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = sorted({r.code for r in exc.recipients})
            raise AttemptFailed(f"SMTP recipient refused ({', '.join(map(str, codes))})",
                                permanent=all(c >= 500 for c in codes)) from None
        except aiosmtplib.SMTPRecipientRefused as exc:
            raise AttemptFailed(f"SMTP recipient refused ({exc.code})",
                                permanent=exc.code >= 500) from None
        except aiosmtplib.SMTPAuthenticationError as exc:
            # A configuration problem: retried, so fixing the settings and restarting
            # still delivers what was queued meanwhile.
            raise AttemptFailed(f"SMTP login refused ({exc.code})") from None
        except aiosmtplib.SMTPResponseException as exc:
            raise AttemptFailed(f"SMTP {type(exc).__name__} ({exc.code})") from None
        except aiosmtplib.SMTPServerDisconnected:
            raise AttemptFailed(f"the SMTP server {where} closed the connection") from None
        except (aiosmtplib.SMTPConnectError, ConnectionError) as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            reason = cause.strerror or "connection failed"
            raise AttemptFailed(f"cannot connect to the SMTP server {where}: "
                                f"{reason}") from None
        except TimeoutError:
            raise AttemptFailed(f"the SMTP server {where} did not answer in time") from None
        except aiosmtplib.SMTPException as exc:
            raise AttemptFailed(f"SMTP {type(exc).__name__}") from None
        except OSError as exc:
            raise AttemptFailed(f"SMTP server {where}: {exc.strerror or 'network error'}"
                                ) from None
        return f"mail accepted by {where}: {reply.strip()[:60]}" if reply else \
            f"mail accepted by {where}"


# -- the SMS ---------------------------------------------------------------------------------

def sms_text(notice: Notice) -> str:
    left, threshold = format_credits(notice.credits_left), format_credits(notice.threshold)
    if notice.test:
        return (f"Test of the low-credit alert of {notice.account} (user {notice.login}): "
                f"{left} credits left, threshold {threshold}.")
    return (f"Low SMS credits on {notice.account} (user {notice.login}): {left} left, "
            f"below your alert threshold of {threshold}.")


def sms_tag(item_id: int) -> str:
    # Ties the message to its outbox item (at most 20 characters, like any tag): a retry
    # after a crash between the commit and the recorded result finds it and does not
    # charge the account twice.
    return f"alert-{item_id}"


def sms_order(notice: Notice, *, account_id: int, number: str, sender: str, tag: str,
              rates: RateTable) -> SendOrder:
    body = sms_text(notice)
    seg = encoding.segment(body)
    return SendOrder(
        account_id=account_id, user_id=None, login=notice.login, sender=sender, body=body,
        coding=int(seg.coding), parts=seg.parts, klass=1, no_stop=True, tag=tag,
        recipients=(number,), costs=tuple(rates.cost([number], seg.parts)), kind="alert")


# -- the outbox handler ----------------------------------------------------------------------

class AlertHandler:
    """Runs `alert_mail` and `alert_sms` outbox items."""

    kinds = KINDS

    def __init__(self, config: Config, store: AlertStore, clock: Clock, submit: Submit,
                 rates: RateTable, tz: ZoneInfo, *, metrics: Metrics | None = None) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._submit = submit
        self._rates = rates
        self._tz = tz
        self.mailer = Mailer(config.smtp)
        alerts = (metrics or Metrics()).alerts_sent
        self._results = {(kind, result): alerts.labels(channel, result)
                         for kind, channel in CHANNELS.items()
                         for result in ("ok", "retry", "dead")}

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def key(self, kind: str, target: str) -> str:
        # Every mail goes to the one SMTP server: its key bounds the open SMTP sessions.
        return "smtp" if kind == KIND_MAIL else "sms"

    def log_fields(self, item: OutboxItem) -> dict[str, Any]:
        # Never the target: an address or a phone number is personal data.
        return {"channel": CHANNELS.get(item.kind, item.kind),
                "account": str(item.payload.get("account", ""))[:64],
                "login": str(item.payload.get("login", ""))[:64]}

    def observe(self, item: OutboxItem, result: Result) -> None:
        counter = self._results.get((item.kind, result))
        if counter is not None:
            counter.inc()

    async def handle(self, item: OutboxItem) -> str:
        try:
            notice = Notice.from_payload(item.payload)
        except (KeyError, TypeError, ValueError) as exc:
            raise AttemptFailed(f"invalid alert: {type(exc).__name__}",
                                permanent=True) from None
        if item.kind == KIND_MAIL:
            return await self._mail(item, notice)
        if item.kind == KIND_SMS:
            return await self._sms(item, notice)
        raise AttemptFailed(f"unknown alert kind {item.kind!r}", permanent=True)

    async def _mail(self, item: OutboxItem, notice: Notice) -> str:
        # One Message-ID per item: a mail sent again after a crash reads as a duplicate.
        message_id = f"<http2sms-alert-{item.id}.{int(item.created_at)}@" \
                     f"{_domain(self._config.smtp.sender)}>"
        try:
            message = build_mail(notice, to=item.target, smtp=self._config.smtp,
                                 top_up_hint=self._config.alerts.top_up_hint,
                                 at=item.created_at, tz=self._tz, message_id=message_id)
        except (ValueError, TypeError) as exc:  # a header the email package rejects
            raise AttemptFailed(f"invalid alert mail: {type(exc).__name__}",
                                permanent=True) from None
        detail = await self.mailer.send(message, item.target)
        log.info("alert_sent", channel="mail", account=notice.account, login=notice.login,
                 item=item.id, test=notice.test)
        return detail

    async def _sms(self, item: OutboxItem, notice: Notice) -> str:
        tag = sms_tag(item.id)
        try:
            done = await self._store.list_messages(
                MessageFilter(account_id=item.account_id, tag=tag, kind="alert"), limit=1)
            if done:
                return f"sent as SMS {done[0].id}"
            order = sms_order(notice, account_id=item.account_id, number=item.target,
                              sender=self._config.alerts.sms_sender, tag=tag,
                              rates=self._rates)
            outcome = await self._submit(order)
        except (StoreError, RuntimeError) as exc:
            # The store is unavailable or the gateway is stopping: try again later.
            raise AttemptFailed(f"cannot send now: {type(exc).__name__}") from None
        except encoding.EncodingError as exc:
            raise AttemptFailed(f"invalid alert text: {exc}", permanent=True) from None
        if not outcome.accepted:
            if outcome.reason in ("credits", "quota"):
                log.warning("alert_sms_unpaid", account=notice.account, login=notice.login,
                            item=item.id, needed=format_credits(order.total),
                            credits_left=format_credits(outcome.credit_left))
                raise AttemptFailed(
                    f"the account cannot pay for the alert SMS ({format_credits(order.total)}"
                    f" needed, {format_credits(outcome.credit_left)} left)", permanent=True)
            raise AttemptFailed(f"alert SMS refused: {outcome.reason}", permanent=True)
        # message_id: the alert SMS is followed through delivery like any other.
        log.info("alert_sent", channel="sms", account=notice.account, login=notice.login,
                 item=item.id, message_id=outcome.ids[0], test=notice.test)
        return f"sent as SMS {outcome.ids[0]}"


class AlertService:
    """The alert outbox worker, and what tells it that new alerts are waiting.

    Alerts are queued by the store inside other transactions; the worker hears of them
    through the send path's after-commit hook, when a commit says it queued one, and, for
    alerts queued by another process or an admin change, a poll every
    `alerts.poll_seconds` (a cheap read decides whether to wake it).
    """

    def __init__(self, config: Config, store: AlertStore, clock: Clock, submit: Submit,
                 rates: RateTable, tz: ZoneInfo, *, metrics: Metrics | None = None) -> None:
        self._store = store
        self._clock = clock
        self._poll = max(0.01, config.alerts.poll_seconds)
        cb = config.callbacks
        self.handler = AlertHandler(config, store, clock, submit, rates, tz, metrics=metrics)
        self.worker = OutboxWorker(
            store, clock, self.handler,
            # Retried like callbacks: an SMTP server down for hours still gets the mail.
            RetryPolicy(first_retry=cb.first_retry_seconds, max_retry=cb.max_retry_seconds,
                        give_up_after=cb.give_up_after_hours * 3600.0,
                        jitter=cb.jitter_ratio),
            max_concurrency=2 * max(1, config.smtp.max_connections),
            per_key=max(1, config.smtp.max_connections),
            lease=self.handler.mailer.attempt_timeout + 60.0, name="alerts")
        self._check = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def on_commit(self, outcomes: Sequence[SendOutcome]) -> None:
        """After-commit hook of the send path: never waits.

        Only commits that queued an alert: checking after every commit was a read per
        group commit, 2% of the send process's CPU under scripts/bench.
        """
        if any(outcome.alert_queued for outcome in outcomes):
            self._check.set()

    async def start(self) -> None:
        await self.worker.start()
        self._task = asyncio.create_task(self._watch(), name="alerts-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.worker.stop()

    async def _watch(self) -> None:
        while True:
            await sleep_until(self._clock, self._clock.now() + self._poll, self._check)
            try:
                due = await self._store.next_outbox_at(KINDS)
            except Exception as exc:  # the worker's own loop reports store trouble
                log.debug("alerts_check_failed", error=type(exc).__name__)
                continue
            if due is not None and due <= self._clock.now():
                self.worker.wake()


# -- `http2sms alert test` -------------------------------------------------------------------

class NoAlertConfigured(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ChannelReport:
    channel: str      # "mail" or "sms"
    target: str
    ok: bool
    detail: str


async def send_test_alert(store: AlertStore, config: Config, account: str, login: str, *,
                          wait: float = 30.0, clock: Clock | None = None,
                          poll_interval: float = 0.2) -> list[ChannelReport]:
    """Send a test alert through the user's configured channels and say what happened.

    The mail is sent from here, at once, with the same settings as the gateway's, so an
    SMTP problem shows now. The SMS can only be delivered by the running gateway (it owns
    the operator): it is queued like a real alert and waited for up to `wait` seconds; it
    is charged and kept in the history like any alert SMS.
    """
    clock = clock or SystemClock()
    user = await store.get_user(account, login)
    if user.alert_threshold is None:
        raise NoAlertConfigured(f"no low-credit alert configured for {login!r} in "
                                f"{account!r} (alertThreshold is not set)")
    mail_to = user.alert_email if user.alert_support in ("mail", "both") else None
    sms_to = user.alert_number if user.alert_support in ("sms", "both") else None
    if not mail_to and not sms_to:
        raise NoAlertConfigured(f"no alert channel configured for {login!r} in {account!r}: "
                                f"support is {user.alert_support} without its address")
    spendable = user.quota_left if user.quota_active else \
        (await store.get_account(account)).balance
    notice = Notice(account, login, spendable, user.alert_threshold, user.quota_active,
                    test=True)
    reports: list[ChannelReport] = []
    if mail_to:
        try:
            message = build_mail(notice, to=mail_to, smtp=config.smtp,
                                 top_up_hint=config.alerts.top_up_hint, at=clock.now(),
                                 tz=ZoneInfo(config.send.timezone))
            detail = await Mailer(config.smtp).send(message, mail_to)
            reports.append(ChannelReport("mail", mail_to, True, detail))
        except AttemptFailed as exc:
            reports.append(ChannelReport("mail", mail_to, False, exc.detail))
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:  # a header the email package rejects
            reports.append(ChannelReport("mail", mail_to, False,
                                         f"invalid alert mail: {type(exc).__name__}"))
    if sms_to:
        item_id = await store.enqueue_outbox(KIND_SMS, account_id=user.account_id,
                                             user_id=user.id, target=sms_to,
                                             payload=notice.payload(), at=clock.now())
        reports.append(await _await_sms(store, item_id, sms_to, wait, poll_interval))
    return reports


async def _await_sms(store: AlertStore, item_id: int, target: str, wait: float,
                     poll_interval: float) -> ChannelReport:
    deadline = time.monotonic() + wait
    while True:
        status = await store.outbox_status(item_id)
        if status is not None and status[0] == "done":
            return ChannelReport("sms", target, True, status[2])
        if status is not None and status[0] == "dead":
            return ChannelReport("sms", target, False, status[2])
        if time.monotonic() >= deadline:
            last = f" (last attempt: {status[2]})" if status and status[2] else ""
            return ChannelReport(
                "sms", target, False,
                f"not sent within {wait:g} s: queued as outbox item {item_id}, it goes out "
                f"when the gateway runs — is it running?{last}")
        await asyncio.sleep(poll_interval)
