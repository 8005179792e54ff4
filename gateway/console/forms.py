"""What the console's forms hold, read into the service's terms: pure, free of aiohttp.

Form fields are named as the service names its fields in errors (`quotaLeft`, `support`,
`alertEmail`, `ipRestrictions`, `callBack`...), so a `ValidationError` lands next to the
input it is about. Rules stay in the service: here only the form's shape (a checkbox, a
blank field, several inputs of one name) becomes the service's arguments.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from gateway import encoding, phones
from gateway.credits import RateTable, format_credits
from gateway.iprules import MAX_RESTRICTIONS
from gateway.records import MessageFilter
from gateway.service import ValidationError, outgoing_filter

__all__ = ["MAX_RESTRICTIONS", "Estimate", "alert_fields", "estimate", "message_filter",
           "quota_field", "restrictions"]


def checked(form: Mapping[str, str], name: str) -> bool:
    return form.get(name, "") in ("1", "on", "yes", "true")


def quota_field(form: Mapping[str, str]) -> Any:
    """`quota` for `Management.update_user`: None when the quota is switched off."""
    if not checked(form, "quotaStatus"):
        return None
    return form.get("quotaLeft", "").strip() or "0"


def alert_fields(form: Mapping[str, str]) -> dict[str, Any]:
    """The alert's fields for `Management.update_user`; switched off, no threshold."""
    if not checked(form, "alertActive"):
        return {"alert_threshold": None}
    return {"alert_threshold": form.get("alertThreshold", "").strip() or "0",
            "alert_support": form.get("support", "mail"),
            "alert_email": form.get("alertEmail", "").strip() or None,
            "alert_number": form.get("alertNumber", "").strip() or None}


def restrictions(values: Sequence[str], suggested: str = "") -> list[str]:
    """The addresses typed, and the caller's own when its suggestion was taken."""
    items = [v.strip() for v in values if v.strip()]
    if suggested.strip() and suggested.strip() not in items:
        items.append(suggested.strip())
    return items


@dataclass(frozen=True, slots=True)
class Estimate:
    characters: int
    encoding: str
    parts: int
    credits: str
    recipients: int


def estimate(message: str, recipients: str, *, stop_clause: str, no_stop: bool,
             rates: RateTable) -> Estimate:
    """What a send will cost, by the send URL's rules (`gateway.encoding`, the rate table,
    the STOP clause appended unless noStop); numbers that do not parse cost the default."""
    body = message.replace("\r\n", "\n")
    if not no_stop and stop_clause and body:
        body = f"{body}\n{stop_clause}"
    seg = encoding.segment(body) if body else encoding.Segmentation(encoding.Coding.GSM7, 0, 0)
    numbers = []
    for item in split_recipients(recipients):
        try:
            numbers.append(phones.normalize(phones.restore_plus(item)))
        except phones.InvalidNumber:
            numbers.append("")
    cost = sum(rates.cost(numbers, seg.parts))
    return Estimate(len(message), "GSM" if seg.coding is encoding.Coding.GSM7 else "Unicode",
                    seg.parts, format_credits(cost), len(numbers))


def split_recipients(text: str) -> list[str]:
    return [item.strip() for item in text.replace("\n", ",").replace(";", ",").split(",")
            if item.strip()]


def message_filter(account_id: int, query: Mapping[str, str], tz: ZoneInfo) -> MessageFilter:
    """The outgoing list's filters (`service.outgoing_filter`); ValidationError names the
    field at fault. The form sends every field, a blank one filtering on nothing."""
    given = {name: query.get(name, "").strip() for name in ("ptt", "receiver", "from", "to")}
    given["tag"] = query.get("tag", "")
    return outgoing_filter(account_id, {name: raw for name, raw in given.items() if raw},
                           login=query.get("login", "").strip() or None, period=("from", "to"),
                           moment=lambda name, raw, end: _day(raw, tz, name, end=end))


def whole_number(raw: str) -> int | None:
    """A query's id or position: ASCII digits that fit the store's 64-bit integers (`str.
    isdigit` also takes '²', which `int` refuses), else None."""
    if not raw or not raw.isascii() or not raw.isdigit() or len(raw) > 18:
        return None
    return int(raw)


def _day(raw: str, tz: ZoneInfo, field: str, *, end: bool = False) -> float | None:
    """A date of the form's date input (its whole day, in the gateway's time zone)."""
    raw = raw.strip()
    if not raw:
        return None
    try:
        day = datetime.strptime(raw, "%Y-%m-%d").replace(tzinfo=tz)
    except ValueError:
        raise ValidationError(field, "a date such as 2026-11-23") from None
    return day.timestamp() + (86400 - 0.000001 if end else 0)


def when(at: float | None, tz: ZoneInfo) -> str:
    if at is None:
        return ""
    return datetime.fromtimestamp(at, UTC).astimezone(tz).strftime("%Y-%m-%d %H:%M:%S")
