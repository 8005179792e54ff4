"""Brute-force lockout and per-user throttling, pure and over HTTP."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway import passwords
from gateway.clock import ManualClock
from gateway.iprules import parse_ip
from gateway.security import LoginGuard, Throttle
from tests.conftest import ACCOUNT, LOGIN, Harness

IP_A, IP_B = parse_ip("203.0.113.1"), parse_ip("203.0.113.2")


async def test_an_unknown_login_costs_the_scrypt_check_of_a_wrong_password(
        make_harness: Any, real_hash_cost: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """At the production cost, an unknown login is refused after the same scrypt run as a
    wrong password (against the decoy): the answer's timing does not tell which logins exist."""
    h: Harness = await make_harness()
    costs: list[int] = []
    verify = passwords.verify

    def recording(password: str, stored: str) -> bool:
        costs.append(int(stored.split("$")[1]))
        return verify(password, stored)

    monkeypatch.setattr(passwords, "verify", recording)
    for params in ({"password": "wrongpass1"}, {"login": "nobody"},
                   {"account": "sms-none-1"}):
        assert (await h.send(**params))[1] == "KO\n401 Invalid account, login or password"
    assert costs == [real_hash_cost] * 3


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


# -- brute force, second round: attacks that worked before the guard reserved its checks ----

WRONG = "KO\n401 Invalid account, login or password"
LOCKED = "KO\n401 Too many failed logins: try again later"
BUSY = "KO\n429 Too many logins being checked: retry after 1 s"
SEND = {"account": ACCOUNT, "login": LOGIN, "password": "secret123", "from": "ACME",
        "to": "+33612345678", "message": "Hello"}


async def send_from(h: Harness, address: str, **params: Any) -> str:
    """A send as if from `address` (the harness trusts 127.0.0.1's X-Forwarded-For)."""
    query = {"account": ACCOUNT, "login": LOGIN, "password": "secret123", "from": "ACME",
             "to": "+33612345678", "message": "Hello"}
    query.update(params)
    resp = await h.client.get("/cgi-bin/sms/http2sms.cgi", params=query,
                              headers={"X-Forwarded-For": address})
    return await resp.text()


def behind_proxy(config: Any, **security: Any) -> Any:
    """The config, with 127.0.0.1 a trusted proxy and these [security] settings."""
    return config.replace({"server.trusted_proxies": ["127.0.0.1"],
                           **{f"security.{name}": value for name, value in security.items()}})


async def test_concurrent_guesses_get_at_most_max_failures_checks(
        make_harness: Any, config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """400 wrong passwords at once from one address were all checked; now the guard reserves
    a place before each check, so at most max_failures are ever decided."""
    from gateway import passwords

    config = behind_proxy(config, max_failures=4)
    h: Harness = await make_harness(cfg=config)
    checks = 0
    real_verify = passwords.verify

    def counting(password: str, stored: str) -> bool:
        nonlocal checks
        checks += 1
        return real_verify(password, stored)

    monkeypatch.setattr(passwords, "verify", counting)
    answers = await asyncio.gather(*(send_from(h, "198.51.100.7", password=f"Wrong{i:04d}")
                                     for i in range(60)))
    assert answers.count(WRONG) == checks == 4
    # Refused while the four checks are under way: busy (retry); once they failed: locked.
    assert answers.count(LOCKED) + answers.count(BUSY) == 56
    assert await send_from(h, "198.51.100.7") == LOCKED  # the right one too, unchecked


async def test_a_right_password_is_not_refused_as_locked_while_checks_are_under_way(
        make_harness: Any, config: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With max_failures - 1 failures counted, a check under way filled the last place and a
    right password at the same time got 401 "Too many failed logins" though nothing was
    locked (401 means bad credentials to OVH scripts). Now it is told to retry (429)."""
    from gateway import passwords

    config = behind_proxy(config, max_failures=4)
    h: Harness = await make_harness(cfg=config)
    await h.manage.create_user(ACCOUNT, "bob", "secret456")
    real_verify = passwords.verify

    def slow(password: str, stored: str) -> bool:
        time.sleep(0.3)  # both checks are under way at once
        return real_verify(password, stored)

    for _ in range(3):
        assert await send_from(h, "198.51.100.8", password="Wrong1234") == WRONG
    monkeypatch.setattr(passwords, "verify", slow)
    resp_bob, resp_alice = await asyncio.gather(
        h.client.get("/cgi-bin/sms/http2sms.cgi", params={**SEND, "login": "bob",
                     "password": "secret456"}, headers={"X-Forwarded-For": "198.51.100.8"}),
        h.client.get("/cgi-bin/sms/http2sms.cgi", params=SEND,
                     headers={"X-Forwarded-For": "198.51.100.8"}))
    answers = {"bob": (resp_bob, await resp_bob.text()),
               "alice": (resp_alice, await resp_alice.text())}
    busy = [login for login, (_, text) in answers.items() if text == BUSY]
    assert len(busy) == 1, answers
    assert all(text.startswith("OK") for login, (_, text) in answers.items()
               if login not in busy), answers
    resp = answers[busy[0]][0]
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    # Nothing was locked: the one told to retry gets in.
    params = {"login": "bob", "password": "secret456"} if busy == ["bob"] else {}
    assert (await send_from(h, "198.51.100.8", **params)).startswith("OK")


async def test_an_ipv6_host_cannot_rotate_through_its_64(make_harness: Any,
                                                         config: Any) -> None:
    config = behind_proxy(config, max_failures=4)
    h: Harness = await make_harness(cfg=config)
    answers = [await send_from(h, f"2001:41d0:8:e8ad::{i:x}", password="Wrong1234")
               for i in range(1, 61)]
    assert answers[:4] == [WRONG] * 4 and set(answers[4:]) == {LOCKED}
    assert await send_from(h, "2001:41d0:8:e8ad:ffff::1") == LOCKED
    assert (await send_from(h, "2001:41d0:8:e8ae::1")).startswith("OK")  # another /64


async def test_a_login_under_distributed_attack_is_slowed_and_its_own_address_gets_in(
        make_harness: Any, config: Any) -> None:
    """300 guesses from 300 addresses were each under the per-address limit and all checked;
    now the login's budget slows it (one check per login_slow_seconds), while the user's
    own allowed address is never slowed."""
    config = behind_proxy(config, max_failures=10, login_failure_budget=5,
                          login_slow_seconds=1.0)
    clock = ManualClock()
    h: Harness = await make_harness(cfg=config, clock=clock)
    await h.manage.update_user(ACCOUNT, LOGIN, ip_restrictions=["145.239.0.7"])
    answers = [await send_from(h, f"198.51.{i // 250}.{i % 250 + 1}", password="Wrong1234")
               for i in range(300)]
    assert answers.count(WRONG) == 6  # the budget, then one check per slow period
    assert answers.count(LOCKED) == 294
    assert (await send_from(h, "145.239.0.7")).startswith("OK")
    # Guesses from elsewhere wait their turn: one check per slow period.
    assert await send_from(h, "192.0.2.200", password="Guess1234") == LOCKED
    clock.advance(1.0)
    assert await send_from(h, "192.0.2.200", password="Guess1234") == WRONG
    assert await send_from(h, "192.0.2.201", password="Guess1234") == LOCKED


async def test_failures_against_made_up_accounts_do_not_lock_an_address_for_all(
        make_harness: Any, config: Any) -> None:
    """Ten failures against a made-up account from a NAT locked every user behind it."""
    config = behind_proxy(config, max_failures=10)
    h: Harness = await make_harness(cfg=config)
    for i in range(10):
        assert await send_from(h, "198.51.100.9", account=f"sms-nobody-{i}") == WRONG
    assert (await send_from(h, "198.51.100.9")).startswith("OK")
    # Spraying made-up logins is still locked, four times later.
    answers = [await send_from(h, "198.51.100.10", login=f"nobody{i}") for i in range(45)]
    assert answers.count(WRONG) == 40 and answers[40:] == [LOCKED] * 5


async def test_concurrent_failures_against_made_up_accounts_weigh_a_quarter_too(
        make_harness: Any, config: Any) -> None:
    """Identical guesses at once share one check: those that joined it counted a whole
    failure on the address, so 4 rounds of 4 locked every user behind a NAT (not 40)."""
    config = behind_proxy(config, max_failures=10)
    h: Harness = await make_harness(cfg=config)
    for round_ in range(9):
        answers = await asyncio.gather(*(
            send_from(h, "198.51.100.11", account=f"sms-nobody-{round_}-{i}",
                      password="Same1234") for i in range(4)))
        assert answers == [WRONG] * 4
    assert (await send_from(h, "198.51.100.11")).startswith("OK")


async def test_an_address_many_users_share_is_reported(make_harness: Any,
                                                       config: Any) -> None:
    config = behind_proxy(config, shared_address_users=3)
    h: Harness = await make_harness(cfg=config)
    for login in ("bob", "carol"):
        await h.manage.create_user(ACCOUNT, login, "secret123")
    before = h.gateway.metrics.registry.get_sample_value("http2sms_shared_addresses_total")
    for login in ("alice", "bob", "bob", "carol", "alice"):
        assert (await send_from(h, "198.51.100.20", login=login)).startswith("OK")
    assert h.gateway.metrics.registry.get_sample_value(
        "http2sms_shared_addresses_total") == before + 1


async def test_an_address_refusal_counts_as_a_failure_of_its_key(make_harness: Any,
                                                                 config: Any) -> None:
    """With the right password the answer names the address (OVH's text, kept); counted as
    a failure, it cannot confirm guesses at scale."""
    config = behind_proxy(config, max_failures=4)
    h: Harness = await make_harness(cfg=config)
    await h.manage.update_user(ACCOUNT, LOGIN, ip_restrictions=["145.239.0.7"])
    refused = "KO\n401 The IP address 198.51.100.30 is not allowed for this user"
    assert [await send_from(h, "198.51.100.30") for _ in range(4)] == [refused] * 4
    assert await send_from(h, "198.51.100.30") == LOCKED
    assert (await send_from(h, "145.239.0.7")).startswith("OK")


async def test_wrong_password_and_unknown_login_take_the_same_work(
        make_harness: Any, config: Any, monkeypatch: pytest.MonkeyPatch,
        real_hash_cost: int) -> None:
    """A wrong password was checked twice (cached, then fresh settings), an unknown login
    once: 79 ms against 40, without overlap. Now one check each, and the timings overlap."""
    import statistics
    import time

    from gateway import passwords

    config = behind_proxy(config, max_failures=1000)
    h: Harness = await make_harness(cfg=config)
    checks: list[str] = []
    real_verify = passwords.verify

    def counting(password: str, stored: str) -> bool:
        checks.append(stored)
        return real_verify(password, stored)

    monkeypatch.setattr(passwords, "verify", counting)
    timings: dict[str, list[float]] = {"known": [], "unknown": []}
    for i in range(15):  # alternated, so that drift in the machine's load hits both alike
        for kind, login in (("known", LOGIN), ("unknown", f"nobody{i}")):
            checks.clear()
            started = time.perf_counter()
            assert await send_from(h, f"198.51.100.{i + 40}", login=login,
                                   password="Wrong1234") == WRONG
            timings[kind].append(time.perf_counter() - started)
            assert len(checks) == 1, (kind, checks)
    known, unknown = (statistics.median(timings[k]) for k in ("known", "unknown"))
    assert 0.6 < known / unknown < 1.6, timings


async def test_a_burst_of_right_credentials_before_the_first_check_is_not_guessing(
        make_harness: Any, config: Any) -> None:
    """The same credentials 64 times at once, before any check is cached: they share one
    scrypt run, and none is refused as locked (a load test's first second looks like this)."""
    config = behind_proxy(config, max_failures=4)
    h: Harness = await make_harness(cfg=config)
    answers = await asyncio.gather(*(send_from(h, "198.51.100.60") for _ in range(64)))
    assert all(answer.startswith("OK") for answer in answers), set(answers)
    wrong = await asyncio.gather(*(send_from(h, "198.51.100.61", password="Same1234")
                                   for _ in range(64)))
    assert set(wrong) <= {WRONG, LOCKED, BUSY} and wrong.count(WRONG) >= 1
    assert await send_from(h, "198.51.100.61") == LOCKED  # counted afterwards all the same
