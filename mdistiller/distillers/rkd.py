"""RKD (Park et al., CVPR 2019): relational KD, matching pairwise distances and triplet angles within the batch.

On `pooled_feat` flattened to (B, D), as upstream mdistiller computes it:
- distances `d_ij = sqrt(clamp(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, min=EPS))` (no sqrt when PDIST.SQUARED), diagonal 0,
  divided by the mean of the positive entries; the teacher's under no_grad, the student's mean inside the graph;
- angles `A_ijk = <normalize(e_j - e_i), normalize(e_k - e_i)>` for all B^3 triples (degenerate ones give 0);
- `L = DISTANCE_WEIGHT * smooth_l1(d_s, d_t) + ANGLE_WEIGHT * smooth_l1(A_s, A_t)` (beta 1, mean);
  `loss_kd = FEAT_WEIGHT * L`.
The expanded distance form is kept on purpose (not `torch.cdist`): it cancels in float32 when pooled features are
nearly collinear, early in training, and upstream's numbers carry that rounding. The angle tensor costs B^2 * D
memory for the differences and B^3 for the angles (batch 512 with D = 2048: 2 GiB of differences).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import Declaration, Distiller, cross_entropy
from .config import Key, config_section
from .precision import fp32_loss
from .registry import register_distiller


def pairwise_distances(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """(B, B) distances in the expanded form, clamped at eps before the sqrt, diagonal set to 0."""
    sq_norms = e.pow(2).sum(dim=1)
    dist = (sq_norms.unsqueeze(1) + sq_norms.unsqueeze(0) - 2 * (e @ e.t())).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    diagonal = torch.eye(len(e), dtype=torch.bool, device=e.device)
    return dist.masked_fill(diagonal, 0.0)


def normalized_distances(e: torch.Tensor, squared: bool, eps: float) -> torch.Tensor:
    """`pairwise_distances` divided by the mean of its positive entries."""
    dist = pairwise_distances(e, squared, eps)
    return dist / dist[dist > 0].mean()


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """(B^3,): `<normalize(e_j - e_i), normalize(e_k - e_i)>` for every (i, j, k), flattened in that order."""
    diffs = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [i, j] = e_j - e_i
    return torch.bmm(diffs, diffs.transpose(1, 2)).reshape(-1)


@fp32_loss
def rkd_loss(f_s: torch.Tensor, f_t: torch.Tensor, squared: bool = False, eps: float = 1e-12,
             distance_weight: float = 25.0, angle_weight: float = 50.0) -> torch.Tensor:
    """`distance_weight * smooth_l1(d_s, d_t) + angle_weight * smooth_l1(A_s, A_t)` on flattened features (fp32)."""
    student = f_s.reshape(f_s.shape[0], -1)
    teacher = f_t.detach().reshape(f_t.shape[0], -1)
    with torch.no_grad():
        d_t = normalized_distances(teacher, squared, eps)
        a_t = triplet_angles(teacher)
    loss_distance = F.smooth_l1_loss(normalized_distances(student, squared, eps), d_t)
    loss_angle = F.smooth_l1_loss(triplet_angles(student), a_t)
    return distance_weight * loss_distance + angle_weight * loss_angle


config_section("RKD", {
    "DISTANCE_WEIGHT": Key(25.0, "weight of the distance relation"),
    "ANGLE_WEIGHT": Key(50.0, "weight of the angle relation"),
    "LOSS": {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
        "FEAT_WEIGHT": Key(1.0, "weight of the relational term"),
    },
    "PDIST": {"EPSILON": Key(1e-12, "floor of the pairwise distances"),
              "SQUARED": Key(False, "squared pairwise distances")},
})


@register_distiller("RKD")
class RKD(Distiller):
    """`CE_WEIGHT * CE + FEAT_WEIGHT * rkd_loss(pooled_s, pooled_t)`; see the module docstring."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("RKD",),
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {"distance_weight": cfg.RKD.DISTANCE_WEIGHT, "angle_weight": cfg.RKD.ANGLE_WEIGHT,
                "ce_weight": cfg.RKD.LOSS.CE_WEIGHT, "feat_weight": cfg.RKD.LOSS.FEAT_WEIGHT,
                "eps": cfg.RKD.PDIST.EPSILON, "squared": bool(cfg.RKD.PDIST.SQUARED)}

    def setup(self, distance_weight: float = 25.0, angle_weight: float = 50.0, ce_weight: float = 1.0,
              feat_weight: float = 1.0, eps: float = 1e-12, squared: bool = False) -> None:
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.eps = eps
        self.squared = squared

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        loss = rkd_loss(feats_student["pooled_feat"], feats_teacher["pooled_feat"], self.squared, self.eps,
                        self.distance_weight, self.angle_weight)
        return logits_student, {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.feat_weight * loss,
        }
