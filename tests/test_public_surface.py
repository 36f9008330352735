"""The public surface of each package is what its __init__ re-exports, and importing is cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["tandem_core", "client", "expert_gateway"])
def test_import_loads_no_heavy_dependency(package: str) -> None:
    probe = (
        f"import sys, {package}; "
        "heavy = [m for m in ('torch', 'transformers', 'llama_cpp', 'onnxruntime') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_cli_without_a_command_prints_help_and_fails() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "client.cli"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert "usage: tandem" in result.stdout


def test_core_surface_is_its_all_and_loads_no_wing() -> None:
    """``tandem_core`` re-exports exactly its ``__all__``, all defined in the core itself, and
    importing it pulls in none of the packages built on top of it."""
    probe = (
        "import sys, tandem_core; "
        "names = sorted(tandem_core.__all__); "
        "assert all(getattr(tandem_core, n).__module__.startswith('tandem_core.') for n in names); "
        "wings = [m for m in ('client', 'expert_gateway', 'export') if m in sys.modules]; "
        "print(','.join(names)); print(','.join(wings))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    names, wings = result.stdout.splitlines()
    assert "TandemError" in names.split(",")
    assert "SessionLostError" in names.split(",")
    assert wings == ""
