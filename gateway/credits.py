"""Credits: amounts with two decimals, held as integer hundredths, and the per-prefix rate table.

Integers make every sum exact and let the store check balances with plain SQL arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

CENTS = 100

# The most an account may hold, all its pools together (its balance, its users' quotas and
# the credits of its messages on their way, which a refund may bring back), and so the most
# one top-up or one quota may be: 10^12 credits. Far beyond any real use, and far below
# 2^63 hundredths (9.2 * 10^16 credits), where SQLite's integers silently turn into floats:
# 9,300 top-ups of 10^13 credits once left a balance of 9.3e18 that sends no longer reduced.
MAX_CREDITS = 10**12 * CENTS


class InvalidAmount(ValueError):
    pass


class OverLimit(InvalidAmount):
    """An amount, or a sum of amounts, above `MAX_CREDITS`."""


def checked_add(held: int, amount: int) -> int:
    """`held + amount`, refused beyond `MAX_CREDITS`: the arithmetic of every change that
    adds credits to an account (a top-up, a quota, a refund)."""
    total = held + amount
    if total > MAX_CREDITS:
        raise OverLimit(f"{format_credits(total)} credits would be more than the maximum of "
                        f"{format_credits(MAX_CREDITS)} an account may hold")
    return total


def to_cents(value: str | int | float | Decimal, *, allow_negative: bool = False) -> int:
    """Parse a credit amount (`150`, `12.5`, `0.07`) into hundredths of a credit."""
    if isinstance(value, bool):
        raise InvalidAmount(f"invalid credit amount {value!r}")
    try:
        amount = Decimal(str(value).strip())
    except InvalidOperation as exc:
        raise InvalidAmount(f"invalid credit amount {value!r}") from exc
    if not amount.is_finite():
        raise InvalidAmount(f"invalid credit amount {value!r}")
    try:
        scaled = amount * CENTS
    except ArithmeticError as exc:  # decimal.Overflow: an exponent such as 1e999999999
        raise InvalidAmount(f"invalid credit amount {value!r}: too large") from exc
    if scaled != scaled.to_integral_value():
        raise InvalidAmount(f"invalid credit amount {value!r}: at most 2 decimals")
    if scaled < 0 and not allow_negative:
        raise InvalidAmount(f"invalid credit amount {value!r}: must not be negative")
    if abs(scaled) > 10**15:
        raise InvalidAmount(f"invalid credit amount {value!r}: too large")
    return int(scaled)


def format_credits(cents: int) -> str:
    """`1987`, `12.5`, `0.07`: whole credits without decimals, as OVH prints them."""
    sign = "-" if cents < 0 else ""
    whole, frac = divmod(abs(cents), CENTS)
    if frac == 0:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:02d}".rstrip("0")


def as_number(cents: int) -> int | float:
    """For JSON bodies of the admin API: an int when whole, else a float with 2 decimals."""
    return cents // CENTS if cents % CENTS == 0 else round(cents / CENTS, 2)


@dataclass(frozen=True)
class RateTable:
    """Price of one SMS part by destination prefix; the longest matching prefix wins."""

    default: int = CENTS
    by_prefix: Mapping[str, int] = field(default_factory=dict)
    # The prefixes' lengths (`+` and digits), longest first: a number is looked up at those
    # lengths only, not at every length up to the longest (each send prices its recipients;
    # that loop was 2% of the send process under scripts/bench, py-spy).
    _lengths: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lengths",
                           tuple(sorted({len(prefix) for prefix in self.by_prefix},
                                        reverse=True)))

    @classmethod
    def from_config(cls, default: str | int | float, prefixes: Mapping[str, object]) -> RateTable:
        table: dict[str, int] = {}
        for prefix, rate in prefixes.items():
            key = prefix.strip()
            if key.startswith("00"):
                key = "+" + key[2:]
            if not key.startswith("+"):
                key = "+" + key
            if not key[1:].isdigit():
                raise InvalidAmount(f"rate table: invalid prefix {prefix!r}")
            table[key] = to_cents(rate)  # type: ignore[arg-type]
        return cls(default=to_cents(default), by_prefix=table)

    def rate(self, e164: str) -> int:
        for length in self._lengths:
            if length <= len(e164):
                found = self.by_prefix.get(e164[:length])
                if found is not None:
                    return found
        return self.default

    def cost(self, recipients: list[str], parts: int) -> list[int]:
        """Cost of each recipient's message, in hundredths."""
        return [self.rate(number) * parts for number in recipients]
