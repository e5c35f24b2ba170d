"""What a sweep says about its runs: the one-line summary, the plan (--dry-run), the checks before anything starts,
and the Markdown report (with its CSV and figure) of exactly the sweep's runs."""

from __future__ import annotations

import importlib.util
import os
import shlex

from ..analysis.plots import plot_table
from ..analysis.report import build_table, results_of_runs, split_by_task, to_csv, to_markdown
from ..errors import MdistillerError
from .report import write_text
from .sweep_plan import Plan, Run
from .sweep_state import RunStatus


def results_figure(table, path: str) -> str | None:
    """The bar chart of the report's table (tools/plot.py table) written to path; None without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    return plot_table(table, path)


def display_command(run: Run, resume: bool) -> str:
    return shlex.join(["tools/train.py", *run.train_args(resume=resume)])


# ---- report ----

def status_text(status: RunStatus) -> str:
    if status.status == "started":
        return "interrupted (continues with --resume)" + (f", exit {status.exit_code}" if status.exit_code else "")
    if status.status == "failed":
        return f"failed (exit {status.exit_code})"
    return "not run yet"


def sweep_report(plan: Plan, statuses: dict[str, RunStatus], out_dir: str, metric: str = "best",
                 published: bool = False) -> str:
    """The markdown report of exactly the sweep's runs (also written with its CSV to out_dir). A sweep of both
    classification and detection runs gets one table per task: the second's CSV and figure are named after it."""
    results, missing = results_of_runs([run.ref for run in plan.runs])
    done = len(plan.runs) - len(missing)
    lines = [f"# Sweep {plan.sweep.name}", "",
             f"{done} of {len(plan.runs)} runs finished ({plan.recipes} recipes; sweep file {plan.sweep.path}).", ""]
    tables = [build_table(task_results, metric, published or plan.sweep.published)
              for task_results in split_by_task(results).values()]
    lines += [to_markdown(table) for table in tables]
    if not tables:
        lines += ["No finished run yet.", ""]
    unfinished = [run for run in plan.runs if statuses[run.run_dir].status in ("failed", "started")]
    if unfinished:
        lines += ["## Runs that did not finish", ""]
        for run in unfinished:
            status = statuses[run.run_dir]
            last = f": {status.last_line}" if status.last_line else ""
            lines.append(f"- {run.name} — {status_text(status)}{last} ({run.log_path})")
        lines.append("")
    not_run = sum(statuses[run.run_dir].status == "todo" for run in plan.runs)
    if not_run:
        lines += [f"{not_run} run(s) not started yet.", ""]
    suffixes = ["" if i == 0 else f"-{table.task}" for i, table in enumerate(tables)]
    for table, suffix in zip(tables, suffixes):
        figure = results_figure(table, os.path.join(out_dir, f"results{suffix}.png"))
        if figure:
            lines += [f"![results]({os.path.basename(figure)})", ""]
    markdown = "\n".join(lines)
    write_text(os.path.join(out_dir, "report.md"), markdown)
    for table, suffix in zip(tables, suffixes):
        write_text(os.path.join(out_dir, f"report{suffix}.csv"), to_csv(table))
    return markdown


def summary(plan: Plan, statuses: dict[str, RunStatus]) -> str:
    """`sweep NAME: 112 recipes x seeds 0,1,2 = 336 runs; 0 finished, 0 to resume, 336 to start; 336 remain`."""
    counts = {s: sum(st.status == s for st in statuses.values()) for s in ("done", "started", "failed", "todo")}
    students = [run for run in plan.runs if not run.is_teacher]
    seeds_of: dict[tuple[str, str], list[int]] = {}
    for run in students:
        seeds_of.setdefault((run.result_file, run.config_hash), []).append(run.seed)
    seed_sets = {tuple(sorted(seeds)) for seeds in seeds_of.values()}
    if len(seed_sets) == 1:
        size = f"{plan.recipes} recipes x seeds {','.join(map(str, next(iter(seed_sets))))} = {len(students)} runs"
    else:
        all_seeds = sorted({run.seed for run in students})
        size = f"{plan.recipes} recipes, {len(students)} runs (seeds {','.join(map(str, all_seeds))})"
    teachers = len(plan.runs) - len(students)
    return (f"sweep {plan.sweep.name}: {size}" + (f" + {teachers} teacher run(s)" if teachers else "")
            + f"; {counts['done']} finished, {counts['started']} to resume, "
            f"{counts['failed'] + counts['todo']} to start; {len(plan.runs) - counts['done']} remain")


def print_plan(plan: Plan, statuses: dict[str, RunStatus]) -> None:
    for run in plan.runs:
        status = statuses[run.run_dir]
        tag = {"done": "finished", "started": "resume", "failed": "retry", "todo": "start"}[status.status]
        if run.is_teacher:
            tag += " (teacher)"
        after = f"   [after teacher {os.path.basename(run.teacher_run)}]" if run.teacher_run else ""
        print(f"  {tag:<18} {run.name}   {display_command(run, status.status == 'started')}{after}")


def check_can_start(plan: Plan, statuses: dict[str, RunStatus], resume: bool, train_teachers: bool) -> None:
    """Refuse, before starting anything, runs that would fail: interrupted ones without --resume, missing teachers."""
    started = [run for run in plan.runs if statuses[run.run_dir].status == "started"]
    if started and not resume:
        raise MdistillerError(f"{len(started)} run(s) of sweep {plan.sweep.name} were interrupted (e.g. "
                              f"{started[0].run_dir} holds `latest`): pass --resume to continue them")
    missing = missing_teachers_text(plan, train_teachers)
    if missing:
        raise MdistillerError(missing)


def missing_teachers_text(plan: Plan, train_teachers: bool) -> str:
    """What is missing of the teachers the remaining runs need ("" when nothing is)."""
    missing = plan.missing_teachers()
    if not missing:
        return ""
    hint = "" if train_teachers else "; or pass --train-missing-teachers to train them first"
    return (f"the teacher weights of {', '.join(sorted(missing))} are not on disk ({next(iter(missing.values()))})"
            f"{hint}")
