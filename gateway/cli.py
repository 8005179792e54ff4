"""`http2sms`: the command-line tool, thin over the service layer.

Each command opens the store, does one thing and closes it; a running gateway sees the change
on its next request: every change bumps the store's settings version, which the send path
checks before it commits anything.
Bad input prints one line on stderr and exits 2, having changed nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog

from gateway import config as config_module
from gateway import logs
from gateway.config import Config, ConfigError
from gateway.credits import format_credits
from gateway.service import Management, ValidationError, account_view, split_ips, user_view
from gateway.store import Store, StoreError
from gateway.store.sqlite import SQLiteStore

EXIT_USAGE = 2

Command = Callable[[argparse.Namespace, Management], Awaitable[Any]]
COMMANDS: dict[str, Command] = {}


class CommandError(Exception):
    pass


class Failed:
    """A command's output with exit status 1: it ran, but what it tried failed."""

    def __init__(self, result: Any) -> None:
        self.result = result


def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        COMMANDS[name] = fn
        return fn
    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="http2sms", description="http2sms-gateway: an "
                                     "OVH-compatible SMS gateway and its management tool.")
    parser.add_argument("--db", help="SQLite store file (default: store.path of the config, "
                        "var/gateway.sqlite3)")
    parser.add_argument("--config", help="TOML config file (see config/gateway.example.toml)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="listen address (default server.host)")
    serve.add_argument("--port", type=int, help="listen port (default server.port)")
    serve.add_argument("--config", dest="serve_config", help="TOML config file")
    serve.add_argument("--demo", action="store_true",
                       help="create the demo account and user if missing, print a curl line")

    account = _group(sub, "account", "manage SMS accounts")
    p = account.add_parser("create", help="create an account")
    p.add_argument("name")
    p.add_argument("--credits", default="0", help="initial credits (default 0)")
    p = account.add_parser("show", help="show an account")
    p.add_argument("name")
    account.add_parser("list", help="list accounts")
    p = account.add_parser("credit", help="add credits to an account (top-up)")
    p.add_argument("name")
    p.add_argument("amount")
    p = account.add_parser("set", help="change an account's settings")
    p.add_argument("name")
    p.add_argument("--callback", help="account-level delivery-report URL ('' to clear)")
    p.add_argument("--stop-clause", help="STOP clause appended to messages")
    p = account.add_parser("ledger", help="list the account's credit movements")
    p.add_argument("name")
    p.add_argument("--limit", type=int, default=100)

    sender = _group(sub, "sender", "manage declared senders")
    for verb, text in (("add", "declare a sender"), ("remove", "remove a sender")):
        p = sender.add_parser(verb, help=text)
        p.add_argument("account")
        p.add_argument("sender")
    p = sender.add_parser("list", help="list an account's senders")
    p.add_argument("account")

    user = _group(sub, "user", "manage API users")
    p = user.add_parser("create", help="create an API user")
    p.add_argument("account")
    p.add_argument("login")
    p.add_argument("--password", required=True,
                   help="at least 8 letters and digits; '-' reads it from standard input "
                   "(keeps it out of the process list and the shell history)")
    for verb, text in (("show", "show an API user"), ("delete", "delete an API user "
                                                                "(its quota returns)")):
        p = user.add_parser(verb, help=text)
        p.add_argument("account")
        p.add_argument("login")
    p = user.add_parser("list", help="list an account's API users")
    p.add_argument("account")
    p = user.add_parser("set", help="change an API user's settings (all or nothing)")
    p.add_argument("account")
    p.add_argument("login")
    quota = p.add_mutually_exclusive_group()
    quota.add_argument("--quota", help="activate or change the quota (credits)")
    quota.add_argument("--no-quota", action="store_true",
                       help="deactivate the quota (what is left returns to the account)")
    p.add_argument("--ips", help="allowed caller IPs, comma-separated, at most 5 ('' = any)")
    p.add_argument("--callback", help="delivery-report URL ('' to clear)")
    p.add_argument("--alert-threshold", help="low-credit alert threshold ('' to clear)")
    p.add_argument("--alert-support", choices=("mail", "sms", "both"))
    p.add_argument("--alert-email")
    p.add_argument("--alert-number", help="international format, e.g. +33612345678")
    p.add_argument("--password", help="new password ('-': read from standard input)")

    message = _group(sub, "message", "read messages and their delivery history")
    p = message.add_parser("show", help="a message, its history and its callbacks")
    p.add_argument("id", type=int)
    p = message.add_parser("list", help="list an account's messages, newest first")
    p.add_argument("account")
    p.add_argument("--login")
    p.add_argument("--tag")
    p.add_argument("--ptt", type=int)
    p.add_argument("--limit", type=int, default=50)

    alert = _group(sub, "alert", "low-credit alerts")
    p = alert.add_parser("test", help="send a test alert through the user's channels")
    p.add_argument("account")
    p.add_argument("login")
    p.add_argument("--wait", type=float, default=30.0,
                   help="seconds to wait for the running gateway to send the SMS (default 30)")
    return parser


def _group(sub: Any, name: str, text: str) -> Any:
    parser = sub.add_parser(name, help=text)
    return parser.add_subparsers(dest="action", metavar="ACTION", required=True)


def load_config(args: argparse.Namespace) -> Config:
    path = getattr(args, "serve_config", None) or args.config
    config = config_module.load(path)
    if args.db:
        config = config.replace({"store.path": args.db})
    return config


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `--json` reads naturally at the end of a command too: accept it anywhere.
    as_json = "--json" in argv
    args = parser.parse_args([a for a in argv if a != "--json"])
    args.json = as_json
    try:
        config = load_config(args)
        if args.group == "serve":
            return _serve(args, config)
        if not structlog.is_configured():
            # stdout is the command's answer (JSON with --json): logs must not mix in.
            logs.configure(config.log.format, "warning", stream=sys.stderr)
        return asyncio.run(_run(args, config))
    except (ValidationError, StoreError, CommandError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace, config: Config) -> int:
    store: Store = SQLiteStore(config.store.path, busy_timeout=config.store.busy_timeout_seconds)
    await store.open()
    try:
        manager = Management(store, config)
        run = COMMANDS.get(f"{args.group} {args.action}")
        if run is None:
            raise CommandError(f"{args.group} {args.action} is not available in this build")
        result = await run(args, manager)
    finally:
        await store.close()
    if isinstance(result, Failed):
        _print(args, result.result)
        return 1
    _print(args, result)
    return 0


def _print(args: argparse.Namespace, result: Any) -> None:
    if result is None:
        return
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return
    if isinstance(result, list):
        for item in result:
            print(item if not isinstance(item, dict) else _flat(item))
        return
    if isinstance(result, dict):
        for key, value in result.items():
            if isinstance(value, dict):
                for sub_key, sub_value in value.items():
                    print(f"{key}.{sub_key}: {_text(sub_value)}")
            else:
                print(f"{key}: {_text(value)}")
        return
    print(result)


def _text(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_flat(v) if isinstance(v, dict) else str(v) for v in value) or "-"
    if value is None or value == "":
        return "-"
    return str(value)


def _flat(item: dict[str, Any]) -> str:
    return "  ".join(f"{k}={_text(v)}" for k, v in item.items())


def _when(at: float | None) -> str | None:
    if at is None:
        return None
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- accounts and senders -------------------------------------------------------------------

@command("account create")
async def _account_create(args: argparse.Namespace, m: Management) -> Any:
    account = await m.create_account(args.name, args.credits)
    return account_view(account, m.config.send.stop_clause)


@command("account show")
async def _account_show(args: argparse.Namespace, m: Management) -> Any:
    return account_view(await m.store.get_account(args.name), m.config.send.stop_clause)


@command("account list")
async def _account_list(args: argparse.Namespace, m: Management) -> Any:
    return await m.store.list_accounts()


@command("account credit")
async def _account_credit(args: argparse.Namespace, m: Management) -> Any:
    account = await m.credit_account(args.name, args.amount)
    return account_view(account, m.config.send.stop_clause)


@command("account set")
async def _account_set(args: argparse.Namespace, m: Management) -> Any:
    changes: dict[str, Any] = {}
    if args.callback is not None:
        changes["callback_url"] = args.callback
    if args.stop_clause is not None:
        changes["stop_clause"] = args.stop_clause
    account = await m.update_account(args.name, **changes)
    return account_view(account, m.config.send.stop_clause)


@command("account ledger")
async def _account_ledger(args: argparse.Namespace, m: Management) -> Any:
    entries = await m.store.list_ledger(args.name, limit=args.limit)
    return [{"id": e.id, "at": _when(e.at), "kind": e.kind, "login": e.login or "",
             "from": e.source, "to": e.target, "amount": format_credits(e.amount),
             "reference": e.reference} for e in entries]


@command("sender add")
async def _sender_add(args: argparse.Namespace, m: Management) -> Any:
    await m.add_sender(args.account, args.sender)
    return await _sender_list(args, m)


@command("sender remove")
async def _sender_remove(args: argparse.Namespace, m: Management) -> Any:
    await m.remove_sender(args.account, args.sender)
    return await _sender_list(args, m)


@command("sender list")
async def _sender_list(args: argparse.Namespace, m: Management) -> Any:
    return list((await m.store.get_account(args.account)).senders)


# -- API users -------------------------------------------------------------------------------

@command("user create")
async def _user_create(args: argparse.Namespace, m: Management) -> Any:
    return user_view(await m.create_user(args.account, args.login,
                                         _password_arg(args.password)))


@command("user show")
async def _user_show(args: argparse.Namespace, m: Management) -> Any:
    return user_view(await m.store.get_user(args.account, args.login))


@command("user list")
async def _user_list(args: argparse.Namespace, m: Management) -> Any:
    return await m.store.list_users(args.account)


@command("user delete")
async def _user_delete(args: argparse.Namespace, m: Management) -> Any:
    await m.delete_user(args.account, args.login)
    return None if args.json else f"deleted {args.login}"


@command("user set")
async def _user_set(args: argparse.Namespace, m: Management) -> Any:
    fields: dict[str, Any] = {}
    if args.quota is not None:
        fields["quota"] = args.quota
    if args.no_quota:
        fields["quota"] = None
    if args.ips is not None:
        fields["ip_restrictions"] = list(split_ips(args.ips))
    if args.callback is not None:
        fields["callback_url"] = args.callback
    if args.alert_threshold is not None:
        fields["alert_threshold"] = args.alert_threshold or None
    if args.password is not None:
        fields["password"] = _password_arg(args.password)
    for name in ("alert_support", "alert_email", "alert_number"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if not fields:
        raise CommandError("nothing to change: see http2sms user set --help")
    return user_view(await m.update_user(args.account, args.login, **fields))


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


@command("message show")
async def _message_show(args: argparse.Namespace, m: Management) -> Any:
    message = await m.store.get_message(args.id)
    view = message_view(message)
    view["history"] = [{"at": _when(e.at), "ptt": e.ptt, "dlr": e.dlr, "note": e.note}
                       for e in await m.store.message_events(args.id)]
    view["callbacks"] = [{"at": _when(a.at), "target": a.target, "ok": a.ok,
                          "detail": a.detail, "state": a.state}
                         for a in await m.store.message_attempts(args.id)]
    return view


@command("message list")
async def _message_list(args: argparse.Namespace, m: Management) -> Any:
    from gateway.store import MessageFilter

    account = await m.store.get_account(args.account)
    rows = await m.store.list_messages(
        MessageFilter(account_id=account.id, login=args.login, tag=args.tag, ptt=args.ptt),
        limit=max(1, min(args.limit, 1000)))
    return [{"id": r.id, "created": _when(r.created_at), "login": r.login,
             "receiver": r.receiver, "state": r.state, "ptt": r.ptt, "dlr": r.dlr,
             "tag": r.tag} for r in rows]


# -- alerts ----------------------------------------------------------------------------------

@command("alert test")
async def _alert_test(args: argparse.Namespace, m: Management) -> Any:
    from gateway.hooks.alerts import NoAlertConfigured, send_test_alert

    try:
        reports = await send_test_alert(m.store, m.config, args.account, args.login,
                                        wait=max(0.0, args.wait))
    except NoAlertConfigured as exc:
        raise CommandError(str(exc)) from None
    if args.json:
        result: Any = [{"channel": r.channel, "target": r.target, "ok": r.ok,
                        "detail": r.detail} for r in reports]
    else:
        result = [f"{r.channel} to {r.target}: {'sent' if r.ok else 'FAILED'}: {r.detail}"
                  for r in reports]
    return result if all(r.ok for r in reports) else Failed(result)


# -- serve -----------------------------------------------------------------------------------

DEMO_ACCOUNT = "sms-demo-1"
DEMO_LOGIN = "demo"
DEMO_PASSWORD = "demo1234"
DEMO_SENDER = "DEMO"


async def ensure_demo(config: Config) -> None:
    store = SQLiteStore(config.store.path, busy_timeout=config.store.busy_timeout_seconds)
    await store.open()
    try:
        m = Management(store, config)
        if DEMO_ACCOUNT not in await store.list_accounts():
            await m.create_account(DEMO_ACCOUNT, 1000)
            await m.add_sender(DEMO_ACCOUNT, DEMO_SENDER)
            await m.create_user(DEMO_ACCOUNT, DEMO_LOGIN, DEMO_PASSWORD)
    finally:
        await store.close()


def _serve(args: argparse.Namespace, config: Config) -> int:
    from gateway.app import serve

    if args.host:
        config = config.replace({"server.host": args.host})
    if args.port:
        config = config.replace({"server.port": args.port})
    logs.configure(config.log.format, config.log.level, final=True)
    if args.demo:
        asyncio.run(ensure_demo(config))

    def ready(url: str) -> None:
        if args.demo:
            host = "localhost" if config.server.host in ("0.0.0.0", "::", "127.0.0.1") \
                else config.server.host
            base = url.replace(config.server.host, host, 1)
            print("\nThe gateway is running. Send an SMS with:\n\n"
                  f"  curl '{base}/cgi-bin/sms/http2sms.cgi?account={DEMO_ACCOUNT}"
                  f"&login={DEMO_LOGIN}&password={DEMO_PASSWORD}&from={DEMO_SENDER}"
                  "&to=%2B33612345678&message=Hello+from+http2sms-gateway"
                  "&contentType=application/json'\n", flush=True)

    try:
        install_uvloop()
        asyncio.run(serve(config, ready=ready))
    except OSError as exc:
        # The error names the address: the public or the admin listener.
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def install_uvloop() -> None:
    """uvloop when installed (the `fast` extra): a faster event loop, same behaviour."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


if __name__ == "__main__":
    sys.exit(main())
