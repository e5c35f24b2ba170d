"""The optimizer a config asks for (SOLVER.TYPE): one factory, so the trainer never branches on the optimizer.

- "SGD" (every CNN recipe): `torch.optim.SGD(params, lr, momentum=SOLVER.MOMENTUM, weight_decay=SOLVER.WEIGHT_DECAY)`
  over all learnable parameters in one group, exactly what the trainer has always built (same state dict, so
  resuming an older run works).
- "AdamW" (the DeiT / VkD recipe): `torch.optim.AdamW(betas=SOLVER.ADAMW.BETAS, eps=SOLVER.ADAMW.EPS)` with
  SOLVER.WEIGHT_DECAY on the weights only: with SOLVER.ADAMW.NO_WEIGHT_DECAY_1D (default) biases, norm parameters,
  every other 1-d parameter and what a module lists in `no_weight_decay()` (timm's ViTs: pos_embed, cls_token) get
  none, as in the DeiT and VkD code.

Both take the distiller's `get_learnable_parameters()` (student plus the method's extra modules, never the teacher).
The learning rate is set per epoch by the trainer on every param group.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import MdistillerError

OPTIMIZERS = ("SGD", "AdamW")


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


def build_optimizer(cfg, distiller: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of SOLVER.TYPE over `distiller.get_learnable_parameters()`, at SOLVER.LR."""
    solver = cfg.SOLVER
    if solver.TYPE == "SGD":
        return torch.optim.SGD(
            distiller.get_learnable_parameters(), lr=solver.LR, momentum=solver.MOMENTUM,
            weight_decay=solver.WEIGHT_DECAY,
        )
    if solver.TYPE == "AdamW":
        adamw = solver.ADAMW
        if adamw.NO_WEIGHT_DECAY_1D:
            params = weight_decay_groups(distiller, solver.WEIGHT_DECAY)
        else:
            params = [{"params": distiller.get_learnable_parameters(), "weight_decay": solver.WEIGHT_DECAY}]
        return torch.optim.AdamW(params, lr=solver.LR, betas=tuple(adamw.BETAS), eps=adamw.EPS)
    raise MdistillerError(f"SOLVER.TYPE {solver.TYPE!r} is not supported; use one of {', '.join(OPTIMIZERS)}")
