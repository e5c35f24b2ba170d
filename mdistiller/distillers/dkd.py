"""DKD (Zhao et al., CVPR 2022): KD split into target-class (TCKD) and non-target-class (NCKD) terms, weighted apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import Declaration, Distiller, cross_entropy, logits_on
from .config import Key, config_section
from .precision import fp32_loss
from .registry import register_distiller

# The reference masks the target class out of the non-target softmax by subtracting this from its scaled logit.
_TARGET_MASK_OFFSET = 1000.0


def target_mask(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C) float mask, 1 at each row's target class."""
    return torch.zeros_like(logits).scatter_(1, target.view(-1, 1), 1.0)


@fp32_loss
def dkd_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor, temperature
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (TCKD, NCKD), each `T^2 * KL(teacher || student)` (fp32, shape (B,)).

    `temperature`: a float, a 0-d tensor, or a (B, 1) tensor of per-sample temperatures (CTKD).

    TCKD compares the binary distributions `[p_target, 1 - p_target]`; NCKD the softmax over the non-target classes,
    computed as the reference does: `softmax(z / T - 1000 * onehot(target))`.
    """
    z_s = student_logits.float() / temperature
    z_t = teacher_logits.float() / temperature
    gt = target_mask(z_s, target)
    p_s = F.softmax(z_s, dim=1)
    p_t = F.softmax(z_t, dim=1)
    p_s_gt = (p_s * gt).sum(1, keepdim=True)
    p_t_gt = (p_t * gt).sum(1, keepdim=True)
    p_s_other = (p_s * (1.0 - gt)).sum(1, keepdim=True)
    p_t_other = (p_t * (1.0 - gt)).sum(1, keepdim=True)
    binary_s = torch.cat([p_s_gt, p_s_other], dim=1)
    binary_t = torch.cat([p_t_gt, p_t_other], dim=1)
    tckd = F.kl_div(torch.log(binary_s), binary_t, reduction="none").sum(1)
    log_p_s_nt = F.log_softmax(z_s - _TARGET_MASK_OFFSET * gt, dim=1)
    p_t_nt = F.softmax(z_t - _TARGET_MASK_OFFSET * gt, dim=1)
    nckd = F.kl_div(log_p_s_nt, p_t_nt, reduction="none").sum(1)
    scale = temperature.float().reshape(-1) ** 2 if torch.is_tensor(temperature) else float(temperature) ** 2
    return tckd * scale, nckd * scale


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    beta: float,
    temperature,
) -> torch.Tensor:
    """`mean_batch(alpha * TCKD + beta * NCKD)` (fp32); `temperature` as in `dkd_terms`."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature)
    return (alpha * tckd + beta * nckd).mean()


def dkd_warmup(epoch: float, warmup: float) -> float:
    """The reference's linear warm-up factor `min(epoch / WARMUP, 1)` (epochs 1-based, as the trainer passes them)."""
    if warmup <= 0:
        return 1.0
    return min(float(epoch) / float(warmup), 1.0)


config_section("DKD", {
    "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
    "ALPHA": Key(1.0, "weight of the target-class term TCKD"),
    "BETA": Key(8.0, "weight of the non-target-class term NCKD"),
    "T": Key(4.0, "temperature of both terms (each scaled by T^2)"),
    "WARMUP": Key(20, "epochs of the linear warm-up min(epoch / WARMUP, 1) of the DKD term"),
})


def dkd_logit_stand(cfg, base_temp: float, kd_weight: float) -> None:
    """`--logit-stand`: DKD.ALPHA and DKD.BETA times w, DKD.T = tau."""
    cfg.DKD.ALPHA = float(cfg.DKD.ALPHA * kd_weight)
    cfg.DKD.BETA = float(cfg.DKD.BETA * kd_weight)
    cfg.DKD.T = float(base_temp)


@register_distiller("DKD")
class DKD(Distiller):
    """`CE_WEIGHT * CE + min(epoch / WARMUP, 1) * (ALPHA * TCKD + BETA * NCKD)` at temperature DKD.T."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("DKD",),
        teacher_reads=logits_on("image"),
        logit_stand=dkd_logit_stand,
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        dkd = cfg.DKD
        return {"ce_weight": dkd.CE_WEIGHT, "alpha": dkd.ALPHA, "beta": dkd.BETA, "temperature": dkd.T,
                "warmup": dkd.WARMUP}

    def setup(self, ce_weight: float, alpha: float, beta: float, temperature: float, warmup: float) -> None:
        self.ce_weight = ce_weight
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature
        self.warmup = warmup

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, *, epoch: int, **batch):
        logits_student, _ = self.student(image)
        logits_teacher = self.teacher_logits(image, batch.get("teacher_logits"))
        student_kd, teacher_kd = self.distill_logits(logits_student, logits_teacher)
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": dkd_warmup(epoch, self.warmup)
            * dkd_loss(student_kd, teacher_kd, target, self.alpha, self.beta, self.temperature),
        }
        return logits_student, losses
