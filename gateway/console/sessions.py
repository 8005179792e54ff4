"""Who is logged into the web console: passwords checked behind the brute-force guard,
sessions kept in the store by the digest of a random token, each with its CSRF token.

Free of aiohttp: the views hand it a cookie's value and the caller's address.

- A session's token is 32 random bytes; only its SHA-256 is stored (a copy of the
  database opens no session), as the admin API's tokens.
- A session ends after `console.session_idle_minutes` without a request. Its last use is
  written at most once a minute (or a quarter of the idle time, when that is shorter): a
  write per page would compete with the send path for the store's write lock, and a
  minute is nothing against an expiry counted in minutes.
- Passwords are checked in the send URL's bounded queue (`VerificationCache`): a flood of
  console logins waits its turn with the send URL's checks, and past the queue's places
  is answered 429 at once, never crowding out the send path's logins.
- Failed logins count in the send URL's own guard (`LoginGuard`, given by the caller),
  keyed per address and per e-mail and address, with `[security]`'s limits: the address
  key is the send URL's, so guesses from one address count together on both. Unknown e-mails are
  checked against a decoy hash and weigh as much as known ones: neither the time nor the
  lockout tells which e-mails exist.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets

import structlog

from gateway import passwords
from gateway.clock import Clock
from gateway.config import Config
from gateway.iprules import IPAddress
from gateway.passwords import VerificationBusy, VerificationCache
from gateway.records import ConsoleSession
from gateway.security import LoginGuard, Refused
from gateway.service import ValidationError, console_email
from gateway.store import ConsoleStore

log = structlog.get_logger("gateway.console")

TOUCH_EVERY = 60.0
# The guard's account key for console logins: no API account can be named with a space.
_GUARD_ACCOUNT = "console user"


class LoginRefused(Exception):
    """A login refused; the message is what the login form shows, `status` its answer's."""

    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ConsoleAuth:
    def __init__(self, store: ConsoleStore, config: Config, clock: Clock,
                 guard: LoginGuard, verifier: VerificationCache) -> None:
        self.store = store
        self.verifier = verifier
        self.clock = clock
        self.idle_seconds = config.console.session_idle_minutes * 60
        # Never so rarely that a session in use looks idle (a 30 s expiry, say).
        self.touch_every = min(TOUCH_EVERY, self.idle_seconds / 4)
        self.guard = guard

    async def login(self, email: str, password: str, ip: IPAddress | None, *,
                    previous: str = "") -> tuple[str, ConsoleSession]:
        """A new session's token and the session; LoginRefused with the form's message.
        `previous`: the token the browser held, whose session ends (a login never keeps
        a session it was handed, nor leaves the one it replaces open)."""
        try:
            address = console_email(email)
        except ValidationError:
            address = email.strip().lower()[:254]
        now = self.clock.now()
        try:
            attempt = self.guard.begin(_GUARD_ACCOUNT, address, ip, now, known=True,
                                       allowlisted=False)
        except Refused:
            raise LoginRefused("Too many failed logins: try again later") from None
        try:
            user = await self.store.get_console_user(address)
            stored = user.password_hash if user is not None else passwords.decoy_hash()
            ok = await self.verifier.verify(password, stored,
                                            owner=self.guard.address(ip))
        except VerificationBusy:
            # Nothing was checked: no failure counted, and the caller comes back soon.
            attempt.release()
            raise LoginRefused("Too many logins being checked: try again in a few seconds",
                               status=429) from None
        except BaseException:
            attempt.release()
            raise
        if user is None or not ok:
            if attempt.failed(self.clock.now()):
                log.warning("console_login_lockout", peer=str(ip),
                            seconds=self.guard.lockout_seconds)
            delay = self.guard.delay(_GUARD_ACCOUNT, address, ip, self.clock.now())
            if delay:
                await asyncio.sleep(delay)  # wall time: the slowdown is for the caller
            raise LoginRefused("Wrong e-mail or password")
        attempt.release()
        self.guard.succeeded(_GUARD_ACCOUNT, address, ip)
        token = secrets.token_urlsafe(32)
        csrf = secrets.token_urlsafe(32)
        # Sessions left to expire are swept here, at a login, rather than by a timer.
        await self.store.delete_console_sessions(idle_before=now - self.idle_seconds)
        if previous and len(previous) <= 128:
            await self.store.delete_console_sessions(digest=digest(previous))
        await self.store.create_console_session(digest(token), address, csrf, at=now)
        session = await self.store.find_console_session(digest(token))
        assert session is not None
        return token, session

    async def session(self, token: str) -> ConsoleSession | None:
        """The live session of a cookie's token, its last use noted; None when it has
        expired or never existed."""
        if not token or len(token) > 128:
            return None
        key = digest(token)
        session = await self.store.find_console_session(key)
        if session is None:
            return None
        now = self.clock.now()
        if now - session.last_seen_at > self.idle_seconds:
            await self.store.delete_console_sessions(digest=key, idle_before=now -
                                                     self.idle_seconds)
            return None
        if now - session.last_seen_at >= self.touch_every:
            await self.store.touch_console_session(key, at=now)
        return session

    async def logout(self, session: ConsoleSession) -> None:
        await self.store.delete_console_sessions(digest=session.digest)


def csrf_matches(session: ConsoleSession, presented: str) -> bool:
    return bool(presented) and secrets.compare_digest(session.csrf.encode(),
                                                      presented.encode())


def flash_signature(session: ConsoleSession, message: str) -> str:
    """The session's mark on a message shown after a change (keyed by its secret CSRF
    token): only the console says what it has done."""
    return hmac.new(session.csrf.encode(), message.encode(), hashlib.sha256).hexdigest()[:32]
