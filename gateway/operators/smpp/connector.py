"""The SMPP 3.4 operator: the gateway's `Operator` (gateway.operators.base) on an SMSC.

- Binds: `binds` transceivers (or transmitter + receiver pairs), each kept up by its own
  task: after a drop, an unbind by the SMSC or a refused bind it binds again after a delay
  that doubles from `reconnect_first_seconds` up to `reconnect_max_seconds`, stretched
  by a random share of up to `reconnect_jitter`.
- `submit`: each part is a submit_sm through the next bound transmitter, within its window
  and the throughput caps. A message is taken when every part is (one message_id per
  part, in order); throttled or queue full slows the bind down and answers `Later`; a
  final refusal answers `Refused` with the mapped ptt (errors.py). No answer in time, or
  the link dropping with submits in flight, answers `Later`: the message is sent again
  once a link is up. At least once: a submit that reached the SMSC but whose answer was
  lost is sent twice, as in every SMPP gateway; so may the parts of a long message
  answered before another part could not be sent (a later part told to try later is
  first tried again, PART_RETRIES times).
- Receipts (deliver_sm or data_sm with the receipt flag) become reports naming the part's
  message_id; the deliver_sm is answered only after the report is committed (the sink's
  acknowledgement), so a crash loses none: the SMSC sends it again. A report not
  committed (the gateway stopping) is answered ESME_RX_T_APPN, a temporary error the SMSC
  retries.
- Inbound messages (deliver_sm without the flag) go to the sink's `inbound`, decoded, the
  parts of long ones each on its own (the gateway stores each part and reassembles), with
  a reference that is a digest of the PDU (pdus.fingerprint: the same when the SMSC sends
  it again) and their numbers as TON says (pdus.inbound_number); each deliver_sm is
  answered only once the sink acknowledged it, so a crash loses no part.
- `link_status`: up while a transmitter is bound; else the last reason (wrong password,
  refused connection...).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import structlog

from gateway import ptt
from gateway.clock import Clock
from gateway.config import ConfigError, SmppSettings
from gateway.metrics import Metrics
from gateway.operators.base import (
    Expiry,
    Inbound,
    Later,
    LinkStatus,
    OperatorSink,
    PartOf,
    Refused,
    SubmitResult,
    Taken,
)
from gateway.operators.smpp import pdus
from gateway.operators.smpp.errors import (
    DEFAULT_STATS,
    ESME_RINVBNDSTS,
    ESME_ROK,
    ESME_RX_T_APPN,
    SLOW_DOWN,
    TRY_LATER,
    ErrorTable,
    status_name,
)
from gateway.operators.smpp.session import LinkError, Pace, Pdu, Session, Window, tls_context
from gateway.records import OperatorReport, OutgoingMessage

log = structlog.get_logger("gateway.operators.smpp")

# How long a message waits before it is tried again after a "try later" answer.
RETRY_SECONDS = 1.0
ACCEPTED = 3
LINK_DOWN_RETRY_SECONDS = 5.0
# Times a part after the first is tried again, a second apart, when the SMSC says to try
# later (throttled, queue full...; not a lost link): see _submit_one.
PART_RETRIES = 5
# A long message refused after some of its parts were taken ends "undelivered", billed,
# when its refusal's ptt is not billed: those parts went out (see _refused_after_parts).
PARTS_SENT_REFUSAL = 5
# One submit call carries at most this many seconds of traffic at the throughput caps (see
# `batch_hint`).
BATCH_SECONDS = 1.0
# The validity assumed when validity_hours is 0 (the SMSC's default, which it does not say).
DEFAULT_VALIDITY_HOURS = 48.0


def password(settings: SmppSettings) -> str:
    """The password: the setting (or its environment variable), else password_file."""
    if settings.password or not settings.password_file:
        return settings.password
    try:
        lines = Path(settings.password_file).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"setting operator.smpp.password_file: cannot read "
                          f"{settings.password_file}: {exc.strerror or exc}") from None
    secret = lines[0].strip() if lines else ""
    # The same bounds as the setting's (SMPP 3.4: at most 8 printable ASCII characters);
    # the message never quotes the password.
    if len(secret) > 8 or not all(" " <= c <= "~" for c in secret):
        raise ConfigError(f"setting operator.smpp.password_file: the password in "
                          f"{settings.password_file} is not at most 8 printable ASCII "
                          "characters (SMPP 3.4 caps it)")
    return secret


def backoff(attempt: int, settings: SmppSettings, rng: random.Random) -> float:
    """Delay before reconnection attempt `attempt` (1, 2, ...)."""
    delay: float = min(settings.reconnect_max_seconds,
                       settings.reconnect_first_seconds * 2.0 ** min(attempt - 1, 30))
    return delay * (1 + rng.uniform(0, settings.reconnect_jitter))


def is_alphanumeric(sender: str) -> bool:
    return not sender.lstrip("+").isdigit()


def validity_period(hours: float) -> str:
    """Relative time format of SMPP 3.4 (YYMMDDhhmmss000R)."""
    if hours <= 0:
        return ""
    delta = timedelta(hours=hours)
    days, seconds = delta.days, delta.seconds
    years, days = divmod(days, 365)
    months, days = divmod(days, 30)
    return (f"{years:02d}{months:02d}{days:02d}{seconds // 3600:02d}"
            f"{seconds // 60 % 60:02d}{seconds % 60:02d}000R")


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1").rstrip("\x00")
    return "" if value is None else str(value)


class _Bind:
    """One bind kept up: a transceiver, or a transmitter and a receiver."""

    def __init__(self, index: int, window: int, rate: float) -> None:
        self.index = index
        self.sessions: list[Session] = []
        self.window = Window(window)
        self.pace = Pace(rate)
        self.reason = "connecting"

    @property
    def transmitter(self) -> Session | None:
        for session in self.sessions:
            if session.transmits and session.bound:
                return session
        return None


class SmppOperator:
    def __init__(self, settings: SmppSettings, clock: Clock,
                 metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._clock = clock
        self._metrics = metrics or Metrics()
        self._metrics.smpp_binds_up.set_function(
            lambda: sum(1 for bind in self._binds if bind.transmitter is not None))
        self._metrics.smpp_window_in_use.set_function(lambda: self.window_in_use)
        self._errors = ErrorTable.from_settings(settings.errors)
        self._password = password(settings)
        self._tls = tls_context(settings.tls_ca_file) if settings.tls else None
        self._binds = [_Bind(i, settings.window, settings.throughput_per_bind)
                       for i in range(settings.binds)]
        self._pace = Pace(settings.throughput_total)
        self._turn = itertools.count()
        self._refs = itertools.count(random.randrange(0x10000))
        self._rng = random.Random()
        self._sink: OperatorSink | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._bound_event = asyncio.Event()
        self._stopping = False
        # Metrics, read by tests and /metrics.
        self.throttled = 0
        self.receipts: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self, sink: OperatorSink) -> None:
        self._sink = sink
        self._tasks = [asyncio.create_task(self._keep_up(bind), name=f"smpp-bind-{bind.index}")
                       for bind in self._binds]

    async def stop(self) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        for bind in self._binds:
            for session in bind.sessions:
                await session.unbind()

    def link_status(self) -> LinkStatus:
        up = sum(1 for bind in self._binds if bind.transmitter is not None)
        if up:
            return LinkStatus(True, f"{up} of {len(self._binds)} binds up")
        reasons = sorted({bind.reason for bind in self._binds})
        return LinkStatus(False, "; ".join(reasons))

    @property
    def window_in_use(self) -> int:
        return sum(bind.window.used for bind in self._binds)

    @property
    def window_limit(self) -> int:
        """submit_sm allowed in flight now, in all: less than the setting after slow-downs."""
        return sum(bind.window.limit for bind in self._binds)

    @property
    def batch_hint(self) -> int:
        """Most messages a submit call should carry (gateway.operators.base): every bind's
        window (what can be in flight at once), and no more than BATCH_SECONDS of traffic
        at the throughput caps, so that each call is answered, and its receipts can be
        applied, within about a second."""
        s = self._settings
        hint = s.window * s.binds
        caps = [cap for cap in (s.throughput_total, s.throughput_per_bind * s.binds)
                if cap > 0]
        if caps:
            hint = min(hint, max(1, int(min(caps) * BATCH_SECONDS)))
        return hint

    @property
    def expiry(self) -> Expiry:
        """A message still without a final receipt receipt_grace_hours after its validity
        period ended will get none: expired (ptt 8) when every final state is receipted
        (registered_delivery 1), else its final state is unknown (ptt 6)."""
        s = self._settings
        hours = (s.validity_hours or DEFAULT_VALIDITY_HOURS) + s.receipt_grace_hours
        if s.registered_delivery & 0x03 == 1:
            return Expiry(hours * 3600.0, 8, "expired: no receipt within the validity period")
        return Expiry(hours * 3600.0, 6, "no final receipt within the validity period")

    async def wait_bound(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._bound_event.wait(), timeout)
        return self._bound_event.is_set()

    def _modes(self) -> list[str]:
        if self._settings.bind_mode == "transceiver":
            return ["transceiver"]
        return ["transmitter", "receiver"]

    def _session(self, bind: _Bind, mode: str) -> Session:
        s = self._settings
        return Session(host=s.host, port=s.port, tls=self._tls, mode=mode,
                       system_id=s.system_id, password=self._password,
                       system_type=s.system_type, timeout=s.response_timeout_seconds,
                       enquire_link=s.enquire_link_seconds, on_request=self._on_request,
                       name=f"-{bind.index}-{mode}")

    async def _keep_up(self, bind: _Bind) -> None:
        attempt = 0
        while not self._stopping:
            sessions = [self._session(bind, mode) for mode in self._modes()]
            try:
                for session in sessions:
                    await session.open()
                    bind.sessions.append(session)
            except LinkError as exc:
                bind.reason = exc.reason
                for session in bind.sessions:
                    await session.close("bind failed")
                bind.sessions = []
                attempt += 1
                delay = backoff(attempt, self._settings, self._rng)
                log.warning("smpp_bind_failed", bind=bind.index, reason=exc.reason,
                            retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            bound_at = asyncio.get_running_loop().time()
            bind.reason = "bound"
            self._bound_event.set()
            log.info("smpp_bound", bind=bind.index, host=self._settings.host,
                     mode=self._settings.bind_mode)
            done, _ = await asyncio.wait([session.closed for session in sessions],
                                         return_when=asyncio.FIRST_COMPLETED)
            reason = next(iter(done)).result()
            for session in sessions:
                await session.close(reason)
            bind.sessions = []
            bind.reason = f"link down: {reason}"
            if not any(b.transmitter for b in self._binds):
                self._bound_event.clear()
            if self._stopping:
                return
            # The backoff starts over only after a link that held: an SMSC that accepts
            # the bind and drops it at once must not be rebound every first delay, forever.
            if asyncio.get_running_loop().time() - bound_at >= \
                    self._settings.reconnect_max_seconds:
                attempt = 0
            attempt += 1
            delay = backoff(attempt, self._settings, self._rng)
            log.warning("smpp_link_down", bind=bind.index, reason=reason,
                        retry_in=round(delay, 2))
            await asyncio.sleep(delay)

    # -- submit ------------------------------------------------------------------------

    async def submit(self, messages: Sequence[OutgoingMessage]) -> Sequence[SubmitResult]:
        if not any(bind.transmitter for bind in self._binds):
            reason = self.link_status().detail or "link down"
            return [Later(m.id, LINK_DOWN_RETRY_SECONDS, reason) for m in messages]
        return await asyncio.gather(*(self._submit_guarded(m) for m in messages))

    async def _submit_guarded(self, message: OutgoingMessage) -> SubmitResult:
        """One message's answer, whatever goes wrong with it: had `submit` raised, the
        dispatcher would take the whole batch as not taken, and send the others again."""
        try:
            return await self._submit_one(message)
        except Exception as exc:  # its type is logged; its text may quote the message
            log.error("smpp_submit_failed", message_id=message.id, error=type(exc).__name__)
            return Later(message.id, RETRY_SECONDS, f"submit failed: {type(exc).__name__}")

    async def resume(self, messages: Sequence[OutgoingMessage]) -> None:
        """Nothing to do: the SMSC sends the receipts still pending once bound again."""

    async def _submit_one(self, message: OutgoingMessage) -> SubmitResult:
        s = self._settings
        parts = pdus.build_parts(message.body, message.coding, message.klass,
                                 gsm_data_coding=s.gsm_data_coding,
                                 long_messages=s.long_messages, reference=next(self._refs))
        alpha = is_alphanumeric(message.sender)
        fields = {
            "service_type": s.service_type,
            "source_addr_ton": s.source_ton_alphanumeric if alpha else s.source_ton_numeric,
            "source_addr_npi": s.source_npi_alphanumeric if alpha else s.source_npi_numeric,
            "source_addr": message.sender.lstrip("+"),
            "dest_addr_ton": s.dest_ton, "dest_addr_npi": s.dest_npi,
            "destination_addr": message.receiver.lstrip("+"),
            "registered_delivery": s.registered_delivery,
            "validity_period": validity_period(s.validity_hours),
        }
        references: list[str] = []
        for part in parts:
            result = await self._submit_part(message.id, part, fields)
            # A later part told to wait is retried here a few times: answering `Later`
            # would send the parts already taken again (and the handset would get them
            # twice).
            for _ in range(PART_RETRIES if references else 0):
                if not isinstance(result, Later) or \
                        not result.reason.startswith(("throttled", "try later")):
                    break
                await asyncio.sleep(result.retry_after)
                result = await self._submit_part(message.id, part, fields)
            if isinstance(result, str):
                references.append(result)
            elif references and isinstance(result, Refused):
                return self._refused_after_parts(result, len(references), len(parts))
            else:
                return result
        if len(references) < message.parts:
            # One message_payload for all parts: its id stands for each of them.
            references += [f"{references[0]}#{n}" for n in range(2, message.parts + 1)]
        if self._sink is not None:
            # The SMSC took it: "accepted by the operator" (ptt 3) in its history, as the
            # simulator reports it. Not awaited: nothing sends it again. A receipt that came
            # first (a fast SMSC) is final already, and this is then ignored.
            self._sink.reports([OperatorReport.from_ptt(references[0], ACCEPTED,
                                                        self._clock.now())])
        return Taken(message.id, tuple(references))

    def _refused_after_parts(self, refused: Refused, sent: int, total: int) -> Refused:
        """A later part refused for good: the parts taken before it went out (the handset
        may get them), so the message is billed, at its mapped ptt when that one is."""
        note = f"{refused.note}; {sent} of {total} parts sent"
        known = ptt.lookup(refused.ptt)
        code = refused.ptt if known is not None and known.billed else PARTS_SENT_REFUSAL
        return Refused(refused.message_id, code, note)

    def _next_bind(self) -> _Bind | None:
        for _ in range(len(self._binds)):
            bind = self._binds[next(self._turn) % len(self._binds)]
            if bind.transmitter is not None:
                return bind
        return None

    async def _submit_part(self, message_id: int, part: pdus.Part,
                           fields: dict[str, object]) -> str | SubmitResult:
        bind = self._next_bind()
        if bind is None:
            return Later(message_id, LINK_DOWN_RETRY_SECONDS, "link down")
        await bind.window.acquire()
        slow = False
        try:
            await self._pace.wait()
            await bind.pace.wait()
            session = bind.transmitter
            if session is None:
                return Later(message_id, LINK_DOWN_RETRY_SECONDS, "link down")
            pdu = session.make("submit_sm", esm_class=part.esm_class,
                               data_coding=part.data_coding,
                               short_message=part.short_message, **fields, **part.tlvs)
            started = time.perf_counter()
            try:
                resp = await session.request(pdu)
            except LinkError as exc:
                return Later(message_id, RETRY_SECONDS, exc.reason)
            self._metrics.smpp_submit_seconds.observe(time.perf_counter() - started)
            status = resp.status
            if resp.command == "generic_nack" and status == ESME_ROK:
                status = 0x08
            if status == ESME_ROK:
                return pdus.normalize_reference(_text(resp.message_id),
                                                self._settings.receipt_id)
            if status in SLOW_DOWN:
                slow = True
                self.throttled += 1
                self._metrics.smpp_throttled.inc()
                bind.pace.slow_down()
                self._pace.slow_down()
            if status == ESME_RINVBNDSTS:
                # The SMSC no longer counts us as bound: only a new bind helps. Closing
                # the session makes the bind's keeper bind again (with its backoff).
                await session.close("not bound (ESME_RINVBNDSTS)")
            if status in TRY_LATER:
                return Later(message_id, RETRY_SECONDS,
                             f"{'throttled' if slow else 'try later'} ({status_name(status)})")
            return Refused(message_id, self._errors.refusal(status), status_name(status))
        finally:
            await bind.window.release(slow_down=slow)

    # -- what the SMSC sends -----------------------------------------------------------

    async def _on_request(self, session: Session, pdu: Pdu) -> None:
        answer = "deliver_sm_resp" if pdu.command == "deliver_sm" else "data_sm_resp"
        if pdu.command not in ("deliver_sm", "data_sm"):
            await session.respond(pdu, "generic_nack", status=0x03)
            return
        esm_class = int(pdu.esm_class or 0)
        status = ESME_ROK
        try:
            if pdus.is_receipt(esm_class):
                status = await self._receipt(pdu)
            else:
                status = await self._inbound(pdu, esm_class)
        except Exception as exc:  # answered with an error: the SMSC sends it again
            log.error("smpp_request_failed", command=pdu.command, error=str(exc))
            status = ESME_RX_T_APPN
        await session.respond(pdu, answer, status)

    def _body(self, pdu: Pdu) -> bytes:
        payload = getattr(pdu, "message_payload", None)
        data = getattr(pdu, "short_message", None) or payload or b""  # data_sm: payload only
        return data if isinstance(data, bytes) else str(data).encode("latin-1")

    async def _receipt(self, pdu: Pdu) -> int:
        assert self._sink is not None
        text = self._body(pdu).decode("latin-1", "replace")
        receipted = _text(getattr(pdu, "receipted_message_id", None)) or None
        state = getattr(pdu, "message_state", None)
        receipt = pdus.parse_receipt(text, receipted_message_id=receipted,
                                     message_state=state, receipt_id=self._settings.receipt_id)
        if receipt is None:
            # Without its `text:` field: the first characters of the message (a code).
            log.warning("smpp_receipt_without_id",
                        text=text.split("text:", 1)[0].split("Text:", 1)[0][:80])
            return ESME_ROK  # cannot be matched ever: answered, not redelivered for ever
        self.receipts[receipt.stat] = self.receipts.get(receipt.stat, 0) + 1
        self._metrics.smpp_receipts.labels(
            receipt.stat if receipt.stat in DEFAULT_STATS else "OTHER").inc()
        code = self._errors.receipt(receipt.stat, receipt.err)
        note = f"{receipt.stat}" + (f" err:{receipt.err}" if receipt.err else "")
        report = OperatorReport.from_ptt(receipt.reference, code, self._clock.now(), note)
        try:
            await self._sink.reports([report])
        except asyncio.CancelledError:  # not committed (stopping): the SMSC sends it again
            return ESME_RX_T_APPN
        return ESME_ROK

    async def _inbound(self, pdu: Pdu, esm_class: int) -> int:
        assert self._sink is not None
        data = self._body(pdu)
        dc = int(getattr(pdu, "data_coding", 0) or 0)
        sender = pdus.inbound_number(_text(pdu.source_addr),
                                     int(getattr(pdu, "source_addr_ton", 0) or 0))
        receiver = pdus.inbound_number(_text(pdu.destination_addr),
                                       int(getattr(pdu, "dest_addr_ton", 0) or 0))
        concat: pdus.Concatenation | None = None
        if esm_class & pdus.ESM_UDHI:
            concat, data = pdus.split_udh(data)
        elif getattr(pdu, "sar_total_segments", None):
            concat = pdus.Concatenation(int(pdu.sar_msg_ref_num or 0),
                                        int(pdu.sar_total_segments),
                                        int(pdu.sar_segment_seqnum or 1))
        part = PartOf(concat.reference, concat.total, concat.seq) \
            if concat is not None and concat.total > 1 else None
        reference = pdus.fingerprint({name: getattr(pdu, name, None)
                                      for name in pdus.FINGERPRINT_FIELDS})
        try:
            await self._sink.inbound([Inbound(reference, sender, receiver,
                                              pdus.decode_text(data, dc), self._clock.now(),
                                              part)])
        except asyncio.CancelledError:
            return ESME_RX_T_APPN
        return ESME_ROK


async def check(settings: SmppSettings, timeout: float | None = None) -> tuple[bool, str]:
    """Bind once with the settings and unbind: (bound, one line saying what happened)."""
    try:
        pwd = password(settings)
    except ConfigError as exc:
        return False, str(exc)

    async def no_request(session: Session, pdu: Pdu) -> None:
        await session.respond(pdu, "generic_nack", status=0x03)

    mode = "transceiver" if settings.bind_mode == "transceiver" else "transmitter"
    try:
        tls = tls_context(settings.tls_ca_file) if settings.tls else None
    except ConfigError as exc:
        return False, f"TLS failure: {exc}"
    session = Session(host=settings.host, port=settings.port, tls=tls,
                      mode=mode, system_id=settings.system_id, password=pwd,
                      system_type=settings.system_type,
                      timeout=timeout or settings.response_timeout_seconds,
                      enquire_link=settings.enquire_link_seconds, on_request=no_request)
    started = time.monotonic()
    try:
        await session.open()
    except LinkError as exc:
        return False, exc.reason
    took = time.monotonic() - started
    await session.unbind()
    return True, (f"bound as {settings.system_id!r} ({mode}) to {settings.host}:"
                  f"{settings.port}{' over TLS' if settings.tls else ''} in {took * 1000:.0f} ms")


