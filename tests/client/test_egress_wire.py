"""What actually crosses the wire: a capturing TCP proxy between HttpExpert and a real gateway.

The client decodes a slice of the toy corpus with real models under llama.cpp (the toy pair,
and SmolLM2-135M as base and expert), the ``redact_private`` policy and the audit log; every
byte it sends to the gateway (uvicorn on 127.0.0.1, real llama.cpp expert) passes through the
proxy and is recorded. Then:
- no piece of any private passage reaches the wire (the placeholder stands in for it), and
- the calls on the wire are exactly the egress records the audit log says were sent;
and a client killed with SIGKILL while a call is on the wire leaves a log that verifies and ends
with that call's egress record.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import SecretStr

from client.audit import AuditLog, read_records, verify
from client.prompting import plain_prompt
from client.settings import PolicySettings

pytestmark = pytest.mark.slow

AUDIT_KEY = b"wire-test-audit-key-0123456789"
EXAMPLES = 5
MAX_TOKENS = 20
THRESHOLD = 0.35


class CapturingProxy:
    """A TCP relay on 127.0.0.1 that keeps every byte each client connection sends upstream."""

    def __init__(self, upstream: tuple[str, int], *, forward_requests: int | None = None) -> None:
        self.upstream = upstream
        self.forward_requests = forward_requests  # then hold everything: a call that never returns
        self.sent: list[bytearray] = []  # one buffer per client connection
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._closing = False
        self.port = self._listener.getsockname()[1]
        self._start(self._accept_loop)

    def _start(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            buffer = bytearray()
            with self._lock:
                self._sockets += [client, upstream]
                self.sent.append(buffer)
            self._start(self._pump, client, upstream, buffer)
            self._start(self._pump, upstream, client, None)

    def _pump(self, source: socket.socket, sink: socket.socket, record: bytearray | None) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if record is not None:
                    with self._lock:
                        record += data
                    if self._holding():
                        continue
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def _holding(self) -> bool:
        if self.forward_requests is None:
            return False
        with self._lock:
            seen = sum(bytes(buffer).count(b"POST /v1/continue") for buffer in self.sent)
        return seen > self.forward_requests

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._listener.close()
        with self._lock:
            sockets = list(self._sockets)
        for connection in sockets:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def requests(self) -> list[tuple[str, dict[str, Any]]]:
        """Every HTTP request seen: (request line, JSON body or {})."""
        with self._lock:
            streams = [bytes(buffer) for buffer in self.sent]
        found = []
        for stream in streams:
            while b"\r\n\r\n" in stream:
                head, _, rest = stream.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {name.lower(): value.strip() for name, _, value in
                           (line.partition(":") for line in lines[1:])}
                assert "chunked" not in headers.get("transfer-encoding", "")
                length = int(headers.get("content-length", "0"))
                if len(rest) < length:
                    break  # a request still arriving
                body, stream = rest[:length], rest[length:]
                found.append((lines[0], json.loads(body) if body else {}))
        return found


@contextlib.contextmanager
def serve(app: Any) -> Iterator[tuple[str, int]]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[:2]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@dataclass
class Gateway:
    address: tuple[str, int]
    key: str
    model: str


@dataclass(frozen=True)
class Stack:
    """The models and the corpus slice one run of these tests uses."""

    name: str
    base_gguf: Path
    expert_gguf: Path
    lines: list[dict[str, Any]]


@pytest.fixture(scope="module", params=["toy", "smollm2"])
def stack(request: pytest.FixtureRequest) -> Stack:
    """The toy pair on its test corpus; and SmolLM2 as base and expert, whose real BPE
    vocabulary (multi-character tokens) checks the redaction on token boundaries too."""
    if request.param == "toy":
        toy = request.getfixturevalue("toy_pair")
        with open(toy.test_jsonl) as corpus:
            lines = [json.loads(line) for _, line in zip(range(EXAMPLES), corpus, strict=False)]
        return Stack("toy", Path(toy.base_gguf), Path(toy.expert_gguf), lines)
    from export.toy_data import make_example
    from tandem_core.base_model import smollm2_path

    rng = random.Random(5)
    examples = [make_example(rng, rng.randint(10, 99), rng.randint(10, 99)) for _ in range(EXAMPLES)]
    return Stack("smollm2", smollm2_path(), smollm2_path(), [asdict(item) for item in examples])


@pytest.fixture(scope="module")
def base(stack: Stack) -> Iterator[Any]:
    from tandem_core.base_model import LlamaModel

    model = LlamaModel(stack.base_gguf, n_ctx=1024)
    yield model
    model.close()


@pytest.fixture(scope="module")
def gateway(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    from expert_gateway.app import create_app
    from expert_gateway.backends.llama_cpp import LlamaCppBackend
    from expert_gateway.keys import KeyStore
    from expert_gateway.settings import GatewaySettings

    keys_file = tmp_path_factory.mktemp("gateway-keys") / "keys.json"
    _, secret = KeyStore(keys_file).add("wire-test", requests_per_minute=100_000,
                                         tokens_per_day=10**9)
    backend = LlamaCppBackend.open(stack.expert_gguf, name="expert", n_ctx=2048,
                                   n_batch=256, n_threads=2, slots=2)
    app = create_app(GatewaySettings(auth={"keys_file": keys_file}), backend=backend)
    try:
        with serve(app) as address:
            yield Gateway(address, secret, "expert")
    finally:
        backend.close()


@pytest.fixture(scope="module")
def switch_path(base: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random linear head: defers at some positions and not others."""
    from client.switch import BASE_FINGERPRINT_KEY, HIDDEN_SIZE_KEY, THRESHOLD_KEY
    from tests.client.test_switch import write_linear_head

    weights = np.random.default_rng(11).normal(size=base.hidden_size).astype(np.float32)
    weights *= 3.0 / np.sqrt(base.hidden_size)
    return Path(write_linear_head(tmp_path_factory.mktemp("head") / "switch.onnx", weights, 0.0,
                                  metadata={HIDDEN_SIZE_KEY: str(base.hidden_size),
                                            BASE_FINGERPRINT_KEY: base.fingerprint,
                                            THRESHOLD_KEY: "0.5"}))


@pytest.fixture(scope="module")
def switch(base: Any, switch_path: Path) -> Any:
    from client.switch import OnnxSwitch

    return OnnxSwitch.for_base(switch_path, base)


@dataclass
class Run:
    proxy: CapturingProxy
    audit_path: Path
    answers: list[Any]
    usage_calls: int = 0  # calls the usage database counted


def run_corpus(tmp_path: Path, stack: Stack, base: Any, switch: Any, gateway: Gateway, *,
               examples: int = EXAMPLES, lookahead: int = 4, threshold: float = THRESHOLD,
               faults: list[str] | None = None, retries: int = 0,
               **policy_settings: Any) -> Run:
    from client.decoding import CoDecoder, DecodingOptions
    from client.expert import HttpExpert
    from client.policy import Policy
    from tests.fault_proxy import FaultProxy

    upstream = gateway.address
    faulty = None
    if faults is not None:  # the client's bytes are captured before the faults are injected
        faulty = FaultProxy(f"http://{gateway.address[0]}:{gateway.address[1]}", schedule=faults)
        upstream = ("127.0.0.1", faulty.port)
    proxy = CapturingProxy(upstream)
    # The corpus answers copy the passage's numbers: derived = "send" lets those calls go.
    settings = PolicySettings(usage_db=tmp_path / "usage.sqlite3", audit_log=tmp_path / "audit.jsonl",
                              **{"derived": "send", **policy_settings})
    policy = Policy.from_settings(settings, tokenizer=base)
    audit = AuditLog(settings.audit_log, key=AUDIT_KEY)
    expert = HttpExpert(f"http://127.0.0.1:{proxy.port}", model=gateway.model,
                        tokenizer=base.fingerprint, token=SecretStr(gateway.key), retries=retries,
                        timeout_s=60, sleep=lambda _: None)
    decoder = CoDecoder(base=base, switch=switch, expert=expert, policy=policy, audit=audit,
                        options=DecodingOptions(threshold=threshold, lookahead=lookahead,
                                                max_tokens=MAX_TOKENS))
    try:
        answers = [decoder.generate(plain_prompt([line["passage"]], line["question"]),
                                    request_id=f"wire-{index}")
                   for index, line in enumerate(stack.lines[:examples])]
        usage = policy._usage
        run = Run(proxy, settings.audit_log, answers)
        run.usage_calls = sum(usage.current(f"wire-{index}")["request"].calls
                              for index in range(len(answers)))
    finally:
        expert.close()
        proxy.close()
        if faulty is not None:
            faulty.close()
        policy.close()
    return run


def continue_calls(run: Run) -> list[dict[str, Any]]:
    requests = run.proxy.requests()
    assert all(line.startswith("POST /v1/continue ") for line, _ in requests), requests
    return [body for _, body in requests]


def test_no_private_text_reaches_the_wire_and_the_audit_log_matches_it(
    tmp_path: Path, stack: Stack, base: Any, switch: Any, gateway: Gateway
) -> None:
    run = run_corpus(tmp_path, stack, base, switch, gateway, mode="redact_private")
    calls = continue_calls(run)
    assert len(calls) >= EXAMPLES  # the head defers somewhere in every answer
    assert any(token.provenance == "expert" for answer in run.answers for token in answer.tokens)

    # Rebuild each expert session's sequence from the wire alone, as the gateway does.
    sessions: dict[str, list[int]] = {}
    for body in calls:
        sessions[body["session"]] = sessions.get(body["session"], [])[:body["held"]] + body["tokens"]
        wire_text = base.detokenize(sessions[body["session"]]).decode("utf-8", "replace")
        for line in stack.lines:
            passage = line["passage"]
            size = PolicySettings().taint_min_chars
            leaked = [passage[i:i + size] for i in range(len(passage) - size + 1)
                      if passage[i:i + size] in wire_text]
            assert leaked == [], (leaked, wire_text)
        assert wire_text.startswith("Document: [private]\nQuestion: ")

    # The wire and the audit log agree call for call: session, held and the exact tokens.
    verify(run.audit_path, key=AUDIT_KEY)
    egress = [record for record in read_records(run.audit_path) if record["kind"] == "egress"]
    sent = [record for record in egress if record["sent"]]
    assert [(body["session"], body["held"], body["tokens"]) for body in calls] == [
        (record["session"], record["held"], record["sent_tokens"]) for record in sent]
    wire_tokens = {token for body in calls for token in body["tokens"]}
    audit_tokens = {token for record in sent for token in record["sent_tokens"]}
    assert wire_tokens == audit_tokens
    for record in sent:
        assert record["sent_text"] == base.detokenize(record["sent_tokens"]).decode("utf-8", "replace")
    _check_first_calls(run, stack, base, tmp_path)
    # Every sent call has an outcome record.
    outcomes = {record["egress_id"] for record in read_records(run.audit_path)
                if record["kind"] == "outcome"}
    assert {record["id"] for record in sent} <= outcomes


def _check_first_calls(run: Run, stack: Stack, base: Any, tmp_path: Path) -> None:
    """Token level: the first call of each answer carries the prompt with the placeholder."""
    from client.policy import Policy
    from client.usage import UsageStore

    viewer = Policy(PolicySettings(derived="send"), tokenizer=base,
                    usage=UsageStore(tmp_path / "viewer.db"))
    first_calls: dict[str, list[int]] = {}
    for body in continue_calls(run):
        first_calls.setdefault(body["session"], body["tokens"])
    assert len(first_calls) == len(run.answers)
    for line, first in zip(stack.lines, first_calls.values(), strict=False):
        tokens = list(base.tokenize("", add_bos=True))
        mask = [False] * len(tokens)
        for segment in plain_prompt([line["passage"]], line["question"]):
            ids = base.tokenize(segment.text, special=not segment.private)
            tokens += ids
            mask += [segment.private] * len(ids)
        view = viewer.remote_view(tokens, mask)
        assert first[:len(view)] == view
        assert not _contains(first, base.tokenize(line["passage"]))
    viewer.close()


def _contains(sequence: list[int], part: list[int]) -> bool:
    return any(sequence[i:i + len(part)] == part for i in range(len(sequence) - len(part) + 1))


def test_retries_are_on_the_wire_in_the_audit_log_and_in_the_caps(
    tmp_path: Path, stack: Stack, base: Any, switch: Any, gateway: Gateway
) -> None:
    """Against a gateway answering 503, every request on the wire (retries included) has its own
    egress record, written before it was sent, and counts against the caps."""
    faults = ["status_503", "status_503", "pass", "status_503", "pass"] * 4
    run = run_corpus(tmp_path, stack, base, switch, gateway, examples=2, retries=2,
                     faults=faults, mode="redact_private")
    calls = continue_calls(run)
    verify(run.audit_path, key=AUDIT_KEY)
    sent = [record for record in read_records(run.audit_path)
            if record["kind"] == "egress" and record["sent"]]
    assert len(calls) >= 5  # the retries went out
    assert [(body["session"], body["held"], body["tokens"]) for body in calls] == [
        (record["session"], record["held"], record["sent_tokens"]) for record in sent]
    assert run.usage_calls == len(calls)
    assert sum(answer.egress.calls for answer in run.answers) == len(calls)
    failed = [record for record in read_records(run.audit_path)
              if record["kind"] == "outcome" and record["error"]]
    assert len(failed) >= 3 and all(record["delivered"] for record in failed)


def test_dry_run_sends_nothing_but_audits_every_decision(
    tmp_path: Path, stack: Stack, base: Any, switch: Any, gateway: Gateway
) -> None:
    run = run_corpus(tmp_path, stack, base, switch, gateway, examples=2, dry_run=True)
    assert run.proxy.requests() == []
    egress = [record for record in read_records(run.audit_path) if record["kind"] == "egress"]
    assert egress and all(not record["sent"] and record["decision"]["reason"] == "dry_run"
                          for record in egress)
    assert all(record["dry_run_tokens"] for record in egress)
    denied = [token for answer in run.answers for token in answer.tokens
              if token.provenance == "denied"]
    assert len(denied) >= len(egress)
    assert verify(run.audit_path, key=AUDIT_KEY).records == len(egress)


def test_a_per_request_cap_stops_egress_on_the_wire(
    tmp_path: Path, stack: Stack, base: Any, switch: Any, gateway: Gateway
) -> None:
    run = run_corpus(tmp_path, stack, base, switch, gateway, examples=2,
                     lookahead=1, threshold=0.0, per_request_calls=1)  # defer at every token
    calls = continue_calls(run)
    assert len({body["session"] for body in calls}) == len(calls)  # one call per answer at most
    reasons = {record["decision"]["reason"] for record in read_records(run.audit_path)
               if record["kind"] == "egress"}
    assert reasons == {"ok", "cap:per_request_calls"}



_CLIENT_SCRIPT = """
import json, sys
from pathlib import Path
from pydantic import SecretStr
from client.audit import AuditLog
from tandem_core.base_model import LlamaModel
from client.decoding import CoDecoder, DecodingOptions
from client.expert import HttpExpert
from client.policy import Policy
from client.prompting import plain_prompt
from client.settings import PolicySettings
from client.switch import OnnxSwitch

setup = json.loads(sys.argv[1])
base = LlamaModel(setup["base"], n_ctx=1024)
settings = PolicySettings(usage_db=Path(setup["dir"]) / "usage.sqlite3", derived="send")
decoder = CoDecoder(
    base=base, switch=OnnxSwitch.for_base(Path(setup["switch"]), base),
    expert=HttpExpert(setup["url"], model=setup["model"], tokenizer=base.fingerprint,
                      token=SecretStr(setup["key"]), retries=0, timeout_s=600),
    policy=Policy.from_settings(settings, tokenizer=base),
    audit=AuditLog(Path(setup["audit"]), key=setup["audit_key"].encode()),
    options=DecodingOptions(threshold=setup["threshold"], lookahead=4,
                            max_tokens=setup["max_tokens"]))
for index, line in enumerate(setup["lines"]):
    decoder.generate(plain_prompt([line["passage"]], line["question"]), request_id=f"kill-{index}")
"""


def test_kill_9_mid_call_leaves_a_verifiable_log_ending_in_the_call_on_the_wire(
    tmp_path: Path, stack: Stack, switch_path: Path, gateway: Gateway
) -> None:
    import os
    import signal
    import subprocess
    import sys

    proxy = CapturingProxy(gateway.address, forward_requests=3)
    audit_path = tmp_path / "audit.jsonl"
    setup = {"base": str(stack.base_gguf), "switch": str(switch_path), "dir": str(tmp_path),
             "url": f"http://127.0.0.1:{proxy.port}", "model": gateway.model, "key": gateway.key,
             "audit": str(audit_path), "audit_key": AUDIT_KEY.decode(),
             "lines": stack.lines, "max_tokens": MAX_TOKENS,
             "threshold": THRESHOLD}
    client = subprocess.Popen([sys.executable, "-c", _CLIENT_SCRIPT, json.dumps(setup)],
                              cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 120
        while len(proxy.requests()) < 4:  # the fourth call is on the wire and never answered
            assert client.poll() is None, "the client exited before its fourth call"
            assert time.monotonic() < deadline, "the client made fewer than four calls"
            time.sleep(0.05)
        os.kill(client.pid, signal.SIGKILL)
        client.wait(timeout=30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=30)
        proxy.close()
    verify(audit_path, key=AUDIT_KEY)
    records = list(read_records(audit_path))
    last = records[-1]
    assert last["kind"] == "egress" and last["sent"]
    assert not any(record.get("egress_id") == last["id"] for record in records)
    in_flight = proxy.requests()[3][1]
    assert (last["session"], last["held"], last["sent_tokens"]) == (
        in_flight["session"], in_flight["held"], in_flight["tokens"])
