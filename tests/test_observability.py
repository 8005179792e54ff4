"""Metrics, health and readiness, read the way Prometheus and a load balancer read them."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import health
from tests.conftest import ACCOUNT, Harness

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
    config.metrics.per_account_labels = False
    h: Harness = await make_harness()
    await h.send()
    m = await scrape(h)
    assert m[("http2sms_send_requests_total", (("outcome", "100"),))] == 1


async def test_metrics_need_the_admin_token(harness: Harness) -> None:
    assert (await harness.client.get("/metrics")).status == 401
    resp = await harness.client.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert resp.status == 401


async def test_health_and_readiness(harness: Harness, config: Any,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    resp = await harness.client.get("/healthz")
    assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    resp = await harness.client.get("/readyz")
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "ready"
    assert body["checks"]["store"] == "writable"

    monkeypatch.setattr(health, "READY_TIMEOUT", 0.3)
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


async def test_readiness_fails_over_the_backlog_bound(make_harness: Any, config: Any) -> None:
    config.metrics.max_backlog = 0
    h: Harness = await make_harness()
    await h.send(deferred="000001012099")
    await h.gateway.store.enqueue_outbox("callback", account_id=1, user_id=None,
                                         target="http://127.0.0.1:9/", payload={}, at=0.0)
    resp = await h.client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["checks"]["backlog"]["outbox"] >= 1
