"""What is shown to people: text made harmless for a terminal, URLs without their secrets.

Account names, logins, message texts and notes come from callers. Written raw to a
terminal, an ESC sequence in one of them can clear the screen, rewrite earlier lines or set
the window title (and, on some terminals, answer back). The console log and the command
line's plain output therefore escape every non-printable character; JSON output needs
none of this (JSON escapes control characters itself) and stays exact.
"""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit, urlunsplit

REDACTED = "***"


def escape(text: str, *, keep: str = "") -> str:
    """`text` with every non-printable character (controls, format characters such as
    bidirectional overrides, separators other than the space) written as Python writes it
    in a string literal: `\\x1b`, `\\x00`, `\\u202e`. Characters in `keep` (e.g. a
    traceback's newlines) stay as they are."""
    if text.isprintable():  # the usual case, at C speed
        return text
    return "".join(ch if ch.isprintable() or ch in keep else _escaped(ch) for ch in text)


_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escaped(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def redact_url(url: str) -> str:
    """`url` with its password and query values replaced by `***`:
    `https://user:***@host/path?key=***`. The user, host, path and query keys stay: enough
    to tell which endpoint it is, nothing that lets one call it as its owner. A user
    without a password goes too (`https://***@host/`): many hooks take their token there.

    A fragment goes too (no server sees it, but it is the URL's owner's text). A text that
    is not a URL at all is hidden whole rather than guessed at.
    """
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a malformed port: better hidden than guessed
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        if has_password:
            netloc = f"{user}:{REDACTED}@{host}"
        else:
            netloc = f"{REDACTED if user else ''}@{host}"
    query = "&".join(_redact_pair(pair) for pair in parts.query.split("&")) \
        if parts.query else ""
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query,
                                  REDACTED if parts.fragment else ""))


def _redact_pair(pair: str) -> str:
    key, has_value, _ = pair.partition("=")
    # A bare `?token` may be the secret itself (some hooks take one that way).
    if not has_value:
        return REDACTED if key else ""
    return f"{key}={REDACTED}"
