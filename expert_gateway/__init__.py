"""Tandem's remote side: the expert gateway service and its backends."""

from __future__ import annotations

__all__: list[str] = []
