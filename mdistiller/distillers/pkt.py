"""PKT (Passalis & Tefas, ECCV 2018): probabilistic KT, matching cosine-similarity distributions over the batch.

On `pooled_feat` (B, D), eps = 1e-7: rows divided by `sqrt(sum f^2) + eps` (NaNs set to 0), `S = f f^T` rescaled to
`(S + 1) / 2` and each row divided by its sum; `L = mean over all B x B entries of P_t * log((P_t + eps) / (P_s +
eps))` (upstream mdistiller's mean over B^2 entries, not a per-row sum); `loss_kd = FEAT_WEIGHT * L`.
"""

from __future__ import annotations

import torch

from ._base import Declaration, Distiller, cross_entropy
from .config import Key, config_section
from .precision import fp32_loss
from .registry import register_distiller

PKT_EPS = 1e-7


def similarity_distribution(feat: torch.Tensor, eps: float = PKT_EPS) -> torch.Tensor:
    """(B, B): cosine similarities of the rows mapped to [0, 1], each row normalised to sum 1."""
    norm = torch.sqrt(torch.sum(feat**2, dim=1, keepdim=True))  # not torch.norm: upstream's gradient at 0 is NaN
    unit = feat / (norm + eps)
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)
    sim = (unit @ unit.t() + 1.0) / 2.0
    return sim / torch.sum(sim, dim=1, keepdim=True)


@fp32_loss
def pkt_loss(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = PKT_EPS) -> torch.Tensor:
    """`mean(P_t * log((P_t + eps) / (P_s + eps)))` over all B x B entries (fp32)."""
    p_s = similarity_distribution(f_s.reshape(f_s.shape[0], -1), eps)
    p_t = similarity_distribution(f_t.detach().reshape(f_t.shape[0], -1), eps)
    return torch.mean(p_t * torch.log((p_t + eps) / (p_s + eps)))


config_section("PKT", {
    "LOSS": {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
        "FEAT_WEIGHT": Key(30000.0, "weight of the probabilistic transfer term"),
    },
})


@register_distiller("PKT")
class PKT(Distiller):
    """`CE_WEIGHT * CE + FEAT_WEIGHT * pkt_loss(pooled_s, pooled_t)`; see the module docstring."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("PKT",),
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {"ce_weight": cfg.PKT.LOSS.CE_WEIGHT, "feat_weight": cfg.PKT.LOSS.FEAT_WEIGHT}

    def setup(self, ce_weight: float = 1.0, feat_weight: float = 30000.0) -> None:
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, feats_student = self.student(image)
        _, feats_teacher = self.teacher_forward(image)
        return logits_student, {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.feat_weight * pkt_loss(feats_student["pooled_feat"], feats_teacher["pooled_feat"]),
        }
