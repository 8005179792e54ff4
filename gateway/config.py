"""Settings: a TOML file (see config/gateway.example.toml) with environment overrides.

Every setting lives in a dataclass field below, so the example file, the loader and the
environment variables (`HTTP2SMS_<SECTION>_<KEY>`, e.g. `HTTP2SMS_SERVER_PORT=9000`) can never
disagree about what exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "HTTP2SMS_"


class ConfigError(ValueError):
    pass


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Proxies whose X-Forwarded-For is believed (addresses or CIDR blocks).
    trusted_proxies: list[str] = field(default_factory=list)
    # Accept private/loopback addresses in ipRestrictions (on-premises and test deployments).
    allow_private_ips: bool = False
    # HTTPS on the gateway itself; both empty means plain HTTP (e.g. behind a TLS proxy).
    tls_cert: str = ""
    tls_key: str = ""
    max_request_bytes: int = 64 * 1024
    # Longest URL (path and query), in bytes; longer gets HTTP 400. The default lets a GET
    # carry the largest valid send: 500 recipients and a 6-part percent-encoded text.
    max_url_bytes: int = 16 * 1024
    # Requests being served at once before new ones get 503 + Retry-After.
    max_inflight: int = 2048
    # On SIGTERM the gateway has exited within this long: in-flight requests, then the flush.
    shutdown_grace_seconds: float = 10.0
    # Run the operator, its delivery reports and the callbacks in a second process, so that
    # they use another CPU core than the send URL (about 2x the sends per second under a
    # burst). false: one process does everything.
    delivery_worker: bool = True
    # Raw non-ASCII bytes in the send URL taken on every request of a connection, not only
    # its first: behind a proxy that reuses its connections to the gateway. Costs CPU.
    raw_url_bytes_always: bool = False


@dataclass
class AdminConfig:
    # Bearer token of the admin REST API; empty disables the admin API.
    token: str = ""
    # Empty host: the admin API shares the public listener; else it gets its own.
    host: str = ""
    port: int = 8081


@dataclass
class StoreConfig:
    path: str = "var/gateway.sqlite3"
    # Most sends committed in one transaction (group commit).
    max_batch: int = 512
    # How long a write waits for another process's lock (e.g. a long command-line change)
    # before giving up: a send then answers 503, a start with the store locked fails.
    busy_timeout_seconds: float = 10.0


@dataclass
class SendConfig:
    timezone: str = "Europe/Paris"
    # Appended unless noStop=1; an account may set its own.
    stop_clause: str = "STOP 36111"
    # The sender used with senderForResponse=1: a number that accepts replies.
    reply_sender: str = "+33700000000"
    max_recipients: int = 500
    # Credits per SMS part when no prefix of [rates] matches.
    default_rate: str = "1"


@dataclass
class OperatorConfig:
    kind: str = "simulated"
    seed: int = 0
    # Seconds before the simulated network reports each state change.
    min_delay: float = 0.2
    max_delay: float = 2.0
    # Share of messages that pass through a temporary failure before their final state.
    retry_ratio: float = 0.1
    # Share of messages that end in a failure instead of being delivered.
    failure_ratio: float = 0.05
    validity_hours: float = 48.0
    max_batch: int = 1000


@dataclass
class CallbacksConfig:
    timeout_seconds: float = 10.0
    first_retry_seconds: float = 5.0
    max_retry_seconds: float = 3600.0
    give_up_after_hours: float = 24.0
    # Each retry delay is stretched by a random share of up to this much.
    jitter_ratio: float = 0.2
    # A burst makes about two callbacks per SMS, mostly to one host: 8 at once capped that
    # host at about 800/s in scripts/bench, 64 let it take about 2,000/s.
    per_host_concurrency: int = 64
    max_concurrency: int = 256
    # An attempt cut short by a crash is retried once this long has passed since it began.
    # 0: 3 x timeout_seconds + 60. Shorter than an attempt can take means some run twice.
    lease_seconds: float = 0.0


@dataclass
class SmtpConfig:
    host: str = "localhost"
    port: int = 25
    # "none", "starttls" or "tls"
    security: str = "none"
    username: str = ""
    password: str = ""
    sender: str = "http2sms-gateway@localhost"
    # Per SMTP step (connect, each command); a whole delivery gets four times this.
    timeout_seconds: float = 30.0
    # Alert mails sent at once (SMTP sessions open together).
    max_connections: int = 4


@dataclass
class AlertsConfig:
    # The declared-or-not sender that low-credit alert SMS come from.
    sms_sender: str = "ALERT"
    # Where the alert mail tells the owner to top up.
    top_up_hint: str = "Top up with: http2sms account credit <account> <amount>"
    # How often the store is checked for alerts queued outside this process (the CLI, a
    # quota change); alerts fired by sends are picked up at once.
    poll_seconds: float = 5.0


@dataclass
class SecurityConfig:
    # Failed logins before a lockout, per (account, login) and per client IP.
    max_failures: int = 10
    lockout_seconds: float = 300.0
    # Sends (messages) per second per API user; 0 disables throttling.
    user_rate_per_second: float = 0.0
    user_burst: int = 100
    # An IPv6 caller's address key is its network of this prefix (a host holds a /64).
    ipv6_prefix: int = 64
    # Failed logins per (account, login) per lockout_seconds, from all addresses together,
    # beyond which that login is slowed (0: never).
    login_failure_budget: int = 50
    # A slowed login: one password check per this many seconds outside its allowlist.
    login_slow_seconds: float = 1.0
    # Distinct users logging in from one address that make it reported as shared (0: never).
    shared_address_users: int = 20


@dataclass
class LogConfig:
    # "console" for people, "json" for log shippers.
    format: str = "console"
    level: str = "info"


@dataclass
class MetricsConfig:
    # Label metrics by account name (switch off with many accounts).
    per_account_labels: bool = True
    # Readiness fails when this many messages wait for the operator or callbacks wait.
    max_backlog: int = 100_000


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    send: SendConfig = field(default_factory=SendConfig)
    # Destination prefix -> credits per SMS part, e.g. {"+33" = 1, "+1" = 2.5}.
    rates: dict[str, str] = field(default_factory=dict)
    operator: OperatorConfig = field(default_factory=OperatorConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigError(f"config file not found: {path}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from exc
    config = from_dict(data)
    apply_env(config, os.environ if env is None else env)
    return config


def from_dict(data: Mapping[str, Any]) -> Config:
    config = Config()
    for name, value in data.items():
        if name == "rates":
            if not isinstance(value, dict):
                raise ConfigError("[rates] must be a table of prefix = credits")
            config.rates = {str(k): str(v) for k, v in value.items()}
            continue
        section = getattr(config, name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise ConfigError(f"unknown config section [{name}]")
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table")
        hints = get_type_hints(type(section))
        for key, item in value.items():
            if key not in hints:
                raise ConfigError(f"unknown setting {name}.{key}")
            setattr(section, key, _coerce(f"{name}.{key}", hints[key], item))
    return config


def apply_env(config: Config, env: Mapping[str, str]) -> None:
    for section_field in dataclasses.fields(config):
        section = getattr(config, section_field.name)
        if not dataclasses.is_dataclass(section):
            continue
        hints = get_type_hints(type(section))
        for key, hint in hints.items():
            var = f"{ENV_PREFIX}{section_field.name}_{key}".upper()
            if var in env:
                raw = env[var]
                value: Any = raw
                if hint is not str:
                    try:
                        value = json.loads(raw) if hint == list[str] else raw
                    except json.JSONDecodeError:
                        value = [part for part in raw.split(",") if part.strip()]
                setattr(section, key, _coerce(var, hint, value, from_env=True))


def _coerce(name: str, hint: Any, value: Any, *, from_env: bool = False) -> Any:
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if from_env and str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if from_env and str(value).lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            if isinstance(value, bool) or (not from_env and not isinstance(value, int)):
                raise ValueError("expected an integer")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if hint is str:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError("expected a string")
            return str(value)
        if hint == list[str]:
            if isinstance(value, str):
                value = [part for part in value.split(",") if part.strip()]
            if not isinstance(value, list):
                raise ValueError("expected a list of strings")
            return [str(item).strip() for item in value]
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name}: {exc} (got {value!r})") from exc
    raise ConfigError(f"setting {name}: unsupported type {hint}")
