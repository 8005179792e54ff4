"""The admin API's export of an account's outgoing history, streamed (both backends)."""

from __future__ import annotations

import csv
import io
import json

from gateway.clock import ManualClock
from gateway.export import COLUMNS
from tests.conftest import ACCOUNT, LOGIN, Harness, HarnessFactory
from tests.http.test_admin_api import AUTH, call, sent_ids

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
EXPORT = f"/1.0/sms/{ACCOUNT}/outgoing/export"


async def test_an_export_streams_the_range_as_csv_or_json_lines(
        make_harness: HarnessFactory) -> None:
    clock = ManualClock(T0)
    h: Harness = await make_harness(clock=clock, credits=100)
    _, body = await h.send(to="+33612345678,+33612345679", tag="=cmd", noStop="1")
    ids = sent_ids(body)
    clock.advance(2 * 86400)
    await h.send(to="+33600000000", noStop="1")  # outside the range
    resp = await h.client.get(EXPORT, headers=AUTH,
                              params={"from": "2027-01-15", "to": "2027-01-16"})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in resp.headers["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    assert tuple(rows[0]) == COLUMNS
    assert [int(r["id"]) for r in rows] == ids
    assert rows[0]["creationDatetime"] == "2027-01-15T08:00:00Z"
    assert (rows[0]["login"], rows[0]["receiver"], rows[0]["tag"]) == \
        (LOGIN, "+33612345678", "'=cmd")  # a formula is defused
    resp = await h.client.get(EXPORT, headers=AUTH, params={
        "from": "2027-01-15T00:00:00Z", "to": "2027-01-20", "format": "jsonl",
        "login": LOGIN})
    lines = [json.loads(line) for line in (await resp.text()).splitlines()]
    assert [line["id"] for line in lines] == [*ids, ids[-1] + 1]
    assert lines[0]["numberOfSms"] == 1 and lines[0]["credits"] == 1


async def test_an_export_refuses_a_bad_range_before_streaming(harness: Harness) -> None:
    answer = await call(harness, "GET", EXPORT + "?from=2027-01-15")
    assert answer.status == 400 and answer.body["field"] == "to"
    answer = await call(harness, "GET", EXPORT + "?from=2027-01-15&to=2027-01-01")
    assert answer.status == 400 and answer.body["field"] == "to"
    answer = await call(harness, "GET", EXPORT + "?from=yesterday&to=2027-01-01")
    assert answer.status == 400 and answer.body["field"] == "from"
    answer = await call(harness, "GET", "/1.0/sms/nobody/outgoing/export"
                        "?from=2027-01-01&to=2027-01-02")
    assert answer.status == 404


async def test_an_account_s_retention_days_are_set_through_the_admin_api(
        harness: Harness) -> None:
    answer = await call(harness, "PUT", f"/1.0/sms/{ACCOUNT}",
                        {"retentionDays": 30, "personalDataDays": None})
    assert answer.status == 200 and answer.body["name"] == ACCOUNT
    view = await harness.manage.retention_of(ACCOUNT)
    assert (view["retentionDays"], view["appliedPersonalDataDays"]) == (30, 30)
    answer = await call(harness, "PUT", f"/1.0/sms/{ACCOUNT}", {"retentionDays": -1})
    assert answer.status == 400 and answer.body["field"] == "retentionDays"
    answer = await call(harness, "PUT", f"/1.0/sms/{ACCOUNT}", {"retentionDays": "30"})
    assert answer.status == 400 and answer.body["field"] == "retentionDays"
    # Half wrong changes nothing: the days are not kept when the callBack is refused.
    answer = await call(harness, "PUT", f"/1.0/sms/{ACCOUNT}",
                        {"retentionDays": 5, "callBack": "ftp://example.com/"})
    assert answer.status == 400 and answer.body["field"] == "callBack"
    assert (await harness.manage.retention_of(ACCOUNT))["retentionDays"] == 30
