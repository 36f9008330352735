"""Evaluation of a switch head by real decoding: base alone, expert alone, Co-LLM, random deferral.

Every system is the same ``client.decoding.CoDecoder`` with a different switch: a constant 0
(base alone), a constant 1 (the expert writes every token), the trained ONNX head at its
threshold (Co-LLM), and uniform noise at the threshold that defers Co-LLM's measured share of
tokens (random deferral). So the comparison isolates the switch, and the numbers include what a
deployment pays: remote calls, tokens sent, wall time.

The calibration sweep (``run_calibration``) decodes the validation corpus the same way at each
candidate threshold.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from export.collect import Example, prompt_segments, read_corpus, resolve_style
from tandem_core.base_model import BaseModel
from tandem_core.errors import TandemError

GSM8K_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
SYSTEMS = ("base", "expert", "co-llm", "random")


class EvaluationError(TandemError):
    """The evaluation could not run."""


# --- scoring answers ----------------------------------------------------------------------------------


def final_number(text: str) -> str | None:
    """The ``#### n`` answer of GSM8K style text, else the last number in it (the toy's result)."""
    match = GSM8K_ANSWER.search(text)
    found = match.group(1) if match else (NUMBER.findall(text) or [None])[-1]
    if found is None:
        return None
    cleaned = found.replace(",", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return str(int(value)) if value.is_integer() else str(value)


def exact_match(generated: str, gold: str) -> bool:
    return generated.strip() == gold.strip()


def numeric_match(generated: str, gold: str) -> bool:
    expected = final_number(gold)
    return expected is not None and final_number(generated) == expected


# --- switches for the baselines ---------------------------------------------------------------------


class ConstantSwitch:
    """Always the same deferral probability: 0 is base alone, 1 is the expert writing everything."""

    def __init__(self, value: float) -> None:
        self.value = value

    def score(self, hidden: np.ndarray) -> np.ndarray:
        return np.full(len(hidden), self.value, dtype=np.float32)


class RandomSwitch:
    """Uniform noise: with threshold ``1 - rate`` it defers a ``rate`` share of tokens at random."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def score(self, hidden: np.ndarray) -> np.ndarray:
        return self.rng.random(len(hidden)).astype(np.float32)


# --- decoding a corpus -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodingSetup:
    """The base, the expert (gateway or in-process) and how to decode."""

    base_gguf: Path
    gateway_url: str | None = None
    expert_gguf: Path | None = None
    expert_model: str = "toy-expert"
    prompt_style: Literal["auto", "plain", "chat"] = "auto"
    n_ctx: int = 4096
    n_threads: int = 2
    policy_file: Path | None = None
    audit_log: Path | None = None
    max_tokens: int = 64
    lookahead: int = 8
    stop: tuple[str, ...] = ()  # stop sequences, cut from the answer (GSM8K probes stop at ">>")
    audit_key: Any = None  # a pydantic SecretStr; None: the audit-hmac secret


@dataclass(frozen=True)
class SystemResult:
    system: str
    threshold: float | None
    examples: int
    exact_match: float
    numeric_match: float
    deferred_fraction: float
    generated_tokens: int
    remote_calls: int
    tokens_sent: int
    wall_s: float


@dataclass
class Models:
    """Opened models and the expert for one evaluation; ``open_models`` closes them."""

    base: BaseModel
    expert: Any
    policy: Any
    audit: Any
    style: Literal["plain", "chat"]


@contextmanager
def open_models(setup: DecodingSetup, *, audit_default: Path) -> Iterator[Models]:
    """The parts of ``client.composition.open_parts`` for one evaluation, closed on exit."""
    from client.composition import GatewayExpert, LocalExpert, PartsSpec, open_parts
    from client.settings import BaseModelSettings
    from export.collect import EgressSetup, egress_for, gateway_expert

    expert: GatewayExpert | LocalExpert
    if setup.gateway_url is not None:
        expert = gateway_expert(setup.gateway_url, model=setup.expert_model, timeout_s=60.0)
    elif setup.expert_gguf is not None:
        expert = LocalExpert(setup.expert_gguf, setup.expert_model)
    else:
        raise EvaluationError("decoding needs an expert: a gateway URL or an expert GGUF")
    egress = egress_for(EgressSetup(setup.policy_file, setup.audit_log, setup.audit_key),
                        default_audit=audit_default)
    spec = PartsSpec(setup.base_gguf, expert, egress, base=BaseModelSettings(
        n_ctx=setup.n_ctx, n_threads=setup.n_threads, max_parallel=1))
    with contextlib.ExitStack() as stack:
        parts = open_parts(stack, spec)
        yield Models(parts.base, parts.expert, parts.policy, parts.audit,
                     resolve_style(parts.base, setup.prompt_style))


def decode_corpus(models: Models, examples: Sequence[Example], *, switch: Any, threshold: float,
                  setup: DecodingSetup, system: str, progress: bool = True) -> SystemResult:
    """Decode every example with one switch and threshold; score the answers."""
    from tqdm import tqdm

    from client.decoding import CoDecoder, DecodingOptions

    options = DecodingOptions(max_tokens=setup.max_tokens, threshold=threshold, lookahead=setup.lookahead,
                              stop=setup.stop)
    decoder = CoDecoder(base=models.base, switch=switch, expert=models.expert, policy=models.policy,
                        audit=models.audit, options=options)
    exact = numeric = deferred = generated = calls = sent = 0
    started = time.perf_counter()
    for example in tqdm(examples, desc=f"decode {system}", disable=not progress, leave=False):
        result = decoder.generate(prompt_segments(models.base, example, models.style))
        exact += exact_match(result.text, example.answer)
        numeric += numeric_match(result.text, example.answer)
        deferred += result.provenance_counts["expert"]
        generated += len(result.tokens)
        calls += result.egress.calls
        sent += result.egress.tokens_sent
    return SystemResult(
        system=system, threshold=threshold, examples=len(examples),
        exact_match=exact / len(examples), numeric_match=numeric / len(examples),
        deferred_fraction=deferred / generated if generated else 0.0, generated_tokens=generated,
        remote_calls=calls, tokens_sent=sent, wall_s=time.perf_counter() - started,
    )


# --- the evaluation -----------------------------------------------------------------------------------


def evaluate(models: Models, examples: Sequence[Example], *, switch: Any, threshold: float,
             setup: DecodingSetup, seed: int = 0, progress: bool = True) -> list[SystemResult]:
    """The four systems on the same examples; random deferral matches Co-LLM's deferral share."""
    base = decode_corpus(models, examples, switch=ConstantSwitch(0.0), threshold=0.5, setup=setup,
                         system="base", progress=progress)
    expert = decode_corpus(models, examples, switch=ConstantSwitch(1.0), threshold=0.5, setup=setup,
                           system="expert", progress=progress)
    co_llm = decode_corpus(models, examples, switch=switch, threshold=threshold, setup=setup,
                           system="co-llm", progress=progress)
    random_threshold = 1.0 - co_llm.deferred_fraction
    randomised = decode_corpus(models, examples, switch=RandomSwitch(seed), threshold=random_threshold,
                               setup=setup, system="random", progress=progress)
    return [base, expert, co_llm, randomised]


def evaluate_command(corpus: Path, switch_path: Path, *, setup: DecodingSetup, json_out: Path,
                     png: Path | None = None, threshold: float | None = None, limit: int | None = None,
                     seed: int = 0, progress: bool = True) -> list[SystemResult]:
    """What ``tandem eval`` runs: results to JSON (and a PNG), returned for the table."""
    from client.switch import OnnxSwitch

    examples = read_corpus(corpus, limit=limit)
    with open_models(setup, audit_default=json_out.parent / "eval-audit.jsonl") as models:
        switch = OnnxSwitch.for_base(switch_path, models.base)
        chosen = switch.threshold if threshold is None else threshold
        results = evaluate(models, examples, switch=switch, threshold=chosen, setup=setup, seed=seed,
                           progress=progress)
    write_results(json_out, results, corpus=corpus, switch_path=switch_path)
    if png is not None:
        plot_results(results, png)
    return results


def write_results(path: Path, results: Sequence[SystemResult], *, corpus: Path, switch_path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"corpus": str(corpus), "switch": str(switch_path),
            "results": [asdict(result) for result in results]}
    path.write_text(json.dumps(body, indent=2) + "\n")


def format_table(results: Sequence[SystemResult]) -> str:
    header = (f"{'system':8} {'threshold':>9} {'exact':>7} {'numeric':>8} {'deferred':>9} "
              f"{'calls':>6} {'sent':>7} {'wall_s':>7}")
    lines = [header]
    for r in results:
        threshold = "-" if r.threshold is None else f"{r.threshold:.4f}"
        lines.append(f"{r.system:8} {threshold:>9} {r.exact_match:7.1%} {r.numeric_match:8.1%} "
                     f"{r.deferred_fraction:9.1%} {r.remote_calls:6d} {r.tokens_sent:7d} {r.wall_s:7.2f}")
    return "\n".join(lines)


def plot_results(results: Sequence[SystemResult], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    names = [f"{r.system}\n({r.deferred_fraction:.0%} deferred)" for r in results]
    colors = ["tab:red", "tab:green", "tab:blue", "tab:gray"]
    axes.bar(names, [100 * r.exact_match for r in results], color=colors[:len(results)])
    axes.set(ylabel="exact match (%)", ylim=(0, 105), title="Base, expert, Co-LLM, random deferral")
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(png)
    plt.close(figure)


# --- the calibration sweep ------------------------------------------------------------------------------


def run_calibration(head_path: Path, data_dir: Path, *, out: Path, png: Path | None,
                    rates: Sequence[float], corpus: Path | None, setup: DecodingSetup | None,
                    rule: str = "accuracy", max_deferral: float | None = None, limit: int | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Quantile thresholds on collected validation data, then (with a corpus) the decoding sweep."""
    import tempfile

    from export.calibrate import (
        SweepPoint,
        calibration_table,
        candidates,
        pick,
        plot,
        quantile_threshold,
        quantile_thresholds,
        sweep,
        write_table,
    )
    from export.collect import load_collected
    from export.onnx_export import export_onnx
    from export.train import load_head

    head = load_head(head_path)
    validation = load_collected(data_dir)
    scores = head.deferral_probability(validation.hidden, validation.features)
    quantiles = quantile_thresholds(scores, rates)
    points: list[SweepPoint] = []
    base_accuracy = expert_accuracy = None
    chosen = None
    if corpus is not None and setup is not None:
        examples = read_corpus(corpus, limit=limit)
        with tempfile.TemporaryDirectory() as scratch, \
                open_models(setup, audit_default=out.parent / "calibrate-audit.jsonl") as models:
            from client.switch import OnnxSwitch

            export_onnx(head, Path(scratch) / "switch.onnx")
            switch = OnnxSwitch.for_base(Path(scratch) / "switch.onnx", models.base)

            def run(threshold: float) -> SweepPoint:
                result = decode_corpus(models, examples, switch=switch, threshold=threshold,
                                       setup=setup, system="co-llm", progress=False)
                return _sweep_point(result)

            base_accuracy = decode_corpus(models, examples, switch=ConstantSwitch(0.0), threshold=0.5,
                                          setup=setup, system="base", progress=False).exact_match
            expert_accuracy = decode_corpus(models, examples, switch=ConstantSwitch(1.0), threshold=0.5,
                                            setup=setup, system="expert", progress=False).exact_match
            points = sweep(candidates(quantiles), run, progress=progress)
        chosen = pick(points, rule=rule, max_deferral=max_deferral)  # type: ignore[arg-type]
    elif max_deferral is not None:
        threshold = quantile_threshold(scores, max_deferral)
        share = float(np.mean(scores > threshold))
        chosen = SweepPoint(threshold, max_deferral, None, share, 0, 0, 0.0)
    table = calibration_table(quantiles=quantiles, points=points, chosen=chosen, rule=rule,
                              max_deferral=max_deferral, base_accuracy=base_accuracy,
                              expert_accuracy=expert_accuracy, validation_positions=len(scores))
    write_table(out, table)
    if png is not None and points:
        plot(points, png, base_accuracy=base_accuracy, expert_accuracy=expert_accuracy)
    return table


def _sweep_point(result: SystemResult) -> Any:
    from export.calibrate import SweepPoint

    return SweepPoint(threshold=float(result.threshold or 0.0), target_rate=None,
                      accuracy=result.exact_match, deferred_fraction=result.deferred_fraction,
                      remote_calls=result.remote_calls, tokens_sent=result.tokens_sent, wall_s=result.wall_s)
