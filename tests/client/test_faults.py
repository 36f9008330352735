"""Faults on the wire between the client and a real gateway (toy expert under llama.cpp).

The fault-injecting proxy (``tests.fault_proxy``) adds latency, drops connections mid-reply,
answers 503, sends malformed or truncated JSON, out-of-vocabulary ids and impossible log-probs,
trickles bytes and hangs. Against it:
- every answer completes, falling back to the base where the expert failed;
- nothing invalid is ever accepted: only calls whose reply was the gateway's own, intact, have
  accepted tokens;
- the audit log equals the wire, retries included, and its chain verifies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr

from client.audit import AuditLog, read_records, verify
from client.prompting import plain_prompt
from client.settings import PolicySettings
from tests.fault_proxy import ALL_FAULTS, VALID, FaultProxy

pytestmark = pytest.mark.slow

AUDIT_KEY = b"fault-test-audit-key-0123456789"


@pytest.fixture(scope="module")
def toy_stack(toy_pair: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from expert_gateway.app import create_app
    from expert_gateway.backends.llama_cpp import LlamaCppBackend
    from expert_gateway.keys import KeyStore
    from expert_gateway.settings import GatewaySettings
    from export.pipeline import ensure_toy_head
    from tandem_core.base_model import LlamaModel
    from tandem_core.server import ServerThread

    keys_file = tmp_path_factory.mktemp("fault-keys") / "keys.json"
    _, secret = KeyStore(keys_file).add("faults", requests_per_minute=100_000,
                                         tokens_per_day=10**9)
    backend = LlamaCppBackend.open(Path(toy_pair.expert_gguf), name="toy-expert", n_ctx=2048,
                                   n_batch=256, n_threads=2, slots=2)
    base = LlamaModel(Path(toy_pair.base_gguf), n_ctx=512)
    server = ServerThread(create_app(GatewaySettings(auth={"keys_file": keys_file}),
                                     backend=backend))
    url = server.start(timeout=60)
    with open(toy_pair.test_jsonl) as corpus:
        lines = [json.loads(line) for _, line in zip(range(8), corpus, strict=False)]
    try:
        yield {"url": url, "key": secret, "base": base, "lines": lines,
               "head": Path(ensure_toy_head(toy_pair))}
    finally:
        server.stop()
        base.close()
        backend.close()


def test_every_answer_completes_and_nothing_invalid_is_accepted(
        tmp_path: Path, toy_stack: dict[str, Any]) -> None:
    from client.decoding import CoDecoder, DecodingOptions
    from client.expert import HttpExpert
    from client.policy import Policy
    from client.switch import OnnxSwitch

    base = toy_stack["base"]
    settings = PolicySettings(usage_db=tmp_path / "usage.sqlite3",
                              audit_log=tmp_path / "audit.jsonl", mode="redact_private",
                              derived="send")  # the toy answers copy the passage's numbers
    policy = Policy.from_settings(settings, tokenizer=base)
    audit = AuditLog(settings.audit_log, key=AUDIT_KEY)
    with FaultProxy(toy_stack["url"], rate=0.45, kinds=ALL_FAULTS, seed=7,
                    trickle_s=0.5) as proxy:
        expert = HttpExpert(proxy.url, model="toy-expert", tokenizer=base.fingerprint,
                            token=SecretStr(toy_stack["key"]), timeout_s=2.0, retries=1,
                            sleep=lambda _: None)
        expert.breaker.failure_limit = 1000  # keep calling through the faults
        decoder = CoDecoder(base=base, switch=OnnxSwitch.for_base(toy_stack["head"], base),
                            expert=expert, policy=policy, audit=audit,
                            options=DecodingOptions(max_tokens=24, lookahead=4, compose=True,
                                                    top_logprobs=5))
        answers = [decoder.generate(plain_prompt([line["passage"]], line["question"]),
                                    request_id=f"fault-{index}")
                   for index, line in enumerate(toy_stack["lines"])]
        expert.close()
    policy.close()

    assert all(answer.finish_reason in ("stop", "length") for answer in answers)
    wire = [request for request in proxy.requests if "/v1/continue" in request.line]
    faults = {request.fault for request in wire}
    assert len(faults - set(VALID)) >= 5, proxy.faults()  # most kinds of fault were hit
    # The audit log equals the wire, retries included.
    verify(settings.audit_log, key=AUDIT_KEY)
    records = list(read_records(settings.audit_log))
    sent = [record for record in records if record["kind"] == "egress" and record["sent"]]
    assert [(r["session"], r["held"], r["sent_tokens"]) for r in sent] == [
        (w.body["session"], w.body["held"], w.body["tokens"]) for w in wire]
    # Nothing invalid accepted: a call has accepted tokens only if its reply was intact.
    outcomes = {record["egress_id"]: record for record in records if record["kind"] == "outcome"}
    accepted_total = 0
    for record, request in zip(sent, wire, strict=True):
        outcome = outcomes[record["id"]]
        if request.fault not in VALID:
            assert outcome["error"] and outcome["accepted_tokens"] == 0, (request.fault, outcome)
        accepted_total += outcome["accepted_tokens"]
    assert accepted_total > 0  # the expert still helped where the wire was clean
    counts = [answer.provenance_counts for answer in answers]
    assert sum(count["fallback"] for count in counts) > 0  # and the base covered the faults
    assert sum(count["expert"] for count in counts) == accepted_total
    for answer in answers:
        assert all(0 <= token.token_id < base.vocab_size for token in answer.tokens)
        assert not any(np.isnan(token.deferral_probability) for token in answer.tokens)
