"""Attacks on the listeners of the real process: slow bodies, slow heads, idle connections,
one address's many connections, readiness probes in bulk, and a dual-stack `::` listener.

Loopback has a whole /8: a test's attacker connects from 127.0.0.1, and the others (a load
balancer's probes, another customer) from 127.0.0.2 and 127.0.0.3. Caps are set low through
HTTP2SMS_SERVER_* so that a few hundred connections reach them. The guard's pure parts
(address keys, counts, the cap) are tested directly in tests/unit/test_connections.py.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sqlite3
import time
from pathlib import Path

import aiohttp
import pytest

from tests.serverproc import (
    SEND_PATH,
    ServerProcess,
    demo_params,
    prepare_store,
    servers,
    wait_for,
)

ADMIN_TOKEN = "connections-admin-token-0123456789"
PROBE, OTHER = "127.0.0.2", "127.0.0.3"


def session_from(address: str, *, limit: int = 100) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(local_addr=(address, 0), limit=limit)
    return aiohttp.ClientSession(connector=connector)


async def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """One sample of the gateway's /metrics, asked from the probes' address."""
    async with session_from(PROBE) as session, session.get(
            server.base + "/metrics",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as resp:
        text = await resp.text()
        assert resp.status == 200, (resp.status, text[:300])
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}(?:\{{{wanted}\}})? (\S+)$" if wanted else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def connect(port: int, *, source: str = "127.0.0.1"
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """What the server wrote before closing the connection (EOF or reset), bounded."""
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""


async def closed_at(reader: asyncio.StreamReader, timeout: float) -> float:
    await closed_by_server(reader, timeout)
    return time.monotonic()


async def test_slow_bodies_from_one_address_starve_neither_health_nor_others(
        tmp_path: Path) -> None:
    """250 POST heads announcing 60,000 bytes and sending none, from one address: health
    and readiness stay 200 and another address's sends are served; the connections past
    the address's cap are answered 429; the rest are closed at the body deadline."""
    db = tmp_path / "slowbody.sqlite3"
    await prepare_store(db, credits=100)
    held, cap, body_timeout = 250, 200, 4.0
    async with servers() as started:
        server = await ServerProcess.start(db, env={
            "HTTP2SMS_ADMIN_TOKEN": ADMIN_TOKEN,
            "HTTP2SMS_SERVER_MAX_INFLIGHT": "50",
            "HTTP2SMS_SERVER_MAX_CONNECTIONS_PER_ADDRESS": str(cap),
            "HTTP2SMS_SERVER_MAX_INFLIGHT_PER_ADDRESS": "20",
            "HTTP2SMS_SERVER_BODY_TIMEOUT_SECONDS": str(body_timeout)})
        started.append(server)
        head = (f"POST {SEND_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                "Content-Length: 60000\r\n\r\n").encode()
        connections = []
        # For each connection: when it was opened, and a task noting when it was closed.
        watched: list[tuple[float, asyncio.Task[float]]] = []
        try:
            for _ in range(held):
                reader, writer = await connect(server.port)
                writer.write(head)
                connections.append((reader, writer))
                watched.append((time.monotonic(),
                                asyncio.ensure_future(closed_at(reader, body_timeout + 10))))

            async def all_held() -> bool:
                waiting = await metric(server, "http2sms_requests_reading")
                return waiting + await metric(server, "http2sms_inflight_requests") >= cap

            await wait_for(all_held, timeout=10, what=f"{cap} slow bodies on the gateway")
            async with session_from(PROBE) as probe:
                for path in ("/healthz", "/readyz"):
                    async with probe.get(server.base + path) as resp:
                        assert resp.status == 200, (path, resp.status, await resp.text())
            async with session_from(OTHER) as other, other.get(
                    server.send_url, params=demo_params(message="another customer")) as resp:
                body = await resp.text()
                assert resp.status == 200 and body.startswith("OK\n"), (resp.status, body)
            # The attacker's address has no connection left.
            async with session_from("127.0.0.1") as attacker, attacker.get(
                    server.base + "/healthz") as resp:
                assert resp.status == 429 and resp.headers["Retry-After"] == "1"
            # The first `cap` are closed at the body deadline; those past the cap were
            # closed at once (answered 429, or reset as their head was unread).
            lasted = [await closed - opened for opened, closed in watched]
        finally:
            for _, writer in connections:
                writer.close()
            for _, task in watched:
                task.cancel()
        assert all(body_timeout - 0.5 < t < body_timeout + 3 for t in lasted[:cap]), \
            sorted(lasted[:cap])[::20]
        assert all(t < 1.5 for t in lasted[cap:]), sorted(lasted[cap:])[::5]
        assert await metric(server, "http2sms_connection_timeouts_total",
                            phase="body") == cap
        assert await metric(server, "http2sms_address_limit_rejections_total",
                            limit="connections") == held - cap + 1
        assert await server.stop() == 0


async def test_one_address_gets_429_past_its_requests_in_flight_and_others_do_not(
        tmp_path: Path) -> None:
    """Sends held in flight (their commit waits for the store's write lock, held here):
    the third from one address is answered 429, while another address's send is taken."""
    db = tmp_path / "perip.sqlite3"
    await prepare_store(db, credits=100)
    async with servers() as started:
        server = await ServerProcess.start(db, env={
            "HTTP2SMS_ADMIN_TOKEN": ADMIN_TOKEN,
            "HTTP2SMS_SERVER_MAX_INFLIGHT_PER_ADDRESS": "2",
            "HTTP2SMS_STORE_BUSY_TIMEOUT_SECONDS": "30"})
        started.append(server)
        holder = sqlite3.connect(db, isolation_level=None)
        held: list[asyncio.Future[tuple[int, str]]] = []
        async with session_from("127.0.0.1") as mine, session_from(OTHER) as other:
            async def send(session: aiohttp.ClientSession, text: str) -> tuple[int, str]:
                async with session.get(server.send_url,
                                       params=demo_params(message=text)) as resp:
                    return resp.status, await resp.text()

            try:
                holder.execute("BEGIN IMMEDIATE")
                held = [asyncio.ensure_future(send(mine, f"held {i}")) for i in range(2)]
                held.append(asyncio.ensure_future(send(other, "another address")))

                async def in_flight() -> bool:
                    return await metric(server, "http2sms_inflight_requests") >= 3

                await wait_for(in_flight, timeout=10, what="3 sends in flight")
                status, body = await send(mine, "one too many from this address")
                assert status == 429 and "your address" in body, (status, body)
            finally:
                holder.rollback()
                holder.close()
            answers = await asyncio.gather(*held)
        assert all(s == 200 and b.startswith("OK\n") for s, b in answers), answers
        assert await metric(server, "http2sms_address_limit_rejections_total",
                            limit="requests") == 1
        assert await server.stop() == 0


async def test_a_trickled_head_and_an_idle_connection_are_closed(tmp_path: Path) -> None:
    """Slowloris: a header line every 0.4 s never completes a head within the header
    timeout, and is closed at it; a kept-alive connection left idle is closed at the idle
    timeout; a silent new connection at the header timeout."""
    db = tmp_path / "slowloris.sqlite3"
    await prepare_store(db)
    header_timeout, idle_timeout = 1.5, 2.5
    async with servers() as started:
        server = await ServerProcess.start(db, env={
            "HTTP2SMS_ADMIN_TOKEN": ADMIN_TOKEN,
            "HTTP2SMS_SERVER_HEADER_TIMEOUT_SECONDS": str(header_timeout),
            "HTTP2SMS_SERVER_IDLE_TIMEOUT_SECONDS": str(idle_timeout)})
        started.append(server)

        # A kept-alive connection: one request answered, then silence.
        idle_reader, idle_writer = await connect(server.port)
        idle_writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answered = await asyncio.wait_for(idle_reader.readuntil(b'{"status": "ok"}'), 5)
        assert answered.startswith(b"HTTP/1.1 200 ")
        idle_since = time.monotonic()
        silent_reader, silent_writer = await connect(server.port)
        silent_since = time.monotonic()

        reader, writer = await connect(server.port)
        began = time.monotonic()
        writer.write(b"GET /healthz HTTP/1.1\r\n")
        lines = 0
        try:
            while not reader.at_eof() and time.monotonic() - began < header_timeout + 5:
                try:
                    writer.write(f"X-Trickle-{lines}: 1\r\n".encode())
                    await writer.drain()
                except ConnectionError:
                    break
                lines += 1
                with_eof = asyncio.ensure_future(reader.read())
                done, _ = await asyncio.wait({with_eof}, timeout=0.4)
                if not done:
                    with_eof.cancel()
                    continue
                break
            trickled = time.monotonic() - began
            assert lines >= 3, lines
            assert header_timeout - 0.1 <= trickled < header_timeout + 1.5, trickled
            assert await closed_by_server(silent_reader, 5) == b""
            assert time.monotonic() - silent_since < header_timeout + 1.5
            assert await closed_by_server(idle_reader, idle_timeout + 5) == b""
            idle = time.monotonic() - idle_since
            assert idle_timeout - 0.1 <= idle < idle_timeout + 1.5, idle
        finally:
            for each in (writer, idle_writer, silent_writer):
                each.close()
        assert await metric(server, "http2sms_connection_timeouts_total", phase="head") == 2
        assert await metric(server, "http2sms_connection_timeouts_total", phase="idle") == 1
        assert await server.stop() == 0


async def test_256_keep_alive_connections_from_one_address_are_all_answered(
        tmp_path: Path) -> None:
    """The product's rule for the defaults: a load test from one allowed address, 256
    connections at once, kept alive, is never refused by a per-address cap."""
    db = tmp_path / "load.sqlite3"
    await prepare_store(db, credits=10_000)
    async with servers() as started:
        server = await ServerProcess.start(db, env={"HTTP2SMS_ADMIN_TOKEN": ADMIN_TOKEN})
        started.append(server)
        async with session_from("127.0.0.1", limit=256) as session:
            async def send(i: int) -> tuple[int, str]:
                async with session.get(server.send_url,
                                       params=demo_params(message=f"load {i}")) as resp:
                    return resp.status, await resp.text()

            # Twice: the second round reuses the 256 kept-alive connections.
            for round_ in range(2):
                answers = await asyncio.gather(*(send(round_ * 256 + i) for i in range(256)))
                refused = [a for a in answers if a[0] != 200 or not a[1].startswith("OK\n")]
                assert not refused, refused[:3]
            assert await metric(server, "http2sms_connections") >= 256
        assert await metric(server, "http2sms_address_limit_rejections_total",
                            limit="connections") == 0
        assert await metric(server, "http2sms_address_limit_rejections_total",
                            limit="requests") == 0
        assert await server.stop() == 0


async def test_readiness_probes_in_bulk_share_one_check_a_second(tmp_path: Path) -> None:
    """64 probes at once, again and again for about 3 s: the checks run about once a
    second (counted by the gateway), not once per probe."""
    db = tmp_path / "probes.sqlite3"
    await prepare_store(db)
    async with servers() as started:
        server = await ServerProcess.start(db, env={"HTTP2SMS_ADMIN_TOKEN": ADMIN_TOKEN})
        started.append(server)
        before = await metric(server, "http2sms_readiness_checks_total")
        probes = 0
        async with session_from(PROBE, limit=64) as session:
            async def probe() -> int:
                async with session.get(server.base + "/readyz") as resp:
                    await resp.read()
                    return resp.status

            began = time.monotonic()
            while time.monotonic() - began < 3.0:
                statuses = await asyncio.gather(*(probe() for _ in range(64)))
                assert statuses == [200] * 64
                probes += 64
            elapsed = time.monotonic() - began
        checks = await metric(server, "http2sms_readiness_checks_total") - before
        assert probes >= 256, probes
        assert 1 <= checks <= elapsed + 2, (checks, elapsed, probes)
        assert await server.stop() == 0


def has_ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_host_any_ipv6_listens_on_ipv4_too(tmp_path: Path) -> None:
    db = tmp_path / "dual.sqlite3"
    await prepare_store(db, credits=10)
    async with servers() as started:
        server = await ServerProcess.start(db, host="::")
        started.append(server)
        async with aiohttp.ClientSession() as session:
            for base in (f"http://127.0.0.1:{server.port}", f"http://[::1]:{server.port}"):
                async with session.get(base + "/healthz") as resp:
                    assert resp.status == 200, base
            # An IPv4 client behind the dual-stack socket is still an IPv4 address: the
            # allowlist entry 127.0.0.1 matches it.
            async with session.get(f"http://127.0.0.1:{server.port}{SEND_PATH}",
                                   params=demo_params()) as resp:
                assert (await resp.text()).startswith("OK\n")
        assert await server.stop() == 0
