"""NKD (Yang et al., ICCV 2023, "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach
with Normalized Loss and Customized Soft Labels"): KD split at the label, each part normalised.

Target part, at T = 1: `L_t = -mean_b p_t[y] * log softmax(z_s)[y]`, the teacher's target probability a constant
weight. Non-target part: the label's column is removed from both logit vectors and the remaining C - 1 classes are
renormalised at temperature T: `L_n = -gamma * T^2 * mean_b sum_{c != y} softmax(z_t' / T)_c log softmax(z_s' / T)_c`.
`NKD = L_t + L_n`.

Authors' code: yzd-v/cls_KD `mmcls/models/dis_losses/nkd.py`. Reproduced as there:
- `p_t[y]` is detached; the non-target teacher distribution is not (the teacher's logits come without gradient).
- `L_n` is a cross-entropy (it includes the teacher's non-target entropy), not a KL: it is not 0 when the student
  matches the teacher.
- With soft labels (B, C) the label is the argmax of the soft vector (the first one on ties).
SDD's label-keeping variant (its `NKD`) is not this function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._logit_checks import check_logit_pair, check_positive, hard_labels, working_precision
from .precision import fp32_loss


@fp32_loss
def nkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float, gamma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(L_t, L_n)`: the target term at T = 1 and the `gamma * T^2` non-target cross-entropy (fp32 scalars).

    `target`: (B,) class indices or (B, C) soft labels (their argmax is the label).
    """
    check_logit_pair("NKD", student_logits, teacher_logits)
    check_positive("NKD", temperature=temperature)
    label = hard_labels("NKD", target, student_logits, soft_ok=True).view(-1, 1)
    z_s = working_precision(student_logits)
    z_t = working_precision(teacher_logits)
    log_p_s_y = F.log_softmax(z_s, dim=1).gather(1, label)
    p_t_y = F.softmax(z_t, dim=1).gather(1, label).detach()
    target_term = -(p_t_y * log_p_s_y).mean()
    batch, classes = z_s.shape
    # the C - 1 column indices other than the label, by gather (boolean indexing would read the mask on the host)
    others = torch.arange(classes - 1, device=label.device).expand(batch, -1)
    others = others + (others >= label).long()
    z_s_other = z_s.gather(1, others)
    z_t_other = z_t.gather(1, others)
    cross = (F.softmax(z_t_other / temperature, dim=1) * F.log_softmax(z_s_other / temperature, dim=1)).sum(1)
    non_target_term = -gamma * temperature**2 * cross.mean()
    return target_term, non_target_term


@fp32_loss
def nkd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float, gamma: float
) -> torch.Tensor:
    """NKD: `L_t + L_n` (see `nkd_terms`; fp32, a scalar)."""
    target_term, non_target_term = nkd_terms(student_logits, teacher_logits, target, temperature, gamma)
    return target_term + non_target_term
