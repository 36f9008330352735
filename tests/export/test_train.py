"""Head training: the marginal-likelihood loss, weak labels, frozen base, determinism."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from export.collect import CollectedData  # noqa: E402
from export.train import (  # noqa: E402
    FitConfig,
    TrainingError,
    build_head,
    fit,
    load_head,
    marginal_nll,
    save_head,
    split_examples,
    weak_labels,
)


def synthetic_data(positions: int = 600, hidden_size: int = 16, seed: int = 0) -> CollectedData:
    """Positions whose first hidden coordinate says whether the expert knows better."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((positions, hidden_size)).astype(np.float32)
    hard = hidden[:, 0] > 0.8
    gold = np.zeros(positions, np.int32)
    return CollectedData(
        hidden=hidden,
        features=rng.standard_normal((positions, 2)).astype(np.float32),
        base_logprob=np.where(hard, -6.0, -0.05).astype(np.float32),
        expert_logprob=np.where(hard, -0.05, -4.0).astype(np.float32),
        base_argmax=np.where(hard, 1, 0).astype(np.int32),
        expert_argmax=np.where(hard, 0, 2).astype(np.int32),
        gold=gold,
        example_index=(np.arange(positions) // 6).astype(np.int32),
        answer_position=(np.arange(positions) % 6).astype(np.int32),
        manifest={"base": {"fingerprint": "a" * 64, "sha256": "b" * 64}},
    )


def test_marginal_loss_matches_hand_computation() -> None:
    logits = torch.tensor([0.0, math.log(3.0)])  # s = 0.5 and s = 0.75
    base = torch.tensor([math.log(0.2), math.log(0.6)])
    expert = torch.tensor([math.log(0.8), math.log(0.1)])
    # -log((1-s) P_base + s P_expert) per position, averaged.
    first = -math.log(0.5 * 0.2 + 0.5 * 0.8)
    second = -math.log(0.25 * 0.6 + 0.75 * 0.1)
    assert marginal_nll(logits, base, expert).item() == pytest.approx((first + second) / 2, abs=1e-6)


def test_marginal_loss_is_stable_for_extreme_logits() -> None:
    loss = marginal_nll(torch.tensor([80.0, -80.0]), torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0]))
    assert loss.item() == pytest.approx((3.0 + 2.0) / 2, abs=1e-4)


def test_weak_labels_mark_positions_only_the_expert_gets_right() -> None:
    data = synthetic_data(positions=4)
    data = CollectedData(**{**data.__dict__, "base_argmax": np.array([0, 1, 0, 1], np.int32),
                            "expert_argmax": np.array([0, 0, 1, 1], np.int32)})
    assert weak_labels(data).tolist() == [0.0, 1.0, 0.0, 0.0]


def test_gradients_reach_only_the_head() -> None:
    head = build_head("linear", 16)
    hidden = torch.randn(5, 16, requires_grad=True)
    base = torch.randn(5, requires_grad=True)
    expert = torch.randn(5, requires_grad=True)
    marginal_nll(head(hidden), base.detach(), expert.detach()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert hidden.grad is not None  # sanity: autograd ran through the inputs...
    assert base.grad is None and expert.grad is None  # ...but the frozen base got nothing
    buffers = dict(head.named_buffers())
    assert not any(b.requires_grad for b in buffers.values())


def test_fit_learns_the_switch_and_is_deterministic(tmp_path: Path) -> None:
    data = synthetic_data()
    config = FitConfig(init_epochs=60, marginal_epochs=80, seed=3)
    first, report = fit(data, config, progress=False)
    second, _ = fit(data, config, progress=False)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert report.validation_loss < report.validation_loss_base_only
    assert report.validation_loss < report.validation_loss_expert_only
    save_head(tmp_path / "head.pt", first, data=data, config=config, report=report)
    loaded = load_head(tmp_path / "head.pt")
    scores = loaded.deferral_probability(data.hidden)
    hard = data.hidden[:, 0] > 0.8
    assert np.mean((scores > 0.5) == hard) > 0.95
    assert loaded.base_fingerprint == "a" * 64


def test_mlp_head_trains_on_hidden_plus_features() -> None:
    data = synthetic_data()
    head, report = fit(data, FitConfig(head_type="mlp", init_epochs=30, marginal_epochs=40), progress=False)
    assert report.validation_loss < report.validation_loss_base_only
    assert head(torch.from_numpy(data.hidden), torch.from_numpy(data.features)).shape == (600,)


def test_split_keeps_examples_whole() -> None:
    examples = np.repeat(np.arange(10), 3)
    held_out = split_examples(examples, fraction=0.2, seed=0)
    assert held_out.sum() == 6
    for example in range(10):
        assert len(set(held_out[examples == example])) == 1


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="unknown head type"):
        fit(synthetic_data(), FitConfig(head_type="deep"), progress=False)  # type: ignore[arg-type]
    with pytest.raises(TrainingError, match="not found"):
        load_head(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a head")
    with pytest.raises(TrainingError, match="not a head"):
        load_head(tmp_path / "junk.pt")


def test_cli_fit_reports_bad_data_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli import main

    assert main(["train", "fit", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "h.pt")]) == 1
    error = capsys.readouterr().err
    assert error.startswith("tandem: error: no manifest.json") and error.count("\n") == 1


def test_cli_eval_names_a_missing_corpus(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from client.cli import main

    code = main(["eval", "--corpus", str(tmp_path / "none.jsonl"), "--switch", str(tmp_path / "s.onnx"),
                 "--json", str(tmp_path / "out.json"), "--base", str(tmp_path / "base.gguf"),
                 "--expert-gguf", str(tmp_path / "expert.gguf")])
    assert code == 1
    assert "not found" in capsys.readouterr().err
