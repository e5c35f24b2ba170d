"""Every `python tools/<tool>.py ...` or console-script (`mdistiller-<tool> ...`) line shown in a code block of
README.md and docs/*.md parses with that tool's own argument parser, its KEY VALUE overrides come in pairs, and every
config file it names exists and loads: a renamed flag, tool, script or config in the docs fails here. Links between
the pages point at files that exist."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from mdistiller.engine.cfg import load_cfg
from mdistiller.errors import MdistillerError

from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TOOL = re.compile(r"(?:^|\s)(?:python3? )?tools/(\w+)\.py\b(.*)$")
SCRIPT = re.compile(r"(?:^|\s)(mdistiller-[\w-]+)(?=\s|$)(.*)$")
# console script -> the cli module behind it (pyproject.toml's [project.scripts]: `name = "mdistiller.cli.x:entry"`)
SCRIPTS = dict(re.findall(r'^(mdistiller-[\w-]+) = "mdistiller\.cli\.(\w+):entry_point"$',
                          (REPO / "pyproject.toml").read_text(), re.M))
PLACEHOLDER = re.compile(r"<[^>]*>|\.\.\.|\$\w+|\{[^}]*\}")
ELLIPSIS = "..."
# what a placeholder word (`<file>`, `$NODE_RANK`) stands for while parsing: a word every flag's type accepts
STAND_IN = "1"


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
                expanded = _expand(line, variables)
                code = expanded.split(" #")[0]
                if code.strip() and not code.lstrip().startswith("#"):  # a trailing comment shows no command
                    expanded = code
                match = TOOL.search(expanded)
                if match:
                    tool = match.group(1)
                else:
                    match = SCRIPT.search(expanded)
                    if not match:
                        continue
                    tool = SCRIPTS.get(match.group(1), match.group(1))  # an unknown script fails the test
                args = match.group(2).split(" #")[0]
                try:
                    argv = shlex.split(args)
                except ValueError:  # an unbalanced quote in an example: compare as written
                    argv = args.split()
                found.append((page.name, tool, argv))
    return found


COMMANDS = _commands()


def test_the_docs_show_the_main_tools():
    tools = {tool for _, tool, _ in COMMANDS}
    assert {"train", "eval", "bench", "report", "plot", "download_ckpts", "sweep"} <= tools, tools


@pytest.mark.parametrize("page,tool,argv", COMMANDS, ids=[f"{p}:{t}:{' '.join(a)[:40]}" for p, t, a in COMMANDS])
def test_documented_command_parses(page, tool, argv):
    assert (REPO / "tools" / f"{tool}.py").is_file(), f"{page}: no tools/{tool}.py"
    module = importlib.import_module(f"mdistiller.cli.{tool}")
    # `...` (more of the same) is dropped; a placeholder word (`<file>`, `$NODE_RANK`) stands for one value
    argv = [STAND_IN if PLACEHOLDER.fullmatch(a) else a for a in argv if a != ELLIPSIS]
    try:
        parsed = module.parse_args(argv)
    except SystemExit as exc:  # argparse's way to say a flag is unknown or a value is missing
        raise AssertionError(f"{page}: tools/{tool}.py {' '.join(argv)} does not parse (exit {exc.code})") from None
    except MdistillerError as exc:  # a tool's own refusal (e.g. sweep.py's odd override count)
        raise AssertionError(f"{page}: tools/{tool}.py {' '.join(argv)}: {exc}") from None
    opts = getattr(parsed, "opts", None)
    if isinstance(opts, list):
        assert len(opts) % 2 == 0, f"{page}: tools/{tool}.py {' '.join(argv)}: an odd number of KEY VALUE words"
    if tool == "train":
        cfg_path = parsed.cfg
        if cfg_path and cfg_path != STAND_IN and not PLACEHOLDER.search(cfg_path):
            assert (REPO / cfg_path).is_file(), f"{page}: {cfg_path} does not exist"
            pairs = [(k, v) for k, v in zip(opts[::2], opts[1::2]) if STAND_IN not in (k, v)
                     and not PLACEHOLDER.search(k + v)]
            load_cfg(str(REPO / cfg_path), [t for pair in pairs for t in pair])


def test_console_script_lines_are_read():
    assert any(page and tool == "sweep" and argv[:1] == ["ls_table_cifar100"] for page, tool, argv in COMMANDS)
    assert len(SCRIPTS) >= 10 and set(SCRIPTS.values()) <= {path.stem for path in (REPO / "tools").glob("*.py")}


def test_links_between_pages_point_at_files():
    for page in PAGES:
        for target in re.findall(r"\]\(([\w./-]+)(?:#[^)]*)?\)", page.read_text()):
            if "." not in target and "/" not in target:  # `[...](x)` in a formula, not a link
                continue
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
