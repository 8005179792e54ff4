"""Following one SMS through the logs, from its send URL to its last callback, without
ever logging a secret; and what the logs cost at the production level."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from aiohttp import web

from gateway import logs
from gateway.config import Config
from tests.conftest import ACCOUNT, LOGIN, PASSWORD, SEND_PATH, SENDER, Harness, eventually

CALLBACK_SECRET = "cbS3cretToken"
NUMBER = "+33612345678"


class LogCapture:
    def __init__(self) -> None:
        self.stream = io.StringIO()

    def configure(self, fmt: str = "json", level: str = "debug") -> None:
        logs.configure(fmt, level, stream=self.stream)

    @property
    def text(self) -> str:
        return self.stream.getvalue()

    def events(self) -> list[dict[str, Any]]:
        # Every line must be one JSON object: that is what a log shipper reads.
        return [json.loads(line) for line in self.text.splitlines() if line.strip()]


@pytest.fixture
def capture() -> Iterator[LogCapture]:
    # Put back exactly what was there, structlog's and the logging module's: later tests
    # may rely on the defaults.
    before = structlog.get_config()
    root = logging.getLogger()
    handlers, level, ours = list(root.handlers), root.level, logs._handler
    yield LogCapture()
    structlog.configure(**before)
    root.handlers[:] = handlers
    root.setLevel(level)
    logs._handler = ours


class Receiver:
    """A customer's callback endpoint; the first delivered (ptt 4) callback of one
    message fails."""

    def __init__(self, failing: int) -> None:
        self.calls: list[dict[str, str]] = []
        self.failing: str | None = str(failing)

    async def handle(self, request: web.Request) -> web.Response:
        self.calls.append(dict(request.query))
        if (request.query["id"], request.query["ptt"]) == (self.failing, "4"):
            self.failing = None
            return web.Response(status=500)
        return web.Response(text="ok")



def covers(ids: str, message_id: int) -> bool:
    """Whether a `send` event's ids ("12", "12-14", "12-14,20") include a message."""
    for part in ids.split(","):
        first, _, last = part.partition("-")
        if int(first) <= message_id <= int(last or first):
            return True
    return False


@dataclass
class Flow:
    message_id: int
    request_id: str
    host: str


async def run_flow(make_harness: Any, config: Config, aiohttp_server: Any) -> Flow:
    """One SMS with a callback that fails once, among other traffic; until all is done."""
    # A fresh store numbers messages from 1: the noise takes 1 and 2, the traced SMS is 3.
    receiver = Receiver(failing=3)
    app = web.Application()
    app.router.add_get("/cb", receiver.handle)
    server = await aiohttp_server(app)
    config = config.replace({"callbacks.first_retry_seconds": 0.05})
    h: Harness = await make_harness(cfg=config)
    await h.manage.update_user(
        ACCOUNT, LOGIN, callback_url=f"http://127.0.0.1:{server.port}/cb?token={CALLBACK_SECRET}")
    assert (await h.send(to="+33612345679,+33612345670"))[1].startswith("OK")  # noise
    resp = await h.client.get(SEND_PATH, params={
        "account": ACCOUNT, "login": LOGIN, "password": PASSWORD, "from": SENDER,
        "to": NUMBER, "message": "Trace me"})
    body = await resp.text()
    assert body.startswith("OK"), body
    message_id = int(body.split("\n")[2])
    assert message_id == 3
    assert (await h.send(to="+33612345671"))[1].startswith("OK")  # noise

    async def settled() -> bool:
        counts = await h.gateway.store.counts()
        return len(receiver.calls) == 9 and counts["outbox_pending"] == 0 and \
            counts["sent"] == counts["queued"] == 0
    await eventually(settled)
    return Flow(message_id, resp.headers["X-Request-Id"], f"127.0.0.1:{server.port}")


async def test_one_sms_is_followed_from_its_send_url_to_its_last_callback(
        make_harness: Any, config: Config, aiohttp_server: Any,
        capture: LogCapture) -> None:
    capture.configure("json", "debug")
    flow = await run_flow(make_harness, config, aiohttp_server)
    mid, request_id = flow.message_id, flow.request_id
    events = capture.events()

    # The send event: the request id (also the X-Request-Id header) and the message ids.
    (send,) = [e for e in events if e["event"] == "send" and e["request_id"] == request_id]
    assert send["outcome"] == 100 and covers(send["ids"], mid)
    others = [e for e in events if e["event"] == "send" and e is not send]
    assert len(others) == 2 and not any(covers(e["ids"], mid) for e in others)

    # From there on, every event about the SMS carries its message id.
    trail = [e for e in events if e.get("message_id") == mid]
    assert trail and trail[0]["event"] == "message_submitted"
    assert [(e["ptt"], e["final"]) for e in trail if e["event"] == "message_state"] == \
        [(3, False), (4, True)]
    callbacks = [(e["event"], e["ptt"], e["attempt"]) for e in trail
                 if e["event"].startswith("outbox_")]
    assert sorted(callbacks) == [("outbox_attempt_failed", 4, 1),
                                 ("outbox_attempt_ok", 3, 1), ("outbox_attempt_ok", 4, 2)]
    last = trail[-1]
    assert (last["event"], last["ptt"], last["attempt"]) == ("outbox_attempt_ok", 4, 2)
    # A URL can hold a secret: only its host is logged.
    assert {e["host"] for e in trail if "host" in e} == {flow.host}

    # No delivery or callback event is anonymous: each names its message.
    for event in events:
        if event["event"].startswith(("message_", "outbox_attempt", "outbox_item")) and \
                event.get("kind", "callback") == "callback":
            assert isinstance(event.get("message_id"), int), event
    assert len({e["message_id"] for e in events if e["event"] == "message_state"}) == 4

    text = capture.text
    assert PASSWORD not in text and "password=" not in text
    assert CALLBACK_SECRET not in text and "token=" not in text
    assert NUMBER not in text and "Trace me" not in text


async def test_the_production_level_logs_requests_and_trouble_not_every_message(
        make_harness: Any, config: Config, aiohttp_server: Any,
        capture: LogCapture) -> None:
    capture.configure("json", "info")
    flow = await run_flow(make_harness, config, aiohttp_server)
    events = capture.events()
    names = [e["event"] for e in events]
    # One line per request, and one per failed callback attempt: nothing per state change
    # or per successful callback, which at thousands of SMS/s would drown the rest.
    assert names.count("send") == 3
    assert not {"message_submitted", "message_state", "outbox_attempt_ok"} & set(names)
    (failed,) = [e for e in events if e["event"] == "outbox_attempt_failed"]
    assert (failed["message_id"], failed["ptt"], failed["level"]) == \
        (flow.message_id, 4, "info")
    assert any(e.get("request_id") == flow.request_id for e in events)


def test_library_records_are_json_lines_too(capture: LogCapture) -> None:
    capture.configure("json", "debug")
    # aiosqlite logs every statement and its results at debug: never wanted.
    logging.getLogger("aiosqlite").debug("executing %s", "SELECT password_hash")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    (event,) = capture.events()
    # The exception's type only: aiohttp's error texts can quote a request line (password).
    assert (event["event"], event["logger"], event["level"]) == \
        ("Error handling request (ValueError)", "aiohttp.server", "error")
    assert "boom" not in capture.text and "exception" not in event
    assert "password_hash" not in capture.text


def test_console_format_is_for_people(capture: LogCapture) -> None:
    capture.configure("console", "info")
    structlog.get_logger("t").info("send", request_id="abc", password="hunter22")
    structlog.get_logger("t").debug("message_state", message_id=1)
    line = capture.text.strip()
    assert "[info" in line and "send" in line and "request_id=abc" in line
    assert "hunter22" not in line and "\n" not in line


def test_id_ranges_match_the_send_event_format() -> None:
    assert logs.id_ranges([]) == ""
    assert logs.id_ranges([12]) == "12"
    assert logs.id_ranges([14, 12, 13, 13]) == "12-14"
    assert logs.id_ranges([12, 13, 14, 20, 31, 32]) == "12-14,20,31-32"
    assert logs.id_ranges(range(0, 100, 2), limit=2) == "0,2,+48 more"
    assert covers(logs.id_ranges([5, 6, 9]), 9) and not covers("5-6,9", 7)
