"""The console's pure parts: forms read into the service's terms, the send estimate by the
send URL's rules, the account chart."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from gateway.console import chart, forms
from gateway.credits import RateTable
from gateway.records import MessageStats
from gateway.send import request as send_rules
from gateway.service import ValidationError

PARIS = ZoneInfo("Europe/Paris")


def test_a_quota_switched_off_is_none_and_a_blank_one_is_zero() -> None:
    assert forms.quota_field({"quotaLeft": "150"}) is None
    assert forms.quota_field({"quotaStatus": "1", "quotaLeft": " 150 "}) == "150"
    assert forms.quota_field({"quotaStatus": "on", "quotaLeft": ""}) == "0"


def test_an_alert_switched_off_clears_only_its_threshold() -> None:
    assert forms.alert_fields({"support": "sms"}) == {"alert_threshold": None}
    assert forms.alert_fields({"alertActive": "1", "alertThreshold": "20", "support": "both",
                               "alertEmail": " a@b.example ", "alertNumber": ""}) == {
        "alert_threshold": "20", "alert_support": "both", "alert_email": "a@b.example",
        "alert_number": None}


def test_the_suggested_address_joins_the_typed_ones_once() -> None:
    assert forms.restrictions(["1.2.3.4", " ", "5.6.7.8"], "9.9.9.9") == [
        "1.2.3.4", "5.6.7.8", "9.9.9.9"]
    assert forms.restrictions(["9.9.9.9"], "9.9.9.9") == ["9.9.9.9"]


@pytest.mark.parametrize("message", ["Hello", "ж" * 71, "x" * 154, "€" * 80, "a\r\nb"])
def test_the_estimate_counts_as_the_send_url_prices(message: str) -> None:
    rates = RateTable.from_config("1", {"+1": "2.5"})
    got = forms.estimate(message, "+33612345678, +15145550123", stop_clause="STOP 36111",
                         no_stop=False, rates=rates)
    params = {"account": "a", "login": "l", "password": "p", "from": "ACME",
              "to": "+33612345678,+15145550123", "message": message}
    order = send_rules.price(send_rules.parse(params, tz=PARIS, max_recipients=10),
                             account_id=1, user_id=1, sender="ACME", stop_clause="STOP 36111",
                             rates=rates)
    assert got.parts == order.parts and got.recipients == 2
    assert got.encoding == ("GSM" if order.coding == 1 else "Unicode")
    assert got.credits == f"{sum(order.costs) / 100:g}"


def test_the_outgoing_filters_refuse_with_the_field_named() -> None:
    where = forms.message_filter(7, {"login": "shop", "ptt": "4", "from": "2026-11-23",
                                     "to": "2026-11-23", "receiver": "0033612345678"}, PARIS)
    assert (where.account_id, where.login, where.ptt) == (7, "shop", 4)
    assert where.receiver == "+33612345678"
    assert where.created_to is not None and where.created_from is not None
    assert 86399 < where.created_to - where.created_from < 86400
    for query, field in (({"ptt": "x"}, "ptt"), ({"receiver": "12"}, "receiver"),
                         ({"from": "23/11/2026"}, "from")):
        with pytest.raises(ValidationError) as caught:
            forms.message_filter(7, query, PARIS)
        assert caught.value.field == field


def test_the_chart_draws_each_period_and_totals_the_rate() -> None:
    series = [MessageStats(0.0, 3, 1, 0, 400), MessageStats(3600.0), MessageStats(7200.0,
                                                                                 0, 0, 2, 200)]
    totals = chart.totals(series)
    assert (totals.messages, totals.credits, totals.delivery_rate) == (6, 600, 75.0)
    assert chart.totals([MessageStats(0.0)]).delivery_rate is None
    drawn = chart.svg(series, "SMS <sent>", lambda at: f"h{int(at // 3600)}")
    assert drawn.startswith("<svg") and "SMS &lt;sent&gt;" in drawn
    assert drawn.count('class="delivered"') == 1 and drawn.count('class="pending"') == 1
    assert "h0: 3 delivered, 1 failed, 0 pending, 4 credits" in drawn
    assert "style=" not in drawn  # the page's CSP allows no inline style


def test_whole_numbers_of_a_query_are_ascii_digits_within_64_bits() -> None:
    assert forms.whole_number("42") == 42
    assert forms.whole_number("9" * 18) == int("9" * 18)
    for raw in ("", "²", "٣", "-1", "1.5", " 1", "9" * 19):
        assert forms.whole_number(raw) is None, raw


def test_the_30_days_are_local_days_even_when_the_clocks_change() -> None:
    # 2026-10-25 in Paris has 25 hours (03:00 CEST becomes 02:00 CET).
    now = datetime(2026, 10, 27, 12, 0, tzinfo=PARIS).timestamp()
    since, quarters = chart.days_window(now, PARIS, 3)
    assert since == datetime(2026, 10, 25, tzinfo=PARIS).timestamp()
    assert quarters == (25 + 24 + 24) * 4
    late = datetime(2026, 10, 25, 23, 30, tzinfo=PARIS).timestamp()
    series = [MessageStats(since + n * chart.QUARTER) for n in range(quarters)]
    series[int((late - since) // chart.QUARTER)] = MessageStats(late, 1, 0, 0, 100)
    days = chart.by_day(series, PARIS)
    assert [datetime.fromtimestamp(d.start, PARIS).strftime("%d/%m %H:%M") for d in days] \
        == ["25/10 00:00", "26/10 00:00", "27/10 00:00"]
    assert [d.delivered for d in days] == [1, 0, 0] and days[0].credits == 100
    # UTC+5:45: midnight on a quarter of an hour.
    nepal = ZoneInfo("Asia/Kathmandu")
    since, quarters = chart.days_window(now, nepal, 1)
    assert quarters == 96 and since % chart.QUARTER == 0
