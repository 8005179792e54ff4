"""Recipient numbers: the international formats the send URL accepts, normalised to E.164."""

from __future__ import annotations

import re
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
    parsed = _split(text[1:])
    if parsed is None:
        try:
            parsed = phonenumbers.parse(text, None)
        except phonenumbers.NumberParseException as exc:
            raise InvalidNumber(f"invalid number {raw!r}") from exc
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidNumber(f"invalid number {raw!r}")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _split(digits: str) -> phonenumbers.PhoneNumber | None:
    """What `phonenumbers.parse("+" + digits)` returns, for the digits it takes no detour on.

    A recipient the cache has not seen (an OTP storm, a campaign) cost 32-48 µs here, most of
    it in `parse`, whose work for free text (extensions, letters, Unicode digits, separators)
    is idle on plain ASCII digits. This takes the country code off (E.164 codes are
    prefix-free) and builds the number directly: 14-17 µs a new number in all (timeit, 40,000
    new numbers). With every send to a new number, py-spy had put `normalize` at 7.5% of the
    send process.
    Returns None, and `parse` decides, for anything else: a national number that starts
    with 0 (Italy's leading zeros) or that the region's national-prefix pattern matches
    (`parse` would take that prefix off), odd lengths, codes without metadata.
    `tests/test_rules.py` checks both ways agree on numbers of every country code.
    """
    if not digits.isascii() or not 4 <= len(digits) <= 17 or digits[0] == "0":
        return None
    for size in (1, 2, 3):
        code = int(digits[:size])
        if code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            break
    else:
        return None
    national = digits[size:]
    if national[:1] == "0" or len(national) < 2:  # at most 16 digits: 17 less the code
        return None
    metadata = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(
        code, phonenumbers.region_code_for_country_code(code))
    if metadata is None:
        return None
    prefix = metadata.national_prefix_for_parsing
    if prefix and re.match(prefix, national):
        return None
    return phonenumbers.PhoneNumber(country_code=code, national_number=int(national))
