"""Credits, quotas and the ledger: the money rules, and that concurrency cannot break them."""

from __future__ import annotations

import asyncio
import json
import random
import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.credits import InvalidAmount, RateTable, format_credits, to_cents
from gateway.service import ValidationError
from gateway.store import NotEnoughCredits
from tests.conftest import ACCOUNT, LOGIN, Harness, eventually, ledger_identity

# -- pure amounts ----------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "cents"), [("150", 15000), ("12.5", 1250), ("0.07", 7),
                                            (3, 300), ("1e2", 10000)])
def test_to_cents(raw: Any, cents: int) -> None:
    assert to_cents(raw) == cents


@pytest.mark.parametrize("raw", ["-1", "0.001", "abc", "nan", "inf", True, ""])
def test_to_cents_refuses(raw: Any) -> None:
    with pytest.raises(InvalidAmount):
        to_cents(raw)


@pytest.mark.parametrize(("cents", "text"), [(198700, "1987"), (1250, "12.5"), (7, "0.07"),
                                             (0, "0"), (5, "0.05"), (-150, "-1.5")])
def test_format_credits(cents: int, text: str) -> None:
    assert format_credits(cents) == text


def test_rate_table_longest_prefix() -> None:
    table = RateTable.from_config("1", {"+33": "1.5", "336": "2", "0044": "3"})
    assert table.rate("+33612345678") == 200
    assert table.rate("+33112345678") == 150
    assert table.rate("+447911123456") == 300
    assert table.rate("+15551234567") == 100
    assert table.cost(["+33612345678", "+15551234567"], 3) == [600, 300]


def test_rate_table_prefixes_of_any_length() -> None:
    # A number block priced apart (premium, a partner's range): as long as it needs to be.
    table = RateTable.from_config("1", {"+33": "0.5", "+3361234": "2", "+336123456": "3",
                                        "+336123456789012": "4"})
    assert table.rate("+33612345678") == 300
    assert table.rate("+33612349999") == 200
    assert table.rate("+33699999999") == 50
    assert table.rate("+336123456789012") == 400
    assert RateTable().rate("+33612345678") == 100  # no table: the default


@given(prefixes=st.dictionaries(st.from_regex(r"\+[1-9][0-9]{0,6}", fullmatch=True),
                                st.integers(1, 999), max_size=12),
       number=st.from_regex(r"\+[1-9][0-9]{1,14}", fullmatch=True))
def test_rate_table_takes_the_longest_matching_prefix(prefixes: dict[str, int],
                                                      number: str) -> None:
    table = RateTable(default=7, by_prefix=prefixes)
    matching = [prefix for prefix in prefixes if number.startswith(prefix)]
    assert table.rate(number) == (prefixes[max(matching, key=len)] if matching else 7)


# -- quota moves -----------------------------------------------------------------------------


async def test_quota_moves_credits_between_account_and_user(make_harness: Any) -> None:
    h: Harness = await make_harness(credits=200)
    await h.manage.update_user(ACCOUNT, LOGIN, quota=150)
    assert (await h.balance(), await h.quota()) == (5000, 15000)
    await h.manage.update_user(ACCOUNT, LOGIN, quota=180)
    assert (await h.balance(), await h.quota()) == (2000, 18000)
    await h.manage.update_user(ACCOUNT, LOGIN, quota=100)
    assert (await h.balance(), await h.quota()) == (10000, 10000)
    with pytest.raises(NotEnoughCredits):
        await h.manage.update_user(ACCOUNT, LOGIN, quota=201)
    assert (await h.balance(), await h.quota()) == (10000, 10000)
    await h.send()
    await h.manage.update_user(ACCOUNT, LOGIN, quota=None)
    user = await h.gateway.store.get_user(ACCOUNT, LOGIN)
    assert (user.quota_active, await h.balance()) == (False, 19900)
    ledger_identity(await h.gateway.store.ledger_totals())


async def test_sends_draw_from_the_quota_while_active(make_harness: Any) -> None:
    h: Harness = await make_harness(credits=10)
    await h.manage.update_user(ACCOUNT, LOGIN, quota=2)
    assert (await h.send())[1] == "OK\n1\n1"
    assert (await h.send())[1] == "OK\n0\n2"
    _, body = await h.send()
    assert body.startswith("KO\n402 Not enough quota")
    assert await h.balance() == 800  # the account is untouched
    await h.manage.update_user(ACCOUNT, LOGIN, quota=None)
    assert (await h.send())[1] == "OK\n7\n3"


async def test_delete_user_returns_quota(make_harness: Any) -> None:
    h: Harness = await make_harness(credits=100)
    await h.manage.update_user(ACCOUNT, LOGIN, quota=40)
    await h.manage.delete_user(ACCOUNT, LOGIN)
    assert await h.balance() == 10000
    ledger_identity(await h.gateway.store.ledger_totals())


async def test_half_invalid_change_changes_nothing(make_harness: Any) -> None:
    h: Harness = await make_harness(credits=100)
    before = await h.gateway.store.get_user(ACCOUNT, LOGIN)
    with pytest.raises(ValidationError):
        await h.manage.update_user(ACCOUNT, LOGIN, quota=50,
                                   ip_restrictions=[f"{i}.{i}.{i}.{i}" for i in range(1, 7)])
    with pytest.raises(ValidationError):
        await h.manage.update_user(ACCOUNT, LOGIN, quota=50, password="short")
    assert await h.gateway.store.get_user(ACCOUNT, LOGIN) == before
    assert await h.balance() == 10000


# -- concurrency -----------------------------------------------------------------------------


async def test_200_concurrent_sends_against_a_quota_of_50(make_harness: Any) -> None:
    h: Harness = await make_harness(credits=1000)
    await h.manage.update_user(ACCOUNT, LOGIN, quota=50)
    await h.send()  # warm the password cache so the race is on the charge itself
    await h.manage.update_user(ACCOUNT, LOGIN, quota=50)
    results = await asyncio.gather(*(h.send(noStop="1") for _ in range(200)))
    accepted = [body for _, body in results if body.startswith("OK")]
    refused = [body for _, body in results if body.startswith("KO\n402")]
    assert (len(accepted), len(refused)) == (50, 150)
    ids = {body.split("\n")[2] for body in accepted}
    assert len(ids) == 50
    assert await h.quota() == 0
    assert await h.balance() == 94900  # 1000 - 50 - the 1 refilled after the warm-up
    ledger_identity(await h.gateway.store.ledger_totals())
    assert h.gateway.committer.batches < 200  # the sends were committed in groups


async def test_concurrent_sends_never_overdraw_the_account(make_harness: Any) -> None:
    h: Harness = await make_harness(credits=30)
    await h.send(noStop="1")
    results = await asyncio.gather(*(
        h.send(noStop="1", to="+33612345678,+33612345679") for _ in range(40)))
    accepted = sum(body.startswith("OK") for _, body in results)
    assert accepted == 14  # 29 credits left, 2 per request
    assert await h.balance() == 100


async def test_ledger_identity_after_a_mixed_workload(make_harness: Any) -> None:
    h: Harness = await make_harness(credits=500)
    await h.manage.create_user(ACCOUNT, "bob", "bobpass99")
    await h.manage.create_user(ACCOUNT, "carol", "carolpass9")
    rng = random.Random(7)
    for step in range(60):
        choice = rng.randrange(6)
        if choice == 0:
            await h.manage.update_user(ACCOUNT, rng.choice([LOGIN, "bob", "carol"]),
                                       quota=rng.randrange(0, 60))
        elif choice == 1:
            await h.manage.update_user(ACCOUNT, rng.choice([LOGIN, "bob", "carol"]),
                                       quota=None)
        elif choice == 2:
            await h.manage.credit_account(ACCOUNT, f"{rng.randrange(1, 2000) / 100:.2f}")
        else:
            login, password = rng.choice([(LOGIN, "secret123"), ("bob", "bobpass99"),
                                          ("carol", "carolpass9")])
            await asyncio.gather(*(h.send(login=login, password=password,
                                          to="+33612345678,+447911123456",
                                          message="x" * rng.randrange(1, 400))
                                   for _ in range(rng.randrange(1, 5))))
        if step == 30:
            await h.manage.delete_user(ACCOUNT, "carol")
            await h.manage.create_user(ACCOUNT, "carol", "carolpass9")
    totals = await h.gateway.store.ledger_totals()
    ledger_identity(totals)
    assert totals["spent"] > 0
    assert totals["purchased"] > 50000


async def test_response_credit_left_is_the_quota_or_the_balance(make_harness: Any) -> None:
    h: Harness = await make_harness(credits=100)
    await h.manage.update_user(ACCOUNT, LOGIN, quota=10)
    body = json.loads((await h.send(contentType="text/json"))[1])
    assert body["creditLeft"] == "9"
    await h.manage.create_user(ACCOUNT, "bob", "bobpass99")
    body = json.loads((await h.send(login="bob", password="bobpass99",
                                    contentType="text/json"))[1])
    assert body["creditLeft"] == "89"


async def test_a_deleted_users_messages_never_reach_a_new_user(make_harness: Any,
                                                               config: Any) -> None:
    from gateway.clock import ManualClock

    # The clock never gets there.
    config = config.replace({"operator.min_delay": 60.0, "operator.max_delay": 60.0})
    h: Harness = await make_harness(cfg=config, credits=100, clock=ManualClock())
    await h.manage.create_account("sms-other-1", 10)
    await h.manage.update_user(ACCOUNT, LOGIN, quota=10)
    (_, body) = await h.send(to="+33612399023")  # will fail, not billed: refunded
    message_id = int(body.split("\n")[2])
    await h.manage.delete_user(ACCOUNT, LOGIN)
    # The freed row id goes to a user of another account, with a callback and a quota.
    eve = await h.manage.create_user("sms-other-1", "eve", "evepass99")
    await h.manage.update_user("sms-other-1", "eve", quota=5,
                               callback_url="https://example.com/eve")
    message = await h.gateway.store.get_message(message_id)
    assert message.login == LOGIN and eve.login == "eve"
    from gateway.records import StateUpdate
    await h.gateway.store.apply_updates([StateUpdate.from_ptt(message_id, 23, 9e9)])
    assert await h.quota("eve", "sms-other-1") == 500  # not refunded into eve's quota
    assert await h.balance() == 100 * 100  # refunded to the account it came from
    assert (await h.gateway.store.counts())["outbox_pending"] == 0  # no callback to eve
    ledger_identity(await h.gateway.store.ledger_totals())


# -- the most an account holds (issue 19 #19) ------------------------------------------------

ADMIN = {"Authorization": "Bearer test-admin-token-0123456789"}
MAX = 10**12  # credits: credits.MAX_CREDITS, as the API and the README write it


async def admin(h: Harness, method: str, path: str, body: Any) -> tuple[int, Any]:
    resp = await h.client.request(method, f"/1.0/sms/{ACCOUNT}{path}", headers=ADMIN,
                                  json=body)
    return resp.status, await resp.json()


async def test_top_ups_beyond_the_maximum_are_refused_and_change_nothing(
        harness: Harness) -> None:
    """9,300 top-ups of 10^13 credits once made the balance a float of 9.3e18 hundredths."""
    store = harness.gateway.store
    status, body = await admin(harness, "POST", "/credits", {"amount": 10**13})
    assert (status, body["field"]) == (400, "amount"), body
    assert await harness.balance() == 1000 * 100
    # Up to the maximum exactly, then not a hundredth more, however it is asked.
    status, body = await admin(harness, "POST", "/credits", {"amount": MAX - 1000})
    assert status == 200 and body["creditsLeft"] == MAX
    before = (await store.ledger_totals(), await store.list_ledger(ACCOUNT, limit=1000))
    for amount in (0.01, 1, MAX):
        status, body = await admin(harness, "POST", "/credits", {"amount": amount})
        assert status in (400, 409), body
        assert "maximum" in body["message"] or "at most" in body["message"], body
    assert (await store.ledger_totals(), await store.list_ledger(ACCOUNT, limit=1000)) == before
    account = await store.get_account(ACCOUNT)
    assert type(account.balance) is int and account.balance == MAX * 100
    # Sends still cost what they cost.
    assert (await harness.send())[1].startswith("OK")
    assert await harness.balance() == MAX * 100 - 100
    ledger_identity(await store.ledger_totals())


async def test_credits_on_their_way_count_and_their_refund_stays_within(
        harness: Harness) -> None:
    store = harness.gateway.store
    status, _ = await admin(harness, "POST", "/credits", {"amount": MAX - 1000})
    assert status == 200
    # A deferred send holds its credit; the account still holds the maximum.
    later = datetime.fromtimestamp(time.time() + 86400, ZoneInfo("Europe/Paris"))
    assert (await harness.send(deferred=later.strftime("%H%M%d%m%Y")))[1].startswith("OK")
    # A failure the operator does not bill (+336123990NN) is refunded.
    assert (await harness.send(to="+33612399023"))[1].startswith("OK")
    status, body = await admin(harness, "POST", "/credits", {"amount": 1})
    assert status == 409 and "maximum" in body["message"], body

    async def refunded() -> bool:
        return await harness.balance() == MAX * 100 - 100
    await eventually(refunded)
    status, body = await admin(harness, "POST", "/credits", {"amount": 0.01})
    assert status == 409, body
    ledger_identity(await store.ledger_totals())


async def test_a_quota_above_the_maximum_is_refused(harness: Harness) -> None:
    for quota in (MAX + 1, 10**13):
        resp = await harness.client.put(
            f"/1.0/sms/{ACCOUNT}/users/{LOGIN}", headers=ADMIN,
            json={"quotaInformations": {"quotaStatus": "active", "quotaLeft": quota}})
        assert resp.status == 400 and (await resp.json())["field"] == "quotaLeft"
    assert (await harness.quota(), await harness.balance()) == (0, 100_000)


def test_the_rules_refuse_what_would_pass_the_maximum() -> None:
    from gateway.credits import MAX_CREDITS, OverLimit, checked_add
    from gateway.store import OverCreditLimit
    from gateway.store import rules as store_rules

    assert MAX_CREDITS == MAX * 100
    assert checked_add(MAX_CREDITS - 5, 5) == MAX_CREDITS
    with pytest.raises(OverLimit):
        checked_add(MAX_CREDITS, 1)
    assert store_rules.top_up(MAX_CREDITS - 1, 1) == MAX_CREDITS
    with pytest.raises(OverCreditLimit, match="top-up"):
        store_rules.top_up(MAX_CREDITS, 1)
    with pytest.raises(OverCreditLimit, match="quota"):
        store_rules.quota_move(MAX_CREDITS + 1, 0, 2 * MAX_CREDITS)
