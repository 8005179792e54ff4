"""Brute-force lockout and per-user throttling, pure and over HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.clock import ManualClock
from gateway.iprules import parse_ip
from gateway.security import LoginGuard, Throttle
from tests.conftest import ACCOUNT, LOGIN, Harness

IP_A, IP_B = parse_ip("203.0.113.1"), parse_ip("203.0.113.2")


def test_guard_locks_the_key_then_forgets() -> None:
    guard = LoginGuard(max_failures=3, lockout_seconds=60)
    assert [guard.failed("a", "u", IP_A, 0.0) for _ in range(3)] == [False, False, True]
    assert guard.locked("a", "u", IP_A, 1.0)
    assert not guard.locked("a", "u", IP_B, 1.0)
    assert not guard.locked("a", "u", IP_A, 61.0)


def test_guard_locks_an_ip_spraying_many_logins() -> None:
    guard = LoginGuard(max_failures=3, lockout_seconds=60)
    for login in ("u1", "u2", "u3"):
        guard.failed("a", login, IP_A, 0.0)
    assert guard.locked("a", "other", IP_A, 1.0)
    assert not guard.locked("a", "other", IP_B, 1.0)


def test_guard_slows_before_locking() -> None:
    guard = LoginGuard(max_failures=6, lockout_seconds=60)
    delays = []
    for _ in range(5):
        delays.append(guard.delay("a", "u", IP_A, 0.0))
        guard.failed("a", "u", IP_A, 0.0)
    assert delays == [0.0, 0.0, 0.0, 0.0, 0.25]
    # Failures on a login from other addresses slow this address too, without locking it.
    assert guard.delay("a", "u", IP_B, 0.0) == 0.5
    assert not guard.locked("a", "u", IP_B, 0.0)


def test_success_resets_the_login_count_but_not_the_address_count() -> None:
    guard = LoginGuard(max_failures=5, lockout_seconds=60)
    for _ in range(2):
        guard.failed("a", "u", IP_A, 0.0)
    guard.succeeded("a", "u", IP_A)
    assert [guard.failed("a", "u", IP_A, 0.0) for _ in range(2)] == [False, False]
    # A valid account must not let an address keep guessing other logins for ever.
    assert guard.failed("a", "u", IP_A, 0.0)


def test_throttle_token_bucket() -> None:
    throttle = Throttle(rate=2.0, burst=4)
    assert [throttle.take(1, 1, 0.0) for _ in range(5)] == [0, 0, 0, 0, 1]
    assert throttle.take(2, 3, 0.0) == 0  # users have their own buckets
    assert throttle.take(1, 1, 0.5) == 0
    assert throttle.take(1, 10, 0.5) == 2  # a request larger than the burst waits for it
    assert not Throttle(0.0, 10).enabled and Throttle(0.0, 10).take(1, 99, 0.0) == 0


async def test_lockout_over_http(make_harness: Any, config: Any) -> None:
    config = config.replace({"security.max_failures": 4, "security.lockout_seconds": 300})
    clock = ManualClock()
    h: Harness = await make_harness(cfg=config, clock=clock)
    for _ in range(4):
        assert (await h.send(password="Wrong1234"))[1] == \
            "KO\n401 Invalid account, login or password"
    # Locked: even the right password is refused, without being checked.
    assert (await h.send())[1] == "KO\n401 Too many failed logins: try again later"
    clock.advance(301)
    assert (await h.send())[1].startswith("OK")


async def test_failures_from_another_ip_do_not_lock_out_the_user(make_harness: Any,
                                                                 config: Any) -> None:
    config = config.replace({"security.max_failures": 3, "server.trusted_proxies": ["127.0.0.1"]})
    h: Harness = await make_harness(cfg=config)
    await h.manage.update_user(ACCOUNT, LOGIN, ip_restrictions=["203.0.113.2"])
    h.client.session.headers["X-Forwarded-For"] = "203.0.113.1"
    for _ in range(4):
        await h.send(password="Wrong1234")
    assert (await h.send())[1] == "KO\n401 Too many failed logins: try again later"
    h.client.session.headers["X-Forwarded-For"] = "203.0.113.2"
    assert (await h.send())[1].startswith("OK")


async def test_throttle_over_http(make_harness: Any, config: Any) -> None:
    config = config.replace({"security.user_rate_per_second": 1.0, "security.user_burst": 2})
    clock = ManualClock()
    h: Harness = await make_harness(cfg=config, clock=clock)
    assert (await h.send())[1].startswith("OK")
    assert (await h.send())[1].startswith("OK")
    resp = await h.client.get("/cgi-bin/sms/http2sms.cgi", params={
        "account": ACCOUNT, "login": LOGIN, "password": "secret123", "from": "ACME",
        "to": "+33612345678", "message": "x", "contentType": "application/json"})
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    assert await resp.json(content_type=None) == {
        "status": 429, "message": "Too many messages: retry after 1 s"}
    assert await h.balance() == 99800  # the refused one was not charged
    clock.advance(1)
    assert (await h.send())[1].startswith("OK")


def test_many_recipients_cannot_outrun_the_rate() -> None:
    throttle = Throttle(rate=2.0, burst=4)
    assert throttle.take(1, 10, 0.0) == 0  # waits for a full bucket, then owes 6
    assert throttle.take(1, 1, 0.0) == 4  # (1 - -6) / 2, rounded up
    throttle.give_back(1, 10)  # that request was refused after all
    assert throttle.take(1, 4, 0.0) == 0


def test_bearer_token_check() -> None:
    from gateway.security import bearer_matches

    assert bearer_matches("Bearer s3cret-token", "s3cret-token")
    assert bearer_matches("bearer  s3cret-token ", "s3cret-token")
    for header in ("", "Bearer", "Bearer s3cret", "Basic s3cret-token", "Bearer \udcff\udcfe"):
        assert not bearer_matches(header, "s3cret-token")
    assert not bearer_matches("Bearer ", "")  # no token configured: nobody gets in


async def test_at_most_two_scrypt_checks_run_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each check takes 16 MiB: a burst of distinct credentials must not run one per thread."""
    import threading
    import time as clock

    from gateway import passwords

    running = 0
    most = 0
    lock = threading.Lock()

    def slow_verify(password: str, stored: str) -> bool:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        clock.sleep(0.02)
        with lock:
            running -= 1
        return True

    monkeypatch.setattr(passwords, "verify", slow_verify)
    cache = passwords.VerificationCache()
    verdicts = await asyncio.gather(*(cache.verify(f"password{i}", "stored") for i in range(8)))
    assert all(verdicts)
    assert most == passwords.MAX_CONCURRENT_HASHES == 2
