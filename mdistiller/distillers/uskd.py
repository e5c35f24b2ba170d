"""USKD (Yang et al., ICCV 2023): teacher-free KD from customised soft labels (spec recent.md §4), pure losses.

The reference (yzd-v/cls_KD `mmcls/models/dis_losses/uskd.py`) is reproduced with its quirks:
- the soft target `w_y = s_y^2 + 1 - mean_batch(s_y^2)` is a per-sample weight on `-log p(y)`, detached;
- the non-target rank score adds the weak head's probabilities to the student's LOG-probabilities (the reference
  reassigned its variable to log-softmax before that line), each divided by `1 - (its label value) + 1e-6`;
- Zipf weights `1 / (k + 1)` go by 0-based rank over all C classes (label included), then the label is dropped and
  the C - 1 weights renormalised;
- MU scales the weak-supervision term inside it (`L_weak = -mean_b sum_c MU * q_c * log softmax(w)_c`).
Hard labels only (the reference's soft-label branch, top-2 entries of a mixed target, is not implemented).
Ties in the rank sort have no defined order in the reference; here a stable sort puts the lower class index first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MdistillerError
from .precision import fp32_loss

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
