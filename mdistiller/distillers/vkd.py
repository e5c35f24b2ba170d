"""VkD (Miles et al., CVPR 2024): distil a feature through an orthogonal projection onto a normalised teacher.

Reference (ViT students): `P = orthogonal(nn.Linear(D_s, D_t, bias=False))` keeps its D_t x D_s weight
semi-orthogonal through training (orthonormal columns when D_s <= D_t, rows otherwise); the loss compares
`P(f_s)` with `layer_norm(f_t)` (no affine) by smooth L1, next to CE and a KL term at T = 1.

Ours for CNNs (our design): `f_s`, `f_t` = `pooled_feat` of student and teacher, and
`L = CE_WEIGHT * CE + FEAT_WEIGHT * smooth_l1(P f_s, LN(f_t)) + KD_WEIGHT * T^2 * KL(T)` (keys under VKD.).
P uses the "matrix_exp" map for every shape (VKD.ORTHOGONAL_MAP; see `orthogonal_projection` for why not torch's
non-square default) and is trained by the student's optimizer with its learning rate and weight decay.
`--logit-stand` z-scores the logits of the KL term and sets VKD.T = tau, VKD.KD_WEIGHT = w.

Which feature each side contributes is pluggable: VKD.STUDENT_FEATURE / VKD.TEACHER_FEATURE name an entry of
`VKD_FEATURES` (`feats dict -> B x D`); "token_mean" (mean of the output tokens, the reference's student
representation) is there for a ViT model whose feats hold "tokens" (B x N x D). `register_vkd_feature` adds more.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from ..errors import MdistillerError
from ._base import Declaration, Distiller, cross_entropy
from .config import Key, config_section
from .kd import kd_loss
from .precision import fp32_loss
from .probe import DEFAULT_SETTING, Setting, probe_features, probe_input_size
from .registry import register_distiller

FeatureFn = Callable[[dict], torch.Tensor]
VKD_FEATURES: dict[str, FeatureFn] = {}


def register_vkd_feature(name: str) -> Callable[[FeatureFn], FeatureFn]:
    """Decorator: make `feats -> B x D` selectable as VKD.STUDENT_FEATURE / VKD.TEACHER_FEATURE `name`."""

    def wrap(fn: FeatureFn) -> FeatureFn:
        VKD_FEATURES[name] = fn
        return fn

    return wrap


@register_vkd_feature("pooled")
def pooled_feature(feats: dict) -> torch.Tensor:
    """The globally pooled feature before the classifier (CNNs of the zoo)."""
    return feats["pooled_feat"]


@register_vkd_feature("token_mean")
def token_mean_feature(feats: dict) -> torch.Tensor:
    """The mean of a transformer's output tokens (feats["tokens"], B x N x D), as the reference's student."""
    return feats["tokens"].mean(dim=1)


def get_vkd_feature(name: str) -> FeatureFn:
    if name not in VKD_FEATURES:
        raise MdistillerError(f"unknown VkD feature {name!r}; known: {', '.join(sorted(VKD_FEATURES))}")
    return VKD_FEATURES[name]


ORTHOGONAL_MAPS = ("matrix_exp", "cayley", "householder")


def orthogonal_projection(student_dim: int, teacher_dim: int, orthogonal_map: str = "matrix_exp") -> nn.Linear:
    """`orthogonal(nn.Linear(D_s, D_t, bias=False))`: its weight (D_t x D_s) stays semi-orthogonal.

    "matrix_exp" by default for every shape: torch's own default for a non-square weight, "householder", reads the
    reflector signs from the diagonal of the raw parameter cast to int, so any weight decay (0.9995 -> 0) turns the
    weight into zeros after one step.
    """
    if orthogonal_map not in ORTHOGONAL_MAPS:
        raise MdistillerError(f"VKD.ORTHOGONAL_MAP must be one of {', '.join(ORTHOGONAL_MAPS)}, got {orthogonal_map!r}")
    return orthogonal(nn.Linear(student_dim, teacher_dim, bias=False), orthogonal_map=orthogonal_map)


@fp32_loss
def vkd_feature_loss(projected_student: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """`smooth_l1(P f_s, layer_norm(f_t))`: LN per sample over the feature dimension, no affine; mean over B x D."""
    teacher = F.layer_norm(teacher_feat.float(), (teacher_feat.shape[-1],))
    return F.smooth_l1_loss(projected_student.float(), teacher)


# VkD (Miles et al., CVPR 2024), our CNN form: CE + smooth_l1(P f_s, layer_norm(f_t)) + T^2 KL, P orthogonal.
config_section("VKD", {
    "CE_WEIGHT": Key(1.0, "weight of the cross-entropy with the labels"),
    "FEAT_WEIGHT": Key(1.0, "weight of the projected-feature term"),
    "KD_WEIGHT": Key(0.0, "weight of the KL term (0: off)"),
    "T": Key(1.0, "temperature of the KL term"),
    "STUDENT_FEATURE": Key("pooled", "the student feature, by name (mdistiller.distillers.vkd.VKD_FEATURES)"),
    "TEACHER_FEATURE": Key("pooled", "the teacher feature, by name"),
    "INPUT_SIZE": Key((32, 32), "input of the dry forward that reads the feature sizes"),
    "ORTHOGONAL_MAP": Key("matrix_exp", "parametrisation of the orthogonal projection (householder: no wd)",
                          ("matrix_exp", "cayley", "householder")),
})


def vkd_logit_stand(cfg, base_temp: float, kd_weight: float) -> None:
    """`--logit-stand`: VKD.T = tau, VKD.KD_WEIGHT = w."""
    cfg.VKD.T = float(base_temp)
    cfg.VKD.KD_WEIGHT = float(kd_weight)


@register_distiller("VKD")
class VKD(Distiller):
    """Orthogonal-projection feature distillation; see the module docstring."""

    declares = Declaration(
        loss_terms=("loss_ce", "loss_feat", "loss_kd"),
        distillation_terms=("loss_feat", "loss_kd"),
        config_sections=("VKD",),
        extra_modules=("projection",),
        logit_stand=vkd_logit_stand,
        accepts_soft_targets=True,  # CE with probabilities: trains under DATASET.MIXUP
    )

    @classmethod
    def from_config(cls, cfg) -> dict:
        vkd = cfg.VKD
        if vkd.ORTHOGONAL_MAP == "householder" and cfg.SOLVER.WEIGHT_DECAY > 0:
            raise MdistillerError(
                "VKD.ORTHOGONAL_MAP householder cannot take weight decay (it zeroes the projection after one step): "
                "use matrix_exp or cayley, or SOLVER.WEIGHT_DECAY 0"
            )
        get_vkd_feature(vkd.STUDENT_FEATURE)
        get_vkd_feature(vkd.TEACHER_FEATURE)
        return {"ce_weight": vkd.CE_WEIGHT, "feat_weight": vkd.FEAT_WEIGHT, "kd_weight": vkd.KD_WEIGHT,
                "temperature": vkd.T, "student_feature": vkd.STUDENT_FEATURE, "teacher_feature": vkd.TEACHER_FEATURE,
                "input_size": tuple(vkd.INPUT_SIZE), "orthogonal_map": vkd.ORTHOGONAL_MAP,
                "setting": Setting.from_cfg(cfg)}

    def setup(self, ce_weight: float = 1.0, feat_weight: float = 1.0, kd_weight: float = 0.0,
              temperature: float = 1.0, student_feature: str = "pooled", teacher_feature: str = "pooled",
              input_size=(32, 32), orthogonal_map: str = "matrix_exp", setting: Setting = DEFAULT_SETTING) -> None:
        self.ce_weight = ce_weight
        self.feat_weight = feat_weight
        self.kd_weight = kd_weight
        self.temperature = temperature
        self.student_feature = get_vkd_feature(student_feature)
        self.teacher_feature = get_vkd_feature(teacher_feature)
        probe_size = probe_input_size(setting, input_size, "VKD.INPUT_SIZE")
        feats_s, feats_t = probe_features((self.student, self.teacher), probe_size)
        student_dim, teacher_dim = self.student_feature(feats_s).shape[-1], self.teacher_feature(feats_t).shape[-1]
        self.projection = orthogonal_projection(student_dim, teacher_dim, orthogonal_map)

    def forward_train(self, image: torch.Tensor, target: torch.Tensor, **batch) -> tuple[torch.Tensor, dict]:
        logits_student, feats_student = self.student(image)
        logits_teacher, feats_teacher = self.teacher_forward(image)
        projected = self.projection(self.student_feature(feats_student).float())
        losses = {
            "loss_ce": self.ce_weight * cross_entropy(logits_student, target),
            "loss_feat": self.feat_weight * vkd_feature_loss(projected, self.teacher_feature(feats_teacher)),
        }
        if self.kd_weight > 0:
            student_kd, teacher_kd = self.distill_logits(logits_student, logits_teacher)
            losses["loss_kd"] = self.kd_weight * kd_loss(student_kd, teacher_kd, self.temperature)
        return logits_student, losses
