"""The one trainer: SGD + step schedule, per-epoch validation, logging, atomic checkpoints, exact resume.

It knows nothing about methods: a batch dict goes to `distiller(**batch, epoch=epoch)`, the returned losses are
summed, and whatever the distiller reports in `epoch_metrics()` is logged.
"""

from __future__ import annotations

import math
import os
import time
from typing import Iterable

import numpy as np
import torch
from tensorboardX import SummaryWriter
from torch import nn
from tqdm import tqdm

from .cfg import cfg_to_dict
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import MdistillerError
from .utils import get_rng_state, set_rng_state, topk_correct


def learning_rate(cfg, epoch: int) -> float:
    """mdistiller's step schedule: epochs are 1-based; LR x RATE after each stage the epoch is strictly past."""
    steps = int(np.sum(epoch > np.asarray(cfg.SOLVER.LR_DECAY_STAGES)))
    return cfg.SOLVER.LR * cfg.SOLVER.LR_DECAY_RATE**steps


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, desc: str = "eval") -> dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy of `model(image) -> logits` (or (logits, feats)) on a loader."""
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), device=device)
    correct5 = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        batch = _to_device(batch, device)
        out = model(image=batch["image"]) if hasattr(model, "forward_test") else model(batch["image"])
        logits = out[0] if isinstance(out, tuple) else out
        target = batch["target"]
        loss_sum += nn.functional.cross_entropy(logits.float(), target, reduction="sum")
        c1, c5 = topk_correct(logits, target)
        correct1 += c1
        correct5 += c5
        count += len(target)
    model.train(was_training)
    return {
        "top1": 100.0 * correct1.item() / count,
        "top5": 100.0 * correct5.item() / count,
        "loss": loss_sum.item() / count,
    }


class Trainer:
    """Trains `distiller` for cfg.SOLVER.EPOCHS epochs, writing everything under run_dir."""

    def __init__(self, run_dir: str, distiller: nn.Module, train_loader, val_loader, cfg, device: torch.device):
        self.run_dir = run_dir
        self.cfg = cfg
        self.device = device
        self.distiller = distiller.to(device)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.optimizer = torch.optim.SGD(
            self.distiller.get_learnable_parameters(),
            lr=cfg.SOLVER.LR,
            momentum=cfg.SOLVER.MOMENTUM,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
        self.best_acc = -1.0
        self.last_acc = -1.0
        self.start_epoch = 1
        os.makedirs(run_dir, exist_ok=True)
        self.tb_writer = SummaryWriter(os.path.join(run_dir, "train.events"))
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
        """Continue from `latest`: weights, optimizer, epoch, best accuracy and every RNG state."""
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
        if "rng" in state:
            set_rng_state(state["rng"])
        generator = self._sampler_generator()
        if generator is not None and "sampler_rng" in state:
            generator.set_state(state["sampler_rng"])
        self.log(f"resumed from {self._path('latest')} at epoch {self.start_epoch} (best top-1 {self.best_acc:.2f})")

    def _save(self, epoch: int, test_acc: float, is_best: bool) -> None:
        student = self.distiller.student
        meta = {"arch": self.cfg.DISTILLER.STUDENT, "num_classes": self._num_classes(), "epoch": epoch}
        student_state = {"model": student.state_dict(), **meta, "test_acc": test_acc}
        state = {
            "model": self.distiller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": epoch,
            "best_acc": self.best_acc,
            "last_acc": test_acc,
            "rng": get_rng_state(),
            "arch": self.cfg.DISTILLER.STUDENT,
        }
        generator = self._sampler_generator()
        if generator is not None:
            state["sampler_rng"] = generator.get_state()
        # students first: `latest` is what resume trusts, so it is written last
        save_checkpoint(student_state, self._path("student_latest"))
        if epoch % self.cfg.LOG.SAVE_CHECKPOINT_FREQ == 0:
            save_checkpoint(state, self._path(f"epoch_{epoch}"))
            save_checkpoint(student_state, self._path(f"student_{epoch}"))
        if is_best:
            save_checkpoint(state, self._path("best"))
            save_checkpoint(student_state, self._path("student_best"))
        save_checkpoint(state, self._path("latest"))

    def _num_classes(self) -> int:
        student = self.distiller.student
        for module in reversed(list(student.modules())):
            if isinstance(module, nn.Linear):
                return module.out_features
        return -1

    # ---- logging ----
    def log(self, message: str) -> None:
        tqdm.write(f"[mdistiller] {message}")

    def _write_worklog(self, epoch: int, lr: float, metrics: dict[str, float]) -> None:
        lines = ["-" * 25, f"epoch: {epoch}", f"lr: {lr:.6g}"]
        lines += [f"{k}: {v:.4f}" for k, v in metrics.items()]
        lines.append("-" * 25)
        with open(self._path("worklog.txt"), "a") as f:
            f.write(os.linesep.join(lines) + os.linesep)

    # ---- training ----
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; returns mean loss terms and train top-1."""
        self.distiller.train()
        loss_sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), device=self.device)
        seen = 0
        steps = 0
        progress = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True, disable=None)
        for batch in progress:
            batch = _to_device(batch, self.device)
            logits, losses = self.distiller(**batch, epoch=epoch)
            loss = sum(term.mean() for term in losses.values())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for name, term in losses.items():
                loss_sums[name] = loss_sums.get(name, 0.0) + term.detach().mean()
            correct += topk_correct(logits.detach(), batch["target"], (1,))[0]
            seen += len(batch["target"])
            steps += 1
            if steps % 20 == 0:  # the only host sync in the loop, for the progress bar
                progress.set_postfix(loss=f"{sum(loss_sums.values()).item() / steps:.4f}")
        metrics = {name: (total / steps).item() for name, total in loss_sums.items()}
        bad = [name for name, value in metrics.items() if not math.isfinite(value)]
        if bad:
            raise MdistillerError(
                f"non-finite loss in epoch {epoch} ({', '.join(bad)}); the last good checkpoint is "
                f"{self._path('latest')}. Lower SOLVER.LR or check the loss weights"
            )
        metrics["train_loss"] = sum(v for k, v in metrics.items())
        metrics["train_acc"] = 100.0 * correct.item() / max(seen, 1)
        return metrics

    def train(self, resume: bool = False) -> dict[str, float]:
        """Run (or continue) the schedule; returns best and last test top-1."""
        if resume:
            self.resume()
        if self.cfg.LOG.WANDB:
            self.wandb_run = self._open_wandb()
        epochs = self.cfg.SOLVER.EPOCHS
        if self.start_epoch > epochs:
            self.log(f"nothing to do: {self._path('latest')} already finished epoch {epochs}")
        for epoch in range(self.start_epoch, epochs + 1):
            lr = learning_rate(self.cfg, epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            started = time.time()
            train_metrics = self.train_epoch(epoch)
            epoch_seconds = time.time() - started
            test = evaluate(self.distiller, self.val_loader, self.device, desc=f"test {epoch}")
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
            for name, value in metrics.items():
                self.tb_writer.add_scalar(name, value, epoch)
            self.tb_writer.add_scalar("lr", lr, epoch)
            self.tb_writer.flush()
            if self.wandb_run is not None:
                self.wandb_run.log({**metrics, "lr": lr}, step=epoch)
            self._write_worklog(epoch, lr, metrics)
            self._save(epoch, test["top1"], is_best)
            self.log(
                f"epoch {epoch}/{epochs}  lr {lr:.4g}  train loss {train_metrics['train_loss']:.4f}  "
                f"train top-1 {train_metrics['train_acc']:.2f}  test top-1 {test['top1']:.2f}  "
                f"top-5 {test['top5']:.2f}  best {self.best_acc:.2f}  ({epoch_seconds:.1f} s)"
            )
        if self.start_epoch <= epochs:
            with open(self._path("worklog.txt"), "a") as f:
                f.write(f"best_acc\t{self.best_acc:.4f}{os.linesep}")
        self.tb_writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        return {"best_acc": self.best_acc, "last_acc": self.last_acc}
