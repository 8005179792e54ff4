"""Settings: a TOML file (see config/gateway.example.toml) with environment overrides.

Every setting is a field of a frozen msgspec Struct below, with its type and its range or
choices, so the example file, the loader and the environment variables
(`HTTP2SMS_<SECTION>_<KEY>`, e.g. `HTTP2SMS_SERVER_PORT=9000`) can never disagree about what
exists or what is valid. A loaded Config cannot be changed: `Config.replace` makes a changed
copy, checked like the file.

`[operator]` is a tagged section: its `kind` picks which keys are valid (OPERATOR_KINDS), so
a connector with settings of its own (`kind = "smpp"` with an `[operator.smpp]` table) adds
a struct there and nothing else.

Why msgspec and not pydantic-settings: both express ranges, choices, tagged unions and
frozen models, but every process of the gateway pays the import (`serve`, its delivery
worker, each CLI command), and loading happens once. Medians of 5 fresh processes on the
2-core development machine, under other load; "load" is `load()` of the example file:

                                   import    first load   later loads
  msgspec 0.23 (this module)        25 ms     2.3 ms       1.1 ms
  pydantic-settings 2.16            149 ms    3.7 ms       1.0 ms
    (pydantic 2.14, the same schema, its TOML source, env_nested_delimiter="_")
  dataclasses (the loader before)   24 ms                  1.4 ms

In `python -X importtime`, msgspec itself adds 5-17 ms within `import gateway.cli`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
from msgspec import Meta, Struct, field

from gateway import ptt

ENV_PREFIX = "HTTP2SMS_"


class ConfigError(ValueError):
    pass


# Checked at load; the error names the setting and the bound it breaks.
Port = Annotated[int, Meta(ge=1, le=65535)]
# The admin listener's port may be 0, a free one the system picks: the tests' listeners.
ListenPort = Annotated[int, Meta(ge=0, le=65535)]
Count = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
# A timeout, delay or period that must be longer than nothing.
Seconds = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
Ratio = Annotated[float, Meta(ge=0, le=1)]
# SMPP's C-Octet strings of bind_transmitter & co. (SMPP 3.4, 4.1.1), without their NUL.
SmppText15 = Annotated[str, Meta(max_length=15, pattern=r"^[\x20-\x7e]*$")]
SmppText12 = Annotated[str, Meta(max_length=12, pattern=r"^[\x20-\x7e]*$")]
SmppText8 = Annotated[str, Meta(max_length=8, pattern=r"^[\x20-\x7e]*$")]
# A deadline on a client: longer than nothing, at most an hour.
Timeout = Annotated[float, Meta(gt=0, le=3600)]


class Section(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A table of the file: its keys are the fields, any other key is an error.

    Building one directly checks nothing; `load`, `from_dict` and `Config.replace` check.
    """


class ServerConfig(Section, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 8080
    # Proxies whose X-Forwarded-For is believed (addresses or CIDR blocks).
    trusted_proxies: list[str] = field(default_factory=list)
    # Accept private/loopback addresses in ipRestrictions (on-premises and test deployments).
    allow_private_ips: bool = False
    # HTTPS on the gateway itself; both empty means plain HTTP (e.g. behind a TLS proxy).
    tls_cert: str = ""
    tls_key: str = ""
    max_request_bytes: Count = 64 * 1024
    # Longest URL (path and query), in bytes; longer gets HTTP 400. The default lets a GET
    # carry the largest valid send: 500 recipients and a 6-part percent-encoded text.
    max_url_bytes: Count = 16 * 1024
    # Requests being served at once before new ones get 503 + Retry-After. A request counts
    # once its body is in; /healthz, /readyz and /metrics never count.
    max_inflight: Count = 2048
    # Per client address (the TCP peer; trusted_proxies have no cap), 0: no cap. Beyond
    # them a connection, or a request, is answered 429 with Retry-After.
    max_connections_per_address: Annotated[int, Meta(ge=0, le=1_000_000)] = 1024
    max_inflight_per_address: Annotated[int, Meta(ge=0, le=1_000_000)] = 512
    # Deadlines after which a connection is closed: a request's head from the connection or
    # its first byte, its body from the end of its head, and the wait between requests.
    header_timeout_seconds: Timeout = 10.0
    body_timeout_seconds: Timeout = 30.0
    idle_timeout_seconds: Timeout = 75.0
    # On SIGTERM the gateway has exited within this long: in-flight requests, then the flush.
    shutdown_grace_seconds: NonNegative = 10.0
    # Run the operator, its delivery reports and the callbacks in a second process, so that
    # they use another CPU core than the send URL (about 2x the sends per second under a
    # burst). false: one process does everything.
    delivery_worker: bool = True
    # Whether this gateway delivers at all. false: it takes sends only, and `http2sms
    # deliver` processes deliver what it stores (scaling sends and delivery apart).
    delivery: bool = True
    # Raw non-ASCII bytes in the send URL taken on every request of a connection, not only
    # its first: behind a proxy that reuses its connections to the gateway. Costs CPU.
    raw_url_bytes_always: bool = False


# The shortest admin.token accepted: with a lockout after a few failures per address, 24
# random characters (more than 128 bits) cannot be guessed from any number of addresses.
ADMIN_TOKEN_MIN_LENGTH = 24


class AdminConfig(Section, frozen=True):
    # Bootstrap bearer token of the admin REST API, for every account: empty, or at least
    # ADMIN_TOKEN_MIN_LENGTH characters (checked in `from_dict`). Empty with no token created
    # by `http2sms token create` disables the admin API.
    token: str = ""
    # Empty host: the admin API shares the public listener; else it gets its own.
    host: str = ""
    port: ListenPort = 8081


class ConsoleConfig(Section, frozen=True):
    enabled: bool = True
    # Minutes without a request after which a console session ends.
    session_idle_minutes: Annotated[float, Meta(gt=0, le=24 * 60)] = 30.0


class StoreConfig(Section, frozen=True):
    path: Annotated[str, Meta(min_length=1)] = "var/gateway.sqlite3"
    # Most sends committed in one transaction (group commit).
    max_batch: Count = 512
    # How long a write waits for another process's lock (e.g. a long command-line change)
    # before giving up: a send then answers 503, a start with the store locked fails.
    busy_timeout_seconds: NonNegative = 10.0
    # The database's URL, in place of `path` when not empty: postgresql://user@host/dbname
    # for several gateways on one PostgreSQL database (or an sqlite:/// URL).
    url: str = ""

    @property
    def location(self) -> str:
        """Where the store is: `url`, else `path`."""
        return self.url or self.path


class SendConfig(Section, frozen=True):
    timezone: str = "Europe/Paris"
    # Appended unless noStop=1; an account may set its own.
    stop_clause: str = "STOP 36111"
    # The sender used with senderForResponse=1: a number that accepts replies.
    reply_sender: str = "+33700000000"
    max_recipients: Count = 500
    # Credits per SMS part when no prefix of [rates] matches.
    default_rate: str = "1"
    # How far ahead `deferred` may be: its credits are held until then (OVH: about a year).
    max_deferral_days: Annotated[int, Meta(ge=1, le=3660)] = 366


class OperatorConfig(Section, frozen=True, tag_field="kind"):
    """The keys of every operator connector; each kind adds its own (OPERATOR_KINDS)."""

    max_batch: Count = 1000

    @property
    def kind(self) -> str:
        return str(self.__struct_config__.tag)


class SimulatedOperatorConfig(OperatorConfig, frozen=True, tag="simulated"):
    # Its keys sit in [operator] itself, where they were before kinds existed.
    seed: int = 0
    # Seconds before the simulated network reports each state change.
    min_delay: NonNegative = 0.2
    max_delay: NonNegative = 2.0
    # Share of messages that pass through a temporary failure before their final state.
    retry_ratio: Ratio = 0.1
    # Share of messages that end in a failure instead of being delivered.
    failure_ratio: Ratio = 0.05
    validity_hours: Seconds = 48.0


class SmppSettings(Section, frozen=True):
    """`[operator.smpp]`: the link to an SMSC (gateway/operators/smpp/, README "SMPP")."""

    host: str = "localhost"
    port: Port = 2775
    tls: bool = False
    # CA bundle the SMSC's certificate is checked against; empty: the system's.
    tls_ca_file: str = ""
    # SMPP 3.4 caps these (15, 8 and 12 characters, printable ASCII): a longer password
    # would be cut by the PDU and refused as wrong, with no hint why.
    system_id: SmppText15 = ""
    # Better from HTTP2SMS_OPERATOR_SMPP_PASSWORD or password_file than in this file.
    password: SmppText8 = ""
    # A file holding the password (its first line); used when password is empty.
    password_file: str = ""
    system_type: SmppText12 = ""
    # "transceiver": one bind does both; "transmitter_receiver": a pair per bind.
    bind_mode: Literal["transceiver", "transmitter_receiver"] = "transceiver"
    binds: Annotated[int, Meta(ge=1, le=64)] = 1
    # submit_sm sent and not yet answered, per bind.
    window: Annotated[int, Meta(ge=1, le=1000)] = 10
    # Messages (submit_sm) per second, per bind and in all; 0: no cap.
    throughput_per_bind: NonNegative = 0.0
    throughput_total: NonNegative = 0.0
    enquire_link_seconds: Seconds = 30.0
    # A bind, submit_sm or enquire_link without an answer this long counts as lost.
    response_timeout_seconds: Seconds = 10.0
    # Reconnection: first delay, doubling up to the max, each stretched by up to jitter.
    reconnect_first_seconds: Seconds = 1.0
    reconnect_max_seconds: Seconds = 60.0
    reconnect_jitter: Ratio = 0.2
    # Source TON/NPI of an alphanumeric sender ("MyShop") and of a number.
    source_ton_alphanumeric: Annotated[int, Meta(ge=0, le=6)] = 5
    source_npi_alphanumeric: Annotated[int, Meta(ge=0, le=18)] = 0
    source_ton_numeric: Annotated[int, Meta(ge=0, le=6)] = 1
    source_npi_numeric: Annotated[int, Meta(ge=0, le=18)] = 1
    dest_ton: Annotated[int, Meta(ge=0, le=6)] = 1
    dest_npi: Annotated[int, Meta(ge=0, le=18)] = 1
    # 1: a receipt for every final state; 0: none (messages stay at ptt 3 until they expire:
    # receipt_grace_hours).
    registered_delivery: Annotated[int, Meta(ge=0, le=31)] = 1
    service_type: Annotated[str, Meta(max_length=5)] = ""
    # validity_period of each submit_sm, in hours; 0: the SMSC's default.
    validity_hours: NonNegative = 48.0
    # A message sent with no final receipt this long after its validity period ended (48 h
    # when validity_hours is 0) ends expired (ptt 8; 6, state unknown, when
    # registered_delivery does not ask a receipt of every final state).
    receipt_grace_hours: NonNegative = 1.0
    # data_coding of GSM 03.38 text: 0 (SMSC default alphabet), or 1 / 3 for SMSCs that
    # want IA5 / Latin-1 octets (then only the characters Latin-1 has are sent as such).
    gsm_data_coding: Literal[0, 1, 3] = 0
    # Long messages: "udh" (concatenation header in each part), "sar" (SAR TLVs) or
    # "payload" (one submit_sm with message_payload: one reference for all parts).
    long_messages: Literal["udh", "sar", "payload"] = "udh"
    # How the `id:` of a receipt's text is written compared with submit_sm_resp's
    # message_id: "same", "decimal" (a hex message_id written in decimal) or "hex" (a
    # decimal message_id written in hex). receipted_message_id, when sent, is normalized the
    # same way as submit_sm_resp's message_id.
    receipt_id: Literal["same", "decimal", "hex"] = "same"
    # command_status (hex "0x0000000B" or decimal) or a receipt's "err:NNN" -> ptt, over
    # the default table in gateway/operators/smpp/errors.py. From the environment: JSON,
    # HTTP2SMS_OPERATOR_SMPP_ERRORS='{"0x0000000B": 23}'.
    errors: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Checked at load, not when the worker builds its table: a wrong key or code must
        # stop the start with the setting named, not crash the worker later.
        for key, code in self.errors.items():
            if ptt.lookup(code) is None:
                raise ValueError(f"errors.{key}: unknown ptt {code}")
            if not key.lower().startswith("err:"):
                try:
                    int(key, 0)
                except ValueError:
                    raise ValueError(f"errors.{key}: a command_status (0x0000000B or 11) "
                                     "or err:NNN") from None


class SmppOperatorConfig(OperatorConfig, frozen=True, tag="smpp"):
    smpp: SmppSettings = field(default_factory=SmppSettings)


# `[operator] kind` -> the struct of that kind's keys. A kind with many keys of its own gives
# them a table named after it, a Section-typed field (`smpp: SmppConfig` -> [operator.smpp]).
OPERATOR_KINDS: dict[str, type[OperatorConfig]] = {"simulated": SimulatedOperatorConfig,
                                                   "smpp": SmppOperatorConfig}


class CallbacksConfig(Section, frozen=True):
    timeout_seconds: Seconds = 10.0
    first_retry_seconds: Seconds = 5.0
    max_retry_seconds: Seconds = 3600.0
    give_up_after_hours: Seconds = 24.0
    # Each retry delay is stretched by a random share of up to this much.
    jitter_ratio: Ratio = 0.2
    # A burst makes about two callbacks per SMS, mostly to one host: 8 at once capped that
    # host at about 800/s in scripts/bench, 64 about 2,000/s; since claims take only what
    # can start (fair shares), 64 gave 3,162/s and 128 gives 4,916/s.
    per_host_concurrency: Count = 128
    max_concurrency: Count = 256
    # An attempt cut short by a crash is retried once this long has passed since it began.
    # 0: 3 x timeout_seconds + 60. Shorter than an attempt can take means some run twice.
    lease_seconds: NonNegative = 0.0
    # Callbacks in flight that an account may always hold; beyond it, an account takes
    # another only while it holds fewer than are left free, so that one account's slow
    # endpoints leave slots to the others (alone, an account gets about half of them).
    account_share: Count = 16
    # Callbacks reach global unicast addresses only (checked on the address connected to,
    # after name resolution); true: any unicast address, for an intranet (and the tests).
    allow_private_targets: bool = False
    # Networks callbacks may reach besides (CIDR blocks, e.g. "10.1.2.0/24").
    allowed_target_networks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Raised here, a typo is an error at load naming the setting, not at the first call.
        for item in self.allowed_target_networks:
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ValueError(f"allowed_target_networks: {item!r} is not a network "
                                 "(address or CIDR block)") from None


class SmtpConfig(Section, frozen=True):
    host: str = "localhost"
    port: Port = 25
    security: Literal["none", "starttls", "tls"] = "none"
    username: str = ""
    password: str = ""
    sender: str = "http2sms-gateway@localhost"
    # Per SMTP step (connect, each command); a whole delivery gets four times this.
    timeout_seconds: Seconds = 30.0
    # Alert mails sent at once (SMTP sessions open together).
    max_connections: Count = 4


class AlertsConfig(Section, frozen=True):
    # The declared-or-not sender that low-credit alert SMS come from.
    sms_sender: str = "ALERT"
    # Where the alert mail tells the owner to top up.
    top_up_hint: str = "Top up with: http2sms account credit <account> <amount>"
    # How often the store is checked for alerts queued outside this process (the CLI, a
    # quota change); alerts fired by sends are picked up at once.
    poll_seconds: Seconds = 5.0


class SecurityConfig(Section, frozen=True):
    # Failed logins before a lockout, per (account, login) and per client IP; wrong admin
    # API tokens before a lockout of the client IP from the admin API.
    max_failures: Count = 10
    lockout_seconds: NonNegative = 300.0
    # Sends (messages) per second per API user; 0 disables throttling.
    user_rate_per_second: NonNegative = 0.0
    user_burst: Count = 100
    # An IPv6 caller's address key is its network of this prefix (a host holds a /64).
    ipv6_prefix: Annotated[int, Meta(ge=1, le=128)] = 64
    # Failed logins per (account, login) per lockout_seconds, from all addresses together,
    # beyond which that login is slowed (0: never).
    login_failure_budget: NonNegativeInt = 50
    # A slowed login: one password check per this many seconds outside its allowlist.
    login_slow_seconds: NonNegative = 1.0
    # Distinct users logging in from one address that make it reported as shared (0: never).
    shared_address_users: NonNegativeInt = 20
    # Password checks (scrypt) waiting or running at once, and the share of one address
    # (an IPv6 caller's network, as above); a check beyond either is answered 429 at once.
    verification_queue: Annotated[int, Meta(ge=2, le=100_000)] = 64
    verification_queue_per_address: Annotated[int, Meta(ge=1, le=100_000)] = 8


class LogConfig(Section, frozen=True):
    # "console" for people, "json" for log shippers.
    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class MetricsConfig(Section, frozen=True):
    # Label metrics by account name (switch off with many accounts).
    per_account_labels: bool = True
    # Readiness fails when this many messages wait for the operator or callbacks wait.
    max_backlog: NonNegativeInt = 100_000


class RetentionConfig(Section, frozen=True):
    """How long data is kept (see docs/retention.md); an account may override both days."""

    # Message texts and recipients' numbers (and incoming texts and senders) are erased
    # after this many days; 0 keeps them as long as the messages.
    personal_data_days: Annotated[int, Meta(ge=0, le=36600)] = 90
    # Whole messages, their history, incoming messages and finished callbacks and alerts
    # are deleted after this many days; 0 keeps them forever. The ledger is never deleted.
    messages_days: Annotated[int, Meta(ge=0, le=36600)] = 400
    # Rows per purge transaction: each holds the write lock for a few milliseconds.
    batch_size: Annotated[int, Meta(ge=1, le=10_000)] = 200
    # Pause between two batches, in which sends take the write lock.
    batch_pause_seconds: NonNegative = 0.005
    # How often the purge runs; 0 never in the background (`http2sms purge` still does).
    interval_seconds: NonNegative = 3600.0


class Config(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    send: SendConfig = field(default_factory=SendConfig)
    # Destination prefix -> credits per SMS part, e.g. {"+33" = 1, "+1" = 2.5}.
    rates: dict[str, str] = field(default_factory=dict)
    operator: OperatorConfig = field(default_factory=SimulatedOperatorConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)

    def replace(self, changes: Mapping[str, Any]) -> Config:
        """A copy with `changes` made, e.g. {"store.path": p, "operator.min_delay": 0.0},
        checked like the file. A new `<section>.kind` starts that section from its defaults.
        """
        data = to_dict(self)
        for name, value in changes.items():
            section, _, key = name.rpartition(".")
            if key == "kind" and section in _TAGGED and data[section].get("kind") != value:
                data[section] = {"kind": value}
        for name, value in changes.items():
            *sections, key = name.split(".")
            table = data
            for part in sections:
                table = table.setdefault(part, {})
                if not isinstance(table, dict):
                    raise ConfigError(f"unknown setting {name}")
            table[key] = value
        return from_dict(data)


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
    return from_dict(data, os.environ if env is None else env)


def to_dict(config: Config) -> dict[str, Any]:
    """The settings as plain data shaped like the file; `from_dict` reads it back."""
    result: dict[str, Any] = msgspec.to_builtins(config)
    return result


def from_dict(data: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Config:
    """A Config from data shaped like the file, with the `HTTP2SMS_...` variables of `env`
    over it."""
    env = env or {}
    for name in data:
        if name not in _FIELDS:
            raise ConfigError(f"unknown config section [{name}]")
    values: dict[str, Any] = {}
    for name, info in _FIELDS.items():
        table = data.get(name, {})
        if name == "rates":
            values[name] = _rates(table)
            continue
        if not isinstance(table, Mapping):
            raise ConfigError(f"[{name}] must be a table")
        values[name] = _section(name, _kind_of(name, info, table, env), table, env)
    config = Config(**values)
    _check_admin_token(config.admin.token, env)
    return config


def _check_admin_token(token: str, env: Mapping[str, str]) -> None:
    """A short bootstrap token is refused, naming the setting but never showing its value."""
    if token and len(token) < ADMIN_TOKEN_MIN_LENGTH:
        var = _env_name("admin", "token")
        source = f" ({var})" if var in env else ""
        raise ConfigError(
            f"setting admin.token{source}: at least {ADMIN_TOKEN_MIN_LENGTH} characters "
            f"(got {len(token)}); generate one with python3 -c 'import secrets; "
            f"print(secrets.token_urlsafe(32))', or leave it empty and use http2sms token "
            f"create")


# -- the loader's steps -------------------------------------------------------------------

_FIELDS = {info.name: info for info in msgspec.structs.fields(Config)}
# Tagged sections: the struct the field is declared with -> its kinds.
_KINDS: dict[type[Section], dict[str, type[OperatorConfig]]] = {OperatorConfig: OPERATOR_KINDS}
_TAGGED = {name for name, info in _FIELDS.items() if info.type in _KINDS}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def _env_name(path: str, key: str) -> str:
    return f"{ENV_PREFIX}{path.replace('.', '_')}_{key}".upper()


def _kind_of(path: str, info: msgspec.structs.FieldInfo, table: Mapping[str, Any],
             env: Mapping[str, str]) -> type[Section]:
    """The struct that `table` is read with: for a tagged section, the one its `kind` names."""
    declared: type[Section] = info.type
    kinds = _KINDS.get(declared)
    if kinds is None:
        return declared
    var = _env_name(path, "kind")
    default = info.default_factory() if info.default is msgspec.NODEFAULT else info.default
    kind = env[var] if var in env else table.get("kind", default.kind)
    if kind not in kinds:
        source = f" ({var})" if var in env else ""
        raise ConfigError(f"setting {path}.kind{source}: one of {', '.join(kinds)} "
                          f"(got {kind!r})")
    return kinds[kind]


def _section(path: str, struct: type[Section], table: Mapping[str, Any],
             env: Mapping[str, str]) -> Section:
    fields = {info.name: info for info in msgspec.structs.fields(struct)}
    tag_field = struct.__struct_config__.tag_field
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key == tag_field:
            continue
        info = fields.get(key)
        if info is None:
            raise ConfigError(f"unknown setting {path}.{key}")
        if _is_section(info.type):
            if not isinstance(value, Mapping):
                raise ConfigError(f"[{path}.{key}] must be a table")
            continue
        values[key] = _lenient(info.type, value)
    for key, info in fields.items():
        if _is_section(info.type):
            sub = table.get(key, {})
            values[key] = _section(f"{path}.{key}", _kind_of(f"{path}.{key}", info, sub, env),
                                   sub, env)
            continue
        var = _env_name(path, key)
        if var in env:
            values[key] = _from_env(f"{path}.{key} ({var})", info.type, env[var])
    try:
        return msgspec.convert(values, struct)
    except msgspec.ValidationError as exc:
        raise _error(path, struct, exc, values) from None


def _is_section(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Section)


def _base(kind: Any) -> Any:
    return get_args(kind)[0] if get_origin(kind) is Annotated else kind


def _lenient(kind: Any, value: Any) -> Any:
    """What the file format has always accepted beyond the strict type: a number where text
    is expected (`default_rate = 1.5`), a comma-separated string for a list."""
    base = _base(kind)
    if base is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if base == list[str]:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            return [item.strip() if isinstance(item, str) else item for item in value]
    return value


def _from_env(name: str, kind: Any, raw: str) -> Any:
    """A variable's text as the setting's type, checked against its range or choices."""
    base = _base(kind)
    value: Any = raw
    if base is bool:
        lowered = raw.strip().lower()
        if lowered not in _TRUE + _FALSE:
            raise ConfigError(f"setting {name}: expected true or false{_got(name, raw)}")
        value = lowered in _TRUE
    elif base == list[str]:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        value = _lenient(kind, value if isinstance(value, list) else raw)
    elif get_origin(base) is dict:
        try:
            value = json.loads(raw)  # a table from the environment is written as JSON
        except json.JSONDecodeError:
            value = raw
    try:
        return msgspec.convert(value, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"setting {name}: {_what(kind, str(exc))}{_got(name, raw)}") \
            from None


_AT = re.compile(r" - at `\$(?P<where>[^`]*)`$")
_STEP = re.compile(r"\.(\w+)|\[(\d+)\]")


def _error(path: str, struct: type[Section], exc: msgspec.ValidationError,
           values: Mapping[str, Any]) -> ConfigError:
    """msgspec's message, with the setting named as in the file and the value it got."""
    text = str(exc)
    match = _AT.search(text)
    where = match["where"] if match else ""
    what = text[:match.start()] if match else text
    if not where:  # about the whole section: its values may hold secrets, so none is shown
        return ConfigError(f"setting {path}: {_what(None, what)}")
    value: Any = values
    kind: Any = struct
    for key, index in _STEP.findall(where):
        if key and isinstance(value, Mapping) and key in value:
            value = value[key]
            kind = {i.name: i.type for i in msgspec.structs.fields(kind)}.get(key) \
                if _is_section(kind) else None
        elif index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
            kind = None
        else:
            return ConfigError(f"setting {path}{where}: {_what(None, what)}")
    return ConfigError(f"setting {path}{where}: {_what(kind, what)}"
                       f"{_got(path + where, value)}")


# Settings whose value is a secret: an error about them never quotes it (it would reach a
# terminal, a journal or a container's log).
_SECRET = re.compile(r"password|token|secret", re.IGNORECASE)


def _got(name: str, value: Any) -> str:
    return "" if _SECRET.search(name) else f" (got {value!r})"


def _what(kind: Any, message: str) -> str:
    base = _base(kind)
    if get_origin(base) is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(base))
    # The value follows in the message, so msgspec's name of its type is left out.
    message = re.sub(r", got `[^`]*`$", "", message)
    return message[:1].lower() + message[1:]


def _rates(table: Any) -> dict[str, str]:
    if not isinstance(table, Mapping):
        raise ConfigError("[rates] must be a table of prefix = credits")
    rates: dict[str, str] = {}
    for prefix, credits in table.items():
        if isinstance(credits, bool) or not isinstance(credits, str | int | float):
            raise ConfigError(f"setting rates.{prefix}: expected a number of credits "
                              f"(got {credits!r})")
        rates[str(prefix)] = str(credits)
    return rates
