"""Offline tooling: the toy model pair, data collection, head training, calibration, export, evaluation.

Needs the ``train`` extra (``pip install 'tandem[train]'``); torch is imported only where used.
"""

from __future__ import annotations

__all__: list[str] = []
