"""The one trainer: SOLVER.TYPE optimizer, step schedule, per-epoch validation, logging, checkpoints, exact resume.

It knows nothing about methods: a batch dict goes to `distiller(**batch, epoch=epoch)`, the returned losses are
summed, and whatever the distiller reports in `epoch_metrics()` is logged.

Resume is exact: `latest` holds the model, the optimizer, every RNG state and the state the data sampler had when the
epoch to run next began. At an epoch boundary that is all there is; after SIGTERM/SIGINT `latest` also holds the step
reached and the epoch's running sums, and resume replays the sampler (loading, not training on, the batches already
seen) to continue with the very next batch.

Under torchrun (see distributed.py) the training forward runs through DistributedDataParallel (the teacher's
parameters and buffers excluded), the epoch's sums and the evaluation's are summed over the ranks before they are
logged, the ranks agree on skipping a non-finite step, on stopping for a non-finite loss and on stopping for a
signal, and only rank 0 writes (worklog, tensorboard, checkpoints, progress). Checkpoints hold rank 0's state dicts
(no `module.` prefix) and every rank's RNG state, so resume under the same number of processes is exact.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import re
import signal
import threading
import time
from typing import Iterable, Iterator

import torch
from tensorboardX import SummaryWriter
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .. import distributed
from ..dataset.mixing import build_batch_mixer, hard_labels
from ..errors import MdistillerError
from ..files import atomic_write_text, remove_stale_temp_files
from ..rng import get_rng_state, set_rng_state, set_seed
from . import accel
from .cfg import cfg_to_dict
from .checkpoint import load_checkpoint, save_checkpoint
from .metrics import topk_correct
from .optim import build_optimizer, learning_rate, lr_changes_within

PROGRESS_EVERY = 20  # steps between progress-bar updates (a host sync each)


def nan_sync_interval(device: torch.device) -> int:
    """Steps between host reads of the device-side non-finite flag under SOLVER.NAN_POLICY stop.

    On the CPU every step (ops are synchronous, reading a flag costs nothing), so no bad update is ever applied; on an
    accelerator every PROGRESS_EVERY steps, so the hot loop keeps its kernels queued. The flag remembers the first bad
    step on the device, so the error names it exactly either way; the updates made after it are never saved.
    """
    return 1 if device.type == "cpu" else PROGRESS_EVERY


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training after a step; `latest` holds a state that --resume continues exactly."""

    def __init__(self, signum: int, epoch: int, step: int, steps: int | None, checkpoint: str, mid_epoch: bool):
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        self.epoch, self.step, self.steps, self.checkpoint, self.mid_epoch = epoch, step, steps, checkpoint, mid_epoch
        where = f"epoch {epoch}, step {step}/{steps or '?'}" if mid_epoch else f"the end of epoch {epoch}"
        super().__init__(f"interrupted by {self.signal_name} at {where}; {checkpoint} holds that state")


def check_distributed(cfg, device: torch.device, world: int) -> None:
    """What a run of `world` processes cannot do: a global batch they cannot split evenly, SyncBN off CUDA."""
    if world > 1 and cfg.SOLVER.BATCH_SIZE % world:
        raise MdistillerError(
            f"SOLVER.BATCH_SIZE {cfg.SOLVER.BATCH_SIZE} (the global batch) is not divisible by the {world} processes "
            f"torchrun started: use a multiple of {world} or another --nproc_per_node"
        )
    if world > 1 and cfg.DISTRIBUTED.SYNC_BN and torch.device(device).type != "cuda":
        raise MdistillerError("DISTRIBUTED.SYNC_BN needs CUDA devices (NCCL); set it False for a CPU run")


def sync_batchnorm(distiller: nn.Module) -> nn.Module:
    """Every BatchNorm outside the teacher as SyncBatchNorm (same parameters and state-dict names)."""
    for name, child in list(distiller.named_children()):
        if name != "teacher":
            setattr(distiller, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    return distiller


def wrap_ddp(distiller: nn.Module, cfg, device: torch.device) -> DistributedDataParallel:
    """DistributedDataParallel around the distiller, the teacher's parameters and buffers neither reduced nor
    broadcast (each rank loaded the same frozen teacher)."""
    ignored = [name for name, _ in itertools.chain(distiller.named_parameters(), distiller.named_buffers())
               if name.startswith("teacher.")]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(distiller, ignored)
    return DistributedDataParallel(
        distiller, device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=bool(cfg.DISTRIBUTED.FIND_UNUSED_PARAMETERS),
    )


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, desc: str = "eval",
             fmt: torch.memory_format = torch.contiguous_format, reduce: bool = False) -> dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy of `model(image) -> logits` (or (logits, feats)) on a loader.

    With reduce under torchrun, each rank holds a share of the test set: the sums are added over the ranks.
    """
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), device=device)
    correct5 = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    quiet = None if distributed.is_main_process() else True
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=quiet):
        batch = accel.batch_to_device(batch, device, fmt)
        out = model(image=batch["image"]) if hasattr(model, "forward_test") else model(batch["image"])
        logits = out[0] if isinstance(out, tuple) else out
        target = batch["target"]
        loss_sum += nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        c1, c5 = topk_correct(logits, target)
        correct1 += c1
        correct5 += c5
        count += len(target)
    model.train(was_training)
    if reduce and distributed.world_size() > 1:
        count_t = torch.tensor(float(count), device=device)
        totals = distributed.all_reduce_sum(torch.stack([correct1, correct5, loss_sum, count_t]).double())
        c1, c5, loss, count = totals.tolist()
        return {"top1": 100.0 * c1 / count, "top5": 100.0 * c5 / count, "loss": loss / count}
    return {
        "top1": 100.0 * correct1.item() / count,
        "top5": 100.0 * correct5.item() / count,
        "loss": loss_sum.item() / count,
    }


def _length(loader) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable without a length
        return None


class _EpochStats:
    """The running sums of one epoch, on the device (no host sync per step); saved with a mid-epoch checkpoint."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.correct = torch.zeros((), device=device)
        self.seen = 0
        self.steps = 0
        self.skipped = 0
        self.skipped_terms: list[str] = []

    def add(self, losses: dict[str, torch.Tensor], logits: torch.Tensor, target: torch.Tensor) -> None:
        for name, term in losses.items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + term.detach().mean()
        self.correct += topk_correct(logits.detach(), hard_labels(target), (1,))[0]
        self.seen += len(target)
        self.steps += 1

    def skip(self, bad_terms: list[str]) -> None:
        self.skipped += 1
        self.skipped_terms += [name for name in bad_terms if name not in self.skipped_terms]

    def state(self) -> dict:
        return {"loss_sums": {k: torch.as_tensor(v).detach().cpu() for k, v in self.loss_sums.items()},
                "correct": self.correct.detach().cpu(), "seen": self.seen, "steps": self.steps,
                "skipped": self.skipped, "skipped_terms": list(self.skipped_terms)}

    def _summed(self) -> tuple[list[str], torch.Tensor]:
        """The loss sums, correct and seen, each summed over the ranks (a collective)."""
        names = list(self.loss_sums)
        values = [torch.as_tensor(self.loss_sums[n], device=self.device).float() for n in names]
        seen = torch.tensor(float(self.seen), device=self.device)
        return names, distributed.all_reduce_sum(torch.stack([*values, self.correct.float(), seen]).double())

    def summed_state(self) -> dict:
        """state() with the sums over every rank (a collective): what a mid-epoch checkpoint holds under torchrun."""
        names, totals = self._summed()
        state = self.state()
        state["loss_sums"] = {n: totals[i].float().cpu() for i, n in enumerate(names)}
        state["correct"], state["seen"] = totals[-2].float().cpu(), int(totals[-1])
        state["world_size"] = distributed.world_size()
        return state

    def reduce(self) -> None:
        """In place: loss sums averaged over the ranks, correct and seen summed (the steps are the same on all)."""
        names, totals = self._summed()
        world = distributed.world_size()
        self.loss_sums = {n: (totals[i] / world).float() for i, n in enumerate(names)}
        self.correct, self.seen = totals[-2].float(), int(totals[-1])

    def load(self, state: dict) -> None:
        self.loss_sums = {k: v.to(self.device) for k, v in state["loss_sums"].items()}
        self.correct = state["correct"].to(self.device)
        self.seen, self.steps = state["seen"], state["steps"]
        self.skipped, self.skipped_terms = state["skipped"], list(state["skipped_terms"])
        saved_world = state.get("world_size", 1)
        if saved_world > 1 or distributed.world_size() > 1:
            # saved sums are over all ranks: rank 0 carries them and the others restart from zero; the loss sums
            # are rescaled to the current number of ranks, whose mean divides them by steps x ranks
            if distributed.is_main_process():
                scale = distributed.world_size() / saved_world
                self.loss_sums = {k: v * scale for k, v in self.loss_sums.items()}
            else:
                self.loss_sums = {k: torch.zeros_like(v) for k, v in self.loss_sums.items()}
                self.correct = torch.zeros_like(self.correct)
                self.seen = 0


class _NonFiniteWatch:
    """Remembers, on the device, the first step whose loss terms were not all finite and their values."""

    def __init__(self, device: torch.device):
        self.first_step = torch.full((), -1, dtype=torch.long, device=device)
        self.names: tuple[str, ...] | None = None
        self.values: torch.Tensor | None = None

    def update(self, step: int, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """Record this step's terms; returns a 0-d device bool, True when one of them is not finite (no sync)."""
        names = tuple(losses)
        values = torch.stack([term.detach().float().mean() for term in losses.values()])
        bad = ~torch.isfinite(values).all()
        if names != self.names:  # a distiller changed its loss terms: keep a recorded failure, else start over
            if self.names is not None and self.first() is not None:
                return bad
            self.names, self.values = names, values
        newly = bad & (self.first_step < 0)
        self.first_step = torch.where(newly, step, self.first_step)
        self.values = torch.where(newly, values, self.values)
        return bad

    def first(self) -> tuple[int, dict[str, float]] | None:
        """(step, {term: value}) of the first non-finite step, or None (a host sync)."""
        step = int(self.first_step)
        if step < 0:
            return None
        return step, dict(zip(self.names, self.values.tolist()))


def _format_terms(values: dict[str, float]) -> str:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)} or values
    return ", ".join(f"{k}={v}" for k, v in bad.items())


class Trainer:
    """Trains `distiller` for cfg.SOLVER.EPOCHS epochs, writing everything under run_dir."""

    def __init__(self, run_dir: str, distiller: nn.Module, train_loader, val_loader, cfg, device: torch.device):
        self.run_dir = run_dir
        self.cfg = cfg
        self.device = device
        self.world = distributed.world_size()
        self.rank = distributed.rank()
        self.is_main = self.rank == 0
        check_distributed(cfg, device, self.world)
        distiller = distiller.to(device)
        if self.world > 1 and cfg.DISTRIBUTED.SYNC_BN:
            distiller = sync_batchnorm(distiller)
        self.distiller = accel.prepare_module(distiller, cfg)
        self.memory_format = accel.memory_format(cfg)
        # DDP broadcasts rank 0's weights now and reduces gradients in backward; evaluation, the optimizer and the
        # checkpoints use the unwrapped module
        self.ddp = wrap_ddp(self.distiller, cfg, device) if self.world > 1 else None
        # the training forward; the same module when neither wrapped nor compiled
        self.forward = accel.compiled(self.ddp if self.ddp is not None else self.distiller, cfg)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.optimizer = build_optimizer(cfg, self.distiller)
        self.mix_batch = build_batch_mixer(cfg, self._num_classes())  # DATASET.MIXUP, None when off
        if self.mix_batch is not None and not getattr(self.distiller, "accepts_soft_targets", False):
            raise MdistillerError(
                f"DATASET.MIXUP gives soft labels, which {type(self.distiller).__name__} cannot train on "
                f"(its losses index the target class): set the DATASET.MIXUP values to 0"
            )
        self.nan_policy = cfg.SOLVER.NAN_POLICY
        self.best_acc = -1.0
        self.last_acc = -1.0
        self.start_epoch = 1
        self._partial: dict | None = None  # the mid-epoch position `latest` was saved at, until it is replayed
        self._latest_state: str | None = None  # what `latest` holds, for messages
        self._epoch_sampler_state: torch.Tensor | None = None
        self._stop_signal: int | None = None
        self._quiet = None if self.is_main else True  # tqdm: only rank 0 shows progress
        if self.is_main:
            os.makedirs(run_dir, exist_ok=True)
        self.tb_writer: SummaryWriter | None = None
        self.wandb_run = None

    def _open_wandb(self):
        """LOG.WANDB: log to Weights & Biases when it is installed and starts; otherwise say so and go on."""
        try:
            import wandb
        except ImportError:
            self.log("LOG.WANDB is True but wandb is not installed (pip install wandb): logging to tensorboard only")
            return None
        try:
            return wandb.init(project=self.cfg.EXPERIMENT.PROJECT, name=os.path.basename(self.run_dir),
                              config=cfg_to_dict(self.cfg), dir=self.run_dir, resume="allow")
        except Exception as exc:  # offline machine, no login, ...
            self.log(f"wandb did not start ({type(exc).__name__}: {str(exc)[:80]}): logging to tensorboard only")
            return None

    # ---- checkpoints ----
    def _path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def _sampler_generator(self):
        return getattr(self.train_loader, "generator", None)

    def resume(self) -> None:
        """Continue from `latest`: weights, optimizer, epoch (and step), best accuracy and every RNG state."""
        state = load_checkpoint(self._path("latest"), "resume checkpoint")
        if "optimizer" not in state or "epoch" not in state:
            raise MdistillerError(f"{self._path('latest')} is not a trainer checkpoint (no optimizer/epoch)")
        model_state = state["model"]
        if model_state and all(k.startswith("module.") for k in model_state):  # mdistiller wrapped DataParallel
            model_state = {k[len("module."):]: v for k, v in model_state.items()}
        self.distiller.load_state_dict(model_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.start_epoch = state["epoch"] + 1
        self.best_acc = state["best_acc"]
        self.last_acc = state.get("last_acc", -1.0)
        rng = self._rank_rng(state)
        if rng is not None:
            set_rng_state(rng)
        if self.world > 1 and len(state.get("rng_ranks") or [None]) != self.world and self.rank > 0:
            # saved by another number of processes: fresh, rank-distinct streams (resume is then not exact)
            set_seed(distributed.rank_seed(self.cfg.EXPERIMENT.SEED * 1_000_003 + state["epoch"], self.rank))
            rng = None
        generator = self._sampler_generator()
        if generator is not None and "sampler_rng" in state:
            generator.set_state(state["sampler_rng"])
        where = f"epoch {self.start_epoch}"
        self._latest_state = f"the end of epoch {state['epoch']}"
        partial = state.get("partial")
        if partial is not None:
            self._partial = {**partial, "rng": rng}
            self.start_epoch = partial["epoch"]
            where = f"epoch {partial['epoch']}, step {partial['step'] + 1}"
            self._latest_state = f"epoch {partial['epoch']}, step {partial['step']}"
        if self.is_main:
            self._truncate_worklog(self.start_epoch)
        saved_world = len(state.get("rng_ranks") or [None])
        if saved_world != self.world:
            where += f" (saved by {saved_world} process(es), now {self.world}: the continuation is not bitwise exact)"
        self.log(f"resumed from {self._path('latest')} at {where} (best top-1 {self.best_acc:.2f})")

    def _rank_rng(self, state: dict) -> dict | None:
        """This rank's RNG state from a checkpoint: its own when as many processes saved it, else rank 0's."""
        ranks = state.get("rng_ranks")
        if ranks is not None and len(ranks) == self.world:
            return ranks[self.rank]
        return state.get("rng")

    def _state(self, epoch: int) -> dict:
        state = {
            "model": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,  # complete epochs
            "best_acc": self.best_acc,
            "last_acc": self.last_acc,
            "rng": get_rng_state(),
            "arch": self.cfg.DISTILLER.STUDENT,
        }
        if self.world > 1:  # a collective: every rank calls _state, rank 0 writes
            state["rng_ranks"] = distributed.all_gather_object(state["rng"])
        generator = self._sampler_generator()
        if generator is not None:  # the state the next epoch's shuffle (and worker seeds) start from
            state["sampler_rng"] = generator.get_state()
        return state

    def _save(self, epoch: int, test_acc: float, is_best: bool) -> None:
        student = self.distiller.student
        meta = {"arch": self.cfg.DISTILLER.STUDENT, "num_classes": self._num_classes(), "epoch": epoch}
        student_state = {"model": student.state_dict(), **meta, "test_acc": test_acc}
        state = self._state(epoch)
        self._latest_state = f"the end of epoch {epoch}"
        if not self.is_main:
            return
        # students first: `latest` is what resume trusts, so it is written last
        save_checkpoint(student_state, self._path("student_latest"))
        if epoch % self.cfg.LOG.SAVE_CHECKPOINT_FREQ == 0:
            save_checkpoint(state, self._path(f"epoch_{epoch}"))
            save_checkpoint(student_state, self._path(f"student_{epoch}"))
        if is_best:
            save_checkpoint(state, self._path("best"))
            save_checkpoint(student_state, self._path("student_best"))
        save_checkpoint(state, self._path("latest"))

    def _save_mid_epoch(self, epoch: int, step: int, stats: _EpochStats) -> None:
        """`latest` at a step inside `epoch`: the sampler state of the epoch's start, the step, the running sums."""
        state = self._state(epoch - 1)
        if self._epoch_sampler_state is not None:
            state["sampler_rng"] = self._epoch_sampler_state
        state["partial"] = {"epoch": epoch, "step": step,
                            "stats": stats.summed_state() if self.world > 1 else stats.state()}
        self._latest_state = f"epoch {epoch}, step {step}"
        if self.is_main:
            save_checkpoint(state, self._path("latest"))

    def _num_classes(self) -> int:
        student = self.distiller.student
        for module in reversed(list(student.modules())):
            if isinstance(module, nn.Linear):
                return module.out_features
        return -1

    # ---- logging ----
    def log(self, message: str) -> None:
        """Print a line (rank 0 only)."""
        if self.is_main:
            tqdm.write(f"[mdistiller] {message}")

    def _append_worklog(self, text: str) -> None:
        if not self.is_main:
            return
        try:
            with open(self._path("worklog.txt"), "a") as f:
                f.write(text)
        except OSError as exc:
            raise MdistillerError(f"could not write {self._path('worklog.txt')}: {exc.strerror or exc}") from None

    def _write_worklog(self, epoch: int, lr: float, metrics: dict[str, float]) -> None:
        lines = ["-" * 25, f"epoch: {epoch}", f"lr: {lr:.6g}"]
        lines += [f"{k}: {v:.4f}" for k, v in metrics.items()]
        lines.append("-" * 25)
        self._append_worklog(os.linesep.join(lines) + os.linesep)

    def _truncate_worklog(self, start_epoch: int) -> None:
        """Drop what a killed run wrote past `latest` (epochs >= start_epoch, the final best_acc line)."""
        path = self._path("worklog.txt")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            lines = f.read().splitlines()
        keep, block, epoch = [], [], None
        for line in lines:  # blocks: dashes, "epoch: N", key: value..., dashes
            if line.startswith("-----") and block:
                block.append(line)
                if epoch is not None and epoch < start_epoch:
                    keep += block
                block, epoch = [], None
            elif line.startswith("-----"):
                block = [line]
            elif block:
                block.append(line)
                match = re.fullmatch(r"epoch: (\d+)", line)
                if match and epoch is None:
                    epoch = int(match.group(1))
        if keep != lines:
            atomic_write_text(path, "".join(line + os.linesep for line in keep))

    # ---- signals ----
    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT set a flag; the loop stops after the current step and saves. A second Ctrl-C stops now."""
        if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
            yield
            return

        def handler(signum, frame):  # no I/O here: the main thread may be inside a write
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # ---- training ----
    def _restart_workers_each_epoch(self) -> None:
        """EXPERIMENT.DETERMINISTIC with persistent workers: start fresh workers (seeded from the sampler generator)
        every epoch, so an epoch's augmentations depend on the generator state alone, as resume restores it."""
        loader = self.train_loader
        if (self.cfg.EXPERIMENT.DETERMINISTIC and getattr(loader, "persistent_workers", False)
                and getattr(loader, "_iterator", None) is not None):
            loader._iterator._shutdown_workers()
            loader._iterator = None

    def _raise_if_non_finite(self, epoch: int, watch: _NonFiniteWatch, steps: int | None) -> None:
        found = watch.first()
        if self.world > 1:  # every rank stops together, naming the first bad step of any rank
            if not distributed.any_rank(found is not None, self.device):
                return
            found = min((f for f in distributed.all_gather_object(found) if f is not None), key=lambda f: f[0])
        if found is None:
            return
        step, values = found
        kept = (f"{self._path('latest')} (saved at {self._latest_state}) is the last good checkpoint"
                if self._latest_state else "no checkpoint had been written yet")
        raise MdistillerError(
            f"non-finite loss at epoch {epoch}, step {step}/{steps or '?'} ({_format_terms(values)}); stopped "
            f"without saving: {kept}. Lower SOLVER.LR, check the loss weights, or set SOLVER.NAN_POLICY skip"
        )

    def prepare_batch(self, batch: dict) -> dict:
        """A loaded training batch on the device, in the run's memory format, mixed under DATASET.MIXUP."""
        batch = accel.batch_to_device(batch, self.device, self.memory_format)
        return self.mix_batch(batch) if self.mix_batch is not None else batch

    def forward_step(self, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The distiller's training forward on a device batch, under the run's precision: (logits, loss terms)."""
        accel.begin_step(self.cfg)
        with accel.autocast(self.cfg, self.device):
            return self.forward(**batch, epoch=epoch)

    def update(self, losses: dict[str, torch.Tensor]) -> None:
        """Backward of the summed loss terms and one optimizer step (no host sync)."""
        loss = sum(term.mean() for term in losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def train_step(self, batch: dict, epoch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step on a host or device batch; returns device tensors only, never syncs the host."""
        batch = self.prepare_batch(batch)
        logits, losses = self.forward_step(batch, epoch)
        self.update(losses)
        return logits, losses

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set (or the rest of it after a mid-epoch resume); mean loss terms, train top-1."""
        self.distiller.train()
        stats = _EpochStats(self.device)
        watch = _NonFiniteWatch(self.device)
        sync_every = nan_sync_interval(self.device)
        generator = self._sampler_generator()
        # captured before the loader draws this epoch's permutation and worker seed from it
        self._epoch_sampler_state = generator.get_state() if generator is not None else None
        self._restart_workers_each_epoch()
        steps_total = _length(self.train_loader)
        iterator = iter(self.train_loader)
        step = 0
        partial, self._partial = self._partial, None
        if partial is not None and partial["epoch"] == epoch:
            for _ in range(partial["step"]):  # replays the loading and its RNG draws; workers advance identically
                if next(iterator, None) is None:
                    raise MdistillerError(f"{self._path('latest')} was saved at step {partial['step']} of epoch "
                                          f"{epoch}, but the training set now has fewer batches")
            step = partial["step"]
            stats.load(partial["stats"])
            if partial.get("rng") is not None:
                set_rng_state(partial["rng"])  # the RNG exactly as it was after that step
        progress = tqdm(iterator, desc=f"epoch {epoch}", initial=step, total=steps_total, leave=False,
                        dynamic_ncols=True, disable=self._quiet)
        per_step_lr = lr_changes_within(self.cfg, epoch) and steps_total
        for batch in progress:
            step += 1
            if per_step_lr:
                self.set_lr(learning_rate(self.cfg, epoch, step / steps_total))
            batch = self.prepare_batch(batch)
            logits, losses = self.forward_step(batch, epoch)
            bad = watch.update(step, losses)
            if self.nan_policy == "skip" and self._any_rank(bad):  # one host sync per step, as GradScaler makes
                values = dict(zip(losses, torch.stack([t.detach().float().mean() for t in losses.values()]).tolist()))
                stats.skip([k for k, v in values.items() if not math.isfinite(v)])
            else:
                if self.nan_policy == "stop" and step % sync_every == 0:
                    self._raise_if_non_finite(epoch, watch, steps_total)
                self.update(losses)
                stats.add(losses, logits, batch["target"])
            if step % PROGRESS_EVERY == 0 and stats.loss_sums:
                progress.set_postfix(loss=f"{sum(stats.loss_sums.values()).item() / max(stats.steps, 1):.4f}")
            if self._stop_requested(step % sync_every == 0):
                if self.nan_policy == "stop":
                    self._raise_if_non_finite(epoch, watch, steps_total)
                self._save_mid_epoch(epoch, step, stats)
                raise TrainingInterrupted(self._stop_signal, epoch, step, steps_total, self._path("latest"), True)
        if self.nan_policy == "stop":
            self._raise_if_non_finite(epoch, watch, steps_total)
        if self.world > 1:
            stats.reduce()
            # each rank's BN statistics moved with its own shard: evaluate (on every rank) what rank 0 saves
            buffers = [b for n, b in self.distiller.named_buffers() if not n.startswith("teacher.")]
            distributed.broadcast_tensors(buffers)
        if stats.steps == 0:
            raise MdistillerError(
                f"every step of epoch {epoch} had a non-finite loss ({', '.join(stats.skipped_terms) or 'no steps'});"
                f" nothing was trained. Lower SOLVER.LR or check the loss weights"
            )
        metrics = {name: (total / stats.steps).item() for name, total in stats.loss_sums.items()}
        metrics["train_loss"] = sum(v for k, v in metrics.items())
        metrics["train_acc"] = 100.0 * stats.correct.item() / max(stats.seen, 1)
        if self.nan_policy == "skip":
            metrics["nan_skipped_steps"] = float(stats.skipped)
            if stats.skipped:
                self.log(f"epoch {epoch}: skipped {stats.skipped} step(s) with a non-finite loss "
                         f"({', '.join(stats.skipped_terms)})")
        return metrics

    def _any_rank(self, flag: torch.Tensor) -> bool:
        """bool(flag), or whether it holds on any rank under torchrun (a host sync)."""
        return distributed.any_rank(flag, self.device) if self.world > 1 else bool(flag)

    def _stop_requested(self, check_now: bool = True) -> bool:
        """Whether a signal asks to stop. Under torchrun the ranks agree (the largest signal number of any rank)
        only where check_now (where the loop reads the host anyway), so they stop at the same step."""
        if self.world == 1:
            return self._stop_signal is not None
        if not check_now:
            return False
        signum = torch.tensor(float(self._stop_signal or 0), device=self.device)
        torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
        self._stop_signal = int(signum) or None
        return self._stop_signal is not None

    def train(self, resume: bool = False) -> dict[str, float]:
        """Run (or continue) the schedule; returns best and last test top-1.

        SIGTERM or SIGINT stops after the current step, saves `latest` there and raises TrainingInterrupted.
        """
        if resume:
            self.resume()
        if self.is_main:
            remove_stale_temp_files(self.run_dir)  # left by a write that a SIGKILL cut short
            # purge_step hides the events a killed run logged past `latest` from TensorBoard
            self.tb_writer = SummaryWriter(self._path("train.events"), purge_step=self.start_epoch if resume else None)
            if self.cfg.LOG.WANDB:
                self.wandb_run = self._open_wandb()
        try:
            with self._stop_on_signals():
                return self._train_epochs()
        finally:
            if self.tb_writer is not None:
                self.tb_writer.close()
            if self.wandb_run is not None:
                self.wandb_run.finish()

    def _train_epochs(self) -> dict[str, float]:
        epochs = self.cfg.SOLVER.EPOCHS
        if self.start_epoch > epochs:
            self.log(f"nothing to do: {self._path('latest')} already finished epoch {epochs}")
        for epoch in range(self.start_epoch, epochs + 1):
            lr = learning_rate(self.cfg, epoch)
            self.set_lr(lr)
            started = time.time()
            train_metrics = self.train_epoch(epoch)
            epoch_seconds = time.time() - started
            # evaluation must not move the training RNG (its DataLoader draws a worker seed from the global one):
            # then how often or how the test set is evaluated never changes what is trained
            with torch.random.fork_rng(devices=[]):
                test = evaluate(self.distiller, self.val_loader, self.device, desc=f"test {epoch}",
                                fmt=self.memory_format, reduce=True)
            self.last_acc = test["top1"]
            is_best = test["top1"] > self.best_acc
            self.best_acc = max(self.best_acc, test["top1"])
            metrics = {
                **train_metrics,
                "test_acc": test["top1"],
                "test_acc_top5": test["top5"],
                "test_loss": test["loss"],
                "best_acc": self.best_acc,
                "epoch_seconds": epoch_seconds,
                **self.distiller.epoch_metrics(),
            }
            if self.tb_writer is not None:
                for name, value in metrics.items():
                    self.tb_writer.add_scalar(name, value, epoch)
                self.tb_writer.add_scalar("lr", lr, epoch)
                self.tb_writer.flush()
            if self.wandb_run is not None:
                self.wandb_run.log({**metrics, "lr": lr}, step=epoch)
            # the worklog first: a kill before `latest` is written makes resume redo the epoch and drop its lines
            self._write_worklog(epoch, lr, metrics)
            self._save(epoch, test["top1"], is_best)
            self.log(
                f"epoch {epoch}/{epochs}  lr {lr:.4g}  train loss {train_metrics['train_loss']:.4f}  "
                f"train top-1 {train_metrics['train_acc']:.2f}  test top-1 {test['top1']:.2f}  "
                f"top-5 {test['top5']:.2f}  best {self.best_acc:.2f}  ({epoch_seconds:.1f} s)"
            )
            if self._stop_requested():  # arrived during evaluation or saving: `latest` is this epoch's end
                steps = _length(self.train_loader)
                raise TrainingInterrupted(self._stop_signal, epoch, steps or 0, steps, self._path("latest"), False)
        self._append_worklog(f"best_acc\t{self.best_acc:.4f}{os.linesep}")
        return {"best_acc": self.best_acc, "last_acc": self.last_acc}
