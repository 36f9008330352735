"""The seams between the decoder and what governs egress: policy decisions and the audit log.

CoDecoder asks an ``EgressPolicy`` before every remote call and writes every decision to an
``AuditSink`` before anything is sent. The policy sees the whole local sequence with its private
mask and what the expert session already holds, and answers with the exact remote view and how
much of it is new; the decoder sends only ``decision.remote_view[decision.send_from:]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tandem_core.tokens import common_prefix_length


@dataclass(frozen=True)
class EgressRequest:
    """What the decoder wants to show the expert."""

    request_id: str
    session: str
    local_tokens: Sequence[int]
    private_mask: Sequence[bool]
    held_view: Sequence[int]  # the remote view the expert session already holds
    # Per local token, why a private token is private ("passage:<document>", "assistant-turn",
    # "repeat:<document>"); empty: no sources known. Added for issue 14 (privacy provenance).
    private_sources: Sequence[str] = ()


@dataclass(frozen=True)
class EgressDecision:
    """The policy's answer; ``reason`` is machine-readable (``ok``, ``cap:per_request_calls``...)."""

    allowed: bool
    reason: str
    remote_view: Sequence[int] = ()
    send_from: int = 0  # tokens of remote_view the session already holds
    dry_run: bool = False
    # What the policy hid and why, and which sent tokens were derived from private values
    # (client.policy.Policy._privacy); written to the audit record as "privacy".
    privacy: Mapping[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> Sequence[int]:
        return self.remote_view[self.send_from:]


@dataclass(frozen=True)
class EgressRecord:
    """Written (and fsynced) before the request leaves; also written for denials."""

    request_id: str
    session: str
    destination: str  # gateway URL
    model: str
    decision: EgressDecision
    sent_tokens: Sequence[int]
    sent_text: str
    held: int


@dataclass(frozen=True)
class EgressOutcome:
    """What came back for a call, linked to its EgressRecord by id."""

    received_tokens: Sequence[int] = ()
    accepted_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
    delivered: bool = True  # the request body was (or may have been) written to the socket
    answered: bool = True  # the gateway sent a reply (possibly an error)


@dataclass(frozen=True)
class EgressSummary:
    """What one answer sent to the expert.

    ``calls`` and ``tokens_sent`` count attempts (every request released to the wire, retries
    included); ``delivered`` counts requests whose body was written to the socket (a refused
    connection delivers nothing) and ``answered`` those the gateway replied to. The decoder
    counts every field as it runs; read back from the audit log (an answer cut short), the
    counts known from the log are filled in and the rest stay 0.
    """

    calls: int = 0
    tokens_sent: int = 0
    delivered: int = 0
    tokens_delivered: int = 0
    answered: int = 0
    denial_reasons: tuple[str, ...] = ()
    last_error: str = ""
    tokens_received: int = 0
    denials: int = 0
    failures: int = 0
    deferred_positions: int = 0
    destinations: tuple[str, ...] = ()


class EgressPolicy(Protocol):
    def decide(self, request: EgressRequest) -> EgressDecision:
        """Decide, and if allowed count the call against the caps."""
        ...


class AuditSink(Protocol):
    def record_egress(self, record: EgressRecord) -> str:
        """Durably append the record before anything is sent; return its id."""
        ...

    def record_outcome(self, egress_id: str, outcome: EgressOutcome) -> None:
        """Append the outcome of the call whose egress record has ``egress_id``."""
        ...


class SendEverything:
    """A policy that allows the full local sequence, with no caps: for tests and local experts."""

    def decide(self, request: EgressRequest) -> EgressDecision:
        view = list(request.local_tokens)
        return EgressDecision(True, "ok", view, common_prefix_length(view, request.held_view))
