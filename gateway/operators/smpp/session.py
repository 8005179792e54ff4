"""One SMPP session to the SMSC: connect (TCP or TLS), bind, requests and their answers,
enquire_link both ways, unbind; and the pacing of submit_sm (window, throughput).

smpplib encodes and decodes the PDUs; the session is ours, on asyncio, because smpplib's
client is blocking and aiosmpplib's owns the queue and the deliver_sm answers (see
pyproject.toml). Requests from the SMSC other than enquire_link and unbind (deliver_sm,
data_sm) go to the `on_request` callback given, which answers them when it wants: a
receipt is answered only once committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

import smpplib.command
import smpplib.exceptions
import smpplib.smpp

from gateway.config import ConfigError
from gateway.operators.smpp.errors import ESME_ROK, status_name

HEADER = struct.Struct(">LLLL")
MAX_PDU = 64 * 1024
BIND_COMMANDS = {"transceiver": "bind_transceiver", "transmitter": "bind_transmitter",
                 "receiver": "bind_receiver"}

Pdu = Any  # smpplib.command.Command: smpplib has no annotations
RequestHandler = Callable[["Session", Pdu], Coroutine[Any, Any, None]]


class LinkError(Exception):
    """The session could not be opened or is gone; `reason` is one line for people."""

    def __init__(self, reason: str, *, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class _Sequence:
    """smpplib's codec asks its "client" for sequence numbers."""

    def __init__(self) -> None:
        self.sequence = 0

    def next_sequence(self) -> int:
        self.sequence = self.sequence % 0x7FFFFFFF + 1
        return self.sequence


def tls_context(ca_file: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"setting operator.smpp.tls_ca_file: cannot use {ca_file}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None


class Session:
    def __init__(self, *, host: str, port: int, tls: ssl.SSLContext | None, mode: str,
                 system_id: str, password: str, system_type: str, timeout: float,
                 enquire_link: float, on_request: RequestHandler, name: str = "") -> None:
        self.host, self.port, self.tls, self.mode = host, port, tls, mode
        self._system_id, self._password, self._system_type = system_id, password, system_type
        self.timeout = timeout
        self._enquire_every = enquire_link
        self._on_request = on_request
        self.name = name
        self._seq = _Sequence()
        self._pending: dict[int, asyncio.Future[Pdu]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()
        self._last_seen = time.monotonic()
        self.bound = False
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def transmits(self) -> bool:
        return self.mode in ("transceiver", "transmitter")

    async def open(self) -> None:
        """Connect and bind; raises LinkError with what went wrong."""
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, ssl=self.tls,
                                        server_hostname=self.host if self.tls else None),
                self.timeout)
        except ssl.SSLError as exc:
            raise LinkError(f"TLS failure: {exc.reason or exc}") from None
        except TimeoutError:
            raise LinkError(f"timeout connecting to {self.host}:{self.port}") from None
        except ConnectionRefusedError:
            raise LinkError(f"connection refused by {self.host}:{self.port}") from None
        except OSError as exc:
            raise LinkError(f"cannot connect to {self.host}:{self.port}: "
                            f"{exc.strerror or exc}") from None
        self._tasks.append(asyncio.create_task(self._read_loop(), name=f"smpp-read{self.name}"))
        try:
            resp = await self.request(self.make(
                BIND_COMMANDS[self.mode], system_id=self._system_id, password=self._password,
                system_type=self._system_type, interface_version=0x34, addr_ton=0,
                addr_npi=0, address_range=""))
        except LinkError:
            await self.close("bind failed")
            raise
        if resp.status != ESME_ROK:
            await self.close("bind refused")
            reason = "wrong password" if resp.status == 0x0E else \
                "unknown system_id" if resp.status == 0x0F else "bind refused"
            raise LinkError(f"{reason} ({status_name(resp.status)})", status=resp.status)
        self.bound = True
        self._tasks.append(asyncio.create_task(self._enquire_loop(),
                                               name=f"smpp-enquire{self.name}"))

    def make(self, command: str, **fields: Any) -> Pdu:
        return smpplib.smpp.make_pdu(command, client=self._seq, **fields)

    async def request(self, pdu: Pdu, timeout: float | None = None) -> Pdu:
        """Send a request and wait for its answer; LinkError if none comes in time."""
        if self.closed.done():
            raise LinkError(f"link closed: {self.closed.result()}")
        waiter: asyncio.Future[Pdu] = asyncio.get_running_loop().create_future()
        self._pending[pdu.sequence] = waiter
        try:
            await self._send(pdu)
            return await asyncio.wait_for(asyncio.shield(waiter), timeout or self.timeout)
        except TimeoutError:
            raise LinkError(f"no answer to {pdu.command} within "
                            f"{timeout or self.timeout:g} s") from None
        finally:
            self._pending.pop(pdu.sequence, None)

    async def respond(self, request: Pdu, command: str, status: int = ESME_ROK,
                      **fields: Any) -> None:
        pdu = self.make(command, **fields)
        # Set after: smpplib's constructor keeps its own sequence and status over these.
        pdu.sequence, pdu.status = request.sequence, status
        with contextlib.suppress(LinkError):
            await self._send(pdu)

    async def _send(self, pdu: Pdu) -> None:
        if self._writer is None or self.closed.done():
            raise LinkError("link closed")
        try:
            self._writer.write(pdu.generate())
            await self._writer.drain()
        except (OSError, RuntimeError) as exc:
            await self.close(f"write failed: {exc}")
            raise LinkError("link closed while sending") from None

    async def _read_loop(self) -> None:
        assert self._reader is not None
        reason = "closed by the SMSC"
        try:
            while True:
                header = await self._reader.readexactly(16)
                length = HEADER.unpack(header)[0]
                if length < 16 or length > MAX_PDU:
                    reason = f"bad PDU length {length}"
                    break
                body = await self._reader.readexactly(length - 16)
                self._last_seen = time.monotonic()
                try:
                    pdu = smpplib.smpp.parse_pdu(header + body, client=self._seq,
                                                 allow_unknown_opt_params=True)
                except (smpplib.exceptions.UnknownCommandError, struct.error,
                        ValueError, KeyError) as exc:
                    _, command_id, _, sequence = HEADER.unpack(header)
                    if not command_id & 0x80000000:
                        nack = self.make("generic_nack")
                        nack.sequence, nack.status = sequence, 0x03
                        with contextlib.suppress(LinkError):
                            await self._send(nack)
                    del exc
                    continue
                await self._dispatch(pdu)
                if pdu.command == "unbind":
                    reason = "unbound by the SMSC"
                    break
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            reason = "closed"
            raise
        finally:
            await self._closed(reason)

    async def _dispatch(self, pdu: Pdu) -> None:
        if pdu.is_response() or pdu.command == "generic_nack":
            waiter = self._pending.get(pdu.sequence)
            if waiter is not None and not waiter.done():
                waiter.set_result(pdu)
            return
        if pdu.command == "enquire_link":
            await self.respond(pdu, "enquire_link_resp")
        elif pdu.command == "unbind":
            self.bound = False
            await self.respond(pdu, "unbind_resp")
        else:
            task: asyncio.Task[None] = asyncio.create_task(self._on_request(self, pdu))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _enquire_loop(self) -> None:
        while not self.closed.done():
            idle = time.monotonic() - self._last_seen
            if idle < self._enquire_every:
                await asyncio.sleep(self._enquire_every - idle)
                continue
            try:
                await self.request(self.make("enquire_link"))
            except LinkError:
                await self.close("enquire_link not answered")
                return
            self._last_seen = time.monotonic()

    async def unbind(self) -> None:
        if self.bound and not self.closed.done():
            self.bound = False
            with contextlib.suppress(LinkError):
                await self.request(self.make("unbind"), timeout=min(self.timeout, 2.0))
        await self.close("unbound")

    async def close(self, reason: str) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        await self._closed(reason)

    async def _closed(self, reason: str) -> None:
        self.bound = False
        if not self.closed.done():
            self.closed.set_result(reason)
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(LinkError(f"link lost: {reason}"))
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()


class Pace:
    """A throughput cap (messages a second, 0: none) that halves for a while when the
    SMSC says slow down."""

    def __init__(self, rate: float, slow_seconds: float = 5.0) -> None:
        self.rate = rate
        self._next = 0.0
        self._slow_until = 0.0
        self._slow_seconds = slow_seconds

    def slow_down(self) -> None:
        self._slow_until = time.monotonic() + self._slow_seconds

    async def wait(self) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        rate = self.rate / 2 if now < self._slow_until else self.rate
        at = max(now, self._next)
        self._next = at + 1.0 / rate
        if at > now:
            await asyncio.sleep(at - now)


class Window:
    """submit_sm in flight at once: shrinks by half on a slow-down answer, grows back by
    one with each answer that is not."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.limit = size
        self.used = 0
        self._free = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._free:
            await self._free.wait_for(lambda: self.used < self.limit)
            self.used += 1

    async def release(self, *, slow_down: bool = False) -> None:
        async with self._free:
            self.used -= 1
            if slow_down:
                self.limit = max(1, self.limit // 2)
            elif self.limit < self.size:
                self.limit += 1
            self._free.notify_all()
