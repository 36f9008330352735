"""The toy pipeline end to end: collect -> fit -> calibrate -> export -> eval, and its targets.

The pipeline runs once per version of its inputs (cached by ``ensure_toy_head``); these tests
read what it wrote.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def toy_head(toy_pair: Any) -> Path:
    from export.pipeline import ensure_toy_head

    return ensure_toy_head(toy_pair)


@pytest.fixture(scope="module")
def result(toy_head: Path) -> dict[str, Any]:
    from export.pipeline import toy_head_result

    return toy_head_result(toy_head)


def test_toy_targets_are_met(result: dict[str, Any]) -> None:
    from export.pipeline import format_targets

    print(format_targets(result))
    values = {row["key"]: row["value"] for row in result["targets"]}
    assert values["co_llm_exact"] >= 0.90
    assert values["base_exact"] <= 0.30
    assert values["expert_exact"] <= 0.30
    assert values["co_llm_deferred"] <= 0.25
    assert values["random_gap"] >= 0.40
    assert result["targets_met"]


def test_head_loads_in_the_client_for_the_toy_base(toy_pair: Any, toy_head: Path) -> None:
    from client.switch import OnnxSwitch
    from tandem_core.base_model import LlamaModel

    with LlamaModel(toy_pair.base_gguf, n_ctx=256) as base:
        switch = OnnxSwitch.for_base(toy_head, base)
        assert 0.0 < switch.threshold < 1.0
        assert switch.metadata.head_type == "linear"


def test_pipeline_wrote_every_artifact(toy_head: Path, result: dict[str, Any]) -> None:
    folder = toy_head.parent
    for name in ("head.pt", "calibration.json", "calibration.png", "eval.json", "eval.png",
                 "data/train/manifest.json", "data/validation/manifest.json"):
        assert (folder / name).exists(), name
    calibration = json.loads((folder / "calibration.json").read_text())
    assert calibration["chosen"]["deferred_fraction"] <= 0.25
    assert calibration["base_accuracy"] is not None and calibration["sweep"]
    assert result["parity_max_abs_diff"] <= 1e-5
    systems = [row["system"] for row in json.loads((folder / "eval.json").read_text())["results"]]
    assert systems == ["base", "expert", "co-llm", "random"]


def test_collection_went_through_the_gateway_and_the_audit_log(toy_head: Path) -> None:
    folder = toy_head.parent
    manifest = json.loads((folder / "data" / "train" / "manifest.json").read_text())
    assert manifest["expert"]["url"].startswith("http://127.0.0.1:")
    assert manifest["counts"]["remote_calls_this_run"] > 0
    assert (folder / "audit" / "collect.jsonl").stat().st_size > 0
    assert (folder / "audit" / "decode.jsonl").stat().st_size > 0


def test_the_cache_returns_the_same_head(toy_pair: Any, toy_head: Path) -> None:
    from export.pipeline import ensure_toy_head

    assert ensure_toy_head(toy_pair) == toy_head


def test_mlp_head_exports_with_in_graph_features(toy_pair: Any, toy_head: Path, tmp_path: Path) -> None:
    from client.switch import OnnxSwitch
    from export.onnx_export import export_onnx
    from export.train import FitConfig, fit_command, load_head
    from tandem_core.base_model import LlamaModel

    folder = toy_head.parent
    fit_command(folder / "data" / "validation", tmp_path / "mlp.pt",
                FitConfig(head_type="mlp", init_epochs=20, marginal_epochs=20), progress=False)
    report = export_onnx(load_head(tmp_path / "mlp.pt"), tmp_path / "mlp.onnx",
                         base_gguf=Path(toy_pair.base_gguf))
    assert report.parity_max_abs_diff <= 1e-5
    with LlamaModel(toy_pair.base_gguf, n_ctx=256) as base:
        switch = OnnxSwitch.for_base(tmp_path / "mlp.onnx", base)
        output = base.decode(base.tokenize("Question: 1+2?", add_bos=True))
        scores = switch.score(output.hidden)
    assert scores.shape == (output.hidden.shape[0],) and ((scores >= 0) & (scores <= 1)).all()
