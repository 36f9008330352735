"""Secrets from the OS keyring, with environment and file fallbacks for headless servers.

Every secret has a short name (``gateway``, ``audit-hmac``) and an environment variable. The
keyring is asked first; when it has nothing, or no keyring backend works on this machine, the
environment variable is used, then a 0600 file ``<files_dir>/<name>.key`` (a store created with
``files_dir``, normally ``<data_dir>/secrets``). Keys only Tandem uses (the audit HMAC key, the
daemon's API key) are created on first start: in the keyring when one works, else in that file,
because a headless server usually has no keyring and must still start. keyring's exceptions
are translated here, in ``_keyring_call``, and nowhere else. Secret values travel as
``SecretStr`` and never appear in messages.
"""

from __future__ import annotations

import os
import secrets as _random
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import keyring
import keyring.errors
from pydantic import SecretStr

from client.errors import SecretMissingError
from tandem_core.errors import ConfigError

SERVICE = "tandem"

SECRET_ENV_VARS: dict[str, str] = {
    "gateway": "TANDEM_GATEWAY_TOKEN",
    "audit-hmac": "TANDEM_AUDIT_HMAC_KEY",
    "daemon-api": "TANDEM_DAEMON_API_KEY",
}

ResultT = TypeVar("ResultT")


@dataclass(frozen=True)
class SecretStatus:
    """Where a secret was found, without its value."""

    name: str
    source: Literal["keyring", "environment", "file", "missing"]
    keyring_problem: str = ""
    path: Path | None = None  # the file, when source is "file"

    def where(self) -> str:
        """Where the secret lives, in words."""
        if self.source == "file":
            return f"the file {self.path}"
        return f"the {self.source}"


def env_var_for(name: str) -> str:
    """The environment variable that backs the secret ``name``."""
    try:
        return SECRET_ENV_VARS[name]
    except KeyError:
        known = ", ".join(sorted(SECRET_ENV_VARS))
        raise ConfigError(f"unknown secret {name!r}; known secrets: {known}") from None


def missing_message(name: str) -> str:
    """The fix for a missing secret, as the error message."""
    return f"no {name} secret: run `tandem keys set {name}` or set {env_var_for(name)}"


class SecretStore:
    """Reads and writes Tandem's secrets in the keyring under service ``tandem``."""

    def __init__(self, *, service: str = SERVICE, environ: Mapping[str, str] | None = None,
                 files_dir: Path | None = None) -> None:
        self._service = service
        self._environ = os.environ if environ is None else environ
        self._files_dir = files_dir

    def file_for(self, name: str) -> Path | None:
        """The fallback file of ``name`` (None: this store has no files folder)."""
        env_var_for(name)
        return None if self._files_dir is None else self._files_dir / f"{name}.key"

    def get(self, name: str) -> SecretStr:
        """The secret, from the keyring or else the environment; SecretMissingError says how to set it."""
        value, status = self._lookup(name)
        if value is None:
            hint = f" (keyring unavailable: {status.keyring_problem})" if status.keyring_problem else ""
            raise SecretMissingError(missing_message(name) + hint)
        return SecretStr(value)

    def status(self, name: str) -> SecretStatus:
        """Where ``name`` would be read from."""
        return self._lookup(name)[1]

    def set(self, name: str, value: SecretStr) -> None:
        """Store ``value`` in the keyring."""
        env_var_for(name)
        if not value.get_secret_value():
            raise ConfigError(f"refusing to store an empty {name} secret")
        self._keyring_call(
            name, "store", lambda: keyring.set_password(self._service, name, value.get_secret_value())
        )

    def delete(self, name: str) -> bool:
        """Remove ``name`` from the keyring; False when it was not there."""
        env_var_for(name)
        if self._keyring_call(name, "read", lambda: keyring.get_password(self._service, name)) is None:
            return False
        self._keyring_call(name, "delete", lambda: keyring.delete_password(self._service, name))
        return True

    def get_or_create(self, name: str, *, nbytes: int = 32) -> SecretStr:
        """The secret, or a fresh random one (for keys only Tandem uses)."""
        return self.ensure(name, nbytes=nbytes)[0]

    def ensure(self, name: str, *, nbytes: int = 32) -> tuple[SecretStr, SecretStatus | None]:
        """The secret, or a fresh random one (for keys only Tandem uses) and where it was put.

        The new key goes to the keyring when one works, else to the 0600 fallback file; the
        second item is None when the secret already existed.
        """
        value, status = self._lookup(name)
        if value is not None:
            return SecretStr(value), None
        created = SecretStr(_random.token_hex(nbytes))
        if not status.keyring_problem:
            try:
                self.set(name, created)
                return created, SecretStatus(name, "keyring")
            except ConfigError:
                if self._files_dir is None:
                    raise
        path = self.file_for(name)
        if path is None:
            raise SecretMissingError(
                f"{missing_message(name)} (keyring unavailable: {status.keyring_problem})"
            )
        _write_private_file(path, created.get_secret_value())
        return created, SecretStatus(name, "file", status.keyring_problem, path)

    def _lookup(self, name: str) -> tuple[str | None, SecretStatus]:
        env_var = env_var_for(name)
        problem = ""
        try:
            value = self._keyring_call(name, "read", lambda: keyring.get_password(self._service, name))
        except ConfigError as exc:
            value, problem = None, type(exc.__cause__ or exc).__name__
        if value:
            return value, SecretStatus(name, "keyring")
        from_env = self._environ.get(env_var)
        if from_env:
            return from_env, SecretStatus(name, "environment", problem)
        path = self.file_for(name)
        if path is not None and path.exists():
            return _read_private_file(path), SecretStatus(name, "file", problem, path)
        return None, SecretStatus(name, "missing", problem)

    def _keyring_call(self, name: str, action: str, call: Callable[[], ResultT]) -> ResultT:
        """Run one keyring operation; the single place keyring's errors become Tandem's."""
        try:
            return call()
        except keyring.errors.PasswordDeleteError as exc:
            raise ConfigError(f"cannot delete {name} from the keyring: {type(exc).__name__}") from exc
        except keyring.errors.KeyringError as exc:
            # The backend's message may echo arguments; only its type is shown.
            raise ConfigError(
                f"cannot {action} {name} in the keyring ({type(exc).__name__}); "
                f"set {env_var_for(name)} instead"
            ) from exc


def _write_private_file(path: Path, value: str) -> None:
    """Create ``path`` readable by its owner only; never overwrite an existing key."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w", encoding="ascii") as handle:
            handle.write(value + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as exc:
        raise ConfigError(f"cannot create the key file {path}: {exc.strerror or exc}") from exc


def _read_private_file(path: Path) -> str:
    """A key file's value; refused when other users may read it (like ssh's private keys)."""
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"the key file {path} is readable by other users: "
                              f"run `chmod 600 {path}`")
        value = path.read_text("ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the key file {path}: {exc}") from exc
    if not value:
        raise ConfigError(f"the key file {path} is empty")
    return value
