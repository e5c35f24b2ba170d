"""A sweep file -> the runs it stands for, each with its frozen config built exactly as tools/train.py builds it, and
each run's status read from its run folder and its result log (a sweep keeps no state of its own).

A sweep file (YAML):

    name: ls_table_cifar100            # default: the file's name
    seeds: [0, 1, 2]                   # every run of every recipe, as `tools/train.py --seeds <n>` (one seed a run)
    opts: [KEY, VALUE, ...]            # overrides for every run (a mapping KEY: VALUE works too)
    matrix: {method: [kd, dkd], pair: [resnet32x4_resnet8x4, ...]}   # fills {method} / {pair} in config patterns
    published: true                    # the report shows the published numbers beside ours
    teacher_seed: 0                    # --train-missing-teachers: the seed of the vanilla teacher runs
    teacher_opts: [KEY, VALUE, ...]    # --train-missing-teachers: overrides for the teacher runs only
    runs:
      - configs/cifar100/vanilla/*.yaml                   # a pattern alone, or an entry:
      - configs: [configs/cifar100/{method}/{pair}.yaml]  # paths or glob patterns (cwd first, then the project)
        flags: [--logit-stand, --base-temp, "2", --kd-weight, "9"]   # tools/train.py flags
        ls: authors                    # the authors' LS flags (and overrides) for each config's pair (ls_settings)
        opts: [KEY, VALUE, ...]        # overrides for this entry's runs (before the sweep's opts)
        seeds: [0]                     # this entry's seeds instead of the sweep's
        matrix: {...}                  # this entry's placeholders (added to, or replacing, the sweep's)
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import itertools
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Sequence

import yaml

from ..analysis.ls_settings import ls_setting
from ..analysis.report import ResultLine, RunRef, find_result, read_result_file
from ..distillers import get_distiller_class
from ..engine.build import teacher_checkpoint_path
from ..engine.run import config_hash, result_log_name, run_dir_of, seeded_cfg
from ..errors import MdistillerError
from ..files import PROJECT_ROOT, resolve_project_path
from .launchers import INTERRUPTED_CODES, LOG_NAME, MARK
from .train import build_cfg, parse_args

SWEEP_DIR = "configs/sweeps"
SWEEP_KEYS = ("name", "description", "seeds", "opts", "matrix", "published", "teacher_seed", "teacher_opts", "runs")
ENTRY_KEYS = ("configs", "flags", "ls", "opts", "seeds", "matrix")
# The flags an entry may give; --cfg, --seeds and --resume are the sweep's to set.
ENTRY_FLAGS = ("--logit-stand", "--base-temp", "--kd-weight")
# `ls:` values: the authors' setting of each pair (analysis/ls_settings.py); `header` is its former name
LS_VALUES = ("authors", "header")
# A teacher run trained for the sweep keeps only the sweep's where-to-work overrides (data, output folders): a
# student's recipe (LR, epochs, method keys) is not the teacher's. `teacher_opts` adds what the teachers need.
TEACHER_OPT_PREFIXES = ("DATASET.", "LOG.")


# ---- the sweep file ----

@dataclass
class Entry:
    """One item of `runs:`: config patterns and how to train them."""

    patterns: list[str]
    flags: list[str] = field(default_factory=list)
    ls_authors: bool = False
    opts: list[str] = field(default_factory=list)
    seeds: list[int] | None = None
    matrix: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    path: str
    entries: list[Entry]
    seeds: list[int]
    opts: list[str] = field(default_factory=list)
    matrix: dict[str, list[str]] = field(default_factory=dict)
    published: bool = False
    teacher_seed: int = 0
    teacher_opts: list[str] = field(default_factory=list)


def shipped_sweeps() -> list[str]:
    """The names of the sweep files shipped in configs/sweeps/."""
    folder = PROJECT_ROOT / SWEEP_DIR
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def find_sweep(name_or_path: str) -> str:
    """A sweep file's path: the path itself, or configs/sweeps/<name>.yaml (working directory, then the project)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    stem = name_or_path[: -len(".yaml")] if name_or_path.endswith(".yaml") else name_or_path
    for candidate in (os.path.join(SWEEP_DIR, stem + ".yaml"), str(PROJECT_ROOT / SWEEP_DIR / (stem + ".yaml"))):
        if os.path.isfile(candidate):
            return candidate
    raise MdistillerError(f"no sweep file {name_or_path}: give a YAML file or one of the shipped sweeps "
                          f"({', '.join(shipped_sweeps()) or f'none in {SWEEP_DIR}'})")


def _where(path: str, what: str) -> str:
    return f"sweep file {path}: {what}"


def _str_list(value: Any, path: str, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float, bool)) for v in value):
        raise MdistillerError(_where(path, f"{what} must be a string or a list of strings, got {value!r}"))
    return [str(v) for v in value]


def _opts(value: Any, path: str, what: str) -> list[str]:
    """`[KEY, VALUE, ...]` or `{KEY: VALUE}` -> a flat KEY VALUE list of strings."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [str(v) for item in value.items() for v in item]
    items = _str_list(value, path, what)
    if len(items) % 2:
        raise MdistillerError(_where(path, f"{what} must be KEY VALUE pairs, got an odd number of items: {items}"))
    return items


def _seeds(value: Any, path: str, what: str) -> list[int]:
    seeds = value if isinstance(value, list) else [value]
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise MdistillerError(_where(path, f"{what} must be an integer or a list of integers, got {value!r}"))
    if len(set(seeds)) != len(seeds):
        raise MdistillerError(_where(path, f"{what} lists a seed twice: {seeds}"))
    return [int(s) for s in seeds]


def _matrix(value: Any, path: str) -> dict[str, list[str]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MdistillerError(_where(path, f"matrix must map names to lists, got {value!r}"))
    return {str(k): _str_list(v, path, f"matrix {k}") for k, v in value.items()}


def _check_keys(data: dict, allowed: Sequence[str], path: str, where: str) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise MdistillerError(_where(path, f"unknown key {unknown[0]!r} in {where} (keys: {', '.join(allowed)})"))


def parse_train_args(tokens: Sequence[str], where: str) -> argparse.Namespace:
    """tools/train.py's parse_args, with its usage errors as one-line MdistillerErrors naming where they came from."""
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            return parse_args(list(tokens))
    except SystemExit:
        reason = messages.getvalue().strip().splitlines()[-1:] or ["bad arguments"]
        raise MdistillerError(f"{where}: {reason[0].replace('train.py: ', '')}: {shlex.join(tokens)}") from None


def _check_flags(flags: list[str], path: str) -> None:
    for token in flags:
        if token.startswith("--") and token not in ENTRY_FLAGS:
            raise MdistillerError(_where(path, f"flag {token} is not one an entry may give ({', '.join(ENTRY_FLAGS)}); "
                                               "KEY VALUE overrides go in opts"))
    if parse_train_args(flags, f"sweep file {path}").opts:  # values the tool would refuse are refused here
        raise MdistillerError(_where(path, f"flags {flags} hold KEY VALUE overrides: put them in opts"))


def _entry(item: Any, path: str) -> Entry:
    if isinstance(item, str):
        return Entry([item])
    if not isinstance(item, dict) or "configs" not in item:
        raise MdistillerError(_where(path, f"each item of runs is a config pattern or a mapping with configs, got "
                                           f"{item!r}"))
    _check_keys(item, ENTRY_KEYS, path, "an entry of runs")
    ls = item.get("ls")
    if ls not in (None, *LS_VALUES):
        raise MdistillerError(_where(path, f"ls takes `authors` (the authors' setting for each config's pair, "
                                           f"mdistiller/analysis/ls_settings.py), got {ls!r}; explicit settings go "
                                           "in flags"))
    flags = _str_list(item.get("flags", []), path, "flags")
    _check_flags(flags, path)
    if ls is not None and "--logit-stand" in flags:
        raise MdistillerError(_where(path, "an entry gives either ls: authors or --logit-stand in flags, not both"))
    return Entry(
        patterns=_str_list(item["configs"], path, "configs"), flags=flags, ls_authors=ls is not None,
        opts=_opts(item.get("opts"), path, "opts"),
        seeds=_seeds(item["seeds"], path, "seeds") if "seeds" in item else None,
        matrix=_matrix(item.get("matrix"), path),
    )


def load_sweep(name_or_path: str) -> Sweep:
    """Read and check a sweep file (or a shipped sweep by name)."""
    path = find_sweep(name_or_path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise MdistillerError(f"cannot read sweep file {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(data, list):  # a bare list of config patterns
        data = {"runs": data}
    if not isinstance(data, dict) or not data.get("runs"):
        raise MdistillerError(_where(path, "needs `runs:`, a list of configs or glob patterns"))
    _check_keys(data, SWEEP_KEYS, path, "the sweep")
    if not isinstance(data["runs"], list):
        raise MdistillerError(_where(path, "runs must be a list"))
    teacher_seed = data.get("teacher_seed", 0)
    if not isinstance(teacher_seed, int) or isinstance(teacher_seed, bool):
        raise MdistillerError(_where(path, f"teacher_seed must be an integer, got {teacher_seed!r}"))
    return Sweep(
        name=str(data.get("name") or os.path.splitext(os.path.basename(path))[0]),
        path=path,
        entries=[_entry(item, path) for item in data["runs"]],
        seeds=_seeds(data.get("seeds", [0]), path, "seeds"),
        opts=_opts(data.get("opts"), path, "opts"),
        matrix=_matrix(data.get("matrix"), path),
        published=bool(data.get("published", False)),
        teacher_seed=teacher_seed,
        teacher_opts=_opts(data.get("teacher_opts"), path, "teacher_opts"),
    )


# ---- patterns -> config files ----

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def expand_pattern(pattern: str, matrix: dict[str, list[str]], where: str) -> list[str]:
    """`configs/{method}/{pair}.yaml` -> one pattern per combination of the placeholders' values."""
    names = list(dict.fromkeys(_PLACEHOLDER.findall(pattern)))
    unknown = [n for n in names if n not in matrix]
    if unknown:
        raise MdistillerError(f"{where}: pattern {pattern} uses {{{unknown[0]}}}, which matrix does not define")
    expanded = []
    for values in itertools.product(*(matrix[n] for n in names)):
        text = pattern
        for name, value in zip(names, values):
            text = text.replace("{" + name + "}", value)
        expanded.append(text)
    return expanded


def glob_configs(pattern: str) -> list[str]:
    """The files a pattern matches, in the working directory, else (for a relative one) in the project."""
    found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not found and not os.path.isabs(pattern):
        found = sorted(p for p in glob.glob(str(PROJECT_ROOT / pattern)) if os.path.isfile(p))
    return found


# ---- the authors' LS setting (mdistiller/analysis/ls_settings.py) ----

def authors_ls_args(config: str, opts: Sequence[str]) -> tuple[list[str], list[str]]:
    """The authors' LS setting for the pair of `config` (with opts): (flags, KEY VALUE overrides)."""
    cfg = build_recipe(config, [], opts)
    key = (cfg.DATASET.TYPE, cfg.DISTILLER.TYPE, cfg.DISTILLER.TEACHER, cfg.DISTILLER.STUDENT)
    setting = ls_setting(*key)
    if setting is None:
        raise MdistillerError(f"{config}: no published LS setting for {key[1]} {key[2]} -> {key[3]} on {key[0]} "
                              "(mdistiller/analysis/ls_settings.py): give the flags in the sweep entry instead of "
                              "ls: authors")
    return setting.flags(), list(setting.opts)


# ---- runs ----

@dataclass
class Run:
    """One training run of the sweep: tools/train.py --cfg <config> --seeds <seed> <flags> <opts>."""

    config: str
    seed: int
    flags: list[str]
    opts: list[str]
    cfg: Any  # the frozen config tools/train.py builds for it, seed set
    teacher_run: str = ""  # run_dir of the sweep's teacher run this one waits for
    is_teacher: bool = False  # a vanilla run added by --train-missing-teachers
    teacher_missing: str = ""  # why its teacher's weights are not found (and no teacher run was added)
    # what tools/train.py derives from cfg (filled in from cfg)
    run_dir: str = ""
    result_file: str = ""
    config_hash: str = ""

    def __post_init__(self) -> None:
        self.run_dir = run_dir_of(self.cfg, self.opts, seed_in_name=True)
        self.result_file = os.path.join(self.cfg.LOG.RESULTS_DIR, result_log_name(self.cfg))
        self.config_hash = self.config_hash or config_hash(self.cfg)  # the seeds of a recipe share it: given once

    @property
    def name(self) -> str:
        return os.path.basename(self.run_dir)

    @property
    def ref(self) -> RunRef:
        return RunRef(self.result_file, self.config_hash, self.seed, self.run_dir)

    @property
    def log_path(self) -> str:
        return os.path.join(self.run_dir, LOG_NAME)

    def train_args(self, resume: bool = False) -> list[str]:
        """tools/train.py's arguments for this run (flags before the KEY VALUE overrides, as the tool parses them)."""
        return ["--cfg", self.config, "--seeds", str(self.seed), *self.flags, *(["--resume"] if resume else []),
                *self.opts]


def build_recipe(config: str, flags: Sequence[str], opts: Sequence[str]):
    """The frozen config of `tools/train.py --cfg config flags opts` (seed not yet set)."""
    if "EXPERIMENT.SEED" in list(opts)[::2]:
        raise MdistillerError(f"{config}: EXPERIMENT.SEED in the overrides; a sweep gives its seeds with `seeds:` "
                              "or --seeds")
    try:
        return build_cfg(parse_train_args(["--cfg", config, *flags, *opts], config))
    except MdistillerError as exc:
        raise MdistillerError(f"{config}: {exc}") from None


def missing_teacher(cfg) -> str:
    """Why the teacher of cfg's run is not on disk ("" when it is, or when the method needs none)."""
    if not get_distiller_class(cfg.DISTILLER.TYPE).declares.requires_teacher:
        return ""
    try:
        path = teacher_checkpoint_path(cfg)
    except MdistillerError as exc:
        return str(exc)
    if not os.path.isfile(path):
        return f"DISTILLER.TEACHER_CKPT {cfg.DISTILLER.TEACHER_CKPT} not found"
    return ""


def vanilla_config(teacher: str, dataset_type: str) -> str:
    """configs/<dataset>/vanilla/<teacher>.yaml, the recipe that trains a teacher."""
    path = resolve_project_path(os.path.join("configs", dataset_type, "vanilla", f"{teacher}.yaml"))
    if not os.path.isfile(path):
        raise MdistillerError(f"--train-missing-teachers: no vanilla config configs/{dataset_type}/vanilla/"
                              f"{teacher}.yaml to train teacher {teacher}; train it yourself and pass "
                              "DISTILLER.TEACHER_CKPT <its student_best>")
    return path


@dataclass
class Plan:
    """The runs of a sweep (teachers first) and warnings about what the sweep file matched."""

    sweep: Sweep
    runs: list[Run]
    warnings: list[str] = field(default_factory=list)

    def missing_teachers(self) -> dict[str, str]:
        """Teacher -> why its weights are not found, for the runs that need one and have no teacher run."""
        missing: dict[str, str] = {}
        for run in self.runs:
            if run.teacher_missing:
                missing.setdefault(run.cfg.DISTILLER.TEACHER, run.teacher_missing)
        return missing

    @property
    def recipes(self) -> int:
        return len({(r.result_file, r.config_hash) for r in self.runs if not r.is_teacher})


def _describe_missing(patterns: list[str], total: int) -> str:
    shown = ", ".join(patterns[:4]) + (f", ... (+{len(patterns) - 4} more)" if len(patterns) > 4 else "")
    return (f"{len(patterns)} of {total} config patterns match no file (not written yet?), skipped: {shown}")


def plan_sweep(sweep: Sweep, cli_opts: Sequence[str] = (), seeds: Sequence[int] | None = None,
               train_missing_teachers: bool = False) -> Plan:
    """Every run of the sweep with its config, the teacher runs it needs first (with train_missing_teachers), and
    warnings for patterns that match nothing. Seeds given here replace the file's."""
    ranked: list[tuple[int, Run]] = []
    warnings = []
    for number, entry in enumerate(sweep.entries, 1):
        where = f"{sweep.path} entry {number}"
        matrix = {**sweep.matrix, **entry.matrix}
        patterns = [p for pattern in entry.patterns for p in expand_pattern(pattern, matrix, where)]
        unmatched = []
        configs: list[str] = []
        for pattern in patterns:
            found = glob_configs(pattern)
            if not found:
                unmatched.append(pattern)
            configs += [c for c in found if c not in configs]
        if unmatched:
            warnings.append(f"{where}: " + _describe_missing(unmatched, len(patterns)))
        for config in configs:
            opts = [*entry.opts, *sweep.opts, *cli_opts]
            flags, ls_opts = authors_ls_args(config, opts) if entry.ls_authors else (list(entry.flags), [])
            opts = [*ls_opts, *opts]
            recipe = build_recipe(config, flags, opts)
            recipe_hash = config_hash(recipe)
            for rank, seed in enumerate(seeds if seeds is not None else entry.seeds or sweep.seeds):
                ranked.append((rank, Run(config, seed, flags, opts, seeded_cfg(recipe, seed), config_hash=recipe_hash)))
    # seed-major: every recipe's first seed before any second one, so a sweep cut short still fills the table
    runs = [run for _, run in sorted(ranked, key=lambda item: item[0])]
    teachers: dict[str, Run] = {}
    results: dict[str, list[ResultLine]] = {}
    for run in runs:
        why = missing_teacher(run.cfg)
        if not why or run_status(run, results).status == "done":  # a finished run needs its teacher no more
            continue
        name = run.cfg.DISTILLER.TEACHER
        if run.cfg.DISTILLER.TEACHER_CKPT or not train_missing_teachers:
            run.teacher_missing = why
            continue
        if name not in teachers:
            teachers[name] = teacher_run(sweep, name, run.cfg.DATASET.TYPE, cli_opts)
        attach_teacher(run, teachers[name])
    return Plan(sweep, unique_runs([*teachers.values(), *runs]), warnings)


def teacher_run(sweep: Sweep, teacher: str, dataset_type: str, cli_opts: Sequence[str]) -> Run:
    """The vanilla run that trains `teacher` for the sweep (teacher_seed, where-to-work overrides, teacher_opts)."""
    opts = [*sweep.opts, *cli_opts]
    kept = [t for key, value in zip(opts[::2], opts[1::2]) if key.startswith(TEACHER_OPT_PREFIXES)
            for t in (key, value)]
    opts = [*kept, *sweep.teacher_opts]
    config = vanilla_config(teacher, dataset_type)
    recipe = build_recipe(config, [], opts)
    return Run(config, sweep.teacher_seed, [], opts, seeded_cfg(recipe, sweep.teacher_seed), is_teacher=True)


def attach_teacher(run: Run, teacher: Run) -> None:
    """Make run distil from the teacher run's weights (its student_best), given as DISTILLER.TEACHER_CKPT: a key that
    changes neither the run's folder name nor its recipe hash."""
    ckpt = os.path.abspath(os.path.join(teacher.run_dir, "student_best"))
    before = (run.run_dir, run.config_hash)
    run.opts = [*run.opts, "DISTILLER.TEACHER_CKPT", ckpt]
    run.cfg = seeded_cfg(build_recipe(run.config, run.flags, run.opts), run.seed)
    run.config_hash = ""
    run.__post_init__()
    if (run.run_dir, run.config_hash) != before:  # the engine keeps the teacher file out of both
        raise MdistillerError(f"DISTILLER.TEACHER_CKPT changed the folder or recipe hash of {before[0]}")
    run.teacher_run = teacher.run_dir


def unique_runs(runs: list[Run]) -> list[Run]:
    """Drop repeats of one run (same folder, same recipe); two recipes sharing one folder are an error."""
    by_dir: dict[str, Run] = {}
    out = []
    for run in runs:
        other = by_dir.get(run.run_dir)
        if other is None:
            by_dir[run.run_dir] = run
            out.append(run)
        elif other.config_hash != run.config_hash:
            raise MdistillerError(f"two runs of the sweep share the folder {run.run_dir} with different recipes "
                                  f"({other.config} and {run.config}): give one an EXPERIMENT.NAME override")
    return out


# ---- status, read from the run folders and result logs ----

@dataclass
class RunStatus:
    """Where a run stands: done (a result line), started (a `latest` checkpoint, no result), failed or to do."""

    status: str  # "done" | "started" | "failed" | "todo"
    result: ResultLine | None = None
    exit_code: int | None = None  # the last exit code the launcher recorded in sweep.log
    last_line: str = ""  # the last line the run printed

    @property
    def remains(self) -> bool:
        return self.status != "done"


def read_run_log(path: str) -> tuple[int | None, str]:
    """(the last exit code the launcher recorded, the last line the run itself printed) of a run's sweep.log."""
    if not os.path.isfile(path):
        return None, ""
    exit_code, last = None, ""
    with open(path, errors="replace") as f:
        for raw in f:
            line = raw.rstrip("\n").split("\r")[-1].strip()  # progress bars rewrite their line with \r
            if line.startswith(MARK):
                match = re.search(r" exit (-?\d+)", line)
                if match:
                    exit_code = int(match.group(1))
                elif " start " in line:
                    exit_code, last = None, ""
            elif line:
                last = line
    return exit_code, last


def run_status(run: Run, results_cache: dict[str, list[ResultLine]] | None = None) -> RunStatus:
    """The run's status from its result log and its folder."""
    cache = results_cache if results_cache is not None else {}
    if run.result_file not in cache:
        cache[run.result_file] = read_result_file(run.result_file)
    line = find_result(cache[run.result_file], run.ref)
    exit_code, last = read_run_log(run.log_path)
    if line is not None:
        return RunStatus("done", line, exit_code, last)
    if os.path.exists(os.path.join(run.run_dir, "latest")):
        return RunStatus("started", None, exit_code, last)
    if exit_code not in (None, 0, *INTERRUPTED_CODES):  # stopped before it saved anything: simply to do again
        return RunStatus("failed", None, exit_code, last)
    return RunStatus("todo", None, exit_code, last)
