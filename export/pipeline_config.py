"""What ``tandem train pipeline --config FILE`` reads: a base, an expert, a corpus, a policy.

A TOML file, validated with pydantic (``extra="forbid"``: a typo is an error, not silence)::

    seed = 0
    prompt_style = "plain"
    policy = "configs/policy.toml"      # optional: egress policy for the expert calls

    [base]
    model = "smollm2"                   # "smollm2", "toy", or a GGUF path

    [expert]
    gguf = "math-expert"                # "math-expert", "toy", a GGUF path served by the real gateway,
    # url = "http://127.0.0.1:8088"     # ... or a running gateway
    model = "math-expert"

    [corpus]
    kind = "gsm8k"                      # "gsm8k", "toy", or "jsonl" (then train/validation/sweep/test)
    train_limit = 300

    [calibrate]
    rates = [0.02, 0.04, 0.06, 0.08, 0.1]
    max_deferral = 0.1

    [decode]
    max_tokens = 12
    stop = [">>"]

``configs/pipelines/`` holds the two shipped configurations: the toy pair and SmolLM2 + math expert.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tandem_core.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseSection(_Strict):
    model: str = Field(default="smollm2", description="'smollm2', 'toy', or the path of a base GGUF")


class ExpertSection(_Strict):
    gguf: str | None = Field(
        default=None,
        description="'math-expert', 'toy', or an expert GGUF path; "
        "served by the real gateway on 127.0.0.1 for the run",
    )
    url: str | None = Field(default=None, description="a running expert gateway instead of gguf")
    model: str = Field(
        default="math-expert", min_length=1, max_length=100, description="expert model name at the gateway"
    )

    @model_validator(mode="after")
    def _one_source(self) -> ExpertSection:
        if (self.gguf is None) == (self.url is None):
            raise ValueError("set exactly one of expert.gguf and expert.url")
        return self


class CorpusSection(_Strict):
    kind: Literal["gsm8k", "toy", "jsonl"] = Field(default="gsm8k", description="where the corpora come from")
    gsm8k: Path | None = Field(default=None, description="GSM8K train.jsonl (default: the shared copy)")
    train: Path | None = Field(default=None, description="jsonl: collection corpus for fitting")
    validation: Path | None = Field(default=None, description="jsonl: collection corpus for validation")
    sweep: Path | None = Field(default=None, description="jsonl: decoding corpus for the calibration sweep")
    test: Path | None = Field(default=None, description="jsonl: decoding corpus for the evaluation")
    train_limit: int | None = Field(
        default=None, ge=1, le=100_000, description="examples collected for fitting"
    )
    validation_limit: int | None = Field(
        default=None, ge=1, le=100_000, description="examples for validation"
    )
    sweep_limit: int | None = Field(default=None, ge=1, le=100_000, description="examples per sweep point")
    test_limit: int | None = Field(default=None, ge=1, le=100_000, description="examples evaluated")
    plain_share: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="gsm8k: share of the collected solutions' annotations written as plain spaced "
        "arithmetic (48 / 2 = 24), the form SmolLM2 writes in its own answers",
    )

    @model_validator(mode="after")
    def _paths(self) -> CorpusSection:
        if self.kind == "jsonl" and None in (self.train, self.validation, self.test):
            raise ValueError("corpus.kind 'jsonl' needs train, validation and test")
        return self


class CalibrateSection(_Strict):
    rates: tuple[float, ...] = Field(
        default=(0.05, 0.1, 0.15, 0.2),
        min_length=1,
        description="deferral rates whose thresholds the sweep decodes",
    )
    max_deferral: float | None = Field(
        default=None, ge=0.0, le=1.0, description="pick the best threshold deferring at most this share"
    )
    rule: Literal["accuracy", "cost"] = Field(default="accuracy", description="how the sweep picks")

    @model_validator(mode="after")
    def _rates(self) -> CalibrateSection:
        if any(not 0.0 < rate < 1.0 for rate in self.rates):
            raise ValueError("calibrate.rates must lie in (0, 1)")
        return self


class DecodeSection(_Strict):
    max_tokens: int = Field(default=48, ge=1, le=4096, description="tokens decoded per answer")
    stop: tuple[str, ...] = Field(default=(), description="stop sequences (cut from the answer)")


class PipelineConfig(_Strict):
    seed: int = Field(default=0, ge=0, description="seed of corpus selection, fitting and evaluation")
    prompt_style: Literal["auto", "plain", "chat"] = Field(default="plain", description="prompt format")
    policy: Path | None = Field(default=None, description="policy.toml governing egress to the expert")
    threads: int = Field(default=2, ge=1, le=256, description="CPU threads for llama.cpp")
    base: BaseSection = BaseSection()
    expert: ExpertSection
    corpus: CorpusSection = CorpusSection()
    calibrate: CalibrateSection = CalibrateSection()
    decode: DecodeSection = DecodeSection()

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[
            :16
        ]


def load_pipeline_config(path: Path) -> PipelineConfig:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read pipeline config {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not TOML ({exc})") from exc
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise ConfigError(f"{path}: {where}: {first['msg']}") from exc
    relative_to = Path(path).resolve().parent
    return _resolve_paths(config, relative_to)


def _resolve_paths(config: PipelineConfig, root: Path) -> PipelineConfig:
    """Relative corpus and policy paths are relative to the config file (when not to the cwd)."""

    def fix(value: Path | None) -> Path | None:
        if value is None or value.is_absolute() or value.exists():
            return value
        return root / value

    corpus = config.corpus.model_copy(
        update={
            name: fix(getattr(config.corpus, name))
            for name in ("gsm8k", "train", "validation", "sweep", "test")
        }
    )
    return config.model_copy(update={"corpus": corpus, "policy": fix(config.policy)})
