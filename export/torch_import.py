"""torch, imported in one place and only when a tool needs it (the client never imports torch)."""

from __future__ import annotations

from typing import Any

from tandem_core.errors import TandemError

INSTALL_HINT = "pip install 'tandem[train]'"

# One thread: on a shared 2-core machine two OpenMP threads spin-wait on each other and a
# training step gets ten times slower; one thread is also the simplest path to same-bytes builds.
TORCH_THREADS = 1


class TorchMissingError(TandemError):
    """torch is not installed; the message names the extra that brings it."""


def import_torch(purpose: str = "training", *, pinned: bool = False) -> Any:
    """torch, or ``TorchMissingError`` whose message is the fix.

    ``pinned`` sets one thread and deterministic algorithms, for builds that must give the same
    bytes on every machine (the toy pair); GPU training leaves both to torch.
    """
    try:
        import torch
    except ModuleNotFoundError as exc:
        raise TorchMissingError(f"{purpose} needs torch: {INSTALL_HINT}") from exc
    if pinned:
        torch.set_num_threads(TORCH_THREADS)
        torch.use_deterministic_algorithms(True)
    return torch
