"""The public surface of each package is what its __init__ re-exports, and importing is cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize("package", ["client", "expert_gateway"])
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
