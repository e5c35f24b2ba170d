"""TTM and WTTM (Zheng & Yang, ICLR 2024, "Knowledge Distillation Based on Transformed Teacher Matching").

TTM drops the temperature from the student side of KD: the student's plain `log_softmax(z_s)` is matched to the
power-transformed teacher `q = softmax(z_t)^l / sum_c softmax(z_t)^l` (the teacher at temperature 1/l), by
`KL_b = sum_c q (log q - log p_s)`, averaged over the batch; no T^2 factor. WTTM weights each sample's KL by
`U_b = sum_c softmax(z_t)_bc^l`, the un-normalised power sum (>= 1 for l < 1, larger for flatter teachers),
taken from the teacher without gradient.

Authors' code: zkxufo/TTM `distiller_zoo/ttm.py`, `distiller_zoo/wttm.py`. Reproduced as there:
- `q` is computed as the normalised power of the softmax, not as `softmax(l * z_t)`: the two agree except where
  `softmax(z_t)` underflows to 0 (then `q` is 0 there too); a zero entry of `q` contributes 0 to the KL.
- The KL is summed over classes and averaged over the batch (`torch.mean` of the per-sample sums).
- `U_b` is detached (the authors' teacher runs under no_grad; the spec asks for no gradient through it); `q` is
  not detached, as in `kd_loss` (the teacher's logits come without gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._logit_checks import check_logit_pair, check_positive, working_precision
from .precision import fp32_loss


@fp32_loss
def ttm_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, power: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample `(KL(q || softmax(z_s)), U)` with `q = softmax(z_t)^power / U`, `U = sum_c softmax(z_t)^power`
    (fp32, shapes (B,); `U` detached)."""
    check_logit_pair("TTM", student_logits, teacher_logits)
    check_positive("TTM", power=power)
    log_p_s = F.log_softmax(working_precision(student_logits), dim=1)
    powered = F.softmax(working_precision(teacher_logits), dim=1).pow(power)
    power_sum = powered.sum(dim=1, keepdim=True)
    q = powered / power_sum
    kl = F.kl_div(log_p_s, q, reduction="none").sum(dim=1)
    return kl, power_sum.squeeze(1).detach()


@fp32_loss
def ttm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, power: float) -> torch.Tensor:
    """TTM: `mean_b KL(q_b || softmax(z_s)_b)` with the teacher transformed by `power` (fp32, a scalar)."""
    kl, _ = ttm_terms(student_logits, teacher_logits, power)
    return kl.mean()


@fp32_loss
def wttm_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, power: float) -> torch.Tensor:
    """WTTM: `mean_b U_b * KL(q_b || softmax(z_s)_b)`, `U_b` the teacher's power sum, detached (fp32, a scalar)."""
    kl, power_sum = ttm_terms(student_logits, teacher_logits, power)
    return (power_sum * kl).mean()
