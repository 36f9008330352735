"""The dependency rules of docs/DESIGN.md, checked on the source: ``tandem_core`` imports none of
the wings; ``client`` and ``expert_gateway`` import the core and never each other; ``export`` may
import all. Every import counts, including lazy ones inside functions and ``TYPE_CHECKING`` blocks,
because a lazy import still makes the installed package need the other one."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tandem_core", "client", "expert_gateway", "export")
ALLOWED: dict[str, frozenset[str]] = {
    "tandem_core": frozenset({"tandem_core"}),
    "client": frozenset({"tandem_core", "client"}),
    "expert_gateway": frozenset({"tandem_core", "expert_gateway"}),
    "export": frozenset(PACKAGES),
}


# Imports by name that predate the rules, each a run-time fallback for the toy pair that only
# exists with the export package installed. Remove an entry when its import goes; add none.
KNOWN: frozenset[str] = frozenset({
    "client.cli_daemon imports export",  # `tandem demo` / the toy preset build the toy pair
    "expert_gateway.backends imports export",  # the gateway's toy preset
})


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id == "import_module")


def _literal_prefix(node: ast.expr) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _literal_prefix(node.values[0])
    return ""


def imported_packages(source: str, module: str) -> list[tuple[int, str]]:
    """(line, top-level package) for every import of one of PACKAGES in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module.split(".")[: -node.level]
                targets = [".".join([*base, node.module] if node.module else base)]
            else:
                targets = [node.module or ""]
        elif isinstance(node, ast.Call) and _is_import_module(node.func) and node.args:
            # importlib.import_module("pkg.mod") or (f"pkg.{name}"): an import by name
            targets = [_literal_prefix(node.args[0])]
        else:
            continue
        found.extend((node.lineno, target.split(".")[0]) for target in targets
                     if target.split(".")[0] in PACKAGES)
    return found


def violations(package: str, source: str, module: str) -> list[str]:
    return [f"{module}:{line} imports {target}"
            for line, target in imported_packages(source, module) if target not in ALLOWED[package]]


def _modules(package: str) -> list[tuple[str, Path]]:
    return [(".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path)
            for path in sorted((ROOT / package).rglob("*.py"))]


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_only_what_the_rules_allow(package: str) -> None:
    modules = _modules(package)
    assert modules, f"no modules found under {package}/"
    found = [problem for module, path in modules
             for problem in violations(package, path.read_text(encoding="utf-8"), module)]
    assert [problem for problem in found if problem.split(":")[0] + " imports " + problem.split()[-1]
            not in KNOWN] == []


def test_the_check_sees_lazy_relative_and_plain_imports() -> None:
    source = (
        "import numpy\n"
        "import client.errors\n"
        "from tandem_core.errors import TandemError\n"
        "def later():\n"
        "    from expert_gateway.app import create_app\n"
        "    from .. import settings\n"
        "    importlib.import_module(f'export.{name}')\n"
    )
    assert violations("client", source, "client.sub.mod") == [
        "client.sub.mod:5 imports expert_gateway",
        "client.sub.mod:7 imports export",
    ]
    assert violations("tandem_core", source, "tandem_core.sub.mod") == [
        "tandem_core.sub.mod:2 imports client",
        "tandem_core.sub.mod:5 imports expert_gateway",
        "tandem_core.sub.mod:7 imports export",
    ]
    assert violations("expert_gateway", "from ..x import y\n", "expert_gateway.a.b") == []
    assert violations("export", source, "export.mod") == []


# Module cycles that predate the check (a lazy import in each), as "a <-> b" sorted by name.
# Remove an entry when its cycle goes; add none.
KNOWN_CYCLES: frozenset[str] = frozenset({
    "client.documents <-> client.parsing",  # the parser worker process imports the extractors
    # hf's engine process (hf_process) imports HfBackend lazily; hf imports its wire helpers
    "expert_gateway.backends.hf <-> expert_gateway.backends.hf_process",
})


def imported_modules(source: str, module: str, *, package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``source`` imports, lazy imports included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = module.split(".") + ([""] if package else [])
            base = parts[: len(parts) - node.level] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            # ``from export import toy_eval`` imports the module export.toy_eval
            targets = [name, *(f"{name}.{alias.name}" for alias in node.names)]
        else:
            continue
        found.update(target for target in targets if target in known and target != module)
    return found


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every pair of modules that reach each other, as "a <-> b"."""
    reach: dict[str, set[str]] = {}
    for start in graph:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(graph.get(current, ()))
        reach[start] = seen
    return sorted({f"{a} <-> {b}" for a in graph for b in reach[a] if a < b and a in reach[b]})


def test_no_module_imports_itself_through_others() -> None:
    """An import cycle, even through a lazy import, means neither module can be read alone."""
    modules = {module: path for package in PACKAGES for module, path in _modules(package)}
    graph = {module: imported_modules(path.read_text(encoding="utf-8"), module,
                                      package=path.name == "__init__.py", known=set(modules))
             for module, path in modules.items()}
    assert set(cycles(graph)) - KNOWN_CYCLES == set()


def test_the_cycle_check_sees_a_lazy_cycle() -> None:
    known = {"export.toy", "export.toy_eval", "export.toy_data"}
    toy = "from export import toy_data\ndef build():\n    from export import toy_eval\n"
    toy_eval = "def check():\n    from export.toy import tokenize_example\n"
    graph = {
        "export.toy": imported_modules(toy, "export.toy", package=False, known=known),
        "export.toy_eval": imported_modules(toy_eval, "export.toy_eval", package=False, known=known),
        "export.toy_data": set(),
    }
    assert graph["export.toy"] == {"export.toy_data", "export.toy_eval"}
    assert cycles(graph) == ["export.toy <-> export.toy_eval"]
