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
- The intra term couples the samples of the batch: the loss of a batch is not the mean of the losses of its parts,
  and under torchrun it is computed on each rank's local batch (the authors compute it per GPU), so the result
  depends on the per-rank batch size.
- Nothing is detached: the teacher's logits come without gradient (as in the authors' loop, under no_grad).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._logit_checks import check_logit_pair, check_positive, working_precision
from .precision import fp32_loss

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
