"""Benchmark of Co-LLM decoding on the toy pair (and SmolLM2 for the head's cost).

Measures:
1. switch head cost per token as a percentage of one base decode step (target <= 1%);
2. remote calls per deferred token with lookahead 8 vs 1 on the toy test corpus, checking that
   both produce identical outputs (target <= 0.4);
3. tokens sent per call with incremental prefixes vs re-sending the whole prefix.

Without ``--head`` the switch is a logistic head fitted here in numpy with Co-LLM's weak
supervision (defer where the expert's argmax is the gold token and the base's is not) on the
toy training split, then exported to ONNX and run through ``client.switch.OnnxSwitch``.

Usage: .venv/bin/python bench/bench_decoding.py [--examples 40] [--head switch.onnx]
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.decoding import CoDecoder, DecodeResult, DecodingOptions
from client.expert import InProcessExpert
from client.switch import (
    BASE_FINGERPRINT_KEY,
    HEAD_TYPE_KEY,
    HIDDEN_SIZE_KEY,
    THRESHOLD_KEY,
    OnnxSwitch,
)
from tandem_core.base_model import LlamaModel, smollm2_path


def write_head(path: Path, weights: np.ndarray, bias: float, *, fingerprint: str,
               threshold: float) -> Path:
    """sigmoid(hidden @ weights + bias) as ONNX with Tandem's metadata (onnx.helper, no torch)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    width = weights.shape[0]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["hidden", "weights"], ["projected"]),
         helper.make_node("Add", ["projected", "bias"], ["logit"]),
         helper.make_node("Sigmoid", ["logit"], ["deferral_probability"])],
        "switch",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", width])],
        [helper.make_tensor_value_info("deferral_probability", TensorProto.FLOAT, ["n", 1])],
        initializer=[numpy_helper.from_array(weights.reshape(width, 1).astype(np.float32), "weights"),
                     numpy_helper.from_array(np.array([bias], dtype=np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {HIDDEN_SIZE_KEY: str(width), BASE_FINGERPRINT_KEY: fingerprint,
                                   THRESHOLD_KEY: str(threshold), HEAD_TYPE_KEY: "linear"})
    onnx.save(model, str(path))
    return path


def read_corpus(path: Path, limit: int) -> list[dict[str, Any]]:
    with open(path) as lines:
        return [json.loads(line) for _, line in zip(range(limit), lines, strict=False)]


def answer_positions(base: LlamaModel, expert: LlamaModel, example: dict[str, Any]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Hidden states and weak-supervision labels at the positions that predict answer tokens."""
    prompt = base.tokenize(example["prompt"], add_bos=True)
    answer = [*base.tokenize(example["answer"]), base.eos_id]
    sequence = prompt + answer
    base.reset()
    expert.reset()
    base_out = base.decode(sequence[:-1])
    expert_logits = expert.decode(sequence[:-1]).logits
    rows = slice(len(prompt) - 1, len(sequence) - 1)
    gold = np.array(sequence[len(prompt):])
    labels = (expert_logits[rows].argmax(-1) == gold) & (base_out.logits[rows].argmax(-1) != gold)
    return base_out.hidden[rows], labels.astype(np.float64)


def fit_head(base: LlamaModel, expert: LlamaModel, examples: list[dict[str, Any]]
             ) -> tuple[np.ndarray, float]:
    """Class-weighted logistic regression by full-batch gradient descent."""
    pairs = [answer_positions(base, expert, example) for example in examples]
    hidden = np.concatenate([h for h, _ in pairs]).astype(np.float64)
    labels = np.concatenate([y for _, y in pairs])
    mean, scale = hidden.mean(0), hidden.std(0) + 1e-6
    features = (hidden - mean) / scale
    positive = max(labels.mean(), 1e-3)
    sample_weights = np.where(labels > 0, 0.5 / positive, 0.5 / (1 - positive))
    weights, bias = np.zeros(features.shape[1]), 0.0
    for _ in range(500):
        probabilities = 1 / (1 + np.exp(-(features @ weights + bias)))
        gradient = sample_weights * (probabilities - labels) / len(labels)
        weights -= 0.5 * (features.T @ gradient + 1e-3 * weights)
        bias -= 0.5 * gradient.sum()
    # Fold the standardisation into the head so it reads raw hidden states.
    raw_weights = weights / scale
    return raw_weights, float(bias - (mean * raw_weights).sum())


def median_seconds(action: Any, repeats: int) -> float:
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        action()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def head_cost(model: LlamaModel, switch: OnnxSwitch, repeats: int) -> dict[str, float]:
    model.reset()
    model.decode(model.tokenize("Question: how many crates are there?\nAnswer:", add_bos=True))
    def decode_and_undo() -> None:
        model.decode([65])
        model.rollback(model.position() - 1)

    step = median_seconds(decode_and_undo, repeats)
    hidden = np.random.default_rng(0).normal(size=(1, model.hidden_size)).astype(np.float32)
    for _ in range(50):
        switch.score(hidden)
    score = median_seconds(lambda: switch.score(hidden), repeats * 20)
    return {"decode_step_ms": step * 1e3, "head_us": score * 1e6,
            "head_percent": 100 * score / step}


def run_corpus(decoder: CoDecoder, base: LlamaModel, examples: list[dict[str, Any]],
               **overrides: Any) -> list[DecodeResult]:
    return [decoder.generate(base.tokenize(example["prompt"], add_bos=True), **overrides)
            for example in examples]


def egress_totals(results: list[DecodeResult]) -> dict[str, float]:
    calls = sum(result.egress.calls for result in results)
    deferred = sum(result.egress.deferred_positions for result in results)
    sent = sum(result.egress.tokens_sent for result in results)
    correct_tokens = sum(result.provenance_counts["expert"] for result in results)
    return {"calls": calls, "deferred_tokens": deferred, "expert_tokens": correct_tokens,
            "tokens_sent": sent, "calls_per_deferred": calls / max(deferred, 1),
            "tokens_per_call": sent / max(calls, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=40, help="test-corpus answers to decode")
    parser.add_argument("--train-examples", type=int, default=80, help="answers to fit the head")
    parser.add_argument("--head", type=Path, default=None, help="a trained switch.onnx")
    parser.add_argument("--threshold", type=float, default=None, help="override the threshold")
    parser.add_argument("--repeats", type=int, default=60, help="timing repeats")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 timing")
    parser.add_argument("--toy-dir", type=Path, default=None,
                        help="an already built toy pair (default: ensure_toy_pair())")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    args = parser.parse_args()

    from export.toy import ToyPair, ensure_toy_pair

    toy = ToyPair.at(args.toy_dir) if args.toy_dir else ensure_toy_pair()
    base = LlamaModel(toy.base_gguf, n_ctx=512, n_threads=args.threads)
    expert_model = LlamaModel(toy.expert_gguf, n_ctx=512, n_threads=args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench-decoding-"))
    if args.head is None:
        weights, bias = fit_head(base, expert_model,
                                 read_corpus(toy.train_jsonl, args.train_examples))
        head_path = write_head(workdir / "switch.onnx", weights, bias,
                               fingerprint=base.fingerprint, threshold=0.5)
    else:
        head_path = args.head
    switch = OnnxSwitch.for_base(head_path, base)
    threshold = args.threshold if args.threshold is not None else switch.threshold

    rows: dict[str, Any] = {"toy": head_cost(base, switch, args.repeats)}
    if not args.no_smollm2:
        with LlamaModel(smollm2_path(), n_ctx=256, n_threads=args.threads) as smollm2:
            random_head = write_head(workdir / "smollm2.onnx",
                                     np.random.default_rng(1).normal(size=smollm2.hidden_size),
                                     0.0, fingerprint=smollm2.fingerprint, threshold=0.5)
            rows["smollm2"] = head_cost(smollm2, OnnxSwitch.for_base(random_head, smollm2),
                                        max(10, args.repeats // 3))

    examples = read_corpus(toy.test_jsonl, args.examples)
    decoder = CoDecoder(base=base, switch=switch, expert=InProcessExpert(expert_model),
                        options=DecodingOptions(threshold=threshold, max_tokens=48))
    runs = {
        "lookahead_8": run_corpus(decoder, base, examples, lookahead=8),
        "lookahead_1": run_corpus(decoder, base, examples, lookahead=1),
        "lookahead_8_whole_prefix": run_corpus(decoder, base, examples, lookahead=8,
                                               incremental=False),
        "lookahead_1_whole_prefix": run_corpus(decoder, base, examples, lookahead=1,
                                               incremental=False),
    }
    identical = all(
        [r.token_ids for r in runs[name]] == [r.token_ids for r in runs["lookahead_1"]]
        for name in runs)
    totals = {name: egress_totals(results) for name, results in runs.items()}
    correct = sum(example["answer"].strip() in result.text
                  for example, result in zip(examples, runs["lookahead_8"], strict=True))
    report = {
        "bench": "decoding", "examples": len(examples), "threshold": threshold,
        "threads": args.threads,
        "head": str(head_path if args.head else "fitted-weak-supervision"),
        "head_cost": rows, "egress": totals, "identical_outputs": identical,
        "answers_correct": correct,
        "calls_per_deferred_8_vs_1": [totals["lookahead_8"]["calls_per_deferred"],
                                      totals["lookahead_1"]["calls_per_deferred"]],
    }
    print_table(report)
    print(json.dumps(report, sort_keys=True))
    base.close()
    expert_model.close()
    return 0


def print_table(report: dict[str, Any]) -> None:
    print(f"{'model':<10}{'decode step ms':>16}{'head µs':>10}{'head % of step':>16}")
    for name, row in report["head_cost"].items():
        print(f"{name:<10}{row['decode_step_ms']:>16.2f}{row['head_us']:>10.1f}"
              f"{row['head_percent']:>15.2f}%")
    print()
    print(f"{'run':<26}{'calls':>7}{'deferred':>9}{'calls/def':>10}{'sent':>7}{'sent/call':>10}")
    for name, row in report["egress"].items():
        print(f"{name:<26}{row['calls']:>7}{row['deferred_tokens']:>9}"
              f"{row['calls_per_deferred']:>10.3f}{row['tokens_sent']:>7}"
              f"{row['tokens_per_call']:>10.1f}")
    print(f"\nidentical outputs across runs: {report['identical_outputs']}; "
          f"answers correct: {report['answers_correct']}/{report['examples']}")


if __name__ == "__main__":
    raise SystemExit(main())
