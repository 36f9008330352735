"""Generated tokens as the decoder reports them, in a module light enough for every consumer.

The assistant, the daemon and their tests use these without importing the decoder (numpy, httpx).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Provenance = Literal["base", "expert", "fallback", "denied"]


@dataclass(frozen=True)
class GeneratedToken:
    """One generated token: its id, its bytes, where it came from and the switch's score."""

    token_id: int
    text: bytes
    provenance: Provenance
    deferral_probability: float
