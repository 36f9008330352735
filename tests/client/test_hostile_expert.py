"""A hostile or broken gateway: retries on the wire, total deadlines, reply caps, egress truth.

A real gateway app (uvicorn on 127.0.0.1, a deterministic fake model) sits behind the
fault-injecting proxy, and the real ``HttpExpert``, ``Policy`` (SQLite usage counters) and
``AuditLog`` run against it with the numpy ``TinyLM`` as base.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.audit import AuditLog, read_records, verify
from client.decoding import CoDecoder, DecodingOptions
from client.errors import ExpertUnavailableError
from client.expert import HttpExpert
from client.policy import Policy
from client.settings import PolicySettings
from client.usage import UsageStore
from expert_gateway.app import create_app
from expert_gateway.settings import GatewaySettings
from tandem_core.errors import ConfigError, ExpertError
from tandem_core.protocol import ContinueReply, TokenLogprob
from tests.client.test_decoding import TinyLM
from tests.expert_gateway.conftest import FAKE_FINGERPRINT, FakeBackend, serve
from tests.fault_proxy import FaultProxy, _read_request

AUDIT_KEY = b"hostile-expert-audit-key-0123456789"
VOCAB = 50


class AlwaysDefer:
    threshold = 0.5

    def score(self, hidden: Any) -> Any:
        return np.ones(len(hidden), dtype=np.float32)


@pytest.fixture(scope="module")
def gateway_url() -> Iterator[str]:
    app = create_app(GatewaySettings(auth={"enabled": False}), backend=FakeBackend(vocab_size=VOCAB))
    with serve(app) as url:
        yield url


@contextlib.contextmanager
def raw_server(handler: Callable[[socket.socket], None]) -> Iterator[str]:
    """A one-thread-per-connection TCP server whose replies ``handler`` writes by hand."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=_guarded, args=(handler, connection), daemon=True).start()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5)


def _guarded(handler: Callable[[socket.socket], None], connection: socket.socket) -> None:
    with contextlib.suppress(OSError), connection:
        _read_request(connection, b"")  # the whole request, so closing sends no reset
        handler(connection)
        connection.shutdown(socket.SHUT_WR)
        connection.settimeout(5)
        while connection.recv(65536):  # let the client read everything before closing
            pass


def expert_for(url: str, **overrides: Any) -> HttpExpert:
    options: dict[str, Any] = {"timeout_s": 5.0, "retries": 0}
    options.update(overrides)
    return HttpExpert(url, model="fake-expert", tokenizer=FAKE_FINGERPRINT, **options)


def decoder_for(tmp_path: Path, expert: Any, **policy: Any) -> tuple[CoDecoder, Policy, Path]:
    settings = PolicySettings(usage_db=tmp_path / "usage.sqlite3",
                              audit_log=tmp_path / "audit.jsonl", **policy)
    base = TinyLM(3, vocab_size=VOCAB, n_ctx=128)
    rules = Policy(settings, tokenizer=base, usage=UsageStore(settings.usage_db))
    audit = AuditLog(settings.audit_log, key=AUDIT_KEY)
    decoder = CoDecoder(base=base, switch=AlwaysDefer(), expert=expert, policy=rules, audit=audit,
                        options=DecodingOptions(max_tokens=6, lookahead=2))
    return decoder, rules, settings.audit_log


def test_every_retry_is_audited_before_it_is_sent_and_counted(tmp_path: Path,
                                                              gateway_url: str) -> None:
    """Finding 3: against 503s, the wire, the audit log and the usage counters all agree."""
    with FaultProxy(gateway_url, schedule=["status_503", "status_503", "pass"]) as proxy:
        expert = expert_for(proxy.url, retries=2, sleep=lambda _: None)
        decoder, rules, audit_path = decoder_for(tmp_path, expert)
        result = decoder.generate([7, 8, 9], request_id="retry-1")
        expert.close()
    wire = [request for request in proxy.requests if "/v1/continue" in request.line]
    sent = [record for record in read_records(audit_path)
            if record["kind"] == "egress" and record["sent"]]
    usage = rules._usage.current("retry-1")["request"]
    rules.close()
    assert len(wire) >= 3
    assert len(sent) == len(wire), (len(sent), len(wire))  # old code: 1 record for 3 requests
    assert usage.calls == len(wire)
    assert [(r["session"], r["held"], r["sent_tokens"]) for r in sent] == [
        (w.body["session"], w.body["held"], w.body["tokens"]) for w in wire]
    assert result.egress.calls == len(wire)
    outcomes = [record for record in read_records(audit_path) if record["kind"] == "outcome"]
    assert [o["error"] is not None for o in outcomes[:2]] == [True, True]
    verify(audit_path, key=AUDIT_KEY)


def test_a_retry_past_the_cap_is_denied_not_sent(tmp_path: Path, gateway_url: str) -> None:
    with FaultProxy(gateway_url, schedule=["status_503"] * 5) as proxy:
        expert = expert_for(proxy.url, retries=4, sleep=lambda _: None)
        decoder, rules, _ = decoder_for(tmp_path, expert, per_request_calls=2)
        result = decoder.generate([7, 8, 9], request_id="capped")
        expert.close()
    rules.close()
    assert len(proxy.requests) == 2  # the third attempt would pass the cap: not sent
    assert result.tokens[0].provenance == "denied"
    assert "cap:per_request_calls" in result.egress.denial_reasons


def test_the_deadline_is_total_not_per_read(gateway_url: str) -> None:
    """Finding 8: a reply trickled a byte every 0.3 s used to hold a 1.5 s call for ~60 s."""
    with FaultProxy(gateway_url, schedule=["trickle"], trickle_s=0.3) as proxy:
        expert = expert_for(proxy.url, timeout_s=1.5)
        started = time.monotonic()
        with pytest.raises(ExpertUnavailableError, match="did not answer within"):
            expert.continue_(session="s", held=0, tokens=[3, 4], max_tokens=2)
        elapsed = time.monotonic() - started
        expert.close()
    assert elapsed < 3.0, elapsed


def test_trickled_headers_also_meet_the_deadline() -> None:
    def trickle(connection: socket.socket) -> None:
        for byte in b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-pad: " + b"a" * 100:
            connection.sendall(bytes([byte]))
            time.sleep(0.2)

    with raw_server(trickle) as url:
        expert = expert_for(url, timeout_s=1.0)
        started = time.monotonic()
        with pytest.raises(ExpertUnavailableError):
            expert.continue_(session="s", held=0, tokens=[3], max_tokens=1)
        assert time.monotonic() - started < 2.5
        expert.close()


@pytest.mark.parametrize("chunked", [False, True])
def test_an_oversized_reply_is_refused_before_parsing(chunked: bool) -> None:
    """Finding 8: a 400 MB reply took the client to 822 MiB; now it stops at the cap."""
    block = b"[" + b"1," * 32_000
    sent = [0]

    def huge(connection: socket.socket) -> None:
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" +
                (b"transfer-encoding: chunked\r\n\r\n" if chunked else
                 b"content-length: 400000000\r\n\r\n"))
        connection.sendall(head)
        for _ in range(6000):  # ~400 MB if nobody stops reading
            payload = (b"%x\r\n" % len(block) + block + b"\r\n") if chunked else block
            connection.sendall(payload)
            sent[0] += len(block)

    with raw_server(huge) as url:
        expert = expert_for(url, max_reply_bytes=256 * 1024)
        with pytest.raises(ExpertError, match="256 ?144|262144"):
            expert.continue_(session="s", held=0, tokens=[3], max_tokens=1)
        expert.close()
    assert sent[0] < 50 * 1024 * 1024


def test_error_text_is_capped_in_the_exception_and_the_audit_log(tmp_path: Path) -> None:
    message = "x" * 1_000_000

    def verbose(connection: socket.socket) -> None:
        body = ('{"error": {"type": "unavailable", "message": "' + message + '"}}').encode()
        connection.sendall(b"HTTP/1.1 503 Unavailable\r\ncontent-type: application/json\r\n"
                           b"content-length: %d\r\n\r\n" % len(body) + body)

    with raw_server(verbose) as url:
        expert = expert_for(url, retries=0)
        decoder, rules, audit_path = decoder_for(tmp_path, expert)
        decoder.generate([7, 8], request_id="verbose", max_tokens=1)
        expert.close()
    rules.close()
    errors = [r["error"] for r in read_records(audit_path) if r["kind"] == "outcome"]
    assert errors and all(len(error) < 1000 for error in errors)
    assert audit_path.stat().st_size < 20_000


def test_an_unreachable_gateway_is_attempted_but_not_delivered(tmp_path: Path) -> None:
    """Finding 5: a refused connection used to read as '2 calls, N tokens sent'."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    expert = expert_for(f"http://127.0.0.1:{port}", retries=1, sleep=lambda _: None)
    decoder, rules, audit_path = decoder_for(tmp_path, expert)
    result = decoder.generate([7, 8, 9], request_id="refused", max_tokens=2)
    expert.close()
    rules.close()
    egress = result.egress
    assert egress.calls >= 2 and egress.delivered == 0 and egress.tokens_delivered == 0
    assert egress.answered == 0 and "cannot reach" in egress.last_error
    outcomes = [r for r in read_records(audit_path) if r["kind"] == "outcome"]
    assert outcomes and all(r["delivered"] is False and r["answered"] is False for r in outcomes)
    from client.assistant import summarize_egress

    logged = summarize_egress(list(read_records(audit_path)))
    assert (logged.calls, logged.delivered) == (egress.calls, 0)


def test_delivered_and_answered_are_told_apart(tmp_path: Path, gateway_url: str) -> None:
    with FaultProxy(gateway_url, schedule=["status_503", "pass"]) as proxy:
        expert = expert_for(proxy.url, retries=0)
        decoder, rules, _ = decoder_for(tmp_path, expert)
        result = decoder.generate([7, 8, 9], request_id="told", max_tokens=3)
        expert.close()
    rules.close()
    egress = result.egress
    assert egress.calls == len(proxy.requests)
    assert egress.delivered == egress.calls and egress.answered == egress.calls


def test_fail_closed_when_the_audit_log_cannot_be_written(tmp_path: Path,
                                                         gateway_url: str) -> None:
    """No durable record, no request: the token is denied with reason audit_unavailable."""
    with FaultProxy(gateway_url) as proxy:
        expert = expert_for(proxy.url)
        decoder, rules, audit_path = decoder_for(tmp_path, expert)
        # Something that cannot be appended to stands where the log should be (the tests run
        # as root, so permissions alone would not stop the write).
        audit_path.mkdir()
        result = decoder.generate([7, 8, 9], request_id="closed", max_tokens=2)
        expert.close()
    rules.close()
    assert proxy.requests == []
    assert all(token.provenance == "denied" for token in result.tokens)
    assert result.egress.denial_reasons == ("audit_unavailable",)


def test_fail_closed_when_fsync_fails(tmp_path: Path, gateway_url: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with FaultProxy(gateway_url) as proxy:
        expert = expert_for(proxy.url)
        decoder, rules, _ = decoder_for(tmp_path, expert)
        monkeypatch.setattr(os, "fsync", full)
        result = decoder.generate([7, 8, 9], request_id="full", max_tokens=2)
        monkeypatch.undo()
        expert.close()
    rules.close()
    assert proxy.requests == []
    assert [token.provenance for token in result.tokens] == ["denied", "denied"]


@pytest.mark.parametrize("top", [[(999_999, -0.1)], [(3, 1e308)], [(3, float("nan"))]])
def test_compose_validates_top_logprobs_like_tokens(top: list[tuple[int, float]]) -> None:
    """Finding 9: id 999999 raised IndexError; huge log-probs gave NaN. Now: a fallback."""

    class Lying:
        destination, model = "http://lying", "fake"

        def continue_(self, **kwargs: Any) -> ContinueReply:
            return ContinueReply.model_construct(
                tokens=[3], held=4, model="fake",
                logprobs=[TokenLogprob.model_construct(token=3, logprob=-0.1, top=top)])

    decoder = CoDecoder(base=TinyLM(3, vocab_size=VOCAB), switch=AlwaysDefer(), expert=Lying(),
                        options=DecodingOptions(max_tokens=3, compose=True, temperature=0.7,
                                                seed=1))
    result = decoder.generate([7, 8])
    assert [token.provenance for token in result.tokens] == ["fallback"] * 3
    assert all(0 <= token.token_id < VOCAB for token in result.tokens)


@pytest.mark.parametrize("fault", ["oov", "huge_logprob", "malformed", "truncated", "drop"])
def test_invalid_replies_on_the_wire_are_never_accepted(fault: str, gateway_url: str,
                                                        tmp_path: Path) -> None:
    with FaultProxy(gateway_url, schedule=[fault] * 20) as proxy:
        expert = expert_for(proxy.url, retries=0)
        decoder, rules, _ = decoder_for(tmp_path, expert)
        decoder.options = DecodingOptions(max_tokens=4, lookahead=2, compose=True, seed=1,
                                          temperature=0.5)
        result = decoder.generate([7, 8, 9], request_id=f"bad-{fault}")
        expert.close()
    rules.close()
    assert result.provenance_counts["expert"] == 0
    assert result.provenance_counts["fallback"] + result.provenance_counts["denied"] == 4


def test_plain_http_to_another_machine_is_refused() -> None:
    """Finding 11: tokens and the bearer key would cross the network in clear."""
    with pytest.raises(ConfigError, match="refusing plain http"):
        expert_for("http://10.20.30.40:8400")
    with pytest.raises(ConfigError, match="refusing plain http"):
        expert_for("http://gateway.example.com")
    for url in ("https://gateway.example.com", "http://127.0.0.1:9", "http://localhost:9",
                "http://[::1]:9"):
        expert_for(url).close()
    expert_for("http://10.20.30.40:8400", allow_insecure_http=True).close()
    from client.settings import ExpertSettings

    with pytest.raises(ConfigError, match="allow_insecure_http"):
        HttpExpert.from_settings(ExpertSettings(url="http://gpu-box:8400"), tokenizer="ab" * 32)
