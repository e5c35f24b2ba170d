"""KDSVD (Lee et al., ECCV 2018): self-supervised KD with singular value decomposition of the stage maps.

Per stage of the front-aligned zip of `feats[1:]`, as upstream mdistiller computes it:
- `x = f.reshape(B, C*H, W)` in float32 (rows = channel x image row, columns = image columns), reduced SVD
  `x = U diag(S) V^T`, non-finite entries of U, S, V set to 0; the first n right-singular vectors kept, n = K for
  the teacher and K + 3 for the student, each L2-normalised over its W entries, and S's first n values L2-normalised;
- alignment: `c = V_s^T V_t` ((K+3) x K per sample); each teacher vector takes the student vectors whose |c| equals
  its column's maximum, with the sign of c (ties keep several), `V_s <- V_s @ mask` (B, W, K);
- both scaled by the teacher's normalised singular values, `V <- V * S_t`;
- for each stage i > 0, with the previous stage's vectors: `R(v, v') = exp(-(v[:, :, None] - v'[:, None])^2 / 8)`
  (B, W_i, W_{i-1}, K), term `sum((R_s - R_t)^2)` with non-finite entries set to 0, divided by B.
`loss_kd = FEAT_WEIGHT * sum of the terms`. CIFAR ResNets: 3 stages, 2 terms; raw values are small (~1e-3).

Student and teacher maps of one stage must have the same width W (the alignment multiplies their V's): pairs such
as resnet32x4 -> ShuffleV1 (32 vs 16) cannot run, upstream fails inside the loss, ours refuses them when built.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import MdistillerError
from ._base import Declaration, Distiller, cross_entropy
from ._stages import maps_skipped, paired_map_shapes, stage_maps, summed
from .config import Key, config_section
from .precision import fp32_loss
from .probe import DEFAULT_SETTING, Setting
from .registry import register_distiller

STUDENT_EXTRA_VECTORS = 3  # the student keeps K + 3 singular vectors for the teacher's K to choose from


def finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    """x with its NaN and infinite entries replaced by 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def leading_singular(feat: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V (B, W, n) with unit columns, S (B, n) of unit norm) of `feat.reshape(B, C*H, W)` in float32."""
    batch, channels, height, width = feat.shape
    x = feat.reshape(batch, channels * height, width).float()
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # what torch.svd computes (V = Vh^T)
    v = finite_or_zero(vh.transpose(-2, -1))
    s = finite_or_zero(s)
    return F.normalize(v[:, :, :n], dim=1), F.normalize(s[:, :n], dim=1)


def align_to_teacher(v_s: torch.Tensor, v_t: torch.Tensor) -> torch.Tensor:
    """(B, W, K): for each teacher vector, the student vectors of largest |cosine| (ties summed), sign-corrected."""
    cosine = v_s.transpose(-2, -1) @ v_t
    max_abs = cosine.abs().max(dim=1, keepdim=True).values
    mask = torch.where(max_abs == cosine.abs(), torch.sign(cosine), torch.zeros_like(cosine))
    return v_s @ mask


def rbf(v: torch.Tensor, v_prev: torch.Tensor) -> torch.Tensor:
    """(B, W_i, W_{i-1}, K): `exp(-(v_a - v'_b)^2 / 8)` between the entries of two stages' vectors."""
    return torch.exp(-(v.unsqueeze(2) - v_prev.unsqueeze(1)).pow(2) / 8)


@fp32_loss
def kdsvd_loss(student_maps: Sequence[torch.Tensor], teacher_maps: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """Sum over consecutive stage pairs of `sum((R_s - R_t)^2) / B` (fp32); see the module docstring."""
    terms = []
    prev_s = prev_t = None
    for f_s, f_t in zip(student_maps, teacher_maps):
        v_t, s_t = leading_singular(f_t.detach(), k)  # the teacher is a target: no gradient reaches it
        v_s, _ = leading_singular(f_s, k + STUDENT_EXTRA_VECTORS)
        v_s = align_to_teacher(v_s, v_t)
        scale = s_t.unsqueeze(1)
        v_t, v_s = v_t * scale, v_s * scale
        if prev_s is not None:
            diff = (rbf(v_s, prev_s) - rbf(v_t, prev_t).detach()).pow(2)
            terms.append(finite_or_zero(diff).sum())
        prev_s, prev_t = v_s, v_t
    batch = student_maps[0].shape[0] if terms else 1
    return summed([term / batch for term in terms], "kdsvd_loss", "at least two (student, teacher) stage pairs")


config_section("KDSVD", {
    "K": Key(1, "singular vectors the teacher keeps"),
    "LOSS": {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
        "FEAT_WEIGHT": Key(1.0, "weight of the SVD term"),
    },
})


@register_distiller("KDSVD")
class KDSVD(Distiller):
    """`CE_WEIGHT * CE + FEAT_WEIGHT * kdsvd_loss(feats_s[1:], feats_t[1:], K)`; see the module docstring."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("KDSVD",),
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        if cfg.KDSVD.K < 1:
            raise MdistillerError(f"KDSVD.K must be >= 1 (singular vectors the teacher keeps), got {cfg.KDSVD.K}")
        return {"k": cfg.KDSVD.K, "ce_weight": cfg.KDSVD.LOSS.CE_WEIGHT, "feat_weight": cfg.KDSVD.LOSS.FEAT_WEIGHT,
                "setting": Setting.from_cfg(cfg)}

    def setup(self, k: int = 1, ce_weight: float = 1.0, feat_weight: float = 1.0,
              setting: Setting = DEFAULT_SETTING) -> None:
        self.k = k
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.setting = setting
        self.student_skip, self.teacher_skip = maps_skipped(self.student), maps_skipped(self.teacher)
        pairs = paired_map_shapes(self.student, self.teacher, setting, "KDSVD", minimum=2)
        for stage, (s_shape, t_shape) in enumerate(pairs, 1):
            if s_shape[3] != t_shape[3]:
                raise MdistillerError(
                    f"KDSVD compares singular vectors over the map width, which differs at stage {stage}: student "
                    f"{setting.student} {s_shape[3]} vs teacher {setting.teacher} {t_shape[3]} columns; "
                    f"pick a pair with equal stage sizes or another method (AT/NST pool the larger map)"
                )

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        loss = kdsvd_loss(stage_maps(feats_student, self.student_skip), stage_maps(feats_teacher, self.teacher_skip),
                          self.k)
        return logits_student, {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.feat_weight * loss,
        }
