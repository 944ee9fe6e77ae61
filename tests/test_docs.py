"""The documentation stays true to the code: every `smoothap-bench ...` / `python -m bench ...` command in the
README and docs/ parses with the current command line, and every relative link leads to a file (and heading)
that exists. A renamed option or a moved page fails here, naming the page and line."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from bench.cli.parser import build_parser

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
OPERATORS = {"&&", "||", "|", ";"}
SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _bench_args(tokens: list[str]) -> list[str] | None:
    """The arguments after `smoothap-bench` or `-m bench` in one shell command; None when it runs neither."""
    for i, token in enumerate(tokens):
        if Path(token).name == "smoothap-bench":
            return tokens[i + 1 :]
        if token == "-m" and tokens[i + 1 : i + 2] == ["bench"]:
            return tokens[i + 2 :]
    return None


def _commands_in(line: str) -> list[list[str]]:
    """Every bench invocation on one shell line (comments dropped, split at && || | ;)."""
    found, segment = [], []
    for token in [*shlex.split(line, comments=True), ";"]:
        if token in OPERATORS:
            args = _bench_args(segment)
            if args:  # the bare program name alone is prose, not a command
                found.append(args)
            segment = []
        else:
            segment.append(token)
    return found


def doc_commands(page: Path) -> list[tuple[str, list[str]]]:
    """(page:line, arguments) of every bench command in the page's shell blocks and inline code."""
    text = page.read_text()
    where = page.relative_to(REPO)
    commands = []
    for block in FENCE.finditer(text):
        if block.group(1) not in SHELL_BLOCKS:
            continue
        start = _line_of(text, block.start(2))
        lines = block.group(2).replace("\\\n", "  ").split("\n")  # continuations joined
        for offset, line in enumerate(lines):
            commands += [(f"{where}:{start + offset}", args) for args in _commands_in(line)]
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)  # same line numbers, no code blocks
    for span in INLINE.finditer(prose):
        if span.group(1).startswith("smoothap-bench ") or " -m bench " in f"{span.group(1)} ":
            line = _line_of(prose, span.start())
            commands += [(f"{where}:{line}", args) for args in _commands_in(span.group(1))]
    return commands


ALL_COMMANDS = [command for page in PAGES for command in doc_commands(page)]


def test_every_page_shows_commands_and_the_readme_maps_every_page():
    assert (REPO / "docs").is_dir() and len(PAGES) > 5
    pages_with_commands = {where.split(":")[0] for where, _ in ALL_COMMANDS}
    assert pages_with_commands == {str(page.relative_to(REPO)) for page in PAGES}
    readme_links = {target.split("#")[0] for target in LINK.findall((REPO / "README.md").read_text())}
    assert {f"docs/{page.name}" for page in PAGES[1:]} <= readme_links


@pytest.mark.parametrize(("where", "args"), ALL_COMMANDS, ids=[where for where, _ in ALL_COMMANDS])
def test_a_documented_command_parses_with_the_current_cli(where, args, capsys):
    try:
        parsed = strict_parser().parse_args(args)
    except SystemExit as exit_:
        error = capsys.readouterr().err.strip().splitlines()[-1:]
        command = f"smoothap-bench {shlex.join(args)}"
        pytest.fail(f"{where}: `{command}` does not parse (exit {exit_.code}): {error}")
    assert callable(parsed.handler)


def strict_parser() -> argparse.ArgumentParser:
    """The command line as users get it, except that abbreviated options are refused: the docs spell each
    option in full, so a renamed option cannot hide behind the prefix of another."""
    parser = build_parser()
    pending = [parser]
    while pending:
        current = pending.pop()
        current.allow_abbrev = False
        for action in current._actions:  # argparse keeps subcommands' parsers in its subparser actions only
            if isinstance(action, argparse._SubParsersAction):
                pending += list(action.choices.values())
    return parser


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_anchor(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.M)}


def _links(page: Path) -> list[tuple[int, str]]:
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text())
    return [(_line_of(text, m.start()), m.group(1)) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for line, target in _links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{page.relative_to(REPO)}:{line}: {target} (no file {file})")
        elif fragment and file.suffix == ".md" and fragment not in _anchors(file):
            broken.append(f"{page.relative_to(REPO)}:{line}: {target} (no heading #{fragment})")
    assert not broken, "\n".join(broken)
