"""Structured logs through structlog: JSON lines in production, readable lines for people.

A last processor drops any field whose name says it holds a secret, so that a careless
`log.info(..., password=...)` anywhere cannot leak one.

Records of the standard `logging` module (aiohttp's "Error handling request", asyncio's
"Task exception was never retrieved") go through the same renderer, so a JSON log stays
one JSON object per line. Only warnings and above: libraries log far too much at debug
(aiosqlite logs every statement and its results, which hold password hashes).

How to follow one SMS: the `send` event (info) carries the request's `request_id` and the
message ids it created (`ids`, e.g. "12-14"); every later event about a message carries its
`message_id`: `message_submitted`, `message_state` (debug), callback attempts (debug when
delivered, info when retried, warning when given up).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO

import structlog

from gateway.display import escape

SECRET_FIELDS = frozenset({"password", "token", "query", "query_string", "authorization",
                           "smtp_password", "secret"})
# Libraries' records below this level never reach the log, whatever `log.level` says.
LIBRARY_LEVEL = logging.WARNING


def _drop_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if key.lower() in SECRET_FIELDS:
            event[key] = "[redacted]"
    return event


def _keep(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    return event


class _Timestamp:
    """structlog's `TimeStamper(fmt="iso", utc=True)`, the same text at half its cost: the
    date and time are formatted once a second, the microseconds each time."""

    def __init__(self) -> None:
        # One tuple, replaced whole: a thread logging at the same time never pairs one
        # second with another's text.
        self._cached = (-1, "")

    def __call__(self, _: Any, __: str,
                 event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        second, micros = divmod(time.time_ns() // 1000, 1_000_000)
        cached_second, text = self._cached
        if second != cached_second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cached = (second, text)
        # datetime.isoformat leaves out a zero fraction; so does this, to stay identical.
        event["timestamp"] = f"{text}.{micros:06d}Z" if micros else f"{text}Z"
        return event


# Characters that make the console renderer quote a text value (structlog's rule).
_QUOTED = frozenset(" \t=\r\n\"'")
# Keys the lean console renderer leaves to structlog's own.
_ELSEWHERE = frozenset({"stack", "exception", "exc_info", "logger", "logger_name"})


class _ConsoleRenderer:
    """structlog's ConsoleRenderer without colours, for the events of every day.

    The same line, character for character (tests/test_logging.py checks it against
    structlog's), at a sixth of the cost (7 µs against 44 µs for the `send` line). At the
    default level that line cost 57-69 µs through the whole chain, about a fifth of a
    send's CPU under scripts/bench --log-level info; 22-23 µs now. Events with a stack, an
    exception or a logger name go to structlog's renderer.
    """

    def __init__(self) -> None:
        self._full = structlog.dev.ConsoleRenderer(
            colors=False, exception_formatter=structlog.dev.plain_traceback)
        self._level_width = 9  # "exception", the longest level name, as structlog pads

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        if not _ELSEWHERE.isdisjoint(event):
            return self._full(logger, name, _escaped(event))
        parts = []
        if "timestamp" in event:
            parts.append(str(event.pop("timestamp")))
        if "level" in event:
            parts.append(f"[{event.pop('level')!s:<{self._level_width}}]")
        if "event" in event:
            parts.append(f"{escape(str(event.pop('event'))):<30}")
        for key in sorted(event):
            value = event[key]
            # Values come from callers (an account name in a send URL): a non-printable
            # character is shown escaped, as repr writes it, never raw on a terminal.
            if isinstance(value, str):
                shown = value if value.isprintable() and _QUOTED.isdisjoint(value) \
                    else repr(value)
            else:
                shown = repr(value)
            parts.append(f"{key}={shown}")
        return " ".join(part for part in parts if part).rstrip(" ")


def _escaped(event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """An event for structlog's renderer, which writes text values raw: each escaped, its
    exception formatted and escaped too (a traceback keeps its lines)."""
    if event.get("exc_info"):
        event = structlog.processors.format_exc_info(None, "", event)
    for key, value in event.items():
        if not isinstance(value, str):
            continue
        if key in _ELSEWHERE or key == "event":
            event[key] = escape(value, keep="\n" if key in _ELSEWHERE else "")
        elif not value.isprintable():
            event[key] = _AsRepr(value)  # as the lean path shows it: repr, quotes and all
    return event


class _AsRepr:
    """A text structlog's renderer writes as its repr (escaped, in quotes)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return repr(self.text)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to the given stream, or to whatever `sys.stderr` is when a record comes."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream or sys.stderr)
        self._fixed = stream

    @property
    def stream(self) -> TextIO:
        # Looked up at each record: a stderr replaced since (test capture, a daemon
        # redirecting it) must not leave us writing to a closed file.
        return self._fixed or sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


_handler: _Handler | None = None


def configure(fmt: str = "console", level: str = "info", stream: TextIO | None = None, *,
              final: bool = False) -> None:
    """`final`: this process will not configure logging again (`serve`, the delivery
    worker), so each module's logger is built once, on its first use, instead of on every
    call: rebuilding it was 2.3% of the send process's CPU, for a send log line that the
    level usually filters out. Tests configure many times and leave it off.
    """
    # Plain tracebacks: rich's pretty ones print local variables, which can hold secrets.
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else _ConsoleRenderer())
    shared: list[Any] = [
        structlog.processors.add_log_level,
        _Timestamp(),
        _drop_secrets,
    ]
    threshold = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info if fmt == "json" else _keep,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(threshold),
        # One write per line (print's are two: the text, then its newline): the processes
        # of `serve --processes` and their delivery worker share one stderr, where two
        # lines written at once came out as one line holding two JSON objects.
        logger_factory=structlog.WriteLoggerFactory(stream or sys.stderr),
        cache_logger_on_first_use=final,
    )
    _route_stdlib(renderer, shared, fmt, stream, max(threshold, LIBRARY_LEVEL))


class _ScrubExceptions(logging.Filter):
    """Keep a library record's own message and its exception's type, nothing more.

    aiohttp's parser errors carry the raw request line in their text and traceback, and a
    send URL's request line holds a password.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            error = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(error).__name__})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def _route_stdlib(renderer: Any, shared: list[Any], fmt: str, stream: TextIO | None,
                  threshold: int) -> None:
    global _handler
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = _Handler(stream)
    _handler.setLevel(threshold)
    _handler.addFilter(_ScrubExceptions())
    _handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info if fmt == "json" else _keep,
                    renderer]))
    root.addHandler(_handler)
    if root.level == logging.NOTSET or root.level > LIBRARY_LEVEL:
        root.setLevel(LIBRARY_LEVEL)


def id_ranges(ids: Iterable[int], *, limit: int = 8) -> str:
    """Message ids as the `send` event writes them: "12", "12-14", "12-14,20".

    A batch's ids are mostly consecutive, so this stays short; past `limit` runs the rest
    is counted, not listed, to keep one log line bounded.
    """
    runs: list[list[int]] = []
    for i in sorted(set(ids)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    shown = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:limit])
    if len(runs) > limit:
        shown += f",+{sum(b - a + 1 for a, b in runs[limit:])} more"
    return shown
