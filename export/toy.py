"""The deterministic toy base/expert pair: tiny llama models trained with torch, written as GGUF.

- base: trained on the whole document/question/answer format, but the result after ``=`` in its
  training answers is a random number of plausible length. It stands for a small model that
  reads the passage, copies the operands and writes the sentence, but cannot add.
- expert: trained only on ``a+b=c`` after unrelated prefixes (random characters and words,
  ``[private]``, fragments of other expressions, or nothing). It adds well anywhere in a long
  prefix but never saw the answer format.

``ensure_toy_pair()`` builds once per version of this code and caches the result under
``$XDG_CACHE_HOME/tandem/toy/<code hash>``; concurrent callers wait on a file lock, and the build
happens in a temporary directory renamed into place, so nobody sees half a pair.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from export import toy_data
from export.cached_build import cached_build
from export.gguf_writer import (
    LlamaHyperparameters,
    Vocabulary,
    default_vocabulary,
    vocabulary_from_gguf,
    write_llama_gguf,
)
from export.toy_tokens import ByteTokenizer, LlamaCppTokenizer, Tokenizer, tokenize_example

CODE_FILES = ("toy.py", "toy_model.py", "toy_data.py", "gguf_writer.py", "toy_eval.py",
              "toy_tokens.py", "torch_import.py")
DIGITS = "0123456789"


@dataclass(frozen=True)
class ToyOptions:
    """Model sizes, training lengths and corpus sizes; tests shrink them for speed."""

    width: int = 64
    blocks: int = 2
    heads: int = 4
    ffn: int = 192
    context_length: int = 512
    base_cycle_steps: int = 600
    expert_cycle_steps: int = 1200
    max_cycles: int = 3
    base_batch: int = 24
    expert_batch: int = 12
    expert_sequence_length: int = 256
    learning_rate: float = 5e-3
    prompt_weight: float = 0.1
    train_examples: int = 2000
    validation_examples: int = 300
    test_examples: int = 300
    eval_examples: int = 300
    llama_cpp_check: bool = True

    def hparams(self) -> LlamaHyperparameters:
        return LlamaHyperparameters(
            context_length=self.context_length, embedding_length=self.width,
            block_count=self.blocks, feed_forward_length=self.ffn, head_count=self.heads,
            head_count_kv=self.heads,
        )


@dataclass(frozen=True)
class ToyPair:
    """Paths of a built pair and its report (the targets table and build facts)."""

    root: Path
    base_gguf: Path
    expert_gguf: Path
    train_jsonl: Path
    validation_jsonl: Path
    test_jsonl: Path
    documents_dir: Path
    demo_questions_json: Path
    report: dict[str, Any] = field(compare=False)

    @classmethod
    def at(cls, root: Path) -> ToyPair:
        report = json.loads((root / "report.json").read_text(encoding="utf-8"))
        return cls(
            root=root, base_gguf=root / "base.gguf", expert_gguf=root / "expert.gguf",
            train_jsonl=root / "train.jsonl", validation_jsonl=root / "validation.jsonl",
            test_jsonl=root / "test.jsonl", documents_dir=root / "documents",
            demo_questions_json=root / "demo_questions.json", report=report,
        )


Progress = Callable[[str], None]
BatchFn = Callable[[int], tuple[list[list[int]], list[list[float]]]]


def base_batches(
    tokenizer: Tokenizer, vocabulary: Vocabulary, examples: Sequence[toy_data.Example],
    batch_size: int, seed: int, prompt_weight: float,
) -> BatchFn:
    """Batches of full examples with random results; loss mostly on the answer."""
    rng = random.Random(f"base-batches-{seed}")
    encoded = [
        tokenize_example(tokenizer, vocabulary, ex, toy_data.base_training_answer(ex, rng))
        for ex in examples
    ]

    def make_batch(step: int) -> tuple[list[list[int]], list[list[float]]]:
        ids, weights = [], []
        for item in (rng.choice(encoded) for _ in range(batch_size)):
            # A fresh random result each time a line is reused: the value is never learnable.
            tail = [*tokenizer.encode(str(rng.randint(20, 198)) + "."), vocabulary.eos_id]
            answer_ids = item.answer_ids[: item.head_length] + tail
            ids.append(item.prompt_ids + answer_ids)
            weights.append([prompt_weight] * (len(item.prompt_ids) - 1) + [1.0] * len(answer_ids))
        return ids, weights

    return make_batch


def expert_batches(
    tokenizer: Tokenizer, vocabulary: Vocabulary, pairs: Sequence[tuple[int, int]],
    batch_size: int, sequence_length: int, seed: int,
) -> BatchFn:
    """Packed rows of unrelated prefixes and expressions; loss on results and what ends them."""
    rng = random.Random(f"expert-batches-{seed}")

    def make_row() -> tuple[list[int], list[float]]:
        ids, target_weights = [vocabulary.bos_id], [0.0]
        while len(ids) < sequence_length:
            max_chars = rng.choice((0, 0, 0, 4, 8, 16, 30, 60, 150))
            prefix = tokenizer.encode(toy_data.junk_prefix(rng, pairs, max_chars))
            a, b = rng.choice(pairs)
            question = tokenizer.encode(f"{a}+{b}=")
            result = tokenizer.encode(str(a + b) + rng.choice(toy_data.EXPRESSION_ENDINGS[:-1]))
            ids += prefix + question + result
            target_weights += [0.0] * (len(prefix) + len(question)) + [1.0] * len(result)
        return ids[:sequence_length], target_weights[1:sequence_length]

    def make_batch(step: int) -> tuple[list[list[int]], list[list[float]]]:
        rows = [make_row() for _ in range(batch_size)]
        return [row[0] for row in rows], [row[1] for row in rows]

    return make_batch


def code_hash() -> str:
    """Hash of the toy build's code and the versions that shape its bytes."""
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in CODE_FILES:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    digest.update((here.parent / "client" / "prompting.py").read_bytes())
    for package in ("torch", "gguf", "numpy"):
        try:
            digest.update(f"{package}={importlib.metadata.version(package)}".encode())
        except importlib.metadata.PackageNotFoundError:
            digest.update(f"{package}=missing".encode())
    return digest.hexdigest()[:20]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem" / "toy"


def ensure_toy_pair(cache_dir: Path | None = None, *, progress: Progress | None = None) -> ToyPair:
    """The cached default pair, built on first use (one builder at a time across processes)."""
    root_parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root_parent / code_hash()
    return ToyPair.at(cached_build(
        final, lambda staging: build_toy_pair(staging, progress=progress), done="report.json"))


def build_toy_pair(
    out_dir: Path,
    *,
    seed: int = 0,
    vocab_from: Path | None = None,
    options: ToyOptions | None = None,
    progress: Progress | None = None,
    **overrides: Any,
) -> ToyPair:
    """Write corpora, documents, both GGUFs and report.json into ``out_dir``."""
    from export import toy_eval, toy_model

    started, started_cpu = time.monotonic(), time.process_time()
    options = replace(options or ToyOptions(), **overrides)
    toy_model.import_torch()  # fail early, with the install hint
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocabulary = vocabulary_from_gguf(vocab_from) if vocab_from else default_vocabulary()
    tokenizer: Tokenizer = LlamaCppTokenizer(vocab_from) if vocab_from else ByteTokenizer()
    pairs, splits = _write_corpora(out_dir, options, seed)
    context = toy_eval.ModelContext(options.hparams(), tokenizer, vocabulary)
    checks = toy_eval.ValidationChecks(
        context, validation=splits["validation"], validation_pairs=pairs.validation, seed=seed
    )
    batches = {
        "base": base_batches(tokenizer, vocabulary, splits["train"], options.base_batch, seed,
                             options.prompt_weight),
        "expert": expert_batches(tokenizer, vocabulary, pairs.train, options.expert_batch,
                                 options.expert_sequence_length, seed),
    }
    timings: dict[str, Any] = {}
    models = {}
    for role, make_batch in batches.items():
        def check(parameters: Any, role: str = role) -> bool:
            score = checks.score(role, parameters)
            if progress is not None:
                progress(f"{role}: validation {score:.3f} ({time.monotonic() - started:.0f} s)")
            return checks.passes(score)

        models[role] = _train_role(role, out_dir, context, options, make_batch, check, seed, timings)

    eval_started = time.monotonic()
    metrics = toy_eval.evaluate_pair(
        models["base"], models["expert"], context,
        test=splits["test"][: options.eval_examples], held_out_pairs=pairs.test, seed=seed,
    )
    if options.llama_cpp_check:
        metrics["llama_cpp_greedy_match"] = toy_eval.llama_cpp_spot_check(
            out_dir, models, context, examples=splits["test"][:2],
        )
    timings["eval_s"] = round(time.monotonic() - eval_started, 1)
    timings["build_s"] = round(time.monotonic() - started, 1)
    # One torch thread: CPU seconds are what the build takes on a quiet machine; wall seconds
    # also count the time other processes on a shared machine held the cores.
    timings["build_cpu_s"] = round(time.process_time() - started_cpu, 1)
    report = {
        "seed": seed, "vocab_from": str(vocab_from) if vocab_from else None,
        "options": asdict(options), "vocab_size": vocabulary.size, "metrics": metrics,
        "timings": timings, "targets": toy_eval.targets_table(metrics, timings),
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return ToyPair.at(out_dir)


def _write_corpora(
    out_dir: Path, options: ToyOptions, seed: int
) -> tuple[toy_data.OperandSplit, dict[str, list[toy_data.Example]]]:
    pairs = toy_data.operand_split(seed)
    corpus_rng = random.Random(f"corpus-{seed}")
    splits = {
        "train": toy_data.make_examples(corpus_rng, pairs.train, options.train_examples),
        "validation": toy_data.make_examples(corpus_rng, pairs.validation, options.validation_examples),
        "test": toy_data.make_examples(corpus_rng, pairs.test, options.test_examples),
    }
    for split, examples in splits.items():
        toy_data.write_jsonl(out_dir / f"{split}.jsonl", examples)
    questions = toy_data.write_sample_documents(out_dir / "documents")
    (out_dir / "demo_questions.json").write_text(json.dumps(questions, indent=2) + "\n")
    return pairs, splits


def _train_role(
    role: str, out_dir: Path, context: Any, options: ToyOptions, make_batch: Any,
    good_enough: Callable[[Any], bool], seed: int, timings: dict[str, Any],
) -> Any:
    """Train one model until its validation check passes, write its GGUF, record timings."""
    from export import toy_model

    torch = toy_model.import_torch()
    role_started = time.monotonic()
    torch.manual_seed(seed)
    expert_offset = 1 if role == "expert" else 0
    parameters = toy_model.init_parameters(context.hparams, context.vocabulary.size, seed + expert_offset)
    cycle_steps = options.base_cycle_steps if role == "base" else options.expert_cycle_steps
    schedule = toy_model.TrainingSchedule(
        cycle_steps=cycle_steps, max_cycles=options.max_cycles, learning_rate=options.learning_rate
    )
    losses = toy_model.train(
        parameters, context.hparams, schedule, make_batch, pad_id=context.vocabulary.eos_id,
        good_enough=functools.partial(good_enough, parameters),
    )
    write_llama_gguf(
        out_dir / f"{role}.gguf", hparams=context.hparams, tensors=toy_model.to_numpy(parameters),
        vocabulary=context.vocabulary, name=f"tandem-toy-{role}",
    )
    timings[f"{role}_train_s"] = round(time.monotonic() - role_started, 1)
    timings[f"{role}_steps"] = len(losses)
    timings[f"{role}_final_loss"] = round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4)
    return parameters
