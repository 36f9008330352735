"""The ONNX switch head: scores, metadata checks and clear errors (heads built with onnx.helper)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from client.errors import SwitchError, SwitchMismatchError
from client.switch import (
    BASE_FINGERPRINT_KEY,
    HEAD_TYPE_KEY,
    HIDDEN_SIZE_KEY,
    THRESHOLD_KEY,
    OnnxSwitch,
)

FINGERPRINT = "ab" * 32
OTHER_FINGERPRINT = "cd" * 32


def write_linear_head(path: Path, weights: np.ndarray, bias: float, *,
                      metadata: dict[str, str] | None = None, input_width: int | str | None = None,
                      input_type: int = TensorProto.FLOAT) -> Path:
    """Write sigmoid(hidden @ weights + bias) as an ONNX model with Tandem's metadata."""
    width = weights.shape[0]
    nodes = [
        helper.make_node("MatMul", ["hidden", "weights"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["deferral_probability"]),
    ]
    graph = helper.make_graph(
        nodes, "switch",
        [helper.make_tensor_value_info("hidden", input_type,
                                       ["n", width if input_width is None else input_width])],
        [helper.make_tensor_value_info("deferral_probability", TensorProto.FLOAT, ["n", 1])],
        initializer=[
            numpy_helper.from_array(weights.reshape(width, 1).astype(np.float32), "weights"),
            numpy_helper.from_array(np.array([bias], dtype=np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entries = metadata if metadata is not None else {
        HIDDEN_SIZE_KEY: str(width), BASE_FINGERPRINT_KEY: FINGERPRINT, THRESHOLD_KEY: "0.5",
        HEAD_TYPE_KEY: "linear",
    }
    helper.set_model_props(model, entries)
    onnx.save(model, str(path))
    return path


def test_scores_are_sigmoid_of_the_linear_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=8).astype(np.float32)
    switch = OnnxSwitch(write_linear_head(tmp_path / "head.onnx", weights, 0.25),
                        hidden_size=8, base_fingerprint=FINGERPRINT)
    hidden = rng.normal(size=(5, 8)).astype(np.float32)
    expected = 1.0 / (1.0 + np.exp(-(hidden @ weights + 0.25)))
    scores = switch.score(hidden)
    assert scores.shape == (5,)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    assert switch.threshold == 0.5
    assert switch.metadata.head_type == "linear"
    assert switch.provider == "CPUExecutionProvider"


def test_for_base_reads_size_and_fingerprint_from_the_base(tmp_path: Path) -> None:
    class Base:
        hidden_size = 4
        fingerprint = FINGERPRINT

    path = write_linear_head(tmp_path / "head.onnx", np.ones(4, dtype=np.float32), 0.0)
    assert OnnxSwitch.for_base(path, Base()).score(np.zeros((1, 4))).tolist() == [0.5]


def test_a_head_for_another_base_names_both_fingerprints(tmp_path: Path) -> None:
    path = write_linear_head(tmp_path / "head.onnx", np.ones(4, dtype=np.float32), 0.0)
    with pytest.raises(SwitchMismatchError) as caught:
        OnnxSwitch(path, hidden_size=4, base_fingerprint=OTHER_FINGERPRINT)
    assert FINGERPRINT in str(caught.value) and OTHER_FINGERPRINT in str(caught.value)


def test_a_head_for_another_hidden_size_is_refused(tmp_path: Path) -> None:
    path = write_linear_head(tmp_path / "head.onnx", np.ones(4, dtype=np.float32), 0.0)
    with pytest.raises(SwitchMismatchError, match="hidden size 4.*hidden size 6"):
        OnnxSwitch(path, hidden_size=6, base_fingerprint=FINGERPRINT)


def test_missing_file_is_a_switch_error(tmp_path: Path) -> None:
    with pytest.raises(SwitchError, match="not found"):
        OnnxSwitch(tmp_path / "absent.onnx", hidden_size=4, base_fingerprint=FINGERPRINT)


def test_a_corrupt_file_is_a_switch_error(tmp_path: Path) -> None:
    path = tmp_path / "head.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(SwitchError, match="could not load"):
        OnnxSwitch(path, hidden_size=4, base_fingerprint=FINGERPRINT)


def test_missing_metadata_names_the_keys(tmp_path: Path) -> None:
    path = write_linear_head(tmp_path / "head.onnx", np.ones(4, dtype=np.float32), 0.0,
                             metadata={HIDDEN_SIZE_KEY: "4"})
    with pytest.raises(SwitchError, match=f"{BASE_FINGERPRINT_KEY}, {THRESHOLD_KEY}"):
        OnnxSwitch(path, hidden_size=4, base_fingerprint=FINGERPRINT)


def test_malformed_metadata_is_a_switch_error(tmp_path: Path) -> None:
    metadata = {HIDDEN_SIZE_KEY: "four", BASE_FINGERPRINT_KEY: FINGERPRINT, THRESHOLD_KEY: "0.5"}
    path = write_linear_head(tmp_path / "head.onnx", np.ones(4, dtype=np.float32), 0.0,
                             metadata=metadata)
    with pytest.raises(SwitchError, match="malformed"):
        OnnxSwitch(path, hidden_size=4, base_fingerprint=FINGERPRINT)


def test_a_threshold_outside_the_unit_interval_is_refused(tmp_path: Path) -> None:
    metadata = {HIDDEN_SIZE_KEY: "4", BASE_FINGERPRINT_KEY: FINGERPRINT, THRESHOLD_KEY: "1.5"}
    path = write_linear_head(tmp_path / "head.onnx", np.ones(4, dtype=np.float32), 0.0,
                             metadata=metadata)
    with pytest.raises(SwitchError, match="outside"):
        OnnxSwitch(path, hidden_size=4, base_fingerprint=FINGERPRINT)


def test_a_graph_of_the_wrong_width_is_refused(tmp_path: Path) -> None:
    # Metadata claims 4 but the graph's input is fixed at 3 columns.
    metadata = {HIDDEN_SIZE_KEY: "3", BASE_FINGERPRINT_KEY: FINGERPRINT, THRESHOLD_KEY: "0.5"}
    path = write_linear_head(tmp_path / "head.onnx", np.ones(3, dtype=np.float32), 0.0,
                             metadata=metadata)
    with pytest.raises(SwitchMismatchError):
        OnnxSwitch(path, hidden_size=4, base_fingerprint=FINGERPRINT)
    metadata[HIDDEN_SIZE_KEY] = "4"
    path = write_linear_head(tmp_path / "head.onnx", np.ones(3, dtype=np.float32), 0.0,
                             metadata=metadata)
    with pytest.raises(SwitchError, match=r"shape \['n', 3\]"):
        OnnxSwitch(path, hidden_size=4, base_fingerprint=FINGERPRINT)


def test_a_head_taking_doubles_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "head.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["hidden"], ["out"])], "switch",
        [helper.make_tensor_value_info("hidden", TensorProto.DOUBLE, ["n", 4])],
        [helper.make_tensor_value_info("out", TensorProto.DOUBLE, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {HIDDEN_SIZE_KEY: "4", BASE_FINGERPRINT_KEY: FINGERPRINT,
                                   THRESHOLD_KEY: "0.5"})
    onnx.save(model, str(path))
    with pytest.raises(SwitchError, match="tensor\\(double\\)"):
        OnnxSwitch(path, hidden_size=4, base_fingerprint=FINGERPRINT)


def test_scoring_the_wrong_shape_is_a_switch_error(tmp_path: Path) -> None:
    switch = OnnxSwitch(write_linear_head(tmp_path / "head.onnx", np.ones(4, dtype=np.float32), 0),
                        hidden_size=4, base_fingerprint=FINGERPRINT)
    with pytest.raises(SwitchError, match=r"\[n, 4\], got \[2, 5\]"):
        switch.score(np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(SwitchError):
        switch.score(np.zeros(4, dtype=np.float32))


def test_a_head_returning_the_wrong_count_is_a_switch_error(tmp_path: Path) -> None:
    # A head whose output has one value per hidden unit, not per row.
    path = tmp_path / "head.onnx"
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["hidden"], ["out"])], "switch",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {HIDDEN_SIZE_KEY: "4", BASE_FINGERPRINT_KEY: FINGERPRINT,
                                   THRESHOLD_KEY: "0.5"})
    onnx.save(model, str(path))
    switch = OnnxSwitch(path, hidden_size=4, base_fingerprint=FINGERPRINT)
    with pytest.raises(SwitchError, match="8 scores for 2"):
        switch.score(np.zeros((2, 4), dtype=np.float32))


def test_an_onnxruntime_failure_while_scoring_is_a_switch_error(tmp_path: Path) -> None:
    # Reshape to a fixed 3 elements fails at run time for any batch of width 4.
    path = tmp_path / "head.onnx"
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["hidden", "shape"], ["out"])], "switch",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [3])],
        initializer=[numpy_helper.from_array(np.array([3], dtype=np.int64), "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {HIDDEN_SIZE_KEY: "4", BASE_FINGERPRINT_KEY: FINGERPRINT,
                                   THRESHOLD_KEY: "0.5"})
    onnx.save(model, str(path))
    switch = OnnxSwitch(path, hidden_size=4, base_fingerprint=FINGERPRINT)
    with pytest.raises(SwitchError, match="failed on a batch of 2") as caught:
        switch.score(np.zeros((2, 4), dtype=np.float32))
    assert caught.value.__cause__ is not None


def test_cuda_when_asked_and_cpu_when_no_device_can_run_it(tmp_path: Path) -> None:
    # onnxruntime-gpu lists CUDA even without a usable device and then falls back to the CPU;
    # either way the head must load and score.
    path = write_linear_head(tmp_path / "head.onnx", np.ones(4, dtype=np.float32), 0.0)
    switch = OnnxSwitch(path, hidden_size=4, base_fingerprint=FINGERPRINT, provider="cuda")
    assert switch.provider in ("CUDAExecutionProvider", "CPUExecutionProvider")
    np.testing.assert_allclose(switch.score(np.zeros((2, 4), dtype=np.float32)), [0.5, 0.5])
