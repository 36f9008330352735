"""Shared fixtures: isolation of environment, keyring and data directory; the toy model pair."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import keyring
import keyring.backend
import pytest

# llama.cpp's OpenMP threads spin while they wait; on a busy machine a 0.1 ms toy decode step
# then takes ~0.5 s. libgomp reads this when llama.cpp is first loaded, which is after conftest.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A keyring that lives in a dict, so tests never touch the developer's real one."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.secrets: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.secrets.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.secrets[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        self.secrets.pop((service, username), None)


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[MemoryKeyring]:
    """No TANDEM_* variables leak in, the keyring is in memory, the cwd is a fresh directory."""
    for name in list(os.environ):
        if name.startswith("TANDEM_"):
            monkeypatch.delenv(name)
    memory = MemoryKeyring()
    previous = keyring.get_keyring()
    keyring.set_keyring(memory)
    monkeypatch.chdir(tmp_path)
    yield memory
    keyring.set_keyring(previous)


@pytest.fixture(scope="session")
def toy_pair():  # type: ignore[no-untyped-def]
    """The toy base/expert GGUF pair and its corpora, built once and cached by code hash."""
    from export.toy import ensure_toy_pair

    return ensure_toy_pair()
