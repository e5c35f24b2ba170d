"""Where a sweep's runs execute: a queue over the GPUs of this machine (here), or Slurm jobs through submitit
(slurm.py).

Both run each run as its own `tools/train.py` process whose output goes to the run's sweep.log, bracketed by the
launcher's start and exit lines. Stopping is always through the trainer's own SIGTERM handling (save `latest` after
the current step, exit 143), so a stopped run continues exactly with --resume.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import MdistillerError
from ..files import PROJECT_ROOT

LOG_NAME = "sweep.log"  # each run's output, in its run folder
MARK = "[mdistiller-sweep]"  # the launcher's own lines in sweep.log (start, exit code)

INTERRUPTED_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL)  # a signal stopped it


@dataclass
class Job:
    """One process to run: the command, its extra environment, its log, and the job it waits for."""

    key: str  # unique: the run's folder
    label: str
    command: list[str]
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    after: str = ""  # key of a job that must succeed first
    cwd: str = ""


@dataclass
class Outcome:
    """How a job ended: done, failed (exit code), interrupted (a signal; resumable), skipped or not started."""

    status: str
    returncode: int | None = None
    detail: str = ""


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a run: ours, this mdistiller first on PYTHONPATH (the child imports the same code), extra."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"  # the log follows the run as it goes
    env.update(extra)
    return env


def log_line(path: str, text: str) -> None:
    """Append one launcher line (`[mdistiller-sweep] <time> <text>`) to a run's log."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(f"{MARK} {time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def start_process(job: Job, env_extra: dict[str, str], ignore_usr2: bool = False) -> subprocess.Popen:
    """Start job's command in its own session (a terminal's Ctrl-C reaches the launcher only), output to its log.

    ignore_usr2: under Slurm, USR2 (time limit near, or preemption) is the submitit job's to handle; it may reach
    every process of the job, and its default action would kill the run before it saves. An ignored signal stays
    ignored across exec."""
    log_line(job.log_path, f"start {shlex.join(job.command)}" + "".join(f" {k}={v}" for k, v in env_extra.items()))
    with open(job.log_path, "ab") as out:
        return subprocess.Popen(job.command, stdout=out, stderr=subprocess.STDOUT, env=child_env(env_extra),
                                cwd=job.cwd or None, start_new_session=True,
                                preexec_fn=_ignore_usr2 if ignore_usr2 else None)


def outcome_of(returncode: int) -> Outcome:
    if returncode == 0:
        return Outcome("done", 0)
    if returncode in INTERRUPTED_CODES:
        return Outcome("interrupted", returncode)
    return Outcome("failed", returncode)


def signal_group(proc: subprocess.Popen, signum: int) -> None:
    """Signal the run's whole process group (torchrun and its workers), ignoring one that already ended."""
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


# ---- this machine ----

def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip()]
    import torch  # here only: a Slurm job unpickles this module, and its run (a child process) is what uses torch

    return [str(i) for i in range(torch.cuda.device_count())]


def gpu_slots(gpus: Sequence[str] | None, gpus_per_run: int) -> list[tuple[str, ...]]:
    """GPU ids in groups of gpus_per_run (one group a run); [] when there is no GPU."""
    ids = list(gpus) if gpus is not None else visible_gpus()
    if gpus is not None and os.environ.get("CUDA_VISIBLE_DEVICES"):  # --gpus counts within what we may see
        visible = visible_gpus()
        bad = [g for g in ids if not g.isdigit() or int(g) >= len(visible)]
        if bad:
            raise MdistillerError(f"--gpus {','.join(ids)}: GPU {bad[0]} is not among the {len(visible)} that "
                                  f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} shows (0..)")
        ids = [visible[int(g)] for g in ids]
    if len(set(ids)) != len(ids):
        raise MdistillerError(f"--gpus lists a GPU twice: {','.join(ids)}")
    if not ids:
        return []
    if len(ids) % gpus_per_run:
        raise MdistillerError(f"{len(ids)} GPUs do not split into runs of {gpus_per_run} (--nproc-per-run)")
    return [tuple(ids[i:i + gpus_per_run]) for i in range(0, len(ids), gpus_per_run)]


class LocalQueue:
    """Runs jobs on this machine: per_slot at a time on each GPU group (CUDA_VISIBLE_DEVICES set), or one after
    another without GPUs. SIGINT/SIGTERM stop the queue: every running job gets SIGTERM (saves its state and exits),
    a second signal sends SIGKILL (its last saved checkpoint stays resumable), and no new job starts."""

    POLL_S = 0.05

    def __init__(self, slots: list[tuple[str, ...]], per_slot: int = 1,
                 say: Callable[[str], None] = lambda text: print(text, flush=True)) -> None:
        if per_slot < 1:
            raise MdistillerError(f"--per-gpu must be at least 1, got {per_slot}")
        self.slots: list[tuple[str, ...] | None] = list(slots) or [None]
        self.per_slot = per_slot if slots else 1  # without GPUs, one run at a time
        self.say = say
        self.signals: list[int] = []  # the stop signals received while running

    @property
    def capacity(self) -> int:
        return len(self.slots) * self.per_slot

    @property
    def interrupted(self) -> bool:
        return bool(self.signals)

    def _env_for(self, slot: tuple[str, ...] | None) -> dict[str, str]:
        env = {}
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
        if "OMP_NUM_THREADS" not in os.environ:  # runs side by side share the cores instead of each taking all
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.capacity))
        return env

    def run(self, jobs: Sequence[Job]) -> dict[str, Outcome]:
        """Run every job (a job whose `after` job did not succeed is skipped); returns each job's outcome."""
        self._outcomes: dict[str, Outcome] = {}
        self._pending = list(jobs)
        self._running: dict[str, tuple[subprocess.Popen, Job, int]] = {}
        self._load = [0] * len(self.slots)
        self._total, self._started = len(self._pending), 0
        self.signals = []
        previous = self._install_handlers()
        try:
            stopped = killed = False
            while self._pending or self._running:
                if self.signals and not stopped:
                    stopped = True
                    self.say(f"stopping: SIGTERM to {len(self._running)} running run(s), each saves its state "
                             "(a second Ctrl-C kills them; their last checkpoint stays resumable)")
                    self._signal_all(signal.SIGTERM)
                if len(self.signals) > 1 and not killed:
                    killed = True
                    self._signal_all(signal.SIGKILL)
                self._reap()
                if stopped and not self._running:
                    break
                if not stopped:
                    self._start_ready()
                time.sleep(self.POLL_S)
        finally:
            self._restore_handlers(previous)
        for job in self._pending:
            self._outcomes.setdefault(job.key, Outcome("not started"))
        return self._outcomes

    def _signal_all(self, signum: int) -> None:
        for proc, _, _ in self._running.values():
            signal_group(proc, signum)

    def _reap(self) -> None:
        for key, (proc, job, slot) in list(self._running.items()):
            code = proc.poll()
            if code is None:
                continue
            del self._running[key]
            self._load[slot] -= 1
            log_line(job.log_path, f"exit {code}")
            self._outcomes[key] = outcome_of(code)
            self.say(f"  {self._outcomes[key].status:<11} {job.label}" + (f" (exit {code})" if code else ""))

    def _start_ready(self) -> None:
        for job in list(self._pending):
            if job.after and job.after not in self._outcomes:
                continue  # its teacher is still training (or waiting)
            if job.after and self._outcomes[job.after].status != "done":
                self._pending.remove(job)
                self._outcomes[job.key] = Outcome("skipped", None, f"{job.after} did not finish")
                self.say(f"  skipped     {job.label}: its teacher run did not finish")
                continue
            slot = min(range(len(self.slots)), key=lambda i: self._load[i])  # the least loaded GPU group
            if self._load[slot] >= self.per_slot:
                return
            self._pending.remove(job)
            env = self._env_for(self.slots[slot])
            self._started += 1
            where = f" on GPU {','.join(self.slots[slot])}" if self.slots[slot] else ""
            self.say(f"[{self._started}/{self._total}] start {job.label}{where}")
            self._running[job.key] = (start_process(job, env), job, slot)
            self._load[slot] += 1

    def _install_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):  # only a note: the loop does the work
            self.signals.append(signum)

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_handlers(previous: dict) -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)


def python_command(module: str, args: Sequence[str], nproc: int) -> list[str]:
    """`python -m module args`, or under torchrun (one process per GPU, a free rendezvous port) when nproc > 1."""
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                "-m", module, *args]
    return [sys.executable, "-m", module, *args]
