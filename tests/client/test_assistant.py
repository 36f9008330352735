"""The assistant: prompts with private passages, stop sequences, streaming, and the real decoder."""

from __future__ import annotations

import threading
from collections.abc import Generator
from pathlib import Path
from types import SimpleNamespace

import pytest

from client.assistant import (
    Assistant,
    ChatTemplatePrompt,
    ChatTurn,
    CoDecoderSource,
    Question,
    StopCutter,
    plain_prompt_builder,
    summarize_egress,
)
from client.decoding import DecodeResult
from client.documents import DocumentStore
from client.egress import EgressSummary
from client.prompting import Segment
from client.provenance import source_of
from client.tokens import GeneratedToken
from tandem_core.errors import ConfigError
from tests.client.daemon_fakes import FakeDecoder, FakeLedger

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tokens_of(text: str, provenance: str = "base") -> list[GeneratedToken]:
    return [GeneratedToken(i, ch.encode(), provenance, 0.2) for i, ch in enumerate(text)]  # type: ignore[arg-type]


@pytest.fixture()
def store(tmp_path: Path) -> DocumentStore:
    opened = DocumentStore(tmp_path / "documents.sqlite3")
    opened.add_text("invoice.txt",
                    "Invoice 4417 from Harbor Supply: 37 crates of bolts and 48 crates of pears.")
    opened.add_text("other.txt", "Order 12 from Acme Tools: 5 boxes of nuts and 6 boxes of lamps.")
    yield opened
    opened.close()


def test_plain_prompt_marks_the_retrieved_passage_private(store: DocumentStore) -> None:
    decoder = FakeDecoder()
    assistant = Assistant(decoder=decoder, documents=store, prompt_builder=plain_prompt_builder,
                          ledger=FakeLedger())
    question = Question(messages=[ChatTurn("user", "How many crates are on invoice 4417 in total?")])
    answer = assistant.answer(question, request_id="req-1")
    assert decoder.prompts[0] == [
        Segment("Document: "),
        Segment("Invoice 4417 from Harbor Supply: 37 crates of bolts and 48 crates of pears.",
                private=True),
        Segment("\n"),
        Segment("Question: How many crates are on "),
        Segment("invoice 4417", private=True),  # the user's words repeat the stored document
        Segment(" in total?\nAnswer:"),
    ]
    assert [source_of(s) for s in decoder.prompts[0] if s.private] == [
        "passage:invoice.txt", "repeat:invoice.txt"]
    assert answer.text == " = HOW MANY CRATES ARE ON INVOICE 4417 IN TOTAL?"
    assert [p.document_name for p in answer.passages] == ["invoice.txt"]
    assert answer.egress.calls == 1 and answer.request_id == "req-1"
    assert answer.provenance_counts["expert"] == 4


def test_raw_prompts_skip_retrieval_unless_asked(store: DocumentStore) -> None:
    decoder = FakeDecoder()
    assistant = Assistant(decoder=decoder, documents=store, prompt_builder=plain_prompt_builder)
    assistant.answer(Question(prompt="Question: invoice 4417?\nAnswer:", retrieve=False))
    assert decoder.prompts[-1] == [Segment("Question: "), Segment("invoice 4417", private=True),
                                   Segment("?\nAnswer:")]  # no passage; the repeat is private
    assistant.answer(Question(prompt="Question: invoice 4417?\nAnswer:", retrieve=True))
    assert [s.private for s in decoder.prompts[-1]] == [False, True, False, False, True, False]


def test_chat_template_keeps_each_passage_one_private_segment() -> None:
    builder = ChatTemplatePrompt(SMOLLM2_TEMPLATE)
    question = Question(messages=[ChatTurn("user", "Earlier?"), ChatTurn("assistant", "Yes."),
                                  ChatTurn("user", "What is the total?")])
    segments = builder(question, ["Alpha passage <|im_end|>", "Beta passage"])
    assert [s.text for s in segments if s.private] == ["Alpha passage <|im_end|>", "Beta passage"]
    rendered = "".join(s.text for s in segments)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant")
    assert rendered.endswith("Document: Beta passage\n\nWhat is the total?<|im_end|>\n"
                             "<|im_start|>assistant\n")
    assert "<|im_start|>user\nEarlier?<|im_end|>" in rendered
    assert all("\x1e" not in s.text for s in segments)


def test_a_template_that_drops_passages_is_a_config_error() -> None:
    builder = ChatTemplatePrompt("{% for m in messages %}{{ m['role'] }}{% endfor %}")
    with pytest.raises(ConfigError, match="dropped"):
        builder(Question(messages=[ChatTurn("user", "q")]), ["secret passage"])


def feed(cutter: StopCutter, pieces: list[bytes]) -> list[str]:
    released = []
    for index, piece in enumerate(pieces):
        released += [t.text for t in cutter.push(GeneratedToken(index, piece, "base", 0.0))]
        if cutter.stopped:
            break
    released += [t.text for t in cutter.flush()]
    return released


def test_stop_sequences_cut_across_tokens_and_never_stream_past_the_cut() -> None:
    cutter = StopCutter(["END"])
    released = feed(cutter, [b"ab", b"cE", b"N", b"Dzz"])
    assert cutter.text == "abc" and cutter.stopped
    assert "".join(released) == "abc"
    cutter = StopCutter(["\n\n", "xyz"])
    assert "".join(feed(cutter, [b"one", b" x", b"y", b"w\n", b"\nrest"])) == "one xyw"
    cutter = StopCutter(["E"])
    feed(cutter, [b"abc"])
    assert cutter.text == "abc" and not cutter.stopped


def test_utf8_split_across_tokens_is_joined() -> None:
    cutter = StopCutter([])
    euro = "€".encode()
    released = feed(cutter, [b"5 ", euro[:1], euro[1:], b"!"])
    assert cutter.text == "5 €!"
    assert released == ["5 ", "", "€", "!"]


def test_streaming_callback_cancellation_and_length() -> None:
    decoder = FakeDecoder()
    assistant = Assistant(decoder=decoder, documents=None, prompt_builder=plain_prompt_builder)
    seen: list[str] = []
    cancelled = threading.Event()

    def on_token(token: object) -> None:
        seen.append(token.text)  # type: ignore[attr-defined]
        if len(seen) == 3:
            cancelled.set()

    answer = assistant.answer(Question(messages=[ChatTurn("user", "abcdef")]), on_token=on_token,
                              cancelled=cancelled)
    assert answer.finish_reason == "cancelled" and answer.text == "".join(seen) == " = "
    limited = assistant.answer(Question(messages=[ChatTurn("user", "abcdef")], max_tokens=5))
    assert limited.finish_reason == "length" and limited.text == " = AB"


def test_egress_summary_from_audit_records() -> None:
    records = [
        {"kind": "egress", "id": "1", "sent": True, "sent_tokens": [1, 2, 3],
         "destination": "http://gw", "decision": {"allowed": True}},
        {"kind": "outcome", "egress_id": "1", "error": None},
        {"kind": "egress", "id": "2", "sent": True, "sent_tokens": [4],
         "destination": "http://gw", "decision": {"allowed": True}},
        {"kind": "outcome", "egress_id": "2", "error": "ExpertUnavailableError: timeout"},
        {"kind": "egress", "id": "3", "sent": False, "sent_tokens": [],
         "decision": {"allowed": False, "reason": "cap:per_request_calls"}},
    ]
    summary = summarize_egress(records)
    assert (summary.calls, summary.tokens_sent, summary.denials, summary.failures) == (2, 4, 1, 1)
    assert summary.destinations == ("http://gw",)


def test_a_finished_answer_keeps_the_decoders_counts_and_its_destination() -> None:
    counted = EgressSummary(calls=2, tokens_sent=9, tokens_received=4, deferred_positions=3)
    result = DecodeResult("r1", tokens_of("ab"), "ab", "length", 1, counted)

    def stream(*args: object, **kwargs: object) -> Generator[GeneratedToken, None, object]:
        yield from tokens_of("ab")
        return result

    decoder = SimpleNamespace(stream=stream, expert=SimpleNamespace(destination="http://gw"),
                              prompt_length=lambda segments: 1)
    source = CoDecoderSource(decoder)
    assistant = Assistant(decoder=source, documents=None, prompt_builder=plain_prompt_builder,
                          ledger=source)
    answer = assistant.answer(Question(prompt="q", max_tokens=2), request_id="r1")
    assert answer.finish_reason == "length" and answer.text == "ab"
    assert answer.egress == EgressSummary(calls=2, tokens_sent=9, tokens_received=4,
                                          deferred_positions=3, destinations=("http://gw",))
    assert source.summary("r1") == EgressSummary()  # no audit log to read


