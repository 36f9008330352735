"""Every command the README, the docs and the code's messages show is real.

Each ``tandem ...`` or ``python bench/...`` command is run with ``--help`` in a subprocess: the
command must exist and know every option named with it. A command shown on a line of its own in a
code block is a full invocation, so it must also name every option the command requires (one of
each required either-or group). ``make X`` lines must name a Makefile target.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
SOURCES = tuple(path for folder in ("client", "expert_gateway", "export", "configs")
                for path in sorted((ROOT / folder).rglob("*")) if path.suffix in (".py", ".toml"))

_INLINE = re.compile(r"`((?:tandem(?= |`)|python bench/|make )[^`\n]*)`")
_WORD = re.compile(r"^[a-z][a-z0-9-]*(?:\|[a-z][a-z0-9-]*)*$")
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_ENV = re.compile(r"^[A-Z][A-Z0-9_]*=\S*$")


@dataclass(frozen=True)
class Shown:
    """One command as a document shows it."""

    where: str  # file:line
    text: str
    complete: bool  # a line of its own in a code block: a full invocation

    @property
    def words(self) -> list[str]:
        words = self.text.split()
        while words and _ENV.match(words[0]):
            words.pop(0)  # VARIABLE=value before the command
        return words

    @property
    def program(self) -> tuple[str, ...]:
        words = self.words
        return tuple(words[:2]) if words[0] in ("python", "make") else (words[0],)

    def invocations(self) -> list[tuple[str, ...]]:
        """Each subcommand path the line names (``keys set|get`` names two)."""
        path = list(itertools.takewhile(_WORD.match, self.words[len(self.program):]))
        return list(itertools.product(*(word.split("|") for word in path)))

    @property
    def options(self) -> list[str]:
        return _OPTION.findall(" ".join(self.words[len(self.program):]))

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of every line in an indented or fenced code block."""
    lines, fenced, indented, previous_blank = [], False, False, True
    for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced or (line.startswith("    ") and (indented or previous_blank)):
            indented = not fenced
            lines.append((number, line.strip()))
        elif line.strip():
            indented = False
        previous_blank = not line.strip()
    return lines


def shown_commands() -> list[Shown]:
    shown = []
    for path in DOCUMENTS:
        name = path.relative_to(ROOT)
        for number, line in _code_lines(path):
            command = re.split(r"\s+#\s", line, maxsplit=1)[0].strip()
            first = next((word for word in command.split() if not _ENV.match(word)), "")
            if first == "tandem" or command.startswith(("python bench/", "make ")):
                shown.append(Shown(f"{name}:{number}", command, complete=True))
        for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
            shown += [Shown(f"{name}:{number}", text, complete=False) for text in _INLINE.findall(line)]
    for path in SOURCES:
        for number, line in enumerate(path.read_text("utf-8").splitlines(), start=1):
            shown += [Shown(f"{path.relative_to(ROOT)}:{number}", text, complete=False)
                      for text in _INLINE.findall(line) if text.startswith("tandem")]
    return shown


SHOWN = shown_commands()


# Runs ``tandem ARGS --help`` for each ARGS through the console script's own entry point
# (``client.cli.main``), all in one subprocess: one interpreter start instead of dozens.
_TANDEM_HELPS = """
import contextlib, io, json, sys
from client.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([*argv, "--help"])
        except SystemExit as exc:
            code = exc.code
    results.append([code or 0, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


@dataclass(frozen=True)
class Help:
    returncode: int
    stdout: str
    stderr: str


def _python(arguments: list[str], *, check: bool) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=check)


Key = tuple[tuple[str, ...], tuple[str, ...]]  # (program, subcommand path)


@pytest.fixture(scope="module")
def helps() -> dict[Key, Help]:
    """``--help`` of every distinct command shown."""
    wanted = sorted({(shown.program, path) for shown in SHOWN if shown.program[0] != "make"
                     for path in shown.invocations()})
    tandem = [path for program, path in wanted if program == ("tandem",)]
    replies = json.loads(_python(["-c", _TANDEM_HELPS, json.dumps(tandem)], check=True).stdout)
    found = {(("tandem",), path): Help(*reply) for path, reply in zip(tandem, replies, strict=True)}
    for program, path in wanted:
        if program != ("tandem",):
            result = _python([program[1], *path, "--help"], check=False)
            found[(program, path)] = Help(result.returncode, result.stdout, result.stderr)
    return found


def required_options(usage: str) -> list[set[str]]:
    """From argparse's usage text: each required option, and each required either-or group."""
    text = " ".join(usage.split("\n\n")[0].split())
    while True:  # drop optional parts, innermost brackets first
        shorter = re.sub(r"\[[^\[\]]*\]", "", text)
        if shorter == text:
            break
        text = shorter
    groups = [set(_OPTION.findall(group)) for group in re.findall(r"\(([^()]*)\)", text)]
    singles = [{option} for option in _OPTION.findall(re.sub(r"\([^()]*\)", "", text))]
    return [group for group in singles + groups if group]


def test_the_readme_and_docs_show_commands() -> None:
    documented = [shown for shown in SHOWN if not shown.where.endswith(".py")]
    assert sum(shown.complete for shown in documented) >= 15
    assert {"demo", "eval", "ask", "serve"} <= {path[0] for shown in documented
                                                for path in shown.invocations() if path}


@pytest.mark.parametrize("shown", SHOWN, ids=str)
def test_each_shown_command_is_real(shown: Shown, helps: dict[Key, Help]) -> None:
    if shown.program[0] == "make":
        target = shown.words[1]
        assert re.search(rf"^{re.escape(target)}:", (ROOT / "Makefile").read_text(), re.MULTILINE), \
            f"{shown}: no Makefile target {target!r}"
        return
    for path in shown.invocations():
        result = helps[(shown.program, path)]
        assert result.returncode == 0, f"{shown}: `{' '.join(path)} --help` failed: {result.stderr}"
        known = set(_OPTION.findall(result.stdout))
        unknown = [option for option in shown.options if option not in known]
        assert not unknown, f"{shown}: {' '.join(path)} has no option {', '.join(unknown)}"
        if shown.complete:
            missing = [group for group in required_options(result.stdout)
                       if not group & set(shown.options)]
            assert not missing, (f"{shown}: leaves out required "
                                 f"{' '.join(' | '.join(sorted(group)) for group in missing)}")


_CITATION = re.compile(r'docs/(\w+\.md), (?:section )?"([^"]+)"')


def _headings(document: Path) -> set[str]:
    return {re.sub(r"^\d+\.\s+", "", line.lstrip("#").strip())
            for line in document.read_text("utf-8").splitlines() if line.startswith("#")}


def _repository_texts() -> list[Path]:
    folders = ("client", "expert_gateway", "export", "configs", "bench", "tests", "docs")
    texts = [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    texts += [path for folder in folders for path in sorted((ROOT / folder).rglob("*"))
              if path.suffix in (".py", ".toml", ".md", ".html")]
    return texts


def test_citations_of_the_docs_name_sections_that_exist() -> None:
    cited = [(path, match) for path in _repository_texts()
             for match in _CITATION.finditer(path.read_text("utf-8"))]
    assert cited, "the code cites no docs section (the test would check nothing)"
    for path, match in cited:
        document = ROOT / "docs" / match[1]
        assert document.is_file(), f"{path.relative_to(ROOT)} cites missing docs/{match[1]}"
        assert match[2] in _headings(document), \
            f"{path.relative_to(ROOT)} cites section {match[2]!r}, which docs/{match[1]} lacks"


def test_nothing_points_outside_the_repository() -> None:
    this_file = Path(__file__).resolve()
    # The GSM8K data beside the checkout is an input the code reads, not documentation.
    outside = re.compile(r"\.\./shared(?!/data/)|DESIGN\.md section \d")
    found = [f"{path.relative_to(ROOT)}: {match[0]}" for path in _repository_texts()
             if path.resolve() != this_file
             for match in outside.finditer(path.read_text("utf-8"))]
    assert found == []


def test_links_in_the_readme_and_docs_resolve_inside_the_repository() -> None:
    for document in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text("utf-8")):
            if re.match(r"^[a-z]+://", target):
                continue
            resolved = (document.parent / target).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), \
                f"{document.relative_to(ROOT)} links to {target}"


def _parsers(parser: argparse.ArgumentParser,
             path: str = "tandem") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_cli_help_speaks_to_users() -> None:
    """`tandem --help` opens with what Tandem does; every command and option says what it is."""
    import client.cli

    parser = client.cli.build_parser()
    assert parser.description is not None and "private documents" in parser.description
    assert parser.description != (client.cli.__doc__ or "").splitlines()[0]
    undescribed = []
    for path, command in _parsers(parser):
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                described = {choice.dest for choice in action._choices_actions if choice.help}
                undescribed += [f"{path} {name}" for name in action.choices if name not in described]
            elif not action.help:
                undescribed.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert undescribed == []
