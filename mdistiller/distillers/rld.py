"""RLD (Sun et al., ICCV 2025, "Knowledge Distillation with Refined Logits"): sample confidence plus masked
class correlation, so that a teacher's wrong top-1 is never taught as right.

- SCD (sample confidence distillation), at temperature `T_a`: the student's binary distribution
  `[p_s(y), 1 - p_s(y)]` split at the label `y`, the teacher's `[p_t(k), 1 - p_t(k)]` split at its own top-1 `k`;
  `T_a^2 * KL(teacher || student)` summed over the two entries, divided by B.
- MCD (masked correlation distillation), at temperature `T`: the classes `{c : z_t[c] >= z_t[y]}` (the label, the
  teacher's top-1 and everything the teacher ranks at or above the label) are masked out of both `z / T` by
  `-1e9`; `T^2 * KL(softmax_t || softmax_s)` over the rest, divided by B.
- `rld_loss = alpha * SCD + beta * MCD`.

Authors' code: zju-SWJ/RLD `mdistiller/distillers/RLD.py`. Reproduced as there:
- The MCD mask compares the teacher's logits with `>=` (ties with the label's logit are masked) and sets the masked
  scaled logits to exactly -1e9 (not -inf); a label that is the teacher's lowest logit masks every class, both
  distributions become uniform and MCD is 0.
- Each binary entry is a masked sum of the softmax (`1 - p(k)` is the sum over the other classes), and SCD takes
  `log` of the student's binary probabilities.
- Both KLs are summed and divided by B (`batchmean`). Nothing is detached (the teacher runs under no_grad there).
  MCD's KL takes the teacher's log-probabilities (`log_target`): same values, and a finite teacher gradient where
  the reference's form would give NaN at the masked classes (moot when the teacher has no gradient).
Logit standardisation is not part of these functions: the caller z-scores both logits first when it is on (the
mask and the teacher's top-1 are then read from the standardised teacher logits, as in the reference).

The distiller `RLD` (the authors' name and keys): `loss_ce = CE_WEIGHT * CE` on the raw logits, `loss_kd =
min(epoch / WARMUP, 1) * rld_loss` on the (optionally z-scored) logits. Keys `RLD.{CE_WEIGHT 1.0, ALPHA 1.0, BETA 8.0,
ALPHA_T 1.0, T 4.0, WARMUP 20}`. The authors' flags: `--logit-stand --base-temp tau --kd-weight w` switch
EXPERIMENT.LOGIT_STAND on and set `ALPHA *= w`, `BETA *= w`, `T = tau`, `ALPHA_T = tau`; then `--same-t` sets
`ALPHA_T = T` (`rld_same_t`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MdistillerError
from ._base import Declaration, Distiller, cross_entropy, logits_on
from ._logit_checks import check_logit_pair, check_positive, hard_labels, working_precision
from .config import Key, config_section
from .dkd import dkd_warmup, target_mask
from .precision import fp32_loss
from .registry import get_distiller_class, register_distiller

# The reference's fill for the masked classes of MCD (finite, so a fully masked row is uniform, not NaN).
MCD_MASK_FILL = -1e9


def _binary(probs: torch.Tensor, split: torch.Tensor) -> torch.Tensor:
    """(B, 2): the probability of each row's `split` class and the summed probability of all the others."""
    mask = target_mask(probs, split)
    return torch.cat([(probs * mask).sum(1, keepdim=True), (probs * (1.0 - mask)).sum(1, keepdim=True)], dim=1)


@fp32_loss
def scd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float
) -> torch.Tensor:
    """SCD: `T^2 * sum_b KL([p_t(top1_t), rest] || [p_s(y), rest]) / B` at temperature T (fp32, a scalar)."""
    check_logit_pair("RLD", student_logits, teacher_logits)
    check_positive("RLD", alpha_temperature=temperature)
    label = hard_labels("RLD", target, student_logits, soft_ok=False)
    z_s = working_precision(student_logits)
    z_t = working_precision(teacher_logits)
    binary_s = _binary(F.softmax(z_s / temperature, dim=1), label)
    binary_t = _binary(F.softmax(z_t / temperature, dim=1), z_t.argmax(dim=1))
    kl = F.kl_div(torch.log(binary_s), binary_t, reduction="none").sum(1)
    return kl.mean() * temperature**2


@fp32_loss
def mcd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature: float
) -> torch.Tensor:
    """MCD: `T^2 * sum_b KL(p_t || p_s) / B` at temperature T over the classes the teacher ranks below the label
    (fp32, a scalar)."""
    check_logit_pair("RLD", student_logits, teacher_logits)
    check_positive("RLD", temperature=temperature)
    label = hard_labels("RLD", target, student_logits, soft_ok=False)
    z_s = working_precision(student_logits)
    z_t = working_precision(teacher_logits)
    masked = z_t >= z_t.gather(1, label.view(-1, 1))
    log_p_s = F.log_softmax((z_s / temperature).masked_fill(masked, MCD_MASK_FILL), dim=1)
    # log-space target: the same values as KL against softmax probabilities, but the masked classes' p_t = 0 stay
    # out of `log p_t` (whose gradient at 0 would make the teacher's gradient NaN)
    log_p_t = F.log_softmax((z_t / temperature).masked_fill(masked, MCD_MASK_FILL), dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)
    return kl.mean() * temperature**2


@fp32_loss
def rld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    alpha_temperature: float,
    temperature: float,
) -> torch.Tensor:
    """RLD: `alpha * SCD(T = alpha_temperature) + beta * MCD(T = temperature)` (fp32, a scalar)."""
    return alpha * scd_loss(student_logits, teacher_logits, target, alpha_temperature) + beta * mcd_loss(
        student_logits, teacher_logits, target, temperature
    )


config_section("RLD", {
    "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels (raw logits)"),
    "ALPHA": Key(1.0, "weight of the sample-confidence term SCD"),
    "BETA": Key(8.0, "weight of the masked-correlation term MCD"),
    "ALPHA_T": Key(1.0, "temperature of SCD (scaled by ALPHA_T^2); --same-t sets it to RLD.T"),
    "T": Key(4.0, "temperature of MCD (scaled by T^2)"),
    "WARMUP": Key(20, "epochs of the linear warm-up min(epoch / WARMUP, 1) of the RLD term"),
})


def rld_logit_stand(cfg, base_temp: float, kd_weight: float) -> None:
    """`--logit-stand --base-temp tau --kd-weight w`: RLD.ALPHA and RLD.BETA times w, RLD.T = RLD.ALPHA_T = tau."""
    cfg.RLD.ALPHA = float(cfg.RLD.ALPHA * kd_weight)
    cfg.RLD.BETA = float(cfg.RLD.BETA * kd_weight)
    cfg.RLD.T = float(base_temp)
    cfg.RLD.ALPHA_T = float(base_temp)


def rld_same_t(cfg) -> None:
    """The authors' `--same-t` (applied after the LS flags): RLD.ALPHA_T = RLD.T; refused for any other method."""
    if get_distiller_class(cfg.DISTILLER.TYPE) is not RLD:
        raise MdistillerError(f"--same-t sets RLD.ALPHA_T = RLD.T and applies to DISTILLER.TYPE RLD only, not "
                              f"{cfg.DISTILLER.TYPE}: leave it out")
    cfg.RLD.ALPHA_T = float(cfg.RLD.T)


@register_distiller("RLD")
class RLD(Distiller):
    """`CE_WEIGHT * CE + min(epoch / WARMUP, 1) * (ALPHA * SCD(ALPHA_T) + BETA * MCD(T))`; with logit
    standardisation SCD and MCD compare z-scored logits, CE the raw ones."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("RLD",),
        teacher_reads=logits_on("image"),
        logit_stand=rld_logit_stand,
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        rld = cfg.RLD
        check_positive("RLD", **{"RLD.ALPHA_T": rld.ALPHA_T, "RLD.T": rld.T})
        return {"ce_weight": rld.CE_WEIGHT, "alpha": rld.ALPHA, "beta": rld.BETA, "alpha_temperature": rld.ALPHA_T,
                "temperature": rld.T, "warmup": rld.WARMUP}

    def setup(self, ce_weight: float, alpha: float, beta: float, alpha_temperature: float, temperature: float,
              warmup: float) -> None:
        self.ce_weight = ce_weight
        self.alpha = alpha
        self.beta = beta
        self.alpha_temperature = alpha_temperature
        self.temperature = temperature
        self.warmup = warmup

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, *, epoch: int, **batch):
        logits_student, _ = self.student(image)
        logits_teacher = self.teacher_logits(image, batch.get("teacher_logits"))
        student_kd, teacher_kd = self.distill_logits(logits_student, logits_teacher)
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": dkd_warmup(epoch, self.warmup) * rld_loss(
                student_kd, teacher_kd, target, self.alpha, self.beta, self.alpha_temperature, self.temperature),
        }
        return logits_student, losses
