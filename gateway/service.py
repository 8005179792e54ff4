"""Managing accounts, senders and API users: the one set of rules behind the CLI and the API.

Every change is validated completely before the store sees it, so a request that is half
wrong changes nothing. Views render the objects with OVH's field names for both front ends.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any
from zoneinfo import ZoneInfo

from gateway import export, iprules, passwords, phones, retention, tokens
from gateway.clock import Clock, SystemClock
from gateway.config import Config
from gateway.credits import MAX_CREDITS, InvalidAmount, as_number, format_credits, to_cents
from gateway.hooks.callbacks import send_test_callback, target_problem
from gateway.hooks.targets import TargetPolicy
from gateway.purge import Purger
from gateway.records import (
    UNSET,
    Account,
    AdminToken,
    ConsoleUser,
    Message,
    MessageFilter,
    PurgeStep,
    User,
    UserChanges,
)
from gateway.store import NotFound, Store

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LOGIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
_ALPHA_SENDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._&-]{0,10}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
SUPPORTS = ("mail", "sms", "both")
# `GET /1.0/sms/ptts` would hide an account of that name from the admin API.
RESERVED_NAMES = frozenset({"ptts"})
# SQLite integers are signed 64-bit; binding a larger Python int raises OverflowError.
MAX_ID = 2**63 - 1
# A ptt is a small code; both backends store it in 32 bits.
PTT_LIMIT = 2**31 - 1
_INTEGER = re.compile(r"-?[0-9]{1,19}")


class ValidationError(ValueError):
    """Bad input, naming the field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Management:
    def __init__(self, store: Store, config: Config, clock: Clock | None = None) -> None:
        self.store = store
        self.config = config
        self.clock = clock or SystemClock()
        self._targets = TargetPolicy.from_settings(config.callbacks.allow_private_targets,
                                                   config.callbacks.allowed_target_networks)

    # -- accounts and senders ------------------------------------------------------------

    async def create_account(self, name: str, credits: Any = 0) -> Account:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValidationError("name", "letters, digits, '.', '_' and '-', at most 64")
        if name in RESERVED_NAMES:
            raise ValidationError("name", f"{name!r} is reserved")
        return await self.store.create_account(name, _amount("credits", credits),
                                               at=self.clock.now())

    async def credit_account(self, name: str, amount: Any) -> Account:
        cents = _amount("amount", amount)
        if cents <= 0:
            raise ValidationError("amount", "must be positive")
        return await self.store.credit_account(name, cents, at=self.clock.now())

    async def update_account(self, name: str, *, callback_url: Any = UNSET,
                             stop_clause: Any = UNSET, retention_days: Any = UNSET,
                             personal_data_days: Any = UNSET) -> Account:
        """`retention_days` and `personal_data_days`: the account's own retention (see
        `set_retention`); every field is checked before anything changes."""
        if callback_url is not UNSET:
            callback_url = _url("callBack", callback_url, self._targets)
        if stop_clause is not UNSET and stop_clause is not None and (
                not isinstance(stop_clause, str) or len(stop_clause) > 40
                or any(ord(c) < 32 for c in stop_clause)):
            raise ValidationError("stopClause", "a single line of at most 40 characters")
        kept = _days(messages_days=retention_days, personal_data_days=personal_data_days)
        if kept:
            await self.store.set_retention(name, **kept)
            if callback_url is UNSET and stop_clause is UNSET:
                return await self.store.get_account(name)
        return await self.store.update_account(name, callback_url=callback_url,
                                               stop_clause=stop_clause, at=self.clock.now())

    async def add_sender(self, account: str, sender: str) -> str:
        """Declare a sender; return it as stored (trimmed)."""
        cleaned = validate_sender(sender)
        await self.store.add_sender(account, cleaned)
        return cleaned

    async def remove_sender(self, account: str, sender: str) -> None:
        await self.store.remove_sender(account, sender)

    # -- API users -----------------------------------------------------------------------

    async def create_user(self, account: str, login: str, password: str) -> User:
        if not isinstance(login, str) or not _LOGIN.fullmatch(login):
            raise ValidationError("login", "letters, digits, '.', '_', '@' and '-', at most 64")
        hashed = await _hash(_password(password))
        return await self.store.create_user(account, login, hashed, at=self.clock.now())

    async def update_user(self, account: str, login: str, **fields: Any) -> User:
        """Apply any of: password, quota (None = no quota), ip_restrictions, callback_url,
        alert_threshold, alert_support, alert_email, alert_number."""
        await self.store.get_user(account, login)  # an unknown user is a 404 before any 400
        changes = UserChanges()
        unknown = set(fields) - set(UserChanges.__dataclass_fields__) - {"password"}
        if unknown:
            raise ValidationError(sorted(unknown)[0], "unknown field")
        new_password = _password(fields["password"]) if "password" in fields else None
        if "quota" in fields:
            changes.quota = None if fields["quota"] is None else _amount("quotaLeft",
                                                                          fields["quota"])
        if "ip_restrictions" in fields:
            ips = fields["ip_restrictions"]
            if not isinstance(ips, list | tuple) or not all(isinstance(i, str) for i in ips):
                raise ValidationError("ipRestrictions", "a list of IP addresses")
            try:
                changes.ip_restrictions = iprules.validate_restrictions(
                    ips, allow_private=self.config.server.allow_private_ips)
            except iprules.InvalidIPRule as exc:
                raise ValidationError("ipRestrictions", str(exc).split(": ", 1)[-1]) from None
        if "callback_url" in fields:
            changes.callback_url = _url("callBack", fields["callback_url"], self._targets)
        if "alert_threshold" in fields:
            value = fields["alert_threshold"]
            changes.alert_threshold = None if value is None else _amount("alertThreshold",
                                                                         value)
        if "alert_support" in fields:
            if fields["alert_support"] not in SUPPORTS:
                raise ValidationError("support", "one of mail, sms, both")
            changes.alert_support = fields["alert_support"]
        if "alert_email" in fields:
            email = fields["alert_email"]
            if email is not None and not isinstance(email, str):
                raise ValidationError("alertEmail", "an e-mail address")
            email = email or None
            if email is not None and (not _EMAIL.fullmatch(email)
                                      or len(email) > 254):
                raise ValidationError("alertEmail", f"not an e-mail address: {email!r}")
            changes.alert_email = email
        if "alert_number" in fields:
            number = fields["alert_number"]
            if number is not None and not isinstance(number, str):
                raise ValidationError("alertNumber", "an international number such as "
                                      "+33612345678")
            number = number or None
            if number is not None:
                try:
                    number = phones.normalize(str(number))
                except phones.InvalidNumber:
                    raise ValidationError("alertNumber", "an international number such as "
                                          "+33612345678") from None
            changes.alert_number = number
        if new_password is not None:
            # Hashed once every field is valid: an invalid request costs no scrypt run.
            changes.password_hash = await _hash(new_password)
        # The alert's fields are checked together on the user as the update's transaction
        # reads it: checked on an earlier read, two concurrent updates could each pass and
        # together leave a mail alert without its address.
        return await self.store.update_user(account, login, changes, at=self.clock.now(),
                                            check=lambda user: _check_alert(user, changes))

    async def test_callback(self, account: str, login: str, url: Any) -> tuple[bool, str]:
        """Call `url` once as a delivery report of `login`'s would be, without saving it:
        (answered 2xx, what happened). The URL is refused as `update_user` would refuse
        it; NotFound when the user does not exist (then nothing is called)."""
        await self.store.get_user(account, login)
        target = _url("callBack", url, self._targets)
        if target is None:
            raise ValidationError("callBack", "required")
        return await send_test_callback(target, self.config.callbacks,
                                        ZoneInfo(self.config.send.timezone),
                                        at=self.clock.now())

    async def delete_user(self, account: str, login: str) -> None:
        await self.store.delete_user(account, login, at=self.clock.now())

    # -- admin API tokens ----------------------------------------------------------------

    async def create_token(self, name: str, accounts: Sequence[str] | None
                           ) -> tuple[AdminToken, str]:
        """A new admin API token for `accounts` (None: all); returns it and its text, which
        exists nowhere else: only its digest is stored."""
        if not tokens.NAME.fullmatch(name):
            raise ValidationError("name", "letters, digits, '.', '_' and '-', at most 64")
        if accounts is not None and not accounts:
            raise ValidationError("accounts", "at least one account, or all of them")
        new = tokens.new_token()
        token = await self.store.create_token(name, new.key, new.digest, accounts,
                                              at=self.clock.now())
        return token, new.text

    # -- console users -------------------------------------------------------------------

    async def create_console_user(self, email: Any, password: Any, *, operator: bool,
                                  accounts: Sequence[str]) -> ConsoleUser:
        """A console user for `accounts`, or every account when `operator`."""
        address = console_email(email)
        if not operator and not accounts:
            raise ValidationError("accounts", "at least one account, or operator")
        if operator and accounts:
            # As the CLI refuses --operator with --account: which was meant is unclear.
            raise ValidationError("accounts", "an operator manages every account: "
                                              "choose no account")
        hashed = await _hash(console_password(password))
        return await self.store.create_console_user(
            address, hashed, operator=operator, accounts=[] if operator else list(accounts),
            at=self.clock.now())

    async def set_console_password(self, email: Any, password: Any) -> None:
        """A new password; the console user's open sessions end."""
        address = console_email(email)
        if await self.store.get_console_user(address) is None:
            raise NotFound(f"unknown console user {address!r}")
        await self.store.set_console_password(address, await _hash(console_password(password)))

    async def delete_console_user(self, email: Any, *, by: str | None = None) -> None:
        """`by`: the console user asking, which may not delete itself (an operator would
        lock itself out; another operator, or the CLI, may)."""
        address = console_email(email)
        if by is not None and address == console_email(by):
            raise ValidationError("email", "you cannot delete yourself")
        await self.store.delete_console_user(address)

    # -- data over time: retention, erasure, exports (see gateway.purge) -------------------

    async def set_retention(self, account: str, *, messages_days: Any = UNSET,
                            personal_data_days: Any = UNSET) -> retention.AccountRetention:
        """An account's own retention days (None: the server's `[retention]` ones)."""
        return await self.store.set_retention(account, **_days(
            messages_days=messages_days, personal_data_days=personal_data_days))

    async def retention_of(self, account: str) -> dict[str, Any]:
        """The account's retention: its own days and those that apply."""
        found = await self.store.get_account(account)
        own = next((r for r in await self.store.retention_settings()
                    if r.account_id == found.id), None)
        own = own or retention.AccountRetention(found.id, found.name)
        return retention_view(own, self.defaults())

    def defaults(self) -> retention.Retention:
        settings = self.config.retention
        return retention.Retention(personal_data_days=settings.personal_data_days,
                                   messages_days=settings.messages_days)

    def purger(self) -> Purger:
        return Purger(self.store, self.clock, self.config.retention)

    async def erase_number(self, account: str, number: Any) -> PurgeStep:
        """Erase a person's number and texts from every message of the account (the
        right to erasure): messages to it, incoming messages from it."""
        if not isinstance(number, str):
            raise ValidationError("receiver", "an international number such as +33612345678")
        try:
            normalized = phones.normalize(phones.restore_plus(number.strip()))
        except phones.InvalidNumber:
            raise ValidationError("receiver", "an international number such as "
                                  "+33612345678") from None
        found = await self.store.get_account(account)
        return await self.store.erase_number(found.id, normalized,
                                             limit=self.config.retention.batch_size)

    async def export(self, account: str, *, created_from: float, created_to: float,
                     login: str | None = None) -> AsyncIterator[list[Message]]:
        """The account's messages in the time range, a page at a time, by id (keyset
        pagination: memory for one page, and no transaction held between pages)."""
        if created_to < created_from:
            raise ValidationError("to", "not before from")
        found = await self.store.get_account(account)
        return self._pages(found.id, created_from, created_to, login)

    async def _pages(self, account_id: int, created_from: float, created_to: float,
                     login: str | None) -> AsyncIterator[list[Message]]:
        after = 0
        while True:
            page = await self.store.export_messages(
                account_id, created_from=created_from, created_to=created_to, login=login,
                after_id=after, limit=export.PAGE)
            if not page:
                return
            yield page
            after = page[-1].id


# A console password opens every API user's settings of its accounts: longer than the
# 8 characters OVH's send URL asks of an API user, any characters allowed.
CONSOLE_PASSWORD_MIN = 12


def console_email(email: Any) -> str:
    """A console user's e-mail address, lowercased: the same person whatever the case."""
    if not isinstance(email, str) or len(email.strip()) > 254 \
            or not _EMAIL.fullmatch(email.strip()):
        raise ValidationError("email", "an e-mail address such as owner@example.com")
    return email.strip().lower()


def console_password(password: Any) -> str:
    if not isinstance(password, str) or len(password) < CONSOLE_PASSWORD_MIN:
        raise ValidationError("password", f"at least {CONSOLE_PASSWORD_MIN} characters")
    if len(password) > 128:
        raise ValidationError("password", "at most 128 characters")
    if any(ord(c) < 32 for c in password):
        raise ValidationError("password", "no control characters")
    return password


def _days(**given: Any) -> dict[str, int | None]:
    """The retention days given (not UNSET), checked: None or 0 to 36600."""
    fields = {"messages_days": "retentionDays", "personal_data_days": "personalDataDays"}
    checked: dict[str, int | None] = {}
    for name, value in given.items():
        if value is UNSET:
            continue
        try:
            checked[name] = retention.validate_days(fields[name], value)
        except ValueError as exc:
            raise ValidationError(fields[name], str(exc).split(": ", 1)[-1]) from None
    return checked


def retention_view(own: retention.AccountRetention,
                   defaults: retention.Retention) -> dict[str, Any]:
    applied = retention.effective(defaults, own)
    return {"retentionDays": own.messages_days, "personalDataDays": own.personal_data_days,
            "appliedRetentionDays": applied.messages_days,
            "appliedPersonalDataDays": applied.personal_data_days}


def validate_sender(sender: str) -> str:
    """A declared sender: up to 11 letters/digits, or a number of up to 15 digits."""
    if not isinstance(sender, str):
        raise ValidationError("sender", "up to 11 letters and digits, or a number of up to "
                              "15 digits")
    text = sender.strip()
    digits = text[1:] if text.startswith("+") else text
    if digits.isdigit() and 3 <= len(digits) <= 15:
        return text
    if _ALPHA_SENDER.fullmatch(text) and not text.isdigit():
        return text
    raise ValidationError("sender", "up to 11 letters and digits, or a number of up to "
                          "15 digits")


def int_param(name: str, raw: str | None, default: int | None, low: int,
              high: int = MAX_ID) -> int | None:
    """An integer of a query (an id, a limit, a code), `default` when not given."""
    if raw is None:
        return default
    if not _INTEGER.fullmatch(raw.strip()):
        raise ValidationError(name, "an integer")
    value = int(raw)
    if not low <= value <= high:
        raise ValidationError(name, f"between {low} and {high}")
    return value


def outgoing_filter(account_id: int, query: Mapping[str, str], *, login: str | None,
                    period: tuple[str, str],
                    moment: Callable[[str, str, bool], float | None]) -> MessageFilter:
    """The outgoing list's filter from a query's values, for the admin API and the console
    alike: a value absent filters on nothing; ValidationError names the parameter at fault.

    `tag` and `sender` as given, `ptt` an integer, `receiver` an international number.
    Each edge reads the period's bounds its own way: `moment(name, raw, end)` for the
    parameters named in `period` (the admin API takes ISO 8601 times, the console days).
    """
    first, last = period
    return MessageFilter(
        account_id=account_id, login=login, tag=query.get("tag"),
        # A ptt is a small code stored in 32 bits: a larger one (PostgreSQL's INTEGER
        # refused it with a 500) matches no message, and is refused as out of range.
        ptt=int_param("ptt", query.get("ptt"), None, -PTT_LIMIT, PTT_LIMIT),
        receiver=_receiver(query.get("receiver")), sender=query.get("sender"),
        created_from=_bound(query, first, moment, end=False),
        created_to=_bound(query, last, moment, end=True))


def _receiver(raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        return phones.normalize(phones.restore_plus(raw))
    except phones.InvalidNumber:
        raise ValidationError("receiver", "an international number such as "
                                          "+33612345678") from None


def _bound(query: Mapping[str, str], name: str,
           moment: Callable[[str, str, bool], float | None], *, end: bool) -> float | None:
    raw = query.get(name)
    return None if raw is None else moment(name, raw, end)


def _amount(field: str, value: Any) -> int:
    """An amount of credits, at most `MAX_CREDITS`: what an account may hold at most, so
    no more can be given, moved to a quota or watched for at once."""
    try:
        cents = to_cents(value)
    except InvalidAmount as exc:
        raise ValidationError(field, str(exc)) from None
    if cents > MAX_CREDITS:
        raise ValidationError(field, f"at most {format_credits(MAX_CREDITS)} credits")
    return cents


def _password(password: Any) -> str:
    """The password, once valid."""
    if not isinstance(password, str):
        raise ValidationError("password", "letters and digits only, at least 8")
    try:
        passwords.validate(password)
    except passwords.InvalidPassword as exc:
        raise ValidationError("password", str(exc).split(": ", 1)[-1]) from None
    return password


async def _hash(password: str) -> str:
    # scrypt takes tens of milliseconds of CPU: on the event loop, one password change cut
    # the send rate by 87% (p50 5 ms to 55 ms) while it ran. hashlib releases the GIL.
    return await asyncio.to_thread(passwords.hash_password, password)


def _url(field: str, value: Any, targets: TargetPolicy) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > 2048:
        raise ValidationError(field, "an http or https URL")
    problem = target_problem(value, targets)
    if problem is not None:
        # Not quoting the URL: it may carry a password.
        raise ValidationError(field, f"an http or https URL a callback can reach ({problem})")
    return value


def _check_alert(current: User, changes: UserChanges) -> None:
    given = changes.given()
    support = given.get("alert_support", current.alert_support)
    email = given.get("alert_email", current.alert_email)
    number = given.get("alert_number", current.alert_number)
    threshold = given.get("alert_threshold", current.alert_threshold)
    if threshold is None:
        return
    if support in ("mail", "both") and not email:
        raise ValidationError("alertEmail", f"needed when support is {support}")
    if support in ("sms", "both") and not number:
        raise ValidationError("alertNumber", f"needed when support is {support}")


# -- views: OVH's field names, shared by the CLI's --json and the admin API ---------------

def account_view(account: Account, stop_default: str) -> dict[str, Any]:
    return {
        "name": account.name,
        "creditsLeft": as_number(account.balance),
        "creditsHoldByQuota": as_number(account.quota_held),
        "userQuantityWithQuota": account.users_with_quota,
        "callBack": account.callback_url or "",
        "stopClause": account.stop_clause if account.stop_clause is not None else stop_default,
        "senders": list(account.senders),
    }


def user_view(user: User) -> dict[str, Any]:
    return {
        "login": user.login,
        "quotaInformations": {
            "quotaStatus": "active" if user.quota_active else "inactive",
            "quotaLeft": as_number(user.quota_left),
        },
        "alertThresholdInformations": {
            "alertThreshold": None if user.alert_threshold is None
            else as_number(user.alert_threshold),
            "support": user.alert_support,
            "alertEmail": user.alert_email or "",
            "alertNumber": user.alert_number or "",
        },
        "ipRestrictions": list(user.ip_restrictions),
        "callBack": user.callback_url or "",
    }


def split_ips(text: str) -> Sequence[str]:
    return [part.strip() for part in text.split(",") if part.strip()]
