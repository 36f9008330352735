"""Many answers at once through the real daemon: toy pair, trained head, real gateway, audit.

The expert is the real gateway behind a proxy that can fail calls, so expert failures, caps and
cancellations meet the batching engine the way they do in production.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from client.daemon import create_app
from tandem_core.server import ServerThread

AUDIT_KEY = "serving-test-audit-key-0123456789"


@dataclass
class FailingProxy:
    """Forwards /v1/continue to the gateway; every ``fail_every``-th call gets a 503."""

    upstream: str
    fail_every: int = 0
    calls: int = 0
    forwarded: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        clients: list[httpx.AsyncClient] = []

        @contextlib.asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            # Opened and closed on the server's own event loop: a client left open keeps its
            # pooled connections to the gateway, which the garbage collector later reports as
            # unclosed sockets and transports in some unrelated test.
            async with httpx.AsyncClient(base_url=self.upstream, timeout=60) as client:
                clients.append(client)
                yield

        async def forward(request: Request) -> Response:
            client = clients[0]
            with self.lock:
                self.calls += 1
                fail = bool(self.fail_every) and self.calls % self.fail_every == 0
                if not fail:
                    self.forwarded += 1
            if fail:
                return JSONResponse({"error": {"type": "unavailable", "message": "scripted"}},
                                    status_code=503)
            reply = await client.post(request.url.path, content=await request.body(),
                                      headers={"content-type": "application/json"})
            return Response(reply.content, status_code=reply.status_code,
                            media_type="application/json")

        return Starlette(routes=[Route("/v1/{path:path}", forward, methods=["POST"])],
                         lifespan=lifespan)


@pytest.fixture(scope="module")
def gateway(toy_pair: Any) -> Iterator[str]:
    from export.pipeline import serve_gateway

    with serve_gateway(toy_pair.expert_gguf) as url:
        yield url


@contextlib.contextmanager
def toy_daemon(toy_pair: Any, root: Path, expert_url: str, *, max_parallel: int = 8,
               threshold: float | None = None, stream_burst: int = 4,
               **policy: Any) -> Iterator[tuple[str, Any]]:
    from client.assistant import build_runtime
    from client.cli_daemon import daemon_services
    from client.settings import (
        BaseModelSettings,
        ClientSettings,
        DaemonSettings,
        ExpertSettings,
        PolicySettings,
        SwitchSettings,
    )
    from export.pipeline import ensure_toy_head

    head = ensure_toy_head(toy_pair)
    settings = ClientSettings(
        base=BaseModelSettings(preset="toy", path=toy_pair.base_gguf, n_ctx=512,
                               max_parallel=max_parallel, stream_burst=stream_burst),
        switch=SwitchSettings(path=head, threshold=threshold),
        expert=ExpertSettings(url=expert_url, retries=0, breaker_failures=100),
        daemon=DaemonSettings(data_dir=root, max_queue_per_client=64))
    policy_settings = PolicySettings(usage_db=root / "usage.sqlite3",
                                     audit_log=root / "audit.jsonl", **policy)
    runtime = build_runtime(settings, policy_settings, base_path=toy_pair.base_gguf,
                            switch_path=head, audit_key=SecretStr(AUDIT_KEY))
    server = ServerThread(create_app(daemon_services(runtime, settings, api_key=None)))
    url = server.start()
    try:
        yield url, runtime
    finally:
        server.stop()


def ask(url: str, index: int, *, max_tokens: int = 24) -> dict[str, Any]:
    reply = httpx.post(f"{url}/v1/completions", timeout=300, json={
        "model": "tandem-toy", "max_tokens": max_tokens,
        "prompt": f"Question {index}: what is the capital of the country number {index % 5}?"})
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_32_concurrent_answers_with_a_failing_expert_all_complete_and_audit_verifies(
        toy_pair: Any, gateway: str, tmp_path: Path) -> None:
    from client import audit

    proxy = FailingProxy(gateway, fail_every=3)
    proxy_server = ServerThread(proxy.app())
    proxy_url = proxy_server.start()
    try:
        with toy_daemon(toy_pair, tmp_path, proxy_url, threshold=0.2) as (url, runtime):
            with concurrent.futures.ThreadPoolExecutor(32) as pool:
                replies = list(pool.map(lambda index: ask(url, index), range(32)))
            engine = runtime.assistant.decoder.pool.engine
            assert engine.stats.max_sequences > 1
            assert runtime.assistant.decoder.pool.in_use == 0
    finally:
        proxy_server.stop()
    assert len(replies) == 32
    assert all(reply["choices"][0]["finish_reason"] in ("stop", "length") for reply in replies)
    assert proxy.calls >= 6 and proxy.calls - proxy.forwarded == proxy.calls // 3
    report = audit.verify(tmp_path / "audit.jsonl", key=SecretStr(AUDIT_KEY))
    records = list(audit.read_records(tmp_path / "audit.jsonl"))
    assert report.records == len(records)
    sent = [record for record in records if record["kind"] == "egress" and record["sent"]]
    failed = [record for record in records if record["kind"] == "outcome" and record["error"]]
    assert len(sent) == proxy.calls
    assert len(failed) == proxy.calls // 3
    fallbacks = sum(reply["tandem"]["provenance"]["fallback"] for reply in replies)
    assert fallbacks >= len(failed)
    # Each answer's egress panel (the audit index) lists exactly its own calls.
    for reply in replies[:4]:
        panel = audit.show(tmp_path / "audit.jsonl", reply["id"])
        assert sum(1 for record in panel if record["kind"] == "egress") \
            == reply["tandem"]["egress"]["calls"] + reply["tandem"]["egress"]["denials"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_caps_hold_exactly_under_concurrency(toy_pair: Any, gateway: str, tmp_path: Path) -> None:
    from client import audit

    proxy = FailingProxy(gateway)
    proxy_server = ServerThread(proxy.app())
    proxy_url = proxy_server.start()
    try:
        with toy_daemon(toy_pair, tmp_path, proxy_url, threshold=0.2, hourly_calls=5) as (
                url, _), concurrent.futures.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda index: ask(url, index), range(16)))
    finally:
        proxy_server.stop()
    records = list(audit.read_records(tmp_path / "audit.jsonl"))
    sent = [record for record in records if record["kind"] == "egress" and record["sent"]]
    denied = [record for record in records
              if record["kind"] == "egress" and not record["decision"]["allowed"]]
    assert proxy.calls == len(sent) == 5
    assert denied and all(record["decision"]["reason"].startswith("cap:") for record in denied)
    assert sum(reply["tandem"]["provenance"]["denied"] for reply in replies) >= len(denied)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_cancelled_stream_frees_its_sequence_at_once(
        toy_pair: Any, gateway: str, tmp_path: Path) -> None:
    with toy_daemon(toy_pair, tmp_path, gateway, max_parallel=2, threshold=1.0) as (url, runtime):
        pool = runtime.assistant.decoder.pool
        with httpx.Client(timeout=60) as client, client.stream(
                "POST", f"{url}/v1/completions",
                json={"model": "tandem-toy", "prompt": "Tell a long story.", "max_tokens": 400,
                      "stream": True}) as response:
            lines = response.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            assert pool.in_use == 1
        deadline = time.monotonic() + 2.0
        while (pool.in_use or runtime.assistant.decoder.pool.engine.live) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.in_use == 0 and pool.engine.live == 0
        # Both sequences serve new answers.
        with concurrent.futures.ThreadPoolExecutor(2) as executor:
            assert all(r["choices"] for r in executor.map(lambda i: ask(url, i), range(2)))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_question_asked_again_restores_its_prompt_and_a_deletion_forgets_it(
        toy_pair: Any, gateway: str, tmp_path: Path) -> None:
    with toy_daemon(toy_pair, tmp_path, gateway, max_parallel=2, threshold=1.0) as (url, runtime):
        engine = runtime.assistant.decoder.pool.engine
        uploaded = httpx.post(f"{url}/v1/documents", json={
            "name": "memo.txt", "text": "The quokka budget for the harbour office is 9 coins."})
        document = uploaded.json()["data"][0]["id"]

        def chat(question: str) -> dict[str, Any]:
            reply = httpx.post(f"{url}/v1/chat/completions", timeout=300, json={
                "model": "tandem-toy", "max_tokens": 8,
                "messages": [{"role": "user", "content": question}]})
            assert reply.status_code == 200, reply.text
            return dict(reply.json())

        first = chat("What is the quokka budget?")
        assert first["tandem"]["passages"][0]["document_name"] == "memo.txt"
        chat("Which office has a budget?")  # the same sequence now holds another prompt
        restored = engine.stats.restored_prefix_tokens
        again = chat("What is the quokka budget?")  # restored from the cache, not prefilled
        assert engine.stats.restored_prefix_tokens > restored
        assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        assert len(engine.prompt_cache) >= 1
        assert httpx.delete(f"{url}/v1/documents/{document}").status_code == 200
        assert len(engine.prompt_cache) == 0
        assert all(engine.model.cached_tokens(seq) == [] for seq in range(engine.model.n_seq_max))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_stream_burst_sets_how_often_a_streaming_answer_is_woken(
        toy_pair: Any, gateway: str, tmp_path: Path) -> None:
    """Streamed tokens come stream_burst at a time; the text is the same either way."""
    texts, wakeups = {}, {}
    for burst in (1, 8):
        with toy_daemon(toy_pair, tmp_path / str(burst), gateway, threshold=1.0,
                        stream_burst=burst) as (url, runtime):
            engine = runtime.assistant.decoder.pool.engine
            assert engine.wake_every == burst
            with httpx.stream("POST", f"{url}/v1/completions", timeout=300, json={
                    "model": "tandem-toy", "max_tokens": 40, "stream": True,
                    "prompt": "Question 1: what is the capital of the country number 1?"}) as reply:
                assert reply.status_code == 200
                chunks = [json.loads(line[len("data: "):]) for line in reply.iter_lines()
                          if line.startswith("data: {")]
            texts[burst] = "".join(chunk["choices"][0]["text"] for chunk in chunks
                                   if chunk.get("choices"))
            wakeups[burst] = engine.stats.ahead_wakeups
    assert texts[1] == texts[8] and texts[1]
    assert wakeups[8] < wakeups[1]
