"""Collection: corpus parsing, egress through policy and audit, resumable shards, real models."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.egress import EgressDecision, EgressOutcome, EgressRecord, EgressRequest
from export.collect import (
    AuditedScorer,
    CollectError,
    CollectPlan,
    EgressSetup,
    ScoringItem,
    base_features,
    load_collected,
    read_corpus,
    run_collect,
)
from tandem_core.protocol import ScoreResult

pytest.importorskip("safetensors")


class RecordingAudit:
    def __init__(self) -> None:
        self.egress: list[EgressRecord] = []
        self.outcomes: list[tuple[str, EgressOutcome]] = []

    def record_egress(self, record: EgressRecord) -> str:
        self.egress.append(record)
        return f"e{len(self.egress)}"

    def record_outcome(self, egress_id: str, outcome: EgressOutcome) -> None:
        self.outcomes.append((egress_id, outcome))


class FakeEndpoint:
    destination = "http://gateway.test"
    model = "fake"

    def __init__(self) -> None:
        self.asked: list[tuple[list[int], int]] = []

    def score(self, sequences: Sequence[tuple[Sequence[int], int]]) -> list[ScoreResult]:
        self.asked += [(list(tokens), start) for tokens, start in sequences]
        return [ScoreResult(logprobs=[-1.0] * (len(tokens) - start), argmax=list(tokens[start:]))
                for tokens, start in sequences]


class RedactFirst:
    """Replaces the first token by 99, or denies when the sequence starts with 7."""

    def decide(self, request: EgressRequest) -> EgressDecision:
        if request.local_tokens[0] == 7:
            return EgressDecision(False, "pattern:test")
        return EgressDecision(True, "ok", [99, *request.local_tokens[1:]], 0)


def test_scoring_is_audited_before_it_is_sent() -> None:
    audit, endpoint = RecordingAudit(), FakeEndpoint()
    scorer = AuditedScorer(endpoint, audit=audit, detokenize=lambda ids: f"<{len(ids)}>")
    spans = scorer.score([ScoringItem([1, 2, 3, 4], 2, [False] * 4)])
    assert spans[0] is not None and spans[0].argmax.tolist() == [3, 4]
    assert [list(r.sent_tokens) for r in audit.egress] == [[1, 2, 3, 4]]
    assert audit.egress[0].sent_text == "<4>" and audit.egress[0].destination == "http://gateway.test"
    assert audit.outcomes[0][0] == "e1" and list(audit.outcomes[0][1].received_tokens) == [3, 4]
    assert scorer.counter.tokens_sent == 4 and scorer.counter.remote_calls == 1


def test_policy_view_is_what_is_scored_and_denials_are_skipped() -> None:
    audit, endpoint = RecordingAudit(), FakeEndpoint()
    scorer = AuditedScorer(endpoint, policy=RedactFirst(), audit=audit)
    spans = scorer.score([ScoringItem([1, 2, 3], 1, [True, False, False]),
                          ScoringItem([7, 2, 3], 1, [False] * 3)])
    assert spans[1] is None and spans[0] is not None
    assert endpoint.asked == [([99, 2, 3], 1)]
    assert len(audit.egress) == 2 and list(audit.egress[1].sent_tokens) == []
    assert scorer.counter.denied == 1


def test_corpus_errors_name_the_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"prompt": "a", "answer": "b"}\n{"prompt": 3}\n')
    with pytest.raises(CollectError, match="corpus.jsonl:2"):
        read_corpus(corpus)
    corpus.write_text('{"question": "q", "answer": "a"}\nnot json\n')
    assert read_corpus(corpus, limit=1)[0].prompt == "q"
    with pytest.raises(CollectError, match="not JSON"):
        read_corpus(corpus)
    with pytest.raises(CollectError, match="cannot read"):
        read_corpus(tmp_path / "missing.jsonl")


def test_base_features_are_entropy_and_margin() -> None:
    logits = np.log(np.array([[0.5, 0.25, 0.25], [1.0, 1e-30, 1e-30]], dtype=np.float32))
    features = base_features(logits)
    assert features[0, 0] == pytest.approx(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25)), rel=1e-5)
    assert features[0, 1] == pytest.approx(0.25, rel=1e-5)
    assert features[1, 0] == pytest.approx(0.0, abs=1e-5) and features[1, 1] == pytest.approx(1.0)


def test_graph_features_match_collected_features() -> None:
    torch = pytest.importorskip("torch")
    from export.onnx_export import graph_features

    logits = np.random.default_rng(0).standard_normal((8, 300)).astype(np.float32) * 4
    np.testing.assert_allclose(graph_features(torch.from_numpy(logits)).numpy(), base_features(logits),
                               rtol=1e-4, atol=1e-5)


# --- real models ------------------------------------------------------------------------------------


def _plan(toy_pair: Any, out: Path) -> CollectPlan:
    return CollectPlan(corpus=Path(toy_pair.train_jsonl), out=out, limit=6, shard_size=2, score_batch=2,
                       progress=False)


def _collect(toy_pair: Any, out: Path, **kwargs: Any) -> dict[str, Any]:
    return run_collect(_plan(toy_pair, out), base_path=Path(toy_pair.base_gguf), gateway_url=None,
                       expert_gguf=Path(toy_pair.expert_gguf), expert_model="toy-expert",
                       egress=EgressSetup(audit_log=out / "audit.jsonl"), n_ctx=512, **kwargs)


def test_interrupted_collection_resumes_to_identical_shards(toy_pair: Any, tmp_path: Path) -> None:
    _collect(toy_pair, tmp_path / "whole")

    def interrupt(shard: int) -> None:
        if shard == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _collect(toy_pair, tmp_path / "resumed", after_shard=interrupt)
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    first_shard = (tmp_path / "resumed" / "shard-00000.safetensors").stat().st_mtime_ns
    manifest = _collect(toy_pair, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "shard-00000.safetensors").stat().st_mtime_ns == first_shard
    names = sorted(path.name for path in (tmp_path / "whole").glob("shard-*"))
    assert names == [f"shard-0000{index}.safetensors" for index in range(3)]
    for name in names:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    assert manifest["complete"] and manifest["counts"]["examples"] == 6
    assert manifest["base"]["fingerprint"] and len(manifest["corpus"]["sha256"]) == 64


def test_collected_positions_are_answer_tokens(toy_pair: Any, tmp_path: Path) -> None:
    _collect(toy_pair, tmp_path / "data")
    data = load_collected(tmp_path / "data")
    first = json.loads(Path(toy_pair.train_jsonl).read_text().splitlines()[0])
    from tandem_core.base_model import LlamaModel

    with LlamaModel(toy_pair.base_gguf, n_ctx=512) as base:
        answer = [*base.tokenize(first["answer"]), base.eos_id]
        rows = data.example_index == 0
        assert data.gold[rows].tolist() == answer
        assert data.hidden.shape[1] == base.hidden_size
    assert np.all(data.base_logprob <= 0) and np.all(data.expert_logprob <= 0)
    assert np.all(np.isfinite(data.features))


def test_collection_through_the_real_gateway(toy_pair: Any, tmp_path: Path) -> None:
    from export.pipeline import serve_gateway

    local = _collect(toy_pair, tmp_path / "local")
    with serve_gateway(Path(toy_pair.expert_gguf)) as url:
        remote = run_collect(_plan(toy_pair, tmp_path / "remote"), base_path=Path(toy_pair.base_gguf),
                             gateway_url=url, expert_model="toy-expert",
                             egress=EgressSetup(audit_log=tmp_path / "remote" / "audit.jsonl"), n_ctx=512)
    assert remote["counts"]["remote_calls_this_run"] == 3
    assert remote["counts"]["positions"] == local["counts"]["positions"]
    a, b = load_collected(tmp_path / "local"), load_collected(tmp_path / "remote")
    assert np.array_equal(a.expert_argmax, b.expert_argmax)
    np.testing.assert_allclose(a.expert_logprob, b.expert_logprob, atol=1e-3)
    audit_lines = (tmp_path / "remote" / "audit.jsonl").read_text().splitlines()
    assert sum(json.loads(line)["kind"] == "egress" for line in audit_lines) == 6


def test_scoring_egress_follows_the_policy_file(toy_pair: Any, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(f'mode = "redact_private"\nusage_db = "{tmp_path / "usage.sqlite3"}"\n'
                           f'audit_log = "{tmp_path / "audit" / "audit.jsonl"}"\n')
    plan = CollectPlan(corpus=Path(toy_pair.train_jsonl), out=tmp_path / "data", limit=4, shard_size=4,
                       progress=False)
    manifest = run_collect(plan, base_path=Path(toy_pair.base_gguf), gateway_url=None,
                           expert_gguf=Path(toy_pair.expert_gguf), expert_model="toy-expert",
                           egress=EgressSetup(policy_file=policy_file), n_ctx=512)
    records = [json.loads(line) for line in (tmp_path / "audit" / "audit.jsonl").read_text().splitlines()]
    egress = [record for record in records if record["kind"] == "egress"]
    assert len(egress) == 4
    lines = Path(toy_pair.train_jsonl).read_text().splitlines()[:4]
    passages = [json.loads(line)["passage"] for line in lines]
    for record, passage in zip(egress, passages, strict=True):
        assert passage not in record["sent_text"]
        if record["decision"]["allowed"]:
            assert "[private]" in record["sent_text"]
    assert manifest["counts"]["examples"] + manifest["counts"]["denied_by_policy"] == 4
