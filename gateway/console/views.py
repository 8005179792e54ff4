"""The web console's routes: each handler reads its form, calls the service layer the CLI
and the admin API share (`gateway.service.Management`, the send pipeline) and renders a
page. No rule is decided here: a refusal is the service's `ValidationError`, shown next to
the field it names with the service's own message.

Middlewares, outermost first: `protect` (security headers, error pages, the audit line of
every change), `authenticate` (the session cookie, the CSRF token of every POST, the
account a console user may manage: any other answers 404 as if it did not exist).
"""

from __future__ import annotations

import csv
import io
import secrets
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

import aiohttp_jinja2
import jinja2
import structlog
from aiohttp import web
from markupsafe import Markup

from gateway import iprules
from gateway import ptt as ptt_module
from gateway.clock import Clock
from gateway.config import Config
from gateway.console import chart, forms
from gateway.console.sessions import ConsoleAuth, LoginRefused, csrf_matches, flash_signature
from gateway.credits import format_credits
from gateway.records import Account, ConsoleSession, Message
from gateway.send.pipeline import SendPipeline
from gateway.service import Management, ValidationError, user_view
from gateway.store import Conflict, NotEnoughCredits, NotFound, StoreUnavailable
from gateway.web_ip import TRUSTED_PROXIES, caller_ip

PREFIX = "/console"
COOKIE = "h2s_console"
LOGIN_COOKIE = "h2s_console_login"
PAGE = 50
EXPORT_PAGE = 1000
_HERE = Path(__file__).parent

log = structlog.get_logger("gateway.console")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SESSION = web.RequestKey("console_session", ConsoleSession)
ACCOUNT = web.RequestKey("console_account", Account)

# No inline script or style anywhere: every asset is a file of the package.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"}


@dataclass(frozen=True)
class Services:
    """What the console's views get of the gateway when they are built."""

    manage: Management
    auth: ConsoleAuth
    pipeline: SendPipeline
    config: Config
    clock: Clock

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.config.send.timezone)


SERVICES = web.AppKey("console_services", Services)


H = TypeVar("H", bound=Callable[..., Awaitable[web.StreamResponse]])


def public(handler: H) -> H:
    handler.console_public = True  # type: ignore[attr-defined]
    return handler


def operator_only(handler: H) -> H:
    handler.console_operator = True  # type: ignore[attr-defined]
    return handler


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


# -- middlewares --------------------------------------------------------------------------

@web.middleware
async def protect(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:  # a redirect
                status = exc.status
                exc.headers.update(_HEADERS)
                exc.headers["Cache-Control"] = "no-store"
                raise
            response = _error_page(request, exc.status, exc.reason)
        except NotFound:
            response = _error_page(request, 404, "Not found")
        except ValidationError as exc:
            # A form handler shows it next to its field; this is a query's (an export's).
            response = _error_page(request, 400, str(exc))
        except StoreUnavailable:
            response = _error_page(request, 503, "The store is unavailable: retry later")
            response.headers["Retry-After"] = "5"
        except Exception as exc:
            # Frames only, no locals: a local may hold a password from the form.
            log.error("console_internal_error", method=request.method, path=request.path,
                      error_type=type(exc).__name__,
                      stack="".join(traceback.format_tb(exc.__traceback__)))
            response = _error_page(request, 500, "Internal error")
        status = response.status
        response.headers.update(_HEADERS)
        if not request.path.startswith(f"{PREFIX}/static/"):
            # Pages carry personal data (numbers, messages): kept by no cache.
            response.headers["Cache-Control"] = "no-store"
        return response
    finally:
        if request.method != "GET":
            # The audit trail of every change: who, what, the outcome; never the form.
            session = request.get(SESSION)
            log.info("console_request", method=request.method, path=request.path,
                     status=status, peer=request.remote,
                     by=session.user.email if session is not None else None,
                     duration_ms=round((time.perf_counter() - started) * 1000, 2))


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = request.match_info.handler
    if getattr(route, "console_public", False) or request.path.startswith(f"{PREFIX}/static/"):
        return await handler(request)
    services = _services(request)
    session = await services.auth.session(request.cookies.get(COOKIE, ""))
    if session is None:
        target = request.path_qs if request.method == "GET" else f"{PREFIX}/"
        raise web.HTTPSeeOther(f"{PREFIX}/login?{urlencode({'next': target})}")
    request[SESSION] = session
    if request.method == "POST":
        form = await request.post()
        presented = request.headers.get("X-CSRF-Token") or str(form.get("_csrf", ""))
        if not csrf_matches(session, presented):
            raise web.HTTPForbidden(reason="The form has expired: reload the page and "
                                           "try again")
    if getattr(route, "console_operator", False) and not session.user.operator:
        raise NotFound("operators only")
    account = request.match_info.get("account")
    if account is not None:
        if not session.user.manages(account):
            raise NotFound(f"unknown account {account!r}")
        request[ACCOUNT] = await services.manage.store.get_account(account)
    return await handler(request)


def _error_page(request: web.Request, status: int, reason: str) -> web.Response:
    return aiohttp_jinja2.render_template("error.html", request,
                                          _context(request, status=status, reason=reason),
                                          status=status)


# -- rendering ----------------------------------------------------------------------------

def _context(request: web.Request, **values: Any) -> dict[str, Any]:
    session = request.get(SESSION)
    account = request.get(ACCOUNT)
    context: dict[str, Any] = {
        "prefix": PREFIX, "session": session, "user": session.user if session else None,
        "csrf": session.csrf if session else "", "account": account,
        "errors": {}, "form": {}, "flash": _flash(request, session),
    }
    context.update(values)
    return context


def render(request: web.Request, template: str, status: int = 200,
           **values: Any) -> web.Response:
    return aiohttp_jinja2.render_template(template, request, _context(request, **values),
                                          status=status)


def _base(request: web.Request) -> str:
    return f"{PREFIX}/a/{quote(request[ACCOUNT].name, safe='')}"


def done(request: web.Request, url: str, message: str) -> web.HTTPSeeOther:
    """After a change, the page again (POST, redirect, GET), saying what was done."""
    url, hash_, fragment = url.partition("#")
    separator = "&" if "?" in url else "?"
    said = urlencode({"done": message, "sig": flash_signature(request[SESSION], message)})
    return web.HTTPSeeOther(f"{url}{separator}{said}{hash_}{fragment}")


def _flash(request: web.Request, session: ConsoleSession | None) -> str:
    """What `done` said, when it was said to this session: a link made elsewhere cannot put
    its own words ("call this number") on a console page."""
    message, signature = request.query.get("done", ""), request.query.get("sig", "")
    if session is None or not message or \
            not secrets.compare_digest(flash_signature(session, message), signature):
        return ""
    return message


def _errors(exc: ValidationError) -> dict[str, str]:
    return {exc.field: str(exc).split(": ", 1)[-1]}


async def _form(request: web.Request) -> dict[str, str]:
    return {k: str(v) for k, v in (await request.post()).items() if isinstance(v, str)}


# -- login --------------------------------------------------------------------------------

@public
async def login_page(request: web.Request) -> web.Response:
    token = _login_token(request)
    response = render(request, "login.html", login_csrf=token,
                      next=_next(request.query.get("next", "")))
    _set_login_cookie(request, response, token)
    return response


@public
async def login(request: web.Request) -> web.StreamResponse:
    form = await _form(request)
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    token = _login_token(request)
    nxt = _next(form.get("next", ""))
    if not cookie or form.get("_csrf", "") != cookie:
        response = render(request, "login.html", status=403, login_csrf=token, next=nxt,
                          form={"email": form.get("email", "")},
                          errors={"form": "The form has expired: try again"})
        _set_login_cookie(request, response, token)
        return response
    try:
        session_token, session = await _services(request).auth.login(
            form.get("email", ""), form.get("password", ""), caller_ip(request),
            previous=request.cookies.get(COOKIE, ""))
    except LoginRefused as refused:
        response = render(request, "login.html", status=refused.status, login_csrf=token,
                          next=nxt,
                          form={"email": form.get("email", "")},
                          errors={"form": str(refused)})
        _set_login_cookie(request, response, token)
        return response
    log.info("console_login", by=session.user.email, peer=request.remote)
    response = web.HTTPSeeOther(nxt)
    response.set_cookie(COOKIE, session_token, path=f"{PREFIX}/", httponly=True,
                        secure=served_over_tls(request), samesite="Strict")
    response.del_cookie(LOGIN_COOKIE, path=f"{PREFIX}/")
    raise response


def _login_token(request: web.Request) -> str:
    return request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(24)


def _set_login_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    # The login form's CSRF token, double-submitted: no session exists yet to hold it.
    response.set_cookie(LOGIN_COOKIE, token, path=f"{PREFIX}/", httponly=True,
                        secure=served_over_tls(request), samesite="Strict")


def served_over_tls(request: web.Request) -> bool:
    """HTTPS to this listener, or to a trusted proxy (`server.trusted_proxies`) that says
    so with X-Forwarded-Proto: the cookies are then `Secure`."""
    if request.secure:
        return True
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if proto != "https" or not (isinstance(peer, tuple) and peer):
        return False
    try:
        ip = iprules.parse_ip(str(peer[0]))
    except ValueError:
        return False
    return any(ip in network for network in request.config_dict[TRUSTED_PROXIES])


def _next(raw: str) -> str:
    """Where to go after logging in: a console page only, never another site."""
    if raw.startswith(f"{PREFIX}/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return f"{PREFIX}/"


async def logout(request: web.Request) -> web.StreamResponse:
    await _services(request).auth.logout(request[SESSION])
    response = web.HTTPSeeOther(f"{PREFIX}/login")
    response.del_cookie(COOKIE, path=f"{PREFIX}/")
    raise response


# -- accounts -----------------------------------------------------------------------------

async def home(request: web.Request) -> web.StreamResponse:
    user = request[SESSION].user
    names = await _services(request).manage.store.list_accounts()
    visible = [n for n in names if user.manages(n)]
    if len(visible) == 1 and not user.operator:
        raise web.HTTPSeeOther(f"{PREFIX}/a/{quote(visible[0], safe='')}/")
    return await _accounts(request, visible)


async def _accounts(request: web.Request, names: list[str], status: int = 200,
                    **values: Any) -> web.Response:
    store = _services(request).manage.store
    accounts = [await store.get_account(name) for name in names]
    return render(request, "accounts.html", status=status, accounts=accounts,
                  credits=format_credits, **values)


@operator_only
async def create_account(request: web.Request) -> web.StreamResponse:
    form = await _form(request)
    manage = _services(request).manage
    try:
        account = await manage.create_account(form.get("name", "").strip(),
                                              form.get("credits", "").strip() or "0")
    except (ValidationError, Conflict) as exc:
        errors = _errors(exc) if isinstance(exc, ValidationError) else {"name": str(exc)}
        return await _accounts(request, await manage.store.list_accounts(), status=400,
                               errors=errors, form=form)
    raise done(request, f"{PREFIX}/", f"Account {account.name} created")


@operator_only
async def top_up(request: web.Request) -> web.StreamResponse:
    form = await _form(request)
    manage = _services(request).manage
    name = request.match_info["name"]
    try:
        account = await manage.credit_account(name, form.get("amount", "").strip())
    except ValidationError as exc:
        return await _accounts(request, await manage.store.list_accounts(), status=400,
                               errors={f"amount-{name}": _errors(exc)["amount"]}, form=form)
    raise done(request, f"{PREFIX}/", f"{name}: {format_credits(account.balance)} credits left")


async def account_page(request: web.Request) -> web.Response:
    services = _services(request)
    account = request[ACCOUNT]
    now = services.clock.now()
    tz = services.tz
    hour_start = now - now % 3600 - 23 * 3600
    day_start, quarters = chart.days_window(now, tz, 30)
    store = services.manage.store
    hours = await store.message_stats(account.name, since=hour_start, period=3600, count=24)
    days = chart.by_day(await store.message_stats(
        account.name, since=day_start, period=chart.QUARTER, count=quarters), tz)
    charts = []
    for title, series, fmt in (("Last 24 hours", hours, "%H:00"),
                               ("Last 30 days", days, "%d/%m")):
        def label(at: float, fmt: str = fmt) -> str:
            return datetime.fromtimestamp(at, tz).strftime(fmt)

        charts.append({"title": title, "totals": chart.totals(series),
                       "svg": Markup(chart.svg(series, f"SMS sent, {title.lower()}", label))})
    return render(request, "account.html", charts=charts, credits=format_credits)


# -- API users ----------------------------------------------------------------------------

async def users_page(request: web.Request, status: int = 200, **values: Any) -> web.Response:
    store = _services(request).manage.store
    name = request[ACCOUNT].name
    users = [user_view(await store.get_user(name, login))
             for login in await store.list_users(name)]
    return render(request, "users.html", status=status, users=users, **values)


async def add_user(request: web.Request) -> web.StreamResponse:
    form = await _form(request)
    try:
        user = await _services(request).manage.create_user(
            request[ACCOUNT].name, form.get("login", "").strip(), form.get("password", ""))
    except ValidationError as exc:
        return await users_page(request, status=400, errors=_errors(exc),
                                form={"login": form.get("login", "")}, adding=True)
    except Conflict as exc:
        return await users_page(request, status=400, errors={"login": str(exc)},
                                form={"login": form.get("login", "")}, adding=True)
    raise done(request, f"{_base(request)}/users", f"API user {user.login} added")


async def user_page(request: web.Request, status: int = 200, **values: Any) -> web.Response:
    store = _services(request).manage.store
    login = request.match_info["login"]
    user = await store.get_user(request[ACCOUNT].name, login)
    return render(request, "user.html", status=status, api_user=user, credits=format_credits,
                  my_ip=str(caller_ip(request) or ""),
                  max_restrictions=forms.MAX_RESTRICTIONS, **values)


async def update_user(request: web.Request) -> web.StreamResponse:
    """One of the user's forms: quota, alert, restrictions, callback, password."""
    services = _services(request)
    form = await _form(request)
    section = request.match_info["section"]
    account, login = request[ACCOUNT].name, request.match_info["login"]
    fields: dict[str, Any]
    if section == "quota":
        fields = {"quota": forms.quota_field(form)}
    elif section == "alert":
        fields = forms.alert_fields(form)
    elif section == "restrictions":
        post = await request.post()
        fields = {"ip_restrictions": forms.restrictions(
            [str(v) for v in post.getall("ipRestrictions", [])], form.get("suggest", ""))}
    elif section == "callback":
        fields = {"callback_url": form.get("callBack", "").strip()}
        if form.get("action") == "test":
            return await _test_callback(request, fields["callback_url"])
    elif section == "password":
        fields = {"password": form.get("password", "")}
    else:
        raise NotFound(section)
    before = request[ACCOUNT].balance
    try:
        await services.manage.update_user(account, login, **fields)
    except ValidationError as exc:
        typed = fields.get("ip_restrictions", ())
        return await user_page(request, status=400, errors=_errors(exc), form=form,
                               section=section, typed_ips=list(typed))
    except NotEnoughCredits as exc:
        return await user_page(request, status=400, form=form, section=section,
                               errors={"quotaLeft": str(exc).split(": ", 1)[-1]})
    message = {"quota": "Quota saved", "alert": "Alert saved",
               "restrictions": "IP restrictions saved", "callback": "Callback saved",
               "password": "Password changed"}[section]
    if section == "quota":
        after = (await services.manage.store.get_account(account)).balance
        moved = before - after
        message += (f": {format_credits(abs(moved))} credits moved "
                    f"{'from' if moved >= 0 else 'back to'} the account, "
                    f"{format_credits(after)} left")
    raise done(request, f"{_base(request)}/users/{quote(login, safe='')}#{section}", message)


async def _test_callback(request: web.Request, url: str) -> web.Response:
    services = _services(request)
    try:
        ok, detail = await services.manage.test_callback(
            request[ACCOUNT].name, request.match_info["login"], url)
    except ValidationError as exc:
        return await user_page(request, status=400, errors=_errors(exc),
                               form={"callBack": url}, section="callback")
    return await user_page(request, form={"callBack": url}, section="callback",
                           test_result={"ok": ok, "detail": detail})


async def delete_user(request: web.Request) -> web.StreamResponse:
    login = request.match_info["login"]
    form = await _form(request)
    if form.get("confirm") != login:
        return await user_page(request, status=400, section="delete",
                               errors={"confirm": f"type {login} to confirm"})
    await _services(request).manage.delete_user(request[ACCOUNT].name, login)
    raise done(request, f"{_base(request)}/users", f"API user {login} deleted")


# -- sending ------------------------------------------------------------------------------

async def send_page(request: web.Request, status: int = 200, **values: Any) -> web.Response:
    users = await _services(request).manage.store.list_users(request[ACCOUNT].name)
    return render(request, "send.html", status=status, users=users, **values)


_SEND_FIELDS = (("Invalid to", "to"), ("Missing to", "to"), ("Sender", "from"),
                ("Missing from", "from"), ("Invalid from", "from"), ("Missing message",
                "message"), ("Invalid message", "message"), ("Invalid tag", "tag"),
                ("Invalid account, login", "login"), ("Not enough", "form"))


async def send(request: web.Request) -> web.StreamResponse:
    form = await _form(request)
    if form.get("action") == "count":
        # The live counter's answer without JavaScript: the form again, with the count.
        return await send_page(request, form=form, estimate=_estimate(request, form))
    account = request[ACCOUNT].name
    params = {"account": account, "login": form.get("login", ""),
              # Never checked for an owner's send (see SendPipeline.send): only present.
              "password": "console", "from": form.get("from", ""),
              "to": ",".join(forms.split_recipients(form.get("to", ""))),
              "message": form.get("message", ""), "tag": form.get("tag", ""),
              "contenttype": "application/json"}
    if forms.checked(form, "noStop"):
        params["nostop"] = "1"
    answer = await _services(request).pipeline.send(params, caller_ip(request), as_owner=True)
    if not answer.ok:
        field = next((name for prefix, name in _SEND_FIELDS
                      if answer.message.startswith(prefix)), "form")
        return await send_page(request, status=400, form=form,
                               errors={field: answer.message})
    return await send_page(request, form={"login": form.get("login", ""),
                                          "from": form.get("from", "")},
                           sent=list(answer.ids), credit_left=answer.credit_left)


async def count(request: web.Request) -> web.Response:
    """What the send form's text will cost, for its live counter: the send URL's rules."""
    result = _estimate(request, request.query)
    return web.json_response({"characters": result.characters, "encoding": result.encoding,
                              "parts": result.parts, "credits": result.credits,
                              "recipients": result.recipients})


def _estimate(request: web.Request, fields: Mapping[str, str]) -> forms.Estimate:
    services = _services(request)
    account = request[ACCOUNT]
    stop = account.stop_clause if account.stop_clause is not None \
        else services.config.send.stop_clause
    return forms.estimate(fields.get("message", ""), fields.get("to", ""), stop_clause=stop,
                          no_stop=forms.checked(fields, "noStop"),
                          rates=services.pipeline.settings.rates)


# -- outgoing messages --------------------------------------------------------------------

async def outgoing(request: web.Request) -> web.Response:
    services = _services(request)
    store = services.manage.store
    account = request[ACCOUNT]
    query = request.query
    users = await store.list_users(account.name)
    try:
        where = forms.message_filter(account.id, query, services.tz)
        before = forms.whole_number(query.get("before", ""))
    except ValidationError as exc:
        return render(request, "outgoing.html", status=400, messages=[], users=users,
                      errors=_errors(exc), form=dict(query), next_url=None, export_url="")
    messages = await store.list_messages(where, limit=PAGE + 1, before_id=before)
    next_url = None
    if len(messages) > PAGE:
        messages = messages[:PAGE]
        following = {k: v for k, v in query.items() if k not in ("before", "done", "sig")}
        following["before"] = str(messages[-1].id)
        next_url = f"{_base(request)}/outgoing?{urlencode(following)}"
    filters = {k: v for k, v in query.items() if k not in ("before", "done", "sig")}
    return render(request, "outgoing.html", messages=messages, users=users, form=dict(query),
                  next_url=next_url, when=lambda at: forms.when(at, services.tz),
                  outcome=outcome, credits=format_credits,
                  export_url=f"{_base(request)}/outgoing.csv?{urlencode(filters)}")


def outcome(message: Message) -> str:
    if message.state != "final":
        return "pending"
    return "delivered" if message.dlr == ptt_module.Dlr.SUCCESS else "failed"


async def export(request: web.Request) -> web.StreamResponse:
    services = _services(request)
    store = services.manage.store
    account = request[ACCOUNT]
    where = forms.message_filter(account.id, request.query, services.tz)
    response = web.StreamResponse(headers={
        "Content-Type": "text/csv; charset=utf-8",
        "Content-Disposition": f'attachment; filename="{account.name}-outgoing.csv"'})
    response.headers.update(_HEADERS)
    response.headers["Cache-Control"] = "no-store"
    await response.prepare(request)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["id", "created", "login", "sender", "receiver", "tag", "parts",
                     "credits", "state", "ptt", "outcome", "delivered", "message"])
    before: int | None = None
    while True:
        # Page by page: an export of a year of messages never sits in memory whole.
        messages = await store.list_messages(where, limit=EXPORT_PAGE, before_id=before)
        for m in messages:
            writer.writerow([m.id, forms.when(m.created_at, services.tz), m.login, m.sender,
                             m.receiver, _cell(m.tag), m.parts, format_credits(m.credits),
                             m.state, "" if m.ptt is None else m.ptt, outcome(m),
                             forms.when(m.delivered_at, services.tz), _cell(m.body)])
        await response.write(buffer.getvalue().encode("utf-8"))
        buffer.seek(0)
        buffer.truncate()
        if len(messages) < EXPORT_PAGE:
            break
        before = messages[-1].id
    await response.write_eof()
    return response


def _cell(text: str) -> str:
    """A text cell a spreadsheet will not run as a formula (OWASP's CSV injection)."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


async def message_page(request: web.Request) -> web.Response:
    services = _services(request)
    store = services.manage.store
    raw = request.match_info["id"]
    message_id = forms.whole_number(raw)
    if message_id is None:
        raise NotFound(raw)
    message = await store.get_message(message_id)
    if message.account_id != request[ACCOUNT].id:
        raise NotFound(raw)
    return render(request, "message.html", message=message,
                  events=await store.message_events(message.id),
                  attempts=await store.message_attempts(message.id),
                  when=lambda at: forms.when(at, services.tz), outcome=outcome(message),
                  credits=format_credits, dlr_text=_dlr_text)


def _dlr_text(dlr: int) -> str:
    try:
        return ptt_module.DLR_TEXT[ptt_module.Dlr(dlr)]
    except ValueError:
        return str(dlr)


# -- senders and ledger -------------------------------------------------------------------

async def senders_page(request: web.Request, status: int = 200, **values: Any) -> web.Response:
    return render(request, "senders.html", status=status, **values)


async def add_sender(request: web.Request) -> web.StreamResponse:
    form = await _form(request)
    try:
        sender = await _services(request).manage.add_sender(request[ACCOUNT].name,
                                                            form.get("sender", ""))
    except ValidationError as exc:
        return await senders_page(request, status=400, errors=_errors(exc), form=form)
    except Conflict as exc:
        return await senders_page(request, status=400, errors={"sender": str(exc)}, form=form)
    raise done(request, f"{_base(request)}/senders", f"Sender {sender} added")


async def remove_sender(request: web.Request) -> web.StreamResponse:
    form = await _form(request)
    sender = form.get("sender", "")
    await _services(request).manage.remove_sender(request[ACCOUNT].name, sender)
    raise done(request, f"{_base(request)}/senders", f"Sender {sender} removed")


async def ledger(request: web.Request) -> web.Response:
    services = _services(request)
    entries = await services.manage.store.list_ledger(
        request[ACCOUNT].name, limit=PAGE + 1,
        after_id=forms.whole_number(request.query.get("after", "")) or 0)
    next_url = None
    if len(entries) > PAGE:
        entries = entries[:PAGE]
        next_url = f"{_base(request)}/ledger?after={entries[-1].id}"
    return render(request, "ledger.html", entries=entries, next_url=next_url,
                  when=lambda at: forms.when(at, services.tz), credits=format_credits)


# -- console users (operators) ------------------------------------------------------------

@operator_only
async def console_users(request: web.Request, status: int = 200,
                        **values: Any) -> web.Response:
    store = _services(request).manage.store
    return render(request, "console_users.html", status=status,
                  console_users=await store.list_console_users(),
                  account_names=await store.list_accounts(), **values)


@operator_only
async def add_console_user(request: web.Request) -> web.StreamResponse:
    post = await request.post()
    form = await _form(request)
    try:
        created = await _services(request).manage.create_console_user(
            form.get("email", ""), form.get("password", ""),
            operator=forms.checked(form, "operator"),
            accounts=[str(a) for a in post.getall("accounts", [])])
    except ValidationError as exc:
        return await console_users(request, status=400, errors=_errors(exc),
                                   form={"email": form.get("email", "")})
    except (Conflict, NotFound) as exc:
        field = "email" if isinstance(exc, Conflict) else "accounts"
        return await console_users(request, status=400, errors={field: str(exc)},
                                   form={"email": form.get("email", "")})
    raise done(request, f"{PREFIX}/console-users", f"Console user {created.email} added")


@operator_only
async def delete_console_user(request: web.Request) -> web.StreamResponse:
    form = await _form(request)
    email = form.get("email", "")
    try:
        await _services(request).manage.delete_console_user(
            email, by=request[SESSION].user.email)
    except ValidationError as exc:
        return await console_users(request, status=400,
                                   errors={"delete": _errors(exc)[exc.field]})
    raise done(request, f"{PREFIX}/console-users", f"Console user {email} deleted")


# -- wiring -------------------------------------------------------------------------------

ROUTES: tuple[tuple[str, str, Handler], ...] = (
    ("GET", "/login", login_page),
    ("POST", "/login", login),
    ("POST", "/logout", logout),
    ("GET", "/", home),
    ("POST", "/accounts", create_account),
    ("POST", "/accounts/{name}/credits", top_up),
    ("GET", "/console-users", console_users),
    ("POST", "/console-users", add_console_user),
    ("POST", "/console-users/delete", delete_console_user),
    ("GET", "/a/{account}/", account_page),
    ("GET", "/a/{account}/users", users_page),
    ("POST", "/a/{account}/users", add_user),
    ("GET", "/a/{account}/users/{login}", user_page),
    ("POST", "/a/{account}/users/{login}/delete", delete_user),
    ("POST", "/a/{account}/users/{login}/{section}", update_user),
    ("GET", "/a/{account}/send", send_page),
    ("POST", "/a/{account}/send", send),
    ("GET", "/a/{account}/count", count),
    ("GET", "/a/{account}/outgoing", outgoing),
    ("GET", "/a/{account}/outgoing.csv", export),
    ("GET", "/a/{account}/outgoing/{id}", message_page),
    ("GET", "/a/{account}/senders", senders_page),
    ("POST", "/a/{account}/senders", add_sender),
    ("POST", "/a/{account}/senders/remove", remove_sender),
    ("GET", "/a/{account}/ledger", ledger),
)


def build(services: Services) -> web.Application:
    """The console's sub-application, mounted at `PREFIX`."""
    app = web.Application(middlewares=[protect, authenticate],
                          client_max_size=services.config.server.max_request_bytes)
    app[SERVICES] = services
    aiohttp_jinja2.setup(app, loader=jinja2.PackageLoader("gateway.console", "templates"),
                         autoescape=True)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    app.router.add_static("/static/", _HERE / "static", name="static",
                          append_version=False)
    return app

