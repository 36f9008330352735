"""The switch head: an ONNX model that maps base hidden states to deferral probabilities.

The head is a pure scorer (``SwitchScorer.score``); the threshold decision lives in
decoding.py. A head is only meaningful for the base model it was trained on, so its ONNX
metadata names that base (hidden size and vocabulary fingerprint) and loading refuses a head
made for another base. export/onnx_export.py writes the metadata keys defined here.

This module is the one boundary where onnxruntime failures become ``client.errors`` exceptions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from client.errors import SwitchError, SwitchMismatchError

HIDDEN_SIZE_KEY = "tandem.hidden_size"
BASE_FINGERPRINT_KEY = "tandem.base_fingerprint"
THRESHOLD_KEY = "tandem.threshold"
HEAD_TYPE_KEY = "tandem.head_type"
BASE_MODEL_SHA256_KEY = "tandem.base_model_sha256"
REQUIRED_KEYS = (HIDDEN_SIZE_KEY, BASE_FINGERPRINT_KEY, THRESHOLD_KEY)

INSTALL_HINT = "pip install onnxruntime-gpu (or onnxruntime)"


class SwitchScorer(Protocol):
    def score(self, hidden: np.ndarray) -> np.ndarray:
        """Deferral probabilities [n] for hidden states [n, d]."""
        ...


class NeverDefer:
    """A switch that always keeps the base: used when no head exists for the base model."""

    threshold = 1.0

    def score(self, hidden: np.ndarray) -> np.ndarray:
        return np.zeros(len(hidden), dtype=np.float32)


@dataclass(frozen=True)
class HeadMetadata:
    """What the head says about itself, from its ONNX metadata."""

    hidden_size: int
    base_fingerprint: str
    threshold: float
    head_type: str = ""
    base_model_sha256: str = ""

    @classmethod
    def from_map(cls, values: dict[str, str], *, source: Path) -> HeadMetadata:
        missing = [key for key in REQUIRED_KEYS if key not in values]
        if missing:
            raise SwitchError(f"switch head {source} lacks metadata {', '.join(missing)}; "
                              "re-export it with `tandem export onnx`")
        try:
            hidden_size = int(values[HIDDEN_SIZE_KEY])
            threshold = float(values[THRESHOLD_KEY])
        except ValueError as exc:
            raise SwitchError(f"switch head {source} has malformed metadata: {exc}") from exc
        if not 0.0 <= threshold <= 1.0:
            raise SwitchError(f"switch head {source} has threshold {threshold} outside [0, 1]")
        return cls(hidden_size, values[BASE_FINGERPRINT_KEY], threshold,
                   values.get(HEAD_TYPE_KEY, ""), values.get(BASE_MODEL_SHA256_KEY, ""))


class OnnxSwitch:
    """A switch head run by onnxruntime, checked against the base it will score."""

    def __init__(self, path: str | Path, *, hidden_size: int, base_fingerprint: str,
                 provider: Literal["cpu", "cuda"] = "cpu", n_threads: int = 1) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SwitchError(f"switch head not found: {self.path}")
        onnxruntime = _onnxruntime()
        self._errors = _ort_errors(onnxruntime)
        self._session = _open_session(onnxruntime, self.path, provider=provider,
                                      n_threads=n_threads, errors=self._errors)
        self.provider = self._session.get_providers()[0]
        self.metadata = HeadMetadata.from_map(
            dict(self._session.get_modelmeta().custom_metadata_map), source=self.path
        )
        self._check_base(hidden_size, base_fingerprint)
        self._input_name = self._check_signature(hidden_size)

    @classmethod
    def for_base(cls, path: str | Path, base: Any, *, provider: Literal["cpu", "cuda"] = "cpu",
                 n_threads: int = 1) -> OnnxSwitch:
        """Load a head for ``base`` (anything with ``hidden_size`` and ``fingerprint``)."""
        return cls(path, hidden_size=base.hidden_size, base_fingerprint=base.fingerprint,
                   provider=provider, n_threads=n_threads)

    @property
    def threshold(self) -> float:
        """The head's calibrated default threshold."""
        return self.metadata.threshold

    def _check_base(self, hidden_size: int, base_fingerprint: str) -> None:
        if self.metadata.base_fingerprint != base_fingerprint:
            raise SwitchMismatchError(
                f"switch head {self.path.name} was trained for a base with vocabulary "
                f"{self.metadata.base_fingerprint}, but the base model has "
                f"{base_fingerprint}; use the head exported for this base"
            )
        if self.metadata.hidden_size != hidden_size:
            raise SwitchMismatchError(
                f"switch head {self.path.name} expects hidden size {self.metadata.hidden_size}, "
                f"but the base model has hidden size {hidden_size}"
            )

    def _check_signature(self, hidden_size: int) -> str:
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise SwitchError(f"switch head {self.path.name} must have one input and one output, "
                              f"not {len(inputs)} and {len(outputs)}")
        shape = list(inputs[0].shape)
        width = shape[-1] if shape else None
        if len(shape) != 2 or (isinstance(width, int) and width != hidden_size):
            raise SwitchError(f"switch head {self.path.name} takes input of shape {shape}, "
                              f"expected [n, {hidden_size}]")
        if inputs[0].type != "tensor(float)":
            raise SwitchError(f"switch head {self.path.name} takes {inputs[0].type}, "
                              "expected tensor(float)")
        return str(inputs[0].name)

    def score(self, hidden: np.ndarray) -> np.ndarray:
        """Deferral probabilities [n] (float32) for hidden states [n, d]."""
        rows = np.ascontiguousarray(hidden, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.metadata.hidden_size:
            raise SwitchError(f"switch head expects hidden states [n, {self.metadata.hidden_size}], "
                              f"got {list(rows.shape)}")
        try:
            result = self._session.run(None, {self._input_name: rows})[0]
        except self._errors as exc:
            raise SwitchError(f"switch head failed on a batch of {rows.shape[0]}: {exc}") from exc
        probabilities = np.asarray(result, dtype=np.float32).reshape(-1)
        if probabilities.shape[0] != rows.shape[0]:
            raise SwitchError(f"switch head returned {probabilities.shape[0]} scores "
                              f"for {rows.shape[0]} hidden states")
        return probabilities


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise SwitchError(f"onnxruntime is not installed: {INSTALL_HINT}") from exc
    return onnxruntime


def _ort_errors(onnxruntime: Any) -> tuple[type[BaseException], ...]:
    state = onnxruntime.capi.onnxruntime_pybind11_state
    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return (*(getattr(state, name) for name in names if hasattr(state, name)), RuntimeError)


def _providers(onnxruntime: Any, provider: str) -> list[str]:
    # CUDA only when configured and compiled in; onnxruntime itself falls back to CPU when the
    # CUDA libraries are present but no device is.
    if provider == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _open_session(onnxruntime: Any, path: Path, *, provider: str, n_threads: int,
                  errors: tuple[type[BaseException], ...]) -> Any:
    options = onnxruntime.SessionOptions()
    # The head is a few thousand multiply-adds: thread hand-offs would cost more than the math.
    options.intra_op_num_threads = n_threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=options,
                                            providers=_providers(onnxruntime, provider))
    except errors as exc:
        raise SwitchError(f"onnxruntime could not load switch head {path}: {exc}") from exc

