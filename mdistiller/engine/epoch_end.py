"""The end of an epoch: one ordered list of named steps (`EPOCH_END_STEPS`) that `Trainer._train_epochs` runs, in
order, after each `train_epoch`. Each step is a small function `step(trainer, end)` that reads and fills the
`EpochEnd` they share; adding EMA weights or a new writer is one function and one entry in the list.

Why the order matters:
- `evaluate` runs first, on a forked RNG, so how often or how the test set is evaluated never moves the training's
  random stream; `record_best` and `collect_metrics` need its result.
- `build_checkpoints` captures the trainer state (model, optimizer, every RNG, the sampler generator) once, before
  anything is written, so every file of the epoch holds the same state.
- Exact resume after a kill at any moment rests on the write order: the worklog block first, then the student files,
  `epoch_<n>`, `best`, and `latest` LAST. `latest` is what --resume reads: a kill before it is written leaves the
  previous epoch's `latest`, so resume redoes this epoch and drops the worklog lines past it
  (`worklog.truncate_from`), and the other files are rewritten with the same contents. Every checkpoint is written
  atomically, so a kill leaves each file either old or new, never torn.
- `check_signals` comes after `latest`: a SIGTERM/SIGINT that arrived during evaluation or saving stops the run with
  `latest` at this epoch's end.

Under torchrun every rank runs every step: `evaluate` (the sums over the ranks) and `build_checkpoints` (every rank's
RNG state) are collectives; only rank 0 writes (`RunCheckpoints.save`, the worklog and the metric writers check it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ..log import get_logger
from . import worklog
from .guards import TrainingInterrupted

if TYPE_CHECKING:
    from .trainer import Trainer

log = get_logger(__name__)


@dataclass
class EpochEnd:
    """What the steps at the end of one epoch share: the first fields come from the loop, the rest are filled in by
    the steps, in the order of EPOCH_END_STEPS."""

    epoch: int
    lr: float
    train_metrics: dict[str, float]  # train_epoch's: mean loss terms, train_loss, train_acc
    epoch_seconds: float  # the training pass alone
    steps_total: int | None  # steps per epoch (None for an endless loader)
    writers: worklog.MetricWriters
    run_started: float  # time.time() when this process began training, for the time left
    first_epoch: int  # the first epoch this process trains (after --resume: not 1)
    test: dict[str, float] = field(default_factory=dict)  # evaluate: the task's test numbers ({} when not due)
    is_best: bool = False  # record_best
    metrics: dict[str, float] = field(default_factory=dict)  # collect_metrics: what the writers and the worklog get
    student: dict | None = None  # build_checkpoints: the published student format
    trainer_state: dict | None = None  # build_checkpoints: what --resume reads


EpochEndStep = Callable[["Trainer", EpochEnd], None]


def evaluate(trainer: Trainer, end: EpochEnd) -> None:
    """The task's test numbers (classification: top-1, top-5 and loss; detection: COCO box AP), over every rank's
    share, when the schedule says evaluation is due (every epoch; every SOLVER.EVAL_PERIOD iterations and at the
    end), on a forked RNG (its DataLoader draws a worker seed from the global one: evaluating must not change what
    is trained)."""
    if not trainer.schedule.evaluates(end.epoch):
        return
    with torch.random.fork_rng(devices=[]):
        end.test = trainer.task.evaluate(trainer.distiller, trainer.val_loader, trainer.device, f"test {end.epoch}",
                                         trainer.memory_format)


def record_best(trainer: Trainer, end: EpochEnd) -> None:
    """The test number that ranks checkpoints (the task's metric) becomes the last (and maybe the best) of the run;
    a period without evaluation only moves where the run stands."""
    if end.test:
        end.is_best = trainer.checkpoints.end_epoch(end.epoch, end.test[trainer.task.metric])
    else:
        trainer.checkpoints.end_epoch_unevaluated(end.epoch)


def collect_metrics(trainer: Trainer, end: EpochEnd) -> None:
    """The epoch's scalars: training, test (when evaluated), best so far, time, and what the distiller reports."""
    test = trainer.task.test_columns(end.test) if end.test else {}
    best = {"best_acc": trainer.checkpoints.best_acc} if trainer.checkpoints.best_acc >= 0 else {}  # none evaluated yet
    end.metrics = {**end.train_metrics, **test, **best, "epoch_seconds": end.epoch_seconds,
                   **trainer.distiller.epoch_metrics()}


def write_metrics(trainer: Trainer, end: EpochEnd) -> None:
    """TensorBoard and wandb (enabled on rank 0 only)."""
    end.writers.write(end.epoch, end.lr, end.metrics)


def build_checkpoints(trainer: Trainer, end: EpochEnd) -> None:
    """The student and trainer checkpoint dicts of this epoch's end (a collective under torchrun: every rank)."""
    end.student = trainer.checkpoints.student_state(end.epoch, trainer.checkpoints.last_acc)
    end.trainer_state = trainer.checkpoints.trainer_state(end.epoch)


def write_worklog(trainer: Trainer, end: EpochEnd) -> None:
    """The epoch's block of worklog.txt (rank 0), before any checkpoint: resume truncates what is past `latest`."""
    if trainer.is_main:
        worklog.write_epoch(trainer.run_dir, end.epoch, end.lr, end.metrics)


def save_student(trainer: Trainer, end: EpochEnd) -> None:
    """`student_latest`."""
    trainer.checkpoints.save(end.student, "student_latest")


def save_periodic(trainer: Trainer, end: EpochEnd) -> None:
    """`epoch_<n>` and `student_<n>` every LOG.SAVE_CHECKPOINT_FREQ epochs."""
    if end.epoch % trainer.cfg.LOG.SAVE_CHECKPOINT_FREQ == 0:
        trainer.checkpoints.save(end.trainer_state, f"epoch_{end.epoch}")
        trainer.checkpoints.save(end.student, f"student_{end.epoch}")


def save_best(trainer: Trainer, end: EpochEnd) -> None:
    """`best` and `student_best` when this epoch's test top-1 is the best so far."""
    if end.is_best:
        trainer.checkpoints.save(end.trainer_state, "best")
        trainer.checkpoints.save(end.student, "student_best")


def save_latest(trainer: Trainer, end: EpochEnd) -> None:
    """`latest`, the file --resume reads: the last one written (see the module docstring)."""
    trainer.checkpoints.save(end.trainer_state, "latest")


def log_line(trainer: Trainer, end: EpochEnd) -> None:
    """The epoch's one line: LR, losses, accuracies (or APs), time taken and time left."""
    periods = trainer.schedule.periods
    elapsed = time.time() - end.run_started
    left = elapsed / (end.epoch - end.first_epoch + 1) * (periods - end.epoch)
    train_acc = end.train_metrics.get("train_acc")
    parts = [trainer.schedule.done(end.epoch), f"lr {end.lr:.4g}", f"train loss {end.train_metrics['train_loss']:.4f}"]
    if train_acc is not None:
        parts.append(f"train top-1 {train_acc:.2f}")
    if end.test:
        parts += [trainer.task.test_summary(end.test), f"best {trainer.checkpoints.best_acc:.2f}"]
    log.info("  ".join(parts) + f"  ({end.epoch_seconds:.1f} s; elapsed {duration(elapsed)}, left ~{duration(left)})")


def check_signals(trainer: Trainer, end: EpochEnd) -> None:
    """A SIGTERM/SIGINT that arrived during evaluation or saving stops here: `latest` holds this epoch's end."""
    if trainer.signals.requested():
        raise TrainingInterrupted(trainer.signals.signum, end.epoch, end.steps_total or 0, end.steps_total,
                                 trainer.checkpoints.path("latest"), False, trainer.schedule.unit)


EPOCH_END_STEPS: tuple[EpochEndStep, ...] = (
    evaluate,
    record_best,
    collect_metrics,
    write_metrics,
    build_checkpoints,
    write_worklog,
    save_student,
    save_periodic,
    save_best,
    save_latest,  # the last file written
    log_line,
    check_signals,
)


def duration(seconds: float) -> str:
    """`1h02m`, `4m05s` or `12s`."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
