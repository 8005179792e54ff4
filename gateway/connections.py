"""The listeners' guard on connections: a cap per client address, and deadlines on reading.

A connection costs a file descriptor and some memory whatever it carries, and aiohttp on
its own closes none that stay silent (its keep-alive lasts about an hour) or that trickle
a request a byte at a time. Here every connection of a listener goes through a thin
protocol, `GuardedConnection`, in front of aiohttp's own:

- at most `server.max_connections_per_address` connections at once per client address;
  one more is answered 429 and closed before aiohttp sees it;
- a connection is closed when a request's head has not arrived within
  `server.header_timeout_seconds` (from the connection, or from its first byte after an
  idle spell), its body within `server.body_timeout_seconds` of its head, or when it stays
  idle between requests for `server.idle_timeout_seconds`;
- at most `server.max_inflight_per_address` requests of one address are served at once
  (the in-flight limiter asks the connection, `gateway.inflight`).

The address is the TCP peer, never X-Forwarded-For: these caps protect the process, before
anything is parsed. Behind a reverse proxy every client is the proxy's one address, so the
peers in `server.trusted_proxies` have no cap. IPv4-mapped peers of a dual-stack listener
count as their IPv4 address, and an IPv6 peer as its network of `security.ipv6_prefix`
(a host holds a whole /64).

Deadlines are checked by one sweep every quarter of the shortest timeout (and at least every
0.25 s) over the open connections, not by a timer per request: a request then costs a
clock read and a few attribute stores, and a deadline is met to within the sweep's period.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from gateway import iprules
from gateway.config import Config
from gateway.metrics import Metrics

# Written to a connection over its address's cap, before anything was read from it.
_TOO_MANY_BODY = b'{"message": "too many connections from your address, retry later"}'
_TOO_MANY = (b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nConnection: close\r\n"
             b"Content-Type: application/json; charset=utf-8\r\n"
             b"Content-Length: %d\r\n\r\n%s" % (len(_TOO_MANY_BODY), _TOO_MANY_BODY))

# What a connection waits for; a deadline missed in that phase closes it.
HEAD, BODY, IDLE, BUSY = "head", "body", "idle", "busy"


def address_key(host: str | None, ipv6_prefix: int) -> str | None:
    """The key a peer's connections and requests are counted under (None: not an IP)."""
    if not host:
        return None
    try:
        ip = iprules.parse_ip(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ipv6_prefix < 128:
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


class AddressCounts:
    """Things held at once per address, up to `cap` each (0: no cap)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.held: dict[str, int] = {}

    def take(self, key: str) -> bool:
        held = self.held.get(key, 0)
        if self.cap and held >= self.cap:
            return False
        self.held[key] = held + 1
        return True

    def give(self, key: str) -> None:
        held = self.held.get(key, 0) - 1
        if held > 0:
            self.held[key] = held
        else:
            self.held.pop(key, None)


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    idle_timeout: float = 75.0
    max_connections_per_address: int = 1024
    max_inflight_per_address: int = 512
    trusted: tuple[iprules.IPNetwork, ...] = ()
    ipv6_prefix: int = 64

    @classmethod
    def from_config(cls, config: Config) -> Limits:
        server = config.server
        return cls(header_timeout=server.header_timeout_seconds,
                   body_timeout=server.body_timeout_seconds,
                   idle_timeout=server.idle_timeout_seconds,
                   max_connections_per_address=server.max_connections_per_address,
                   max_inflight_per_address=server.max_inflight_per_address,
                   trusted=iprules.parse_networks(server.trusted_proxies),
                   ipv6_prefix=config.security.ipv6_prefix)


class ConnectionGuard:
    """The connections of one process's listeners: their counts per address and deadlines."""

    def __init__(self, limits: Limits, metrics: Metrics | None = None) -> None:
        self.limits = limits
        self.metrics = metrics or Metrics()
        self.connections = AddressCounts(limits.max_connections_per_address)
        self.requests = AddressCounts(limits.max_inflight_per_address)
        self.open: set[GuardedConnection] = set()
        self._sweep_handle: asyncio.TimerHandle | None = None
        # Deadlines are met to within this much.
        self.tick = min(1.0, limits.header_timeout, limits.body_timeout,
                        limits.idle_timeout) / 4

    @classmethod
    def from_config(cls, config: Config, metrics: Metrics | None = None) -> ConnectionGuard:
        return cls(Limits.from_config(config), metrics)

    def factory(self, server: Callable[[], asyncio.Protocol]
                ) -> Callable[[], GuardedConnection]:
        """The protocol factory of a listener: aiohttp's server behind the guard."""
        return lambda: GuardedConnection(self, server)

    def trusted(self, host: str | None) -> bool:
        if not host or not self.limits.trusted:
            return False
        try:
            ip = iprules.parse_ip(host)
        except ValueError:
            return False
        return any(ip.version == net.version and ip in net for net in self.limits.trusted)

    def admit(self, conn: GuardedConnection) -> bool:
        if conn.address is not None and not self.connections.take(conn.address):
            self.metrics.address_rejections.labels("connections").inc()
            return False
        self.open.add(conn)
        self.metrics.connections.inc()
        if self._sweep_handle is None:
            self._sweep_handle = asyncio.get_running_loop().call_later(self.tick, self._sweep)
        return True

    def release(self, conn: GuardedConnection) -> None:
        self.open.discard(conn)
        self.metrics.connections.dec()
        if conn.address is not None:
            self.connections.give(conn.address)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn in [c for c in self.open if c.deadline <= now]:
            self.metrics.connection_timeouts.labels(conn.phase).inc()
            conn.close()
        self._sweep_handle = loop.call_later(self.tick, self._sweep) if self.open else None


class GuardedConnection(asyncio.Protocol):
    """One connection: counted under its address, closed when it misses a deadline.

    It stands between the transport and aiohttp's protocol, which is only built once the
    connection is admitted; the in-flight limiter finds it with `connection_of(request)`.
    """

    def __init__(self, guard: ConnectionGuard, server: Callable[[], asyncio.Protocol]
                 ) -> None:
        self.guard = guard
        self._server = server
        self.inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.address: str | None = None
        self.phase = HEAD
        self.deadline = math.inf
        self._requests_held = 0

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        host = peer[0] if isinstance(peer, tuple) and peer else None
        guard = self.guard
        if not guard.trusted(host):
            self.address = address_key(host, guard.limits.ipv6_prefix)
        if not guard.admit(self):
            transport.write(_TOO_MANY)
            transport.close()
            return
        # A new connection owes its first request's head at once.
        self.deadline = asyncio.get_running_loop().time() + guard.limits.header_timeout
        self.inner = self._server()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            return
        if self.phase == IDLE:
            self.phase = HEAD
            self.deadline = (asyncio.get_running_loop().time()
                             + self.guard.limits.header_timeout)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is None:
            return
        # Requests it carried stay counted until their handlers end (they run on).
        self.guard.release(self)
        inner, self.inner = self.inner, None
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    # -- what the in-flight limiter tells it --------------------------------------------

    def request_began(self, *, body: bool) -> None:
        """A request's head is in; its body, if `body`, is still to be read."""
        if body:
            self.phase = BODY
            self.deadline = (asyncio.get_running_loop().time()
                             + self.guard.limits.body_timeout)
        else:
            self.body_read()

    def body_read(self) -> None:
        self.phase = BUSY
        self.deadline = math.inf

    def request_ended(self) -> None:
        self.phase = IDLE
        self.deadline = asyncio.get_running_loop().time() + self.guard.limits.idle_timeout

    def request_entered(self) -> bool:
        """Count a request in flight under this address: False when it is over its cap."""
        if self.address is not None and not self.guard.requests.take(self.address):
            self.guard.metrics.address_rejections.labels("requests").inc()
            return False
        self._requests_held += 1
        return True

    def request_left(self) -> None:
        if self._requests_held:
            self._requests_held -= 1
            if self.address is not None:
                self.guard.requests.give(self.address)

    def close(self) -> None:
        """Close at once (aiohttp's own force_close when it has the connection)."""
        self.deadline = math.inf
        inner = self.inner
        if isinstance(inner, web.RequestHandler):
            inner.force_close()
        elif self.transport is not None:
            self.transport.close()


def connection_of(request: web.BaseRequest) -> GuardedConnection | None:
    """The guarded connection a request came on; None on a listener without the guard."""
    transport = request.transport
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, GuardedConnection) else None
