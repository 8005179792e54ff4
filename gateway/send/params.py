"""Reading the send URL's parameters the way OVH's CGI does.

Names are matched case-insensitively, values are UTF-8 with a Latin-1 fallback (old scripts
percent-encode ISO-8859-1), and `+` means a space. When a name repeats, the last value wins,
as in the CGI scripts this replaces.
"""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

ALIASES = {"smsaccount": "account", "smsencoding": "smscoding"}


def decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse(raw: bytes | str, into: dict[str, str] | None = None) -> dict[str, str]:
    """Parse `a=1&b=2` (a query string or a form body) into lower-case names."""
    params = {} if into is None else into
    data = raw.encode("latin-1", "replace") if isinstance(raw, str) else raw
    for field in data.split(b"&"):
        if not field:
            continue  # tolerates `?&account=...` and `a=1&&b=2`
        name, _, value = field.partition(b"=")
        key = decode(unquote_to_bytes(name.replace(b"+", b" "))).strip().lower()
        if not key:
            continue
        params[ALIASES.get(key, key)] = decode(unquote_to_bytes(value.replace(b"+", b" ")))
    return params


def normalize_newlines(text: str) -> str:
    """CR, LF and CRLF all mean one line break; store LF."""
    return text.replace("\r\n", "\n").replace("\r", "\n")
