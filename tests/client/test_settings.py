from __future__ import annotations

from pathlib import Path

import pytest

from client.errors import ConfigError
from client.settings import ClientSettings, load_settings


def test_defaults_without_a_file() -> None:
    settings = load_settings(ClientSettings, None)
    assert settings.daemon.host == "127.0.0.1"
    assert settings.decoding.lookahead == 8


def test_file_values_and_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "client.toml"
    config.write_text('[expert]\nurl = "http://gpu:9000"\nmodel = "big"\n[decoding]\nlookahead = 4\n')
    monkeypatch.setenv("TANDEM_DECODING__LOOKAHEAD", "2")

    settings = load_settings(ClientSettings, config)

    assert settings.expert.url == "http://gpu:9000"
    assert settings.expert.model == "big"
    assert settings.decoding.lookahead == 2


def test_unknown_key_is_an_error_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    config.write_text("[decoding]\nlookahed = 4\n")

    with pytest.raises(ConfigError, match="decoding.lookahed"):
        load_settings(ClientSettings, config)


def test_out_of_range_value_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "client.toml"
    config.write_text("[decoding]\nlookahead = 0\n")

    with pytest.raises(ConfigError, match="decoding.lookahead"):
        load_settings(ClientSettings, config)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(ClientSettings, tmp_path / "absent.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[decoding\n")
    with pytest.raises(ConfigError, match="broken.toml"):
        load_settings(ClientSettings, broken)
