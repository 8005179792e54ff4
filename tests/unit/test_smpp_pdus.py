"""The SMPP connector's pure rules: parts as the send path counts them, codings, UDH,
receipts, answers -> ptt."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import encoding, ptt
from gateway.clock import SystemClock
from gateway.config import SmppSettings
from gateway.encoding import Coding, segment
from gateway.expiry import overdue
from gateway.operators.base import Expiry
from gateway.operators.smpp import errors, pdus
from gateway.operators.smpp.connector import SmppOperator, backoff, validity_period
from gateway.records import OutgoingMessage

GSM_CHARS = "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCXYZÄÖÑÜ§¿" \
            "abcxyzäöñüà\f^{}\\[~]|€"


@given(st.text(alphabet=GSM_CHARS, max_size=1000))
def test_gsm_parts_are_the_parts_counted(text: str) -> None:
    parts = pdus.split_text(text, int(Coding.GSM7))
    assert "".join(parts) == text
    assert len(parts) == segment(text, Coding.GSM7).parts
    assert pdus.gsm_decode(pdus.gsm_encode(text)) == text
    if len(parts) > 1:
        assert all(len(pdus.gsm_encode(p)) <= 153 for p in parts)


@given(st.text(max_size=400))
def test_ucs2_parts_are_the_parts_counted(text: str) -> None:
    parts = pdus.split_text(text, int(Coding.UCS2))
    assert "".join(parts) == text
    assert len(parts) == segment(text, Coding.UCS2).parts
    if len(parts) > 1:
        assert all(len(p.encode("utf-16-be", "surrogatepass")) <= 134 for p in parts)


def test_build_parts_codings_and_headers() -> None:
    [single] = pdus.build_parts("Hi €", 1, 1)
    assert (single.short_message, single.data_coding, single.esm_class) == \
        (b"Hi\x20\x1b\x65", 0, 0)
    [flash] = pdus.build_parts("Hi", 1, 0)
    assert flash.data_coding == 0x10
    [ucs2] = pdus.build_parts("Ж", 2, 1)
    assert (ucs2.short_message, ucs2.data_coding) == (b"\x04\x16", 8)
    first, second = pdus.build_parts("x" * 161, 1, 1, reference=300)
    assert first.short_message[:6] == bytes([5, 0, 3, 300 & 0xFF, 2, 1])
    assert second.esm_class == pdus.ESM_UDHI
    [payload] = pdus.build_parts("x" * 161, 1, 1, long_messages="payload")
    assert payload.tlvs == {"message_payload": b"x" * 161}


def test_receipts() -> None:
    text = "id:0A1B sub:001 dlvrd:001 submit date:2612070800 done date:2612070801 " \
           "stat:DELIVRD err:000 text:Hello"
    receipt = pdus.parse_receipt(text)
    assert receipt is not None and (receipt.reference, receipt.stat, receipt.err) == \
        ("0A1B", "DELIVRD", "000")
    assert pdus.parse_receipt("id:2587 stat:UNDELIV", receipt_id="decimal").reference == \
        "a1b"  # type: ignore[union-attr]
    assert pdus.normalize_reference("0A1B", "decimal") == "a1b"
    assert pdus.parse_receipt("id:a1b stat:EXPIRED", receipt_id="hex").reference == \
        "2587"  # type: ignore[union-attr]
    assert pdus.parse_receipt("stat:DELIVRD", receipted_message_id="x1",
                              message_state=2).reference == "x1"  # type: ignore[union-attr]
    assert pdus.parse_receipt("", receipted_message_id="x1",
                              message_state=5).stat == "UNDELIV"  # type: ignore[union-attr]
    assert pdus.parse_receipt("nothing here") is None
    assert pdus.is_receipt(0x04) and pdus.is_receipt(0x44) and not pdus.is_receipt(0x40)


def test_udh_and_inbound_decoding() -> None:
    concat, rest = pdus.split_udh(bytes([6, 8, 4, 1, 2, 3, 1]) + b"abc")
    assert concat == pdus.Concatenation(0x0102, 3, 1) and rest == b"abc"
    assert pdus.decode_text("é".encode("latin-1"), 3) == "é"
    assert pdus.decode_text("Ж".encode("utf-16-be"), 8) == "Ж"
    assert pdus.decode_text(b"\x1b\x65\x00", 0) == "€@"


def test_error_tables() -> None:
    table = errors.ErrorTable.from_settings({})
    assert table.refusal(errors.ESME_RINVDSTADR) == 23
    assert table.refusal(0x1234) == errors.UNKNOWN_REFUSAL == 20
    assert not ptt.PTTS[20].billed  # an unknown refusal is refunded
    assert table.receipt("DELIVRD", "000") == 4 and table.receipt("weird", "") == 6
    custom = errors.ErrorTable.from_settings({"0x0000000B": 29, "11": 28, "err:0042": 27})
    assert custom.refusal(11) == 28
    assert custom.receipt("UNDELIV", "042") == 27 and custom.receipt("UNDELIV", "43") == 5
    with pytest.raises(ValueError, match="unknown ptt 999"):
        errors.ErrorTable.from_settings({"11": 999})
    assert errors.SLOW_DOWN <= errors.TRY_LATER
    for status in errors.TRY_LATER:
        assert status not in errors.DEFAULT_REFUSALS


def test_a_delivery_failure_answer_is_billed() -> None:
    """ESME_RDELIVERYFAILURE: the SMSC tried to deliver it, so the SMS went out: billed."""
    table = errors.ErrorTable.from_settings({})
    code = table.refusal(errors.ESME_RDELIVERYFAILURE)
    assert code == 5 and ptt.PTTS[code].billed and ptt.PTTS[code].final


def test_batch_hint_and_expiry_follow_the_settings() -> None:
    def operator(**changes: object) -> SmppOperator:
        return SmppOperator(SmppSettings(**changes), SystemClock())  # type: ignore[arg-type]

    assert operator(window=10).batch_hint == 10
    assert operator(window=10, binds=3).batch_hint == 30
    # At most a second of traffic at the caps, and at least one message.
    assert operator(window=50, throughput_total=20.0).batch_hint == 20
    assert operator(window=50, binds=2, throughput_per_bind=5.0).batch_hint == 10
    assert operator(window=50, throughput_total=0.5).batch_hint == 1
    assert operator(validity_hours=2, receipt_grace_hours=1).expiry == \
        Expiry(3 * 3600.0, 8, "expired: no receipt within the validity period")
    assert operator(validity_hours=0, receipt_grace_hours=0).expiry.after_seconds == 48 * 3600
    assert operator(registered_delivery=2).expiry.ptt == 6  # failures only: state unknown
    assert operator(registered_delivery=0).expiry.ptt == 6


def test_overdue_messages_are_the_ones_taken_long_enough_ago() -> None:
    rule = Expiry(100.0, 8, "expired")
    messages = [OutgoingMessage(i, "S", "+33612345678", "x", 0, 1, 0.0, None, sent_at=at)
                for i, at in ((1, 0.0), (2, 50.0), (3, None))]
    assert [(u.message_id, u.ptt, u.note) for u in overdue(messages, 100.0, rule)] == \
        [(1, 8, "expired")]
    assert [u.message_id for u in overdue(messages, 150.0, rule)] == [1, 2]


def test_an_inbound_pdu_s_reference_is_the_same_only_for_the_same_pdu() -> None:
    pdu = {"source_addr": "33611111111", "destination_addr": "ACME", "esm_class": 0,
           "data_coding": 0, "short_message": b"yes"}
    same = pdus.fingerprint(dict(pdu))
    assert same == pdus.fingerprint(pdu) and same.startswith("smpp-")
    for change in ({"short_message": b"yes!"}, {"source_addr": "33611111112"},
                   {"user_message_reference": 7}, {"sar_segment_seqnum": 2},
                   {"receipted_message_id": b"abc"}, {"data_coding": 8}):
        assert pdus.fingerprint({**pdu, **change}) != same, change
    # Fields are kept apart: "ab" + "c" is not "a" + "bc".
    assert pdus.fingerprint({"source_addr": "ab", "destination_addr": "c"}) != \
        pdus.fingerprint({"source_addr": "a", "destination_addr": "bc"})


@pytest.mark.parametrize(("addr", "ton", "number"), [
    ("33611111111", 1, "+33611111111"), ("+33611111111", 1, "+33611111111"),
    ("0033611111111", 1, "+33611111111"), ("33611111111", 0, "+33611111111"),
    ("0611111111", 0, "0611111111"), ("0611111111", 2, "0611111111"),
    ("611111111", 2, "611111111"), ("ACME", 5, "ACME"), ("ACME", 0, "ACME"),
    ("0033611111111", 0, "+33611111111"), ("1234", 3, "1234"),
])
def test_inbound_numbers_are_e164_only_when_their_ton_says_international(
        addr: str, ton: int, number: str) -> None:
    assert pdus.inbound_number(addr, ton) == number


def test_backoff_and_validity() -> None:
    s = SmppSettings(reconnect_first_seconds=1, reconnect_max_seconds=10,
                     reconnect_jitter=0.5)
    rng = random.Random(1)
    delays = [backoff(n, s, rng) for n in range(1, 8)]
    assert 1 <= delays[0] <= 1.5 and 2 <= delays[1] <= 3
    assert all(10 <= d <= 15 for d in delays[4:])
    assert validity_period(48) == "000002000000000R"
    assert validity_period(1.5) == "000000013000000R"
    assert validity_period(0) == ""


@pytest.mark.parametrize(("text", "reference"), [
    # What the SMS said, copied into `text:`, never names the message.
    ("id:123 sub:001 dlvrd:001 submit date:2401011200 done date:2401011201 stat:DELIVRD "
     "err:000 text:paid:99 id:77", "123"),
    ("stat:DELIVRD err:000 text:your id:55", None),
    ("id:9 stat:DELIVRD err:000 text:stat:UNDELIV", "9"),
    ("xid:5 paid:7 id:8 stat:DELIVRD", "8"),          # a field starts a word
    ("id:8 id:9 stat:DELIVRD", "8"),                  # the first one stands
])
def test_a_receipt_s_fields_come_before_its_text(text: str, reference: str | None) -> None:
    receipt = pdus.parse_receipt(text)
    assert (receipt.reference if receipt else None) == reference
    if receipt is not None:
        assert receipt.stat == "DELIVRD"


@pytest.mark.parametrize("secret", ["abcdefghijkl", "p\u20acss"])
def test_a_password_smpp_cannot_carry_is_refused_without_being_quoted(
        secret: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """smpplib cut a 12-character password to 8 (the SMSC then said "wrong password"), and
    a non-Latin-1 one crashed the bind with the password in the exception's arguments."""
    from gateway import config
    from gateway.operators.smpp.connector import password

    monkeypatch.setenv("HTTP2SMS_OPERATOR_KIND", "smpp")
    monkeypatch.setenv("HTTP2SMS_OPERATOR_SMPP_PASSWORD", secret)
    with pytest.raises(config.ConfigError, match=r"operator\.smpp\.password") as refused:
        config.load(None)
    assert secret not in str(refused.value)
    monkeypatch.delenv("HTTP2SMS_OPERATOR_SMPP_PASSWORD")
    path = tmp_path / "password"
    path.write_text(secret + "\n")
    monkeypatch.setenv("HTTP2SMS_OPERATOR_SMPP_PASSWORD_FILE", str(path))
    settings = config.load(None).operator
    assert isinstance(settings, config.SmppOperatorConfig)
    with pytest.raises(config.ConfigError, match="password_file") as refused:
        password(settings.smpp)
    assert secret not in str(refused.value)


def test_the_errors_table_is_checked_at_load_and_read_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong key or ptt crashed the worker with a raw ValueError, and the table could not
    be given in the environment at all ("expected object")."""
    from gateway import config

    monkeypatch.setenv("HTTP2SMS_OPERATOR_KIND", "smpp")
    monkeypatch.setenv("HTTP2SMS_OPERATOR_SMPP_ERRORS", '{"0x0000000B": 24, "err:042": 21}')
    settings = config.load(None).operator
    assert isinstance(settings, config.SmppOperatorConfig)
    table = errors.ErrorTable.from_settings(settings.smpp.errors)
    assert table.refusal(0x0B) == 24 and table.receipt("UNDELIV", "042") == 21
    for bad in ('{"0x0B": 999}', '{"eleven": 24}'):
        monkeypatch.setenv("HTTP2SMS_OPERATOR_SMPP_ERRORS", bad)
        with pytest.raises(config.ConfigError, match=r"operator\.smpp"):
            config.load(None)


def test_the_gsm_extension_codes_cover_the_send_path_s_extension_characters() -> None:
    """The connector packs what the send path counted: one table, one set of sizes."""
    assert set(pdus._GSM_EXTENSION) == set(encoding.GSM_EXTENSION)
    assert pdus._GSM_BASIC is encoding.GSM_BASIC_TABLE
