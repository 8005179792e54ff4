"""Admin API tokens as pure rules: the bootstrap token's minimum length (a setting checked at
load), and a token's form and digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gateway import config as config_module
from gateway import tokens
from gateway.config import Config, ConfigError


@pytest.mark.parametrize("source", ["env", "file"])
def test_a_short_admin_token_is_refused_naming_the_setting(tmp_path: Path, source: str) -> None:
    short = "s3cret-but-23-chars-xyz"
    assert len(short) == config_module.ADMIN_TOKEN_MIN_LENGTH - 1
    path = tmp_path / "gateway.toml"
    path.write_text(f'[admin]\ntoken = "{short if source == "file" else ""}"\n')
    env = {"HTTP2SMS_ADMIN_TOKEN": short} if source == "env" else {}
    with pytest.raises(ConfigError) as caught:
        config_module.load(path, env=env)
    message = str(caught.value)
    assert "admin.token" in message and "24" in message
    assert ("HTTP2SMS_ADMIN_TOKEN" in message) == (source == "env")
    assert short not in message  # a secret, even a refused one, is not echoed
    # 24 characters, or none (the API then depends on the store's tokens), are accepted.
    assert config_module.load(path, env={"HTTP2SMS_ADMIN_TOKEN": short + "z"}).admin.token
    assert config_module.load(None, env={"HTTP2SMS_ADMIN_TOKEN": ""}).admin.token == ""
    with pytest.raises(ConfigError, match=r"admin\.token"):
        Config().replace({"admin.token": "t0ken"})


def test_a_token_is_its_key_and_a_secret_and_only_the_digest_is_kept() -> None:
    made = tokens.new_token()
    key, secret = made.text[4:16], made.text[17:]
    assert made.text.startswith("h2s_") and made.key == key and len(secret) == 43
    assert tokens.split(made.text) == (key, secret)
    assert made.digest == hashlib.sha256(f"{key}:{secret}".encode()).hexdigest()
    assert secret not in made.digest
    assert tokens.matches(made.digest, key, secret)
    assert not tokens.matches(made.digest, key, secret[:-1] + ("B" if secret[-1] == "A" else "A"))
    assert not tokens.matches(made.digest, "0" * 12, secret)
    for text in ("", made.text + "x", made.text[:-1], "h2s_" + key, made.text.upper(),
                 made.text.replace("_", ".", 1)):
        assert tokens.split(text) is None, text
    assert tokens.new_token().text != made.text


def test_an_access_sees_its_accounts_or_all() -> None:
    some = tokens.Access("robot", frozenset({"a", "b"}))
    assert some.sees("a") and not some.sees("c") and not some.everything
    assert some.visible(["a", "c", "b"]) == ["a", "b"]
    assert tokens.BOOTSTRAP.everything and tokens.BOOTSTRAP.sees("anything")
