"""How a run is cut into periods and which LR each step uses; the trainer's loop runs periods and asks the schedule.

- `EpochSchedule` (mdistiller's): SOLVER.EPOCHS passes over the training set, the LR of SOLVER.LR_SCHEDULE
  (`optim.learning_rate`), set per step only where it changes within an epoch (cosine, warm-up); evaluation after
  every epoch.
- `IterationSchedule` (detectron2's, SOLVER.MAX_ITER > 0): MAX_ITER steps over an endless training stream, cut into
  periods of SOLVER.CHECKPOINT_PERIOD iterations that end as an epoch does (`latest`, the worklog block; `epoch_<n>`
  is the checkpoint after n periods), the LR of `optim.iteration_learning_rate` set at every step, and evaluation at
  the end of a period whose last iteration is a multiple of SOLVER.EVAL_PERIOD, and after the last one.
"""

from __future__ import annotations

import math

from ..errors import MdistillerError
from .cfg import cfg_value
from .optim import iteration_learning_rate, learning_rate, lr_changes_within


class EpochSchedule:
    """SOLVER.EPOCHS epochs of `steps_per_epoch` steps (None: a loader without a length)."""

    unit = "epoch"

    def __init__(self, cfg, steps_per_epoch: int | None):
        self.cfg = cfg
        self.periods = cfg.SOLVER.EPOCHS
        self.steps_per_epoch = steps_per_epoch

    def steps_in(self, period: int) -> int | None:
        return self.steps_per_epoch

    def period_lr(self, period: int) -> float:
        """The LR the period starts with."""
        return learning_rate(self.cfg, period)

    def per_step_lr(self, period: int) -> bool:
        return lr_changes_within(self.cfg, period)

    def step_lr(self, period: int, step: int, steps_total: int) -> float:
        """The LR of the `step`-th step (1-based) of `period`, which has `steps_total` steps."""
        return learning_rate(self.cfg, period, step / steps_total)

    def evaluates(self, period: int) -> bool:
        return True

    def done(self, period: int) -> str:
        """Where the run stands after `period`, for the log line."""
        return f"epoch {period}/{self.periods}"

    def describe(self, first: int) -> str:
        steps = self.steps_per_epoch
        return (f"training epochs {first}..{self.periods} of {self.periods}"
                + (f", {steps} steps each ({steps * (self.periods - first + 1)} steps)" if steps else ""))


class IterationSchedule:
    """SOLVER.MAX_ITER iterations in periods of SOLVER.CHECKPOINT_PERIOD (the last one may be shorter)."""

    unit = "period"

    def __init__(self, cfg):
        self.cfg = cfg
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.period = cfg.SOLVER.CHECKPOINT_PERIOD
        self.eval_period = cfg.SOLVER.EVAL_PERIOD
        self.periods = math.ceil(self.max_iter / self.period)

    def first_iteration(self, period: int) -> int:
        """The 0-based iteration the period starts at."""
        return (period - 1) * self.period

    def steps_in(self, period: int) -> int:
        return min(self.period, self.max_iter - self.first_iteration(period))

    def period_lr(self, period: int) -> float:
        return iteration_learning_rate(self.cfg, self.first_iteration(period))

    def per_step_lr(self, period: int) -> bool:
        return True

    def step_lr(self, period: int, step: int, steps_total: int) -> float:
        return iteration_learning_rate(self.cfg, self.first_iteration(period) + step - 1)

    def evaluates(self, period: int) -> bool:
        last = self.first_iteration(period) + self.steps_in(period)
        return period == self.periods or (self.eval_period > 0 and last % self.eval_period == 0)

    def done(self, period: int) -> str:
        return f"iteration {self.first_iteration(period) + self.steps_in(period)}/{self.max_iter}"

    def describe(self, first: int) -> str:
        return (f"training iterations {self.first_iteration(first) + 1}..{self.max_iter} of {self.max_iter} "
                f"(periods {first}..{self.periods} of {self.period} iterations)")


def build_schedule(cfg, steps_per_epoch: int | None) -> EpochSchedule | IterationSchedule:
    """The schedule the config asks for: iterations when SOLVER.MAX_ITER > 0, else epochs."""
    return IterationSchedule(cfg) if cfg.SOLVER.MAX_ITER > 0 else EpochSchedule(cfg, steps_per_epoch)


# The keys of one schedule that the other does not read: set away from their defaults, they are refused (a key that
# would be ignored is never accepted).
EPOCH_KEYS = ("SOLVER.EPOCHS", "SOLVER.LR_DECAY_STAGES", "SOLVER.LR_WARMUP_EPOCHS", "SOLVER.LR_SCHEDULE",
              "SOLVER.LR_MIN")
ITERATION_KEYS = ("SOLVER.LR_DECAY_ITERS", "SOLVER.WARMUP_ITERS", "SOLVER.WARMUP_FACTOR", "SOLVER.CHECKPOINT_PERIOD",
                  "SOLVER.EVAL_PERIOD")


def _value(cfg, key: str):
    """cfg_value, a tuple read as a list (a YAML list and a default tuple compare equal)."""
    value = cfg_value(cfg, key)
    return list(value) if isinstance(value, (list, tuple)) else value


def check_schedule(cfg, defaults, task: str) -> None:
    """The schedule keys against each other and the task: detection trains by iterations (SOLVER.MAX_ITER),
    classification by epochs; the other schedule's keys must stay at their defaults (`defaults`: the default CFG)."""
    solver = cfg.SOLVER
    iterations = solver.MAX_ITER > 0
    if solver.MAX_ITER < 0:
        raise MdistillerError(f"SOLVER.MAX_ITER must be >= 0 (0: train SOLVER.EPOCHS epochs), got {solver.MAX_ITER}")
    if task == "detection" and not iterations:
        raise MdistillerError("the detection task trains by iterations: set SOLVER.MAX_ITER (detectron2's; the COCO "
                              "configs use 180000) instead of SOLVER.EPOCHS")
    if task != "detection" and iterations:
        raise MdistillerError(f"SOLVER.MAX_ITER is the detection task's iteration schedule; DATASET.TYPE "
                              f"{cfg.DATASET.TYPE} trains SOLVER.EPOCHS epochs: set SOLVER.MAX_ITER 0")
    unread = EPOCH_KEYS if iterations else ITERATION_KEYS
    for key in unread:
        if _value(cfg, key) != _value(defaults, key):
            other = "SOLVER.MAX_ITER > 0 (iterations)" if iterations else "SOLVER.EPOCHS (SOLVER.MAX_ITER 0)"
            raise MdistillerError(f"{key} {_value(cfg, key)} is not read by a run of {other}: leave it at "
                                  f"{_value(defaults, key)}")
    if not iterations:
        return
    steps = list(solver.LR_DECAY_ITERS)
    if any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in steps) or any(
            b <= a for a, b in zip(steps, steps[1:])):
        raise MdistillerError(f"SOLVER.LR_DECAY_ITERS must be strictly increasing positive iterations, got {steps}")
    if steps and steps[-1] >= solver.MAX_ITER:
        raise MdistillerError(f"SOLVER.LR_DECAY_ITERS {steps} reaches SOLVER.MAX_ITER {solver.MAX_ITER}: a decay "
                              f"at or after the last iteration never applies; drop it or raise MAX_ITER")
    if solver.WARMUP_ITERS < 0 or not 0 < solver.WARMUP_FACTOR <= 1:
        raise MdistillerError(f"SOLVER.WARMUP_ITERS must be >= 0 and SOLVER.WARMUP_FACTOR in (0, 1], got "
                              f"{solver.WARMUP_ITERS} and {solver.WARMUP_FACTOR}")
    if solver.CHECKPOINT_PERIOD <= 0:
        raise MdistillerError(f"SOLVER.CHECKPOINT_PERIOD must be positive iterations, got {solver.CHECKPOINT_PERIOD}")
    if solver.EVAL_PERIOD < 0 or solver.EVAL_PERIOD % solver.CHECKPOINT_PERIOD:
        raise MdistillerError(f"SOLVER.EVAL_PERIOD {solver.EVAL_PERIOD} must be 0 (evaluate at the end) or a multiple "
                              f"of SOLVER.CHECKPOINT_PERIOD {solver.CHECKPOINT_PERIOD}: evaluation runs where a "
                              f"period ends")
