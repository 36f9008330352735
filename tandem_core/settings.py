"""The settings base both sides load their TOML files with.

``client.settings`` (client.toml, policy.toml) and ``expert_gateway.settings`` (gateway.toml)
derive from these, so a settings file is read, overridden by the environment and reported on
the same way everywhere. Nothing here runs at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, TomlConfigSettingsSource

from tandem_core.errors import ConfigError


class Section(BaseModel):
    """One ``[section]`` of a settings file; unknown keys are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


def default_of(section: type[BaseModel], name: str) -> Any:
    """A settings field's default, for code that takes the value as a plain argument (a dataclass
    field, a function default): the settings stay the one source of each default."""
    return section.model_fields[name].default


class TomlSettings(BaseSettings):
    """Settings read from a TOML file named at load time, overridable by the environment."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then environment, then the TOML file.
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)


SettingsT = TypeVar("SettingsT", bound=BaseSettings)


def load_settings(settings_cls: type[SettingsT], path: Path | None) -> SettingsT:
    """Read ``settings_cls`` from a TOML file (optional) and the environment."""
    if path is not None and not path.is_file():
        raise ConfigError(f"settings file not found: {path}")
    config = {**settings_cls.model_config, "toml_file": path}
    bound = type(settings_cls.__name__, (settings_cls,), {"model_config": config})
    try:
        return bound()
    except ValidationError as exc:
        raise ConfigError(f"invalid settings in {path or 'environment'}: {_first_problem(exc)}") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read settings file {path}: {exc}") from exc


def _first_problem(exc: ValidationError) -> str:
    problem = exc.errors()[0]
    where = ".".join(str(part) for part in problem["loc"])
    return f"{where}: {problem['msg']}"
