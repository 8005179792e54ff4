"""Input limits at the edge of the real process: URL and body size, recipients, bad bytes.

Every refusal is a clean answer (an outcome code, or HTTP 400/413/503), never a 500, and
the gateway keeps serving afterwards. The rules themselves are tested in-process in
test_send.py and test_rules.py; here the raw bytes go through the real HTTP parser.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote, urlencode

import aiohttp

from tests.serverproc import (
    SEND_PATH,
    ServerProcess,
    demo_params,
    prepare_store,
    read_db,
    servers,
)

QUERY = "account=sms-demo-1&login=demo&password=demo1234&from=DEMO&to=%2B33612345678&noStop=1"


async def raw(port: int, request: bytes) -> tuple[int, str]:
    """One request as raw bytes on its own connection: (HTTP status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1."), answer[:200]
    return int(head.split()[1]), body.decode("utf-8", "replace")


def get_line(target: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def post(body: bytes, *, extra: bytes = b"") -> bytes:
    return (f"POST {SEND_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n").encode() + extra + b"\r\n" + body


async def alive(server: ServerProcess) -> None:
    async with aiohttp.ClientSession() as session, \
            session.get(server.base + "/healthz") as resp:
        assert resp.status == 200


async def test_the_largest_valid_get_fits_and_a_longer_url_is_a_clean_400(
        tmp_path: Path) -> None:
    """The default `server.max_url_bytes` (16384) takes a GET with 500 recipients and a
    6-part UCS-2 text, percent-encoded; one byte more than the limit is HTTP 400."""
    db = tmp_path / "url.sqlite3"
    await prepare_store(db, credits=10_000)
    async with servers() as started:
        server = await ServerProcess.start(db)
        started.append(server)
        recipients = ",".join(f"+336123{i:05d}" for i in range(500))
        text = "中" * 402  # 6 parts of 67 UCS-2 characters, 9 bytes each once encoded
        target = f"{SEND_PATH}?{urlencode(demo_params(to=recipients, message=text))}"
        assert 12_000 < len(target) <= 16_384
        status, body = await raw(server.port, get_line(target.encode()))
        assert status == 200 and body.startswith("OK\n"), body[:200]
        assert len(body.split("\n")[2:]) == 500
        assert int(read_db(db, "SELECT parts FROM messages LIMIT 1")[0][0]) == 6

        base = f"{SEND_PATH}?{QUERY}&message=hi&pad="
        exactly = base + "x" * (16_384 - len(base))
        status, body = await raw(server.port, get_line(exactly.encode()))
        assert status == 200 and body.startswith("OK\n"), body
        status, body = await raw(server.port, get_line(exactly.encode() + b"x"))
        assert status == 400, body
        assert len(read_db(db, "SELECT id FROM messages")) == 501

        # 501 recipients: refused by the rules (by POST: a GET that long is over the limit).
        recipients += ",+33612399999"
        status, body = await raw(server.port, post(urlencode(demo_params(
            to=recipients, message="hi")).encode()))
        assert (status, body) == (200, "KO\n202 Invalid to: at most 500 recipients per request")
        await alive(server)
        assert await server.stop() == 0


async def test_url_body_and_recipient_limits_are_configurable(tmp_path: Path) -> None:
    db = tmp_path / "small.sqlite3"
    await prepare_store(db)
    async with servers() as started:
        server = await ServerProcess.start(db, env={
            "HTTP2SMS_SERVER_MAX_URL_BYTES": "1024", "HTTP2SMS_SERVER_MAX_REQUEST_BYTES": "2048",
            "HTTP2SMS_SEND_MAX_RECIPIENTS": "3"})
        started.append(server)
        params = demo_params(message="y" * 918)  # 6 parts
        target = f"{SEND_PATH}?{urlencode(params)}".encode()
        assert 1024 < len(target) < 2048
        status, _ = await raw(server.port, get_line(target))
        assert status == 400
        # The same send by POST is within the body limit.
        status, body = await raw(server.port, post(urlencode(params).encode()))
        assert status == 200 and body.startswith("OK\n"), body
        # A body over server.max_request_bytes: 413.
        status, body = await raw(server.port, post(urlencode(
            demo_params(message="z" * 2100)).encode()))
        assert status == 413, body
        to = ",".join(f"+3361234567{i}" for i in range(4))
        status, body = await raw(server.port, post(urlencode(demo_params(to=to)).encode()))
        assert body == "KO\n202 Invalid to: at most 3 recipients per request"
        status, body = await raw(server.port, post(urlencode(
            demo_params(to=to.rsplit(",", 1)[0])).encode()))
        assert body.startswith("OK\n") and len(body.split("\n")[2:]) == 3
        assert len(read_db(db, "SELECT id FROM messages")) == 4
        await alive(server)
        assert await server.stop() == 0


async def test_bad_bytes_get_clean_answers_never_500(tmp_path: Path) -> None:
    """Broken percent-escapes stay as written; bytes that are not UTF-8 are read as Latin-1
    (SPEC 2), raw in a URL too (as OVH takes them); other bytes HTTP does not allow in a
    request line are refused by the HTTP parser with 400; control characters in `from` and
    `tag` are 202."""
    db = tmp_path / "bytes.sqlite3"
    await prepare_store(db)
    q = QUERY.encode()
    accepted = {  # request -> the text stored
        get_line(SEND_PATH.encode() + b"?" + q + b"&message=100%ZZ%4"): "100%ZZ%4",
        get_line(SEND_PATH.encode() + b"?" + q + b"&message=%E9t%E9"): "été",
        get_line(SEND_PATH.encode() + b"?" + q + b"&message=%C3%A9t%C3%A9"): "été",
        get_line(SEND_PATH.encode() + b"?" + q + b"&message=%FF%FE%"): "ÿþ%",
        post(q + b"&message=\xe9t\xe9 raw"): "été raw",
        post(q + b"&message=caf\xc3\xa9 raw"): "café raw",
        # Raw bytes in the URL, as curl sends a typed é (UTF-8) or an old script (Latin-1).
        get_line(SEND_PATH.encode() + b"?" + q + b"&message=caf\xc3\xa9"): "café",
        get_line(SEND_PATH.encode() + b"?" + q + b"&message=caf\xe9"): "café",
    }
    refused = {  # request -> (HTTP status, start of the body)
        get_line(SEND_PATH.encode() + b"?" + q + b"&message=a\x00b"): (400, ""),
        get_line(SEND_PATH.encode() + b"?" + q + b"&message=a\x1bb"): (400, ""),
        get_line(SEND_PATH.encode() + b"?" + q.replace(b"DEMO", b"DE%00MO") + b"&message=x"):
            (200, "KO\n202 Invalid from: control characters"),
        get_line(SEND_PATH.encode() + b"?" + q + b"&tag=a%1Fb&message=x"):
            (200, "KO\n202 Invalid tag: control characters"),
        post(q.replace(b"sms-demo-1", b"a" * 3000) + b"&message=x"):
            (200, "KO\n202 Invalid account: too long"),
        post(q + b"&message=x", extra=b"X-Big: " + b"h" * 9000 + b"\r\n"): (400, ""),
        post(q + b"&message=x").replace(b"Content-Length: ", b"Content-Length: x"): (400, ""),
        (f"POST {SEND_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
         "Transfer-Encoding: chunked\r\n\r\nzz\r\n").encode(): (400, ""),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64): (400, ""),
        b"G\xc3\x89T / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n": (400, ""),
        get_line(b"/cgi-bin/sms/http2sms.cgi?" + quote("%").encode()): (200, "KO\n201 Missing"),
    }
    async with servers() as started:
        server = await ServerProcess.start(db)
        started.append(server)
        for request, stored in accepted.items():
            status, body = await raw(server.port, request)
            assert status == 200 and body.startswith("OK\n"), (request[:120], body)
            message_id = int(body.split("\n")[2])
            assert read_db(db, "SELECT body FROM messages WHERE id = ?", (message_id,)) == \
                [(stored,)]
        for request, (expected, start) in refused.items():
            status, body = await raw(server.port, request)
            assert status == expected and body.startswith(start), (request[:120], body[:200])
        assert len(read_db(db, "SELECT id FROM messages")) == len(accepted)
        await alive(server)
        assert await server.stop() == 0
    assert '"status": 500' not in server.log and "Unhandled exception" not in server.log


async def test_a_request_the_parser_refuses_is_not_quoted_back(tmp_path: Path) -> None:
    """aiohttp's 400 page quoted the request line, password included; the answer now gives
    the parser's fixed reason only, on both parsers (the C one and the lenient Python one)."""
    db = tmp_path / "quoted.sqlite3"
    await prepare_store(db)
    q = QUERY.encode()
    assert b"password=demo1234" in q
    broken = [
        get_line(SEND_PATH.encode() + b"?" + q + b"&message=a\x01b"),        # control char
        get_line(SEND_PATH.encode() + b"?" + q + b"&message=\xe9a\x01b"),    # raw, then bad
        b"G\x01T " + SEND_PATH.encode() + b"?" + q + b" HTTP/1.1\r\n\r\n",   # bad method
        b"GET " + SEND_PATH.encode() + b"?" + q + b" HTTP/9\r\n\r\n",        # bad version
        (b"GET " + SEND_PATH.encode() + b"?" + q + b" HTTP/1.1\r\nHost: x\r\n"
         b"X-Bad\x01: " + q + b"\r\n\r\n"),                                   # bad header
        post(q + b"&message=x", extra=b"X-Big: " + q * 200 + b"\r\n"),        # header too long
    ]
    for env in ({}, {"HTTP2SMS_SERVER_RAW_URL_BYTES_ALWAYS": "1"}):
        async with servers() as started:
            server = await ServerProcess.start(db, env=env)
            started.append(server)
            for request in broken:
                status, body = await raw(server.port, request)
                assert status == 400, (env, request[:80], body[:200])
                assert "demo1234" not in body and "password" not in body, (env, body[:300])
                assert body.startswith("400 Bad Request\n\n"), body[:200]
            await alive(server)
            assert await server.stop() == 0
