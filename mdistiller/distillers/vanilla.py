"""DISTILLER.TYPE NONE: train the student alone with cross-entropy (how teachers are trained)."""

from __future__ import annotations

import torch

from ._base import Declaration, Distiller, cross_entropy
from .registry import register_distiller


@register_distiller("NONE")
class Vanilla(Distiller):
    """Plain supervised training."""

    declares = Declaration(
        loss_terms=("loss_ce",),
        requires_teacher=False,
        accepts_soft_targets=True,  # CE with probabilities: trains under DATASET.MIXUP
    )

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits, _ = self.student(image)
        return logits, {"loss_ce": cross_entropy(logits, target)}
