"""HTTPS on the gateway itself: credentials travel in the URL, so they must travel encrypted."""

from __future__ import annotations

import re
import ssl
import subprocess
from pathlib import Path

import aiohttp

from gateway.cli import DEMO_CONSOLE_EMAIL, DEMO_CONSOLE_PASSWORD
from tests.serverproc import SEND_PATH, ServerProcess, demo_params, prepare_store, wait_for


def self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


async def test_the_gateway_serves_https(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    db = tmp_path / "tls.sqlite3"
    await prepare_store(db, credits=10)
    server = await ServerProcess.start(db, wait_ready=False, env={
        "HTTP2SMS_SERVER_TLS_CERT": str(cert), "HTTP2SMS_SERVER_TLS_KEY": str(key)})
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        base = f"https://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as session:
            async def up() -> bool:
                assert server.proc.returncode is None, server.log[-2000:]
                try:
                    async with session.get(base + "/healthz", ssl=trusted) as resp:
                        return resp.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(up, timeout=30, what="the HTTPS listener")
            async with session.get(base + SEND_PATH, params=demo_params(), ssl=trusted) as resp:
                assert (await resp.text()).startswith("OK\n")
            # Plain HTTP on the TLS port gets nowhere near the send path.
            try:
                async with session.get(f"http://127.0.0.1:{server.port}{SEND_PATH}",
                                       params=demo_params()) as resp:
                    assert not (await resp.text()).startswith("OK")
            except aiohttp.ClientError:
                pass
        assert await server.stop() == 0
    finally:
        await server.kill()


async def test_the_console_s_session_cookie_is_secure_over_https(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    db = tmp_path / "tls.sqlite3"
    await prepare_store(db)  # with the demo console user, as `serve --demo`
    server = await ServerProcess.start(db, wait_ready=False, env={
        "HTTP2SMS_SERVER_TLS_CERT": str(cert), "HTTP2SMS_SERVER_TLS_KEY": str(key)})
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        base = f"https://127.0.0.1:{server.port}"
        # unsafe: cookies of an IP address (127.0.0.1) kept, as a browser keeps them.
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
            async def login_page() -> str | None:
                assert server.proc.returncode is None, server.log[-2000:]
                try:
                    async with session.get(base + "/console/login", ssl=trusted) as resp:
                        return await resp.text() if resp.status == 200 else None
                except aiohttp.ClientError:
                    return None

            page = await wait_for(login_page, timeout=30, what="the HTTPS listener")
            token = re.search(r'name="_csrf" value="([^"]+)"', page)
            assert token is not None
            async with session.post(base + "/console/login", ssl=trusted,
                                    allow_redirects=False,
                                    data={"email": DEMO_CONSOLE_EMAIL,
                                          "password": DEMO_CONSOLE_PASSWORD,
                                          "_csrf": token.group(1)}) as resp:
                assert resp.status == 303
                cookie = next(c for c in resp.headers.getall("Set-Cookie")
                              if c.startswith("h2s_console="))
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert await server.stop() == 0
    finally:
        await server.kill()
