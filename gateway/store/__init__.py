"""The store: the narrow interface the gateway persists through, and the records it returns.

Nothing outside `gateway.store.<backend>` knows which database holds the data; a backend
implements `Store` (SQLite today, PostgreSQL for multi-node deployments later).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gateway import ptt


class StoreError(Exception):
    """Base of the errors a backend raises for callers to turn into answers."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class NotEnoughCredits(StoreError):
    pass


class StoreUnavailable(StoreError):
    """The database cannot be opened or written (disk full, locked, corrupt)."""


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    name: str
    balance: int
    callback_url: str | None
    stop_clause: str | None
    senders: tuple[str, ...] = ()
    quota_held: int = 0
    users_with_quota: int = 0


@dataclass(frozen=True, slots=True)
class User:
    id: int
    account_id: int
    account_name: str
    login: str
    password_hash: str
    quota_active: bool
    quota_left: int
    alert_threshold: int | None
    alert_support: str
    alert_email: str | None
    alert_number: str | None
    alert_armed: bool
    ip_restrictions: tuple[str, ...]
    callback_url: str | None


@dataclass(frozen=True, slots=True)
class SendContext:
    """All a send request is checked against, read in one query and cached.

    No credits here: they are read and decided inside the commit. `version` is the settings
    version the context was read at; a send commits only if it is still current.
    """

    user: User
    account_stop_clause: str | None
    senders: frozenset[str]
    version: int = 0


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(slots=True)
class UserChanges:
    """A validated set of changes to an API user, applied all at once or not at all.

    A field left as `UNSET` keeps its value; `quota` None deactivates the quota.
    """

    password_hash: Any = UNSET
    quota: Any = UNSET
    ip_restrictions: Any = UNSET
    callback_url: Any = UNSET
    alert_threshold: Any = UNSET
    alert_support: Any = UNSET
    alert_email: Any = UNSET
    alert_number: Any = UNSET

    def given(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__
                if getattr(self, name) is not UNSET}


@dataclass(frozen=True, slots=True)
class SendOrder:
    """A validated, priced send request: one message per recipient."""

    account_id: int
    user_id: int | None          # None: charged to the account (alert SMS)
    login: str
    sender: str
    body: str
    coding: int
    parts: int
    klass: int
    no_stop: bool
    tag: str
    recipients: tuple[str, ...]
    costs: tuple[int, ...]       # hundredths per recipient
    deferred_until: float | None = None
    kind: str = "api"
    # The settings version its checks were made at (see SendContext); None: not checked.
    settings_version: int | None = None

    @property
    def total(self) -> int:
        return sum(self.costs)


@dataclass(frozen=True, slots=True)
class OutgoingMessage:
    """What the operator side needs to deliver one stored message."""

    id: int
    sender: str
    receiver: str
    body: str
    coding: int
    klass: int
    created_at: float
    deferred_until: float | None
    # Set when the operator already took the message before a restart: it is resumed
    # (its reports awaited), not submitted a second time.
    sent_at: float | None = None
    parts: int = 1


@dataclass(frozen=True, slots=True)
class SendOutcome:
    accepted: bool
    credit_left: int = 0
    ids: tuple[int, ...] = ()
    messages: tuple[OutgoingMessage, ...] = ()
    reason: str = ""
    # The commit that took this send also queued a low-credit alert (anyone's).
    alert_queued: bool = False


@dataclass(frozen=True, slots=True)
class StateUpdate:
    """A message reaching an operator state; build it with `from_ptt`."""

    message_id: int
    ptt: int
    dlr: int
    final: bool
    billed: bool
    at: float
    note: str = ""

    @classmethod
    def from_ptt(cls, message_id: int, code: int, at: float, note: str = "") -> StateUpdate:
        known = ptt.lookup(code)
        if known is None:
            raise ValueError(f"unknown ptt code {code}")
        return cls(message_id, code, int(known.dlr), known.final, known.billed, at,
                   note or known.description)


@dataclass(frozen=True, slots=True)
class OperatorReport:
    """A state the operator reports for one of its references (one part of a message).

    The store finds the message by the reference (`apply_reports`); `dlr` may differ from
    the ptt's usual one (a network says "buffered" for a message it stores).
    """

    reference: str
    ptt: int
    dlr: int
    final: bool
    billed: bool
    at: float
    note: str = ""

    @classmethod
    def from_ptt(cls, reference: str, code: int, at: float, note: str = "", *,
                 dlr: int | None = None) -> OperatorReport:
        known = ptt.lookup(code)
        if known is None:
            raise ValueError(f"unknown ptt code {code}")
        return cls(reference, code, int(known.dlr) if dlr is None else dlr, known.final,
                   known.billed, at, note or known.description)


@dataclass(frozen=True, slots=True)
class SentMessage:
    """A message the operator took, with its reference for each part (see `mark_sent`)."""

    message_id: int
    references: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FinalState:
    """A message that reached its final state in one `apply_updates` batch."""

    message_id: int
    ptt: int
    dlr: int
    # When it was meant to leave: its deferred time, else its acceptance. Measuring from
    # there keeps a send scheduled for next week out of the network's delivery times.
    due_at: float
    at: float


@dataclass(frozen=True, slots=True)
class AppliedUpdates:
    """What one `apply_updates` batch did, for the caller's metrics and logs."""

    callbacks: int = 0
    finals: tuple[FinalState, ...] = ()
    # Positions in the batch of the updates left out: their message was already final
    # (maybe by an earlier update of the same batch) or is unknown.
    ignored: tuple[int, ...] = ()
    # Of those, the reports (`apply_reports`) whose reference names no message part.
    unmatched: tuple[int, ...] = ()
    # For `apply_reports`: the message each report found, by position (0: none).
    message_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class OutboxItem:
    id: int
    kind: str
    message_id: int | None
    account_id: int
    user_id: int | None
    target: str
    payload: dict[str, Any]
    created_at: float
    attempts: int


@dataclass(frozen=True, slots=True)
class OutboxResult:
    """The result of one attempt; `next_attempt_at` None with ok False means give up."""

    item_id: int
    at: float
    ok: bool
    detail: str
    next_attempt_at: float | None = None


@dataclass(frozen=True, slots=True)
class Message:
    id: int
    account_id: int
    account_name: str
    login: str
    kind: str
    sender: str
    receiver: str
    body: str
    coding: int
    parts: int
    klass: int
    tag: str
    credits: int
    charged_to: str
    created_at: float
    deferred_until: float | None
    state: str
    ptt: int | None
    dlr: int
    sent_at: float | None
    delivered_at: float | None


@dataclass(frozen=True, slots=True)
class MessageEvent:
    at: float
    ptt: int | None
    dlr: int
    note: str


@dataclass(frozen=True, slots=True)
class OutboxAttempt:
    outbox_id: int
    kind: str
    target: str
    state: str
    at: float
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    id: int
    at: float
    account_id: int
    login: str | None
    kind: str
    source: str
    target: str
    amount: int
    reference: str


@dataclass(frozen=True, slots=True)
class MessageFilter:
    account_id: int
    user_id: int | None = None
    login: str | None = None
    tag: str | None = None
    ptt: int | None = None
    receiver: str | None = None
    sender: str | None = None
    created_from: float | None = None
    created_to: float | None = None
    kind: str | None = None


class Store(Protocol):
    """What a storage backend provides. All amounts are hundredths of a credit."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def check_writable(self) -> None:
        """Raise StoreUnavailable unless a write transaction can commit now."""

    # Accounts and senders
    async def create_account(self, name: str, balance: int, *, at: float) -> Account: ...
    async def get_account(self, name: str) -> Account: ...
    async def list_accounts(self) -> list[str]: ...
    async def credit_account(self, name: str, amount: int, *, at: float) -> Account: ...
    async def update_account(self, name: str, *, callback_url: Any = UNSET,
                             stop_clause: Any = UNSET) -> Account: ...
    async def add_sender(self, account: str, sender: str) -> None: ...
    async def remove_sender(self, account: str, sender: str) -> None: ...

    # API users
    async def create_user(self, account: str, login: str, password_hash: str, *,
                          at: float) -> User: ...
    async def get_user(self, account: str, login: str) -> User: ...
    async def list_users(self, account: str) -> list[str]: ...
    async def update_user(self, account: str, login: str, changes: UserChanges, *,
                          at: float, check: Callable[[User], None] | None = None) -> User:
        """`check` sees the user as the update's own transaction reads it, and may raise
        to refuse: a rule across fields holds even against a concurrent update."""
        ...
    async def delete_user(self, account: str, login: str, *, at: float) -> None: ...

    # The send path
    async def send_context(self, account: str, login: str, *,
                           fresh: bool = False) -> SendContext | None:
        """The send settings of a user, possibly cached; `fresh` reads the database."""
    async def commit_sends(self, orders: Sequence[SendOrder], *,
                           at: float) -> list[SendOutcome]: ...

    # Delivery
    async def mark_sent(self, ids: Sequence[int], *, at: float,
                        references: Sequence[SentMessage] = ()) -> None: ...
    async def apply_updates(self, updates: Sequence[StateUpdate]
                            ) -> AppliedUpdates: ...
    # Delivery by claims (see SQLiteStore for the rules)
    async def claim_messages(self, *, now: float, lease: float,
                             limit: int) -> list[OutgoingMessage]: ...
    async def release_messages(self, until: Sequence[tuple[int, float]]) -> None: ...
    async def free_claims(self) -> int: ...
    async def next_due_at(self) -> float | None: ...
    async def in_flight(self, *, after_id: int, limit: int) -> list[OutgoingMessage]: ...
    async def apply_reports(self, reports: Sequence[OperatorReport]) -> AppliedUpdates: ...

    # Outbox (callbacks and alerts)
    async def claim_outbox(self, kinds: Sequence[str], *, now: float, lease: float,
                           limit: int, per_target: int | None = None,
                           skip_targets: Sequence[str] = (), deep: bool = False,
                           results: Sequence[OutboxResult] = ()) -> list[OutboxItem]: ...
    async def next_outbox_at(self, kinds: Sequence[str], *,
                             skip_targets: Sequence[str] = ()) -> float | None: ...
    async def record_outbox_results(self, results: Sequence[OutboxResult]) -> None: ...
    async def enqueue_outbox(self, kind: str, *, account_id: int, user_id: int | None,
                             target: str, payload: dict[str, Any], at: float,
                             message_id: int | None = None) -> int: ...
    async def outbox_status(self, item_id: int) -> tuple[str, int, str] | None: ...

    # Reading back
    async def get_message(self, message_id: int) -> Message: ...
    async def message_events(self, message_id: int) -> list[MessageEvent]: ...
    async def message_attempts(self, message_id: int) -> list[OutboxAttempt]: ...
    async def list_messages(self, where: MessageFilter, *, limit: int,
                            before_id: int | None = None) -> list[Message]: ...
    async def list_ledger(self, account: str, *, limit: int,
                          after_id: int = 0) -> list[LedgerEntry]: ...
    async def ledger_totals(self) -> dict[str, int]: ...
    async def counts(self) -> dict[str, int]: ...
