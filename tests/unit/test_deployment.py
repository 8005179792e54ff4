"""The deployment files: the Dockerfile and the systemd unit, checked without building or
starting them (hadolint lints the Dockerfile in scripts/test)."""

from __future__ import annotations

import glob
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from gateway import cli
from gateway import config as config_module
from gateway.store.sqlite import exposed

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
UNIT = ROOT / "config" / "http2sms.service"
DELIVER_UNIT = ROOT / "config" / "http2sms-deliver.service"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def environment(args: str) -> dict[str, str]:
    """The variables of an ENV (`A=1 B=2`) or a systemd Environment= line."""
    return dict(word.split("=", 1) for word in shlex.split(args))


def test_every_file_the_dockerfile_copies_from_the_context_exists() -> None:
    copied = 0
    for word, args in instructions(DOCKERFILE):
        if word != "COPY" or "--from=" in args:
            continue
        *sources, _ = shlex.split(args)
        for source in sources:
            assert glob.glob(str(ROOT / source)), f"the Dockerfile copies {source}: missing"
            copied += 1
    assert copied >= 4


def test_the_docker_context_keeps_what_the_dockerfile_copies() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for word, args in instructions(DOCKERFILE):
        if word == "COPY" and "--from=" not in args:
            for source in shlex.split(args)[:-1]:
                top = source.split("/")[0]
                assert top not in ignored, f".dockerignore drops {top}, which COPY needs"


def test_the_image_version_label_is_the_package_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    args = [a for w, a in instructions(DOCKERFILE) if w == "ARG" and a.startswith("VERSION=")]
    assert args == [f"VERSION={project['version']}"]
    labels = " ".join(a for w, a in instructions(DOCKERFILE) if w == "LABEL")
    assert 'org.opencontainers.image.version="${VERSION}"' in labels
    assert "org.opencontainers.image.source=" in labels


def test_the_image_runs_from_the_lock_as_a_user_with_a_health_check() -> None:
    found = instructions(DOCKERFILE)
    runs = " ".join(a for w, a in found if w == "RUN")
    assert "--require-hashes" in runs and "requirements/runtime.txt" in runs
    assert [a for w, a in found if w == "USER"] == ["10001:10001"]
    assert any(w == "HEALTHCHECK" and "/healthz" in a for w, a in found)
    assert [a for w, a in found if w == "STOPSIGNAL"] == ["SIGTERM"]
    assert sum(w == "FROM" for w, _ in found) == 2  # build, then the image without pip's work


def made_folder(runs: str, folder: str) -> tuple[int, str]:
    """(mode, owner) a RUN gives `folder`: `install -d -m MODE -o UID ...` or `mkdir` (0755
    under the default umask 022) then `chown`."""
    installed = re.search(rf"install -d -m ([0-7]+) -o (\S+) -g \S+ {folder}(\s|$)", runs)
    if installed:
        return int(installed[1], 8), installed[2]
    assert re.search(rf"mkdir (-p )?{folder}(\s|$)", runs), f"nothing makes {folder}"
    owner = re.search(rf"chown (\S+?):\S+ {folder}(\s|$)", runs)
    return 0o755, owner[1] if owner else "root"


def test_the_image_data_folder_is_the_users_alone(tmp_path: Path) -> None:
    """The store warns (store_open_to_others) when its folder is open to others: the
    folder the image makes must not make it warn at every start."""
    runs = " ".join(a for w, a in instructions(DOCKERFILE) if w == "RUN")
    mode, owner = made_folder(runs, "/data")
    assert owner in ("10001", "http2sms")
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(mode)
    assert exposed(data / "gateway.sqlite3") == []


def known_variable(name: str) -> bool:
    settings = config_module.to_dict(config_module.Config())
    for section, values in settings.items():
        prefix = f"{config_module.ENV_PREFIX}{section.upper()}_"
        if name.startswith(prefix) and isinstance(values, dict):
            return name[len(prefix):].lower() in values
    return False


@pytest.mark.parametrize("where", ["Dockerfile", "config/http2sms.service"])
def test_the_settings_the_deployment_files_set_exist_and_load(where: str) -> None:
    if where == "Dockerfile":
        env: dict[str, str] = {}
        for word, args in instructions(DOCKERFILE):
            if word == "ENV":
                env.update(environment(args))
    else:
        env = {}
        for line in UNIT.read_text().splitlines():
            if line.startswith("Environment="):
                env.update(environment(line.removeprefix("Environment=")))
    ours = {k: v for k, v in env.items() if k.startswith(config_module.ENV_PREFIX)}
    assert ours
    for name in ours:
        assert known_variable(name), f"{where} sets {name}, which is no setting"
    config = config_module.from_dict({}, ours)
    # The admin API is on its own listener, on loopback unless the operator opens it.
    assert config.admin.host == "127.0.0.1" and config.admin.port != config.server.port
    if where == "Dockerfile":
        # The grace period stays under `docker stop`'s 10 s.
        assert config.server.shutdown_grace_seconds < 10


def test_the_unit_has_the_hardening_options() -> None:
    text = UNIT.read_text()
    for option in ("User=http2sms", "ProtectSystem=strict", "ReadWritePaths=/var/lib/http2sms",
                   "NoNewPrivileges=yes", "LimitNOFILE=", "KillSignal=SIGTERM"):
        assert option in text, option
    store = environment(next(line for line in text.splitlines()
                             if "HTTP2SMS_STORE_PATH" in line).partition("=")[2])
    assert store["HTTP2SMS_STORE_PATH"].startswith("/var/lib/http2sms/")


def test_the_deliver_unit_runs_deliver_with_settings_that_exist() -> None:
    text = DELIVER_UNIT.read_text()
    (start,) = [line.removeprefix("ExecStart=") for line in text.splitlines()
                if line.startswith("ExecStart=")]
    words = shlex.split(start)
    assert words[:2] == ["/opt/http2sms/bin/http2sms", "deliver"]
    with cli.http2sms.commands["deliver"].make_context("deliver", words[2:]):
        pass  # an unknown flag would raise
    env = {}
    for line in text.splitlines():
        if line.startswith("Environment="):
            env.update(environment(line.removeprefix("Environment=")))
    assert all(known_variable(name) for name in env), env
    store = config_module.from_dict({}, env).store.location
    assert store == environment(next(line for line in UNIT.read_text().splitlines()
                                     if "HTTP2SMS_STORE_PATH" in line).partition("=")[2]
                                ).get("HTTP2SMS_STORE_PATH")
    for option in ("User=http2sms", "ProtectSystem=strict", "NoNewPrivileges=yes",
                   "KillSignal=SIGTERM"):
        assert option in text, option


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("source", [UNIT, DELIVER_UNIT], ids=lambda p: p.name)
def test_systemd_accepts_the_unit(tmp_path: Path, source: Path) -> None:
    # verify checks that ExecStart's program exists: the venv's stands in for the
    # /opt/http2sms one the README installs.
    program = ROOT / ".venv" / "bin" / "http2sms"
    if not program.exists():
        pytest.skip("no .venv/bin/http2sms to stand in for ExecStart's program")
    unit = tmp_path / source.name
    unit.write_text(source.read_text().replace("/opt/http2sms/bin/http2sms", str(program)))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                          text=True, timeout=60)
    # It exits 0 on options it ignores with a warning: any output is a failure.
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), \
        done.stdout + done.stderr
