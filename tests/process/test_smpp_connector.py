"""The SMPP connector against the test SMSC on loopback (tests/smsc.py, another SMPP
implementation): binds, coding, answers, receipts, inbound, link status, `check`."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.clock import SystemClock
from gateway.config import SmppSettings
from gateway.encoding import Coding, segment
from gateway.operators.base import Acknowledgement, Inbound, Later, Refused, Taken
from gateway.operators.smpp.connector import SmppOperator, check
from gateway.records import OperatorReport, OutgoingMessage
from tests.cli_in_process import invoke
from tests.conftest import eventually
from tests.process.test_tls import self_signed
from tests.smsc import Smsc

ACCEPTANCE = "Accepted by the operator"


class Sink:
    """Records what the connector hands over; acknowledges at once unless `hold`.
    `receipts` leaves out the acceptance reported with each message taken."""

    def __init__(self) -> None:
        self.reports: list[OperatorReport] = []
        self.inbounds: list[Inbound] = []
        self.accepted: list[OperatorReport] = []
        self.hold = False
        self.held: list[Acknowledgement] = []

    def _ack(self) -> Acknowledgement:
        done: Acknowledgement = asyncio.get_running_loop().create_future()
        if self.hold:
            self.held.append(done)
        else:
            done.set_result(None)
        return done

    def reports_(self, reports: Sequence[OperatorReport]) -> Acknowledgement:
        receipts = [r for r in reports if r.note != ACCEPTANCE]
        self.reports.extend(receipts)
        self.accepted.extend(r for r in reports if r.note == ACCEPTANCE)
        return self._ack() if receipts else _done()

    def inbound(self, messages: Sequence[Inbound]) -> Acknowledgement:
        self.inbounds.extend(messages)
        return self._ack()


def _done() -> Acknowledgement:
    done: Acknowledgement = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


Sink.reports = Sink.reports_  # type: ignore[assignment]  # the attribute holds the list


class _SinkAdapter:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def reports(self, reports: Sequence[OperatorReport]) -> Acknowledgement:
        return self.sink.reports_(reports)

    def inbound(self, messages: Sequence[Inbound]) -> Acknowledgement:
        return self.sink.inbound(messages)


def settings(smsc: Smsc, **changes: Any) -> SmppSettings:
    values: dict[str, Any] = dict(host="127.0.0.1", port=smsc.port, system_id="gateway",
                                  password="secret", response_timeout_seconds=2.0,
                                  reconnect_first_seconds=0.05, reconnect_max_seconds=0.2)
    values.update(changes)
    return SmppSettings(**values)


def message(mid: int, body: str, *, coding: int | None = None, klass: int = 1,
            sender: str = "SHOP", receiver: str = "+33612345678") -> OutgoingMessage:
    seg = segment(body, None if coding is None else Coding(coding))
    return OutgoingMessage(mid, sender, receiver, body, int(seg.coding), klass, 0.0, None,
                           parts=seg.parts)


@pytest.fixture
async def smsc() -> AsyncIterator[Smsc]:
    server = Smsc()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def sink() -> Sink:
    return Sink()


async def connected(smsc: Smsc, sink: Sink, **changes: Any) -> SmppOperator:
    operator = SmppOperator(settings(smsc, **changes), SystemClock())
    await operator.start(_SinkAdapter(sink))
    assert await operator.wait_bound(5), operator.link_status()
    return operator


async def test_gsm_text_with_extension_characters_arrives_as_the_exact_bytes(
        smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink)
    try:
        [result] = await operator.submit([message(1, "Prix: 5€ [ok] @home", sender="SHOP")])
        assert isinstance(result, Taken) and result.references == (smsc.submitted[0].message_id,)
        assert [(r.reference, r.ptt) for r in sink.accepted] == [(result.references[0], 3)]
        pdu = smsc.submitted[0].pdu
        assert pdu.short_message == (b"Prix: 5\x1b\x65 \x1b\x3cok\x1b\x3e \x00home")
        assert (pdu.data_coding, pdu.esm_class) == (0, 0)
        assert (pdu.source_addr, pdu.source_addr_ton, pdu.source_addr_npi) == ("SHOP", 5, 0)
        assert (pdu.destination_addr, pdu.dest_addr_ton, pdu.dest_addr_npi) == \
            ("33612345678", 1, 1)
        assert pdu.registered_delivery == 1
        await operator.submit([message(2, "hi", sender="+33700000000")])
        numeric = smsc.submitted[1].pdu
        assert (numeric.source_addr, numeric.source_addr_ton, numeric.source_addr_npi) == \
            ("33700000000", 1, 1)
    finally:
        await operator.stop()


async def test_ucs2_flash_and_latin1_codings(smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink, gsm_data_coding=3)
    try:
        await operator.submit([message(1, "Привет 😀"), message(2, "Flash!", klass=0),
                               message(3, "café à 5€"), message(4, "SIM", klass=2),
                               message(5, "TE", klass=3), message(6, "Ж SIM", klass=2),
                               message(7, "Ж TE", klass=3)])
        by_text = {s.pdu.data_coding: s.pdu.short_message for s in smsc.submitted}
        assert by_text[8] == "Привет 😀".encode("utf-16-be")
        assert by_text[0x10] == b"Flash!"
        assert by_text[3] == "café à 5€".encode("latin-1", "replace")
        # The other message classes: SIM (2) and terminal equipment (3), GSM and UCS-2.
        assert (by_text[0x12], by_text[0x13]) == (b"SIM", b"TE")
        assert (by_text[0x1A], by_text[0x1B]) == ("Ж SIM".encode("utf-16-be"),
                                                  "Ж TE".encode("utf-16-be"))
    finally:
        await operator.stop()


async def test_long_message_parts_as_counted_with_udh(smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink)
    body = "a" * 152 + "€" + "b" * 100  # the € does not fit in part 1: it starts part 2
    try:
        [result] = await operator.submit([message(1, body)])
        assert isinstance(result, Taken) and len(result.references) == segment(body).parts == 2
        first, second = (s.pdu for s in smsc.submitted)
        assert first.esm_class & 0x40 and second.esm_class & 0x40
        assert first.short_message[:5] == second.short_message[:5] == \
            bytes([5, 0, 3, first.short_message[3], 2])
        assert (first.short_message[5], second.short_message[5]) == (1, 2)
        assert first.short_message[6:] == b"a" * 152
        assert second.short_message[6:] == b"\x1b\x65" + b"b" * 100
    finally:
        await operator.stop()


async def test_sar_option(smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink, long_messages="sar")
    try:
        await operator.submit([message(1, "x" * 200)])
        tags = [{t.tag: t.value for t in s.pdu.tlvs} for s in smsc.submitted]
        assert [t[0x020E] for t in tags] == [b"\x02", b"\x02"]   # sar_total_segments
        assert [t[0x020F] for t in tags] == [b"\x01", b"\x02"]   # sar_segment_seqnum
        assert smsc.submitted[0].pdu.esm_class == 0
    finally:
        await operator.stop()


async def test_throttled_is_later_and_slows_down_refusal_is_mapped(
        smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink)
    smsc.answer = lambda pdu: {"33600000001": 0x58, "33600000002": 0x14,
                               "33600000003": 0x0B}.get(pdu.destination_addr, 0)
    try:
        results = await operator.submit([message(i, "x", receiver=f"+3360000000{i}")
                                         for i in (1, 2, 3, 4)])
        assert [type(r) for r in results] == [Later, Later, Refused, Taken]
        assert "ESME_RTHROTTLED" in results[0].reason  # type: ignore[union-attr]
        assert results[2].ptt == 23  # type: ignore[union-attr]
        assert operator.throttled == 2
        assert operator.window_limit < 10  # halved twice, grown back by the OK answers
    finally:
        await operator.stop()


async def test_a_throttled_later_part_is_retried_without_resending_the_first(
        smsc: Smsc, sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.operators.smpp.connector.RETRY_SECONDS", 0.05)
    operator = await connected(smsc, sink)
    answers = iter([0, 0x58, 0x58, 0])  # part 1 OK, part 2 throttled twice, then OK
    smsc.answer = lambda pdu: next(answers)
    try:
        [result] = await operator.submit([message(1, "x" * 200)])
        assert isinstance(result, Taken) and len(result.references) == 2
        seqs = [s.pdu.short_message[5] for s in smsc.submitted]
        assert seqs == [1, 2, 2, 2]  # part 1 sent once
    finally:
        await operator.stop()


async def test_wrong_password_link_down_with_reason_messages_wait(smsc: Smsc,
                                                                   sink: Sink) -> None:
    operator = SmppOperator(settings(smsc, password="nope"), SystemClock())
    await operator.start(_SinkAdapter(sink))
    try:
        for _ in range(100):
            if smsc.bind_refusals:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        status = operator.link_status()
        assert not status.up and "wrong password" in status.detail
        [result] = await operator.submit([message(1, "x")])
        assert isinstance(result, Later)
        assert not smsc.submitted
    finally:
        await operator.stop()


async def test_drop_with_submits_in_flight_then_reconnect(smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink)
    smsc.hold = True
    try:
        pending = asyncio.ensure_future(operator.submit([message(1, "x"), message(2, "y")]))
        while len(smsc.submitted) < 2:
            await asyncio.sleep(0.01)
        smsc.drop()
        results = await pending
        assert [type(r) for r in results] == [Later, Later]
        smsc.hold = False
        assert await operator.wait_bound(5)
        while not operator.link_status().up:
            await asyncio.sleep(0.02)
        assert isinstance((await operator.submit([message(1, "x")]))[0], Taken)
        assert smsc.binds == 2
    finally:
        await operator.stop()


async def test_no_answer_in_time_is_later(smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink, response_timeout_seconds=0.3)
    smsc.hold = True
    try:
        [result] = await operator.submit([message(1, "x")])
        assert isinstance(result, Later) and "no answer" in result.reason
    finally:
        await operator.stop()


async def test_unbind_by_the_smsc_reconnects(smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink)
    try:
        await smsc.unbind()
        for _ in range(200):
            if smsc.binds >= 2 and operator.link_status().up:
                break
            await asyncio.sleep(0.02)
        assert smsc.binds >= 2 and operator.link_status().up
    finally:
        await operator.stop()


async def test_an_smsc_that_drops_each_bind_at_once_gets_a_growing_backoff(
        smsc: Smsc, sink: Sink) -> None:
    """The backoff restarted at every accepted bind: a flapping SMSC was rebound every
    first delay, forever (30 binds in 3 s in review). It restarts only after a link that
    held for reconnect_max_seconds."""
    smsc.drop_after_bind = True
    operator = SmppOperator(settings(smsc, reconnect_first_seconds=0.05,
                                     reconnect_max_seconds=0.4, reconnect_jitter=0.0),
                            SystemClock())
    await operator.start(_SinkAdapter(sink))
    try:
        await asyncio.sleep(1.5)  # delays 0.05, 0.1, 0.2, 0.4, 0.4...: about 6 binds
        assert 3 <= smsc.binds <= 8, smsc.binds
    finally:
        await operator.stop()


async def test_not_bound_answers_make_the_connector_bind_again(smsc: Smsc, sink: Sink) -> None:
    """ESME_RINVBNDSTS (the SMSC lost our bind) was a mere "try later" on the same session:
    retried every second, forever. Now the session is closed and the bind made again."""
    operator = await connected(smsc, sink)
    refused = [0x04]
    smsc.answer = lambda pdu: refused.pop() if refused else 0
    try:
        [result] = await operator.submit([message(1, "x")])
        assert isinstance(result, Later) and "ESME_RINVBNDSTS" in result.reason
        for _ in range(250):
            if smsc.binds >= 2 and operator.link_status().up:
                break
            await asyncio.sleep(0.02)
        assert smsc.binds >= 2 and operator.link_status().up
        assert isinstance((await operator.submit([message(1, "x")]))[0], Taken)
    finally:
        await operator.stop()


async def test_one_message_that_cannot_be_sent_leaves_the_others_taken(
        smsc: Smsc, sink: Sink) -> None:
    """One message raising made `submit` raise: the dispatcher took the whole batch as not
    taken, and sent the others again on every retry."""
    operator = await connected(smsc, sink)
    try:
        results = await operator.submit([message(1, "x"), message(2, "y", sender="\u20acSHOP"),
                                         message(3, "z")])
        assert [type(r) for r in results] == [Taken, Later, Taken]
        assert len(smsc.submitted) == 2
    finally:
        await operator.stop()


async def test_enquire_link_is_sent_when_idle(smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink, enquire_link_seconds=0.1)
    try:
        await asyncio.sleep(0.5)
        assert sum(c.enquire_links for c in smsc.connections) >= 2
        assert operator.link_status().up
    finally:
        await operator.stop()


@pytest.mark.parametrize(("stat", "expected"), [
    ("DELIVRD", 4), ("EXPIRED", 8), ("DELETED", 5), ("UNDELIV", 5), ("ACCEPTD", 3),
    ("UNKNOWN", 6), ("REJECTD", 5)])
async def test_receipt_stats_become_reports(smsc: Smsc, sink: Sink, stat: str,
                                            expected: int) -> None:
    operator = await connected(smsc, sink)
    try:
        [taken] = await operator.submit([message(1, "x")])
        assert isinstance(taken, Taken)
        assert await smsc.receipt(taken.references[0], stat) == 0
        [report] = sink.reports
        assert (report.reference, report.ptt) == (taken.references[0], expected)
        assert operator.receipts == {stat: 1}
    finally:
        await operator.stop()


async def test_receipt_as_data_sm(smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink)
    try:
        assert await smsc.data_sm_receipt("77ab", 5) == 0  # UNDELIVERABLE
        [report] = sink.reports
        assert (report.reference, report.ptt) == ("77ab", 5)
    finally:
        await operator.stop()


async def test_receipt_answered_only_after_commit(smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink)
    sink.hold = True
    try:
        answer = asyncio.ensure_future(smsc.receipt("abc", "DELIVRD", tlv=True,
                                                    text_id="999"))
        while not sink.held:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert not answer.done()  # not committed yet: not answered
        assert sink.reports[0].reference == "abc"  # receipted_message_id wins
        sink.held[0].set_result(None)
        assert await answer == 0
        # Not committed (the gateway stopping): a temporary error, the SMSC sends it again.
        second = asyncio.ensure_future(smsc.receipt("abd", "DELIVRD"))
        while len(sink.held) < 2:
            await asyncio.sleep(0.01)
        sink.held[1].cancel()
        assert await second == 0x64
    finally:
        await operator.stop()


async def test_receipt_id_in_decimal_and_err_override(smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink, receipt_id="decimal", errors={"err:012": 23})
    try:
        [taken] = await operator.submit([message(1, "x")])
        assert isinstance(taken, Taken)
        hex_id = taken.references[0]
        await smsc.receipt(hex_id, "UNDELIV", err="012", text_id=str(int(hex_id, 16)))
        assert (sink.reports[0].reference, sink.reports[0].ptt) == (hex_id, 23)
    finally:
        await operator.stop()


async def test_inbound_decoded_and_parts_handed_over_each_on_its_own(smsc: Smsc,
                                                                     sink: Sink) -> None:
    """Each part of a long message goes to the sink as it comes, its deliver_sm answered
    only once the sink acknowledged it: the gateway stores it before the SMSC forgets it."""
    operator = await connected(smsc, sink)
    try:
        assert await smsc.inbound("33611111111", "33700000000", "STOP ça".encode(
            "utf-16-be"), data_coding=8) == 0
        assert await smsc.inbound("33611111111", "33700000000", b"\x1b\x65 5", ) == 0
        udh = bytes([5, 0, 3, 7, 2])
        sink.hold = True
        first = asyncio.create_task(smsc.inbound("33622222222", "33700000000",
                                                 udh + b"\x01Hello ", esm_class=0x40))
        await eventually(lambda: len(sink.held) == 1)
        await asyncio.sleep(0.05)
        assert not first.done()  # not acknowledged: not answered
        sink.held[0].set_result(None)
        assert await first == 0
        sink.hold = False
        assert await smsc.inbound("33622222222", "33700000000", udh + b"\x02world",
                                  esm_class=0x40) == 0
        assert [(m.sender, m.receiver, m.body, m.part) for m in sink.inbounds] == [
            ("+33611111111", "+33700000000", "STOP ça", None),
            ("+33611111111", "+33700000000", "€ 5", None),
            ("+33622222222", "+33700000000", "Hello ", (7, 2, 1)),
            ("+33622222222", "+33700000000", "world", (7, 2, 2))]
        references = [m.reference for m in sink.inbounds]
        assert len(set(references)) == 4
        # The same deliver_sm again (its answer missed): the same reference.
        assert await smsc.inbound("33611111111", "33700000000", b"\x1b\x65 5", ) == 0
        assert sink.inbounds[-1].reference == references[1]
    finally:
        await operator.stop()


async def test_inbound_numbers_follow_their_ton(smsc: Smsc, sink: Sink) -> None:
    """International (TON 1) numbers become E.164 however the SMSC wrote them; a national
    one (TON 2) stays as written (its country is unknown), and so does an alphanumeric
    receiver."""
    operator = await connected(smsc, sink)
    try:
        for sender, ton in (("33611111111", 1), ("+33611111111", 1), ("0033611111111", 1),
                            ("0611111111", 2), ("0611111111", 0), ("33611111111", 0)):
            assert await smsc.inbound(sender, "ACME", b"hi", source_addr_ton=ton,
                                      dest_addr_ton=5) == 0
        assert [(m.sender, m.receiver) for m in sink.inbounds] == \
            [("+33611111111", "ACME")] * 3 + [("0611111111", "ACME")] * 2 + \
            [("+33611111111", "ACME")]
    finally:
        await operator.stop()


async def test_two_binds_and_a_transmitter_receiver_pair(smsc: Smsc, sink: Sink) -> None:
    operator = await connected(smsc, sink, binds=2, bind_mode="transmitter_receiver")
    try:
        for _ in range(100):
            if len(smsc.bound) == 4:
                break
            await asyncio.sleep(0.02)
        assert sorted(c.mode for c in smsc.bound) == [1, 1, 2, 2]
        results = await operator.submit([message(i, "x") for i in range(1, 5)])
        assert all(isinstance(r, Taken) for r in results)
        [taken] = await operator.submit([message(9, "x")])
        assert isinstance(taken, Taken)
        await smsc.receipt(taken.references[0], "DELIVRD")  # over a receiver
        assert sink.reports[0].ptt == 4
    finally:
        await operator.stop()


async def test_window_and_throughput_cap(smsc: Smsc, sink: Sink) -> None:
    """What the SMSC sees: never more than the window unanswered, never faster than the cap
    (not the connector's own counters, which would share its mistakes)."""
    operator = await connected(smsc, sink, window=3, throughput_total=100.0)
    smsc.delay = 0.05
    try:
        results = await operator.submit([message(i, "x") for i in range(1, 51)])
        assert all(isinstance(r, Taken) for r in results)
        assert smsc.max_in_flight == 3  # filled, never exceeded
        times = [s.at for s in smsc.submitted]
        assert times[-1] - times[0] >= 0.45  # 50 at 100/s
    finally:
        await operator.stop()


async def test_check_says_what_happened(smsc: Smsc, tmp_path: Any) -> None:
    ok, line = await check(settings(smsc))
    assert ok and line.startswith("bound as 'gateway'")
    (tmp_path / "pw").write_text("nope\n")
    ok, line = await check(settings(smsc, password="", password_file=str(tmp_path / "pw")))
    assert not ok and "wrong password" in line
    ok, line = await check(settings(smsc, password="", password_file=str(tmp_path / "no")))
    assert not ok and line.startswith("setting operator.smpp.password_file: cannot read")
    ok, line = await check(settings(smsc, tls=True, tls_ca_file=str(tmp_path / "no-ca.pem")))
    assert not ok and line.startswith("TLS failure: setting operator.smpp.tls_ca_file")
    await smsc.stop()
    ok, line = await check(settings(smsc))
    assert not ok and "connection refused" in line


def smpp_config(tmp_path: Any, smsc: Smsc, password_line: str = "") -> str:
    path = tmp_path / "gateway.toml"
    path.write_text(f"""[store]
path = "{tmp_path / 'gw.sqlite3'}"
[operator]
kind = "smpp"
[operator.smpp]
host = "127.0.0.1"
port = {smsc.port}
system_id = "gateway"
{password_line}
response_timeout_seconds = 2.0
""")
    return str(path)


async def test_operator_check_command(smsc: Smsc, tmp_path: Any) -> None:
    config = smpp_config(tmp_path, smsc)
    ok = await asyncio.to_thread(invoke, "--config", config, "operator", "check",
                                 env={"HTTP2SMS_OPERATOR_SMPP_PASSWORD": "secret"})
    assert ok.exit_code == 0 and ok.stdout.startswith("bound as 'gateway'"), ok.output
    wrong = await asyncio.to_thread(invoke, "--config", config, "operator", "check",
                                    env={"HTTP2SMS_OPERATOR_SMPP_PASSWORD": "guess"})
    assert wrong.exit_code == 1
    assert wrong.stdout.strip() == "not bound: wrong password (ESME_RINVPASWD)"
    assert "guess" not in wrong.output
    await smsc.stop()
    refused = await asyncio.to_thread(invoke, "--config", config, "operator", "check")
    assert refused.exit_code == 1 and "connection refused" in refused.stdout


async def test_tls_bound_with_the_ca_and_refused_without(tmp_path: Path, sink: Sink) -> None:
    cert, key = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = Smsc()
    await server.start(tls=context)
    try:
        ok, line = await check(settings(server, tls=True, tls_ca_file=str(cert)))
        assert ok and line.endswith("ms") and "over TLS" in line, line
        operator = await connected(server, sink, tls=True, tls_ca_file=str(cert))
        try:
            [result] = await operator.submit([message(1, "over TLS")])
            assert isinstance(result, Taken)
            assert server.submitted[0].pdu.short_message == b"over TLS"
        finally:
            await operator.stop()
        ok, line = await check(settings(server, tls=True))  # the system's CAs: not ours
        assert not ok and line.startswith("TLS failure") and "CERTIFICATE_VERIFY_FAILED" \
            in line, line
    finally:
        await server.stop()


async def test_check_tls_failure_and_timeout(tmp_path: Any) -> None:
    # A listener that never answers: the bind times out; so does a TLS handshake with it.
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        base = dict(host="127.0.0.1", port=port, system_id="g", password="p")
        ok, line = await check(SmppSettings(**base), 0.3)  # type: ignore[arg-type]
        assert not ok and "no answer to bind_transceiver within 0.3 s" in line
        ok, line = await check(SmppSettings(**base, tls=True), 0.3)  # type: ignore[arg-type]
        assert not ok and ("TLS failure" in line or "timeout" in line), line
    finally:
        server.close()
