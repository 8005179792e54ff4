"""What people see: non-printable characters escaped in console logs and the CLI's plain
output, callback URLs redacted (issue 19, points 16 and 17)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import Config
from gateway.display import escape, redact_url
from gateway.server import store_location
from tests.cli_in_process import invoke
from tests.conftest import ACCOUNT, LOGIN, Harness, eventually
from tests.serverproc import SEND_PATH, ServerProcess, prepare_store, servers

RAW = "\x00\x07\x1b[2J\x1b]0;pwned\x07\u202e\x9b"


@pytest.mark.parametrize(("text", "shown"), [
    ("plain text, é ü 😀", "plain text, é ü 😀"),
    ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
    ("a\x00b\x07c", "a\\x00b\\x07c"),
    ("line\nnext\ttab\r", "line\\nnext\\ttab\\r"),
    ("\u202eevil\u200b", "\\u202eevil\\u200b"),   # bidi override, zero-width space
    ("\x9b31m", "\\x9b31m"),                       # the 8-bit CSI
    ("\U000e0001tag", "\\U000e0001tag"),
])
def test_escape_writes_every_non_printable_character(text: str, shown: str) -> None:
    assert escape(text) == shown
    assert escape(shown) == shown  # already harmless: unchanged
    assert escape(shown).isprintable()


def test_escape_keeps_what_it_is_told_to() -> None:
    assert escape("Traceback\n  \x1b[2J", keep="\n") == "Traceback\n  \\x1b[2J"


@pytest.mark.parametrize(("url", "shown"), [
    ("https://user:pa55@host.example/path?key=s3cr3t&x=1",
     "https://user:***@host.example/path?key=***&x=***"),
    ("https://host.example/dlr", "https://host.example/dlr"),
    ("https://user@host.example:8443/dlr", "https://***@host.example:8443/dlr"),
    ("https://TOKEN@hooks.example/", "https://***@hooks.example/"),   # a token as the user
    ("https://@host.example/", "https://@host.example/"),
    ("https://:pa55@host.example/", "https://:***@host.example/"),
    ("http://h.example/cb?token", "http://h.example/cb?***"),
    ("http://h.example/cb?a=1&&b=", "http://h.example/cb?a=***&&b=***"),
    ("http://h.example/cb#frag", "http://h.example/cb#***"),
    ("http://u:p@[::1]:99999/", "***"),            # not a URL: hidden whole
    ("ops@example.com", "ops@example.com"),
])
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(("location", "shown"), [
    ("var/gateway.sqlite3", "var/gateway.sqlite3"),
    ("sqlite:////srv/g.sqlite3", "sqlite:////srv/g.sqlite3"),
    ("postgresql://gw@db.example/gw", "postgresql://gw@db.example/gw"),
    ("postgresql://gw:s3cret@db.example:5432/gw", "postgresql://gw:***@db.example:5432/gw"),
    ("postgresql://gw@db.example/gw?password=s3cret&sslmode=require",
     "postgresql://***@db.example/gw?password=***&sslmode=***"),
])
def test_the_listening_line_shows_where_the_store_is_without_its_secrets(
        location: str, shown: str) -> None:
    assert store_location(location) == shown


def test_redaction_never_shows_a_password_or_a_query_value() -> None:
    url = "https://al:Zq9-secret@h.example/x;p?k1=Zq9-one&k2=Zq9-two"
    assert "Zq9" not in redact_url(url)
    assert "Zq9" not in redact_url("https://Zq9-token@h.example/x")


# -- the command line ----------------------------------------------------------------------

async def cli(*args: str) -> Any:
    result = await asyncio.to_thread(invoke, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


async def test_message_show_escapes_the_text_and_redacts_callbacks(
        make_harness: Any, config: Config, aiohttp_server: Any) -> None:
    calls: list[str] = []

    async def hook(request: aiohttp.web.Request) -> aiohttp.web.Response:
        calls.append(request.path_qs)
        return aiohttp.web.Response(text="ok")

    app = aiohttp.web.Application()
    app.router.add_get("/cb", hook)
    server = await aiohttp_server(app)
    secret_url = f"http://hook:Pa55w0rd@127.0.0.1:{server.port}/cb?key=K3y-s3cr3t"
    h: Harness = await make_harness()
    await h.manage.update_user(ACCOUNT, LOGIN, callback_url=secret_url)
    _, body = await h.send(message=f"code 1234 {RAW}", smsCoding="2",
                                contentType="application/json")
    (message_id,) = json.loads(body)["SmsIds"]

    async def called_back() -> bool:
        return bool(await h.gateway.store.message_attempts(message_id))
    await eventually(called_back)
    db = config.store.path

    plain = await cli("--db", db, "message", "show", str(message_id))
    assert "\x1b" not in plain and "\x00" not in plain and "\x07" not in plain
    assert "\u202e" not in plain and "\x9b" not in plain
    assert "code 1234 \\x00\\x07\\x1b[2J\\x1b]0;pwned\\x07\\u202e\\x9b" in plain
    assert "Pa55w0rd" not in plain and "K3y-s3cr3t" not in plain
    assert f"http://hook:***@127.0.0.1:{server.port}/cb?key=***" in plain

    exact = json.loads(await cli("--db", db, "--json", "message", "show", str(message_id)))
    assert exact["message"].startswith(f"code 1234 {RAW}")
    assert {c["target"] for c in exact["callbacks"]} == {
        f"http://hook:***@127.0.0.1:{server.port}/cb?key=***"}

    shown = json.loads(await cli("--db", db, "--json", "message", "show", str(message_id),
                                 "--show-secrets"))
    assert {c["target"] for c in shown["callbacks"]} == {secret_url}
    for command in (["user", "show", ACCOUNT, LOGIN], ["user", "show", ACCOUNT, LOGIN, "--json"]):
        out = await cli("--db", db, *command)
        assert "Pa55w0rd" not in out and "K3y-s3cr3t" not in out and "hook:***@" in out
        assert secret_url in await cli("--db", db, *command, "--show-secrets")


async def test_cli_errors_and_lists_escape_what_callers_wrote(make_harness: Any,
                                                              config: Config) -> None:
    h: Harness = await make_harness()
    await h.send(tag="t1")
    result = await asyncio.to_thread(invoke, "--db", config.store.path, "account", "show",
                                     "evil\x1b[2J")
    assert result.exit_code == 2 and "\x1b" not in result.stderr
    assert "evil\\x1b[2J" in result.stderr


# -- the console log of the real process -----------------------------------------------------

async def test_an_account_name_with_escapes_lands_escaped_in_the_console_log(
        tmp_path: Path) -> None:
    db = tmp_path / "console.sqlite3"
    await prepare_store(db, credits=10)
    async with servers() as started:
        server = await ServerProcess.start(db, env={"HTTP2SMS_LOG_FORMAT": "console",
                                                    "HTTP2SMS_LOG_LEVEL": "info"})
        started.append(server)
        query = ("account=%1B%5B2J%1B%5D0%3Bpwned%07x&login=l&password=p&from=ACME"
                 "&to=%2B33612345678&message=hi")
        async with aiohttp.ClientSession() as session, \
                session.get(f"{server.base}{SEND_PATH}?{query}") as resp:
            assert resp.status in (200, 401)
        assert await server.stop() == 0
    log = server.output.decode("utf-8", "replace")
    assert "\x1b" not in log and "\x07" not in log
    assert "\\x1b[2J\\x1b]0;pwned\\x07x" in log
