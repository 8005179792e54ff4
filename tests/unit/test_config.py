"""Settings: the example file documents every one, the environment overrides them, each is
checked against its range or choices, and a loaded Config cannot change."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from gateway import config as config_module
from gateway.config import Config, ConfigError, OperatorConfig, Port, Section

EXAMPLE = Path(__file__).parents[2] / "config" / "gateway.example.toml"


def test_example_documents_every_setting_with_its_default() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    defaults = Config()
    for section in msgspec.structs.fields(Config):
        value = getattr(defaults, section.name)
        if not isinstance(value, Section):
            assert section.name in data
            continue
        if isinstance(value, OperatorConfig):
            assert data[section.name]["kind"] == value.kind
        for item in msgspec.structs.fields(value):
            assert item.name in data[section.name], f"{section.name}.{item.name} undocumented"
            assert data[section.name][item.name] == getattr(value, item.name), \
                f"{section.name}.{item.name}: example differs from the default"
    assert config_module.load(EXAMPLE) == defaults


def test_example_documents_every_smpp_setting_with_its_default() -> None:
    """The [operator.smpp] table is commented out in the example (the simulator is the
    default): uncommented, it loads, and it names every key with its default."""
    lines = EXAMPLE.read_text().splitlines()
    start = lines.index("# [operator.smpp]")
    table: list[str] = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        if not line.startswith("# # "):
            table.append(line[2:])
    data = tomllib.loads("\n".join(table))["operator"]["smpp"]
    defaults = config_module.SmppSettings()
    for item in msgspec.structs.fields(defaults):
        assert item.name in data, f"operator.smpp.{item.name} undocumented"
        assert data[item.name] == getattr(defaults, item.name), item.name
    cfg = config_module.from_dict({"operator": {"kind": "smpp", "smpp": data}})
    assert isinstance(cfg.operator, config_module.SmppOperatorConfig)
    assert cfg.operator.smpp == defaults


def test_environment_overrides() -> None:
    cfg = config_module.load(EXAMPLE, env={
        "HTTP2SMS_SERVER_PORT": "9000", "HTTP2SMS_SERVER_ALLOW_PRIVATE_IPS": "true",
        "HTTP2SMS_SERVER_TRUSTED_PROXIES": "10.0.0.1, 10.0.0.0/8",
        "HTTP2SMS_OPERATOR_MAX_DELAY": "0.5",
        "HTTP2SMS_ADMIN_TOKEN": "t0ken-of-at-least-24-characters"})
    assert cfg.server.port == 9000 and cfg.server.allow_private_ips is True
    assert cfg.server.trusted_proxies == ["10.0.0.1", "10.0.0.0/8"]
    assert cfg.operator.max_delay == 0.5 and cfg.admin.token == "t0ken-of-at-least-24-characters"


@pytest.mark.parametrize(("text", "message"), [
    ("[nope]\na = 1\n", "unknown config section"),
    ("[server]\nprot = 1\n", "unknown setting server.prot"),
    ("[server]\nport = 'x'\n", "server.port"),
    ("[server]\nallow_private_ips = 'yes'\n", "server.allow_private_ips"),
    ("[server\n", "config file"),
    ("server = 1\n", r"\[server\] must be a table"),
    ("[server]\nport = 70000\n", r"setting server.port: .*<= 65535 \(got 70000\)"),
    ("[smtp]\nport = 0\n", r"setting smtp.port: .*>= 1 \(got 0\)"),
    ("[callbacks]\ntimeout_seconds = 0\n", r"setting callbacks.timeout_seconds: .*> 0"),
    ("[operator]\nretry_ratio = 1.5\n", r"setting operator.retry_ratio: .*<= 1"),
    ("[store]\nmax_batch = 0\n", r"setting store.max_batch: .*>= 1"),
    ("[log]\nformat = 'xml'\n", r"setting log.format: one of console, json \(got 'xml'\)"),
    ("[log]\nlevel = 'loud'\n", r"setting log.level: one of debug, info, warning, error"),
    ("[smtp]\nsecurity = 'ssl'\n", r"setting smtp.security: one of none, starttls, tls"),
    ("[server]\ntrusted_proxies = [1]\n", r"setting server.trusted_proxies\[0\]"),
    ("[rates]\n'+33' = true\n", r"setting rates.\+33"),
    ("[operator]\nkind = 'kannel'\n",
     r"setting operator.kind: one of simulated, smpp \(got 'kannel'\)"),
    ("[operator.smpp]\nhost = 'x'\n", "unknown setting operator.smpp"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config_module.load(path, env={})


def test_bad_environment_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HTTP2SMS_SERVER_PORT"):
        config_module.load(None, env={"HTTP2SMS_SERVER_PORT": "eighty"})


@pytest.mark.parametrize(("env", "message"), [
    ({"HTTP2SMS_SERVER_PORT": "70000"},
     r"setting server.port \(HTTP2SMS_SERVER_PORT\): .*<= 65535 \(got '70000'\)"),
    ({"HTTP2SMS_LOG_FORMAT": "xml"}, r"setting log.format \(HTTP2SMS_LOG_FORMAT\): one of"),
    ({"HTTP2SMS_SERVER_DELIVERY_WORKER": "maybe"},
     r"setting server.delivery_worker \(HTTP2SMS_SERVER_DELIVERY_WORKER\): expected true"),
    ({"HTTP2SMS_OPERATOR_KIND": "kannel"}, r"setting operator.kind \(HTTP2SMS_OPERATOR_KIND\)"),
])
def test_environment_values_are_checked_too(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_module.load(None, env=env)


def test_the_file_format_stays_lenient_where_it_was(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("[send]\ndefault_rate = 1.5\n[rates]\n'+33' = 1\n'+44' = 2.5\n"
                    "[server]\ntrusted_proxies = '10.0.0.1, 10.0.0.2'\n"
                    "[security]\nlockout_seconds = 60\n")
    cfg = config_module.load(path, env={"HTTP2SMS_SERVER_ALLOW_PRIVATE_IPS": "on",
                                        "HTTP2SMS_SERVER_TRUSTED_PROXIES": '["10.0.0.3"]'})
    assert cfg.send.default_rate == "1.5" and cfg.rates == {"+33": "1", "+44": "2.5"}
    assert cfg.server.trusted_proxies == ["10.0.0.3"] and cfg.server.allow_private_ips
    assert cfg.security.lockout_seconds == 60.0


# -- frozen, and changed by copy -----------------------------------------------------------

def test_a_loaded_config_cannot_change() -> None:
    cfg = config_module.load(EXAMPLE, env={})
    with pytest.raises(AttributeError):
        cfg.store.path = "elsewhere.sqlite3"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.store = cfg.store  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.operator.min_delay = 0.0  # type: ignore[attr-defined]


def test_replace_makes_a_checked_copy() -> None:
    cfg = Config()
    changed = cfg.replace({"store.path": "x.sqlite3", "operator.min_delay": 0.0,
                           "rates": {"+33": "2"}})
    assert (changed.store.path, changed.operator.min_delay, changed.rates) == \
        ("x.sqlite3", 0.0, {"+33": "2"})
    assert cfg == Config() and changed.server == cfg.server
    with pytest.raises(ConfigError, match=r"setting server.port: .*<= 65535"):
        cfg.replace({"server.port": 65536})
    with pytest.raises(ConfigError, match=r"unknown setting server\.prot"):
        cfg.replace({"server.prot": 1})
    with pytest.raises(ConfigError, match=r"unknown config section \[nope\]"):
        cfg.replace({"nope.a": 1})


def test_the_worker_gets_the_same_settings_through_json() -> None:
    cfg = Config().replace({"server.trusted_proxies": ["10.0.0.0/8"], "rates": {"+1": "2.5"},
                            "operator.seed": 7, "smtp.password": "pw", "log.format": "json"})
    assert config_module.from_dict(json.loads(json.dumps(config_module.to_dict(cfg)))) == cfg


# -- a tagged section: [operator] kind picks the keys -----------------------------------------

class SmppLink(Section):
    host: str = "localhost"
    port: Port = 2775
    system_id: str = ""


class SmppOperator(OperatorConfig, tag="smpp"):
    """A second kind, its keys in [operator.smpp], as a real SMPP connector would have."""

    smpp: SmppLink = msgspec.field(default_factory=SmppLink)


@pytest.fixture
def smpp_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(config_module.OPERATOR_KINDS, "smpp", SmppOperator)


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    return config_module.load(path, env=env or {})


def test_the_simulators_keys_stay_in_operator(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[operator]\nkind = 'simulated'\nseed = 3\nmin_delay = 1.0\n")
    assert (cfg.operator.kind, cfg.operator.max_batch) == ("simulated", 1000)
    assert isinstance(cfg.operator, config_module.SimulatedOperatorConfig)
    assert (cfg.operator.seed, cfg.operator.min_delay) == (3, 1.0)
    # No kind: the simulator, as before kinds existed.
    assert load_text(tmp_path, "[operator]\nseed = 3\n").operator.kind == "simulated"


@pytest.mark.usefixtures("smpp_kind")
def test_a_kind_brings_its_own_section(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, "[operator]\nkind = 'smpp'\nmax_batch = 50\n"
                              "[operator.smpp]\nhost = 'smsc.example'\n",
                    env={"HTTP2SMS_OPERATOR_SMPP_SYSTEM_ID": "gw1"})
    assert isinstance(cfg.operator, SmppOperator)
    assert (cfg.operator.kind, cfg.operator.max_batch) == ("smpp", 50)
    assert cfg.operator.smpp == SmppLink(host="smsc.example", system_id="gw1")
    assert config_module.from_dict(json.loads(json.dumps(config_module.to_dict(cfg)))) == cfg
    # The environment can pick the kind too.
    cfg = config_module.load(None, env={"HTTP2SMS_OPERATOR_KIND": "smpp"})
    assert cfg.operator == SmppOperator()


@pytest.mark.usefixtures("smpp_kind")
@pytest.mark.parametrize(("text", "message"), [
    ("[operator]\nkind = 'smpp'\nseed = 1\n", "unknown setting operator.seed"),
    ("[operator]\nkind = 'smpp'\n[operator.smpp]\nprot = 1\n",
     "unknown setting operator.smpp.prot"),
    ("[operator]\nkind = 'smpp'\n[operator.smpp]\nport = 0\n",
     r"setting operator.smpp.port: .*>= 1 \(got 0\)"),
    ("[operator]\nkind = 'smpp'\nsmpp = 1\n", r"\[operator.smpp\] must be a table"),
    ("[operator]\n[operator.smpp]\nhost = 'x'\n", "unknown setting operator.smpp"),
    ("[operator]\nkind = 'smtp'\n", r"setting operator.kind: one of simulated, smpp"),
])
def test_a_kinds_keys_are_its_own(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_text(tmp_path, text)


@pytest.mark.usefixtures("smpp_kind")
def test_replace_to_another_kind_starts_from_its_defaults() -> None:
    cfg = Config().replace({"operator.min_delay": 0.0})
    changed: Any = cfg.replace({"operator.kind": "smpp", "operator.smpp.host": "smsc.example"})
    assert changed.operator == SmppOperator(smpp=SmppLink(host="smsc.example"))
