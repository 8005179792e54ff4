"""The `http2sms` tool: in-process through click's CliRunner; each command group once as a
real process; and the real server process it starts."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import click
import pytest
from click.testing import Result

from gateway import cli
from tests.cli_in_process import invoke, logging_kept

PYTHON = [sys.executable, "-m", "gateway"]


def run(db: Path, *args: str, env: dict[str, str] | None = None,
        input: str | None = None) -> Result:
    return invoke("--db", str(db), *args, env=env, input=input)


def run_process(db: Path, *args: str, input: str | None = None,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PYTHON, "--db", str(db), *args], capture_output=True, text=True,
                          input=input, env={**os.environ, **(env or {})}, timeout=60,
                          check=False)


def ok_json(db: Path, *args: str) -> Any:
    result = run(db, *args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_round_trips(tmp_path: Path) -> None:
    db = tmp_path / "cli.sqlite3"
    assert ok_json(db, "account", "create", "sms-ab12345-1", "--credits", "200")["creditsLeft"] \
        == 200
    assert ok_json(db, "sender", "add", "sms-ab12345-1", "SHOP") == ["SHOP"]
    user = ok_json(db, "user", "create", "sms-ab12345-1", "api1", "--password", "Passw0rd")
    assert user["login"] == "api1" and "password" not in json.dumps(user).lower()
    user = ok_json(db, "user", "set", "sms-ab12345-1", "api1", "--quota", "150",
                   "--ips", "8.8.8.8,2001:4860:4860::8888", "--callback",
                   "https://example.com/dlr", "--alert-threshold", "10",
                   "--alert-support", "both", "--alert-email", "ops@example.com",
                   "--alert-number", "0033612345678")
    assert user["quotaInformations"] == {"quotaStatus": "active", "quotaLeft": 150}
    assert user["ipRestrictions"] == ["8.8.8.8", "2001:4860:4860::8888"]
    assert user["alertThresholdInformations"] == {
        "alertThreshold": 10, "support": "both", "alertEmail": "ops@example.com",
        "alertNumber": "+33612345678"}
    account = ok_json(db, "account", "show", "sms-ab12345-1")
    assert (account["creditsLeft"], account["creditsHoldByQuota"],
            account["userQuantityWithQuota"]) == (50, 150, 1)
    assert ok_json(db, "account", "credit", "sms-ab12345-1", "25.5")["creditsLeft"] == 75.5
    assert ok_json(db, "user", "list", "sms-ab12345-1") == ["api1"]
    assert ok_json(db, "user", "set", "sms-ab12345-1", "api1", "--no-quota")[
        "quotaInformations"]["quotaStatus"] == "inactive"
    ledger = ok_json(db, "account", "ledger", "sms-ab12345-1")
    assert [e["kind"] for e in ledger] == ["purchase", "quota", "purchase", "quota"]
    result = run(db, "user", "delete", "sms-ab12345-1", "api1")
    assert result.exit_code == 0 and "deleted api1" in result.stdout
    human = run(db, "account", "show", "sms-ab12345-1")
    assert "creditsLeft: 225.5" in human.stdout


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("seed") / "seed.sqlite3"
    ok_json(db, "account", "create", "sms-x-1", "--credits", "100")
    ok_json(db, "user", "create", "sms-x-1", "u1", "--password", "Passw0rd")
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return db


def dump(db: Path) -> list[str]:
    """Every row of every table: proof that a refused command wrote nothing."""
    with sqlite3.connect(db) as conn:
        return list(conn.iterdump())


@pytest.mark.parametrize(("args", "message"), [
    (["account", "show", "sms-none-1"], "unknown account"),
    (["user", "set", "sms-x-1", "u1", "--ips", "8.8.8.1,8.8.8.2,8.8.8.3,8.8.8.4,8.8.8.5,"
      "8.8.8.6"], "at most 5"),
    (["user", "set", "sms-x-1", "u1", "--ips", "192.168.1.1"], "not a public address"),
    (["user", "set", "sms-x-1", "u1", "--password", "pass-word!"], "letters and digits"),
    (["user", "set", "sms-x-1", "u1", "--quota", "101"], "more are needed"),
    (["user", "set", "sms-x-1", "u1", "--quota", "50", "--ips", "10.0.0.1"],
     "not a public address"),
    (["user", "create", "sms-x-1", "u2", "--password", "short1"], "at least 8"),
    (["user", "create", "sms-x-1", "u1", "--password", "longenough1"], "already exists"),
    (["account", "create", "sms-x-1"], "already exists"),
    (["account", "credit", "sms-x-1", "-5"], "negative"),
    (["sender", "add", "sms-x-1", "THIS-IS-FAR-TOO-LONG"], "sender"),
    (["user", "set", "sms-x-1", "u1", "--alert-threshold", "5", "--alert-support", "mail"],
     "alertEmail"),
])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(seeded: Path, tmp_path: Path,
                                                          args: list[str], message: str) -> None:
    db = tmp_path / "cli.sqlite3"
    shutil.copy(seeded, db)
    before = dump(db)
    result = run(db, *args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ")
    assert dump(db) == before


@pytest.mark.parametrize("args", [
    ["--json", "account", "show", "sms-x-1"], ["account", "--json", "show", "sms-x-1"],
    ["account", "show", "--json", "sms-x-1"], ["account", "show", "sms-x-1", "--json"],
])
def test_json_wherever_it_is_placed(seeded: Path, args: list[str]) -> None:
    result = run(seeded, *args)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["creditsLeft"] == 100


@pytest.mark.parametrize(("args", "message"), [
    ([], "COMMAND"),
    (["account"], "COMMAND"),
    (["account", "credit", "sms-x-1"], "Missing argument 'AMOUNT'"),
    (["account", "show", "sms-x-1", "--bogus"], "--bogus"),
    (["message", "show", "one"], "'one' is not a valid integer"),
    (["user", "set", "sms-x-1", "u1", "--alert-support", "fax"], "'fax' is not one of"),
    (["user", "set", "sms-x-1", "u1", "--quota", "5", "--no-quota"], "cannot be combined"),
    (["user", "set", "sms-x-1", "u1", "--no-quota", "--quota", "5"], "cannot be combined"),
])
def test_usage_errors_exit_2_and_change_nothing(seeded: Path, tmp_path: Path,
                                                args: list[str], message: str) -> None:
    db = tmp_path / "cli.sqlite3"
    shutil.copy(seeded, db)
    before = dump(db)
    result = run(db, *args)
    assert result.exit_code == 2
    assert message in result.stderr and result.stdout == ""
    assert dump(db) == before


def test_main_returns_the_exit_status(seeded: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`main` is the installed `http2sms`: what `sys.exit` gets is its return value."""
    db = tmp_path / "cli.sqlite3"
    shutil.copy(seeded, db)
    with logging_kept():
        assert cli.main(["--db", str(db), "account", "show", "sms-x-1", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["creditsLeft"] == 100
        assert cli.main(["--db", str(db), "account", "show", "sms-none-1"]) == 2
        assert capsys.readouterr().err == "error: unknown account 'sms-none-1'\n"
        assert cli.main(["--db", str(db), "account", "credit", "sms-x-1"]) == 2
        assert "Missing argument 'AMOUNT'" in capsys.readouterr().err
        assert cli.main(["--help"]) == 0
        assert "usage: http2sms" in capsys.readouterr().out


def test_a_malformed_store_url_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """Two slashes where three are needed: a command and the server each say so and exit."""
    result = invoke("--db", "sqlite://x.db", "account", "list")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: a sqlite URL names a file after three slashes")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    served = subprocess.run([*PYTHON, "serve"], capture_output=True, text=True, timeout=60,
                            cwd=tmp_path, check=False,
                            env={**os.environ, "HTTP2SMS_STORE_PATH": "sqlite://x.db"})
    assert served.returncode == 1
    assert "Traceback" not in served.stderr, served.stderr
    assert re.search(r"^error: a sqlite URL names a file after three slashes",
                     served.stderr, re.MULTILINE), served.stderr
    assert not list(tmp_path.iterdir())


def test_every_command_has_help() -> None:
    for args in (["--help"], ["serve", "--help"], ["account", "create", "--help"],
                 ["user", "set", "--help"], ["sender", "add", "--help"],
                 ["message", "list", "--help"]):
        result = invoke(*args)
        assert result.exit_code == 0 and "usage:" in result.stdout


def commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], click.Command]]:
    yield path, group
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_option_has_a_help_line_and_every_command_takes_json() -> None:
    for path, command in commands(cli.http2sms):
        assert command.help, path
        options = {p.name: p for p in command.params if isinstance(p, click.Option)}
        for option in options.values():
            assert option.help, (path, option.name)
        assert "json" in options, path
        shown = invoke(*path, "--help").stdout
        for option in options.values():
            assert option.help.split()[0] in shown, (path, option.name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_server_process_sees_cli_changes_and_logs_no_secret(tmp_path: Path) -> None:
    db = tmp_path / "srv.sqlite3"
    port = free_port()
    env = {**os.environ, "HTTP2SMS_LOG_FORMAT": "json", "HTTP2SMS_OPERATOR_MIN_DELAY": "0",
           "HTTP2SMS_OPERATOR_MAX_DELAY": "0"}
    proc = await asyncio.create_subprocess_exec(
        *PYTHON, "--db", str(db), "serve", "--port", str(port), "--demo",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None
        curl_line = ""
        while "curl" not in curl_line:
            curl_line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert curl_line, "the server exited before printing the curl line"
        url = curl_line.strip().removeprefix("curl ").strip("'")
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as resp:
                data = json.loads(await resp.text())
            assert data["status"] == 100 and data["creditLeft"] == "999"
            changed = await asyncio.to_thread(
                run, db, "user", "set", "sms-demo-1", "demo", "--ips", "8.8.8.8",
                env={"HTTP2SMS_SERVER_ALLOW_PRIVATE_IPS": "1"})
            assert changed.exit_code == 0, changed.stderr
            async with session.get(url) as resp:
                data = json.loads(await resp.text())
            assert data == {"status": 401,
                            "message": "The IP address 127.0.0.1 is not allowed for this user"}
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    log = (await proc.stderr.read()).decode()
    assert '"event": "send"' in log
    assert "demo1234" not in log and "password" not in log


# -- each command group once in a real process (`serve` above) --------------------------------

def test_password_from_standard_input(tmp_path: Path) -> None:
    db = tmp_path / "stdin.sqlite3"
    ok_json(db, "account", "create", "sms-in-1")
    result = run_process(db, "user", "create", "sms-in-1", "u1", "--password", "-",
                         input="FromStdin1\n")
    assert result.returncode == 0, result.stderr
    from gateway import passwords
    with sqlite3.connect(db) as conn:
        (stored,) = conn.execute("SELECT password_hash FROM users").fetchone()
    assert passwords.verify("FromStdin1", stored)


@pytest.mark.parametrize(("args", "status", "shown"), [
    (["--help"], 0, "usage: http2sms [OPTIONS] COMMAND"),
    (["account", "show", "sms-x-1", "--json"], 0, '"creditsLeft": 100'),
    (["--json", "sender", "add", "sms-x-1", "SHOP"], 0, '"SHOP"'),
    (["message", "--json", "list", "sms-x-1"], 0, "[]"),
    (["alert", "test", "sms-x-1", "u1"], 2, "error: no low-credit alert configured"),
    (["token", "create", "robot", "--account", "sms-x-1"], 0, "token: h2s_"),
])
def test_each_command_group_in_a_process_of_its_own(
        seeded: Path, tmp_path: Path, args: list[str], status: int, shown: str) -> None:
    db = tmp_path / "cli.sqlite3"
    shutil.copy(seeded, db)
    result = run_process(db, *args)
    assert result.returncode == status, result.stderr
    assert shown in (result.stdout if status == 0 else result.stderr)
