"""AT (Zagoruyko & Komodakis, ICLR 2017): match the students' spatial attention maps to the teacher's, per stage.

`a(f) = normalize_L2(mean_c(f^p))` over the H*W positions of a post-ReLU stage map; per stage pair the map of larger
height is average-pooled to the other's (square) size and the term is `mean_{B,HW}((a_s - a_t)^2)`; `loss_kd =
FEAT_WEIGHT * sum over stage pairs`. As upstream mdistiller computes it (not the paper's wording): `f^p` without abs,
the mean of the squared difference rather than its norm, and stages paired by a front-aligned zip of `feats[1:]`.

ImageNet ResNet50 -> MobileNetV1: upstream's MobileNetV1 lists no stem, so its zip pairs MV1's /8, /16, /32 maps with
R50's /4, /8, /16 maps (each pooled to the student's size) and leaves R50's /32 stage out. Ours lists the stem, so
the distiller drops MobileNetV1's first two maps on purpose (`_stages.maps_skipped`) to give exactly upstream's
pairs. ResNet34 -> ResNet18 (and every CIFAR pair) pairs stage for stage.
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


def attention_map(feat: torch.Tensor, p: float) -> torch.Tensor:
    """(B, H*W): the channel mean of `feat ** p`, L2-normalised per sample (eps 1e-12)."""
    return F.normalize(feat.pow(p).mean(1).reshape(feat.shape[0], -1))


@fp32_loss
def at_stage_loss(f_s: torch.Tensor, f_t: torch.Tensor, p: float) -> torch.Tensor:
    """One stage pair: the larger map pooled to the smaller, then `mean((a(f_s) - a(f_t))^2)` (fp32)."""
    f_s, f_t = pool_to_smaller(f_s, f_t.detach())  # the teacher is a target: no gradient reaches it
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


@fp32_loss
def at_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor], p: float) -> torch.Tensor:
    """Sum of `at_stage_loss` over `zip(student_maps, teacher_maps)` (front-aligned, truncated to the shorter)."""
    return summed([at_stage_loss(f_s, f_t, p) for f_s, f_t in zip(student_maps, teacher_maps)], "at_loss")


config_section("AT", {
    "P": Key(2, "exponent of the attention map (sum over channels of |f|^P)"),
    "LOSS": {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
        "FEAT_WEIGHT": Key(1000.0, "weight of the attention term"),
    },
})


@register_distiller("AT")
class AT(Distiller):
    """`CE_WEIGHT * CE + FEAT_WEIGHT * at_loss(feats_s[1:], feats_t[1:], P)`; see the module docstring."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("AT",),
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {"p": cfg.AT.P, "ce_weight": cfg.AT.LOSS.CE_WEIGHT, "feat_weight": cfg.AT.LOSS.FEAT_WEIGHT,
                "setting": Setting.from_cfg(cfg)}

    def setup(self, p: float = 2, ce_weight: float = 1.0, feat_weight: float = 1000.0,
              setting: Setting = DEFAULT_SETTING) -> None:
        self.p = p
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.setting = setting
        self.student_skip, self.teacher_skip = maps_skipped(self.student), maps_skipped(self.teacher)
        paired_map_shapes(self.student, self.teacher, setting, "AT")

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        loss = at_loss(stage_maps(feats_student, self.student_skip), stage_maps(feats_teacher, self.teacher_skip),
                       self.p)
        return logits_student, {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.feat_weight * loss,
        }
