"""Exports of an account's outgoing history: the columns and how a row is written.

OVH's field names (`sms.Outgoing`, as the admin API shows a message) where one exists;
`login`, the API user that sent it, has none. Times are ISO 8601 in UTC, credits a number.
Pure: the CLI and the admin API stream the rows these functions write, a page at a time.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from typing import Any, Literal

from gateway.credits import as_number
from gateway.records import Message

Format = Literal["csv", "jsonl"]
FORMATS: tuple[Format, ...] = ("csv", "jsonl")
COLUMNS = ("id", "creationDatetime", "login", "sender", "receiver", "tag", "numberOfSms",
           "credits", "ptt", "deliveryReceipt", "deliveredAt")
CONTENT_TYPES: dict[Format, str] = {"csv": "text/csv; charset=utf-8",
                                    "jsonl": "application/jsonl; charset=utf-8"}
# Messages read per page of an export: what an export holds in memory at most.
PAGE = 1000


def _iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def row(message: Message) -> dict[str, Any]:
    return {"id": message.id, "creationDatetime": _iso(message.created_at),
            "login": message.login, "sender": message.sender, "receiver": message.receiver,
            "tag": message.tag, "numberOfSms": message.parts,
            "credits": as_number(message.credits), "ptt": message.ptt,
            "deliveryReceipt": message.dlr, "deliveredAt": _iso(message.delivered_at)}


def header(fmt: Format) -> str:
    return _csv_line(COLUMNS) if fmt == "csv" else ""


def lines(messages: list[Message], fmt: Format) -> str:
    """The export's lines for one page of messages."""
    if fmt == "jsonl":
        return "".join(json.dumps(row(m), ensure_ascii=False) + "\n" for m in messages)
    return "".join(_csv_line(["" if v is None else v for v in row(m).values()])
                   for m in messages)


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _csv_line(values: Any) -> str:
    out = io.StringIO()
    # A tag is the sender's text: a leading =, +, -, @, tab or CR would be a formula in a
    # spreadsheet, so such a cell is written with a quote in front (OWASP's advice).
    csv.writer(out, lineterminator="\r\n").writerow(
        ["'" + v if isinstance(v, str) and v[:1] in _FORMULA and not _number(v) else v
         for v in values])
    return out.getvalue()


def _number(text: str) -> bool:
    """A phone number (+33612345678) is data, not a formula: kept as it is."""
    return text[:1] == "+" and text[1:].replace("*", "").isdigit()


def parse_bound(text: str, *, end: bool = False) -> float:
    """A day (`2026-11-23`: its start, or with `end` its last instant) or an ISO 8601 time
    (UTC without an offset; with `end`, its whole second included)."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError("a day such as 2026-11-23 or a time such as "
                         "2026-11-23T14:55:04Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    day_only = len(text.strip()) == 10
    at = moment.timestamp()
    if end and day_only:
        at += 86400 - 0.000001
    elif end and moment.microsecond == 0:
        at += 0.999999
    return at
