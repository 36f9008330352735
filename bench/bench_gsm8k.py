"""Co-LLM on GSM8K: SmolLM2-135M-Instruct (base) + the math expert behind the real gateway.

Every question comes from the held-out tenth of GSM8K's train split (export.gsm8k), never trained on.

1. Probes: the prompt is a question plus its solution up to and including ``<<expr=``; the answer is
   what is decoded before ``>>`` (greedy), right when it is the expression's value (export.gsm8k
   ``result_is_right``). Systems: base alone, expert alone, Co-LLM (learned head, calibrated
   threshold), random deferral at Co-LLM's rate, and the oracle "defer exactly at annotation
   results" (on a probe every decoded token up to ``>>`` is a result token, so the oracle defers
   all of them).
2. Free generation: a fixed 3-shot prompt of GSM8K train problems, then the question; reports the
   share of generated tokens deferred (and how many of those sit inside an annotation's result),
   the share of generated ``<<expr=c>>`` whose ``c`` is right, and final-answer accuracy
   (``#### n``), for base alone, Co-LLM and random deferral at Co-LLM's free-generation rate.
   Co-LLM's free-generation threshold is calibrated first on train-split questions that neither
   the head's pipeline nor the evaluation uses (``--calibrate``): the lowest of
   ``--calibrate-thresholds`` whose deferred share stays within ``--max-deferral``. The probes
   run at that threshold too, and at the head's own (probe-calibrated) threshold.
3. Cost: remote calls and wall seconds per answer, base alone vs Co-LLM.

Also a sweep of Co-LLM thresholds and random rates on the probes: ``--png`` plots probe accuracy
against deferral rate. Prints a table and one JSON line.

Usage: .venv/bin/python bench/bench_gsm8k.py --head OUT/switch.onnx [--probes 200] [--questions 200]
(the head from ``tandem train pipeline --config configs/pipelines/smollm2-math.toml --out OUT``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.decoding import CoDecoder, DecodingOptions
from client.prompting import Segment
from client.switch import OnnxSwitch
from export import gsm8k
from export.evaluate import ConstantSwitch, DecodingSetup, RandomSwitch, open_models
from export.pipeline import pipeline_audit_key, serve_gateway

SHOTS = 3
GENERATED_ANNOTATION = re.compile(r"<<([^=<>]*)=([^<>]*)>>")
# Questions the calibration may use: train-split problems past every slice the head's pipeline
# draws from the same shuffle (export.gsm8k_corpus takes at most a few hundred from its front).
CALIBRATION_OFFSET = 2000


@dataclass
class Tally:
    system: str
    answers: int = 0
    right: int = 0
    deferred: int = 0
    generated: int = 0
    calls: int = 0
    wall_s: float = 0.0
    annotations: int = 0
    annotations_right: int = 0
    deferred_in_results: int = 0
    answers_written: list[dict[str, Any]] = field(default_factory=list)  # free generation, per question

    def row(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "answers": self.answers,
            "accuracy": self.right / max(1, self.answers),
            "deferred_share": self.deferred / max(1, self.generated),
            "annotations": self.annotations,
            "annotations_right": self.annotations_right / max(1, self.annotations),
            "annotations_right_count": self.annotations_right,
            "deferred_in_results": self.deferred_in_results / max(1, self.deferred),
            "calls_per_answer": self.calls / max(1, self.answers),
            "wall_s_per_answer": self.wall_s / max(1, self.answers),
        }


def few_shot_prefix(train: list[gsm8k.Problem]) -> str:
    return "".join(gsm8k.problem_text(problem, problem.answer) + "\n\n" for problem in train[:SHOTS])


def decode(decoder: CoDecoder, prompt: str, tally: Tally, **overrides: Any) -> tuple[str, list[Any]]:
    """The answer's text and its tokens (each with its text and provenance)."""
    started = time.perf_counter()
    result = decoder.generate([Segment(prompt)], **overrides)
    tally.wall_s += time.perf_counter() - started
    tally.answers += 1
    tally.deferred += result.provenance_counts["expert"]
    tally.generated += len(result.tokens)
    tally.calls += result.egress.calls
    tally.deferred_in_results += deferred_inside_results(result.tokens)
    return result.text, result.tokens


def deferred_inside_results(tokens: list[Any]) -> int:
    """How many expert tokens lie inside an annotation's result (between ``=`` and ``>>``)."""
    text = b"".join(token.text for token in tokens).decode("utf-8", errors="replace")
    spans = [match.span(2) for match in GENERATED_ANNOTATION.finditer(text)]
    return sum(
        any(start <= offset < end or offset == end for start, end in spans)  # ``>>`` ends a result
        for offset, _ in expert_pieces(tokens)
    )


def expert_pieces(tokens: list[Any]) -> list[tuple[int, str]]:
    """Where the expert wrote: each expert token's character offset in the answer, and its text."""
    pieces, offset = [], 0
    for token in tokens:
        text = token.text.decode("utf-8", errors="replace")
        if token.provenance == "expert":
            pieces.append((offset, text))
        offset += len(text)
    return pieces


def make_decoder(models: Any, switch: Any, options: DecodingOptions) -> CoDecoder:
    return CoDecoder(base=models.base, switch=switch, expert=models.expert, policy=models.policy,
                     audit=models.audit, options=options)


def run_probes(models: Any, switch: Any, threshold: float, probes: list[gsm8k.Probe], name: str) -> Tally:
    options = DecodingOptions(max_tokens=14, threshold=threshold, stop=(">>",))
    decoder = make_decoder(models, switch, options)
    tally = Tally(name)
    for probe in probes:
        text, _ = decode(decoder, probe.prompt, tally)
        tally.right += gsm8k.result_is_right(text.strip(), probe.value)
    return tally


def run_free(
    models: Any,
    switch: Any,
    threshold: float,
    prefix: str,
    problems: list[gsm8k.Problem],
    name: str,
    max_tokens: int,
) -> Tally:
    options = DecodingOptions(max_tokens=max_tokens, threshold=threshold, stop=("\n\nQuestion:", "Question:"))
    decoder = make_decoder(models, switch, options)
    tally = Tally(name)
    for index, problem in enumerate(problems):
        text, tokens = decode(decoder, prefix + gsm8k.problem_text(problem, "").rstrip(" "), tally)
        right = gsm8k.final_answer_is_right(text, problem)
        tally.right += right
        tally.answers_written.append({
            "system": name, "question": index, "final_right": bool(right), "text": text,
            # where the expert wrote: [character offset in text, the token's text]
            "expert": expert_pieces(tokens),
        })
        for expression, written in GENERATED_ANNOTATION.findall(text):
            tally.annotations += 1
            # An expression that does not evaluate counts as a wrong annotation.
            with contextlib.suppress(gsm8k.GSM8KError):
                tally.annotations_right += gsm8k.result_is_right(written, gsm8k.evaluate(expression))
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", type=Path, required=True, help="switch.onnx for SmolLM2")
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens per free-generation answer")
    parser.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=[0.05, 0.2, 0.5, 0.8],
        help="extra head thresholds for the accuracy-vs-deferral plot",
    )
    parser.add_argument("--calibrate", type=int, default=20,
                        help="train-split questions for the free-generation threshold (0: the head's own)")
    parser.add_argument("--calibrate-thresholds", type=float, nargs="+", default=[0.25, 0.4, 0.6, 0.8],
                        help="candidate free-generation thresholds, tried in order")
    parser.add_argument("--max-deferral", type=float, default=0.09,
                        help="largest deferred share of calibration tokens to accept (the target is 10%%)")
    parser.add_argument("--png", type=Path, default=Path("bench/gsm8k.png"))
    parser.add_argument("--answers", type=Path,
                        help="write every free-generation answer here (JSON lines: system, question, "
                             "final_right, text, the expert's pieces)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from export.math_expert import ensure_math_expert
    from tandem_core.base_model import smollm2_path

    problems = gsm8k.load_problems()
    train, held_out = gsm8k.split(problems)
    rng = random.Random(f"bench-gsm8k-{args.seed}")
    order = list(held_out)
    rng.shuffle(order)
    probes = list(gsm8k.probes(order))[: args.probes]
    questions = order[: args.questions]
    prefix = few_shot_prefix(train)
    calibration_order = list(train)
    random.Random(f"gsm8k-corpus-{args.seed}").shuffle(calibration_order)  # export.gsm8k_corpus's
    calibration = [problem for problem in calibration_order[CALIBRATION_OFFSET:]
                   if problem not in train[:SHOTS]][: args.calibrate]
    expert_gguf = ensure_math_expert()
    audit_dir = Path(tempfile.mkdtemp(prefix="bench-gsm8k-audit-"))  # this run's egress log
    results: dict[str, Any] = {"probes": {}, "free": {}, "sweep": []}
    written: list[dict[str, Any]] = []
    with serve_gateway(expert_gguf, name="math-expert", n_threads=args.threads) as url:
        setup = DecodingSetup(
            base_gguf=smollm2_path(),
            gateway_url=url,
            expert_model="math-expert",
            prompt_style="plain",
            n_threads=args.threads,
            n_ctx=4096,
            audit_log=audit_dir / "audit.jsonl",
            audit_key=pipeline_audit_key(audit_dir),
        )
        with open_models(setup, audit_default=audit_dir / "audit.jsonl") as models:
            head = OnnxSwitch.for_base(args.head, models.base)
            threshold = head.threshold
            results["head_threshold"] = threshold
            if calibration:
                threshold = calibrate_free(models, head, prefix, calibration, args, results)
            base = run_probes(models, ConstantSwitch(0.0), 0.5, probes, "base")
            expert = run_probes(models, ConstantSwitch(1.0), 0.5, probes, "expert")
            co_llm = run_probes(models, head, threshold, probes, "co-llm")
            rate = co_llm.deferred / max(1, co_llm.generated)
            randomised = run_probes(models, RandomSwitch(args.seed), 1.0 - rate, probes, "random")
            for tally in (base, expert, co_llm, randomised):
                results["probes"][tally.system] = tally.row()
            if threshold != head.threshold:
                own = run_probes(models, head, head.threshold, probes, "co-llm@head").row()
                results["sweep"].append({"kind": "co-llm", "threshold": head.threshold, **own})
            # The oracle defers every result token; on a probe that is every decoded token up to
            # ">>", so its decode is the expert's (greedy is deterministic): not decoded twice.
            results["probes"]["oracle"] = {**expert.row(), "system": "oracle"}
            for extra in args.sweep:
                point = run_probes(models, head, extra, probes, f"co-llm@{extra}").row()
                results["sweep"].append({"kind": "co-llm", "threshold": extra, **point})
                random_point = run_probes(
                    models, RandomSwitch(args.seed), 1.0 - point["deferred_share"], probes, "random"
                ).row()
                results["sweep"].append({"kind": "random", **random_point})
            for switch, limit, name in ((ConstantSwitch(0.0), 0.5, "base"), (head, threshold, "co-llm")):
                tally = run_free(models, switch, limit, prefix, questions, name, args.max_tokens)
                results["free"][name] = tally.row()
                written += tally.answers_written
            free_rate = results["free"]["co-llm"]["deferred_share"]
            tally = run_free(models, RandomSwitch(args.seed), 1.0 - free_rate, prefix, questions, "random",
                             args.max_tokens)
            results["free"]["random"] = tally.row()
            written += tally.answers_written
    results["threshold"] = threshold
    results["seed"] = args.seed
    if args.answers is not None:
        args.answers.parent.mkdir(parents=True, exist_ok=True)
        args.answers.write_text("".join(json.dumps(answer) + "\n" for answer in written))
    print_table(results)
    plot(results, args.png)
    print(json.dumps({"bench": "gsm8k", **results}, sort_keys=True))
    return 0


def calibrate_free(models: Any, head: Any, prefix: str, problems: list[gsm8k.Problem],
                   args: argparse.Namespace, results: dict[str, Any]) -> float:
    """The lowest candidate threshold whose free-generation deferred share is within the cap."""
    results["calibration"] = {"questions": len(problems), "max_deferral": args.max_deferral, "points": []}
    chosen = None
    for candidate in args.calibrate_thresholds:
        point = run_free(models, head, candidate, prefix, problems, f"calibrate@{candidate}",
                         args.max_tokens).row()
        results["calibration"]["points"].append({"threshold": candidate, **point})
        print(f"calibration: threshold {candidate}: deferred {point['deferred_share']:.3f}, "
              f"annotations right {point['annotations_right']:.3f} of {point['annotations']}",
              file=sys.stderr, flush=True)
        if point["deferred_share"] <= args.max_deferral:
            chosen = candidate
            break
    if chosen is None:
        chosen = args.calibrate_thresholds[-1]
    results["calibration"]["chosen"] = chosen
    return chosen


def print_table(results: dict[str, Any]) -> None:
    print(
        f"probes (held-out GSM8K annotations, n={results['probes']['base']['answers']}), "
        f"threshold {results['threshold']:.4f}"
    )
    print(f"{'system':8} {'right':>7} {'deferred':>9} {'calls/ans':>10} {'s/ans':>7}")
    for name, row in results["probes"].items():
        print(
            f"{name:8} {row['accuracy']:7.3f} {row['deferred_share']:9.3f} {row['calls_per_answer']:10.2f} "
            f"{row['wall_s_per_answer']:7.2f}"
        )
    free = results["free"]
    print(f"free generation (3-shot, n={free['base']['answers']})")
    print(
        f"{'system':8} {'final':>7} {'annot. right':>13} {'annots':>7} {'deferred':>9} {'in results':>11} "
        f"{'calls/ans':>10} {'s/ans':>7}"
    )
    for name, row in free.items():
        print(
            f"{name:8} {row['accuracy']:7.3f} {row['annotations_right']:13.3f} {row['annotations']:7d} "
            f"{row['deferred_share']:9.3f} {row['deferred_in_results']:11.3f} "
            f"{row['calls_per_answer']:10.2f} {row['wall_s_per_answer']:7.2f}"
        )
    right = {name: 100 * row["annotations_right"] for name, row in free.items()}
    print(f"Co-LLM - base, annotations right: {right['co-llm'] - right['base']:+.1f} points; "
          f"Co-LLM - random: {right['co-llm'] - right['random']:+.1f} points")
    if "calibration" in results:
        calibration = results["calibration"]
        points = ", ".join(f"{p['threshold']}: {p['deferred_share']:.3f}" for p in calibration["points"])
        print(f"free-generation threshold {calibration['chosen']} calibrated on "
              f"{calibration['questions']} train-split questions (deferred share {points}); "
              f"the head's own threshold {results['head_threshold']:.4f}")


def plot(results: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    probes = results["probes"]
    co = sorted(
        [(p["deferred_share"], p["accuracy"]) for p in results["sweep"] if p["kind"] == "co-llm"]
        + [(probes["co-llm"]["deferred_share"], probes["co-llm"]["accuracy"])]
    )
    rnd = sorted(
        [(p["deferred_share"], p["accuracy"]) for p in results["sweep"] if p["kind"] == "random"]
        + [(probes["random"]["deferred_share"], probes["random"]["accuracy"])]
    )
    axes.plot(*zip(*co, strict=True), "o-", label="Co-LLM (learned head)")
    axes.plot(*zip(*rnd, strict=True), "s--", label="random deferral")
    axes.axhline(probes["base"]["accuracy"], color="grey", linestyle=":", label="base alone")
    axes.axhline(probes["expert"]["accuracy"], color="black", linestyle=":", label="expert alone")
    axes.scatter(
        [probes["co-llm"]["deferred_share"]],
        [probes["co-llm"]["accuracy"]],
        s=120,
        facecolors="none",
        edgecolors="red",
        label="calibrated threshold",
    )
    axes.set_xlabel("share of decoded tokens deferred to the expert")
    axes.set_ylabel("probe accuracy (result right)")
    axes.set_title("GSM8K held-out annotation probes")
    axes.legend(fontsize=8)
    png.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(png, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())
