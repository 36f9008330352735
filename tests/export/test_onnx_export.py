"""ONNX export: parity with torch, metadata that client.switch accepts, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from client.switch import OnnxSwitch  # noqa: E402
from export.onnx_export import (  # noqa: E402
    ExportError,
    export_command,
    export_onnx,
    exportable_module,
    parity_check,
)
from export.train import FitConfig, fit, load_head, save_head  # noqa: E402
from tests.export.test_train import synthetic_data  # noqa: E402


@pytest.fixture(scope="module")
def head_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = synthetic_data()
    config = FitConfig(init_epochs=20, marginal_epochs=20)
    head, report = fit(data, config, progress=False)
    path = tmp_path_factory.mktemp("head") / "head.pt"
    save_head(path, head, data=data, config=config, report=report)
    return path


def test_export_matches_torch_and_loads_in_the_client(head_file: Path, tmp_path: Path) -> None:
    head = load_head(head_file)
    report = export_onnx(head, tmp_path / "switch.onnx", threshold=0.4, thresholds={"0.1": 0.7})
    assert report.parity_max_abs_diff <= 1e-5 and report.parity_inputs == 1000
    switch = OnnxSwitch(tmp_path / "switch.onnx", hidden_size=16, base_fingerprint="a" * 64)
    assert switch.threshold == pytest.approx(0.4)
    hidden = synthetic_data().hidden
    assert np.abs(switch.score(hidden) - head.deferral_probability(hidden)).max() <= 1e-5
    metadata = {p.key: p.value for p in onnx.load(str(tmp_path / "switch.onnx")).metadata_props}
    assert metadata["tandem.head_type"] == "linear"
    assert json.loads(metadata["tandem.thresholds"]) == {"0.1": 0.7}
    assert metadata["tandem.base_model_sha256"] == "b" * 64
    assert "base" in json.loads(metadata["tandem.training_manifest"])


def test_parity_check_catches_a_graph_that_differs(head_file: Path, tmp_path: Path) -> None:
    head = load_head(head_file)
    export_onnx(head, tmp_path / "switch.onnx")
    other = load_head(head_file)
    other.module.body.bias.data += 0.5
    with pytest.raises(ExportError, match="differs"):
        parity_check(exportable_module(other), tmp_path / "switch.onnx", hidden_size=16)


def test_export_command_takes_the_calibrated_threshold(head_file: Path, tmp_path: Path) -> None:
    calibration = {"quantile_thresholds": {"0.2": 0.61}, "chosen": {"threshold": 0.61}, "sweep": []}
    (tmp_path / "calibration.json").write_text(json.dumps(calibration))
    report = export_command(head_file, tmp_path / "switch.onnx",
                            calibration_path=tmp_path / "calibration.json")
    assert report.threshold == pytest.approx(0.61)
    with pytest.raises(ExportError, match="outside"):
        export_command(head_file, tmp_path / "bad.onnx", threshold=1.5)
