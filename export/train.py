"""Training of the switch head: weak-supervision init, then the Co-LLM marginal likelihood.

The base model stays frozen (it ships as a quantized GGUF), so training needs only what
``collect.py`` stored per answer position: the base's final hidden state, the base's and the
expert's log-probability of the gold token, both argmaxes and cheap base features. Only the
head's parameters receive gradients.

Two head types: ``linear`` (the paper: ``s = sigmoid(w . h + b)``) and ``mlp`` (hidden state
plus base entropy and top-1 margin, one hidden layer). Inputs are standardised inside the head
with statistics of the training split, so the exported graph is self-contained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from export.collect import CollectedData, load_collected
from export.torch_import import import_torch
from tandem_core.errors import TandemError

if TYPE_CHECKING:
    import torch

HeadType = Literal["linear", "mlp"]
HEAD_TYPES: tuple[HeadType, ...] = ("linear", "mlp")
FEATURE_NAMES = ("entropy", "top1_margin")
INSTALL_HINT = "training needs the train extra: pip install 'tandem[train]'"


class TrainingError(TandemError):
    """The head could not be trained from the given data."""


@dataclass(frozen=True)
class FitConfig:
    """Knobs of ``fit``; the defaults train the toy head in seconds."""

    head_type: HeadType = "linear"
    seed: int = 0
    validation_fraction: float = 0.2
    init_epochs: int = 200
    marginal_epochs: int = 300
    learning_rate: float = 0.02
    weight_decay: float = 1e-4
    mlp_width: int = 64
    batch_size: int = 4096


@dataclass
class FitReport:
    """Losses per phase, so the CLI can print them and the head file can keep them."""

    train_examples: int
    validation_examples: int
    train_positions: int
    validation_positions: int
    positive_labels: int
    init_train_bce: float = math.nan
    init_validation_bce: float = math.nan
    train_loss: float = math.nan
    validation_loss: float = math.nan
    validation_loss_base_only: float = math.nan
    validation_loss_expert_only: float = math.nan
    history: list[dict[str, float]] = field(default_factory=list)


def marginal_nll(logits: torch.Tensor, base_logprob: torch.Tensor,
                 expert_logprob: torch.Tensor) -> torch.Tensor:
    """Mean of ``-logsumexp([log(1-s) + log P_base, log s + log P_expert])`` with s = sigmoid."""
    torch = import_torch()
    functional = torch.nn.functional
    mixed = torch.stack(
        [functional.logsigmoid(-logits) + base_logprob, functional.logsigmoid(logits) + expert_logprob],
        dim=-1,
    )
    return -torch.logsumexp(mixed, dim=-1).mean()


def weak_labels(data: CollectedData) -> np.ndarray:
    """1 where the expert's argmax is the gold token and the base's is not."""
    return ((data.expert_argmax == data.gold) & (data.base_argmax != data.gold)).astype(np.float32)


def build_head(head_type: HeadType, hidden_size: int, *, mlp_width: int = 64) -> torch.nn.Module:
    """A fresh head whose forward maps ``hidden [n, d]`` (and features for mlp) to logits [n]."""
    torch = import_torch()
    nn = torch.nn

    class SwitchHead(nn.Module):  # type: ignore[name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.head_type = head_type
            width = hidden_size + (len(FEATURE_NAMES) if head_type == "mlp" else 0)
            self.register_buffer("input_mean", torch.zeros(width))
            self.register_buffer("input_scale", torch.ones(width))
            if head_type == "linear":
                self.body = nn.Linear(width, 1)
            else:
                self.body = nn.Sequential(nn.Linear(width, mlp_width), nn.GELU(), nn.Linear(mlp_width, 1))

        def forward(self, hidden: Any, features: Any = None) -> Any:
            inputs = hidden if features is None else torch.cat([hidden, features], dim=-1)
            return self.body((inputs - self.input_mean) / self.input_scale).squeeze(-1)

    return SwitchHead()


def split_examples(example_ids: np.ndarray, *, fraction: float, seed: int) -> np.ndarray:
    """A boolean mask over positions: True for positions of validation examples."""
    unique = np.unique(example_ids)
    rng = np.random.default_rng(seed)
    count = max(1, round(len(unique) * fraction)) if len(unique) > 1 else 0
    chosen = rng.choice(unique, size=count, replace=False) if count else np.array([], dtype=unique.dtype)
    return np.isin(example_ids, chosen)


def fit(data: CollectedData, config: FitConfig, *, validation: CollectedData | None = None,
        progress: bool = True) -> tuple[Any, FitReport]:
    """Train a head on ``data``; validate on ``validation`` or on a seeded split of ``data``."""
    torch = import_torch()
    if config.head_type not in HEAD_TYPES:
        raise TrainingError(f"unknown head type {config.head_type!r}; choose one of {HEAD_TYPES}")
    if len(data.gold) == 0:
        raise TrainingError("the collected data holds no answer positions")
    if validation is None:
        held_out = split_examples(data.example_index, fraction=config.validation_fraction, seed=config.seed)
        train_part, validation = data.select(~held_out), data.select(held_out)
    else:
        train_part = data
    _seed_everything(torch, config.seed)
    tensors = _Tensors.of(torch, train_part, config.head_type)
    checks = _Tensors.of(torch, validation, config.head_type) if len(validation.gold) else None
    head = build_head(config.head_type, data.hidden_size, mlp_width=config.mlp_width)
    _set_standardisation(torch, head, tensors)
    labels = torch.from_numpy(weak_labels(train_part))
    report = FitReport(
        train_examples=len(np.unique(train_part.example_index)),
        validation_examples=len(np.unique(validation.example_index)),
        train_positions=len(train_part.gold), validation_positions=len(validation.gold),
        positive_labels=int(labels.sum().item()),
    )
    _weak_supervision(torch, head, tensors, labels, config, report, progress)
    if checks is not None:
        report.init_validation_bce = _evaluate_bce(torch, head, checks, weak_labels(validation))
    _marginal_training(torch, head, tensors, checks, config, report, progress)
    return head, report


@dataclass
class _Tensors:
    hidden: Any
    features: Any
    base_logprob: Any
    expert_logprob: Any

    @classmethod
    def of(cls, torch: Any, data: CollectedData, head_type: HeadType) -> _Tensors:
        features = torch.from_numpy(data.features) if head_type == "mlp" else None
        return cls(torch.from_numpy(data.hidden), features,
                   torch.from_numpy(data.base_logprob), torch.from_numpy(data.expert_logprob))

    def inputs(self, index: Any = None) -> tuple[Any, Any]:
        if index is None:
            return self.hidden, self.features
        return self.hidden[index], None if self.features is None else self.features[index]

    def __len__(self) -> int:
        return int(self.hidden.shape[0])


def _seed_everything(torch: Any, seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)


def _set_standardisation(torch: Any, head: Any, tensors: _Tensors) -> None:
    hidden, features = tensors.inputs()
    inputs = hidden if features is None else torch.cat([hidden, features], dim=-1)
    head.input_mean.copy_(inputs.mean(dim=0))
    head.input_scale.copy_(inputs.std(dim=0, unbiased=False).clamp_min(1e-4))


def _batches(torch: Any, count: int, batch_size: int, generator: Any) -> list[Any]:
    if count <= batch_size:
        return [None]
    order = torch.randperm(count, generator=generator)
    return [order[start:start + batch_size] for start in range(0, count, batch_size)]


def _progress(total: int, description: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(range(total), desc=description, disable=not enabled, leave=False)


def _weak_supervision(torch: Any, head: Any, tensors: _Tensors, labels: Any, config: FitConfig,
                      report: FitReport, progress: bool) -> None:
    """Class-weighted BCE against the weak labels: positives are rare, so weight them up."""
    positives = float(labels.sum().item())
    negatives = float(len(labels)) - positives
    pos_weight = torch.tensor(negatives / positives if positives else 1.0)
    optimizer = torch.optim.Adam(head.parameters(), lr=config.learning_rate,
                                 weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    loss = torch.tensor(math.nan)
    for _ in _progress(config.init_epochs, "weak-supervision init", progress):
        for index in _batches(torch, len(tensors), config.batch_size, generator):
            optimizer.zero_grad()
            logits = head(*tensors.inputs(index))
            target = labels if index is None else labels[index]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
            loss.backward()
            optimizer.step()
    report.init_train_bce = float(loss.item())


def _evaluate_bce(torch: Any, head: Any, tensors: _Tensors, labels: np.ndarray) -> float:
    with torch.no_grad():
        logits = head(*tensors.inputs())
        return float(torch.nn.functional.binary_cross_entropy_with_logits(
            logits, torch.from_numpy(labels)).item())


def _marginal_training(torch: Any, head: Any, tensors: _Tensors, checks: _Tensors | None,
                       config: FitConfig, report: FitReport, progress: bool) -> None:
    optimizer = torch.optim.Adam(head.parameters(), lr=config.learning_rate,
                                 weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed + 1)
    bar = _progress(config.marginal_epochs, "marginal likelihood", progress)
    for epoch in bar:
        for index in _batches(torch, len(tensors), config.batch_size, generator):
            optimizer.zero_grad()
            base = tensors.base_logprob if index is None else tensors.base_logprob[index]
            expert = tensors.expert_logprob if index is None else tensors.expert_logprob[index]
            loss = marginal_nll(head(*tensors.inputs(index)), base, expert)
            loss.backward()
            optimizer.step()
        if epoch % 50 == 0 or epoch == config.marginal_epochs - 1:
            entry = {"epoch": float(epoch), "train": float(loss.item())}
            if checks is not None:
                entry["validation"] = _evaluate_marginal(torch, head, checks)
            report.history.append(entry)
    report.train_loss = _evaluate_marginal(torch, head, tensors)
    if checks is not None:
        report.validation_loss = _evaluate_marginal(torch, head, checks)
        report.validation_loss_base_only = float(-checks.base_logprob.mean().item())
        report.validation_loss_expert_only = float(-checks.expert_logprob.mean().item())


def _evaluate_marginal(torch: Any, head: Any, tensors: _Tensors) -> float:
    with torch.no_grad():
        return float(marginal_nll(head(*tensors.inputs()), tensors.base_logprob,
                                  tensors.expert_logprob).item())


def save_head(path: Path, head: Any, *, data: CollectedData, config: FitConfig,
              report: FitReport) -> None:
    """Write the head with everything export needs: type, sizes, base identity, training manifest."""
    torch = import_torch()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": "tandem-switch-head/1",
        "head_type": config.head_type,
        "hidden_size": data.hidden_size,
        "mlp_width": config.mlp_width,
        "feature_names": list(FEATURE_NAMES) if config.head_type == "mlp" else [],
        "state_dict": head.state_dict(),
        "base_fingerprint": data.manifest.get("base", {}).get("fingerprint", ""),
        "base_model_sha256": data.manifest.get("base", {}).get("sha256", ""),
        "training_manifest": data.manifest,
        "fit_config": asdict(config),
        "fit_report": asdict(report),
    }, path)


@dataclass(frozen=True)
class LoadedHead:
    """A head read back from ``head.pt``: the torch module and its metadata."""

    module: Any
    head_type: HeadType
    hidden_size: int
    feature_names: Sequence[str]
    base_fingerprint: str
    base_model_sha256: str
    training_manifest: dict[str, Any]

    def deferral_probability(self, hidden: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
        """``s`` for each row of ``hidden`` (float32 [n, d])."""
        torch = import_torch()
        with torch.no_grad():
            feature_tensor = None
            if self.feature_names:
                if features is None:
                    raise TrainingError("this mlp head needs base features (entropy, top-1 margin)")
                feature_tensor = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
            logits = self.module(torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32)),
                                 feature_tensor)
            return torch.sigmoid(logits).numpy()


def load_head(path: Path) -> LoadedHead:
    """Read a head written by ``save_head``; a clear error for anything else."""
    torch = import_torch()
    if not path.is_file():
        raise TrainingError(f"head file not found: {path}")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many unrelated types for a bad file
        raise TrainingError(f"{path} is not a head written by `tandem train fit`: {exc}") from exc
    if not isinstance(saved, dict) or saved.get("format") != "tandem-switch-head/1":
        raise TrainingError(f"{path} is not a head written by `tandem train fit`")
    head = build_head(saved["head_type"], saved["hidden_size"], mlp_width=saved["mlp_width"])
    head.load_state_dict(saved["state_dict"])
    head.eval()
    return LoadedHead(head, saved["head_type"], saved["hidden_size"], tuple(saved["feature_names"]),
                      saved["base_fingerprint"], saved["base_model_sha256"], saved["training_manifest"])


def fit_command(data_dir: Path, out: Path, config: FitConfig, *,
                validation_dir: Path | None = None, progress: bool = True) -> FitReport:
    """Load collected data, fit, save; what ``tandem train fit`` runs."""
    data = load_collected(data_dir)
    validation = load_collected(validation_dir) if validation_dir is not None else None
    if validation is not None and validation.hidden_size != data.hidden_size:
        raise TrainingError("training and validation data come from base models of different widths")
    head, report = fit(data, config, validation=validation, progress=progress)
    save_head(out, head, data=data, config=config, report=report)
    return report


def format_report(report: FitReport) -> str:
    """The losses as a few plain lines."""
    summary = {key: value for key, value in asdict(report).items() if key != "history"}
    return "\n".join(f"{key:28s} {value:.4f}" if isinstance(value, float) else f"{key:28s} {value}"
                     for key, value in summary.items())


def report_json(report: FitReport) -> str:
    return json.dumps(asdict(report), indent=2)
