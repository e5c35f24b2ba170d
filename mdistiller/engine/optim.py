"""The optimizer a config asks for (SOLVER.TYPE): one factory, so the trainer never branches on the optimizer.

- "SGD" (every CNN recipe): `torch.optim.SGD(params, lr, momentum=SOLVER.MOMENTUM, weight_decay=SOLVER.WEIGHT_DECAY)`
  over all learnable parameters in one group, exactly what the trainer has always built (same state dict, so
  resuming an older run works); with SOLVER.WEIGHT_DECAY_NORM >= 0 two groups, norm-layer parameters at that decay
  (detectron2's recipe, used by the detection task).
- "AdamW" (the DeiT / VkD recipe): `torch.optim.AdamW(betas=SOLVER.ADAMW.BETAS, eps=SOLVER.ADAMW.EPS)` with
  SOLVER.WEIGHT_DECAY on the weights only: with SOLVER.ADAMW.NO_WEIGHT_DECAY_1D (default) biases, norm parameters,
  every other 1-d parameter and what a module lists in `no_weight_decay()` (timm's ViTs: pos_embed, cls_token) get
  none, as in the DeiT and VkD code.

Both take the distiller's `get_learnable_parameters()` (student plus the method's extra modules, never the teacher).
SOLVER.TRAINER "dot" / "crd_dot" replaces SGD by DOT (engine/dot.py: `DistillationOrientedTrainer`, task and
distillation momentum buffers), whose own `update(losses)` is then the step's update rule.
The learning rate follows SOLVER.LR_SCHEDULE (`learning_rate`), set by the trainer on every param group.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch
from torch import nn

from .dot import DOT_TRAINERS, build_dot


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names that modules of `model` exempt from weight decay through a `no_weight_decay()` method."""
    names = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names.update(f"{prefix}.{name}" if prefix else name for name in listed())
    return names


def weight_decay_groups(distiller: nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups of the learnable parameters: decayed weights, and (weight decay 0) biases, 1-d parameters and
    the names listed by `no_weight_decay()`."""
    learnable = {id(p) for p in distiller.get_learnable_parameters()}
    skip = no_weight_decay_names(distiller)
    decay, no_decay = [], []
    for name, param in distiller.named_parameters():
        if id(param) not in learnable:
            continue
        exempt = param.ndim <= 1 or name.endswith(".bias") or name in skip
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def norm_parameter_groups(distiller: nn.Module, weight_decay: float, norm_weight_decay: float) -> list[dict]:
    """detectron2's param groups: the parameters of norm layers (BatchNorm, SyncBatchNorm, GroupNorm, LayerNorm, ...)
    at `norm_weight_decay`, every other learnable parameter (biases included) at `weight_decay`."""
    norm_ids = {id(p) for module in distiller.modules() if isinstance(module, NORM_LAYERS)
                for p in module.parameters(recurse=False)}
    other, norm = [], []
    for param in distiller.get_learnable_parameters():
        (norm if id(param) in norm_ids else other).append(param)
    return [{"params": other, "weight_decay": weight_decay}, {"params": norm, "weight_decay": norm_weight_decay}]


def _sgd(cfg, distiller: nn.Module) -> torch.optim.Optimizer:
    solver = cfg.SOLVER
    if solver.WEIGHT_DECAY_NORM >= 0:
        params = norm_parameter_groups(distiller, solver.WEIGHT_DECAY, solver.WEIGHT_DECAY_NORM)
        return torch.optim.SGD(params, lr=solver.LR, momentum=solver.MOMENTUM)
    return torch.optim.SGD(
        distiller.get_learnable_parameters(), lr=solver.LR, momentum=solver.MOMENTUM, weight_decay=solver.WEIGHT_DECAY
    )


def _adamw(cfg, distiller: nn.Module) -> torch.optim.Optimizer:
    solver, adamw = cfg.SOLVER, cfg.SOLVER.ADAMW
    if adamw.NO_WEIGHT_DECAY_1D:
        params = weight_decay_groups(distiller, solver.WEIGHT_DECAY)
    else:
        params = [{"params": distiller.get_learnable_parameters(), "weight_decay": solver.WEIGHT_DECAY}]
    return torch.optim.AdamW(params, lr=solver.LR, betas=tuple(adamw.BETAS), eps=adamw.EPS)


# SOLVER.TYPE -> builder; the names are cfg.OPTIMIZERS, which validate_cfg checks
OPTIMIZER_BUILDERS = {"SGD": _sgd, "AdamW": _adamw}


def build_optimizer(cfg, distiller: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of SOLVER.TYPE over `distiller.get_learnable_parameters()`, at SOLVER.LR (DOT under SOLVER.TRAINER
    dot / crd_dot, which validation allows with SGD only)."""
    if cfg.SOLVER.TRAINER in DOT_TRAINERS:
        return build_dot(cfg, distiller.get_learnable_parameters(), distiller.declares.distillation_terms)
    return OPTIMIZER_BUILDERS[cfg.SOLVER.TYPE](cfg, distiller)


def learning_rate(cfg, epoch: int, epoch_fraction: float = 1.0) -> float:
    """The LR after `epoch_fraction` of (1-based) `epoch`, by SOLVER.LR_SCHEDULE:

    - "step" (mdistiller's): LR x LR_DECAY_RATE after each of LR_DECAY_STAGES the epoch is strictly past;
    - "cosine" (DeiT's): `LR_MIN + (LR - LR_MIN) (1 + cos(pi t / EPOCHS)) / 2`, t = epochs done, set every step.

    With SOLVER.LR_WARMUP_EPOCHS W > 0 the LR is also scaled by `min(1, t / W)`: a per-step linear ramp (Goyal et
    al., 2017), t = `epoch - 1 + epoch_fraction`.
    """
    solver = cfg.SOLVER
    done = epoch - 1 + epoch_fraction
    if solver.LR_SCHEDULE == "cosine":
        progress = min(max(done / solver.EPOCHS, 0.0), 1.0)
        lr = solver.LR_MIN + (solver.LR - solver.LR_MIN) * 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        steps = int(np.sum(epoch > np.asarray(solver.LR_DECAY_STAGES)))
        lr = solver.LR * solver.LR_DECAY_RATE**steps
    if solver.LR_WARMUP_EPOCHS > 0:
        lr *= min(1.0, done / solver.LR_WARMUP_EPOCHS)
    return lr


def iteration_learning_rate(cfg, iteration: int) -> float:
    """detectron2's WarmupMultiStepLR at 0-based `iteration` (the LR its optimizer step uses):
    `LR x LR_DECAY_RATE^k`, k = the number of LR_DECAY_ITERS <= iteration, times `f + (1 - f) iteration / W` while
    iteration < W = WARMUP_ITERS (f = WARMUP_FACTOR)."""
    solver = cfg.SOLVER
    decays = sum(1 for boundary in solver.LR_DECAY_ITERS if boundary <= iteration)
    lr = solver.LR * solver.LR_DECAY_RATE**decays
    if iteration < solver.WARMUP_ITERS:
        alpha = iteration / solver.WARMUP_ITERS
        lr *= solver.WARMUP_FACTOR * (1.0 - alpha) + alpha
    return lr


def lr_changes_within(cfg, epoch: int) -> bool:
    """Whether the LR of `epoch` is set step by step (cosine schedule, or an epoch of the warm-up)."""
    return cfg.SOLVER.LR_SCHEDULE == "cosine" or epoch - 1 < cfg.SOLVER.LR_WARMUP_EPOCHS


def backward_passes(cfg) -> int:
    """How many backward passes the update rule makes through one forward: 2 under DOT (the distillation loss with
    the graph kept, then the task loss), else 1. A compiled forward must then keep its saved tensors alive."""
    return 2 if cfg.SOLVER.TRAINER in DOT_TRAINERS else 1


def summed_loss_update(optimizer: torch.optim.Optimizer, losses: dict[str, torch.Tensor]) -> None:
    """The usual update: backward of the sum of the loss terms' batch means, then one optimizer step (no host sync)."""
    loss = sum(term.mean() for term in losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def update_rule(optimizer: torch.optim.Optimizer) -> Callable[[dict[str, torch.Tensor]], None]:
    """How a step turns loss terms into an update: a property of the optimizer. An optimizer that needs its own rule
    (DOT's two backward passes) defines `update(losses)`; every other one gets `summed_loss_update`."""
    own = getattr(optimizer, "update", None)
    if callable(own):
        return own
    return functools.partial(summed_loss_update, optimizer)
