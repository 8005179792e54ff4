"""Settings: the example file documents every one, the environment overrides them."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from gateway import config as config_module
from gateway.config import Config, ConfigError

EXAMPLE = Path(__file__).parent.parent / "config" / "gateway.example.toml"


def test_example_documents_every_setting_with_its_default() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    defaults = Config()
    for section in dataclasses.fields(Config):
        value = getattr(defaults, section.name)
        if not dataclasses.is_dataclass(value):
            assert section.name in data
            continue
        for item in dataclasses.fields(value):
            assert item.name in data[section.name], f"{section.name}.{item.name} undocumented"
            assert data[section.name][item.name] == getattr(value, item.name), \
                f"{section.name}.{item.name}: example differs from the default"
    assert config_module.load(EXAMPLE) == defaults


def test_environment_overrides() -> None:
    cfg = config_module.load(EXAMPLE, env={
        "HTTP2SMS_SERVER_PORT": "9000", "HTTP2SMS_SERVER_ALLOW_PRIVATE_IPS": "true",
        "HTTP2SMS_SERVER_TRUSTED_PROXIES": "10.0.0.1, 10.0.0.0/8",
        "HTTP2SMS_OPERATOR_MAX_DELAY": "0.5", "HTTP2SMS_ADMIN_TOKEN": "t0ken"})
    assert cfg.server.port == 9000 and cfg.server.allow_private_ips is True
    assert cfg.server.trusted_proxies == ["10.0.0.1", "10.0.0.0/8"]
    assert cfg.operator.max_delay == 0.5 and cfg.admin.token == "t0ken"


@pytest.mark.parametrize(("text", "message"), [
    ("[nope]\na = 1\n", "unknown config section"),
    ("[server]\nprot = 1\n", "unknown setting server.prot"),
    ("[server]\nport = 'x'\n", "server.port"),
    ("[server]\nallow_private_ips = 'yes'\n", "server.allow_private_ips"),
    ("[server\n", "config file"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        config_module.load(path, env={})


def test_bad_environment_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="HTTP2SMS_SERVER_PORT"):
        config_module.load(None, env={"HTTP2SMS_SERVER_PORT": "eighty"})
