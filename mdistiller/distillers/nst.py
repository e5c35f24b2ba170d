"""NST (Huang & Wang, 2017): neuron selectivity transfer, an MMD with a squared polynomial kernel between channels.

Per stage pair (front-aligned zip of `feats[1:]`, the larger map pooled to the smaller as in AT): each channel's
spatial vector is L2-normalised, `K(a, b)_ij = (a_j . b_i)^2` over all channel pairs, and the term is
`mean K(t, t) + mean K(s, s) - 2 mean K(s, t)` (student and teacher channel counts may differ); `loss_kd =
FEAT_WEIGHT * sum over stage pairs`, as upstream mdistiller computes it (MobileNetV1 pairing as in AT, see at.py).

The kernel is one batched matmul, (B, C_b, HW) x (B, HW, C_a); upstream materialises the (B, C_b, C_a, HW) products
before summing them (about 1 GB per stage at batch 64 for resnet32x4), so values agree up to float rounding only.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ._base import Declaration, Distiller, cross_entropy
from ._stages import maps_skipped, paired_map_shapes, pool_to_smaller, stage_maps, summed
from .config import Key, config_section
from .precision import fp32_loss
from .probe import DEFAULT_SETTING, Setting
from .registry import register_distiller


def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, C_b, C_a): `(b_i . a_j)^2` for (B, C, N) inputs."""
    return torch.bmm(b, a.transpose(1, 2)).pow(2)


@fp32_loss
def nst_stage_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """One stage pair: `mean K(t,t) + mean K(s,s) - 2 mean K(s,t)` on channel-normalised maps (fp32)."""
    f_s, f_t = pool_to_smaller(f_s, f_t.detach())  # the teacher is a target: no gradient reaches it
    s = F.normalize(f_s.flatten(2), dim=2)
    t = F.normalize(f_t.flatten(2), dim=2)
    return poly_kernel(t, t).mean().detach() + poly_kernel(s, s).mean() - 2 * poly_kernel(s, t).mean()


@fp32_loss
def nst_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of `nst_stage_loss` over `zip(student_maps, teacher_maps)` (front-aligned, truncated to the shorter)."""
    return summed([nst_stage_loss(f_s, f_t) for f_s, f_t in zip(student_maps, teacher_maps)], "nst_loss")


config_section("NST", {
    "LOSS": {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
        "FEAT_WEIGHT": Key(50.0, "weight of the MMD term"),
    },
})


@register_distiller("NST")
class NST(Distiller):
    """`CE_WEIGHT * CE + FEAT_WEIGHT * nst_loss(feats_s[1:], feats_t[1:])`; see the module docstring."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("NST",),
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {"ce_weight": cfg.NST.LOSS.CE_WEIGHT, "feat_weight": cfg.NST.LOSS.FEAT_WEIGHT,
                "setting": Setting.from_cfg(cfg)}

    def setup(self, ce_weight: float = 1.0, feat_weight: float = 50.0, setting: Setting = DEFAULT_SETTING) -> None:
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.setting = setting
        self.student_skip, self.teacher_skip = maps_skipped(self.student), maps_skipped(self.teacher)
        paired_map_shapes(self.student, self.teacher, setting, "NST")

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        loss = nst_loss(stage_maps(feats_student, self.student_skip), stage_maps(feats_teacher, self.teacher_skip))
        return logits_student, {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.feat_weight * loss,
        }
