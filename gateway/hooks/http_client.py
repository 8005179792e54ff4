"""The HTTP client of the callbacks: GET a URL, learn its status, keep the connection.

A burst makes about two callbacks per SMS, so this client runs twice as often as the send
path. aiohttp's client cost 98-102 µs of CPU per request, this one 46-47
(`scripts/bench-callback-client`: keep-alive GETs to a local aiohttp server, 64 at once,
uvloop), because it does what a callback needs and no more. The response is parsed by
httptools (llhttp, Node.js's parser): only the connection pool and the request are ours.

What it does:
- `GET` over HTTP/1.1, `http` or `https` (certificates checked against the system's CAs);
  Basic authentication (UTF-8) from the URL's user and password;
- the status of the first final response (1xx skipped), never following a redirect;
- the body is never read: when it does not come with the head (a callback receiver answers
  "OK"), the connection is closed rather than drained;
- bytes after the response (a second response, a body longer than announced) change
  nothing of its status, and the connection is not kept;
- idle connections are kept per origin (up to `max_idle_per_origin`, for `idle_seconds`);
  a kept connection the server closed meanwhile is replaced once (closed before any byte
  came back, or answered 408 as a server's idle timeout does);
- one deadline (`timeout`) for connecting, sending and the response's head;
- with a `policy`, the host name is resolved here and only an address the policy allows is
  connected to (the check is on the address connected, so a name that resolves elsewhere
  the second time cannot slip by); a connection that turns out to reach one of `own_ports`
  on this very machine (its local and remote addresses are the same) is closed unused;
- every request carries `X-Http2sms-Callback: 1`, which the send URL refuses (a loop
  through a proxy, where the addresses differ).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools
from yarl import URL

from gateway.iprules import IPAddress, parse_ip


class HttpError(Exception):
    """A request that got no usable response. The message never quotes the URL."""


class InvalidUrl(HttpError):
    pass


class ConnectFailed(HttpError):
    pass


class Disconnected(HttpError):
    def __init__(self, message: str, *, answered_nothing: bool) -> None:
        super().__init__(message)
        self.answered_nothing = answered_nothing


class BadResponse(HttpError):
    pass


class TargetRefused(ConnectFailed):
    """The URL's host resolves only to addresses callbacks may not reach."""


TargetCheck = Callable[[IPAddress], "str | None"]

# Sent with every request: the send URL refuses a request that carries it, so a callback
# that reaches the gateway's own send URL by a way `own_ports` cannot see (a TLS reverse
# proxy, a published container port, NAT: proxies pass headers on) sends no SMS.
CALLBACK_HEADER = "X-Http2sms-Callback"


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int


class _Connection(asyncio.Protocol):
    """One connection, one request at a time; httptools calls the `on_*` methods."""

    def __init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[int] | None = None
        self._status = 0          # of the final response's head, once complete
        self._received = False
        self._complete = False
        self._keep_alive = False
        self._extra = False       # bytes after the response: the connection is not kept
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self.close()  # nothing asked, or the body of an answered request: not kept
            return
        self._received = True
        # No limit on the head's size: without `on_header` httptools keeps no header in
        # memory, and the request's timeout bounds how long a head may take.
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadResponse("protocol upgrade"))
            return
        except httptools.HttpParserError:
            if not self._status:
                self._fail(BadResponse("malformed response"))
                return
            self._extra = True  # a final head was read: its status stands, not the rest
        if self._status:
            if not self._complete:
                self.close()  # a body still to come: closing costs less than reading it
            self._waiter.set_result(self._status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(Disconnected(
                "server disconnected", answered_nothing=not self._received))

    # -- httptools -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            self._extra = True  # a second response to one request

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if (status >= 200 or status == 101) and not self._status:
            self._status = status

    def on_message_complete(self) -> None:
        if self._status:
            self._complete = True
            # Asked now: once the parser moves on to the next message, it no longer knows.
            self._keep_alive = self._parser.should_keep_alive()

    # -- the client's side -------------------------------------------------------------

    async def request(self, data: bytes) -> int:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._status = 0
        self._received = self._complete = self._keep_alive = self._extra = False
        self.transport.write(data)
        return await self._waiter

    @property
    def reusable(self) -> bool:
        return not self.closed and self._complete and self._keep_alive \
            and not self._extra and self._status != 101

    def _fail(self, error: HttpError) -> None:
        self.close()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class HttpClient:
    def __init__(self, *, timeout: float, max_idle_per_origin: int, user_agent: str,
                 idle_seconds: float = 15.0, ssl_context: ssl.SSLContext | None = None,
                 policy: TargetCheck | None = None,
                 own_ports: frozenset[int] = frozenset()) -> None:
        self._timeout = timeout
        self._policy = policy
        self._own_ports = own_ports
        self._max_idle = max(0, max_idle_per_origin)
        self._idle_seconds = idle_seconds
        self._user_agent = user_agent
        self._ssl = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._swept = time.monotonic()
        self._closed = False

    async def get(self, url: URL) -> int:
        """The status of `GET url`; HttpError (or TimeoutError past the deadline) if none."""
        origin, request = self._request(url)
        async with asyncio.timeout(self._timeout):
            conn = self._kept(origin)
            if conn is not None:
                try:
                    status = await self._exchange(origin, conn, request)
                except Disconnected as exc:
                    if not exc.answered_nothing:
                        raise
                    # The server closed it while idle (its keep-alive ran out): a new one.
                else:
                    if status != 408:
                        return status
                    # Some servers answer 408 as their idle timeout closes a connection
                    # (HAProxy, Node.js): the request crossed it and was not acted on
                    # (RFC 9110, 15.5.9). Again on a new connection, as for a silent close.
            conn = await self._connect(origin)
            return await self._exchange(origin, conn, request)

    async def close(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn.close()
        self._idle.clear()

    def _request(self, url: URL) -> tuple[Origin, bytes]:
        origin = origin_of(url)
        head = (f"GET {url.raw_path_qs or '/'} HTTP/1.1\r\n"
                f"Host: {url.host_port_subcomponent}\r\n"
                f"User-Agent: {self._user_agent}\r\nAccept: */*\r\n"
                f"{CALLBACK_HEADER}: 1\r\n")
        if url.user is not None:
            secret = f"{url.user}:{url.password or ''}".encode()  # UTF-8, as RFC 7617 says
            head += f"Authorization: Basic {base64.b64encode(secret).decode('ascii')}\r\n"
        try:
            return origin, (head + "\r\n").encode("ascii")
        except UnicodeEncodeError:
            raise InvalidUrl("characters a request line cannot hold") from None

    def _kept(self, origin: Origin) -> _Connection | None:
        now = time.monotonic()
        if now - self._swept > self._idle_seconds:
            self._sweep(now)
        conns = self._idle.get(origin)
        while conns:
            conn = conns.pop()
            if not conn.closed and now - conn.idle_since < self._idle_seconds:
                return conn
            conn.close()
        return None

    def _sweep(self, now: float) -> None:
        """Close what expired, forget origins with nothing kept: callback hosts come and go."""
        self._swept = now
        for origin, conns in list(self._idle.items()):
            fresh = [c for c in conns if not c.closed and now - c.idle_since < self._idle_seconds]
            for conn in conns:
                if conn not in fresh:
                    conn.close()
            if fresh:
                self._idle[origin] = fresh
            else:
                del self._idle[origin]

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if origin.scheme == "https":
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            tls = self._ssl
        try:
            if self._policy is None:
                _, conn = await loop.create_connection(
                    _Connection, origin.host, origin.port, ssl=tls,
                    server_hostname=origin.host if tls else None)
            else:
                conn = await self._connect_checked(origin, tls)
        except ssl.SSLError as exc:
            raise ConnectFailed(f"TLS: {exc.reason or type(exc).__name__}") from None
        except UnicodeError:  # a host name IDNA cannot encode (a label over 63 characters)
            raise InvalidUrl("host name cannot be encoded") from None
        except OSError as exc:
            raise ConnectFailed(_reason(exc)) from None
        return conn

    async def _connect_checked(self, origin: Origin,
                               tls: ssl.SSLContext | None) -> _Connection:
        """Resolve, keep the addresses the policy allows, connect to the first that answers."""
        assert self._policy is not None
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(origin.host.strip("[]"), origin.port,
                                       type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        refusal = ""
        last: OSError | None = None
        for family, kind, proto, _, address in infos:
            ip = parse_ip(str(address[0]).partition("%")[0])
            problem = self._policy(ip)
            if problem:
                refusal = refusal or problem
                continue
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
                if self._reaches_itself(sock):
                    raise TargetRefused("the gateway's own listener")
                _, conn = await loop.create_connection(
                    _Connection, sock=sock, ssl=tls,
                    server_hostname=origin.host.strip("[]") if tls else None)
                return conn
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:
                sock.close()
                raise
        if last is not None:
            raise last
        raise TargetRefused(refusal or "no address to connect to")

    def _reaches_itself(self, sock: socket.socket) -> bool:
        """Connected to one of the gateway's own ports on this machine: a loop, not a call.

        A connection to any of this machine's addresses has that same address as its local
        end, so this holds whichever address (or `0.0.0.0`/`::` listener) is reached."""
        if not self._own_ports:
            return False
        local, peer = sock.getsockname(), sock.getpeername()
        return peer[1] in self._own_ports and \
            parse_ip(str(local[0]).partition("%")[0]) == parse_ip(str(peer[0]).partition("%")[0])

    async def _exchange(self, origin: Origin, conn: _Connection, request: bytes) -> int:
        try:
            status = await conn.request(request)
        except BaseException:
            conn.close()  # a cancelled or timed-out request leaves an unknown state behind
            raise
        # A 408 says the server is closing the connection, whatever its headers say.
        if conn.reusable and status != 408 and not self._closed:
            conns = self._idle.setdefault(origin, [])
            if len(conns) < self._max_idle:
                conn.idle_since = time.monotonic()
                conns.append(conn)
                return status
        conn.close()
        return status


def origin_of(url: URL) -> Origin:
    """Where `url` is served; InvalidUrl if this client could never send to it."""
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise InvalidUrl("not an http(s) URL with a host")
    if url.explicit_port == 0:
        raise InvalidUrl("port 0")
    port = url.port or (443 if url.scheme == "https" else 80)
    return Origin(url.scheme, url.raw_host, port)


def _reason(exc: OSError) -> str:
    """Why a connection failed, in the system's words (asyncio's own text adds addresses)."""
    if isinstance(exc, socket.gaierror):
        return exc.strerror or "name resolution failed"
    if exc.errno:
        return os.strerror(exc.errno)
    return "connection failed"
