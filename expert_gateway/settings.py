"""Gateway settings: gateway.toml, overridable by TANDEM_GATEWAY_* environment variables.

Loaded once by ``tandem gateway serve`` (or a test) and passed down; nothing here runs at import
time. Nested fields come from the environment with a double underscore, e.g.
``TANDEM_GATEWAY_SERVER__PORT=9000`` or ``TANDEM_GATEWAY_AUTH__KEY_HASHES='["ab12..."]'``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from tandem_core.settings import Section, TomlSettings, load_settings


class ServerSettings(Section):
    """The HTTP listener."""

    host: str = Field(default="127.0.0.1", min_length=1, description="bind address")
    port: int = Field(default=8400, ge=0, le=65535, description="TCP port (0: any free port)")
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="largest request body (413 above)"
    )
    max_queue: int = Field(
        default=64, ge=1, le=100_000, description="backend calls waiting at once before 503"
    )
    tls_certfile: Path | None = Field(default=None, description="PEM certificate; TLS when set with keyfile")
    tls_keyfile: Path | None = Field(default=None, description="PEM private key for tls_certfile")
    api_docs: bool = Field(
        default=False, description="serve /docs and /openapi.json (off: they map the API for anyone)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="uvicorn log level; token content and keys are never logged"
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSettings:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("tls_certfile and tls_keyfile must be set together")
        return self


class AuthSettings(Section):
    """Bearer API keys and per-key quotas."""

    enabled: bool = Field(
        default=True, description="false only for local use: then host must be a loopback address"
    )
    keys_file: Path = Field(
        default=Path("gateway-keys.json"), description="keys managed by `tandem gateway keys`"
    )
    key_hashes: list[str] = Field(
        default_factory=list,
        max_length=10_000,
        description="extra accepted keys as SHA-256 hex digests (e.g. from the environment)",
    )
    requests_per_minute: int = Field(
        default=600, ge=1, le=1_000_000, description="default per-key request quota per minute"
    )
    tokens_per_day: int = Field(
        default=5_000_000, ge=1, le=10**12, description="default per-key token quota per UTC day"
    )
    quota_db: Path | None = Field(
        default=None,
        description="SQLite file keeping each key's daily token use across restarts "
        "(default: next to keys_file, <name>-usage.sqlite3)",
    )
    metrics_require_key: bool = Field(
        default=False, description="/metrics answers only with a valid API key"
    )

    @property
    def quota_path(self) -> Path:
        if self.quota_db is not None:
            return self.quota_db
        return self.keys_file.with_name(self.keys_file.stem + "-usage.sqlite3")

    @model_validator(mode="after")
    def _hashes_are_sha256(self) -> AuthSettings:
        for digest in self.key_hashes:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError("key_hashes entries must be lowercase SHA-256 hex digests")
        return self


class SessionSettings(Section):
    """Per-session token histories and their eviction."""

    max_sessions: int = Field(default=256, ge=1, le=1_000_000, description="sessions held at most (LRU)")
    memory_budget_tokens: int = Field(
        default=2_000_000, ge=1024, le=10**10, description="tokens held over all sessions (LRU above)"
    )
    idle_ttl_s: float = Field(
        default=600.0, gt=0, le=7 * 86400, description="forget a session idle this long"
    )


class ModelSettings(Section):
    """The expert model and which backend serves it."""

    name: str = Field(default="toy-expert", min_length=1, max_length=128, description="name clients ask for")
    backend: Literal["llama_cpp", "hf", "openai_compat"] = Field(
        default="llama_cpp", description="llama_cpp (embedded), hf (transformers on CUDA), openai_compat"
    )
    preset: Literal["toy", "smollm2", "math-expert", "path"] = Field(
        default="toy",
        description="toy: the built toy expert GGUF; smollm2: SmolLM2-135M-Instruct; "
        "math-expert: the GSM8K math expert in SmolLM2's vocabulary; path: `path`",
    )
    path: Path | None = Field(
        default=None, description="GGUF file (llama_cpp, openai_compat tokenizer) or HF model folder (hf)"
    )

    @model_validator(mode="after")
    def _path_when_needed(self) -> ModelSettings:
        if self.preset == "path" and self.path is None:
            raise ValueError("preset = 'path' needs `path`")
        if self.backend == "hf" and self.preset != "path":
            raise ValueError("backend 'hf' needs preset = 'path' and a model folder in `path`")
        return self


class LlamaCppSettings(Section):
    """The embedded llama.cpp backend."""

    n_ctx: int = Field(default=8192, ge=64, le=1_048_576, description="context over all slots")
    n_batch: int = Field(default=512, ge=8, le=8192, description="llama.cpp batch size")
    n_threads: int = Field(default=2, ge=1, le=256, description="CPU threads")
    slots: int = Field(
        default=4, ge=1, le=63,
        description="sessions whose KV cache stays resident (each gets n_ctx / (slots + 1))",
    )
    flash_attention: bool = Field(
        default=False,
        description="llama.cpp's flash attention: faster batched steps, but log-probs then differ "
        "(up to ~0.1 in the tails) from an in-process expert on the same GGUF, which runs without",
    )


AttentionKernel = Literal["EFFICIENT_ATTENTION", "MATH", "CUDNN_ATTENTION", "EFFICIENT_SPLIT_KEYS",
                          "TRITON_DECODE"]
DEFAULT_ATTENTION_KERNELS: tuple[AttentionKernel, ...] = (
    "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "EFFICIENT_SPLIT_KEYS", "TRITON_DECODE")


class HfSettings(Section):
    """The transformers backend (static KV slots and CUDA-graph steps on one GPU)."""

    device: str = Field(default="cuda", min_length=1, description="torch device")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(default="bfloat16", description="weights dtype")
    max_batch: int = Field(default=32, ge=1, le=1024, description="sessions decoded together in one step")
    max_context: int = Field(
        default=4096, ge=16, le=1_048_576, description="longest session sequence (each slot's capacity)")
    slots: int = Field(
        default=0, ge=0, le=1_000_000,
        description="KV slots preallocated at start-up, one per session kept on the GPU "
                    "(0 = sessions.max_sessions); the least recently used idle slot is reused beyond")
    batch_prefill_tokens: int = Field(
        default=64, ge=1, le=8192,
        description="a call bringing at most this many new tokens joins the batched step")
    prefill_chunk: int = Field(
        default=512, ge=16, le=65_536, description="tokens per eager step of a longer prefill")
    cuda_graphs: bool = Field(
        default=True, description="capture the batched step as CUDA graphs at start-up and replay them")
    attention_kernels: list[AttentionKernel] = Field(
        default_factory=lambda: list(DEFAULT_ATTENTION_KERNELS), min_length=1, max_length=5,
        description="attention kernels tried for each captured step shape; the fastest replay is "
                    "kept (EFFICIENT_SPLIT_KEYS: batch-1 steps over >= 512 keys, split and merged; "
                    "TRITON_DECODE: split-key Triton kernel reading each row's keys up to its own "
                    "length, where triton is installed, bf16 and fp16 models)")
    compile_blocks: bool = Field(
        default=True,
        description="torch.compile the layer blocks around attention on CUDA (fuses their "
                    "elementwise kernels; a minute or two more at start-up); eager if compiling fails")
    engine_process: bool = Field(
        default=True,
        description="run the model and its scheduler in a child process, so that HTTP handling "
                    "in the gateway process cannot hold up the batched step")


class OpenAICompatSettings(Section):
    """An upstream OpenAI-compatible /v1/completions server (llama.cpp server, vLLM, SGLang)."""

    url: str = Field(default="http://127.0.0.1:8080", min_length=1, description="upstream base URL")
    remote_model: str = Field(default="", max_length=256, description="model name sent upstream ('' = any)")
    api_key_env: str = Field(default="", max_length=128, description="env var holding the upstream key")
    timeout_s: float = Field(default=60.0, gt=0, le=3600, description="deadline of one upstream call")
    max_context: int = Field(default=4096, ge=16, le=1_048_576, description="longest sequence upstream")
    concurrency: int = Field(default=8, ge=1, le=1024, description="upstream calls in flight at once")
    sample_top_n: int = Field(
        default=0, ge=0, le=1_000_000, description="probabilities fetched per sampled step (0 = vocabulary)"
    )


class GatewaySettings(TomlSettings):
    """Everything gateway.toml configures."""

    model_config = SettingsConfigDict(
        env_prefix="TANDEM_GATEWAY_", env_nested_delimiter="__", extra="forbid"
    )

    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    sessions: SessionSettings = Field(default_factory=SessionSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    llama_cpp: LlamaCppSettings = Field(default_factory=LlamaCppSettings)
    hf: HfSettings = Field(default_factory=HfSettings)
    openai_compat: OpenAICompatSettings = Field(default_factory=OpenAICompatSettings)

    @model_validator(mode="after")
    def _auth_off_only_locally(self) -> GatewaySettings:
        if not self.auth.enabled and not is_loopback(self.server.host):
            raise ValueError(
                f"auth.enabled = false is only allowed on a loopback host, not {self.server.host!r}"
            )
        return self



def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_gateway_settings(path: Path | None) -> GatewaySettings:
    """Read gateway.toml (optional) and the environment; a bad value raises ConfigError."""
    return load_settings(GatewaySettings, path)
