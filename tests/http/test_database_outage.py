"""A PostgreSQL restart or failover under the send path: sends meanwhile answer 503 with
Retry-After and charge nothing, and the gateway reconnects by itself (issue 20)."""

from __future__ import annotations

import json

import pytest

from gateway.config import Config
from tests.conftest import Harness
from tests.store.test_postgresql import terminate_sessions


@pytest.mark.postgresql_only
async def test_sends_during_a_database_restart_get_503_then_the_gateway_reconnects(
        harness: Harness, config: Config) -> None:
    status, body = await harness.send(contentType="application/json")
    assert status == 200 and json.loads(body)["status"] == 100
    before = await harness.balance()
    assert await terminate_sessions(config.store.location) >= 1
    answers = [await harness.send(contentType="application/json") for _ in range(3)]
    accepted = 0
    for status, body in answers:
        if status == 503:
            assert "message" in json.loads(body)
        else:
            assert status == 200 and json.loads(body)["status"] == 100, body
            accepted += 1
    assert accepted >= 1, "the gateway did not reconnect"
    assert await harness.balance() == before - 100 * accepted  # a 503 charged nothing
    resp = await harness.client.get("/readyz")
    assert resp.status == 200
