"""Delivery-report callbacks against a real local HTTP receiver, and their retry rules."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import sys
import time
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import structlog
from aiohttp import web
from yarl import URL

from gateway import cli, ptt
from gateway.app import own_ports
from gateway.config import Config
from gateway.hooks.callbacks import (
    callback_params,
    callback_url,
    host_key,
    log_host,
    target_problem,
)
from gateway.hooks.http_client import HttpClient
from gateway.hooks.outbox import RetryPolicy, next_attempt_at
from gateway.hooks.targets import TargetPolicy
from gateway.records import MessageFilter
from tests.conftest import ACCOUNT, LOGIN, PASSWORD, SEND_PATH, SENDER, Harness, eventually

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC, 23:13:20 in Paris
PARIS = ZoneInfo("Europe/Paris")



async def settle() -> None:
    """Give background tasks a moment, to show that nothing more happens."""
    await asyncio.sleep(0.1)


def ids_of(body: str) -> list[int]:
    lines = body.split("\n")
    assert lines[0] == "OK", body
    return [int(line) for line in lines[2:]]


class Receiver:
    """A customer's callback endpoint: records each call, answers as told."""

    def __init__(self) -> None:
        self.calls: list[dict[str, str]] = []
        self.keys: list[list[str]] = []
        self.statuses: dict[str, list[int]] = {}   # ptt -> statuses to answer, in turn
        self.gate: asyncio.Event | None = None     # when set up, calls wait for it
        self.in_flight = 0
        self.most_in_flight = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/cb", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            query = dict(request.query)
            self.calls.append(query)
            self.keys.append(list(request.query.keys()))
            answers = self.statuses.get(query.get("ptt", ""), [])
            return web.Response(status=answers.pop(0) if answers else 200, text="ok")
        finally:
            self.in_flight -= 1

    def of(self, ptt: int) -> list[dict[str, str]]:
        return [c for c in self.calls if c.get("ptt") == str(ptt)]


async def attempted(h: Harness, message_id: int, count: int) -> None:
    """Wait until `count` attempts are recorded: only then is the next retry time set."""
    async def recorded() -> bool:
        return len(await h.gateway.store.message_attempts(message_id)) >= count
    await eventually(recorded)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- pure rules ----------------------------------------------------------------------------

def test_callback_parameters() -> None:
    params = callback_params({"id": 12, "ptt": 23, "dlr": 16, "at": T0 + 0.7, "tag": "x y"},
                             PARIS)
    assert params == {"id": "12", "ptt": "23", "date": "2023-11-14 23:13:20",
                      "description": "16", "descriptionDlr": "error, not billed",
                      "dlr": "16", "tag": "x y"}
    assert callback_params({"id": 1, "ptt": 4, "dlr": 1, "at": T0, "tag": None},
                           ZoneInfo("UTC"))["date"] == "2023-11-14 22:13:20"


def test_callback_url_keeps_the_query_it_has() -> None:
    url = callback_url("https://h.example:8443/dlr?key=a%2Bb&id=old",
                       {"id": 5, "ptt": 4, "dlr": 1, "at": T0, "tag": ""}, PARIS)
    assert (url.host, url.port, url.path) == ("h.example", 8443, "/dlr")
    assert url.query["key"] == "a+b"
    assert url.query.getall("id") == ["old", "5"]
    assert list(url.query)[2:] == ["ptt", "date", "description", "descriptionDlr", "dlr",
                                   "tag"]


def test_host_key_shows_no_path_nor_query() -> None:
    assert log_host("https://user:pw@h.example/cb?token=s3cr3t") == "h.example:443"
    assert log_host("http://127.0.0.1:8000/x") == "127.0.0.1:8000"
    # The unit of per-host concurrency is the host alone: its ports share its capacity.
    assert host_key("http://127.0.0.1:8000/x") == host_key("http://127.0.0.1:9000/") \
        == "127.0.0.1"


# Elsewhere no customer may reach: this machine in disguise, link-local, the cloud's
# metadata, an intranet. (Names resolving to them are refused at connect time.)
REFUSED = ["127.0.0.1", "localhost", "127.1", "2130706433", "0x7f000001",
           "[::ffff:127.0.0.1]", "017700000001", "0.0.0.0", "[::1]", "169.254.169.254",
           "[fe80::1%25lo]", "10.1.2.3", "a.localhost"]


@pytest.mark.parametrize("host", REFUSED)
def test_a_url_naming_a_refused_address_is_refused_when_set(host: str) -> None:
    problem = target_problem(f"http://{host}:8080/dlr?token=s3cr3t", TargetPolicy())
    assert problem is not None and "s3cr3t" not in problem


def test_a_refusal_names_the_settings_that_allow_it() -> None:
    assert target_problem("http://127.1/dlr", TargetPolicy()) == (
        "127.0.0.1 is not a public address (callbacks.allow_private_targets or "
        "callbacks.allowed_target_networks allow it)")


def test_public_addresses_and_names_pass_the_set_time_check() -> None:
    for url in ("https://dlr.example.com/cb", "http://8.8.8.8/cb",
                "http://[2a00:1450:4007:80e::200e]/cb",
                # a name is judged on the address it resolves to, when the callback connects
                "http://intranet.corp/cb"):
        assert target_problem(url, TargetPolicy()) is None, url


def test_private_targets_and_allowed_networks_open_the_way_but_not_to_nowhere() -> None:
    private = TargetPolicy(allow_private=True)
    assert target_problem("http://127.0.0.1:9/cb", private) is None
    assert target_problem("http://0.0.0.0:9/cb", private) is not None
    intranet = TargetPolicy.from_settings(False, ["10.1.2.0/24"])
    assert target_problem("http://10.1.2.3/cb", intranet) is None
    assert target_problem("http://10.1.3.3/cb", intranet) is not None


def test_the_gateway_s_own_listeners_are_its_port_and_the_admin_one() -> None:
    config = Config().replace({"server.port": 8080, "admin.port": 8081})
    assert own_ports(config) == {8080}  # the admin API shares the public listener
    assert own_ports(config.replace({"admin.host": "127.0.0.1"})) == {8080, 8081}


async def test_a_callback_reaching_the_send_url_another_way_sends_nothing(
        harness: Harness) -> None:
    """Behind a TLS proxy, a published container port or NAT, a callback to the gateway's
    own send URL is not seen as reaching itself (another address, another port): it sent an
    SMS per report, in a loop. Every callback says what it is, and the send URL refuses it."""
    server = harness.client.server
    send_url = URL(f"http://127.0.0.1:{server.port}{SEND_PATH}").with_query(
        account=ACCOUNT, login=LOGIN, password=PASSWORD, to="+33612345678",
        message="loop", **{"from": SENDER})
    before = await harness.balance()
    http = HttpClient(timeout=5.0, max_idle_per_origin=1, user_agent="http2sms-gateway")
    try:
        assert await http.get(send_url) == 200  # answered, with a KO: not tried again
    finally:
        await http.close()
    resp = await harness.client.get(send_url.path_qs, headers={"X-Http2sms-Callback": "1"})
    assert await resp.text() == ("KO\n401 A callback of this gateway cannot send SMS: "
                                 "a callBack URL names the send URL")
    assert await harness.balance() == before
    account = await harness.gateway.store.get_account(ACCOUNT)
    assert await harness.gateway.store.list_messages(MessageFilter(account.id), limit=1) == []


def test_backoff_doubles_from_the_first_retry_up_to_the_cap() -> None:
    policy = RetryPolicy(first_retry=5, max_retry=3600, give_up_after=10 * 86400, jitter=0.2)
    rng = random.Random(1)
    delays = [next_attempt_at(policy, attempts=n, created_at=0, now=1000, rng=rng) - 1000
              for n in range(1, 14)]
    nominal = [5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600, 3600]
    for delay, base in zip(delays, nominal, strict=True):
        assert base <= delay <= base * 1.2
    assert len({round(d, 6) for d in delays[-3:]}) == 3  # jittered, not in lockstep
    huge = next_attempt_at(policy, attempts=10_000, created_at=0, now=0, rng=rng)
    assert huge is not None and huge <= 3600 * 1.2


def test_backoff_without_jitter_is_exact() -> None:
    policy = RetryPolicy(first_retry=5, max_retry=60, give_up_after=86400, jitter=0.0)
    rng = random.Random(0)
    assert [next_attempt_at(policy, attempts=n, created_at=0, now=0, rng=rng)
            for n in (1, 2, 3, 4, 5)] == [5, 10, 20, 40, 60]


def test_giving_up_after_the_retry_window() -> None:
    policy = RetryPolicy(first_retry=5, max_retry=3600, give_up_after=86400, jitter=0.0)
    rng = random.Random(0)
    assert next_attempt_at(policy, attempts=30, created_at=0, now=86400 - 3600,
                           rng=rng) == 86400
    # Retried for the whole window: the last retry lands on its end, not before.
    assert next_attempt_at(policy, attempts=30, created_at=0, now=86400 - 1,
                           rng=rng) == 86400
    assert next_attempt_at(policy, attempts=30, created_at=0, now=86400,
                           rng=rng) is None


# -- through the gateway -------------------------------------------------------------------

async def test_the_admin_api_refuses_a_callback_to_this_machine(make_harness: Any,
                                                                config: Config) -> None:
    h: Harness = await make_harness(cfg=config.replace(
        {"callbacks.allow_private_targets": False}))
    auth = {"Authorization": f"Bearer {config.admin.token}"}
    path = f"/1.0/sms/{ACCOUNT}/users/{LOGIN}"
    for host in ("127.0.0.1:8080", "[::ffff:127.0.0.1]", "169.254.169.254"):
        resp = await h.client.put(path, json={"callBack": f"http://{host}/latest/meta-data"},
                                  headers=auth)
        assert resp.status == 400, await resp.text()
        assert "callbacks.allow_private_targets" in (await resp.json())["message"]
    assert (await h.gateway.store.get_user(ACCOUNT, LOGIN)).callback_url is None
    resp = await h.client.put(path, json={"callBack": "https://dlr.example.com/cb"},
                              headers=auth)
    assert resp.status == 200, await resp.text()


@pytest.fixture
async def receiver(aiohttp_server: Any) -> tuple[Receiver, str]:
    rec = Receiver()
    server = await aiohttp_server(rec.app())
    return rec, f"http://127.0.0.1:{server.port}/cb"


async def test_each_state_change_calls_back_with_the_exact_parameters(
        make_harness: Any, receiver: tuple[Receiver, str], capsys: Any) -> None:
    from gateway.clock import ManualClock

    rec, url = receiver
    h: Harness = await make_harness(clock=ManualClock(T0))
    await h.manage.update_user(ACCOUNT, LOGIN, callback_url=f"{url}?token=s3cr3t&x=1")
    (message_id,) = ids_of((await h.send(to="+33612399023", tag="campaign-7"))[1])
    await eventually(lambda: len(rec.calls) == 2)
    common = {"token": "s3cr3t", "x": "1", "id": str(message_id),
              "date": "2023-11-14 23:13:20", "tag": "campaign-7"}
    assert rec.of(3) == [{**common, "ptt": "3", "description": "4",
                          "descriptionDlr": "waiting", "dlr": "4"}]
    assert rec.of(23) == [{**common, "ptt": "23", "description": "16",
                           "descriptionDlr": "error, not billed", "dlr": "16"}]
    assert rec.keys[0] == ["token", "x", "id", "ptt", "date", "description",
                           "descriptionDlr", "dlr", "tag"]

    async def recorded() -> bool:
        return len(await h.gateway.store.message_attempts(message_id)) == 2
    await eventually(recorded)
    attempts = await h.gateway.store.message_attempts(message_id)
    assert [(a.ok, a.detail, a.state) for a in attempts] == [(True, "HTTP 200", "done")] * 2
    assert "s3cr3t" not in capsys.readouterr().out


async def test_the_account_url_is_used_when_the_user_has_none(
        make_harness: Any, receiver: tuple[Receiver, str]) -> None:
    rec, url = receiver
    h: Harness = await make_harness()
    await h.manage.update_account(ACCOUNT, callback_url=f"{url}?who=account")
    (first,) = ids_of((await h.send())[1])
    await eventually(lambda: len(rec.calls) == 2)
    await h.manage.update_user(ACCOUNT, LOGIN, callback_url=f"{url}?who=user")
    (second,) = ids_of((await h.send())[1])
    await eventually(lambda: len(rec.calls) == 4)
    assert {(c["id"], c["who"]) for c in rec.calls} == {(str(first), "account"),
                                                         (str(second), "user")}


async def test_no_callback_url_queues_nothing(make_harness: Any) -> None:
    h: Harness = await make_harness()
    (message_id,) = ids_of((await h.send())[1])

    async def delivered() -> bool:
        return (await h.gateway.store.get_message(message_id)).ptt == 4
    await eventually(delivered)
    assert (await h.gateway.store.counts())["outbox_pending"] == 0
    assert await h.gateway.store.message_attempts(message_id) == []


async def test_a_failing_receiver_is_retried_with_backoff_until_it_answers(
        make_harness: Any, receiver: tuple[Receiver, str], capsys: Any) -> None:
    from gateway.clock import ManualClock

    rec, url = receiver
    rec.statuses["4"] = [500, 500, 200]
    clock = ManualClock(T0)
    h: Harness = await make_harness(clock=clock)
    await h.manage.update_user(ACCOUNT, LOGIN, callback_url=f"{url}?token=s3cr3t")
    (message_id,) = ids_of((await h.send())[1])
    await attempted(h, message_id, 2)   # ptt 3: 200, ptt 4: 500
    assert len(rec.of(4)) == 1
    clock.advance(4.9)   # the first retry comes after 5 s (plus jitter), not before
    await settle()
    assert len(rec.of(4)) == 1
    clock.advance(1.2)
    await attempted(h, message_id, 3)
    assert len(rec.of(4)) == 2
    clock.advance(9.8)   # then after 10 s
    await settle()
    assert len(rec.of(4)) == 2
    clock.advance(2.3)
    await attempted(h, message_id, 4)
    clock.advance(24 * 3600)
    await settle()
    assert (len(rec.of(3)), len(rec.of(4))) == (1, 3)
    attempts = await h.gateway.store.message_attempts(message_id)
    by_item: dict[int, list[tuple[bool, str]]] = {}
    for a in attempts:
        by_item.setdefault(a.outbox_id, []).append((a.ok, a.detail))
    assert sorted(by_item.values(), key=len) == [
        [(True, "HTTP 200")],
        [(False, "HTTP 500"), (False, "HTTP 500"), (True, "HTTP 200")]]
    assert (await h.gateway.store.counts())["outbox_pending"] == 0
    logs = capsys.readouterr().out
    assert "outbox_attempt_failed" in logs and "127.0.0.1" in logs
    assert "s3cr3t" not in logs


async def test_callbacks_for_a_receiver_down_at_the_stop_arrive_after_a_restart(
        make_harness: Any, aiohttp_server: Any) -> None:
    from gateway.clock import ManualClock

    port = free_port()
    clock = ManualClock(T0)
    first: Harness = await make_harness(clock=clock)
    await first.manage.update_user(ACCOUNT, LOGIN,
                                   callback_url=f"http://127.0.0.1:{port}/cb?n=1")
    (message_id,) = ids_of((await first.send())[1])

    async def failed_once() -> bool:
        attempts = await first.gateway.store.message_attempts(message_id)
        return len(attempts) == 2
    await eventually(failed_once)
    attempts = await first.gateway.store.message_attempts(message_id)
    assert all(not a.ok and a.detail.startswith("cannot connect") for a in attempts)
    await first.client.close()  # the gateway stops with both callbacks pending

    rec = Receiver()
    await aiohttp_server(rec.app(), port=port)
    second: Harness = await make_harness(clock=clock, seed=False)
    assert (await second.gateway.store.counts())["outbox_pending"] == 2
    clock.advance(6.1)
    await eventually(lambda: len(rec.calls) == 2)
    assert sorted(c["ptt"] for c in rec.calls) == ["3", "4"]
    assert {c["id"] for c in rec.calls} == {str(message_id)}

    async def done() -> bool:
        return (await second.gateway.store.counts())["outbox_pending"] == 0
    await eventually(done)


async def test_an_unanswered_call_times_out_and_is_retried(
        make_harness: Any, receiver: tuple[Receiver, str], config: Config) -> None:
    from gateway.clock import ManualClock

    rec, url = receiver
    rec.gate = asyncio.Event()
    config = config.replace({"callbacks.timeout_seconds": 0.2})
    clock = ManualClock(T0)
    h: Harness = await make_harness(cfg=config, clock=clock)
    await h.manage.update_user(ACCOUNT, LOGIN, callback_url=url)
    (message_id,) = ids_of((await h.send())[1])

    async def timed_out() -> bool:
        return len(await h.gateway.store.message_attempts(message_id)) == 2
    await eventually(timed_out)
    attempts = await h.gateway.store.message_attempts(message_id)
    assert {(a.ok, a.detail) for a in attempts} == {(False, "no answer within 0.2 s")}
    rec.gate.set()
    clock.advance(6.1)

    async def retried() -> bool:
        return len(await h.gateway.store.message_attempts(message_id)) == 4
    await eventually(retried)
    attempts = (await h.gateway.store.message_attempts(message_id))[2:]
    assert [(a.ok, a.detail, a.at) for a in attempts] == [(True, "HTTP 200", T0 + 6.1)] * 2


async def test_a_slow_host_does_not_hold_up_other_users(
        make_harness: Any, config: Config, aiohttp_server: Any) -> None:
    config = config.replace({"callbacks.per_host_concurrency": 2, "callbacks.timeout_seconds": 30})
    slow, fast = Receiver(), Receiver()
    slow.gate = asyncio.Event()
    slow_server = await aiohttp_server(slow.app())
    # Another host (the per-host limit is per host, whatever the port).
    fast_server = await aiohttp_server(fast.app(), host="127.0.0.2")
    h: Harness = await make_harness(cfg=config)
    await h.manage.update_user(ACCOUNT, LOGIN,
                               callback_url=f"http://127.0.0.1:{slow_server.port}/cb")
    await h.manage.create_user(ACCOUNT, "bob", "secret456")
    await h.manage.update_user(ACCOUNT, "bob",
                               callback_url=f"http://127.0.0.2:{fast_server.port}/cb")
    alice_ids = ids_of((await h.send(to=",".join(f"+3361234560{n}" for n in range(5))))[1])
    await eventually(lambda: slow.in_flight == 2)

    started = time.monotonic()
    (bob_id,) = ids_of((await h.send(login="bob", password="secret456"))[1])
    assert time.monotonic() - started < 1.0  # the send path does not wait for callbacks
    await eventually(lambda: len(fast.calls) == 2)
    assert {c["id"] for c in fast.calls} == {str(bob_id)}
    assert slow.most_in_flight == 2 and slow.calls == []

    slow.gate.set()
    await eventually(lambda: len(slow.calls) == 10)
    assert {c["id"] for c in slow.calls} == {str(i) for i in alice_ids}
    assert slow.most_in_flight == 2


async def slow_and_fast_accounts(make_harness: Any, config: Config, aiohttp_server: Any,
                                  slow_hosts: list[str], **settings: Any) -> tuple[float, int]:
    """Five users of one account call back to `slow_hosts` (one each, in turn), which hang;
    then another account's user sends once: how long its first callback took to arrive,
    and the most callbacks the slow hosts held at once."""
    config = config.replace({"callbacks.per_host_concurrency": 2,
                             "callbacks.max_concurrency": 8,
                             "callbacks.timeout_seconds": 20, **settings})
    slow, fast = Receiver(), Receiver()
    slow.gate = asyncio.Event()
    h: Harness = await make_harness(cfg=config)
    for n in range(5):
        server = await aiohttp_server(slow.app(), host=slow_hosts[n % len(slow_hosts)])
        await h.manage.create_user(ACCOUNT, f"user{n}", "secret456")
        await h.manage.update_user(ACCOUNT, f"user{n}",
                                   callback_url=f"http://{server.host}:{server.port}/cb")
        ids_of((await h.send(login=f"user{n}", password="secret456",
                             to="+33612345601,+33612345602"))[1])
    fast_server = await aiohttp_server(fast.app(), host="127.0.0.2")
    await h.manage.create_account("other", 100)
    await h.manage.add_sender("other", "OTHER")
    await h.manage.create_user("other", "bob", "secret456")
    await h.manage.update_user("other", "bob",
                               callback_url=f"http://127.0.0.2:{fast_server.port}/cb")
    await eventually(lambda: slow.in_flight >= 2)
    await settle()
    started = time.monotonic()
    ids_of((await h.send(account="other", login="bob", password="secret456",
                         **{"from": "OTHER"}))[1])
    await eventually(lambda: len(fast.calls) >= 1, timeout=30)
    took = time.monotonic() - started
    slow.gate.set()
    await eventually(lambda: len(slow.calls) == 20)
    return took, slow.most_in_flight


async def test_a_slow_host_holds_its_own_slots_whatever_its_ports(
        make_harness: Any, config: Config, aiohttp_server: Any) -> None:
    # Five ports of one host: 2 slots in all, not 2 per port (which filled all 8).
    took, most = await slow_and_fast_accounts(make_harness, config, aiohttp_server,
                                              ["127.0.0.1"])
    # Before: the first callback of the other account waited for the timeout (20 s).
    assert took < 5.0, f"the other account's first callback waited {took:.1f} s"
    assert most == 2


async def test_an_account_s_slow_hosts_leave_slots_to_other_accounts(
        make_harness: Any, config: Config, aiohttp_server: Any) -> None:
    # Five hosts, 2 slots each, would take all 8; the account gets at most half of them.
    took, most = await slow_and_fast_accounts(
        make_harness, config, aiohttp_server,
        [f"127.0.0.{n}" for n in range(3, 8)], **{"callbacks.account_share": 2})
    # About a second: found by the claim that reads past the busy backlog, once a second.
    assert took < 5.0, f"the other account's first callback waited {took:.1f} s"
    assert most == 4  # max(share, free slots): half of the 8 when alone


async def test_pending_callbacks_follow_a_changed_url_and_are_cancelled_when_cleared(
        make_harness: Any, receiver: tuple[Receiver, str], capsys: Any) -> None:
    from gateway.clock import ManualClock

    rec, url = receiver
    clock = ManualClock(T0)
    h: Harness = await make_harness(clock=clock)

    async def failing_send() -> int:
        rec.statuses.update({"3": [500], "4": [500]})
        (message_id,) = ids_of((await h.send())[1])
        await attempted(h, message_id, 2)  # both callbacks failed: their retries wait
        return message_id

    def seen(message_id: int) -> list[str]:
        return [c["v"] for c in rec.calls if c["id"] == str(message_id)]

    # Changed (a leaked token rotated): the retries go to the new URL only.
    await h.manage.update_user(ACCOUNT, LOGIN, callback_url=f"{url}?v=old&token=leaked")
    first = await failing_send()
    await h.manage.update_user(ACCOUNT, LOGIN, callback_url=f"{url}?v=new")
    clock.advance(6.1)
    await attempted(h, first, 4)
    assert seen(first) == ["old", "old", "new", "new"]

    # The user's cleared: they go where a new callback would, to the account's URL.
    await h.manage.update_account(ACCOUNT, callback_url=f"{url}?v=account")
    second = await failing_send()
    await h.manage.update_user(ACCOUNT, LOGIN, callback_url="")
    clock.advance(6.1)
    await attempted(h, second, 4)
    assert seen(second) == ["new", "new", "account", "account"]

    # No URL left: they are cancelled, and say so.
    third = await failing_send()
    await h.manage.update_account(ACCOUNT, callback_url="")
    assert (await h.gateway.store.counts())["outbox_pending"] == 0
    clock.advance(24 * 3600)
    await settle()
    assert seen(third) == ["account", "account"]
    attempts = await h.gateway.store.message_attempts(third)
    assert [(a.ok, a.detail, a.state) for a in attempts] == \
        [(False, "HTTP 500", "dead")] * 2 + \
        [(False, "cancelled: no callback URL any more", "dead")] * 2
    assert "leaked" not in capsys.readouterr().out


async def test_a_callback_is_dead_after_the_retry_window(
        make_harness: Any, receiver: tuple[Receiver, str], config: Config,
        capsys: Any) -> None:
    from gateway.clock import ManualClock

    rec, url = receiver
    rec.statuses["3"] = [503] * 100
    config = config.replace({
        "callbacks.give_up_after_hours": 0.01,  # 36 s
        "callbacks.jitter_ratio": 0.0,
    })
    clock = ManualClock(T0)
    h: Harness = await make_harness(cfg=config, clock=clock)
    await h.manage.update_user(ACCOUNT, LOGIN, callback_url=url)
    (message_id,) = ids_of((await h.send())[1])

    async def dead() -> bool:
        return (await h.gateway.store.counts())["outbox_dead"] == 1
    # The delivered (ptt 4) callback succeeds at once; ptt 3 fails at 0, 12.1 and 24.2 s
    # (the clock jumps past each retry), then at 36.3, the retry due at the window's end.
    for count in (2, 3, 4, 5):
        await attempted(h, message_id, count)
        clock.advance(12.1)
    await eventually(dead)
    clock.advance(3600)
    await settle()
    assert len(rec.of(3)) == 4
    attempts = [a for a in await h.gateway.store.message_attempts(message_id)
                if not a.ok]
    assert [(a.detail, a.state) for a in attempts] == [("HTTP 503", "dead")] * 4
    assert "outbox_item_dead" in capsys.readouterr().out

    # The gateway's operator sees it in the message's history.
    shown = await run_cli(capsys, "--db", config.store.path, "--json", "message", "show",
                          str(message_id))
    assert [c["state"] for c in shown["callbacks"]].count("dead") == 4


# -- the command line ----------------------------------------------------------------------

async def run_cli(capsys: Any, *argv: str) -> Any:
    capsys.readouterr()
    # The gateway under test keeps logging while the command runs: keep its lines out of
    # the command's stdout, which must be its JSON answer alone.
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    try:
        code = await asyncio.to_thread(cli.main, list(argv))
    finally:
        structlog.configure(**saved)
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out)


async def test_message_show_and_list_read_history_and_callbacks(
        make_harness: Any, receiver: tuple[Receiver, str], config: Config,
        capsys: Any) -> None:
    rec, url = receiver
    rec.statuses["4"] = [500]
    h: Harness = await make_harness()
    await h.manage.update_user(ACCOUNT, LOGIN, callback_url=url)
    delivered, failed = ids_of((await h.send(to="+33612345678,+33612399023",
                                             tag="t1"))[1])
    (other,) = ids_of((await h.send(tag="t2"))[1])

    async def settled() -> bool:
        # `other` too: the simulator's reports leave in batches, its final state may come
        # a batch after the others'.
        return len(await h.gateway.store.message_attempts(delivered)) == 2 and \
            len(await h.gateway.store.message_attempts(failed)) == 2 and \
            (await h.gateway.store.get_message(other)).state == "final"
    await eventually(settled)

    shown = await run_cli(capsys, "--db", config.store.path, "--json", "message", "show",
                          str(delivered))
    assert (shown["state"], shown["ptt"], shown["dlr"], shown["tag"]) == ("final", 4, 1, "t1")
    assert [(e["ptt"], e["dlr"]) for e in shown["history"]] == [(None, 0), (3, 4), (4, 1)]
    assert sorted((c["ok"], c["detail"], c["state"]) for c in shown["callbacks"]) == [
        (False, "HTTP 500", "pending"), (True, "HTTP 200", "done")]

    listed = await run_cli(capsys, "--db", config.store.path, "--json", "message", "list",
                           ACCOUNT, "--tag", "t1")
    assert [m["id"] for m in listed] == [failed, delivered]
    listed = await run_cli(capsys, "--db", config.store.path, "--json", "message", "list",
                           ACCOUNT, "--ptt", "23", "--login", LOGIN)
    assert [(m["id"], m["ptt"], m["dlr"]) for m in listed] == [(failed, 23, 16)]
    listed = await run_cli(capsys, "--db", config.store.path, "--json", "message", "list",
                           ACCOUNT, "--ptt", "4")
    assert {m["id"] for m in listed} == {delivered, other}


@pytest.mark.parametrize("target", [
    "http://h:1/dlr/x?k=v", "http://h:1/dlr/x", "https://user:pw@h/p%20q?a=%C3%A9",
    "http://h/x?", "http://h/x#frag", "http://h/ü?x=ü&y", "http://[::1]:8080/a/b/",
])
def test_callback_urls_are_the_ones_yarl_would_build(target: str) -> None:
    """The shortcut that skips re-parsing the target gives yarl's own URL, byte for byte."""
    from yarl import URL

    every_ascii = "".join(chr(c) for c in range(32, 127))
    tz = ZoneInfo("Europe/Paris")
    for dlr in (*ptt.DLR_TEXT, 99):  # every DLR text, and one without a text
        for tag in (every_ascii + "é€\n\t", "", None):
            payload = {"id": 5, "ptt": 4, "dlr": int(dlr), "at": 1.7e9 + 0.5, "tag": tag}
            built = callback_url(target, payload, tz)
            expected = URL(target).extend_query(callback_params(payload, tz))
            assert str(built) == str(expected)
            assert built.query == expected.query
