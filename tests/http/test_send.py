"""The send URL over real HTTP: outcome codes, formats, parameters, parts and prices."""

from __future__ import annotations

import asyncio
import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from gateway import http_parser
from gateway.config import Config
from gateway.records import MessageFilter, SendOrder
from gateway.store import Store, open_store
from tests.conftest import (
    ACCOUNT,
    LOGIN,
    SEND_PATH,
    Harness,
    HarnessFactory,
    deferred_ahead,
)

FORMATS = ["text/plain", "text/xml", "application/xml", "text/json", "application/json",
           "text/html"]


def parse_body(fmt: str, body: str) -> dict[str, Any]:
    """Read any of the four formats back into status, message, creditLeft and ids."""
    if fmt == "text/plain":
        lines = body.split("\n")
        if lines[0] == "OK":
            return {"ok": True, "creditLeft": lines[1], "ids": lines[2:]}
        code, _, message = lines[1].partition(" ")
        return {"ok": False, "status": int(code), "message": message}
    if fmt.endswith("json"):
        data = json.loads(body)
        if "SmsIds" in data:
            return {"ok": True, "status": data["status"], "creditLeft": data["creditLeft"],
                    "ids": data["SmsIds"]}
        return {"ok": False, "status": data["status"], "message": data["message"]}
    if fmt.endswith("xml"):
        assert body.startswith('<?xml version="1.0" encoding="UTF-8" ?><response>')
        root = ET.fromstring(body.encode())
        status = int(root.findtext("status") or 0)
        if root.find("smsIds") is not None:
            return {"ok": True, "status": status, "creditLeft": root.findtext("creditLeft"),
                    "ids": [e.text for e in root.iter("smsId")]}
        return {"ok": False, "status": status, "message": root.findtext("message")}
    assert fmt == "text/html"
    inner = body.split("<BODY>", 1)[1].split("</BODY>", 1)[0]
    parts = inner.split("<br>")
    assert parts[-1] == ""
    if parts[0] == "OK":
        return {"ok": True, "creditLeft": parts[1], "ids": parts[2:-1]}
    return {"ok": False, "message": parts[1]}


# -- the documented shapes, byte for byte --------------------------------------------------

async def test_success_bodies_are_byte_exact(harness: Harness) -> None:
    assert await harness.send() == (200, "OK\n999\n1")
    assert await harness.send(contentType="application/json") == \
        (200, '{"status":100,"creditLeft":"998","SmsIds":["2"]}')
    assert await harness.send(contentType="text/xml") == (200, (
        '<?xml version="1.0" encoding="UTF-8" ?><response><status>100</status>'
        "<creditLeft>997</creditLeft><smsIds><smsId>3</smsId></smsIds></response>"))
    status, body = await harness.send(contentType="text/html")
    assert status == 200
    assert body.startswith("<!DOCTYPE html PUBLIC")
    assert "<BODY>OK<br>996<br>4<br></BODY>" in body


async def test_failure_bodies_are_byte_exact(harness: Harness) -> None:
    assert await harness.send(message="") == (200, "KO\n201 Missing message")
    assert await harness.send(message="", contentType="application/json") == \
        (200, '{"status":201,"message":"Missing message"}')
    assert await harness.send(message="", contentType="application/xml") == (200, (
        '<?xml version="1.0" encoding="UTF-8" ?><response><status>201</status>'
        "<message>Missing message</message></response>"))
    _, body = await harness.send(message="", contentType="text/html")
    assert "<BODY>KO<br>Missing message<br></BODY>" in body


async def test_content_type_headers(harness: Harness) -> None:
    for fmt in FORMATS:
        resp = await harness.client.get(SEND_PATH, params={
            "account": ACCOUNT, "login": LOGIN, "password": "secret123", "from": "ACME",
            "to": "+33612345678", "message": "x", "contentType": fmt})
        assert resp.status == 200
        assert resp.content_type == fmt
        assert resp.charset == "utf-8"
        assert resp.headers["Content-Type"] == f"{fmt}; charset=utf-8"


# -- every outcome code in every format -----------------------------------------------------

CASES: list[tuple[dict[str, Any], int, str]] = [
    ({"account": ...}, 201, "Missing account"),
    ({"login": ...}, 201, "Missing login"),
    ({"password": ...}, 201, "Missing password"),
    ({"from": ...}, 201, "Missing from"),
    ({"to": ...}, 201, "Missing to"),
    ({"message": ...}, 201, "Missing message"),
    ({"to": "0612345678"}, 202, "Invalid to"),
    ({"class": "7"}, 202, "Invalid class"),
    ({"smsCoding": "3"}, 202, "Invalid smsCoding"),
    ({"deferred": "2530"}, 202, "Invalid deferred"),
    ({"tag": "x" * 21}, 202, "Invalid tag"),
    ({"from": "NOPE"}, 241, "NOPE"),
    ({"password": "wrongpass1"}, 401, "Invalid account, login or password"),
    ({"login": "nobody"}, 401, "Invalid account, login or password"),
    ({"account": "sms-none-1"}, 401, "Invalid account, login or password"),
]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_every_outcome_in_every_format(make_harness: Any, fmt: str) -> None:
    h: Harness = await make_harness(credits=1)
    for params, code, text in CASES:
        status, body = await h.send(contentType=fmt, **params)
        assert status == 200
        parsed = parse_body(fmt, body)
        assert not parsed["ok"], (params, body)
        assert parsed.get("status", code) == code, (params, body)
        assert text in parsed["message"], (params, body)
    parsed = parse_body(fmt, (await h.send(contentType=fmt))[1])
    assert parsed["ok"] and parsed.get("status", 100) == 100 and parsed["creditLeft"] == "0"
    parsed = parse_body(fmt, (await h.send(contentType=fmt))[1])
    assert parsed.get("status", 402) == 402 and "Not enough credits" in parsed["message"]
    parsed = parse_body(fmt, (await h.send(contentType=fmt, deferred=deferred_ahead(30)))[1])
    assert parsed.get("status", 402) == 402
    await h.manage.credit_account(ACCOUNT, 5)
    parsed = parse_body(fmt, (await h.send(contentType=fmt, deferred=deferred_ahead(30)))[1])
    assert parsed["ok"] and parsed.get("status", 101) == 101


async def test_invalid_content_type_answers_202_in_text(harness: Harness) -> None:
    assert await harness.send(contentType="image/png") == (200, (
        "KO\n202 Invalid contentType: use text/plain, text/xml, application/xml, "
        "text/json, application/json or text/html"))


async def test_refusals_change_nothing(harness: Harness) -> None:
    for params, _, _ in CASES:
        await harness.send(**params)
    await harness.manage.update_user(ACCOUNT, LOGIN, quota=0)
    assert (await harness.send())[1].startswith("KO\n402 Not enough quota")
    assert await harness.balance() == 100_000
    account = await harness.gateway.store.get_account(ACCOUNT)
    assert await harness.gateway.store.list_messages(MessageFilter(account.id), limit=10) == []


# -- parameters ------------------------------------------------------------------------------

async def test_names_are_case_insensitive_and_aliases_work(harness: Harness) -> None:
    resp = await harness.client.get(
        f"{SEND_PATH}?&SMSACCOUNT={ACCOUNT}&Login={LOGIN}&PASSWORD=secret123&FROM=ACME"
        "&To=%2B33612345678&Message=hi&ContentType=text/json&SMSencoding=2")
    assert json.loads(await resp.text())["status"] == 100
    message = await harness.gateway.store.get_message(1)
    assert message.coding == 2


async def test_post_form_encoded(harness: Harness) -> None:
    _, body = await harness.send("POST", message="posted é", contentType="text/json")
    assert json.loads(body)["status"] == 100
    assert (await harness.gateway.store.get_message(1)).body.startswith("posted é\n")


async def test_latin1_fallback_and_newlines(harness: Harness) -> None:
    resp = await harness.client.get(
        f"{SEND_PATH}?account={ACCOUNT}&login={LOGIN}&password=secret123&from=ACME"
        "&to=%2B33612345678&message=caf%E9%0D%0Aa%0Db%0Ac&noStop=1")
    assert (await resp.text()).startswith("OK")
    message = await harness.gateway.store.get_message(1)
    assert message.body == "café\na\nb\nc"


async def raw_exchange(harness: Harness, *targets: bytes) -> list[tuple[int, bytes]]:
    """Send request lines as typed, on one kept-alive connection; return each answer."""
    server = harness.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    answers = []
    try:
        for target in targets:
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: gw\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            status = int(head.split(b" ", 2)[1])
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            answers.append((status, await reader.readexactly(length)))
    finally:
        writer.close()
    return answers


def raw_send_target(message: bytes) -> bytes:
    return (f"{SEND_PATH}?account={ACCOUNT}&login={LOGIN}&password=secret123&from=ACME"
            "&to=%2B33612345678&noStop=1&message=").encode() + message


async def test_raw_non_ascii_bytes_in_the_url_as_curl_sends_them(harness: Harness) -> None:
    # `curl ".../http2sms.cgi?...&message=café"` sends the é unencoded; OVH takes it.
    for typed in (b"caf\xc3\xa9", b"caf\xe9"):  # a UTF-8 terminal, a Latin-1 script
        [(status, body)] = await raw_exchange(harness, raw_send_target(typed))
        assert (status, body[:3]) == (200, b"OK\n")
    bodies = [(await harness.gateway.store.get_message(i)).body for i in (1, 2)]
    assert bodies == ["café", "café"]


async def test_raw_bytes_after_blank_lines_before_the_request_line(harness: Harness) -> None:
    # RFC 9112 (2.2) lets a server skip empty lines before a request line; llhttp does.
    server = harness.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(b"\r\n\r\nGET " + raw_send_target(b"caf\xe9")
                 + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and b"\r\n\r\nOK\n" in answer, answer
    assert (await harness.gateway.store.get_message(1)).body == "café"


async def test_raw_bytes_then_more_sends_on_the_same_connection(harness: Harness) -> None:
    answers = await raw_exchange(harness, raw_send_target(b"\xe9t\xe9"),
                                 raw_send_target(b"d\xc3\xa9j\xc3\xa0"),
                                 raw_send_target(b"plain"))
    assert [(status, body[:3]) for status, body in answers] == [(200, b"OK\n")] * 3
    bodies = [(await harness.gateway.store.get_message(i)).body for i in (1, 2, 3)]
    assert bodies == ["été", "déjà", "plain"]


async def test_raw_bytes_in_a_post_whose_body_comes_later(harness: Harness) -> None:
    server = harness.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    body = b"message=cr\xe8me+br\xfbl\xe9e"
    writer.write(b"POST " + raw_send_target(b"ignored\xe9") + b" HTTP/1.1\r\nHost: gw\r\n"
                 b"Content-Type: application/x-www-form-urlencoded\r\nConnection: close\r\n"
                 b"Expect: 100-continue\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    # The body goes once the head is parsed (the server says so), on the parser taken over.
    continue_ = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert continue_.startswith(b"HTTP/1.1 100"), continue_
    writer.write(body)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and b"\r\n\r\nOK\n" in answer, answer
    assert (await harness.gateway.store.get_message(1)).body == "crème brûlée"


async def test_numbers_with_an_unencoded_plus(harness: Harness) -> None:
    # `+` in a query means a space, so `to=+33...` typed as is arrives as ` 33...`.
    await harness.manage.add_sender(ACCOUNT, "+33700000001")
    [(status, body)] = await raw_exchange(harness, (
        f"{SEND_PATH}?account={ACCOUNT}&login={LOGIN}&password=secret123&from=+33700000001"
        "&to=+33612345678,+447911123456,0033612345679&message=hi&noStop=1").encode())
    assert (status, body.split(b"\n")[0]) == (200, b"OK"), body
    receivers = [(await harness.gateway.store.get_message(i)).receiver for i in (1, 2, 3)]
    assert receivers == ["+33612345678", "+447911123456", "+33612345679"]
    assert (await harness.gateway.store.get_message(1)).sender == "+33700000001"


async def test_a_sender_declared_without_its_plus_still_sends(harness: Harness) -> None:
    # Declared as `33700000001`; typed unencoded, `from=+33700000001` arrives as a space
    # and the number: the declared sender all the same, stored as declared.
    await harness.manage.add_sender(ACCOUNT, "33700000001")
    await harness.manage.add_sender(ACCOUNT, "1AND1")
    [(status, body)] = await raw_exchange(harness, (
        f"{SEND_PATH}?account={ACCOUNT}&login={LOGIN}&password=secret123&from=+33700000001"
        "&to=+33612345678&message=hi&noStop=1").encode())
    assert (status, body.split(b"\n")[0]) == (200, b"OK"), body
    assert (await harness.gateway.store.get_message(1)).sender == "33700000001"
    [(status, body)] = await raw_exchange(harness, (
        f"{SEND_PATH}?account={ACCOUNT}&login={LOGIN}&password=secret123&from=%201AND1"
        "&to=+33612345678&message=hi&noStop=1").encode())
    assert (status, body.split(b"\n")[0]) == (200, b"OK"), body
    assert (await harness.gateway.store.get_message(2)).sender == "1AND1"


async def test_control_characters_in_a_raw_url_are_still_refused(harness: Harness) -> None:
    before = await harness.balance()
    [(status, _)] = await raw_exchange(harness, raw_send_target(b"a\x01b\xe9"))
    assert status == 400
    assert await harness.balance() == before  # nothing sent


@pytest.mark.skipif(http_parser._FAST is http_parser._LENIENT,
                    reason="aiohttp without its C parser: every connection takes raw bytes")
async def test_a_connection_begun_in_ascii_keeps_the_fast_parser(harness: Harness) -> None:
    # The C parser takes the connection back after its first request (the send path's
    # speed); from there a raw byte is its 400, which names the character to encode.
    answers = await raw_exchange(harness, raw_send_target(b"plain"), raw_send_target(b"caf%E9"))
    assert [(status, body[:3]) for status, body in answers] == [(200, b"OK\n")] * 2
    [(status, body)] = (await raw_exchange(harness, raw_send_target(b"plain"),
                                           raw_send_target(b"caf\xe9")))[1:]
    assert status == 400 and b"Invalid char in url query" in body


async def test_raw_bytes_in_every_request_behind_a_keep_alive_proxy(
        make_harness: HarnessFactory, config: Config) -> None:
    config = config.replace({"server.raw_url_bytes_always": True})
    harness: Harness = await make_harness(cfg=config)
    answers = await raw_exchange(harness, raw_send_target(b"plain"), raw_send_target(b"caf\xe9"),
                                 raw_send_target(b"d\xc3\xa9j\xc3\xa0"))
    assert [(status, body[:3]) for status, body in answers] == [(200, b"OK\n")] * 3
    bodies = [(await harness.gateway.store.get_message(i)).body for i in (1, 2, 3)]
    assert bodies == ["plain", "café", "déjà"]


async def test_multi_recipient_ids_in_order_and_cost(harness: Harness) -> None:
    _, body = await harness.send(
        to="+33612345678,0033612345679, +447911123456", contentType="application/json")
    data = json.loads(body)
    assert data == {"status": 100, "creditLeft": "997", "SmsIds": ["1", "2", "3"]}
    receivers = [(await harness.gateway.store.get_message(i)).receiver for i in (1, 2, 3)]
    assert receivers == ["+33612345678", "+33612345679", "+447911123456"]


async def test_stop_clause_and_no_stop(harness: Harness) -> None:
    await harness.send(message="Promo")
    await harness.send(message="Code 1234", noStop="1")
    assert (await harness.gateway.store.get_message(1)).body == "Promo\nSTOP 36111"
    assert (await harness.gateway.store.get_message(2)).body == "Code 1234"
    await harness.manage.update_account(ACCOUNT, stop_clause="STOP au 36180")
    await harness.send(message="Promo")
    assert (await harness.gateway.store.get_message(3)).body == "Promo\nSTOP au 36180"


async def test_sender_for_response(harness: Harness) -> None:
    _, body = await harness.send(senderForResponse="1", contentType="text/json", **{
        "from": ...})
    assert json.loads(body)["status"] == 100
    message = await harness.gateway.store.get_message(1)
    assert message.sender == harness.gateway.config.send.reply_sender


async def test_tag_class_and_deferred_are_stored(harness: Harness) -> None:
    code = deferred_ahead(60, time_of_day="1830")
    _, body = await harness.send(tag="campaign-7", **{"class": "0"},
                                      deferred=code, contentType="text/json")
    assert json.loads(body)["status"] == 101
    message = await harness.gateway.store.get_message(1)
    assert (message.tag, message.klass, message.state) == ("campaign-7", 0, "deferred")
    # 18:30 on that day in Europe/Paris, whatever its offset from UTC then.
    from datetime import datetime
    from zoneinfo import ZoneInfo
    paris = ZoneInfo("Europe/Paris")
    assert datetime.fromtimestamp(message.deferred_until or 0, paris) == datetime(
        int(code[8:]), int(code[6:8]), int(code[4:6]), 18, 30, tzinfo=paris)


async def test_control_characters_in_tag_and_from_are_refused(harness: Harness) -> None:
    assert (await harness.send(tag="a\tb"))[1].startswith("KO\n202 Invalid tag")
    assert (await harness.send(**{"from": "AC\x00ME"}))[1].startswith("KO\n202 Invalid from")


async def test_too_many_recipients(make_harness: Any, config: Any) -> None:
    config = config.replace({"send.max_recipients": 2})
    h: Harness = await make_harness(cfg=config)
    _, body = await h.send(to="+33612345678,+33612345679,+33612345670")
    assert body == "KO\n202 Invalid to: at most 2 recipients per request"


# -- parts and encodings ---------------------------------------------------------------------

@pytest.mark.parametrize(("text", "parts", "coding"), [
    ("a" * 160, 1, 1), ("a" * 161, 2, 1), ("a" * 918, 6, 1),
    ("€" * 80, 1, 1), ("€" * 81, 2, 1),
    ("é" * 160, 1, 1),
    ("ç" * 70, 1, 2), ("ç" * 71, 2, 2), ("ç" * 402, 6, 2),
])
async def test_parts_at_the_boundaries(harness: Harness, text: str, parts: int,
                                       coding: int) -> None:
    _, body = await harness.send(message=text, noStop="1", contentType="text/json")
    data = json.loads(body)
    assert data["status"] == 100, body
    message = await harness.gateway.store.get_message(int(data["SmsIds"][0]))
    assert (message.parts, message.coding, message.credits) == (parts, coding, parts * 100)
    assert data["creditLeft"] == str(1000 - parts)


@pytest.mark.parametrize("text", ["a" * 919, "ç" * 403, "€" * 460])
async def test_more_than_six_parts_is_invalid(harness: Harness, text: str) -> None:
    _, body = await harness.send(message=text, noStop="1")
    assert body.startswith("KO\n202 Invalid message: 7 SMS parts, at most 6")
    assert await harness.balance() == 100_000


async def test_stop_clause_counts_toward_length(harness: Harness) -> None:
    # 150 + "\nSTOP 36111" (11) = 161 characters: two parts.
    _, body = await harness.send(message="a" * 150, contentType="text/json")
    message = await harness.gateway.store.get_message(int(json.loads(body)["SmsIds"][0]))
    assert message.parts == 2


async def test_forced_gsm_with_unicode_is_invalid(harness: Harness) -> None:
    _, body = await harness.send(message="ç", smsCoding="1")
    assert body.startswith("KO\n202 Invalid message for smsCoding=1")


async def test_forced_unicode_counts_ucs2(harness: Harness) -> None:
    _, body = await harness.send(message="a" * 71, smsCoding="2", noStop="1",
                                      contentType="text/json")
    message = await harness.gateway.store.get_message(int(json.loads(body)["SmsIds"][0]))
    assert (message.coding, message.parts) == (2, 2)


async def test_rate_table_by_prefix(make_harness: Any, config: Any) -> None:
    config = config.replace({"rates": {"+44": "2.5", "+1": "3"}})
    h: Harness = await make_harness(cfg=config, credits=100)
    _, body = await h.send(to="+447911123456,+33612345678", message="a" * 200,
                                noStop="1", contentType="text/json")
    # two parts each: 2 x 2.5 + 2 x 1
    assert json.loads(body)["creditLeft"] == "93"
    assert (await h.gateway.store.get_message(1)).credits == 500


async def test_credit_left_with_decimals(make_harness: Any, config: Any) -> None:
    config = config.replace({"send.default_rate": "0.05"})
    h: Harness = await make_harness(cfg=config, credits="1")
    assert await h.send(noStop="1") == (200, "OK\n0.95\n1")


async def test_a_stale_cached_stop_clause_does_not_refuse_for_ever(harness: Harness) -> None:
    from gateway.records import UNSET

    text = "a" * 910  # 6 parts alone, 7 with the STOP clause
    assert (await harness.send(message=text))[1].startswith("KO\n202 Invalid message: 7")
    other = open_store(harness.gateway.config.store.path, "cli")  # e.g. the CLI's process
    await other.open()
    try:
        await other.update_account(ACCOUNT, stop_clause="", callback_url=UNSET)
    finally:
        await other.close()
    assert (await harness.send(message=text))[1].startswith("OK")


async def test_a_send_cancelled_while_queued_is_committed_all_the_same(
        store: Store) -> None:
    import asyncio

    from gateway.clock import SystemClock
    from gateway.send.batcher import GroupCommitter

    account = await store.create_account("a", 1000, at=1.0)
    order = SendOrder(account_id=account.id, user_id=None, login="u", sender="S", body="b",
                      coding=1, parts=1, klass=1, no_stop=True, tag="",
                      recipients=("+33612345678",), costs=(100,))
    committer = GroupCommitter(store, SystemClock())
    committer.start()
    try:
        # The client hangs up while its order waits for the next batch.
        hung_up = asyncio.create_task(committer.submit(order))
        await asyncio.sleep(0)
        hung_up.cancel()
        # Bounded: a committer broken by the cancelled future would never answer.
        outcome = await asyncio.wait_for(committer.submit(order), 10)
        assert hung_up.cancelled()
        # Charged once for each: the cancelled order was not dropped, nor left half-done.
        assert outcome.ids == (2,) and outcome.credit_left == 800
    finally:
        await committer.stop()


async def test_a_deferral_beyond_the_maximum_is_refused_and_holds_nothing(
        make_harness: HarnessFactory, config: Config) -> None:
    """Issue 19 #22: `deferred` in 9999 was accepted and its credits held forever."""
    h = await make_harness(cfg=config.replace({"send.max_deferral_days": 30}), credits=10)
    for code in ("000001019999", deferred_ahead(31)):
        status, body = await h.send(deferred=code, contentType="application/json")
        assert status == 200 and json.loads(body)["status"] == 202, body
        assert "at most 30 days ahead" in json.loads(body)["message"]
    assert await h.balance() == 1000
    assert await h.gateway.store.list_messages(MessageFilter(account_id=1), limit=10) == []
    status, body = await h.send(deferred=deferred_ahead(29), contentType="application/json")
    assert json.loads(body)["status"] == 101 and await h.balance() == 900
