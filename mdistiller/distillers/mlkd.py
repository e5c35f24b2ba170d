"""MLKD (Jin et al., CVPR 2023): multi-level logit distillation over a weak and a strong view of each image.

Instance-level KL, batch correlation (B x B Gram of the softmax matrix) and class correlation (C x C Gram) at the
temperatures {T, 3, 5, 2, 6}, with confidence masks from the teacher's weak-view prediction.

By default this reproduces the authors' code, quirks included (MLKD.PER_SAMPLE_MASK False):
- each term is reduced to a batch scalar before `(loss * mask).mean()`, so a mask only scales the term by the fraction
  of samples (classes) it keeps;
- in the strong-view instance set the T=2 and T=6 terms compare the weak-view logits;
- strong-view batch/class terms do not reach the returned losses (the reference computes and drops them; we skip them).
MLKD.PER_SAMPLE_MASK True masks per sample (per class for the class term) as the paper describes.
With logit standardisation only the instance-level KL terms see z-scored logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MdistillerError
from ._base import Declaration, Distiller, cross_entropy, logits_on
from .config import Key, config_section
from .kd import kd_logit_stand, kd_loss
from .precision import fp32_loss
from .registry import register_distiller

EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)
STRONG_SET_WEAK_POSITIONS = (3, 4)  # the T=2 and T=6 entries of mlkd_temperatures()


def mlkd_temperatures(temperature: float) -> tuple[float, ...]:
    """The temperature set `{T, 3, 5, 2, 6}` in the reference's order."""
    return (float(temperature), *EXTRA_TEMPERATURES)


def instance_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample `T^2 * KL(softmax(z_t / T) || softmax(z_s / T))`, shape (B,) (fp32)."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1) * temperature**2


def batch_correlation_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """Per-sample rows of `||P_t P_t^T - P_s P_s^T||_F^2 / B`, shape (B,); they sum to the batch term."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    diff = p_t @ p_t.t() - p_s @ p_s.t()
    return (diff**2).sum(1) / p_s.shape[0]


def class_correlation_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """Per-class rows of `||P_t^T P_t - P_s^T P_s||_F^2 / C`, shape (C,); they sum to the class term."""
    p_s = F.softmax(student_logits.float() / temperature, dim=1)
    p_t = F.softmax(teacher_logits.float() / temperature, dim=1)
    diff = p_t.t() @ p_t - p_s.t() @ p_s
    return (diff**2).sum(1) / p_s.shape[1]


def batch_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """`||P_t P_t^T - P_s P_s^T||_F^2 / B` with `P = softmax(z / T)` (B x C)."""
    return batch_correlation_rows(student_logits, teacher_logits, temperature).sum()


def class_correlation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """`||P_t^T P_t - P_s^T P_s||_F^2 / C` with `P = softmax(z / T)` (B x C)."""
    return class_correlation_rows(student_logits, teacher_logits, temperature).sum()


def _median_mask(values: torch.Tensor) -> torch.Tensor:
    """`values <= median`, the median interpolated as numpy's 50th percentile (the reference's threshold)."""
    return values <= torch.quantile(values.float(), 0.5)


def confidence_masks(teacher_weak_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample mask (B,), class mask (C,)) from the teacher's weak-view softmax at T = 1: keep the least confident."""
    p_t = F.softmax(teacher_weak_logits.detach().float(), dim=1)
    return _median_mask(p_t.max(dim=1).values), _median_mask(p_t.sum(dim=0))


def _masked(rows: torch.Tensor, mask: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """Reference: the batch-reduced term times the kept fraction. Per sample: only kept rows count."""
    if per_sample:
        return (rows * mask).sum()
    return (rows.sum() * mask).mean()


@fp32_loss
def mlkd_losses(
    student_weak: torch.Tensor,
    teacher_weak: torch.Tensor,
    student_strong: torch.Tensor,
    teacher_strong: torch.Tensor,
    temperature: float,
    kd_weight: float,
    per_sample_mask: bool = False,
    instance_logits: tuple[torch.Tensor, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """`loss_kd` (weak masked + strong instance terms), `loss_cc` (weak, class mask), `loss_bc` (weak, sample mask).

    `instance_logits` = (student_weak, teacher_weak, student_strong, teacher_strong) for the instance KL terms when they
    differ from the correlation terms' logits (logit standardisation); the masks always come from the raw teacher_weak.
    """
    inst_s_weak, inst_t_weak, inst_s_strong, inst_t_strong = instance_logits or (
        student_weak, teacher_weak, student_strong, teacher_strong
    )
    sample_mask, class_mask = confidence_masks(teacher_weak)
    temps = mlkd_temperatures(temperature)
    zero = student_weak.new_zeros((), dtype=torch.float32)
    loss_kd_weak, loss_kd_strong, loss_cc, loss_bc = zero, zero, zero, zero
    for position, t in enumerate(temps):
        # per-sample KL / B: summing kept rows gives the paper's masked batch mean; all rows give kd_loss
        weak_rows = instance_kl(inst_s_weak, inst_t_weak, t) / inst_s_weak.shape[0]
        loss_kd_weak = loss_kd_weak + kd_weight * _masked(weak_rows, sample_mask, per_sample_mask)
        # reference quirk: the strong set's T=2 and T=6 terms (by position: T may itself be 2) use the weak view
        if position in STRONG_SET_WEAK_POSITIONS:
            loss_kd_strong = loss_kd_strong + kd_weight * kd_loss(inst_s_weak, inst_t_weak, t)
        else:
            loss_kd_strong = loss_kd_strong + kd_weight * kd_loss(inst_s_strong, inst_t_strong, t)
        cc_rows = class_correlation_rows(student_weak, teacher_weak, t)
        loss_cc = loss_cc + kd_weight * _masked(cc_rows, class_mask, per_sample_mask)
        bc_rows = batch_correlation_rows(student_weak, teacher_weak, t)
        loss_bc = loss_bc + kd_weight * _masked(bc_rows, sample_mask, per_sample_mask)
    return {"loss_kd": loss_kd_weak + loss_kd_strong, "loss_cc": loss_cc, "loss_bc": loss_bc}


# MLKD (Jin et al., CVPR 2023) reads KD.TEMPERATURE and KD.LOSS.*; this switch is ours.
config_section("MLKD", {
    "PER_SAMPLE_MASK": Key(False, "False: the reference (a mask scales a batch-mean term); True: the paper's masking"),
})


@register_distiller("MLKD", ("KD_ours", "the logit-standardisation repo's ImageNet configs name MLKD KD_ours"))
class MLKD(Distiller):
    """CE on both views (each times KD.LOSS.CE_WEIGHT) + multi-level logit terms (each times KD.LOSS.KD_WEIGHT)."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd", "loss_cc", "loss_bc"),
        distillation_terms=("loss_kd", "loss_cc", "loss_bc"),
        config_sections=("KD", "MLKD"),
        train_views={"image_weak": "standard", "image_strong": "strong"},
        # the teacher's logits on both views: the teacher-output cache serves the weak (standard) view, the strong
        # one draws augmentation operations that cannot be enumerated and keeps its live teacher
        teacher_reads=logits_on("image_weak", "image_strong"),
        logit_stand=kd_logit_stand,
        upstream_trainers=("base", "ours", "aug"),  # the LS repo names its two-view trainer "ours" (and "aug")
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        return {"temperature": cfg.KD.TEMPERATURE, "ce_weight": cfg.KD.LOSS.CE_WEIGHT,
                "kd_weight": cfg.KD.LOSS.KD_WEIGHT, "per_sample_mask": bool(cfg.MLKD.PER_SAMPLE_MASK)}

    def setup(self, temperature: float, ce_weight: float, kd_weight: float, per_sample_mask: bool = False) -> None:
        self.temperature = temperature
        self.ce_weight = ce_weight
        self.kd_weight = kd_weight
        self.per_sample_mask = per_sample_mask

    def forward_train(
        self,
        image_weak: torch.Tensor | None = None,
        image_strong: torch.Tensor | None = None,
        target: torch.Tensor | None = None,
        **batch,
    ) -> tuple[torch.Tensor, dict]:
        if image_weak is None or image_strong is None:
            raise MdistillerError(
                "MLKD trains on two views: forward_train needs image_weak and image_strong "
                f"(the data set must build the views {dict(self.declares.train_views)})"
            )
        student_weak, _ = self.student(image_weak)
        student_strong, _ = self.student(image_strong)
        teacher_weak = self.teacher_logits(image_weak, batch.get("teacher_logits"))
        teacher_strong, _ = self.teacher_forward(image_strong)
        instance_logits = (*self.distill_logits(student_weak, teacher_weak),
                           *self.distill_logits(student_strong, teacher_strong))
        losses = {
            "loss_ce": self.ce_weight * (cross_entropy(student_weak, target) + cross_entropy(student_strong, target)),
            **mlkd_losses(
                student_weak, teacher_weak, student_strong, teacher_strong, self.temperature, self.kd_weight,
                per_sample_mask=self.per_sample_mask, instance_logits=instance_logits,
            ),
        }
        return student_weak, losses
