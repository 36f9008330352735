"""One error tree: every exception class the packages define derives from ``TandemError`` and is
drawn, under its real parent, in ``tandem_core/errors.py``'s docstring."""

from __future__ import annotations

import importlib
import pkgutil
import re
from types import ModuleType

import tandem_core.errors
from tandem_core.errors import TandemError

PACKAGES = ("tandem_core", "client", "expert_gateway", "export")
_BRANCH = re.compile(r"^(?P<indent>[ │]*)[├└]── (?P<name>\w+)")


def _modules() -> list[ModuleType]:
    modules = []
    for name in PACKAGES:
        package = importlib.import_module(name)
        modules.append(package)
        for info in pkgutil.walk_packages(package.__path__, prefix=f"{name}."):
            modules.append(importlib.import_module(info.name))
    return modules


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined at module level in the four packages, by qualified name."""
    found = {}
    for module in _modules():
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, BaseException)
                    and value.__module__ == module.__name__):
                found[f"{module.__name__}.{value.__qualname__}"] = value
    return found


def _drawn_parents() -> dict[str, str]:
    """Each class in the drawn tree and the class it hangs under (grouping labels skipped)."""
    doc = tandem_core.errors.__doc__ or ""
    lines = doc.split("\n\n")[1].splitlines()
    assert lines[0].strip() == "TandemError"
    stack = [(0, "TandemError", True)]  # (depth, name, is a class)
    parents: dict[str, str] = {}
    for line in lines[1:]:
        branch = _BRANCH.match(line)
        if branch is None:
            continue  # a description's continuation line
        depth = len(branch["indent"]) // 4 + 1
        while stack[-1][0] >= depth:
            stack.pop()
        parent = next(name for _, name, is_class in reversed(stack) if is_class)
        name = branch["name"]
        is_class = name[0].isupper()
        if is_class:
            parents[name] = parent
        stack.append((depth, name, is_class))
    return parents


def test_every_exception_class_derives_from_the_root() -> None:
    classes = _exception_classes()
    assert len(classes) > 30
    outside = sorted(name for name, cls in classes.items() if not issubclass(cls, TandemError))
    assert outside == []


def test_each_error_name_is_one_class() -> None:
    by_name: dict[str, list[str]] = {}
    for qualified, cls in _exception_classes().items():
        by_name.setdefault(cls.__name__, []).append(qualified)
    assert {name: places for name, places in by_name.items() if len(places) > 1} == {}


def test_the_docstring_draws_every_class_under_its_parent() -> None:
    drawn = _drawn_parents()
    actual = {cls.__name__: cls.__bases__[0].__name__
              for cls in _exception_classes().values() if cls is not TandemError}
    assert drawn == actual
