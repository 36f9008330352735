"""The math expert: SmolLM2's vocabulary, deterministic assembly, llama.cpp == torch, training on CPU."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from export import gsm8k, math_data, math_expert, math_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from tandem_core.base_model import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="module")
def expert_gguf() -> Path:
    return math_expert.ensure_math_expert()


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path) -> math_data.HFTokenizer:
    return math_data.HFTokenizer.from_gguf(smollm2)


@pytest.fixture(scope="module")
def held_out_probes() -> list[gsm8k.Probe]:
    _, held_out = gsm8k.split(gsm8k.load_problems())
    probes = list(gsm8k.probes(held_out))
    random.Random(0).shuffle(probes)
    return probes


def test_expert_vocabulary_fingerprint_is_smollm2s(smollm2: Path, expert_gguf: Path) -> None:
    from tandem_core.base_model import LlamaModel

    with LlamaModel(smollm2, n_ctx=64) as base, LlamaModel(expert_gguf, n_ctx=64) as expert:
        assert expert.vocab_size == base.vocab_size == 49152
        assert expert.fingerprint == base.fingerprint


def test_assembly_is_byte_identical(tmp_path: Path, smollm2: Path, expert_gguf: Path) -> None:
    fresh = math_expert.build_gguf(tmp_path / "again.gguf", vocabulary_gguf=smollm2)

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert digest(fresh) == digest(expert_gguf)


def test_shipped_weights_fit_the_budget() -> None:
    weights = math_expert.WEIGHTS_DIR / math_expert.WEIGHTS_FILE
    assert weights.stat().st_size <= 16 * 1024 * 1024
    assert (math_expert.WEIGHTS_DIR / "card.json").is_file()


def test_unused_rows_can_never_win(smollm2: Path) -> None:
    """Every unused output row is the ``>>`` row minus MARGIN on the anchor, which is > 0 after the norm."""
    shape, arrays = math_expert.load_weights()
    tensors = math_expert.full_vocabulary_tensors(shape, arrays, 49152)
    output = tensors["output.weight"]
    used = set(arrays["map.output_ids"].tolist())
    unused = np.array([i for i in range(49152) if i not in used])
    reference = arrays["output.weight"][math_model.OUTPUT_TEXTS.index(">>")]
    difference = output[unused] - reference
    anchor = shape.width - 1
    assert np.all(difference[:, :anchor] == 0) and np.all(difference[:, anchor] == -math_model.MARGIN)
    embeddings = tensors["token_embd.weight"]
    assert np.all(embeddings[:, anchor] == math_model.ANCHOR) and tensors["output_norm.weight"][anchor] == 1
    for block in range(shape.blocks):
        assert np.all(tensors[f"blk.{block}.attn_output.weight"][anchor] == 0)
        assert np.all(tensors[f"blk.{block}.ffn_down.weight"][anchor] == 0)


def test_hf_tokenizer_matches_llama_cpp(
    smollm2: Path, tokenizer: math_data.HFTokenizer, held_out_probes: list[gsm8k.Probe]
) -> None:
    import llama_cpp

    vocabulary = llama_cpp.Llama(model_path=str(smollm2), vocab_only=True, verbose=False)
    texts = [probe.prompt for probe in held_out_probes[:100]] + ["<|im_start|>user\n-5 =-5 3.25<|im_end|>"]
    for text in texts:
        assert tokenizer.encode(text) == vocabulary.tokenize(text.encode(), add_bos=False, special=True)
    vocabulary.close()


def _torch_parameters(arrays: dict[str, np.ndarray]) -> tuple[dict, np.ndarray]:  # type: ignore[type-arg]
    torch = math_model.import_torch()
    table = np.zeros(49152, dtype=np.int64)
    table[arrays["map.input_ids"]] = np.arange(1, len(arrays["map.input_ids"]) + 1)
    parameters = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items() if not k.startswith("map.")}
    parameters["_output_to_input"] = torch.from_numpy(table[arrays["map.output_ids"]])
    return parameters, table


def greedy_llama(model: object, ids: list[int], stop: int, limit: int = 14) -> list[int]:
    generated: list[int] = []
    for token in model.generate(ids, temp=0.0, top_k=1, reset=True):  # type: ignore[attr-defined]
        generated.append(int(token))
        if token == stop or len(generated) >= limit:
            break
    return generated


def test_llama_cpp_reproduces_torch_and_computes(
    expert_gguf: Path, tokenizer: math_data.HFTokenizer, held_out_probes: list[gsm8k.Probe]
) -> None:
    """On 12 held-out probes llama.cpp's greedy output equals torch's, and >= 10 are right."""
    import llama_cpp

    shape, arrays = math_expert.load_weights()
    parameters, table = _torch_parameters(arrays)
    outputs = arrays["map.output_ids"]
    stop = int(outputs[math_model.OUTPUT_TEXTS.index(">>")])
    model = llama_cpp.Llama(model_path=str(expert_gguf), n_ctx=1024, n_threads=2, verbose=False)
    right = 0
    for probe in held_out_probes[:12]:
        ids = tokenizer.encode(probe.prompt)
        rows = math_model.greedy_results(parameters, shape, [table[ids].tolist()], stop_row=12)[0]
        from_torch = [int(outputs[row]) for row in rows]
        from_llama = greedy_llama(model, ids, stop)
        assert from_llama == from_torch
        text = model.detokenize(from_llama).decode().removesuffix(">>")
        right += gsm8k.result_is_right(text, probe.value)
    model.close()
    assert right >= 10


def test_tiny_training_end_to_end(tmp_path: Path, smollm2: Path, tokenizer: math_data.HFTokenizer) -> None:
    """The training command's code path on CPU at toy size: train, save, assemble, load in llama.cpp."""
    import llama_cpp

    from export.math_train import TrainOptions, save, train

    shape = math_model.ExpertShape(width=32, blocks=1, heads=2, ffn=64, input_rows=256, context_length=512)
    options = TrainOptions(
        steps=6, batch=2, row_length=128, warmup_steps=2, eval_every=3, eval_probes=8, final_probes=8
    )
    parameters, facts = train(shape, options, tokenizer, log=lambda _line: None)
    assert len(facts["history"]) == 2 and facts["targets_seen"] > 0
    save(tmp_path / "w", parameters, shape, options, facts, "test")
    gguf = math_expert.build_gguf(
        tmp_path / "tiny.gguf", vocabulary_gguf=smollm2, weights=tmp_path / "w" / "math_expert.safetensors"
    )
    _, arrays = math_expert.load_weights(tmp_path / "w" / "math_expert.safetensors")
    torch_parameters, table = _torch_parameters(arrays)
    outputs = arrays["map.output_ids"]
    model = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, n_threads=2, verbose=False)
    ids = tokenizer.encode("Question: Tom has 3 apples.\nAnswer: 3+4 = <<3+4=")
    rows = math_model.greedy_results(
        torch_parameters, shape, [table[ids].tolist()], stop_row=12, max_tokens=4
    )[0]
    from_llama = greedy_llama(model, ids, int(outputs[12]), limit=len(rows))
    model.close()
    assert from_llama == [int(outputs[r]) for r in rows]


def test_gateway_preset_serves_the_math_expert(smollm2: Path) -> None:
    """`model.preset = "math-expert"` assembles (or reuses) the expert and serves it in SmolLM2's
    vocabulary: a team's gateway needs no path to the cached GGUF."""
    import uuid

    import httpx

    from expert_gateway.app import create_app
    from expert_gateway.settings import AuthSettings, GatewaySettings, ModelSettings, ServerSettings
    from tandem_core.base_model import LlamaModel
    from tandem_core.server import ServerThread

    with LlamaModel(smollm2, n_ctx=64) as base:
        fingerprint = base.fingerprint
        prompt = list(base.tokenize("Tom has 48 apples and gives away half. <<48/2="))
        answer = base.detokenize
        settings = GatewaySettings(server=ServerSettings(host="127.0.0.1", port=0),
                                   auth=AuthSettings(enabled=False),
                                   model=ModelSettings(name="math-expert", preset="math-expert"))
        server = ServerThread(create_app(settings))
        url = server.start(timeout=120)
        try:
            models = httpx.get(f"{url}/v1/models", timeout=30).json()
            reply = httpx.post(f"{url}/v1/continue", timeout=60, json={
                "session": uuid.uuid4().hex, "model": "math-expert", "held": 0, "tokens": prompt,
                "max_tokens": 3, "tokenizer": fingerprint}).json()
        finally:
            server.stop()
        assert [(m["name"], m["tokenizer"]) for m in models] == [("math-expert", fingerprint)]
        assert answer(reply["tokens"]).decode() == "24>>"
