"""`http2sms`: the command-line tool, thin over the service layer.

Each command opens the store, does one thing and closes it; a running gateway sees the change
on its next request: every change bumps the store's settings version, which the send path
checks before it commits anything.
Bad input prints one line on stderr and exits 2, having changed nothing.

The commands are click commands: each is declared by its decorators, next to its handler, and
tests run them in-process with click's `CliRunner`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps
from typing import Any

import click
import structlog

from gateway import config as config_module
from gateway import export, logs
from gateway.config import Config, ConfigError
from gateway.credits import format_credits
from gateway.display import escape, redact_url
from gateway.records import AdminToken, ConsoleUser, MessageFilter
from gateway.service import Management, ValidationError, account_view, split_ips, user_view
from gateway.store import Store, StoreError, backup, open_store, parse_url, rules
from gateway.store import copy as copy_module

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

Handler = Callable[..., Awaitable[Any]]


class CommandError(Exception):
    pass


class Failed:
    """A command's output with exit status 1: it ran, but what it tried failed."""

    def __init__(self, result: Any) -> None:
        self.result = result


# -- click, in the tool's own manner --------------------------------------------------------

class _HelpFormatter(click.HelpFormatter):
    """`usage:` in lower case, as the tool has always written it (scripts may look for it)."""

    def write_usage(self, prog: str, args: str = "", prefix: str | None = None) -> None:
        super().write_usage(prog, args, "usage: " if prefix is None else prefix)


class _Context(click.Context):
    formatter_class = _HelpFormatter


class _Command(click.Command):
    context_class = _Context


class _Group(click.Group):
    context_class = _Context
    command_class = _Command
    # A group's subgroups are of its own class.
    group_class: type[click.Group] | type[type] | None = type


class _Tool(_Group):
    """The root: whichever command refuses its input, that is one line on stderr, exit 2."""

    group_class = _Group

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ValidationError, StoreError, CommandError, ConfigError) as exc:
            print(f"error: {escape(str(exc))}", file=sys.stderr)
            ctx.exit(EXIT_USAGE)
        except KeyboardInterrupt:
            ctx.exit(EXIT_INTERRUPTED)


@dataclass
class Globals:
    """The options given before the command."""

    db: str | None
    config: str | None


_JSON = "http2sms.json"


def _set_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[_JSON] = True  # meta is shared by the contexts of one invocation


# `--json` reads naturally at the end of a command too: every group and command takes it.
json_option = click.option("--json", is_flag=True, expose_value=False, callback=_set_json,
                           help="print JSON for scripts")


def wants_json() -> bool:
    return bool(click.get_current_context().meta.get(_JSON, False))


def load_config(path: str | None, db: str | None) -> Config:
    config = config_module.load(path)
    if db:
        # Both: `url` wins over `path`, and what reads `path` alone sees --db too.
        config = config.replace({"store.url": db, "store.path": db})
    return config


def store_for(config: Config) -> Store:
    """The store of the config, not yet open."""
    return open_store(config.store, "cli")


def manages(handler: Handler) -> Callable[..., None]:
    """A command over the store: `handler(management, **the command's parameters)` runs in
    its own event loop with the store open; what it returns is printed (JSON with --json),
    a `Failed` result with exit status 1."""

    @wraps(handler)
    def command(**params: Any) -> None:
        ctx = click.get_current_context()
        tool: Globals = ctx.obj
        config = load_config(tool.config, tool.db)
        if not structlog.is_configured():
            # stdout is the command's answer (JSON with --json): logs must not mix in.
            logs.configure(config.log.format, "warning", stream=sys.stderr)
        result = asyncio.run(_run(handler, config, params))
        if isinstance(result, Failed):
            _print(result.result)
            ctx.exit(1)
        _print(result)

    return command


async def _run(handler: Handler, config: Config, params: dict[str, Any]) -> Any:
    store = store_for(config)
    await store.open()
    try:
        return await handler(Management(store, config), **params)
    finally:
        await store.close()


def _print(result: Any) -> None:
    """JSON exactly as stored with --json (JSON escapes control characters itself); else
    lines for a terminal, where a message text's ESC or BEL must not act: every
    non-printable character is shown escaped (`\\x1b`)."""
    if result is None:
        return
    if wants_json():
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    if isinstance(result, list):
        for item in result:
            _line(str(item) if not isinstance(item, dict) else _flat(item))
        return
    if isinstance(result, dict):
        for key, value in result.items():
            if isinstance(value, dict):
                for sub_key, sub_value in value.items():
                    _line(f"{key}.{sub_key}: {_text(sub_value)}")
            else:
                _line(f"{key}: {_text(value)}")
        return
    _line(str(result))


def _line(text: str) -> None:
    print(escape(text))


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_flat(v) if isinstance(v, dict) else str(v) for v in value) or "-"
    if value is None or value == "":
        return "-"
    return str(value)


def _flat(item: dict[str, Any]) -> str:
    return "  ".join(f"{k}={_text(v)}" for k, v in item.items())


# Callback URLs may carry credentials (`https://user:pass@host/?key=...`): shown redacted
# unless asked for, so that a terminal, a screen share or a pasted output keeps them.
secrets_option = click.option("--show-secrets", is_flag=True,
                              help="print callback URLs whole, with their passwords and "
                              "query values")


def _url(url: str | None, show_secrets: bool = False) -> str:
    if not url:
        return ""
    return url if show_secrets else redact_url(url)


def _redacted(view: dict[str, Any], show_secrets: bool = False) -> dict[str, Any]:
    """An account's or a user's view, its `callBack` redacted unless `show_secrets`."""
    return {**view, "callBack": _url(view["callBack"], show_secrets)}


def _when(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- the tool --------------------------------------------------------------------------------

@click.group("http2sms", cls=_Tool, context_settings={"help_option_names": ["-h", "--help"]},
             help="http2sms-gateway: an OVH-compatible SMS gateway and its management tool.")
@click.option("--db", metavar="URL", help="the store: an SQLite file's path, or a URL "
              "(sqlite:///PATH, postgresql://USER@HOST/DBNAME); default: store.url, else "
              "store.path of the config, var/gateway.sqlite3")
@click.option("--config", metavar="FILE",
              help="TOML config file (see config/gateway.example.toml)")
@json_option
@click.pass_context
def http2sms(ctx: click.Context, db: str | None, config: str | None) -> None:
    ctx.obj = Globals(db=db, config=config)


def main(argv: Sequence[str] | None = None) -> int:
    """The `http2sms` entry point; returns the exit status."""
    try:
        status = http2sms.main(None if argv is None else list(argv), prog_name="http2sms",
                               standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        return EXIT_INTERRUPTED
    return status if isinstance(status, int) else 0


# -- accounts and senders -------------------------------------------------------------------

@http2sms.group("account", help="manage SMS accounts")
@json_option
def account_commands() -> None:
    pass


@account_commands.command("create", help="create an account")
@click.argument("name")
@click.option("--credits", default="0", help="initial credits (default 0)")
@json_option
@manages
async def _account_create(m: Management, name: str, credits: str) -> Any:
    account = await m.create_account(name, credits)
    return _redacted(account_view(account, m.config.send.stop_clause))


@account_commands.command("show", help="show an account")
@click.argument("name")
@secrets_option
@json_option
@manages
async def _account_show(m: Management, name: str, show_secrets: bool) -> Any:
    return _redacted(account_view(await m.store.get_account(name), m.config.send.stop_clause),
                    show_secrets)


@account_commands.command("list", help="list accounts")
@json_option
@manages
async def _account_list(m: Management) -> Any:
    return await m.store.list_accounts()


# A negative amount is an argument to refuse with its reason, not an unknown option.
@account_commands.command("credit", help="add credits to an account (top-up)",
                 context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("amount")
@json_option
@manages
async def _account_credit(m: Management, name: str, amount: str) -> Any:
    account = await m.credit_account(name, amount)
    return _redacted(account_view(account, m.config.send.stop_clause))


@account_commands.command("set", help="change an account's settings")
@click.argument("name")
@click.option("--callback", help="account-level delivery-report URL ('' to clear)")
@click.option("--stop-clause", help="STOP clause appended to messages")
@click.option("--retention-days", metavar="N|default",
              help="days this account's messages are kept (0: forever; default: "
              "retention.messages_days)")
@click.option("--personal-data-days", metavar="N|default",
              help="days this account's texts and numbers are kept (0: as long as the "
              "messages; default: retention.personal_data_days)")
@json_option
@manages
async def _account_set(m: Management, name: str, callback: str | None,
                       stop_clause: str | None, retention_days: str | None,
                       personal_data_days: str | None) -> Any:
    changes: dict[str, Any] = {}
    if callback is not None:
        changes["callback_url"] = callback
    if stop_clause is not None:
        changes["stop_clause"] = stop_clause
    if retention_days is not None:
        changes["retention_days"] = _days("--retention-days", retention_days)
    if personal_data_days is not None:
        changes["personal_data_days"] = _days("--personal-data-days", personal_data_days)
    account = await m.update_account(name, **changes)
    view = _redacted(account_view(account, m.config.send.stop_clause))
    if retention_days is not None or personal_data_days is not None:
        view.update(await m.retention_of(name))
    return view


def _days(option: str, text: str) -> int | None:
    if text.strip().lower() == "default":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValidationError(option, "a whole number of days, or 'default'") from None


@account_commands.command("ledger", help="list the account's credit movements")
@click.argument("name")
@click.option("--limit", type=int, default=100, help="entries listed at most (default 100)")
@json_option
@manages
async def _account_ledger(m: Management, name: str, limit: int) -> Any:
    entries = await m.store.list_ledger(name, limit=limit)
    return [{"id": e.id, "at": _when(e.at), "kind": e.kind, "login": e.login or "",
             "from": e.source, "to": e.target, "amount": format_credits(e.amount),
             "reference": e.reference} for e in entries]


@http2sms.group("sender", help="manage declared senders")
@json_option
def sender_commands() -> None:
    pass


@sender_commands.command("add", help="declare a sender")
@click.argument("account")
@click.argument("sender")
@json_option
@manages
async def _sender_add(m: Management, account: str, sender: str) -> Any:
    await m.add_sender(account, sender)
    return await _senders(m, account)


@sender_commands.command("remove", help="remove a sender")
@click.argument("account")
@click.argument("sender")
@json_option
@manages
async def _sender_remove(m: Management, account: str, sender: str) -> Any:
    await m.remove_sender(account, sender)
    return await _senders(m, account)


@sender_commands.command("list", help="list an account's senders")
@click.argument("account")
@json_option
@manages
async def _sender_list(m: Management, account: str) -> Any:
    return await _senders(m, account)


async def _senders(m: Management, account: str) -> list[str]:
    return list((await m.store.get_account(account)).senders)


# -- API users -------------------------------------------------------------------------------

@http2sms.group("user", help="manage API users")
@json_option
def user_commands() -> None:
    pass


@user_commands.command("create", help="create an API user")
@click.argument("account")
@click.argument("login")
@click.option("--password", required=True,
              help="at least 8 letters and digits; '-' reads it from standard input "
              "(keeps it out of the process list and the shell history)")
@json_option
@manages
async def _user_create(m: Management, account: str, login: str, password: str) -> Any:
    return _redacted(user_view(await m.create_user(account, login, _password_arg(password))))


@user_commands.command("show", help="show an API user")
@click.argument("account")
@click.argument("login")
@secrets_option
@json_option
@manages
async def _user_show(m: Management, account: str, login: str, show_secrets: bool) -> Any:
    return _redacted(user_view(await m.store.get_user(account, login)), show_secrets)


@user_commands.command("list", help="list an account's API users")
@click.argument("account")
@json_option
@manages
async def _user_list(m: Management, account: str) -> Any:
    return await m.store.list_users(account)


@user_commands.command("delete", help="delete an API user (its quota returns)")
@click.argument("account")
@click.argument("login")
@json_option
@manages
async def _user_delete(m: Management, account: str, login: str) -> Any:
    await m.delete_user(account, login)
    return None if wants_json() else f"deleted {login}"


def _one_quota_change(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """--quota and --no-quota exclude each other; whichever comes second sees the first."""
    other = "no_quota" if param.name == "quota" else "quota"
    if value not in (None, False) and ctx.params.get(other) not in (None, False):
        raise click.UsageError("--quota and --no-quota cannot be combined", ctx)
    return value


@user_commands.command("set", help="change an API user's settings (all or nothing)")
@click.argument("account")
@click.argument("login")
@click.option("--quota", callback=_one_quota_change,
              help="activate or change the quota (credits)")
@click.option("--no-quota", is_flag=True, callback=_one_quota_change,
              help="deactivate the quota (what is left returns to the account)")
@click.option("--ips", help="allowed caller IPs, comma-separated, at most 5 ('' = any)")
@click.option("--callback", help="delivery-report URL ('' to clear)")
@click.option("--alert-threshold", help="low-credit alert threshold ('' to clear)")
@click.option("--alert-support", type=click.Choice(("mail", "sms", "both")),
              help="how the low-credit alert is sent")
@click.option("--alert-email", help="address of the low-credit alert by mail")
@click.option("--alert-number", help="number of the low-credit alert by SMS, international "
              "format, e.g. +33612345678")
@click.option("--password", help="new password ('-': read from standard input)")
@json_option
@manages
async def _user_set(m: Management, account: str, login: str, quota: str | None,
                    no_quota: bool, ips: str | None, callback: str | None,
                    alert_threshold: str | None, alert_support: str | None,
                    alert_email: str | None, alert_number: str | None,
                    password: str | None) -> Any:
    fields: dict[str, Any] = {}
    if quota is not None:
        fields["quota"] = quota
    if no_quota:
        fields["quota"] = None
    if ips is not None:
        fields["ip_restrictions"] = list(split_ips(ips))
    if callback is not None:
        fields["callback_url"] = callback
    if alert_threshold is not None:
        fields["alert_threshold"] = alert_threshold or None
    if password is not None:
        fields["password"] = _password_arg(password)
    alerts = {"alert_support": alert_support, "alert_email": alert_email,
              "alert_number": alert_number}
    fields.update((name, value) for name, value in alerts.items() if value is not None)
    if not fields:
        raise CommandError("nothing to change: see http2sms user set --help")
    return _redacted(user_view(await m.update_user(account, login, **fields)))


def _password_arg(value: str) -> str:
    """`-` reads the password from standard input, first line, without its newline."""
    return sys.stdin.readline().rstrip("\r\n") if value == "-" else value


# -- messages --------------------------------------------------------------------------------

def message_view(message: Any) -> dict[str, Any]:
    return {"id": message.id, "account": message.account_name, "login": message.login,
            "kind": message.kind, "sender": message.sender, "receiver": message.receiver,
            "tag": message.tag, "parts": message.parts, "credits":
            format_credits(message.credits), "state": message.state, "ptt": message.ptt,
            "dlr": message.dlr, "created": _when(message.created_at),
            "deferred": _when(message.deferred_until), "sent": _when(message.sent_at),
            "delivered": _when(message.delivered_at), "message": message.body}


@http2sms.group("message", help="read messages and their delivery history")
@json_option
def message_commands() -> None:
    pass


@message_commands.command("show", help="a message, its history and its callbacks")
@click.argument("message_id", metavar="ID", type=int)
@secrets_option
@json_option
@manages
async def _message_show(m: Management, message_id: int, show_secrets: bool) -> Any:
    message = await m.store.get_message(message_id)
    view = message_view(message)
    view["history"] = [{"at": _when(e.at), "ptt": e.ptt, "dlr": e.dlr, "note": e.note}
                       for e in await m.store.message_events(message_id)]
    view["callbacks"] = [{"at": _when(a.at), "target": _url(a.target, show_secrets),
                          "ok": a.ok,
                          "detail": a.detail, "state": a.state}
                         for a in await m.store.message_attempts(message_id)]
    return view


@message_commands.command("list", help="list an account's messages, newest first")
@click.argument("account")
@click.option("--login", help="only this API user's messages")
@click.option("--tag", help="only the messages sent with this tag")
@click.option("--ptt", type=int, help="only the messages whose last status is this PTT code")
@click.option("--limit", type=int, default=50,
              help="messages listed at most, up to 1000 (default 50)")
@json_option
@manages
async def _message_list(m: Management, account: str, login: str | None, tag: str | None,
                        ptt: int | None, limit: int) -> Any:

    found = await m.store.get_account(account)
    rows = await m.store.list_messages(
        MessageFilter(account_id=found.id, login=login, tag=tag, ptt=ptt),
        limit=max(1, min(limit, 1000)))
    return [{"id": r.id, "created": _when(r.created_at), "login": r.login,
             "receiver": r.receiver, "state": r.state, "ptt": r.ptt, "dlr": r.dlr,
             "tag": r.tag} for r in rows]


@message_commands.command("incoming", help="list the messages handsets sent to an account "
                          "(replies, STOP), newest first")
@click.argument("account")
@click.option("--limit", type=int, default=50,
              help="messages listed at most, up to 1000 (default 50)")
@json_option
@manages
async def _message_incoming(m: Management, account: str, limit: int) -> Any:
    rows = await m.store.list_incoming(account, limit=max(1, min(limit, 1000)))
    return [{"id": r.id, "created": _when(r.created_at), "sender": r.sender,
             "receiver": r.receiver, "tag": r.tag, "message": r.body} for r in rows]


@message_commands.command("export", help="write an account's outgoing history (CSV or JSON "
                          "lines) on standard output, oldest first")
@click.argument("account")
@click.option("--from", "start", required=True, metavar="DATE",
              help="from this day (YYYY-MM-DD) or time (ISO 8601, UTC if no offset)")
@click.option("--to", "end", required=True, metavar="DATE",
              help="to this day, included, or time")
@click.option("--login", help="only this API user's messages")
@click.option("--format", "fmt", type=click.Choice(export.FORMATS), default="csv",
              show_default=True, help="CSV with OVH's column names, or JSON lines")
@json_option
@manages
async def _message_export(m: Management, account: str, start: str, end: str,
                          login: str | None, fmt: export.Format) -> Any:
    pages = await m.export(account, created_from=_bound("--from", start),
                           created_to=_bound("--to", end, end=True), login=login)
    out = sys.stdout
    out.write(export.header(fmt))
    async for page in pages:
        # Written as it is read: an export of years holds one page in memory.
        out.write(export.lines(page, fmt))
    out.flush()
    return None


def _bound(option: str, text: str, *, end: bool = False) -> float:
    try:
        return export.parse_bound(text, end=end)
    except ValueError as exc:
        raise ValidationError(option, str(exc)) from None


@message_commands.command("erase", help="erase a person's number and texts from every message "
                          "of the account (the right to erasure)")
@click.argument("account")
@click.option("--receiver", required=True, metavar="NUMBER",
              help="the person's number, e.g. +33612345678")
@json_option
@manages
async def _message_erase(m: Management, account: str, receiver: str) -> Any:
    done = await m.erase_number(account, receiver)
    result: dict[str, Any] = {"erased": done.erased}
    if done.held:
        result["not_yet_sent"] = done.held
        result["note"] = ("messages not yet final keep their text until sent: erase again "
                          "once they are")
    return result


# -- data over time: purge, store stats, backups -------------------------------------------

@http2sms.command("purge", help="apply the retention now: erase texts and numbers, delete old "
                  "messages ([retention], account set --retention-days)")
@click.option("--dry-run", is_flag=True, help="only say what would be erased and deleted")
@json_option
@manages
async def _purge(m: Management, dry_run: bool) -> Any:
    purger = m.purger()
    if dry_run:
        return [row for row in await purger.preview() if any(
            value for key, value in row.items() if key != "account")]
    report = await purger.run()
    if not report.ran:
        return Failed({"error": "another process is purging this store now"})
    return report.as_dict()


@http2sms.group("store", help="the store as a whole: stats, copy")
@json_option
def store_commands() -> None:
    pass


@store_commands.command("stats", help="the store's size, rows per table and oldest message")
@json_option
@manages
async def _store_stats(m: Management) -> Any:
    stats = await m.store.store_stats()
    problems = rules.ledger_problems(await m.store.ledger_totals())
    return {"backend": stats.backend, "size_bytes": stats.size_bytes,
            "free_bytes": stats.free_bytes, "oldest_message": _when(stats.oldest_message_at),
            "rows": stats.rows, **stats.details,
            "ledger": "; ".join(problems) if problems else "holds"}


@http2sms.command("backup", help="write a checked copy of the running store to FILE (SQLite; "
                  "PostgreSQL: pg_dump, see the README)")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="replace FILE if it exists")
@json_option
@manages
async def _backup(m: Management, file: str, force: bool) -> Any:
    scheme, location = parse_url(m.config.store.location)
    if scheme == "sqlite":
        backup.refuse_own_files(file, location)
    if os.path.exists(file) and not force:
        raise CommandError(f"{file} exists (--force to replace it)")
    partial = backup.partial_name(file)
    with suppress(FileNotFoundError):
        os.remove(partial)
    try:
        await m.store.backup(partial)
        checked = await backup.check(partial)
        # On disk before the copy takes its name, and the name before "done".
        backup.make_durable(partial)
        os.replace(partial, file)
        backup.make_durable(file)
    finally:
        with suppress(FileNotFoundError):
            os.remove(partial)
    return {"backup": file, "size_bytes": checked.size_bytes, "messages": checked.messages,
            "accounts": checked.accounts, "integrity": "ok", "ledger": "holds"}


@http2sms.command("restore", help="replace the store (stopped) by a checked copy of a backup")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="overwrite the store if it exists")
@json_option
@click.pass_context
def _restore(ctx: click.Context, file: str, force: bool) -> None:
    tool: Globals = ctx.obj
    config = load_config(tool.config, tool.db)
    scheme, target = parse_url(config.store.location)
    if scheme != "sqlite" or target == ":memory:":
        raise CommandError("restore writes an SQLite store; a PostgreSQL one is restored "
                           "with pg_restore or psql (see the README)")
    checked = asyncio.run(backup.restore(file, target, force=force))
    _print({"restored": target, "from": file, "size_bytes": checked.size_bytes,
            "messages": checked.messages, "accounts": checked.accounts, "integrity": "ok",
            "ledger": "holds"})


# -- alerts ----------------------------------------------------------------------------------

@http2sms.group("alert", help="low-credit alerts")
@json_option
def alert_commands() -> None:
    pass


@alert_commands.command("test", help="send a test alert through the user's channels")
@click.argument("account")
@click.argument("login")
@click.option("--wait", type=float, default=30.0,
              help="seconds to wait for the running gateway to send the SMS (default 30)")
@json_option
@manages
async def _alert_test(m: Management, account: str, login: str, wait: float) -> Any:
    from gateway.hooks.alerts import NoAlertConfigured, send_test_alert

    try:
        reports = await send_test_alert(m.store, m.config, account, login,
                                        wait=max(0.0, wait))
    except NoAlertConfigured as exc:
        raise CommandError(str(exc)) from None
    if wants_json():
        result: Any = [{"channel": r.channel, "target": r.target, "ok": r.ok,
                        "detail": r.detail} for r in reports]
    else:
        result = [f"{r.channel} to {r.target}: {'sent' if r.ok else 'FAILED'}: {r.detail}"
                  for r in reports]
    return result if all(r.ok for r in reports) else Failed(result)


# -- admin API tokens ------------------------------------------------------------------------

@http2sms.group("token", help="manage admin API tokens (stored hashed)")
@json_option
def token_commands() -> None:
    pass


@token_commands.command("create", help="create an admin API token for some accounts or all; "
                        "the token is printed once and stored only as a digest")
@click.argument("name")
@click.option("--account", "accounts", multiple=True, metavar="ACCOUNT",
              help="an account the token may manage (repeat for several)")
@click.option("--all", "all_accounts", is_flag=True,
              help="every account, present and future, and the routes across accounts "
              "(creating accounts, listing them all)")
@json_option
@manages
async def _token_create(m: Management, name: str, accounts: tuple[str, ...],
                        all_accounts: bool) -> Any:
    if all_accounts == bool(accounts):
        raise CommandError("give --all or at least one --account")
    token, text = await m.create_token(name, None if all_accounts else list(accounts))
    view = token_view(token)
    view["token"] = text
    return view


@token_commands.command("list", help="list admin API tokens (never their secrets)")
@json_option
@manages
async def _token_list(m: Management) -> Any:
    return [token_view(t) for t in await m.store.list_tokens()]


@token_commands.command("revoke", help="revoke an admin API token: refused from its next "
                        "request on")
@click.argument("name")
@json_option
@manages
async def _token_revoke(m: Management, name: str) -> Any:
    await m.store.revoke_token(name)
    return None if wants_json() else f"revoked {name}"


def token_view(token: AdminToken) -> dict[str, Any]:
    """A token as listed: never its secret nor its digest. `key` is the part after `h2s_`
    that tells tokens apart (in the audit log too)."""
    return {"name": token.name, "key": token.key,
            "accounts": "all" if token.accounts is None else list(token.accounts),
            "created": _when(token.created_at), "last_used": _when(token.last_used_at)}


# -- console users ---------------------------------------------------------------------------

@http2sms.group("console-user", help="manage the web console's users (e-mail and password)")
@json_option
def console_user_commands() -> None:
    pass


@console_user_commands.command("add", help="create a console user for some accounts, or an "
                               "operator (every account, accounts and top-ups)")
@click.argument("email")
@click.option("--account", "accounts", multiple=True, metavar="ACCOUNT",
              help="an account the console user may manage (repeat for several)")
@click.option("--operator", is_flag=True,
              help="every account, creating accounts, top-ups and console users")
@click.option("--password", required=True,
              help="at least 12 characters ('-': read from standard input)")
@json_option
@manages
async def _console_user_add(m: Management, email: str, accounts: tuple[str, ...],
                            operator: bool, password: str) -> Any:
    if operator and accounts:
        raise CommandError("give --operator or --account, not both")
    return console_user_view(await m.create_console_user(
        email, _password_arg(password), operator=operator, accounts=list(accounts)))


@console_user_commands.command("list", help="list console users (never their passwords)")
@json_option
@manages
async def _console_user_list(m: Management) -> Any:
    return [console_user_view(u) for u in await m.store.list_console_users()]


@console_user_commands.command("delete", help="delete a console user; its sessions end")
@click.argument("email")
@json_option
@manages
async def _console_user_delete(m: Management, email: str) -> Any:
    await m.delete_console_user(email)
    return None if wants_json() else f"deleted {email}"


@console_user_commands.command("set-password", help="change a console user's password; "
                               "its sessions end")
@click.argument("email")
@click.option("--password", required=True,
              help="at least 12 characters ('-': read from standard input)")
@json_option
@manages
async def _console_user_set_password(m: Management, email: str, password: str) -> Any:
    await m.set_console_password(email, _password_arg(password))
    return None if wants_json() else f"password changed for {email}"


def console_user_view(user: ConsoleUser) -> dict[str, Any]:
    return {"email": user.email,
            "accounts": "all" if user.operator else list(user.accounts),
            "operator": user.operator, "created": _when(user.created_at)}


# -- the store as a whole: copy ---------------------------------------------------------------

@store_commands.command(
    "copy", help="copy an installation (accounts, users, credits, ledger, messages and their "
    "history, pending callbacks, tokens) from the store SOURCE to the empty store TARGET, "
    "then check both: e.g. copy sqlite:///var/gateway.sqlite3 postgresql://h2s@db/h2s. "
    "Stop every gateway on SOURCE first. Exit 1 if the check fails.")
@click.argument("source")
@click.argument("target")
@click.option("--batch", type=click.IntRange(1, 1_000_000), default=copy_module.BATCH,
              show_default=True, help="rows read and written at a time")
@json_option
@click.pass_context
def _store_copy(ctx: click.Context, source: str, target: str, batch: int) -> None:
    if not structlog.is_configured():
        logs.configure("console", "warning", stream=sys.stderr)
    report = asyncio.run(_copy(source, target, batch))
    result = copy_view(report) if wants_json() else copy_lines(report)
    _print(result)
    if not report.ok:
        ctx.exit(1)


async def _copy(source_url: str, target_url: str, batch: int) -> copy_module.CopyReport:
    source = open_store(source_url, "cli")
    target = open_store(target_url, "cli")
    await source.open()
    try:
        await target.open()
        try:
            return await copy_module.copy_store(source, target, batch=batch)
        finally:
            await target.close()
    finally:
        await source.close()


def copy_view(report: copy_module.CopyReport) -> dict[str, Any]:
    return {"ok": report.ok, "problems": list(report.problems),
            "tables": {t.table: {"source": t.source, "copied": t.copied, "target": t.target}
                       for t in report.tables},
            "source": report.source_totals, "target": report.target_totals}


def copy_lines(report: copy_module.CopyReport) -> list[str]:
    lines = [f"{t.table}: {t.copied} rows copied" for t in report.tables]
    if report.ok:
        totals = report.target_totals
        lines.append("checked: every table holds as many rows in the target as in the source")
        lines.append(
            f"checked: purchased {format_credits(totals['purchased'])} = balances "
            f"{format_credits(totals['balances'])} + quotas {format_credits(totals['quotas'])}"
            f" + spent {format_credits(totals['spent'])}, in the source and in the target")
    else:
        lines += [f"check failed: {problem}" for problem in report.problems]
    return lines


# -- operator --------------------------------------------------------------------------------

@http2sms.group("operator", help="the operator connection (SMSC)")
@json_option
def operator_commands() -> None:
    pass


@operator_commands.command("check", help="bind to the SMSC with the settings and say how it went "
                           "(exit 0: bound, 1: not)")
@click.option("--timeout", type=float, default=None,
              help="seconds to wait for each answer (default operator.smpp."
                   "response_timeout_seconds)")
@json_option
@click.pass_context
def _operator_check(ctx: click.Context, timeout: float | None) -> None:
    tool: Globals = ctx.obj
    config = load_config(tool.config, tool.db)
    operator = config.operator
    if not isinstance(operator, config_module.SmppOperatorConfig):
        line = f"operator.kind is {operator.kind!r}: nothing to check (always up)"
        click.echo(json.dumps({"bound": True, "detail": line}) if wants_json() else line)
        ctx.exit(0)
    # Imported here, as gateway.operators.create does: smpplib is loaded only when used.
    from gateway.operators.smpp.connector import check

    ok, line = asyncio.run(check(operator.smpp, timeout))
    if wants_json():
        click.echo(json.dumps({"bound": ok, "detail": line}))
    else:
        click.echo(line if ok else f"not bound: {line}")
    ctx.exit(0 if ok else 1)


# -- serve -----------------------------------------------------------------------------------

DEMO_ACCOUNT = "sms-demo-1"
DEMO_LOGIN = "demo"
DEMO_PASSWORD = "demo1234"
DEMO_SENDER = "DEMO"
# The web console's demo user (`serve --demo`), the owner of the demo account.
DEMO_CONSOLE_EMAIL = "demo@example.com"
DEMO_CONSOLE_PASSWORD = "demo-console-1234"


async def ensure_demo(config: Config) -> None:
    store = store_for(config)
    await store.open()
    try:
        m = Management(store, config)
        if DEMO_ACCOUNT not in await store.list_accounts():
            await m.create_account(DEMO_ACCOUNT, 1000)
            await m.add_sender(DEMO_ACCOUNT, DEMO_SENDER)
            await m.create_user(DEMO_ACCOUNT, DEMO_LOGIN, DEMO_PASSWORD)
        if config.console.enabled and await store.get_console_user(DEMO_CONSOLE_EMAIL) is None:
            await m.create_console_user(DEMO_CONSOLE_EMAIL, DEMO_CONSOLE_PASSWORD,
                                        operator=False, accounts=[DEMO_ACCOUNT])
    finally:
        await store.close()


@http2sms.command("serve", help="run the gateway")
@click.option("--host", help="listen address (default server.host)")
@click.option("--port", type=int, help="listen port (default server.port)")
@click.option("--config", "serve_config", metavar="FILE", help="TOML config file")
@click.option("--demo", is_flag=True,
              help="create the demo account and user if missing, print a curl line")
@click.option("--processes", type=click.IntRange(1, 1024), default=1, show_default=True,
              help="send processes sharing the port (SO_REUSEPORT), one per core; the first "
              "one delivers as server.delivery_worker says, the others only take sends")
@json_option
@click.pass_context
def _serve_command(ctx: click.Context, host: str | None, port: int | None,
                   serve_config: str | None, demo: bool, processes: int) -> None:
    tool: Globals = ctx.obj
    config = load_config(serve_config or tool.config, tool.db)
    if host:
        config = config.replace({"server.host": host})
    if port:
        config = config.replace({"server.port": port})
    if processes > 1 and not config.server.port:
        raise CommandError("--processes needs a fixed port: with port 0 each process "
                           "would listen on a port of its own")
    status = _serve(config, demo=demo, processes=processes)
    if status:
        ctx.exit(status)


def _serve(config: Config, *, demo: bool, processes: int = 1) -> int:
    # Here, not at the top: the server's imports would add 0.17 s to every other command.
    from gateway.process_group import supervise
    from gateway.server import install_uvloop, serve

    logs.configure(config.log.format, config.log.level, final=True)
    if demo:
        asyncio.run(ensure_demo(config))

    def ready(url: str) -> None:
        if demo:
            host = "localhost" if config.server.host in ("0.0.0.0", "::", "127.0.0.1") \
                else config.server.host
            base = url.replace(config.server.host, host, 1)
            print("\nThe gateway is running. Send an SMS with:\n\n"
                  f"  curl '{base}/cgi-bin/sms/http2sms.cgi?account={DEMO_ACCOUNT}"
                  f"&login={DEMO_LOGIN}&password={DEMO_PASSWORD}&from={DEMO_SENDER}"
                  "&to=%2B33612345678&message=Hello+from+http2sms-gateway"
                  "&contentType=application/json'\n", flush=True)
            if config.console.enabled:
                console = base
                if config.admin.host:
                    admin_host = "localhost" if config.admin.host in (
                        "0.0.0.0", "::", "127.0.0.1") else config.admin.host
                    console = f"{base.split('://')[0]}://{admin_host}:{config.admin.port}"
                print(f"The web console: {console}/console/ (log in as "
                      f"{DEMO_CONSOLE_EMAIL} / {DEMO_CONSOLE_PASSWORD})\n", flush=True)

    try:
        install_uvloop()
        if processes > 1:
            url = f"{'https' if config.server.tls_cert else 'http'}://" \
                  f"{config.server.host}:{config.server.port}"
            return asyncio.run(supervise(config, processes, ready=lambda: ready(url)))
        asyncio.run(serve(config, ready=ready))
    except OSError as exc:
        # The error names the address: the public or the admin listener.
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0



# -- deliver ---------------------------------------------------------------------------------

@http2sms.command("deliver", help="run a delivery worker alone, without HTTP listener: hand "
                  "the stored messages to the operator, store its reports, call the callbacks "
                  "(for gateways with server.delivery = false). Several run side by side on "
                  "PostgreSQL; on SQLite one delivers at a time, the others wait. SIGTERM "
                  "stops it cleanly.")
@click.option("--config", "deliver_config", metavar="FILE", help="TOML config file")
@json_option
@click.pass_context
def _deliver_command(ctx: click.Context, deliver_config: str | None) -> None:
    tool: Globals = ctx.obj
    config = load_config(deliver_config or tool.config, tool.db)
    # Here, not at the top: the delivery services' imports would slow every other command.
    from gateway.deliver_process import run
    from gateway.server import install_uvloop

    logs.configure(config.log.format, config.log.level, final=True)
    try:
        install_uvloop()
        asyncio.run(run(config))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        ctx.exit(1)


if __name__ == "__main__":
    sys.exit(main())
