"""Who a request to the admin API is: its bearer token, checked against the bootstrap token
(`admin.token`) or the tokens of the store, and wrong tokens throttled per caller address.

Wrong tokens are counted per address (an IPv6 caller by its network) in a guard of their
own, as failed logins are on the send URL: attempts reserve their place before the check,
so at most `security.max_failures` checks per address are decided however many arrive at
once; past half of them each refusal is slowed; at the limit the address is refused for
`security.lockout_seconds` without any check, the right token included. A right token does
not clear the count: whoever holds one token could otherwise guess at another between two
of its own requests. A request without a token is no guess, and is not counted.

Free of aiohttp: every edge that takes the admin token (the admin API, `/metrics`) asks the
gateway's one `AdminAuth`, so guesses at one edge count at the other.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress

import structlog

from gateway import tokens
from gateway.clock import Clock
from gateway.config import SecurityConfig
from gateway.iprules import IPAddress
from gateway.security import LoginGuard, Refused, bearer_matches
from gateway.store import StoreUnavailable, TokenStore
from gateway.tokens import Access

log = structlog.get_logger("gateway.admin_auth")

# A token's last use is written at most this often: a write per request would compete
# with the send path for the store's write lock.
LAST_USED_EVERY = 60.0


class Denied(Exception):
    """No access: `status` 401 (no or a wrong token), 404 (the admin API is disabled) or
    429 (too many wrong tokens from this address; `retry_after` seconds)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class AdminAuth:
    def __init__(self, bootstrap: str, store: TokenStore, clock: Clock,
                 security: SecurityConfig) -> None:
        self.bootstrap = bootstrap
        self.store = store
        self.clock = clock
        self.guard = LoginGuard(security.max_failures, security.lockout_seconds,
                                ipv6_prefix=security.ipv6_prefix)

    async def check(self, authorization: str, ip: IPAddress | None) -> Access:
        """The access of the `Authorization` header's token, from the caller `ip`."""
        if not self.bootstrap and not await self.store.has_tokens():
            raise Denied(404, "the admin API is disabled: set admin.token "
                              "(HTTP2SMS_ADMIN_TOKEN) or create a token with "
                              "http2sms token create")
        scheme, _, presented = authorization.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise Denied(401, "missing or invalid admin token")
        try:
            attempt = self.guard.begin("admin", "", ip, self.clock.now(), known=True,
                                       allowlisted=True)
        except Refused:
            raise Denied(429, "too many wrong admin tokens from this address: retry later",
                         retry_after=max(1, round(self.guard.lockout_seconds))) from None
        try:
            access = await self._match(authorization, presented)
        except BaseException:
            attempt.release()  # an error or the caller gone: no verdict on the token
            raise
        if access is not None:
            attempt.release()
            return access
        now = self.clock.now()
        if attempt.failed(now):
            log.warning("admin_token_lockout", peer=str(ip),
                        seconds=self.guard.lockout_seconds)
        delay = self.guard.delay("admin", "", ip, now)
        if delay:
            await asyncio.sleep(delay)
        raise Denied(401, "missing or invalid admin token")

    async def _match(self, authorization: str, presented: str) -> Access | None:
        if self.bootstrap and bearer_matches(authorization, self.bootstrap):
            return tokens.BOOTSTRAP
        parts = tokens.split(presented)
        if parts is None:
            return None
        key, secret = parts
        token = await self.store.find_token(key)
        if token is None or not tokens.matches(token.digest, key, secret):
            return None
        now = self.clock.now()
        if token.last_used_at is None or now - token.last_used_at >= LAST_USED_EVERY:
            # Bookkeeping only: a store that cannot write now must not refuse the request.
            with suppress(StoreUnavailable):
                await self.store.token_used(token.id, at=now)
        return Access(token.name,
                      None if token.accounts is None else frozenset(token.accounts))
