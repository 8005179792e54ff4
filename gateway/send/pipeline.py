"""The send path: from a parsed request to an answer, in the order a refusal costs least.

Cheap checks first (parameters), then who is calling (credentials, caller IP), then what the
account allows (sender), then the price and the atomic charge through the group committer.
Nothing is written unless every check has passed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

import structlog

from gateway import iprules
from gateway.clock import Clock, SystemClock
from gateway.credits import CENTS, RateTable, format_credits
from gateway.logs import id_ranges
from gateway.metrics import Metrics
from gateway.passwords import Abandoned, VerificationBusy, VerificationCache, decoy_hash
from gateway.records import SendContext, SendOrder, SendOutcome
from gateway.security import Attempt, LoginGuard, Refused, Throttle
from gateway.send import request as rules
from gateway.send.batcher import GroupCommitter, ShuttingDown
from gateway.send.request import SendRefused
from gateway.send.responses import ContentType
from gateway.store import SendStore, StoreError, StoreUnavailable

log = structlog.get_logger("gateway.send")

# A settings change between a request's checks and its commit makes it check again; more
# than a couple in a row would take a storm of changes.
_STALE_RETRIES = 3
# What a caller refused for want of a place in the password-check queue waits before trying
# again: about the time the queue takes to move on.
_BUSY_RETRY_AFTER = 1
# The answer to a request whose client hung up before its password was checked (nginx's
# "client closed request"): nobody reads it, the log and the metrics do.
CLIENT_GONE = 499


@dataclass(frozen=True, slots=True)
class SendSettings:
    tz: ZoneInfo
    rates: RateTable
    stop_clause: str
    reply_sender: str
    max_recipients: int
    # Seconds ahead a `deferred` time may be at most ([send] max_deferral_days).
    max_deferral: float = 366 * 86400.0


@dataclass(slots=True)
class Answer:
    status: int
    fmt: ContentType
    message: str = ""
    credit_left: str = ""
    ids: tuple[int, ...] = ()
    # What the request log records; never a password.
    log: dict[str, Any] = field(default_factory=dict)
    # Throttled (429) or unavailable (503): that HTTP status with this Retry-After.
    retry_after: int = 0
    http_status: int = 200
    # Set once the caller is authenticated: only then may the account label a metric.
    account: str | None = None
    cost: int = 0

    @property
    def ok(self) -> bool:
        return self.status in (rules.ACCEPTED, rules.ACCEPTED_DEFERRED)


class Throttled(Exception):
    def __init__(self, retry_after: float, account: str | None = None) -> None:
        super().__init__(f"retry after {retry_after:g} s")
        self.retry_after = int(retry_after)
        self.account = account


class SendPipeline:
    def __init__(self, store: SendStore, committer: GroupCommitter, settings: SendSettings,
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
        self._decoy_hash = decoy_hash()

    @property
    def verifier(self) -> VerificationCache:
        """The bounded queue of password checks (scrypt), which the console's logins share:
        a flood of them waits its turn with the send URL's instead of crowding it out."""
        return self._verifier

    @property
    def guard(self) -> LoginGuard:
        """The brute-force guard of the send URL's logins, which the console's logins
        share: guesses from one address count together wherever they are made."""
        return self._guard

    async def send(self, params: dict[str, str], client_ip: iprules.IPAddress | None, *,
                   connected: Callable[[], bool] | None = None,
                   as_owner: bool = False) -> Answer:
        """The answer to one request. `connected` tells whether its client still waits for
        it: a password check still queued when its client has hung up is never run.

        `as_owner`: the account's owner sends as one of its API users from the web console,
        where it has logged in: the user's password (any non-empty text) and IP restrictions,
        which guard the send URL, are not checked; every other rule is the send URL's."""
        try:
            answer = await self._send(params, client_ip, connected, as_owner)
        except (StoreError, ShuttingDown) as exc:
            # Nothing was committed: the client may safely send again later.
            answer = Answer(503, rules.requested_format(params),
                            message="The gateway cannot store messages right now, retry later",
                            retry_after=5, http_status=503,
                            log={"outcome": 503, "error": type(exc).__name__,
                                 "account": params.get("account", "")[:64],
                                 "login": params.get("login", "")[:64],
                                 "client_ip": str(client_ip) if client_ip else None})
        self._metrics.sent(answer.status, answer.account,
                           len(answer.ids) if answer.ok else 0, answer.cost / CENTS)
        return answer

    async def _send(self, params: dict[str, str], client_ip: iprules.IPAddress | None,
                    connected: Callable[[], bool] | None, as_owner: bool = False) -> Answer:
        fmt = rules.requested_format(params)
        account: str | None = None
        log: dict[str, Any] = {"account": params.get("account", "")[:64],
                               "login": params.get("login", "")[:64],
                               "client_ip": str(client_ip) if client_ip else None}
        try:
            request = rules.parse(params, tz=self.settings.tz,
                                  max_recipients=self.settings.max_recipients,
                                  now=self._clock.now(),
                                  max_deferral=self.settings.max_deferral)
            order, outcome, account = await self._charge(request, client_ip, connected,
                                                         as_owner=as_owner)
        except SendRefused as refused:
            log["outcome"] = refused.status
            # The rule that failed, without the values (numbers, text) the message quotes.
            log["reason"] = refused.message.split(":", 1)[0]
            return Answer(refused.status, fmt, message=refused.message, log=log,
                          account=refused.account)
        except Throttled as throttled:
            log.update(outcome=429, reason="throttled", account=throttled.account)
            return Answer(429, fmt, message=f"Too many messages: retry after "
                          f"{throttled.retry_after} s", log=log,
                          retry_after=throttled.retry_after, account=throttled.account,
                          http_status=429)
        except VerificationBusy:
            # Too many password checks queued (from this address, or in all): nothing was
            # checked nor counted, and a real user is told to come back rather than that
            # the password is wrong.
            self._metrics.auth_failures.labels("busy").inc()
            log.update(outcome=429, reason="busy")
            return Answer(429, fmt, message=f"Too many logins being checked: retry after "
                          f"{_BUSY_RETRY_AFTER} s", log=log, retry_after=_BUSY_RETRY_AFTER,
                          http_status=429)
        except Abandoned:
            self._metrics.auth_failures.labels("abandoned").inc()
            log.update(outcome=CLIENT_GONE, reason="client gone")
            return Answer(CLIENT_GONE, fmt, message="The client hung up", log=log,
                          http_status=CLIENT_GONE)
        log.update(recipients=len(order.recipients), parts=order.parts,
                   credits=format_credits(order.total))
        # 101 whenever `deferred` was given, as OVH answers: scripts test for it. A time
        # already past is simply due, and goes at once.
        status = rules.ACCEPTED_DEFERRED if request.deferred_until else rules.ACCEPTED
        log.update(outcome=status, ids=id_ranges(outcome.ids))
        return Answer(status, fmt, credit_left=format_credits(outcome.credit_left),
                      ids=outcome.ids, log=log, account=account, cost=order.total)

    async def _charge(self, request: rules.SendRequest, client_ip: iprules.IPAddress | None,
                      connected: Callable[[], bool] | None = None, *, as_owner: bool = False
                      ) -> tuple[SendOrder, SendOutcome, str]:
        """Authorize, price and commit; check again whenever cached settings prove stale.

        The checks run on cached settings. A refusal is checked again on fresh ones (the
        cache may predate a change that allows the request), and a commit refused as stale
        (the settings changed since they were read) is checked again from the start.
        """
        fresh = False
        throttled_user: int | None = None
        account: str | None = None
        messages = len(request.recipients)
        try:
            for _ in range(_STALE_RETRIES):
                if as_owner:
                    context, sender = await self._authorize_owner(request)
                else:
                    context, sender = await self._authorize(request, client_ip, fresh=fresh,
                                                            connected=connected)
                account = context.user.account_name
                if throttled_user is None:
                    wait = self._throttle.take(context.user.id, messages, self._clock.now())
                    if wait:
                        raise Throttled(wait, account)
                    throttled_user = context.user.id
                stop_clause = context.account_stop_clause
                try:
                    order = rules.price(
                        request, account_id=context.user.account_id,
                        user_id=context.user.id, sender=sender,
                        stop_clause=self.settings.stop_clause if stop_clause is None
                        else stop_clause,
                        rates=self.settings.rates, settings_version=context.version)
                except SendRefused:
                    if fresh:
                        raise
                    fresh = True  # the cached STOP clause may be out of date
                    continue
                outcome = await self._committer.submit(order)
                if outcome.reason != "stale":
                    break
                fresh = True
            else:
                raise StoreUnavailable("the settings kept changing during the request")
            if not outcome.accepted:
                if outcome.reason not in ("quota", "credits"):
                    # The user or account vanished between the check and the commit.
                    raise SendRefused(rules.UNAUTHORIZED, "Invalid account, login or password")
                raise SendRefused(rules.NO_CREDITS, _no_credit_message(outcome))
            return order, outcome, account
        except BaseException as refused:
            if throttled_user is not None:
                # A refused request changes nothing, its throttle tokens included.
                self._throttle.give_back(throttled_user, messages)
            if isinstance(refused, SendRefused):
                refused.account = refused.account or account
            raise

    async def _authorize(self, request: rules.SendRequest, client_ip: iprules.IPAddress | None,
                         *, fresh: bool = False, connected: Callable[[], bool] | None = None
                         ) -> tuple[SendContext, str]:
        """Check credentials, caller IP and sender; return the context and the sender.

        A refusal on cached settings is checked again on fresh ones (the cache may predate a
        change that lets the request in), for unknown logins as for known ones, and without
        a second password check when the stored hash is the same: a wrong password and an
        unknown login cost the same work, so timing does not tell which logins exist.
        """
        guard, now = self._guard, self._clock.now()
        if guard.locked(request.account, request.login, client_ip, now):
            self._metrics.auth_failures.labels("locked").inc()
            # Locked: refuse without looking at the password, so guessing goes nowhere.
            raise SendRefused(rules.UNAUTHORIZED, _LOCKED)
        check = _PasswordCheck(self, request, client_ip, now, connected)
        try:
            context = await self._store.send_context(request.account, request.login,
                                                     fresh=fresh)
            refusal = await check.refusal(context)
            if refusal is not None and not fresh:
                context = await self._store.send_context(request.account, request.login,
                                                         fresh=True)
                refusal = await check.refusal(context)
            if refusal is None and context is not None:
                check.settle_success(context)
                if request.reply_sender:
                    return context, self.settings.reply_sender
                return context, rules.declared_sender(request.sender, context.senders) or ""
            reason, status, message = refusal or ("password", rules.UNAUTHORIZED, "")
            if reason == "ip":
                self._metrics.auth_failures.labels("ip").inc()
                check.settle_address_refusal()
                raise SendRefused(status, message, account=request.account)
            if reason != "password":
                check.settle_success(context)
                raise SendRefused(status, message, account=request.account)
            self._metrics.auth_failures.labels("password").inc()
            delay = guard.delay(request.account, request.login, client_ip, now)
            if check.settle_failure(known=context is not None):
                self._metrics.lockouts.inc()
                log.warning("login_locked", account=request.account[:64],
                            login=request.login[:64], client_ip=str(client_ip),
                            seconds=guard.lockout_seconds)
            if delay:
                # Wall time on purpose: the slowdown is for the caller, not for the clock.
                await asyncio.sleep(delay)
            raise SendRefused(status, message)
        finally:
            check.release()

    async def _authorize_owner(self, request: rules.SendRequest) -> tuple[SendContext, str]:
        """The user and sender of a send by the account's owner (see `send`)."""
        context = await self._store.send_context(request.account, request.login, fresh=True)
        if context is None:
            raise SendRefused(rules.UNAUTHORIZED, "Invalid account, login or password")
        if request.reply_sender:
            return context, self.settings.reply_sender
        sender = rules.declared_sender(request.sender, context.senders)
        if sender is None:
            raise SendRefused(rules.BAD_SENDER,
                              f"Sender {request.sender!r} is not declared on this account")
        return context, sender

    def _refusal(self, request: rules.SendRequest, client_ip: iprules.IPAddress | None,
                 context: SendContext | None, password_ok: bool) -> tuple[str, int, str] | None:
        """Why these settings refuse the request, or None."""
        if not password_ok or context is None:
            return "password", rules.UNAUTHORIZED, "Invalid account, login or password"
        if not iprules.allowed(client_ip, context.user.ip_restrictions):
            return ("ip", rules.UNAUTHORIZED,
                    f"The IP address {client_ip} is not allowed for this user")
        if not request.reply_sender \
                and rules.declared_sender(request.sender, context.senders) is None:
            return ("sender", rules.BAD_SENDER,
                    f"Sender {request.sender!r} is not declared on this account")
        return None


_LOCKED = "Too many failed logins: try again later"


class _PasswordCheck:
    """One request's password check and its place in the brute-force guard.

    The place is reserved before scrypt runs (`LoginGuard.begin`), so concurrent guesses
    cannot all be checked before the first failure is counted. A verdict already cached as
    right needs no place (nothing is guessed), nor does a guess identical to one being
    checked (it shares that check, and counts as a failure afterwards if it was wrong).
    Verdicts are kept per stored hash for the request's second look on fresh settings.

    The check waits in the verifier's queue under the caller's address key (an IPv6
    caller's network, as the guard keys it); when the queue refuses it, or drops it as its
    client hung up, the place is released by `release`: nothing was checked.
    """

    def __init__(self, pipeline: SendPipeline, request: rules.SendRequest,
                 client_ip: iprules.IPAddress | None, now: float,
                 connected: Callable[[], bool] | None = None) -> None:
        self._pipeline = pipeline
        self._request = request
        self._ip = client_ip
        self._now = now
        self._connected = connected
        self._attempt: Attempt | None = None
        self._verdicts: dict[str, bool] = {}

    async def refusal(self, context: SendContext | None) -> tuple[str, int, str] | None:
        pipeline, request = self._pipeline, self._request
        # Unknown logins are checked against the decoy so that they take as long to refuse
        # as a wrong password.
        stored = context.user.password_hash if context else pipeline._decoy_hash
        verdict = self._verdicts.get(stored)
        if verdict is None:
            verifier = pipeline._verifier
            verdict = verifier.known_good(request.password, stored)
            if not verdict:
                # The same guess already being checked is not another check: it joins that
                # one (a burst of right credentials at start-up must not look like guessing).
                if self._attempt is None and not verifier.in_flight(request.password, stored):
                    self._attempt = self._begin(context)
                verdict = await verifier.verify(
                    request.password, stored, owner=pipeline._guard.address(self._ip),
                    wanted=self._connected)
            self._verdicts[stored] = verdict
        return pipeline._refusal(request, self._ip, context, verdict)

    def _begin(self, context: SendContext | None) -> Attempt:
        restrictions = context.user.ip_restrictions if context else ()
        try:
            return self._pipeline._guard.begin(
                self._request.account, self._request.login, self._ip, self._now,
                known=context is not None,
                allowlisted=bool(restrictions) and iprules.allowed(self._ip, restrictions))
        except Refused as refused:
            if str(refused) == "busy":
                # Counted and answered as the verification queue's own "busy": 429 and
                # Retry-After, never a 401 (bad credentials, to OVH scripts).
                raise VerificationBusy from None
            self._pipeline._metrics.auth_failures.labels(str(refused)).inc()
            raise SendRefused(rules.UNAUTHORIZED, _LOCKED) from None

    def settle_success(self, context: SendContext | None) -> None:
        guard = self._pipeline._guard
        if self._attempt is not None:
            self._attempt.release()
        if guard.succeeded(self._request.account, self._request.login, self._ip, self._now):
            self._pipeline._metrics.shared_addresses.inc()
            log.warning("shared_address", client_ip=str(self._ip),
                        users=guard.shared_address_users,
                        hint="many users log in from this one address: if it is a proxy, "
                             "add it to server.trusted_proxies, or its lockouts hit them all")

    def settle_address_refusal(self) -> None:
        if self._attempt is not None:
            self._attempt.refused_address(self._now)
        else:
            self._pipeline._guard.refused_address(self._request.account, self._request.login,
                                                  self._ip, self._now)

    def settle_failure(self, *, known: bool) -> bool:
        if self._attempt is None:  # a guess that joined the same guess's check
            return self._pipeline._guard.failed(self._request.account, self._request.login,
                                                self._ip, self._now, known=known)
        return self._attempt.failed(self._now)

    def release(self) -> None:
        if self._attempt is not None:
            self._attempt.release()


def _no_credit_message(outcome: SendOutcome) -> str:
    if outcome.reason == "quota":
        return (f"Not enough quota: {format_credits(outcome.credit_left)} credits left "
                "on this user's quota")
    return f"Not enough credits: {format_credits(outcome.credit_left)} credits left"
