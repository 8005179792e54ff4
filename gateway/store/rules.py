"""The decisions a store transaction makes, free of I/O, shared by every backend.

A backend reads what a decision needs inside its transaction (under SQLite's write lock,
or PostgreSQL's row locks), calls the rule, and writes what the rule returns: the backend
does I/O and locking, these functions decide who pays for a send, what a report changes
and refunds, which low-credit alert fires and which outbox items a claim takes. Their
inputs are what was read; they change none of them.

Amounts are hundredths of a credit. What a rule takes or returns per message or per order
is a NamedTuple, built straight from a row and written straight back: frozen dataclasses
made a batch of 500 reports cost 4 ms more to plan, on the delivery worker's busy path.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from gateway import retention
from gateway.credits import OverLimit, checked_add, format_credits
from gateway.records import (
    ClaimBounds,
    FinalState,
    MessageStats,
    OutgoingMessage,
    SendOrder,
    SendOutcome,
    StateUpdate,
)
from gateway.store import NotEnoughCredits, OverCreditLimit

# Where an accepted send's credits came from, and where a refund goes back to.
Pool = Literal["quota", "account"]

# -- who pays for a send ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Funds:
    """What can pay for a batch of sends, as its transaction read it.

    `balances` by account id; `quotas` by user id: the quota left while active, None when
    the user spends its account's balance. An id absent from either is unknown.
    """

    balances: Mapping[int, int]
    quotas: Mapping[int, int | None]


class Accepted(NamedTuple):
    """An order accepted and charged: what the backend writes for it."""

    order: SendOrder
    ids: tuple[int, ...]
    charged_to: Pool
    # Its deferred time if still ahead of the commit, else None: due at once.
    deferred_until: float | None

    @property
    def state(self) -> str:
        return "deferred" if self.deferred_until else "queued"

    @property
    def ledger_kind(self) -> str:
        return "alert" if self.order.kind == "alert" else "send"

    @property
    def reference(self) -> str:
        """The ledger's reference: the message id, or the range of ids."""
        ids = self.ids
        return f"sms:{ids[0]}" if len(ids) == 1 else f"sms:{ids[0]}-{ids[-1]}"


@dataclass(frozen=True, slots=True)
class SendDecisions:
    outcomes: list[SendOutcome]
    accepted: list[Accepted]
    # The new balance of each account charged, and the new quota of each user charged.
    balances: dict[int, int]
    quotas: dict[int, int]


def decide_sends(orders: Sequence[SendOrder], funds: Funds, *, at: float, first_id: int,
                 versions: Mapping[int, int]) -> SendDecisions:
    """Decide `orders` in their order, each against what the ones before it left.

    An order is paid by its user's active quota, else by its account's balance, whole or
    not at all: refused when that pool holds less than its total (the outcome says how
    much it holds). An order checked at another settings version than its account's
    current one in `versions` (by account id; absent: the account is gone) is refused as
    "stale". Accepted orders get consecutive ids from `first_id`.
    """
    balances = dict(funds.balances)
    quotas = dict(funds.quotas)
    charged_accounts: dict[int, int] = {}
    charged_quotas: dict[int, int] = {}
    outcomes: list[SendOutcome] = []
    accepted: list[Accepted] = []
    next_id = first_id
    for order in orders:
        if order.settings_version is not None \
                and order.settings_version != versions.get(order.account_id):
            outcomes.append(SendOutcome(False, reason="stale"))
            continue
        total = order.total
        if order.account_id not in balances:
            outcomes.append(SendOutcome(False, reason="unknown account"))
            continue
        user_id = order.user_id
        if user_id is not None and user_id not in quotas:
            outcomes.append(SendOutcome(False, reason="unknown user"))
            continue
        quota = quotas.get(user_id) if user_id is not None else None
        charged_to: Pool
        if user_id is not None and quota is not None:
            if quota < total:
                outcomes.append(SendOutcome(False, credit_left=quota, reason="quota"))
                continue
            quotas[user_id] = charged_quotas[user_id] = credit_left = quota - total
            charged_to = "quota"
        else:
            balance = balances[order.account_id]
            if balance < total:
                outcomes.append(SendOutcome(False, credit_left=balance, reason="credits"))
                continue
            balances[order.account_id] = charged_accounts[order.account_id] = credit_left = \
                balance - total
            charged_to = "account"
        deferred = order.deferred_until if order.deferred_until and \
            order.deferred_until > at else None
        ids = tuple(range(next_id, next_id + len(order.recipients)))
        next_id += len(ids)
        messages = tuple(OutgoingMessage(message_id, order.sender, receiver, order.body,
                                         order.coding, order.klass, at, deferred)
                         for message_id, receiver in zip(ids, order.recipients, strict=True))
        outcomes.append(SendOutcome(True, credit_left, ids, messages))
        accepted.append(Accepted(order, ids, charged_to, deferred))
    return SendDecisions(outcomes, accepted, charged_accounts, charged_quotas)


# -- the most an account holds ------------------------------------------------------------


def top_up(holdings: int, amount: int) -> int:
    """What an account holds after adding `amount` to its `holdings` (its balance, its
    active quotas and the credits of its messages not yet final): refused beyond
    `credits.MAX_CREDITS`.

    Counting the messages on their way keeps every later change within the maximum: a send
    moves credits from a pool to a message, a refund moves them back, a quota moves them
    between the balance and a user; only a purchase adds any.
    """
    try:
        return checked_add(holdings, amount)
    except OverLimit as exc:
        raise OverCreditLimit(f"top-up: {exc}") from None


# -- quotas --------------------------------------------------------------------------------


def quota_move(quota: int, held: int, balance: int) -> int:
    """Credits to move from the account to a user's quota (negative: back) to set it to
    `quota` when it holds `held`, as OVH does; more than `balance` or `MAX_CREDITS` is
    refused."""
    try:
        checked_add(0, quota)
    except OverLimit as exc:
        raise OverCreditLimit(f"quota: {exc}") from None
    delta = quota - held
    if delta > balance:
        raise NotEnoughCredits(
            f"quota: the account holds {format_credits(balance)} credits, "
            f"{format_credits(delta)} more are needed")
    return delta


# -- delivery reports ----------------------------------------------------------------------


class Pending(NamedTuple):
    """A message as a batch of reports finds it, with what its reports may touch."""

    id: int
    state: str
    account_id: int
    user_id: int | None
    charged_to: str
    credits: int
    tag: str
    login: str
    # The user's callback URL, else the account's; None: no callback.
    callback_url: str | None
    # Whether its user's quota is active now (true or false); None: the user is gone.
    quota_active: int | None
    # When it was meant to leave (see FinalState.due_at).
    due_at: float


class Change(NamedTuple):
    """The new state of one message: the last report's, with the first times.

    `sent_at` and `delivered_at` only fill a time the message does not have yet. In the
    order of the backend's UPDATE.
    """

    message_id: int
    ptt: int
    dlr: int
    state: str
    sent_at: float
    delivered_at: float | None
    updated_at: float


class Callback(NamedTuple):
    message_id: int
    account_id: int
    user_id: int | None
    target: str
    payload: dict[str, Any]
    at: float


class Refund(NamedTuple):
    """Credits of a final failure the operator did not bill, back where they came from."""

    at: float
    message_id: int
    ptt: int
    account_id: int
    user_id: int | None
    login: str
    pool: Pool
    amount: int

    @property
    def reference(self) -> str:
        return f"sms:{self.message_id} ptt {self.ptt}"


@dataclass(slots=True)
class UpdatePlan:
    """What a batch of reports does; `applied` are the updates kept, in order (each one
    is an event of its message)."""

    applied: list[StateUpdate] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    callbacks: list[Callback] = field(default_factory=list)
    refunds: list[Refund] = field(default_factory=list)
    finals: list[FinalState] = field(default_factory=list)
    ignored: list[int] = field(default_factory=list)

    def account_refunds(self) -> dict[int, int]:
        """Credits back to each account's balance."""
        return _sums((r.account_id, r.amount) for r in self.refunds if r.pool == "account")

    def quota_refunds(self) -> dict[int, int]:
        """Credits back to each user's quota."""
        return _sums((r.user_id, r.amount) for r in self.refunds
                     if r.pool == "quota" and r.user_id is not None)


def _sums(pairs: Iterable[tuple[int, int]]) -> dict[int, int]:
    sums: dict[int, int] = {}
    for key, amount in pairs:
        sums[key] = sums.get(key, 0) + amount
    return sums


def refund_pool(charged_to: str, quota_active: int | None) -> Pool:
    """Where a refund goes: the quota it came from while that quota is still active,
    else the account (a quota since turned off, or a user since deleted)."""
    return "quota" if charged_to == "quota" and quota_active else "account"


def part_delivery_stands(parts: int, delivered_parts: int, new: bool) -> bool:
    """Whether a "delivered" report of one part stands for its message.

    A message of several parts is delivered when every part is: a part's first "delivered"
    counts it (`delivered_parts`: the message's count after it), and stands for the message
    only when it is the last one; a repeated one never does. Any other report of a part
    (a failure fails the message; an intermediate state) stands as it is.
    """
    return new and delivered_parts >= parts


def may_refund(update: StateUpdate) -> bool:
    """Whether `plan_updates` may refund for this update, whatever its message's state: a
    final state the operator did not bill. A store locks the accounts' rows only then."""
    return update.final and not update.billed


def plan_updates(updates: Sequence[StateUpdate], current: Mapping[int, Pending]
                 ) -> UpdatePlan:
    """Apply `updates` in order to the messages in `current`.

    An update of a message unknown or already final (maybe by an earlier update of the
    same batch) is ignored: a late or duplicated report never changes a settled outcome.
    Each kept update is an event and, if the message has a callback URL, a callback; a
    final update the operator did not bill refunds the message's credits.
    """
    plan = UpdatePlan()
    final: set[int] = set()
    changed: dict[int, Change] = {}
    for position, update in enumerate(updates):
        message = current.get(update.message_id)
        if message is None or message.state == "final" or update.message_id in final:
            plan.ignored.append(position)
            continue
        mid = message.id
        plan.applied.append(update)
        if update.final:
            final.add(mid)
            plan.finals.append(FinalState(mid, update.ptt, update.dlr, message.due_at,
                                          update.at))
        delivered = update.at if update.ptt == 4 else None
        before = changed.get(mid)
        changed[mid] = Change(
            mid, update.ptt, update.dlr, "final" if update.final else "sent",
            before.sent_at if before else update.at,
            before.delivered_at if before and before.delivered_at is not None else delivered,
            update.at)
        if message.callback_url:
            plan.callbacks.append(Callback(
                mid, message.account_id, message.user_id, message.callback_url,
                {"id": mid, "ptt": update.ptt, "dlr": update.dlr, "at": update.at,
                 "tag": message.tag}, update.at))
        if may_refund(update) and message.credits:
            plan.refunds.append(Refund(
                update.at, mid, update.ptt, message.account_id, message.user_id,
                message.login, refund_pool(message.charged_to, message.quota_active),
                message.credits))
    plan.changes = list(changed.values())
    return plan


# -- low-credit alerts ---------------------------------------------------------------------


class Watch(NamedTuple):
    """A user with a low-credit threshold, as its transaction leaves its credits."""

    user_id: int
    account_id: int
    account: str
    login: str
    threshold: int
    support: str
    email: str | None
    number: str | None
    armed: int
    # What the user can spend: its quota while active, else its account's balance.
    spendable: int
    # Whether the credits spendable are its quota (true) or its account's balance.
    quota: int


class AlertItem(NamedTuple):
    kind: str
    account_id: int
    user_id: int
    target: str
    payload: dict[str, Any]


@dataclass(slots=True)
class AlertPlan:
    # Users whose alert fires (to disarm) and users to arm again.
    disarm: list[int] = field(default_factory=list)
    rearm: list[int] = field(default_factory=list)
    items: list[AlertItem] = field(default_factory=list)


def evaluate_alerts(watched: Iterable[Watch]) -> AlertPlan:
    """Which alerts fire, and which re-arm, once a transaction moved credits.

    An armed alert fires when the credits are below its threshold, and disarms: the
    transaction that crosses fires it, and any later one finds it disarmed, so one
    crossing is one alert. It re-arms only once the credits are strictly above the
    threshold (SPEC: "risen back above"): back at it exactly, a new drop sends nothing.
    A user gets an item per channel it chose and gave a target for.
    """
    plan = AlertPlan()
    for user in watched:
        if not user.armed:
            if user.spendable > user.threshold:
                plan.rearm.append(user.user_id)
            continue
        if user.spendable >= user.threshold:
            continue
        plan.disarm.append(user.user_id)
        # `quota`: the credits left are the user's quota, not the account's balance.
        payload = {"account": user.account, "login": user.login,
                   "credits_left": user.spendable, "threshold": user.threshold,
                   "quota": bool(user.quota)}
        if user.support in ("mail", "both") and user.email:
            plan.items.append(AlertItem("alert_mail", user.account_id, user.user_id,
                                        user.email, payload))
        if user.support in ("sms", "both") and user.number:
            plan.items.append(AlertItem("alert_sms", user.account_id, user.user_id,
                                        user.number, payload))
    return plan


def armed_on_new_threshold(spendable: int, threshold: int | None) -> bool:
    """A new threshold is armed unless the credits are below it already: setting it is
    not a crossing, so it must not fire an alert by itself."""
    return threshold is None or spendable >= threshold


# -- outbox claims -------------------------------------------------------------------------


def choose_claims(due: Iterable[tuple[int, str, str, int]], *, limit: int,
                  bounds: ClaimBounds | None = None, skip: Collection[str] = ()) -> list[int]:
    """Ids to claim among `due` (id, kind, target, account id) rows, oldest first: at most
    `limit` (the claiming worker's free slots), within `bounds`, none for a target in `skip`.

    The bounds keep one slow endpoint's backlog, or one account's, from filling a claim
    and starving the others' callbacks.
    """
    chosen: list[int] = []
    if limit <= 0:
        return chosen
    bounds = bounds or ClaimBounds()
    per_key, key_of, share = bounds.per_key, bounds.key_of, bounds.account_share
    keys = dict(bounds.key_load)
    accounts = dict(bounds.account_load)
    key = ""
    for item_id, kind, target, account_id in due:
        if target in skip:
            continue
        if per_key is not None:
            key = target if key_of is None else key_of(kind, target)
            if keys.get(key, 0) >= per_key:
                continue
        if share is not None:
            held = accounts.get(account_id, 0)
            if held >= share and held >= limit - len(chosen):
                continue
            accounts[account_id] = held + 1
        if per_key is not None:
            keys[key] = keys.get(key, 0) + 1
        chosen.append(item_id)
        if len(chosen) == limit:
            break
    return chosen


def accounts_at_their_share(bounds: ClaimBounds, free: int) -> list[int]:
    """The accounts a claim with `free` slots would take nothing of (see `ClaimBounds`)."""
    share = bounds.account_share
    if share is None:
        return []
    return sorted(account for account, held in bounds.account_load.items()
                  if held >= share and held >= free)


# -- messages from handsets ----------------------------------------------------------------

# A message from a handset with the operator reference, numbers and text of one kept at
# most this long before is that one sent again (an SMSC that missed the answer to its
# deliver_sm, a reconnection): kept once. Not longer: a handset may well send "OK" twice.
INCOMING_REPEAT_SECONDS = 600.0
# The parts of a long message wait this long for the others (and a part kept is known when
# sent again for as long): an SMSC holds the rest while the gateway is down.
INCOMING_PARTS_SECONDS = 86_400.0


def whole_text(total: int, parts: Iterable[tuple[int, str]]) -> str | None:
    """A long message's text once every part 1..total is there (`(seq, body)`), else None."""
    bodies = dict(parts)
    if set(bodies) != set(range(1, total + 1)):
        return None
    return "".join(bodies[seq] for seq in range(1, total + 1))


def stats_series(rows: Iterable[Sequence[Any]], since: float, period: float,
                 count: int) -> list[MessageStats]:
    """`count` periods from `since`, each from its (bucket, delivered, failed, pending,
    credits) row, or empty when it had none: a chart's bars stay evenly spaced."""
    by_bucket = {int(r[0]): r for r in rows}
    series = []
    for index in range(count):
        row = by_bucket.get(index)
        start = since + index * period
        series.append(MessageStats(start) if row is None else MessageStats(
            start, int(row[1] or 0), int(row[2] or 0), int(row[3] or 0), int(row[4] or 0)))
    return series

# -- the purge: which rows of a batch go (see gateway.retention) -------------------------------


@dataclass(slots=True)
class ErasurePlan:
    """Of a batch read by id: (id, masked number) to erase, ids held (due but not final),
    the last id looked at, and whether the rows due end within the batch."""

    erase: list[tuple[int, str]] = field(default_factory=list)
    hold: list[int] = field(default_factory=list)
    last_id: int = 0
    done: bool = True


@dataclass(slots=True)
class DeletionPlan:
    delete: list[int] = field(default_factory=list)
    last_id: int = 0
    done: bool = True
    held: int = 0


def erasure(rows: Sequence[Sequence[Any]], before: float, limit: int) -> ErasurePlan:
    """`rows` (id, created_at, state, number) by id: those created before `before`, up to
    the first that is not (ids grow with time), are erased if final, else held. A number
    already masked is erased again to the same text: erasing twice changes nothing."""
    plan = ErasurePlan(done=len(rows) < limit)
    for row_id, created_at, state, number in rows:
        if not retention.due(created_at, before):
            plan.done = True
            break
        if state == "final":
            plan.erase.append((row_id, retention.mask_number(number)))
        else:
            plan.hold.append(row_id)
        plan.last_id = row_id
    return plan


def deletion(rows: Sequence[Sequence[Any]], before: float, limit: int) -> DeletionPlan:
    """`rows` (id, created_at, state) by id: the final ones created before `before`, up to
    the first that is not; the others due (not final) are passed over, counted in `held`."""
    plan = DeletionPlan(done=len(rows) < limit)
    for row_id, created_at, state in rows:
        if not retention.due(created_at, before):
            plan.done = True
            break
        if state == "final":
            plan.delete.append(row_id)
        else:
            plan.held += 1
        plan.last_id = row_id
    return plan


def outbox_deletion(rows: Sequence[Sequence[Any]], before: Mapping[int, float | None],
                    default_before: float | None, limit: int) -> DeletionPlan:
    """`rows` (id, account_id, created_at, state) by id: finished items (done, dead) created
    before their account's time. The walk ends at the first row newer than every account's
    time; rows of accounts that keep them longer are passed over."""
    latest = max((t for t in (*before.values(), default_before) if t is not None),
                 default=None)
    plan = DeletionPlan(done=len(rows) < limit)
    for row_id, account_id, created_at, state in rows:
        if not retention.due(created_at, latest):
            plan.done = True
            break
        cutoff = before.get(account_id, default_before) if account_id in before \
            else default_before
        if state in ("done", "dead") and retention.due(created_at, cutoff):
            plan.delete.append(row_id)
        plan.last_id = row_id
    return plan


def ledger_problems(totals: Mapping[str, int]) -> list[str]:
    """What breaks the ledger identity in `ReadStore.ledger_totals`: purchased = balances +
    quotas + spent, and the ledger agrees with the balances and quotas the tables hold."""
    problems = []
    if totals["purchased"] != totals["balances"] + totals["quotas"] + totals["spent"]:
        problems.append(f"purchased {totals['purchased']} <> balances {totals['balances']} "
                        f"+ quotas {totals['quotas']} + spent {totals['spent']}")
    if totals["ledger_balances"] != totals["balances"]:
        problems.append(f"the ledger's balances {totals['ledger_balances']} <> the "
                        f"accounts' {totals['balances']}")
    if totals["ledger_quotas"] != totals["quotas"]:
        problems.append(f"the ledger's quotas {totals['ledger_quotas']} <> the users' "
                        f"{totals['quotas']}")
    return problems
