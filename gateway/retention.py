"""Retention: how long an account's data is kept, and what personal data looks like erased.

Pure rules, free of I/O: the purge (`gateway.purge`) and the stores apply them. Two horizons,
from the `[retention]` settings unless the account has its own days:

- personal data (a message's text and recipient's number, an incoming message's text and
  sender's number) is erased after `personal_data_days`: the message keeps everything else,
  its number masked (`mask_number`) so that an operator can still tell messages apart;
- whole messages (with their history, incoming messages, finished callbacks and alerts) are
  deleted after `messages_days`. The ledger is never deleted.

Zero days means "kept": personal data as long as its message, messages forever.
"""

from __future__ import annotations

from dataclasses import dataclass

DAY = 86400.0
# The character that replaces a hidden digit.
MASK = "*"


@dataclass(frozen=True, slots=True)
class Retention:
    """Days data is kept; 0: kept (see the module)."""

    personal_data_days: int
    messages_days: int


@dataclass(frozen=True, slots=True)
class AccountRetention:
    """An account's own days (None: the server's), as the store keeps them."""

    account_id: int
    account: str
    messages_days: int | None = None
    personal_data_days: int | None = None


@dataclass(frozen=True, slots=True)
class Cutoffs:
    """What is due at one moment: data created before each time (None: nothing)."""

    erase_before: float | None
    delete_before: float | None


def effective(defaults: Retention, account: AccountRetention) -> Retention:
    """The account's days over the server's. Personal data never outlives its message:
    a message deleted takes its text with it, so a longer personal horizon means nothing."""
    messages = defaults.messages_days if account.messages_days is None \
        else account.messages_days
    personal = defaults.personal_data_days if account.personal_data_days is None \
        else account.personal_data_days
    if messages and (not personal or personal > messages):
        personal = messages
    return Retention(personal_data_days=personal, messages_days=messages)


def cutoffs(now: float, retention: Retention) -> Cutoffs:
    """What `retention` makes due at `now`: a message created exactly `days` ago is kept
    until the next instant, so "kept 90 days" keeps it 90 whole days."""
    return Cutoffs(
        erase_before=now - retention.personal_data_days * DAY
        if retention.personal_data_days else None,
        delete_before=now - retention.messages_days * DAY if retention.messages_days else None)


def due(created_at: float, before: float | None) -> bool:
    return before is not None and created_at < before


def mask_number(number: str) -> str:
    """A phone number with its middle hidden, as kept once personal data is erased:
    `+33612345678` becomes `+33612****78`.

    The same length; at least four characters (all of a shorter text) hidden; at most the
    first six (the country and operator prefix) and the last two shown. Masking a masked
    number changes nothing, so an erasure can run twice.
    """
    size = len(number)
    tail = 2 if size >= 8 else 0
    head = max(0, min(6, size - tail - 4))
    return number[:head] + MASK * (size - head - tail) + number[size - tail:]


def validate_days(field: str, value: object) -> int | None:
    """Days given for an account: None (the server's), or a whole number from 0 to 36600."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 36600:
        raise ValueError(f"{field}: a whole number of days from 0 (kept) to 36600")
    return value
