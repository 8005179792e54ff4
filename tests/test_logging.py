"""One log event per request, and never a password or a query string in the logs."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from gateway import logs
from tests.conftest import ACCOUNT, LOGIN, PASSWORD, SEND_PATH, Harness


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure("json", "debug", stream=stream)
    yield stream
    logs.configure("console", "info")


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_one_event_per_request_without_secrets(harness: Harness,
                                                     log_stream: io.StringIO) -> None:
    await harness.send()
    await harness.send(password="Wrongpass77")
    await harness.send("POST", message="")
    await harness.client.get(f"{SEND_PATH}?account={ACCOUNT}&login={LOGIN}&password="
                             f"{PASSWORD}&from=ACME&to=%2B33612345678&message=QueryOnly")
    text = log_stream.getvalue()
    assert PASSWORD not in text and "Wrongpass77" not in text
    assert "QueryOnly" not in text and "password=" not in text
    sends = [e for e in events(log_stream) if e["event"] == "send"]
    assert [e["outcome"] for e in sends] == [100, 401, 201, 100]
    first = sends[0]
    assert (first["account"], first["login"], first["client_ip"], first["credits"]) == \
        (ACCOUNT, LOGIN, "127.0.0.1", "1")
    assert first["ids"] == "1" and len(first["request_id"]) == 16


def test_secret_fields_are_redacted(log_stream: io.StringIO) -> None:
    import structlog

    structlog.get_logger("t").info("oops", password="hunter22", token="abc", note="kept")
    (event,) = events(log_stream)
    assert event["password"] == "[redacted]" and event["token"] == "[redacted]"
    assert event["note"] == "kept"


async def test_library_errors_do_not_leak_the_request_line(harness: Harness,
                                                           log_stream: io.StringIO) -> None:
    # Longer than server.max_url_bytes: aiohttp's parser refuses it and logs an error whose
    # exception text quotes the request line, password included.
    resp = await harness.client.get(f"{SEND_PATH}?password={PASSWORD}&pad={'x' * 20_000}")
    assert resp.status in (400, 414)
    text = log_stream.getvalue()
    assert PASSWORD not in text
