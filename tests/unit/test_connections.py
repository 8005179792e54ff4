"""The connection guard's parts without a process: address keys, counts per address, and
the per-address cap on connections (the attacks on the real process are in
tests/process/test_connections.py)."""

from __future__ import annotations

import asyncio

from gateway import iprules
from gateway.connections import (
    AddressCounts,
    ConnectionGuard,
    GuardedConnection,
    Limits,
    address_key,
)


def test_address_keys() -> None:
    assert address_key("127.0.0.1", 64) == "127.0.0.1"
    # A dual-stack listener's IPv4 peer is its IPv4 address.
    assert address_key("::ffff:10.1.2.3", 64) == "10.1.2.3"
    # An IPv6 host holds a /64: its addresses count together.
    assert address_key("2001:db8::1", 64) == address_key("2001:db8::ffff:1", 64) \
        == "2001:db8::/64"
    assert address_key("2001:db8::1", 128) == "2001:db8::1"
    assert address_key(None, 64) is None and address_key("not an ip", 64) is None


def test_address_counts() -> None:
    counts = AddressCounts(2)
    assert counts.take("a") and counts.take("a") and not counts.take("a")
    assert counts.take("b")
    counts.give("a")
    assert counts.take("a")
    for _ in range(3):
        counts.give("a")
    assert "a" not in counts.held  # nothing kept for an address holding nothing
    unlimited = AddressCounts(0)
    assert all(unlimited.take("a") for _ in range(10_000))


class FakeTransport(asyncio.Transport):
    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer
        self.written = b""
        self.closed = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return (self.peer, 40000) if name == "peername" else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True


class Inner(asyncio.Protocol):
    """aiohttp's protocol as the guard sees it."""

    def __init__(self) -> None:
        self.made = self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


async def test_the_cap_spares_trusted_proxies_and_counts_until_a_connection_is_lost() -> None:
    guard = ConnectionGuard(Limits(max_connections_per_address=2,
                                   trusted=iprules.parse_networks(["10.0.0.0/8"])))
    factory = guard.factory(Inner)

    def connect(peer: str) -> tuple[GuardedConnection, FakeTransport]:
        conn, transport = factory(), FakeTransport(peer)
        conn.connection_made(transport)
        return conn, transport

    first, _ = connect("192.0.2.1")
    connect("::ffff:192.0.2.1")  # the same client through a dual-stack socket
    third, refused = connect("192.0.2.1")
    assert refused.closed and refused.written.startswith(b"HTTP/1.1 429 ")
    assert third.inner is None  # aiohttp never saw it
    assert not connect("192.0.2.2")[1].closed  # another address
    # A trusted proxy carries everyone's connections: no cap.
    assert not any(connect("10.1.2.3")[1].closed for _ in range(10))
    first.connection_lost(None)
    assert not connect("192.0.2.1")[1].closed
    third.connection_lost(None)  # a refused connection gives nothing back
    assert connect("192.0.2.1")[1].closed
