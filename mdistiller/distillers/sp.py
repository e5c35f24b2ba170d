"""SP (Tung & Mori, ICCV 2019): similarity-preserving KD, matching the batch's pairwise similarity matrices.

On the last feature map only: `G = normalize_rows(f f^T)` with `f` the (B, C*H*W) flattened map (row L2 norm, eps
1e-12), for student and teacher; `loss_kd = FEAT_WEIGHT * sum((G_t - G_s)^2) / B^2`, of shape (1,) as upstream
mdistiller returns it (the trainer sums `.mean()` of each term, so the shape does not change the step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import Distiller, cross_entropy
from ._stages import last_map_shapes
from .precision import fp32_loss
from .registry import register_distiller


def similarity_matrix(feat: torch.Tensor) -> torch.Tensor:
    """(B, B): the Gram matrix of the flattened samples, each row L2-normalised."""
    flat = feat.reshape(feat.shape[0], -1)
    return F.normalize(flat @ flat.t())


@fp32_loss
def sp_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """`sum((G_t - G_s)^2) / B^2`, shape (1,) (fp32)."""
    batch = f_s.shape[0]
    diff = similarity_matrix(f_t.detach()) - similarity_matrix(f_s)
    return (diff * diff).reshape(-1, 1).sum(0) / (batch * batch)


@register_distiller("SP")
class SP(Distiller):
    """`CE_WEIGHT * CE + FEAT_WEIGHT * sp_loss(feats_s[-1], feats_t[-1])`; see the module docstring."""

    def __init__(self, student, teacher, cfg):
        super().__init__(student, teacher, cfg)
        self.ce_weight = cfg.SP.LOSS.CE_WEIGHT
        self.feat_weight = cfg.SP.LOSS.FEAT_WEIGHT
        last_map_shapes(student, teacher, cfg, "SP")

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        return logits_student, {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.feat_weight * sp_loss(feats_student["feats"][-1], feats_teacher["feats"][-1]),
        }
