"""The callbacks' HTTP client against real local servers that answer as scripted."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from yarl import URL

from gateway.hooks.http_client import (
    BadResponse,
    ConnectFailed,
    Disconnected,
    HttpClient,
    InvalidUrl,
    TargetRefused,
)
from gateway.hooks.targets import TargetPolicy
from tests.process.test_tls import self_signed
from tests.serverproc import free_port

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


class Server:
    """A TCP server running `script` for each connection; it records every request head."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.port = 0

    async def read_head(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        return head

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(Exception):
            await self.script(reader, writer, self)
        writer.close()

    @contextlib.asynccontextmanager
    async def running(self, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self
            server.close()


async def answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      server: Server, response: bytes = OK) -> None:
    """Keep-alive: the same response to every request on the connection."""
    while True:
        await server.read_head(reader)
        writer.write(response)
        await writer.drain()


def answering(response: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     server: Server) -> None:
        await answer_each(reader, writer, server, response)
    return script


@contextlib.asynccontextmanager
async def client(**options: object) -> AsyncIterator[HttpClient]:
    settings: dict[str, object] = {"timeout": 2.0, "max_idle_per_origin": 4,
                                   "user_agent": "http2sms-gateway"}
    settings.update(options)
    http = HttpClient(**settings)  # type: ignore[arg-type]
    try:
        yield http
    finally:
        await http.close()


def url(server: Server, path: str = "/dlr?id=1&ptt=13", scheme: str = "http") -> URL:
    return URL(f"{scheme}://127.0.0.1:{server.port}{path}")


async def test_requests_share_one_kept_connection_and_say_who_they_are() -> None:
    async with Server(answering(OK)).running() as server, client() as http:
        assert [await http.get(url(server, f"/dlr?id={i}")) for i in range(5)] == [200] * 5
    assert server.connections == 1
    head = server.heads[0].decode()
    assert head.startswith("GET /dlr?id=0 HTTP/1.1\r\n")
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n" in head
    assert "\r\nUser-Agent: http2sms-gateway\r\n" in head
    assert "\r\nX-Http2sms-Callback: 1\r\n" in head  # the send URL refuses it: no loop
    assert "Authorization" not in head


async def test_basic_authentication_comes_from_the_url() -> None:
    async with Server(answering(OK)).running() as server, client() as http:
        target = URL(f"http://us%40er:p%3Ass%E2%82%AC@127.0.0.1:{server.port}/dlr")
        assert await http.get(target) == 200
    secret = base64.b64encode("us@er:p:ss€".encode()).decode()  # UTF-8 (RFC 7617)
    assert f"\r\nAuthorization: Basic {secret}\r\n" in server.heads[0].decode()
    assert b"us%40er" not in server.heads[0]


async def test_a_redirect_is_a_status_not_a_hop() -> None:
    moved = b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\nContent-Length: 0\r\n\r\n"
    async with Server(answering(moved)).running() as server, client() as http:
        assert await http.get(url(server)) == 302
    assert len(server.heads) == 1


async def test_a_chunked_body_that_came_with_the_head_keeps_the_connection() -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"2\r\nok\r\n0\r\n\r\n")
    async with Server(answering(chunked)).running() as server, client() as http:
        assert [await http.get(url(server)) for _ in range(3)] == [200] * 3
    assert server.connections == 1


async def test_interim_responses_are_skipped() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + b"HTTP/1.1 204 No Content\r\n\r\n"
    async with Server(answering(interim)).running() as server, client() as http:
        assert [await http.get(url(server)) for _ in range(2)] == [204, 204]
    assert server.connections == 1


async def test_a_body_still_coming_is_not_waited_for_and_its_connection_not_kept() -> None:
    # A close-delimited body (HTTP/1.0 style) and a long announced one: neither is read.
    for response in (b"HTTP/1.0 200 OK\r\n\r\nstill", b"HTTP/1.1 202 Accepted\r\n"
                     b"Content-Length: 100000\r\n\r\nthe start"):
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         server: Server, response: bytes = response) -> None:
            await server.read_head(reader)
            writer.write(response)
            await writer.drain()
            await asyncio.sleep(30)  # the rest never comes

        async with Server(script).running() as server, client() as http:
            expected = 200 if b"HTTP/1.0" in response else 202
            assert await asyncio.wait_for(http.get(url(server)), 1) == expected
            assert await asyncio.wait_for(http.get(url(server)), 1) == expected
        assert server.connections == 2


async def test_a_kept_connection_the_server_closed_is_replaced_without_a_failure() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             server: Server) -> None:
        await server.read_head(reader)
        writer.write(OK)  # keep-alive promised, then the server's idle timeout strikes
        await writer.drain()

    async with Server(one_then_close).running() as server, client() as http:
        assert await http.get(url(server)) == 200
        await asyncio.sleep(0)  # the close may or may not have reached the client yet
        assert await http.get(url(server)) == 200
        assert await http.get(url(server)) == 200
    assert server.connections == 3


async def test_a_kept_connection_dropped_mid_request_is_retried_once_on_a_new_one() -> None:
    served: list[int] = []

    async def drop_the_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              server: Server) -> None:
        await server.read_head(reader)
        writer.write(OK)
        await writer.drain()
        await server.read_head(reader)  # read, then dropped unanswered
        served.append(1)

    async with Server(drop_the_second).running() as server, client() as http:
        assert await http.get(url(server)) == 200
        assert await http.get(url(server)) == 200  # retried on a second connection
    assert server.connections == 2 and len(server.heads) == 3


async def test_a_408_on_a_kept_connection_is_its_idle_close_and_goes_again_on_a_new_one(
        ) -> None:
    # A server whose idle timeout strikes answers 408 and closes (HAProxy, Node.js); if the
    # request crossed it on the wire, the 408 says the connection, not the callback, is done.
    async def time_out_the_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                  server: Server) -> None:
        await server.read_head(reader)
        writer.write(OK)
        await server.read_head(reader)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                     b"Content-Length: 0\r\n\r\n")
        await writer.drain()

    async with Server(time_out_the_second).running() as server, client() as http:
        assert await http.get(url(server)) == 200
        assert await http.get(url(server)) == 200  # the 408, then again on a new connection
        assert server.connections == 2 and len(server.heads) == 3


async def test_a_connection_that_answered_408_is_not_kept() -> None:
    # Without `Connection: close` the 408 still ends the connection: never reused.
    reused: list[int] = []

    async def time_out_the_second(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                  server: Server) -> None:
        await server.read_head(reader)
        writer.write(OK)
        if server.connections > 1:
            while await server.read_head(reader):
                writer.write(OK)
            return
        await server.read_head(reader)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        if await server.read_head(reader):
            reused.append(1)
            writer.write(OK)

    async with Server(time_out_the_second).running() as server, client() as http:
        assert await http.get(url(server)) == 200
        assert await http.get(url(server)) == 200  # the 408, then again on a new connection
        # Two at once take every kept connection there is.
        assert await asyncio.gather(http.get(url(server)), http.get(url(server))) == [200, 200]
    assert reused == [] and server.connections == 3


async def test_a_408_on_a_new_connection_is_the_answer() -> None:
    timeout = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    async with Server(answering(timeout)).running() as server, client() as http:
        assert await http.get(url(server)) == 408
    assert server.connections == 1


async def test_a_connection_dropped_after_part_of_the_answer_is_a_failure() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   server: Server) -> None:
        await server.read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-")
        await writer.drain()

    async with Server(half).running() as server, client() as http:
        with pytest.raises(Disconnected, match="server disconnected"):
            await http.get(url(server))
    assert server.connections == 1  # not retried: the server may have acted on it


async def test_what_is_not_an_http_response_is_refused() -> None:
    async with Server(answering(b"SMTP ready\r\n\r\n")).running() as server, client() as http:
        with pytest.raises(BadResponse, match="malformed response"):
            await http.get(url(server))


async def test_a_large_body_in_the_same_read_as_the_head_is_no_problem() -> None:
    page = b"<html>" + b"x" * 200_000
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(page) + page
    async with Server(answering(response)).running() as server, client() as http:
        assert [await http.get(url(server)) for _ in range(2)] == [200, 200]


@pytest.mark.parametrize("response, status", [
    (b"HTTP/1.1 204 No Content\r\n\r\nOK", 204),                        # a stray body
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok!!", 200),          # a longer one
    (OK + b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", 200),        # two answers
    (OK + b"HTTP/1.1 503 Later\r\nContent-Le", 200),                      # and a half
])
async def test_bytes_after_the_answer_keep_its_status_and_drop_the_connection(
        response: bytes, status: int) -> None:
    async def once_then_honest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               server: Server) -> None:
        if server.connections == 1:
            await server.read_head(reader)
            writer.write(response)  # one write: the extra bytes come in the same read
            await writer.drain()
        await answer_each(reader, writer, server, OK)

    async with Server(once_then_honest).running() as server, client() as http:
        assert await http.get(url(server)) == status
        # A new connection, not what was left on the first.
        assert await http.get(url(server)) == 200
    assert server.connections == 2


async def test_no_answer_within_the_timeout_raises_and_the_connection_is_dropped() -> None:
    async def late_for_the_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                 server: Server) -> None:
        await server.read_head(reader)
        if server.connections == 1:
            await asyncio.sleep(30)
        writer.write(OK)
        await writer.drain()

    async with Server(late_for_the_first).running() as server, client(timeout=0.2) as http:
        with pytest.raises(TimeoutError):
            await http.get(url(server))
        assert await http.get(url(server)) == 200  # a fresh connection, not the stuck one
    assert server.connections == 2


async def test_a_closed_port_cannot_connect_and_says_why() -> None:
    async with client() as http:
        with pytest.raises(ConnectFailed, match=r"^Connection refused$"):
            await http.get(URL(f"http://127.0.0.1:{free_port()}/dlr"))


@pytest.mark.parametrize("target", ["ftp://127.0.0.1/x", "/relative/only",
                                    f"http://{'a' * 64}.example/x"])  # a label over 63
async def test_what_is_not_an_http_url_is_invalid(target: str) -> None:
    async with client() as http:
        with pytest.raises(InvalidUrl):
            await http.get(URL(target))


async def test_idle_connections_are_capped_per_origin_and_expire() -> None:
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   server: Server) -> None:
        while True:
            await server.read_head(reader)
            await release.wait()
            writer.write(OK)
            await writer.drain()

    async with Server(slow).running() as server, \
            client(max_idle_per_origin=2, idle_seconds=0.2) as http:
        calls = [asyncio.ensure_future(http.get(url(server))) for _ in range(4)]
        while server.connections < 4:
            await asyncio.sleep(0.01)
        release.set()
        assert await asyncio.gather(*calls) == [200] * 4  # 4 at once: 4 connections
        await http.get(url(server))
        assert server.connections == 4  # two were kept, one reused
        await asyncio.sleep(0.3)
        await http.get(url(server))
        assert server.connections == 5  # idle past idle_seconds: not reused


async def test_https_checks_the_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    trust = ssl.create_default_context(cafile=str(cert))
    # The system's CAs do not know this certificate: `stranger` must refuse it.
    async with Server(answering(OK)).running(tls) as server, \
            client(ssl_context=trust) as trusting, client() as stranger:
        assert await trusting.get(url(server, scheme="https")) == 200
        with pytest.raises(ConnectFailed, match="TLS: CERTIFICATE_VERIFY_FAILED"):
            await stranger.get(url(server, scheme="https"))


# -- where callbacks may connect (SSRF) ----------------------------------------------------

LOOPBACK_IN_DISGUISE = ["127.0.0.1", "0.0.0.0", "[::1]", "localhost", "127.1", "2130706433",
                        "0x7f000001", "[::ffff:127.0.0.1]", "[::127.0.0.1]"]


@pytest.mark.parametrize("host", LOOPBACK_IN_DISGUISE)
async def test_the_default_policy_never_connects_to_this_machine(host: str) -> None:
    async with Server(answering(OK)).running() as server, \
            client(policy=TargetPolicy().problem) as http:
        with pytest.raises((TargetRefused, ConnectFailed, InvalidUrl)) as refused:
            await http.get(URL(f"http://{host}:{server.port}/dlr"))
    assert server.connections == 0
    # Refused for what it is, not because nothing listened (0.0.0.0 reaches 127.0.0.1).
    assert isinstance(refused.value, TargetRefused) or host == "[::1]", refused.value


@pytest.mark.parametrize("target", ["http://169.254.169.254/latest/meta-data/",
                                    "http://10.1.2.3/", "http://[fe80::1]/",
                                    "http://224.0.0.1/", "http://[64:ff9b::7f00:1]/"])
async def test_the_default_policy_refuses_before_connecting(target: str) -> None:
    async with client(policy=TargetPolicy().problem, timeout=0.5) as http:
        with pytest.raises(TargetRefused):
            await http.get(URL(target))


async def test_allowed_networks_and_private_targets_open_the_way() -> None:
    async with Server(answering(OK)).running() as server:
        for policy in (TargetPolicy(allow_private=True),
                       TargetPolicy.from_settings(False, ["127.0.0.0/8"])):
            async with client(policy=policy.problem) as http:
                assert await http.get(url(server)) == 200
        async with client(policy=TargetPolicy(allow_private=True).problem) as http:
            with pytest.raises(TargetRefused):
                await http.get(URL("http://0.0.0.0/"))  # unspecified: never


async def test_a_callback_to_the_gateway_itself_is_refused_even_when_private_is_allowed(
        ) -> None:
    async with Server(answering(OK)).running() as server:
        policy = TargetPolicy(allow_private=True).problem
        async with client(policy=policy, own_ports=frozenset({server.port})) as http:
            for host in ("127.0.0.1", "localhost"):
                with pytest.raises(TargetRefused, match="own listener"):
                    await http.get(URL(f"http://{host}:{server.port}/cgi-bin/sms/http2sms.cgi"))
    assert server.heads == []  # connected, found to be itself, closed: no request sent
