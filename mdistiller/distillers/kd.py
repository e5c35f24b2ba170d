"""KD (Hinton et al., 2015): cross-entropy plus temperature-scaled KL to the teacher's softened distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import Declaration, Distiller, cross_entropy, logits_on
from .config import Key, config_section
from .precision import fp32_loss
from .registry import register_distiller


@fp32_loss
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`, summed over classes, averaged over the batch (fp32)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(1).mean()
    return kl * temperature**2


config_section("KD", {
    "TEMPERATURE": Key(4.0, "softening temperature T of the KL term (scaled by T^2)"),
    "LOSS": {
        "CE_WEIGHT": Key(0.1, "weight of the cross-entropy with the labels"),
        "KD_WEIGHT": Key(0.9, "weight of the KL term"),
    },
})


def kd_logit_stand(cfg, base_temp: float, kd_weight: float) -> None:
    """`--logit-stand --base-temp tau --kd-weight w`: KD.TEMPERATURE = tau, KD.LOSS.KD_WEIGHT = w."""
    cfg.KD.TEMPERATURE = float(base_temp)
    cfg.KD.LOSS.KD_WEIGHT = float(kd_weight)


@register_distiller("KD")
class KD(Distiller):
    """`CE_WEIGHT * CE + KD_WEIGHT * kd_loss(T)`; with logit standardisation the KL compares z-scored logits."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("KD",),
        teacher_reads=logits_on("image"),
        logit_stand=kd_logit_stand,
        accepts_soft_targets=True,  # CE with probabilities: trains under DATASET.MIXUP
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {"temperature": cfg.KD.TEMPERATURE, "ce_weight": cfg.KD.LOSS.CE_WEIGHT,
                "kd_weight": cfg.KD.LOSS.KD_WEIGHT}

    def setup(self, temperature: float, ce_weight: float, kd_weight: float) -> None:
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, _ = self.student(image)
        logits_teacher = self.teacher_logits(image, batch.get("teacher_logits"))
        student_kd, teacher_kd = self.distill_logits(logits_student, logits_teacher)
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": self.kd_weight * kd_loss(student_kd, teacher_kd, self.temperature),
        }
        return logits_student, losses
