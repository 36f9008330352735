"""API keys: stored hashed, managed by `tandem gateway keys`, quotas enforced per key."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from client.cli import main
from expert_gateway.errors import AuthError, KeyStoreError, RateLimitedError
from expert_gateway.keys import Authenticator, KeyStore, hash_key


class Clock:
    def __init__(self) -> None:
        self.now = 86400.0 * 20000 + 3600.0

    def __call__(self) -> float:
        return self.now


def test_keys_are_stored_only_as_sha256(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key, secret = store.add("alice")
    text = (tmp_path / "keys.json").read_text()
    assert secret not in text and hash_key(secret) in text
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    assert store.load() == [key]


def test_revoke_by_name_or_id_and_unknown_key(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    first, _ = store.add("a")
    store.add("b")
    assert store.revoke(first.key_id).revoked
    assert store.revoke("b").revoked
    with pytest.raises(KeyStoreError, match="no active key"):
        store.revoke("a")


def test_duplicate_active_name_is_refused(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    store.add("a")
    with pytest.raises(KeyStoreError, match="exists"):
        store.add("a")


def test_corrupt_keys_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "keys.json").write_text("{not json")
    with pytest.raises(KeyStoreError, match="cannot read keys file"):
        KeyStore(tmp_path / "keys.json").load()


def test_authenticate_sees_revocations_without_restart(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    _, secret = store.add("a")
    authenticator = Authenticator(store, extra_hashes=[], requests_per_minute=10, tokens_per_day=100)
    assert authenticator.authenticate(f"Bearer {secret}").name == "a"
    store.revoke("a")
    with pytest.raises(AuthError, match="revoked"):
        authenticator.authenticate(f"Bearer {secret}")
    for header in (None, "", "Bearer ", "Token abc", "Bearer wrong"):
        with pytest.raises(AuthError):
            authenticator.authenticate(header)


def test_environment_hashes_are_accepted(tmp_path: Path) -> None:
    authenticator = Authenticator(KeyStore(tmp_path / "none.json"), extra_hashes=[hash_key("s3cret")],
                                  requests_per_minute=10, tokens_per_day=100)
    assert authenticator.authenticate("Bearer s3cret").key_id.startswith("k_")


def test_request_quota_slides_over_a_minute(tmp_path: Path) -> None:
    clock = Clock()
    store = KeyStore(tmp_path / "keys.json")
    _, secret = store.add("a", requests_per_minute=2)
    authenticator = Authenticator(store, extra_hashes=[], requests_per_minute=99, tokens_per_day=100,
                                  clock=clock)
    key = authenticator.authenticate(f"Bearer {secret}")
    authenticator.admit(key)
    clock.now += 20
    authenticator.admit(key)
    with pytest.raises(RateLimitedError) as refused:
        authenticator.admit(key)
    assert refused.value.retry_after == pytest.approx(40.0)
    clock.now += 41
    authenticator.admit(key)


def test_token_quota_resets_at_utc_midnight(tmp_path: Path) -> None:
    clock = Clock()
    store = KeyStore(tmp_path / "keys.json")
    _, secret = store.add("a", tokens_per_day=10)
    authenticator = Authenticator(store, extra_hashes=[], requests_per_minute=99, tokens_per_day=99,
                                  clock=clock)
    key = authenticator.authenticate(f"Bearer {secret}")
    authenticator.admit(key)
    authenticator.charge(key, 10)
    with pytest.raises(RateLimitedError) as refused:
        authenticator.admit(key)
    assert refused.value.retry_after == pytest.approx(86400 - 3600)
    clock.now += 86400
    authenticator.admit(key)


def test_cli_add_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[auth]\nkeys_file = "{tmp_path / "keys.json"}"\n')
    assert main(["gateway", "keys", "add", "--config", str(config), "ci", "--tokens-per-day", "50"]) == 0
    secret = capsys.readouterr().out.strip().splitlines()[-1]
    assert secret.startswith("tgw_")
    assert main(["gateway", "keys", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    assert "ci" in listing and "active" in listing and "tokens/day=50" in listing and secret not in listing
    assert main(["gateway", "keys", "revoke", "--config", str(config), "ci"]) == 0
    assert main(["gateway", "keys", "revoke", "--config", str(config), "ci"]) == 1
    assert "no active key" in capsys.readouterr().err
    stored = json.loads((tmp_path / "keys.json").read_text())
    assert stored["keys"][0]["revoked"] is True


def test_cli_rejects_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[auth]\nkeys_fil = 'typo.json'\n")
    assert main(["gateway", "keys", "list", "--config", str(config)]) == 1
    assert "keys_fil" in capsys.readouterr().err
