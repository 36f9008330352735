"""Scores of the toy pair against its targets, with the torch reference and a llama.cpp check.

Exact match is measured with one teacher-forced pass: greedy decoding reproduces a gold
continuation exactly when the argmax at every position equals the next gold token.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from export import toy_data
from export.gguf_writer import LlamaHyperparameters, Vocabulary
from export.toy_tokens import Tokenizer, tokenize_example

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelContext:
    """What scoring needs besides the weights: the shape of the model and its tokenizer."""

    hparams: LlamaHyperparameters
    tokenizer: Tokenizer
    vocabulary: Vocabulary


TARGETS = (
    ("build_cpu_s", "build time, CPU seconds (1 torch thread)", "<=", 300.0),
    ("expert_expression_exact", "expert alone, held-out expressions", ">=", 0.95),
    ("expert_expression_prefixed_exact", "expert alone, after unrelated prefix", ">=", 0.95),
    ("base_full_exact", "base alone, held-out full answers", "<=", 0.30),
    ("expert_full_exact", "expert alone, held-out full answers", "<=", 0.30),
)
INFORMATION = (
    ("build_s", "build time, wall seconds (shared machine)"),
    ("expert_remote_view_exact", "expert after the redacted Co-LLM prefix"),
    ("expert_full_prefix_exact", "expert after the full Co-LLM prefix"),
    ("base_copy_exact", "base writes the answer up to '=' exactly"),
    ("oracle_co_llm_exact", "base text + expert result (oracle switch)"),
    ("llama_cpp_greedy_match", "llama.cpp greedy == torch greedy"),
)


def _exact(predictions: Sequence[int], ids: Sequence[int], start: int, stop: int) -> bool:
    """Whether argmaxes at positions start-1 .. stop-2 predict ids[start:stop]."""
    return all(predictions[t - 1] == ids[t] for t in range(start, stop))


def _ends_number(predictions: Sequence[int], ids: Sequence[int], digit_ids: set[int]) -> bool:
    """After the last token of ``ids`` the model does not write another digit."""
    return predictions[len(ids) - 1] not in digit_ids


def expression_exact(
    parameters: dict[str, torch.Tensor], context: ModelContext, *,
    prefixes: Sequence[str], pairs: Sequence[tuple[int, int]],
) -> float:
    """Share of ``prefix + "a+b="`` where greedy writes exactly the sum and then a non-digit."""
    from export.toy_model import argmax_predictions

    tokenizer, vocabulary = context.tokenizer, context.vocabulary
    digit_ids = {tokenizer.encode(d)[0] for d in "0123456789"}
    sequences, spans = [], []
    for prefix, (a, b) in zip(prefixes, pairs, strict=True):
        head = [vocabulary.bos_id, *tokenizer.encode(prefix), *tokenizer.encode(f"{a}+{b}=")]
        ids = head + tokenizer.encode(str(a + b))
        sequences.append(ids)
        spans.append(len(head))
    predictions = argmax_predictions(parameters, context.hparams, sequences, pad_id=vocabulary.eos_id)
    hits = [
        _exact(pred, ids, start, len(ids)) and _ends_number(pred, ids, digit_ids)
        for pred, ids, start in zip(predictions, sequences, spans, strict=True)
    ]
    return sum(hits) / len(hits)


def answer_scores(
    parameters: dict[str, torch.Tensor], context: ModelContext, *, test: Sequence[toy_data.Example],
) -> list[tuple[bool, bool, bool]]:
    """Per example: (whole answer + EOS exact, exact up to '=', result digits exact)."""
    from export.toy_model import argmax_predictions

    tokenizer, vocabulary = context.tokenizer, context.vocabulary
    encoded = [tokenize_example(tokenizer, vocabulary, ex, ex.answer) for ex in test]
    sequences = [item.prompt_ids + item.answer_ids for item in encoded]
    predictions = argmax_predictions(parameters, context.hparams, sequences, pad_id=vocabulary.eos_id)
    scores = []
    for example, item, ids, pred in zip(test, encoded, sequences, predictions, strict=True):
        start = len(item.prompt_ids)
        head_stop = start + item.head_length
        result_stop = head_stop + len(tokenizer.encode(str(example.result)))
        scores.append((
            _exact(pred, ids, start, len(ids)),
            _exact(pred, ids, start, head_stop),
            _exact(pred, ids, head_stop, result_stop),
        ))
    return scores


def evaluate_pair(
    base: dict[str, torch.Tensor], expert: dict[str, torch.Tensor], context: ModelContext, *,
    test: Sequence[toy_data.Example], held_out_pairs: Sequence[tuple[int, int]], seed: int,
) -> dict[str, Any]:
    rng = random.Random(f"eval-{seed}")
    pairs = [rng.choice(held_out_pairs) for _ in range(len(test))]
    prefixes = [toy_data.junk_prefix(rng, held_out_pairs, rng.choice((24, 60, 150))) for _ in pairs]
    prefixes = [prefix or "Notes from the meeting: " for prefix in prefixes]
    test_pairs = [(int(x), int(y)) for x, y in (ex.expression.split("+") for ex in test)]
    heads = [ex.answer[: ex.answer.rindex("=") - len(ex.expression)] for ex in test]
    remote_views = [toy_data.remote_view(ex.question) + h for ex, h in zip(test, heads, strict=True)]
    full_prefixes = [ex.prompt + head for ex, head in zip(test, heads, strict=True)]
    metrics: dict[str, Any] = {
        "expert_expression_exact": expression_exact(
            expert, context, prefixes=[""] * len(pairs), pairs=pairs),
        "expert_expression_prefixed_exact": expression_exact(
            expert, context, prefixes=prefixes, pairs=pairs),
        "expert_remote_view_exact": expression_exact(
            expert, context, pairs=test_pairs,
            prefixes=remote_views),
        "expert_full_prefix_exact": expression_exact(
            expert, context, pairs=test_pairs,
            prefixes=full_prefixes),
    }
    base_scores = answer_scores(base, context, test=test)
    expert_scores = answer_scores(expert, context, test=test)
    count = len(test)
    metrics |= {
        "base_full_exact": sum(s[0] for s in base_scores) / count,
        "base_copy_exact": sum(s[1] for s in base_scores) / count,
        "expert_full_exact": sum(s[0] for s in expert_scores) / count,
        "oracle_co_llm_exact": sum(
            b[1] and e[2] for b, e in zip(base_scores, expert_scores, strict=True)) / count,
        "evaluated_examples": count,
    }
    return {key: round(value, 4) if isinstance(value, float) else value for key, value in metrics.items()}


class ValidationChecks:
    """The early-stopping checks: exact scores on validation data, never on the test split."""

    def __init__(
        self, context: ModelContext, *, validation: Sequence[toy_data.Example],
        validation_pairs: Sequence[tuple[int, int]], seed: int, size: int = 60,
        threshold: float = 0.985,
    ) -> None:
        rng = random.Random(f"validation-{seed}")
        self._context = context
        self._examples = list(validation[:size])
        pairs = [rng.choice(validation_pairs) for _ in range(2 * size)]
        pairs += [(int(x), int(y)) for x, y in (ex.expression.split("+") for ex in self._examples)]
        junk = [toy_data.junk_prefix(rng, validation_pairs, rng.choice((24, 60, 150))) for _ in range(size)]
        heads = [ex.prompt + ex.answer[: ex.answer.rindex("=") - len(ex.expression)] for ex in self._examples]
        self._pairs, self._prefixes = pairs, [""] * size + junk + heads
        self._threshold = threshold

    def score(self, role: str, parameters: dict[str, torch.Tensor]) -> float:
        """Base: share copied exactly up to '='; expert: share of sums exactly right."""
        if role == "base":
            scores = answer_scores(parameters, self._context, test=self._examples)
            return sum(score[1] for score in scores) / len(scores)
        return expression_exact(parameters, self._context, prefixes=self._prefixes, pairs=self._pairs)

    def passes(self, score: float) -> bool:
        return score >= self._threshold


def llama_cpp_greedy(path: Path, prompt_ids: Sequence[int], *, max_tokens: int, stop_id: int) -> list[int]:
    """Greedy continuation under llama.cpp, argmax over its own logits (F32 KV cache).

    One thread: on a busy machine llama.cpp's threads spin-wait on each other, ten times slower.
    """
    import llama_cpp
    import numpy as np

    llama = llama_cpp.Llama(
        model_path=str(path), n_ctx=512, n_threads=1, logits_all=True, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )
    try:
        llama.eval(list(prompt_ids))
        generated: list[int] = []
        while len(generated) < max_tokens:
            next_id = int(np.argmax(llama.scores[llama.n_tokens - 1]))
            generated.append(next_id)
            if next_id == stop_id:
                break
            llama.eval([next_id])
        return generated
    finally:
        llama.close()


def llama_cpp_spot_check(
    out_dir: Path, models: dict[str, dict[str, torch.Tensor]], context: ModelContext, *,
    examples: Sequence[toy_data.Example],
) -> bool | None:
    """Whether llama.cpp's greedy output equals torch's on a few prompts (None: no llama.cpp)."""
    try:
        import llama_cpp  # noqa: F401
    except ModuleNotFoundError:
        return None
    from export.toy_model import greedy_generate

    vocabulary = context.vocabulary
    for role, parameters in models.items():
        for example in examples:
            prompt = [vocabulary.bos_id, *context.tokenizer.encode(example.prompt)]
            expected = greedy_generate(
                parameters, context.hparams, prompt, max_tokens=32, stop_id=vocabulary.eos_id
            )
            got = llama_cpp_greedy(out_dir / f"{role}.gguf", prompt, max_tokens=32, stop_id=vocabulary.eos_id)
            if got != expected:
                return False
    return True


def targets_table(metrics: dict[str, Any], timings: dict[str, Any]) -> list[dict[str, Any]]:
    values = {**metrics, **timings}
    rows = []
    for key, label, relation, bound in TARGETS:
        value = values[key]
        met = value <= bound if relation == "<=" else value >= bound
        target = f"{relation} {bound:g}"
        rows.append({"name": key, "label": label, "value": value, "target": target, "met": met})
    for key, label in INFORMATION:
        if key in values:
            rows.append({"name": key, "label": label, "value": values[key], "target": "", "met": None})
    return rows


def format_targets(rows: Sequence[dict[str, Any]]) -> str:
    lines = [f"{'measure':<44} {'value':>8}  {'target':<8}  met"]
    for row in rows:
        met = "" if row["met"] is None else ("yes" if row["met"] else "NO")
        lines.append(f"{row['label']:<44} {row['value']!s:>8}  {row['target']:<8}  {met}")
    return "\n".join(lines)
