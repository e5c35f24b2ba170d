"""A paper table in one command: every run of a sweep file (configs × flags × seeds), on this machine's GPUs or on a
Slurm cluster, then the table of exactly those runs (mean ± std over seeds, beside the published numbers).

    python tools/sweep.py SWEEP [--dry-run] [--resume] [--seeds 0,1,2] [--train-missing-teachers]
        [--launcher local] [--gpus 0,1,2,3] [--per-gpu N] [--nproc-per-run N]
        [--launcher slurm [--partition P] [--time MIN] [--cpus-per-run N] [--mem-gb G] [--no-array]
                          [--array-parallelism N] [--max-requeue N] [--slurm-param KEY=VALUE] [--no-wait]]
        [--out DIR] [--last] [--published] [KEY VALUE ...]
    python tools/sweep.py --report SWEEP [KEY VALUE ...]

SWEEP is a sweep file or the name of a shipped one (configs/sweeps/: ls_table_cifar100, classic_cifar100,
teachers_cifar100). The KEY VALUE overrides apply to every run (after the file's own). A sweep keeps no state of its
own: a run whose result line exists (same recipe hash and seed) is skipped, a run whose folder holds `latest`
continues with --resume, so running a sweep again does only what is left. See docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Sequence

from ..distillers import get_distiller_class
from ..engine.teacher_cache import AUTO, cache_refusal
from ..errors import MdistillerError
from . import run_cli
from .launchers import (
    Job,
    LocalQueue,
    Outcome,
    gpu_slots,
    python_command,
)
from .slurm import SlurmOptions, SweepJob, make_executor, submit, wait_for
from .sweep_file import load_sweep
from .sweep_plan import Plan, Run, plan_with_state
from .sweep_report import check_can_start, missing_teachers_text, print_plan, summary, sweep_report
from .sweep_state import RunStatus, read_statuses
from .train import parse_seeds

TRAIN_MODULE = "mdistiller.cli.train"


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, str, list[str]]:
    """(options, the sweep, KEY VALUE overrides)."""
    parser = argparse.ArgumentParser("sweep.py", description="run a sweep of training runs and report its table",
                                     allow_abbrev=False,
                                     usage="%(prog)s SWEEP [options] [KEY VALUE ...] | %(prog)s --report SWEEP")
    parser.add_argument("--report", nargs="?", const=True, default=None, metavar="SWEEP",
                        help="only write the report of the sweep's runs as they stand")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and how many remain; run nothing")
    parser.add_argument("--resume", action="store_true", help="continue the runs that were interrupted")
    parser.add_argument("--seeds", help="comma-separated seeds for every recipe, instead of the file's")
    parser.add_argument("--train-missing-teachers", action="store_true",
                        help="train (vanilla config) each teacher not on disk before the runs that need it")
    parser.add_argument("--launcher", choices=("local", "slurm"), default="local")
    parser.add_argument("--teacher-cache", action="store_true",
                        help="logit methods on CIFAR distil from a teacher-output cache, built once per teacher "
                             "(DISTILLER.TEACHER_CACHE auto; docs/teacher_cache.md)")
    parser.add_argument("--out", help="folder of the report (default <LOG.PREFIX>/sweeps/<name>)")
    parser.add_argument("--last", action="store_true", help="report last-epoch top-1 instead of the best epoch's")
    parser.add_argument("--published", action="store_true", help="published numbers in the report (also the "
                                                                   "sweep file's `published: true`)")
    local = parser.add_argument_group("local launcher")
    local.add_argument("--gpus", help="GPU ids to use, e.g. 0,1,2,3 (default: every visible GPU; none: one run at "
                                      "a time on the CPU)")
    local.add_argument("--per-gpu", type=int, default=1, help="runs packed on one GPU at a time (default 1)")
    local.add_argument("--nproc-per-run", type=int, default=1,
                       help="GPUs (torchrun processes) per run, for multi-GPU runs such as ImageNet")
    slurm = parser.add_argument_group("slurm launcher (submitit, pip install -e .[cluster])")
    slurm.add_argument("--partition", default="")
    slurm.add_argument("--time", type=int, default=24 * 60, help="time limit of a job in minutes (default 1440); "
                                                                 "a run that needs longer is requeued and resumes")
    slurm.add_argument("--cpus-per-run", type=int, default=10)
    slurm.add_argument("--mem-gb", type=int, default=0)
    slurm.add_argument("--no-array", action="store_true", help="one job per run instead of a job array")
    slurm.add_argument("--array-parallelism", type=int, default=64, help="array tasks running at once")
    slurm.add_argument("--max-requeue", type=int, default=20, help="requeues after a time limit (preemptions are "
                                                                   "not counted)")
    slurm.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                       help="another sbatch option, e.g. account=abc or qos=high (repeatable)")
    slurm.add_argument("--no-wait", action="store_true", help="submit and return; report later with --report")
    slurm.add_argument("--cluster", default="slurm", choices=("slurm", "local"),
                       help="submitit's executor: local runs the jobs on this machine (to try a sweep out)")
    args, rest = parser.parse_known_args(list(argv))
    unknown = [t for t in rest if t.startswith("--")]
    if unknown:
        raise MdistillerError(f"unknown option {unknown[0]} (see --help)")
    if isinstance(args.report, str):
        sweep, opts = args.report, rest
        args.report = True
    elif rest:
        sweep, opts = rest[0], rest[1:]
    else:
        raise MdistillerError("name a sweep: a sweep file or a shipped one, e.g. `tools/sweep.py ls_table_cifar100 "
                              "--dry-run`")
    if len(opts) % 2:
        raise MdistillerError(f"overrides come as KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    return args, sweep, opts


# ---- hooks for what other parts of the project will provide ----

def teacher_output_cache_opts(run: Run, enabled: bool) -> list[str]:
    """With --teacher-cache: `DISTILLER.TEACHER_CACHE auto` for a run the cache can serve (a logit method on CIFAR's
    standard view; docs/teacher_cache.md). The first run of a teacher builds its cache under a file lock while the
    others wait, so each cache is built once; an fp32 cache leaves the recipe (run name, hash) as it is."""
    if not enabled or run.cfg.DISTILLER.TEACHER_CACHE:
        return []
    cached = run.cfg.clone()
    cached.defrost()
    cached.DISTILLER.TEACHER_CACHE = AUTO
    if cache_refusal(cached, get_distiller_class(cached.DISTILLER.TYPE)) is not None:
        return []
    return ["DISTILLER.TEACHER_CACHE", AUTO]


# ---- commands ----

def run_job(run: Run, nproc: int, resume: bool, teacher_cache: bool = False) -> Job:
    """The tools/train.py process of a run (continued from `latest` when resume)."""
    args = [*run.train_args(resume=resume), *teacher_output_cache_opts(run, teacher_cache)]
    return Job(key=run.run_dir, label=run.name, command=python_command(TRAIN_MODULE, args, nproc),
               log_path=run.log_path, cwd=os.getcwd())


def sweep_command(argv: Sequence[str], resume: bool = True) -> str:
    """This sweep's command line, with --resume (what continues it)."""
    script = sys.argv[0] if sys.argv[0].endswith("sweep.py") else "mdistiller-sweep"
    args = [a for a in argv if a != "--resume"]
    return shlex.join(["python", script, *(["--resume"] if resume else []), *args] if script.endswith(".py")
                      else [script, *(["--resume"] if resume else []), *args])


def launch_local(plan: Plan, todo: list[Run], statuses: dict[str, RunStatus], args) -> tuple[dict[str, Outcome], bool]:
    if args.nproc_per_run < 1:
        raise MdistillerError(f"--nproc-per-run must be at least 1, got {args.nproc_per_run}")
    if args.nproc_per_run > 1 and args.per_gpu > 1:
        raise MdistillerError("--per-gpu packs single-GPU runs; it cannot be combined with --nproc-per-run")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    slots = gpu_slots(gpus, args.nproc_per_run)
    if args.nproc_per_run > 1 and not slots:
        raise MdistillerError(f"--nproc-per-run {args.nproc_per_run} needs GPUs; none is visible (give --gpus)")
    queue = LocalQueue(slots, args.per_gpu)
    where = f"{len(slots)} GPU slot(s) x {queue.per_slot}" if slots else "the CPU, one run at a time"
    print(f"running {len(todo)} run(s) on {where}", flush=True)
    keys = {run.run_dir for run in todo}
    jobs = []
    for run in todo:
        job = run_job(run, args.nproc_per_run, statuses[run.run_dir].status == "started", args.teacher_cache)
        job.after = run.teacher_run if run.teacher_run in keys else ""
        jobs.append(job)
    outcomes = queue.run(jobs)
    return outcomes, queue.interrupted


def slurm_options(plan: Plan, args, out_dir: str) -> SlurmOptions:
    extra = {}
    for item in args.slurm_param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MdistillerError(f"--slurm-param takes KEY=VALUE, e.g. account=abc; got {item!r}")
        extra[key] = value
    return SlurmOptions(folder=os.path.join(out_dir, "submitit"), partition=args.partition, time_min=args.time,
                        gpus_per_run=args.nproc_per_run, cpus_per_run=args.cpus_per_run, mem_gb=args.mem_gb,
                        array=not args.no_array, array_parallelism=args.array_parallelism,
                        max_requeue=args.max_requeue, extra=extra, cluster=args.cluster,
                        name=f"sweep-{plan.sweep.name}")


def sweep_call(run: Run, nproc: int, teacher_cache: bool = False) -> SweepJob:
    return SweepJob(run_job(run, nproc, False, teacher_cache), run_job(run, nproc, True, teacher_cache).command,
                    os.path.join(run.run_dir, "latest"))


def launch_slurm(plan: Plan, todo: list[Run], args, out_dir: str) -> dict[str, Outcome] | None:
    """Submit the runs (teachers first); wait for them unless --no-wait (then None)."""
    options = slurm_options(plan, args, out_dir)
    keys = {run.run_dir for run in todo}
    first = [run for run in todo if run.teacher_run not in keys]  # teachers and runs that need none
    later = [run for run in todo if run.teacher_run in keys]
    executor = make_executor(options)
    jobs = submit(executor, [sweep_call(run, args.nproc_per_run, args.teacher_cache) for run in first], options.array)
    for run, job in zip(first, jobs):
        print(f"  submitted {run.name}: job {job.job_id}", flush=True)
    by_dir = dict(zip((run.run_dir for run in first), jobs))
    if args.no_wait:
        if later and options.cluster != "slurm":
            raise MdistillerError("--no-wait with teacher runs needs Slurm's job dependencies (--cluster slurm)")
        for teacher in sorted({run.teacher_run for run in later}):
            students = [run for run in later if run.teacher_run == teacher]
            dependent = make_executor(options, dependency=[by_dir[teacher].job_id])
            calls = [sweep_call(r, args.nproc_per_run, args.teacher_cache) for r in students]
            for run, job in zip(students, submit(dependent, calls, options.array)):
                print(f"  submitted {run.name}: job {job.job_id} (after teacher job {by_dir[teacher].job_id})")
        print(f"submitted; see where the runs stand with: {sweep_command(sys.argv[1:], resume=False)} --report")
        return None
    outcomes = {}
    teacher_dirs = sorted({run.teacher_run for run in later})
    if teacher_dirs:  # the students of a teacher trained here wait for it
        teacher_jobs = [by_dir[d] for d in teacher_dirs]
        for d, outcome in zip(teacher_dirs, wait_for(teacher_jobs, [os.path.basename(d) for d in teacher_dirs],
                                                     _say)):
            outcomes[d] = outcome
        ready = [run for run in later if outcomes[run.teacher_run].status == "done"]
        for run in later:
            if run not in ready:
                outcomes[run.run_dir] = Outcome("skipped", None, "its teacher run did not finish")
        calls = [sweep_call(run, args.nproc_per_run, args.teacher_cache) for run in ready]
        more = submit(executor, calls, options.array)
        for run, job in zip(ready, more):
            print(f"  submitted {run.name}: job {job.job_id}", flush=True)
        by_dir.update(zip((run.run_dir for run in ready), more))
    waiting = [d for d in by_dir if d not in outcomes]
    for d, outcome in zip(waiting, wait_for([by_dir[d] for d in waiting], [os.path.basename(d) for d in waiting],
                                            _say, poll_s=2.0 if options.cluster == "local" else 30.0)):
        outcomes[d] = outcome
    return outcomes


def launch_slurm_and_wait(plan: Plan, todo: list[Run], args, out_dir: str) -> dict[str, Outcome] | None:
    """launch_slurm; Ctrl-C while waiting leaves the jobs running on the cluster and says how to follow them."""
    try:
        return launch_slurm(plan, todo, args, out_dir)
    except KeyboardInterrupt:
        if args.cluster != "slurm":
            raise
        print(f"stopped waiting; the jobs keep running on the cluster (squeue). Their report: "
              f"{sweep_command(sys.argv[1:], resume=False)} --report", file=sys.stderr)
        return None


def _say(text: str) -> None:
    print(text, flush=True)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, sweep_ref, opts = parse_args(argv)
    sweep = load_sweep(sweep_ref)
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    plan, statuses = plan_with_state(sweep, opts, seeds, args.train_missing_teachers)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if not plan.runs:
        raise MdistillerError(f"sweep {sweep.name} ({sweep.path}) matches no config file")
    out_dir = args.out or os.path.join(plan.runs[-1].cfg.LOG.PREFIX, "sweeps", sweep.name)
    metric = "last" if args.last else "best"
    if args.report:
        text = sweep_report(plan, statuses, out_dir, metric, args.published)
        print(text, end="")
        print(f"report written to {os.path.join(out_dir, 'report.md')}")
        return {"plan": plan, "statuses": statuses, "report": text}
    print(summary(plan, statuses), flush=True)
    if args.dry_run:
        print_plan(plan, statuses)
        missing = missing_teachers_text(plan, args.train_missing_teachers)
        if missing:
            print(f"warning: {missing}", file=sys.stderr)
        return {"plan": plan, "statuses": statuses}
    check_can_start(plan, statuses, args.resume, args.train_missing_teachers)
    todo = [run for run in plan.runs if statuses[run.run_dir].remains]
    if not todo:
        print(f"nothing to do: every run of sweep {sweep.name} has its result")
        outcomes: dict[str, Outcome] | None = {}
        interrupted = False
    elif args.launcher == "local":
        outcomes, interrupted = launch_local(plan, todo, statuses, args)
    else:
        outcomes, interrupted = launch_slurm_and_wait(plan, todo, args, out_dir), False
        if outcomes is None:
            return {"plan": plan, "statuses": statuses}
    statuses = read_statuses(plan.runs)
    if interrupted:
        print(f"interrupted: the runs saved their state; continue with: {sweep_command(argv)}", file=sys.stderr)
        raise SystemExit(130)
    text = sweep_report(plan, statuses, out_dir, metric, args.published)
    print(text, end="")
    print(f"report written to {os.path.join(out_dir, 'report.md')}")
    failed = [run for run in todo if statuses[run.run_dir].remains]
    if failed:
        print(f"{len(failed)} run(s) did not finish (listed above); rerun the sweep to retry them", file=sys.stderr)
        raise SystemExit(1)
    return {"plan": plan, "statuses": statuses, "outcomes": outcomes, "report": text}


def entry_point() -> None:
    """The console script: main() with one-line errors."""
    run_cli(main)


if __name__ == "__main__":
    entry_point()
