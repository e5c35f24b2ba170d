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


def _code_lines(page: Path) -> list[str]:
    """The lines of the page's fenced code blocks, with backslash continuations joined and comments dropped."""
    lines, inside, pending = [], False, ""
    for line in page.read_text().splitlines():
        if line.strip().startswith("```"):
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
    return lines


def _commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in PAGES:
        for line in _code_lines(page):
            if line.startswith("$ "):
                line = line[2:]
            match = TOOL.search(line)
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
    argv = [a for a in argv if not PLACEHOLDER.fullmatch(a)]  # `[KEY VALUE ...]`-style placeholders
    argv = [a for a in argv if not (a.startswith("[") or a.endswith("]"))]  # optional parts written as [--flag]
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
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
