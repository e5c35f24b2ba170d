"""USKD (Yang et al., ICCV 2023): teacher-free KD from customised soft labels (spec recent.md §4), `USKD` (ours).

The reference (yzd-v/cls_KD `mmcls/models/dis_losses/uskd.py`) is reproduced with its quirks:
- the soft target `w_y = s_y^2 + 1 - mean_batch(s_y^2)` is a per-sample weight on `-log p(y)`, detached;
- the non-target rank score adds the weak head's probabilities to the student's LOG-probabilities (the reference
  reassigned its variable to log-softmax before that line), each divided by `1 - (its label value) + 1e-6`;
- Zipf weights `1 / (k + 1)` go by 0-based rank over all C classes (label included), then the label is dropped and
  the C - 1 weights renormalised;
- MU scales the weak-supervision term inside it (`L_weak = -mean_b sum_c MU * q_c * log softmax(w)_c`).
Hard labels only (the reference's soft-label branch, top-2 entries of a mixed target, is not implemented): DATASET.MIXUP
is refused for USKD. The authors never standardise logits: `--logit-stand` is refused too.
Ties in the rank sort have no defined order in the reference; here a stable sort puts the lower class index first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MdistillerError
from ..models.common import num_classes_of_model
from ._base import Declaration, Distiller, cross_entropy
from .config import Key, config_section
from .precision import fp32_loss
from .registry import register_distiller

WEAK_LABEL_SMOOTHING = 0.1  # weak head target: 0.9 * onehot(y) + 0.1 / C
RANK_EPS = 1e-6


def zipf_table(num_classes: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The Zipf weights `1 / (k + 1)` for 0-based ranks k = 0..C-1 (fp32, (C,)); keep as a non-persistent buffer."""
    if num_classes < 2:
        raise MdistillerError(f"USKD needs at least 2 classes, got {num_classes}")
    return 1.0 / torch.arange(1, num_classes + 1, dtype=torch.float32, device=device)


def _check(student_logits: torch.Tensor, weak_logits: torch.Tensor, target: torch.Tensor) -> None:
    if student_logits.dim() != 2 or weak_logits.shape != student_logits.shape:
        raise MdistillerError(
            f"USKD needs student and weak-head logits of one shape (B, C), got {tuple(student_logits.shape)} and "
            f"{tuple(weak_logits.shape)}"
        )
    if target.dim() != 1 or target.is_floating_point():
        raise MdistillerError(f"USKD takes hard labels (B,) only, got a {target.dtype} tensor of {tuple(target.shape)}")


@fp32_loss
def uskd_terms(
    student_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    target: torch.Tensor,
    mu: float,
    zipf: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """USKD's (L_target, L_non_target, L_weak) from student and weak-head logits (B, C), hard labels (fp32)."""
    _check(student_logits, weak_logits, target)
    z = student_logits.float()
    w = weak_logits.float()
    batch, classes = z.shape
    label = target.view(-1, 1)
    if zipf is None:
        zipf = zipf_table(classes, z.device)

    log_p = F.log_softmax(z, dim=1)
    log_p_y = log_p.gather(1, label)
    s_y_sq = F.softmax(z.detach(), dim=1).gather(1, label) ** 2
    soft_target = s_y_sq + 1.0 - s_y_sq.mean(0, keepdim=True)  # detached: built from a detached s_y
    l_target = -(soft_target * log_p_y).sum(1).mean()

    weak_target = torch.full_like(w, WEAK_LABEL_SMOOTHING / classes).scatter_add_(
        1, label, torch.full_like(log_p_y, 1.0 - WEAK_LABEL_SMOOTHING)
    )
    log_q = F.log_softmax(w, dim=1)
    l_weak = -(mu * weak_target * log_q).sum(1).mean()

    with torch.no_grad():
        q = log_q.exp()
        q_y = q.gather(1, label)
        score = q / (1.0 - q_y + RANK_EPS) + log_p / (1.0 - log_p_y + RANK_EPS)  # quirk: log-probabilities
        order = torch.sort(score, dim=1, descending=True, stable=True).indices  # order[b, k] = class at rank k
        weights = torch.empty_like(score).scatter_(1, order, zipf.float().to(score.device).expand(batch, classes))
        keep = torch.ones_like(score, dtype=torch.bool).scatter_(1, label, False)
        non_target = weights[keep].view(batch, classes - 1)
        non_target = non_target / non_target.sum(1, keepdim=True)

    log_p_non = F.log_softmax(z[keep].view(batch, classes - 1), dim=1)
    l_non_target = -(non_target * log_p_non).sum(1).mean()
    return l_target, l_non_target, l_weak


@fp32_loss
def uskd_loss(
    student_logits: torch.Tensor,
    weak_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    mu: float,
    zipf: torch.Tensor | None = None,
) -> torch.Tensor:
    """`alpha * L_target + beta * L_non_target + L_weak` (MU inside L_weak), the reference's USKD loss (fp32)."""
    l_target, l_non_target, l_weak = uskd_terms(student_logits, weak_logits, target, mu, zipf)
    return alpha * l_target + beta * l_non_target + l_weak


config_section("USKD", {
    "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
    "ALPHA": Key(1.0, "weight of the target term L_target (ImageNet 1.0; the authors' CIFAR config 0.1)"),
    "BETA": Key(0.1, "weight of the non-target Zipf term L_non_target"),
    "MU": Key(0.005, "weight of the weak head's label-smoothed CE, inside L_weak (ImageNet 0.005; CIFAR 0.1)"),
})

LOGIT_STAND_REFUSAL = ("--logit-stand: USKD has no teacher and its authors never standardise logits; logit "
                       "standardisation is refused for USKD")


def mid_feature_channels(student: torch.nn.Module) -> int:
    """Channels of `feats["feats"][-2]` (the stage before the last), which the weak head reads."""
    stages = student.get_stage_channels() if hasattr(student, "get_stage_channels") else []
    if len(stages) < 2:
        raise MdistillerError(f"USKD's weak head reads the stage before the last; {type(student).__name__} has "
                              f"{len(stages)} stage(s) in feats")
    return int(stages[-2])


@register_distiller("USKD")
class USKD(Distiller):
    """Teacher-free: `CE_WEIGHT * CE + ALPHA * L_target + BETA * L_non_target + L_weak` (loss_ce, loss_kd).

    `weak_fc` (nn.Linear(C_mid, C), PyTorch's default init) reads the global-average-pooled `feats["feats"][-2]` and
    trains with the student; the Zipf table is a non-persistent buffer (the reference builds it on the fly).
    """

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        config_sections=("USKD",),
        requires_teacher=False,
        extra_modules=("weak_fc",),
        logit_stand_refusal=LOGIT_STAND_REFUSAL,
        rank_synced_buffers=("zipf",),  # a constant table
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        uskd = cfg.USKD
        return {"ce_weight": uskd.CE_WEIGHT, "alpha": uskd.ALPHA, "beta": uskd.BETA, "mu": uskd.MU}

    def setup(self, ce_weight: float = 1.0, alpha: float = 1.0, beta: float = 0.1, mu: float = 0.005) -> None:
        self.ce_weight, self.alpha, self.beta, self.mu = ce_weight, alpha, beta, mu
        num_classes = num_classes_of_model(self.student)
        self.weak_fc = nn.Linear(mid_feature_channels(self.student), num_classes)
        self.register_buffer("zipf", zipf_table(num_classes), persistent=False)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits, feats = self.student(image)
        weak_logits = self.weak_fc(F.adaptive_avg_pool2d(feats["feats"][-2], 1).flatten(1))
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits, target),
            "loss_kd": uskd_loss(logits, weak_logits, target, self.alpha, self.beta, self.mu, self.zipf),
        }
        return logits, losses
