"""aiohttp's HTTP request parser, taking raw non-ASCII bytes in a URL as OVH's CGI does.

`curl "https://host/cgi-bin/sms/http2sms.cgi?...&message=Café"` sends the é as raw bytes,
and so do PHP's `file_get_contents` and many hand-built URLs. OVH's server takes them. aiohttp's
C parser (llhttp) refuses them with a 400 ("Invalid char in url query"), and has no setting to
allow them; its pure-Python parser, the one aiohttp uses where the C one is not built, takes
them. So a connection whose first request line has such bytes is parsed again, from its first
byte, by the Python parser, which then parses the rest of that connection. Every other
connection keeps the C parser: after its first request the wrapper steps out of the way.

Only the first request of a connection can be saved this way: after it, where the C parser
stands in the byte stream is its own. Clients that send raw bytes (curl, `file_get_contents`,
nginx's proxying without `keepalive`: one request per connection) are covered; a later raw
request on a reused connection (HAProxy, Traefik, Caddy and nginx with `keepalive` keep their
connections to the gateway) still gets the C parser's 400, which names the character to
encode, unless `server.raw_url_bytes_always` puts every connection on the Python parser.
"""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from aiohttp import http_parser, web, web_protocol, web_request, web_server
from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError

# The C parser when it is built (the Python one otherwise: then there is nothing to do).
# web_protocol does not export the name, but it is the one its server looks up.
_FAST = web_protocol.HttpRequestParser  # type: ignore[attr-defined]
_LENIENT = http_parser.HttpRequestParserPy

# Beyond the request line, what a first request's headers may take before the fallback
# stops keeping them for a replay (the C parser's own limits still apply).
_HEADERS_ROOM = 64 * 1024


class FirstRequestFallback:
    """Stands in for the C parser until a connection's first request is parsed."""

    def __init__(self, protocol: Any, *args: Any, **kwargs: Any) -> None:
        self._protocol = protocol
        self._args = (protocol, *args)
        self._kwargs = kwargs
        self._parser = _FAST(protocol, *args, **kwargs)
        self._seen: bytearray | None = bytearray()
        self._max_seen = kwargs.get("max_line_size", 8190) + _HEADERS_ROOM

    def feed_data(self, data: bytes) -> Any:
        seen = self._seen
        if seen is not None:
            seen += data
            if len(seen) > self._max_seen:
                self._seen = seen = None
        try:
            result = self._parser.feed_data(data)
        except InvalidURLError:
            # Blank lines before the request line are allowed (RFC 9112, 2.2).
            if seen is None or seen.lstrip(b"\r\n").partition(b"\n")[0].isascii():
                raise  # not raw bytes, or too late to parse again: the C parser's 400
            lenient = self._step_aside(_LENIENT(*self._args, **self._kwargs))
            return lenient.feed_data(bytes(seen))
        if result[0]:
            self._step_aside(self._parser)
        return result

    def _step_aside(self, parser: Any) -> Any:
        """Hand the connection to `parser`: nothing goes through this wrapper any more."""
        self._protocol._parser = parser
        self._seen = None
        self._parser = parser
        return parser

    def __getattr__(self, name: str) -> Any:
        # Anything else the protocol asks before the first request (pause, end of stream).
        return getattr(self._parser, name)


# llhttp's reasons ("Invalid char in url query", "Invalid header value char") are fixed
# texts; the parser appends the offending bytes after a colon. A reason with quotes, digits
# or anything else may carry request bytes (the Python parser's `Bad status line 'GET ...'`).
_FIXED_REASON = re.compile(r"[A-Za-z][A-Za-z /-]{0,80}")


def error_reason(exc: BaseException | None) -> str:
    """What a parser error's answer may say: its fixed reason, never the request's bytes."""
    if isinstance(exc, HttpProcessingError):
        head = exc.message.partition("\n")[0].partition(":")[0].strip()
        if _FIXED_REASON.fullmatch(head) and "password" not in head.lower():
            return head
    return "Malformed request"


class GenericErrors(web_protocol.RequestHandler):
    """aiohttp's protocol, answering a request it cannot parse without quoting it back.

    aiohttp's 400 body is the parser's exception text, which holds the request line (a send
    URL's password included): returned to whoever sent it, and seen by any proxy that logs
    bodies. A 500 stays aiohttp's own (it never quotes the request).
    """

    def handle_error(self, request: web_request.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status != HTTPStatus.INTERNAL_SERVER_ERROR:
            try:
                title = f"{status} {HTTPStatus(status).phrase}"
            except ValueError:
                title = str(status)
            message = f"{title}\n\n{error_reason(exc)}\n"
        return super().handle_error(request, status, exc, message)


def install(*, always: bool = False) -> None:
    """Parse every aiohttp server connection in this process through the fallback above;
    `always`: through the Python parser from the start (`server.raw_url_bytes_always`), for
    proxies whose kept connections carry raw bytes in later requests too.

    Parser errors are answered with a generic body (`GenericErrors`) in either case."""
    web_server.RequestHandler = GenericErrors  # type: ignore[attr-defined]
    if _FAST is not _LENIENT:
        parser = _LENIENT if always else FirstRequestFallback
        web_protocol.HttpRequestParser = parser  # type: ignore[attr-defined,assignment]
