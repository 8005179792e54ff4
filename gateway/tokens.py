"""Admin API tokens: their form, how they are stored, and what each may reach.

A token is `h2s_<key>_<secret>`: `key` (12 hex digits) is not secret and finds the token's
row; `secret` (32 random bytes, URL-safe base64) is never stored, only its digest. Tokens
are created with `http2sms token create`, each for some accounts or for all of them; the
bootstrap token of the config (`admin.token`) reaches every account.

Why SHA-256 and not scrypt, as for passwords: a slow hash protects secrets that people
choose, which an attacker holding the database can guess offline. A secret of 256 random
bits cannot be guessed however fast the hash is, so a slow one would protect nothing and
cost its time on every admin request (a lever for denial of service, too). The digest is
keyed by the token's key, so equal secrets of two tokens would not show as equal digests.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Collection
from dataclasses import dataclass

PREFIX = "h2s_"
KEY_HEX_DIGITS = 12
SECRET_BYTES = 32
_FORM = re.compile(r"h2s_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
# What a token's name may be: it appears in the audit log and on the command line.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class NewToken:
    """A token as created: `text` is shown once, the rest is what the store keeps."""

    key: str
    digest: str
    text: str


def new_token() -> NewToken:
    key = secrets.token_hex(KEY_HEX_DIGITS // 2)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return NewToken(key, digest(key, secret), f"{PREFIX}{key}_{secret}")


def digest(key: str, secret: str) -> str:
    return hashlib.sha256(f"{key}:{secret}".encode()).hexdigest()


def split(text: str) -> tuple[str, str] | None:
    """(key, secret) of a presented token; None when it is not of our form."""
    match = _FORM.fullmatch(text)
    return (match[1], match[2]) if match else None


def matches(stored_digest: str, key: str, secret: str) -> bool:
    """The secret against the stored digest, in constant time."""
    return hmac.compare_digest(digest(key, secret), stored_digest)


@dataclass(frozen=True, slots=True)
class Access:
    """What a caller of the admin API may reach: `accounts` None means every account."""

    name: str
    accounts: frozenset[str] | None = None

    @property
    def everything(self) -> bool:
        return self.accounts is None

    def sees(self, account: str) -> bool:
        return self.accounts is None or account in self.accounts

    def visible(self, accounts: Collection[str]) -> list[str]:
        return [a for a in accounts if self.sees(a)]


# The caller holding `admin.token`, the bootstrap token of the config.
BOOTSTRAP = Access("admin.token")
