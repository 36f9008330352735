"""The composition root on the real toy pair: every part opened, every part closed, also on failure."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from client.composition import Egress, GatewayExpert, LocalExpert, PartsSpec, open_parts
from client.errors import SwitchError
from client.expert import HttpExpert, InProcessExpert
from client.settings import BaseModelSettings, ExpertSettings, PolicySettings
from client.switch import NeverDefer
from tandem_core.base_model import BaseModel, LlamaModel
from tandem_core.errors import ModelError, ModelLoadError

KEY = SecretStr("k" * 32)


def spec(toy_pair: Any, tmp_path: Path, **changes: Any) -> PartsSpec:
    fields: dict[str, Any] = {
        "base_path": Path(toy_pair.base_gguf),
        "expert": LocalExpert(Path(toy_pair.expert_gguf)),
        "egress": Egress(tmp_path / "audit.jsonl", KEY),
        "base": BaseModelSettings(n_ctx=256, max_parallel=2),
    }
    return PartsSpec(**{**fields, **changes})


@pytest.fixture()
def closed_models(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the GGUF files whose LlamaModel was closed, in order."""
    closed: list[str] = []
    original = LlamaModel.close

    def recording(self: LlamaModel) -> None:
        if self._context is not None:
            closed.append(self.path.name)
        original(self)

    monkeypatch.setattr(LlamaModel, "close", recording)
    return closed


def test_an_in_process_expert_and_no_head(toy_pair: Any, tmp_path: Path,
                                          closed_models: list[str]) -> None:
    with contextlib.ExitStack() as stack:
        parts = open_parts(stack, spec(toy_pair, tmp_path))
        assert isinstance(parts.base, BaseModel) and isinstance(parts.switch, NeverDefer)
        assert isinstance(parts.expert, InProcessExpert)
        assert parts.expert.base is parts.expert_model
        assert (parts.base.seq_capacity, parts.base.n_seq_max) == (256, 2)  # max_parallel of n_ctx
        assert parts.policy is None
        reply = parts.expert.continue_(session="s", held=0, tokens=parts.base.tokenize("1+2="),
                                       max_tokens=2)
        assert len(reply.tokens) >= 1
    assert closed_models == [Path(toy_pair.expert_gguf).name, Path(toy_pair.base_gguf).name]
    with pytest.raises(ModelError, match="closed"):
        parts.base.tokenize("1")


def test_a_gateway_expert_and_a_policy(toy_pair: Any, tmp_path: Path) -> None:
    gateway = GatewayExpert(ExpertSettings(url="http://127.0.0.1:9", model="toy-expert"))
    egress = Egress(tmp_path / "audit.jsonl", KEY, PolicySettings(audit_log=tmp_path / "unused"))
    with contextlib.ExitStack() as stack:
        parts = open_parts(stack, spec(toy_pair, tmp_path, expert=gateway, egress=egress))
        assert isinstance(parts.expert, HttpExpert) and parts.expert_model is None
        assert parts.expert.tokenizer == parts.base.fingerprint
        assert parts.policy is not None
        assert parts.audit.path == tmp_path / "audit.jsonl"


def test_a_part_that_fails_closes_the_ones_opened_before(toy_pair: Any, tmp_path: Path,
                                                         closed_models: list[str]) -> None:
    with pytest.raises(SwitchError), contextlib.ExitStack() as stack:
        open_parts(stack, spec(toy_pair, tmp_path, switch_path=tmp_path / "missing.onnx"))
    assert closed_models == [Path(toy_pair.base_gguf).name]
    closed_models.clear()
    with pytest.raises(ModelLoadError), contextlib.ExitStack() as stack:
        open_parts(stack, spec(toy_pair, tmp_path, expert=LocalExpert(tmp_path / "missing.gguf")))
    assert closed_models == [Path(toy_pair.base_gguf).name]


@pytest.mark.parametrize("flash", [False, True])
def test_the_base_settings_choose_flash_attention(toy_pair: Any, tmp_path: Path,
                                                  flash: bool) -> None:
    base = BaseModelSettings(n_ctx=256, max_parallel=2, flash_attention=flash)
    with contextlib.ExitStack() as stack:
        parts = open_parts(stack, spec(toy_pair, tmp_path, base=base))
        assert parts.base.flash_attention is flash
        tokens = parts.base.tokenize("1+2=", add_bos=True)
        assert parts.base.decode(tokens).logits.shape == (len(tokens), parts.base.vocab_size)
