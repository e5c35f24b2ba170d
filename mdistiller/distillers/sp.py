"""SP (Tung & Mori, ICCV 2019): similarity-preserving KD, matching the batch's pairwise similarity matrices.

On the last feature map only: `G = normalize_rows(f f^T)` with `f` the (B, C*H*W) flattened map (row L2 norm, eps
1e-12), for student and teacher; `loss_kd = FEAT_WEIGHT * sum((G_t - G_s)^2) / B^2`, of shape (1,) as upstream
mdistiller returns it (the trainer sums `.mean()` of each term, so the shape does not change the step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import Declaration, Distiller, cross_entropy
from ._stages import last_map_shapes
from .config import Key, config_section
from .precision import fp32_loss
from .probe import DEFAULT_SETTING, Setting
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


config_section("SP", {
    "LOSS": {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
        "FEAT_WEIGHT": Key(3000.0, "weight of the similarity term"),
    },
})


@register_distiller("SP")
class SP(Distiller):
    """`CE_WEIGHT * CE + FEAT_WEIGHT * sp_loss(feats_s[-1], feats_t[-1])`; see the module docstring."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("SP",),
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {"ce_weight": cfg.SP.LOSS.CE_WEIGHT, "feat_weight": cfg.SP.LOSS.FEAT_WEIGHT,
                "setting": Setting.from_cfg(cfg)}

    def setup(self, ce_weight: float = 1.0, feat_weight: float = 3000.0, setting: Setting = DEFAULT_SETTING) -> None:
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.setting = setting
        last_map_shapes(self.student, self.teacher, setting, "SP")

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        return logits_student, {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.feat_weight * sp_loss(feats_student["feats"][-1], feats_teacher["feats"][-1]),
        }
