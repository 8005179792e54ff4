"""The store contract: what every backend guarantees (see docs/store.md), run on each.

Each test opens real stores through `open_store`, on one database, and races them with
asyncio.gather: several calls on one store, and two stores (two connections, as two
processes have) on the same database. A new backend adds its row to `BACKENDS` and a
branch to `database_url`, and must pass every test here unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from gateway import ptt
from gateway.records import (
    ClaimBounds,
    IncomingMessage,
    IncomingPart,
    OperatorReport,
    SendOrder,
    SendOutcome,
    SentMessage,
    StateUpdate,
    User,
    UserChanges,
)
from gateway.store import (
    Conflict,
    NotEnoughCredits,
    NotFound,
    Role,
    Store,
    Taken,
    open_store,
    rules,
)
from tests.conftest import ledger_identity

BACKENDS = ["sqlite", "postgresql"]
ALERT_KINDS = ("alert_mail", "alert_sms")
T0 = 1_700_000_000.0

Opener = Callable[[Role], Awaitable[Store]]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of the backend under test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'contract.sqlite3'}"  # absolute: four slashes
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))  # on the throwaway cluster
    raise AssertionError(f"no database for {request.param}")


@pytest.fixture
async def stores(database_url: str) -> AsyncIterator[Opener]:
    """Opens stores on the test's database, each as its own connection; closes them all."""
    opened: list[Store] = []

    async def open_one(role: Role) -> Store:
        store = open_store(database_url, role)
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in reversed(opened):
        await store.close()


async def two(stores: Opener) -> tuple[Store, Store]:
    """The send process's store and another process's (the CLI's) on the same database."""
    return await stores("send"), await stores("cli")


async def account_with_user(store: Store, balance: int, *, name: str = "acme",
                            login: str = "alice") -> User:
    await store.create_account(name, balance, at=T0)
    return await store.create_user(name, login, "x", at=T0)


def order(user: User, cost: int, *, recipients: int = 1, kind: str = "api") -> SendOrder:
    return SendOrder(user.account_id, user.id, user.login, "ACME", "hello", 1, 1, 1, True, "",
                     tuple(f"+336123{n:05d}" for n in range(recipients)),
                     (cost,) * recipients, kind=kind)


async def commit_one(store: Store, sent: SendOrder) -> SendOutcome:
    (outcome,) = await store.commit_sends([sent], at=T0 + 1)
    return outcome


async def alerts(store: Store) -> int:
    """How many alert items were ever queued (claiming them takes them out of the way)."""
    return len(await store.claim_outbox(ALERT_KINDS, now=1e12, lease=1e12, limit=10_000))


# -- atomic charge -------------------------------------------------------------------------


async def test_concurrent_sends_take_exactly_the_affordable_ones(stores: Opener) -> None:
    """40 sends of 1 credit race for 10 credits, from two stores at once: exactly 10 pass,
    none is charged twice, and the ledger balances at the end."""
    a, b = await two(stores)
    user = await account_with_user(a, 1000)
    outcomes = await asyncio.gather(*(commit_one(a if n % 2 else b, order(user, 100))
                                      for n in range(40)))
    accepted = [o for o in outcomes if o.accepted]
    assert len(accepted) == 10
    assert {o.reason for o in outcomes if not o.accepted} == {"credits"}
    assert sorted(o.credit_left for o in accepted) == list(range(0, 1000, 100))
    assert (await b.get_account("acme")).balance == 0
    totals = await a.ledger_totals()
    ledger_identity(totals)
    assert totals["purchased"] == 1000 and totals["spent"] == 1000


async def test_a_batch_is_decided_in_order_in_one_transaction(stores: Opener) -> None:
    """Each order of a batch sees what the ones before it left, and concurrent batches
    see each other whole: the first to commit takes [3, -, 2], the others nothing."""
    a, b = await two(stores)
    user = await account_with_user(a, 500)
    batch = [order(user, 300), order(user, 300), order(user, 200)]
    results = await asyncio.gather(*(s.commit_sends(batch, at=T0 + 1) for s in (a, b, a, b)))
    decided = sorted([o.accepted for o in outcomes] for outcomes in results)
    assert decided == [[False] * 3] * 3 + [[True, False, True]]
    first = next(outcomes for outcomes in results if outcomes[0].accepted)
    assert [o.credit_left for o in first] == [200, 200, 0]
    ledger_identity(await a.ledger_totals())


async def test_quota_and_balance_are_charged_apart_and_both_hold(stores: Opener) -> None:
    """A user on a quota spends the quota, never the balance; the balance still pays its
    account's other users."""
    a, b = await two(stores)
    quota_user = await account_with_user(a, 2000)
    other = await a.create_user("acme", "bob", "x", at=T0)
    await a.update_user("acme", "alice", UserChanges(quota=500), at=T0)
    sends = [order(quota_user, 100) for _ in range(8)] + [order(other, 100) for _ in range(20)]
    outcomes = await asyncio.gather(*(commit_one(a if n % 2 else b, s)
                                      for n, s in enumerate(sends)))
    assert sum(o.accepted for o in outcomes[:8]) == 5
    assert sum(o.accepted for o in outcomes[8:]) == 15
    assert {o.reason for o in outcomes[:8] if not o.accepted} == {"quota"}
    assert (await a.get_user("acme", "alice")).quota_left == 0
    assert (await a.get_account("acme")).balance == 0
    totals = await b.ledger_totals()
    ledger_identity(totals)
    assert totals["purchased"] == 2000 and totals["spent"] == 2000


# -- no lost update ------------------------------------------------------------------------


async def test_concurrent_top_ups_quota_moves_and_sends_all_count(stores: Opener) -> None:
    a, b = await two(stores)
    user = await account_with_user(a, 1000)
    await a.create_user("acme", "bob", "x", at=T0)
    quotas = [100, 300, 200, 0, 400]

    async def top_up(store: Store) -> None:
        await store.credit_account("acme", 100, at=T0 + 1)

    async def move_quota(store: Store, quota: int) -> None:
        await store.update_user("acme", "bob", UserChanges(quota=quota), at=T0 + 1)

    work = [top_up(a if n % 2 else b) for n in range(30)]
    work += [move_quota(b if n % 2 else a, q) for n, q in enumerate(quotas)]
    work += [commit_one(a if n % 2 else b, order(user, 50)) for n in range(10)]
    results = await asyncio.gather(*work)
    sent = sum(r.accepted for r in results if isinstance(r, SendOutcome))
    assert sent == 10  # 4,000 credits were there at every moment for 500 of sends
    bob = await a.get_user("acme", "bob")
    account = await b.get_account("acme")
    # Whatever order the quota moves took, the credits moved are exactly the last quota.
    assert bob.quota_left in quotas
    assert account.balance == 1000 + 30 * 100 - 10 * 50 - bob.quota_left
    totals = await a.ledger_totals()
    ledger_identity(totals)
    assert totals["purchased"] == 4000 and totals["spent"] == 500


async def test_a_quota_never_takes_more_than_the_account_holds(stores: Opener) -> None:
    a, b = await two(stores)
    await account_with_user(a, 1000)
    await a.create_user("acme", "bob", "x", at=T0)

    async def try_quota(store: Store, login: str) -> bool:
        try:
            await store.update_user("acme", login, UserChanges(quota=700), at=T0 + 1)
        except NotEnoughCredits:
            return False
        return True

    granted = await asyncio.gather(try_quota(a, "alice"), try_quota(b, "bob"))
    assert sorted(granted) == [False, True]
    assert (await a.get_account("acme")).balance == 300
    ledger_identity(await b.ledger_totals())


# -- exactly one alert per crossing --------------------------------------------------------


async def test_concurrent_sends_crossing_a_threshold_queue_one_alert(stores: Opener) -> None:
    a, b = await two(stores)
    user = await account_with_user(a, 10_000)
    await a.update_user("acme", "alice", UserChanges(
        alert_threshold=5000, alert_support="both", alert_email="ops@example.com",
        alert_number="+33612345678"), at=T0)
    outcomes = await asyncio.gather(*(commit_one(a if n % 2 else b, order(user, 100))
                                      for n in range(80)))
    assert all(o.accepted for o in outcomes)
    assert sum(o.alert_queued for o in outcomes) >= 1
    assert await alerts(a) == 2  # one crossing, one mail and one SMS
    assert not (await b.get_user("acme", "alice")).alert_armed


async def test_an_alert_re_arms_above_the_threshold_and_fires_again(stores: Opener) -> None:
    a, b = await two(stores)
    user = await account_with_user(a, 1000)
    await a.update_user("acme", "alice", UserChanges(
        alert_threshold=500, alert_support="mail", alert_email="ops@example.com"), at=T0)
    assert (await a.get_user("acme", "alice")).alert_armed
    await commit_one(a, order(user, 600))  # 400 left: crossed
    assert await alerts(a) == 1
    await b.credit_account("acme", 100, at=T0 + 2)  # back at 500 exactly: not above it
    assert not (await a.get_user("acme", "alice")).alert_armed
    await commit_one(b, order(user, 100))
    assert await alerts(a) == 0
    await a.credit_account("acme", 200, at=T0 + 3)  # 600: above, armed again
    assert (await b.get_user("acme", "alice")).alert_armed
    await asyncio.gather(*(commit_one(s, order(user, 100)) for s in (a, b, a, b)))
    assert await alerts(b) == 1


async def test_setting_a_threshold_above_the_credits_fires_nothing(stores: Opener) -> None:
    a, _ = await two(stores)
    user = await account_with_user(a, 1000)
    await a.update_user("acme", "alice", UserChanges(
        alert_threshold=5000, alert_support="mail", alert_email="ops@example.com"), at=T0)
    assert not (await a.get_user("acme", "alice")).alert_armed
    await commit_one(a, order(user, 100))
    assert await alerts(a) == 0


# -- a claim is handed out once ------------------------------------------------------------


async def test_two_stores_claiming_at_once_never_share_an_item(stores: Opener) -> None:
    a, b = await stores("delivery"), await stores("delivery")
    user = await account_with_user(a, 0)
    ids = set(await asyncio.gather(*(
        (a if n % 2 else b).enqueue_outbox("callback", account_id=user.account_id,
                                           user_id=user.id, target=f"https://h{n % 5}.test/",
                                           payload={"n": n}, at=T0)
        for n in range(300))))
    claimed: list[int] = []

    async def claim_until_empty(store: Store) -> None:
        while items := await store.claim_outbox(("callback",), now=T0 + 1, lease=3600,
                                                limit=7, bounds=ClaimBounds(per_key=3)):
            claimed.extend(item.id for item in items)

    await asyncio.gather(*(claim_until_empty(s) for s in (a, b, a, b)))
    assert len(claimed) == len(set(claimed)) == 300
    assert set(claimed) == ids


async def test_pending_callbacks_follow_their_url_and_die_without_one(stores: Opener) -> None:
    a, b = await two(stores)
    user = await account_with_user(a, 0)
    old = await a.enqueue_outbox("callback", account_id=user.account_id, user_id=user.id,
                                 target="https://old.test/?k=leaked", payload={}, at=T0)
    alert = await a.enqueue_outbox("alert_mail", account_id=user.account_id,
                                   user_id=user.id, target="x@example.com", payload={}, at=T0)
    await b.update_user(user.account_name, user.login,
                        UserChanges(callback_url="https://new.test/"), at=T0)
    targets = {i.id: i.target for i in await a.claim_outbox(
        ("callback", "alert_mail"), now=T0, lease=1, limit=10)}
    assert targets == {old: "https://new.test/", alert: "x@example.com"}
    await b.update_account(user.account_name, callback_url="https://account.test/", at=T0)
    await b.update_user(user.account_name, user.login, UserChanges(callback_url=None), at=T0)
    (item,) = await a.claim_outbox(("callback",), now=T0 + 2, lease=1, limit=10)
    assert item.target == "https://account.test/"
    await b.update_account(user.account_name, callback_url=None, at=T0 + 3)
    assert await a.claim_outbox(("callback",), now=T0 + 4, lease=1, limit=10) == []
    assert await a.outbox_status(old) == ("dead", 2, "cancelled: no callback URL any more")


async def test_a_claim_whose_lease_ran_out_is_due_again(stores: Opener) -> None:
    a, b = await two(stores)
    user = await account_with_user(a, 0)
    item_id = await a.enqueue_outbox("callback", account_id=user.account_id, user_id=None,
                                     target="https://h.test/", payload={}, at=T0)
    (first,) = await a.claim_outbox(("callback",), now=T0, lease=60, limit=10)
    assert first.id == item_id
    assert await b.claim_outbox(("callback",), now=T0 + 59, lease=60, limit=10) == []
    (again,) = await b.claim_outbox(("callback",), now=T0 + 60, lease=60, limit=10)
    assert again.id == item_id and again.attempts == 2


async def test_two_stores_claiming_messages_never_share_one(stores: Opener) -> None:
    """Delivery claims: each due message is handed to one claimer at a time, whichever
    store asks and however the claims interleave."""
    a, b = await stores("delivery"), await stores("delivery")
    user = await account_with_user(a, 100_000)
    outcomes = await asyncio.gather(*(commit_one(a, order(user, 1, recipients=5))
                                      for _ in range(40)))
    ids = {i for o in outcomes for i in o.ids}
    claimed: list[int] = []

    async def claim_until_empty(store: Store) -> None:
        while messages := await store.claim_messages(now=T0 + 2, lease=60, limit=7):
            claimed.extend(m.id for m in messages)

    await asyncio.gather(*(claim_until_empty(s) for s in (a, b, a, b)))
    assert len(claimed) == len(set(claimed)) == len(ids) == 200
    assert set(claimed) == ids


async def test_a_message_claim_is_due_again_after_its_lease_unless_taken(
        stores: Opener) -> None:
    a, b = await stores("delivery"), await stores("delivery")
    user = await account_with_user(a, 1000)
    outcome = await commit_one(a, order(user, 1, recipients=2))
    first, second = outcome.ids
    assert {m.id for m in await a.claim_messages(now=T0 + 2, lease=60, limit=10)} == \
        {first, second}
    assert await b.claim_messages(now=T0 + 61, lease=60, limit=10) == []
    await a.mark_sent([first], at=T0 + 3)  # the operator took it: never claimed again
    again = await b.claim_messages(now=T0 + 63, lease=60, limit=10)
    assert [m.id for m in again] == [second]


# -- message ids ---------------------------------------------------------------------------


async def test_ids_are_unique_and_each_send_s_ids_consecutive(stores: Opener) -> None:
    """What ids promise: unique, and consecutive within one order. NOT that they commit
    in id order: a reader following new messages must not take "the highest id seen" for
    "all lower ids are seen" (a PostgreSQL sequence hands out ids before commit)."""
    a, b = await two(stores)
    user = await account_with_user(a, 100_000)
    outcomes = await asyncio.gather(*(commit_one(a if n % 2 else b,
                                                 order(user, 1, recipients=1 + n % 4))
                                      for n in range(60)))
    ids = [i for o in outcomes for i in o.ids]
    assert len(ids) == len(set(ids)) == sum(1 + n % 4 for n in range(60))
    for o in outcomes:
        assert list(o.ids) == list(range(o.ids[0], o.ids[0] + len(o.ids)))
    for message_id in ids:
        assert (await b.get_message(message_id)).id == message_id


async def test_an_order_checked_at_an_older_settings_version_is_refused(
        stores: Opener) -> None:
    a, b = await two(stores)
    await account_with_user(a, 1000)
    context = await a.send_context("acme", "alice", fresh=True)
    assert context is not None
    # What the send path checks (credentials, allowlists, senders, STOP clause) changed.
    await b.update_user("acme", "alice", UserChanges(password_hash="y"), at=T0)
    checked = replace(order(context.user, 100), settings_version=context.version)
    (outcome,) = await a.commit_sends([checked], at=T0 + 1)
    assert not outcome.accepted and outcome.reason == "stale"
    assert (await b.get_account("acme")).balance == 1000



async def test_a_change_to_one_account_leaves_another_accounts_sends_current(
        stores: Opener) -> None:
    """Settings versions are per account: churn on account A (users deleted and created
    again, a password, a sender, the STOP clause) never makes a send checked on account B's
    settings stale, while A's own sends checked before the change are."""
    a, b = await two(stores)
    await account_with_user(a, 1000, name="acme")
    await account_with_user(a, 1000, name="other", login="bob")
    other = await a.send_context("other", "bob", fresh=True)
    before = await a.send_context("acme", "alice", fresh=True)
    assert other is not None and before is not None
    await b.delete_user("acme", "alice", at=T0)
    await b.create_user("acme", "alice", "y", at=T0)
    await b.update_user("acme", "alice", UserChanges(password_hash="z"), at=T0)
    await b.add_sender("acme", "NEWS")
    await b.update_account("acme", stop_clause="STOP 36111")
    checked = replace(order(other.user, 100), settings_version=other.version)
    assert (await commit_one(a, checked)).accepted
    stale = replace(order(before.user, 100), settings_version=before.version)
    outcome = await commit_one(a, stale)
    assert not outcome.accepted and outcome.reason == "stale"
    assert (await b.get_account("acme")).balance == 1000


# -- reports -------------------------------------------------------------------------------


async def test_a_final_report_refunds_once_and_settles_the_message(stores: Opener) -> None:
    a, b = await stores("send"), await stores("delivery")
    user = await account_with_user(a, 1000)
    outcome = await commit_one(a, order(user, 300))
    (message_id,) = outcome.ids
    failed = StateUpdate.from_ptt(message_id, 23, T0 + 2)  # final, not billed
    delivered = StateUpdate.from_ptt(message_id, 4, T0 + 3)
    results = await asyncio.gather(b.apply_updates([failed]), a.apply_updates([failed]),
                                   b.apply_updates([delivered]))
    assert sum(len(r.finals) for r in results) == 1
    message = await a.get_message(message_id)
    assert message.state == "final" and message.ptt == 23
    assert (await a.get_account("acme")).balance == 1000
    ledger_identity(await b.ledger_totals())


async def long_message_sent(store: Store, user: User, references: tuple[str, ...]) -> int:
    (outcome,) = await store.commit_sends([replace(order(user, 300), parts=3)], at=T0 + 1)
    (message_id,) = outcome.ids
    await store.mark_sent([message_id], at=T0 + 2,
                          references=[SentMessage(message_id, references)])
    return message_id


def report(reference: str, code: int, at: float = T0 + 3) -> OperatorReport:
    return OperatorReport.from_ptt(reference, code, at)


async def test_a_long_message_is_delivered_when_every_part_is(stores: Opener) -> None:
    a, b = await stores("delivery"), await stores("delivery")
    user = await account_with_user(a, 1000)
    message_id = await long_message_sent(a, user, ("r1", "r2", "r3"))
    first = await a.apply_reports([report("r1", 4), report("r1", 4)])  # and a repeat
    assert first.ignored == (0, 1) and not first.unmatched and not first.finals
    assert (await a.get_message(message_id)).state == "sent"
    # The last two parts' receipts from two stores at once: it ends delivered, once.
    results = await asyncio.gather(a.apply_reports([report("r2", 4)]),
                                   b.apply_reports([report("r3", 4)]))
    assert sum(len(r.finals) for r in results) == 1
    message = await a.get_message(message_id)
    assert (message.state, message.ptt) == ("final", 4)


async def test_a_long_message_fails_when_one_part_fails(stores: Opener) -> None:
    store = await stores("delivery")
    user = await account_with_user(store, 1000)
    message_id = await long_message_sent(store, user, ("f1", "f2", "f3"))
    await store.apply_reports([report("f1", 4), report("f2", 23)])
    message = await store.get_message(message_id)
    assert (message.state, message.ptt) == ("final", 23)
    assert (await store.get_account("acme")).balance == 1000  # not billed: refunded
    late = await store.apply_reports([report("f3", 4)])
    assert late.ignored == (0,) and (await store.get_message(message_id)).ptt == 23


async def test_parts_carried_by_one_submit_are_delivered_with_it(stores: Opener) -> None:
    store = await stores("delivery")
    user = await account_with_user(store, 1000)
    message_id = await long_message_sent(store, user, ("p", "p#2", "p#3"))
    applied = await store.apply_reports([report("p", 4)])
    assert len(applied.finals) == 1
    assert (await store.get_message(message_id)).ptt == 4


async def test_a_batch_of_many_reports_applies_each_messages_reports_in_order(
        stores: Opener) -> None:
    """The delivery worker applies whatever reports arrived as one batch (one transaction):
    each message's states follow the batch's order, its history too, and what comes after
    its final state is left out, as a report naming no message is."""
    store = await stores("delivery")
    user = await account_with_user(store, 100_000)
    outcomes = await store.commit_sends([order(user, 100) for _ in range(120)], at=T0 + 1)
    ids = [i for outcome in outcomes for i in outcome.ids]
    await store.mark_sent(ids, at=T0 + 2,
                          references=[SentMessage(i, (f"m{i}",)) for i in ids])
    retry = ptt.INTERMEDIATE_CODES[0]
    batch = [report(f"m{i}", 3, T0 + 3) for i in ids]
    batch += [report(f"m{i}", retry, T0 + 4) for i in ids]
    batch.append(report("nobody", 4, T0 + 4))
    batch += [report(f"m{i}", 4, T0 + 5) for i in ids]
    batch += [report(f"m{i}", 23, T0 + 6) for i in ids[:10]]  # after the final: left out
    applied = await store.apply_reports(batch)
    unknown = 2 * len(ids)
    assert applied.unmatched == (unknown,)
    assert applied.ignored == (unknown, *range(len(batch) - 10, len(batch)))
    assert sorted(f.message_id for f in applied.finals) == ids
    assert applied.message_ids == (*ids, *ids, 0, *ids, *ids[:10])
    for message_id in (ids[0], ids[57], ids[-1]):
        message = await store.get_message(message_id)
        assert (message.state, message.ptt) == ("final", 4)
        assert [e.ptt for e in await store.message_events(message_id)][-3:] == [3, retry, 4]
    assert (await store.get_account("acme")).balance == 100_000 - 100 * len(ids)


def incoming(sender: str, receiver: str, body: str) -> IncomingMessage:
    return IncomingMessage(0, 0, "ref", sender, receiver, body, "", T0 + 5)


async def test_incoming_messages_go_to_the_account_they_answer(stores: Opener) -> None:
    store = await stores("delivery")
    alice = await account_with_user(store, 1000)
    bob = await account_with_user(store, 1000, name="bob", login="bob")
    await store.add_sender("bob", "BOBSHOP")
    tagged = replace(order(alice, 1), sender="+33700000000", tag="promo")
    await store.commit_sends([tagged], at=T0 + 1)
    ids = await store.add_incoming([
        incoming("+33612300000", "+33700000000", "STOP"),   # answers alice's message
        incoming("+33699999999", "BOBSHOP", "hi bob"),      # to bob's declared sender
        incoming("+33699999999", "+33700000000", "who?"),   # answers nothing
    ])
    assert ids[0] and ids[1] and ids[2] == 0
    (stop,) = await store.list_incoming("acme", limit=10)
    assert (stop.id, stop.account_id, stop.body, stop.tag) == (ids[0], alice.account_id,
                                                               "STOP", "promo")
    assert [m.body for m in await store.list_incoming("bob", limit=10)] == ["hi bob"]
    assert bob.account_id != alice.account_id
    more = await store.add_incoming([incoming("+33612300000", "+33700000000", "again")])
    newest_first = await store.list_incoming("acme", limit=10)
    assert [m.id for m in newest_first] == [more[0], ids[0]]
    assert [m.id for m in await store.list_incoming("acme", limit=10,
                                                    before_id=more[0])] == [ids[0]]


async def test_an_incoming_message_sent_again_is_kept_once(stores: Opener) -> None:
    """An SMSC that missed our answer sends the deliver_sm again: the same reference,
    numbers and text within INCOMING_REPEAT_SECONDS are that message, not another."""
    store = await stores("delivery")
    await account_with_user(store, 1000)
    await store.add_sender("acme", "ACME")
    first = IncomingMessage(0, 0, "fp-1", "+33611111111", "ACME", "yes", "", T0)
    [kept] = await store.add_incoming([first])
    again = await store.add_incoming([replace(first, created_at=T0 + 60),
                                      replace(first, reference="fp-2", created_at=T0 + 60)])
    assert again[0] == kept and again[1] not in (0, kept)  # another reference: another SMS
    later = await store.add_incoming([
        replace(first, created_at=T0 + rules.INCOMING_REPEAT_SECONDS + 1)])
    assert later[0] not in (0, kept)  # long after: the handset wrote the same again
    assert len(await store.list_incoming("acme", limit=10)) == 3


def part(seq: int, body: str, *, total: int = 3, group: int = 7, at: float = T0,
         reference: str = "", receiver: str = "ACME") -> IncomingPart:
    return IncomingPart(reference or f"fp-{group}-{seq}-{body}", "+33611111111", receiver,
                        group, total, seq, body, at)


async def test_the_parts_of_a_long_incoming_message_are_kept_until_it_is_whole(
        stores: Opener) -> None:
    store = await stores("delivery")
    await account_with_user(store, 1000)
    await store.add_sender("acme", "ACME")
    # One part a call, out of order, each committed before the SMSC is answered.
    assert await store.add_incoming_parts([part(2, "lo wo")]) == [None]
    assert await store.add_incoming_parts([part(2, "lo wo")]) == [None]  # sent again
    assert await store.add_incoming_parts([part(3, "rld")]) == [None]
    [message_id] = await store.add_incoming_parts([part(1, "Hel")])
    assert message_id
    [message] = await store.list_incoming("acme", limit=10)
    assert (message.id, message.body, message.sender) == (message_id, "Hello world",
                                                          "+33611111111")
    # A part sent again after its message was whole finds that message; nothing new.
    assert await store.add_incoming_parts([part(3, "rld")]) == [message_id]
    # The same group taken up by another message: the older parts do not mix in.
    assert await store.add_incoming_parts([part(1, "New"), part(2, " one")]) == [None, None]
    [other] = await store.add_incoming_parts([part(3, "!")])
    assert other not in (0, message_id)
    assert [m.body for m in await store.list_incoming("acme", limit=10)] == \
        ["New one!", "Hello world"]
    # Parts no account claims: whole, but not kept.
    assert await store.add_incoming_parts([part(1, "a", total=2, receiver="NOBODY"),
                                           part(2, "b", total=2, receiver="NOBODY")]) == \
        [None, 0]
    # A part left waiting too long is dropped: its message never becomes whole.
    await store.add_incoming_parts([part(1, "x", total=2, group=9)])
    late = T0 + rules.INCOMING_PARTS_SECONDS + 1
    assert await store.add_incoming_parts([part(2, "y", total=2, group=9, at=late)]) == [None]


async def test_parts_of_one_message_committed_at_once_make_it_whole_once(
        stores: Opener) -> None:
    """Each part comes on its own (two binds, two deliver_sm at once): neither commit may
    miss the other, nor both keep the message."""
    store = await stores("delivery")
    await account_with_user(store, 1000)
    await store.add_sender("acme", "ACME")
    for group in range(5):
        results = await asyncio.gather(*(store.add_incoming_parts(
            [part(seq, str(seq), group=group, total=4)]) for seq in range(1, 5)))
        found = [r[0] for r in results if r[0] is not None]
        assert len(found) == 1 and found[0], results
    assert sorted(m.body for m in await store.list_incoming("acme", limit=10)) == \
        ["1234"] * 5


async def test_refunds_racing_sends_keep_every_credit(stores: Opener) -> None:
    """The delivery worker refunds failures while the send process charges new sends:
    each refund is spendable by a send at once, and none is lost."""
    sender, worker = await stores("send"), await stores("delivery")
    user = await account_with_user(sender, 1000)
    first = await asyncio.gather(*(commit_one(sender, order(user, 100)) for _ in range(10)))
    failures = [StateUpdate.from_ptt(o.ids[0], 23, T0 + 2) for o in first]
    results = await asyncio.gather(
        *(worker.apply_updates([update]) for update in failures),
        *(commit_one(sender, order(user, 100)) for _ in range(15)))
    refunded = sum(len(r.finals) for r in results[:10])  # type: ignore[union-attr]
    accepted = sum(o.accepted for o in results[10:])  # type: ignore[union-attr]
    assert refunded == 10 and 0 <= accepted <= 10
    assert (await worker.get_account("acme")).balance == 1000 - 100 * accepted
    totals = await sender.ledger_totals()
    ledger_identity(totals)
    assert totals["spent"] == 100 * accepted


# -- exclusive names -----------------------------------------------------------------------


async def test_an_exclusive_name_has_one_holder_across_stores(stores: Opener) -> None:
    a, b = await stores("delivery"), await stores("delivery")
    async with a.exclusive("delivery") as held:
        assert held.name == "delivery" and not held.lost.is_set()
        with pytest.raises(Taken, match="delivery"):
            async with b.exclusive("delivery"):
                pass
        async with b.exclusive("other-name"):
            pass  # another name is another lock
        later = b.exclusive("delivery", wait=True)
        waiting = asyncio.ensure_future(later.__aenter__())
        done, _ = await asyncio.wait({waiting}, timeout=0.3)
        assert not done, "took a name its holder still had"
    await asyncio.wait_for(waiting, 5)
    with pytest.raises(Taken):
        async with a.exclusive("delivery"):
            pass
    await later.__aexit__(None, None, None)
    async with a.exclusive("delivery"):
        pass  # a holder that leaves lets the next one in


async def test_a_shared_name_has_many_holders_and_no_exclusive_one(stores: Opener) -> None:
    """The `deliver` workers on PostgreSQL hold `delivery` shared: side by side, never
    together with a gateway delivering alone (which frees every claim at its start)."""
    a, b = await stores("delivery"), await stores("delivery")
    async with a.exclusive("delivery", shared=True), b.exclusive("delivery", shared=True):
        with pytest.raises(Taken):
            async with a.exclusive("delivery"):
                pass
    async with a.exclusive("delivery"):
        with pytest.raises(Taken):
            async with b.exclusive("delivery", shared=True):
                pass
        later = b.exclusive("delivery", wait=True, shared=True)
        waiting = asyncio.ensure_future(later.__aenter__())
        done, _ = await asyncio.wait({waiting}, timeout=0.3)
        assert not done, "shared a name its exclusive holder still had"
    await asyncio.wait_for(waiting, 5)
    await later.__aexit__(None, None, None)


# -- admin API tokens ----------------------------------------------------------------------

async def test_a_token_revoked_by_another_process_is_gone_at_its_next_lookup(
        stores: Opener) -> None:
    send, cli = await two(stores)
    await cli.create_account("acme", 0, at=T0)
    await cli.create_account("beta", 0, at=T0)
    made = await cli.create_token("robot", "0123456789ab", "d" * 64, ["beta", "acme"], at=T0)
    assert made.accounts == ("acme", "beta") and made.last_used_at is None
    everything = await cli.create_token("ops", "ba9876543210", "e" * 64, None, at=T0)
    assert everything.accounts is None
    found = await send.find_token("0123456789ab")
    assert found is not None and found.name == "robot" and found.digest == "d" * 64
    await send.token_used(found.id, at=T0 + 5)
    assert [(t.name, t.last_used_at) for t in await cli.list_tokens()] == [
        ("ops", None), ("robot", T0 + 5)]
    await cli.revoke_token("robot")
    assert await send.find_token("0123456789ab") is None
    assert await send.has_tokens()
    await cli.revoke_token("ops")
    assert not await send.has_tokens()


async def test_a_token_s_name_is_unique_and_its_accounts_exist(stores: Opener) -> None:
    store = await stores("cli")
    await store.create_account("acme", 0, at=T0)
    await store.create_token("robot", "0123456789ab", "d" * 64, ["acme"], at=T0)
    with pytest.raises(Conflict):
        await store.create_token("robot", "ba9876543210", "e" * 64, None, at=T0)
    with pytest.raises(NotFound):
        await store.create_token("other", "ba9876543210", "e" * 64, ["nope"], at=T0)
    with pytest.raises(NotFound):
        await store.revoke_token("nope")
    assert [t.name for t in await store.list_tokens()] == ["robot"]


# -- console users and sessions ------------------------------------------------------------

async def test_console_users_their_accounts_and_sessions_across_processes(
        stores: Opener) -> None:
    send, cli = await two(stores)
    await cli.create_account("acme", 0, at=T0)
    await cli.create_account("beta", 0, at=T0)
    owner = await cli.create_console_user("owner@example.com", "h1", operator=False,
                                          accounts=["beta", "acme"], at=T0)
    assert owner.accounts == ("acme", "beta") and not owner.operator
    assert owner.manages("acme") and not owner.manages("gamma")
    ops = await cli.create_console_user("ops@example.com", "h2", operator=True, accounts=[],
                                        at=T0)
    assert ops.operator and ops.manages("gamma")
    with pytest.raises(Conflict):
        await cli.create_console_user("owner@example.com", "h3", operator=True, accounts=[],
                                      at=T0)
    with pytest.raises(NotFound):
        await cli.create_console_user("x@example.com", "h3", operator=False,
                                      accounts=["nope"], at=T0)
    assert [u.email for u in await send.list_console_users()] == ["ops@example.com",
                                                                   "owner@example.com"]
    await send.create_console_session("d1", "owner@example.com", "c1", at=T0)
    await send.create_console_session("d2", "owner@example.com", "c2", at=T0 + 100)
    with pytest.raises(NotFound):
        await send.create_console_session("d3", "nobody@example.com", "c3", at=T0)
    found = await cli.find_console_session("d1")
    assert found is not None and found.user.email == "owner@example.com"
    assert found.csrf == "c1" and found.last_seen_at == T0
    await cli.touch_console_session("d1", at=T0 + 50)
    found = await send.find_console_session("d1")
    assert found is not None and found.last_seen_at == T0 + 50
    await cli.delete_console_sessions(idle_before=T0 + 60)  # d1 (T0+50) goes, d2 stays
    assert await send.find_console_session("d1") is None
    assert await send.find_console_session("d2") is not None
    # A new password ends every session opened with the old one.
    await cli.set_console_password("owner@example.com", "h9")
    assert await send.find_console_session("d2") is None
    user = await send.get_console_user("owner@example.com")
    assert user is not None and user.password_hash == "h9"
    await send.create_console_session("d4", "owner@example.com", "c4", at=T0)
    await cli.delete_console_user("owner@example.com")
    assert await send.find_console_session("d4") is None
    assert await send.get_console_user("owner@example.com") is None
    with pytest.raises(NotFound):
        await cli.delete_console_user("owner@example.com")
    with pytest.raises(NotFound):
        await cli.set_console_password("owner@example.com", "h")


async def test_message_stats_count_by_outcome_and_period(stores: Opener) -> None:
    store = await stores("send")
    user = await account_with_user(store, 10_000)
    outcome = await store.commit_sends([order(user, 100, recipients=3)], at=T0 + 10)
    assert outcome[0].accepted
    stats = await store.message_stats("acme", since=T0, period=3600, count=3)
    assert [s.start for s in stats] == [T0, T0 + 3600, T0 + 7200]
    assert (stats[0].pending, stats[0].delivered, stats[0].failed, stats[0].credits) == \
        (3, 0, 0, 300)
    assert stats[1].pending == stats[2].pending == 0
