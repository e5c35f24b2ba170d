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

The distillers `TTM` and `WTTM`: `CE_WEIGHT * CE + KD_WEIGHT * L` (the authors' loop `r * CE + a * KD + b * L` with
the README's `-a 0`: no extra KD term). Keys `TTM.{CE_WEIGHT, KD_WEIGHT, POWER}` (`-r`, `-b`, `--ttm_l`) and the same
under `WTTM.`. The per-pair exponent and weight of the authors' tables are in their paper's appendix A.4, not in
their code, and are owed: the defaults are the README's examples (TTM vgg13 -> vgg8: l 0.1, b 45; WTTM: l 0.2,
weight 4). Logit standardisation is refused: the authors never use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import Declaration, Distiller, cross_entropy, logits_on
from ._logit_checks import check_logit_pair, check_positive, logit_stand_refusal, working_precision
from .config import Key, config_section
from .precision import fp32_loss
from .registry import register_distiller


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


def _section(kd_weight: float, power: float, example: str) -> dict:
    return {
        "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels (the authors' -r)"),
        "KD_WEIGHT": Key(kd_weight, f"weight beta of the transformed-teacher term (the authors' -b; {example})"),
        "POWER": Key(power, f"teacher exponent l: the teacher at temperature 1/l (the authors' --ttm_l; {example})"),
    }


config_section("TTM", _section(45.0, 0.1, "the README's vgg13 -> vgg8 example; per-pair values owed"))
config_section("WTTM", _section(4.0, 0.2, "the README's WTTM example; per-pair values owed"))


@register_distiller("TTM")
class TTM(Distiller):
    """`CE_WEIGHT * CE + KD_WEIGHT * mean_b KL(q_b || softmax(z_s)_b)`, q the teacher's softmax to the power POWER,
    renormalised."""

    section = "TTM"
    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("TTM",),
        teacher_reads=logits_on("image"),
        logit_stand_refusal=logit_stand_refusal("TTM"),
        accepts_soft_targets=True,  # the transformed-teacher term reads no label; CE takes probabilities
    )

    @staticmethod
    def loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, power: float) -> torch.Tensor:
        return ttm_loss(student_logits, teacher_logits, power)

    @classmethod
    def from_config(cls, cfg) -> dict:
        keys = cfg[cls.section]
        check_positive(cls.section, **{f"{cls.section}.POWER": keys.POWER})
        return {"ce_weight": keys.CE_WEIGHT, "kd_weight": keys.KD_WEIGHT, "power": keys.POWER}

    def setup(self, ce_weight: float, kd_weight: float, power: float) -> None:
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.power = power

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, _ = self.student(image)
        logits_teacher = self.teacher_logits(image, batch.get("teacher_logits"))
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.kd_weight * self.loss(logits_student, logits_teacher, self.power),
        }
        return logits_student, losses


@register_distiller("WTTM")
class WTTM(TTM):
    """TTM with each sample's KL weighted by the teacher's power sum `U_b` (detached): keys under `WTTM.`."""

    section = "WTTM"
    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("WTTM",),
        teacher_reads=logits_on("image"),
        logit_stand_refusal=logit_stand_refusal("WTTM"),
        accepts_soft_targets=True,
    )

    @staticmethod
    def loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, power: float) -> torch.Tensor:
        return wttm_loss(student_logits, teacher_logits, power)
