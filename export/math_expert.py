"""Assemble the math expert's full-vocabulary GGUF from the shipped compact weights, and cache it.

``ensure_math_expert()`` returns the path of ``math-expert.gguf``: a llama-architecture model
whose ``tokenizer.*`` keys are copied from SmolLM2's own GGUF (so its fingerprint is SmolLM2's),
built once per version of the weights and this code under
``$XDG_CACHE_HOME/tandem/math-expert/<hash>``. The build is pure numpy and needs no torch:

- ``token_embd``: each SmolLM2 id takes its compact row; ids the expert never learned take row 0,
  the row shared by all rare tokens, so any prefix is valid input.
- ``output``: the 13 learned rows at their SmolLM2 ids; every other row is the ``>>`` row minus
  ``MARGIN`` times the anchor unit vector (export.math_model explains why it always loses).

The bytes depend only on the weights, the vocabulary and this code: building twice gives the same
file (a test checks it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from export.cached_build import cached_build
from export.gguf_writer import LlamaHyperparameters, Vocabulary, vocabulary_from_gguf, write_llama_gguf
from export.math_model import MARGIN, OUTPUT_TEXTS, ExpertShape
from tandem_core.errors import TandemError

WEIGHTS_DIR = Path(__file__).parent / "math_expert_weights"
WEIGHTS_FILE = "math_expert.safetensors"
GGUF_NAME = "math-expert.gguf"
EXPERT_NAME = "math-expert"
CODE_FILES = ("math_expert.py", "math_model.py", "gguf_writer.py")


class MathExpertError(TandemError):
    """The shipped math expert weights are missing, malformed or do not fit the vocabulary."""


def load_weights(weights: Path | None = None) -> tuple[ExpertShape, dict[str, np.ndarray]]:
    """Shape and float32 arrays from the shipped safetensors (maps stay int)."""
    from safetensors import safe_open

    path = Path(weights) if weights is not None else WEIGHTS_DIR / WEIGHTS_FILE
    if not path.is_file():
        raise MathExpertError(f"math expert weights not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (OSError, ValueError) as exc:
        raise MathExpertError(f"cannot read {path}: {exc}") from exc
    if "shape" not in metadata:
        raise MathExpertError(f"{path} has no 'shape' metadata: not a math expert file")
    shape = ExpertShape(**json.loads(metadata["shape"]))
    return shape, {
        name: (a if name.startswith("map.") else a.astype(np.float32)) for name, a in arrays.items()
    }


def full_vocabulary_tensors(
    shape: ExpertShape, arrays: dict[str, Any], vocab_size: int
) -> dict[str, np.ndarray]:
    """GGUF tensors over the whole vocabulary from the compact ones."""
    input_ids = np.asarray(arrays["map.input_ids"], dtype=np.int64)
    output_ids = np.asarray(arrays["map.output_ids"], dtype=np.int64)
    if input_ids.max(initial=0) >= vocab_size or output_ids.max(initial=0) >= vocab_size:
        raise MathExpertError(f"the weights name token ids beyond the vocabulary of {vocab_size}")
    if len(output_ids) != len(OUTPUT_TEXTS):
        raise MathExpertError(f"expected {len(OUTPUT_TEXTS)} output rows, got {len(output_ids)}")
    rows = np.zeros(vocab_size, dtype=np.int64)
    rows[input_ids] = np.arange(1, len(input_ids) + 1)
    tensors = {
        name: np.ascontiguousarray(a, dtype=np.float32)
        for name, a in arrays.items()
        if not name.startswith("map.")
    }
    tensors["token_embd.weight"] = tensors["token_embd.weight"][rows]
    compact_out = tensors["output.weight"]
    reference = compact_out[OUTPUT_TEXTS.index(">>")].copy()
    reference[shape.width - 1] -= MARGIN
    output = np.repeat(reference[None, :], vocab_size, axis=0)
    output[output_ids] = compact_out
    tensors["output.weight"] = output
    return tensors


def hyperparameters(shape: ExpertShape) -> LlamaHyperparameters:
    return LlamaHyperparameters(
        context_length=shape.context_length,
        embedding_length=shape.width,
        block_count=shape.blocks,
        feed_forward_length=shape.ffn,
        head_count=shape.heads,
        head_count_kv=shape.heads,
        rope_freq_base=shape.rope_freq_base,
        rms_norm_eps=shape.rms_norm_eps,
    )


def build_gguf(out: Path, *, vocabulary_gguf: Path, weights: Path | None = None) -> Path:
    """Write the full-vocabulary GGUF at ``out``; same inputs, same bytes."""
    shape, arrays = load_weights(weights)
    vocabulary: Vocabulary = vocabulary_from_gguf(vocabulary_gguf)
    tensors = full_vocabulary_tensors(shape, arrays, vocabulary.size)
    write_llama_gguf(
        out, hparams=hyperparameters(shape), tensors=tensors, vocabulary=vocabulary, name="tandem-math-expert"
    )
    return out


def code_hash(weights: Path, vocabulary_gguf: Path) -> str:
    digest = hashlib.sha256()
    here = Path(__file__).parent
    for name in CODE_FILES:
        digest.update(name.encode() + b"\0" + (here / name).read_bytes())
    digest.update(hashlib.sha256(weights.read_bytes()).digest())
    digest.update(str(vocabulary_gguf.stat().st_size).encode() + vocabulary_gguf.name.encode())
    return digest.hexdigest()[:20]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tandem" / "math-expert"


def ensure_math_expert(
    cache_dir: Path | None = None, *, weights: Path | None = None, vocabulary_gguf: Path | None = None
) -> Path:
    """The cached expert GGUF, assembled on first use (one builder at a time across processes)."""
    if vocabulary_gguf is None:
        from tandem_core.base_model import smollm2_path

        vocabulary_gguf = smollm2_path()
    weights = Path(weights) if weights is not None else WEIGHTS_DIR / WEIGHTS_FILE
    if not weights.is_file():
        raise MathExpertError(f"math expert weights not found: {weights}")
    parent = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    source = weights

    def build(staging: Path) -> None:
        build_gguf(staging / GGUF_NAME, vocabulary_gguf=vocabulary_gguf, weights=source)
        if (source.parent / "card.json").is_file():
            shutil.copy(source.parent / "card.json", staging / "card.json")

    return cached_build(parent / code_hash(weights, vocabulary_gguf), build, done=GGUF_NAME) / GGUF_NAME
