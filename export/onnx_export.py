"""Export of a trained head to ONNX for the edge, with metadata and a parity check.

The graph takes one input, ``hidden`` [n, d] float32 (the base's final hidden states), and
returns ``deferral_probability`` [n], so ``client.switch.OnnxSwitch`` runs every head type the
same way. The ``mlp`` head also needs the base's entropy and top-1 margin; the graph computes
them from ``hidden`` with the base's own output matrix (read from its GGUF), because the hidden
state is after the final norm and the LM head is a plain matrix product.

Every export is checked against onnxruntime on 1,000 random inputs (max abs diff <= 1e-5).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.switch import (
    BASE_FINGERPRINT_KEY,
    BASE_MODEL_SHA256_KEY,
    HEAD_TYPE_KEY,
    HIDDEN_SIZE_KEY,
    THRESHOLD_KEY,
)
from export.train import LoadedHead, import_torch, load_head
from tandem_core.errors import TandemError

THRESHOLDS_KEY = "tandem.thresholds"
TRAINING_MANIFEST_KEY = "tandem.training_manifest"
FEATURE_NAMES_KEY = "tandem.feature_names"
CALIBRATION_KEY = "tandem.calibration"
INPUT_NAME = "hidden"
OUTPUT_NAME = "deferral_probability"
PARITY_INPUTS = 1000
PARITY_TOLERANCE = 1e-5
DEFAULT_THRESHOLD = 0.5
OPSET = 17


class ExportError(TandemError):
    """The head could not be exported, or the export does not match the torch head."""


@dataclass(frozen=True)
class ExportReport:
    path: Path
    head_type: str
    threshold: float
    parity_max_abs_diff: float
    parity_inputs: int


def lm_head_weights(gguf_path: Path) -> np.ndarray:
    """The base's output matrix [vocab, d] in float32 (tied models reuse the token embedding)."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read base model {gguf_path}: {exc}") from exc
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    tensor = tensors.get("output.weight") or tensors.get("token_embd.weight")
    if tensor is None:
        raise ExportError(f"{gguf_path} has neither output.weight nor token_embd.weight")
    weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.ascontiguousarray(weights.reshape(-1, weights.shape[-1]), dtype=np.float32)


def exportable_module(head: LoadedHead, *, output_weights: np.ndarray | None = None) -> Any:
    """The head with its sigmoid (and, for mlp, its feature computation) as one torch module."""
    torch = import_torch()

    class ExportedHead(torch.nn.Module):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.head = head.module
            if output_weights is not None:
                self.register_buffer("output_weights", torch.from_numpy(output_weights.copy()))
            else:
                self.output_weights = None

        def forward(self, hidden: Any) -> Any:
            features = None if self.output_weights is None else graph_features(hidden @ self.output_weights.T)
            return torch.sigmoid(self.head(hidden, features))

    module = ExportedHead()
    module.eval()
    return module


def graph_features(logits: Any) -> Any:
    """Entropy and top-1 margin in torch ops, the same definition as ``collect.base_features``."""
    torch = import_torch()
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = torch.exp(log_probs)
    entropy = -(probs * log_probs).sum(dim=-1)
    top_two = torch.topk(probs, 2, dim=-1).values
    return torch.stack([entropy, top_two[:, 0] - top_two[:, 1]], dim=-1)


def export_onnx(head: LoadedHead, out: Path, *, threshold: float | None = None,
                thresholds: Mapping[str, float] | None = None,
                calibration: Mapping[str, Any] | None = None,
                base_gguf: Path | None = None, seed: int = 0) -> ExportReport:
    """Write ``out``, stamp the metadata, and check parity with onnxruntime."""
    torch = import_torch()
    chosen = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if not 0.0 <= chosen <= 1.0:
        raise ExportError(f"threshold {chosen} is outside [0, 1]")
    output_weights = _output_weights(head, base_gguf)
    module = exportable_module(head, output_weights=output_weights)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, head.hidden_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is legacy
        torch.onnx.export(module, (example,), str(out), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "positions"}, OUTPUT_NAME: {0: "positions"}})
    _stamp_metadata(out, head, chosen, thresholds or {}, calibration)
    difference = parity_check(module, out, hidden_size=head.hidden_size, seed=seed,
                              center=head.module.input_mean[:head.hidden_size].numpy(),
                              scale=head.module.input_scale[:head.hidden_size].numpy())
    return ExportReport(out, head.head_type, chosen, difference, PARITY_INPUTS)


def _output_weights(head: LoadedHead, base_gguf: Path | None) -> np.ndarray | None:
    if not head.feature_names:
        return None
    path = base_gguf or Path(head.training_manifest.get("base", {}).get("path", ""))
    if not path.is_file():
        raise ExportError(f"the {head.head_type} head computes base features from the base's output "
                          f"matrix: pass --base MODEL.gguf (not found: {path})")
    weights = lm_head_weights(path)
    if weights.shape[1] != head.hidden_size:
        raise ExportError(f"{path} has hidden size {weights.shape[1]}, the head expects {head.hidden_size}")
    return weights


def _stamp_metadata(out: Path, head: LoadedHead, threshold: float, thresholds: Mapping[str, float],
                    calibration: Mapping[str, Any] | None) -> None:
    import onnx

    model = onnx.load(str(out))
    values = {
        HIDDEN_SIZE_KEY: str(head.hidden_size),
        BASE_FINGERPRINT_KEY: head.base_fingerprint,
        BASE_MODEL_SHA256_KEY: head.base_model_sha256,
        THRESHOLD_KEY: repr(threshold),
        HEAD_TYPE_KEY: head.head_type,
        THRESHOLDS_KEY: json.dumps(dict(thresholds), sort_keys=True),
        FEATURE_NAMES_KEY: ",".join(head.feature_names),
        TRAINING_MANIFEST_KEY: json.dumps(head.training_manifest, sort_keys=True),
    }
    if calibration is not None:
        values[CALIBRATION_KEY] = json.dumps(calibration, sort_keys=True)
    del model.metadata_props[:]
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(out))


def parity_check(module: Any, path: Path, *, hidden_size: int, seed: int = 0,
                 center: np.ndarray | None = None, scale: np.ndarray | None = None,
                 count: int = PARITY_INPUTS, tolerance: float = PARITY_TOLERANCE) -> float:
    """Max abs difference between torch and onnxruntime on ``count`` random hidden states.

    Inputs are drawn around the training statistics so they exercise the head where it is used.
    """
    torch = import_torch()
    import onnxruntime

    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((count, hidden_size)).astype(np.float32)
    if center is not None and scale is not None:
        hidden = (hidden * scale + center).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(hidden)).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = session.run([OUTPUT_NAME], {INPUT_NAME: hidden})[0]
    if actual.shape != expected.shape:
        raise ExportError(f"ONNX output has shape {actual.shape}, torch gives {expected.shape}")
    difference = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))
    if not difference <= tolerance:
        raise ExportError(f"ONNX export differs from the torch head by {difference:.3g} "
                          f"(> {tolerance}) on {count} random inputs")
    return difference


def export_command(head_path: Path, out: Path, *, calibration_path: Path | None = None,
                   threshold: float | None = None, base_gguf: Path | None = None) -> ExportReport:
    """What ``tandem export onnx`` runs: thresholds from a calibration file unless given."""
    head = load_head(head_path)
    thresholds: dict[str, float] = {}
    calibration: dict[str, Any] | None = None
    if calibration_path is not None:
        calibration = _read_calibration(calibration_path)
        thresholds = {str(k): float(v) for k, v in calibration.get("quantile_thresholds", {}).items()}
        if threshold is None and calibration.get("chosen") is not None:
            threshold = float(calibration["chosen"]["threshold"])
    return export_onnx(head, out, threshold=threshold, thresholds=thresholds,
                       calibration=_calibration_summary(calibration), base_gguf=base_gguf)


def _read_calibration(path: Path) -> dict[str, Any]:
    try:
        calibration: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read calibration {path}: {exc}") from exc
    return calibration


def _calibration_summary(calibration: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if calibration is None:
        return None
    return {key: calibration[key] for key in ("chosen", "pick", "sweep") if key in calibration}
