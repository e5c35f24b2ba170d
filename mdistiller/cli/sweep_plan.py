"""A sweep -> the runs it stands for, each with its frozen config built exactly as tools/train.py builds it
(`expand_runs`), then the plan (`plan_runs`): which runs wait for a teacher run trained first, which lack their
teacher, repeats dropped. The planner is a pure function of the runs and their state (sweep_state.read_state, read
once by the caller); `plan_sweep` puts the three steps together. The sweep file itself: sweep_file.py.
"""

from __future__ import annotations

import glob
import itertools
import os
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from ..analysis.ls_settings import ls_setting
from ..analysis.report import RunRef
from ..engine.run import config_hash, result_log_name, run_dir_of, seeded_cfg
from ..errors import MdistillerError
from ..files import PROJECT_ROOT, resolve_project_path
from .launchers import LOG_NAME
from .sweep_file import Sweep, parse_train_args
from .sweep_state import RunStatus, SweepState, read_state, read_statuses
from .train import build_cfg

# A teacher run trained for the sweep keeps only the sweep's where-to-work overrides (data, output folders): a
# student's recipe (LR, epochs, method keys) is not the teacher's. `teacher_opts` adds what the teachers need.
TEACHER_OPT_PREFIXES = ("DATASET.", "LOG.")


# ---- patterns -> config files ----

_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def expand_pattern(pattern: str, matrix: Mapping[str, Sequence[str]], where: str) -> list[str]:
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

@dataclass(frozen=True)
class Run:
    """One training run of the sweep: tools/train.py --cfg <config> --seeds <seed> <flags> <opts>. Built by
    make_run; with_teacher returns a new one."""

    config: str
    seed: int
    flags: tuple[str, ...]
    opts: tuple[str, ...]
    cfg: Any  # the frozen config tools/train.py builds for it, seed set
    run_dir: str  # what tools/train.py derives from cfg
    result_file: str
    config_hash: str
    teacher_run: str = ""  # run_dir of the sweep's teacher run this one waits for
    is_teacher: bool = False  # a vanilla run added by --train-missing-teachers
    teacher_missing: str = ""  # why its teacher's weights are not found (and no teacher run was added)

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


def make_run(config: str, seed: int, flags: Sequence[str], opts: Sequence[str], recipe: Any,
             recipe_hash: str = "", is_teacher: bool = False) -> Run:
    """The run of `recipe` (the unseeded frozen config of config + flags + opts) at `seed`; recipe_hash, when given,
    saves hashing it again (the seeds of a recipe share it)."""
    cfg = seeded_cfg(recipe, seed)
    return Run(config, seed, tuple(flags), tuple(opts), cfg, run_dir=run_dir_of(cfg, list(opts), seed_in_name=True),
               result_file=os.path.join(cfg.LOG.RESULTS_DIR, result_log_name(cfg)),
               config_hash=recipe_hash or config_hash(cfg), is_teacher=is_teacher)


def with_teacher(run: Run, teacher: Run) -> Run:
    """The run distilling from the teacher run's weights (its student_best), given as DISTILLER.TEACHER_CKPT: a key
    that changes neither the run's folder name nor its recipe hash."""
    ckpt = os.path.abspath(os.path.join(teacher.run_dir, "student_best"))
    opts = (*run.opts, "DISTILLER.TEACHER_CKPT", ckpt)
    cfg = run.cfg.clone()
    cfg.defrost()
    cfg.DISTILLER.TEACHER_CKPT = ckpt
    cfg.freeze()
    if (run_dir_of(cfg, list(opts), seed_in_name=True), config_hash(cfg)) != (run.run_dir, run.config_hash):
        raise MdistillerError(f"DISTILLER.TEACHER_CKPT changed the folder or recipe hash of {run.run_dir}")
    return replace(run, opts=opts, cfg=cfg, teacher_run=teacher.run_dir, teacher_missing="")


def build_recipe(config: str, flags: Sequence[str], opts: Sequence[str]):
    """The frozen config of `tools/train.py --cfg config flags opts` (seed not yet set)."""
    if "EXPERIMENT.SEED" in list(opts)[::2]:
        raise MdistillerError(f"{config}: EXPERIMENT.SEED in the overrides; a sweep gives its seeds with `seeds:` "
                              "or --seeds")
    try:
        return build_cfg(parse_train_args(["--cfg", config, *flags, *opts], config))
    except MdistillerError as exc:
        raise MdistillerError(f"{config}: {exc}") from None


def vanilla_config(teacher: str, dataset_type: str) -> str:
    """configs/<dataset>/vanilla/<teacher>.yaml, the recipe that trains a teacher."""
    path = resolve_project_path(os.path.join("configs", dataset_type, "vanilla", f"{teacher}.yaml"))
    if not os.path.isfile(path):
        raise MdistillerError(f"--train-missing-teachers: no vanilla config configs/{dataset_type}/vanilla/"
                              f"{teacher}.yaml to train teacher {teacher}; train it yourself and pass "
                              "DISTILLER.TEACHER_CKPT <its student_best>")
    return path


@dataclass(frozen=True)
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


def expand_runs(sweep: Sweep, cli_opts: Sequence[str] = (), seeds: Sequence[int] | None = None
                ) -> tuple[list[Run], list[str]]:
    """Every run of the sweep with its config (seed-major), and warnings for patterns that match nothing. Seeds
    given here replace the file's."""
    ranked: list[tuple[int, Run]] = []
    warnings = []
    for number, entry in enumerate(sweep.entries, 1):
        where = f"{sweep.path} entry {number}"
        matrix = {**sweep.matrix, **entry.matrix}
        patterns = [p for pattern in entry.configs for p in expand_pattern(pattern, matrix, where)]
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
                ranked.append((rank, make_run(config, seed, flags, opts, recipe, recipe_hash)))
    # seed-major: every recipe's first seed before any second one, so a sweep cut short still fills the table
    return [run for _, run in sorted(ranked, key=lambda item: item[0])], warnings


MakeTeacher = Callable[[str, str], Run]  # (teacher, DATASET.TYPE) -> the run that trains it


def plan_runs(sweep: Sweep, runs: Sequence[Run], state: SweepState, make_teacher: MakeTeacher | None = None,
              warnings: Sequence[str] = ()) -> Plan:
    """The plan of the runs given their state (a pure function): a run whose teacher is missing waits for a teacher
    run (make_teacher, once per teacher; --train-missing-teachers) or records why its teacher is missing; a finished
    run needs its teacher no more. Teacher runs go first; repeats of one run are dropped."""
    teachers: dict[str, Run] = {}
    planned = []
    for run in runs:
        why = state.teacher_missing.get(run.run_dir, "")
        if not why or state.status(run.run_dir).status == "done":
            planned.append(run)
        elif run.cfg.DISTILLER.TEACHER_CKPT or make_teacher is None:
            planned.append(replace(run, teacher_missing=why))
        else:
            name = run.cfg.DISTILLER.TEACHER
            if name not in teachers:
                teachers[name] = make_teacher(name, run.cfg.DATASET.TYPE)
            planned.append(with_teacher(run, teachers[name]))
    return Plan(sweep, unique_runs([*teachers.values(), *planned]), list(warnings))


def teacher_runs_for(sweep: Sweep, cli_opts: Sequence[str]) -> MakeTeacher:
    """make_teacher for plan_runs: the vanilla run that trains a teacher for the sweep (teacher_seed, the sweep's
    where-to-work overrides, teacher_opts)."""
    opts = [*sweep.opts, *cli_opts]
    kept = [t for key, value in zip(opts[::2], opts[1::2]) if key.startswith(TEACHER_OPT_PREFIXES)
            for t in (key, value)]
    teacher_opts = [*kept, *sweep.teacher_opts]

    def make_teacher(teacher: str, dataset_type: str) -> Run:
        config = vanilla_config(teacher, dataset_type)
        recipe = build_recipe(config, [], teacher_opts)
        return make_run(config, sweep.teacher_seed, [], teacher_opts, recipe, is_teacher=True)
    return make_teacher


def plan_with_state(sweep: Sweep, cli_opts: Sequence[str] = (), seeds: Sequence[int] | None = None,
                    train_missing_teachers: bool = False) -> tuple[Plan, dict[str, RunStatus]]:
    """The plan of a sweep and the status of each of its runs: the runs, their state read once, the planner."""
    runs, warnings = expand_runs(sweep, cli_opts, seeds)
    state = read_state(runs)
    make_teacher = teacher_runs_for(sweep, cli_opts) if train_missing_teachers else None
    plan = plan_runs(sweep, runs, state, make_teacher, warnings)
    statuses = {**state.statuses, **read_statuses(r for r in plan.runs if r.run_dir not in state.statuses)}
    return plan, {run.run_dir: statuses[run.run_dir] for run in plan.runs}


def plan_sweep(sweep: Sweep, cli_opts: Sequence[str] = (), seeds: Sequence[int] | None = None,
               train_missing_teachers: bool = False) -> Plan:
    """plan_with_state's plan."""
    return plan_with_state(sweep, cli_opts, seeds, train_missing_teachers)[0]


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
