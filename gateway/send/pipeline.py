"""The send path: from a parsed request to an answer, in the order a refusal costs least.

Cheap checks first (parameters), then who is calling (credentials, caller IP), then what the
account allows (sender), then the price and the atomic charge through the group committer.
Nothing is written unless every check has passed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from gateway import iprules
from gateway.clock import Clock, SystemClock
from gateway.credits import CENTS, RateTable, format_credits
from gateway.metrics import Metrics
from gateway.passwords import VerificationCache, hash_password
from gateway.security import LoginGuard, Throttle
from gateway.send import request as rules
from gateway.send.batcher import GroupCommitter
from gateway.send.request import SendRefused
from gateway.send.responses import ContentType
from gateway.store import SendContext, SendOutcome, Store

log = structlog.get_logger("gateway.send")

# A settings change between a request's checks and its commit makes it check again; more
# than a couple in a row would take a storm of changes.
_STALE_RETRIES = 3


@dataclass(frozen=True, slots=True)
class SendSettings:
    tz: ZoneInfo
    rates: RateTable
    stop_clause: str
    reply_sender: str
    max_recipients: int


@dataclass(slots=True)
class Answer:
    status: int
    fmt: ContentType
    message: str = ""
    credit_left: str = ""
    ids: tuple[int, ...] = ()
    # What the request log records; never a password.
    log: dict[str, Any] = field(default_factory=dict)
    # Throttled: HTTP 429 with this Retry-After instead of an outcome code.
    retry_after: int = 0
    # Set once the caller is authenticated: only then may the account label a metric.
    account: str | None = None
    cost: int = 0

    @property
    def ok(self) -> bool:
        return self.status in (rules.ACCEPTED, rules.ACCEPTED_DEFERRED)


class Throttled(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after:g} s")
        self.retry_after = int(retry_after)


class SendPipeline:
    def __init__(self, store: Store, committer: GroupCommitter, settings: SendSettings,
                 verifier: VerificationCache | None = None, *, guard: LoginGuard | None = None,
                 throttle: Throttle | None = None, clock: Clock | None = None,
                 metrics: Metrics | None = None) -> None:
        self._store = store
        self._committer = committer
        self.settings = settings
        self._verifier = verifier or VerificationCache()
        self._guard = guard or LoginGuard(10, 300.0)
        self._throttle = throttle or Throttle(0.0, 1)
        self._clock = clock or SystemClock()
        self._metrics = metrics or Metrics()
        # Unknown logins are checked against this hash so that they take as long to refuse
        # as a wrong password: the timing must not tell which logins exist.
        self._decoy_hash = hash_password("decoy0000")

    async def send(self, params: dict[str, str], client_ip: iprules.IPAddress | None) -> Answer:
        answer = await self._send(params, client_ip)
        m = self._metrics
        account = m.account(answer.account or "")
        m.send_requests.labels(str(answer.status), *account).inc()
        if answer.ok:
            m.messages_accepted.labels(*account).inc(len(answer.ids))
            m.credits_spent.labels(*account).inc(answer.cost / CENTS)
        return answer

    async def _send(self, params: dict[str, str],
                    client_ip: iprules.IPAddress | None) -> Answer:
        fmt = rules.requested_format(params)
        account: str | None = None
        log: dict[str, Any] = {"account": params.get("account", "")[:64],
                               "login": params.get("login", "")[:64],
                               "client_ip": str(client_ip) if client_ip else None}
        try:
            request = rules.parse(params, tz=self.settings.tz,
                                  max_recipients=self.settings.max_recipients)
            throttled = False
            for _ in range(_STALE_RETRIES):
                context, sender = await self._authorize(request, client_ip)
                account = context.user.account_name
                if not throttled:
                    wait = self._throttle.take(context.user.id, len(request.recipients),
                                               self._clock.now())
                    if wait:
                        raise Throttled(wait)
                    throttled = True
                order = rules.price(
                    request, account_id=context.user.account_id, user_id=context.user.id,
                    sender=sender,
                    stop_clause=context.account_stop_clause if context.account_stop_clause
                    is not None else self.settings.stop_clause,
                    rates=self.settings.rates, settings_version=context.version)
                outcome = await self._committer.submit(order)
                if outcome.reason != "stale":
                    break
                # The settings changed after they were read: check the request again.
            log.update(recipients=len(order.recipients), parts=order.parts,
                       credits=format_credits(order.total))
            if not outcome.accepted:
                if outcome.reason not in ("quota", "credits"):
                    # The user or account vanished between the check and the commit.
                    raise SendRefused(rules.UNAUTHORIZED, "Invalid account, login or password")
                raise SendRefused(rules.NO_CREDITS, _no_credit_message(outcome))
        except SendRefused as refused:
            log["outcome"] = refused.status
            log["reason"] = refused.message
            return Answer(refused.status, fmt, message=refused.message, log=log,
                          account=account or refused.account)
        except Throttled as throttled:
            log.update(outcome=429, reason="throttled")
            return Answer(429, fmt, message=f"Too many messages: retry after "
                          f"{throttled.retry_after} s", log=log,
                          retry_after=throttled.retry_after, account=account)
        status = rules.ACCEPTED_DEFERRED if request.deferred_until else rules.ACCEPTED
        log.update(outcome=status, ids=_id_range(outcome.ids))
        return Answer(status, fmt, credit_left=format_credits(outcome.credit_left),
                      ids=outcome.ids, log=log, account=account, cost=order.total)

    async def _authorize(self, request: rules.SendRequest,
                         client_ip: iprules.IPAddress | None) -> tuple[SendContext, str]:
        """Check credentials, caller IP and sender; return the context and the sender."""
        guard, now = self._guard, self._clock.now()
        if guard.locked(request.account, request.login, client_ip, now):
            self._metrics.auth_failures.labels("locked").inc()
            # Locked: refuse without looking at the password, so guessing goes nowhere.
            raise SendRefused(rules.UNAUTHORIZED, "Too many failed logins: try again later")
        context = await self._store.send_context(request.account, request.login)
        refusal = await self._refusal(request, client_ip, context)
        if refusal is not None and context is not None:
            # The cached settings may predate a change that lets this request in.
            context = await self._store.send_context(request.account, request.login,
                                                     fresh=True)
            refusal = await self._refusal(request, client_ip, context)
        if refusal is None and context is not None:
            guard.succeeded(request.account, request.login, client_ip)
            return context, (self.settings.reply_sender if request.reply_sender
                             else request.sender)
        reason, status, message = refusal or ("password", rules.UNAUTHORIZED, "")
        if reason != "password":
            guard.succeeded(request.account, request.login, client_ip)
            if reason == "ip":
                self._metrics.auth_failures.labels("ip").inc()
            raise SendRefused(status, message, account=request.account)
        self._metrics.auth_failures.labels("password").inc()
        delay = guard.delay(request.account, request.login, client_ip, now)
        if guard.failed(request.account, request.login, client_ip, now):
            self._metrics.lockouts.inc()
            log.warning("login_locked", account=request.account[:64],
                        login=request.login[:64], client_ip=str(client_ip),
                        seconds=guard.lockout_seconds)
        if delay:
            # Wall time on purpose: the slowdown is for the caller, not for the clock.
            await asyncio.sleep(delay)
        raise SendRefused(status, message)

    async def _refusal(self, request: rules.SendRequest, client_ip: iprules.IPAddress | None,
                       context: SendContext | None) -> tuple[str, int, str] | None:
        """Why these settings refuse the request, or None; unknown logins cost a hash too."""
        stored = context.user.password_hash if context else self._decoy_hash
        if not await self._verifier.verify(request.password, stored) or context is None:
            return "password", rules.UNAUTHORIZED, "Invalid account, login or password"
        if not iprules.allowed(client_ip, context.user.ip_restrictions):
            return ("ip", rules.UNAUTHORIZED,
                    f"The IP address {client_ip} is not allowed for this user")
        if not request.reply_sender and request.sender not in context.senders:
            return ("sender", rules.BAD_SENDER,
                    f"Sender {request.sender!r} is not declared on this account")
        return None


def _no_credit_message(outcome: SendOutcome) -> str:
    if outcome.reason == "quota":
        return (f"Not enough quota: {format_credits(outcome.credit_left)} credits left "
                "on this user's quota")
    return f"Not enough credits: {format_credits(outcome.credit_left)} credits left"


def _id_range(ids: tuple[int, ...]) -> str:
    if not ids:
        return ""
    return str(ids[0]) if len(ids) == 1 else f"{ids[0]}-{ids[-1]}"
