"""Canaries: what the gateway assumes of a library beyond its documented API, one test each.

A library release that moves one of these breaks the gateway in ways its behaviour tests
report only as a wrong answer far away; a canary fails first, naming the place in the
gateway that relies on it and the version that broke it. pyproject.toml bounds these
libraries to the versions the canaries have passed; raising a bound is an edit there, then
`scripts/upgrade`, and these tests say whether the new version still fits.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import math
from typing import Any

import aiohttp
import phonenumbers
import prometheus_client
import pytest
import structlog
from aiohttp import http_exceptions, web, web_protocol, web_server
from aiohttp import http_parser as aiohttp_parser
from prometheus_client.parser import text_string_to_metric_families

from gateway import http_parser, logs, phones
from gateway.connections import ConnectionGuard, GuardedConnection, Limits, connection_of
from gateway.server import GuardedSite

HTTP_PARSER = "gateway/http_parser.py"


def broken(place: str, library: str, assumption: str) -> str:
    """The message of a failed canary: where, which version, what no longer holds."""
    version = importlib.metadata.version(library)
    return (f"{place} relies on {assumption}, which {library} {version} no longer holds: "
            f"adapt {place}, or keep {library} below {version} in pyproject.toml")


def aiohttp_broken(assumption: str) -> str:
    return broken(HTTP_PARSER, "aiohttp", assumption)


needs_c_parser = pytest.mark.skipif(
    http_parser._FAST is http_parser._LENIENT,
    reason="aiohttp's C parser is not built here: the fallback has nothing to do")

RAW = "GET /?message=Caf\u00e9 HTTP/1.1\r\nHost: gw\r\n\r\n".encode()
ASCII = b"GET /?message=Cafe HTTP/1.1\r\nHost: gw\r\n\r\n"


async def _unused(request: web.BaseRequest) -> web.StreamResponse:
    raise AssertionError("no request is handled here")


@pytest.fixture
async def protocol(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A server connection's protocol, built as aiohttp's server builds one, after
    `http_parser.install()`: its module names restored after the test."""
    monkeypatch.setattr(web_server, "RequestHandler", web_server.RequestHandler)
    monkeypatch.setattr(web_protocol, "HttpRequestParser", web_protocol.HttpRequestParser)
    http_parser.install()
    return web.Server(_unused)()


def test_aiohttp_has_the_parser_names_the_module_takes() -> None:
    assert hasattr(aiohttp_parser, "HttpRequestParserPy"), aiohttp_broken(
        "aiohttp.http_parser.HttpRequestParserPy, its pure-Python request parser")
    assert http_parser._FAST is aiohttp_parser.HttpRequestParser, aiohttp_broken(
        "web_protocol.HttpRequestParser being the request parser the server's protocol uses")
    assert issubclass(http_parser.GenericErrors, web_server.RequestHandler), aiohttp_broken(
        "web_server.RequestHandler being web_protocol.RequestHandler")


async def test_aiohttp_server_builds_its_protocol_from_the_name_swapped(
        protocol: Any) -> None:
    assert isinstance(protocol, http_parser.GenericErrors), aiohttp_broken(
        "web.Server building each connection's protocol from web_server.RequestHandler")


@needs_c_parser
async def test_aiohttp_protocol_builds_and_keeps_its_parser_where_swapped(
        protocol: Any) -> None:
    assert isinstance(getattr(protocol, "_parser", None),
                      http_parser.FirstRequestFallback), aiohttp_broken(
        "RequestHandler building its parser from web_protocol.HttpRequestParser and "
        "keeping it in its `_parser` attribute")


@needs_c_parser
async def test_aiohttp_c_parser_refuses_raw_bytes_as_the_fallback_expects(
        protocol: Any) -> None:
    fast = http_parser._FAST(protocol, protocol._loop, 2**16, max_line_size=8190)
    with pytest.raises(http_exceptions.InvalidURLError):
        try:
            fast.feed_data(RAW)
        except http_exceptions.InvalidURLError:
            raise
        except Exception as exc:
            pytest.fail(aiohttp_broken(
                f"the C parser refusing raw bytes in a URL with InvalidURLError (now "
                f"{type(exc).__name__})"))
        pytest.fail(aiohttp_broken("the C parser refusing raw bytes in a URL"))


@needs_c_parser
async def test_aiohttp_parsers_hand_over_a_first_request_as_the_fallback_expects(
        protocol: Any) -> None:
    fallback = protocol._parser
    messages, _, _ = fallback.feed_data(RAW)
    assert len(messages) == 1 and isinstance(protocol._parser, http_parser._LENIENT), \
        aiohttp_broken("the Python parser taking the C parser's arguments and returning "
                       "(messages, upgraded, tail) from feed_data")
    message = messages[0][0]
    assert message.path == "/?message=Caf\u00e9", aiohttp_broken(
        "the Python parser keeping raw UTF-8 bytes of a URL as text")

    ascii_protocol = web.Server(_unused)()
    messages, _, _ = ascii_protocol._parser.feed_data(ASCII)
    assert len(messages) == 1 and type(ascii_protocol._parser) is http_parser._FAST, \
        aiohttp_broken("the C parser returning (messages, upgraded, tail) from feed_data")


def test_aiohttp_handle_error_takes_what_generic_errors_passes() -> None:
    names = list(inspect.signature(web_protocol.RequestHandler.handle_error).parameters)
    assert names == ["self", "request", "status", "exc", "message"], aiohttp_broken(
        f"RequestHandler.handle_error(request, status, exc, message) (now {names})")
    error = http_exceptions.InvalidURLError("Invalid char in url query: b'\\xc3'")
    assert http_parser.error_reason(error) == "Invalid char in url query", aiohttp_broken(
        "HttpProcessingError.message holding the parser's reason before a colon")


SITE = "gateway/server.py (GuardedSite)"
CONNECTIONS = "gateway/connections.py (connection_of, GuardedConnection.close)"


def test_aiohttp_tcp_site_takes_the_options_guarded_site_passes_on() -> None:
    names = set(inspect.signature(web.TCPSite.__init__).parameters)
    assert names == {"self", "runner", "host", "port", "shutdown_timeout", "ssl_context",
                     "backlog", "reuse_address", "reuse_port"}, broken(
        SITE, "aiohttp", "TCPSite taking these options alone: GuardedSite.start listens "
        f"itself and passes each one on (now {sorted(names)})")


async def test_aiohttp_site_and_protocol_internals_the_guard_uses() -> None:
    """A GuardedSite started, asked once, stopped: what it reads of TCPSite's private
    attributes, and what the guard's connection expects of aiohttp's protocol."""
    seen: list[GuardedConnection | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(connection_of(request))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = GuardedSite(runner, "127.0.0.1", 0, ConnectionGuard(Limits()))
    try:
        try:
            await site.start()
        except AttributeError as exc:
            pytest.fail(broken(SITE, "aiohttp", "BaseSite and TCPSite keeping `_runner` "
                               "(its `server`), `_host`, `_port`, `_ssl_context`, `_backlog`, "
                               f"`_reuse_address`, `_reuse_port` ({exc})"))
        assert site in runner.sites, broken(
            SITE, "aiohttp", "BaseSite.start registering the site with its runner")
        server = getattr(site, "_server", None)
        assert isinstance(server, asyncio.AbstractServer) and server.sockets, broken(
            SITE, "aiohttp", "BaseSite keeping its listening server in `_server`")
        port = server.sockets[0].getsockname()[1]
        assert site.port == port and site.name == f"http://127.0.0.1:{port}", broken(
            SITE, "aiohttp", "TCPSite.port and .name reading the bound port from "
            f"`_bound_port` (now {site.port}, {site.name})")
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/") as response:
            assert await response.text() == "ok"
            connection = seen[0]
            assert isinstance(connection, GuardedConnection), broken(
                CONNECTIONS, "aiohttp", "request.transport.get_protocol() returning the "
                "listener's protocol (the guard's), not the RequestHandler it serves through")
            assert isinstance(connection.inner, web.RequestHandler) and callable(
                getattr(connection.inner, "force_close", None)), broken(
                CONNECTIONS, "aiohttp", "web.RequestHandler being the protocol web.Server "
                "builds, with a force_close method")
            assert connection.transport is not None
            connection.close()
            assert connection.transport.is_closing(), broken(
                CONNECTIONS, "aiohttp", "RequestHandler.force_close closing the connection")
    finally:
        await runner.cleanup()
    assert not server.is_serving(), broken(
        SITE, "aiohttp", "BaseSite.stop closing the server in `_server`")


def test_prometheus_client_helpers_metrics_merge_uses() -> None:
    place = "gateway/metrics.py (merge_expositions)"
    from prometheus_client import utils

    assert hasattr(utils, "floatToGoString"), broken(
        place, "prometheus-client", "prometheus_client.utils.floatToGoString")
    shown = [utils.floatToGoString(v) for v in (1.0, 0.25, 1e6, math.inf, -math.inf)]
    assert shown == ["1.0", "0.25", "1e+06", "+Inf", "-Inf"], broken(
        place, "prometheus-client", f"floatToGoString's text format (now {shown})")
    # generate_latest's text for a counter: its total, and its creation time as a gauge.
    text = ("# TYPE sends_total counter\nsends_total 3.0\n"
            "# TYPE sends_created gauge\nsends_created 1.7e+09\n")
    families = [(f.name, f.type, [s.name for s in f.samples])
                for f in text_string_to_metric_families(text)]
    assert families == [("sends", "counter", ["sends_total"]),
                        ("sends_created", "gauge", ["sends_created"])], broken(
        place, "prometheus-client", "the parser naming a counter's family without its "
        f"`_total`, its sample with it, `_created` apart (now {families})")


def test_prometheus_client_private_label_names_the_dashboard_test_reads() -> None:
    counter = prometheus_client.Counter("canary", "A canary.", ["outcome"],
                                        registry=prometheus_client.CollectorRegistry())
    assert getattr(counter, "_labelnames", None) == ("outcome",), broken(
        "tests/http/test_observability.py (exposed)", "prometheus-client",
        "a metric's label names in its `_labelnames` attribute")


def test_phonenumbers_parse_steps_the_shortcut_repeats() -> None:
    place = "gateway/phones.py (_split)"
    for e164 in ("+33612345678", "+14155550123", "+447400123456", "+4915123456789",
                 "+390612345678", "+819012345678"):
        assert phones._split(e164[1:]) in (None, phonenumbers.parse(e164, None)), broken(
            place, "phonenumberslite", f"parse's handling of {e164}: country code, "
            "national prefix for parsing, national number")
    assert phones._split("33612345678") is not None, broken(
        place, "phonenumberslite", "PhoneMetadata.metadata_for_region_or_calling_code "
        "and national_prefix_for_parsing")


def test_structlog_output_the_lean_renderers_copy() -> None:
    place = "gateway/logs.py (_ConsoleRenderer, _Timestamp)"
    event = {"event": "send", "level": "info", "timestamp": "2026-01-02T03:04:05.000006Z",
             "ids": "12-14", "text": "two words", "n": 3}
    theirs = structlog.dev.ConsoleRenderer(
        colors=False, exception_formatter=structlog.dev.plain_traceback)(None, "info",
                                                                         dict(event))
    assert logs._ConsoleRenderer()(None, "info", dict(event)) == theirs, broken(
        place, "structlog", f"ConsoleRenderer's line without colours (now {theirs!r})")
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)(None, "info", {})
    ours = logs._Timestamp()(None, "info", {})
    assert len(stamp["timestamp"]) == len(ours["timestamp"]) and \
        stamp["timestamp"].endswith("Z"), broken(
        place, "structlog", f"TimeStamper(fmt='iso', utc=True)'s format "
        f"(now {stamp['timestamp']!r})")


def test_the_canaries_name_the_versions_they_judge() -> None:
    assert aiohttp.__version__ in aiohttp_broken("x")
