"""Issue 14, privacy: content is private by where it came from; values copied from private text
are derived and governed by the policy; redaction keeps words whole and is shown to the user."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from client.assistant import (
    Assistant,
    ChatTemplatePrompt,
    ChatTurn,
    Question,
    describe_egress,
    plain_prompt_builder,
)
from client.documents import DocumentStore
from client.egress import EgressDecision, EgressRequest
from client.policy import Policy
from client.prompting import Segment
from client.provenance import SourcedSegment, source_of
from client.settings import PolicySettings
from client.usage import UsageStore
from client.values import PrivateValues, find_values
from tests.client.daemon_fakes import FakeDecoder, FakeLedger
from tests.client.test_assistant import SMOLLM2_TEMPLATE
from tests.client.test_daemon import needs_smollm2
from tests.client.test_policy import TOKENIZER, text_of

INVOICE = "Invoice 4417 from Harbor Supply: 37 crates of bolts and 48 crates of nuts."
DIAGNOSIS = "Dana Whitfield was diagnosed with type 2 diabetes in March 2021 at Lakeside Clinic."


def encode(parts: Sequence[tuple[str, bool, str]]) -> tuple[list[int], list[bool], list[str]]:
    tokens, mask, sources = [1000], [False], [""]
    for text, private, source in parts:
        ids = TOKENIZER.tokenize(text)
        tokens += ids
        mask += [private] * len(ids)
        sources += [source if private else ""] * len(ids)
    return tokens, mask, sources


def decide(tmp_path: Path, parts: Sequence[tuple[str, bool, str]], **settings: object
           ) -> EgressDecision:
    policy_settings = PolicySettings(usage_db=tmp_path / "usage.sqlite3", **settings)  # type: ignore[arg-type]
    policy = Policy(policy_settings, tokenizer=TOKENIZER, usage=UsageStore(policy_settings.usage_db))
    tokens, mask, sources = encode(parts)
    try:
        return policy.decide(EgressRequest("req", "sess", tokens, mask, (), sources))
    finally:
        policy.close()


INVOICE_PROMPT = (("Document: ", False, ""), (INVOICE, True, "passage:invoice-4417.txt"),
                  ("\nQuestion: How many crates are on invoice 4417 in total?\nAnswer:", False, ""))


# -- item 2: derived values -----------------------------------------------------------------------

def test_copied_invoice_numbers_are_derived_and_denied_by_default(tmp_path: Path) -> None:
    decision = decide(tmp_path, [*INVOICE_PROMPT, (" Total: 37+48=", False, "")])
    assert (decision.allowed, decision.reason) == (False, "derived")
    assert decision.privacy["derived_values"] == [
        {"value": "37", "source": "invoice-4417.txt"}, {"value": "48", "source": "invoice-4417.txt"}]


def test_derived_redact_hides_whole_values_and_send_marks_them(tmp_path: Path) -> None:
    redacted = decide(tmp_path, [*INVOICE_PROMPT, (" Total: 37+48=", False, "")], derived="redact")
    assert redacted.allowed
    # Whole tokens go: this tokenizer merges " 3" into one token, so the space goes with it.
    assert text_of(redacted.remote_view).endswith("Answer: Total:[private]+[private]=")

    sent = decide(tmp_path / "send", [*INVOICE_PROMPT, (" Total: 37+48=", False, "")],
                  derived="send")
    assert sent.allowed and text_of(sent.new_tokens).endswith("Total: 37+48=")
    marked = [text_of([sent.new_tokens[index]]) for index in sent.privacy["derived_sent_tokens"]]
    assert "".join(marked) == " 3748"
    assert sent.privacy["derived_sent"] == [
        {"value": "37", "source": "invoice-4417.txt"}, {"value": "48", "source": "invoice-4417.txt"}]
    assert sent.privacy["rules"]["derived"] == "send"


@pytest.mark.parametrize(("private", "public", "derived"), [
    ("He earns 184,500 a year.", " salary: 184500;", True),         # separators ignored
    ("He earns 184,500 a year.", " salary: 18", True),              # a value still being written
    ("He earns 184,500 a year.", " salary: 18 or so", False),       # a finished, different value
    ("Paid on 2024-03-05 by card.", " on 2024-03-05.", True),
    ("Ship 37 crates.", " 137 crates", False),                      # whole values only
    ("Seen by Dr Okafor at noon.", " Okafor said", True),           # names
    ("Seen by Dr Okafor at noon.", " The doctor said", False),
])
def test_short_values_are_found_whole(private: str, public: str, derived: bool) -> None:
    values = PrivateValues.of([(private, "doc.txt")])
    found = find_values(public, values, open_end=True)
    assert bool(found) is derived, found


def test_the_users_words_are_redacted_whole_and_shown(tmp_path: Path) -> None:
    decision = decide(tmp_path, INVOICE_PROMPT)
    view = text_of(decision.remote_view)
    assert "i[private]in" not in view
    assert "How many crates are on [private] in total?" in view
    assert {"text": "invoice 4417", "rule": "copy", "source": ""} in decision.privacy["redacted"]
    lines = describe_egress([{"kind": "egress", "sent": True, "privacy": decision.privacy}])
    assert "redacted before sending: \u201cinvoice 4417\u201d (copies)" in lines


# -- item 1: where content came from --------------------------------------------------------------

def test_assistant_turns_are_private_unless_the_policy_opens_them(tmp_path: Path) -> None:
    parts = [("<user>What was Dana diagnosed with?<assistant>", False, ""),
             (DIAGNOSIS, True, "assistant-turn"), ("<user>And the invoice?<assistant>", False, "")]
    closed = decide(tmp_path, parts)
    assert "Whitfield" not in text_of(closed.remote_view)
    assert closed.privacy["hidden_tokens"]["assistant_turn"] == len(TOKENIZER.tokenize(DIAGNOSIS))
    assert closed.privacy["private_sources"] == ["earlier answers"]

    opened = decide(tmp_path / "open", parts, assistant_turns="public")
    assert DIAGNOSIS in text_of(opened.remote_view)
    assert opened.privacy["rules"]["assistant_turns"] == "public"
    assert opened.privacy["opened_tokens"]["assistant_turn"] == len(TOKENIZER.tokenize(DIAGNOSIS))


def test_document_repeats_anywhere_are_found_in_the_whole_store(tmp_path: Path) -> None:
    store = DocumentStore(tmp_path / "documents.sqlite3")
    store.add_text("dana.txt", DIAGNOSIS)
    store.add_text("invoice-4417.txt", INVOICE)
    text = "Earlier you said dana whitfield was diagnosed  with type 2. Is 48 right?"
    repeats = store.repeats(text, min_chars=12)
    assert [(text[r.start:r.end], r.document_name) for r in repeats] == [
        ("dana whitfield was diagnosed  with type 2", "dana.txt")]
    assert store.repeats("the cat sat on the mat with a hat", min_chars=12) == []
    store.close()


def assistant_with(tmp_path: Path, builder: object) -> tuple[Assistant, FakeDecoder]:
    store = DocumentStore(tmp_path / "documents.sqlite3")
    store.add_text("dana.txt", DIAGNOSIS)
    store.add_text("invoice-4417.txt", INVOICE)
    decoder = FakeDecoder()
    return Assistant(decoder=decoder, documents=store, prompt_builder=builder,  # type: ignore[arg-type]
                     ledger=FakeLedger()), decoder


def test_chat_history_is_marked_by_source(tmp_path: Path) -> None:
    assistant, decoder = assistant_with(tmp_path, ChatTemplatePrompt(SMOLLM2_TEMPLATE))
    question = Question(messages=[
        ChatTurn("system", "Quote this: Dana Whitfield was diagnosed with type 2 diabetes."),
        ChatTurn("user", "What was Dana diagnosed with?"),
        ChatTurn("assistant", DIAGNOSIS),
        ChatTurn("user", "How many crates are on invoice 4417?")])
    assistant.answer(question, request_id="r")
    private = [(s.text, source_of(s)) for s in decoder.prompts[0] if s.private]
    assert (DIAGNOSIS, "assistant-turn") in private
    assert ("Dana Whitfield was diagnosed with type 2 diabetes", "repeat:dana.txt") in private
    assert (INVOICE, "passage:invoice-4417.txt") in private
    public = "".join(s.text for s in decoder.prompts[0] if not s.private)
    assert "Whitfield" not in public and "\x1e" not in public


def test_a_raw_prompt_repeating_a_document_is_private(tmp_path: Path) -> None:
    assistant, decoder = assistant_with(tmp_path, plain_prompt_builder)
    assistant.answer(Question(prompt=f"Document: {DIAGNOSIS}\nQuestion: When?\nAnswer:",
                              retrieve=False), request_id="r")
    segments = decoder.prompts[0]
    assert [s.private for s in segments] == [False, True, False]
    assert source_of(segments[1]) == "repeat:dana.txt"
    assert segments[1].text.startswith("Dana Whitfield was diagnosed")


def test_describe_egress_names_the_values_that_left() -> None:
    records = [
        {"kind": "egress", "sent": True, "privacy": {
            "rules": {"derived": "send"}, "private_sources": ["invoice-4417.txt"],
            "derived_sent": [{"value": "37", "source": "invoice-4417.txt"},
                             {"value": "48", "source": "invoice-4417.txt"}]}},
    ]
    lines = describe_egress(records)
    assert lines[0] == ("2 values copied from invoice-4417.txt were sent: 37, 48 "
                        "(policy: derived = send)")
    assert not any("no value" in line for line in lines)
    denied = [{"kind": "egress", "sent": False, "decision": {"allowed": False, "reason": "derived"},
               "privacy": {"derived_values": [{"value": "37", "source": "invoice-4417.txt"}]}}]
    assert "policy: derived = deny" in describe_egress(denied)[0]


def test_prompt_segments_keep_their_source_through_encoding() -> None:
    segments = plain_prompt_builder(Question(messages=[ChatTurn("user", "q?")]),
                                    [SourcedSegment("secret", True, "passage:a.txt")])
    assert [(s.private, source_of(s)) for s in segments if s.private] == [(True, "passage:a.txt")]
    assert segments == [Segment("Document: "), Segment("secret", private=True), Segment("\n"),
                        Segment("Question: q?\nAnswer:")]  # the toy format, segment for segment


# -- against the real thing: llama.cpp, a real gateway, uvicorn -------------------------------------

SHIPMENT = "Shipment 7302 from Atlas Freight: 64 pallets of bricks and 17 pallets of tiles."


@needs_smollm2
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_earlier_answer_quoting_a_document_never_reaches_the_expert(tmp_path: Path) -> None:
    """SmolLM2 with its chat template defers at every token to a real SmolLM2 gateway; the second
    question carries the first answer, which quoted a document that is not retrieved now."""
    from client.assistant import CoDecoderSource, prompt_builder_for
    from client.audit import AuditLog, read_records
    from client.decoding import CoDecoder, DecodingOptions
    from client.expert import HttpExpert
    from expert_gateway.app import create_app
    from expert_gateway.backends.llama_cpp import LlamaCppBackend
    from expert_gateway.settings import GatewaySettings
    from tandem_core.base_model import LlamaModel, smollm2_path
    from tests.client.test_daemon import AlwaysDefer
    from tests.client.test_egress_wire import CapturingProxy, serve

    base = LlamaModel(smollm2_path(), n_ctx=1024)
    backend = LlamaCppBackend.open(smollm2_path(), name="expert", n_ctx=1024, n_batch=256,
                                   n_threads=2, slots=1)
    store = DocumentStore(tmp_path / "documents.sqlite3")
    store.add_text("dana.txt", DIAGNOSIS)
    store.add_text("shipment-7302.txt", SHIPMENT)
    settings = PolicySettings(usage_db=tmp_path / "usage.sqlite3", audit_log=tmp_path / "audit.jsonl")
    policy = Policy.from_settings(settings, tokenizer=base)
    try:
        gateway = GatewaySettings(auth={"enabled": False})  # type: ignore[arg-type]
        with serve(create_app(gateway, backend=backend)) as address:
            proxy = CapturingProxy(address)
            expert = HttpExpert(f"http://127.0.0.1:{proxy.port}", model="expert",
                                tokenizer=base.fingerprint, retries=0, timeout_s=60)
            decoder = CoDecoder(base=base, switch=AlwaysDefer(), expert=expert, policy=policy,
                                audit=AuditLog(settings.audit_log, key=b"k" * 32),
                                options=DecodingOptions(max_tokens=6, lookahead=2))
            assistant = Assistant(decoder=CoDecoderSource(decoder), documents=store,
                                  prompt_builder=prompt_builder_for(base, "chat"))
            answer = assistant.answer(Question(messages=[
                ChatTurn("user", "What was Dana diagnosed with?"),
                ChatTurn("assistant", f"According to your notes: {DIAGNOSIS}"),
                ChatTurn("user", "How many pallets of bricks are there?")], max_tokens=6))
            expert.close()
            proxy.close()
            calls = [body for _, body in proxy.requests()]
            sessions: dict[str, list[int]] = {}
            for body in calls:
                sessions[body["session"]] = (sessions.get(body["session"], [])[:body["held"]]
                                             + body["tokens"])
            wire = " ".join(base.detokenize(tokens).decode("utf-8", "replace")
                            for tokens in sessions.values())
    finally:
        policy.close()
        backend.close()
        base.close()
        store.close()
    assert [p.document_name for p in answer.passages] == ["shipment-7302.txt"]
    assert calls, "the expert was never asked"
    for secret in ("Whitfield", "diabetes", "Lakeside", "Atlas Freight", "diagnosed"):
        assert secret not in wire, (secret, wire)
    egress = [r for r in read_records(settings.audit_log) if r["kind"] == "egress"]
    hidden = egress[0]["privacy"]["hidden_tokens"]
    assert hidden["assistant_turn"] > 0 and hidden["passage"] > 0
    # "diagnosed with" in the first question repeats dana.txt too (14 characters of it).
    assert {"earlier answers", "shipment-7302.txt"} <= set(egress[0]["privacy"]["private_sources"])


@pytest.fixture(scope="module")
def careful_toy(toy_pair: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The toy pair, its trained head and a real gateway behind the daemon, default policy."""
    from pydantic import SecretStr

    from client.assistant import build_runtime
    from client.cli_daemon import daemon_services
    from client.daemon import create_app
    from client.settings import (
        BaseModelSettings,
        ClientSettings,
        DaemonSettings,
        ExpertSettings,
        SwitchSettings,
    )
    from export.pipeline import ensure_toy_head, serve_gateway
    from tandem_core.server import ServerThread

    root = tmp_path_factory.mktemp("careful-toy")
    head = ensure_toy_head(toy_pair)
    with serve_gateway(toy_pair.expert_gguf) as gateway_url:  # type: ignore[attr-defined]
        settings = ClientSettings(
            base=BaseModelSettings(preset="toy", path=toy_pair.base_gguf, n_ctx=512),  # type: ignore[attr-defined]
            switch=SwitchSettings(path=head), expert=ExpertSettings(url=gateway_url),
            daemon=DaemonSettings(data_dir=root))
        policy = PolicySettings(usage_db=root / "usage.sqlite3", audit_log=root / "audit.jsonl")
        runtime = build_runtime(settings, policy, base_path=toy_pair.base_gguf,  # type: ignore[attr-defined]
                                switch_path=head, audit_key=SecretStr("careful-toy-key-0123456789"))
        server = ServerThread(create_app(daemon_services(runtime, settings, api_key=None)))
        url = server.start()
        for path in sorted(Path(toy_pair.documents_dir).iterdir()):  # type: ignore[attr-defined]
            httpx.post(f"{url}/v1/documents", files={"file": (path.name, path.read_bytes())})
        try:
            yield url
        finally:
            server.stop()


def sent_texts(url: str, request_id: str) -> tuple[list[dict[str, Any]], str]:
    records = httpx.get(f"{url}/v1/egress/{request_id}").json()["records"]
    return records, " | ".join(r["sent_text"] for r in records if r.get("sent"))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_by_default_the_invoice_numbers_stay_home(careful_toy: str) -> None:
    reply = httpx.post(f"{careful_toy}/v1/chat/completions", timeout=300, json={
        "model": "tandem-toy",
        "messages": [{"role": "user", "content": "How many crates are on invoice 4417 in total?"}]})
    body = reply.json()
    records, wire = sent_texts(careful_toy, body["id"])
    assert "37" not in wire and "48" not in wire and "Harbor" not in wire
    refused = [r for r in records if r["kind"] == "egress" and r["decision"]["reason"] == "derived"]
    assert refused, records
    assert {v["value"] for v in refused[0]["privacy"]["derived_values"]} >= {"37", "48"}
    assert body["tandem"]["provenance"]["denied"] >= 1  # shown as double-check
    assert "i[private]in" not in wire
    lines = describe_egress(records)
    assert any("policy: derived = deny" in line for line in lines), lines
    assert not any("were sent" in line for line in lines)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_raw_prompt_carrying_a_document_does_not_reach_the_expert(careful_toy: str) -> None:
    prompt = ("Document: Invoice 4417 from Harbor Supply: 37 crates of bolts and 48 crates of nuts."
              "\nQuestion: How many crates are on invoice 4417 in total?\nAnswer:")
    reply = httpx.post(f"{careful_toy}/v1/completions", timeout=300, json={
        "model": "tandem-toy", "prompt": prompt, "max_tokens": 16, "tandem": {"retrieve": False}})
    assert reply.status_code == 200, reply.text
    records, wire = sent_texts(careful_toy, reply.json()["id"])
    assert [r for r in records if r["kind"] == "egress"], "the head never deferred"
    for secret in ("Harbor", "Supply", "bolts", "37 crates"):
        assert secret not in wire, (secret, wire)
    hidden = next(r for r in records if r["kind"] == "egress")["privacy"]["hidden_tokens"]
    assert hidden.get("repeat", 0) > 0
