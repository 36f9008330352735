"""LlamaModel on the real toy GGUF (and the real SmolLM2 GGUF for the chat template)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from tandem_core.base_model import LlamaModel, smollm2_path
from tandem_core.errors import ContextOverflowError, ModelError, ModelLoadError


@pytest.fixture(scope="module")
def toy_base(toy_pair: Any) -> Iterator[LlamaModel]:
    model = LlamaModel(toy_pair.base_gguf, n_ctx=128, n_batch=64)
    yield model
    model.close()


@pytest.fixture
def base(toy_base: LlamaModel) -> LlamaModel:
    toy_base.reset()
    return toy_base


def prompt_of(model: LlamaModel) -> list[int]:
    return model.tokenize("Question: what is 12+30?\nAnswer:", add_bos=True)


def test_sizes_and_special_tokens_come_from_the_gguf(base: LlamaModel, toy_pair: Any) -> None:
    reader = gguf.GGUFReader(toy_pair.base_gguf)
    embeddings = reader.get_tensor(next(i for i, tensor in enumerate(reader.tensors)
                                        if tensor.name == "token_embd.weight"))
    assert (base.vocab_size, base.hidden_size) == (embeddings.shape[1], embeddings.shape[0])
    assert base.n_ctx >= 128  # llama.cpp rounds the window up to its padding
    assert base.tokenize("", add_bos=True) == [base.bos_id]
    assert base.is_end_of_generation(base.eos_id) and not base.is_end_of_generation(65)
    assert base.chat_template is None


def test_tokenize_and_detokenize_round_trip(base: LlamaModel) -> None:
    text = "Document: Zoë paid 12€ for 3 apples.\nQuestion: why?"
    tokens = base.tokenize(text)
    assert base.detokenize(tokens) == text.encode("utf-8")
    assert base.tokenize(text, add_bos=True) == [base.bos_id, *tokens]
    assert base.detokenize([base.bos_id, *tokens]) == text.encode("utf-8")
    assert base.detokenize([base.bos_id], special=True) == b"<s>"


def test_base_and_expert_share_the_vocabulary_fingerprint(base: LlamaModel,
                                                          toy_pair: Any) -> None:
    assert len(base.fingerprint) == 64 and int(base.fingerprint, 16) >= 0
    with LlamaModel(toy_pair.expert_gguf, n_ctx=64) as expert:
        assert expert.fingerprint == base.fingerprint


def test_logits_are_the_output_matrix_times_the_hidden_state(base: LlamaModel,
                                                             toy_pair: Any) -> None:
    reader = gguf.GGUFReader(toy_pair.base_gguf)
    output_tensor = next(tensor for tensor in reader.tensors if tensor.name == "output.weight")
    assert output_tensor.tensor_type == gguf.GGMLQuantizationType.F32
    output_matrix = np.asarray(output_tensor.data, dtype=np.float32).reshape(
        base.vocab_size, base.hidden_size)
    result = base.decode(prompt_of(base))
    assert result.logits.shape == (len(prompt_of(base)), base.vocab_size)
    assert result.hidden.shape == (len(prompt_of(base)), base.hidden_size)
    np.testing.assert_allclose(result.hidden @ output_matrix.T, result.logits, atol=2e-3, rtol=1e-4)


def test_a_batched_span_equals_token_by_token_decoding(base: LlamaModel) -> None:
    prompt = prompt_of(base)
    batched = base.decode(prompt)
    base.reset()
    single_logits = [base.decode([token]).logits[0] for token in prompt]
    # llama.cpp's kernels round differently per batch size: equal up to ~1e-3, not bitwise.
    np.testing.assert_allclose(np.stack(single_logits), batched.logits, atol=3e-3)
    assert base.position() == len(prompt)


def test_rollback_gives_the_logits_of_a_fresh_context(base: LlamaModel, toy_pair: Any) -> None:
    prompt = prompt_of(base)
    span = base.tokenize(" 42 and more")
    base.decode(prompt)
    base.decode(span)
    base.rollback(len(prompt) + 2)
    assert base.position() == len(prompt) + 2
    assert base.cached_tokens() == prompt + span[:2]
    after_rollback = base.decode(base.tokenize("7")).logits[-1]
    with LlamaModel(toy_pair.base_gguf, n_ctx=128) as fresh:
        expected = fresh.decode(prompt + span[:2] + base.tokenize("7")).logits[-1]
    np.testing.assert_allclose(after_rollback, expected, atol=1e-4)


def test_last_only_returns_the_final_row(base: LlamaModel) -> None:
    prompt = prompt_of(base)
    full = base.decode(prompt)
    base.reset()
    last = base.decode(prompt, last_only=True)
    assert last.logits.shape == (1, base.vocab_size)
    np.testing.assert_allclose(last.logits[0], full.logits[-1], atol=1e-4)
    np.testing.assert_allclose(last.hidden[0], full.hidden[-1], atol=1e-4)


def test_prompts_longer_than_a_batch_are_split(toy_pair: Any) -> None:
    with LlamaModel(toy_pair.base_gguf, n_ctx=128, n_batch=8) as small_batches:
        prompt = prompt_of(small_batches)
        assert len(prompt) > 8
        split = small_batches.decode(prompt)
    with LlamaModel(toy_pair.base_gguf, n_ctx=128, n_batch=64) as one_batch:
        whole = one_batch.decode(prompt)
    np.testing.assert_allclose(split.logits, whole.logits, atol=1e-4)


def test_context_overflow_is_a_clear_error_and_keeps_the_state(base: LlamaModel) -> None:
    window = base.n_ctx
    base.decode([65] * (window - 28))
    with pytest.raises(ContextOverflowError, match=f"does not fit the context window of {window}"):
        base.decode([65] * 29)
    assert base.position() == window - 28
    base.decode([65] * 28)
    assert base.position() == window


def test_sequences_are_independent(toy_pair: Any) -> None:
    with LlamaModel(toy_pair.base_gguf, n_ctx=256, n_seq_max=2) as model:
        prompt = prompt_of(model)
        first = model.decode(prompt, seq=0).logits[-1]
        model.decode(model.tokenize("something else entirely"), seq=1)
        assert model.position(1) > 0
        model.rollback(len(prompt) - 1, seq=0)
        again = model.decode(prompt[-1:], seq=0).logits[-1]
        np.testing.assert_allclose(again, first, atol=1e-4)
        with pytest.raises(ModelError, match="sequence id 2"):
            model.decode([65], seq=2)


def test_bad_calls_are_model_errors(base: LlamaModel) -> None:
    with pytest.raises(ModelError, match="outside the vocabulary"):
        base.decode([base.vocab_size])
    with pytest.raises(ModelError, match="at least one token"):
        base.decode([])
    with pytest.raises(ModelError, match="cannot roll back"):
        base.rollback(5)
    with pytest.raises(ModelError, match="outside the vocabulary"):
        base.token_bytes(-1)


def test_missing_and_invalid_files_are_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        LlamaModel(tmp_path / "absent.gguf")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="could not load"):
        LlamaModel(garbage)


def test_close_twice_and_use_after_close(toy_pair: Any) -> None:
    model = LlamaModel(toy_pair.base_gguf, n_ctx=64)
    model.close()
    model.close()
    with pytest.raises(ModelError, match="closed"):
        model.decode([65])
    with pytest.raises(ModelError, match="closed"):
        model.tokenize("a")


def test_smollm2_is_found_and_brings_its_chat_template() -> None:
    path = smollm2_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    with LlamaModel(path, n_ctx=64) as smollm2:
        assert smollm2.hidden_size == 576 and smollm2.vocab_size == 49152
        assert "<|im_start|>" in (smollm2.chat_template or "")
        im_start = smollm2.tokenize("<|im_start|>", special=True)
        assert len(im_start) == 1 and smollm2.tokenize("<|im_start|>") != im_start
        output = smollm2.decode(smollm2.tokenize("The capital of France is"), last_only=True)
        assert smollm2.detokenize([int(np.argmax(output.logits[0]))]) == b" Paris"


def test_loading_prints_no_llama_cpp_log_but_errors_still_reach_stderr(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    with LlamaModel(smollm2_path(), n_ctx=64):  # warns of pooling type and a short context
        pass
    assert capfd.readouterr().err == ""
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError):
        LlamaModel(garbage)
    assert "failed to load model" in capfd.readouterr().err


def test_pieces_reach_llama_cpp_in_sequence_order_and_rows_come_back_in_the_callers(
        toy_pair: Any) -> None:
    """With one KV stream per sequence llama.cpp computes a batch in one pass per run of
    consecutive sequence ids in batch order, so a batch in any other order took several passes
    (decode_pieces gives the numbers). The caller still numbers rows in its own order."""
    with LlamaModel(toy_pair.base_gguf, n_ctx=4 * 64, n_seq_max=4, n_ctx_seq=64,
                    flash_attention=True) as model:
        prompt = prompt_of(model)
        prompts = {seq: prompt[:6 + seq] for seq in range(4)}
        order = [3, 1, 0, 2]
        model.decode_pieces([(seq, prompts[seq]) for seq in order])
        total = sum(len(tokens) for tokens in prompts.values())
        handed = [model._batch.seq_id[index][0] for index in range(total)]
        assert handed == sorted(handed)
        last_rows, row = [], 0
        for seq in order:
            row += len(prompts[seq])
            last_rows.append(row - 1)
        together = model.read_rows(last_rows)
        assert all(model.cached_tokens(seq) == prompts[seq] for seq in order)
        for index, seq in enumerate(order):
            model.reset(seq)
            model.decode_pieces([(seq, prompts[seq])])
            alone = model.read_rows([len(prompts[seq]) - 1])
            np.testing.assert_allclose(together.logits[index], alone.logits[0], atol=1e-4)
            np.testing.assert_allclose(together.hidden[index], alone.hidden[0], atol=1e-4)


def test_rows_outside_the_last_decode_are_refused_not_read(toy_pair: Any) -> None:
    """read_rows reads llama.cpp's output buffers directly: a row past the last batch would
    read memory that is not its own."""
    with LlamaModel(toy_pair.base_gguf, n_ctx=2 * 64, n_seq_max=2, n_ctx_seq=64) as model:
        prompt = prompt_of(model)[:5]
        model.decode_pieces([(1, prompt[:3]), (0, prompt[:2])])
        assert model.read_rows([4, 0]).logits.shape == (2, model.vocab_size)
        for rows in ([5], [-1], [0, 9]):
            with pytest.raises(ModelError, match="not all among the 5 rows"):
                model.read_rows(rows)
        model.decode(prompt[3:5], seq=1)
        with pytest.raises(ModelError, match="not all among the 2 rows"):
            model.read_rows([2])
