"""From raw parameters to a priced order: the send URL's rules, free of I/O.

`parse` checks what needs nothing but the request (codes 201 and 202); `price` applies the
account's STOP clause, counts parts and prices them once the account is known.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

from gateway import encoding, phones
from gateway.credits import RateTable
from gateway.records import SendOrder
from gateway.send.params import normalize_newlines
from gateway.send.responses import ContentType, content_type

MISSING = 201
INVALID = 202
BAD_SENDER = 241
UNAUTHORIZED = 401
NO_CREDITS = 402
ACCEPTED = 100
ACCEPTED_DEFERRED = 101

MAX_TAG = 20
MAX_FIELD = 2048


class SendRefused(Exception):
    def __init__(self, status: int, message: str, *, account: str | None = None) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        # Known once the credentials were right (a 241 or an IP refusal).
        self.account = account


@dataclass(frozen=True, slots=True)
class SendRequest:
    fmt: ContentType
    account: str
    login: str
    password: str
    sender: str            # empty with senderForResponse=1
    reply_sender: bool
    recipients: tuple[str, ...]
    message: str
    coding: encoding.Coding | None
    klass: int
    no_stop: bool
    tag: str
    deferred_until: float | None


def requested_format(params: dict[str, str]) -> ContentType:
    return content_type(params.get("contenttype")) or ContentType.TEXT


def parse(params: dict[str, str], *, tz: ZoneInfo, max_recipients: int,
          now: float | None = None, max_deferral: float | None = None) -> SendRequest:
    """`max_deferral`: seconds after `now` a `deferred` time may be at most (both given or
    no limit): a deferred message holds its credits until it leaves."""
    fmt = content_type(params.get("contenttype"))
    if fmt is None:
        raise SendRefused(INVALID, "Invalid contentType: use text/plain, text/xml, "
                          "application/xml, text/json, application/json or text/html")
    reply_sender = _flag(params, "senderforresponse")
    for name in ("account", "login", "password"):
        if not params.get(name, "").strip():
            raise SendRefused(MISSING, f"Missing {name}")
    if not reply_sender and not params.get("from", "").strip():
        raise SendRefused(MISSING, "Missing from")
    raw_to = [phones.restore_plus(item) for item in params.get("to", "").split(",")
              if item.strip()]
    if not raw_to:
        raise SendRefused(MISSING, "Missing to")
    message = normalize_newlines(params.get("message", ""))
    if message == "":
        raise SendRefused(MISSING, "Missing message")

    for name in ("account", "login", "password", "from", "tag"):
        value = params.get(name, "")
        if len(value) > MAX_FIELD:
            raise SendRefused(INVALID, f"Invalid {name}: too long")
        if name in ("account", "login", "from", "tag") and _has_control(value):
            raise SendRefused(INVALID, f"Invalid {name}: control characters are not allowed")
    if len(raw_to) > max_recipients:
        raise SendRefused(INVALID, f"Invalid to: at most {max_recipients} recipients per request")
    recipients = []
    for number in raw_to:
        try:
            recipients.append(phones.normalize(number))
        except phones.InvalidNumber:
            raise SendRefused(INVALID, f"Invalid to: {number!r} is not an international "
                              "number such as +33612345678") from None

    coding: encoding.Coding | None = None
    raw_coding = params.get("smscoding", "").strip()
    if raw_coding:
        if raw_coding not in ("1", "2"):
            raise SendRefused(INVALID, "Invalid smsCoding: use 1 (GSM 7-bit) or 2 (Unicode)")
        coding = encoding.Coding(int(raw_coding))
    raw_class = params.get("class", "").strip() or "1"
    if raw_class not in ("0", "1", "2", "3"):
        raise SendRefused(INVALID, "Invalid class: use 0, 1, 2 or 3")
    tag = params.get("tag", "")
    if len(tag) > MAX_TAG:
        raise SendRefused(INVALID, f"Invalid tag: at most {MAX_TAG} characters")

    return SendRequest(
        fmt=fmt,
        account=params["account"].strip(),
        login=params["login"].strip(),
        password=params["password"],
        sender="" if reply_sender else _sender(params["from"]),
        reply_sender=reply_sender,
        recipients=tuple(recipients),
        message=message,
        coding=coding,
        klass=int(raw_class),
        no_stop=_flag(params, "nostop"),
        tag=tag,
        deferred_until=_within(_deferred(params.get("deferred", "").strip(), tz),
                               now, max_deferral),
    )


def price(request: SendRequest, *, account_id: int, user_id: int, sender: str,
          stop_clause: str, rates: RateTable, settings_version: int | None = None) -> SendOrder:
    body = request.message
    if not request.no_stop and stop_clause:
        body = f"{body}\n{stop_clause}"
    try:
        seg = encoding.segment(body, request.coding)
    except encoding.EncodingError as exc:
        raise SendRefused(INVALID, f"Invalid message for smsCoding=1: {exc}") from None
    if seg.parts > encoding.MAX_PARTS:
        limit = "918 GSM characters" if seg.coding is encoding.Coding.GSM7 else \
            "402 Unicode characters"
        raise SendRefused(INVALID, f"Invalid message: {seg.parts} SMS parts, at most "
                          f"{encoding.MAX_PARTS} ({limit}, STOP clause included)")
    return SendOrder(
        account_id=account_id, user_id=user_id, login=request.login, sender=sender,
        body=body, coding=int(seg.coding), parts=seg.parts, klass=request.klass,
        no_stop=request.no_stop, tag=request.tag, recipients=request.recipients,
        costs=tuple(rates.cost(list(request.recipients), seg.parts)),
        deferred_until=request.deferred_until, settings_version=settings_version,
    )


def _sender(raw: str) -> str:
    """`from` as typed: the `+` a query turned into a space is given back to a number only
    (` 1AND1` is the sender `1AND1`, not `+1AND1`)."""
    restored = phones.restore_plus(raw)
    return restored if restored[1:].isdigit() else raw.strip()


def declared_sender(sender: str, senders: frozenset[str]) -> str | None:
    """The declared form of `sender`, or None: a number is the same sender with or
    without its `+` (accounts declare `33700000001` or `+33700000001`, scripts write
    either)."""
    if sender in senders:
        return sender
    number = sender[1:] if sender.startswith("+") else sender
    if not number.isdigit():
        return None
    other = number if sender.startswith("+") else "+" + number
    return other if other in senders else None


def _flag(params: dict[str, str], name: str) -> bool:
    value = params.get(name, "").strip()
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise SendRefused(INVALID, f"Invalid {_DISPLAY.get(name, name)}: use 0 or 1")


_DISPLAY = {"senderforresponse": "senderForResponse", "nostop": "noStop"}


def _has_control(text: str) -> bool:
    # isprintable() is False for every control and format character: a C-speed answer for
    # the common case, and the per-character look-up only for the rare rest (e.g. NBSP).
    if text.isprintable():
        return False
    return any(unicodedata.category(ch) in ("Cc", "Cf") for ch in text)


def _deferred(value: str, tz: ZoneInfo) -> float | None:
    """`hhmmddMMYYYY` in the server's time zone (18:30 on 19/07/2020 is 183019072020)."""
    if not value:
        return None
    if len(value) != 12 or not value.isdigit():
        raise SendRefused(INVALID, "Invalid deferred: use hhmmddMMYYYY, e.g. 183019072020")
    try:
        when = datetime(int(value[8:]), int(value[6:8]), int(value[4:6]), int(value[:2]),
                        int(value[2:4]), tzinfo=tz)
    except ValueError:
        raise SendRefused(INVALID, f"Invalid deferred: {value} is not a date") from None
    return when.timestamp()


def _within(deferred: float | None, now: float | None, most: float | None) -> float | None:
    if deferred is not None and now is not None and most is not None \
            and deferred > now + most:
        raise SendRefused(INVALID, f"Invalid deferred: at most {most / 86400:g} days ahead")
    return deferred
