"""GSM8K corpora for the pipeline: full solutions to collect on, annotation probes to decode.

- ``train`` / ``validation``: ``{"prompt": "Question: ...\\nAnswer:", "answer": " <solution>"}`` for
  disjoint slices of the training part of GSM8K's train split. Collection scores every solution
  token with base and expert; the head learns where the expert is the better bet. A share of the
  annotations (``plain_share``) is written as plain spaced arithmetic (``48 / 2 = 24``), the form
  SmolLM2 uses in its own answers, so the head also learns that form.
- ``sweep``: probes from the validation problems (prompt up to ``<<expr=``, answer the canonical
  result); the calibration sweep decodes them with the stop sequence ``>>``.
- ``test``: probes from the held-out tenth (export.gsm8k), never trained on.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

from export import gsm8k, math_data

DEFAULT_LIMITS = {"train": 300, "validation": 60, "sweep": 80, "test": 200}


def solution_record(problem: gsm8k.Problem, rng: random.Random, plain_share: float) -> dict[str, str]:
    prompt = gsm8k.problem_text(problem, "").rstrip(" ")
    answer = math_data.plain_solution(problem, rng, plain_share) if plain_share else problem.answer
    return {"prompt": prompt, "answer": " " + answer}


def probe_record(probe: gsm8k.Probe) -> dict[str, str]:
    return {
        "prompt": probe.prompt,
        "answer": gsm8k.format_result(probe.value),
        "expression": probe.expression,
    }


def _write(path: Path, records: Sequence[Mapping[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def write_corpora(
    out: Path,
    *,
    gsm8k_path: Path | None,
    seed: int,
    limits: Mapping[str, int | None],
    plain_share: float = 0.0,
) -> dict[str, Path]:
    """Write the four corpora (same bytes for the same inputs, so a resumed run matches)."""
    sizes = {name: limits.get(name) or default for name, default in DEFAULT_LIMITS.items()}
    train, held_out = gsm8k.split(gsm8k.load_problems(gsm8k_path))
    order = list(train)
    random.Random(f"gsm8k-corpus-{seed}").shuffle(order)
    fit_problems = order[: sizes["train"]]
    validation_problems = order[sizes["train"] : sizes["train"] + sizes["validation"]]
    sweep_problems = order[sizes["train"] + sizes["validation"] :][: sizes["sweep"]]
    test_order = list(held_out)
    random.Random(f"gsm8k-test-{seed}").shuffle(test_order)
    paths = {name: out / f"{name}.jsonl" for name in DEFAULT_LIMITS}
    rng = random.Random(f"gsm8k-plain-{seed}")
    _write(paths["train"], [solution_record(p, rng, plain_share) for p in fit_problems])
    _write(paths["validation"], [solution_record(p, rng, plain_share) for p in validation_problems])
    _write(paths["sweep"], [probe_record(p) for p in list(gsm8k.probes(sweep_problems))[: sizes["sweep"]]])
    _write(paths["test"], [probe_record(p) for p in list(gsm8k.probes(test_order))[: sizes["test"]]])
    return paths
