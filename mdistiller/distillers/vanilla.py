"""DISTILLER.TYPE NONE: train the student alone with cross-entropy (how teachers are trained)."""

from __future__ import annotations

import torch
from torch import nn

from ._base import Distiller, cross_entropy
from .registry import register_distiller


@register_distiller("NONE")
class Vanilla(Distiller):
    """Plain supervised training."""

    requires_teacher = False
    accepts_soft_targets = True  # CE with probabilities: trains under DATASET.MIXUP

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, cfg=None):
        super().__init__(student, None, cfg)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits, _ = self.student(image)
        return logits, {"loss_ce": cross_entropy(logits, target)}
