"""The one composition root: base model, switch head, expert, egress policy and audit log.

The daemon and ``tandem ask`` (``client.assistant.build_runtime``), ``tandem eval`` and
``tandem train calibrate`` (``export.evaluate.open_models``), ``tandem train collect`` and
``tandem train pipeline`` (``export.collect.run_collect``) all open these parts here, in one
order, each registered on the caller's ``contextlib.ExitStack`` as soon as it exists. The stack
closes them in reverse order, also when opening a later part fails, so no caller writes its own
cleanup and no caller builds a part differently from the others (the daemon's base is the one
``tandem eval`` measures).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import SecretStr

from client.settings import BaseModelSettings, ExpertSettings, PolicySettings
from tandem_core.errors import TokenizerMismatchError

if TYPE_CHECKING:
    from client.audit import AuditLog
    from client.expert import HttpExpert, InProcessExpert
    from client.policy import Policy
    from client.switch import SwitchScorer
    from tandem_core.base_model import LlamaModel


@dataclass(frozen=True)
class GatewayExpert:
    """The expert behind a gateway (``ExpertSettings``: URL, deadlines, retries, breaker)."""

    settings: ExpertSettings
    token: SecretStr | None = None  # the gateway key; None for a gateway without auth


@dataclass(frozen=True)
class LocalExpert:
    """An expert GGUF run in this process (evaluation and collection without a gateway)."""

    gguf: Path
    name: str = "toy-expert"


@dataclass(frozen=True)
class Egress:
    """Who decides what leaves the machine and where each decision is recorded."""

    audit_log: Path
    audit_key: SecretStr
    policy: PolicySettings | None = None  # None: send everything (still audited)

    @property
    def rotate_bytes(self) -> int:
        settings = self.policy or PolicySettings()
        return settings.audit_rotate_bytes


@dataclass(frozen=True)
class PartsSpec:
    """What to open; ``base.max_parallel`` sequences of ``base.n_ctx`` tokens share one context."""

    base_path: Path
    expert: GatewayExpert | LocalExpert
    egress: Egress
    base: BaseModelSettings = field(default_factory=lambda: BaseModelSettings(max_parallel=1))
    switch_path: Path | None = None  # None: never defer (no head for this base)
    switch_provider: Literal["cpu", "cuda"] = "cpu"


@dataclass
class Parts:
    """The opened parts; the ExitStack they were opened on owns their lifetimes."""

    base: LlamaModel
    switch: SwitchScorer
    expert: HttpExpert | InProcessExpert
    policy: Policy | None
    audit: AuditLog
    expert_model: LlamaModel | None = None  # the LocalExpert's model


def open_parts(stack: contextlib.ExitStack, spec: PartsSpec) -> Parts:
    """Open every part of ``spec``, each closed by ``stack`` (in reverse order)."""
    from client.audit import AuditLog
    from client.expert import HttpExpert, InProcessExpert
    from client.policy import Policy
    from client.switch import NeverDefer, OnnxSwitch
    from tandem_core.base_model import LlamaModel

    sizes = spec.base
    parallel = sizes.max_parallel
    base = stack.enter_context(LlamaModel(
        spec.base_path, n_ctx=sizes.n_ctx * parallel, n_batch=sizes.n_batch,
        n_threads=sizes.n_threads, n_seq_max=parallel, n_ctx_seq=sizes.n_ctx,
        flash_attention=sizes.flash_attention))
    switch: SwitchScorer = NeverDefer() if spec.switch_path is None else OnnxSwitch.for_base(
        spec.switch_path, base, provider=spec.switch_provider)
    expert: HttpExpert | InProcessExpert
    expert_model = None
    if isinstance(spec.expert, GatewayExpert):
        expert = HttpExpert.from_settings(spec.expert.settings, tokenizer=base.fingerprint,
                                          token=spec.expert.token)
        stack.callback(expert.close)
    else:
        expert_model = stack.enter_context(LlamaModel(
            spec.expert.gguf, n_ctx=sizes.n_ctx, n_batch=sizes.n_batch, n_threads=sizes.n_threads))
        if expert_model.fingerprint != base.fingerprint:
            raise TokenizerMismatchError(
                f"the expert {spec.expert.gguf.name} and the base {spec.base_path.name} have "
                "different vocabularies; token-level Co-LLM needs one")
        expert = InProcessExpert(expert_model, model=spec.expert.name)
    policy = None
    if spec.egress.policy is not None:
        policy = Policy.from_settings(spec.egress.policy, tokenizer=base)
        stack.callback(policy.close)
    audit = AuditLog(spec.egress.audit_log, key=spec.egress.audit_key,
                     rotate_bytes=spec.egress.rotate_bytes)
    return Parts(base, switch, expert, policy, audit, expert_model)
