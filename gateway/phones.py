"""Recipient numbers: the international formats the send URL accepts, normalised to E.164."""

from __future__ import annotations

from functools import lru_cache

import phonenumbers


class InvalidNumber(ValueError):
    pass


def restore_plus(raw: str) -> str:
    """A value with the `+` a URL's query turned into a space given back, stripped.

    `to=+33612345678` typed unencoded arrives as ` 33612345678` (a `+` in a query is a
    space). A space before digits that a `+` can begin (country codes never start with 0)
    can only have been that `+`: OVH's scripts write numbers both ways.
    """
    text = raw.strip()
    if raw[:1].isspace() and text[:1].isdigit() and text[0] != "0":
        return "+" + text
    return text


# Parsing costs tens of microseconds a number; senders send to the same numbers again and
# again (OTP retries, load tests), so valid results are remembered.
@lru_cache(maxsize=65_536)
def normalize(raw: str) -> str:
    """Return the E.164 form (`+33612345678`) of an international number.

    OVH accepts `+33...` and `0033...`; a national number such as `0612345678` is refused
    because the gateway cannot guess the country a script meant.
    """
    text = raw.strip()
    if text.startswith("00"):
        text = "+" + text[2:]
    if not text.startswith("+") or not text[1:].isdigit():
        raise InvalidNumber(f"invalid number {raw!r}: use the international format +33612345678")
    try:
        parsed = phonenumbers.parse(text, None)
    except phonenumbers.NumberParseException as exc:
        raise InvalidNumber(f"invalid number {raw!r}") from exc
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidNumber(f"invalid number {raw!r}")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
