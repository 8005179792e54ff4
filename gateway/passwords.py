"""API-user passwords: the rule, scrypt hashes, and a verification cache for the send path.

scrypt costs tens of milliseconds by design; paying that on every send would cap a core at a
few dozen requests a second. The cache remembers verdicts under a key that binds the stored
hash and the presented password, so a password change or a wrong password can never reuse
another verdict, and it holds no password, only a keyed digest of one.

The test suite hashes at a cheap cost (`HTTP2SMS_TEST_SCRYPT_N`): at the real one, scrypt made
up some 40% of the suite's run time. Each hash carries its own parameters, so a hash made at one
cost verifies whatever the process's cost.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

# n=2**14, r=8 is the interactive-login setting recommended for scrypt (~16 MiB, tens of ms).
REAL_N = 2**14
_R, _P = 8, 1
_DKLEN = 32
# scrypt checks running at once (each in a thread, each with its 16 MiB).
MAX_CONCURRENT_HASHES = 2


# Lowers n for the test suite only. It is honoured only alongside PYTEST_CURRENT_TEST, which
# pytest sets in its own process and which the processes a test starts inherit: a production
# gateway given a test's environment by mistake refuses to start instead of storing weak
# hashes (they would stay weak after the variable is gone: a hash keeps its own n).
TEST_N_VARIABLE = "HTTP2SMS_TEST_SCRYPT_N"
_UNDER_PYTEST = "PYTEST_CURRENT_TEST"

_n: int | None = None  # read from the environment at the first hash
_decoys: dict[int, str] = {}


class InvalidPassword(ValueError):
    pass


class UnsafeHashCost(RuntimeError):
    pass


def validate(password: str) -> str:
    """OVH asks for 8 alphanumeric characters; longer is allowed, anything else is refused."""
    if len(password) < 8:
        raise InvalidPassword("password: at least 8 characters")
    if len(password) > 128:
        raise InvalidPassword("password: at most 128 characters")
    if not (password.isascii() and password.isalnum()):
        raise InvalidPassword("password: letters and digits only")
    return password


def n_from_environment(env: Mapping[str, str]) -> int:
    """scrypt's n for new hashes: the real one unless a test lowers it (see TEST_N_VARIABLE)."""
    raw = env.get(TEST_N_VARIABLE, "")
    if not raw:
        return REAL_N
    if _UNDER_PYTEST not in env:
        raise UnsafeHashCost(f"{TEST_N_VARIABLE} weakens every password hash and is for the "
                             "test suite only: unset it")
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 2 <= n <= REAL_N or n & (n - 1):
        raise UnsafeHashCost(f"{TEST_N_VARIABLE}: a power of two from 2 to {REAL_N} "
                             f"(got {raw!r})")
    return n


def hash_cost() -> int:
    """This process's n for new hashes, read once."""
    global _n
    if _n is None:
        _n = n_from_environment(os.environ)
    return _n


def decoy_hash() -> str:
    """The hash unknown logins are checked against, so that they take as long to refuse as a
    wrong password; made once per process (per cost), as it costs as much as any hash."""
    n = hash_cost()
    decoy = _decoys.get(n)
    if decoy is None:
        decoy = _decoys[n] = hash_password("decoy0000", n=n)
    return decoy


def hash_password(password: str, *, n: int | None = None) -> str:
    n = hash_cost() if n is None else n
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=_R, p=_P, dklen=_DKLEN,
                            maxmem=64 * 1024 * 1024)
    return "$".join(("scrypt", str(n), str(_R), str(_P), _b64(salt), _b64(digest)))


def verify(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                                r=int(r), p=int(p), dklen=len(expected),
                                maxmem=64 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


class VerificationBusy(Exception):
    """No place in the verification queue for this caller: answer at once, check nothing."""


class Abandoned(Exception):
    """Every caller of a queued check went away before it started: it never ran."""


def _always() -> bool:
    return True


@dataclass(eq=False, slots=True)
class _Check:
    key: bytes
    password: str
    stored: str
    owner: Hashable
    future: asyncio.Future[bool]
    # One entry per caller waiting for the verdict: whether that caller still wants it.
    waiters: list[Callable[[], bool]] = field(default_factory=list)
    started: bool = False


class VerificationCache:
    """Bounded LRU of successful checks, keyed by a MAC of (stored hash, password) under a
    key of this process: the cache never holds a password or anything to test one with.

    The checks not cached go through a bounded queue: at most `queue_size` checks waiting
    or running, at most `per_owner` of them for one owner (the caller's address), taken in
    turn across owners; a check beyond either is refused at once (`VerificationBusy`). So
    a flood of guesses from one address holds `per_owner` places and delays another
    caller's first check by about one scrypt run per busy owner, not by the whole flood.
    A queued check whose callers all went away (`wanted` answers False) never runs.
    """

    def __init__(self, size: int = 10_000, *, queue_size: int = 64,
                 per_owner: int = 8) -> None:
        self._key = secrets.token_bytes(32)
        self._size = size
        self._verdicts: OrderedDict[bytes, bool] = OrderedDict()
        self._inflight: dict[bytes, _Check] = {}
        self._queue_size = queue_size
        self._per_owner = per_owner
        # Checks waiting to run, by owner, in the order owners take turns.
        self._waiting: OrderedDict[Hashable, deque[_Check]] = OrderedDict()
        # Checks waiting or running, per owner and in all.
        self._held: dict[Hashable, int] = {}
        self._pending = 0
        # Each scrypt run takes 16 MiB: a burst of new or wrong credentials must not take
        # 16 MiB per thread of the pool (a peak of ~150 MB in scripts/bench's first second).
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.ran = 0  # scrypt runs started (tests and metrics read it)
        self.abandoned = 0  # queued checks dropped because nobody waited for them any more

    def _cache_key(self, password: str, stored: str) -> bytes:
        # Keyed BLAKE2b is a MAC in one call: 0.6 µs per request, HMAC-SHA256 1.9 µs.
        return hashlib.blake2b(stored.encode() + b"\0" + password.encode(), key=self._key,
                               digest_size=32).digest()

    def known_good(self, password: str, stored: str) -> bool:
        """True when this pair was verified right before (no scrypt, nothing to guess)."""
        key = self._cache_key(password, stored)
        if key in self._verdicts:
            self._verdicts.move_to_end(key)
            return True
        return False

    def in_flight(self, password: str, stored: str) -> bool:
        """True when the same check is queued or running: a `verify` now joins it, taking
        no place of the queue."""
        return self._cache_key(password, stored) in self._inflight

    async def verify(self, password: str, stored: str, *, owner: Hashable = None,
                     wanted: Callable[[], bool] | None = None) -> bool:
        """Whether `password` matches `stored`; VerificationBusy when the queue has no
        place for `owner`, Abandoned when the check was dropped before it ran because
        no caller `wanted` it any more."""
        key = self._cache_key(password, stored)
        verdict = self._verdicts.get(key)
        if verdict is not None:
            self._verdicts.move_to_end(key)
            return verdict
        # A burst of requests with the same new credentials shares one scrypt run.
        check = self._inflight.get(key)
        if check is None:
            check = self._admit(key, password, stored, owner)
        alive = wanted or _always
        check.waiters.append(alive)
        try:
            self._start_next()
            return await asyncio.shield(check.future)
        finally:
            check.waiters.remove(alive)
            if not check.waiters and not check.started:
                self._drop(check)  # its callers were cancelled: nobody needs it now

    def _admit(self, key: bytes, password: str, stored: str, owner: Hashable) -> _Check:
        held = self._held.get(owner, 0)
        if self._pending >= self._queue_size or held >= self._per_owner:
            raise VerificationBusy("too many password checks waiting")
        check = _Check(key, password, stored, owner,
                       asyncio.get_running_loop().create_future())
        self._inflight[key] = check
        self._held[owner] = held + 1
        self._pending += 1
        self._waiting.setdefault(owner, deque()).append(check)
        return check

    def _start_next(self) -> None:
        while self._running < MAX_CONCURRENT_HASHES and self._waiting:
            owner, checks = next(iter(self._waiting.items()))
            check = checks.popleft()
            if checks:
                self._waiting.move_to_end(owner)  # the next owner's turn
            else:
                del self._waiting[owner]
            if not any(alive() for alive in check.waiters):
                self.abandoned += 1
                self._release(check)
                check.future.set_exception(Abandoned())
                continue
            check.started = True
            self._running += 1
            self.ran += 1
            task = asyncio.get_running_loop().create_task(self._run(check))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, check: _Check) -> None:
        try:
            verdict = await asyncio.to_thread(verify, check.password, check.stored)
        except asyncio.CancelledError:
            check.future.cancel()  # the loop is closing: its thread ends on its own
            raise
        except Exception as exc:
            check.future.set_exception(exc)
            check.future.exception()  # mark retrieved: the waiters, if any, re-raise it
        else:
            # Never remember a refusal: unknown logins all share one decoy hash, so a cached
            # refusal would answer them faster than a real login and tell which ones exist.
            if verdict:
                self._verdicts[check.key] = verdict
                if len(self._verdicts) > self._size:
                    self._verdicts.popitem(last=False)
            check.future.set_result(verdict)
        finally:
            self._running -= 1
            self._release(check)
            self._start_next()

    def _drop(self, check: _Check) -> None:
        checks = self._waiting.get(check.owner)
        if checks is None or check not in checks:
            return  # already taken off the queue (and abandoned there)
        checks.remove(check)
        if not checks:
            del self._waiting[check.owner]
        self.abandoned += 1
        self._release(check)
        check.future.cancel()

    def _release(self, check: _Check) -> None:
        if self._inflight.get(check.key) is check:
            del self._inflight[check.key]
        held = self._held[check.owner] - 1
        if held:
            self._held[check.owner] = held
        else:
            del self._held[check.owner]
        self._pending -= 1
