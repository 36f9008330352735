"""Fakes for the daemon tests: a scripted decoder and a ledger, plus a real-uvicorn helper."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.assistant import Assistant, plain_prompt_builder
from client.daemon import DaemonServices
from client.decoding import DecodeResult, StopCutter
from client.documents import DocumentStore
from client.egress import EgressSummary
from client.prompting import Segment
from client.tokens import GeneratedToken


@dataclass
class FakeDecoder:
    """Answers ``= <question upper-cased>`` one character per token.

    Digits come from the 'expert'; ``?`` is a fallback and ``!`` a denied token.

    Records the prompts it saw, so tests can check what retrieval put in them.
    """

    delay_s: float = 0.0
    prompts: list[list[Segment]] = field(default_factory=list)
    fail_on: str | None = None

    def prompt_length(self, segments: Sequence[Segment]) -> int:
        return sum(len(segment.text) for segment in segments)

    def generate(self, segments: Sequence[Segment], *, request_id: str, max_tokens: int,
                 temperature: float, seed: int | None, stop: Sequence[str] = ()
                 ) -> Generator[GeneratedToken, None, DecodeResult]:
        self.prompts.append(list(segments))
        prompt = "".join(segment.text for segment in segments)
        if self.fail_on is not None and self.fail_on in prompt:
            raise RuntimeError("the fake decoder was told to fail")
        found = re.search(r"Question: (.*)\nAnswer:$", prompt, re.DOTALL)
        answer = " = " + (found.group(1) if found else prompt).upper()
        cutter = StopCutter(stop)
        tokens: list[GeneratedToken] = []
        for index, character in enumerate(answer[:max_tokens]):
            if self.delay_s:
                time.sleep(self.delay_s)
            provenance = ("expert" if character.isdigit() else "fallback" if character == "?"
                          else "denied" if character == "!" else "base")
            token = GeneratedToken(index, character.encode(), provenance,  # type: ignore[arg-type]
                                   0.1 if provenance == "base" else 0.9)
            tokens.append(token)
            cutter.push(token)
            yield token
            if cutter.stopped:
                break
        cutter.flush()
        finish = "length" if len(tokens) >= max_tokens and not cutter.stopped else "stop"
        return DecodeResult(request_id, tokens, cutter.text, finish, len(prompt),  # type: ignore[arg-type]
                            FakeLedger().summary(request_id))


class FakeLedger:
    def summary(self, request_id: str) -> EgressSummary:
        return EgressSummary(calls=1, tokens_sent=7, destinations=("http://fake",))


def fake_services(tmp_path: Path, *, decoder: FakeDecoder | None = None,
                  **overrides: object) -> DaemonServices:
    store = DocumentStore(tmp_path / "documents.sqlite3", max_bytes=1024 * 1024)
    assistant = Assistant(decoder=decoder or FakeDecoder(), documents=store,
                          prompt_builder=plain_prompt_builder, ledger=FakeLedger())

    def egress_reader(request_id: str) -> list[dict[str, object]]:
        return [{"kind": "egress", "request_id": request_id, "sent": True,
                 "sent_text": "Question: [private]", "destination": "http://fake"}]

    services = DaemonServices(assistant=assistant, documents=store, model_name="tandem-fake",
                              egress_reader=egress_reader, max_upload_bytes=1024 * 1024,
                              on_close=[store.close])
    for name, value in overrides.items():
        setattr(services, name, value)
    return services


def wait_until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


class Gate:
    """A decoder wrapper that blocks its first answer until released (for queue tests)."""

    def __init__(self, inner: FakeDecoder) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()

    def prompt_length(self, segments: Sequence[Segment]) -> int:
        return self.inner.prompt_length(segments)

    def generate(self, segments: Sequence[Segment], **kwargs: object
                 ) -> Generator[GeneratedToken, None, DecodeResult]:
        self.entered.set()
        self.release.wait(30)
        return (yield from self.inner.generate(segments, **kwargs))  # type: ignore[arg-type]
