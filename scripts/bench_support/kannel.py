"""scripts/bench: Kannel, the C gateway most self-hosted setups run, as the peer row (issue 24).

Debian's `kannel` package gives bearerbox and smsbox, `kannel-extras` the test SMSC client
`fakesmsc`. The peer runs all on loopback: bearerbox with its file store (`store-type = file`,
so an accepted message survives a restart, as ours does) and a `smsc = fake` connection that
fakesmsc holds open and that takes every message at once (what our simulator does), smsbox
with one sendsms user per API user of the gateway (same login and password, so wrk's
rotation is the same), all at the log level the gateway runs at. wrk sends through
`/cgi-bin/sendsms`; an answer counts as accepted only as `202` with `0: Accepted` (load.lua).

This module holds what the driver needs to know about Kannel: where its programs are, its
configuration and how to tell it is ready. The driver starts and stops the processes.
"""

from __future__ import annotations

import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEARERBOX = Path("/usr/sbin/bearerbox")
SMSBOX = Path("/usr/sbin/smsbox")
# Debian ships the fake SMSC client with the tests, in kannel-extras.
FAKESMSC = Path("/usr/lib/kannel/test/fakesmsc")

# Kannel's levels: 0 debug, 1 info, 2 warning, 3 error, 4 panic. Its default is 0 (debug):
# the peer logs what the gateway logs, not more.
LOG_LEVELS = {"debug": 0, "info": 1, "warning": 2, "error": 3}

ADMIN_PASSWORD = "bench-admin"
# What sendsms answers when bearerbox took the message (`3: Queued for later delivery` means
# no SMSC was up: not what the row measures).
ACCEPTED_STATUS = 202
ACCEPTED_PREFIX = "0: Accepted"


def missing() -> str | None:
    """Why the Kannel row cannot run here, or None."""
    for program, package in ((BEARERBOX, "kannel"), (SMSBOX, "kannel"),
                             (FAKESMSC, "kannel-extras")):
        if not program.exists():
            return f"{program} is missing (Debian package {package})"
    if shutil.which("wrk") is None:
        return "wrk is missing"
    return None


@dataclass(frozen=True)
class Ports:
    admin: int
    smsbox: int      # bearerbox's port for smsbox
    smsc: int        # the fake SMSC's port, where fakesmsc connects
    sendsms: int     # smsbox's HTTP port: the load goes here


def config_text(folder: Path, ports: Ports, users: list[dict[str, Any]],
                log_level: str) -> str:
    """kannel.conf for bearerbox and smsbox (both read the same file)."""
    level = LOG_LEVELS[log_level]
    groups = [f"""group = core
admin-port = {ports.admin}
admin-interface = 127.0.0.1
admin-password = {ADMIN_PASSWORD}
admin-allow-ip = "127.0.0.1"
smsbox-port = {ports.smsbox}
smsbox-interface = 127.0.0.1
box-allow-ip = "127.0.0.1"
box-deny-ip = "*.*.*.*"
log-file = "{folder / 'bearerbox.log'}"
log-level = {level}
store-type = file
store-location = "{folder / 'kannel.store'}"
dlr-storage = internal
""", f"""group = smsc
smsc = fake
smsc-id = fake
host = 127.0.0.1
port = {ports.smsc}
connect-allow-ip = 127.0.0.1
""", f"""group = smsbox
bearerbox-host = 127.0.0.1
bearerbox-port = {ports.smsbox}
sendsms-port = {ports.sendsms}
sendsms-interface = 127.0.0.1
log-file = "{folder / 'smsbox.log'}"
log-level = {level}
"""]
    for user in users:
        groups.append(f"""group = sendsms-user
username = {user['login']}
password = {user['password']}
""")
    return "\n".join(groups)


def write_config(folder: Path, ports: Ports, users: list[dict[str, Any]],
                 log_level: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "kannel.conf"
    path.write_text(config_text(folder, ports, users, log_level))
    return path


def bearerbox_argv(conf: Path, log_level: str) -> list[str]:
    return [str(BEARERBOX), "-v", str(LOG_LEVELS[log_level]), str(conf)]


def smsbox_argv(conf: Path, log_level: str) -> list[str]:
    return [str(SMSBOX), "-v", str(LOG_LEVELS[log_level]), str(conf)]


def fakesmsc_argv(ports: Ports) -> list[str]:
    # -m 0: sends no message of its own, only takes what bearerbox hands it.
    return [str(FAKESMSC), "-H", "127.0.0.1", "-r", str(ports.smsc), "-i", "0", "-m", "0",
            "-v", "4", "1 2 text unused"]


def status(ports: Ports) -> str:
    url = f"http://127.0.0.1:{ports.admin}/status.txt?password={ADMIN_PASSWORD}"
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode(errors="replace"))


def is_ready(status_text: str) -> bool:
    """bearerbox's status once smsbox and the fake SMSC are connected."""
    return "smsbox:" in status_text and "(online" in status_text


def sent(status_text: str) -> int | None:
    """Messages bearerbox handed to the SMSC so far (`SMS: received .., sent N`)."""
    for line in status_text.splitlines():
        if line.startswith("SMS: received"):
            _, _, rest = line.partition(" sent ")
            number = rest.split(" ", 1)[0]
            return int(number) if number.isdigit() else None
    return None
