"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"): relation matching.

Instead of matching probabilities exactly, DIST asks the student's softened predictions to be linearly correlated
with the teacher's: across the classes of each sample (inter-class relation) and across the samples of the batch for
each class (intra-class relation). The loss is `tau^2 * (beta * inter + gamma * intra)` with
`inter = 1 - mean_b corr(y_s[b, :], y_t[b, :])`, `intra = 1 - mean_c corr(y_s[:, c], y_t[:, c])`,
`y = softmax(z / tau)`, and `corr` the Pearson correlation.

Authors' code: hunto/image_classification_sota `lib/models/losses/dist_kd.py` (the `classification` submodule of
hunto/DIST_KD). Reproduced as there:
- `corr(a, b)` is the cosine of the mean-centred vectors with the eps added to the product of the norms,
  `a.b / (|a| |b| + 1e-8)`; a constant vector (e.g. a batch of one for the intra term) has correlation 0, so its
  term contributes 1.
- `tau^2` multiplies both terms (the authors' `dist_t4` for CIFAR, `dist` = tau 1 for ImageNet).
- The intra term couples the samples of the batch: the loss of a batch is not the mean of the losses of its parts.
  Under torchrun the `DIST` distiller computes it on each rank's local batch and never gathers the other ranks'
  logits (the authors compute it per GPU: ImageNet 8 x 32, CIFAR 1 x 64), so the result depends on the per-rank
  batch size: SOLVER.BATCH_SIZE 256 on 8 processes couples 32 samples per term, on 1 process 256.
- Nothing is detached: the teacher's logits come without gradient (as in the authors' loop, under no_grad).

The distiller `DIST`: `CE_WEIGHT * CE + KD_WEIGHT * dist_loss` (the authors' `ori_loss_weight`, `kd_loss_weight`),
no warm-up. Keys `DIST.{CE_WEIGHT 1.0, KD_WEIGHT 2.0, BETA 1.0, GAMMA 1.0, TAU 4.0}` (CIFAR: the authors' `dist_t4`;
their ImageNet `dist` is TAU 1.0). Logit standardisation is refused: the authors never use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import Declaration, Distiller, cross_entropy, logits_on
from ._logit_checks import check_logit_pair, check_positive, logit_stand_refusal, working_precision
from .config import Key, config_section
from .precision import fp32_loss
from .registry import register_distiller

# The reference's guard, added to the product of the two norms (not to each norm).
CORRELATION_EPS = 1e-8


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row Pearson correlation of two (N, D) tensors: cosine of the row-centred rows, eps on the norm product."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + CORRELATION_EPS)


@fp32_loss
def inter_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """`1 - mean over the B rows of corr(y_s[b, :], y_t[b, :])` for (B, C) probabilities."""
    return 1.0 - pearson_rows(y_s, y_t).mean()


@fp32_loss
def intra_class_relation(y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
    """`1 - mean over the C columns of corr(y_s[:, c], y_t[:, c])` (each a correlation across the batch)."""
    return inter_class_relation(y_s.t(), y_t.t())


@fp32_loss
def dist_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, gamma: float, tau: float
) -> torch.Tensor:
    """`tau^2 * (beta * inter + gamma * intra)` on `softmax(z / tau)` of the batch (fp32, a scalar)."""
    check_logit_pair("DIST", student_logits, teacher_logits)
    check_positive("DIST", tau=tau)
    y_s = F.softmax(working_precision(student_logits) / tau, dim=1)
    y_t = F.softmax(working_precision(teacher_logits) / tau, dim=1)
    return tau**2 * (beta * inter_class_relation(y_s, y_t) + gamma * intra_class_relation(y_s, y_t))


config_section("DIST", {
    "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels (the authors' ori_loss_weight)"),
    "KD_WEIGHT": Key(2.0, "weight of the DIST term (the authors' kd_loss_weight)"),
    "BETA": Key(1.0, "weight of the inter-class relation term"),
    "GAMMA": Key(1.0, "weight of the intra-class relation term (computed on each rank's local batch)"),
    "TAU": Key(4.0, "temperature of both softmaxes, the loss scaled by TAU^2 (CIFAR 4, ImageNet 1)"),
})


@register_distiller("DIST")
class DIST(Distiller):
    """`CE_WEIGHT * CE + KD_WEIGHT * TAU^2 (BETA * inter + GAMMA * intra)`; under torchrun the intra-class term is
    computed on each rank's local batch, never gathered (as the authors' per-GPU loss)."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("DIST",),
        teacher_reads=logits_on("image"),
        logit_stand_refusal=logit_stand_refusal("DIST"),
        accepts_soft_targets=True,  # the DIST term reads no label; CE takes probabilities
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        dist = cfg.DIST
        check_positive("DIST", **{"DIST.TAU": dist.TAU})
        return {"ce_weight": dist.CE_WEIGHT, "kd_weight": dist.KD_WEIGHT, "beta": dist.BETA, "gamma": dist.GAMMA,
                "tau": dist.TAU}

    def setup(self, ce_weight: float, kd_weight: float, beta: float, gamma: float, tau: float) -> None:
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.beta = beta
        self.gamma = gamma
        self.tau = tau

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, _ = self.student(image)
        logits_teacher = self.teacher_logits(image, batch.get("teacher_logits"))
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.kd_weight * dist_loss(logits_student, logits_teacher, self.beta, self.gamma, self.tau),
        }
        return logits_student, losses
