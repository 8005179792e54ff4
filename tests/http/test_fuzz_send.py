"""Property-based: whatever reaches the send URL, the answer is clean and the money exact.

For arbitrary parameter sets and raw bytes: never a 5xx, the body parses in the requested
format, and credits move only on success, by exactly what the stored messages cost.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote_from_bytes

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from gateway.credits import format_credits
from gateway.records import MessageFilter
from tests.conftest import ACCOUNT, LOGIN, PASSWORD, SEND_PATH, Harness
from tests.http.test_send import FORMATS, parse_body

NAMES = ["account", "smsAccount", "login", "password", "from", "to", "message", "contentType",
         "deferred", "class", "smsCoding", "SMSencoding", "noStop", "tag",
         "senderForResponse"]

VALID = {"account": ACCOUNT, "login": LOGIN, "password": PASSWORD, "from": "ACME",
         "to": "+33612345678", "message": "hello"}


def _case(name: str, draw: Any) -> str:
    return "".join(c.upper() if draw(st.booleans()) else c.lower() for c in name)


VALUES = {
    "to": st.one_of(st.just("+33612345678"), st.just("0033612345679,+447911123456"),
                    st.text(max_size=40), st.just("0612345678"),
                    st.lists(st.just("+33612345678"), max_size=8).map(",".join)),
    "message": st.one_of(st.text(min_size=1, max_size=400),
                         st.text(alphabet="a€ç😀\r\n", min_size=1, max_size=1000)),
    "deferred": st.one_of(st.just("000001012099"), st.text(alphabet="0123456789", max_size=13)),
    "class": st.sampled_from(["", "0", "1", "3", "4", "x"]),
    "smsCoding": st.sampled_from(["", "1", "2", "3"]),
    "noStop": st.sampled_from(["", "0", "1", "yes"]),
    "senderForResponse": st.sampled_from(["", "0", "1", "2"]),
    "from": st.one_of(st.just("ACME"), st.text(max_size=15)),
    "tag": st.text(max_size=25),
}


@st.composite
def requests(draw: Any) -> tuple[str, bytes]:
    fmt = draw(st.sampled_from(FORMATS))
    params: dict[str, str] = {k: v for k, v in VALID.items() if draw(st.floats(0, 1)) < 0.97}
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=4)):
        params[name] = draw(VALUES.get(name, st.text(max_size=30)))
    parts = [f"{_case(k, draw)}={quote_from_bytes(v.encode('utf-8', 'surrogatepass'))}"
             for k, v in params.items()]
    parts.append(f"contentType={fmt}")
    raw = "&".join(parts).encode()
    if draw(st.booleans()):
        # Arbitrary bytes, percent-encoded: invalid UTF-8 must fall back to Latin-1.
        junk = draw(st.binary(max_size=40))
        raw += b"&" + draw(st.sampled_from([b"message", b"tag", b"to", b"x"])) + b"=" + \
            quote_from_bytes(junk).encode()
    return fmt, raw


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=requests(), post=st.booleans())
async def test_send_url_is_total_and_exact(harness: Harness, case: tuple[str, bytes],
                                           post: bool) -> None:
    fmt, raw = case
    store = harness.gateway.store
    account = await store.get_account(ACCOUNT)
    before = account.balance
    last = await store.list_messages(MessageFilter(account.id), limit=1)
    last_id = last[0].id if last else 0
    if post:
        resp = await harness.client.post(SEND_PATH, data=raw, headers={
            "Content-Type": "application/x-www-form-urlencoded"})
    else:
        resp = await harness.client.get(f"{SEND_PATH}?{raw.decode()}")
    body = await resp.text()
    assert resp.status == 200, (resp.status, body)
    assert resp.content_type == fmt
    parsed = parse_body(fmt, body)
    event("accepted" if parsed["ok"] else f"refused {parsed.get('status', 'html')}")
    after = (await store.get_account(ACCOUNT)).balance
    new = await store.list_messages(MessageFilter(account.id), limit=1000)
    new = [m for m in new if m.id > last_id]
    if parsed["ok"]:
        ids = [int(i) for i in parsed["ids"]]
        assert sorted(m.id for m in new) == sorted(ids)
        assert before - after == sum(m.credits for m in new)
        assert parsed["creditLeft"] == format_credits(after)
    else:
        assert new == [] and after == before
    if after < 10_000:
        await harness.manage.credit_account(ACCOUNT, 1000)
