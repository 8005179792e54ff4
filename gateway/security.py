"""Brute-force guard and per-user throttle for the send URL, in memory and clock-driven.

Failed logins are counted per (account, login, caller IP) and per caller IP. Past half the
limit each refusal is slowed; at the limit the key is locked for `lockout_seconds` and
answered 401 without checking the password. Locks are deliberately not per login alone:
that would let anyone lock a user out from anywhere, while a correct password from another
address must keep working. Many addresses hammering one login are still slowed, since the
slowdown also counts failures per login.
"""

from __future__ import annotations

import hmac
import math
from dataclasses import dataclass

from gateway.iprules import IPAddress

# Above this many tracked keys, expired entries are swept (bounded memory under a spray).
_SWEEP_AT = 50_000


@dataclass(slots=True)
class _Failures:
    count: int
    last_at: float
    locked_until: float = 0.0


class LoginGuard:
    def __init__(self, max_failures: int, lockout_seconds: float) -> None:
        self.max_failures = max(1, max_failures)
        self.lockout_seconds = lockout_seconds
        self._by_key: dict[tuple[object, ...], _Failures] = {}

    def locked(self, account: str, login: str, ip: IPAddress | None, now: float) -> bool:
        if not self._by_key:
            return False  # no failure on record, the usual case: 2% of a send's CPU otherwise
        return any(self._locked(key, now) for key in self._keys(account, login, ip))

    def delay(self, account: str, login: str, ip: IPAddress | None, now: float) -> float:
        """Seconds to hold a refusal: grows once half the allowed failures are used."""
        keys = [*self._keys(account, login, ip), ("login", account, login)]
        worst = max(self._count(key, now) for key in keys)
        half = self.max_failures // 2
        return 0.0 if worst <= half else min(0.25 * (worst - half), 2.0)

    def failed(self, account: str, login: str, ip: IPAddress | None, now: float) -> bool:
        """Count a failure; True when it has just locked a key."""
        locked = False
        for key in [*self._keys(account, login, ip), ("login", account, login)]:
            entry = self._by_key.get(key)
            if entry is None or now - entry.last_at > self.lockout_seconds:
                entry = self._by_key[key] = _Failures(0, now)
            entry.count += 1
            entry.last_at = now
            if key[0] != "login" and entry.count >= self.max_failures \
                    and entry.locked_until <= now:
                entry.locked_until = now + self.lockout_seconds
                locked = True
        if len(self._by_key) > _SWEEP_AT:
            self._sweep(now)
        return locked

    def succeeded(self, account: str, login: str, ip: IPAddress | None) -> None:
        self._by_key.pop(("user", account, login, ip), None)

    def _keys(self, account: str, login: str, ip: IPAddress | None) -> list[tuple[object, ...]]:
        return [("user", account, login, ip), ("ip", ip)]

    def _locked(self, key: tuple[object, ...], now: float) -> bool:
        entry = self._by_key.get(key)
        return entry is not None and entry.locked_until > now

    def _count(self, key: tuple[object, ...], now: float) -> int:
        entry = self._by_key.get(key)
        if entry is None or now - entry.last_at > self.lockout_seconds:
            return 0
        return entry.count

    def _sweep(self, now: float) -> None:
        for key in [k for k, e in self._by_key.items()
                    if e.locked_until <= now and now - e.last_at > self.lockout_seconds]:
            del self._by_key[key]


class Throttle:
    """A token bucket per API user: `rate` messages a second, bursts of up to `burst`."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self._buckets: dict[int, tuple[float, float]] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, user_id: int, messages: int, now: float) -> float:
        """Take tokens for `messages`; return 0 if allowed, else seconds to wait."""
        if not self.enabled:
            return 0.0
        tokens, at = self._buckets.get(user_id, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        # A request larger than the burst waits for a full bucket, then takes all it
        # needs: the bucket goes into debt, so many recipients per request cannot
        # outrun the rate.
        need = float(min(messages, self.burst))
        if tokens < need:
            self._buckets[user_id] = (tokens, now)
            return max(1.0, math.ceil((need - tokens) / self.rate))
        self._buckets[user_id] = (tokens - messages, now)
        return 0.0

    def give_back(self, user_id: int, messages: int) -> None:
        """Return the tokens of a request that was refused after taking them."""
        if not self.enabled or user_id not in self._buckets:
            return
        tokens, at = self._buckets[user_id]
        self._buckets[user_id] = (min(float(self.burst), tokens + messages), at)


def bearer_matches(authorization: str, token: str) -> bool:
    """`Authorization: Bearer <token>` against the admin token, in constant time.

    compare_digest's time depends only on the length of what it is given, never on where
    the first difference lies. Undecodable header bytes (surrogates) are compared as they
    came rather than raising.
    """
    scheme, _, presented = authorization.partition(" ")
    given = presented.strip().encode("utf-8", "surrogatepass")
    return bool(token) and scheme.lower() == "bearer" and \
        hmac.compare_digest(given, token.encode("utf-8"))
