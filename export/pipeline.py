"""The training pipeline for any pair: collect -> fit -> calibrate -> export -> eval.

``run_pipeline(config, out)`` runs a ``PipelineConfig`` (export.pipeline_config) and resumes after an
interruption: finished steps are recorded in ``out/state.json`` and collection resumes by shard.
The toy pipeline is one configuration of it (``toy_config``).

``ensure_toy_head(toy_pair)`` returns a trained ``switch.onnx`` for the toy pair, built once per
version of the inputs (toy pair, this code, seed) and cached under
``$XDG_CACHE_HOME/tandem/toy-head/<hash>``; the demo and the tests call it. The expert is the toy
expert served by the real gateway app under uvicorn on 127.0.0.1 (any free port), so collection
uses the HTTP ``/v1/score`` path and decoding the HTTP ``/v1/continue`` path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from export.cached_build import cached_build
from export.pipeline_config import PipelineConfig
from tandem_core.errors import TandemError

CODE_FILES = (
    "collect.py", "train.py", "calibrate.py", "onnx_export.py", "evaluate.py", "pipeline.py",
    "pipeline_config.py",
)
TOY_EXPERT_NAME = "toy-expert"
TOY_TRAIN_LIMIT = 800
TOY_SWEEP_LIMIT = 80
TOY_RATES = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
TOY_MAX_DEFERRAL = 0.25
TARGETS = (
    ("co_llm_exact", "Co-LLM exact match on the toy test corpus", ">=", 0.90),
    ("base_exact", "base alone exact match", "<=", 0.30),
    ("expert_exact", "expert alone exact match", "<=", 0.30),
    ("co_llm_deferred", "share of answer tokens Co-LLM defers", "<=", 0.25),
    ("random_gap", "Co-LLM minus random deferral at the same rate (points)", ">=", 0.40),
    ("pipeline_s", "whole pipeline wall time on this machine (s)", "<=", 300.0),
)


class PipelineError(TandemError):
    """The toy pipeline failed."""


@contextlib.contextmanager
def serve_gateway(expert_gguf: Path, *, name: str = TOY_EXPERT_NAME, n_threads: int = 2) -> Iterator[str]:
    """The real gateway app for ``expert_gguf`` under uvicorn on 127.0.0.1; yields its URL."""
    from expert_gateway.app import create_app
    from expert_gateway.settings import (
        AuthSettings,
        GatewaySettings,
        LlamaCppSettings,
        ModelSettings,
        ServerSettings,
    )
    from tandem_core.server import ServerThread

    settings = GatewaySettings(
        server=ServerSettings(host="127.0.0.1", port=0, log_level="warning", max_body_bytes=16 * 1024 * 1024),
        auth=AuthSettings(enabled=False),
        model=ModelSettings(name=name, preset="path", path=expert_gguf),
        llama_cpp=LlamaCppSettings(n_threads=n_threads, slots=2),
    )
    server = ServerThread(create_app(settings))
    try:
        url = server.start(timeout=120)
    except TandemError as exc:
        raise PipelineError("the expert gateway did not start") from exc
    try:
        yield url
    finally:
        server.stop()


def run_toy_pipeline(toy_pair: Any = None, *, out: Path | None = None, seed: int = 0,
                     progress: bool = True) -> dict[str, Any]:
    """Every step into ``out`` (default: the cache); returns the targets and where things are."""
    if toy_pair is None:
        from export.toy import ensure_toy_pair

        toy_pair = ensure_toy_pair()
    if out is None:
        return json.loads((ensure_toy_head(toy_pair, seed=seed).parent / "result.json").read_text())
    return _run(toy_pair, out, seed=seed, progress=progress)


def toy_config(toy_pair: Any, *, seed: int = 0) -> PipelineConfig:
    """The toy pipeline as one configuration of the generic one."""
    return PipelineConfig.model_validate({
        "seed": seed, "prompt_style": "plain",
        "base": {"model": str(toy_pair.base_gguf)},
        "expert": {"gguf": str(toy_pair.expert_gguf), "model": TOY_EXPERT_NAME},
        "corpus": {"kind": "jsonl", "train": toy_pair.train_jsonl, "validation": toy_pair.validation_jsonl,
                   "sweep": toy_pair.validation_jsonl, "test": toy_pair.test_jsonl,
                   "train_limit": TOY_TRAIN_LIMIT, "sweep_limit": TOY_SWEEP_LIMIT},
        "calibrate": {"rates": TOY_RATES, "max_deferral": TOY_MAX_DEFERRAL, "rule": "accuracy"},
        "decode": {"max_tokens": 48},
    })


def _run(toy_pair: Any, out: Path, *, seed: int, progress: bool) -> dict[str, Any]:
    result = run_pipeline(toy_config(toy_pair, seed=seed), out, progress=progress)
    by_system = {row["system"]: row for row in result["eval"]}
    metrics = {
        "co_llm_exact": by_system["co-llm"]["exact_match"],
        "base_exact": by_system["base"]["exact_match"],
        "expert_exact": by_system["expert"]["exact_match"],
        "co_llm_deferred": by_system["co-llm"]["deferred_fraction"],
        "random_gap": by_system["co-llm"]["exact_match"] - by_system["random"]["exact_match"],
        "pipeline_s": result["timings"]["pipeline_s"],
    }
    rows = targets_table(metrics)
    result |= {"targets": rows, "targets_met": all(row["met"] for row in rows)}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# --- the generic pipeline ----------------------------------------------------------------------------

STEPS = ("collect", "fit", "calibrate", "export", "eval")


def resolve_base(name: str) -> Path:
    if name == "smollm2":
        from tandem_core.base_model import smollm2_path

        return smollm2_path()
    if name == "toy":
        from export.toy import ensure_toy_pair

        return Path(ensure_toy_pair().base_gguf)
    path = Path(name)
    if not path.is_file():
        raise PipelineError(f"base model not found: {path}")
    return path


def resolve_expert_gguf(name: str) -> Path:
    if name == "math-expert":
        from export.math_expert import ensure_math_expert

        return ensure_math_expert()
    if name == "toy":
        from export.toy import ensure_toy_pair

        return Path(ensure_toy_pair().expert_gguf)
    path = Path(name)
    if not path.is_file():
        raise PipelineError(f"expert model not found: {path}")
    return path


def prepare_corpora(config: PipelineConfig, out: Path) -> dict[str, tuple[Path, int | None]]:
    """(path, limit) of the train, validation, sweep and test corpora."""
    corpus = config.corpus
    limits = {"train": corpus.train_limit, "validation": corpus.validation_limit,
              "sweep": corpus.sweep_limit, "test": corpus.test_limit}
    if corpus.kind == "gsm8k":
        from export.gsm8k_corpus import write_corpora

        written = write_corpora(
            out / "corpus", gsm8k_path=corpus.gsm8k, seed=config.seed, limits=limits,
            plain_share=corpus.plain_share,
        )
        return {name: (path, None) for name, path in written.items()}
    if corpus.kind == "toy":
        from export.toy import ensure_toy_pair

        pair = ensure_toy_pair()
        paths: dict[str, Path | None] = {
            "train": pair.train_jsonl, "validation": pair.validation_jsonl,
            "sweep": pair.validation_jsonl, "test": pair.test_jsonl,
        }
    else:
        paths = {"train": corpus.train, "validation": corpus.validation,
                 "sweep": corpus.sweep or corpus.validation, "test": corpus.test}
    return {name: (Path(str(path)), limits[name]) for name, path in paths.items()}


class _State:
    """``state.json``: which steps finished, for this configuration; a rerun skips them."""

    def __init__(self, out: Path, config: PipelineConfig) -> None:
        self.path = out / "state.json"
        self.fingerprint = config.fingerprint()
        state = json.loads(self.path.read_text()) if self.path.exists() else {}
        if state and state.get("config") != self.fingerprint:
            raise PipelineError(f"{out} holds a run of another configuration; choose another --out")
        self.done: dict[str, Any] = state.get("done", {})

    def finish(self, step: str, info: dict[str, Any]) -> None:
        self.done[step] = info
        self.path.write_text(json.dumps({"config": self.fingerprint, "done": self.done}, indent=2) + "\n")


@contextlib.contextmanager
def _expert_url(config: PipelineConfig) -> Iterator[str]:
    if config.expert.url is not None:
        yield config.expert.url
        return
    assert config.expert.gguf is not None
    with serve_gateway(resolve_expert_gguf(config.expert.gguf), name=config.expert.model,
                       n_threads=config.threads) as url:
        yield url


def run_pipeline(config: PipelineConfig, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """collect -> fit -> calibrate -> ONNX export -> eval into ``out``; resumes where it stopped."""
    from tqdm import tqdm

    from export.collect import CollectPlan, EgressSetup, run_collect
    from export.evaluate import DecodingSetup, evaluate_command, run_calibration
    from export.onnx_export import export_command
    from export.train import FitConfig, fit_command

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    state = _State(out, config)
    started = time.perf_counter()
    key = pipeline_audit_key(out / "audit")
    base_gguf = resolve_base(config.base.model)
    corpora = prepare_corpora(config, out)
    bar = tqdm(total=len(STEPS), desc="pipeline", disable=not progress, initial=len(state.done))
    with _expert_url(config) as url:
        setup = DecodingSetup(base_gguf=base_gguf, gateway_url=url, expert_model=config.expert.model,
                              prompt_style=config.prompt_style, policy_file=config.policy,
                              n_threads=config.threads, audit_log=out / "audit" / "decode.jsonl",
                              max_tokens=config.decode.max_tokens, stop=config.decode.stop, audit_key=key)
        if "collect" not in state.done:
            step = time.perf_counter()
            for split in ("train", "validation"):
                corpus, limit = corpora[split]
                plan = CollectPlan(corpus=corpus, out=out / "data" / split, limit=limit,
                                   prompt_style=config.prompt_style, progress=progress)
                run_collect(plan, base_path=base_gguf, gateway_url=url, expert_model=config.expert.model,
                            n_threads=config.threads,
                            egress=EgressSetup(config.policy, out / "audit" / "collect.jsonl", key))
            state.finish("collect", {"s": time.perf_counter() - step})
            bar.update()
        if "fit" not in state.done:
            step = time.perf_counter()
            report = fit_command(out / "data" / "train", out / "head.pt", FitConfig(seed=config.seed),
                                 validation_dir=out / "data" / "validation", progress=progress)
            state.finish("fit", {"s": time.perf_counter() - step,
                                 **{k: v for k, v in asdict(report).items() if k != "history"}})
            bar.update()
        if "calibrate" not in state.done:
            step = time.perf_counter()
            sweep_corpus, sweep_limit = corpora["sweep"]
            run_calibration(out / "head.pt", out / "data" / "validation", out=out / "calibration.json",
                            png=out / "calibration.png", rates=config.calibrate.rates, corpus=sweep_corpus,
                            setup=setup, rule=config.calibrate.rule,
                            max_deferral=config.calibrate.max_deferral,
                            limit=sweep_limit, progress=progress)
            state.finish("calibrate", {"s": time.perf_counter() - step})
            bar.update()
        if "export" not in state.done:
            step = time.perf_counter()
            exported = export_command(out / "head.pt", out / "switch.onnx",
                                      calibration_path=out / "calibration.json")
            state.finish("export", {"s": time.perf_counter() - step, "threshold": exported.threshold,
                                    "parity_max_abs_diff": exported.parity_max_abs_diff})
            bar.update()
        if "eval" not in state.done:
            step = time.perf_counter()
            test_corpus, test_limit = corpora["test"]
            results = evaluate_command(test_corpus, out / "switch.onnx", setup=setup,
                                       json_out=out / "eval.json",
                                       png=out / "eval.png", seed=config.seed, limit=test_limit,
                                       progress=progress)
            state.finish("eval", {"s": time.perf_counter() - step, "results": [asdict(r) for r in results]})
            bar.update()
    bar.close()
    done = state.done
    timings = {f"{name}_s": done[name]["s"] for name in STEPS}
    timings["pipeline_s"] = time.perf_counter() - started
    result = {
        "switch_onnx": str(out / "switch.onnx"),
        "threshold": done["export"]["threshold"],
        "parity_max_abs_diff": done["export"]["parity_max_abs_diff"],
        "fit": {k: v for k, v in done["fit"].items() if k != "s"},
        "timings": timings,
        "eval": done["eval"]["results"],
        "cpu_count": os.cpu_count(),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def pipeline_audit_key(audit_dir: Path) -> Any:
    """The audit-hmac secret, or (no keyring, no variable) a key kept beside the toy's logs.

    The toy pipeline talks to a gateway on loopback; its logs stay verifiable either way.
    """
    from pydantic import SecretStr

    from client.errors import SecretMissingError
    from client.secrets import SecretStore

    try:
        return SecretStore().get_or_create("audit-hmac")
    except SecretMissingError:
        audit_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_file = audit_dir / "hmac.key"
        if not key_file.exists():
            descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
        return SecretStr(key_file.read_text().strip())


def targets_table(metrics: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for key, description, relation, bound in TARGETS:
        value = metrics[key]
        met = value >= bound if relation == ">=" else value <= bound
        rows.append({"key": key, "description": description, "relation": relation, "bound": bound,
                     "value": value, "met": met})
    return rows


def format_targets(result: dict[str, Any]) -> str:
    lines = [f"{'target':58} {'value':>9} {'bound':>10}  met"]
    for row in result["targets"]:
        lines.append(f"{row['description']:58} {row['value']:9.3f} {row['relation']:>2} {row['bound']:7.2f}  "
                     f"{'yes' if row['met'] else 'NO'}")
    return "\n".join(lines)


def format_result_table(result: dict[str, Any]) -> str:
    lines = [f"{'system':8} {'exact':>7} {'deferred':>9} {'calls':>6} {'wall s':>7}"]
    for row in result["eval"]:
        lines.append(f"{row['system']:8} {row['exact_match']:7.3f} {row['deferred_fraction']:9.3f} "
                     f"{row['remote_calls']:6d} {row['wall_s']:7.1f}")
    return "\n".join(lines)


# --- the cache -------------------------------------------------------------------------------------


def inputs_hash(toy_pair: Any, *, seed: int) -> str:
    """What the cached head depends on: the toy pair's files, this code, the seed."""
    digest = hashlib.sha256(f"seed={seed}".encode())
    here = Path(__file__).parent
    for name in CODE_FILES:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    for path in (toy_pair.base_gguf, toy_pair.expert_gguf, toy_pair.train_jsonl,
                 toy_pair.validation_jsonl, toy_pair.test_jsonl):
        stat = Path(path).stat()
        digest.update(f"{Path(path).name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(str(Path(toy_pair.base_gguf).resolve().parent).encode())
    return digest.hexdigest()[:20]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem" / "toy-head"


def ensure_toy_head(toy_pair: Any, *, cache_dir: Path | None = None, seed: int = 0,
                    progress: bool = False) -> Path:
    """The toy pair's trained ``switch.onnx``, built on first use (one builder at a time)."""
    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = parent / inputs_hash(toy_pair, seed=seed)

    def build(staging: Path) -> None:
        _run(toy_pair, staging, seed=seed, progress=progress)
        result = json.loads((staging / "result.json").read_text())
        result["switch_onnx"] = str(final / "switch.onnx")
        (staging / "result.json").write_text(json.dumps(result, indent=2) + "\n")

    return cached_build(final, build, done="result.json") / "switch.onnx"


def toy_head_result(switch_onnx: Path) -> dict[str, Any]:
    """The result.json written beside a head made by ``ensure_toy_head``."""
    result: dict[str, Any] = json.loads((switch_onnx.parent / "result.json").read_text())
    return result
