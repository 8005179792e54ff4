"""Admin API tokens against the real process: a short bootstrap token stops it at start, and
guessing the token from one address is locked however many guesses arrive at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from tests.serverproc import ServerProcess, servers

TOKEN = "process-admin-token-0123456789abcdef"


def bearer(text: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {text}"}


async def test_the_real_process_refuses_to_start_with_a_short_token(tmp_path: Path) -> None:
    async with servers() as started:
        server = await ServerProcess.start(tmp_path / "g.sqlite3", wait_ready=False,
                                           env={"HTTP2SMS_ADMIN_TOKEN": "12345"})
        started.append(server)
        assert await server.wait_exit(60) == 2
        assert "admin.token" in server.log and "at least 24 characters" in server.log
        assert "12345" not in server.log.replace(str(server.port), "")


async def test_guessing_the_token_against_the_real_process_is_locked_per_address(
        tmp_path: Path) -> None:
    """The attack: wrong tokens as fast as one address can send them, many at once. At
    most max_failures are checked; then the address is refused without a check, the right
    token included, while another address still gets in."""
    async with servers() as started:
        server = await ServerProcess.start(tmp_path / "g.sqlite3", env={
            "HTTP2SMS_ADMIN_TOKEN": TOKEN, "HTTP2SMS_SECURITY_MAX_FAILURES": "5",
            "HTTP2SMS_SECURITY_LOCKOUT_SECONDS": "300"})
        started.append(server)
        url = server.base + "/1.0/sms"
        async with aiohttp.ClientSession() as session:
            async def guess(n: int) -> int:
                async with session.get(url, headers=bearer(f"guess-{n:032d}")) as resp:
                    return resp.status

            statuses = await asyncio.gather(*(guess(n) for n in range(200)))
            assert statuses.count(401) <= 5, statuses
            assert statuses.count(429) >= 195
            async with session.get(url, headers=bearer(TOKEN)) as resp:
                assert resp.status == 429
                assert int(resp.headers["Retry-After"]) > 0
                assert "too many" in (await resp.json())["message"]
        # Another address: the lock is the attacker's alone.
        other = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
        async with aiohttp.ClientSession(connector=other) as session, \
                session.get(url, headers=bearer(TOKEN)) as resp:
            assert resp.status == 200
            assert await resp.json() == []
        assert server.events("admin_token_lockout")
