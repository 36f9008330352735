"""Secrets: keyring first, environment fallback, errors that say the fix and never the value."""

from __future__ import annotations

import io
import sys

import keyring
import keyring.backend
import keyring.errors
import pytest
from pydantic import SecretStr

from client.cli import main
from client.errors import SecretMissingError
from client.secrets import SECRET_ENV_VARS, SecretStore, env_var_for
from tandem_core.errors import ConfigError

SECRET = "s3cret-value-that-must-not-leak"


class BrokenKeyring(keyring.backend.KeyringBackend):
    """A backend that fails like a locked or absent OS keyring, echoing its arguments."""

    priority = 1  # type: ignore[assignment]

    def get_password(self, service: str, username: str) -> str | None:
        raise keyring.errors.KeyringLocked(f"locked while reading {username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        raise keyring.errors.PasswordSetError(f"cannot store {password}")

    def delete_password(self, service: str, username: str) -> None:
        raise keyring.errors.PasswordDeleteError(f"cannot delete {username}")


@pytest.fixture
def broken_keyring() -> BrokenKeyring:
    backend = BrokenKeyring()
    keyring.set_keyring(backend)  # the autouse fixture restores the previous backend
    return backend


def test_keyring_value_is_returned_as_secret_str() -> None:
    store = SecretStore()
    store.set("gateway", SecretStr(SECRET))
    value = store.get("gateway")
    assert isinstance(value, SecretStr)
    assert value.get_secret_value() == SECRET
    assert SECRET not in repr(value) and SECRET not in str(value)
    assert store.status("gateway").source == "keyring"


def test_environment_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_GATEWAY_TOKEN", "from-env")
    store = SecretStore()
    assert store.get("gateway").get_secret_value() == "from-env"
    assert store.status("gateway").source == "environment"
    store.set("gateway", SecretStr("from-keyring"))
    assert store.get("gateway").get_secret_value() == "from-keyring"


def test_missing_secret_message_is_the_fix() -> None:
    with pytest.raises(SecretMissingError) as caught:
        SecretStore().get("gateway")
    assert str(caught.value) == (
        "no gateway secret: run `tandem keys set gateway` or set TANDEM_GATEWAY_TOKEN"
    )
    with pytest.raises(SecretMissingError, match="TANDEM_AUDIT_HMAC_KEY"):
        SecretStore().get("audit-hmac")


def test_unknown_secret_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="audit-hmac, daemon-api, gateway"):
        SecretStore().get("nope")
    assert env_var_for("audit-hmac") == SECRET_ENV_VARS["audit-hmac"]


def test_broken_keyring_falls_back_to_environment(broken_keyring: BrokenKeyring,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = SecretStore()
    with pytest.raises(SecretMissingError, match=r"keyring unavailable: .*KeyringLocked"):
        store.get("gateway")
    monkeypatch.setenv("TANDEM_GATEWAY_TOKEN", "from-env")
    assert store.get("gateway").get_secret_value() == "from-env"
    status = store.status("gateway")
    assert status.source == "environment" and "KeyringLocked" in status.keyring_problem


def test_keyring_errors_never_show_the_value(broken_keyring: BrokenKeyring) -> None:
    store = SecretStore()
    with pytest.raises(ConfigError) as caught:
        store.set("gateway", SecretStr(SECRET))
    assert SECRET not in str(caught.value)
    assert "TANDEM_GATEWAY_TOKEN" in str(caught.value)
    assert isinstance(caught.value.__cause__, keyring.errors.PasswordSetError)
    with pytest.raises(ConfigError, match="cannot read gateway"):
        store.delete("gateway")


def test_empty_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="empty"):
        SecretStore().set("gateway", SecretStr(""))


def test_get_or_create_makes_one_key_and_keeps_it() -> None:
    store = SecretStore()
    first = store.get_or_create("audit-hmac")
    assert len(first.get_secret_value()) == 64
    assert store.get_or_create("audit-hmac") == first


def test_get_or_create_with_broken_keyring_says_how_to_fix(broken_keyring: BrokenKeyring) -> None:
    with pytest.raises(SecretMissingError, match="TANDEM_AUDIT_HMAC_KEY"):
        SecretStore().get_or_create("audit-hmac")


def test_delete_reports_whether_it_removed() -> None:
    store = SecretStore()
    assert store.delete("gateway") is False
    store.set("gateway", SecretStr(SECRET))
    assert store.delete("gateway") is True
    assert store.status("gateway").source == "missing"


def test_cli_keys_set_reads_stdin_never_argv(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["keys", "set", "gateway", SECRET])
    assert caught.value.code == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO(SECRET + "\n"))
    assert main(["keys", "set", "gateway"]) == 0
    assert SecretStore().get("gateway").get_secret_value() == SECRET
    assert main(["keys", "get", "gateway"]) == 0
    out = capsys.readouterr().out
    assert "set (from the keyring)" in out and SECRET not in out
    assert main(["keys", "get", "gateway", "--reveal"]) == 0
    assert capsys.readouterr().out.strip() == SECRET
    assert main(["keys", "delete", "gateway"]) == 0
    assert main(["keys", "get", "gateway"]) == 1
    assert "run `tandem keys set gateway`" in capsys.readouterr().err


def test_cli_keys_set_prompts_without_echo_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("getpass.getpass", lambda prompt: SECRET)
    assert main(["keys", "set", "audit-hmac"]) == 0
    assert SecretStore().get("audit-hmac").get_secret_value() == SECRET


def test_cli_keys_set_refuses_empty_input(monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert main(["keys", "set", "gateway"]) == 1
    assert "empty" in capsys.readouterr().err
