"""The one trainer: SOLVER.EPOCHS passes of `train_step` over the training set, each followed by the end-of-epoch
steps (evaluation, the worklog, TensorBoard, the checkpoints). It knows nothing about methods: a batch dict goes to
`distiller(**batch, epoch=epoch)`, the returned loss terms go to the optimizer's update rule, and whatever the
distiller reports in `epoch_metrics()` is logged.

Collaborators, one job each: `placement` (device, DDP, compile), `optim` (optimizer, LR schedule, update rule),
`epoch` (an epoch's progress: device-side statistics, the non-finite watch), `guards` (non-finite losses, signals),
`run_checkpoints` (resume, RNG, checkpoint files), `epoch_end` (the ordered steps after each epoch), `worklog`
(worklog.txt, TensorBoard, wandb), `evaluate`, and the optional `teacher_cache` table (DISTILLER.TEACHER_CACHE: the
teacher logits a batch carries).

The order of the writes at the end of an epoch is what makes resume exact after a kill at any moment; it lives in one
list, `epoch_end.EPOCH_END_STEPS` (its docstring says why): the worklog block first, then the student files,
`epoch_<n>` and `best`, and `latest` last.
"""

from __future__ import annotations

import itertools
import math
import os
import time

import torch
from torch import nn
from tqdm import tqdm

from .. import distributed
from ..dataset import shutdown_workers
from ..dataset.mixing import build_batch_mixer
from ..errors import MdistillerError
from ..files import remove_stale_temp_files
from ..log import FILE_ONLY, get_logger
from ..models.common import num_classes_of_model
from ..rng import set_rng_state
from . import accel, epoch_end, worklog
from .epoch import EpochProgress
from .guards import PROGRESS_EVERY, NonFiniteLoss, StopSignals, TrainingInterrupted, loss_values, nan_sync_interval
from .optim import build_optimizer, update_rule
from .placement import place
from .run_checkpoints import RunCheckpoints
from .schedule import build_schedule
from .tasks import task_of

log = get_logger(__name__)


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length
        return None


class Trainer:
    """Trains `distiller` for cfg.SOLVER.EPOCHS epochs, writing everything under run_dir."""

    def __init__(self, run_dir: str, distiller: nn.Module, train_loader, val_loader, cfg, device: torch.device,
                 teacher_cache=None):
        self.run_dir, self.cfg, self.device = run_dir, cfg, device
        self.teacher_cache = teacher_cache  # a TeacherLogitTable (engine/teacher_cache.py) or None
        self.world = distributed.world_size()
        self.is_main = distributed.is_main_process()
        placement = place(distiller, cfg, device)
        self.distiller, self.ddp, self.forward = placement.module, placement.ddp, placement.forward
        self.memory_format = placement.memory_format
        self.train_loader, self.val_loader = train_loader, val_loader
        self.optimizer = build_optimizer(cfg, self.distiller)
        self._declared_terms = self.distiller.declares.loss_terms
        self.update = update_rule(self.optimizer)
        self.mix_batch = build_batch_mixer(cfg, num_classes_of_model(self.distiller.student))  # None when off
        self.schedule = build_schedule(cfg, _length(train_loader))
        self.task = task_of(cfg)
        self.nan_policy = cfg.SOLVER.NAN_POLICY
        self.sync_every = nan_sync_interval(device)
        self.checkpoints = RunCheckpoints(run_dir, cfg, self.distiller, self.optimizer,
                                          getattr(train_loader, "generator", None))
        self.signals = StopSignals(device)
        self._quiet = None if self.is_main else True  # tqdm: only rank 0 shows progress

    # ---- the step ----
    def set_lr(self, lr: float) -> None:
        """The LR of every param group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def prepare_batch(self, batch: dict) -> dict:
        """A loaded training batch on the device, in the run's memory format, with the cached teacher logits under
        DISTILLER.TEACHER_CACHE (looked up where the loader made the batch: no host sync), mixed under DATASET.MIXUP."""
        if self.teacher_cache is not None:
            batch = self.teacher_cache.attach(batch)
        batch = accel.batch_to_device(batch, self.device, self.memory_format)
        return self.mix_batch(batch) if self.mix_batch is not None else batch

    def forward_step(self, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The distiller's training forward on a device batch, under the run's precision: (logits, loss terms)."""
        accel.begin_step(self.cfg)
        with accel.autocast(self.cfg, self.device):
            logits, losses = self.forward(**batch, epoch=epoch)
        undeclared = losses.keys() - self._declared_terms
        if undeclared:  # DOT's split and the reports read the declaration: a term it does not name would be misfiled
            raise MdistillerError(f"{type(self.distiller).__name__} returned loss term(s) "
                                  f"{', '.join(sorted(undeclared))} that its Declaration.loss_terms "
                                  f"({', '.join(self._declared_terms)}) does not name")
        return logits, losses

    def epoch_progress(self, epoch: int, steps_total: int | None) -> EpochProgress:
        """A fresh record of `epoch`'s progress over `steps_total` steps (train_epoch makes one; tools/bench.py one
        per row)."""
        return EpochProgress(epoch, self.device, steps_total, bool(self.schedule.per_step_lr(epoch) and steps_total))

    def train_step(self, batch: dict, epoch: int, step: int = 1,
                   progress: EpochProgress | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The one training step, run by `train_epoch` and by tools/bench.py alike: per-step LR, the batch on the
        device, the forward under the speed switches, the non-finite watch, the update (skipped under NAN_POLICY skip
        when a term is not finite) and the epoch's device-side statistics. `step` counts from 1 in the epoch;
        `progress` is the epoch's (a fresh one when None). Returns device tensors; reads the host only where the NaN
        policy must (every `sync_every` steps under "stop", every step under "skip")."""
        progress = progress if progress is not None else EpochProgress(epoch, self.device)
        if progress.per_step_lr:
            self.set_lr(self.schedule.step_lr(epoch, step, progress.steps_total))
        batch = self.prepare_batch(batch)
        logits, losses = self.forward_step(batch, epoch)
        bad = progress.watch.update(step, losses)
        if self.nan_policy == "skip" and self._any_rank(bad):  # one host sync per step, as GradScaler makes
            values = dict(zip(losses, loss_values(losses).tolist()))
            progress.stats.skip([k for k, v in values.items() if not math.isfinite(v)])
            return logits, losses
        if self.nan_policy == "stop" and step % self.sync_every == 0:
            self._raise_if_non_finite(progress)  # on the CPU before every update: no bad update is ever applied
        self.update(losses)
        progress.stats.add(losses, logits, batch.get("target"))
        return logits, losses

    def _any_rank(self, flag: torch.Tensor) -> bool:
        """bool(flag), or whether it holds on any rank under torchrun (a host sync)."""
        return distributed.any_rank(flag, self.device) if self.world > 1 else bool(flag)

    def _raise_if_non_finite(self, progress: EpochProgress) -> None:
        try:
            progress.watch.raise_if_any(progress.epoch, progress.steps_total, self.schedule.unit)
        except NonFiniteLoss as exc:
            raise MdistillerError(
                f"{exc}; stopped without saving: {self.checkpoints.last_good()}. Lower SOLVER.LR, check the loss "
                f"weights, or set SOLVER.NAN_POLICY skip"
            ) from None

    # ---- the epoch ----
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set (or the rest of it after a mid-epoch resume); mean loss terms, train top-1."""
        self.distiller.train()
        steps_total = self.schedule.steps_in(epoch)
        progress = self.epoch_progress(epoch, steps_total)
        self.checkpoints.begin_epoch()  # before the loader draws this epoch's permutation and worker seeds
        self._restart_workers_each_epoch()
        partial = self.checkpoints.take_partial(epoch)
        done = partial["step"] if partial is not None else 0
        # a sampler that can skip batches without their data being read (COCO's stream) starts after the steps done;
        # otherwise they are loaded again (replayed) so every RNG advances as it did
        sampler = getattr(self.train_loader, "batch_sampler", None)
        skips = done > 0 and callable(getattr(sampler, "skip_next", None))
        if skips:
            sampler.skip_next(done)
        iterator = iter(self.train_loader)
        if steps_total is not None and _length(self.train_loader) is None:  # an endless stream: this period's share
            iterator = itertools.islice(iterator, steps_total - done if skips else steps_total)
        step = self._resume_partial(partial, epoch, iterator, progress, replay=not skips)
        bar = tqdm(iterator, desc=f"epoch {epoch}", initial=step, total=steps_total, leave=False,
                   dynamic_ncols=True, disable=self._quiet)
        for batch in bar:
            step += 1
            self.train_step(batch, epoch, step, progress)
            if step % PROGRESS_EVERY == 0 and progress.stats.loss_sums:
                mean_loss = sum(progress.stats.loss_sums.values()).item() / max(progress.stats.steps, 1)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            if self.signals.requested(step % self.sync_every == 0):
                if self.nan_policy == "stop":
                    self._raise_if_non_finite(progress)
                stats = progress.stats.summed_state() if self.world > 1 else progress.stats.state()
                self.checkpoints.save_mid_epoch(epoch, step, stats)
                latest = self.checkpoints.path("latest")
                raise TrainingInterrupted(self.signals.signum, epoch, step, steps_total, latest, True,
                                         self.schedule.unit)
        if self.nan_policy == "stop":
            self._raise_if_non_finite(progress)
        return self._epoch_metrics(progress)

    def _resume_partial(self, partial: dict | None, epoch: int, iterator, progress: EpochProgress,
                        replay: bool = True) -> int:
        """After a mid-epoch resume: load (not train on) the batches already seen (`replay`; a skipping sampler has
        passed them already), so every RNG advances as it did, restore the sums and the RNG of the saved step; the
        step to continue after (0 otherwise)."""
        if partial is None:
            return 0
        for _ in range(partial["step"] if replay else 0):  # workers advance identically
            if next(iterator, None) is None:
                raise MdistillerError(f"{self.checkpoints.path('latest')} was saved at step {partial['step']} of "
                                      f"epoch {epoch}, but the training set now has fewer batches")
        progress.stats.load(partial["stats"])
        if partial.get("rng") is not None:
            set_rng_state(partial["rng"])  # the RNG exactly as it was after that step
        return partial["step"]

    def _restart_workers_each_epoch(self) -> None:
        """EXPERIMENT.DETERMINISTIC with persistent workers: start fresh workers (seeded from the sampler generator)
        every epoch, so an epoch's augmentations depend on the generator state alone, as resume restores it."""
        loader = self.train_loader
        if (self.cfg.EXPERIMENT.DETERMINISTIC and getattr(loader, "persistent_workers", False)
                and getattr(loader, "_iterator", None) is not None):
            shutdown_workers(loader)

    def _epoch_metrics(self, progress: EpochProgress) -> dict[str, float]:
        stats = progress.stats
        if self.world > 1:
            stats.reduce()
            # each rank's BN statistics moved with its own shard: evaluate (on every rank) what rank 0 saves
            synced = set(self.distiller.declares.rank_synced_buffers)  # kept equal by the method itself
            buffers = [b for n, b in self.distiller.named_buffers() if not n.startswith("teacher.") and n not in synced]
            distributed.broadcast_tensors(buffers)
        if stats.steps == 0:
            raise MdistillerError(
                f"every step of epoch {progress.epoch} had a non-finite loss "
                f"({', '.join(stats.skipped_terms) or 'no steps'}); nothing was trained. Lower SOLVER.LR or check the "
                f"loss weights"
            )
        metrics = {name: (total / stats.steps).item() for name, total in stats.loss_sums.items()}
        metrics["train_loss"] = sum(metrics.values())
        if stats.seen:  # a task whose forward gives class logits (classification)
            metrics["train_acc"] = 100.0 * stats.correct.item() / stats.seen
        if self.nan_policy == "skip":
            metrics["nan_skipped_steps"] = float(stats.skipped)
            if stats.skipped:
                log.warning(f"epoch {progress.epoch}: skipped {stats.skipped} step(s) with a non-finite loss "
                            f"({', '.join(stats.skipped_terms)})")
        return metrics

    # ---- the run ----
    def train(self, resume: bool = False) -> dict[str, float]:
        """Run (or continue) the schedule; returns best and last test top-1.

        SIGTERM or SIGINT stops after the current step, saves `latest` there and raises TrainingInterrupted.
        """
        if self.is_main:
            os.makedirs(self.run_dir, exist_ok=True)
        if resume:
            self.checkpoints.resume()
        if self.is_main:
            # what a killed run wrote past `latest`; a fresh start (start_epoch 1) drops the blocks of a run killed
            # before its first `latest` (the run folder held no `latest`, so nothing needed --resume)
            worklog.truncate_from(self.run_dir, self.checkpoints.start_epoch)
            remove_stale_temp_files(self.run_dir)  # left by a write that a SIGKILL cut short
        writers = worklog.MetricWriters(self.run_dir, self.cfg, self.checkpoints.start_epoch if resume else None,
                                        enabled=self.is_main)
        try:
            with self.signals.installed():
                return self._train_epochs(writers)
        except MdistillerError as exc:
            log.error(f"error: {exc}", extra=FILE_ONLY)  # the console shows it once, from the tool
            raise
        finally:
            writers.close()

    def _train_epochs(self, writers: worklog.MetricWriters) -> dict[str, float]:
        """The loop over epochs: set the LR, train one epoch, then the steps of `epoch_end.EPOCH_END_STEPS` in order
        (evaluation, worklog, writers, checkpoints with `latest` last, the log line, the signal check)."""
        epochs = self.schedule.periods
        first = self.checkpoints.start_epoch
        if first > epochs:
            log.info(f"nothing to do: {self.checkpoints.path('latest')} already finished {self.schedule.done(epochs)}")
        else:
            log.info(self.schedule.describe(first))
        started = time.time()
        for epoch in range(first, epochs + 1):
            lr = self.schedule.period_lr(epoch)
            self.set_lr(lr)
            epoch_started = time.time()
            train_metrics = self.train_epoch(epoch)
            end = epoch_end.EpochEnd(epoch=epoch, lr=lr, train_metrics=train_metrics,
                                     epoch_seconds=time.time() - epoch_started,
                                     steps_total=self.schedule.steps_in(epoch), writers=writers,
                                     run_started=started, first_epoch=first)
            for step in epoch_end.EPOCH_END_STEPS:
                step(self, end)
        if self.is_main:
            worklog.write_final(self.run_dir, self.checkpoints.best_acc)
        return {"best_acc": self.checkpoints.best_acc, "last_acc": self.checkpoints.last_acc}
