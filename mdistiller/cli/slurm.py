"""A sweep's runs as Slurm jobs through submitit: each job runs its `tools/train.py` process (launchers.start_process),
stops it through the trainer's own SIGTERM handling on preemption or time limit, and is requeued to resume it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import MdistillerError
from .launchers import Job, Outcome, log_line, outcome_of, signal_group, start_process


def require_submitit():
    """The submitit module, or a one-line error naming the install command."""
    try:
        import submitit
    except ImportError:
        raise MdistillerError("--launcher slurm needs submitit: pip install -e .[cluster]") from None
    return submitit


class SweepJob:
    """The callable a Slurm job runs: one run's tools/train.py process, continued with --resume when its folder holds
    `latest` (a requeued job, or a run interrupted earlier).

    Slurm signals a job (USR2, before its time limit or on preemption); submitit then calls checkpoint(): the run gets
    SIGTERM, saves `latest` after its current step, and the job is requeued with a fresh SweepJob, which resumes it.
    """

    def __init__(self, job: Job, resume_argv: list[str], latest_path: str) -> None:
        self.job = job
        self.resume_argv = resume_argv  # the command that continues the run from `latest`
        self.latest_path = latest_path
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> int:
        resume = os.path.exists(self.latest_path)
        job = Job(self.job.key, self.job.label, self.resume_argv if resume else self.job.command, self.job.log_path,
                  self.job.env, cwd=self.job.cwd)
        self._proc = start_process(job, self.job.env, ignore_usr2=True)
        code = self._proc.wait()
        self._proc = None
        log_line(self.job.log_path, f"exit {code}")
        if code != 0:
            status = outcome_of(code).status
            raise RuntimeError(f"{self.job.label}: train.py {status} (exit {code}); see {self.job.log_path}")
        return code

    def checkpoint(self, *args, **kwargs):
        """Stop the run where it is (SIGTERM: it saves `latest`) and requeue a fresh job that resumes it."""
        proc = self._proc
        if proc is not None:
            signal_group(proc, signal.SIGTERM)
            # os.waitpid, not proc.wait(): this runs in a signal handler, possibly inside __call__'s proc.wait(),
            # which holds the Popen's wait lock
            try:
                _, status = os.waitpid(proc.pid, 0)
                log_line(self.job.log_path, f"exit {os.waitstatus_to_exitcode(status)}")
            except ChildProcessError:  # already reaped: __call__ logs its exit
                pass
        submitit = require_submitit()
        return submitit.helpers.DelayedSubmission(SweepJob(self.job, self.resume_argv, self.latest_path))

    __submitit_checkpoint__ = checkpoint  # the name newer submitit versions call

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_proc": None}


@dataclass
class SlurmOptions:
    """What sbatch gets for each run."""

    folder: str
    partition: str = ""
    time_min: int = 24 * 60
    gpus_per_run: int = 1
    cpus_per_run: int = 10
    mem_gb: int = 0
    array: bool = True
    array_parallelism: int = 64
    max_requeue: int = 20
    extra: dict[str, str] = field(default_factory=dict)  # more sbatch options (account, qos, constraint, ...)
    cluster: str = "slurm"  # "local" runs the jobs through submitit's local executor (tests, a try-out)
    name: str = "mdistiller"


def make_executor(options: SlurmOptions, dependency: Sequence[str] = ()):
    """A submitit executor with the sweep's Slurm parameters (and an afterok dependency on the given job ids)."""
    submitit = require_submitit()
    try:
        executor = submitit.AutoExecutor(folder=os.path.join(options.folder, "%j"), cluster=options.cluster,
                                         slurm_max_num_timeout=options.max_requeue)
    except (ValueError, RuntimeError) as exc:
        raise MdistillerError(f"submitit cannot use cluster {options.cluster!r}: {str(exc).splitlines()[0]}") \
            from None
    extra = dict(options.extra)
    if dependency:
        extra["dependency"] = "afterok:" + ":".join(dependency)
    params = dict(timeout_min=options.time_min, gpus_per_node=options.gpus_per_run, tasks_per_node=1,
                  cpus_per_task=options.cpus_per_run, name=options.name, stderr_to_stdout=True)
    if options.mem_gb:
        params["mem_gb"] = options.mem_gb
    if options.cluster == "slurm":
        params.update(slurm_array_parallelism=options.array_parallelism, slurm_additional_parameters=extra)
        if options.partition:
            params["slurm_partition"] = options.partition
    executor.update_parameters(**params)
    return executor


def submit(executor, calls: Sequence[SweepJob], array: bool) -> list:
    """Submit the calls: one job array (array=True), else one job each."""
    if not calls:
        return []
    try:
        if not array:
            return [executor.submit(call) for call in calls]
        jobs = []
        with executor.batch():
            for call in calls:
                jobs.append(executor.submit(call))
        return jobs
    except (OSError, RuntimeError, ValueError, subprocess.CalledProcessError) as exc:  # sbatch refused them
        text = str(exc).strip().splitlines()
        raise MdistillerError(f"submitting the sweep's jobs failed: {text[0] if text else type(exc).__name__}") \
            from None


def wait_for(jobs: Sequence, labels: Sequence[str], say: Callable[[str], None], poll_s: float = 5.0) -> list[Outcome]:
    """Wait for submitted jobs; each one's outcome (a failed job's exception names its log)."""
    outcomes: list[Outcome | None] = [None] * len(jobs)
    while any(o is None for o in outcomes):
        for i, job in enumerate(jobs):
            if outcomes[i] is None and job.done():
                try:
                    job.result()
                    outcomes[i] = Outcome("done", 0)
                except Exception as exc:  # submitit wraps the job's exception (and its traceback) in its own
                    text = str(exc).strip().splitlines()
                    detail = next((ln for ln in reversed(text) if "train.py" in ln), text[-1] if text else "")
                    status = "interrupted" if "interrupted" in detail else "failed"
                    outcomes[i] = Outcome(status, None, detail.strip())
                say(f"  {outcomes[i].status:<11} {labels[i]} (job {job.job_id})")
        if any(o is None for o in outcomes):
            time.sleep(poll_s)
    return [o for o in outcomes if o is not None]
