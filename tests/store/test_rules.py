"""The store's pure decisions (gateway/store/rules.py), tested without a database."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.records import ClaimBounds, SendOrder, StateUpdate
from gateway.store import NotEnoughCredits, rules
from gateway.store.rules import Funds, Pending, Watch


def send(cost: int, *, account: int = 1, user: int | None = 10, recipients: int = 1,
         deferred_until: float | None = None, version: int | None = None,
         kind: str = "api") -> SendOrder:
    return SendOrder(account, user, "alice", "ACME", "hi", 1, 1, 1, True, "",
                     tuple(f"+3361234{n:04d}" for n in range(recipients)),
                     (cost,) * recipients, deferred_until=deferred_until,
                     settings_version=version, kind=kind)


# -- who pays ------------------------------------------------------------------------------


def test_sends_are_decided_in_order_against_what_is_left() -> None:
    funds = Funds({1: 500}, {10: None})
    got = rules.decide_sends([send(300), send(300), send(200)], funds, at=5.0, first_id=7,
                             versions={})
    assert [(o.accepted, o.credit_left, o.reason) for o in got.outcomes] == [
        (True, 200, ""), (False, 200, "credits"), (True, 0, "")]
    assert [a.ids for a in got.accepted] == [(7,), (8,)]
    assert got.balances == {1: 0} and got.quotas == {}
    assert funds.balances == {1: 500}  # what was read is left as it was


def test_an_active_quota_pays_and_the_balance_is_untouched() -> None:
    got = rules.decide_sends([send(100, recipients=3), send(100)], Funds({1: 10_000}, {10: 350}),
                             at=5.0, first_id=1, versions={})
    assert [(o.accepted, o.credit_left, o.reason) for o in got.outcomes] == [
        (True, 50, ""), (False, 50, "quota")]
    assert got.quotas == {10: 50} and got.balances == {}
    (accepted,) = got.accepted
    assert accepted.charged_to == "quota" and accepted.ids == (1, 2, 3)
    assert accepted.reference == "sms:1-3" and accepted.ledger_kind == "send"


def test_unknown_stale_and_alert_orders() -> None:
    funds = Funds({1: 1000}, {10: None})
    got = rules.decide_sends(
        [send(1, account=2), send(1, user=11), send(1, version=3), send(1, version=4),
         send(1, user=None, kind="alert")], funds, at=5.0, first_id=1, versions={1: 4})
    assert [o.reason for o in got.outcomes] == ["unknown account", "unknown user", "stale",
                                                "", ""]
    assert [a.ledger_kind for a in got.accepted] == ["send", "alert"]
    assert [a.charged_to for a in got.accepted] == ["account", "account"]


def test_a_deferred_time_already_past_is_due_at_once() -> None:
    got = rules.decide_sends([send(1, deferred_until=4.0), send(1, deferred_until=6.0)],
                             Funds({1: 10}, {10: None}), at=5.0, first_id=1, versions={})
    assert [(a.deferred_until, a.state) for a in got.accepted] == [(None, "queued"),
                                                                   (6.0, "deferred")]
    assert [o.messages[0].deferred_until for o in got.outcomes] == [None, 6.0]


orders = st.lists(st.builds(
    send, st.integers(0, 400), account=st.sampled_from([1, 2]),
    user=st.sampled_from([None, 10, 20]), recipients=st.integers(1, 3)), max_size=30)


@settings(max_examples=300, deadline=None)
@given(orders, st.integers(0, 2000), st.integers(0, 2000),
       st.sampled_from([None, 0, 300]), st.sampled_from([None, 100]))
def test_no_pool_goes_negative_and_every_credit_is_accounted_for(
        batch: list[SendOrder], balance_1: int, balance_2: int, quota_10: int | None,
        quota_20: int | None) -> None:
    funds = Funds({1: balance_1, 2: balance_2}, {10: quota_10, 20: quota_20})
    got = rules.decide_sends(batch, funds, at=1.0, first_id=100, versions={})
    balances = {**funds.balances, **got.balances}
    quotas = {**funds.quotas, **got.quotas}
    assert all(v >= 0 for v in balances.values())
    assert all(v is None or v >= 0 for v in quotas.values())
    spent = {("account", a): 0 for a in (1, 2)} | {("quota", u): 0 for u in (10, 20)}
    for accepted in got.accepted:
        key = accepted.order.user_id if accepted.charged_to == "quota" else \
            accepted.order.account_id
        spent[(accepted.charged_to, key)] += accepted.order.total  # type: ignore[index]
    for account in (1, 2):
        assert funds.balances[account] - balances[account] == spent[("account", account)]
    for user in (10, 20):
        before = funds.quotas[user]
        if before is None:
            assert spent[("quota", user)] == 0
        else:
            assert before - quotas[user] == spent[("quota", user)]  # type: ignore[operator]
    ids = [i for a in got.accepted for i in a.ids]
    assert ids == list(range(100, 100 + len(ids)))
    # A refusal is right at its moment: what was left did not cover the order.
    for outcome, order in zip(got.outcomes, batch, strict=True):
        if not outcome.accepted:
            assert outcome.credit_left < order.total


def test_a_quota_move_takes_no_more_than_the_account_holds() -> None:
    assert rules.quota_move(500, 200, 300) == 300
    assert rules.quota_move(100, 300, 0) == -200
    with pytest.raises(NotEnoughCredits, match=r"3\.01 more"):
        rules.quota_move(501, 200, 300)


# -- reports -------------------------------------------------------------------------------


def pending(message_id: int, *, final: bool = False, charged_to: str = "account",
            credits: int = 100, callback: str | None = "https://cb.test/",
            quota_active: bool | None = False) -> Pending:
    return Pending(message_id, "final" if final else "sent", 1, 10, charged_to, credits, "tag",
                   "alice", callback, quota_active, 1.0)


def test_reports_of_one_message_merge_into_its_last_state_with_its_first_times() -> None:
    updates = [StateUpdate.from_ptt(1, 3, 10.0), StateUpdate.from_ptt(1, 25, 11.0),
               StateUpdate.from_ptt(1, 4, 12.0), StateUpdate.from_ptt(1, 4, 13.0)]
    plan = rules.plan_updates(updates, {1: pending(1)})
    (change,) = plan.changes
    assert (change.ptt, change.state, change.sent_at, change.delivered_at,
            change.updated_at) == (4, "final", 10.0, 12.0, 12.0)
    assert plan.ignored == [3]  # already final by the update before it
    assert len(plan.applied) == len(plan.callbacks) == 3
    assert [f.message_id for f in plan.finals] == [1]
    assert plan.refunds == []  # delivered: billed


def test_an_unbilled_failure_refunds_where_the_credits_came_from() -> None:
    current = {1: pending(1), 2: pending(2, charged_to="quota", quota_active=True),
               3: pending(3, charged_to="quota", quota_active=False),
               4: pending(4, charged_to="quota", quota_active=None),
               5: pending(5, final=True), 6: pending(6, credits=0, callback=None)}
    updates = [StateUpdate.from_ptt(m, 23, 20.0) for m in (1, 2, 3, 4, 5, 6, 7)]
    plan = rules.plan_updates(updates, current)
    assert [(r.message_id, r.pool) for r in plan.refunds] == [
        (1, "account"), (2, "quota"), (3, "account"), (4, "account")]
    assert plan.ignored == [4, 6]
    assert plan.account_refunds() == {1: 300} and plan.quota_refunds() == {10: 100}
    assert plan.refunds[0].reference == "sms:1 ptt 23"
    assert [c.message_id for c in plan.callbacks] == [1, 2, 3, 4]
    assert plan.callbacks[0].payload == {"id": 1, "ptt": 23, "dlr": 16, "at": 20.0,
                                         "tag": "tag"}


codes = st.sampled_from([3, 4, 5, 8, 23, 25, 26])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), codes), max_size=40),
       st.sets(st.integers(1, 5)))
def test_a_message_is_settled_refunded_and_changed_at_most_once(
        reports: list[tuple[int, int]], already_final: set[int]) -> None:
    current = {m: pending(m, final=m in already_final) for m in range(1, 5)}  # 5: unknown
    updates = [StateUpdate.from_ptt(m, code, float(n)) for n, (m, code) in enumerate(reports)]
    plan = rules.plan_updates(updates, current)
    assert len(plan.applied) + len(plan.ignored) == len(updates)
    finals = [f.message_id for f in plan.finals]
    assert len(finals) == len(set(finals))
    assert not set(finals) & already_final
    refunded = [r.message_id for r in plan.refunds]
    assert len(refunded) == len(set(refunded)) and set(refunded) <= set(finals)
    # A store locks the accounts only for a batch `may_refund` says may refund.
    assert set(refunded) <= {u.message_id for u in updates if rules.may_refund(u)}
    changed = [c.message_id for c in plan.changes]
    assert len(changed) == len(set(changed))
    assert {u.message_id for u in plan.applied} == set(changed)
    for change in plan.changes:
        mine = [u for u in plan.applied if u.message_id == change.message_id]
        assert (change.ptt, change.sent_at) == (mine[-1].ptt, mine[0].at)
        assert change.state == ("final" if mine[-1].final else "sent")


# -- alerts --------------------------------------------------------------------------------


def watch(user_id: int, spendable: int, *, armed: bool = True, threshold: int = 500,
          support: str = "both", email: str | None = "ops@example.com",
          number: str | None = "+33612345678") -> Watch:
    return Watch(user_id, 1, "acme", f"u{user_id}", threshold, support, email, number, armed,
                 spendable, False)


def test_an_armed_alert_fires_below_its_threshold_on_each_channel() -> None:
    plan = rules.evaluate_alerts([watch(1, 499), watch(2, 500), watch(3, 10, support="mail"),
                                  watch(4, 10, support="sms", number=None)])
    assert plan.disarm == [1, 3, 4] and plan.rearm == []
    assert [(i.user_id, i.kind) for i in plan.items] == [
        (1, "alert_mail"), (1, "alert_sms"), (3, "alert_mail")]
    assert plan.items[0].payload == {"account": "acme", "login": "u1", "credits_left": 499,
                                     "threshold": 500, "quota": False}


def test_a_fired_alert_re_arms_only_strictly_above_its_threshold() -> None:
    plan = rules.evaluate_alerts([watch(1, 500, armed=False), watch(2, 501, armed=False),
                                  watch(3, 10, armed=False)])
    assert plan.rearm == [2] and plan.disarm == [] and plan.items == []


def test_a_new_threshold_is_armed_unless_already_crossed() -> None:
    assert rules.armed_on_new_threshold(500, 500)
    assert not rules.armed_on_new_threshold(499, 500)
    assert rules.armed_on_new_threshold(0, None)


# -- outbox claims -------------------------------------------------------------------------


def test_claims_cap_each_target_and_skip_busy_ones() -> None:
    due = [(i, "callback", t, 1) for i, t in
           [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "c"), (6, "b")]]
    assert rules.choose_claims(due, limit=10, bounds=ClaimBounds(per_key=2),
                               skip={"c"}) == [1, 2, 3, 6]
    assert rules.choose_claims(due, limit=3) == [1, 2, 3]
    assert rules.choose_claims(due, limit=0) == []


def test_claims_cap_each_key_counting_what_runs_already() -> None:
    # Every target differs (by its port); the key, its host, groups them.
    due = [(i, "callback", f"http://h{i % 2}.test:{8000 + i}/", 1) for i in range(1, 9)]
    bounds = ClaimBounds(per_key=2, key_of=lambda kind, target: target.rsplit(":", 1)[0],
                         key_load={"http://h0.test": 1})
    # h0 (even ids) has one running: one more of it; h1 (odd ids) two.
    assert rules.choose_claims(due, limit=10, bounds=bounds) == [1, 2, 3]


def test_an_account_holds_at_most_its_share_or_the_free_slots() -> None:
    due = [(i, "callback", f"https://h{i}.test/", 7) for i in range(1, 20)] + \
        [(20, "callback", "https://other.test/", 8)]
    alone = ClaimBounds(account_share=2)
    # Alone with 8 free slots: while it holds fewer than are left free, so half of them.
    assert rules.choose_claims(due, limit=8, bounds=alone) == [1, 2, 3, 4, 20]
    # Its share whatever the free slots; none beyond it once it holds as many as are free.
    assert rules.choose_claims(due, limit=2, bounds=alone) == [1, 2]
    busy = ClaimBounds(account_share=2, account_load={7: 4})
    assert rules.choose_claims(due, limit=4, bounds=busy) == [20]
    assert rules.accounts_at_their_share(busy, 4) == [7]
    assert rules.accounts_at_their_share(busy, 5) == []


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), max_size=40),
       st.integers(0, 12), st.integers(1, 4), st.dictionaries(st.integers(0, 2),
                                                                st.integers(0, 6)))
def test_no_account_holds_more_than_its_share_or_the_free_slots(
        rows: list[tuple[int, int]], limit: int, share: int, load: dict[int, int]) -> None:
    due = [(i, "callback", f"h{host}", account) for i, (host, account) in enumerate(rows)]
    chosen = rules.choose_claims(due, limit=limit, bounds=ClaimBounds(
        account_share=share, account_load=load))
    held = dict(load)
    for n, item_id in enumerate(chosen):
        account = due[item_id][3]
        free = limit - n  # before taking this one
        assert held.get(account, 0) < max(share, free)
        held[account] = held.get(account, 0) + 1


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from("abcde"), max_size=40), st.integers(0, 12),
       st.one_of(st.none(), st.integers(1, 4)), st.sets(st.sampled_from("abcde")))
def test_a_claim_takes_the_oldest_it_may_and_nothing_it_may_not(
        targets: list[str], limit: int, per_target: int | None, skip: set[str]) -> None:
    due = [(i, "callback", target, 1) for i, target in enumerate(targets)]
    chosen = rules.choose_claims(due, limit=limit, bounds=ClaimBounds(per_key=per_target),
                                 skip=skip)
    assert chosen == sorted(chosen) and len(chosen) <= limit
    picked = [targets[i] for i in chosen]
    assert not set(picked) & skip
    if per_target is not None:
        assert all(picked.count(t) <= per_target for t in set(picked))
    if len(chosen) < limit:  # nothing left out that it could have taken
        for i, _, target, _ in due:
            if i not in chosen:
                assert target in skip or (per_target is not None
                                          and picked.count(target) >= per_target)


def test_a_part_delivery_stands_for_its_message_only_as_the_last_one() -> None:
    assert rules.part_delivery_stands(3, 3, True)
    assert not rules.part_delivery_stands(3, 2, True)
    assert not rules.part_delivery_stands(3, 3, False)  # a repeated receipt
