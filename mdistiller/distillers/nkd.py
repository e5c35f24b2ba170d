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

The distiller `NKD`: `CE_WEIGHT * CE + NKD` (the mmcls head's CE, weight 1; the NKD loss unweighted), no warm-up.
Keys `NKD.{CE_WEIGHT 1.0, TEMPERATURE 1.0, GAMMA 1.5}` (the authors' ImageNet values; their CIFAR file: T 3, gamma
3.5). It trains on soft labels (DATASET.MIXUP): CE takes the probabilities, NKD their argmax. A config that sets
`DKD.*` keys away from their defaults is SDD's `NKD`, a different loss: refused with a pointer to `SDD_NKD`.
Logit standardisation is refused: the authors never use it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MdistillerError
from ._base import Declaration, Distiller, cross_entropy, logits_on
from ._logit_checks import check_logit_pair, check_positive, hard_labels, logit_stand_refusal, working_precision
from .config import Key, config_section, iter_keys, lookup, method_sections
from .precision import fp32_loss
from .registry import register_distiller


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


config_section("NKD", {
    "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
    "TEMPERATURE": Key(1.0, "temperature T of the non-target term (scaled by T^2; the target term is at T = 1)"),
    "GAMMA": Key(1.5, "weight gamma of the non-target term"),
})


def sdd_dkd_keys(cfg) -> list[str]:
    """The `DKD.*` keys the config sets away from their defaults: SDD's `NKD` reads them, ours does not."""
    return [f"{name} {lookup(cfg, name)}" for name, key in iter_keys(method_sections()["DKD"], "DKD")
            if lookup(cfg, name) != key.default]


@register_distiller("NKD")
class NKD(Distiller):
    """`CE_WEIGHT * CE + L_t + L_n` with the label's column removed from the non-target term (the authors')."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_kd"),
        distillation_terms=("loss_kd",),
        config_sections=("NKD", "DKD"),  # DKD: read only to refuse SDD's NKD configs
        teacher_reads=logits_on("image"),
        logit_stand_refusal=logit_stand_refusal("NKD"),
        accepts_soft_targets=True,  # CE with probabilities, NKD on their argmax
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        sdd = sdd_dkd_keys(cfg)
        if sdd:
            raise MdistillerError(
                f"DISTILLER.TYPE NKD with {', '.join(sdd)} is SDD's NKD (label column kept, DKD.* keys), not ours: "
                f"use DISTILLER.TYPE SDD_NKD with SDD.M [1], DKD.T 1.0, DKD.BETA 1.5 (or drop the DKD keys)")
        nkd = cfg.NKD
        check_positive("NKD", **{"NKD.TEMPERATURE": nkd.TEMPERATURE})
        return {"ce_weight": nkd.CE_WEIGHT, "temperature": nkd.TEMPERATURE, "gamma": nkd.GAMMA}

    def setup(self, ce_weight: float, temperature: float, gamma: float) -> None:
        self.ce_weight = ce_weight
        self.temperature = temperature
        self.gamma = gamma

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, _ = self.student(image)
        logits_teacher = self.teacher_logits(image, batch.get("teacher_logits"))
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_kd": nkd_loss(logits_student, logits_teacher, target, self.temperature, self.gamma),
        }
        return logits_student, losses
