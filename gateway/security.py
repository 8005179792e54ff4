"""Brute-force guard and per-user throttle for the send URL, in memory and clock-driven.

Failed logins are counted per (account, login, caller address) and per caller address, an
IPv6 caller being its /64 (`ipv6_prefix`): one host holds a whole /64 and can rotate through
it at will. Past half the limit each refusal is slowed; at the limit the key is locked for
`lockout_seconds` and answered 401 without checking the password. Locks are deliberately
not per login alone: that would let anyone lock a user out from anywhere, while a correct
password from another address must keep working.

What else holds, and why:
- Attempts are counted when they start. A password check reserves its place on each key
  before the (slow) check runs and turns into a failure or is released after it, so at most
  `max_failures` checks per key are ever decided, however many arrive at once. A check
  refused only because the places are taken by checks under way is refused as "busy"
  (retry soon), not "locked": nothing is locked yet, and a right password must not be told
  its credentials are wrong.
- A login attacked from many addresses (each under its own limit) has a budget of failures
  per `lockout_seconds` across all of them (`login_failure_budget`). Past it, that login is
  slowed, not locked: one password check per `login_slow_seconds` from addresses outside
  the user's allowlist, the others refused at once. A caller on the user's own allowlist is
  never slowed, so the real user still gets in during the attack.
- Failures against an account or login that does not exist weigh a quarter on the caller's
  address key: a mistyped account behind a NAT must not lock every user behind it, while
  an address spraying made-up logins is still locked, four times later.
- An address from which many distinct users log in (`shared_address_users` in a window)
  is reported once per window: a NAT or a proxy not declared in `server.trusted_proxies`
  makes every user behind it share one address's lockout.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
from dataclasses import dataclass, field

from gateway.iprules import IPAddress

# Above this many tracked keys, expired entries are swept (bounded memory under a spray).
_SWEEP_AT = 50_000
# What a failure against an account or login that does not exist weighs on the address key.
UNKNOWN_WEIGHT = 0.25


@dataclass(slots=True)
class _Failures:
    count: float
    last_at: float
    locked_until: float = 0.0
    # Checks under way (reserved, not yet decided), weighted as their failure would be.
    pending: float = 0.0
    # For a login over its budget: when the next check may run.
    next_check_at: float = 0.0


class Refused(Exception):
    """No password check for this attempt: its key is locked ("locked"), its places all
    taken by checks under way ("busy"), or its login slowed ("slowed")."""


Key = tuple[object, ...]


@dataclass(slots=True)
class Attempt:
    """A password check's place on its keys, from before the check until its verdict."""

    guard: LoginGuard
    weights: tuple[tuple[Key, float], ...]
    account: str
    login: str
    address: object
    open: bool = True

    def failed(self, now: float) -> bool:
        """The password was wrong; True when it has just locked a key."""
        return self._close(now, failed=True)

    def refused_address(self, now: float) -> None:
        """The password was right but the caller's address is not allowed: it counts on
        the (account, login, address) key, so the refusal is no oracle for guessing."""
        self._close(now, failed=True, only=("user",))

    def release(self) -> None:
        """Decided otherwise (a sender refused, an error, the caller gone): no failure."""
        self._close(0.0, failed=False)

    def _close(self, now: float, *, failed: bool, only: tuple[str, ...] = ()) -> bool:
        if not self.open:
            return False
        self.open = False
        return self.guard._settle(self.weights, now, failed=failed, only=only)


class LoginGuard:
    def __init__(self, max_failures: int, lockout_seconds: float, *, ipv6_prefix: int = 64,
                 login_failure_budget: int = 0, login_slow_seconds: float = 1.0,
                 shared_address_users: int = 0) -> None:
        self.max_failures = max(1, max_failures)
        self.lockout_seconds = lockout_seconds
        self.ipv6_prefix = ipv6_prefix
        self.login_failure_budget = login_failure_budget
        self.login_slow_seconds = login_slow_seconds
        self.shared_address_users = shared_address_users
        self._by_key: dict[Key, _Failures] = {}
        # address -> (window start, the distinct users seen, reported in this window)
        self._users_by_address: dict[object, _SeenUsers] = {}

    def address(self, ip: IPAddress | None) -> object:
        """The unit of an address key: an IPv4 address, or an IPv6 address's network."""
        if isinstance(ip, ipaddress.IPv6Address) and self.ipv6_prefix < 128:
            return ipaddress.IPv6Network((int(ip) >> (128 - self.ipv6_prefix)
                                          << (128 - self.ipv6_prefix), self.ipv6_prefix))
        return ip

    def locked(self, account: str, login: str, ip: IPAddress | None, now: float) -> bool:
        if not self._by_key:
            return False  # no failure on record, the usual case: 2% of a send's CPU otherwise
        return any(self._locked(key, now) for key in self._keys(account, login, ip))

    def begin(self, account: str, login: str, ip: IPAddress | None, now: float, *,
              known: bool, allowlisted: bool) -> Attempt:
        """Reserve a password check; Refused when its keys allow no more checks now.

        `known`: the account and login exist. `allowlisted`: the caller is on the user's
        own allowlist (never slowed by the login's budget)."""
        address = self.address(ip)
        lockable = self._lockable(account, login, address, known)
        for key, _ in lockable:
            entry = self._live(key, now)
            if entry is not None and (entry.locked_until > now
                                      or entry.count >= self.max_failures):
                raise Refused("locked")
        for key, _ in lockable:
            entry = self._by_key.get(key)
            if entry is not None and entry.count + entry.pending >= self.max_failures:
                # Only checks still under way fill the key: nothing is locked, and may
                # never be (they may all be right), so the caller is told to come back.
                raise Refused("busy")
        login_key: Key = ("login", account, login)
        if self.login_failure_budget and not allowlisted:
            entry = self._live(login_key, now)
            if entry is not None and entry.count >= self.login_failure_budget:
                if now < entry.next_check_at:
                    raise Refused("slowed")
                entry.next_check_at = now + self.login_slow_seconds
        weights = (*lockable, (login_key, 1.0))
        for key, weight in weights:
            entry = self._live(key, now) or self._by_key.setdefault(key, _Failures(0.0, now))
            entry.pending += weight
        return Attempt(self, weights, account, login, address)

    def delay(self, account: str, login: str, ip: IPAddress | None, now: float) -> float:
        """Seconds to hold a refusal: grows once half the allowed failures are used."""
        keys = [*self._keys(account, login, ip), ("login", account, login)]
        worst = max(self._count(key, now) for key in keys)
        half = self.max_failures // 2
        return 0.0 if worst <= half else min(0.25 * (worst - half), 2.0)

    def failed(self, account: str, login: str, ip: IPAddress | None, now: float, *,
               known: bool = True) -> bool:
        """Count a failure that reserved nothing (a guess that joined an identical check
        under way, tests), weighed as a reserved one would be: `known` as in `begin`."""
        weights = (*self._lockable(account, login, self.address(ip), known),
                   (("login", account, login), 1.0))
        for key, weight in weights:
            entry = self._live(key, now) or self._by_key.setdefault(key, _Failures(0.0, now))
            entry.pending += weight
        return self._settle(weights, now, failed=True)

    def succeeded(self, account: str, login: str, ip: IPAddress | None,
                  now: float | None = None) -> bool:
        """A right password: the (account, login, address) key starts again. True when the
        address has just become one shared by many users (reported once per window)."""
        address = self.address(ip)
        if self._by_key:
            self._forget(("user", account, login, address))
        if now is None:
            return False
        return self._note_user(address, account, login, now)

    def refused_address(self, account: str, login: str, ip: IPAddress | None,
                        now: float) -> None:
        """A right password from an address the user does not allow, with no reserved
        check (its verdict was cached): counted as the reserved one would be."""
        key: Key = ("user", account, login, self.address(ip))
        entry = self._live(key, now) or self._by_key.setdefault(key, _Failures(0.0, now))
        entry.pending += 1.0
        self._settle(((key, 1.0),), now, failed=True)

    def _settle(self, weights: tuple[tuple[Key, float], ...], now: float, *, failed: bool,
                only: tuple[str, ...] = ()) -> bool:
        locked = False
        for key, weight in weights:
            entry = self._by_key.get(key)
            if entry is None:
                continue
            entry.pending = max(0.0, entry.pending - weight)
            if failed and (not only or key[0] in only):
                if now - entry.last_at > self.lockout_seconds:
                    entry.count = 0.0
                entry.count += weight
                entry.last_at = now
                if key[0] != "login" and entry.count >= self.max_failures \
                        and entry.locked_until <= now:
                    entry.locked_until = now + self.lockout_seconds
                    locked = True
            elif not entry.count and not entry.pending and not entry.locked_until:
                del self._by_key[key]  # a check that left nothing to remember
        if len(self._by_key) > _SWEEP_AT:
            self._sweep(now)
        return locked

    def _forget(self, key: Key) -> None:
        entry = self._by_key.get(key)
        if entry is not None and not entry.pending:
            del self._by_key[key]
        elif entry is not None:
            entry.count = 0.0  # checks of this key still under way keep their place

    def _note_user(self, address: object, account: str, login: str, now: float) -> bool:
        if not self.shared_address_users or address is None:
            return False
        seen = self._users_by_address.get(address)
        if seen is None or now - seen.since > self.lockout_seconds:
            if len(self._users_by_address) > _SWEEP_AT:
                self._users_by_address.clear()
            seen = self._users_by_address[address] = _SeenUsers(now)
        if seen.reported or (account, login) in seen.users:
            return False
        seen.users.add((account, login))
        if len(seen.users) >= self.shared_address_users:
            seen.reported = True
            seen.users.clear()
            return True
        return False

    @staticmethod
    def _lockable(account: str, login: str, address: object,
                  known: bool) -> tuple[tuple[Key, float], ...]:
        """The keys a failure can lock, with what it weighs on each."""
        return ((("user", account, login, address), 1.0),
                (("ip", address), 1.0 if known else UNKNOWN_WEIGHT))

    def _keys(self, account: str, login: str, ip: IPAddress | None) -> list[Key]:
        address = self.address(ip)
        return [("user", account, login, address), ("ip", address)]

    def _live(self, key: Key, now: float) -> _Failures | None:
        """The key's entry, its failures forgotten once `lockout_seconds` have passed."""
        entry = self._by_key.get(key)
        if entry is not None and now - entry.last_at > self.lockout_seconds \
                and entry.locked_until <= now:
            entry.count = 0.0
            entry.last_at = now
        return entry

    def _locked(self, key: Key, now: float) -> bool:
        entry = self._by_key.get(key)
        return entry is not None and entry.locked_until > now

    def _count(self, key: Key, now: float) -> float:
        entry = self._by_key.get(key)
        if entry is None or now - entry.last_at > self.lockout_seconds:
            return 0.0
        return entry.count

    def _sweep(self, now: float) -> None:
        for key in [k for k, e in self._by_key.items()
                    if e.locked_until <= now and not e.pending
                    and now - e.last_at > self.lockout_seconds]:
            del self._by_key[key]


@dataclass(slots=True)
class _SeenUsers:
    since: float
    users: set[tuple[str, str]] = field(default_factory=set)
    reported: bool = False


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
