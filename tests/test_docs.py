"""Every `python tools/<tool>.py ...` line shown in a code block of README.md and docs/*.md parses with that tool's own
argument parser, and every config file it names exists and loads: a renamed flag, tool or config in the docs fails
here. Links between the pages point at files that exist."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from mdistiller.engine.cfg import load_cfg

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOOL = re.compile(r"(?:^|\s)(?:python3? )?tools/(\w+)\.py\b(.*)$")
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\$\w+|\{[^}]*\}")


def _code_blocks(page: Path) -> list[list[str]]:
    """The page's fenced code blocks as lines, backslash continuations joined."""
    blocks, lines, inside, pending = [], [], False, ""
    for line in page.read_text().splitlines():
        if line.strip().startswith("```"):
            if inside:
                blocks.append(lines)
                lines = []
            inside = not inside
            continue
        if not inside:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return blocks


ASSIGNMENT = re.compile(r"^(?:export )?([A-Za-z_]\w*)=(.*)$")
COMMAND_SUBSTITUTION = re.compile(r"\$\([^()]*\)")
OPTIONAL = re.compile(r"\[(?:-|[A-Z]{2,}|\.\.\.)[^\[\]]*\]")  # `[--flag X]`, `[KEY VALUE ...]`


def _expand(line: str, variables: dict[str, str]) -> str:
    """A script line as the shell would run it, enough for parsing: $(...) becomes one placeholder word, known
    variables their values, optional parts of a synopsis dropped."""
    line = COMMAND_SUBSTITUTION.sub("<output>", line)
    for name in sorted(variables, key=len, reverse=True):
        line = line.replace("${" + name + "}", variables[name]).replace("$" + name, variables[name])
    while OPTIONAL.search(line):
        line = OPTIONAL.sub(" ", line)
    return line


def _commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in PAGES:
        for block in _code_blocks(page):
            variables: dict[str, str] = {}
            for line in block:
                if line.startswith("$ "):
                    line = line[2:]
                assignment = ASSIGNMENT.match(line)
                if assignment and " " not in assignment.group(1):
                    value = _expand(assignment.group(2), variables)
                    try:
                        variables[assignment.group(1)] = " ".join(shlex.split(value))
                    except ValueError:
                        variables[assignment.group(1)] = value
                    continue
                match = TOOL.search(_expand(line, variables))
                if not match:
                    continue
                args = match.group(2).split(" #")[0]
                try:
                    argv = shlex.split(args)
                except ValueError:  # an unbalanced quote in an example: compare as written
                    argv = args.split()
                found.append((page.name, match.group(1), argv))
    return found


COMMANDS = _commands()


def test_the_docs_show_the_main_tools():
    tools = {tool for _, tool, _ in COMMANDS}
    assert {"train", "eval", "bench", "report", "plot", "download_ckpts", "sweep"} <= tools, tools


@pytest.mark.parametrize("page,tool,argv", COMMANDS, ids=[f"{p}:{t}:{' '.join(a)[:40]}" for p, t, a in COMMANDS])
def test_documented_command_parses(page, tool, argv):
    assert (REPO / "tools" / f"{tool}.py").is_file(), f"{page} shows tools/{tool}.py, which does not exist"
    module = importlib.import_module(f"mdistiller.cli.{tool}")
    argv = [a for a in argv if not PLACEHOLDER.fullmatch(a)]  # `<file>`, `...`, `$NODE_RANK`-style placeholders
    try:
        parsed = module.parse_args(argv)
    except SystemExit as exc:  # argparse's way to say a flag is unknown or a value is missing
        raise AssertionError(f"{page}: tools/{tool}.py {' '.join(argv)} does not parse (exit {exc.code})") from None
    if tool == "train":
        cfg_path = parsed.cfg
        if cfg_path and not PLACEHOLDER.search(cfg_path):
            assert (REPO / cfg_path).is_file(), f"{page}: {cfg_path} does not exist"
            opts = [o for o in parsed.opts if not PLACEHOLDER.search(o)]
            load_cfg(str(REPO / cfg_path), opts if len(opts) % 2 == 0 else [])


def test_links_between_pages_point_at_files():
    for page in PAGES:
        for target in re.findall(r"\]\(([\w./-]+)(?:#[^)]*)?\)", page.read_text()):
            if "." not in target and "/" not in target:  # `[...](x)` in a formula, not a link
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
