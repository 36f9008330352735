"""The toy pair: GGUFs that llama.cpp runs exactly like the torch reference, built deterministically."""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from export import toy, toy_data
from export.gguf_writer import default_vocabulary, read_llama_gguf
from export.toy import ToyPair, build_toy_pair

llama_cpp = pytest.importorskip("llama_cpp")

# Small enough to build in seconds: these builds check plumbing and bytes, not quality.
TINY = {
    "width": 32, "blocks": 1, "heads": 2, "ffn": 64, "base_cycle_steps": 3,
    "expert_cycle_steps": 3, "max_cycles": 1, "base_batch": 4, "expert_batch": 2,
    "expert_sequence_length": 64, "train_examples": 40, "validation_examples": 10,
    "test_examples": 10, "eval_examples": 6, "llama_cpp_check": False,
}


def load(path: Path, **kwargs: Any) -> Any:
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, n_threads=1, verbose=False, **kwargs)


def file_hashes(root: Path) -> dict[str, str]:
    skip = {"report.json"}  # holds timings
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if path.is_file() and path.name not in skip
    }


def test_both_ggufs_load_with_the_shared_vocabulary(toy_pair: ToyPair) -> None:
    vocabulary = default_vocabulary()
    for path in (toy_pair.base_gguf, toy_pair.expert_gguf):
        model = load(path)
        try:
            assert model.n_vocab() == vocabulary.size
            assert model.token_bos() == vocabulary.bos_id
            assert model.token_eos() == vocabulary.eos_id
        finally:
            model.close()


@pytest.mark.parametrize("text", [
    "Document: Invoice 4417 from Harbor Supply: 37 crates.\nQuestion: total?\nAnswer: 37+48=85.",
    "naïve café – 日本 €\t[private]",
    "\x01\x02 joins into the one merged token",
])
def test_tokenizer_round_trips_bytes(toy_pair: ToyPair, text: str) -> None:
    model = load(toy_pair.base_gguf, vocab_only=True)
    try:
        tokens = model.tokenize(text.encode(), add_bos=False, special=False)
        assert model.detokenize(tokens).decode() == text
        if "\x01\x02" in text:
            assert tokens[0] == default_vocabulary().size - 1
        else:
            assert tokens == list(text.encode())  # byte-level: id == byte value
        assert model.tokenize(b"x", add_bos=True, special=False) == [default_vocabulary().bos_id, 120]
    finally:
        model.close()


def llama_cpp_greedy(path: Path, prompt: list[int], count: int) -> list[int]:
    from export.toy_eval import llama_cpp_greedy as greedy

    return greedy(path, prompt, max_tokens=count, stop_id=default_vocabulary().eos_id)


@pytest.mark.parametrize("role", ["base", "expert"])
def test_llama_cpp_greedy_equals_the_torch_reference(toy_pair: ToyPair, role: str) -> None:
    from export.toy_model import from_numpy, greedy_generate

    path = toy_pair.base_gguf if role == "base" else toy_pair.expert_gguf
    hparams, tensors = read_llama_gguf(path)
    parameters = from_numpy(tensors)
    vocabulary = default_vocabulary()
    examples = toy_data.read_jsonl(toy_pair.test_jsonl)[:3]
    prompts = [[vocabulary.bos_id, *ex.prompt.encode()] for ex in examples]
    prompts.append([vocabulary.bos_id, *b"note 12 [private]: 37+48="])
    for prompt in prompts:
        expected = greedy_generate(parameters, hparams, prompt, max_tokens=32, stop_id=vocabulary.eos_id)
        assert llama_cpp_greedy(path, prompt, 32) == expected


def test_the_pair_answers_like_co_llm_needs(toy_pair: ToyPair) -> None:
    """Base writes the sentence; the expert computes after the base's prefix."""
    example = toy_data.read_jsonl(toy_pair.test_jsonl)[0]
    bos = default_vocabulary().bos_id
    prompt = [bos, *example.prompt.encode()]
    base_text = bytes(t for t in llama_cpp_greedy(toy_pair.base_gguf, prompt, 40) if t < 256).decode()
    head = example.answer[: example.answer.rindex("=") + 1]
    assert base_text.startswith(head)
    expert_prompt = prompt + list(head.encode())
    expert_digits = llama_cpp_greedy(toy_pair.expert_gguf, expert_prompt, len(str(example.result)))
    assert bytes(expert_digits).decode() == str(example.result)


def test_report_meets_every_target(toy_pair: ToyPair) -> None:
    report = json.loads((toy_pair.root / "report.json").read_text())
    # Build time is a measurement of the machine that built the cache, not a unit-test fact;
    # `tandem toy build` prints it with the other targets.
    failed = [
        row for row in report["targets"] if row["met"] is False and not row["name"].startswith("build")
    ]
    assert not failed, failed
    assert report["metrics"]["llama_cpp_greedy_match"] is True
    assert {row["name"] for row in report["targets"]} >= {
        "build_cpu_s", "expert_expression_exact", "expert_expression_prefixed_exact",
        "base_full_exact", "expert_full_exact",
    }


def test_corpora_and_documents(toy_pair: ToyPair) -> None:
    from client.prompting import plain_prompt

    for path in (toy_pair.train_jsonl, toy_pair.validation_jsonl, toy_pair.test_jsonl):
        examples = toy_data.read_jsonl(path)
        assert examples
        for ex in examples[:20]:
            assert ex.prompt == "".join(s.text for s in plain_prompt([ex.passage], ex.question))
            assert ex.answer.endswith(f"={ex.result}.")
            assert sum(int(term) for term in ex.expression.split("+")) == ex.result
    test_pairs = {ex.expression for ex in toy_data.read_jsonl(toy_pair.test_jsonl)}
    assert not test_pairs & {ex.expression for ex in toy_data.read_jsonl(toy_pair.train_jsonl)}
    assert len(list(toy_pair.documents_dir.iterdir())) == len(toy_data.SAMPLE_DOCUMENTS)
    questions = json.loads(toy_pair.demo_questions_json.read_text())
    assert {q["document"] for q in questions} == {p.name for p in toy_pair.documents_dir.iterdir()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    first = build_toy_pair(tmp_path / "a", seed=3, **TINY)
    second = build_toy_pair(tmp_path / "b", seed=3, **TINY)
    other = build_toy_pair(tmp_path / "c", seed=4, **TINY)
    assert file_hashes(first.root) == file_hashes(second.root)
    assert file_hashes(first.root)["base.gguf"] != file_hashes(other.root)["base.gguf"]


def test_vocab_from_smollm2_keeps_its_vocabulary(tmp_path: Path) -> None:
    base_model = pytest.importorskip("tandem_core.base_model")
    smollm2 = base_model.smollm2_path()
    pair = build_toy_pair(tmp_path / "smol", vocab_from=smollm2, **TINY)
    with base_model.LlamaModel(smollm2, n_ctx=256) as source, \
            base_model.LlamaModel(pair.expert_gguf, n_ctx=256) as toy:
        assert toy.fingerprint == source.fingerprint
        assert toy.vocab_size == source.vocab_size
        assert toy.chat_template == source.chat_template
        assert toy.tokenize("37+48=85") == source.tokenize("37+48=85")
        output = toy.decode(toy.tokenize("Answer: 37+48="))
        assert output.logits.shape == (len(toy.tokenize("Answer: 37+48=")), source.vocab_size)


def test_importing_client_or_toy_does_not_import_torch() -> None:
    code = "import sys, client, client.prompting, export.toy, export.toy_data; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_cli_refuses_a_missing_vocabulary_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli import main

    assert main(["toy", "build", "--vocab-from", str(tmp_path / "nope.gguf")]) == 1
    assert "no such file" in capsys.readouterr().err


def test_cli_refuses_a_non_empty_output_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["toy", "build", "--out", str(tmp_path / "out")]) == 1
    assert "not empty" in capsys.readouterr().err


def test_a_build_removes_folders_of_dead_builders_and_spares_live_ones(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_build(out_dir: Path, *, progress: Any = None) -> None:
        (out_dir / "report.json").write_text("{}", encoding="utf-8")

    monkeypatch.setattr(toy, "build_toy_pair", fake_build)
    own = tmp_path / f"{toy.code_hash()}.building-killed"
    old_version = tmp_path / "0ldc0de.building-killed"
    in_progress = tmp_path / "0therc0de.building-busy"
    for folder in (own, old_version, in_progress):
        folder.mkdir()
        (folder / "base.gguf").write_bytes(b"half")
    (tmp_path / "0ldc0de.lock").touch()
    with open(tmp_path / "0therc0de.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another builder at work (flock is per open file)
        pair = toy.ensure_toy_pair(tmp_path)
        assert sorted(path.name for path in tmp_path.glob("*.building-*")) == [in_progress.name]
    assert (pair.root / "report.json").is_file()
