"""What both backends read alike: the columns of a record, and the record made of a row.

Pure helpers, shared by `gateway.store.sqlite` and `gateway.store.postgresql`: the same
SELECT lists (written to run on either dialect) and the same conversion of a row to a
record of `gateway.records`, so the two backends cannot drift apart on a column.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gateway.records import Message, OutgoingMessage, User

USER_COLUMNS = """
    u.id, u.account_id, a.name, u.login, u.password_hash, u.quota_active, u.quota_left,
    u.alert_threshold, u.alert_support, u.alert_email, u.alert_number, u.alert_armed,
    u.ip_restrictions, u.callback_url
"""

MESSAGE_COLUMNS = """
    m.id, m.account_id, a.name, m.login, m.kind, m.sender, m.receiver, m.body, m.coding,
    m.parts, m.class, m.tag, m.credits, m.charged_to, m.created_at, m.deferred_until, m.state,
    m.ptt, m.dlr, m.sent_at, m.delivered_at
"""

OUTGOING_COLUMNS = ("id, sender, receiver, body, coding, class, created_at, deferred_until, "
                    "sent_at, parts")

# Messages a dispatcher may claim.
CLAIMABLE = "state IN ('queued', 'deferred')"

# What a user can spend: its quota while active, else its account's balance.
SPENDABLE = "CASE WHEN u.quota_active THEN u.quota_left ELSE a.balance END"

# The ptt of a delivered message (or part).
DELIVERED = 4
# How many of the newest messages an incoming one may answer (see add_incoming).
INCOMING_LOOKBACK = 1_000_000


def user(row: Sequence[Any]) -> User:
    """A `User` from the USER_COLUMNS of a row (SQLite's integers for booleans too)."""
    return User(
        id=row[0], account_id=row[1], account_name=row[2], login=row[3], password_hash=row[4],
        quota_active=bool(row[5]), quota_left=row[6], alert_threshold=row[7],
        alert_support=row[8], alert_email=row[9], alert_number=row[10],
        alert_armed=bool(row[11]), ip_restrictions=tuple(json.loads(row[12])),
        callback_url=row[13],
    )


def message(row: Sequence[Any]) -> Message:
    """A `Message` from the MESSAGE_COLUMNS of a row."""
    return Message(id=row[0], account_id=row[1], account_name=row[2], login=row[3],
                   kind=row[4], sender=row[5], receiver=row[6], body=row[7], coding=row[8],
                   parts=row[9], klass=row[10], tag=row[11], credits=row[12],
                   charged_to=row[13], created_at=row[14], deferred_until=row[15],
                   state=row[16], ptt=row[17], dlr=row[18], sent_at=row[19],
                   delivered_at=row[20])


def outgoing(row: Sequence[Any]) -> OutgoingMessage:
    """An `OutgoingMessage` from the OUTGOING_COLUMNS of a row."""
    return OutgoingMessage(*row)
