"""compose.yaml, the multi-node example (two gateways, one `deliver` worker, PostgreSQL, a
reverse proxy), checked without running it: its commands and flags are the CLI's, its
HTTP2SMS_* variables are settings that load, and its services fit together."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from gateway import cli
from gateway import config as config_module
from gateway.store import parse_url
from tests.unit.test_deployment import DOCKERFILE, environment, instructions, known_variable

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
# `${VAR}` and `${VAR:?message}` as compose substitutes them.
VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?][^}]*)?\}")


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def substituted(value: str) -> str:
    return VARIABLE.sub(lambda m: f"value-of-{m.group(1).lower()}", value)


def gateway_services() -> dict[str, dict[str, Any]]:
    """The services that run the gateway's image (built from the Dockerfile)."""
    return {name: service for name, service in compose()["services"].items()
            if service.get("build") == "."}


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, args in instructions(DOCKERFILE):
        if word == "ENV":
            env.update(environment(args))
    return env


def settings(service: dict[str, Any]) -> config_module.Config:
    """The settings of a service: the image's environment, then the service's."""
    env = {k: v for k, v in image_env().items() if k.startswith(config_module.ENV_PREFIX)}
    for name, value in service.get("environment", {}).items():
        assert known_variable(name), f"compose.yaml sets {name}, which is no setting"
        env[name] = substituted(str(value))
    return config_module.from_dict({}, env)


def test_the_services_are_two_gateways_one_deliver_worker_postgresql_and_a_proxy() -> None:
    services = compose()["services"]
    commands = {name: service["command"][0] for name, service in gateway_services().items()}
    assert sorted(commands.values()) == ["deliver", "serve", "serve"]
    assert "postgres" in services and services["postgres"]["image"].startswith("postgres:")
    assert "healthcheck" in services["postgres"]
    for service in gateway_services().values():
        assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    (proxy,) = [s for name, s in services.items()
                if name != "postgres" and name not in commands]
    assert proxy["image"].startswith("caddy:")


@pytest.mark.parametrize("name", sorted(gateway_services()))
def test_each_gateway_command_and_its_flags_are_the_clis(name: str) -> None:
    words = [str(word) for word in gateway_services()[name]["command"]]
    command = cli.http2sms.commands.get(words[0])
    assert isinstance(command, click.Command), f"{name}: no command {words[0]!r}"
    # Parsed as the CLI parses it: an unknown flag or a bad value raises here.
    with command.make_context(words[0], words[1:]) as ctx:
        assert ctx.params is not None


@pytest.mark.parametrize("name", sorted(gateway_services()))
def test_each_gateway_settings_load_and_name_the_postgresql_service(name: str) -> None:
    service = gateway_services()[name]
    config = settings(service)
    scheme, location = parse_url(config.store.location)
    assert scheme == "postgresql" and "@postgres/" in location
    assert "value-of-postgres_password" in location  # from the environment, never written
    if service["command"][0] == "serve":
        # The gateways take sends only; the `deliver` service delivers.
        assert config.server.delivery is False
        subnet = compose()["networks"]["gateway"]["ipam"]["config"][0]["subnet"]
        assert config.server.trusted_proxies == [subnet]
    else:
        assert service["healthcheck"] == {"disable": True}, "deliver has no /healthz"


def test_the_proxy_sends_to_both_gateways_on_their_port() -> None:
    services = compose()["services"]
    words = [str(word) for word in services["proxy"]["command"]]
    targets = [words[i + 1] for i, word in enumerate(words) if word == "--to"]
    serving = [name for name, s in gateway_services().items() if s["command"][0] == "serve"]
    port = settings(gateway_services()[serving[0]]).server.port
    assert sorted(targets) == sorted(f"{name}:{port}" for name in serving)


def docker_compose() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        done = subprocess.run([*command, "version"], capture_output=True, timeout=30,
                              check=False)
        if done.returncode == 0:
            return command
    return None


@pytest.mark.skipif(docker_compose() is None, reason="no docker compose plugin here")
def test_docker_compose_accepts_the_file() -> None:
    command = docker_compose()
    assert command is not None
    done = subprocess.run([*command, "-f", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "POSTGRES_PASSWORD": "example"})
    assert done.returncode == 0, done.stderr
