"""What both sides of the wire share: the wire protocol and sampling contract (``protocol``), the
error tree's root and the errors both sides raise (``errors``), the llama.cpp model wrapper and
its batching engine (``base_model``, ``batch_engine``), token helpers (``tokens``), the settings
base (``settings``) and the background HTTP server (``server``).

Imports none of ``client``, ``expert_gateway`` or ``export`` (``tests/test_layers.py`` checks it),
so a gateway host installs no onnxruntime or keyring. Importing this package loads no model and
never imports llama.cpp or torch; the package re-exports the error classes, the rest is imported
from its module.
"""

from __future__ import annotations

from tandem_core.errors import (
    ConfigError,
    ContextOverflowError,
    ExpertError,
    ExpertRejectedError,
    ModelError,
    ModelLoadError,
    SessionLostError,
    TandemError,
    TokenizerMismatchError,
)

__all__ = [
    "ConfigError",
    "ContextOverflowError",
    "ExpertError",
    "ExpertRejectedError",
    "ModelError",
    "ModelLoadError",
    "SessionLostError",
    "TandemError",
    "TokenizerMismatchError",
]
