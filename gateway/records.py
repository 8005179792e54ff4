"""The records that flow through the gateway: accounts, users, sends, messages, reports.

Plain values, free of I/O: the store returns and takes them, the send path, delivery,
operators and metrics pass them along. Amounts are hundredths of a credit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gateway import ptt


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

    No credits here: they are read and decided inside the commit. `version` is its account's
    settings version when the context was read; a send commits only if it is still current.
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


def _known_ptt(code: int) -> ptt.Ptt:
    """The ptt table's entry for `code`; ValueError for a code the table does not have."""
    known = ptt.lookup(code)
    if known is None:
        raise ValueError(f"unknown ptt code {code}")
    return known


class StateUpdate(NamedTuple):
    """A message reaching an operator state; build it with `from_ptt`.

    A named tuple, like `OperatorReport`: the delivery worker makes two of each a message,
    and a frozen dataclass's constructor (a `object.__setattr__` per field) cost 1.2-1.4 µs
    where a tuple's costs a tenth of it."""

    message_id: int
    ptt: int
    dlr: int
    final: bool
    billed: bool
    at: float
    note: str = ""

    @classmethod
    def from_ptt(cls, message_id: int, code: int, at: float, note: str = "") -> StateUpdate:
        known = _known_ptt(code)
        return cls(message_id, code, int(known.dlr), known.final, known.billed, at,
                   note or known.description)


class OperatorReport(NamedTuple):
    """A state the operator reports for one of its references (one part of a message).

    The store finds the message by the reference (`apply_reports`); `dlr` may differ from
    the ptt's usual one (a network says "buffered" for a message it stores). A named tuple
    (see `StateUpdate`).
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
        known = _known_ptt(code)
        return cls(reference, code, int(known.dlr) if dlr is None else dlr, known.final,
                   known.billed, at, note or known.description)


@dataclass(frozen=True, slots=True)
class SentMessage:
    """A message the operator took, with its reference for each part (see `mark_sent`)."""

    message_id: int
    references: tuple[str, ...]


class FinalState(NamedTuple):
    """A message that reached its final state in one `apply_updates` batch (a named tuple,
    one a message: see `StateUpdate`)."""

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
class ClaimBounds:
    """What an outbox claim may take, given what the claiming worker runs already.

    - At most `per_key` items of one key at once, counting the worker's `key_load`; the key
      is `key_of(kind, target)` (a callback's host), the target itself without `key_of`.
    - An account (with `account_load` running) takes a slot while it holds fewer than
      `account_share`, or fewer than the slots still free: it never holds more than
      max(share, free slots), so alone it fills about half of them, and an account coming
      next always finds some free.
    None: no such bound.
    """

    per_key: int | None = None
    key_of: Callable[[str, str], str] | None = None
    key_load: Mapping[str, int] = field(default_factory=dict)
    account_share: int | None = None
    account_load: Mapping[int, int] = field(default_factory=dict)


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
class IncomingMessage:
    """A message from a handset, kept for the account it answers (`add_incoming`)."""

    id: int
    account_id: int
    reference: str   # the operator's
    sender: str      # the handset's number
    receiver: str    # the gateway's number or sender it was sent to
    body: str
    tag: str         # the tag of the message it answers, if it answers one
    created_at: float


@dataclass(frozen=True, slots=True)
class IncomingPart:
    """One part of a long message from a handset (`add_incoming_parts`): kept until every
    part of its message is, which is then kept as one `IncomingMessage`."""

    reference: str   # the operator's, of this part: the same when the part is sent again
    sender: str
    receiver: str
    group: int       # the concatenation reference its message's parts share
    total: int       # parts in its message
    seq: int         # its number, 1 to total
    body: str
    created_at: float


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


@dataclass(frozen=True, slots=True)
class AdminToken:
    """An admin API token as stored: never its secret, only the secret's digest.

    `accounts` None: every account, present and future."""

    id: int
    name: str
    key: str
    digest: str
    accounts: tuple[str, ...] | None
    created_at: float
    last_used_at: float | None


@dataclass(frozen=True, slots=True)
class ConsoleUser:
    """Someone who logs into the web console: never an API user, whose password opens the
    send URL only. `operator`: every account, and creating accounts and top-ups."""

    id: int
    email: str
    password_hash: str
    operator: bool
    accounts: tuple[str, ...]
    created_at: float

    def manages(self, account: str) -> bool:
        return self.operator or account in self.accounts


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    """A console login as stored: the digest of its cookie's token, never the token."""

    digest: str
    user: ConsoleUser
    csrf: str
    created_at: float
    last_seen_at: float


@dataclass(frozen=True, slots=True)
class MessageStats:
    """An account's messages created in one period, by outcome, and the credits they cost."""

    start: float
    delivered: int = 0
    failed: int = 0
    pending: int = 0
    credits: int = 0


@dataclass(frozen=True, slots=True)
class PurgeStep:
    """What one purge transaction did: rows whose personal data it erased, rows it deleted
    (messages with their history, incoming messages, or outbox items with their attempts),
    the last id it looked at, and whether nothing due is left after it."""

    erased: int = 0
    deleted: int = 0
    last_id: int = 0
    done: bool = True
    # Rows due but passed over: messages not yet final.
    held: int = 0


@dataclass(frozen=True, slots=True)
class StoreStats:
    """`http2sms store stats`: the store's size and what it holds."""

    backend: str
    size_bytes: int
    # Bytes the store holds but no row uses (SQLite's free pages, PostgreSQL's dead rows
    # estimate): what a vacuum gives back.
    free_bytes: int
    rows: dict[str, int]
    oldest_message_at: float | None
    details: dict[str, Any] = field(default_factory=dict)
