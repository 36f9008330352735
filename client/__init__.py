"""Tandem's on-premise side: the base model, the switch head, the decoder, policy and audit.

Importing this package loads no model, reads no environment and never imports torch.
"""

from __future__ import annotations

__all__: list[str] = []
