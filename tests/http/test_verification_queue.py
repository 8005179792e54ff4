"""The password-check queue: bounded, shared fairly between addresses, and rid of the checks
whose client hung up (hardening issue, point 3).

The queue itself is tested directly, with a verify stub held on a gate (no timing); the
refusal over HTTP on the real app; the flood of guesses that hang up at once against the
real process, at the real scrypt cost.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest

from gateway import passwords
from gateway.passwords import Abandoned, VerificationBusy, VerificationCache
from tests.conftest import ACCOUNT, LOGIN, PASSWORD, Harness
from tests.serverproc import (
    SEND_PATH,
    ServerProcess,
    demo_params,
    prepare_store,
    servers,
    wait_for,
)

WRONG = "KO\n401 Invalid account, login or password"


class Gate:
    """A verify stub: records the passwords it checks, in order, and holds each check until
    the gate opens (a thread waiting on an event, as scrypt holds a thread)."""

    def __init__(self) -> None:
        self.checked: list[str] = []
        self.opened = threading.Event()
        self.started = threading.Semaphore(0)

    def __call__(self, password: str, stored: str) -> bool:
        self.checked.append(password)
        self.started.release()
        assert self.opened.wait(10), "the gate was never opened"
        return password.startswith("right")

    async def wait_started(self, count: int) -> None:
        for _ in range(count):
            assert await asyncio.to_thread(self.started.acquire, True, 10)


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    gate = Gate()
    monkeypatch.setattr(passwords, "verify", gate)
    yield gate
    gate.opened.set()  # never leave a thread of the pool waiting


async def settled(task: asyncio.Future[Any]) -> bool:
    """Whether `task` is done once the loop has run everything else it can."""
    for _ in range(20):
        await asyncio.sleep(0)
    return task.done()


# -- the queue -----------------------------------------------------------------------------


async def test_the_queue_refuses_beyond_an_addresss_share_and_beyond_its_size(
        gate: Gate) -> None:
    cache = VerificationCache(queue_size=4, per_owner=2)
    a = [asyncio.ensure_future(cache.verify(f"a{i}", "h", owner="A")) for i in range(2)]
    await gate.wait_started(2)
    with pytest.raises(VerificationBusy):  # A's share is taken: refused at once
        await cache.verify("a2", "h", owner="A")
    b = [asyncio.ensure_future(cache.verify(f"b{i}", "h", owner="B")) for i in range(2)]
    assert not any([await settled(t) for t in b])
    with pytest.raises(VerificationBusy):  # the queue is full
        await cache.verify("right", "h", owner="C")
    # The same check as one queued joins it, taking no place of its own.
    joined = asyncio.ensure_future(cache.verify("b0", "h", owner="C"))
    gate.opened.set()
    assert await asyncio.gather(*a, *b, joined) == [False] * 5
    assert gate.checked == ["a0", "a1", "b0", "b1"] and cache.ran == 4
    assert await cache.verify("right", "h", owner="A")  # places are given back


async def test_addresses_take_turns(gate: Gate) -> None:
    """A flood from one address delays another address's check by one check, not by the
    flood: the queue serves the addresses in turn."""
    cache = VerificationCache(queue_size=100, per_owner=50)
    flood = [asyncio.ensure_future(cache.verify(f"a{i}", "h", owner="A")) for i in range(20)]
    await gate.wait_started(2)
    user = asyncio.ensure_future(cache.verify("right", "h", owner="B"))
    gate.opened.set()
    assert await user
    await asyncio.gather(*flood)
    assert gate.checked.index("right") == 3, gate.checked  # a0, a1 running, a2's turn, B's


async def test_a_queued_check_whose_callers_went_away_never_runs(gate: Gate) -> None:
    cache = VerificationCache(queue_size=10, per_owner=10)
    running = [asyncio.ensure_future(cache.verify(f"a{i}", "h", owner="A")) for i in range(2)]
    await gate.wait_started(2)
    gone = asyncio.ensure_future(cache.verify("gone", "h", owner="A", wanted=lambda: False))
    cancelled = asyncio.ensure_future(cache.verify("cancelled", "h", owner="A"))
    assert not await settled(cancelled)
    cancelled.cancel()
    assert not await settled(gone)
    # One caller hung up, another still waits for the same check: it runs.
    shared = [asyncio.ensure_future(cache.verify("shared", "h", owner="B", wanted=alive))
              for alive in (lambda: False, lambda: True)]
    await settled(shared[0])
    gate.opened.set()
    assert await asyncio.gather(*running, *shared) == [False] * 4
    with pytest.raises(Abandoned):
        await gone
    assert gate.checked == ["a0", "a1", "shared"]
    assert (cache.ran, cache.abandoned) == (3, 2)
    assert cache._pending == 0 and not cache._held and not cache._inflight


# -- over HTTP, on the real app -----------------------------------------------------------


def behind_proxy(config: Any, **security: Any) -> Any:
    return config.replace({"server.trusted_proxies": ["127.0.0.1"],
                           **{f"security.{name}": value for name, value in security.items()}})


async def send_from(h: Harness, address: str, **params: Any) -> aiohttp.ClientResponse:
    query = {"account": ACCOUNT, "login": LOGIN, "password": PASSWORD, "from": "ACME",
             "to": "+33612345678", "message": "Hello", **params}
    resp = await h.client.get(SEND_PATH, params=query, headers={"X-Forwarded-For": address})
    await resp.read()
    return resp


async def test_guesses_beyond_an_addresss_share_get_a_quick_429_that_counts_nothing(
        make_harness: Any, config: Any, gate: Gate) -> None:
    """20 guesses at once from one address: 2 are checked (its share), 18 answered 429 with
    Retry-After while those 2 are still held, without a failure counted or a place of the
    brute-force guard kept; another address's user still gets in."""
    config = behind_proxy(config, max_failures=4, verification_queue=8,
                          verification_queue_per_address=2)
    h: Harness = await make_harness(cfg=config)
    guesses = [asyncio.ensure_future(send_from(h, "198.51.100.7", password=f"Wrong{i:04d}"))
               for i in range(20)]
    await gate.wait_started(2)
    busy: set[asyncio.Future[aiohttp.ClientResponse]] = set()
    while len(busy) < 18:  # answered while the two checks are still held on the gate
        done, _ = await asyncio.wait(set(guesses) - busy, timeout=10,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert done, "no quick answer"
        busy |= done
    assert len(busy) == 18 and not any([await settled(g) for g in set(guesses) - busy])
    for answer in busy:
        resp = answer.result()
        assert (resp.status, resp.headers["Retry-After"]) == (429, "1")
        assert (await resp.text()).startswith("KO\n429 Too many logins being checked")
    user = asyncio.ensure_future(send_from(h, "198.51.100.8", password="right-but-gated"))
    gate.opened.set()
    assert [await (await g).text() for g in guesses if g not in busy] == [WRONG] * 2
    assert (await user).status == 200
    # 2 failures counted of 4 allowed: the refused 18 kept no place, so 2 more are checked.
    answers = [await (await send_from(h, "198.51.100.7", password=f"Again{i}")).text()
               for i in range(3)]
    assert answers == [WRONG, WRONG, "KO\n401 Too many failed logins: try again later"]


# -- against the real process --------------------------------------------------------------

ATTACK_FROM = "127.0.0.9"  # loopback: another address than the real user's 127.0.0.1


async def hang_up_guess(port: int, n: int) -> None:
    """A wrong-credential request, the connection closed as soon as it is written."""
    query = urlencode({**demo_params(), "login": f"nobody{n}",
                       "password": f"Wrong{n:04d}"})
    _, writer = await asyncio.open_connection("127.0.0.1", port,
                                              local_addr=(ATTACK_FROM, 0))
    writer.write(f"GET {SEND_PATH}?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    writer.close()


def send_events(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.events("send")]


async def test_guesses_that_hang_up_at_once_do_not_delay_a_real_user(
        tmp_path: Path, real_hash_cost: int) -> None:
    """300 wrong guesses from one address, each hung up as soon as sent, then a real user's
    first request (its password not yet verified). The handlers ran on after their clients
    had gone and every guess queued a scrypt run: the user waited behind all of them. Now
    the address holds its share of the queue at most, a queued check whose client has gone
    never runs, and the user's check comes within a few scrypt runs.

    The lockout would also stop one address after max_failures checks; it is set out of the
    way so that the queue alone is measured (an attacker has many addresses)."""
    db = tmp_path / "gateway.sqlite3"
    await prepare_store(db, credits=100)  # the demo user, hashed at the real cost
    env = {passwords.TEST_N_VARIABLE: "", "HTTP2SMS_LOG_LEVEL": "info",
           "HTTP2SMS_SECURITY_MAX_FAILURES": "100000"}
    async with servers() as started:
        server = await ServerProcess.start(db, env=env)
        started.append(server)
        await asyncio.gather(*(hang_up_guess(server.port, n) for n in range(300)))
        began = time.perf_counter()
        async with aiohttp.ClientSession() as session, \
                session.get(server.send_url, params=demo_params()) as resp:
            body = await resp.text()
        waited = time.perf_counter() - began
        assert body.startswith("OK"), body
        # The guesses whose password was checked before the user's: at most the address's
        # share of the queue (8) and the two checks running.
        events = send_events(server)
        user_at = next(i for i, e in enumerate(events) if e["outcome"] == 100)
        checked_before = [e for e in events[:user_at] if e["outcome"] == 401]
        assert len(checked_before) <= 10, (len(checked_before), waited)

        def outcomes() -> dict[int, int]:
            counts: dict[int, int] = {}
            for event in send_events(server):
                if event.get("client_ip") == ATTACK_FROM:
                    counts[event["outcome"]] = counts.get(event["outcome"], 0) + 1
            return counts

        async def all_answered() -> dict[int, int] | None:
            counts = outcomes()
            return counts if sum(counts.values()) == 300 else None

        counts = await wait_for(all_answered, timeout=30, what="every guess answered")
        # Checked (401), dropped as their client had gone (499), or refused (429).
        assert set(counts) <= {401, 429, 499} and counts.get(401, 0) <= 10, counts
        assert waited < 5.0, (waited, counts)

