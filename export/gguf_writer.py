"""Write a llama-architecture GGUF from numpy arrays, with a byte-level BPE vocabulary.

Tensor names are GGUF's own (``token_embd.weight``, ``blk.N.attn_q.weight``, ...), linear
weights are ``[out_features, in_features]`` like torch's, and Q/K are NOT permuted: the toy
reference model already uses llama.cpp's interleaved-pair RoPE (rope type NORM).

The default vocabulary is 256 byte tokens (GPT-2 byte-to-unicode strings, id == byte value),
``<s>``, ``</s>`` and one merged token. llama.cpp refuses a ``gpt2`` vocabulary without merges,
so there is one merge of two control bytes that never occur in text (0x01 0x02).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from tandem_core.errors import TandemError

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
BYTE_TOKEN_COUNT = 256
BOS_TEXT, EOS_TEXT = "<s>", "</s>"
MERGED_BYTES = (0x01, 0x02)


class GGUFWriteError(TandemError):
    """A GGUF could not be read for its vocabulary or written."""


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {byte: chr(byte) for byte in printable}
    unprintable_count = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + unprintable_count)
            unprintable_count += 1
    return mapping


@dataclass(frozen=True)
class Vocabulary:
    """Tokenizer metadata as GGUF stores it: ``tokenizer.*`` keys with their value types."""

    fields: dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]
    bos_id: int
    eos_id: int
    size: int


def default_vocabulary() -> Vocabulary:
    """The built-in byte-level vocabulary: id == byte value for bytes, then specials."""
    mapping = bytes_to_unicode()
    tokens = [mapping[byte] for byte in range(BYTE_TOKEN_COUNT)]
    merged = mapping[MERGED_BYTES[0]] + mapping[MERGED_BYTES[1]]
    tokens += [BOS_TEXT, EOS_TEXT, merged]
    types = [TOKEN_TYPE_NORMAL] * BYTE_TOKEN_COUNT + [TOKEN_TYPE_CONTROL] * 2 + [TOKEN_TYPE_NORMAL]
    string, array, uint32, int32, boolean = (
        gguf.GGUFValueType.STRING, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32,
        gguf.GGUFValueType.INT32, gguf.GGUFValueType.BOOL,
    )
    bos_id, eos_id = BYTE_TOKEN_COUNT, BYTE_TOKEN_COUNT + 1
    fields: dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]] = {
        "tokenizer.ggml.model": ("gpt2", string, None),
        "tokenizer.ggml.pre": ("default", string, None),
        "tokenizer.ggml.tokens": (tokens, array, string),
        "tokenizer.ggml.token_type": (types, array, int32),
        "tokenizer.ggml.merges": ([f"{mapping[MERGED_BYTES[0]]} {mapping[MERGED_BYTES[1]]}"], array, string),
        "tokenizer.ggml.bos_token_id": (bos_id, uint32, None),
        "tokenizer.ggml.eos_token_id": (eos_id, uint32, None),
        "tokenizer.ggml.padding_token_id": (eos_id, uint32, None),
        "tokenizer.ggml.add_bos_token": (True, boolean, None),
        "tokenizer.ggml.add_eos_token": (False, boolean, None),
        "tokenizer.ggml.add_space_prefix": (False, boolean, None),
    }
    return Vocabulary(fields, bos_id, eos_id, len(tokens))


def vocabulary_from_gguf(path: Path) -> Vocabulary:
    """Every ``tokenizer.*`` key of an existing GGUF (tokens, merges, types, pre, specials, template)."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise GGUFWriteError(f"cannot read the vocabulary of {path}: {exc}") from exc
    fields: dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]] = {}
    for key, reader_field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value_type = reader_field.types[0]
        sub_type = reader_field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        fields[key] = (reader_field.contents(), value_type, sub_type)
    if "tokenizer.ggml.tokens" not in fields:
        raise GGUFWriteError(f"{path} has no tokenizer.ggml.tokens: not a model with a vocabulary")
    tokens = fields["tokenizer.ggml.tokens"][0]
    eos_id = int(fields.get("tokenizer.ggml.eos_token_id", (len(tokens) - 1,))[0])
    bos_id = int(fields.get("tokenizer.ggml.bos_token_id", (eos_id,))[0])
    return Vocabulary(fields, bos_id, eos_id, len(tokens))


@dataclass(frozen=True)
class LlamaHyperparameters:
    context_length: int
    embedding_length: int
    block_count: int
    feed_forward_length: int
    head_count: int
    head_count_kv: int
    rope_freq_base: float = 10000.0
    rms_norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.embedding_length // self.head_count


def tensor_shapes(hparams: LlamaHyperparameters, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """The GGUF tensor names of a llama model with their numpy (torch) shapes."""
    width, ffn = hparams.embedding_length, hparams.feed_forward_length
    kv_width = hparams.head_dim * hparams.head_count_kv
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab_size, width)}
    for block in range(hparams.block_count):
        prefix = f"blk.{block}."
        shapes |= {
            prefix + "attn_norm.weight": (width,),
            prefix + "attn_q.weight": (width, width),
            prefix + "attn_k.weight": (kv_width, width),
            prefix + "attn_v.weight": (kv_width, width),
            prefix + "attn_output.weight": (width, width),
            prefix + "ffn_norm.weight": (width,),
            prefix + "ffn_gate.weight": (ffn, width),
            prefix + "ffn_up.weight": (ffn, width),
            prefix + "ffn_down.weight": (width, ffn),
        }
    shapes |= {"output_norm.weight": (width,), "output.weight": (vocab_size, width)}
    return shapes


def write_llama_gguf(
    path: Path,
    *,
    hparams: LlamaHyperparameters,
    tensors: Mapping[str, np.ndarray],
    vocabulary: Vocabulary,
    name: str,
) -> None:
    """Write F32 tensors and metadata; the bytes depend only on the arguments."""
    expected = tensor_shapes(hparams, vocabulary.size)
    for tensor_name, shape in expected.items():
        if tensor_name not in tensors or tuple(tensors[tensor_name].shape) != shape:
            got = tensors[tensor_name].shape if tensor_name in tensors else "missing"
            raise GGUFWriteError(f"tensor {tensor_name}: expected shape {shape}, got {got}")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(hparams.context_length)
    writer.add_embedding_length(hparams.embedding_length)
    writer.add_block_count(hparams.block_count)
    writer.add_feed_forward_length(hparams.feed_forward_length)
    writer.add_head_count(hparams.head_count)
    writer.add_head_count_kv(hparams.head_count_kv)
    writer.add_rope_dimension_count(hparams.head_dim)
    writer.add_rope_freq_base(hparams.rope_freq_base)
    writer.add_layer_norm_rms_eps(hparams.rms_norm_eps)
    writer.add_vocab_size(vocabulary.size)
    for key, (value, value_type, sub_type) in vocabulary.fields.items():
        writer.add_key_value(key, value, value_type, sub_type=sub_type)
    for tensor_name in expected:
        writer.add_tensor(tensor_name, np.ascontiguousarray(tensors[tensor_name], dtype=np.float32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except OSError as exc:
        raise GGUFWriteError(f"cannot write {path}: {exc}") from exc
    finally:
        writer.close()


def read_llama_gguf(path: Path) -> tuple[LlamaHyperparameters, dict[str, np.ndarray]]:
    """Hyperparameters and F32 tensors of a GGUF this module wrote (for checks and tests)."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise GGUFWriteError(f"cannot read {path}: {exc}") from exc

    def value(key: str) -> Any:
        if key not in reader.fields:
            raise GGUFWriteError(f"{path} has no {key}")
        return reader.fields[key].contents()

    hparams = LlamaHyperparameters(
        context_length=int(value("llama.context_length")),
        embedding_length=int(value("llama.embedding_length")),
        block_count=int(value("llama.block_count")),
        feed_forward_length=int(value("llama.feed_forward_length")),
        head_count=int(value("llama.attention.head_count")),
        head_count_kv=int(value("llama.attention.head_count_kv")),
        rope_freq_base=float(value("llama.rope.freq_base")),
        rms_norm_eps=float(value("llama.attention.layer_norm_rms_epsilon")),
    )
    tensors = {}
    for tensor in reader.tensors:
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32:
            raise GGUFWriteError(f"{path}: tensor {tensor.name} is not F32")
        shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))
        tensors[tensor.name] = np.array(tensor.data, dtype=np.float32).reshape(shape)
    return hparams, tensors
