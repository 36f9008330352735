from __future__ import annotations

from pathlib import Path

import pytest

from client.settings import ClientSettings
from tandem_core.errors import ConfigError
from tandem_core.settings import load_settings


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


def test_daemon_services_take_their_defaults_from_the_settings() -> None:
    """One source per default: a daemon built without a value behaves as the settings say."""
    from dataclasses import fields

    from client.daemon import DaemonServices
    from client.settings import DaemonSettings, DecodingSettings

    defaults = {field.name: field.default for field in fields(DaemonServices)}
    daemon, decoding = DaemonSettings(), DecodingSettings()
    assert defaults["max_queue_per_client"] == daemon.max_queue_per_client
    assert defaults["max_queue"] == daemon.max_queue
    assert defaults["max_upload_bytes"] == daemon.max_upload_bytes
    assert defaults["default_max_tokens"] == decoding.max_tokens
    assert defaults["default_temperature"] == decoding.temperature


def test_decoding_defaults_agree_with_the_settings() -> None:
    """DecodingOptions and Question take their defaults from the settings; they must not drift."""
    from client.assistant import Question
    from client.decoding import DecodingOptions
    from client.settings import DecodingSettings

    decoding, options, question = DecodingSettings(), DecodingOptions(), Question()
    assert (options.max_tokens, options.temperature, options.lookahead, options.compose,
            options.top_logprobs) == (decoding.max_tokens, decoding.temperature, decoding.lookahead,
                                      decoding.compose, decoding.top_logprobs)
    assert (question.max_tokens, question.temperature) == (decoding.max_tokens, decoding.temperature)
