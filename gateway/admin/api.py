"""The admin REST API under `/1.0`, shaped like OVHcloud's `/sms` API.

Handlers only translate between JSON and the service layer (`gateway.service`): every rule
about what a valid account, sender or user is lives there, shared with the CLI. What is left
here is the wire format: field names, JSON types at the door, pagination, status codes.
"""

from __future__ import annotations

import json
import re
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import structlog
from aiohttp import web

from gateway import export, health, ptt, web_ip
from gateway.admin.openapi import document
from gateway.admin_auth import AdminAuth, Denied
from gateway.credits import as_number
from gateway.inflight import inflight_limit
from gateway.records import (
    IncomingMessage,
    LedgerEntry,
    Message,
    MessageEvent,
    User,
)
from gateway.service import (
    Management,
    ValidationError,
    account_view,
    int_param,
    outgoing_filter,
    user_view,
)
from gateway.store import Conflict, NotEnoughCredits, NotFound, StoreUnavailable
from gateway.tokens import Access
from gateway.web_ip import caller_ip

if TYPE_CHECKING:
    from gateway.app import Gateway

PREFIX = "/1.0"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

log = structlog.get_logger("gateway.admin")

MANAGE = web.AppKey("admin_manage", Management)
# Who the request's token lets in, set by `auth` on each request it lets through.
ACCESS = web.RequestKey("admin_access", Access)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An answer other than success, raised from anywhere in a handler."""

    def __init__(self, status: int, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers


def public(handler: Handler) -> Handler:
    """Mark a route as reachable without the admin token (reference data, the schema)."""
    handler.admin_public = True  # type: ignore[attr-defined]
    return handler


def all_accounts(handler: Handler) -> Handler:
    """Mark a route across accounts (creating one): only a token for all accounts may."""
    handler.admin_all_accounts = True  # type: ignore[attr-defined]
    return handler


def _error(status: int, message: str, field: str | None = None,
           headers: Mapping[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"message": message}
    if field is not None:
        body["field"] = field
    return web.json_response(body, status=status, headers=headers)


# -- middlewares --------------------------------------------------------------------------

@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every outcome becomes JSON; an unexpected exception is logged, never shown."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ApiError as exc:
        status = exc.status
        return _error(exc.status, exc.message, exc.field, exc.headers)
    except ValidationError as exc:
        status = 400
        return _error(400, str(exc), exc.field)
    except NotFound as exc:
        status = 404
        return _error(404, str(exc))
    except NotEnoughCredits as exc:
        # Only a quota larger than the account's balance gets here.
        status = 409
        return _error(409, "quotaLeft: " + str(exc).split(": ", 1)[-1], "quotaLeft")
    except Conflict as exc:
        status = 409
        return _error(409, str(exc))
    except StoreUnavailable as exc:
        status = 503
        log.error("admin_store_unavailable", method=request.method, path=request.path,
                  error=str(exc))
        return _error(503, "the store is unavailable, retry later",
                      headers={"Retry-After": "5"})
    except web.HTTPException as exc:
        # Unknown paths (404), wrong methods (405), bodies over the size limit (413).
        status = exc.status
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return _error(exc.status, exc.reason, headers=headers)
    except Exception as exc:
        # Frames only, no locals: a local may hold a password from the request body.
        log.error("admin_internal_error", method=request.method, path=request.path,
                  error_type=type(exc).__name__,
                  stack="".join(traceback.format_tb(exc.__traceback__)))
        return _error(500, "internal error")
    finally:
        # An audit trail of who changed what; bodies are never logged (they carry passwords).
        access: Access | None = request.get(ACCESS)
        log.info("admin_request", method=request.method, path=request.path, status=status,
                 peer=request.remote, by=access.name if access is not None else None,
                 duration_ms=round((time.perf_counter() - started) * 1000, 2))


_UNAUTHORIZED = {"WWW-Authenticate": 'Bearer realm="http2sms-admin"'}
AUTH = web.AppKey("admin_auth", AdminAuth)


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.handler
    if getattr(route, "admin_public", False):
        return await handler(request)
    try:
        access = await request.app[AUTH].check(request.headers.get("Authorization", ""),
                                               caller_ip(request))
    except Denied as denied:
        headers = _UNAUTHORIZED if denied.status == 401 else \
            {"Retry-After": str(denied.retry_after)} if denied.retry_after else None
        raise ApiError(denied.status, denied.message, headers=headers) from None
    request[ACCESS] = access
    # Another account's routes are answered as if it did not exist: a token limited to some
    # accounts learns nothing of the others, not even their names.
    account = request.match_info.get("account")
    if account is not None and not access.sees(account):
        raise ApiError(404, f"unknown account {account!r}")
    if getattr(route, "admin_all_accounts", False) and not access.everything:
        raise ApiError(403, "this token is limited to some accounts; this needs a token "
                            "for all accounts")
    return await handler(request)


def access_of(request: web.Request) -> Access:
    return request[ACCESS]


# -- request decoding ---------------------------------------------------------------------

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


async def read_object(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    """The JSON object of the body; any key outside `allowed` is refused, named."""
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "the body must be a JSON object")
    try:
        # Decimal keeps 12.34 exact on its way to the credit parser.
        body = json.loads(raw.decode("utf-8"), parse_float=Decimal,
                          parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    check_keys(body, allowed)
    return body


def check_keys(body: Mapping[str, Any], allowed: frozenset[str], parent: str = "") -> None:
    for key in sorted(body):
        if key not in allowed:
            name = f"{parent}.{key}" if parent else key
            raise ValidationError(name, "unknown or read-only field")


def number(name: str, value: Any, *, nullable: bool = False) -> Any:
    """Credits travel as JSON numbers, as the document says; the range and decimal rules are
    the service's (which also takes text, for the CLI)."""
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise ValidationError(name, "a number")
    return value


def required(body: Mapping[str, Any], name: str) -> Any:
    if name not in body:
        raise ValidationError(name, "required")
    return body[name]


def _query(request: web.Request, allowed: frozenset[str]) -> Mapping[str, str]:
    for key in request.query:
        if key not in allowed:
            raise ValidationError(key, "unknown query parameter")
    for key in set(request.query):
        if len(request.query.getall(key)) > 1:
            raise ValidationError(key, "given more than once")
    return request.query


def datetime_param(name: str, raw: str | None, *, end: bool = False) -> float | None:
    """ISO 8601, UTC when no offset is given; an `end` bound includes its whole second."""
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise ValidationError(name, "an ISO 8601 date and time such as "
                                    "2026-11-23T14:55:04Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        at = moment.timestamp()
    except (OverflowError, ValueError):
        raise ValidationError(name, "out of range") from None
    # Responses show whole seconds, so `to=<a creationDatetime>` must include that message.
    if end and moment.microsecond == 0:
        at += 0.999999
    return at


def iso(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def page(request: web.Request, items: list[Any], cursor: Callable[[Any], int], limit: int,
         name: str) -> tuple[list[Any], dict[str, str]]:
    """Cut one extra row off a keyset page; if it existed, point at the next page."""
    if len(items) <= limit:
        return items, {}
    items = items[:limit]
    nxt = str(cursor(items[-1]))
    query = {k: v for k, v in request.query.items() if k != name}
    query[name] = nxt
    url = f"{request.path}?{urlencode(query)}"
    return items, {"X-Next-Cursor": nxt, "Link": f'<{url}>; rel="next"'}


def _limit(query: Mapping[str, str]) -> int:
    limit = int_param("limit", query.get("limit"), DEFAULT_LIMIT, 1, MAX_LIMIT)
    assert limit is not None
    return limit


def _location(request: web.Request, *parts: str) -> dict[str, str]:
    return {"Location": "/".join([request.path.rstrip("/"),
                                  *(quote(p, safe="") for p in parts)])}


# -- reference data and the schema --------------------------------------------------------

@public
async def get_ptt(request: web.Request) -> web.Response:
    query = _query(request, frozenset({"ptt"}))
    raw = query.get("ptt")
    if raw is None:
        raise ValidationError("ptt", "required")
    text = raw.strip()
    if not re.fullmatch(r"-?[0-9]+", text):
        raise ValidationError("ptt", "not a number")
    # Beyond 19 digits no code can match, and int() would refuse thousands of digits.
    found = ptt.lookup(int(text)) if len(text) <= 19 else None
    if found is None:
        raise ApiError(404, f"unknown ptt code {text[:20]}")
    return web.json_response(ptt.as_api_dict(found))


_SCHEMA = json.dumps(document(), indent=1).encode("utf-8")


@public
async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=_SCHEMA, content_type="application/json")


# -- accounts -----------------------------------------------------------------------------

def _manage(request: web.Request) -> Management:
    return request.app[MANAGE]


def _account_json(request: web.Request, account: Any) -> dict[str, Any]:
    return account_view(account, _manage(request).config.send.stop_clause)


async def list_accounts(request: web.Request) -> web.Response:
    _query(request, frozenset())
    names = await _manage(request).store.list_accounts()
    return web.json_response(access_of(request).visible(names))


@all_accounts
async def create_account(request: web.Request) -> web.Response:
    body = await read_object(request, frozenset({"name", "credits"}))
    account = await _manage(request).create_account(
        required(body, "name"), number("credits", body.get("credits", 0)))
    return web.json_response(_account_json(request, account), status=201,
                             headers=_location(request, account.name))


async def get_account(request: web.Request) -> web.Response:
    _query(request, frozenset())
    account = await _manage(request).store.get_account(request.match_info["account"])
    return web.json_response(_account_json(request, account))


async def update_account(request: web.Request) -> web.Response:
    body = await read_object(request, frozenset({"callBack", "stopClause", "retentionDays",
                                                 "personalDataDays"}))
    changes: dict[str, Any] = {}
    if "callBack" in body:
        changes["callback_url"] = body["callBack"]
    if "stopClause" in body:
        changes["stop_clause"] = body["stopClause"]
    # The account's own retention (docs/retention.md); null: the server's.
    if "retentionDays" in body:
        changes["retention_days"] = body["retentionDays"]
    if "personalDataDays" in body:
        changes["personal_data_days"] = body["personalDataDays"]
    account = await _manage(request).update_account(request.match_info["account"], **changes)
    return web.json_response(_account_json(request, account))


async def credit_account(request: web.Request) -> web.Response:
    body = await read_object(request, frozenset({"amount"}))
    account = await _manage(request).credit_account(
        request.match_info["account"], number("amount", required(body, "amount")))
    return web.json_response(_account_json(request, account))


async def list_ledger(request: web.Request) -> web.Response:
    query = _query(request, frozenset({"limit", "after"}))
    limit = _limit(query)
    after = int_param("after", query.get("after"), 0, 0)
    entries = await _manage(request).store.list_ledger(
        request.match_info["account"], limit=limit + 1, after_id=after or 0)
    entries, headers = page(request, entries, lambda e: e.id, limit, "after")
    return web.json_response([ledger_view(e) for e in entries], headers=headers)


def ledger_view(entry: LedgerEntry) -> dict[str, Any]:
    return {"id": entry.id, "date": iso(entry.at), "kind": entry.kind, "login": entry.login,
            "from": entry.source, "to": entry.target, "amount": as_number(entry.amount),
            "reference": entry.reference}


# -- senders ------------------------------------------------------------------------------

async def list_senders(request: web.Request) -> web.Response:
    _query(request, frozenset())
    account = await _manage(request).store.get_account(request.match_info["account"])
    return web.json_response(list(account.senders))


async def add_sender(request: web.Request) -> web.Response:
    body = await read_object(request, frozenset({"sender"}))
    sender = await _manage(request).add_sender(request.match_info["account"],
                                               required(body, "sender"))
    return web.json_response({"sender": sender}, status=201,
                             headers=_location(request, sender))


async def get_sender(request: web.Request) -> web.Response:
    _query(request, frozenset())
    sender = request.match_info["sender"]
    account = await _manage(request).store.get_account(request.match_info["account"])
    if sender not in account.senders:
        raise ApiError(404, f"unknown sender {sender!r}")
    return web.json_response({"sender": sender})


async def remove_sender(request: web.Request) -> web.Response:
    _query(request, frozenset())
    await _manage(request).remove_sender(request.match_info["account"],
                                         request.match_info["sender"])
    return web.Response(status=204)


# -- API users ----------------------------------------------------------------------------

async def list_users(request: web.Request) -> web.Response:
    _query(request, frozenset())
    return web.json_response(
        await _manage(request).store.list_users(request.match_info["account"]))


async def create_user(request: web.Request) -> web.Response:
    body = await read_object(request, frozenset({"login", "password"}))
    login, password = required(body, "login"), required(body, "password")
    user = await _manage(request).create_user(request.match_info["account"], login, password)
    return web.json_response(user_view(user), status=201,
                             headers=_location(request, user.login))


async def get_user(request: web.Request) -> web.Response:
    _query(request, frozenset())
    user = await _manage(request).store.get_user(request.match_info["account"],
                                                 request.match_info["login"])
    return web.json_response(user_view(user))


_USER_FIELDS = frozenset({"login", "password", "quotaInformations",
                          "alertThresholdInformations", "ipRestrictions", "callBack"})
_QUOTA_FIELDS = frozenset({"quotaStatus", "quotaLeft"})
_ALERT_FIELDS = {"alertThreshold": "alert_threshold", "support": "alert_support",
                 "alertEmail": "alert_email", "alertNumber": "alert_number"}


def user_changes(body: Mapping[str, Any], current: User) -> dict[str, Any]:
    """Map an `sms.User` (any subset) to the service's field names.

    Values are not checked here, only the object's shape: `update_user` validates them all
    before writing anything, so a half-invalid body changes nothing.
    """
    fields: dict[str, Any] = {}
    if "login" in body and body["login"] != current.login:
        raise ValidationError("login", "cannot be changed; create a new user instead")
    for key, name in (("password", "password"), ("ipRestrictions", "ip_restrictions"),
                      ("callBack", "callback_url")):
        if key in body:
            fields[name] = body[key]
    if "quotaInformations" in body:
        quota = _object(body, "quotaInformations", _QUOTA_FIELDS)
        status = quota.get("quotaStatus")
        if "quotaStatus" in quota and status not in ("active", "inactive"):
            raise ValidationError("quotaStatus", "active or inactive")
        left = quota.get("quotaLeft")
        if "quotaLeft" in quota:
            number("quotaLeft", left)
        if status == "inactive":
            # What GET shows for an inactive quota (0) may come back; anything else is a
            # contradiction the caller should hear about.
            if left not in (None, 0):
                raise ValidationError("quotaLeft", "must be 0 when quotaStatus is inactive")
            fields["quota"] = None
        elif "quotaLeft" in quota:
            fields["quota"] = left
        elif status == "active" and not current.quota_active:
            fields["quota"] = 0
    if "alertThresholdInformations" in body:
        alert = _object(body, "alertThresholdInformations", frozenset(_ALERT_FIELDS))
        for key, name in _ALERT_FIELDS.items():
            if key in alert:
                fields[name] = alert[key]
        if "alertThreshold" in alert:
            number("alertThreshold", alert["alertThreshold"], nullable=True)
    return fields


def _object(body: Mapping[str, Any], name: str, allowed: frozenset[str]) -> dict[str, Any]:
    value = body[name]
    if not isinstance(value, dict):
        raise ValidationError(name, "an object")
    check_keys(value, allowed, parent=name)
    return value


async def update_user(request: web.Request) -> web.Response:
    body = await read_object(request, _USER_FIELDS)
    manage = _manage(request)
    account, login = request.match_info["account"], request.match_info["login"]
    current = await manage.store.get_user(account, login)
    fields = user_changes(body, current)
    user = await manage.update_user(account, login, **fields) if fields else current
    return web.json_response(user_view(user))


async def delete_user(request: web.Request) -> web.Response:
    _query(request, frozenset())
    await _manage(request).delete_user(request.match_info["account"],
                                       request.match_info["login"])
    return web.Response(status=204)


# -- messages -----------------------------------------------------------------------------

_OUTGOING_QUERY = frozenset({"limit", "before", "ptt", "receiver", "sender", "tag",
                             "creationDatetime.from", "creationDatetime.to"})


async def list_outgoing(request: web.Request) -> web.Response:
    query = _query(request, _OUTGOING_QUERY)
    limit = _limit(query)
    before = int_param("before", query.get("before"), None, 1)
    store = _manage(request).store
    user = await store.get_user(request.match_info["account"], request.match_info["login"])
    where = outgoing_filter(
        user.account_id, query,
        # By login, not user id: the history of a deleted and re-created login stays its own.
        login=user.login, period=("creationDatetime.from", "creationDatetime.to"),
        moment=lambda name, raw, end: datetime_param(name, raw, end=end))
    messages = await store.list_messages(where, limit=limit + 1, before_id=before)
    messages, headers = page(request, messages, lambda m: m.id, limit, "before")
    return web.json_response([m.id for m in messages], headers=headers)


_EXPORT_QUERY = frozenset({"from", "to", "login", "format"})


async def export_outgoing(request: web.Request) -> web.StreamResponse:
    """The account's outgoing history (gateway.export), streamed a page at a time: the
    answer starts before the last message is read, and memory holds one page."""
    query = _query(request, _EXPORT_QUERY)
    fmt = query.get("format", "csv")
    if fmt not in export.FORMATS:
        raise ValidationError("format", "csv or jsonl")
    bounds: list[float] = []
    for name, end in (("from", False), ("to", True)):
        raw = query.get(name)
        if raw is None:
            raise ValidationError(name, "required: a day such as 2026-11-23 or an ISO 8601 "
                                        "time")
        try:
            bounds.append(export.parse_bound(raw, end=end))
        except ValueError as exc:
            raise ValidationError(name, str(exc)) from None
    account = request.match_info["account"]
    # Checked (account, range) before the first byte: an error is still a JSON answer.
    pages = await _manage(request).export(account, created_from=bounds[0],
                                          created_to=bounds[1], login=query.get("login"))
    response = web.StreamResponse(headers={
        "Content-Type": export.CONTENT_TYPES[fmt],
        "Content-Disposition": f'attachment; filename="{account}-outgoing.{fmt}"'})
    await response.prepare(request)
    await response.write(export.header(fmt).encode())
    async for page in pages:
        await response.write(export.lines(page, fmt).encode())
    await response.write_eof()
    return response


async def get_outgoing(request: web.Request) -> web.Response:
    _query(request, frozenset())
    store = _manage(request).store
    user = await store.get_user(request.match_info["account"], request.match_info["login"])
    raw = request.match_info["id"]
    message_id = int_param("id", raw, None, 1)
    assert message_id is not None
    try:
        message = await store.get_message(message_id)
    except NotFound:
        message = None
    if message is None or message.account_id != user.account_id or message.login != user.login:
        raise ApiError(404, f"unknown message {message_id}")
    return web.json_response(outgoing_view(message, await store.message_events(message.id)))


async def list_incoming(request: web.Request) -> web.Response:
    query = _query(request, frozenset({"limit", "before"}))
    limit = _limit(query)
    before = int_param("before", query.get("before"), None, 1)
    store = _manage(request).store
    messages = await store.list_incoming(request.match_info["account"], limit=limit + 1,
                                         before_id=before)
    messages, headers = page(request, messages, lambda m: m.id, limit, "before")
    return web.json_response([m.id for m in messages], headers=headers)


async def get_incoming(request: web.Request) -> web.Response:
    _query(request, frozenset())
    message_id = int_param("id", request.match_info["id"], None, 1)
    assert message_id is not None
    found = await _manage(request).store.list_incoming(
        request.match_info["account"], limit=1, before_id=message_id + 1)
    if not found or found[0].id != message_id:
        raise ApiError(404, f"unknown incoming message {message_id}")
    return web.json_response(incoming_view(found[0]))


def incoming_view(message: IncomingMessage) -> dict[str, Any]:
    """`sms.Incoming` (OVH's fields; `credits` left out: receiving costs nothing here)."""
    return {"id": message.id, "creationDatetime": iso(message.created_at),
            "sender": message.sender, "message": message.body, "tag": message.tag}


def outgoing_view(message: Message, events: list[MessageEvent]) -> dict[str, Any]:
    """`sms.Outgoing`, with the state history the gateway keeps."""
    return {
        "id": message.id,
        "creationDatetime": iso(message.created_at),
        "credits": as_number(message.credits),
        "deliveredAt": iso(message.delivered_at),
        "deliveryReceipt": message.dlr,
        "message": message.body,
        "messageLength": len(message.body),
        "numberOfSms": message.parts,
        "ptt": message.ptt,
        "receiver": message.receiver,
        "sender": message.sender,
        "tag": message.tag,
        "sentAt": iso(message.sent_at),
        "history": [{"date": iso(e.at), "ptt": e.ptt, "dlr": e.dlr, "description": e.note}
                    for e in events],
    }


# -- wiring -------------------------------------------------------------------------------

# (method, path under /1.0, handler): the one list the app and the OpenAPI check read.
# `/sms/ptts` comes before `/sms/{account}`, which would otherwise take it.
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/openapi.json", get_openapi),
    ("GET", "/sms/ptts", get_ptt),
    ("GET", "/sms", list_accounts),
    ("POST", "/sms", create_account),
    ("GET", "/sms/{account}", get_account),
    ("PUT", "/sms/{account}", update_account),
    ("POST", "/sms/{account}/credits", credit_account),
    ("GET", "/sms/{account}/ledger", list_ledger),
    ("GET", "/sms/{account}/senders", list_senders),
    ("POST", "/sms/{account}/senders", add_sender),
    ("GET", "/sms/{account}/senders/{sender}", get_sender),
    ("DELETE", "/sms/{account}/senders/{sender}", remove_sender),
    ("GET", "/sms/{account}/users", list_users),
    ("POST", "/sms/{account}/users", create_user),
    ("GET", "/sms/{account}/users/{login}", get_user),
    ("PUT", "/sms/{account}/users/{login}", update_user),
    ("DELETE", "/sms/{account}/users/{login}", delete_user),
    ("GET", "/sms/{account}/incoming", list_incoming),
    ("GET", "/sms/{account}/incoming/{id}", get_incoming),
    ("GET", "/sms/{account}/outgoing/export", export_outgoing),
    ("GET", "/sms/{account}/users/{login}/outgoing", list_outgoing),
    ("GET", "/sms/{account}/users/{login}/outgoing/{id}", get_outgoing),
)


# What the public listener keeps of /1.0 when the admin API has its own listener.
PUBLIC_LISTENER = frozenset({get_ptt})


def build_api(gateway: Gateway, *, admin: bool = True) -> web.Application:
    """The `/1.0` sub-application: every route, or (admin=False) only the public ones."""
    config = gateway.config
    # Without the admin routes there is nothing to authenticate: unknown paths get 404.
    api = web.Application(client_max_size=config.server.max_request_bytes,
                          middlewares=[errors, auth] if admin else [errors])
    api[MANAGE] = Management(gateway.store, config, gateway.clock)
    api[AUTH] = gateway.admin_auth
    for method, path, handler in ROUTES:
        if admin or handler in PUBLIC_LISTENER:
            api.router.add_route(method, path, handler)
    return api


def setup(app: web.Application, gateway: Gateway) -> None:
    """Mount `/1.0` on the public app: the whole admin API unless it has its own listener."""
    app.add_subapp(PREFIX, build_api(gateway, admin=not gateway.config.admin.host))


def create_admin_app(gateway: Gateway) -> web.Application:
    """The app of the separate admin listener: `/1.0` and `/metrics`, no send URL."""
    app = web.Application(client_max_size=gateway.config.server.max_request_bytes,
                          middlewares=[inflight_limit(gateway.config.server.max_inflight,
                                                         gateway.metrics)])
    web_ip.trust(app, gateway.config.server.trusted_proxies)
    app.add_subapp(PREFIX, build_api(gateway, admin=True))
    health.setup_admin(app, gateway)  # the public listener then has no /metrics
    return app
