"""The HTTP edge of the send path: `GET`/`POST /cgi-bin/sms/http2sms.cgi`."""

from __future__ import annotations

import itertools
import secrets
import time

import structlog
from aiohttp import web

from gateway.hooks.http_client import CALLBACK_HEADER
from gateway.send import params as url_params
from gateway.send import request as rules
from gateway.send import responses
from gateway.send.pipeline import Answer, SendPipeline
from gateway.web_ip import caller_ip

PATH = "/cgi-bin/sms/http2sms.cgi"

log = structlog.get_logger("gateway.send")

# Request ids: a random per-process prefix and a counter, unique without uuid4's cost.
_ID_PREFIX = secrets.token_hex(4)
_ID_COUNTER = itertools.count(1)

PIPELINE = web.AppKey("send_pipeline", SendPipeline)


async def read_params(request: web.Request) -> dict[str, str]:
    # The raw query, not aiohttp's decoded one: values may be Latin-1 percent-encoded.
    raw_query = request.raw_path.partition("?")[2]
    params = url_params.parse(raw_query.encode("utf-8", "surrogateescape"))
    if request.method == "POST" and request.body_exists:
        ctype = request.content_type
        if ctype in ("", "application/x-www-form-urlencoded", "application/octet-stream",
                     "text/plain"):
            url_params.parse(await request.read(), into=params)
    return params


def connected(request: web.Request) -> bool:
    """Whether the client still waits for the answer. aiohttp does not cancel a handler
    whose client hung up, so the send path asks before it starts a costly password check:
    a flood of guesses that hang up at once must not keep scrypt busy. Once a check has
    started, the request runs to its end (a send that reaches the commit is committed)."""
    transport = request.transport
    return transport is not None and not transport.is_closing()


async def http2sms(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    request_id = f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFF:08x}"
    pipeline = request.app[PIPELINE]
    params = await read_params(request)
    client = caller_ip(request)
    looped = CALLBACK_HEADER in request.headers
    if looped:
        # One of our callbacks whose URL names this send URL: each report would send an
        # SMS, whose report would send another. Refused before anything is checked or
        # charged; answered 200, so the callback is done and not tried again.
        answer = Answer(rules.UNAUTHORIZED, rules.requested_format(params),
                        message=_CALLBACK_REFUSED,
                        log={"outcome": rules.UNAUTHORIZED, "reason": "callback loop",
                             "account": params.get("account", "")[:64],
                             "client_ip": str(client) if client else None})
    else:
        answer = await pipeline.send(params, client, connected=lambda: connected(request))
    event = log.error if answer.http_status == 503 else log.warning if looped else log.info
    event("send", request_id=request_id, method=request.method,
          duration_ms=round((time.perf_counter() - started) * 1000, 2), **answer.log)
    return render(answer, request_id)


_CALLBACK_REFUSED = ("A callback of this gateway cannot send SMS: a callBack URL names the "
                     "send URL")


def render(answer: Answer, request_id: str) -> web.Response:
    headers = {"X-Request-Id": request_id}
    if answer.retry_after:
        headers["Retry-After"] = str(answer.retry_after)
    if answer.http_status == 503:
        return web.json_response({"message": answer.message}, status=503, headers=headers)
    if answer.ok:
        body = responses.success(answer.fmt, answer.status, answer.credit_left, answer.ids)
    else:
        body = responses.failure(answer.fmt, answer.status, answer.message)
    # Clients read the outcome in the body; OVH answers 200 to every request it answers.
    # Content type and charset given to the constructor: set afterwards, each rebuilt the
    # header (2.2% of the send process under scripts/bench, py-spy).
    return web.Response(body=body.encode("utf-8"), status=answer.http_status,
                        headers=headers, content_type=answer.fmt.value, charset="utf-8")


def setup(app: web.Application) -> None:
    app.router.add_route("GET", PATH, http2sms)
    app.router.add_route("POST", PATH, http2sms)
