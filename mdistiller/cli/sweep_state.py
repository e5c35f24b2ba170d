"""Where a sweep's runs stand, read from the disk once by the caller (a sweep keeps no state of its own): each run's
status from its result log and its run folder, and whether the teacher weights it needs are there. The planner
(sweep_plan.plan_runs) takes this state as an input and reads nothing itself."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Mapping

from ..analysis.report import ResultLine, find_result, read_result_file
from ..distillers import get_distiller_class
from ..engine.build import teacher_checkpoint_path
from ..errors import MdistillerError
from .launchers import INTERRUPTED_CODES, MARK

if TYPE_CHECKING:
    from .sweep_plan import Run


@dataclass(frozen=True)
class RunStatus:
    """Where a run stands: done (a result line), started (a `latest` checkpoint, no result), failed or to do."""

    status: str  # "done" | "started" | "failed" | "todo"
    result: ResultLine | None = None
    exit_code: int | None = None  # the last exit code the launcher recorded in sweep.log
    last_line: str = ""  # the last line the run printed

    @property
    def remains(self) -> bool:
        return self.status != "done"


TODO = RunStatus("todo")


@dataclass(frozen=True)
class SweepState:
    """What the disk says of a sweep's runs, keyed by run folder."""

    statuses: Mapping[str, RunStatus] = field(default_factory=dict)
    teacher_missing: Mapping[str, str] = field(default_factory=dict)  # why its teacher's weights are not found

    def status(self, run_dir: str) -> RunStatus:
        return self.statuses.get(run_dir, TODO)

    def merged(self, other: SweepState) -> SweepState:
        return SweepState({**self.statuses, **other.statuses}, {**self.teacher_missing, **other.teacher_missing})


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


def read_statuses(runs: Iterable[Run]) -> dict[str, RunStatus]:
    """Each run's status (each result log read once)."""
    cache: dict[str, list[ResultLine]] = {}
    return {run.run_dir: run_status(run, cache) for run in runs}


def read_state(runs: Iterable[Run]) -> SweepState:
    """The runs' statuses and, for those that need a teacher, whether its weights are on disk."""
    runs = list(runs)
    missing = {run.run_dir: why for run in runs if (why := missing_teacher(run.cfg))}
    return SweepState(read_statuses(runs), missing)
