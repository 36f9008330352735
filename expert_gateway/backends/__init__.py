"""Expert backends behind the gateway's ``ExpertBackend`` protocol, built from validated settings.

``BACKENDS`` maps the ``model.backend`` setting to a factory. Each factory imports its backend
module when called, so importing this package loads neither llama.cpp nor torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

from expert_gateway.backends.base import Continuation, ContinueOptions, ExpertBackend
from expert_gateway.errors import BackendError
from expert_gateway.settings import GatewaySettings


def model_path(settings: GatewaySettings) -> Path:
    """The model file or folder that ``model.preset`` names."""
    preset = settings.model.preset
    if preset == "path":
        assert settings.model.path is not None  # enforced by ModelSettings
        return settings.model.path
    if preset == "smollm2":
        from tandem_core.base_model import smollm2_path

        return smollm2_path()
    # Imported by name: the gateway depends on export/ only at run time, for the presets that
    # assemble their model (the toy pair, the math expert from its shipped weights).
    module = "export.math_expert" if preset == "math-expert" else "export.toy"
    try:
        built = importlib.import_module(module)
    except ImportError as exc:
        raise BackendError(f"the {preset} expert needs the export package: {exc}") from exc
    if preset == "math-expert":
        return Path(built.ensure_math_expert())
    return Path(built.ensure_toy_pair().expert_gguf)


def _llama_cpp(settings: GatewaySettings) -> ExpertBackend:
    from expert_gateway.backends.llama_cpp import LlamaCppBackend

    options = settings.llama_cpp
    return LlamaCppBackend.open(model_path(settings), name=settings.model.name, n_ctx=options.n_ctx,
                                n_batch=options.n_batch, n_threads=options.n_threads,
                                slots=options.slots, flash_attention=options.flash_attention)


def _hf(settings: GatewaySettings) -> ExpertBackend:
    from expert_gateway.backends.hf import HfBackend
    from expert_gateway.backends.hf_process import ProcessBackend

    options = settings.hf
    opener = ProcessBackend.open if options.engine_process else HfBackend.open
    return opener(model_path(settings), name=settings.model.name, device=options.device,
                  dtype=options.dtype, max_batch=options.max_batch, max_context=options.max_context,
                  slots=options.slots or settings.sessions.max_sessions,
                  batch_prefill_tokens=options.batch_prefill_tokens,
                  prefill_chunk=options.prefill_chunk, cuda_graphs=options.cuda_graphs,
                  attention_kernels=tuple(options.attention_kernels),
                  compile_blocks=options.compile_blocks)


def _openai_compat(settings: GatewaySettings) -> ExpertBackend:
    from expert_gateway.backends.openai_compat import OpenAICompatBackend

    return OpenAICompatBackend.from_settings(settings.openai_compat, name=settings.model.name,
                                             tokenizer_path=model_path(settings))


BACKENDS: dict[str, Callable[[GatewaySettings], ExpertBackend]] = {
    "llama_cpp": _llama_cpp,
    "hf": _hf,
    "openai_compat": _openai_compat,
}


def build_backend(settings: GatewaySettings) -> ExpertBackend:
    """The backend ``model.backend`` selects, loaded and ready."""
    return BACKENDS[settings.model.backend](settings)


__all__ = ["BACKENDS", "Continuation", "ContinueOptions", "ExpertBackend", "build_backend", "model_path"]
