"""A scriptable SMSC on loopback, for the SMPP connector's tests.

Built on another SMPP implementation than the connector (smpplib): smpp34's codec (Rust)
decodes submit_sm and encodes deliver_sm; the few PDUs it has no class for (binds,
responses, enquire_link, unbind) are framed here from their header and C-strings. So the
two sides are not wrong the same way.

Scripting: `password` (a wrong one is refused with ESME_RINVPASWD), `answer` (a function
of each submit_sm giving a command_status, or a message_id for OK), `delay` (seconds
before answering; `delay_for`: a function of each submit_sm giving them), `hold` (no
answer at all), `drop()` (close every connection, submits in flight), `unbind()`,
`receipt(...)` and `inbound(...)` (deliver_sm to the gateway; they return the
command_status of its deliver_sm_resp), `auto_receipt` (a stat sent for every
part after its answer, or before it with `receipt_first`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import smpp34

HEADER = struct.Struct(">LLLL")
BIND_TX, BIND_RX, BIND_TRX = 0x02, 0x01, 0x09
SUBMIT_SM, DELIVER_SM, UNBIND, ENQUIRE_LINK, GENERIC_NACK = 0x04, 0x05, 0x06, 0x15, 0x80000000
DATA_SM = 0x103
RESP = 0x80000000


def frame(command_id: int, status: int, sequence: int, body: bytes = b"") -> bytes:
    return HEADER.pack(16 + len(body), command_id, status, sequence) + body


@dataclass
class Connection:
    writer: asyncio.StreamWriter
    mode: int = 0
    system_id: str = ""
    pending: dict[int, asyncio.Future[int]] = field(default_factory=dict)
    enquire_links: int = 0

    @property
    def receives(self) -> bool:
        return self.mode in (BIND_RX, BIND_TRX)


@dataclass
class Submitted:
    pdu: smpp34.SubmitSm
    message_id: str
    status: int
    at: float = 0.0  # loop time it arrived


class Smsc:
    def __init__(self, *, system_id: str = "gateway", password: str = "secret") -> None:
        self.system_id = system_id
        self.password = password
        self.answer: Callable[[smpp34.SubmitSm], int | str] | None = None
        self.delay = 0.0
        # Seconds before answering each submit_sm, when set (over `delay`).
        self.delay_for: Callable[[smpp34.SubmitSm], float] | None = None
        self.hold = False
        # Accept each bind, then close the connection at once (a flapping SMSC).
        self.drop_after_bind = False
        # What was written, in order (submit_sm_resp, deliver_sm): the tests' proof of order.
        self.wire: list[str] = []
        self.auto_receipt: str | None = None
        self.receipt_first = False
        # An automatic receipt after the answer comes this much later (a real SMSC: seconds).
        self.receipt_delay = 0.05
        self.receipt_decimal = False  # the receipt's text id in decimal (message_ids hex)
        # Receipts sent and not yet acknowledged (message_id -> stat): sent again at each
        # bind, as an SMSC redelivers what was not answered.
        self.pending_receipts: dict[str, str] = {}
        self.connections: list[Connection] = []
        self.submitted: list[Submitted] = []
        self.binds = 0
        self.receipts_acknowledged = 0
        # Seconds each deliver_sm waited for its answer (a real SMSC gives up after some).
        self.deliver_waits: list[float] = []
        # False: keep no submit_sm (a benchmark's millions), only count them.
        self.keep = True
        self.submit_count = 0
        # submit_sm received and not answered yet, now and at most.
        self.in_flight = 0
        self.max_in_flight = 0
        self.bind_refusals = 0
        self._ids = itertools.count(0x1000)
        self._seq = itertools.count(1)
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self, port: int = 0, *, tls: ssl.SSLContext | None = None) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()

    def drop(self) -> None:
        for conn in self.connections:
            conn.writer.close()
        self.connections = []

    @property
    def bound(self) -> list[Connection]:
        return [c for c in self.connections if c.mode]

    async def unbind(self) -> None:
        for conn in self.bound:
            conn.writer.write(frame(UNBIND, 0, next(self._seq)))

    # -- to the gateway ----------------------------------------------------------------

    async def deliver(self, pdu: smpp34.DeliverSm | None = None, **fields: object) -> int:
        """Send a deliver_sm; the command_status of the gateway's answer."""
        conn = next(c for c in self.connections if c.receives)
        sequence = next(self._seq)
        if pdu is None:
            short = fields.pop("short_message", b"")
            src = str(fields.pop("source_addr", ""))
            dst = str(fields.pop("destination_addr", ""))
            pdu = smpp34.DeliverSm(src, dst, short, sequence_number=sequence, **fields)
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        conn.pending[sequence] = answer
        data = pdu.encode()
        conn.writer.write(data[:12] + struct.pack(">L", sequence) + data[16:])
        self.wire.append("deliver_sm")
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        status = await asyncio.wait_for(answer, 10)
        self.deliver_waits.append(loop.time() - sent_at)
        return status

    async def receipt(self, message_id: str, stat: str, *, err: str = "000",
                      tlv: bool = False, text_id: str | None = None) -> int:
        tlvs = [smpp34.Tlv(smpp34.TLV_RECEIPTED_MESSAGE_ID, message_id.encode() + b"\0")] \
            if tlv else []
        shown = text_id if text_id is not None else message_id
        text = (f"id:{shown} sub:001 dlvrd:{'001' if stat == 'DELIVRD' else '000'} "
                f"submit date:2612070800 done date:2612070801 stat:{stat} err:{err} text:")
        return await self.deliver(source_addr="33612345678", destination_addr="SHOP",
                                  short_message=text.encode(), esm_class=0x04, tlvs=tlvs)

    async def data_sm_receipt(self, message_id: str, message_state: int) -> int:
        """A receipt as data_sm (no text: receipted_message_id and message_state TLVs).
        smpp34 has no data_sm class: framed here from SMPP 3.4's 4.7 layout."""
        conn = next(c for c in self.connections if c.receives)
        sequence = next(self._seq)
        body = (b"\0" + b"\x01\x01" + b"33612345678\0" + b"\x05\x00" + b"SHOP\0"
                + bytes([0x04, 0, 0])  # esm_class: receipt, registered_delivery, data_coding
                + struct.pack(">HH", 0x001E, len(message_id) + 1) + message_id.encode() + b"\0"
                + struct.pack(">HHB", 0x0427, 1, message_state))
        answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        conn.pending[sequence] = answer
        conn.writer.write(frame(DATA_SM, 0, sequence, body))
        return await asyncio.wait_for(answer, 10)

    async def inbound(self, sender: str, receiver: str, short_message: bytes, *,
                      data_coding: int = 0, esm_class: int = 0, **fields: Any) -> int:
        """A message from a handset; `fields`: other deliver_sm fields (source_addr_ton,
        tlvs...)."""
        return await self.deliver(source_addr=sender, destination_addr=receiver,
                                  short_message=short_message, data_coding=data_coding,
                                  esm_class=esm_class, **fields)

    # -- from the gateway --------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Connection(writer)
        self.connections.append(conn)
        try:
            while True:
                header = await reader.readexactly(16)
                length, command_id, status, sequence = HEADER.unpack(header)
                body = await reader.readexactly(length - 16)
                if command_id & RESP:
                    waiter = conn.pending.pop(sequence, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(status)
                    continue
                if command_id in (BIND_TX, BIND_RX, BIND_TRX):
                    self._bind(conn, command_id, sequence, body)
                elif command_id == ENQUIRE_LINK:
                    conn.enquire_links += 1
                    writer.write(frame(ENQUIRE_LINK | RESP, 0, sequence))
                elif command_id == UNBIND:
                    writer.write(frame(UNBIND | RESP, 0, sequence))
                    break
                elif command_id == SUBMIT_SM:
                    pdu = smpp34.decode(header + body)
                    assert isinstance(pdu, smpp34.SubmitSm)
                    task = asyncio.create_task(self._submit(conn, pdu, sequence))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                else:
                    writer.write(frame(GENERIC_NACK, 0x03, sequence))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            if conn in self.connections:
                self.connections.remove(conn)
            writer.close()

    def _bind(self, conn: Connection, command_id: int, sequence: int, body: bytes) -> None:
        system_id, password, *_ = body.split(b"\0", 2)
        if system_id.decode() != self.system_id or password.decode() != self.password:
            self.bind_refusals += 1
            status = 0x0F if system_id.decode() != self.system_id else 0x0E
            conn.writer.write(frame(command_id | RESP, status, sequence, b"SMSC\0"))
            return
        conn.mode, conn.system_id = command_id, system_id.decode()
        self.binds += 1
        conn.writer.write(frame(command_id | RESP, 0, sequence, b"SMSC\0"))
        if self.drop_after_bind:
            conn.writer.close()
            return
        if conn.receives:
            self._redeliver()

    async def _submit(self, conn: Connection, pdu: smpp34.SubmitSm, sequence: int) -> None:
        answer = self.answer(pdu) if self.answer is not None else 0
        status, message_id = (answer, "") if isinstance(answer, int) else (0, answer)
        if status == 0 and not message_id:
            message_id = format(next(self._ids), "x")
        self.submit_count += 1
        if self.keep:
            self.submitted.append(Submitted(pdu, message_id, status,
                                            asyncio.get_running_loop().time()))
        if self.hold:
            return
        if status == 0 and self.auto_receipt and self.receipt_first:
            await self._auto_receipt(message_id)
            await asyncio.sleep(0)  # the receipt's task writes its deliver_sm first
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            delay = self.delay_for(pdu) if self.delay_for is not None else self.delay
            if delay:
                await asyncio.sleep(delay)
            body = (message_id.encode() + b"\0") if status == 0 else b"\0"
            with contextlib.suppress(Exception):
                conn.writer.write(frame(SUBMIT_SM | RESP, status, sequence, body))
                self.wire.append("submit_sm_resp")
        finally:
            self.in_flight -= 1
        if status == 0 and self.auto_receipt and not self.receipt_first:
            # Owed from the answer on, even if the link drops meanwhile.
            self.pending_receipts[message_id] = self.auto_receipt
            await asyncio.sleep(self.receipt_delay)
            await self._auto_receipt(message_id)

    def owe_receipt(self, message_id: str, stat: str) -> None:
        """Send a receipt now, and again at each bind until the gateway acknowledges it."""
        self.pending_receipts[message_id] = stat
        self._spawn(self._send_pending(message_id, stat))

    async def _auto_receipt(self, message_id: str) -> None:
        assert self.auto_receipt is not None
        self.pending_receipts[message_id] = self.auto_receipt
        self._spawn(self._send_pending(message_id, self.auto_receipt))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_pending(self, message_id: str, stat: str) -> None:
        text_id = str(int(message_id, 16)) if self.receipt_decimal else None
        with contextlib.suppress(Exception):
            if await self.receipt(message_id, stat, text_id=text_id) == 0:
                self.pending_receipts.pop(message_id, None)
                self.receipts_acknowledged += 1

    def _redeliver(self) -> None:
        for message_id, stat in list(self.pending_receipts.items()):
            self._spawn(self._send_pending(message_id, stat))
