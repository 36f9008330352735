"""Egress figures say what really left: attempted, delivered, answered (CLI, API, start-up)."""

from __future__ import annotations

import socket
from pathlib import Path
from types import SimpleNamespace

from client.assistant import Answer, AnswerToken
from client.cli_daemon import egress_line, expert_status
from client.egress import EgressSummary
from client.expert import HttpExpert
from client.openai_api import egress_json
from expert_gateway.app import create_app
from expert_gateway.settings import GatewaySettings
from tests.expert_gateway.conftest import FAKE_FINGERPRINT, FakeBackend, serve


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def unreachable_answer() -> Answer:
    egress = EgressSummary(calls=2, tokens_sent=231, delivered=0, tokens_delivered=0, answered=0,
                           failures=2, last_error="ExpertUnavailableError: cannot reach expert "
                           "gateway http://127.0.0.1:8400/v1/continue: [Errno 111] refused")
    tokens = [AnswerToken(1, "4", "fallback", 0.9), AnswerToken(2, "2", "base", 0.1)]
    return Answer("req-1", "42", tokens, [], "stop", 5, egress)


def test_the_cli_does_not_call_refused_connections_sent() -> None:
    """Finding 5: `tandem ask` with no gateway printed 'egress: 2 calls, 231 tokens sent'."""
    line = egress_line(unreachable_answer())
    assert "231 tokens sent" not in line
    assert "2 calls attempted, 0 delivered, 0 answered; 0 tokens delivered" in line
    assert "expert unreachable: nothing left the machine" in line


def test_the_api_reports_attempted_delivered_and_answered() -> None:
    fields = egress_json(unreachable_answer().egress)
    assert (fields["attempted"], fields["delivered"], fields["answered"]) == (2, 0, 0)
    assert fields["tokens_delivered"] == 0


def test_the_start_up_line_says_whether_the_expert_is_reachable(tmp_path: Path) -> None:
    down = HttpExpert(f"http://127.0.0.1:{closed_port()}", model="fake-expert",
                      tokenizer=FAKE_FINGERPRINT)
    line = expert_status(SimpleNamespace(expert=down))  # type: ignore[arg-type]
    assert "UNREACHABLE" in line and "base model alone" in line
    down.close()
    app = create_app(GatewaySettings(auth={"enabled": False}), backend=FakeBackend())
    with serve(app) as url:
        up = HttpExpert(url, model="fake-expert", tokenizer=FAKE_FINGERPRINT)
        assert expert_status(SimpleNamespace(expert=up)).endswith("is reachable")  # type: ignore[arg-type]
        up.close()
