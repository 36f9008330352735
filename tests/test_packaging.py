"""What each install set pulls in, read from pyproject.toml: a gateway host gets no onnxruntime
or keyring (the ``gateway`` extra plus the base set), and every package the build ships is one
the layout names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLIENT_ONLY = ("onnxruntime", "onnxruntime-gpu", "keyring", "pypdf", "lxml", "markdown-it-py")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _name(requirement: str) -> str:
    """The distribution name of a PEP 508 requirement, normalized (PEP 503)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def install_set(*extras: str) -> set[str]:
    project = _pyproject()["project"]
    names = {_name(requirement) for requirement in project["dependencies"]}
    for extra in extras:
        names |= {_name(requirement) for requirement in project["optional-dependencies"][extra]}
    return names


def test_a_gateway_install_pulls_no_onnxruntime_and_no_keyring() -> None:
    gateway = install_set("gateway")
    assert {"fastapi", "uvicorn", "llama-cpp-python", "pydantic-settings"} <= gateway
    assert sorted(gateway & set(CLIENT_ONLY)) == []


def test_the_client_extra_brings_what_the_gateway_leaves_out() -> None:
    client = install_set("client")
    assert {"onnxruntime-gpu", "keyring", "pypdf", "lxml", "markdown-it-py", "python-multipart"} <= client


def test_the_makefile_installs_every_extra_for_the_tests() -> None:
    extras = set(_pyproject()["project"]["optional-dependencies"])
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    lines = re.findall(r"pip install -q -e '\.\[([a-z,]+)\]'", makefile)
    installed = [set(found.split(",")) for found in lines]
    assert extras in installed, "no Makefile line installs every extra for the tests"
    assert {"client", "train"} in installed, "the demo's install line is missing"


def test_the_build_ships_the_core_and_the_three_wings() -> None:
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(include) == ["client*", "expert_gateway*", "export*", "tandem_core*"]
    assert {"tandem_core", "client", "expert_gateway", "export"} <= set(_pyproject()["tool"]["mypy"]["files"])
