"""The group committer on each backend: as many batches in flight as the store takes
(`SendStore.concurrent_commits`), the atomic charge and each account's order kept."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from gateway.clock import ManualClock
from gateway.records import SendOrder, SendOutcome, User
from gateway.send.batcher import GroupCommitter, lane_of
from gateway.store import Store
from tests.conftest import ledger_identity

# The contract suite's fixtures: a fresh database of each backend (F811: tests take them).
from tests.store.test_contract import (  # noqa: F401
    T0,
    Opener,
    account_with_user,
    database_url,
    order,
    stores,
)


async def users_in_every_lane(store: Store, lanes: int, *, balance: int) -> list[User]:
    """One user on each of `lanes` accounts, the accounts in distinct lanes."""
    users: dict[int, User] = {}
    n = 0
    while len(users) < max(2, lanes):
        user = await account_with_user(store, balance, name=f"acme-{n}", login=f"u{n}")
        n += 1
        lane = user.account_id % max(2, lanes)
        users.setdefault(lane, user)
    return list(users.values())


async def test_batches_in_flight_as_many_as_the_store_commits_at_once(
        stores: Opener, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    store = await stores("send")
    committer = GroupCommitter(store, ManualClock(T0))
    expected = 2 if store.concurrent_commits > 1 else 1
    assert committer.lanes == store.concurrent_commits
    users = await users_in_every_lane(store, committer.lanes, balance=100)
    assert len({lane_of(order(u, 1), committer.lanes) for u in users}) == expected
    inner = store.commit_sends
    in_flight, most = 0, 0
    second = asyncio.Event()

    async def watched(orders: Sequence[SendOrder], *, at: float) -> list[SendOutcome]:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        if in_flight == 2:
            second.set()
        try:
            if expected == 2:  # the first waits for the second: both are in flight
                await asyncio.wait_for(second.wait(), 10)
            return await inner(orders, at=at)
        finally:
            in_flight -= 1

    monkeypatch.setattr(store, "commit_sends", watched)
    committer.start()
    try:
        outcomes = await asyncio.gather(*(committer.submit(order(u, 1))
                                          for u in users for _ in range(5)))
    finally:
        await committer.stop()
    assert all(o.accepted for o in outcomes)
    assert most == expected == committer.most_in_flight


async def test_concurrent_batches_keep_the_charge_and_each_accounts_order(
        stores: Opener) -> None:  # noqa: F811
    """Sends of several accounts race through the committer, more than each can pay: each
    account's first ones in submit order pass, its ids grow in that order, the books hold."""
    store = await stores("send")
    committer = GroupCommitter(store, ManualClock(T0), max_batch=7)
    users = await users_in_every_lane(store, committer.lanes, balance=10)
    committer.start()
    try:
        submitted = [(u, n) for n in range(25) for u in users]
        outcomes = await asyncio.gather(*(committer.submit(order(u, 1))
                                          for u, _ in submitted))
    finally:
        await committer.stop()
    for user in users:
        mine = [o for (u, _), o in zip(submitted, outcomes, strict=True) if u is user]
        assert [o.accepted for o in mine] == [True] * 10 + [False] * 15
        ids = [o.ids[0] for o in mine if o.accepted]
        assert ids == sorted(ids)
    ledger_identity(await store.ledger_totals())
