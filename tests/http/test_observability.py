"""Metrics, health and readiness, read the way Prometheus and a load balancer read them."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from gateway import health
from gateway.admin import api as admin_api
from gateway.clock import ManualClock
from gateway.config import Config
from gateway.metrics import Metrics
from gateway.operators.simulated import reference
from gateway.records import OperatorReport
from gateway.store import StoreUnavailable
from tests.conftest import ACCOUNT, LOGIN, Harness, deferred_ahead, eventually

TOKEN = {"Authorization": "Bearer test-admin-token-0123456789"}


async def scrape(h: Harness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = await h.client.get("/metrics", headers=TOKEN)
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_metrics_follow_a_scripted_workload(harness: Harness) -> None:
    for _ in range(3):
        assert (await harness.send(to="+33612345678,+33612345679"))[1].startswith("OK")
    await harness.send(password="Wrong1234")
    await harness.send(message="")
    await harness.send(**{"from": "NOPE"})
    m = await scrape(harness)
    assert m[("http2sms_send_requests_total", (("account", ACCOUNT), ("outcome", "100")))] == 3
    assert m[("http2sms_send_requests_total", (("account", ACCOUNT), ("outcome", "241")))] == 1
    # Before authentication the account is unknown: it must not become a label.
    assert m[("http2sms_send_requests_total", (("account", ""), ("outcome", "401")))] == 1
    assert m[("http2sms_send_requests_total", (("account", ""), ("outcome", "201")))] == 1
    assert m[("http2sms_messages_accepted_total", (("account", ACCOUNT),))] == 6
    assert m[("http2sms_credits_spent_total", (("account", ACCOUNT),))] == 6
    assert m[("http2sms_auth_failures_total", (("reason", "password"),))] == 1
    assert m[("http2sms_store_commit_batch_size_count", ())] == 3
    assert m[("http2sms_store_commit_seconds_count", ())] == 3
    assert ("http2sms_backlog", (("queue", "outbox_pending"),)) in m
    # No label anywhere carries a phone number or a message id.
    for _, labels in m:
        for _, value in labels:
            assert "+336" not in value


async def test_account_labels_can_be_switched_off(make_harness: Any, config: Any) -> None:
    config = config.replace({"metrics.per_account_labels": False})
    h: Harness = await make_harness(cfg=config)
    assert (await h.send())[1].startswith("OK")
    m = await scrape(h)
    assert m[("http2sms_send_requests_total", (("outcome", "100"),))] == 1
    assert m[("http2sms_messages_accepted_total", ())] == 1
    assert m[("http2sms_credits_spent_total", ())] == 1


async def test_metrics_need_the_admin_token(harness: Harness) -> None:
    assert (await harness.client.get("/metrics")).status == 401
    resp = await harness.client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401


@pytest.mark.sqlite_only  # locks the SQLite file to make the store unwritable
async def test_health_and_readiness(harness: Harness, config: Any,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    resp = await harness.client.get("/healthz")
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    resp = await harness.client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "ready"
    assert body["checks"]["store"] == "writable"

    monkeypatch.setattr(health, "READY_TIMEOUT", 0.3)
    monkeypatch.setattr(health, "RESULT_REUSE_SECONDS", 0.0)
    blocker = sqlite3.connect(config.store.path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        resp = await harness.client.get("/readyz")
        body = await resp.json()
        assert resp.status == 503 and body["status"] == "not ready"
        assert body["checks"]["store"].startswith("not writable")
    finally:
        blocker.rollback()
        blocker.close()
    # The store recovers, and a cancelled check left no transaction open behind it.
    assert (await harness.client.get("/readyz")).status == 200
    assert (await harness.send())[1].startswith("OK")


async def test_readiness_has_one_reuse_period(harness: Harness,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The answer's reuse period is the only one: with it at 0, the check right after the
    store comes back says writable (a second cache kept the failed probe for a second)."""
    monkeypatch.setattr(health, "RESULT_REUSE_SECONDS", 0.0)
    store = harness.gateway.store

    async def locked() -> None:
        raise StoreUnavailable("database is locked")

    with monkeypatch.context() as patched:
        patched.setattr(store, "check_writable", locked)
        resp = await harness.client.get("/readyz")
        assert resp.status == 503
        assert (await resp.json())["checks"]["store"] == "not writable: database is locked"
    resp = await harness.client.get("/readyz")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["checks"]["store"] == "writable"


async def test_readiness_fails_over_the_backlog_bound(make_harness: Any, config: Any) -> None:
    config = config.replace({"metrics.max_backlog": 0})
    h: Harness = await make_harness(cfg=config)
    await h.send(deferred=deferred_ahead(30))
    await h.gateway.store.enqueue_outbox("callback", account_id=1, user_id=None,
                                         target="http://127.0.0.1:9/", payload={}, at=0.0)
    resp = await h.client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["checks"]["backlog"]["outbox"] >= 1


# -- delivery, callbacks and alerts ----------------------------------------------------------

T0 = 1_700_000_000.0  # 2023-11-14 23:13:20 in Paris
PARIS = ZoneInfo("Europe/Paris")
Key = tuple[str, tuple[tuple[str, str], ...]]


def key(name: str, **labels: str) -> Key:
    return name, tuple(sorted(labels.items()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])



async def reaches(h: Harness, expected: dict[Key, float]) -> None:
    """Wait until every expected sample has its value (absent counts as 0, as for rate())."""
    seen: dict[Key, float] = {}

    async def check() -> bool:
        m = await scrape(h)
        seen.update({k: m.get(k, 0.0) for k in expected})
        return all(seen[k] == v for k, v in expected.items())
    try:
        await eventually(check)
    except AssertionError:
        raise AssertionError(f"expected {expected}, last scraped {seen}") from None


class Receiver:
    """A customer's callback endpoint answering per (message id, ptt), 200 by default."""

    def __init__(self) -> None:
        self.plan: dict[tuple[str, str], list[int]] = {}

    async def handle(self, request: web.Request) -> web.Response:
        answers = self.plan.get((request.query["id"], request.query["ptt"]), [])
        return web.Response(status=answers.pop(0) if answers else 200)


async def test_delivery_callback_and_alert_metrics_follow_a_scripted_workload(
        make_harness: Any, config: Config, aiohttp_server: Any) -> None:
    rec = Receiver()
    app = web.Application()
    app.router.add_get("/cb", rec.handle)
    server = await aiohttp_server(app)
    # No jitter and a 12 s retry window: a failure at T0 is retried at T0+5, a second one
    # there at the window's end, T0+12 (not T0+15), and a third one there gives up.
    config = config.replace({
        "callbacks.jitter_ratio": 0.0,
        "callbacks.first_retry_seconds": 5.0,
        "callbacks.give_up_after_hours": 12 / 3600,
        "smtp.host": "127.0.0.1", "smtp.port": free_port(),  # nobody listens there
    })
    clock = ManualClock(T0)
    h: Harness = await make_harness(cfg=config, clock=clock)
    await h.manage.update_user(ACCOUNT, LOGIN, callback_url=f"http://127.0.0.1:{server.port}/cb",
                               alert_threshold=999, alert_support="both",
                               alert_email="ops@example.com", alert_number="+33698765432")
    # A fresh store numbers messages from 1: the receiver's plan is set before the send.
    a, b, c = 1, 2, 3
    rec.plan[(str(b), "3")] = [500]           # B's "accepted" callback: retried, then ok
    rec.plan[(str(c), "23")] = [503] * 10     # C's failure callback: retried, then dead
    # A and B are delivered, C fails (ptt 23); the 3 credits cross the 999 threshold, and
    # neither the alert SMS nor C's refund brings the balance back up to it (no re-arm).
    status, body = await h.send(to="+33612345678,+33612345679,+33612399023")
    assert (status, body.split("\n")[2:]) == (200, [str(a), str(b), str(c)]), body

    await reaches(h, {
        key("http2sms_callback_attempts_total", result="ok"): 4,      # A3 A4 B4 C3
        key("http2sms_callback_attempts_total", result="retry"): 2,   # B3 C23
        key("http2sms_callback_attempts_total", result="dead"): 0,
        key("http2sms_alerts_total", channel="sms", result="ok"): 1,
        key("http2sms_alerts_total", channel="mail", result="retry"): 1,
        # Every message final before the clock moves (time to final is measured on it): on
        # a loaded machine the alert SMS's report could come after the advance below.
        key("http2sms_messages_final_total", ptt="4", dlr="1"): 3,
        key("http2sms_messages_final_total", ptt="23", dlr="16"): 1,
    })
    clock.advance(5)
    await reaches(h, {
        key("http2sms_callback_attempts_total", result="ok"): 5,      # + B3
        key("http2sms_callback_attempts_total", result="retry"): 3,   # + C23
        key("http2sms_alerts_total", channel="mail", result="retry"): 2,
    })
    clock.advance(7)
    await reaches(h, {
        key("http2sms_callback_attempts_total", result="ok"): 5,
        key("http2sms_callback_attempts_total", result="retry"): 3,
        key("http2sms_callback_attempts_total", result="dead"): 1,    # C23
        key("http2sms_alerts_total", channel="sms", result="ok"): 1,
        key("http2sms_alerts_total", channel="sms", result="dead"): 0,
        key("http2sms_alerts_total", channel="mail", result="retry"): 2,
        key("http2sms_alerts_total", channel="mail", result="dead"): 1,
        key("http2sms_backlog", queue="outbox_pending"): 0,
        key("http2sms_backlog", queue="outbox_dead"): 2,
    })

    m = await scrape(h)
    # A, B and the alert SMS delivered; C failed. Labels are codes only.
    finals = {k: v for k, v in m.items() if k[0] == "http2sms_messages_final_total"}
    assert finals == {key("http2sms_messages_final_total", ptt="4", dlr="1"): 3,
                      key("http2sms_messages_final_total", ptt="23", dlr="16"): 1}
    # The simulated network answers at once and the clock stood still: all in the first
    # bucket.
    assert m[key("http2sms_time_to_final_seconds_count")] == 4
    assert m[key("http2sms_time_to_final_seconds_bucket", le="0.5")] == 4
    assert m[key("http2sms_time_to_final_seconds_sum")] == 0
    # The send and the alert SMS: one hand-over each at least, one per message at most.
    assert 2 <= m[key("http2sms_operator_submit_seconds_count")] <= 4
    for queue in ("queued", "sent", "handover", "reports"):
        assert m[key("http2sms_backlog", queue=queue)] == 0, queue

    # A late duplicate report of a settled message changes nothing and is not counted.
    dispatcher = h.gateway.dispatcher
    assert dispatcher is not None
    applied = dispatcher.applied
    dispatcher.reports([OperatorReport.from_ptt(reference(a), 4, clock.now())])

    async def taken() -> bool:
        return dispatcher.applied > applied
    await eventually(taken)
    again = await scrape(h)
    assert again[key("http2sms_messages_final_total", ptt="4", dlr="1")] == 3
    assert again[key("http2sms_time_to_final_seconds_count")] == 4
    for _, labels in again:
        for _, label in labels:
            assert "+336" not in label and "example.com" not in label


async def test_time_to_final_counts_from_the_deferred_time(make_harness: Any) -> None:
    clock = ManualClock(T0)
    h: Harness = await make_harness(clock=clock)
    due = datetime.fromtimestamp(T0 + 7300, PARIS).replace(second=0)
    assert (await h.send(deferred=due.strftime("%H%M%d%m%Y")))[1].startswith("OK")
    clock.advance(due.timestamp() - T0)
    await reaches(h, {key("http2sms_time_to_final_seconds_count"): 1})
    m = await scrape(h)
    # Delivered two hours after acceptance, but at once once due: the wait the customer
    # asked for is not the network's delay.
    assert m[key("http2sms_time_to_final_seconds_sum")] == 0


async def test_readiness_fails_while_the_operator_is_down(
        harness: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "RESULT_REUSE_SECONDS", 0.0)  # the next probe checks again
    assert (await harness.client.get("/readyz")).status == 200
    assert harness.gateway.dispatcher is not None
    operator = harness.gateway.dispatcher.operator
    assert operator.link_status().up is True
    await operator.stop()
    resp = await harness.client.get("/readyz")
    assert resp.status == 503
    # With the operator's reason (issue 21: an SMSC refusing the bind says why).
    assert (await resp.json())["checks"]["operator"] == "disconnected: stopped"


async def test_metrics_move_to_the_admin_listener(make_harness: Any, config: Config,
                                                 aiohttp_client: Any) -> None:
    config = config.replace({"admin.host": "127.0.0.1"})
    h: Harness = await make_harness(cfg=config)
    assert (await h.send())[1].startswith("OK")
    # Not on the public address any more, token or not; health stays for load balancers.
    assert (await h.client.get("/metrics", headers=TOKEN)).status == 404
    assert (await h.client.get("/healthz")).status == 200
    admin = await aiohttp_client(admin_api.create_admin_app(h.gateway))
    assert (await admin.get("/metrics")).status == 401
    resp = await admin.get("/metrics", headers=TOKEN)
    assert resp.status == 200
    families = {f.name for f in text_string_to_metric_families(await resp.text())}
    assert "http2sms_send_requests" in families


# -- the dashboard ---------------------------------------------------------------------------

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana-dashboard.json"
_SUFFIXES = {"counter": ("_total",), "gauge": ("",),
             "histogram": ("_bucket", "_count", "_sum")}


def exposed() -> dict[str, set[str]]:
    """Every series name `Metrics` can expose, with its label names."""
    names: dict[str, set[str]] = {}
    for collector in vars(Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        labels = set(collector._labelnames)
        for family in collector.describe():
            for suffix in _SUFFIXES[family.type]:
                names[family.name + suffix] = labels | ({"le"} if suffix == "_bucket"
                                                        else set())
    return names


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def test_the_dashboard_queries_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    known = exposed()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    graphs = [p for p in panels(dashboard) if p["type"] != "row"]
    assert len({p["id"] for p in panels(dashboard)}) == len(panels(dashboard))
    assert len(graphs) >= 10
    queried: set[str] = set()
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            names = set(re.findall(r"\bhttp2sms_[a-z0-9_]+", expr))
            assert names, (panel["title"], expr)
            for name in names:
                assert name in known, (panel["title"], name)
            allowed = set().union(*(known[n] for n in names)) | {"instance", "job"}
            grouped = [label.strip() for group in
                       re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
                       for label in group.split(",") if label.strip()]
            matched = re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"', expr)
            for label in grouped + matched:
                assert label in allowed, (panel["title"], label)
            queried |= names
    for variable in variables.values():
        for name in re.findall(r"\bhttp2sms_[a-z0-9_]+", variable.get("definition", "")):
            assert name in known, (variable["name"], name)
    # Every metric family is on some panel.
    families = {n.removesuffix(s) for n in known for s in ("_total", "_bucket", "_count",
                                                             "_sum") if n.endswith(s)} | \
        {n for n in known if not n.endswith(("_total", "_bucket", "_count", "_sum"))}
    on_panels = {n.removesuffix(s) for n in queried for s in ("_total", "_bucket", "_count",
                                                              "_sum") if n.endswith(s)} | \
        {n for n in queried if not n.endswith(("_total", "_bucket", "_count", "_sum"))}
    assert families <= on_panels, families - on_panels
